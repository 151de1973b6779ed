"""The light verbs answer at once (issue 14): `status`, `status --json`, `submit`, `rollback`,
`promote`, `--help` and `<verb> --help` run in a real subprocess that must not import torch,
open_clip, transformers or numpy. The workspaces they read are real ones, built by the batch
`merge` in this (heavy) test process; only the verb's own process has to stay light."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mergewatch.cli import main
from mergewatch.ledger import Ledger
from tests.eval_support import eval_toml, labelled_by_base, write_eval_clip, write_expert
from tests.helpers import load_all, make_expert, make_open_clip_base

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "open_clip", "transformers", "numpy")
VERBS = ("merge", "eval", "promote", "report", "status", "rollback", "run", "submit", "demo")

#: runs ``mergewatch.cli.main(argv)`` and reports on stderr which heavy modules it imported
PROBE = f"""
import sys
from mergewatch.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
heavy = [m for m in {HEAVY!r} if m in sys.modules]
print("\\nHEAVY=" + ",".join(heavy), file=sys.stderr)
sys.exit(code)
"""


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def light(*argv: str, cwd: Path | None = None) -> tuple[int, str, str]:
    """Run one verb in a fresh interpreter; fails the test if it imported a heavy module."""
    r = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=cwd, env=env(), capture_output=True, text=True, timeout=120)
    err, _, heavy = r.stderr.rpartition("\nHEAVY=")
    assert _ == "\nHEAVY=", f"the probe did not finish: {r.stderr}"
    imported = [m for m in heavy.strip().split(",") if m]
    assert not imported, f"`mergewatch {' '.join(argv)}` imported {imported}"
    return r.returncode, r.stdout, err


# Workspaces ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def merged_template(tmp_path_factory) -> Path:
    """base + two experts merged by the batch CLI (deploy and init versions 1 and 2, a ledger)."""
    d = tmp_path_factory.mktemp("merged")
    base = make_open_clip_base(d / "base.safetensors")
    for i in (1, 2, 3):
        make_expert(base, d / "experts" / f"x{i}.safetensors", seed=i)
    cfg = d / "mw.toml"
    cfg.write_text('workspace = "ws"\nbase = "base.safetensors"\n[policy]\ninit = "ema"\ndeploy = "ema"\n', "utf-8")
    assert main(["merge", "--config", str(cfg), str(d / "experts" / "x1.safetensors"), str(d / "experts" / "x2.safetensors"), "--quiet"]) == 0
    return d


@pytest.fixture
def merged(merged_template, tmp_path) -> Path:
    """A private copy (the verbs change it); the config's paths are relative, so it moves along."""
    d = tmp_path / "merged"
    shutil.copytree(merged_template, d, symlinks=True)
    return d


@pytest.fixture(scope="module")
def gated(tmp_path_factory) -> Path:
    """Evaluated with the deploy gate on: version 2 (a destroyed expert) is held back."""
    d = tmp_path_factory.mktemp("gated")
    base, clip = write_eval_clip(d)
    for i, t in enumerate(("t1", "t2")):
        labelled_by_base(d, base, clip, t, n=12, seed=i)
    state = load_all(base)
    good = write_expert(state, d / "a-t1.safetensors", seed=1, scale=0.002)
    bad = write_expert(state, d / "b-bad.safetensors", seed=2, scale=2.0)
    (d / "b-bad.json").write_text(json.dumps({"task": "t2"}))
    cfg = d / "mw.toml"
    cfg.write_text('workspace = "ws"\nbase = "base.safetensors"\n[policy]\ninit = "ft"\ndeploy = "ft"\n' + eval_toml(["t1", "t2"], extra="gate_max_drop = 0.1"))
    assert main(["merge", "--config", str(cfg), str(good), str(bad), "--quiet"]) == 0
    return d


# The verbs -------------------------------------------------------------------------------------

def test_help_is_light():
    code, out, err = light("--help")
    assert code == 0 and "usage: mergewatch" in out and all(v in out for v in VERBS), err
    for verb in VERBS:  # the help of every verb, the heavy ones too: only the parser is needed
        code, out, err = light(verb, "--help")
        assert code == 0 and f"usage: mergewatch {verb}" in out, err


def test_status_is_light(merged):
    cfg = str(merged / "mw.toml")
    code, out, err = light("status", "--config", cfg, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["step"] == 2 and data["deploy"] == {"current": 2, "versions": [1, 2]} and data["init"]["current"] == 2
    assert [(e["name"], e["status"], e["step"]) for e in data["experts"]] == [("x1.safetensors", "merged", 1), ("x2.safetensors", "merged", 2)]
    code, out, err = light("status", "--config", cfg)
    assert code == 0, err
    assert "step 2" in out and "deploy: current 2  versions [1, 2]" in out and "x2.safetensors" in out


def test_status_without_a_ledger_reads_the_committed_state(merged):
    """A workspace whose ledger is gone: the newest committed state says what was merged."""
    (merged / "ws" / "ledger.sqlite").unlink()
    code, out, err = light("status", "--config", str(merged / "mw.toml"), "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["step"] == 2 and [(e["name"], e["step"]) for e in data["experts"]] == [("x1.safetensors", 1), ("x2.safetensors", 2)]


def test_submit_is_light(merged):
    expert = merged / "experts" / "x3.safetensors"
    code, out, err = light("submit", "--config", str(merged / "mw.toml"), str(expert), "--task", "cars", "--name", "new.safetensors")
    assert code == 0, err
    inbox = merged / "ws" / "inbox"
    assert (inbox / "new.safetensors").read_bytes() == expert.read_bytes()
    assert json.loads((inbox / "new.json").read_text()) == {"task": "cars"}
    assert not [p.name for p in inbox.iterdir() if p.name.startswith(".")]  # no temporary left behind
    code, _, err = light("submit", "--config", str(merged / "mw.toml"), str(merged / "missing.safetensors"))
    assert code == 1 and "missing.safetensors: no such file" in err


def test_rollback_is_light(merged):
    code, out, err = light("rollback", "--config", str(merged / "mw.toml"), "1")
    assert code == 0, err
    assert "version 1 republished as 3" in out
    assert (merged / "ws" / "deploy" / "CURRENT").read_text().split()[0] == "3"
    assert (merged / "ws" / "deploy" / "3" / "model.safetensors").read_bytes() == (merged / "ws" / "deploy" / "1" / "model.safetensors").read_bytes()
    led = Ledger(merged / "ws" / "ledger.sqlite", readonly=True)
    try:
        rows = [tuple(r) for r in led.db.execute("SELECT view, version, step, note FROM versions")]
    finally:
        led.close()
    assert ("deploy", 3, 1, "rollback of 1: operator rollback") in rows


def test_status_and_promote_with_evaluation_and_gate_are_light(gated, tmp_path):
    d = tmp_path / "gated"
    shutil.copytree(gated, d, symlinks=True)
    cfg = str(d / "mw.toml")
    code, out, err = light("status", "--config", cfg)
    assert code == 0, err
    assert "deploy version 2 is held back by the gate" in out and "mergewatch promote 2" in out
    code, out, err = light("status", "--config", cfg, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["eval"]["base"]["status"] == "ok" and [h["version"] for h in data["gate"]["held_back"]] == [2]
    code, out, err = light("promote", "--config", cfg, "2")
    assert code == 0, err
    assert "deploy: version 2 is now current (was 1)" in out
    assert (d / "ws" / "deploy" / "CURRENT").read_text().split()[0] == "2"
    code, _, err = light("promote", "--config", cfg, "9")
    assert code == 1 and "cannot promote version 9" in err


def test_light_verbs_still_check_the_config(merged):
    """Only the policy's strategy and the [eval] files are left unopened; other keys are checked."""
    cfg = merged / "mw.toml"
    cfg.write_text(cfg.read_text() + "[publish]\nkeep = 0\n")
    for argv in (("status",), ("rollback", "1"), ("promote", "1"), ("submit", str(merged / "experts" / "x3.safetensors"))):
        code, _, err = light(argv[0], "--config", str(cfg), *argv[1:])
        assert code == 2 and "publish.keep" in err, (argv, err)


# Empty workspaces and closed pipes -------------------------------------------------------------

def empty_config(tmp: Path) -> Path:
    cfg = tmp / "mw.toml"
    cfg.write_text('workspace = "ws"\nbase = "base.safetensors"\n', "utf-8")
    return cfg


def test_status_of_an_empty_workspace_is_readable(tmp_path):
    cfg = str(empty_config(tmp_path))
    code, out, err = light("status", "--config", cfg)
    assert code == 0, err
    assert "None" not in out
    assert "the workspace does not exist yet" in out
    assert "deploy: no version published yet" in out and "init: no version published yet" in out
    assert "no expert received yet" in out
    (tmp_path / "ws" / "inbox").mkdir(parents=True)  # as the daemon leaves it before the first drop
    Ledger(tmp_path / "ws" / "ledger.sqlite").close()
    code, out, err = light("status", "--config", cfg)
    assert code == 0 and "None" not in out and "does not exist" not in out and "no expert received yet" in out, err
    code, out, err = light("status", "--config", cfg, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["step"] == 0 and data["deploy"] == {"current": None, "versions": []} and data["experts"] == []


def closed_pipe_run(*argv: str) -> subprocess.CompletedProcess:
    """Run ``python -m mergewatch.cli argv`` with stdout a pipe whose reader is already gone."""
    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.run([sys.executable, "-m", "mergewatch.cli", *argv], stdout=w, stderr=subprocess.PIPE, env=env(), text=True, timeout=120)
    finally:
        os.close(w)


def test_a_closed_pipe_ends_quietly(merged):
    cfg = str(merged / "mw.toml")
    for argv in (("status", "--config", cfg, "--json"), ("status", "--config", cfg)):
        p = closed_pipe_run(*argv)
        assert p.returncode == 1 and p.stderr == "", (argv, p.returncode, p.stderr)  # DESIGN §3.6: 1 anything else
    for argv in (("--help",), ("status", "--help")):  # argparse itself ignores a failed write of the help
        p = closed_pipe_run(*argv)
        assert p.returncode in (0, 1) and p.stderr == "", (argv, p.returncode, p.stderr)
    # as a user types it: the reader stops after 10 bytes
    p = subprocess.run(["bash", "-c", f'"{sys.executable}" -m mergewatch.cli status --config "{cfg}" --json | head -c 10'],
                       env=env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout == '{\n  "works' and p.stderr == "", p.stderr
