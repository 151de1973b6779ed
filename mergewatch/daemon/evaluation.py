"""The evaluation worker: one child process that evaluates published versions, one at a time.

Merges never wait for evaluation (DESIGN §1): the main loop hands a job (``EvalJob``) to the worker
and goes on; each tick it collects finished results (``poll``) and records them itself, so the main
loop stays the ledger's only writer. The worker is a separate process (multiprocessing ``spawn``)
with its own torch thread count (``eval.threads``); the evaluator is built once in it and reused.

Failures never reach the daemon: an exception in the evaluator comes back as an error result; a
worker that dies (out of memory, a segfault in a plugin) is noticed, its job reported as failed and
a new worker started for the next job. ``stop`` terminates the worker without waiting for a long
evaluation; the version stays unevaluated in the ledger and is evaluated again after a restart.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import signal
import time
from collections import deque

from mergewatch.eval.book import EvalJob


def _worker_main(settings, table_name: str, jobs, results) -> None:  # runs in the child process
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when the worker stops
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from mergewatch.eval.runner import try_evaluate

    while True:
        job = jobs.get()
        if job is None:
            return
        # anything, even SystemExit, is reported to the daemon, which records and retries it
        results.put((job, *try_evaluate(settings, table_name, job.path, catch=BaseException)))


class EvalWorker:
    def __init__(self, settings, table_name: str):
        self.settings = settings
        self.table_name = table_name
        self._ctx = mp.get_context("spawn")
        self._proc = None
        self._jobs = None
        self._results = None
        self._queue: deque[EvalJob] = deque()
        self._inflight: EvalJob | None = None
        self._started_at = 0.0

    # Jobs ---------------------------------------------------------------------------------------
    def submit(self, job: EvalJob) -> bool:
        """Queue a job unless the same version is queued or running; returns whether it was queued."""
        if job == self._inflight or job in self._queue:
            return False
        self._queue.append(job)
        self._kick()
        return True

    @property
    def busy(self) -> bool:
        return self._inflight is not None

    @property
    def backlog(self) -> int:
        return len(self._queue) + (1 if self._inflight is not None else 0)

    def poll(self) -> list[tuple[EvalJob, bool, object, float]]:
        """Finished jobs since the last call: ``(job, ok, result or error text, seconds)``."""
        done = []
        if self._inflight is not None:
            try:
                item = self._results.get_nowait()
            except queue.Empty:
                item = None
                if not self._proc.is_alive():
                    try:  # a result written just before the worker exited is still in the pipe
                        item = self._results.get(timeout=0.5)
                    except queue.Empty:
                        code = self._proc.exitcode
                        item = (self._inflight, False, f"the evaluation worker died (exit code {code})", time.monotonic() - self._started_at)
                        self._discard_worker()
            if item is not None:
                done.append(item)
                self._inflight = None
        self._kick()
        return done

    def _kick(self) -> None:
        if self._inflight is not None or not self._queue:
            return
        if self._proc is None or not self._proc.is_alive():
            self._start_worker()
        self._inflight = self._queue.popleft()
        self._started_at = time.monotonic()
        self._jobs.put(self._inflight)

    # Process ------------------------------------------------------------------------------------
    def _start_worker(self) -> None:
        self._jobs = self._ctx.Queue()
        self._results = self._ctx.Queue()
        self._proc = self._ctx.Process(
            target=_worker_main, args=(self.settings, self.table_name, self._jobs, self._results), name="mergewatch-eval", daemon=True
        )
        self._proc.start()

    def _discard_worker(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(5)
        for q in (self._jobs, self._results):
            if q is not None:
                q.cancel_join_thread()
                q.close()
        self._proc = self._jobs = self._results = None

    def stop(self) -> None:
        """Terminate the worker now (a running evaluation is abandoned and re-run after a restart)."""
        self._queue.clear()
        self._inflight = None
        self._discard_worker()
