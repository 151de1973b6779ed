"""Data-free continual merging (SPEC §3.1–3.3): per-step time and peak memory of OPCM, NuFILT and WUDI,
ours (the streaming Workspace) vs a straightforward whole-model implementation of the same formulas.

Checkpoints: ViT-B/32-shaped open_clip vision towers (random init from open_clip's bundled config;
``--blocks`` residual blocks of the 12, every tensor keeps its ViT-B/32 shape, so per-tensor costs and
the largest tensor are the real ones) and 3 experts = base + seeded low-rank task vectors
(``common.LowRankRecipe``: rank 4–16 per linear block with decaying singular values and a tiny dense
tail; small noise on every other tensor). Cached under ``bench/out/models/``.

Per case (each in a fresh interpreter, inputs warm in the page cache):

* ``ours``   a Workspace with ``deploy = opcm | nufilt | wudi``; expert 1 merged beforehand (not
             measured), then expert 2: validate, claim (copy into the store) and step (run_step +
             commit + publish + retention) as separate phases. Case ``opcm`` first runs
             ``Workspace.prepare()`` (phase "prepare": the SVDs of S_1 computed ahead, as the daemon
             does while idle after publishing step 1), so its step is the arrival → deploy latency;
             ``opcm-inline`` skips it (the batch CLI: the SVDs inside the step). Likewise NuFILT
             (Δ's subspaces ahead) and ``nufilt-full-inline``.
* ``naive``  written here, independently of mergewatch's strategy code: ``safetensors.torch.load_file``
             of base, expert 1 and expert 2, the SPEC formulas on whole state dicts (steps 1 and 2),
             full SVDs (``torch.linalg.svd(full_matrices=True)``, float64), one Adam optimiser over the
             whole model for NuFILT and WUDI, NuFILT's literal loss with the explicit d_in × d_in
             projector P, ``save_file`` of the deploy view and the state (+ fsync).

Both use the same hyper-parameters (written out below and passed to both), the same number of Adam
steps, the same numerical-rank and zero-Δ rules, and NuFILT's LoRA init A drawn from the same seeded
generator (SPEC §0: seed, expert content hash, tensor name), so the results must agree to float
rounding: max |ours − naive| and ‖ours − naive‖_F / ‖naive − θ0‖_F (relative to the merged task
vector) over the deploy view, checked against per-method tolerances (``TOL``).

Peak memory = private (anonymous) memory above the worker's idle baseline after imports (DESIGN §4);
RSS beside it. Bound (the foundation issue): 6 × largest tensor + 64 MiB.

    python bench/dfcmm.py            # full run: the whole ViT-B/32 tower (12 blocks) for OPCM/NuFILT,
                                     # 1 block for WUDI (the naive's autograd Adam costs ~50 CPU s per block)
    python bench/dfcmm.py --quick    # 1 block, no WUDI-Adam (< 3 min)
    python bench/dfcmm.py --methods opcm nufilt-full --blocks 4 --threads 2

Every worker runs torch with ``--threads`` threads (default 1: on a shared, oversubscribed machine
two MKL threads per process made float64 SVDs up to 10x slower and the timings meaningless); CPU
seconds are printed beside wall seconds.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import json
import pstats
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    bound_bytes,
    workspace_settings,
    MiB,
    OUT_DIR,
    ModelSpec,
    ensure_lowrank_checkpoints,
    files_under,
    fmt_bytes,
    fmt_table,
    linear_blocks,
    run_worker,
    warm,
)
from mergewatch.checkpoint.writer import fsync_path  # noqa: E402

ARCH = ModelSpec("ViT-B-32", "visual")
SEED = 0  # the config seed (SPEC §0) of ours; naive derives NuFILT's LoRA init from it the same way

# Hyper-parameters: the SPEC defaults, written out and passed explicitly to both implementations.
OPCM = {"alpha": 0.5}
NUFILT = {"r_p": 128, "r_l": 64, "r_v": 8, "lr": 1e-3, "steps": 50, "betas": [0.9, 0.999], "lora_std": 0.02}
WUDI = {"lr": 1e-5, "steps": 50, "rcond": 1e-5}
ADAM_EPS = 1e-8
NUFILT_SELECT = ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight")  # SPEC §3.2 default

#: case -> (policy for ours, naive implementation, naive args, model group)
CASES = {
    "opcm": ({"deploy": "opcm", **OPCM}, "opcm", OPCM, "main"),
    "opcm-inline": ({"deploy": "opcm", **OPCM}, "opcm", OPCM, "main"),  # no prepare: the SVDs inside the step (batch CLI)
    "nufilt-full": ({"deploy": "nufilt", "svd": "full", **NUFILT}, "nufilt", NUFILT, "main"),
    "nufilt-rand": ({"deploy": "nufilt", "svd": "randomized", **NUFILT}, "nufilt", NUFILT, "main"),
    "nufilt-full-inline": ({"deploy": "nufilt", "svd": "full", **NUFILT}, "nufilt", NUFILT, "main"),  # no prepare
    "wudi-adam": ({"deploy": "wudi", "solver": "adam", **WUDI}, "wudi-adam", WUDI, "wudi"),
    "wudi-exact": ({"deploy": "wudi", "solver": "exact", **WUDI}, "wudi-exact", WUDI, "wudi"),
}
#: tolerance on ‖ours − naive‖_F / ‖naive − θ0‖_F (deploy view). OPCM and WUDI-Adam differ only by
#: float rounding (SVD variant, matmul association); NuFILT also by the literal vs reassociated loss
#: through 50 Adam steps; WUDI-exact by its float32 sufficient statistics (stored between steps).
TOL = {"opcm": 1e-5, "opcm-inline": 1e-5, "nufilt-full": 1e-4, "nufilt-full-inline": 1e-4, "nufilt-rand": 1e-4, "wudi-adam": 1e-5, "wudi-exact": 1e-3}
#: cases whose step finds nothing prepared ahead (what the batch CLI does)
NO_PREPARE = {"opcm-inline", "nufilt-full-inline"}
GOAL_SPEEDUP = {"opcm": 3.0, "nufilt-full": 3.0, "nufilt-rand": 3.0}


# Ours ------------------------------------------------------------------------------------------
def _threads(args: dict) -> None:
    """Set the torch thread count, and pay torch.optim's one-time lazy import before the baseline:
    the first optimizer imports torch._dynamo (sympy, ~900 modules, ~76 MiB of private memory),
    a cost of the process, not of a merge step (a daemon pays it once)."""
    import torch

    if args.get("threads"):
        torch.set_num_threads(int(args["threads"]))
    p = torch.zeros(1, requires_grad=True)
    torch.optim.Adam([p], lr=1e-3, foreach=False)


def worker_setup(args: dict, meter) -> dict:
    """Fresh workspace with expert 1 merged (step 1, not measured)."""
    from mergewatch.workspace import Workspace

    _threads(args)
    shutil.rmtree(args["workspace"], ignore_errors=True)
    ws = Workspace(workspace_settings(args, SEED))
    t = time.perf_counter()
    out = ws.merge(args["expert"], name="expert-1")
    return {"seconds": time.perf_counter() - t, "status": out.status, "expert_id": out.expert_id}


def worker_ours(args: dict, meter) -> dict:
    """Expert 2 through validate -> claim -> step, each a measured phase (optionally under cProfile)."""
    from mergewatch.workspace import Workspace

    _threads(args)
    ws = Workspace(workspace_settings(args, SEED))
    meter.baseline()
    if args.get("prepare", True) and ws.prepare_due():  # OPCM: the SVDs of S_1, done ahead by the daemon while it waits for expert 2
        with meter.phase("prepare"):
            ws.prepare()
    with meter.phase("validate"):
        _, report = ws.validate(args["expert"])
    with meter.phase("claim"):
        ws.store.claim(args["expert"], report.content_sha256)
    prof = cProfile.Profile() if args.get("profile") else None
    with meter.phase("step"):
        if prof:
            prof.enable()
        out = ws.step(report.content_sha256, "expert-2")
        if prof:
            prof.disable()
    snap = ws.states.load(out.step)
    res = {
        "prepared": out.prepared,
        "engine_seconds": snap.record["seconds"],
        "deploy": str(snap.directory / "views" / "deploy" / "model.safetensors"),
        "expert_ids": snap.expert_ids,
        "meta": snap.meta,
    }
    if prof:
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(args.get("profile_top", 14))
        res["profile"] = s.getvalue()
    return res


# Naive: whole state dicts, the SPEC formulas written out directly -------------------------------
def _save(out_dir: Path, tensors: dict[str, dict]) -> dict:
    from safetensors.torch import save_file

    paths = {}
    for name, d in tensors.items():
        p = out_dir / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in d.items()}, str(p))
        fsync_path(p)
        paths[name] = str(p)
    fsync_path(out_dir)
    return paths


def _sqnorm(d: dict) -> float:
    return float(sum(float((v.double() ** 2).sum()) for v in d.values()))


def naive_opcm_project(tau, delta, alpha: float):
    """τ̃ = τ − U R Vᵀ with the full SVD of Δ (U m × m, V n × n), Q = Uᵀ τ V (m × n) and R = Q masked
    to its diagonal and its top-left r × r block (SPEC §3.1); zero Δ: τ unchanged."""
    import torch

    d = delta.double()
    if not bool(d.any()):
        return tau
    u, s, vh = torch.linalg.svd(d, full_matrices=True)
    c = torch.cumsum(s, 0) / s.sum()
    r = int((c <= alpha).sum())
    t = tau.double()
    q = u.T @ t @ vh.T
    mask = torch.zeros_like(q, dtype=torch.bool)
    idx = torch.arange(s.numel())
    mask[idx, idx] = True
    mask[:r, :r] = True
    return (t - u @ (q * mask) @ vh).float()


def naive_opcm(base: dict, experts: list[dict], alpha: float) -> tuple[dict, dict, float]:
    """θ^m_t after all ``experts`` (t = 1: S = τ_1, λ = 1), whole-model: returns (deploy, S, λ)."""
    import torch

    keys = [k for k, v in base.items() if v.dtype.is_floating_point]
    s_cur, lam, sum_norms = None, 1.0, 0.0
    for t, e in enumerate(experts, 1):
        tau = {k: e[k].float() - base[k].float() for k in keys}
        sum_norms += _sqnorm(tau) ** 0.5
        if s_cur is None:
            s_cur = tau
            continue
        s_new = {}
        for k in keys:
            nb = linear_blocks(k, tuple(tau[k].shape))
            if nb:
                upd = torch.cat([naive_opcm_project(tb, db, alpha) for tb, db in zip(tau[k].chunk(nb), s_cur[k].chunk(nb))])
            else:
                upd = tau[k]
            s_new[k] = s_cur[k] + upd
        s_cur = s_new
        s_norm, mean = _sqnorm(s_cur) ** 0.5, sum_norms / t
        lam = s_norm / mean if s_norm > 0 and mean > 0 else 1.0
    deploy = {k: (base[k].float() + s_cur[k] / lam).to(base[k].dtype) if k in s_cur else base[k] for k in base}
    if len(experts) == 1:
        deploy = {k: experts[0][k] for k in base}
    return deploy, s_cur, lam


def derive_seed(*parts) -> int:
    """SPEC §0's seed of a random draw: sha256 of (config seed, expert content hash, name, purpose)."""
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def naive_right_sv(x, k: int):
    """First k right singular vectors (float64, n × r) from the full SVD; numerically-zero singular
    values (σ ≤ σ_1 · max(m, n) · ε_float32) dropped, a zero matrix gives none (SPEC §3.2 choices)."""
    import torch

    x64 = x.double()
    m, n = x64.shape
    k = min(k, m, n)
    if k <= 0 or not bool(x64.any()):
        return x64.new_zeros((n, 0))
    _, s, vh = torch.linalg.svd(x64, full_matrices=True)
    tol = float(s[0]) * max(m, n) * torch.finfo(torch.float32).eps
    r = min(k, int((s > tol).sum()))
    return vh[:r].T


def naive_nufilt(base: dict, experts: list[dict], expert_ids: list[str], prm: dict) -> dict:
    """NuFILT (SPEC §3.2, others = base) over ``experts``: one Adam over every selected layer's
    (B, A), the literal loss ‖τV1 − (Δ + τ(P + BA))V1‖² + ‖ΔU − (Δ + τ(P + BA))U‖² with P = I − UUᵀ.
    Returns the deploy view (= the merged model)."""
    import torch

    sel = [k for k in base if k.endswith(NUFILT_SELECT) and base[k].dim() == 2]
    merged = {k: experts[0][k].float().clone() for k in sel}  # t = 1: θ_1 on the selected layers
    for t in range(2, len(experts) + 1):
        e, eid = experts[t - 1], expert_ids[t - 1]
        layers = []
        for k in sel:
            tau = e[k].float() - base[k].float()
            delta = merged[k] - base[k].float()
            nb = linear_blocks(k, tuple(tau.shape))
            for j, (tj, dj) in enumerate(zip(tau.chunk(nb), delta.chunk(nb))):
                u = naive_right_sv(dj, prm["r_p"]).float()
                v1 = naive_right_sv(tj, prm["r_v"]).float()
                p = torch.eye(tj.shape[1]) - u @ u.T
                g = torch.Generator().manual_seed(derive_seed(SEED, eid, f"{k}#{j}", "nufilt-lora"))
                a = (torch.randn((prm["r_l"], tj.shape[1]), generator=g, dtype=torch.float32) * prm["lora_std"]).requires_grad_(True)
                b = torch.zeros((tj.shape[1], prm["r_l"]), requires_grad=True)
                layers.append((k, tj, dj, u, v1, p, b, a))
        opt = torch.optim.Adam([x for L in layers for x in L[6:]], lr=prm["lr"], betas=tuple(prm["betas"]), eps=ADAM_EPS)
        for _ in range(prm["steps"]):
            opt.zero_grad()
            loss = 0.0
            for _, tj, dj, u, v1, p, b, a in layers:
                m = dj + tj @ (p + b @ a)
                loss = loss + ((tj @ v1 - m @ v1) ** 2).sum() + ((dj @ u - m @ u) ** 2).sum()
            loss.backward()
            opt.step()
        with torch.no_grad():
            upd: dict[str, list] = {}
            for k, tj, dj, u, v1, p, b, a in layers:
                upd.setdefault(k, []).append(tj @ (p + b @ a))
            for k in sel:
                merged[k] = merged[k] + torch.cat(upd[k])
    return {k: merged[k].to(base[k].dtype) if k in merged else base[k] for k in base}


def _wudi_terms(x, taus):
    total = 0.0
    for tau in taus:
        n2 = (tau * tau).sum()
        if float(n2) > 0:
            total = total + (((x - tau) @ tau.T) ** 2).sum() / n2
    return total


def naive_wudi(base: dict, experts: list[dict], prm: dict, solver: str) -> tuple[dict, dict]:
    """WUDI (SPEC §3.3) over ``experts``. ``adam``: the paired continual form, one Adam over every
    linear block of the model, 50 steps from M_{t−1} + τ_t, others (M_{t−1} + τ_t)/2. ``exact``:
    τ_m = (Σ τ_i G_i)(Σ G_i)⁺ over all experts (pinv, rtol = rcond), others the mean τ."""
    import torch

    keys = [k for k, v in base.items() if v.dtype.is_floating_point]
    taus = [{k: e[k].float() - base[k].float() for k in keys} for e in experts]
    if solver == "exact":
        m = {}
        for k in keys:
            nb = linear_blocks(k, tuple(base[k].shape))
            if not nb:
                m[k] = sum(tt[k] for tt in taus) / len(taus)
                continue
            out = []
            for blocks in zip(*(tt[k].chunk(nb) for tt in taus)):
                a = b = 0.0
                for tj in blocks:
                    t64 = tj.double()
                    n2 = float((t64 * t64).sum())
                    if n2 > 0:
                        g = t64.T @ t64 / n2
                        a, b = a + g, b + t64 @ g
                out.append(b @ torch.linalg.pinv(a, rtol=prm["rcond"], hermitian=True))
            m[k] = torch.cat(out).float()
    else:
        m = taus[0]
        for tau in taus[1:]:
            blocks = []
            for k in keys:
                nb = linear_blocks(k, tuple(base[k].shape))
                if nb:
                    for pm, pt in zip(m[k].chunk(nb), tau[k].chunk(nb)):
                        blocks.append((k, pm, pt, (pm + pt).clone().requires_grad_(True)))
            opt = torch.optim.Adam([x for *_, x in blocks], lr=prm["lr"], betas=(0.9, 0.999), eps=ADAM_EPS)
            for _ in range(prm["steps"]):
                opt.zero_grad()
                loss = 0.0
                for _, pm, pt, x in blocks:
                    loss = loss + _wudi_terms(x, (pm, pt))
                loss.backward()
                opt.step()
            new = {k: (m[k] + tau[k]) / 2 for k in keys if not linear_blocks(k, tuple(base[k].shape))}
            parts: dict[str, list] = {}
            for k, _, _, x in blocks:
                parts.setdefault(k, []).append(x.detach())
            new.update({k: torch.cat(v) for k, v in parts.items()})
            m = new
    deploy = {k: (base[k].float() + m[k]).to(base[k].dtype) if k in m else base[k] for k in base}
    return deploy, m


def worker_naive(args: dict, meter) -> dict:
    """Whole-model step: load every input, compute steps 1..t, save deploy + state (+ fsync)."""
    from safetensors.torch import load_file

    out_dir = Path(args["out"])
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    kind, prm = args["kind"], args["params"]
    _threads(args)
    meter.baseline()
    times, extra = {}, {}
    with meter.phase("naive"):
        t = time.perf_counter()
        base = load_file(args["base"])
        experts = [load_file(p) for p in args["experts"]]
        times["load"] = time.perf_counter() - t
        t = time.perf_counter()
        if kind == "opcm":
            deploy, state, lam = naive_opcm(base, experts, prm["alpha"])
            extra["lambda"] = lam
        elif kind == "nufilt":
            deploy = naive_nufilt(base, experts, args["expert_ids"], prm)
            state = {k: v for k, v in deploy.items() if k.endswith(NUFILT_SELECT)}
        else:
            deploy, state = naive_wudi(base, experts, prm, kind.split("-")[1])
        times["compute"] = time.perf_counter() - t
        t = time.perf_counter()
        paths = _save(out_dir, {"deploy": deploy, "state": state})
        times["save"] = time.perf_counter() - t
    return {"times": times, "outputs": paths, **extra}


# Comparison ------------------------------------------------------------------------------------
def compare(ours: Path, naive: Path, base: Path) -> dict:
    """max |ours − naive|, ‖ours − naive‖_F / ‖naive − θ0‖_F and the worst tensor (deploy views)."""
    from mergewatch.checkpoint.reader import LazyCheckpoint

    co, cn, cb = LazyCheckpoint(ours), LazyCheckpoint(naive), LazyCheckpoint(base)
    if set(co) != set(cn):
        raise AssertionError(f"{ours} and {naive} hold different tensor names")
    worst, worst_name, diff2, tv2 = 0.0, "", 0.0, 0.0
    for k in co:
        x, y, b = co[k].double(), cn[k].double(), cb[k].double()
        if x.shape != y.shape:
            raise AssertionError(f"{k}: {tuple(x.shape)} vs {tuple(y.shape)}")
        d = (x - y).abs()
        if d.numel() and float(d.max()) > worst:
            worst, worst_name = float(d.max()), k
        diff2 += float((d * d).sum())
        tv2 += float(((y - b) ** 2).sum())
    return {"max_abs": worst, "worst": worst_name, "rel": (diff2 / tv2) ** 0.5 if tv2 > 0 else float(diff2 > 0)}


# Orchestration ---------------------------------------------------------------------------------
def run(ns) -> dict:
    groups = {"main": {"layers": ns.blocks}, "wudi": {"layers": ns.wudi_blocks}}
    models = {}
    for g in sorted({CASES[c][3] for c in ns.methods}):
        print(f"== {ARCH.label} with {groups[g]['layers']} block(s) ({g}): preparing checkpoints", flush=True)
        models[g] = ensure_lowrank_checkpoints(ARCH, 3, vision=groups[g], seed=ns.seed)
    work = OUT_DIR / "runs" / "dfcmm"
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"threads": ns.threads, "models": {g: {"layers": groups[g]["layers"], "stats": m["stats"]} for g, m in models.items()}, "cases": {}}
    naive_cache: dict = {}
    experts_used = 2  # step 2 measured; step 1 is a copy
    for case in ns.methods:
        policy, nkind, nprm, g = CASES[case]
        ck = models[g]
        base, exps = ck["base"], ck["experts"][:experts_used]
        ws = work / f"ws-{case}"
        args = {"workspace": str(ws), "base": str(base), "policy": policy, "threads": ns.threads, "prepare": case not in NO_PREPARE}
        t0 = time.perf_counter()
        setup = run_worker("dfcmm:worker_setup", {**args, "expert": str(exps[0])})
        warm([base, exps[-1], *files_under(ws / "state")])
        ours = run_worker("dfcmm:worker_ours", {**args, "expert": str(exps[-1])}, interval=ns.interval)
        ahead = f" (prepared ahead: {ours['phases']['prepare']['seconds']:.1f} s)" if "prepare" in ours["phases"] else ""
        print(f"  {case}: step 1 (setup) {setup['result']['seconds']:.1f} s, ours step 2 {ours['phases']['step']['seconds']:.1f} s{ahead}",
              flush=True)
        key = (nkind, g)
        if key not in naive_cache and not ns.no_naive:
            warm([base, *exps])
            naive_cache[key] = run_worker("dfcmm:worker_naive", {
                "kind": nkind, "params": nprm, "threads": ns.threads, "base": str(base), "experts": [str(p) for p in exps],
                "expert_ids": ours["result"]["expert_ids"], "out": str(work / f"naive-{nkind}-{g}")}, interval=ns.interval)
            print(f"  {nkind}: naive {naive_cache[key]['phases']['naive']['seconds']:.1f} s", flush=True)
        naive = naive_cache.get(key)
        diff = compare(Path(ours["result"]["deploy"]), Path(naive["result"]["outputs"]["deploy"]), base) if naive else None
        res["cases"][case] = {"group": g, "ours": ours, "naive": naive, "setup": setup, "diff": diff,
                              "wall": time.perf_counter() - t0}
        if ns.profile == "always" or (ns.profile == "auto" and naive and case in GOAL_SPEEDUP
                                      and naive["phases"]["naive"]["seconds"] / ours["phases"]["step"]["seconds"] < GOAL_SPEEDUP[case]):
            run_worker("dfcmm:worker_setup", {**args, "expert": str(exps[0])})
            prof = run_worker("dfcmm:worker_ours", {**args, "expert": str(exps[-1]), "profile": True}, interval=0.05)
            res["cases"][case]["profile"] = prof["result"]["profile"]
            print(f"  {case}: profiled", flush=True)
        if not ns.keep:
            shutil.rmtree(ws, ignore_errors=True)
    if not ns.keep:
        shutil.rmtree(work, ignore_errors=True)
    return res


def report(res: dict) -> None:
    print("\n" + "=" * 110)
    print(f"Models: open_clip {ARCH.arch} vision tower, random init, float32; experts = base + seeded low-rank task vectors; "
          f"torch threads per worker: {res['threads'] or 'default'}")
    print(fmt_table(
        ["group", "blocks", "tensors", "params", "size", "largest tensor", "largest", "bound 6x+64MiB"],
        [[g, m["layers"], m["stats"]["n_tensors"], f"{m['stats']['params'] / 1e6:.1f} M", fmt_bytes(m["stats"]["nbytes"]),
          m["stats"]["largest_name"], fmt_bytes(m["stats"]["largest_bytes"]), fmt_bytes(bound_bytes(m["stats"]["largest_bytes"]))]
         for g, m in res["models"].items()], "lrrrrlrr"))
    rows = []
    for case, c in res["cases"].items():
        ph = c["ours"]["phases"]
        for label, p in (("ours: step", "step"), ("ours: validate", "validate"), ("ours: claim", "claim"),
                         ("ours: prepare (ahead, idle)", "prepare")):
            if p not in ph:
                continue
            rows.append([case, label, f"{ph[p]['seconds']:.2f}", f"{ph[p]['cpu_seconds']:.2f}", fmt_bytes(ph[p]["peak_private"]),
                         fmt_bytes(ph[p]["peak_rss"]),
                         f"run_step {c['ours']['result']['engine_seconds']:.2f} s, prepared sets: {c['ours']['result']['prepared']}" if p == "step"
                         else "step 1's state decomposed before expert 2 arrives" if p == "prepare" else ""])
        n = c["naive"]
        if n:
            t = n["result"]["times"]
            rows.append([case, "naive (whole model)", f"{n['phases']['naive']['seconds']:.2f}", f"{n['phases']['naive']['cpu_seconds']:.2f}",
                         fmt_bytes(n["phases"]["naive"]["peak_private"]), fmt_bytes(n["phases"]["naive"]["peak_rss"]),
                         f"load {t['load']:.1f} s, compute {t['compute']:.1f} s, save {t['save']:.1f} s"])
    print("\nStep 2 (each row a fresh process; memory = peak above that process's idle baseline after imports)")
    print(fmt_table(["method", "case", "wall s", "cpu s", "peak private", "peak RSS", "notes"], rows, "llrrrrl"))
    rows = []
    for case, c in res["cases"].items():
        ph = c["ours"]["phases"]["step"]
        bound = bound_bytes(res["models"][c["group"]]["stats"]["largest_bytes"])
        n, d = c["naive"], c["diff"]
        merge_s = sum(c["ours"]["phases"][p]["seconds"] for p in ("validate", "claim", "step"))
        prep = c["ours"]["phases"].get("prepare")
        work_cpu = ph["cpu_seconds"] + (prep["cpu_seconds"] if prep else 0.0)
        rows.append([
            case,
            f"{n['phases']['naive']['seconds'] / ph['seconds']:.2f}" if n else "-",
            f"{n['phases']['naive']['cpu_seconds'] / max(ph['cpu_seconds'], 1e-9):.2f}" if n else "-",
            f"{n['phases']['naive']['seconds'] / merge_s:.2f}" if n else "-",
            f"{n['phases']['naive']['cpu_seconds'] / max(work_cpu, 1e-9):.2f}" if n else "-",
            f"{ph['peak_private'] / bound:.2f}" + (f" ({prep['peak_private'] / bound:.2f})" if prep else ""),
            f"{ph['peak_rss'] / bound:.2f}",
            f"{n['phases']['naive']['peak_private'] / max(ph['peak_private'], 1):.1f}" if n else "-",
            f"{d['max_abs']:.3g}" if d else "-",
            f"{d['rel']:.3g}" if d else "-",
            (f"{TOL[case]:g} " + ("ok" if d["rel"] <= TOL[case] else "FAIL")) if d else "-",
        ])
    print("\nRATIOS (goals: naive/ours >= 3 for opcm and nufilt; ours_peak_private/bound <= 1; equal results within tol)")
    print(fmt_table(["method", "naive/ours time", "naive/ours cpu", "naive/ours(+validate+claim)", "naive/ours cpu(+prepare)",
                     "ours_peak_private/bound (prepare)", "ours_peak_rss/bound", "naive_peak/ours_peak", "max|ours-naive|",
                     "rel Frobenius", "tol"], rows, "lrrrrrrrrrl"))
    for case, c in res["cases"].items():
        d = c["diff"]
        if d:
            extra = ""
            if case.startswith("opcm"):
                extra = f"; lambda ours {c['ours']['result']['meta']['lambda']:.9g}, naive {c['naive']['result']['lambda']:.9g}"
            print(f"  {case}: worst tensor {d['worst']}{extra}")
    print("  rel Frobenius = ||ours - naive||_F / ||naive - base||_F over the deploy view (relative to the merged task vector).")
    print("  time ratios use ours' step (run_step + commit + publish + retention): the latency from an expert's arrival to its"
          " deploy; the +validate+claim column adds hashing and copying the expert, which the naive does not do.")
    print("  +prepare: ours' CPU seconds of the step plus the work it had done ahead while idle (OPCM's SVDs of the previous"
          " state, after that state was published): all the CPU work one expert costs.")
    for case, c in res["cases"].items():
        if c.get("profile"):
            print(f"\nProfile of ours, {case}, step 2 (cProfile, sorted by own time):")
            lines = c["profile"].strip().splitlines()
            start = next((i for i, ln in enumerate(lines) if ln.strip().startswith("ncalls")), 0)
            print("\n".join(lines[max(0, start - 2):]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 block for every method and no wudi-adam (< 3 min)")
    ap.add_argument("--methods", nargs="+", choices=list(CASES), default=None)
    ap.add_argument("--blocks", type=int, default=None, help="residual blocks of the OPCM/NuFILT model (default 12 = the full ViT-B/32 tower)")
    ap.add_argument("--wudi-blocks", type=int, default=None, help="residual blocks of the WUDI model (default 1)")
    ap.add_argument("--profile", choices=("auto", "always", "never"), default="auto",
                    help="profile ours (an extra run) when below the speed goal (auto), always or never")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads in every worker (default 1: stable on a shared machine; 0 = torch's default)")
    ap.add_argument("--no-naive", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep workspaces and naive outputs under bench/out/runs/dfcmm/")
    ap.add_argument("--seed", type=int, default=0, help="checkpoint generation seed")
    ap.add_argument("--interval", type=float, default=0.002, help="memory sampling interval (s)")
    ap.add_argument("--json", type=Path, help="also write all measurements to this file")
    ns = ap.parse_args(argv)
    if ns.methods is None:
        ns.methods = [c for c in CASES if not (ns.quick and c == "wudi-adam")]
    ns.blocks = ns.blocks or (1 if ns.quick else 12)
    ns.wudi_blocks = ns.wudi_blocks or 1
    t0 = time.perf_counter()
    res = run(ns)
    report(res)
    print(f"\ntotal benchmark time {time.perf_counter() - t0:.0f} s")
    if ns.json:
        ns.json.write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
