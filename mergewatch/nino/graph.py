"""The neural graph of an open_clip ViT visual tower, the input of NiNo-GNN (METAMERGE.md §9).

Written from the specification and the conformance graph (``gnn_graph.safetensors``), which this
builder reproduces exactly (node count, edge index, edge types, parameter index of every edge).

The graph (``vit_spec`` + ``build_vit_graph``): neurons are nodes, weights are edges. A weight
matrix is a full bipartite block from its input to its output neurons; a bias or norm vector gets
one source node wired to every neuron it modifies; ``in_proj_weight`` is split into q, k, v (k
transposed, so q and k form a bilinear path through the block input); per-head nodes (type 11,
constant 1.0) feed the q and v neurons; residual diagonals (type 10, constant 1.0) bypass attention
and the MLP; every node has a self-loop (type 13, 2.0); the class embedding has one source node and
the positional embedding one per token; conv1 (resized to 3×3 for every model) has one node per
input channel and 9 values per edge; ``proj``'s output neurons are the last nodes. Node ids are
allocated layer by layer (a layer's bias/norm/head source nodes just before its neurons); edges are
emitted in open_clip parameter order, each weight block in the order of its transposed matrix. The
positional embedding's edges take their values from the transposed tensor reinterpreted as (tokens ×
width), as the reference does (a scrambled assignment; it is what the published checkpoint was run
with and what the fixtures contain).

A per-block graph (``vit_graphs(..., subgraph=True)``) is the same construction over one block,
with the stem joining the first block's graph and the head the last one's.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mergewatch.nino.context import CONTEXT, N_TYPE_IDS, MetaMergeError
from mergewatch.nino.eigenvectors import LPE_VERSION

#: Values per edge (a 3×3 conv kernel) and edge input width (slots × context states).
SLOTS = 9
EDGE_IN = SLOTS * CONTEXT
TYPE_LINEAR, TYPE_BIAS, TYPE_CONV, TYPE_NORM, TYPE_CLASS_EMB, TYPE_POS_EMB = 1, 2, 3, 4, 5, 6
TYPE_Q, TYPE_K, TYPE_V, TYPE_RESIDUAL, TYPE_HEAD, TYPE_SELF = 7, 8, 9, 10, 11, 13
#: Constants carried (slot 0, every context state, not normalised) by the auxiliary edges.
AUX_VALUE = {TYPE_RESIDUAL: 1.0, TYPE_HEAD: 1.0, TYPE_SELF: 2.0}
_AUX_TABLE = torch.tensor([AUX_VALUE.get(t, 0.0) for t in range(N_TYPE_IDS)], dtype=torch.float32)


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


def resize_conv(t: torch.Tensor) -> torch.Tensor:
    """The reference's pre-step for conv1 (METAMERGE §3): every model's patch kernel resized to 3×3."""
    if tuple(t.shape[2:]) == (3, 3):
        return t
    return F.interpolate(t.unsqueeze(0) if t.dim() == 3 else t, size=(3, 3), mode="bilinear", align_corners=False)
