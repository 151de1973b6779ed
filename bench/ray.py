"""The Ray backend (docs/ray.md): one step on a private 2-CPU Ray cluster vs the local engine.

Checkpoints: the ViT-B/32-shaped vision towers and low-rank experts of ``bench/dfcmm.py``
(``common.ensure_lowrank_checkpoints``, cached under ``bench/out/models/``), ``--blocks`` residual
blocks of 12 (every tensor keeps its real shape).

Per case, in a fresh interpreter (``common.run_worker``), with expert 1 merged first (unmeasured: it
also starts the cluster and its workers), the step of expert 2 is timed (``Workspace.merge``:
validate, claim, step, publish):

* ``local``  ``[engine] backend = "local"``, ``threads = 1``: one process, one thread;
* ``ray``    ``backend = "ray"``, a private cluster with 2 CPUs, 1 CPU and ``threads = 1`` per task:
             two workers on this 2-core machine. Same bytes as ``local`` (checked: the deploy views'
             content hashes must be equal).

Cases: OPCM with its SVDs inside the step (no prepare: the heavy step), NuFILT (full SVD, in the
step), and EMA (cheap: Ray's fixed overhead as a ratio). Memory: the driver's peak private memory
above its idle baseline (``common.Meter``), and each Ray worker's, sampled from ``/proc/<pid>/status``
(RssAnon) every few milliseconds and taken above that worker's idle level after step 1, against the
bound 6 × largest tensor + 64 MiB. EMA also runs on a 2-block model: the driver's peak must not grow
with the model.

    python bench/ray.py                  # 12 blocks (several minutes on 2 cores)
    python bench/ray.py --blocks 2       # quick
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH_DIR, OUT_DIR, RESULT_TAG, REPO, Meter, bound_bytes, ensure_lowrank_checkpoints, fmt_bytes, fmt_table, warm  # noqa: E402
from dfcmm import ARCH, NUFILT, OPCM, SEED  # noqa: E402

# This file is named like the Ray package: with bench/ on sys.path, ``import ray`` (mergewatch's Ray
# backend) would import it. Its imports are done: take bench/ off the path again. For the same
# reason its cases run through ``--worker`` below, not ``common.run_worker("ray:...")``.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH_DIR]

#: case -> policy (the dfcmm benchmark's hyper-parameters)
CASES = {
    "opcm": {"deploy": "opcm", **OPCM},
    "nufilt": {"deploy": "nufilt", "svd": "full", **NUFILT},
    "ema": {"init": "ema", "deploy": "ema", "technique": "wa"},
}
GOAL_SPEEDUP = {"opcm": 1.6}


class WorkerSampler:
    """Peak private memory (RssAnon) of every Ray worker process of this machine's cluster, above
    each worker's level when ``start`` is called (or when it is first seen)."""

    def __init__(self, interval: float = 0.003):
        self.interval = interval
        self.idle: dict[int, int] = {}
        self.peak: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _workers() -> list[int]:
        import psutil

        out = []
        for p in psutil.Process().children(recursive=True):
            try:
                cmd = p.cmdline()  # Ray retitles its workers "ray::IDLE", "ray::run_task", ...
                if cmd and (cmd[0].startswith("ray::") or any("default_worker.py" in a for a in cmd)):
                    out.append(p.pid)
            except psutil.Error:
                pass
        return out

    @staticmethod
    def _anon(pid: int) -> int | None:
        try:
            with open(f"/proc/{pid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"RssAnon:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def start(self) -> None:
        for pid in self._workers():
            a = self._anon(pid)
            if a is not None:
                self.idle[pid] = self.peak[pid] = a
        self._thread.start()

    def _run(self) -> None:
        pids, refreshed = list(self.idle), time.monotonic()
        while not self._stop.is_set():
            if time.monotonic() - refreshed > 0.5:
                pids, refreshed = self._workers(), time.monotonic()
            for pid in pids:
                a = self._anon(pid)
                if a is None:
                    continue
                self.idle.setdefault(pid, a)
                self.peak[pid] = max(self.peak.get(pid, a), a)
            time.sleep(self.interval)

    def stop(self) -> dict[int, int]:
        self._stop.set()
        self._thread.join()
        return {pid: self.peak[pid] - self.idle[pid] for pid in self.peak}


def worker_case(args: dict, meter) -> dict:
    """Expert 1 (unmeasured), then expert 2 measured; returns the step's engine report and hashes."""
    from mergewatch import config
    from mergewatch.workspace import Workspace

    shutil.rmtree(args["workspace"], ignore_errors=True)
    engine = {"threads": 1, "backend": args["backend"]}
    if args["backend"] == "ray":
        engine["ray"] = {"address": "local", "num_cpus": 2, "num_cpus_per_task": 1, **({"task_bytes": args["task_bytes"]} if args.get("task_bytes") else {})}
    settings = config.parse({"workspace": args["workspace"], "base": args["base"], "seed": SEED, "policy": args["policy"],
                             "engine": engine})
    ws = Workspace(settings)
    ws.merge(args["experts"][0], name="expert-1")
    sampler = WorkerSampler() if args["backend"] == "ray" else None
    meter.baseline()
    if sampler:
        sampler.start()
    with meter.phase("step"):
        out = ws.merge(args["experts"][1], name="expert-2")
    workers = sampler.stop() if sampler else {}
    snap = ws.states.load(out.step)
    return {"engine": out.engine, "deploy_sha256": snap.record["views"]["deploy"].get("content_sha256"),
            "sets": snap.record["sets"], "workers_peak_private": list(workers.values())}


def _run_case(args: dict) -> dict:
    """``worker_case(args)`` in a fresh interpreter (``--worker``), as ``common.run_worker`` does."""
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker"], input=json.dumps(args), capture_output=True,
                          text=True, cwd=REPO)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
    raise RuntimeError(f"benchmark case failed (exit {proc.returncode})")


def _worker() -> None:
    import torch  # noqa: F401  (imports before the baseline, as common._worker_main)

    import mergewatch.workspace  # noqa: F401

    meter = Meter(0.002)
    try:
        result = worker_case(json.loads(sys.stdin.read()), meter)
    finally:
        meter.close()
    print(RESULT_TAG + json.dumps({"phases": meter.phases, "result": result}, default=str), flush=True)


def run(ns) -> dict:
    res: dict = {"blocks": ns.blocks, "cases": {}}
    work = OUT_DIR / "runs" / "ray"
    work.mkdir(parents=True, exist_ok=True)
    sizes = [(ns.blocks, ns.cases)] + ([(2, ["ema"])] if ns.blocks != 2 and "ema" in ns.cases else [])
    for blocks, cases in sizes:
        print(f"== {ARCH.label} with {blocks} block(s): preparing checkpoints", flush=True)
        ck = ensure_lowrank_checkpoints(ARCH, 3, vision={"layers": blocks}, seed=ns.seed)
        for case in cases:
            row = {"largest": ck["stats"]["largest_bytes"], "nbytes": ck["stats"]["nbytes"]}
            for backend in ("local", "ray"):
                warm([ck["base"], *ck["experts"][:2]])
                out = _run_case({"workspace": str(work / f"ws-{case}-{backend}"), "base": str(ck["base"]),
                                                     "experts": [str(p) for p in ck["experts"][:2]], "policy": CASES[case],
                                  "backend": backend, "task_bytes": ns.task_bytes})
                row[backend] = out
                print(f"  {case} L{blocks} {backend}: {out['phases']['step']['seconds']:.2f} s {out['result']['engine']}", flush=True)
            row["same_bytes"] = (row["local"]["result"]["deploy_sha256"], row["local"]["result"]["sets"]) == \
                                (row["ray"]["result"]["deploy_sha256"], row["ray"]["result"]["sets"])
            res["cases"][f"{case}-L{blocks}"] = row
    if not ns.keep:
        shutil.rmtree(work, ignore_errors=True)
    return res


def report(res: dict) -> None:
    rows = []
    for key, r in res["cases"].items():
        loc, ray = r["local"]["phases"]["step"], r["ray"]["phases"]["step"]
        workers = r["ray"]["result"]["workers_peak_private"]
        bound = bound_bytes(r["largest"])
        eng = r["ray"]["result"]["engine"]
        case = key.split("-")[0]
        goal = f" (goal ≥ {GOAL_SPEEDUP[case]})" if case in GOAL_SPEEDUP else ""
        rows.append([key, f"{loc['seconds']:.2f}", f"{ray['seconds']:.2f}",
                     f"{loc['seconds'] / ray['seconds']:.2f}×{goal}", f"{ray['seconds'] / loc['seconds']:.2f}",
                     f"{eng.get('tasks')}/{eng.get('workers')}", fmt_bytes(max(workers, default=0)), fmt_bytes(bound),
                     "yes" if workers and max(workers) <= bound else "NO",
                     fmt_bytes(loc["peak_private"]), fmt_bytes(ray["peak_private"]), "yes" if r["same_bytes"] else "NO"])
    print("\n" + fmt_table(["case", "local s", "ray s", "speed-up", "ray/local", "tasks/workers", "worker peak",
                            "bound", "≤ bound", "driver local", "driver ray", "same bytes"], rows))
    print("\nlocal: 1 process, 1 thread; ray: private cluster, 2 workers × 1 thread; peaks = private memory above idle.")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=12, help="residual blocks of the ViT-B/32 tower (of 12)")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--task-bytes", type=int, default=0, help="[engine.ray] task_bytes (default: the config's default)")
    ap.add_argument("--keep", action="store_true", help="keep the workspaces under bench/out/runs/ray")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ns = ap.parse_args(argv)
    if ns.worker:
        _worker()
        return 0
    res = run(ns)
    report(res)
    if ns.json:
        ns.json.write_text(json.dumps(res, indent=1, default=str), "utf-8")
    return 0 if all(r["same_bytes"] for r in res["cases"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
