"""The daemon: watched inbox → ledger → one merge worker → publish, with recovery (DESIGN §1, §3).

The main thread runs the worker loop and is the only writer of the ledger. Around it: the watchdog
observer (file events → ``Inbox.note``), the APScheduler jobs (rescan, retention, the systemd
heartbeat), the Prometheus HTTP server, and with ``[eval]`` the evaluation worker
(``daemon/evaluation.py``: queueing, collecting, gauges). One iteration of the loop: turn complete
drops into queued ledger rows (arrival order), then take the oldest queued expert through
``validate → claim into the store → strategy step → commit state → publish → record``. The
workspace does the step and writes its ledger rows (``Workspace.check``, ``merge_row``,
``reconcile``); the loop decides when, handles the inbox (rejected/ and duplicates), and logs,
counts and notifies.

Crash safety comes from ordering: a row is marked ``merging`` (with its content id) before the drop
is moved into the store; the step commits ``state/<t>/`` atomically; publishing is keyed by step.
On start, ``recover()`` clears staging leftovers, finishes publishing the newest committed step and
reconciles the ledger with the committed state (``Workspace.reconcile``): a ``merging`` row is
merged if the state already holds the expert, merged again (from the store, or the inbox if the
move had not happened) otherwise; a committed step no row knows (a batch run that stopped before
recording it) gets its rows.

When the queue is empty after a step, the loop prepares what the strategy can compute ahead for
the next step (``Workspace.prepare``: OPCM's SVDs), so that the next expert's arrival → deploy
latency does not include it. It is a cache: a stop request abandons it, a failure is logged, and
the next step computes the same tensors itself either way.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

from mergewatch import __version__, config
from mergewatch.checkpoint.reader import LazyCheckpoint
from mergewatch.errors import CheckpointError, IncompatibleExpertError, MergewatchError, SidecarError, rejection
from mergewatch.daemon import sdnotify
from mergewatch.daemon.evaluation import Evaluations, refresh_gauges
from mergewatch.daemon.inbox import Inbox, file_sidecar, parse_sidecar, reject
from mergewatch.daemon.logs import configure_logging, get_logger
from mergewatch.daemon.metrics import Metrics, engine_event
from mergewatch.daemon.scheduler import ProgressHeartbeat, make_scheduler
from mergewatch.daemon.watcher import InboxWatcher
from mergewatch.ledger import ExpertRow
from mergewatch.workspace import Workspace


class Daemon:
    def __init__(self, settings: config.Settings, *, config_path: Path | None = None, observe: bool = True, idle_wait: float = 0.5):
        self.settings = settings
        self.config_path = config_path
        self.observe = observe
        self.idle_wait = idle_wait
        self.log = get_logger(component="daemon")
        self.ws = Workspace(settings)
        self.ledger = self.ws.ledger
        self.inbox = Inbox(self.ws.root / "inbox", settings.watch.quiet_seconds)
        policy_name = settings.policy.deploy if not settings.policy.is_time else f"time-{settings.policy.init}-{settings.policy.deploy}-{settings.policy.technique}"
        self.policy_name = policy_name
        self.metrics = Metrics(policy=policy_name, version=__version__)
        # WATCHDOG=1 only while this loop makes progress (None when systemd asks for no watchdog).
        self.heartbeat = ProgressHeartbeat.from_environment()
        self.ws.progress = self._on_tensor
        self._stop = threading.Event()
        self._signals = 0
        self._in_step = False
        self._prepared_step: int | None = None  # the step whose prepare was last attempted
        self._reload = threading.Event()
        self._retention_due = threading.Event()
        self.watcher: InboxWatcher | None = None
        self.scheduler = None
        self.server = None
        # Evaluation (issue 9): a worker process beside the merge loop; results recorded here.
        self.evals = Evaluations(settings, self.ws, self.metrics, self.log) if settings.eval is not None else None

    # Lifecycle ------------------------------------------------------------------------------
    def run(self) -> int:
        self._install_signals()
        self.recover()
        self.server = self.metrics.serve(self.settings.metrics.listen)
        if self.observe and self.settings.watch.events:
            self.watcher = InboxWatcher(self.inbox, polling=self.settings.watch.polling)
            self.watcher.start()
        jobs = [
            ("rescan", self.settings.watch.rescan_seconds, self._rescan_job),
            ("retention", max(60.0, self.settings.watch.rescan_seconds), self._retention_job),
        ]
        if self.heartbeat is not None:
            jobs.append(self.heartbeat.job())
        if self.evals is not None:
            jobs.append(("evaluate", self.settings.eval.retry_seconds, self._eval_retry_job))
            self.evals.start()
        self.scheduler = make_scheduler(jobs, metrics=self.metrics, start=True)
        self.inbox.scan()
        self.log.info("ready", workspace=str(self.ws.root), policy=self.policy_name, metrics_port=getattr(self.server, "port", None),
                      architecture=self.ws.table.name, treated=self.ws.treated)
        sdnotify.ready()
        sdnotify.status(f"ready: step {self._step()} queue {self.ledger.queue_depth()}")
        try:
            while not self._stop.is_set():
                if self._reload.is_set():
                    self._reload.clear()
                    self.reload()
                self.tick()
        finally:
            sdnotify.stopping()
            self.log.info("stopping", step=self._step())
            self.shutdown()
        return 0

    def shutdown(self) -> None:
        if self.evals is not None:
            self.evals.stop()
        if self.watcher is not None:
            self.watcher.stop()
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
        if self.server is not None:
            self.server.close()
        self.ws.close()

    def _install_signals(self) -> None:
        def on_term(signum, frame):
            self._signals += 1
            self._stop.set()
            self.inbox.wakeup.set()
            if self._in_step and self._signals >= 2:
                # Second signal during a step: abandon it safely (the staging directory is
                # removed on the way out; the step is re-run on the next start).
                raise SystemExit(0)

        def on_hup(signum, frame):
            self._reload.set()
            self.inbox.wakeup.set()

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        signal.signal(signal.SIGHUP, on_hup)

    def reload(self) -> None:
        """SIGHUP: re-read the config; what can change at run time changes, the rest is refused."""
        sdnotify.reloading()
        try:
            new = config.load(self.config_path) if self.config_path else self.settings
        except MergewatchError as e:
            self.log.error("reload_failed", error=str(e))
            sdnotify.ready()
            return
        fixed = ("workspace", "base", "seed", "model", "policy", "eval")
        changed = [k for k in fixed if getattr(new, k) != getattr(self.settings, k)]
        if changed:
            self.log.error("reload_refused", keys=changed, reason="these settings take effect only on a restart (workspace, base, seed, model and policy only with a new workspace)")
        else:
            self.settings = new
            self.inbox.quiet_seconds = new.watch.quiet_seconds
            for pub in self.ws.publishers.values():
                pub.keep = new.publish.keep
            self.ws.settings = new
            self.log.info("reloaded")
        sdnotify.ready()

    # Recovery -------------------------------------------------------------------------------
    def recover(self) -> None:
        report = self.ws.recover()
        for _, expert_id, step in self.ws.reconcile():
            self.log.info("recovered_merged", expert_id=expert_id, step=step)
        self._refresh_gauges()
        last = [r["published_at"] for r in self.ledger.steps(limit=1) if r.get("published_at")]
        if last:  # the last publish before this process started (the gauge survives restarts)
            self.metrics.mark_success(last[0])
        # JSON objects, not Python reprs: {"deploy_recover": {"staging_removed": [...], ...}, ...}
        self.log.info("recovered", **json.loads(json.dumps(report, default=str)))

    # The loop --------------------------------------------------------------------------------
    def _on_tensor(self, *_args) -> None:
        if self.heartbeat is not None:
            self.heartbeat.beat()  # a long step is progress too

    def tick(self) -> None:
        self._on_tensor()
        if self.evals is not None:
            self.evals.collect()
        for drop in self.inbox.ready():
            if not self.ledger.is_pending_source(drop.name):
                try:
                    meta, problem = parse_sidecar(drop.sidecar), None
                except SidecarError as e:  # the drop goes to rejected/ with its sidecar (README: sidecars)
                    meta, problem = {}, e
                seq = self.ledger.add_drop(drop.name, drop.name, drop.fingerprint, meta, received_at=drop.first_seen or None)
                self.log.info("queued", seq=seq, name=drop.name)
                if problem is not None:
                    self._reject(self.ledger.get(seq), drop.path, problem, self.log.bind(seq=seq, name=drop.name))
            self.inbox.forget(drop.name)
        self.metrics.set_queue(self.ledger.queue_depth())
        row = self.ledger.next_queued()
        if row is None:
            if self._retention_due.is_set():
                self._retention_due.clear()
                self.apply_retention()
            if self._prepare_when_idle():
                return
            self.inbox.wakeup.wait(self.idle_wait)
            self.inbox.wakeup.clear()
            return
        try:
            self.process(row)
        except SystemExit:
            raise
        except Exception as e:  # never fatal: the expert is set aside with the reason, nothing lost
            self._fail(row, e)

    def _fail(self, row: ExpertRow, exc: Exception) -> None:
        reason = f"internal error while merging: {type(exc).__name__}: {exc}"
        self.log.exception("step_error", seq=row.seq, error=reason, reason_class="internal")
        row = self.ledger.get(row.seq)
        src = self.inbox.root / row.source
        merged = self.ws.merged_ids()
        if row.id and row.id in merged:
            return  # committed: recovery on the next tick finishes it
        try:
            if src.exists() or src.is_symlink():
                reject(src, reason, self.ws.root / "rejected", file_sidecar(src))
            elif row.id and self.ws.store.has(row.id):
                side = self.ws.store.sidecar_path(row.id)
                reject(self.ws.store.path(row.id), reason, self.ws.root / "rejected", side if side.is_file() else None)
        except OSError as e2:
            self.log.error("set_aside_failed", seq=row.seq, error=str(e2))
        self.ws.reject_row(row, "internal", reason)
        self.metrics.count_expert("rejected", "internal")

    def process(self, row: ExpertRow) -> None:
        log = self.log.bind(seq=row.seq, name=row.name)
        src = self.inbox.root / row.source
        if row.status == "queued":
            problem: Exception | None = None
            if src.is_symlink():
                problem = CheckpointError(src, f"symlinks are not accepted (points to {os.readlink(src)}): drop the file itself", "symlink")
            elif not src.exists():
                self.ws.reject_row(row, "vanished", "the drop disappeared from the inbox before it was claimed")
                self.metrics.count_expert("rejected", "vanished")
                return
            elif src.is_file() and not src.name.endswith(".safetensors"):
                problem = CheckpointError(src, "not a .safetensors file; " + _why_not_safetensors(src), "not_safetensors")
            if problem is None:
                try:
                    sha, step = self.ws.check(src)
                except (CheckpointError, IncompatibleExpertError, OSError) as e:
                    problem = e
            if problem is not None:
                self._reject(row, src, problem, log)
                return
            if step is not None:
                dest = reject(src, f"duplicate: the same tensor content ({sha}) was merged at step {step}", self.ws.root / "rejected", file_sidecar(src))
                self.ledger.set_status(row.seq, "duplicate", id=sha, reason=f"duplicate of step {step}", step=step)
                self.metrics.count_expert("duplicate")
                log.info("duplicate", expert_id=sha, step=step, moved_to=str(dest))
                return
            self.ledger.set_status(row.seq, "merging", id=sha)
            row = self.ledger.get(row.seq)
        self._merge(row, src, log.bind(expert_id=row.id))

    def _merge(self, row: ExpertRow, src: Path, log) -> None:
        def started(step: int) -> None:  # the step is recorded as started and about to run
            nonlocal log
            log = log.bind(step=step)
            log.info("merging")
            sdnotify.status(f"merging step {step}: {row.name}")
            self._in_step = True

        try:
            outcome = self.ws.merge_row(row, src, sidecar=file_sidecar(src), started=started)
        finally:
            self._in_step = False
        if outcome.status == "rejected":
            if outcome.reason_class == "vanished":
                self.metrics.count_expert("rejected", "vanished")
                log.error("lost")
                return
            self.metrics.count_expert("rejected", outcome.reason_class)
            log.error("step_failed", error=outcome.reason.removeprefix("step failed: "), problems=outcome.problems, reason_class=outcome.reason_class)
            return
        if outcome.status != "merged":  # caught up: committed before a crash, only the ledger was behind
            return
        step = outcome.step
        self.metrics.count_expert("merged")
        self.metrics.observe_merge(outcome.merge_seconds)
        self.metrics.observe_engine("step", outcome.engine)
        self.metrics.observe_publish(outcome.publish_seconds)
        self.metrics.observe_drop_to_publish(max(0.0, time.time() - row.received_at))  # from first seen in the inbox
        self.metrics.mark_success()
        self._refresh_gauges()
        log.info("merged", versions=outcome.versions, seconds=round(outcome.seconds, 3), prepared=outcome.prepared,
                 engine=engine_event(outcome.engine))
        if self.evals is not None:
            self.evals.published(step, outcome.versions.get("deploy"))
        sdnotify.status(f"idle: step {step}, deploy v{self.ws.publishers['deploy'].current()}")

    # Work ahead --------------------------------------------------------------------------------
    def _prepare_when_idle(self) -> bool:
        """Idle, with nothing queued: compute what the strategy can prepare for the next step from
        the committed state (OPCM's SVDs), once per step. Returns True when it ran. A failure
        costs only time: the next step computes the same tensors itself."""
        step = self._step()
        if step == 0 or self._prepared_step == step:
            return False
        self._prepared_step = step
        try:
            if not self.ws.prepare_due():
                return False
        except MergewatchError as e:
            self.log.error("prepare_failed", step=step, error=str(e))
            return False
        self.log.info("preparing", step=step)
        sdnotify.status(f"preparing the next step from step {step}")
        try:
            out = self.ws.prepare(progress=self._on_prepare_tensor)
        except _PrepareAbandoned:
            self.log.info("prepare_abandoned", step=step, reason="stopping")
            return True
        except Exception as e:  # noqa: BLE001 - a cache: never fatal
            self.log.exception("prepare_failed", step=step, error=f"{type(e).__name__}: {e}")
            return True
        if out is not None:
            self.metrics.observe_prepare(out.seconds)
            self.metrics.observe_engine("prepare", out.engine)
            self.log.info("prepared", step=out.step, seconds=round(out.seconds, 3), bytes=out.bytes_written,
                          engine=engine_event(out.engine))
        sdnotify.status(f"idle: step {step}, deploy v{self.ws.publishers['deploy'].current()}")
        return True

    def _on_prepare_tensor(self, *_args) -> None:
        self._on_tensor()
        if self._stop.is_set():
            raise _PrepareAbandoned  # the staging directory is removed; redone after a restart

    def _reject(self, row: ExpertRow, src: Path, problem: Exception, log) -> None:
        """Move a bad drop (and its sidecar) to rejected/ with the full reason, everywhere: the
        reason file, the ledger, the log event and ``status --json`` (``problems``), and its class
        as the metric's bounded ``reason`` label."""
        klass, full, problems = rejection(problem)
        dest = reject(src, full, self.ws.root / "rejected", file_sidecar(src))
        self.ws.reject_row(row, klass, full, problems)
        self.metrics.count_expert("rejected", klass)
        log.warning("rejected", reason=full.splitlines()[0], reason_class=klass, problems=problems, moved_to=str(dest))

    # Jobs -----------------------------------------------------------------------------------
    def _rescan_job(self) -> None:
        self.inbox.scan()

    def _eval_retry_job(self) -> None:
        # Scheduler thread: ask the main loop to queue failed (or missed) evaluations again.
        self.evals.retry_due.set()
        self.inbox.wakeup.set()

    def _retention_job(self) -> None:
        # Runs in a scheduler thread: only ask; the main loop (sole writer) applies it when idle.
        self._retention_due.set()
        self.inbox.wakeup.set()

    def apply_retention(self) -> None:
        keep = {r.id for r in self.ledger.experts("merging") if r.id}
        self.ws.apply_retention(keep)

    # Helpers --------------------------------------------------------------------------------
    def _step(self) -> int:
        return len(self.ws.merged_ids())

    def _refresh_gauges(self) -> None:
        refresh_gauges(self.metrics, self.ws, self.evals.book if self.evals is not None else None)


class _PrepareAbandoned(Exception):
    """Raised from the prepare progress callback when the daemon is asked to stop."""


def _why_not_safetensors(p: Path) -> str:
    try:
        LazyCheckpoint(p)
    except CheckpointError as e:
        return e.reason
    return "rename it to .safetensors if it is one"


def run(config_path: str | Path) -> int:
    import faulthandler

    faulthandler.enable()  # a watchdog SIGABRT prints every thread's traceback to the journal
    settings = config.load(config_path)
    configure_logging()
    d = Daemon(settings, config_path=Path(config_path))
    return d.run()
