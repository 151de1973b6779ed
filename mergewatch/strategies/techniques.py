"""Merge techniques f_merge (SPEC §1.1, §1.2, §2): pure per-tensor functions of float32 tensors.

A technique merges a list of models (full weights θ_i, not task vectors) against θ0, one tensor at
a time. It never sees files or whole models. Techniques that need a whole-model quantity (TIES with
``trim = "global"``) declare *prep passes*: per-tensor statistics that the engine sums over the model,
turned into scalars that ``merge`` then receives in ``MergeInputs.scalars``.

Every technique is a small object built from its validated hyper-parameters; ``TECHNIQUES`` is the
explicit registry name -> class. Named variants (``dare_ties``, ``breadcrumbs``) are presets of one
class carrying their paper reference (STYLE §1).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from mergewatch.checkpoint.roles import Role, TensorRole


@dataclass
class MergeInputs:
    """One tensor name's inputs to a technique (all float32, same shape)."""

    name: str
    role: TensorRole
    base: torch.Tensor  # θ0
    models: Sequence[torch.Tensor]  # θ_1..θ_n in the technique's order
    weights: Sequence[float] | None = None  # WA / SLERP weights (sum 1); None = uniform
    lam: float = 1.0  # λ for this tensor (LiNeS already applied by the caller)
    #: seeded generator for (purpose, model index); index -1 is for pooling decisions
    generator: Callable[[str, int], torch.Generator] | None = None
    scalars: Mapping[str, Any] = field(default_factory=dict)  # results of prep passes

    def task_vectors(self) -> list[torch.Tensor]:
        return [m - self.base for m in self.models]


@dataclass(frozen=True)
class PrepPass:
    """A whole-model statistic a technique needs before merging.

    ``stats(x)`` returns tensors that are summed over all mergeable tensor names; ``finish(totals,
    scalars)`` returns the scalars to add (it sees the scalars of earlier prep passes)."""

    name: str
    stats: Callable[[MergeInputs], dict[str, torch.Tensor]]
    finish: Callable[[dict[str, torch.Tensor], Mapping[str, Any]], dict[str, Any]]


class Technique:
    name: ClassVar[str]
    paper: ClassVar[str] = ""
    #: True for techniques whose result is θ0 + λ·τ_merged (TA, TIES, DARE, Breadcrumbs, MagMax):
    #: these accept LiNeS and Weight Weaving.
    lambda_scaled: ClassVar[bool] = False
    #: which of the parameters is the scaling factor (for lambda-scaled techniques)
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **params: Any):
        unknown = set(params) - set(self.defaults)
        if unknown:
            raise TypeError(f"{self.name}: unknown parameter(s) {sorted(unknown)}")
        self.params = {**self.defaults, **params}

    def prep_passes(self, n_models: int) -> list[PrepPass]:
        return []

    def merge(self, x: MergeInputs) -> torch.Tensor:
        """θ_merged for this tensor."""
        if self.lambda_scaled:
            return x.base + x.lam * self.task_merge(x)
        raise NotImplementedError

    def task_merge(self, x: MergeInputs) -> torch.Tensor:
        """The unscaled merged task vector τ_m (lambda-scaled techniques only)."""
        raise NotImplementedError(f"{self.name} is not a task-vector technique")


def _uniform(x: MergeInputs) -> list[float]:
    n = len(x.models)
    return list(x.weights) if x.weights is not None else [1.0 / n] * n


class WeightAverage(Technique):
    """Σ w_i θ_i (uniform unless weights are given). Wortsman et al. 2022, "Model soups"."""

    name = "wa"
    paper = "Wortsman et al., ICML 2022 (model soups); TIME (Dziadzio et al., CVPR 2025)"

    def merge(self, x: MergeInputs) -> torch.Tensor:
        out = torch.zeros_like(x.base)
        for w, m in zip(_uniform(x), x.models):
            out.add_(m, alpha=w)
        return out


class TaskArithmetic(Technique):
    """θ0 + λ Σ τ_i (sum, not mean). Ilharco et al., ICLR 2023."""

    name = "ta"
    paper = "Ilharco et al., ICLR 2023, 'Editing models with task arithmetic'"
    lambda_scaled = True

    def task_merge(self, x: MergeInputs) -> torch.Tensor:
        out = torch.zeros_like(x.base)
        for m in x.models:
            out.add_(m - x.base)
        return out


def per_block(role: TensorRole, fn: Callable[..., torch.Tensor], *tensors: torch.Tensor) -> torch.Tensor:
    """Apply ``fn`` to each row block of a fused_linear tensor separately (q, k, v) and re-stack;
    other tensors are passed whole (SPEC §1.2 "Fused tensors")."""
    if role.role is not Role.FUSED_LINEAR:
        return fn(*tensors)
    parts = [t.chunk(role.blocks, dim=0) for t in tensors]
    return torch.cat([fn(*blk) for blk in zip(*parts)], dim=0)


#: name -> class (explicit registry; presets such as dare_ties are classes with other defaults)
TECHNIQUES: dict[str, type[Technique]] = {
    "wa": WeightAverage,
    "ta": TaskArithmetic,
}
