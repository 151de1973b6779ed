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
(``nino_no_posw.pt``) is the separate, opt-in method ``metamerge_gnn`` (``MetaMergeGNN`` below).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mergewatch.nino.checkpoint import load_nino_gnn, load_nino_mlp
from mergewatch.nino.context import HORIZONS, MAX_EXPERTS, MetaMergeError, context_order, expert_mean
from mergewatch.nino.eigenvectors import LpeStore
from mergewatch.nino.gnn import DEFAULT_CHUNK_EDGES, estimate_bytes, metamerge_graph
from mergewatch.nino.graph import build_vit_graph, graph_plan, graph_size, resize_conv, vit_spec
from mergewatch.nino.mlp import DEFAULT_CHUNK_ROWS, metamerge_tensor
from mergewatch.numeric import release_freed_memory
from mergewatch.strategies.base import (
    BufferNeed,
    Pass,
    PassOutput,
    StepContext,
    Strategy,
    TensorInputs,
    TensorMeta,
)
from mergewatch.params import Param, ParamError

FOLDS = ("none", "pairwise")
SLOT0 = ("chained", "base")
#: Role tables whose tensor naming MetaMerge knows (METAMERGE §4.3: only open_clip ViT is verified).
TABLES = ("open_clip_full", "open_clip_visual")
EXTENSION = "daemon extension, not from the NiNo paper or blog"

#: the parameters both NiNo variants share (module docstring; ``MetaMergeGNN`` for the GNN's)
SHARED_PARAMS = (
    Param("checkpoint", str, "", "required: the local NiNo checkpoint (MLP: nino_mlp.pt or nino_mlp_h32.pt; GNN: nino_no_posw.pt); never downloaded", path=True),
    Param("upd_scale", float, 2.5, "λ of the residual update (the reference's ViT value)", min=0.0),
    Param("fold", str, "none", "pairwise: beyond 4 experts, merge(θ^m_{t−1}, θ_t) (daemon extension)", choices=FOLDS),
    Param("slot0", str, "chained", "chained: the reference; base: slot 0 = θ0 at every horizon (daemon extension)", choices=SLOT0),
)
THREADS = Param("threads", int, 0, "worker threads (0: torch's thread count); the result does not depend on it", min=0)


class MetaMerge(Strategy):
    """NiNo-MLP MetaMerge of θ0 and 2–4 experts (module docstring for the rules and parameters)."""

    name = "metamerge"
    paper = (
        "Knyazev et al., ICLR 2025, 'Accelerating Training with Neuron Interaction and Nowcasting Networks' (NiNo); "
        "MetaMerge, bknyaz.github.io 2026-02-19"
    )
    requires_zs_init = True
    param_defs = (
        *SHARED_PARAMS,
        Param("chunk_rows", int, DEFAULT_CHUNK_ROWS, "scalars per batch through the network (activations ≈ chunk_rows × H × 8 bytes per thread)", min=1),
        THREADS,
    )

    def __init__(self, params: Mapping[str, Any]):
        super().__init__(params)
        self.net = self._loaded("checkpoint", load_nino_mlp, self.params["checkpoint"])
        self.upd_scale = self.params["upd_scale"]
        self.fold = self.params["fold"]
        self.chain = self.params["slot0"] == "chained"
        self.chunk_rows = self.params["chunk_rows"]
        self.threads = self.params["threads"]

    def _loaded(self, key: str, load, *args: Any):
        """``load(*args)``; its ValueError (a file that cannot serve) is blamed on parameter ``key``."""
        try:
            return load(*args)
        except ValueError as e:
            raise ParamError(self.name, key, str(e)) from e

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


# NiNo-GNN (opt-in) -------------------------------------------------------------------------------

def default_lpe_cache() -> str:
    """``$XDG_CACHE_HOME/mergewatch/nino-gnn-lpe`` (``~/.cache/...`` when unset): eigenvectors are
    keyed by the graph's structure hash, so one cache serves every workspace of an architecture."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(root) / "mergewatch" / "nino-gnn-lpe")


class MetaMergeGNN(MetaMerge):
    """NiNo-GNN MetaMerge (``deploy = "metamerge_gnn"``; METAMERGE §9): **opt-in, approximate and
    seeded**. Same steps, context order, chaining, A-set and ``fold``/``slot0`` options as
    ``metamerge``; the per-scalar MLP is replaced by message passing over the neural graph of the
    open_clip ViT visual tower (``mergewatch.nino.graph``), so tensors are no longer independent.

    How it streams. The engine feeds one tensor at a time, the GNN needs a whole graph. Pass 1
    ("collect") keeps the float32 inputs of the visual tower until a graph is complete (with
    ``subgraph = true`` a transformer block plus, for the first and last block, the stem and the
    head; the engine's sorted order delivers a block's tensors together), runs the GNN on it and
    keeps only the averaged prediction; its inputs are freed before the next block arrives. Its
    reduce step hands the predictions to pass 2 through ``ctx.scalars``; pass 2 writes the deploy
    view (meta-merged visual tensors; expert mean for conv1 and everything outside the tower).
    Memory: per-block mode holds one block's inputs, graph and activations plus the visual tower's
    predictions (4 bytes per parameter); whole-graph mode holds the tower's inputs and its whole
    graph (refused up front when the estimate exceeds the available memory).

    Parameters (``[policy]`` or ``[policy.metamerge_gnn]``), besides ``checkpoint`` (a NiNo-GNN
    checkpoint, ``nino_no_posw.pt``), ``upd_scale``, ``fold`` and ``slot0`` as for ``metamerge``:

    * ``heads`` = 0: attention heads of the visual tower (0: width // 64, open_clip's default head
      width; ViT-B/16: 12). The head nodes of the graph depend on it; it cannot be read from weights.
    * ``subgraph`` = false: false = one graph of the whole tower (the published setting; ViT-B/16:
      75,477 nodes, 85.7M edges); true = one isolated graph per transformer block with its own
      eigenvectors (the reference's ``subgraph=True``, not the published ViT setting), memory bounded
      by the largest block. Stem and head join the first and last block's graphs (``vit_graphs``).
    * ``edge_sample_ratio`` = 0.0: fraction of edges whose messages are aggregated per round; 0 (or
      1) = all edges, deterministic. The published setting is 0.2: then the sample is seeded from the
      step seed (config seed, expert hash, graph name), so a replay is bit-identical, but results
      depend on that seed.
    * ``lpe`` = "": a safetensors file of pinned eigenvectors (``lpe`` for the whole graph,
      ``lpe.block<b>`` per block; e.g. the fixtures' ``gnn_graph.safetensors``). Its sha256 goes into
      the manifest. Unset: computed once per graph structure and cached in ``lpe_cache``.
    * ``lpe_cache`` = "": directory of computed eigenvectors ("" = ``default_lpe_cache()``). A
      location only: left out of the policy's identity.
    * ``chunk_edges`` = 32768: edges per batch through the network (activations ≈ chunk × 128 × 4
      bytes × ~10 per worker).
    * ``threads`` = 0: worker threads, each running whole edge chunks single-threaded (0: torch's
      intra-op thread count). The result is bit-identical for any value, so it is left out of the
      policy's identity.

    Results are labelled "approximate, stochastic" in the manifest (``reproducibility``) unless the
    eigenvectors are pinned and sampling is off: the eigenbasis of a repeated eigenvalue, the column
    signs and the sampled edges all differ from the reference's own random draws."""

    name = "metamerge_gnn"
    param_defs = (
        *SHARED_PARAMS,
        Param("heads", int, 0, "attention heads of the visual tower (0: width // 64; ViT-B/16: 12)", min=0),
        Param("subgraph", bool, False, "true: one graph per transformer block (memory bounded by a block); false: the whole tower (published)"),
        Param("edge_sample_ratio", float, 0.0, "fraction of edges aggregated per round, seeded from the step seed (0 or 1: every edge, deterministic; published: 0.2)", min=0.0, max=1.0),
        Param("lpe", str, "", "pinned eigenvectors: a safetensors file with `lpe` (whole graph) or `lpe.block<b>` (per block); empty: computed once and cached", path=True),
        Param("lpe_cache", str, "", "directory of computed eigenvectors (empty: $XDG_CACHE_HOME/mergewatch/nino-gnn-lpe)", path=True),
        Param("chunk_edges", int, DEFAULT_CHUNK_EDGES, "edges per batch through the network", min=1),
        THREADS,
    )

    def __init__(self, params: Mapping[str, Any]):
        Strategy.__init__(self, params)
        p = self.params
        self.net = self._loaded("checkpoint", load_nino_gnn, p["checkpoint"])
        self.lpe_store = self._loaded("lpe", LpeStore, p["lpe"], p["lpe_cache"] or default_lpe_cache())
        self.upd_scale = p["upd_scale"]
        self.fold = p["fold"]
        self.chain = p["slot0"] == "chained"
        self.heads = p["heads"]
        self.subgraph = p["subgraph"]
        self.edge_sample_ratio = p["edge_sample_ratio"]
        self.chunk_edges = p["chunk_edges"]
        self.threads = p["threads"]

    @property
    def stochastic(self) -> bool:
        return 0.0 < self.edge_sample_ratio < 1.0

    def describe(self) -> dict:
        d = super().describe()  # threads dropped here too: chunks are computed single-threaded
        d.pop("lpe_cache", None)  # a location, not a setting (see the class docstring)
        if self.lpe_store.inject_sha256:
            d["lpe_sha256"] = self.lpe_store.inject_sha256
        if self.stochastic or not self.lpe_store.inject_sha256:
            why = []
            if not self.lpe_store.inject_sha256:
                why.append("eigenvectors computed here (column signs and the basis of repeated eigenvalues differ from the reference's draw)")
            if self.stochastic:
                why.append(f"edge sampling {self.edge_sample_ratio:g} seeded from the step seed")
            d["reproducibility"] = "approximate, stochastic: " + "; ".join(why)
        else:
            d["reproducibility"] = "deterministic: eigenvectors pinned, every edge aggregated"
        return d

    def next_meta(self, ctx: StepContext) -> dict:
        meta = super().next_meta(ctx)
        if "nino_gnn_lpe" in ctx.scalars:
            meta["lpe"] = dict(ctx.scalars["nino_gnn_lpe"])
        return meta

    # The step ----------------------------------------------------------------------------------
    def passes(self, ctx: StepContext) -> list[Pass]:
        mode = self._mode(ctx.t)
        if mode == "passthrough":
            return [Pass("passthrough", self._passthrough, writes=("deploy",), label="metamerge_gnn t=1 (expert as is)")]
        prefix = self._mset_prefix(ctx)
        spec = vit_spec({n: m.shape for n, m in ctx.model.metas.items()}, prefix)
        heads = self.heads or max(1, spec.width // 64)
        plan = graph_plan(spec, self.subgraph)
        for gname, names in plan:
            for n in names:
                if not ctx.model.metas[n].role.mergeable:
                    raise MetaMergeError(f"{self.name}: '{n}' is frozen by the role table but belongs to the NiNo-GNN graph {gname}")
        conv1 = prefix + "conv1.weight"
        graph_names = {n for _, names in plan for n in names}
        pairwise = mode == "pairwise-fold"
        if pairwise and ctx.meta.get("t") != ctx.t - 1:
            raise MetaMergeError(f"{self.name}: step {ctx.t} needs the merged state of step {ctx.t - 1}, got meta {ctx.meta!r}")
        run = _GraphRun(self, spec, heads, plan, ctx)
        if not self.subgraph:
            run.check_memory()

        def experts_of(inp: TensorInputs) -> list[torch.Tensor]:
            return [inp.state["merged"], inp.expert] if pairwise else inp.experts

        def collect(meta: TensorMeta, inp: TensorInputs, c: StepContext) -> PassOutput:
            if meta.name in graph_names:
                run.add(meta.name, inp.base, experts_of(inp))
            return PassOutput()

        def finish(stats: dict, c: StepContext) -> dict:
            return run.finish()

        writes = ("deploy", "merged") if pairwise else ("deploy", *self.state_sets(ctx.t))

        def emit(meta: TensorMeta, inp: TensorInputs, c: StepContext) -> PassOutput:
            name = meta.name
            if name in graph_names and name != conv1:
                out = c.scalars["nino_gnn_outputs"].pop(name)
            else:
                out = expert_mean(experts_of(inp))
            return PassOutput(tensors={w: out for w in writes})

        reads = frozenset({"state"}) if pairwise else frozenset({"experts"})
        label = "metamerge_gnn pairwise fold" if pairwise else f"metamerge_gnn {ctx.t} experts"
        return [
            Pass("nino-gnn", collect, reduce_fn=finish, reads=reads, label=label + " (NiNo-GNN)"),
            Pass("write", emit, writes=writes, reads=reads, label=label + " (write)"),
        ]


class _GraphRun:
    """One step's NiNo-GNN work: inputs of the graphs still incomplete, predictions of those done."""

    def __init__(self, strat: MetaMergeGNN, spec, heads: int, plan, ctx: StepContext):
        self.s, self.spec, self.heads, self.ctx = strat, spec, heads, ctx
        self.plan = plan
        self.pending = {g: set(names) for g, names in plan}
        self.owner = {n: g for g, names in plan for n in names}
        self.inputs: dict[str, tuple[torch.Tensor, list[torch.Tensor]]] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.lpe: dict[str, str] = {}
        self.conv1 = spec.prefix + "conv1.weight"

    def _graph(self, gname: str):
        if gname == "visual":
            return build_vit_graph(self.spec, self.heads, name="visual")
        b = int(gname.removeprefix("block"))
        return build_vit_graph(self.spec, self.heads, [b], stem=b == 0, head=b == self.spec.blocks - 1, name=gname)

    def check_memory(self) -> None:
        import psutil

        nodes, edges, params = graph_size(self.spec, self.heads)
        need = estimate_bytes(nodes, edges, params, self.s.chunk_edges, self.s.net.hidden) + 4 * params * (2 + len(self.ctx.expert_ids))
        avail = psutil.virtual_memory().available
        if need > avail:
            raise MetaMergeError(
                f"{self.s.name}: the whole-graph NiNo-GNN of this model ({nodes:,} nodes, {edges:,} edges) needs about "
                f"{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available; set subgraph = true (one graph per transformer block)"
            )

    def add(self, name: str, base: torch.Tensor, experts: list[torch.Tensor]) -> None:
        if name == self.conv1:  # the reference's pre-step: every model's kernel resized to 3×3 (§3)
            base, experts = resize_conv(base), [resize_conv(e) for e in experts]
        self.inputs[name] = (base, list(experts))
        gname = self.owner[name]
        self.pending[gname].discard(name)
        if not self.pending[gname]:
            self._run(gname)

    def _run(self, gname: str) -> None:
        graph = self._graph(gname)
        n_exp = len(next(iter(self.inputs.values()))[1])
        base = {t.name: self.inputs[t.name][0] for t in graph.tensors}
        experts = [{t.name: self.inputs[t.name][1][i] for t in graph.tensors} for i in range(n_exp)]
        for t in graph.tensors:
            del self.inputs[t.name]
        lpe, source = self.s.lpe_store.get(graph)
        gen = self.ctx.generator(f"nino-gnn/{gname}", "edge_sample") if self.s.stochastic else None
        out = metamerge_graph(
            self.s.net, graph, base, experts, lpe,
            upd_scale=self.s.upd_scale, chain=self.s.chain, edge_sample_ratio=self.s.edge_sample_ratio,
            generator=gen, chunk_edges=self.s.chunk_edges, threads=self.s.threads,
        )
        out.pop(self.conv1, None)  # its prediction is discarded: conv1 is the experts' mean (§3)
        self.outputs.update(out)
        self.lpe[gname] = f"{source} sha256:{hashlib.sha256(lpe.numpy().tobytes()).hexdigest()}"
        del graph, base, experts, out
        release_freed_memory()

    def finish(self) -> dict:
        left = sorted(n for names in self.pending.values() for n in names)
        if left:
            raise MetaMergeError(f"metamerge_gnn: the NiNo-GNN graph never received {left[:5]}{' ...' if len(left) > 5 else ''}")
        return {"nino_gnn_outputs": self.outputs, "nino_gnn_lpe": dict(self.lpe)}
