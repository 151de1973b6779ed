"""Every registered method, one step each, side by side (the registry is the list of cases).

``mergewatch.strategies.METHODS`` plus the TIME default policy (init ema, deploy ema, WA) as the
reference: for each, a fresh workspace merges expert 1 (not measured), then expert 2's step is
measured in a fresh interpreter (``common.run_worker``): wall time, peak private memory above the
idle process as a ratio to the memory bound of the foundation issue (6 × largest tensor + 64 MiB),
and the time as a ratio to the reference policy's step in the same run. A method added to the
registry is benchmarked here without touching this file; one that needs a file (MetaMerge's NiNo
checkpoint, ``../shared/nino/``) is skipped with the reason when it is absent.

The model is an open_clip ViT-B/32 vision tower with low-rank experts (``common.ensure_lowrank_
checkpoints``, cached under bench/out/models/), with its real tensor shapes and fewer blocks
(``--layers``, default 2) so that every method fits a few minutes; the comparisons of
``dfcmm.py`` and ``streaming.py`` against whole-model versions use the full towers.

    python bench/methods.py [--layers 2] [--methods opcm wudi ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    OUT_DIR,
    ModelSpec,
    bound_bytes,
    ensure_lowrank_checkpoints,
    fmt_bytes,
    fmt_table,
    run_worker,
    workspace_settings,
)

REPO = Path(__file__).resolve().parent.parent
NINO = REPO.parent / "shared" / "nino" / "checkpoints"
REFERENCE = "time ema/ema wa"
#: what a method needs beyond its defaults (paths into ../shared); NiNo's context holds 4 experts
NEEDS = {
    "metamerge": {"checkpoint": NINO / "nino_mlp.pt"},
    "metamerge_gnn": {"checkpoint": NINO / "nino_no_posw.pt", "heads": 2, "subgraph": True},
}


def cases() -> dict[str, dict]:
    """case -> policy table, from the registry."""
    from mergewatch.strategies import METHODS

    out = {REFERENCE: {"init": "ema", "deploy": "ema", "technique": "wa"}}
    for name in METHODS:
        out[name] = {"deploy": name, **{k: (str(v) if isinstance(v, Path) else v) for k, v in NEEDS.get(name, {}).items()}}
    return out


def worker_step(args: dict, meter) -> dict:
    from mergewatch.workspace import Workspace

    ws = Workspace(workspace_settings(args))
    _, report = ws.validate(args["experts"][1])
    ws.store.claim(args["experts"][1], report.content_sha256)
    meter.baseline()
    with meter.phase("step"):
        out = ws.step(report.content_sha256, "expert-2")
    return {"step": out.step, "merge_seconds": out.merge_seconds}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2, help="vision blocks of the ViT-B/32 tower (12 = the real tower)")
    ap.add_argument("--methods", nargs="+", default=None, help="cases to run (default: every registered method)")
    ap.add_argument("--json", type=Path, default=None)
    ns = ap.parse_args(argv)
    todo = cases()
    names = ns.methods or list(todo)
    unknown = sorted(set(names) - set(todo))
    if unknown:
        ap.error(f"unknown case(s) {unknown}; registered: {', '.join(todo)}")
    models = ensure_lowrank_checkpoints(ModelSpec("ViT-B-32", "visual"), n_experts=2, vision={"layers": ns.layers})
    bound = bound_bytes(models["stats"]["largest_bytes"])
    rows, res = [], {"layers": ns.layers, "bound": bound, "cases": {}}
    for name in names:
        missing = [str(p) for p in NEEDS.get(name, {}).values() if isinstance(p, Path) and not p.exists()]
        if missing:
            res["cases"][name] = {"skipped": f"needs {missing}"}
            print(f"{name}: skipped (needs {missing})", flush=True)
            continue
        ws = OUT_DIR / "methods" / name.replace(" ", "_").replace("/", "-")
        args = {"workspace": str(ws), "base": str(models["base"]), "policy": todo[name], "experts": [str(p) for p in models["experts"]]}
        run_worker("streaming:worker_setup", {**args, "expert": args["experts"][0]})  # fresh workspace, expert 1 merged
        r = run_worker("methods:worker_step", args)
        phase = r["phases"]["step"]
        res["cases"][name] = {"seconds": phase["seconds"], "peak": phase["peak_private"], "merge_seconds": r["result"]["merge_seconds"]}
        print(f"{name}: {phase['seconds']:.2f} s, peak {fmt_bytes(phase['peak_private'])}", flush=True)
        shutil.rmtree(ws, ignore_errors=True)
    ref = res["cases"].get(REFERENCE, {}).get("seconds")
    for name, c in res["cases"].items():
        if "skipped" in c:
            rows.append([name, "-", "-", "-", c["skipped"]])
            continue
        rows.append([name, f"{c['seconds']:.2f}", f"{c['seconds'] / ref:.2f}" if ref else "-", f"{c['peak'] / bound:.2f}", ""])
    print(f"\nViT-B/32 vision tower, {ns.layers} blocks ({fmt_bytes(models['stats']['nbytes'])}); bound = 6 x largest tensor + 64 MiB = {fmt_bytes(bound)}")
    print(fmt_table(["case", "step s", f"/ {REFERENCE}", "peak / bound", "note"], rows))
    if ns.json:
        ns.json.write_text(json.dumps(res, indent=2), "utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
