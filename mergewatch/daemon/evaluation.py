"""The evaluation worker: one child process that evaluates published versions, one at a time.

Merges never wait for evaluation (DESIGN §1): the main loop hands a job (``EvalJob``) to the worker
and goes on; each tick it collects finished results (``poll``) and records them itself, so the main
loop stays the ledger's only writer. The worker is a separate process (multiprocessing ``spawn``)
with its own torch thread count (``eval.threads``); the evaluator is built once in it and reused.

The daemon's side is ``Evaluations`` (built only with ``[eval]``): it queues published versions for
the worker, collects the results and books them (``EvalBook.conclude``, in the main loop), with
the metrics and log events; ``refresh_gauges`` sets the daemon's gauges.

Failures never reach the daemon: an exception in the evaluator comes back as an error result; a
worker that dies (out of memory, a segfault in a plugin) is noticed, its job reported as failed and
a new worker started for the next job. ``stop`` terminates the worker without waiting for a long
evaluation; the version stays unevaluated in the ledger and is evaluated again after a restart.

The worker never outlives the daemon, however the daemon dies (``kill -9`` included; outside
systemd's cgroup nothing else would reap it): first thing, it asks the kernel for SIGKILL when its
parent dies (``PR_SET_PDEATHSIG``), checks that the parent is still the daemon (it may have died
before the request), and watches a "lifeline" pipe whose only write end the daemon holds (EOF: the
daemon is gone). Jobs and results travel over plain pipes rather than ``multiprocessing.Queue``s:
no semaphores, so multiprocessing's resource tracker (which every ``spawn`` starts) has nothing to
clean up, and it exits by itself at EOF once the daemon and the worker are both gone.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import threading
import time
from collections import deque

from mergewatch.eval.book import EvalBook, EvalJob

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent(parent_pid: int, lifeline, pdeathsig: bool) -> None:  # runs in the child process
    """End this process when the daemon ends. ``PR_SET_PDEATHSIG`` fires when the *thread* that
    started the child exits, so it is asked for only when the daemon's main thread started it (the
    main thread lives as long as the process); the lifeline covers every case, one read away."""
    if pdeathsig:
        try:
            ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGKILL), 0, 0, 0)
        except (AttributeError, OSError):  # not Linux: the lifeline alone
            pass
    if os.getppid() != parent_pid:  # the daemon died before the request: no signal will come
        os._exit(0)

    def watch() -> None:
        try:
            lifeline.recv()  # the daemon never sends: this returns at EOF, when it is gone
        except (EOFError, OSError):
            pass
        os._exit(0)

    threading.Thread(target=watch, name="lifeline", daemon=True).start()


def _worker_main(settings, table_name: str, jobs, results, parent_pid: int, lifeline, pdeathsig: bool) -> None:  # the child
    _die_with_parent(parent_pid, lifeline, pdeathsig)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when the worker stops
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from mergewatch.eval.runner import try_evaluate

    while True:
        try:
            job = jobs.recv()
        except EOFError:  # the daemon closed its end (or is gone)
            return
        if job is None:
            return
        # anything, even SystemExit, is reported to the daemon, which records and retries it
        results.send((job, *try_evaluate(settings, table_name, job.path, catch=BaseException)))


class EvalWorker:
    def __init__(self, settings, table_name: str):
        self.settings = settings
        self.table_name = table_name
        self._ctx = mp.get_context("spawn")
        self._proc = None
        self._jobs = None  # write ends the daemon keeps; the worker holds the other ends
        self._results = None
        self._lifeline = None
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
            alive = self._proc.is_alive()
            try:  # a result written just before the worker exited is still in the pipe
                item = self._results.recv() if self._results.poll(0 if alive else 0.5) else None
            except (EOFError, OSError):  # the worker is gone without a result
                item, alive = None, False
            if item is None and not alive:
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
        try:
            self._jobs.send(self._inflight)
        except OSError:  # the worker died just now: the next poll reports the job and starts another
            pass

    # Process ------------------------------------------------------------------------------------
    def _start_worker(self) -> None:
        self._discard_worker()
        jobs, self._jobs = self._ctx.Pipe(duplex=False)
        self._results, results = self._ctx.Pipe(duplex=False)
        lifeline, self._lifeline = self._ctx.Pipe(duplex=False)
        pdeathsig = threading.current_thread() is threading.main_thread()
        self._proc = self._ctx.Process(
            target=_worker_main,
            args=(self.settings, self.table_name, jobs, results, os.getpid(), lifeline, pdeathsig),
            name="mergewatch-eval",
            daemon=True,
        )
        try:
            self._proc.start()
        finally:
            for end in (jobs, results, lifeline):  # the worker has its own copies: EOF now means "gone"
                end.close()

    def _discard_worker(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(5)
        for end in (self._jobs, self._results, self._lifeline):
            if end is not None:
                end.close()
        self._proc = self._jobs = self._results = self._lifeline = None

    def stop(self) -> None:
        """Terminate the worker now (a running evaluation is abandoned and re-run after a restart)."""
        self._queue.clear()
        self._inflight = None
        self._discard_worker()


class Evaluations:
    """The daemon's evaluation bookkeeping beside the merge loop, called from the main loop only."""

    def __init__(self, settings, ws, metrics, log):
        self.settings = settings
        self.ws = ws
        self.metrics = metrics
        self.log = log
        self.book = EvalBook(settings, ws.ledger, ws.publishers)
        self.worker: EvalWorker | None = None  # started by ``start`` (the daemon's run)
        self.retry_due = threading.Event()  # set by the scheduler's retry job

    def start(self) -> None:
        self.worker = EvalWorker(self.settings, self.ws.table.name)
        self.queue()

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()

    def published(self, step: int, version: int | None) -> None:
        """A step published deploy ``version`` (None: none): evaluate it."""
        if self.worker is not None and version is not None:
            self.worker.submit(EvalJob("deploy", version, step, str(self.ws.publishers["deploy"].path(version))))

    def queue(self) -> None:
        """Queue every version without a successful evaluation (θ0 first) and settle the gate."""
        for job in self.book.pending():
            self.worker.submit(job)
        for (view, version), r in sorted(self.book.latest_rows().items()):
            if view == "deploy" and self.book.apply_gate(EvalJob(view, version, r["step"], ""), r["metrics"]):
                self.log.info("promoted", version=version, reason=r["metrics"].get("gate_reason", ""))
        refresh_gauges(self.metrics, self.ws, self.book)

    def collect(self) -> None:
        """Book the results the worker finished (and queue again what failed, when a retry is due)."""
        if self.worker is None:
            return
        if self.retry_due.is_set():
            self.retry_due.clear()
            self.queue()
        for job, ok, result, seconds in self.worker.poll():
            log = self.log.bind(view=job.view, version=job.version, step=job.step)
            try:
                row, outcome = self.book.conclude(job, ok, result)
            except Exception as e:  # noqa: BLE001 - recording must not stop the daemon
                log.exception("evaluation_record_failed", error=f"{type(e).__name__}: {e}")
                self.metrics.count_evaluation("failed")
                continue
            self.metrics.observe_evaluate(seconds)
            if row["status"] != "ok":
                self.metrics.count_evaluation("failed")
                log.error("evaluation_failed", error=row["error"], attempt=row["attempt"], retries=self.settings.eval.retries)
                continue
            self.metrics.count_evaluation("ok")
            log.info("evaluated", acc=row.get("acc"), bwt=row.get("bwt"), bwt_denominator=row.get("bwt_denominator"),
                     tasks={k: v["accuracy"] for k, v in row["tasks"].items()}, seconds=round(seconds, 3))
            if outcome == "held_back":
                self.metrics.count_held_back()
                log.warning("held_back", reason=row["gate_reason"], current=self.ws.publishers["deploy"].current())
            elif outcome == "promoted":
                log.info("promoted", reason=row["gate_reason"])
            refresh_gauges(self.metrics, self.ws, self.book)


def refresh_gauges(metrics, ws, book: EvalBook | None = None) -> None:
    """The daemon's gauges from the committed state, the publishers, the ledger and the book."""
    metrics.set_step(len(ws.merged_ids()))
    for view, pub in ws.publishers.items():
        cur = pub.current()
        if cur is not None:
            versions = pub.versions()
            metrics.set_version(view, cur, versions[-1] if versions else None)
    metrics.set_queue(ws.ledger.queue_depth())
    if book is not None:
        metrics.set_held_back(len(book.held_back()))
        row = book.latest_rows().get(("deploy", ws.publishers["deploy"].current()))
        if row is not None and row["metrics"].get("status") == "ok":
            metrics.set_eval(acc=row["metrics"].get("acc"), bwt=row["metrics"].get("bwt"))
