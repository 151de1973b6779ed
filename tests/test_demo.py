"""`mergewatch demo --quick` (issue 17) as a user runs it, a subprocess: the real daemon publishes and
evaluates a version per expert, the experts are fine-tuned from its init view, ACC rises above θ0's,
the report is written, the daemon exits 0 and no process of the demo is left; Ctrl-C at any point
stops everything and leaves a workspace `mergewatch status` reads."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from mergewatch.ledger import Ledger
from tests.daemon_support import REPO, wait_for

REPORT_FILES = ("report.md", "report.html", "acc_bwt.png", "matrix.png", "per_task.png", "ka_zs.png")


def _env(tmp: Path) -> dict:
    """The quick demo must not touch the user's cache (nor download anything): point it elsewhere."""
    return {**os.environ, "PYTHONPATH": str(REPO), "MERGEWATCH_CACHE": str(tmp / "user-cache")}


class Demo:
    """``mergewatch demo --quick`` in its own process group (a terminal's Ctrl-C goes to the group),
    its output in a file, every descendant it ever had remembered (polled while it runs)."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.out_path = workdir.parent / f"{workdir.name}.out"
        self._out = open(self.out_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "mergewatch.cli", "demo", "--quick", "--workdir", str(workdir)],
                                     stdout=self._out, stderr=subprocess.STDOUT, env=_env(workdir.parent), cwd=workdir.parent,
                                     start_new_session=True)
        self.seen: dict[int, psutil.Process] = {}
        self._done = threading.Event()
        self._watch = threading.Thread(target=self._track, daemon=True)
        self._watch.start()

    def _track(self) -> None:
        me = psutil.Process(self.proc.pid)
        while not self._done.is_set():
            try:
                for p in me.children(recursive=True):
                    self.seen.setdefault(p.pid, p)
            except psutil.NoSuchProcess:
                return
            time.sleep(0.05)

    def output(self) -> str:
        return self.out_path.read_text("utf-8", errors="replace")

    def wait(self, timeout: float = 240) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._done.set()
            self._watch.join(5)
            self._out.close()

    def left_behind(self) -> list[str]:
        """Descendants still running a few seconds after the demo ended (zombies count as gone)."""
        def alive(p: psutil.Process) -> bool:
            try:
                return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return False

        end = time.monotonic() + 10
        while time.monotonic() < end and any(alive(p) for p in list(self.seen.values())):
            time.sleep(0.1)
        return [f"{p.pid}: {_cmdline(p)}" for p in list(self.seen.values()) if alive(p)]

    def kill_all(self) -> None:
        for p in [*list(self.seen.values()), psutil.Process(self.proc.pid) if self.proc.poll() is None else None]:
            if p is not None:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass


def _cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:  # gone meanwhile (a finished submit)
        return ""


def _ledger(ws: Path, read):
    with Ledger.snapshot(ws / "ledger.sqlite") as led:
        return read(led)


def _status(cfg: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mergewatch.cli", "status", "--config", str(cfg), "--json"], capture_output=True,
                          text=True, env=_env(cfg.parent.parent), timeout=120)


def test_quick_demo_runs_the_whole_loop(tmp_path):
    from mergewatch.demo_live import QUICK_ADAPTATION, QUICK_HELD_OUT

    workdir = tmp_path / "demo"
    t0 = time.monotonic()
    demo = Demo(workdir)
    try:
        rc = demo.wait(300)
        seconds = time.monotonic() - t0
        out = demo.output()
        assert rc == 0, out
        print(f"mergewatch demo --quick: {seconds:.1f} s")
        ws = workdir / "workspace"

        # a version per expert, each evaluated (EVAL.json beside the weights)
        experts = _ledger(ws, lambda led: led.experts())
        assert [(e.name, e.status, e.step, e.meta.get("task")) for e in experts] == [
            (f"{i:02d}-{t}.safetensors", "merged", i, t) for i, t in enumerate(QUICK_ADAPTATION, 1)]
        for v in range(1, len(QUICK_ADAPTATION) + 1):
            doc = json.loads((ws / "deploy" / str(v) / "EVAL.json").read_text())
            assert doc["version"] == v and set(doc["tasks"]) == {*QUICK_ADAPTATION, QUICK_HELD_OUT}
        # the TIME init axis is real: expert 1 from θ0, expert 2 from the init view the daemon published after step 1
        assert experts[0].meta["parent"].startswith("θ0 ")
        init1 = json.loads((ws / "init" / "1" / "MANIFEST.json").read_text())
        assert experts[1].meta["parent"] == f"init/1 {init1['content_sha256']}"

        # ACC after the last step is above θ0's mean on the adaptation tasks
        evals = _ledger(ws, lambda led: led.evaluations())
        base = next(r["metrics"] for r in evals if r["view"] == "base" and r["metrics"]["status"] == "ok")
        theta0 = sum(base["tasks"][t]["accuracy"] for t in QUICK_ADAPTATION) / len(QUICK_ADAPTATION)
        last = [r["metrics"] for r in evals if (r["view"], r["version"]) == ("deploy", len(QUICK_ADAPTATION))][-1]
        assert last["acc"] > theta0 + 0.2, (last["acc"], theta0)
        assert last["bwt_denominator"] == len(QUICK_ADAPTATION) - 1

        # what the user reads: the table, the report, the commands, the daemon's clean exit
        rows = [ln for ln in out.splitlines() if ln[:4].strip().isdigit()]
        assert [ln.split()[:2] for ln in rows] == [["0", "θ0"], *[[str(i), t] for i, t in enumerate(QUICK_ADAPTATION, 1)]], out
        assert f"{100 * last['acc']:.1f}" in rows[-1] and f"(n={len(QUICK_ADAPTATION) - 1})" in rows[-1]
        assert "http://127.0.0.1:" in out and "/metrics" in out and "mergewatch_acc{" in out
        for f in REPORT_FILES:
            assert (ws / "report" / f).stat().st_size > 0, f
        assert f"report: {Path('demo') / 'workspace' / 'report' / 'report.html'}" in out
        assert "status --config demo/mergewatch.toml" in out and "load_current(" in out
        assert "daemon stopped with SIGTERM: exit code 0" in out
        log = [json.loads(ln) for ln in (workdir / "daemon.log").read_text().splitlines() if ln.startswith("{")]
        assert any(e.get("event") == "stopping" for e in log)
        assert not [e for e in log if e.get("level") in ("error", "critical")], log

        # no process of the demo is left
        assert demo.seen, "the demo started no process?"
        assert demo.left_behind() == []
        assert _status(workdir / "mergewatch.toml").returncode == 0
        assert not (tmp_path / "user-cache").exists()  # nothing built or downloaded into the user's cache
    finally:
        demo.kill_all()


@pytest.mark.parametrize("moment", ["daemon_ready", "second_expert"])
def test_ctrl_c_stops_everything_and_leaves_a_consistent_workspace(tmp_path, moment):
    workdir = tmp_path / "demo"
    demo = Demo(workdir)
    marker = {"daemon_ready": "the daemon is ready", "second_expert": "step 2/2"}[moment]
    try:
        wait_for(lambda: marker in demo.output() or demo.proc.poll() is not None, 240, f"the demo to print {marker!r}", interval=0.05)
        assert demo.proc.poll() is None, demo.output()
        os.killpg(demo.proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the demo's process group
        rc = demo.wait(120)
        out = demo.output()
        assert rc == 130, out
        assert "interrupted" in out and "daemon stopped with SIGTERM: exit code 0" in out, out
        assert demo.left_behind() == []
        st = _status(workdir / "mergewatch.toml")
        assert st.returncode == 0, st.stderr
        data = json.loads(st.stdout)
        assert data["queue"] == 0 or moment == "second_expert"  # a drop handed over just before may wait in the queue
        assert all(e["status"] in ("merged", "queued", "merging") for e in data["experts"])
        assert not list((workdir / "workspace" / "deploy").glob(".staging/*"))
    finally:
        demo.kill_all()


def test_a_killed_demo_takes_its_daemon_with_it(tmp_path):
    """SIGKILL leaves the demo no time to clean up: the kernel sends its daemon SIGTERM (PR_SET_PDEATHSIG),
    which stops cleanly and takes its evaluation worker with it."""
    workdir = tmp_path / "demo"
    demo = Demo(workdir)
    try:
        wait_for(lambda: "step 1/2" in demo.output() or demo.proc.poll() is not None, 240, "the first expert", interval=0.05)
        assert demo.proc.poll() is None, demo.output()
        assert any("mergewatch.cli run" in _cmdline(p) for p in list(demo.seen.values()))
        demo.proc.kill()
        assert demo.wait(30) == -signal.SIGKILL
        assert demo.left_behind() == []
        log = [json.loads(ln) for ln in (workdir / "daemon.log").read_text().splitlines() if ln.startswith("{")]
        assert any(e.get("event") == "stopping" for e in log)
        assert _status(workdir / "mergewatch.toml").returncode == 0
    finally:
        demo.kill_all()


def test_the_status_line_is_rewritten_on_a_terminal_and_plain_otherwise():
    from mergewatch.demo_live import Table

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty, pipe = Tty(), io.StringIO()
    for stream in (tty, pipe):
        t = Table(stream)
        t.status("fine-tuning 1/10")
        t.status("fine-tuning 2/10")
        t.status("submitted", milestone=True)
        t.status("submitted", milestone=True)
        t.row(1, "foldoc", "50.0 → 70.0", "12.0", "v1", 0.7, None, 0, 0.5, 1.25)
    assert "\r\033[K" in tty.getvalue() and "fine-tuning 2/10" in tty.getvalue()
    assert tty.getvalue().count("submitted") == 1
    lines = pipe.getvalue().splitlines()
    assert lines == ["  · submitted", lines[1]] and lines[1].split()[:2] == ["1", "foldoc"]
    assert "70.0" in lines[1] and "- (n=0)" in lines[1] and "1.2 s" in lines[1]
