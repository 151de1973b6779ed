"""Housekeeping beside the merge worker: interval jobs on an APScheduler 3.x background scheduler.

Jobs (rescan of the inbox, retention, the systemd heartbeat, evaluation) run in the scheduler's own
thread pool and never block a merge (DESIGN §1). Each job is guarded: an exception is logged with its
traceback and counted in ``mergewatch_job_failures_total{job=...}``, and the job simply runs again at
its next tick. ``max_instances=1`` keeps a slow run from overlapping itself and ``coalesce=True`` turns
a backlog of missed runs (a suspended laptop, a stalled disk) into one run.

``ProgressHeartbeat`` is the systemd watchdog tied to real progress (DESIGN §3.5): the worker calls
``beat()`` on every loop iteration (idle ones included, and inside a long step, e.g. per tensor);
the heartbeat job sends ``WATCHDOG=1`` only while the last beat is fresh. A hung worker stops beating,
the pings stop, and systemd kills and restarts the service (``WatchdogSec=``, ``Restart=``): a
free-running timer would keep a deadlocked daemon "healthy" forever.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from mergewatch.daemon import sdnotify
from mergewatch.daemon.logs import get_logger
from mergewatch.daemon.metrics import Metrics

__all__ = ["Jobs", "make_scheduler", "ProgressHeartbeat", "HEARTBEAT_JOB"]

HEARTBEAT_JOB = "heartbeat"

JobFunc = Callable[[], Any]


class Jobs:
    """Named interval jobs on a ``BackgroundScheduler``; a failing job is logged and counted, never fatal."""

    def __init__(self, metrics: Metrics | None = None, *, max_workers: int = 4, logger: Any = None) -> None:
        self.metrics = metrics
        self.log = logger if logger is not None else get_logger("mergewatch.scheduler")
        self.scheduler = BackgroundScheduler(
            # UTC avoids consulting the host's local timezone (tzlocal): intervals don't care about it.
            timezone=timezone.utc,
            executors={"default": ThreadPoolExecutor(max_workers=max_workers)},
            job_defaults={
                "max_instances": 1,
                "coalesce": True,
                # Late is better than never for housekeeping: run a missed tick whenever possible.
                "misfire_grace_time": None,
            },
        )

    # Registration -----------------------------------------------------------------------------

    def add(self, name: str, seconds: float, func: JobFunc, *, run_now: bool = False) -> None:
        """Run ``func()`` every ``seconds`` (first run after one interval, or at once with ``run_now``).

        With metrics, ``name`` must be one of the job names the ``Metrics`` were built with (the label
        set is fixed); adding a name again replaces that job.
        """
        if not seconds > 0:
            raise ValueError(f"job {name!r}: interval must be > 0 seconds, got {seconds!r}")
        if self.metrics is not None:
            self.metrics.check_job(name)
        extra = {"next_run_time": datetime.now(timezone.utc)} if run_now else {}
        self.scheduler.add_job(
            self._guarded(name, func), "interval", seconds=seconds, id=name, name=name, replace_existing=True, **extra
        )

    def _guarded(self, name: str, func: JobFunc) -> Callable[[], None]:
        def run() -> None:
            try:
                func()
            except Exception:
                self.log.exception("job_failed", job=name)
                if self.metrics is not None:
                    self.metrics.count_job_failure(name)

        run.__qualname__ = run.__name__ = f"job_{name}"
        return run

    def run_now(self, name: str) -> None:
        """Bring the job's next run forward to now (e.g. a rescan on SIGHUP); its interval is kept."""
        self.scheduler.modify_job(name, next_run_time=datetime.now(timezone.utc))

    def reschedule(self, name: str, seconds: float) -> None:
        """Change the job's interval (a reloaded configuration)."""
        if not seconds > 0:
            raise ValueError(f"job {name!r}: interval must be > 0 seconds, got {seconds!r}")
        self.scheduler.reschedule_job(name, trigger="interval", seconds=seconds)

    def remove(self, name: str) -> None:
        self.scheduler.remove_job(name)

    @property
    def names(self) -> list[str]:
        return [job.id for job in self.scheduler.get_jobs()]

    # Life cycle -------------------------------------------------------------------------------

    def start(self) -> None:
        if not self.scheduler.running:
            self.scheduler.start()

    @property
    def running(self) -> bool:
        return self.scheduler.running

    def shutdown(self, wait: bool = True) -> None:
        """Stop scheduling; with ``wait`` the jobs that are running finish first (idempotent)."""
        if self.scheduler.running:
            self.scheduler.shutdown(wait=wait)

    def __enter__(self) -> Jobs:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def make_scheduler(
    jobs: Iterable[tuple[str, float, JobFunc]],
    *,
    metrics: Metrics | None = None,
    start: bool = True,
    logger: Any = None,
) -> Jobs:
    """Build a ``Jobs`` with ``(name, seconds, callable)`` interval jobs, started unless ``start=False``."""
    jobs = list(jobs)
    scheduler = Jobs(metrics, max_workers=max(4, len(jobs)), logger=logger)
    for name, seconds, func in jobs:
        scheduler.add(name, seconds, func)
    if start:
        scheduler.start()
    return scheduler


class ProgressHeartbeat:
    """WATCHDOG=1 only while the worker loop is making progress.

    ``interval`` is the watchdog timeout (``WatchdogSec``, i.e. ``sdnotify.watchdog_interval()``).
    The heartbeat job runs every ``period`` (a quarter of the interval, so a ping lands well inside
    every window) and pings when the last ``beat()`` is younger than ``stale_after`` (default: the
    interval). A worker that stops beating is therefore killed at most ``stale_after + interval +
    period`` after its last beat. ``beat()`` is a single assignment: cheap enough to call per tensor.
    """

    def __init__(
        self,
        interval: float,
        *,
        stale_after: float | None = None,
        send: Callable[[], bool] = sdnotify.watchdog,
        clock: Callable[[], float] = time.monotonic,
        logger: Any = None,
    ) -> None:
        if not interval > 0:
            raise ValueError(f"watchdog interval must be > 0 seconds, got {interval!r}")
        self.interval = float(interval)
        self.stale_after = float(interval if stale_after is None else stale_after)
        self.period = self.interval / 4
        self._send = send
        self._clock = clock
        self._last = clock()  # start fresh: construction happens when the daemon starts its loop
        self._stalled = False
        self.log = logger if logger is not None else get_logger("mergewatch.heartbeat")

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None, **kwargs: Any) -> ProgressHeartbeat | None:
        """The heartbeat systemd asks for (``WATCHDOG_USEC``), or None when no watchdog is configured."""
        interval = sdnotify.watchdog_interval(environ)
        if interval is None:
            return None
        if "send" not in kwargs and environ is not None:
            kwargs["send"] = lambda: sdnotify.watchdog(environ=environ)
        return cls(interval, **kwargs)

    def beat(self) -> None:
        """The worker made progress (an iteration of its loop, idle or not; a tensor of a long step)."""
        self._last = self._clock()

    progress = beat

    @property
    def age(self) -> float:
        """Seconds since the last beat."""
        return self._clock() - self._last

    def check(self) -> bool:
        """The heartbeat job: ping systemd if the worker is alive; True if a ping was due and sent."""
        age = self.age
        if age >= self.stale_after:
            self.log.warning("worker_stalled", seconds_since_progress=round(age, 3), stale_after=self.stale_after)
            self._stalled = True
            return False
        if self._stalled:
            self.log.info("worker_progress_resumed")
            self._stalled = False
        return bool(self._send())

    def job(self) -> tuple[str, float, JobFunc]:
        """``(name, seconds, callable)`` for ``make_scheduler``/``Jobs.add``."""
        return (HEARTBEAT_JOB, self.period, self.check)
