"""The daemon's process tree, by the real daemon as a subprocess: its children (the evaluation worker
and multiprocessing's resource tracker) exit within seconds of its death, a SIGKILL included, and a
clean stop logs no error (issue 14)."""

from __future__ import annotations

import os
import signal
import time

import psutil

from mergewatch.daemon.inbox import submit
from tests.daemon_support import REPO, DaemonProcess, wait_for, write_config
from tests.helpers import make_expert

# A plugin evaluation that runs until it is killed; it says when it has started.
ENDLESS_PLUGIN = '''
import pathlib
import time

def evaluate(model_view, task, settings):
    pathlib.Path(__file__).with_name("evaluating").touch()
    time.sleep(600)
    return {"accuracy": 0.5, "n": 1}
'''

PLUGIN_EVAL = '[eval]\nevaluator = "plugin"\nplugin = "endless:evaluate"\n[[eval.tasks]]\nname = "p"\ndata = "p.jsonl"\n'


def _gone(p: psutil.Process) -> bool:
    try:
        return p.status() == psutil.STATUS_ZOMBIE  # exited, waiting for its new parent to reap it
    except psutil.NoSuchProcess:
        return True


def _kill_all(procs: list[psutil.Process]) -> None:
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def test_children_exit_within_seconds_of_a_sigkill_of_the_daemon(tmp_path, tiny_base):
    (tmp_path / "endless.py").write_text(ENDLESS_PLUGIN, "utf-8")
    (tmp_path / "p.jsonl").write_text('{"text": "x", "label": 0}\n', "utf-8")
    (tmp_path / "p.classes.txt").write_text("a\nb\n", "utf-8")
    d = DaemonProcess(write_config(tmp_path, extra=PLUGIN_EVAL), env={"PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path}"})
    tree: list[psutil.Process] = []
    try:
        d.wait_ready()
        wait_for(lambda: (tmp_path / "evaluating").exists(), 120, "θ0's evaluation running in the worker")
        tree = psutil.Process(d.proc.pid).children(recursive=True)
        cmdlines = [" ".join(p.cmdline()) for p in tree]
        assert any("spawn_main" in c for c in cmdlines), cmdlines  # the evaluation worker
        assert any("resource_tracker" in c for c in cmdlines), cmdlines
        os.kill(d.proc.pid, signal.SIGKILL)
        d.proc.wait(10)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 10 and not all(_gone(p) for p in tree):
            time.sleep(0.1)
        alive = [(p.pid, c) for p, c in zip(tree, cmdlines) if not _gone(p)]
        assert not alive, f"still alive 10 s after the daemon's SIGKILL: {alive}"
        assert "leaked" not in d.log()  # jobs and results use no semaphores: the tracker had nothing to clean up
    finally:
        _kill_all(tree)
        d.kill()


def _problems(d: DaemonProcess) -> list[str]:
    """Log lines a clean stop must not have: any error, and watchdog's warnings."""
    out = []
    for line in d.lines():
        level = line.get("level")
        if level in ("error", "critical") or (level == "warning" and str(line.get("logger", "")).startswith("watchdog")):
            out.append(str(line))
    out += [line for line in d.log().splitlines() if not line.startswith("{") and line.strip()]  # tracebacks, warnings
    return out


def test_a_clean_stop_logs_no_error(tmp_path, tiny_base):
    cfg = write_config(tmp_path)
    inbox = tmp_path / "ws" / "inbox"
    for cycle in range(3):
        d = DaemonProcess(cfg)
        try:
            d.wait_ready()
            name = f"e{cycle}.safetensors"
            submit(make_expert(tiny_base, tmp_path / f"{name}.src", seed=cycle), inbox, name=name)
            wait_for(lambda: (tmp_path / "ws" / "deploy" / str(cycle + 1)).is_dir(), 120, f"version {cycle + 1}")
            # A file leaving the inbox right before the stop: watchdog holds its unmatched IN_MOVED_FROM
            # for 0.5 s, so the observer is stopped while an emitter still has an event to deliver.
            (inbox / ".leaving.tmp").write_bytes(b"x")
            os.rename(inbox / ".leaving.tmp", tmp_path / "left.tmp")
        finally:
            rc = d.stop(60)
        assert rc == 0, d.log()
        assert _problems(d) == [], d.log()
        assert any(line.get("event") == "stopping" for line in d.lines())
