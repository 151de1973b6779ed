"""Weight Weaving (SPEC §2; Chaves, Valle & Avila 2025): parameter pooling over the λ search space.

Instead of choosing one λ for a λ-scaled technique f, pool the candidates: with τ_m = f(τ_1..τ_n)
unscaled, the augmented set is A = {λ·τ_m : λ ∈ Λ} (λ ascending), the pooled set is A followed by
τ_1..τ_n (``include_deltas``, the default A*) or A alone, and the result is θ0 + Pool(pooled set)
with coefficient 1. The member order decides ``magmax`` ties (to the later member) and the indices
drawn by ``random`` pooling (SPEC §1.2).

With A alone, ``avg`` is TA-style scaling by mean(Λ): the raw deltas are what makes pooling differ.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from mergewatch.params import Param
from mergewatch.strategies.techniques import TECHNIQUES, MergeInputs, PrepPass, Technique, magmax_select

POOLS = ("avg", "random", "magmax")
#: Λ = linspace(0.1, 1.0, 10), and linspace(0.1, 1.8, 18) for TIES / DARE-TIES (SPEC §2), written
#: as k/10 so that every λ is the float nearest to its decimal value.
DEFAULT_LAMBDAS = tuple(k / 10 for k in range(1, 11))
WIDE_LAMBDAS = tuple(k / 10 for k in range(1, 19))
WIDE_LAMBDA_TECHNIQUES = ("ties", "dare_ties")


def default_lambdas(inner_name: str) -> tuple[float, ...]:
    return WIDE_LAMBDAS if inner_name in WIDE_LAMBDA_TECHNIQUES else DEFAULT_LAMBDAS


class WeightWeaving(Technique):
    """θ0 + Pool({λ·τ_m : λ ∈ Λ} ∪ {τ_1..τ_n}) around an inner λ-scaled technique.

    Parameters: ``param_defs`` (``lambdas`` None = the inner technique's default Λ; sorted ascending).
    ``MergeInputs.lam`` is not used: the λ grid replaces the single λ. ``random`` pooling draws one
    member index per coordinate from ``generator("weave", -1)``."""

    name = "weaving"
    paper = "Chaves, Valle & Avila, 2025 (Weight Weaving: parameter pooling over the λ search space)"
    param_defs = (
        Param("pool", str, "avg", "how the pooled set is combined per coordinate", choices=POOLS),
        Param("include_deltas", bool, True, "pool the task vectors τ_i too (A*), not only {λ·τ_m}"),
        Param("lambdas", list, None, "the λ grid Λ; unset: 0.1..1.0 by 0.1 (TIES, DARE-TIES: 0.1..1.8)", item=float, min=0.0),
    )

    def __init__(self, inner: Technique, **params: Any):
        if not isinstance(inner, Technique) or not inner.lambda_scaled:
            scaled = ", ".join(n for n, cls in TECHNIQUES.items() if cls.lambda_scaled)
            raise ValueError(f"weaving: the inner technique must be λ-scaled ({scaled}), got {getattr(inner, 'name', inner)!r}")
        self.inner = inner
        super().__init__(**params)

    @property
    def lambdas(self) -> list[float]:
        lams = self.params["lambdas"]
        return sorted(float(v) for v in (default_lambdas(self.inner.name) if lams is None else lams))

    def describe(self) -> dict:
        return {**super().describe(), "lambdas": self.lambdas, "inner": self.inner.describe()}

    def prep_passes(self, n_models: int) -> list[PrepPass]:
        return self.inner.prep_passes(n_models)

    def members(self, x: MergeInputs) -> Iterator[torch.Tensor]:
        """The pooled set in its defined order, one tensor at a time (A by λ ascending, then τ_i)."""
        tau_m = self.inner.task_merge(x)
        for lam in self.lambdas:
            yield lam * tau_m
        if self.params["include_deltas"]:
            yield from x.task_vectors()

    def n_members(self, x: MergeInputs) -> int:
        return len(self.lambdas) + (len(x.models) if self.params["include_deltas"] else 0)

    def merge(self, x: MergeInputs) -> torch.Tensor:
        pool = self.params["pool"]
        if pool == "magmax":
            return x.base + magmax_select(self.members(x))
        if pool == "avg":
            total = torch.zeros_like(x.base)
            for m in self.members(x):
                total += m
            return x.base + total / self.n_members(x)
        # random: per coordinate one member chosen uniformly
        pick = torch.randint(0, self.n_members(x), x.base.shape, generator=x.rng("weave", -1))
        out = torch.zeros_like(x.base)
        for j, m in enumerate(self.members(x)):
            out = torch.where(pick == j, m, out)
        return x.base + out
