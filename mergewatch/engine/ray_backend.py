"""The Ray executor: a step's passes spread over the tasks of a Ray cluster, same bytes as local.

``RayExecutor`` is called exactly like the local executor (``local.run_passes``) and returns the
same things. For each pass the driver (the daemon, or ``mergewatch merge``) opens the sinks as the
local executor does, groups consecutive mergeable names into **tasks** of at most
``[engine.ray] task_bytes`` input bytes (a larger single name: a task of its own) and submits them
all; Ray runs them on whatever CPUs the cluster has (``num_cpus_per_task`` each). A task:

* opens its sources by path (θ0, the experts, the state sets, this step's earlier sinks are
  ``LazyCheckpoint``\\ s: headers and paths, no tensor; the paths must be the same on every node:
  shared storage is the requirement, docs/ray.md);
* runs every name of its group through ``work.tensor_work`` (the very function the local engine
  calls) under ``pinned_threads([engine] threads)``, its inputs loaded by the local engine's own
  ``_Sources.load`` (float32, owned as there);
* writes each name's *distinct* output tensors to a safetensors file in an attempt-unique directory
  ``<out_dir>/.ray/task<k>.<uuid>/`` and returns only small things: per-name stats, which sinks got
  the same tensor object, the file, its pid and its duration.

The driver then goes through the names in order, exactly as the local loop: a frozen name is θ0's
tensor, written by the driver; a mergeable name's outputs are read back from its file (one name at a
time: the driver never holds more than one name's outputs), sinks that shared one tensor in the
worker share one object again (mirroring, ``sinks.py``), and ``PassSinks.write`` and ``add_stats``
run in name order. So the files, their hashes and the whole-model scalars are the local backend's,
bit for bit. A task's directories (every attempt's, including a killed attempt's partial files,
which are never read) are removed once its names are written.

Faults. A worker that dies mid-task: Ray runs the task again (``max_retries``); its new attempt
writes a new directory, and the retry is counted (attempt directories beyond one per task). An
error raised by the strategy or a reader in a task is raised in the driver as it would be locally.
A cluster that cannot be reached, or loses the task for good, is a ``RayBackendError``: the step
fails (its staging directory is discarded by the caller, nothing is committed), or, with
``fallback = "local"``, the step is run again from scratch in this process.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mergewatch.checkpoint.reader import LazyCheckpoint
from mergewatch.checkpoint.writer import FileLayout, TensorSpec, _header_bytes
from mergewatch.engine.local import _Sources, run_passes
from mergewatch.engine.sinks import PassSinks
from mergewatch.engine.work import add_stats, tensor_work
from mergewatch.errors import MergewatchError
from mergewatch.faults import ENV as CRASH_ENV
from mergewatch.faults import crash_once
from mergewatch.numeric import pinned_threads, release_freed_memory
from mergewatch.strategies.base import Pass, StepContext, Strategy

if TYPE_CHECKING:
    from mergewatch.config import RaySettings
    from mergewatch.engine.steps import Progress

log = logging.getLogger(__name__)

#: the driver's scratch directory inside a step's staging directory (removed before it is committed)
STAGING = ".ray"

Outputs = tuple[dict[str, LazyCheckpoint], dict[str, tuple[str, dict[str, str]]], int]


class RayBackendError(MergewatchError):
    """The Ray cluster could not run a step (unreachable, or a task lost beyond its retries)."""


@dataclass
class EngineReport:
    """What the executor did in one step or prepare: in the step's log event and metrics."""

    backend: str = "ray"
    tasks: int = 0
    retries: int = 0
    task_seconds: list[float] = field(default_factory=list)
    workers: set[int] = field(default_factory=set)  # pids of the processes that ran a task
    fallback: str = ""  # why the step ran locally instead ("" when it did not)

    def summary(self) -> dict[str, Any]:
        s = self.task_seconds
        return {
            "backend": self.backend,
            "tasks": self.tasks,
            "retries": self.retries,
            "workers": len(self.workers),
            "task_seconds_max": round(max(s, default=0.0), 6),
            "task_seconds_mean": round(sum(s) / len(s), 6) if s else 0.0,
            "task_seconds": [round(x, 6) for x in s],
            **({"fallback": self.fallback} if self.fallback else {}),
        }


# The driver ------------------------------------------------------------------------------------

class RayExecutor:
    """``local.run_passes`` on a Ray cluster (module docstring). ``report`` describes the last call."""

    def __init__(self, settings: RaySettings, threads: int):
        self.settings = settings
        self.threads = threads
        self.report = EngineReport()

    def __call__(self, strategy: Strategy, passes: Sequence[Pass], ctx: StepContext, base: LazyCheckpoint,
                 experts: Sequence[Mapping[str, torch.Tensor]], prev_sets: Mapping[str, Mapping[str, torch.Tensor]],
                 out_dir: Path, layout: FileLayout | None, progress: Progress | None) -> Outputs:
        self.report = EngineReport()
        scalars = dict(ctx.scalars)
        try:
            return self._run(strategy, passes, ctx, base, experts, prev_sets, out_dir, layout, progress)
        except RayBackendError as e:
            if self.settings.fallback != "local":
                raise
            log.warning("ray backend unavailable, running the step locally: %s", e)
            for child in out_dir.iterdir():  # an empty staging directory again
                shutil.rmtree(child) if child.is_dir() else child.unlink()
            ctx.scalars.clear()
            ctx.scalars.update(scalars)
            self.report = EngineReport(backend="local", fallback=str(e))
            return run_passes(strategy, passes, ctx, base, experts, prev_sets, out_dir, layout, progress)

    def _run(self, strategy, passes, ctx, base, experts, prev_sets, out_dir: Path, layout, progress) -> Outputs:
        task_fn = _remote_task(self.settings)
        staging = out_dir / STAGING
        staging.mkdir()
        try:  # the local executor's loop over the passes, each pass's names run as tasks
            return run_passes(strategy, passes, ctx, base, experts, prev_sets, out_dir, layout, progress,
                              run_pass=partial(self._run_pass, task_fn, staging))
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _run_pass(self, task_fn, staging: Path, strategy: Strategy, p: Pass, ctx: StepContext, sources: _Sources,
                  sinks: PassSinks, report: Callable[[int, int], None] | None) -> dict[str, torch.Tensor]:
        """Pass ``p`` as tasks; the results are written in name order as ``local._run_pass`` does."""
        import ray

        metas = ctx.model.metas
        groups = task_groups(p, ctx, sources, self.settings.task_bytes)
        job = ray.put((strategy, p, ctx, sources))
        crash = os.environ.get(CRASH_ENV)
        refs = [task_fn.remote(job, [(n, sinks.layout(n)) for n in g], k, str(staging), self.threads, crash)
                for k, g in enumerate(groups)]
        group_of = {name: k for k, g in enumerate(groups) for name in g}
        totals: dict[str, torch.Tensor] = {}
        results: dict[str, dict] = {}
        try:
            for i, (name, meta) in enumerate(metas.items()):
                if not meta.role.mergeable:
                    sinks.write_frozen(name, sources.base[name])
                    continue
                k = group_of[name]
                if name not in results:
                    results = self._collect(refs[k], k, staging)
                done = results[name]
                sinks.write(name, _read_outputs(done))
                add_stats(totals, done["stats"])
                if name == groups[k][-1]:
                    _drop_attempts(staging, k)
                if report:
                    report(i + 1, len(metas))
        except BaseException:
            # No task may still write under the staging directory once it is removed: cancel them
            # all (a running one is interrupted) and wait for every one to end.
            for ref in refs:
                ray.cancel(ref)
            ray.wait(refs, num_returns=len(refs), timeout=60)
            raise
        return totals

    def _collect(self, ref, k: int, staging: Path) -> dict[str, dict]:
        """Task ``k``'s result (name -> outputs), its duration and retries into ``report``."""
        import ray

        try:
            res = ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            raise (cause if isinstance(cause, Exception) else RayBackendError(f"task {k} failed: {e}")) from None
        except ray.exceptions.RayError as e:
            raise RayBackendError(f"task {k} was lost: {type(e).__name__}: {e}") from e
        attempts = len(list(staging.glob(f"task{k:05d}.*")))
        self.report.tasks += 1
        self.report.retries += max(attempts - 1, 0)
        self.report.task_seconds.append(res["seconds"])
        self.report.workers.add(res["pid"])
        return {r["name"]: r for r in res["names"]}


def task_groups(p: Pass, ctx: StepContext, sources: _Sources, task_bytes: int) -> list[list[str]]:
    """Consecutive mergeable names (in name order) in groups of at most ``task_bytes`` input bytes
    (float32: what a worker holds), a larger name alone."""
    groups: list[list[str]] = []
    used = task_bytes
    for name, meta in ctx.model.metas.items():
        if not meta.role.mergeable:
            continue
        n_inputs = 1 + (len(sources.experts) if "experts" in p.reads else 1)
        if "state" in p.reads:
            n_inputs += sum(name in s for s in sources.state.values())
        if "fresh" in p.reads:
            n_inputs += sum(name in s for s in sources.fresh.values())
        size = 4 * meta.numel * n_inputs
        if used + size > task_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    return groups


def _read_outputs(done: dict) -> dict[str, torch.Tensor]:
    """sink -> tensor of one name, read back from its task's file; sinks that got one tensor object
    in the worker get one object here too (``PassSinks`` mirrors on identity)."""
    f = LazyCheckpoint(done["file"]) if done["file"] else {}
    by_key = {key: f[key] for key in set(done["sinks"].values())}
    return {sink: by_key[key] for sink, key in done["sinks"].items()}


def _drop_attempts(staging: Path, k: int) -> None:
    for d in staging.glob(f"task{k:05d}.*"):
        shutil.rmtree(d, ignore_errors=True)


def connect(settings: RaySettings) -> None:
    """Join (or, for ``address = "local"``, start) the cluster once per process; ``RayBackendError``
    when it cannot be reached. A process that already called ``ray.init`` keeps its cluster."""
    import ray

    if ray.is_initialized():
        return
    # ray.init replaces the SIGTERM handler with sys.exit: the daemon's own (finish the step, stop
    # cleanly) must stay
    main = threading.current_thread() is threading.main_thread()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)} if main else {}
    try:
        if settings.address == "local":
            ray.init(num_cpus=settings.num_cpus or None, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        else:
            ray.init(address=settings.address, log_to_driver=False, configure_logging=False)
    except Exception as e:  # ConnectionError, RuntimeError, ValueError...: all "no cluster"
        raise RayBackendError(f"cannot reach the Ray cluster at {settings.address!r}: {type(e).__name__}: {e}") from e
    finally:
        for sig, handler in handlers.items():
            if handler is not None:
                signal.signal(sig, handler)


def _remote_task(settings: RaySettings):
    import ray

    connect(settings)
    return ray.remote(run_task).options(num_cpus=settings.num_cpus_per_task, max_retries=settings.max_retries,
                                        retry_exceptions=False)


# The task (in a worker) ------------------------------------------------------------------------

def run_task(job: tuple, names: list[tuple[str, dict[str, tuple[int, ...]]]], k: int, staging: str, threads: int,
             crash: str | None) -> dict:
    """One task: ``names`` (each with its sinks' layout) through the pass of ``job``, their outputs
    into a fresh attempt directory under ``staging``. Runs in a Ray worker (module docstring)."""
    t0 = time.monotonic()
    strategy, p, ctx, sources = job
    attempt = Path(staging) / f"task{k:05d}.{uuid.uuid4().hex}"
    attempt.mkdir()  # not parents: a task of a step whose staging is gone writes nothing
    out = []
    with pinned_threads(threads):
        for i, (name, layout) in enumerate(names):
            meta = ctx.model.metas[name]
            tensors, stats = tensor_work(strategy, p, meta, sources.load(p, name), ctx, layout)
            out.append({"name": name, "stats": stats, **_write_outputs(attempt / f"{i}.safetensors", tensors)})
            del tensors
            if p.trim:
                release_freed_memory()
            if i == 0:
                crash_once("ray_task", crash, Path(staging) / "crashed-ray_task")
    release_freed_memory()
    return {"names": out, "pid": os.getpid(), "seconds": time.monotonic() - t0}


def _write_outputs(path: Path, tensors: Mapping[str, torch.Tensor]) -> dict:
    """The distinct tensor objects of one name's outputs as a safetensors file (keys "0", "1", ...):
    ``{"file", "sinks": sink -> key}``. Not fsynced: a scratch file, read back by the driver and
    then removed, never committed."""
    keys: dict[int, str] = {}
    distinct: list[torch.Tensor] = []
    sinks = {}
    for sink, t in tensors.items():
        if id(t) not in keys:
            keys[id(t)] = str(len(distinct))
            distinct.append(t.contiguous())
        sinks[sink] = keys[id(t)]
    if not distinct:
        return {"file": "", "sinks": sinks}
    specs = [TensorSpec(str(i), t.dtype, tuple(t.shape)) for i, t in enumerate(distinct)]
    with open(path, "wb") as f:
        f.write(_header_bytes(specs, None))
        for t in distinct:
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return {"file": str(path), "sinks": sinks}
