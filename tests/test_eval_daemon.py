"""Evaluation in the real daemon (subprocess): EVAL.json + ledger rows per version, ACC/BWT gauges,
status --json, merges not waiting for a slow evaluator, and the deploy gate."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from mergewatch.daemon.inbox import submit
from mergewatch.ledger import Ledger
from tests.daemon_support import REPO, DaemonProcess, current, fetch_metrics, metric_value, read_ledger, wait_for, write_config
from tests.eval_support import eval_toml, labelled_by_base, write_eval_clip, write_expert
from tests.helpers import load_all


def _status(cfg) -> dict:
    out = subprocess.run([sys.executable, "-m", "mergewatch.cli", "status", "--config", str(cfg), "--json"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _evaluations(ws) -> list[dict]:
    return read_ledger(ws, Ledger.evaluations)


def _ok(ws, view: str, version: int) -> dict | None:
    rows = [r for r in _evaluations(ws) if (r["view"], r["version"]) == (view, version) and r["metrics"]["status"] == "ok"]
    return rows[-1] if rows else None


def _port(cfg) -> int:
    import tomllib

    return int(tomllib.loads(cfg.read_text())["metrics"]["listen"].rsplit(":", 1)[1])


def test_daemon_evaluates_every_published_version(tmp_path):
    base, clip = write_eval_clip(tmp_path)
    tasks = ["t1", "t2", "t3", "zs"]
    for i, t in enumerate(tasks):
        labelled_by_base(tmp_path, base, clip, t, n=12, seed=i)
    cfg = write_config(tmp_path, extra=eval_toml(tasks, held_out=("zs",)))
    ws = tmp_path / "ws"
    state = load_all(base)
    d = DaemonProcess(cfg)
    try:
        d.wait_ready()
        for i, t in enumerate(tasks[:3]):
            e = write_expert(state, tmp_path / f"{t}.safetensors.src", seed=10 + i, scale=0.01)
            submit(e, ws / "inbox", name=f"{t}.safetensors")
        wait_for(lambda: all((ws / "deploy" / str(v) / "EVAL.json").is_file() for v in (1, 2, 3)), 240, "EVAL.json of 3 versions")
        wait_for(lambda: _ok(ws, "deploy", 3), 30, "ledger row of version 3")
        rows = {(r["view"], r["version"]): r for r in _evaluations(ws) if r["metrics"]["status"] == "ok"}
        assert set(rows) == {("base", 0), ("deploy", 1), ("deploy", 2), ("deploy", 3)}
        assert rows[("base", 0)]["metrics"]["tasks"]["t1"]["accuracy"] == 1.0  # labels are θ0's own predictions
        r3 = rows[("deploy", 3)]["metrics"]
        assert r3["task_order"] == ["t1", "t2", "t3"] and r3["bwt_denominator"] == 2
        assert r3["acc"] == sum(r3["tasks"][t]["accuracy"] for t in ("t1", "t2", "t3")) / 3
        assert r3["a_zs"] == r3["tasks"]["zs"]["accuracy"]
        doc = json.loads((ws / "deploy" / "3" / "EVAL.json").read_text())
        assert doc["version"] == 3 and doc["step"] == 3 and doc["acc"] == r3["acc"] and doc["tasks"] == r3["tasks"]

        text = wait_for(lambda: (t := fetch_metrics(_port(cfg))) and metric_value(t, "mergewatch_evaluations_total", 'outcome="ok"') == 4 and t, 30, "eval metrics")
        policy = 'policy="time-ema-ema-wa"'
        assert abs(metric_value(text, "mergewatch_acc", policy) - r3["acc"]) < 1e-9
        assert abs(metric_value(text, "mergewatch_bwt", policy) - r3["bwt"]) < 1e-9
        assert metric_value(text, "mergewatch_evaluate_duration_seconds_count") == 4
        st = _status(cfg)
        assert st["eval"]["3"]["acc"] == r3["acc"] and st["eval"]["3"]["tasks"]["t2"] == r3["tasks"]["t2"]["accuracy"]
        assert st["eval"]["base"]["status"] == "ok"
        assert any(line.get("event") == "evaluated" and line.get("version") == 3 for line in d.lines())
    finally:
        assert d.stop() == 0, d.log()


SLOW_PLUGIN = '''
import pathlib
import time

def evaluate(model_view, task, settings):
    marker = pathlib.Path(__file__).with_name("fail_next")
    if marker.exists():  # one failure on demand: the scheduler must retry it
        marker.unlink()
        raise RuntimeError("flaky evaluation")
    time.sleep(6.0)
    return {"accuracy": 0.5, "n": 1}
'''


def test_a_merge_does_not_wait_for_a_slow_evaluation_and_failures_are_retried(tmp_path):
    from tests.helpers import make_expert, make_open_clip_base

    base = make_open_clip_base(tmp_path / "base.safetensors")
    (tmp_path / "slowplug.py").write_text(SLOW_PLUGIN, "utf-8")
    (tmp_path / "p.jsonl").write_text('{"text": "x", "label": 0}\n', "utf-8")
    (tmp_path / "p.classes.txt").write_text("a\nb\n", "utf-8")
    extra = '[eval]\nevaluator = "plugin"\nplugin = "slowplug:evaluate"\nretry_seconds = 1.0\n[[eval.tasks]]\nname = "p"\ndata = "p.jsonl"\n'
    cfg = write_config(tmp_path, extra=extra)
    ws = tmp_path / "ws"
    d = DaemonProcess(cfg, env={"PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path}"})
    try:
        d.wait_ready()
        submit(make_expert(base, tmp_path / "e1.src", seed=1), ws / "inbox", name="e1.safetensors")
        wait_for(lambda: (ws / "deploy" / "1").is_dir(), 120, "version 1")
        submit(make_expert(base, tmp_path / "e2.src", seed=2), ws / "inbox", name="e2.safetensors")
        wait_for(lambda: (ws / "deploy" / "2").is_dir(), 120, "version 2")
        # θ0 is evaluated first (6 s), then version 1 (6 s): version 2 was merged and published meanwhile
        assert not (ws / "deploy" / "1" / "EVAL.json").exists()
        assert _ok(ws, "deploy", 1) is None
        (tmp_path / "fail_next").touch()  # the next evaluation to start (θ0's, version 1's or 2's) fails once
        wait_for(lambda: all((ws / "deploy" / str(v) / "EVAL.json").is_file() for v in (1, 2)), 120, "evaluation of versions 1, 2")
        wait_for(lambda: _ok(ws, "base", 0), 60, "evaluation of θ0")
        attempts: dict = {}
        for r in _evaluations(ws):
            attempts.setdefault((r["view"], r["version"]), []).append(r["metrics"]["status"])
        assert sorted(attempts.values()) == [["failed", "ok"], ["ok"], ["ok"]], attempts  # retried by the scheduler
        text = fetch_metrics(_port(cfg))
        assert metric_value(text, "mergewatch_evaluations_total", 'outcome="failed"') == 1
        assert any(line.get("event") == "evaluation_failed" and "flaky" in line.get("error", "") for line in d.lines())
        led = Ledger(ws / "ledger.sqlite", readonly=True)
        try:
            published_2 = {s["step"]: s for s in led.steps()}[2]["published_at"]
        finally:
            led.close()
        assert published_2 < _ok(ws, "deploy", 1)["created_at"]
    finally:
        assert d.stop() == 0, d.log()


def test_deploy_gate_holds_back_a_destroyed_expert(tmp_path):
    base, clip = write_eval_clip(tmp_path)
    for i, t in enumerate(("t1", "t2")):
        labelled_by_base(tmp_path, base, clip, t, n=12, seed=i)
    cfg = write_config(tmp_path, policy='init = "ft"\ndeploy = "ft"', extra=eval_toml(["t1", "t2"], extra="gate_max_drop = 0.2"))
    ws = tmp_path / "ws"
    state = load_all(base)
    d = DaemonProcess(cfg)
    try:
        d.wait_ready()
        submit(write_expert(state, tmp_path / "a.src", seed=1, scale=0.002), ws / "inbox", name="t1.safetensors")
        wait_for(lambda: current(ws) == 1, 180, "version 1 current after its evaluation")
        # A large random task vector: published as version 2, never made current
        submit(write_expert(state, tmp_path / "b.src", seed=2, scale=2.0), ws / "inbox", name="t2.safetensors")
        row = wait_for(lambda: _ok(ws, "deploy", 2), 180, "evaluation of version 2")
        assert row["metrics"]["held_back"], row
        assert (ws / "deploy" / "2" / "MANIFEST.json").is_file() and current(ws) == 1
        st = _status(cfg)
        held = st["gate"]["held_back"]
        assert [h["version"] for h in held] == [2] and "below the current version" in held[0]["reason"]
        text = fetch_metrics(_port(cfg))
        assert metric_value(text, "mergewatch_deploy_held_back", 'policy="time-ft-ft-wa"') == 1
        assert metric_value(text, "mergewatch_gate_held_back_total") == 1
        assert metric_value(text, "mergewatch_latest_version", 'view="deploy"') == 2
        assert any(line.get("event") == "held_back" for line in d.lines())
        # the next good expert passes the gate
        submit(write_expert(state, tmp_path / "c.src", seed=3, scale=0.002), ws / "inbox", name="t2b.safetensors")
        wait_for(lambda: current(ws) == 3, 180, "version 3 current")
        assert _status(cfg)["gate"]["held_back"] == []
    finally:
        assert d.stop() == 0, d.log()
