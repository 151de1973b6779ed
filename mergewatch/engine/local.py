"""The local executor: every tensor name of the model through a step's passes, in this process.

For each pass: open its sinks (``sinks.py``); for each name in sorted order, load that name's inputs
(θ0, θ_t, and the buffered experts, the previous state's tensors and this step's earlier outputs
when the pass reads them), run the unit of work on them (``work.tensor_work``: the pass's pure
function, checked and cast), write the outputs and drop the tensors before the next name is
loaded; then close the sinks, re-open them for the later passes and reduce the pass's stats into
the whole-model scalars. A frozen name is θ0's tensor, copied into every sink.

Memory: nothing model-sized is ever held, peak memory is a few tensors of the largest name plus the
strategy's own scalars. The tensors read here are handed over to the pass (``TensorInputs.owns``):
after the unit of work this loop only writes what it returned, so a pass may compute in its
inputs' buffers. All arithmetic is float32: inputs are upcast when loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mergewatch.checkpoint.reader import LazyCheckpoint
from mergewatch.checkpoint.writer import FileLayout
from mergewatch.engine.sinks import PassSinks, sink_path
from mergewatch.engine.work import add_stats, tensor_work
from mergewatch.numeric import release_freed_memory
from mergewatch.strategies.base import Pass, StepContext, Strategy, TensorInputs, TensorMeta

if TYPE_CHECKING:
    from mergewatch.engine.steps import Progress


@dataclass
class _Sources:
    """What a step reads: θ0, the experts (θ_t last), the previous step's state sets and the sinks
    written by this step's earlier passes (re-opened for reading)."""

    base: LazyCheckpoint
    experts: Sequence[Mapping[str, torch.Tensor]]
    state: Mapping[str, Mapping[str, torch.Tensor]]
    fresh: dict[str, LazyCheckpoint]

    def load(self, p: Pass, name: str) -> TensorInputs:
        """The inputs of ``name`` that pass ``p`` reads (``Pass.reads``), as float32."""
        owned: set[int] = set()  # filled by _load while the inputs are read
        return TensorInputs(
            base=_load(self.base, name, owned),
            experts=[_load(e, name, owned) for e in (self.experts if "experts" in p.reads else self.experts[-1:])],
            state={k: _load(v, name, owned) for k, v in self.state.items() if name in v} if "state" in p.reads else {},
            fresh={k: _load(v, name, owned) for k, v in self.fresh.items() if name in v} if "fresh" in p.reads else {},
            owned=frozenset(owned),
        )


def run_passes(
    strategy: Strategy,
    passes: Sequence[Pass],
    ctx: StepContext,
    base: LazyCheckpoint,
    experts: Sequence[Mapping[str, torch.Tensor]],
    prev_sets: Mapping[str, Mapping[str, torch.Tensor]],
    out_dir: Path,
    layout: FileLayout | None,
    progress: Progress | None,
    run_pass: Callable | None = None,
) -> tuple[dict[str, LazyCheckpoint], dict[str, tuple[str, dict[str, str]]], int]:
    """Stream every tensor name through ``passes`` in order, writing their sinks under ``out_dir``.
    Returns the sinks written (re-opened for reading), their (content sha256, file hashes) and the
    bytes written. ``run_pass`` runs one pass's names (default: here, ``_run_pass``; the Ray
    executor gives its own, ``ray_backend.py``)."""
    sources = _Sources(base, experts, prev_sets, {})
    hashes: dict[str, tuple[str, dict[str, str]]] = {}
    bytes_written = 0
    for number, p in enumerate(passes, start=1):
        sinks = PassSinks.open(strategy, p, ctx.model, out_dir, sources.fresh, layout)
        report = partial(progress, p.label or p.name, number, len(passes)) if progress else None
        totals = (run_pass or _run_pass)(strategy, p, ctx, sources, sinks, report)
        for sink, files in sinks.close().items():
            hashes[sink] = files
            sources.fresh[sink] = LazyCheckpoint(sink_path(out_dir, sink))
        bytes_written += sinks.bytes_written
        if p.reduce_fn is not None:
            ctx.scalars.update(p.reduce_fn(totals, ctx))
        release_freed_memory()
    return sources.fresh, hashes, bytes_written


def _run_pass(strategy: Strategy, p: Pass, ctx: StepContext, sources: _Sources, sinks: PassSinks,
              report: Callable[[int, int], None] | None) -> dict[str, torch.Tensor]:
    """Every name through pass ``p`` into ``sinks``; returns the pass's stats summed over the names.
    ``report(done, total)`` after each mergeable name."""
    metas = ctx.model.metas
    totals: dict[str, torch.Tensor] = {}
    for i, (name, meta) in enumerate(metas.items()):
        if not meta.role.mergeable:
            sinks.write_frozen(name, sources.base[name])
            continue
        add_stats(totals, _run_name(strategy, p, meta, ctx, sources, sinks))
        if p.trim:
            release_freed_memory()
        if report:
            report(i + 1, len(metas))
    return totals


def _run_name(strategy: Strategy, p: Pass, meta: TensorMeta, ctx: StepContext, sources: _Sources,
              sinks: PassSinks) -> dict[str, torch.Tensor]:
    """One name through pass ``p``: load, work, write; returns its stats. Its tensors are dropped on
    return, before the next name's are loaded (never two names' inputs alive at once)."""
    inputs = sources.load(p, meta.name)
    tensors, stats = tensor_work(strategy, p, meta, inputs, ctx, sinks.layout(meta.name))
    sinks.write(meta.name, tensors)
    return stats


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
