"""The unit of work: one tensor name's inputs through one pass (DESIGN §4).

``tensor_work`` is everything a pass does for one name once its inputs are loaded: it calls the
strategy's pure ``tensor_fn``, checks what came back against the sinks' layout (exactly the sinks
that hold the name, their shapes, finite values) and casts every output to its sink's storage
dtype. It reads and writes no file and keeps nothing between calls: the local executor
(``local.py``) calls it in its loop, and an executor that spreads a step over several processes or
machines calls it wherever one name's inputs are, then writes the tensors it returns in name order.

``add_stats`` is the other half of a pass's per-name result: the stats every name returns, summed
in float64 in name order (the order fixes the bits of the whole-model scalars ``reduce_fn`` makes).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from mergewatch.checkpoint.validate import all_finite
from mergewatch.errors import MergewatchError
from mergewatch.strategies.base import VIEWS, Pass, PassOutput, StepContext, Strategy, TensorInputs, TensorMeta


class StrategyError(MergewatchError):
    """A strategy produced something inconsistent (a bug or an unsupported input)."""


def state_dtype(meta: TensorMeta) -> torch.dtype:
    """State sets keep float32 so that a resumed run is bit-identical to an uninterrupted one;
    frozen (integer) tensors keep their own dtype."""
    return torch.float32 if meta.role.mergeable else meta.dtype


def sink_dtype(sink: str, meta: TensorMeta) -> torch.dtype:
    """The storage dtype of ``meta.name`` in ``sink``: a view keeps the base's, a state set
    ``state_dtype``."""
    return meta.dtype if sink in VIEWS else state_dtype(meta)


def tensor_work(
    strategy: Strategy,
    p: Pass,
    meta: TensorMeta,
    inputs: TensorInputs,
    ctx: StepContext,
    layout: Mapping[str, tuple[int, ...]],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Pass ``p`` on one name: ``(sink -> output in the sink's dtype, stats)``. ``layout`` maps each
    sink that holds ``meta.name`` to its shape there; anything else from ``tensor_fn`` is a
    ``StrategyError``. The inputs are the pass's to overwrite (``TensorInputs.owns``)."""
    where = f"{strategy.name}/{p.name}"
    name = meta.name
    out = p.tensor_fn(meta, inputs, ctx)
    if not isinstance(out, PassOutput):
        raise StrategyError(f"{where}: tensor_fn must return PassOutput")
    if set(out.tensors) != set(layout):
        raise StrategyError(f"{where}: '{name}' produced sinks {sorted(out.tensors)}, expected {sorted(layout)}")
    checked: set[int] = set()  # views and state often share one tensor: check it once
    cast: dict[str, torch.Tensor] = {}
    # One cast per (tensor, dtype): sinks given the same tensor get the same object back in every
    # dtype, which is what lets a sink mirror another (sinks.py: EMA's deploy and init views of a
    # bf16 base become hard links of one file, not two copies).
    casts: dict[tuple[int, torch.dtype], torch.Tensor] = {}
    for sink, tensor in out.tensors.items():
        if tuple(tensor.shape) != layout[sink]:
            raise StrategyError(f"{where}: '{name}' -> {sink} has shape {tuple(tensor.shape)}, expected {layout[sink]}")
        if id(tensor) not in checked:
            if not all_finite(tensor):
                raise StrategyError(f"{where}: non-finite values in '{name}' -> {sink}")
            checked.add(id(tensor))
        dtype = sink_dtype(sink, meta)
        key = (id(tensor), dtype)
        if key not in casts:
            casts[key] = tensor.to(dtype)
        cast[sink] = casts[key]
    return cast, out.stats


def add_stats(totals: dict[str, torch.Tensor], stats: Mapping[str, torch.Tensor]) -> None:
    """Add one name's ``stats`` to the pass's ``totals`` (float64; module docstring)."""
    for k, v in stats.items():
        v = v.detach().to(torch.float64)
        totals[k] = totals[k] + v if k in totals else v.clone()
