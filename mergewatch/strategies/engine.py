"""The streaming step engine: feeds every tensor of the model through a strategy's passes.

Memory: for each tensor name the engine loads θ0, θ_t (and the buffered experts, previous state
tensors and this step's earlier outputs when a pass asks for them), calls the pass's pure function,
writes the results straight into open ``CheckpointWriter``s and drops them. Nothing model-sized is
ever held: peak memory is a few tensors of the largest name, plus the strategy's own scalars. The
tensors it reads are handed over to the pass (``TensorInputs.owns``): after ``tensor_fn`` the engine
only writes what it returned, so a pass may compute in its inputs' buffers.

Outputs of one step go into a single directory (a staging directory that the caller renames into
``state/<t>/`` once complete, see ``state.py``):

    state.json                 strategy name, params, t, expert ids, meta, content hashes
    sets/<name>/...            tensor state sets (float32)
    views/<view>/...           published views (the base's storage dtype)

All arithmetic is float32 (inputs are upcast when loaded); views are cast back to the base dtype.

``run_prepare`` runs a strategy's prepare passes (base.py, "Prepared sets") the same way over a
committed state, into a staging directory that becomes ``state/<t>/prepared/``.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergewatch.checkpoint.reader import LazyCheckpoint
from mergewatch.checkpoint.validate import all_finite
from mergewatch.checkpoint.roles import RoleTable, num_blocks
from mergewatch.checkpoint.writer import CheckpointWriter, TensorSpec
from mergewatch.errors import MergewatchError
from mergewatch.numeric import DEFAULT_THREADS, pinned_threads, release_freed_memory
from mergewatch.strategies.base import (
    VIEWS,
    ModelInfo,
    Pass,
    PassOutput,
    StepContext,
    Strategy,
    TensorInputs,
    TensorMeta,
    ViewSource,
)

#: progress(pass_label, pass_number, n_passes, done, total)
Progress = Callable[[str, int, int, int, int], None]


class StrategyError(MergewatchError):
    """A strategy produced something inconsistent (a bug or an unsupported input)."""


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


def sink_path(directory: Path, sink: str, views: Sequence[str] = VIEWS) -> Path:
    return directory / ("views" if sink in views else "sets") / sink


def run_step(
    strategy: Strategy,
    ctx: StepContext,
    base: LazyCheckpoint,
    experts: Sequence[Mapping[str, torch.Tensor]],
    prev_sets: Mapping[str, Mapping[str, torch.Tensor]],
    out_dir: str | Path,
    *,
    shard_bytes: int | None = None,
    progress: Progress | None = None,
    threads: int = DEFAULT_THREADS,
) -> StepResult:
    """Run one step of ``strategy`` writing into ``out_dir`` (an empty staging directory).

    ``experts`` are the buffered experts oldest first, the new expert θ_t last (only θ_t unless the
    strategy's buffer need is ALL). ``prev_sets`` are the previous step's state sets. The passes
    run with exactly ``threads`` intra-op threads (``mergewatch.numeric``: the bits must not depend
    on the calling process's thread count).
    """
    t0 = time.monotonic()
    out_dir = Path(out_dir)
    passes = list(strategy.passes(ctx))
    state_sets = tuple(strategy.state_sets(ctx.t))
    views = strategy.view_sources(ctx)
    with pinned_threads(threads):
        written, hashes, bytes_written = _run_passes(strategy, passes, ctx, base, experts, prev_sets, out_dir, shard_bytes, progress)
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
    _drop_scratch(out_dir, written, keep={*state_sets, *VIEWS})
    meta = strategy.next_meta(ctx)
    return StepResult(
        directory=out_dir,
        meta=meta,
        sets={s: hashes[s][0] for s in state_sets},
        views=view_info,
        seconds=time.monotonic() - t0,
        bytes_written=bytes_written,
        stats={k: v for k, v in ctx.scalars.items() if isinstance(v, (int, float, str, bool))},
    )


@dataclass
class PrepareResult:
    directory: Path
    sets: dict[str, str]  # prepared set -> content sha256
    seconds: float = 0.0
    bytes_written: int = 0


def run_prepare(
    strategy: Strategy,
    ctx: StepContext,
    base: LazyCheckpoint,
    sets: Mapping[str, Mapping[str, torch.Tensor]],
    out_dir: str | Path,
    *,
    shard_bytes: int | None = None,
    progress: Progress | None = None,
    threads: int = DEFAULT_THREADS,
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
        written, hashes, bytes_written = _run_passes(strategy, passes, ctx, base, [], sets, out_dir, shard_bytes, progress)
    missing = [s for s in wanted if s not in written]
    if missing:
        raise StrategyError(f"{strategy.name}: prepared set(s) {missing} were never written")
    _drop_scratch(out_dir, written, keep=set(wanted))
    return PrepareResult(out_dir, {s: hashes[s][0] for s in wanted}, time.monotonic() - t0, bytes_written)


def _drop_scratch(out_dir: Path, written: Mapping[str, LazyCheckpoint], keep: set[str]) -> None:
    """Scratch sinks (written by a pass for a later one, but neither kept nor published) are removed."""
    for sink in written:
        if sink not in keep:
            shutil.rmtree(sink_path(out_dir, sink))


def _run_passes(
    strategy: Strategy,
    passes: Sequence[Pass],
    ctx: StepContext,
    base: LazyCheckpoint,
    experts: Sequence[Mapping[str, torch.Tensor]],
    prev_sets: Mapping[str, Mapping[str, torch.Tensor]],
    out_dir: Path,
    shard_bytes: int | None,
    progress: Progress | None,
) -> tuple[dict[str, LazyCheckpoint], dict[str, tuple[str, dict[str, str]]], int]:
    """Stream every tensor name through ``passes`` in order, writing their sinks under ``out_dir``.
    Returns the sinks written (re-opened for reading), their (content sha256, file hashes) and the
    bytes written."""
    metas = ctx.model.metas
    names = list(metas)
    written: dict[str, LazyCheckpoint] = {}
    hashes: dict[str, tuple[str, dict[str, str]]] = {}
    bytes_written = 0
    for pi, p in enumerate(passes):
        writers: dict[str, CheckpointWriter] = {}
        shapes: dict[str, dict[str, tuple[int, ...]]] = {}
        for sink in p.writes:
            if sink in written or sink in writers:
                raise StrategyError(f"{strategy.name}: sink '{sink}' written twice in one step")
            d = sink_path(out_dir, sink)
            d.mkdir(parents=True)
            specs = []
            for n in names:
                shape = metas[n].shape if sink in VIEWS else strategy.sink_shape(sink, metas[n])
                if shape is not None:
                    specs.append(TensorSpec(n, metas[n].dtype if sink in VIEWS else _state_dtype(metas[n]), tuple(shape)))
            writers[sink] = CheckpointWriter(d, specs, shard_bytes=shard_bytes)
            shapes[sink] = {sp.name: sp.shape for sp in specs}
        # Sinks that receive the very same tensors (TIME's init = deploy = ema on a float32 base)
        # are written once: a follower only mirrors its leader (same file layout) while every
        # tensor it gets is the leader's tensor object, and gets hard links to the leader's files
        # at the end. If a follower ever gets a different tensor, it is materialised on the spot
        # (the tensors so far read back from the leader's file) and written normally from then on.
        mirror: dict[str, str] = {}
        leaders: dict[tuple, str] = {}
        for sink, w in writers.items():
            key = w.layout_key
            if key in leaders:
                mirror[sink] = leaders[key]
            else:
                leaders[key] = sink
        totals: dict[str, torch.Tensor] = {}
        want_all = "experts" in p.reads
        want_state = "state" in p.reads
        want_fresh = "fresh" in p.reads
        for i, name in enumerate(names):
            meta = metas[name]
            if not meta.role.mergeable:
                frozen = base[name]
                for sink, w in writers.items():
                    if name in shapes[sink] and sink not in mirror:
                        w.write(name, frozen)
                continue
            owned: set[int] = set()  # filled by _load while the inputs are read
            inputs = TensorInputs(
                base=_load(base, name, owned),
                experts=[_load(e, name, owned) for e in (experts if want_all else experts[-1:])],
                state={k: _load(v, name, owned) for k, v in prev_sets.items() if name in v} if want_state else {},
                fresh={k: _load(v, name, owned) for k, v in written.items() if name in v} if want_fresh else {},
                owned=frozenset(owned),
            )
            out = p.tensor_fn(meta, inputs, ctx)
            if not isinstance(out, PassOutput):
                raise StrategyError(f"{strategy.name}/{p.name}: tensor_fn must return PassOutput")
            expected = {sink for sink in writers if name in shapes[sink]}
            if set(out.tensors) != expected:
                raise StrategyError(
                    f"{strategy.name}/{p.name}: '{name}' produced sinks {sorted(out.tensors)}, expected {sorted(expected)}"
                )
            checked: set[int] = set()  # views and state often share one tensor: check it once
            cast: dict[str, torch.Tensor] = {}
            for sink, tensor in out.tensors.items():
                if tuple(tensor.shape) != shapes[sink][name]:
                    raise StrategyError(
                        f"{strategy.name}/{p.name}: '{name}' -> {sink} has shape {tuple(tensor.shape)}, expected {shapes[sink][name]}"
                    )
                if id(tensor) not in checked:
                    if not all_finite(tensor):
                        raise StrategyError(f"{strategy.name}/{p.name}: non-finite values in '{name}' -> {sink}")
                    checked.add(id(tensor))
                cast[sink] = tensor.to(meta.dtype if sink in VIEWS else _state_dtype(meta))
            for sink, tensor in cast.items():  # leaders and diverged followers first
                if sink not in mirror:
                    writers[sink].write(name, tensor)
            for sink, leader in list(mirror.items()):
                if sink not in cast or cast[sink] is cast[leader]:
                    continue
                w, lw = writers[sink], writers[leader]
                while w.specs[w.position].name != name:  # catch up on what was mirrored so far
                    prior = w.specs[w.position].name
                    w.write(prior, lw.read_back(prior))
                w.write(name, cast[sink])
                del mirror[sink]
            del cast
            for k, v in out.stats.items():
                v = v.detach().to(torch.float64)
                totals[k] = totals[k] + v if k in totals else v.clone()
            # Drop this name's tensors before the next name's are loaded (otherwise two names'
            # inputs would be alive at once while the next TensorInputs is built).
            del inputs, out
            if p.trim:
                release_freed_memory()
            if progress:
                progress(p.label or p.name, pi + 1, len(passes), i + 1, len(names))
        for sink, w in writers.items():
            if sink in mirror:
                w.adopt(writers[mirror[sink]])  # leaders come first in ``writers``: already closed
            else:
                w.close()
            bytes_written += w.bytes_written
            hashes[sink] = (w.content_sha256, dict(w.files))
            written[sink] = LazyCheckpoint(sink_path(out_dir, sink))
        if p.reduce_fn is not None:
            ctx.scalars.update(p.reduce_fn(totals, ctx))
        release_freed_memory()
    return written, hashes, bytes_written


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.to(torch.float32)


def _load(src: Mapping[str, torch.Tensor], name: str, owned: set[int]) -> torch.Tensor:
    """``src[name]`` as float32; its ``id`` goes into ``owned`` when nobody else holds the tensor:
    a LazyCheckpoint reads a new tensor on every access, and a dtype conversion makes a new one.
    A float32 tensor of an in-memory mapping stays the caller's (read-only for the pass)."""
    raw = src[name]
    t = _f32(raw)
    if t is not raw or isinstance(src, LazyCheckpoint):
        owned.add(id(t))
    return t


def _state_dtype(meta: TensorMeta) -> torch.dtype:
    """State sets keep float32 so that a resumed run is bit-identical to an uninterrupted one;
    frozen (integer) tensors keep their own dtype."""
    return torch.float32 if meta.role.mergeable else meta.dtype
