"""NiNo-GNN: the graph variant of the NiNo meta-network used by MetaMerge (METAMERGE.md §9; Knyazev et
al., ICLR 2025, "Accelerating Training with Neuron Interaction and Nowcasting Networks"; MetaMerge
blog, bknyaz.github.io, 2026-02-19). **Opt-in, approximate and seeded**: see "Randomness" below.

The checkpoint is read by ``checkpoint.load_nino_gnn``, the graph built by ``graph.py``, its node
encoding comes from ``eigenvectors.py``. Here:

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
* ``metamerge_graph``: MetaMerge (§4.1–§4.5) of every tensor of one graph: context, per-tensor
  normalisation, horizons chained through slot 0, de-normalisation and the average.

Randomness. The published setting samples, per round, a random 20 % of the edges whose messages are
aggregated (edge updates use all edges). ``edge_sample_ratio`` = 0 (default) or ≥ 1 uses every edge:
deterministic given the eigenvectors. A ratio in (0, 1) draws exactly round(ratio · E) edges per round
without replacement from a ``torch.Generator`` the caller seeds (the strategy seeds it from the step
seed, so a replay is bit-identical). Nodes that receive no sampled message aggregate 0 (mean over
an empty set; the node count is the scatter size, not the largest index + 1 as in the reference).
Results are "approximate, stochastic" whenever sampling is on or the eigenvectors are not pinned.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mergewatch.nino.context import CONTEXT, HORIZONS, N_TYPE_IDS, MetaMergeError, context_order, moments
from mergewatch.nino.eigenvectors import N_LPE
from mergewatch.nino.graph import SLOTS, NeuralGraph, resize_conv
from mergewatch.nino.workers import chunk_pool

DEFAULT_CHUNK_EDGES = 32768
#: Edge states are stored between the passes up to this size (a ViT-B/16 block: 3.6 GB), else recomputed.
DEFAULT_STORE_EDGES_BYTES = 6 << 30


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
        pool = chunk_pool(threads)
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


# MetaMerge over one graph -----------------------------------------------------------------------------

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
        stats = [moments(x[t.offset:t.offset + t.numel]) for t in graph.tensors]
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
