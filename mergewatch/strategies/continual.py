"""Continual merging baselines (SPEC §3.4, as in the tables of the NuFILT paper, Qiu et al., ICLR 2026).

Each keeps one model-sized float32 state set and merges θ_t into it when it arrives; experts are
assumed fine-tuned from θ0 (init ``zs``: the published init view is θ0 itself).

* ``continual_wa`` (state ``merged`` = θ^m_t):      θ^m_t = ((t − 1) θ^m_{t−1} + θ_t) / t.
* ``continual_ta`` (state ``merged`` = θ^m_t):      θ^m_t = θ^m_{t−1} + λ τ_t,  θ^m_0 = θ0, λ = 0.3.
* ``continual_ties`` (state ``tau_merged`` = M_t/λ): t = 1: θ^m_1 = θ0 + λ τ_1 (untrimmed, as the
  reference); t ≥ 2: θ^m_t = θ0 + λ·TIES([M_{t−1}/λ, τ_t]) with TIES's keep rule (p = 0.8), sign
  election, disjoint ``sum`` and ``global`` trim (``tensor`` is an option), λ = 0.5.
  **Decision** (SPEC §3.4): the merge is based on θ0 and fed M_{t−1}/λ; the reference adds
  λ·TIES([M_{t−1}, τ_t]) to θ^m_{t−1}, which counts the old merge twice.
* ``continual_magmax`` (state ``tau_max``):        τ_max ← per coordinate the larger |·| of
  (τ_max, τ_t), ties to the newer τ_t; θ^m_t = θ0 + λ τ_max, λ = 0.5 (Marczak et al., ECCV 2024).

Choices (documented, tested in ``tests/test_continual.py``):

* continual TIES stores the *unscaled* merged task vector M_t/λ (what the next step feeds to
  TIES) rather than θ^m_t, so no θ0 + λx − θ0, ÷λ round trip perturbs the next trim. The TIES
  merge itself is ``techniques.TIES`` run on the two task vectors (with a zero "base", so the
  task vectors it forms are exactly M_{t−1}/λ and τ_t); its global threshold comes from its own
  two prep passes, run over the model before the merge pass (as TIME does).
* λ: ``continual_ta`` and ``continual_magmax`` accept any finite λ ≥ 0; ``continual_ties`` needs
  λ > 0 (it divides by λ).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from mergewatch.params import Param, with_defaults
from mergewatch.strategies.base import (
    Pass,
    PassOutput,
    StepContext,
    Strategy,
    TensorInputs,
    TensorMeta,
)
from mergewatch.strategies.techniques import MERGE, P_DROP, TIES, TRIM, MergeInputs, PrepPass, magmax_select

NUFILT_PAPER = "Qiu et al., ICLR 2026, 'Null-space filtering for data-free continual model merging' (continual baselines)"


def scale(default: float, *, positive: bool = False) -> Param:
    """λ, the scale of the merged task vector (> 0 when ``positive``, else >= 0)."""
    return Param("lambda", float, default, "scale of the merged task vector", min=0.0, min_open=positive)


class ContinualBaseline(Strategy):
    """One state set, one merge pass per step: ``(state_t, deploy_t) = step(θ0, θ_t, state_{t−1})``.
    Subclasses set ``name``, ``paper``, ``param_defs``, ``state_set`` and implement ``first`` and
    ``combine``; ``lam`` is the ``lambda`` parameter of those that declare one."""

    requires_zs_init = True
    state_set: ClassVar[str]

    def __init__(self, params: Mapping[str, Any]):
        super().__init__(params)
        self.lam = self.params.get("lambda")

    # Declarations ------------------------------------------------------------------------------
    def state_sets(self, t: int) -> tuple[str, ...]:
        return (self.state_set,)

    # The step ----------------------------------------------------------------------------------
    def _check_resume(self, ctx: StepContext) -> None:
        if ctx.t > 1 and ctx.meta.get("t") != ctx.t - 1:
            raise ValueError(f"{self.name}: step {ctx.t} needs the state of step {ctx.t - 1}, got meta {ctx.meta!r}")

    def passes(self, ctx: StepContext) -> list[Pass]:
        self._check_resume(ctx)
        return [self._merge_pass(ctx)]

    def _merge_pass(self, ctx: StepContext) -> Pass:
        return Pass(
            name="merge",
            tensor_fn=self._tensor_fn,
            writes=(self.state_set, "deploy"),
            reads=frozenset({"state"}) if ctx.t > 1 else frozenset(),
            label=self.name,
        )

    def _tensor_fn(self, meta: TensorMeta, inp: TensorInputs, ctx: StepContext) -> PassOutput:
        if ctx.t == 1:
            state, deploy = self.first(meta, inp, ctx)
        else:
            state, deploy = self.combine(meta, inp, inp.state[self.state_set], ctx)
        return PassOutput(tensors={self.state_set: state, "deploy": deploy})

    def first(self, meta: TensorMeta, inp: TensorInputs, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(state_1, deploy_1)."""
        raise NotImplementedError

    def combine(self, meta: TensorMeta, inp: TensorInputs, prev: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(state_t, deploy_t) from the previous state ``prev`` (t ≥ 2)."""
        raise NotImplementedError


class ContinualWeightAverage(ContinualBaseline):
    """Continual weight average: θ^m_t = ((t − 1) θ^m_{t−1} + θ_t)/t (the running mean of every
    expert so far); θ^m_1 = θ_1. No hyper-parameters."""

    name = "continual_wa"
    paper = NUFILT_PAPER + "; Wortsman et al., ICML 2022 (model soups)"
    state_set = "merged"

    def first(self, meta, inp, ctx):
        return inp.expert, inp.expert

    def combine(self, meta, inp, prev, ctx):
        merged = ((ctx.t - 1) * prev + inp.expert) / ctx.t
        return merged, merged


class ContinualTaskArithmetic(ContinualBaseline):
    """Continual task arithmetic: θ^m_t = θ^m_{t−1} + λ τ_t with θ^m_0 = θ0 (so θ^m_t = θ0 + λ Σ τ_i);
    λ default 0.3 (the papers use 0.1 for 14+ tasks)."""

    name = "continual_ta"
    paper = NUFILT_PAPER + "; Ilharco et al., ICLR 2023 (task arithmetic)"
    param_defs = (scale(0.3),)
    state_set = "merged"

    def first(self, meta, inp, ctx):
        merged = inp.base + self.lam * (inp.expert - inp.base)
        return merged, merged

    def combine(self, meta, inp, prev, ctx):
        merged = prev + self.lam * (inp.expert - inp.base)
        return merged, merged


class ContinualTIES(ContinualBaseline):
    """Continual TIES-Merging (SPEC §3.4): τ^m_1 = τ_1 (untrimmed); τ^m_t = TIES([τ^m_{t−1}, τ_t])
    for t ≥ 2, where τ^m = M/λ is the stored state; θ^m_t = θ0 + λ τ^m_t. TIES (Yadav et al.,
    NeurIPS 2023; ``techniques.TIES``) keeps ⌊(1 − p)d⌋ + 1 entries of each of the two task vectors
    (ties at the threshold kept) over the whole model (``trim = "global"``, default) or per tensor
    and fused block (``"tensor"``), elects a sign per coordinate and combines the agreeing entries
    by ``merge`` (default ``sum``). **Decision**: based on θ0 and fed M_{t−1}/λ (not the
    reference's θ^m_{t−1} + λ·TIES([M_{t−1}, τ_t]))."""

    name = "continual_ties"
    paper = NUFILT_PAPER + "; Yadav et al., NeurIPS 2023 (TIES-Merging)"
    param_defs = (scale(0.5, positive=True), *with_defaults((P_DROP, TRIM, MERGE), trim="global", merge="sum"))
    state_set = "tau_merged"
    JOB = "ties"  # key of the prep-pass scalars in ctx.scalars

    def __init__(self, params: Mapping[str, Any]):
        super().__init__(params)
        self.ties = TIES(p=self.params["p"], merge=self.params["merge"], trim=self.params["trim"])

    def _inputs(self, meta: TensorMeta, inp: TensorInputs, ctx: StepContext) -> MergeInputs:
        """The pair [M_{t−1}/λ, τ_t] as TIES inputs against a zero base (its task vectors are then
        exactly these two tensors)."""
        return MergeInputs(
            name=meta.name,
            role=meta.role,
            base=torch.zeros_like(inp.base),
            models=[inp.state[self.state_set], inp.expert - inp.base],
            lam=self.lam,
            scalars=ctx.scalars.get(self.JOB, {}),
        )

    def passes(self, ctx: StepContext) -> list[Pass]:
        self._check_resume(ctx)
        preps = self.ties.prep_passes(2) if ctx.t > 1 else []
        return [*(self._prep_pass(pp) for pp in preps), self._merge_pass(ctx)]

    def _prep_pass(self, prep: PrepPass) -> Pass:
        def tensor_fn(meta: TensorMeta, inp: TensorInputs, ctx: StepContext) -> PassOutput:
            return PassOutput(stats=prep.stats(self._inputs(meta, inp, ctx)))

        def reduce_fn(totals: dict, ctx: StepContext) -> dict:
            scalars = dict(ctx.scalars.get(self.JOB, {}))
            scalars.update(prep.finish(totals, scalars))
            return {self.JOB: scalars}

        return Pass(name=prep.name, tensor_fn=tensor_fn, reduce_fn=reduce_fn, reads=frozenset({"state"}), label=f"{self.name} {prep.name}")

    def first(self, meta, inp, ctx):
        tau = inp.expert - inp.base
        return tau, inp.base + self.lam * tau

    def combine(self, meta, inp, prev, ctx):
        tau_m = self.ties.task_merge(self._inputs(meta, inp, ctx))
        return tau_m, inp.base + self.lam * tau_m


class ContinualMagMax(ContinualBaseline):
    """Streaming MagMax (Marczak et al., ECCV 2024): τ_max,1 = τ_1; τ_max,t = per coordinate the one
    of (τ_max,t−1, τ_t) with the larger |value|, τ_t on equal magnitudes (ties to the newer);
    θ^m_t = θ0 + λ τ_max,t with λ default 0.5."""

    name = "continual_magmax"
    paper = "Marczak et al., ECCV 2024, 'MagMax: leveraging model merging for seamless continual learning'; " + NUFILT_PAPER
    param_defs = (scale(0.5),)
    state_set = "tau_max"

    def first(self, meta, inp, ctx):
        tau = inp.expert - inp.base
        return tau, inp.base + self.lam * tau

    def combine(self, meta, inp, prev, ctx):
        tau_max = magmax_select([prev, inp.expert - inp.base])
        return tau_max, inp.base + self.lam * tau_max
