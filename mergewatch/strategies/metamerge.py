"""MetaMerge: merging with the pre-trained NiNo-MLP meta-network (METAMERGE.md; NiNo: Knyazev et al.,
ICLR 2025, "Accelerating Training with Neuron Interaction and Nowcasting Networks"; MetaMerge blog,
bknyaz.github.io, 2026-02-19). A method deploy: ``[policy] deploy = "metamerge"``.

NiNo forecasts a parameter's future value from its last 5 values. MetaMerge feeds it a fake 5-state
trajectory made of the base θ0 and the experts, asks for the horizons k = 1..5 and averages the
forecasts. The network acts on each scalar alone and normalises per tensor, so the merge streams
tensor by tensor through the engine (memory: a few copies of the largest tensor, never a model).

What is deployed after the t-th expert (experts in arrival order E1 = θ_1, E2 = θ_2, ...):

* t = 1: nothing to merge; the expert itself (copied) is deployed, recorded as ``mode =
  "passthrough"`` in the step's meta (``state/<t>/state.json``).
* 2 ≤ t ≤ 4: a fresh MetaMerge of θ0 with E1..Et (not an update of the previous merge), exactly as
  the reference: context slots (W0 | P_{k−1}, E1, E2, E2, E1) for 2 experts, (…, E1, E2, E2, E3) for 3,
  (…, E1, E2, E3, E4) for 4; slot 4 is the residual base, so the order matters. Every ``visual.*``
  tensor except ``visual.conv1.weight`` is meta-merged (per-tensor normalisation, type ids per tensor
  and per q/k/v block of ``in_proj_weight``, horizons 1..5 chained through slot 0 — the reference's
  overwrite behaviour — and averaged); ``visual.conv1.weight`` and every tensor outside the visual
  tower (the text tower, ``logit_scale``...) are the plain mean of the experts (the base excluded).
  For a vision-only open_clip state dict without the ``visual.`` prefix, every tensor but
  ``conv1.weight`` is meta-merged.
* t ≥ 5: not defined by the reference (NiNo's context is 5 states). By default the step fails with
  ``metamerge supports 2-4 experts plus the base model (NiNo context = 5 states); got 5``. With
  ``fold = "pairwise"`` (**daemon extension, not from the NiNo paper or blog**, in the spirit of the
  pairwise use reported by "Meta-Merging by Checkpoint Nowcasting", ICML 2026 workshop, which
  publishes no code) the t-th deploy is the 2-expert MetaMerge of θ0 with [deploy_{t−1}, θ_t], i.e.
  context (W0 | P_{k−1}, M, θ_t, θ_t, M) with M = deploy_{t−1}, applied to the whole model (so the
  averaged tensors become (M + θ_t) / 2, a recency weighting). Steps t ≤ 4 stay the faithful fresh
  merges; from t = 4 on the float32 merged model is kept as the state set ``merged``.

The init view is θ0 (init ``zs``): MetaMerge merges experts fine-tuned from the base.

Parameters (``[policy]`` or ``[policy.metamerge]``):

* ``checkpoint`` (required): local path of a NiNo-MLP checkpoint, ``nino_mlp.pt`` (hidden 128, the
  blog's "meta merge, mlp") or ``nino_mlp_h32.pt``. Loaded with ``torch.load(weights_only=True)``;
  never downloaded. A relative path is relative to the config file. Its sha256 and the inferred network shape are recorded in MANIFEST.json (``policy``).
* ``upd_scale`` = 2.5: λ of the residual update (the reference's ViT value; its Qwen script uses 0.3).
* ``fold`` = ``"none"``: ``"none"`` | ``"pairwise"`` (see t ≥ 5 above).
* ``slot0`` = ``"chained"``: ``"chained"`` (the reference: slot 0 holds the previous horizon's
  prediction from k = 2 on) | ``"base"`` (slot 0 = θ0 at every horizon: **daemon extension, not the
  reference**; it differs from the published behaviour by up to ~2e-2 on the conformance model).
* ``chunk_rows`` = 8192: scalars per batch through the network (activation memory ≈ chunk_rows × H
  × 4 bytes × 2 per thread).
* ``threads`` = 0: worker threads, each running whole chunks single-threaded (0: torch's intra-op
  thread count). Chunk boundaries do not depend on it and every chunk is computed single-threaded,
  so the result is bit-identical for any ``threads``: it is left out of the policy's identity
  (MANIFEST ``policy`` and the resume check), unlike ``chunk_rows``.

Known limits: results are float32 and cast back to the base's storage dtype by the engine. Only the
open_clip ViT naming is verified against the reference; other role tables are refused. The blog's
ViT-B/16 numbers: on 2 tasks MetaMerge-MLP beats weight averaging (84.71 vs 83.39), but on 4 tasks it
collapses (62.44 vs 81.77): check a 3–4 expert merge before deploying it. The NiNo-GNN variant
(``nino_no_posw.pt``) is not implemented.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from mergewatch.strategies.base import (
    BufferNeed,
    Pass,
    PassOutput,
    StepContext,
    Strategy,
    TensorInputs,
    TensorMeta,
)
from mergewatch.strategies.nino import (
    DEFAULT_CHUNK_ROWS,
    HORIZONS,
    MAX_EXPERTS,
    MetaMergeError,
    context_order,
    expert_mean,
    load_nino_mlp,
    metamerge_tensor,
)
from mergewatch.strategies.techniques import is_finite_number

FOLDS = ("none", "pairwise")
SLOT0 = ("chained", "base")
#: Role tables whose tensor naming MetaMerge knows (METAMERGE §4.3: only open_clip ViT is verified).
TABLES = ("open_clip_full", "open_clip_visual")
EXTENSION = "daemon extension, not from the NiNo paper or blog"


class MetaMerge(Strategy):
    """NiNo-MLP MetaMerge of θ0 and 2–4 experts (module docstring for the rules and parameters)."""

    name = "metamerge"
    paper = (
        "Knyazev et al., ICLR 2025, 'Accelerating Training with Neuron Interaction and Nowcasting Networks' (NiNo); "
        "MetaMerge, bknyaz.github.io 2026-02-19"
    )
    requires_zs_init = True
    defaults: ClassVar[dict[str, Any]] = {
        "checkpoint": "",
        "upd_scale": 2.5,
        "fold": "none",
        "slot0": "chained",
        "chunk_rows": DEFAULT_CHUNK_ROWS,
        "threads": 0,
    }

    def __init__(self, params: Mapping[str, Any]):
        unknown = set(params) - set(self.defaults)
        if unknown:
            raise ValueError(f"{self.name}: unknown parameter(s) {sorted(unknown)}; allowed: {sorted(self.defaults)}")
        merged = {**self.defaults, **params}
        lam = merged["upd_scale"]
        if not is_finite_number(lam) or float(lam) < 0.0:
            raise ValueError(f"{self.name}: parameter 'upd_scale' must be a finite number >= 0, got {lam!r}")
        merged["upd_scale"] = float(lam)
        for key, allowed in (("fold", FOLDS), ("slot0", SLOT0)):
            if merged[key] not in allowed:
                raise ValueError(f"{self.name}: parameter '{key}' must be one of {', '.join(allowed)}, got {merged[key]!r}")
        rows = merged["chunk_rows"]
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise ValueError(f"{self.name}: parameter 'chunk_rows' must be a positive integer, got {rows!r}")
        threads = merged["threads"]
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
            raise ValueError(f"{self.name}: parameter 'threads' must be an integer >= 0 (0: torch's thread count), got {threads!r}")
        if not isinstance(merged["checkpoint"], str):
            raise ValueError(f"{self.name}: parameter 'checkpoint' must be a path string, got {merged['checkpoint']!r}")
        try:
            self.net = load_nino_mlp(merged["checkpoint"])
        except ValueError as e:
            raise ValueError(f"{self.name}: {e}") from e
        super().__init__(merged)
        self.upd_scale = merged["upd_scale"]
        self.fold = merged["fold"]
        self.chain = merged["slot0"] == "chained"
        self.chunk_rows = rows
        self.threads = threads

    # Declarations ------------------------------------------------------------------------------
    def buffer_need(self) -> BufferNeed:
        return BufferNeed.ALL  # a fresh merge of every expert so far (t ≤ 4)

    def state_sets(self, t: int) -> tuple[str, ...]:
        return ("merged",) if self.fold == "pairwise" and t >= MAX_EXPERTS else ()

    def next_meta(self, ctx: StepContext) -> dict:
        return {"t": ctx.t, "mode": self._mode(ctx.t)}

    def describe(self) -> dict:
        d = super().describe()
        d.pop("threads", None)  # a performance knob that cannot change the result (see above)
        d["nino"] = self.net.describe()
        d["checkpoint_sha256"] = self.net.sha256
        d["horizons"] = list(HORIZONS)
        d["context_order"] = {"2": "M E1 E2 E2 E1", "3": "M E1 E2 E2 E3", "4": "M E1 E2 E3 E4"}
        ext = []
        if self.fold != "none":
            ext.append(f"fold={self.fold}: {EXTENSION}")
        if not self.chain:
            ext.append(f"slot0=base: {EXTENSION}")
        if ext:
            d["extensions"] = ext
        return d

    # The step ----------------------------------------------------------------------------------
    def _mode(self, t: int) -> str:
        if t == 1:
            return "passthrough"
        if t <= MAX_EXPERTS:
            return f"metamerge-{t}"
        if self.fold == "pairwise":
            return "pairwise-fold"
        context_order(t)  # raises the documented error
        raise AssertionError("unreachable")

    def _mset_prefix(self, ctx: StepContext) -> str:
        table = ctx.model.table
        if table not in TABLES:
            raise MetaMergeError(
                f"{self.name}: only open_clip ViT checkpoints are supported (role table {table!r}; allowed {', '.join(TABLES)}): "
                "the NiNo type ids are verified for the open_clip naming only"
            )
        if table == "open_clip_visual" and not any(n.startswith("visual.") for n in ctx.model.metas):
            return ""
        return "visual."

    def passes(self, ctx: StepContext) -> list[Pass]:
        mode = self._mode(ctx.t)
        if mode == "passthrough":
            return [Pass("passthrough", self._passthrough, writes=("deploy",), label="metamerge t=1 (expert as is)")]
        prefix = self._mset_prefix(ctx)
        conv1 = prefix + "conv1.weight"

        def in_mset(name: str) -> bool:
            return name.startswith(prefix) and name != conv1

        if mode == "pairwise-fold":
            if ctx.meta.get("t") != ctx.t - 1:
                raise MetaMergeError(f"{self.name}: step {ctx.t} needs the merged state of step {ctx.t - 1}, got meta {ctx.meta!r}")

            def fold_fn(meta: TensorMeta, inp: TensorInputs, c: StepContext) -> PassOutput:
                out = self._merge(meta.name, inp.base, [inp.state["merged"], inp.expert], in_mset(meta.name))
                return PassOutput(tensors={"deploy": out, "merged": out})

            return [Pass("pairwise", fold_fn, writes=("deploy", "merged"), reads=frozenset({"state"}), label="metamerge pairwise fold")]

        writes = ("deploy", *self.state_sets(ctx.t))

        def merge_fn(meta: TensorMeta, inp: TensorInputs, c: StepContext) -> PassOutput:
            out = self._merge(meta.name, inp.base, inp.experts, in_mset(meta.name))
            return PassOutput(tensors={w: out for w in writes})

        return [Pass("metamerge", merge_fn, writes=writes, reads=frozenset({"experts"}), label=f"metamerge {ctx.t} experts")]

    def _passthrough(self, meta: TensorMeta, inp: TensorInputs, ctx: StepContext) -> PassOutput:
        return PassOutput(tensors={"deploy": inp.expert})

    def _merge(self, name: str, base: torch.Tensor, experts: list[torch.Tensor], meta_merged: bool) -> torch.Tensor:
        if not meta_merged:
            return expert_mean(experts)
        return metamerge_tensor(
            self.net,
            name,
            base,
            experts,
            upd_scale=self.upd_scale,
            chain=self.chain,
            chunk_rows=self.chunk_rows,
            threads=self.threads,
        )
