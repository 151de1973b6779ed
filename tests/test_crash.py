"""Crash safety: SIGKILL the daemon at many points of a step, again and again; after the restarts
every expert is merged exactly once and the final model is bit-identical to an uninterrupted run."""

from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path

from mergewatch import config
from mergewatch.checkpoint.hashing import content_sha256
from mergewatch.checkpoint.reader import LazyCheckpoint
from mergewatch.daemon.inbox import submit
from mergewatch.workspace import Workspace
from tests.daemon_support import DaemonProcess, ledger_rows, read_ledger, wait_for, write_config
from tests.helpers import make_expert, make_open_clip_base

POINTS = ["before_claim", "after_claim", "mid_step", "after_commit", "mid_publish", "after_step"]
POLICY = 'init = "ema"\ndeploy = "all"\ntechnique = "ties"\n[policy.ties]\ntrim = "global"'


def _check_published(view_dir: Path) -> list[int]:
    """Every version directory is complete (manifest + files with the right sha256); nothing else
    but the pointers and the hidden work area is visible."""
    versions = []
    for p in view_dir.iterdir():
        if p.name in ("current", "CURRENT", ".staging", ".lock"):
            continue
        assert p.name.isdigit(), f"unexpected entry {p} visible to readers"
        man = json.loads((p / "MANIFEST.json").read_text())
        for name, sha in man["files"].items():
            assert hashlib.sha256((p / name).read_bytes()).hexdigest() == sha, f"{p}/{name}"
        versions.append(int(p.name))
    staging = view_dir / ".staging"
    assert not staging.exists() or not any(staging.iterdir()), list(staging.iterdir())
    return sorted(versions)


def test_sigkill_anywhere_loses_nothing_and_repeats_nothing(tmp_path):
    base = make_open_clip_base(tmp_path / "base.safetensors")
    cfg = write_config(tmp_path, policy=POLICY, publish="keep = 1000")
    inbox = tmp_path / "ws" / "inbox"
    inbox.mkdir(parents=True)
    pool = iter(range(100))
    experts: list[Path] = []

    def top_up() -> None:
        """Keep three experts waiting, so that every restart has work to be killed in (a step
        committed before the last kill is only finished by recovery, it does not run again)."""
        rows = ledger_rows(tmp_path / "ws")
        merged = sum(r.status == "merged" for r in rows)
        while len(experts) - merged < 3:
            i = next(pool)
            e = make_expert(base, tmp_path / "src" / f"e{i:02d}.safetensors", seed=10 + i)
            submit(e, inbox)  # arrival order = submission order
            experts.append(e)
            time.sleep(0.02)

    rng = random.Random(1234)
    kills = 0
    # deterministic kills at every named point of a step, at the first and second time it is
    # reached in a process, plus kills from outside at random moments
    plan = [f"{p}:{n}" for n in (1, 2) for p in POINTS] + ["random"] * 10
    rng.shuffle(plan)
    for spec in plan:
        top_up()
        if spec == "random":
            d = DaemonProcess(cfg)
            d.wait_ready()
            time.sleep(rng.uniform(0.0, 0.8))
            d.kill()
            kills += 1
        else:
            d = DaemonProcess(cfg, env={"MERGEWATCH_CRASH_AT": spec})
            try:
                d.proc.wait(240)  # it kills itself at that point
            except Exception as e:
                raise AssertionError(f"crash point {spec} never reached:\n{d.log()[-3000:]}") from e
            finally:
                d.kill()
            assert d.proc.returncode == -9, (spec, d.log()[-2000:])
            kills += 1
    assert kills >= 20, kills

    d = DaemonProcess(cfg)
    try:
        d.wait_ready()
        wait_for(lambda: sum(r.status == "merged" for r in ledger_rows(tmp_path / "ws")) == len(experts), 120, "all merged")
    finally:
        assert d.stop() == 0

    rows = ledger_rows(tmp_path / "ws")
    n = len(experts)
    assert [r.status for r in rows] == ["merged"] * n, [(r.name, r.status, r.reason) for r in rows]
    assert [r.step for r in rows] == list(range(1, n + 1))
    assert [r.name for r in rows] == [e.name for e in experts]
    ws_dir = tmp_path / "ws"
    deploy_versions = _check_published(ws_dir / "deploy")
    _check_published(ws_dir / "init")
    steps = [json.loads((ws_dir / "deploy" / str(v) / "MANIFEST.json").read_text())["step"] for v in deploy_versions]
    assert steps == list(range(1, n + 1)), "one published version per step, never two"
    # the ledger knows every step's publication, also of a step killed before its rows (after_step)
    books = read_ledger(ws_dir, lambda led: (led.steps(limit=1000), led.db.execute("SELECT version FROM versions WHERE view='deploy'").fetchall()))
    assert sorted((s["step"], s["deploy_version"]) for s in books[0] if s["published_at"]) == list(zip(range(1, n + 1), deploy_versions))
    assert sorted(v[0] for v in books[1]) == deploy_versions

    # the uninterrupted run, in process, same experts in the same order
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    (ref_dir / "base.safetensors").symlink_to(base)
    ref_cfg = write_config(ref_dir, policy=POLICY, publish="keep = 1000")
    ref = Workspace(config.load(ref_cfg))
    for e in experts:
        ref.merge(e)
    for view in ("deploy", "init"):
        got = LazyCheckpoint(ws_dir / view / (ws_dir / view / "CURRENT").read_text().split()[0])
        want = LazyCheckpoint(ref.publishers[view].path(ref.publishers[view].current()))
        assert content_sha256(got) == content_sha256(want), view


def test_sigkill_during_a_prepare_costs_only_time(tmp_path):
    """OPCM's SVDs prepared ahead when idle: a SIGKILL half-way through leaves only staging
    leftovers; the restarted daemon clears them, prepares again, and the next step (which uses
    the prepared factors) publishes exactly what the batch engine computes."""
    policy = 'init = "zs"\ndeploy = "opcm"'
    base = make_open_clip_base(tmp_path / "base.safetensors")
    cfg = write_config(tmp_path, policy=policy)
    experts = [make_expert(base, tmp_path / "src" / f"p{i}.safetensors", seed=90 + i) for i in range(2)]
    ws_dir = tmp_path / "ws"
    d = DaemonProcess(cfg, env={"MERGEWATCH_CRASH_AT": "mid_prepare:1"})
    try:
        d.wait_ready()
        submit(experts[0], ws_dir / "inbox")
        d.proc.wait(120)  # merged, then killed half-way through the prepare
    finally:
        d.kill()
    assert d.proc.returncode == -9, d.log()[-2000:]
    assert [r.status for r in ledger_rows(ws_dir)] == ["merged"]
    assert not (ws_dir / "state" / "1" / "prepared").exists()
    assert any((ws_dir / "state" / ".staging").iterdir())  # the interrupted prepare's leftovers
    d = DaemonProcess(cfg)
    try:
        d.wait_ready()
        wait_for(lambda: any(l.get("event") == "prepared" and l.get("step") == 1 for l in d.lines()), 60, "prepared again")
        submit(experts[1], ws_dir / "inbox")
        wait_for(lambda: [r.status for r in ledger_rows(ws_dir)] == ["merged"] * 2, 60, "second merged")
        assert [l["prepared"] for l in d.lines() if l.get("event") == "merged"] == ["used"]
    finally:
        assert d.stop() == 0
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    (ref_dir / "base.safetensors").symlink_to(base)
    ref = Workspace(config.load(write_config(ref_dir, policy=policy)))
    for e in experts:
        ref.merge(e)
    assert content_sha256(LazyCheckpoint(ws_dir / "deploy" / "2")) == content_sha256(LazyCheckpoint(ref.publishers["deploy"].path(2)))
