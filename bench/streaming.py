"""Streaming merge step vs a naive whole-model implementation, and vs the I/O floor.

For each model (open_clip architectures with seeded random init; experts = base + seeded noise):

* ``ours wa/ema``  a Workspace with init=ema, deploy=ema, technique=wa; expert 1 merged beforehand,
                   then expert 2 measured: validate, claim (copy into the store), step (run_step +
                   commit + publish + retention). The step reads base, expert and EMA state and
                   writes the new EMA state plus the deploy and init views.
* ``ours ties``    init=zs, deploy=all, technique=ties (trim per tensor): step 2 reads base and both
                   experts, writes deploy.
* ``naive``        the same formulas on whole state dicts: ``safetensors.torch.load_file`` of every
                   input, compute in memory, ``save_file`` of every output (+ fsync, like ours).
* ``io floor``     read the same input files, write the same output byte counts, fsync (the bytes
                   ours physically writes; when the engine hard-linked identical outputs, a second
                   floor writes every output file in full).

Every case runs in a fresh interpreter; peak memory is private (anonymous) memory above that
process's idle baseline after imports (DESIGN §4), RSS is printed beside it. Goals (the issue):
peak_private(step) <= 6 x largest tensor + 64 MiB, whatever the model size; step time <= 2 x I/O floor
for WA/EMA. Results of ours and naive are compared tensor by tensor (max abs diff, bit identity).

    python bench/streaming.py                 # ViT-B-32:visual and ViT-L-14 (full CLIP)
    python bench/streaming.py --quick         # ViT-B-32:visual only
    python bench/streaming.py --models ViT-B-32:visual ViT-L-14
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    bound_bytes,
    workspace_settings,
    MiB,
    clone_tree,
    OUT_DIR,
    ModelSpec,
    ensure_checkpoints,
    evict,
    files_under,
    fmt_bytes,
    fmt_table,
    io_floor,
    run_worker,
    warm,
)
from mergewatch.checkpoint.writer import fsync_path  # noqa: E402

DEFAULT_MODELS = ("ViT-B-32:visual", "ViT-L-14")
QUICK_MODELS = ("ViT-B-32:visual",)
EMA_W = 0.5
TIES_P = 0.8
TIES_LAMBDA = 1.0

POLICIES = {
    "wa/ema": {"init": "ema", "deploy": "ema", "technique": "wa", "w": EMA_W},
    "ties": {"init": "zs", "deploy": "all", "technique": "ties", "lambda": TIES_LAMBDA, "ties": {"p": TIES_P, "trim": "tensor"}},
}


# Workers (each runs in a fresh interpreter via common.run_worker) --------------------------------
def worker_setup(args: dict, meter) -> dict:
    """Fresh workspace with expert 1 merged (not measured for memory)."""
    from mergewatch.workspace import Workspace

    shutil.rmtree(args["workspace"], ignore_errors=True)
    ws = Workspace(workspace_settings(args))
    t = time.perf_counter()
    out = ws.merge(args["expert"], name="expert-1")
    return {"seconds": time.perf_counter() - t, "status": out.status}


def worker_ours(args: dict, meter) -> dict:
    """Expert 2 through validate -> claim -> step, each a measured phase."""
    from mergewatch.workspace import Workspace

    ws = Workspace(workspace_settings(args))
    prev = ws.latest()
    need_all = ws.strategy.buffer_need().value == "all"
    meter.baseline()
    with meter.phase("validate"):
        _, report = ws.validate(args["expert"])
    with meter.phase("claim"):
        stored = ws.store.claim(args["expert"], report.content_sha256)
    inputs = [*ws.base.files]
    if need_all:
        for i in prev.expert_ids:
            inputs += ws.store.open(i).files
    inputs.append(Path(args["expert"]))  # same bytes as the stored copy (which retention may drop)
    for s in prev.sets().values():
        inputs += s.files
    with meter.phase("step"):
        out = ws.step(report.content_sha256, "expert-2")
    snap = ws.states.load(out.step)
    outputs = [p for p in files_under(snap.directory) if p.suffix == ".safetensors"]
    return {
        "engine_seconds": snap.record["seconds"],
        "inputs": [str(p) for p in inputs],
        "outputs": {str(p.relative_to(snap.directory)): p.stat().st_size for p in outputs},
        # files the engine hard-linked instead of writing again count once here
        "physical_outputs": list({(p.stat().st_dev, p.stat().st_ino): p.stat().st_size for p in outputs}.values()),
        "state_dir": str(snap.directory),
        "stored": str(stored),
        "expert_bytes": Path(args["expert"]).stat().st_size,
    }


def worker_naive_wa(args: dict, meter) -> dict:
    """Whole-model EMA step: θ_ema = w θ_2 + (1 − w) θ_ema(1); outputs state, deploy, init."""
    from safetensors.torch import load_file, save_file

    out_dir = Path(args["out"])
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    w = args["w"]
    meter.baseline()
    times = {}
    with meter.phase("naive"):
        t = time.perf_counter()
        base = load_file(args["base"])
        expert = load_file(args["expert"])
        state = load_file(args["state"])
        times["load"] = time.perf_counter() - t
        t = time.perf_counter()
        ema = {}
        for k, b in base.items():
            ema[k] = w * expert[k].float() + (1 - w) * state[k] if b.dtype.is_floating_point else b
        view = {k: v.to(base[k].dtype) for k, v in ema.items()}
        times["compute"] = time.perf_counter() - t
        t = time.perf_counter()
        for name, d in (("ema", ema), ("deploy", view), ("init", view)):
            p = out_dir / f"{name}.safetensors"
            save_file(d, str(p))
            fsync_path(p)
        fsync_path(out_dir)
        times["save"] = time.perf_counter() - t
    return {"times": times, "outputs": {n: str(out_dir / f"{n}.safetensors") for n in ("ema", "deploy", "init")}}


def _is_fused(name: str) -> bool:
    return name.endswith("attn.in_proj_weight")


def _naive_trim(t, p: float):
    """Keep the top ⌊(1 − p)·d⌋ + 1 magnitudes of t (entries tied with the threshold kept)."""
    import torch

    d = t.numel()
    keep = d - int((1 - Fraction(repr(p))) * d // 1)
    if keep <= 0 or d == 0:
        return t
    thr = torch.kthvalue(t.abs().flatten(), keep).values
    return torch.where(t.abs() >= thr, t, torch.zeros_like(t))


def naive_ties_tensor(base, experts, p: float, lam: float, fused: bool):
    """TIES (Yadav et al. 2023) for one tensor, written independently of mergewatch: trim each task
    vector (per q/k/v block for fused in_proj), elect signs by the sum, mean of the agreeing entries."""
    import torch

    taus = [e - base for e in experts]
    if fused:
        trimmed = [torch.cat([_naive_trim(c, p) for c in tau.chunk(3, dim=0)]) for tau in taus]
    else:
        trimmed = [_naive_trim(tau, p) for tau in taus]
    total = torch.zeros_like(base)
    for t in trimmed:
        total += t
    sign = torch.sign(total)
    acc = torch.zeros_like(base)
    cnt = torch.zeros_like(base)
    for t in trimmed:
        agree = (torch.sign(t) == sign) & (sign != 0)
        acc += torch.where(agree, t, torch.zeros_like(t))
        cnt += agree.float()
    return base + lam * (acc / cnt.clamp_min(1.0))


def worker_naive_ties(args: dict, meter) -> dict:
    from safetensors.torch import load_file, save_file

    out_dir = Path(args["out"])
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    meter.baseline()
    times = {}
    with meter.phase("naive"):
        t = time.perf_counter()
        base = load_file(args["base"])
        experts = [load_file(e) for e in args["experts"]]
        times["load"] = time.perf_counter() - t
        t = time.perf_counter()
        deploy = {}
        for k, b in base.items():
            if not b.dtype.is_floating_point:
                deploy[k] = b
                continue
            deploy[k] = naive_ties_tensor(b.float(), [e[k].float() for e in experts], args["p"], args["lam"], _is_fused(k)).to(b.dtype)
        times["compute"] = time.perf_counter() - t
        t = time.perf_counter()
        p = out_dir / "deploy.safetensors"
        save_file(deploy, str(p))
        fsync_path(p)
        fsync_path(out_dir)
        times["save"] = time.perf_counter() - t
    return {"times": times, "outputs": {"deploy": str(p)}}


def worker_io(args: dict, meter) -> dict:
    meter.baseline()
    with meter.phase("io"):
        r = io_floor([Path(p) for p in args["inputs"]], args["sizes"], Path(args["scratch"]))
    return r


# Comparison --------------------------------------------------------------------------------------
def compare_outputs(a: Path, b: Path) -> tuple[float, bool]:
    """(max abs difference, bit-identical) of two checkpoints tensor by tensor. Bit identity also
    tells 0.0 from -0.0, which a difference of 0 does not."""
    import torch

    from mergewatch.checkpoint.reader import LazyCheckpoint

    ca, cb = LazyCheckpoint(a), LazyCheckpoint(b)
    if set(ca) != set(cb):
        raise AssertionError(f"{a} and {b} hold different tensor names")
    worst, same = 0.0, True
    for k in ca:
        x, y = ca[k], cb[k]
        if x.shape != y.shape or x.dtype != y.dtype:
            raise AssertionError(f"{k}: {tuple(x.shape)} {x.dtype} vs {tuple(y.shape)} {y.dtype}")
        if x.numel():
            worst = max(worst, float((x.double() - y.double()).abs().max()))
            same = same and torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))
    return worst, same


# Orchestration -----------------------------------------------------------------------------------
def prepare_inputs(paths, cold: bool) -> None:
    os.sync()  # nothing dirty left from earlier cases competes with the measured writes
    if cold:
        evict(paths)
    else:
        warm(paths)


def _phase(run: dict, name: str) -> dict:
    return run["phases"][name]


def fastest(runs: list[dict], name: str) -> float:
    """Wall time of the fastest repeat (other load on the machine only ever adds time)."""
    return min(_phase(r, name)["seconds"] for r in runs)


def worst(runs: list[dict], name: str, key: str = "peak_private") -> int:
    return max(_phase(r, name)[key] for r in runs)


def run_model(spec: ModelSpec, ns) -> dict:
    print(f"\n== {spec.label}: preparing checkpoints", flush=True)
    ck = ensure_checkpoints(spec, 2, seed=ns.seed)
    stats = ck["stats"]
    base, (e1, e2) = ck["base"], ck["experts"]
    work = OUT_DIR / "runs" / spec.key
    res = {"spec": spec.label, "stats": stats, "cases": {}}
    for pname in ns.policies:
        policy = POLICIES[pname]
        tag = pname.replace("/", "-")
        pristine, ws = work / f"ws-{tag}-after-step-1", work / f"ws-{tag}"
        t = time.perf_counter()
        setup = run_worker("streaming:worker_setup", {"workspace": str(pristine), "base": str(base), "policy": policy, "expert": str(e1)})
        print(f"  {pname}: step 1 (setup) {setup['result']['seconds']:.1f} s", flush=True)
        args = {"workspace": str(ws), "base": str(base), "policy": policy, "expert": str(e2)}
        ours, floor, floor_all, floor_vc = [], [], [], []
        for rep in range(ns.repeat):
            clone_tree(pristine, ws)  # the same post-step-1 workspace for every repeat
            prepare_inputs([base, e1, e2, *files_under(ws / "state")], ns.cold)
            ours.append(run_worker("streaming:worker_ours", args, interval=ns.interval))
            r = ours[-1]["result"]
            # I/O floor of the step: the same input files, the same output byte counts ...
            inputs = [Path(p) for p in r["inputs"]]
            prepare_inputs(inputs, ns.cold)
            floor.append(run_worker("streaming:worker_io", {"inputs": [str(p) for p in inputs], "sizes": r["physical_outputs"],
                                                            "scratch": str(work / "io-scratch")}, interval=ns.interval))
            if sorted(r["physical_outputs"]) != sorted(r["outputs"].values()):
                # ... and of writing every output file in full (what an implementation needs that
                # writes each view and state set separately, as the naive one does)
                prepare_inputs(inputs, ns.cold)
                floor_all.append(run_worker("streaming:worker_io", {"inputs": [str(p) for p in inputs], "sizes": list(r["outputs"].values()),
                                                                    "scratch": str(work / "io-scratch")}, interval=ns.interval))
            # ... and of validate + claim: read the expert once, then copy it (read + write + fsync).
            prepare_inputs([e2], ns.cold)
            floor_vc.append(run_worker("streaming:worker_io", {"inputs": [str(e2), str(e2)], "sizes": [r["expert_bytes"]],
                                                               "scratch": str(work / "io-scratch")}, interval=ns.interval))
            print(f"  {pname}: repeat {rep + 1}/{ns.repeat}: step {_phase(ours[-1], 'step')['seconds']:.2f} s, "
                  f"I/O floor {_phase(floor[-1], 'io')['seconds']:.2f} s", flush=True)
        state_dir = Path(ours[-1]["result"]["state_dir"])
        prev_dir = pristine / "state" / str(int(state_dir.name) - 1)
        naive = None
        if not ns.no_naive:
            out = work / f"naive-{tag}"
            if pname == "wa/ema":
                nargs = {"base": str(base), "expert": str(e2), "state": str(prev_dir / "sets/ema/model.safetensors"), "w": EMA_W, "out": str(out)}
                prepare_inputs([base, e2, Path(nargs["state"])], ns.cold)
                naive = run_worker("streaming:worker_naive_wa", nargs, interval=ns.interval)
                pairs = {k: state_dir / f"{d}/{k}/model.safetensors" for k, d in (("ema", "sets"), ("deploy", "views"), ("init", "views"))}
            else:
                nargs = {"base": str(base), "experts": [str(e1), str(e2)], "p": TIES_P, "lam": TIES_LAMBDA, "out": str(out)}
                prepare_inputs([base, e1, e2], ns.cold)
                naive = run_worker("streaming:worker_naive_ties", nargs, interval=ns.interval)
                pairs = {"deploy": state_dir / "views/deploy/model.safetensors"}
            print(f"  {pname}: naive {_phase(naive, 'naive')['seconds']:.1f} s", flush=True)
            compared = {k: compare_outputs(Path(naive["result"]["outputs"][k]), v) for k, v in pairs.items()}
            naive["diff"] = {k: d for k, (d, _) in compared.items()}
            naive["bit_identical"] = {k: same for k, (_, same) in compared.items()}
            shutil.rmtree(out, ignore_errors=True)
        res["cases"][pname] = {"ours": ours, "naive": naive, "floor": floor, "floor_all": floor_all, "floor_vc": floor_vc, "setup": setup,
                               "wall": time.perf_counter() - t}
        if not ns.keep:
            shutil.rmtree(ws, ignore_errors=True)
            shutil.rmtree(pristine, ignore_errors=True)
    if not ns.keep:
        shutil.rmtree(work, ignore_errors=True)
    return res


def report(results: list[dict]) -> None:
    n_rep = max((len(c["ours"]) for r in results for c in r["cases"].values()), default=1)
    print("\n" + "=" * 110)
    print("Models (float32; random init from open_clip's bundled configs; experts = base + N(0, 0.01^2) per entry)")
    print(fmt_table(
        ["model", "tensors", "params", "size", "largest tensor", "largest", "bound 6x+64MiB"],
        [[r["spec"], r["stats"]["n_tensors"], f"{r['stats']['params'] / 1e6:.1f} M", fmt_bytes(r["stats"]["nbytes"]),
          r["stats"]["largest_name"], fmt_bytes(r["stats"]["largest_bytes"]), fmt_bytes(bound_bytes(r["stats"]["largest_bytes"]))]
         for r in results],
        "lrrrlrr",
    ))
    rows = []
    for r in results:
        for pname, c in r["cases"].items():
            ours = c["ours"]
            res = ours[-1]["result"]
            fl = c["floor"][-1]["result"]

            def row(case, runs, phase, note=""):
                cpu = min(_phase(x, phase)["cpu_seconds"] for x in runs)
                return [r["spec"], pname, case, f"{fastest(runs, phase):.2f}", f"{cpu:.2f}", fmt_bytes(worst(runs, phase)),
                        fmt_bytes(worst(runs, phase, "peak_rss")), note]

            logical = sum(res["outputs"].values())
            linked = f" ({fmt_bytes(logical)} of output files, rest hard-linked)" if logical != fl["bytes_written"] else ""
            rows.append(row("ours: step", ours, "step", f"reads {fmt_bytes(fl['bytes_read'])}, writes {fmt_bytes(fl['bytes_written'])}{linked}"))
            eng = min(x["result"]["engine_seconds"] for x in ours)
            rows.append([r["spec"], pname, "  of which run_step", f"{eng:.2f}", "", "", "", "the engine; the rest is commit + publish"])
            rows.append(row("ours: validate", ours, "validate", "reads + hashes + NaN-checks the expert"))
            rows.append(row("ours: claim (copy)", ours, "claim", "the daemon moves (rename) instead"))
            if c["naive"]:
                n = c["naive"]
                t = n["result"]["times"]
                rows.append(row("naive (whole model)", [n], "naive", f"load {t['load']:.1f} s, compute {t['compute']:.1f} s, save {t['save']:.1f} s"))
            f = min(c["floor"], key=lambda x: _phase(x, "io")["seconds"])["result"]
            rows.append(row("I/O floor (step)", c["floor"], "io", f"read {f['read_seconds']:.2f} s, write+fsync {f['write_seconds']:.2f} s"))
            if c["floor_all"]:
                rows.append(row("I/O floor (all outputs)", c["floor_all"], "io", f"every output file written in full ({fmt_bytes(logical)})"))
            rows.append(row("I/O floor (val.+claim)", c["floor_vc"], "io", "read expert twice, write it once"))
    print(f"\nMeasurements (every row a fresh process; seconds/cpu = fastest of {n_rep} repeat(s), memory = worst; memory is the"
          " peak above that process's idle baseline after imports; private = RssAnon)")
    print(fmt_table(["model", "policy", "case", "seconds", "cpu s", "peak private", "peak RSS", "notes"], rows, "lllrrrrl"))
    rows = []
    for r in results:
        bound = bound_bytes(r["stats"]["largest_bytes"])
        for pname, c in r["cases"].items():
            ours = c["ours"]
            step_s, floor_s = fastest(ours, "step"), fastest(c["floor"], "io")
            eng = min(x["result"]["engine_seconds"] for x in ours)
            merge_s = min(sum(_phase(x, ph)["seconds"] for ph in ("validate", "claim", "step")) for x in ours)
            merge_floor = floor_s + fastest(c["floor_vc"], "io")
            peak = max(worst(ours, "step"), 1)
            naive = c["naive"]
            rows.append([
                r["spec"], pname,
                f"{worst(ours, 'step') / bound:.2f}",
                f"{_phase(naive, 'naive')['peak_private'] / peak:.1f}" if naive else "-",
                f"{step_s / floor_s:.2f}",
                f"{step_s / fastest(c['floor_all'], 'io'):.2f}" if c["floor_all"] else "=",
                f"{eng / floor_s:.2f}",
                f"{merge_s / merge_floor:.2f}",
                (f"{max(naive['diff'].values()):.3g}" + (" (bits equal)" if all(naive["bit_identical"].values()) else "")) if naive else "-",
            ])
    print("\nRATIOS (goals: ours_peak/bound <= 1 for every model; step/io_floor <= 2 for wa/ema)")
    print(fmt_table(["model", "policy", "ours_peak/bound", "naive_peak/ours_peak", "step/io_floor", "step/floor_all_outputs",
                     "run_step/io_floor", "merge/io_floor", "max|ours-naive|"], rows, "llrrrrrrr"))
    for r in results:
        for pname, c in r["cases"].items():
            if c["naive"]:
                print(f"  {r['spec']} {pname}: max abs diff ours vs naive per output: "
                      + ", ".join(f"{k} {v:.3g}{' (bit-identical)' if c['naive']['bit_identical'][k] else ''}" for k, v in c["naive"]["diff"].items()))
    print("  step = Workspace.step (run_step + commit + publish + retention) vs the I/O floor of the bytes it reads and"
          " physically writes;\n  step/floor_all_outputs: vs writing every output file in full (when the engine hard-linked"
          " identical outputs, '=' when it did not);\n  merge = validate + claim + step vs the step floor plus reading the"
          " expert once and copying it.")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=None, help=f"open_clip config names, ':visual' for the vision tower (default {' '.join(DEFAULT_MODELS)})")
    ap.add_argument("--quick", action="store_true", help=f"only {' '.join(QUICK_MODELS)}")
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    ap.add_argument("--cold", action="store_true", help="evict inputs from the page cache before each case (default: warm)")
    ap.add_argument("--no-naive", action="store_true", help="skip the naive implementation")
    ap.add_argument("--keep", action="store_true", help="keep workspaces under bench/out/runs/")
    ap.add_argument("--repeat", type=int, default=1, help="repeat the timed cases (ours, I/O floor); the fastest counts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--interval", type=float, default=0.001, help="memory sampling interval (s)")
    ap.add_argument("--json", type=Path, help="also write all measurements to this file")
    ns = ap.parse_args(argv)
    models = ns.models or (QUICK_MODELS if ns.quick else DEFAULT_MODELS)
    t0 = time.perf_counter()
    results = [run_model(ModelSpec.parse(m), ns) for m in models]
    report(results)
    print(f"\ntotal benchmark time {time.perf_counter() - t0:.0f} s")
    if ns.json:
        ns.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
