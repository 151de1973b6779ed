"""The daemon as a real process: inbox → merged → published, metrics over HTTP, bad input, bursts,
lost events (DESIGN §3). Crash safety is in test_crash.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from mergewatch.checkpoint.writer import write_checkpoint, write_safetensors_file
from mergewatch.daemon.inbox import submit
from mergewatch.deploy.loader import load_current
from tests.daemon_support import (
    REPO,
    DaemonProcess,
    current,
    fetch_metrics,
    free_port,
    ledger_rows,
    metric_value,
    read_ledger,
    wait_for,
    write_config,
)
from tests.helpers import load_all, make_expert, make_open_clip_base, perturb


@pytest.fixture
def setup(tmp_path):
    base = make_open_clip_base(tmp_path / "base.safetensors")
    return tmp_path, base


def promtool() -> str | None:
    return os.environ.get("MERGEWATCH_PROMTOOL") or shutil.which("promtool")


def test_end_to_end_five_experts(setup):
    tmp, base = setup
    port = free_port()
    cfg = write_config(tmp, port=port)
    d = DaemonProcess(cfg)
    try:
        d.wait_ready()
        experts = [make_expert(base, tmp / "src" / f"task{i}.safetensors", seed=i) for i in range(1, 6)]
        for i, e in enumerate(experts, 1):
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            if i == 1:  # the producer command, as a user runs it, with a sidecar
                r = subprocess.run(
                    [sys.executable, "-m", "mergewatch.cli", "submit", "--config", str(cfg), str(e), "--task", "task1"],
                    env=env, capture_output=True, text=True, timeout=120,
                )
                assert r.returncode == 0, r.stderr
            else:
                submit(e, tmp / "ws" / "inbox", meta={"task": f"task{i}"})
        wait_for(lambda: [r.status for r in ledger_rows(tmp / "ws")] == ["merged"] * 5, 120, "5 merged")
        ws = tmp / "ws"
        rows = ledger_rows(ws)
        assert [r.status for r in rows] == ["merged"] * 5
        assert [r.step for r in rows] == [1, 2, 3, 4, 5]
        assert rows[0].meta == {"task": "task1"} and rows[4].meta == {"task": "task5"}
        for v in range(1, 6):
            man = json.loads((ws / "deploy" / str(v) / "MANIFEST.json").read_text())
            assert man["step"] == v and man["experts"] == [r.id for r in rows[:v]]
        assert os.readlink(ws / "deploy" / "current") == "5"
        loaded = load_current(ws / "deploy", verify=True)
        assert loaded.version == 5
        assert list((ws / "inbox").iterdir()) == []  # claimed: moved into the store, sidecars recorded
        text = fetch_metrics(port)
        assert metric_value(text, "mergewatch_experts_total", 'outcome="merged",reason=""') == 5.0
        assert metric_value(text, "mergewatch_step") == 5.0
        assert metric_value(text, "mergewatch_current_version", 'view="deploy"') == 5.0
        assert metric_value(text, "mergewatch_merge_duration_seconds_count") == 5.0
        assert metric_value(text, "mergewatch_queue_depth") == 0.0
        tool = promtool()
        if tool:
            r = subprocess.run([tool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stdout + r.stderr
        st = subprocess.run(
            [sys.executable, "-m", "mergewatch.cli", "status", "--config", str(cfg), "--json"],
            env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120,
        )
        data = json.loads(st.stdout)
        assert data["deploy"]["current"] == 5 and data["queue"] == 0
        assert {e["status"] for e in data["experts"]} == {"merged"}
        # every state change is a JSON log line with bound context
        merged_lines = [l for l in d.lines() if l.get("event") == "merged"]
        assert len(merged_lines) == 5 and all("expert_id" in l and "step" in l for l in merged_lines)
    finally:
        rc = d.stop()
    assert rc == 0, d.log()


def _nan_expert(base: dict) -> dict:
    sd = perturb(base, 99)
    k = "visual.transformer.resblocks.0.attn.in_proj_weight"
    sd[k] = sd[k].clone()
    sd[k][0, 0] = float("nan")
    return sd


def test_bad_input_while_running(setup):
    tmp, base_path = setup
    base = load_all(base_path)
    port = free_port()
    cfg = write_config(tmp, port=port)
    inbox = tmp / "ws" / "inbox"
    d = DaemonProcess(cfg)
    try:
        d.wait_ready()
        src = tmp / "src"
        src.mkdir()
        good = [make_expert(base_path, src / f"good{i}.safetensors", seed=i) for i in range(3)]
        raw = good[0].read_bytes()
        bad = {
            "truncated.safetensors": raw[: len(raw) // 2],
            "zero.safetensors": b"",
            "corrupt-header.safetensors": raw[:8] + b"{not json" + raw[17:],
        }
        submit(good[0], inbox, name="good one with spaces.safetensors")
        for name, data in bad.items():
            (src / name).write_bytes(data)
            submit(src / name, inbox)
        wrong = {k: (v[:-1] if v.ndim and v.shape[0] > 1 else v) for k, v in perturb(base, 5).items()}
        write_safetensors_file(src / "wrong-shapes.safetensors", wrong)
        submit(src / "wrong-shapes.safetensors", inbox)
        write_safetensors_file(src / "nan.safetensors", _nan_expert(base))
        submit(src / "nan.safetensors", inbox)
        torch.save({"w": torch.zeros(3)}, src / "pickle.pt")
        submit(src / "pickle.pt", inbox, name="pickled.safetensors")
        outside = tmp / "outside.safetensors"
        shutil.copy(good[1], outside)
        os.symlink(outside, inbox / "link.safetensors")
        submit(good[1], inbox, name="ünïcødé..name.safetensors")
        # a sharded directory without its marker is waited for, not taken
        nomarker = inbox / "sharded-no-marker"
        write_checkpoint(tmp / "stage-sharded", perturb(base, 7), shard_bytes=40_000)
        shutil.copytree(tmp / "stage-sharded", nomarker)
        # broken sidecars: the drop and its sidecar go to rejected/ together, with the JSON error
        (inbox / "sidecar-syntax.json").write_text('{"task": "a",\n}', "utf-8")
        submit(good[1], inbox, name="sidecar-syntax.safetensors")
        (inbox / "sidecar-type.json").write_text('{"task": 3, "colour": "red"}', "utf-8")
        submit(good[1], inbox, name="sidecar-type.safetensors")
        submit(good[2], inbox, name="good-last.safetensors", meta={"task": "last", "tags": ["x"]})
        rejected = tmp / "ws" / "rejected"
        expected_rejects = {*bad, "wrong-shapes.safetensors", "nan.safetensors", "pickled.safetensors", "link.safetensors",
                            "sidecar-syntax.safetensors", "sidecar-type.safetensors"}
        wait_for(lambda: sum(r.status == "merged" for r in ledger_rows(tmp / "ws")) == 3 and all((rejected / f"{n}.reason.txt").exists() for n in expected_rejects), 120, "3 merged + rejects")
        reasons = {n: (rejected / f"{n}.reason.txt").read_text() for n in expected_rejects}
        assert "truncated" in reasons["truncated.safetensors"]
        assert "too short" in reasons["zero.safetensors"] or "empty" in reasons["zero.safetensors"]
        assert "JSON" in reasons["corrupt-header.safetensors"] or "header" in reasons["corrupt-header.safetensors"]
        assert "shape mismatch" in reasons["wrong-shapes.safetensors"]
        assert "NaN" in reasons["nan.safetensors"]
        assert "pickle" in reasons["pickled.safetensors"]
        assert "symlink" in reasons["link.safetensors"]
        assert "not valid JSON" in reasons["sidecar-syntax.safetensors"] and "line 2, column 1" in reasons["sidecar-syntax.safetensors"]
        assert "field 'task' must be a string" in reasons["sidecar-type.safetensors"] and "unknown field 'colour'" in reasons["sidecar-type.safetensors"]
        for n in ("sidecar-syntax", "sidecar-type"):  # the sidecar travels with its drop
            assert (rejected / f"{n}.safetensors.json").is_file() and not (inbox / f"{n}.json").exists()
        for n in expected_rejects:  # moved, not deleted
            assert (rejected / n).exists() or (rejected / n).is_symlink()
        assert outside.exists()
        rows = ledger_rows(tmp / "ws")
        merged = [r.name for r in rows if r.status == "merged"]
        assert merged == ["good one with spaces.safetensors", "ünïcødé..name.safetensors", "good-last.safetensors"]
        # the full reason and its class everywhere: ledger, reason file, status --json, log, metric label
        classes = {"truncated.safetensors": "truncated", "zero.safetensors": "truncated", "corrupt-header.safetensors": "header",
                   "wrong-shapes.safetensors": "shape", "nan.safetensors": "nonfinite", "pickled.safetensors": "pickle",
                   "link.safetensors": "symlink", "sidecar-syntax.safetensors": "sidecar", "sidecar-type.safetensors": "sidecar"}
        by_name = {r.name: r for r in rows if r.status == "rejected"}
        assert {n: by_name[n].reason_class for n in classes} == classes
        shapes = by_name["wrong-shapes.safetensors"]
        assert len(shapes.problems) == 49 and all(p.startswith("shape mismatch") for p in shapes.problems)  # all, not the first 50 lines' worth
        assert shapes.reason.splitlines()[0] == "expert is incompatible with the base (49 problem(s)):"
        assert all(p in shapes.reason and p in reasons["wrong-shapes.safetensors"] for p in shapes.problems)
        st = subprocess.run([sys.executable, "-m", "mergewatch.cli", "status", "--config", str(cfg), "--json"],
                            env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
        listed = {e["name"]: e for e in json.loads(st.stdout)["rejected"]}
        assert listed["wrong-shapes.safetensors"]["problems"] == shapes.problems
        assert listed["wrong-shapes.safetensors"]["reason_class"] == "shape"
        events = {l["name"]: l for l in d.lines() if l.get("event") == "rejected"}
        assert events["wrong-shapes.safetensors"]["problems"] == shapes.problems and events["wrong-shapes.safetensors"]["reason_class"] == "shape"
        text = fetch_metrics(port)
        for klass in set(classes.values()):
            assert metric_value(text, "mergewatch_experts_total", f'outcome="rejected",reason="{klass}"') == list(classes.values()).count(klass), klass
        # a claimed drop's sidecar is moved beside it in the store (never deleted)
        last = next(r for r in rows if r.name == "good-last.safetensors")
        assert last.meta == {"task": "last", "tags": ["x"]}
        assert json.loads((tmp / "ws" / "store" / f"{last.id}.sidecar.json").read_text()) == last.meta
        assert nomarker.is_dir()  # still waiting
        (nomarker / "_SUCCESS").write_text("")
        wait_for(lambda: sum(r.status == "merged" for r in ledger_rows(tmp / "ws")) == 4, 60, "marker-completed directory merged")
        assert ledger_rows(tmp / "ws")[-1].name == "sharded-no-marker"
        # a duplicate is recorded and moved aside, not merged twice
        submit(good[2], inbox, name="again.safetensors")
        wait_for(lambda: any(r.status == "duplicate" for r in ledger_rows(tmp / "ws")), 60, "duplicate recorded")
        assert current(tmp / "ws") == 4
        assert (rejected / "again.safetensors").exists()
    finally:
        rc = d.stop()
    assert rc == 0, d.log()


def test_burst_of_fifty_in_arrival_order(setup):
    tmp, base_path = setup
    base = load_all(base_path)
    cfg = write_config(tmp, publish="keep = 3")
    src = tmp / "src"
    src.mkdir()
    names = []
    for i in range(50):
        p = src / f"b{i:02d}.safetensors"
        sd = {k: (v + 0.001 * (i + 1) if v.dtype.is_floating_point else v) for k, v in base.items()}
        write_safetensors_file(p, sd)
        names.append(p.name)
    d = DaemonProcess(cfg)
    try:
        d.wait_ready()
        order = list(names)
        order[10], order[11] = order[11], order[10]  # arrival order, not name order
        for n in order:
            submit(src / n, tmp / "ws" / "inbox")
        wait_for(lambda: sum(r.status == "merged" for r in ledger_rows(tmp / "ws")) == 50, 300, "50 merged", interval=0.5)
        rows = ledger_rows(tmp / "ws")
        assert [r.name for r in rows] == order
        assert [r.step for r in rows] == list(range(1, 51))
        assert len({r.id for r in rows}) == 50
        assert sorted(int(p.name) for p in (tmp / "ws" / "deploy").iterdir() if p.name.isdigit()) == [48, 49, 50]
    finally:
        rc = d.stop()
    assert rc == 0


def test_lost_events_found_by_scans(setup):
    tmp, base_path = setup
    # events off: only the startup scan and the periodic rescan can find drops
    cfg = write_config(tmp, watch="events = false")
    inbox = tmp / "ws" / "inbox"
    inbox.mkdir(parents=True)
    src = tmp / "src"
    early = make_expert(base_path, src / "while-down.safetensors", seed=1)
    submit(early, inbox)  # placed while the daemon is down
    d = DaemonProcess(cfg)
    try:
        d.wait_ready()
        wait_for(lambda: [r.status for r in ledger_rows(tmp / "ws")] == ["merged"], 60, "startup scan")
        late = make_expert(base_path, src / "no-event.safetensors", seed=2)
        # written in place (no rename), no observer: the rescan + quiet period must find it
        shutil.copyfile(late, inbox / "no-event.safetensors")
        wait_for(lambda: [r.status for r in ledger_rows(tmp / "ws")] == ["merged"] * 2, 60, "periodic rescan")
        assert [r.name for r in ledger_rows(tmp / "ws")] == ["while-down.safetensors", "no-event.safetensors"]
    finally:
        rc = d.stop()
    assert rc == 0


def test_sighup_reload_and_polling_observer(setup):
    tmp, base_path = setup
    cfg = write_config(tmp, watch="polling = true", publish="keep = 10")
    d = DaemonProcess(cfg)
    try:
        d.wait_ready()
        submit(make_expert(base_path, tmp / "src" / "a.safetensors", seed=1), tmp / "ws" / "inbox")
        wait_for(lambda: current(tmp / "ws") == 1, 60, "merged with the polling observer")
        text = cfg.read_text().replace("keep = 10", "keep = 2")
        cfg.write_text(text)
        d.proc.send_signal(1)  # SIGHUP
        wait_for(lambda: '"reloaded"' in d.log(), 30, "reload")
        cfg.write_text(text.replace('deploy = "ema"', 'deploy = "all"'))
        d.proc.send_signal(1)
        wait_for(lambda: '"reload_refused"' in d.log(), 30, "policy change refused")
        assert d.proc.poll() is None
    finally:
        rc = d.stop()
    assert rc == 0


NINO_GNN = REPO.parent / "shared" / "nino" / "checkpoints" / "nino_no_posw.pt"


@pytest.mark.parametrize("policy", [
    'deploy = "opcm"',
    'deploy = "nufilt"\nsvd = "randomized"\nr_p = 8',  # Δ's subspaces prepared ahead, seeded
    'deploy = "wudi"\nsolver = "exact"',
    f'deploy = "metamerge_gnn"\ncheckpoint = "{NINO_GNN}"\nheads = 2\nsubgraph = true',
])
def test_dfcmm_methods_run_in_the_daemon(setup, policy):
    """The data-free methods (and MetaMerge's GNN variant) run in the daemon with their state
    persisted: the daemon (restarted once mid-stream) publishes exactly what the batch engine computes."""
    if "metamerge_gnn" in policy and not NINO_GNN.is_file():
        pytest.skip(f"{NINO_GNN} is absent (the NiNo checkpoints live in ../shared/nino/)")
    from mergewatch import config
    from mergewatch.checkpoint.hashing import content_sha256
    from mergewatch.checkpoint.reader import LazyCheckpoint
    from mergewatch.workspace import Workspace

    tmp, base_path = setup
    port = free_port()
    cfg = write_config(tmp, policy=f'init = "zs"\n{policy}', port=port)
    experts = [make_expert(base_path, tmp / "src" / f"m{i}.safetensors", seed=40 + i) for i in range(3)]
    d = DaemonProcess(cfg)
    try:
        d.wait_ready()
        submit(experts[0], tmp / "ws" / "inbox")
        wait_for(lambda: [r.status for r in ledger_rows(tmp / "ws")] == ["merged"], 60, "first merged")
    finally:
        assert d.stop() == 0
    d = DaemonProcess(cfg)
    try:
        d.wait_ready()
        # the last-success gauge survives the restart: it is the ledger's last publish
        published = read_ledger(tmp / "ws", lambda led: led.steps(limit=1))[0]["published_at"]
        assert metric_value(fetch_metrics(port), "mergewatch_last_success_timestamp_seconds") == pytest.approx(published, abs=1e-3)
        for e in experts[1:]:
            submit(e, tmp / "ws" / "inbox")
        wait_for(lambda: [r.status for r in ledger_rows(tmp / "ws")] == ["merged"] * 3, 120, "all merged")
    finally:
        assert d.stop() == 0
    ref = tmp / "ref"
    ref.mkdir()
    (ref / "base.safetensors").symlink_to(base_path)
    ws = Workspace(config.load(write_config(ref, policy=f'init = "zs"\n{policy}')))
    for e in experts:
        ws.merge(e)
    got = LazyCheckpoint(tmp / "ws" / "deploy" / "3")
    assert content_sha256(got) == content_sha256(LazyCheckpoint(ws.publishers["deploy"].path(3)))


def test_opcm_prepares_the_next_step_when_idle(setup):
    """After a publish, with nothing queued, the daemon computes OPCM's SVDs of the new state ahead
    (``prepared``); the next step uses them (``merged`` with prepared="used") and its deploy
    equals the batch engine's, which computes the SVDs inside the step."""
    from mergewatch import config
    from mergewatch.checkpoint.hashing import content_sha256
    from mergewatch.checkpoint.reader import LazyCheckpoint
    from mergewatch.workspace import Workspace

    tmp, base_path = setup
    port = free_port()
    cfg = write_config(tmp, port=port, policy='init = "zs"\ndeploy = "opcm"')
    experts = [make_expert(base_path, tmp / "src" / f"o{i}.safetensors", seed=70 + i) for i in range(2)]
    d = DaemonProcess(cfg)
    try:
        d.wait_ready()
        for i, e in enumerate(experts, 1):
            submit(e, tmp / "ws" / "inbox")
            wait_for(lambda: any(l.get("event") == "prepared" and l.get("step") == i for l in d.lines()), 60, f"prepared {i}")
        assert (tmp / "ws" / "state" / "2" / "prepared" / "prepared.json").is_file()
        merged = [l for l in d.lines() if l.get("event") == "merged"]
        assert [l["prepared"] for l in merged] == ["none", "used"]
        assert metric_value(fetch_metrics(port), "mergewatch_prepare_duration_seconds_count") == 2.0
    finally:
        assert d.stop() == 0
    ref = tmp / "ref"
    ref.mkdir()
    (ref / "base.safetensors").symlink_to(base_path)
    ws = Workspace(config.load(write_config(ref, policy='init = "zs"\ndeploy = "opcm"')))
    for e in experts:
        ws.merge(e)
    assert content_sha256(LazyCheckpoint(tmp / "ws" / "deploy" / "2")) == content_sha256(LazyCheckpoint(ws.publishers["deploy"].path(2)))
