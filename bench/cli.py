"""Start-up time of the CLI's light verbs, as a ratio to a bare ``python -c "import json"`` (issue 14).

The light verbs (``--help``, ``<verb> --help``, ``status``, ``status --json``, ``submit``,
``rollback``, ``promote``) import neither torch nor open_clip nor transformers. Each case runs as a
fresh subprocess (``python -m mergewatch.cli ...``, as a user or a script runs it) ``--repeat`` times
and the median wall time counts; the reference is the same interpreter starting and importing
``json``, measured in the same run, so the ratio does not depend on how busy the machine is. For
scale, the imports the light verbs no longer pay (``import torch``, ``import torch, open_clip``)
are timed the same way.

The workspace is the demo's (``mergewatch demo``: a tiny open_clip CLIP base and 3 experts merged
with Best-in-TIME), created once under ``bench/out/cli/``; the verbs that change it (``submit``,
``rollback``, ``promote``) act on it for real (a new inbox file, a republished version, a promoted
version each run).

    python bench/cli.py                 # 7 runs per case
    python bench/cli.py --repeat 11 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import OUT_DIR, REPO, fmt_table  # noqa: E402

WORKDIR = OUT_DIR / "cli"
#: the goal of the issue for `status --json` on an idle machine
STATUS_GOAL_SECONDS = 1.0


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def timed(argv: list[str]) -> float:
    """Wall time of one subprocess run (its output discarded); a failure stops the benchmark."""
    t = time.perf_counter()
    r = subprocess.run(argv, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
    return seconds


def setup(workdir: Path) -> Path:
    """The demo workspace (tiny base, 3 experts merged); returns its config."""
    shutil.rmtree(workdir, ignore_errors=True)
    r = subprocess.run([sys.executable, "-m", "mergewatch.cli", "demo", "--workdir", str(workdir)], cwd=REPO, env=env(),
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"mergewatch demo failed: {r.stderr.strip()}")
    return workdir / "mergewatch.toml"


def deploy_versions(workdir: Path) -> tuple[int | None, list[int]]:
    from mergewatch.deploy.publisher import Publisher  # light: no torch in this process either

    pub = Publisher(workdir / "workspace" / "deploy")
    return pub.current(), pub.versions()


def cases(cfg: Path, workdir: Path) -> list[tuple[str, Callable[[], list[str]]]]:
    """(label, function returning the argv of the next run)."""
    py = sys.executable
    cli = [py, "-m", "mergewatch.cli"]
    expert = workdir / "experts" / "expert-01.safetensors"
    counter = iter(range(1_000_000))

    def rollback_target() -> list[str]:
        _, versions = deploy_versions(workdir)
        return [*cli, "rollback", "--config", str(cfg), str(versions[-2])]

    def promote_target() -> list[str]:
        current, versions = deploy_versions(workdir)
        target = versions[-2] if current == versions[-1] else versions[-1]
        return [*cli, "promote", "--config", str(cfg), str(target)]

    return [
        ('python -c "import json"', lambda: [py, "-c", "import json"]),
        ("mergewatch --help", lambda: [*cli, "--help"]),
        ("mergewatch status --help", lambda: [*cli, "status", "--help"]),
        ("mergewatch status", lambda: [*cli, "status", "--config", str(cfg)]),
        ("mergewatch status --json", lambda: [*cli, "status", "--config", str(cfg), "--json"]),
        ("mergewatch submit", lambda: [*cli, "submit", "--config", str(cfg), str(expert), "--task", "bench",
                                       "--name", f"bench-{next(counter)}.safetensors"]),
        ("mergewatch rollback", rollback_target),
        ("mergewatch promote", promote_target),
        ('python -c "import torch"', lambda: [py, "-c", "import torch"]),
        ('python -c "import torch, open_clip"', lambda: [py, "-c", "import torch, open_clip"]),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7, help="runs per case; the median counts (default 7)")
    ap.add_argument("--json", help="also write the results as JSON to this file")
    ns = ap.parse_args()
    if ns.repeat < 1:
        ap.error("--repeat must be >= 1")

    t0 = time.perf_counter()
    cfg = setup(WORKDIR)
    print(f"workspace: mergewatch demo in {WORKDIR.relative_to(REPO)} ({time.perf_counter() - t0:.1f} s, not measured)")
    make_argv = cases(cfg, WORKDIR)
    times: dict[str, list[float]] = {label: [] for label, _ in make_argv}
    for _ in range(ns.repeat):  # interleaved, so a busy moment of the machine hits every case alike
        for label, argv in make_argv:
            times[label].append(timed(argv()))
    medians = {label: statistics.median(ts) for label, ts in times.items()}
    ref = medians['python -c "import json"']
    rows = [(label, f"{medians[label] * 1000:.0f}", f"{min(ts) * 1000:.0f}", f"{medians[label] / ref:.2f}")
            for label, ts in times.items()]
    print(f"\n{ns.repeat} runs per case, each a fresh subprocess; median and fastest wall time")
    print(fmt_table(["case", "median ms", "min ms", "median / import json"], rows))
    status = medians["mergewatch status --json"]
    heavy = medians['python -c "import torch, open_clip"']
    print("\nRATIOS")
    print(f"  status --json / import json        {status / ref:.2f}")
    print(f"  status --json seconds              {status:.3f} (goal: well under {STATUS_GOAL_SECONDS:.0f} s on an idle machine)")
    print(f"  import torch, open_clip / status   {heavy / status:.1f} (what a verb importing them would pay on top)")
    if ns.json:
        Path(ns.json).write_text(json.dumps({"repeat": ns.repeat, "seconds": times, "median": medians, "reference": ref}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
