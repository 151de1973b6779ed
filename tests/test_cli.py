"""The command line as a user runs it: a real subprocess, real files, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from mergewatch.checkpoint.writer import write_safetensors_file
from tests.helpers import load_all, make_expert, make_open_clip_base

REPO = Path(__file__).resolve().parent.parent


def run(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "mergewatch.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def setup(tmp: Path, policy='init = "ema"\ndeploy = "ema"'):
    base = make_open_clip_base(tmp / "base.safetensors")
    (tmp / "experts").mkdir()
    for i in range(1, 4):
        make_expert(base, tmp / "experts" / f"x{i}.safetensors", seed=i)
    cfg = tmp / "mw.toml"
    cfg.write_text(f'workspace = "ws"\nbase = "base.safetensors"\n[policy]\n{policy}\n', "utf-8")
    return cfg


def test_merge_folder_publishes_each_step(tmp_path):
    cfg = setup(tmp_path)
    r = run("merge", "--config", str(cfg), str(tmp_path / "experts"), "--json")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("merged ") == 3
    summary = json.loads(r.stdout[r.stdout.index("["):])
    assert [s["step"] for s in summary] == [1, 2, 3]
    assert (tmp_path / "ws" / "deploy" / "current").resolve().name == "3"
    assert (tmp_path / "ws" / "deploy" / "CURRENT").read_text().split()[0] == "3"
    # not a terminal: no progress bars on stderr
    assert "pass 1/" not in r.stderr
    st = run("status", "--config", str(cfg), "--json")
    data = json.loads(st.stdout)
    assert data["deploy"]["current"] == 3 and data["init"]["current"] == 3
    assert [e["status"] for e in data["experts"]] == ["merged"] * 3


def test_bad_expert_in_batch_is_reported_and_the_rest_merged(tmp_path):
    cfg = setup(tmp_path, 'init = "zs"\ndeploy = "all"')
    bad = tmp_path / "experts" / "x2b-nan.safetensors"
    sd = load_all(tmp_path / "experts" / "x1.safetensors")
    k = next(k for k, v in sd.items() if v.dtype.is_floating_point and v.numel() > 4)
    sd[k] = sd[k].clone()
    sd[k].view(-1)[3] = float("nan")
    write_safetensors_file(bad, sd)
    pickle = tmp_path / "experts" / "x2c.safetensors"
    torch.save({"a": torch.zeros(2)}, pickle)
    r = run("merge", "--config", str(cfg), str(tmp_path / "experts"))
    assert r.returncode == 1
    assert "NaN" in r.stderr and "pickle" in r.stderr
    assert r.stdout.count("merged ") == 3
    # the user's files are untouched
    assert bad.exists() and pickle.exists()


def test_config_error_exits_2_and_names_key(tmp_path):
    cfg = setup(tmp_path, 'init = "zs"\ndeploy = "ft"')
    r = run("merge", "--config", str(cfg), str(tmp_path / "experts"))
    assert r.returncode == 2 and "policy.deploy" in r.stderr


def test_duplicate_and_rollback(tmp_path):
    cfg = setup(tmp_path)
    e1 = str(tmp_path / "experts" / "x1.safetensors")
    assert run("merge", "--config", str(cfg), e1, str(tmp_path / "experts" / "x2.safetensors")).returncode == 0
    r = run("merge", "--config", str(cfg), e1)
    assert r.returncode == 0 and "duplicate" in r.stdout
    from mergewatch.ledger import Ledger

    Ledger(tmp_path / "ws" / "ledger.sqlite").close()  # as the daemon leaves it
    r = run("rollback", "--config", str(cfg), "1")
    assert r.returncode == 0, r.stderr
    cur = (tmp_path / "ws" / "deploy" / "CURRENT").read_text().split()[0]
    assert cur == "3"
    led = Ledger(tmp_path / "ws" / "ledger.sqlite", readonly=True)
    rows = [tuple(r) for r in led.db.execute("SELECT view, version, step, note FROM versions")]
    led.close()
    # the batch CLI records its steps in the ledger too; the rollback is recorded beside them
    assert ("deploy", 3, 1, "rollback of 1: operator rollback") in rows
    assert {(v, n, s) for v, n, s, _ in rows if v == "deploy"} == {("deploy", 1, 1), ("deploy", 2, 2), ("deploy", 3, 1)}
    a, b = load_all(tmp_path / "ws" / "deploy" / "1"), load_all(tmp_path / "ws" / "deploy" / "3")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_batch_demo_runs_without_downloads(tmp_path):
    """`mergewatch demo --batch`: the batch walkthrough (the live loop is tests/test_demo.py)."""
    r = run("demo", "--batch", "--workdir", str(tmp_path / "demo"))
    assert r.returncode == 0, r.stderr
    assert "merged" in r.stdout and "deploy/current -> 3" in r.stdout
    # the published version holds the model's configuration: open_clip rebuilds it from there
    import open_clip

    model = open_clip.create_model(f"local-dir:{tmp_path / 'demo' / 'workspace' / 'deploy' / 'current'}")
    assert model.visual.conv1.weight.shape[-1] == 8


def test_progress_bar_on_a_terminal_only():
    import io

    from mergewatch.cli import Progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty, pipe = Tty(), io.StringIO()
    for stream in (tty, pipe):
        p = Progress(stream=stream)
        for i in range(1, 11):
            p("wa ema", 1, 2, i, 10)
    assert "pass 1/2" in tty.getvalue() and "10/10 tensors" in tty.getvalue()
    assert pipe.getvalue() == ""
