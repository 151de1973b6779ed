"""NiNo-GNN: the graph variant of the NiNo meta-network used by MetaMerge (METAMERGE.md §9; Knyazev et
al., ICLR 2025, "Accelerating Training with Neuron Interaction and Nowcasting Networks"; MetaMerge
blog, bknyaz.github.io, 2026-02-19). **Opt-in, approximate and seeded**: see "Randomness" below.

Written from the specification and the conformance graph (``gnn_graph.safetensors``), which this
builder reproduces exactly (node count, edge index, edge types, parameter index of every edge).
Four pieces:

* ``load_nino_gnn(path)``: a local ``nino_no_posw.pt``-shaped checkpoint, read with
  ``torch.load(..., weights_only=True)``; every shape is validated, anything else is refused.
* The neural graph of an open_clip ViT visual tower (``vit_spec`` + ``build_vit_graph``): neurons
  are nodes, weights are edges. A weight matrix is a full bipartite block from its input to its
  output neurons; a bias or norm vector gets one source node wired to every neuron it modifies;
  ``in_proj_weight`` is split into q, k, v (k transposed, so q and k form a bilinear path through the
  block input); per-head nodes (type 11, constant 1.0) feed the q and v neurons; residual diagonals
  (type 10, constant 1.0) bypass attention and the MLP; every node has a self-loop (type 13, 2.0);
  the class embedding has one source node and the positional embedding one per token; conv1 (resized
  to 3×3 for every model) has one node per input channel and 9 values per edge; ``proj``'s output
  neurons are the last nodes. Node ids are allocated layer by layer (a layer's bias/norm/head source
  nodes just before its neurons); edges are emitted in open_clip parameter order, each weight block
  in the order of its transposed matrix. The positional embedding's edges take their values from
  the transposed tensor reinterpreted as (tokens × width), as the reference does (a scrambled
  assignment; it is what the published checkpoint was run with and what the fixtures contain).
* Laplacian positional encoding (``laplacian_pe``): the 8 eigenvectors after the trivial one of the
  symmetric-normalised Laplacian of the undirected, unweighted graph (self-loops removed, duplicate
  pairs counted once), by scipy's sparse block solver LOBPCG (dense ``eigh`` only below 2,000 nodes); each
  column's sign is first made canonical (largest-magnitude entry positive), then flipped by a seeded
  random sign (seed = hash of the graph), like the reference's random sign per column. The eigenbasis
  of a repeated eigenvalue is not unique (the fixture graph has one such pair), so results depend on
  the solver unless the eigenvectors are pinned: ``LpeStore`` caches them on disk keyed by the
  graph's structure hash and accepts injected ones.
* The forward (``NinoGNN.predict``): e = edge_proj(features) + L[type]; x = node_proj(lpe); per round
  i: (scale, shift) = edge_encoder_i(e), message = scale ⊙ pre_nns_i([x_dst ‖ x_src]) + shift,
  mean at each target node, x ← silu(lin_i(post_nns_i([x ‖ agg]))), e ← lin1(silu(lin_e(e) +
  lin_s(x)[src] + lin_t(x)[dst])); head u = silu(edge_out.fc.0(e)), δ_s = row s·40 + k − 1 of
  edge_out.fc.2; value = z_s[4] + λ δ_s. The checkpoint's last conv never reaches the output and is
  not run. Edges are processed in chunks (three passes over the edges per horizon); the E × H edge
  state is kept between passes when it fits ``DEFAULT_STORE_EDGES_BYTES`` (6 GiB: a ViT-B/16 block
  needs 3.6 GB) and recomputed from the inputs otherwise (same values, ~1.3× the work), so the
  whole-tower graph never needs its 43.9 GB edge state either. The message network's first layer is
  split into its target and source halves, applied per node and gathered per edge (the same
  products, summed in another order: ≤ 3e-7 from the reference on the fixtures).

Randomness. The published setting samples, per round, a random 20 % of the edges whose messages are
aggregated (edge updates use all edges). ``edge_sample_ratio`` = 0 (default) or ≥ 1 uses every edge:
deterministic given the eigenvectors. A ratio in (0, 1) draws exactly round(ratio · E) edges per round
without replacement from a ``torch.Generator`` the caller seeds (the strategy seeds it from the step
seed, so a replay is bit-identical). Nodes that receive no sampled message aggregate 0 (mean over
an empty set; the node count is the scatter size, not the largest index + 1 as in the reference).
Results are "approximate, stochastic" whenever sampling is on or the eigenvectors are not pinned.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from mergewatch.strategies.nino import (
    CONTEXT,
    HORIZONS,
    N_TYPE_IDS,
    MetaMergeError,
    _moments,
    _pool,
    _refuse,
    context_order,
    float32_weights,
    read_nino_checkpoint,
)

#: Values per edge (a 3×3 conv kernel) and edge input width (slots × context states).
SLOTS = 9
EDGE_IN = SLOTS * CONTEXT
#: Laplacian eigenvectors per node.
N_LPE = 8
TYPE_LINEAR, TYPE_BIAS, TYPE_CONV, TYPE_NORM, TYPE_CLASS_EMB, TYPE_POS_EMB = 1, 2, 3, 4, 5, 6
TYPE_Q, TYPE_K, TYPE_V, TYPE_RESIDUAL, TYPE_HEAD, TYPE_SELF = 7, 8, 9, 10, 11, 13
#: Constants carried (slot 0, every context state, not normalised) by the auxiliary edges.
AUX_VALUE = {TYPE_RESIDUAL: 1.0, TYPE_HEAD: 1.0, TYPE_SELF: 2.0}
_AUX_TABLE = torch.tensor([AUX_VALUE.get(t, 0.0) for t in range(N_TYPE_IDS)], dtype=torch.float32)
DEFAULT_CHUNK_EDGES = 32768
#: Edge states are stored between the passes up to this size (a ViT-B/16 block: 3.6 GB), else recomputed.
DEFAULT_STORE_EDGES_BYTES = 6 << 30
#: Below this node count the eigenvectors come from a dense ``eigh`` (exact and fast when small).
DENSE_EIG_MAX_NODES = 2000
LPE_VERSION = "nino-gnn-lpe-v1"


# Checkpoint --------------------------------------------------------------------------------------

_CONV_RE = re.compile(r"^gnn\.convs\.(\d+)\.(edge_encoder|pre_nns\.0\.0|post_nns\.0\.0|lin)\.(weight|bias)$")
_UPD_RE = re.compile(r"^gnn\.edge_update\.(\d+)\.(lin_e|lin_s|lin_t|lin1)\.(weight|bias)$")
_FIXED = (
    "layer_embed.weight",
    "node_proj.fc.0.weight", "node_proj.fc.0.bias",
    "edge_proj.fc.0.weight", "edge_proj.fc.0.bias",
    "edge_out.fc.0.weight", "edge_out.fc.0.bias",
    "edge_out.fc.2.weight", "edge_out.fc.2.bias",
)


@dataclass(frozen=True)
class NinoGNN:
    """A validated NiNo-GNN checkpoint (float32 tensors by name) and its inferred shape."""

    path: str
    sha256: str
    model_args: dict
    hidden: int  # H (128 for nino_no_posw.pt)
    n_outputs: int  # horizon outputs per slot (40)
    rounds: int  # message-passing rounds that reach the output (2)
    convs: int  # convs in the checkpoint (3; the last one is never run)
    w: dict = field(repr=False, default_factory=dict)

    def describe(self) -> dict:
        return {
            "variant": "nino-gnn",
            "checkpoint_sha256": self.sha256,
            "hidden": self.hidden,
            "context": CONTEXT,
            "horizon_outputs": self.n_outputs,
            "type_ids": N_TYPE_IDS,
            "rounds": self.rounds,
            "lpe_dim": N_LPE,
            "model_args": dict(self.model_args),
        }

    # The forward --------------------------------------------------------------------------------
    def predict(
        self,
        graph: "NeuralGraph",
        z: torch.Tensor,
        lpe: torch.Tensor,
        k: int,
        *,
        upd_scale: float = 2.5,
        edge_sample_ratio: float = 0.0,
        generator: torch.Generator | None = None,
        chunk_edges: int = DEFAULT_CHUNK_EDGES,
        store_edges_bytes: int = DEFAULT_STORE_EDGES_BYTES,
        threads: int = 0,
    ) -> torch.Tensor:
        """The network's prediction z' (normalised units) for every parameter of ``graph`` at horizon
        ``k`` (1-based). ``z`` is the normalised context (n_params × 5, the graph's flat parameter
        order), ``lpe`` the node encoding (num_nodes × 8). Returns (n_params,) float32.

        Edge chunks run on ``threads`` single-threaded workers (0: torch's intra-op thread count),
        node-level products on one of them; messages are summed in chunk order. So the result is
        bit-identical for any ``threads`` (and, as tested, any ``chunk_edges``), and no OpenMP barrier
        per product stalls the workers when the CPU is shared (single-threaded products ran 1.5× faster
        than 2-thread ones on the loaded development machine)."""
        w = self.w
        H = self.hidden
        n_nodes = graph.num_nodes
        E = graph.num_edges
        if tuple(z.shape) != (graph.n_params, CONTEXT):
            raise MetaMergeError(f"nino-gnn: context has shape {tuple(z.shape)}, the graph needs ({graph.n_params}, {CONTEXT})")
        if tuple(lpe.shape) != (n_nodes, N_LPE):
            raise MetaMergeError(f"nino-gnn: positional encoding has shape {tuple(lpe.shape)}, the graph needs ({n_nodes}, {N_LPE})")
        sampled = None
        if 0.0 < edge_sample_ratio < 1.0:
            n_keep = max(1, round(edge_sample_ratio * E))
            sampled = []
            for _ in range(self.rounds):
                keep = torch.zeros(E, dtype=torch.bool)
                keep[torch.randperm(E, generator=generator)[:n_keep]] = True
                sampled.append(keep)
        lam = float(upd_scale)
        head_rows = torch.arange(SLOTS) * self.n_outputs + (k - 1)
        w_head, b_head = w["edge_out.fc.2.weight"][head_rows], w["edge_out.fc.2.bias"][head_rows]
        out = torch.empty(graph.n_params, dtype=torch.float32)
        # Edge states: kept (E × H floats) when that fits ``store_edges_bytes``, else recomputed from
        # the inputs in every pass (memory O(chunk), about 1.3× the work). Same values either way.
        ebuf = torch.empty((E, H), dtype=torch.float32) if E * H * 4 <= store_edges_bytes else None
        pool = _pool(threads)
        n_workers = max(1, threads or torch.get_num_threads())

        def single(fn, *args):  # node-level work, also single-threaded: results independent of ``threads``
            return pool.submit(fn, *args).result()

        x = single(F.linear, lpe, w["node_proj.fc.0.weight"], w["node_proj.fc.0.bias"])
        xs: list[torch.Tensor] = [x]  # node states after each round
        nodes_s: list[torch.Tensor] = []  # lin_s(x) and lin_t(x) per edge update, per node
        nodes_t: list[torch.Tensor] = []
        for rnd in range(self.rounds + 1):
            last = rnd == self.rounds
            p = f"gnn.convs.{rnd}."
            if not last:
                agg = torch.zeros((n_nodes, H), dtype=torch.float32)
                receivers = graph.dst.long() if sampled is None else graph.dst[sampled[rnd]].long()
                cnt = torch.bincount(receivers, minlength=n_nodes).to(torch.float32)
                del receivers
                wp = w[p + "pre_nns.0.0.weight"]
                # pre_nns([x_dst ‖ x_src]) = A x_dst + (B x_src + b): both halves per node, gathered per edge.
                pre_t = single(F.linear, xs[rnd], wp[:, :H])
                pre_s = single(F.linear, xs[rnd], wp[:, H:], w[p + "pre_nns.0.0.bias"])

            def chunk(a: int, _rnd=rnd, _last=last, _p=p):
                b = min(a + chunk_edges, E)
                src, dst = graph.src[a:b].long(), graph.dst[a:b].long()
                feat = graph.features(z, a, b) if (_rnd == 0 or _last or ebuf is None) else None
                if ebuf is not None and _rnd > 0:  # the stored state of the previous round
                    e, first = ebuf[a:b], _rnd - 1
                else:
                    e = F.linear(feat, w["edge_proj.fc.0.weight"], w["edge_proj.fc.0.bias"]).add_(
                        w["layer_embed.weight"].index_select(0, graph.edge_type[a:b].long()))
                    first = 0
                for r in range(first, _rnd):  # edge updates up to this round
                    u = f"gnn.edge_update.{r}."
                    h = F.linear(e, w[u + "lin_e.weight"], w[u + "lin_e.bias"])
                    h.add_(nodes_s[r].index_select(0, src)).add_(nodes_t[r].index_select(0, dst))
                    e = F.linear(F.silu(h, inplace=True), w[u + "lin1.weight"], w[u + "lin1.bias"])
                    del h
                if ebuf is not None and not _last:
                    ebuf[a:b] = e
                if _last:
                    hu = F.silu(F.linear(e, w["edge_out.fc.0.weight"], w["edge_out.fc.0.bias"]), inplace=True)
                    graph.scatter_out(out, feat, hu, w_head, b_head, lam, a, b)  # disjoint positions per chunk
                    return None
                ss = F.linear(e, w[_p + "edge_encoder.weight"], w[_p + "edge_encoder.bias"])
                msg = pre_t.index_select(0, dst).add_(pre_s.index_select(0, src)).mul_(ss[:, :H]).add_(ss[:, H:])
                if sampled is not None:
                    keep = sampled[_rnd][a:b]
                    msg, dst = msg[keep], dst[keep]
                return dst, msg

            # Chunks run on single-threaded workers; their messages are summed here in chunk order,
            # so the aggregation (and the result) does not depend on the number of workers.
            starts = list(range(0, E, chunk_edges))
            window = 2 * n_workers
            futures = [pool.submit(chunk, a) for a in starts[:window]]
            for i in range(len(starts)):
                res = futures[i].result()
                futures[i] = None
                if i + window < len(starts):
                    futures.append(pool.submit(chunk, starts[i + window]))
                if res is not None:
                    agg.index_add_(0, res[0], res[1])
                del res
            if last:
                break
            agg.div_(cnt.clamp_(min=1.0).unsqueeze(1))

            def node_update(xc, agg_, _p=p, _r=rnd):
                xn = F.linear(torch.cat([xc, agg_], 1), w[_p + "post_nns.0.0.weight"], w[_p + "post_nns.0.0.bias"])
                xn = F.silu(F.linear(xn, w[_p + "lin.weight"], w[_p + "lin.bias"]))
                u = f"gnn.edge_update.{_r}."
                return xn, F.linear(xn, w[u + "lin_s.weight"], w[u + "lin_s.bias"]), F.linear(xn, w[u + "lin_t.weight"], w[u + "lin_t.bias"])

            xn, ns_, nt_ = single(node_update, xs[rnd], agg)
            del agg, cnt
            xs.append(xn)
            nodes_s.append(ns_)
            nodes_t.append(nt_)
        return out


def load_nino_gnn(path: str | Path) -> NinoGNN:
    """Load and validate a NiNo-GNN checkpoint (``nino_no_posw.pt``).

    Raises ``ValueError`` naming ``'checkpoint'`` for a missing path, an unreadable or
    non-weights-only file, a NiNo-MLP checkpoint, unknown or missing keys, wrong shapes or non-finite
    values. Hidden size H comes from ``layer_embed.weight`` (15 × H); every other shape follows."""
    p, sha, sd, args = read_nino_checkpoint(path, "NiNo-GNN checkpoint (nino_no_posw.pt)")
    if args.get("gnn", True) is False or not any(k.startswith("gnn.") for k in sd):
        raise _refuse(p, f"not a NiNo-GNN checkpoint (model_args={dict(args)!r}, no gnn.* keys); NiNo-MLP checkpoints such as nino_mlp.pt belong to method 'metamerge'")
    if args.get("wte_pos_enc"):
        raise _refuse(p, "model_args['wte_pos_enc'] is set: word-embedding positional encoding is for language models, not the ViT graph")
    sd = float32_weights(p, sd)
    missing = sorted(set(_FIXED) - set(sd))
    unknown = sorted(k for k in sd if k not in _FIXED and not _CONV_RE.match(k) and not _UPD_RE.match(k))
    if missing or unknown:
        raise _refuse(p, f"unexpected keys for NiNo-GNN: missing {missing}, unknown {unknown}")
    conv_ids = sorted({int(m.group(1)) for k in sd if (m := _CONV_RE.match(k))})
    upd_ids = sorted({int(m.group(1)) for k in sd if (m := _UPD_RE.match(k))})
    if not upd_ids or upd_ids != list(range(len(upd_ids))) or conv_ids != list(range(len(conv_ids))) or len(conv_ids) < len(upd_ids):
        raise _refuse(p, f"gnn.convs must be numbered 0..C-1 and gnn.edge_update 0..R-1 with R >= 1 and C >= R; got convs {conv_ids}, edge_update {upd_ids}")
    emb = tuple(sd["layer_embed.weight"].shape)
    if len(emb) != 2 or emb[0] != N_TYPE_IDS or emb[1] < 1:
        raise _refuse(p, f"layer_embed.weight has shape {emb}, expected ({N_TYPE_IDS}, hidden)")
    H = emb[1]
    head = tuple(sd["edge_out.fc.2.weight"].shape)
    n_out = head[0] // SLOTS if len(head) == 2 and head[0] % SLOTS == 0 else -1
    expect: dict[str, tuple[int, ...]] = {
        "node_proj.fc.0.weight": (H, N_LPE), "node_proj.fc.0.bias": (H,),
        "edge_proj.fc.0.weight": (H, EDGE_IN), "edge_proj.fc.0.bias": (H,),
        "edge_out.fc.0.weight": (H, H), "edge_out.fc.0.bias": (H,),
        "edge_out.fc.2.weight": (SLOTS * n_out, H), "edge_out.fc.2.bias": (SLOTS * n_out,),
    }
    for i in conv_ids:
        c = f"gnn.convs.{i}."
        expect.update({
            c + "edge_encoder.weight": (2 * H, H), c + "edge_encoder.bias": (2 * H,),
            c + "pre_nns.0.0.weight": (H, 2 * H), c + "pre_nns.0.0.bias": (H,),
            c + "post_nns.0.0.weight": (H, 2 * H), c + "post_nns.0.0.bias": (H,),
            c + "lin.weight": (H, H), c + "lin.bias": (H,),
        })
    for i in upd_ids:
        for lin in ("lin_e", "lin_s", "lin_t", "lin1"):
            expect[f"gnn.edge_update.{i}.{lin}.weight"] = (H, H)
            expect[f"gnn.edge_update.{i}.{lin}.bias"] = (H,)
    absent = sorted(set(expect) - set(sd))
    if absent:
        raise _refuse(p, f"missing {absent}")
    wrong = [f"{k}: {tuple(sd[k].shape)} (expected {s})" for k, s in expect.items() if tuple(sd[k].shape) != s]
    if wrong:
        raise _refuse(p, f"wrong shapes for a NiNo-GNN with hidden {H}, {EDGE_IN} edge inputs and {N_LPE} eigenvectors: " + "; ".join(wrong))
    if n_out < max(HORIZONS):
        raise _refuse(p, f"the head has {n_out} horizon outputs per slot, MetaMerge needs at least {max(HORIZONS)}")
    if "hid" in args and args["hid"] != H:
        raise _refuse(p, f"model_args['hid'] = {args['hid']!r} but the tensors have hidden size {H}")
    return NinoGNN(
        path=str(p), sha256=sha,
        model_args={k: v for k, v in args.items() if isinstance(v, (bool, int, float, str))},
        hidden=H, n_outputs=n_out, rounds=len(upd_ids), convs=len(conv_ids), w=sd,
    )


# The neural graph of an open_clip ViT --------------------------------------------------------------

BLOCK_PARTS = (
    ("ln_1.weight", TYPE_NORM), ("ln_1.bias", TYPE_BIAS),
    ("attn.in_proj_weight", None), ("attn.in_proj_bias", None),
    ("attn.out_proj.weight", TYPE_LINEAR), ("attn.out_proj.bias", TYPE_BIAS),
    ("ln_2.weight", TYPE_NORM), ("ln_2.bias", TYPE_BIAS),
    ("mlp.c_fc.weight", TYPE_LINEAR), ("mlp.c_fc.bias", TYPE_BIAS),
    ("mlp.c_proj.weight", TYPE_LINEAR), ("mlp.c_proj.bias", TYPE_BIAS),
)
STEM = ("class_embedding", "positional_embedding", "conv1.weight", "ln_pre.weight", "ln_pre.bias")
HEAD = ("proj", "ln_post.weight", "ln_post.bias")
#: open_clip's parameter order of the visual tower (edges and the flat parameter vector follow it).
_ORDER_TOP = ("class_embedding", "positional_embedding", "proj", "conv1.weight", "ln_pre.weight", "ln_pre.bias")


@dataclass(frozen=True)
class ViTSpec:
    """Shapes of an open_clip ViT visual tower. ``hidden`` is the MLP width of each block."""

    prefix: str  # "visual." or "" (vision-only state dict)
    width: int
    tokens: int  # rows of the positional embedding
    in_channels: int
    out_dim: int
    hidden: tuple[int, ...]
    conv_shape: tuple[int, ...]  # the stored (unresized) conv1 kernel

    @property
    def blocks(self) -> int:
        return len(self.hidden)

    def key(self, short: str) -> str:
        return self.prefix + short

    def block_key(self, b: int, part: str) -> str:
        return f"{self.prefix}transformer.resblocks.{b}.{part}"

    def graph_shape(self, short: str, b: int | None = None) -> tuple[int, ...]:
        """Shape of a tensor as the graph sees it (conv1 resized to 3×3)."""
        d = self.width
        if b is None:
            return {
                "class_embedding": (d,), "positional_embedding": (self.tokens, d), "proj": (d, self.out_dim),
                "conv1.weight": (d, self.in_channels, 3, 3), "ln_pre.weight": (d,), "ln_pre.bias": (d,),
                "ln_post.weight": (d,), "ln_post.bias": (d,),
            }[short]
        h = self.hidden[b]
        return {
            "ln_1.weight": (d,), "ln_1.bias": (d,), "attn.in_proj_weight": (3 * d, d), "attn.in_proj_bias": (3 * d,),
            "attn.out_proj.weight": (d, d), "attn.out_proj.bias": (d,), "ln_2.weight": (d,), "ln_2.bias": (d,),
            "mlp.c_fc.weight": (h, d), "mlp.c_fc.bias": (h,), "mlp.c_proj.weight": (d, h), "mlp.c_proj.bias": (d,),
        }[short]

    def stored_shape(self, short: str, b: int | None = None) -> tuple[int, ...]:
        return self.conv_shape if (b is None and short == "conv1.weight") else self.graph_shape(short, b)


def vit_spec(shapes: Mapping[str, Sequence[int]], prefix: str = "visual.") -> ViTSpec:
    """Read and check the visual tower's layout from tensor shapes (name -> shape).

    Only the plain open_clip ViT is known (METAMERGE §8: other architectures must not be invented
    silently): any other tensor under ``prefix`` (attention pooling, layer scale, a conv bias, ...)
    or a missing/odd-shaped one raises ``MetaMergeError`` naming the key."""
    def shape(k: str) -> tuple[int, ...]:
        if k not in shapes:
            raise MetaMergeError(f"metamerge_gnn: the open_clip ViT graph needs tensor '{k}', which the model lacks")
        return tuple(int(s) for s in shapes[k])

    cls = shape(prefix + "class_embedding")
    if len(cls) != 1:
        raise MetaMergeError(f"metamerge_gnn: '{prefix}class_embedding' has shape {cls}, expected (width,)")
    d = cls[0]
    pos = shape(prefix + "positional_embedding")
    proj = shape(prefix + "proj")
    conv = shape(prefix + "conv1.weight")
    if len(pos) != 2 or pos[1] != d or len(proj) != 2 or proj[0] != d or len(conv) != 4 or conv[0] != d:
        raise MetaMergeError(
            f"metamerge_gnn: visual tower shapes do not fit an open_clip ViT of width {d}: positional_embedding {pos}, proj {proj}, conv1.weight {conv}"
        )
    pat = re.compile(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
    ids = sorted({int(m.group(1)) for k in shapes if (m := pat.match(k))})
    if not ids or ids != list(range(len(ids))):
        raise MetaMergeError(f"metamerge_gnn: transformer blocks must be numbered 0..L-1, got {ids}")
    hidden = []
    for b in ids:
        fc = shape(f"{prefix}transformer.resblocks.{b}.mlp.c_fc.weight")
        hidden.append(fc[0])
    spec = ViTSpec(prefix, d, pos[0], conv[1], proj[1], tuple(hidden), conv)
    known = {spec.key(s) for s in (*STEM, *HEAD)} | {spec.block_key(b, part) for b in ids for part, _ in BLOCK_PARTS}
    for k in sorted(shapes):
        if k.startswith(prefix) and k not in known:
            raise MetaMergeError(f"metamerge_gnn: tensor '{k}' is not part of the open_clip ViT graph this builder knows (METAMERGE §8: no other architecture)")
    for short in (*STEM, *HEAD):
        want = spec.stored_shape(short)
        if shape(spec.key(short)) != want:
            raise MetaMergeError(f"metamerge_gnn: '{spec.key(short)}' has shape {shape(spec.key(short))}, expected {want}")
    for b in ids:
        for part, _ in BLOCK_PARTS:
            want = spec.graph_shape(part, b)
            if shape(spec.block_key(b, part)) != want:
                raise MetaMergeError(f"metamerge_gnn: '{spec.block_key(b, part)}' has shape {shape(spec.block_key(b, part))}, expected {want}")
    return spec


@dataclass
class GraphTensor:
    name: str  # full state-dict key
    shape: tuple[int, ...]  # as in the graph (conv1: 3×3)
    offset: int  # into the graph's flat parameter vector
    numel: int


@dataclass
class NeuralGraph:
    """Nodes are neurons, edges are weights. ``edge_param`` indexes the graph's flat parameter vector
    (its tensors in open_clip order, ``tensors``); −1 marks auxiliary edges; a conv edge's 9 values
    are ``edge_param + 0..8``. Index arrays are int32 (and uint8 types) to halve their memory."""

    name: str
    tensors: list[GraphTensor]
    num_nodes: int
    src: torch.Tensor  # (E,) int32: message source
    dst: torch.Tensor  # (E,) int32: message target (aggregation happens here)
    edge_type: torch.Tensor  # (E,) uint8
    edge_param: torch.Tensor  # (E,) int32
    _structure_hash: str | None = None

    @property
    def num_edges(self) -> int:
        return int(self.src.numel())

    @property
    def n_params(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def edge_index(self) -> torch.Tensor:
        return torch.stack([self.src, self.dst])

    def structure_hash(self) -> str:
        """sha256 of the node count and the edge index: what the eigenvectors depend on."""
        if self._structure_hash is None:
            h = hashlib.sha256(f"{LPE_VERSION}\x1f{self.num_nodes}\x1f{self.num_edges}\x1f".encode())
            h.update(self.src.numpy().tobytes())
            h.update(self.dst.numpy().tobytes())
            self._structure_hash = h.hexdigest()
        return self._structure_hash

    # Edge inputs and outputs -----------------------------------------------------------------------
    def features(self, z: torch.Tensor, a: int, b: int) -> torch.Tensor:
        """Edge inputs of edges [a, b): (b − a) × 45, column slot·5 + state; real weights carry their
        normalised context, auxiliary edges their constant in slot 0, unused slots 0."""
        pidx = self.edge_param[a:b].long()
        et = self.edge_type[a:b].long()
        feat = torch.zeros((b - a, EDGE_IN), dtype=torch.float32)
        real = (pidx >= 0).unsqueeze(1)
        feat[:, :CONTEXT] = torch.where(real, z[pidx.clamp(min=0)], _AUX_TABLE[et].unsqueeze(1))
        conv = (et == TYPE_CONV).nonzero().squeeze(1)
        if conv.numel():
            idx = pidx[conv].unsqueeze(1) + torch.arange(1, SLOTS)
            feat[conv, CONTEXT:] = z[idx.reshape(-1)].reshape(conv.numel(), (SLOTS - 1) * CONTEXT)
        return feat

    def scatter_out(self, out, feat, u, w_head, b_head, lam, a, b) -> None:
        """value_s = z_s[4] + λ δ_s written back to the real weights of edges [a, b)."""
        pidx = self.edge_param[a:b].long()
        et = self.edge_type[a:b]
        real = (pidx >= 0) & (et != TYPE_CONV)
        d0 = F.linear(u[real], w_head[:1], b_head[:1]).squeeze(1)
        out[pidx[real]] = feat[real, CONTEXT - 1] + lam * d0
        conv = (et == TYPE_CONV).nonzero().squeeze(1)
        if conv.numel():
            d = F.linear(u[conv], w_head, b_head)  # (c, 9)
            z4 = feat[conv][:, CONTEXT - 1::CONTEXT]  # (c, 9): z_s[4] of every slot
            idx = pidx[conv].unsqueeze(1) + torch.arange(SLOTS)
            out[idx.reshape(-1)] = (z4 + lam * d).reshape(-1)


class _Builder:
    def __init__(self) -> None:
        self.n = 0
        self.parts: list[tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]] = []

    def alloc(self, k: int) -> torch.Tensor:
        r = torch.arange(self.n, self.n + k)
        self.n += k
        return r

    def add(self, src, dst, etype: int, param) -> None:
        src, dst = torch.as_tensor(src).reshape(-1), torch.as_tensor(dst).reshape(-1)
        if param is None:
            param = torch.full_like(src, -1)
        self.parts.append((src, dst, etype, torch.as_tensor(param).reshape(-1)))

    def dense(self, outer_nodes, inner_nodes, etype, param_fn, outer_is_src: bool) -> None:
        """All (outer, inner) pairs, outer index slowest; ``param_fn(io, ii)`` gives the parameter
        index of the pair (from the grids of outer and inner positions)."""
        no, ni = len(outer_nodes), len(inner_nodes)
        io = torch.arange(no).repeat_interleave(ni)
        ii = torch.arange(ni).repeat(no)
        a, b = outer_nodes[io], inner_nodes[ii]
        self.add(a if outer_is_src else b, b if outer_is_src else a, etype, param_fn(io, ii))

    def vector(self, node, targets, etype, offset) -> None:
        self.add(node.expand(len(targets)), targets, etype, offset + torch.arange(len(targets)))


def build_vit_graph(spec: ViTSpec, heads: int, blocks: Sequence[int] | None = None, *, stem: bool = True, head: bool = True,
                    name: str = "visual") -> NeuralGraph:
    """The neural graph of blocks ``blocks`` (default: all) of ``spec``, with the stem (class and
    positional embeddings, conv1, ln_pre) and/or the head (ln_post, proj) attached. With all blocks,
    stem and head it is the reference's whole-model graph (``gnn_graph.safetensors`` for the
    fixture model). Consecutive blocks share their boundary neurons; a graph starting at block b > 0
    gets its own copy of the block's input neurons."""
    blocks = list(range(spec.blocks)) if blocks is None else list(blocks)
    if not blocks or blocks != list(range(blocks[0], blocks[0] + len(blocks))):
        raise ValueError(f"blocks must be a non-empty consecutive range, got {blocks}")
    d, P, C = spec.width, spec.tokens, spec.in_channels
    if heads < 1 or d % heads:
        raise MetaMergeError(f"metamerge_gnn: width {d} is not divisible into {heads} attention heads (parameter 'heads')")
    dh = d // heads
    B = _Builder()
    # Node layout: layer by layer, each layer's bias/norm/head source nodes before its neurons.
    if stem:
        n_cls, n_pos, n_cin = B.alloc(1), B.alloc(P), B.alloc(C)
        n_lnpre_w, n_lnpre_b = B.alloc(1), B.alloc(1)
    lay: dict[int, dict[str, torch.Tensor]] = {}
    for i, b in enumerate(blocks):
        L = lay.setdefault(b, {})
        if i == 0:
            L["ln1w"], L["ln1b"], L["kb"] = B.alloc(1), B.alloc(1), B.alloc(1)
            L["in"] = B.alloc(d)
        else:
            L["in"] = lay[blocks[i - 1]]["out"]
        L["heads"], L["qb"], L["vb"], L["q"], L["v"] = B.alloc(heads), B.alloc(1), B.alloc(1), B.alloc(d), B.alloc(d)
        L["opb"], L["ln2w"], L["ln2b"], L["mid"] = B.alloc(1), B.alloc(1), B.alloc(1), B.alloc(d)
        L["fcb"], L["hid"] = B.alloc(1), B.alloc(spec.hidden[b])
        L["cpb"] = B.alloc(1)
        if i + 1 < len(blocks):
            nxt = lay[blocks[i + 1]] = {}
            nxt["ln1w"], nxt["ln1b"], nxt["kb"] = B.alloc(1), B.alloc(1), B.alloc(1)
        elif head:
            n_lnpost_w, n_lnpost_b = B.alloc(1), B.alloc(1)
        L["out"] = B.alloc(d)
    if head:
        n_proj = B.alloc(spec.out_dim)
    first, final = lay[blocks[0]]["in"], lay[blocks[-1]]["out"]

    # Tensors in open_clip order, with their offsets in the flat parameter vector.
    tensors: list[GraphTensor] = []
    off: dict[str, int] = {}

    def reg(key: str, shape: tuple[int, ...]) -> None:
        n = math.prod(shape)
        off[key] = sum(t.numel for t in tensors)
        tensors.append(GraphTensor(key, shape, off[key], n))

    top = [s for s in _ORDER_TOP if (stem and s in STEM) or (head and s in HEAD)]
    for s in top:
        reg(spec.key(s), spec.graph_shape(s))
    for b in blocks:
        for part, _ in BLOCK_PARTS:
            reg(spec.block_key(b, part), spec.graph_shape(part, b))
    if head:
        for s in ("ln_post.weight", "ln_post.bias"):
            reg(spec.key(s), spec.graph_shape(s))

    # Edges in parameter order; each weight block in the order of its transposed matrix.
    for s in top:
        o = off[spec.key(s)]
        if s == "class_embedding":
            B.vector(n_cls, first, TYPE_CLASS_EMB, o)
        elif s == "positional_embedding":
            # (tokens × width) edges get the transposed tensor's values read as (tokens × width).
            B.dense(n_pos, first, TYPE_POS_EMB, lambda io, ii: o + ((io * d + ii) % P) * d + (io * d + ii) // P, True)
        elif s == "proj":
            out_dim = spec.out_dim
            B.dense(n_proj, final, TYPE_LINEAR, lambda io, ii: o + ii * out_dim + io, False)
        elif s == "conv1.weight":
            B.dense(n_cin, first, TYPE_CONV, lambda io, ii: o + (ii * C + io) * SLOTS, True)
        elif s == "ln_pre.weight":
            B.vector(n_lnpre_w, first, TYPE_NORM, o)
        elif s == "ln_pre.bias":
            B.vector(n_lnpre_b, first, TYPE_BIAS, o)
    for b in blocks:
        L = lay[b]
        k = {part: off[spec.block_key(b, part)] for part, _ in BLOCK_PARTS}
        hb = spec.hidden[b]
        B.vector(L["ln1w"], L["in"], TYPE_NORM, k["ln_1.weight"])
        B.vector(L["ln1b"], L["in"], TYPE_BIAS, k["ln_1.bias"])
        wo, bo = k["attn.in_proj_weight"], k["attn.in_proj_bias"]
        head_of = torch.arange(d) // dh
        B.dense(L["in"], L["q"], TYPE_Q, lambda io, ii: wo + ii * d + io, True)
        B.add(L["heads"][head_of], L["q"], TYPE_HEAD, None)
        B.vector(L["qb"], L["q"], TYPE_BIAS, bo)
        B.dense(L["in"], L["q"], TYPE_K, lambda io, ii: wo + (d + ii) * d + io, False)  # k: from the q neurons to the input
        B.vector(L["kb"], L["in"], TYPE_BIAS, bo + d)
        B.dense(L["in"], L["v"], TYPE_V, lambda io, ii: wo + (2 * d + ii) * d + io, True)
        B.add(L["heads"][head_of], L["v"], TYPE_HEAD, None)
        B.vector(L["vb"], L["v"], TYPE_BIAS, bo + 2 * d)
        B.add(L["in"], L["mid"], TYPE_RESIDUAL, None)
        B.dense(L["v"], L["mid"], TYPE_LINEAR, lambda io, ii, o=k["attn.out_proj.weight"]: o + ii * d + io, True)
        B.vector(L["opb"], L["mid"], TYPE_BIAS, k["attn.out_proj.bias"])
        B.vector(L["ln2w"], L["mid"], TYPE_NORM, k["ln_2.weight"])
        B.vector(L["ln2b"], L["mid"], TYPE_BIAS, k["ln_2.bias"])
        B.dense(L["mid"], L["hid"], TYPE_LINEAR, lambda io, ii, o=k["mlp.c_fc.weight"]: o + ii * d + io, True)
        B.vector(L["fcb"], L["hid"], TYPE_BIAS, k["mlp.c_fc.bias"])
        B.add(L["mid"], L["out"], TYPE_RESIDUAL, None)
        B.dense(L["hid"], L["out"], TYPE_LINEAR, lambda io, ii, o=k["mlp.c_proj.weight"]: o + ii * hb + io, True)
        B.vector(L["cpb"], L["out"], TYPE_BIAS, k["mlp.c_proj.bias"])
    if head:
        B.vector(n_lnpost_w, final, TYPE_NORM, off[spec.key("ln_post.weight")])
        B.vector(n_lnpost_b, final, TYPE_BIAS, off[spec.key("ln_post.bias")])
    allnodes = torch.arange(B.n)
    B.add(allnodes, allnodes, TYPE_SELF, None)
    src = torch.cat([p[0] for p in B.parts]).to(torch.int32)
    dst = torch.cat([p[1] for p in B.parts]).to(torch.int32)
    et = torch.cat([torch.full((p[0].numel(),), p[2], dtype=torch.uint8) for p in B.parts])
    par = torch.cat([p[3] for p in B.parts]).to(torch.int32)
    return NeuralGraph(name, tensors, B.n, src, dst, et, par)


def vit_graphs(spec: ViTSpec, heads: int, subgraph: bool) -> list[NeuralGraph]:
    """The graphs MetaMerge runs on: one whole-model graph, or (``subgraph``) one per transformer
    block. Decision (the spec is silent on tensors outside the blocks in per-block mode): the stem
    (class/positional embedding, conv1, ln_pre) is attached to block 0's graph and the head
    (ln_post, proj) to the last block's, exactly where they sit in the whole graph. So every visual
    parameter is meta-merged in both modes, the per-block graphs partition the whole graph's weight
    edges (cut at the residual-stream neurons between blocks, which each side gets a copy of), and a
    one-block model's single subgraph *is* the whole graph."""
    if not subgraph:
        return [build_vit_graph(spec, heads, name="visual")]
    last = spec.blocks - 1
    return [build_vit_graph(spec, heads, [b], stem=b == 0, head=b == last, name=f"block{b}") for b in range(spec.blocks)]


def graph_size(spec: ViTSpec, heads: int) -> tuple[int, int, int]:
    """(nodes, edges, parameters) of the whole-tower graph, computed from the shapes alone (without
    building it): what the whole-graph memory check needs."""
    d, L, C = spec.width, spec.blocks, spec.in_channels
    params = d + spec.tokens * d + d * spec.out_dim + d * C * SLOTS + 4 * d
    params += sum(4 * d * d + 4 * d + 4 * d + 2 * h * d + h + d for h in spec.hidden)  # attention, ln_1/ln_2, MLP
    nodes = 1 + spec.tokens + C + 2 + d + sum(3 + heads + 2 + 2 * d + 3 + d + 1 + h + 1 + d for h in spec.hidden) + 2 + spec.out_dim
    edges = (params - d * C * (SLOTS - 1)) + 4 * d * L + nodes  # weight edges, residual + head edges, self-loops
    return nodes, edges, params


def graph_plan(spec: ViTSpec, subgraph: bool) -> list[tuple[str, list[str]]]:
    """(graph name, its tensor names in open_clip order) for ``vit_graphs(spec, ., subgraph)``,
    without building any edge: what the strategy needs to know which inputs complete which graph."""
    top = [spec.key(s) for s in _ORDER_TOP]
    tail = [spec.key("ln_post.weight"), spec.key("ln_post.bias")]

    def blk(b: int) -> list[str]:
        return [spec.block_key(b, part) for part, _ in BLOCK_PARTS]

    if not subgraph:
        return [("visual", top + [n for b in range(spec.blocks) for n in blk(b)] + tail)]
    plan = []
    for b in range(spec.blocks):
        names = [n for s, n in zip(_ORDER_TOP, top) if (b == 0 and s in STEM) or (b == spec.blocks - 1 and s in HEAD)]
        names += blk(b) + (tail if b == spec.blocks - 1 else [])
        plan.append((f"block{b}", names))
    return plan


# Laplacian positional encoding -------------------------------------------------------------------------

def _sign_seed(structure_hash: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{LPE_VERSION}/sign/{structure_hash}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def laplacian_pe(graph: NeuralGraph, k: int = N_LPE) -> torch.Tensor:
    """(num_nodes, k) float32: eigenvectors 2..k+1 (ascending eigenvalue) of L = I − D^−½ A D^−½,
    A the undirected unweighted adjacency without self-loops; canonical then seeded random column
    signs (module docstring). Above ``DENSE_EIG_MAX_NODES`` nodes scipy's block solver LOBPCG on the
    sparse L (block of 2(k+1) vectors, seeded start; unconverged pairs are an error), a dense
    ``eigh`` below."""
    import numpy as np
    import scipy.sparse as sp

    n = graph.num_nodes
    if n < k + 2:
        raise MetaMergeError(f"nino-gnn: graph '{graph.name}' has {n} nodes, too few for {k} eigenvectors")
    s, t = graph.src.numpy().astype(np.int64), graph.dst.numpy().astype(np.int64)
    keep = s != t
    s, t = s[keep], t[keep]
    a = sp.coo_matrix((np.ones(2 * len(s), dtype=np.float64), (np.concatenate([s, t]), np.concatenate([t, s]))), shape=(n, n)).tocsr()
    a.sum_duplicates()
    a.data[:] = 1.0  # unweighted: a pair linked twice (q and k) counts once
    deg = np.asarray(a.sum(axis=1)).ravel()
    dinv = np.where(deg > 0, 1.0 / np.sqrt(np.maximum(deg, 1e-300)), 0.0)
    norm_a = sp.diags(dinv) @ a @ sp.diags(dinv)
    if n <= DENSE_EIG_MAX_NODES:
        vals, vecs = np.linalg.eigh(np.eye(n) - norm_a.toarray())
    else:
        # A block solver: repeated eigenvalues are common in these symmetric graphs, and single-vector
        # Lanczos (eigsh) misses copies of a repeated eigenvalue. Seeded start: a deterministic solve.
        from scipy.sparse.linalg import lobpcg

        lap = (sp.identity(n, format="csr") - norm_a).tocsr()
        m = min(n - 1, 2 * (k + 1))
        x0 = np.random.default_rng(_sign_seed(graph.structure_hash()) ^ 0x5EED).standard_normal((n, m))
        vals, vecs, resid = lobpcg(lap, x0, largest=False, tol=1e-9, maxiter=max(500, n // 4), retResidualNormsHistory=True)
        last = np.asarray(resid[-1]) if len(resid) else np.zeros(m)
        order_m = np.argsort(vals, kind="stable")[: k + 1]
        if float(np.max(last[order_m])) > 1e-5:
            raise MetaMergeError(
                f"nino-gnn: the Laplacian eigensolver did not converge for graph '{graph.name}' (residual {float(np.max(last[order_m])):.2e}); "
                "inject eigenvectors with 'lpe'"
            )
    order = np.argsort(vals, kind="stable")[1 : k + 1]
    pe = torch.from_numpy(np.ascontiguousarray(vecs[:, order])).to(torch.float32)
    big = pe.abs().argmax(0)
    pe = pe * torch.sign(pe[big, torch.arange(k)]).clamp(min=0).mul(2).sub(1)  # largest entry positive
    g = torch.Generator().manual_seed(_sign_seed(graph.structure_hash()))
    signs = torch.randint(0, 2, (k,), generator=g).to(torch.float32).mul(2).sub(1)
    return (pe * signs).contiguous()


class LpeStore:
    """Eigenvectors per graph: injected (a safetensors file: key ``lpe`` for a whole-model graph,
    ``lpe.<graph name>`` e.g. ``lpe.block3`` per block), else the on-disk cache
    ``<cache_dir>/<structure hash>.safetensors`` (written atomically), else computed and cached.
    Also kept in memory for the process's lifetime (a daemon computes them once)."""

    def __init__(self, inject: str = "", cache_dir: str | None = None):
        self.inject_path = inject
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._memory: dict[str, torch.Tensor] = {}
        self._injected: dict[str, torch.Tensor] = {}
        self.inject_sha256 = ""
        if inject:
            from safetensors import SafetensorError
            from safetensors.torch import load as st_load

            p = Path(inject).expanduser()
            try:
                raw = p.read_bytes()
                self._injected = {k: v for k, v in st_load(raw).items() if k == "lpe" or k.startswith("lpe.")}
            except (OSError, SafetensorError) as e:
                raise ValueError(f"'lpe' {p}: cannot read the eigenvectors ({e})") from e
            if not self._injected:
                raise ValueError(f"'lpe' {p}: no tensor named 'lpe' or 'lpe.<graph>' in the file")
            self.inject_sha256 = hashlib.sha256(raw).hexdigest()

    def get(self, graph: NeuralGraph) -> tuple[torch.Tensor, str]:
        """(eigenvectors, source) with source one of ``injected``, ``cache``, ``memory``, ``computed``."""
        key = f"lpe.{graph.name}"
        if self._injected:
            t = self._injected.get(key, self._injected.get("lpe") if graph.name == "visual" else None)
            if t is None:
                raise MetaMergeError(f"metamerge_gnn: '{self.inject_path}' has no tensor '{key}' for graph {graph.name} (present: {sorted(self._injected)})")
            if tuple(t.shape) != (graph.num_nodes, N_LPE) or not bool(torch.isfinite(t).all()):
                raise MetaMergeError(
                    f"metamerge_gnn: '{self.inject_path}' tensor '{key if key in self._injected else 'lpe'}' has shape {tuple(t.shape)}, "
                    f"graph {graph.name} needs ({graph.num_nodes}, {N_LPE}) finite values"
                )
            return t.to(torch.float32), "injected"
        h = graph.structure_hash()
        if h in self._memory:
            return self._memory[h], "memory"
        path = self.cache_dir / f"{h}.safetensors" if self.cache_dir else None
        if path is not None and path.is_file():
            from safetensors.torch import load_file

            try:
                t = load_file(str(path)).get("lpe")
            except Exception:  # noqa: BLE001 - a damaged cache file is recomputed
                t = None
            if t is not None and tuple(t.shape) == (graph.num_nodes, N_LPE) and bool(torch.isfinite(t).all()):
                self._memory[h] = t
                return t, "cache"
        t = laplacian_pe(graph)
        self._memory[h] = t
        if path is not None:
            from safetensors.torch import save_file

            tmp = None
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".lpe-", suffix=".tmp")
                os.close(fd)
                save_file({"lpe": t}, tmp, metadata={"structure_sha256": h, "version": LPE_VERSION})
                os.replace(tmp, path)
            except OSError as e:  # an unwritable cache costs a recomputation next time, not the step
                return t, f"computed (not cached: {e.strerror or e})"
            finally:
                if tmp is not None and os.path.exists(tmp):
                    os.unlink(tmp)
        return t, "computed"


# MetaMerge over one graph ------------------------------------------------------------------------------

def resize_conv(t: torch.Tensor) -> torch.Tensor:
    """The reference's pre-step for conv1 (METAMERGE §3): every model's patch kernel resized to 3×3."""
    if tuple(t.shape[2:]) == (3, 3):
        return t
    return F.interpolate(t.unsqueeze(0) if t.dim() == 3 else t, size=(3, 3), mode="bilinear", align_corners=False)


def metamerge_graph(
    net: NinoGNN,
    graph: NeuralGraph,
    base: Mapping[str, torch.Tensor],
    experts: Sequence[Mapping[str, torch.Tensor]],
    lpe: torch.Tensor,
    *,
    upd_scale: float = 2.5,
    chain: bool = True,
    edge_sample_ratio: float = 0.0,
    generator: torch.Generator | None = None,
    chunk_edges: int = DEFAULT_CHUNK_EDGES,
    horizons: Sequence[int] = HORIZONS,
    threads: int = 0,
    per_horizon: list | None = None,
) -> dict[str, torch.Tensor]:
    """MetaMerge (§9 with §4.1–4.5) of every tensor of ``graph``: name -> float32 average of P_1..P_5,
    in the graph's shapes (conv1 3×3; the caller discards it). ``base``/``experts`` map the graph's
    tensor names to float32 tensors (conv1 already resized, or resized here). Context slots and the
    chaining quirk as for the MLP; per-tensor normalisation (a fused in_proj_weight is one tensor).
    ``horizons`` other than 1..5 are for measurements only (METAMERGE §8). ``threads`` worker threads
    (0: torch's intra-op count) each run whole edge chunks single-threaded; the result does not
    depend on it."""
    order = context_order(len(experts))
    n = graph.n_params
    x = torch.empty((n, CONTEXT), dtype=torch.float32)
    for t in graph.tensors:
        sl = slice(t.offset, t.offset + t.numel)
        cols = [base[t.name], *(experts[i][t.name] for i in order)]
        for c, v in enumerate(cols):
            v = resize_conv(v) if v.dim() == 4 else v
            if tuple(v.shape) != t.shape:
                raise MetaMergeError(f"metamerge_gnn: '{t.name}' has shape {tuple(v.shape)}, the graph expects {t.shape}")
            x[sl, c] = v.reshape(-1)
    total = torch.zeros(n, dtype=torch.float32)
    lam = float(upd_scale)
    for k in horizons:
        stats = [_moments(x[t.offset:t.offset + t.numel]) for t in graph.tensors]
        z = torch.empty_like(x)
        for t, (mu, _sigma, denom) in zip(graph.tensors, stats):
            z[t.offset:t.offset + t.numel] = x[t.offset:t.offset + t.numel].sub(mu).div_(denom)
        zout = net.predict(graph, z, lpe, k, upd_scale=lam, edge_sample_ratio=edge_sample_ratio,
                           generator=generator, chunk_edges=chunk_edges, threads=threads)
        del z
        pred = torch.empty(n, dtype=torch.float32)
        for t, (mu, sigma, _denom) in zip(graph.tensors, stats):
            sl = slice(t.offset, t.offset + t.numel)
            pred[sl] = zout[sl].mul(sigma).add_(mu)  # no eps when de-normalising
        if per_horizon is not None:
            per_horizon.append({t.name: pred[t.offset:t.offset + t.numel].view(t.shape).clone() for t in graph.tensors})
        total.add_(pred)
        if chain:
            x[:, 0] = pred
        del pred, zout
    total.div_(len(horizons))
    if not bool(torch.isfinite(total).all()):
        raise MetaMergeError(f"metamerge_gnn: non-finite values in the NiNo-GNN prediction for graph {graph.name}")
    return {t.name: total[t.offset:t.offset + t.numel].view(t.shape).clone() for t in graph.tensors}


def estimate_bytes(nodes: int, edges: int, params: int, chunk_edges: int = DEFAULT_CHUNK_EDGES, hidden: int = 128) -> int:
    """Rough peak of one graph's MetaMerge beyond its inputs: the graph's index arrays (13 B per edge)
    plus the larger of the eigensolver's sparse matrices (≈ 60 B per edge) and the forward: context,
    normalised copy, prediction and sum (≈ 32 B per parameter), node states, a chunk of edge
    activations and the stored edge states (E × H floats, when under ``DEFAULT_STORE_EDGES_BYTES``)."""
    stored = edges * hidden * 4
    forward = 32 * params + 32 * nodes * hidden + 40 * chunk_edges * hidden + (stored if stored <= DEFAULT_STORE_EDGES_BYTES else 0)
    return 13 * edges + max(60 * edges, forward)
