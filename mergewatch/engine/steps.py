"""One step of a strategy, and the work prepared ahead for the next one (DESIGN §4).

``run_step`` runs the strategy's passes over the model (through the local executor, ``local.py``,
or with ``[engine] backend = "ray"`` on a Ray cluster, ``ray_backend.py``: the same bytes)
into a single directory, a staging directory that the caller renames into ``state/<t>/`` once
complete (``state.py``):

    state.json                 strategy name, params, t, expert ids, meta, content hashes
    sets/<name>/...            tensor state sets (float32)
    views/<view>/...           published views (the base's storage dtype)

and checks that it produced what the strategy promised: every state set, and each view either
written to the sink of its name or taken from the base. Scratch sinks (written for a later pass
only) are removed. ``run_prepare`` runs a strategy's prepare passes (base.py, "Prepared sets") the
same way over a committed state, into a staging directory that becomes ``state/<t>/prepared/``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mergewatch.checkpoint.reader import LazyCheckpoint
from mergewatch.checkpoint.roles import RoleTable, num_blocks
from mergewatch.checkpoint.writer import FileLayout
from mergewatch.engine.local import run_passes
from mergewatch.engine.sinks import drop_scratch
from mergewatch.engine.work import StrategyError
from mergewatch.numeric import DEFAULT_THREADS, pinned_threads
from mergewatch.strategies.base import VIEWS, ModelInfo, StepContext, Strategy, TensorMeta, ViewSource

if TYPE_CHECKING:
    from mergewatch.config import EngineSettings

#: progress(pass_label, pass_number, n_passes, done, total)
Progress = Callable[[str, int, int, int, int], None]


def executor(engine: EngineSettings | None, threads: int) -> Callable:
    """What runs a step's passes: ``local.run_passes``, or with ``[engine] backend = "ray"`` a
    ``RayExecutor`` (same signature and bytes; its ``report`` says how it went)."""
    if engine is None or engine.backend == "local":
        return run_passes
    from mergewatch.engine.ray_backend import RayExecutor

    return RayExecutor(engine.ray, threads)


def _engine_report(run: Callable) -> dict:
    report = getattr(run, "report", None)
    return report.summary() if report is not None else {"backend": "local"}


def build_model_info(base: LazyCheckpoint, table: RoleTable) -> ModelInfo:
    metas = {}
    for name in base:  # sorted
        info = base.info(name)
        metas[name] = TensorMeta(name, info.shape, info.torch_dtype, table.role_of(name, info.shape, info.torch_dtype))
    return ModelInfo(metas, num_blocks(table, metas), table.name)


@dataclass
class StepResult:
    directory: Path
    meta: dict
    sets: dict[str, str]  # state set -> content sha256
    views: dict[str, dict]  # view -> {"source": "sink"|"base", "content_sha256", "files"}
    seconds: float = 0.0
    bytes_written: int = 0
    stats: dict = field(default_factory=dict)
    engine: dict = field(default_factory=dict)  # the executor's report (ray_backend.EngineReport)


def run_step(
    strategy: Strategy,
    ctx: StepContext,
    base: LazyCheckpoint,
    experts: Sequence[Mapping[str, torch.Tensor]],
    prev_sets: Mapping[str, Mapping[str, torch.Tensor]],
    out_dir: str | Path,
    *,
    layout: FileLayout | None = None,
    progress: Progress | None = None,
    threads: int = DEFAULT_THREADS,
    engine: EngineSettings | None = None,
) -> StepResult:
    """Run one step of ``strategy`` writing into ``out_dir`` (an empty staging directory).

    ``experts`` are the buffered experts oldest first, the new expert θ_t last (only θ_t unless the
    strategy's buffer need is ALL). ``prev_sets`` are the previous step's state sets. Every sink is
    split into files as ``layout`` says (default: one file without metadata). The passes
    run with exactly ``threads`` intra-op threads (``mergewatch.numeric``: the bits must not depend
    on the calling process's thread count).
    """
    t0 = time.monotonic()
    out_dir = Path(out_dir)
    passes = list(strategy.passes(ctx))
    state_sets = tuple(strategy.state_sets(ctx.t))
    views = strategy.view_sources(ctx)
    with pinned_threads(threads):
        run = executor(engine, threads)
        written, hashes, bytes_written = run(strategy, passes, ctx, base, experts, prev_sets, out_dir, layout, progress)
    for s in state_sets:
        if s not in written:
            raise StrategyError(f"{strategy.name}: state set '{s}' was never written")
    view_info: dict[str, dict] = {}
    for v in VIEWS:
        src = views.get(v)
        if src == ViewSource.BASE:
            view_info[v] = {"source": "base"}
        elif src in written:
            if src != v:
                raise StrategyError(f"{strategy.name}: view '{v}' must be written to sink '{v}', not '{src}'")
            view_info[v] = {"source": "sink", "content_sha256": hashes[v][0], "files": hashes[v][1]}
        else:
            raise StrategyError(f"{strategy.name}: view '{v}' has no source (got {src!r})")
    drop_scratch(out_dir, written, keep={*state_sets, *VIEWS})
    meta = strategy.next_meta(ctx)
    return StepResult(
        directory=out_dir,
        meta=meta,
        sets={s: hashes[s][0] for s in state_sets},
        views=view_info,
        seconds=time.monotonic() - t0,
        bytes_written=bytes_written,
        engine=_engine_report(run),
        stats={k: v for k, v in ctx.scalars.items() if isinstance(v, (int, float, str, bool))},
    )


@dataclass
class PrepareResult:
    directory: Path
    sets: dict[str, str]  # prepared set -> content sha256
    seconds: float = 0.0
    bytes_written: int = 0
    engine: dict = field(default_factory=dict)  # as StepResult.engine


def run_prepare(
    strategy: Strategy,
    ctx: StepContext,
    base: LazyCheckpoint,
    sets: Mapping[str, Mapping[str, torch.Tensor]],
    out_dir: str | Path,
    *,
    layout: FileLayout | None = None,
    progress: Progress | None = None,
    threads: int = DEFAULT_THREADS,
    engine: EngineSettings | None = None,
) -> PrepareResult:
    """Compute ``strategy.prepared_sets(ctx.t)`` from the committed ``sets`` of step ``ctx.t`` into
    ``out_dir`` (an empty staging directory; base.py, "Prepared sets"). No expert is read and no
    view is written. Threads are pinned as in ``run_step`` (the next step must see the very factors
    it would have computed itself)."""
    t0 = time.monotonic()
    out_dir = Path(out_dir)
    wanted = tuple(strategy.prepared_sets(ctx.t))
    passes = list(strategy.prepare_passes(ctx))
    if not wanted or not passes:
        raise StrategyError(f"{strategy.name}: nothing to prepare after step {ctx.t}")
    for p in passes:
        if any(sink in VIEWS for sink in p.writes):
            raise StrategyError(f"{strategy.name}/{p.name}: a prepare pass cannot write a view")
    with pinned_threads(threads):
        run = executor(engine, threads)
        written, hashes, bytes_written = run(strategy, passes, ctx, base, [], sets, out_dir, layout, progress)
    missing = [s for s in wanted if s not in written]
    if missing:
        raise StrategyError(f"{strategy.name}: prepared set(s) {missing} were never written")
    drop_scratch(out_dir, written, keep=set(wanted))
    return PrepareResult(out_dir, {s: hashes[s][0] for s in wanted}, time.monotonic() - t0, bytes_written, _engine_report(run))
