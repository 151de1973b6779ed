"""MetaMerge (NiNo-MLP): the streaming strategy vs a straightforward whole-model implementation.

Model: an open_clip architecture (default ViT-B-16, full CLIP) with seeded random init from
open_clip's bundled config, experts = base + seeded N(0, 0.01²) noise (``bench/common.py``; no
download, nothing pretrained). Checkpoint: ``nino_mlp.pt`` from ``../shared/nino/checkpoints/``.

* ``ours``      ``run_step`` of the ``metamerge`` strategy for step t = T (a fresh merge of θ0 with
                E1..ET): the daemon's engine reads the safetensors lazily, tensor by tensor, runs
                horizons 1..5 per tensor in chunks of 8192 scalars (folded first layer, oneDNN fused
                linear + SiLU where available) and writes the deploy view.
* ``straight``  the same math written the straightforward way on whole state dicts:
                ``safetensors.torch.load_file`` of every input, then per horizon k = 1..5 one pass over
                the whole visual tower in which each tensor's n × 5 context goes through §4.4 literally
                (``F.linear`` + ``F.silu`` on all n rows at once, all 40 head outputs, the type
                embedding gathered per element), the predictions of horizon k replacing slot 0 for
                horizon k + 1 (the reference's overwrite), then the average, the plain mean for conv1
                and the text tower, and ``save_file`` (+ fsync).

Each runs in a fresh interpreter; memory is the peak above that process's idle baseline after
imports (and, for ours, after loading the 230 KB NiNo checkpoint). Goals (issue 7): ours' peak RSS
above baseline <= 2 GB, and >= 4x faster than the straightforward version in the same run. The two
outputs are compared (max abs difference; the chained horizons amplify float32 rounding, so expect
~1e-6, not 0).

    python bench/metamerge.py                    # ViT-B-16, 2 experts (about 15 min on 2 cores)
    python bench/metamerge.py --quick            # ViT-S-16 (about 4x less work)
    python bench/metamerge.py --model ViT-B-16 --experts 4
    python bench/metamerge.py --variant gnn --blocks 1 --horizons 1   # NiNo-GNN per-block cost
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import OUT_DIR, REPO, ModelSpec, ensure_checkpoints, fmt_bytes, fmt_table, run_worker, warm  # noqa: E402
from mergewatch.checkpoint.writer import fsync_path  # noqa: E402

GiB = 1 << 30
DEFAULT_CKPT = REPO.parent / "shared" / "nino" / "checkpoints" / "nino_mlp.pt"
UPD_SCALE = 2.5
HORIZONS = (1, 2, 3, 4, 5)
GOAL_RSS = 2 * GiB
GOAL_SPEEDUP = 4.0


# Workers (fresh interpreters via common.run_worker) ---------------------------------------------
def worker_ours(args: dict, meter) -> dict:
    from mergewatch.checkpoint.reader import LazyCheckpoint
    from mergewatch.checkpoint.roles import resolve_table
    from mergewatch.engine import build_model_info, run_step
    from mergewatch.strategies.base import StepContext
    from mergewatch.strategies.metamerge import MetaMerge

    out = Path(args["out"])
    shutil.rmtree(out, ignore_errors=True)
    base = LazyCheckpoint(args["base"])
    experts = [LazyCheckpoint(p) for p in args["experts"]]
    info = build_model_info(base, resolve_table("auto", list(base)))
    strategy = MetaMerge({"checkpoint": args["checkpoint"], "upd_scale": UPD_SCALE})
    ctx = StepContext(t=len(experts), seed=0, expert_ids=[f"e{i}" for i in range(len(experts))], model=info, meta={})
    meter.baseline()
    with meter.phase("step"):
        out.mkdir(parents=True)
        res = run_step(strategy, ctx, base, experts, {}, out)
    return {"engine_seconds": res.seconds, "deploy": str(out / "views" / "deploy"), "table": info.table,
            "policy": strategy.describe()}


def _type_index(name: str, shape):
    """Per-element NiNo type id (METAMERGE §4.3), written out independently of mergewatch."""
    import torch

    n = 1
    for s in shape:
        n *= s
    nd = len(shape)
    if nd == 1 and name.endswith(".weight"):
        return torch.full((n,), 4, dtype=torch.long)
    if name.endswith("class_embedding"):
        return torch.full((n,), 5, dtype=torch.long)
    if name.endswith("positional_embedding"):
        return torch.full((n,), 6, dtype=torch.long)
    if name.endswith("in_proj_weight"):
        return torch.arange(7, 10).repeat_interleave(n // 3)
    if nd == 4:
        return torch.full((n,), 3, dtype=torch.long)
    if nd == 2 and "embed" not in name:
        return torch.full((n,), 1, dtype=torch.long)
    return torch.full((n,), 2, dtype=torch.long)


def worker_straight(args: dict, meter) -> dict:
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file, save_file

    ck = torch.load(args["checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    A, a, L = ck["edge_proj.fc.0.weight"], ck["edge_proj.fc.0.bias"], ck["layer_embed.weight"]
    layers = [(ck[f"edge_mlp.fc.{i}.weight"], ck[f"edge_mlp.fc.{i}.bias"]) for i in (0, 2, 4)]
    C, c = ck["edge_mlp.fc.6.weight"], ck["edge_mlp.fc.6.bias"]
    out_dir = Path(args["out"])
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    T = len(args["experts"])
    order = {2: (0, 1, 1, 0), 3: (0, 1, 1, 2), 4: (0, 1, 2, 3)}[T]
    meter.baseline()
    times = {}
    with meter.phase("step"):
        t = time.perf_counter()
        base = load_file(args["base"])
        experts = [load_file(p) for p in args["experts"]]
        times["load"] = time.perf_counter() - t
        t = time.perf_counter()
        mset = [k for k in base if k.startswith("visual.") and k != "visual.conv1.weight"]
        slot0 = {k: base[k].float() for k in mset}
        total = {k: torch.zeros_like(v) for k, v in slot0.items()}
        for k in HORIZONS:
            new = {}
            for name in mset:
                cols = [slot0[name].reshape(-1)] + [experts[i][name].float().reshape(-1) for i in order]
                X = torch.stack(cols, dim=1)
                mu, sd = X.mean(), X.std()
                Z = (X - mu) / (sd + 1e-6)
                h = F.linear(Z, A, a) + L[_type_index(name, base[name].shape)]
                for w, b in layers:
                    h = F.silu(F.linear(h, w, b))
                delta = F.linear(h, C, c)[:, k - 1]
                new[name] = ((Z[:, 4] + UPD_SCALE * delta) * sd + mu).view(base[name].shape)
            for name in mset:
                total[name] += new[name]
            slot0 = new
        merged = {}
        for name, v in base.items():
            if name in total:
                merged[name] = (total[name] / len(HORIZONS)).to(v.dtype)
            elif v.dtype.is_floating_point:
                acc = experts[0][name].float().clone()
                for e in experts[1:]:
                    acc += e[name].float()
                merged[name] = (acc / T).to(v.dtype)
            else:
                merged[name] = v
        times["compute"] = time.perf_counter() - t
        t = time.perf_counter()
        p = out_dir / "model.safetensors"
        save_file(merged, str(p))
        fsync_path(p)
        fsync_path(out_dir)
        times["save"] = time.perf_counter() - t
    return {"times": times, "deploy": str(p)}


# NiNo-GNN per-block cost (--variant gnn) -------------------------------------------------------------
GNN_CKPT = REPO.parent / "shared" / "nino" / "checkpoints" / "nino_no_posw.pt"


def vit_visual_shapes(width=768, layers=12, tokens=197, patch=16, out_dim=512, mlp=3072) -> dict:
    """Shapes of an open_clip ViT visual tower (defaults: ViT-B/16)."""
    shapes = {"visual.class_embedding": (width,), "visual.positional_embedding": (tokens, width), "visual.proj": (width, out_dim),
              "visual.conv1.weight": (width, 3, patch, patch), "visual.ln_pre.weight": (width,), "visual.ln_pre.bias": (width,),
              "visual.ln_post.weight": (width,), "visual.ln_post.bias": (width,)}
    for b in range(layers):
        p = f"visual.transformer.resblocks.{b}."
        shapes.update({p + "ln_1.weight": (width,), p + "ln_1.bias": (width,), p + "attn.in_proj_weight": (3 * width, width),
                       p + "attn.in_proj_bias": (3 * width,), p + "attn.out_proj.weight": (width, width), p + "attn.out_proj.bias": (width,),
                       p + "ln_2.weight": (width,), p + "ln_2.bias": (width,), p + "mlp.c_fc.weight": (mlp, width), p + "mlp.c_fc.bias": (mlp,),
                       p + "mlp.c_proj.weight": (width, mlp), p + "mlp.c_proj.bias": (width,)})
    return shapes


def worker_gnn_blocks(args: dict, meter) -> dict:
    """Per-block NiNo-GNN on a ViT-B/16-shaped visual tower (seeded random weights: cost only).
    Runs the first ``blocks`` block graphs (block 0 carries the stem), ``horizons`` horizons each,
    through ``metamerge_graph`` exactly as the strategy does (eigenvectors computed, not cached)."""
    import torch

    from mergewatch.nino.checkpoint import load_nino_gnn
    from mergewatch.nino.eigenvectors import laplacian_pe
    from mergewatch.nino.graph import vit_graphs, vit_spec

    shapes = vit_visual_shapes()
    spec = vit_spec(shapes)
    net = load_nino_gnn(args["checkpoint"])
    g = torch.Generator().manual_seed(0)
    meter.baseline()
    out = {"graphs": []}
    with meter.phase("step"):
        for graph in vit_graphs(spec, 12, subgraph=True)[: args["blocks"]]:
            names = [t.name for t in graph.tensors]
            base = {n: torch.randn(shapes[n], generator=g) * 0.02 for n in names}
            experts = [{n: v + torch.randn(v.shape, generator=g) * 0.01 for n, v in base.items()} for _ in range(args["experts"])]
            t0 = time.perf_counter()
            lpe = laplacian_pe(graph)
            t1 = time.perf_counter()
            from mergewatch.nino.gnn import metamerge_graph

            res = metamerge_graph(net, graph, base, experts, lpe, horizons=tuple(range(1, args["horizons"] + 1)))
            t2 = time.perf_counter()
            assert all(bool(torch.isfinite(v).all()) for v in res.values())
            out["graphs"].append({"name": graph.name, "nodes": graph.num_nodes, "edges": graph.num_edges, "params": graph.n_params,
                                  "lpe_seconds": t1 - t0, "merge_seconds": t2 - t1})
            del base, experts, res, lpe, graph
    return out


def main_gnn(ns) -> int:
    if not ns.checkpoint.is_file():
        print(f"NiNo-GNN checkpoint not found: {ns.checkpoint}", file=sys.stderr)
        return 2
    r = run_worker("metamerge:worker_gnn_blocks", {"checkpoint": str(ns.checkpoint), "blocks": ns.blocks, "horizons": ns.horizons,
                                                   "experts": ns.experts}, interval=ns.interval)
    ph = r["phases"]["step"]
    rows = [[g["name"], f"{g['nodes']:,}", f"{g['edges']:,}", f"{g['lpe_seconds']:.1f}", f"{g['merge_seconds']:.1f}",
             f"{g['merge_seconds'] / ns.horizons:.1f}"] for g in r["result"]["graphs"]]
    print(fmt_table(["graph", "nodes", "edges", "lpe s", "merge s", "s/horizon"], rows, "lrrrrr"))
    print(f"total wall {ph['seconds']:.1f} s, cpu {ph['cpu_seconds']:.1f} s, peak RSS above baseline {fmt_bytes(ph['peak_rss'])}, "
          f"peak private {fmt_bytes(ph['peak_private'])}")
    per_h = sum(g["merge_seconds"] for g in r["result"]["graphs"]) / ns.horizons / len(rows)
    lpe = sum(g["lpe_seconds"] for g in r["result"]["graphs"]) / len(rows)
    print(f"extrapolated whole per-block MetaMerge (12 blocks x 5 horizons): {12 * (5 * per_h + lpe) / 60:.0f} min")
    if ns.json:
        ns.json.write_text(json.dumps(r, indent=1, default=str))
    return 0


# Comparison --------------------------------------------------------------------------------------
def compare(a: Path, b: Path) -> dict:
    from mergewatch.checkpoint.reader import LazyCheckpoint

    ca, cb = LazyCheckpoint(a), LazyCheckpoint(b)
    if set(ca) != set(cb):
        raise AssertionError(f"{a} and {b} hold different tensor names")
    worst = {"meta-merged": 0.0, "averaged": 0.0}
    for k in ca:
        x, y = ca[k], cb[k]
        if x.shape != y.shape or x.dtype != y.dtype:
            raise AssertionError(f"{k}: {tuple(x.shape)} {x.dtype} vs {tuple(y.shape)} {y.dtype}")
        if x.numel() and x.dtype.is_floating_point:
            g = "meta-merged" if k.startswith("visual.") and k != "visual.conv1.weight" else "averaged"
            worst[g] = max(worst[g], float((x.double() - y.double()).abs().max()))
    return worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="open_clip config name (default ViT-B-16; ':visual' for the vision tower)")
    ap.add_argument("--quick", action="store_true", help="ViT-S-16 instead of ViT-B-16")
    ap.add_argument("--experts", type=int, default=2, choices=(2, 3, 4))
    ap.add_argument("--checkpoint", type=Path, default=DEFAULT_CKPT)
    ap.add_argument("--no-straight", action="store_true", help="skip the straightforward version")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--interval", type=float, default=0.01, help="memory sampling interval (s)")
    ap.add_argument("--keep", action="store_true", help="keep outputs under bench/out/runs/")
    ap.add_argument("--json", type=Path, help="also write all measurements to this file")
    ap.add_argument("--variant", choices=("mlp", "gnn"), default="mlp",
                    help="gnn: per-block NiNo-GNN cost on a ViT-B/16-shaped visual tower (random weights)")
    ap.add_argument("--blocks", type=int, default=1, help="gnn: block graphs to run (block 0 carries the stem)")
    ap.add_argument("--horizons", type=int, default=5, choices=(1, 2, 3, 4, 5), help="gnn: horizons per block (cost only)")
    ns = ap.parse_args(argv)
    if ns.variant == "gnn":
        if ns.checkpoint == DEFAULT_CKPT:
            ns.checkpoint = GNN_CKPT
        return main_gnn(ns)
    if not ns.checkpoint.is_file():
        print(f"NiNo checkpoint not found: {ns.checkpoint} (give --checkpoint; it is never downloaded)", file=sys.stderr)
        return 2
    spec = ModelSpec.parse(ns.model or ("ViT-S-16" if ns.quick else "ViT-B-16"))
    print(f"== {spec.label}, {ns.experts} experts: preparing checkpoints", flush=True)
    ck = ensure_checkpoints(spec, ns.experts, seed=ns.seed)
    stats = ck["stats"]
    base, experts = ck["base"], ck["experts"][: ns.experts]
    work = OUT_DIR / "runs" / f"metamerge-{spec.key}"
    common = {"base": str(base), "experts": [str(e) for e in experts], "checkpoint": str(ns.checkpoint)}
    warm([base, *experts])
    ours = run_worker("metamerge:worker_ours", {**common, "out": str(work / "ours")}, interval=ns.interval)
    po = ours["phases"]["step"]
    print(f"  ours: {po['seconds']:.1f} s", flush=True)
    straight = None
    if not ns.no_straight:
        warm([base, *experts])
        straight = run_worker("metamerge:worker_straight", {**common, "out": str(work / "straight")}, interval=ns.interval)
        print(f"  straight: {straight['phases']['step']['seconds']:.1f} s", flush=True)
    diff = compare(Path(ours["result"]["deploy"]), Path(straight["result"]["deploy"])) if straight else None

    print("\n" + "=" * 100)
    print(f"Model {spec.label}: {stats['n_tensors']} tensors, {stats['params'] / 1e6:.1f} M params, {fmt_bytes(stats['nbytes'])} "
          f"float32, largest {stats['largest_name']} ({fmt_bytes(stats['largest_bytes'])}); role table {ours['result']['table']}; "
          f"NiNo {ns.checkpoint.name} sha256 {ours['result']['policy']['checkpoint_sha256'][:16]}...")
    rows = [["ours (streaming run_step)", f"{po['seconds']:.1f}", f"{po['cpu_seconds']:.1f}", fmt_bytes(po["peak_rss"]),
             fmt_bytes(po["peak_private"]), ""]]
    if straight:
        ps = straight["phases"]["step"]
        t = straight["result"]["times"]
        rows.append(["straightforward (whole model)", f"{ps['seconds']:.1f}", f"{ps['cpu_seconds']:.1f}", fmt_bytes(ps["peak_rss"]),
                     fmt_bytes(ps["peak_private"]), f"load {t['load']:.1f} s, compute {t['compute']:.1f} s, save {t['save']:.1f} s"])
    print(fmt_table(["case", "wall s", "cpu s", "peak RSS", "peak private", "notes"], rows, "lrrrrl"))
    print(f"\nRATIOS (goals: ours peak RSS above baseline <= {fmt_bytes(GOAL_RSS)}; straight/ours wall >= {GOAL_SPEEDUP:.0f}x)")
    print(f"  ours_peak_rss / 2 GiB           = {po['peak_rss'] / GOAL_RSS:.3f}   ({'ok' if po['peak_rss'] <= GOAL_RSS else 'MISSED'})")
    if straight:
        ps = straight["phases"]["step"]
        sp = ps["seconds"] / po["seconds"]
        print(f"  straight_wall / ours_wall       = {sp:.2f}x  ({'ok' if sp >= GOAL_SPEEDUP else 'MISSED'})")
        print(f"  straight_cpu / ours_cpu         = {ps['cpu_seconds'] / max(po['cpu_seconds'], 1e-9):.2f}x")
        print(f"  straight_peak_rss / ours_peak   = {ps['peak_rss'] / max(po['peak_rss'], 1):.1f}x")
        print(f"  max |ours - straight|           = meta-merged {diff['meta-merged']:.3g}, averaged {diff['averaged']:.3g}")
    if ns.json:
        ns.json.write_text(json.dumps({"spec": spec.label, "stats": stats, "ours": ours, "straight": straight, "diff": diff},
                                      indent=1, default=str))
    if not ns.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
