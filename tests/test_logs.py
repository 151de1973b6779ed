"""Structured logging: JSON lines, bound context, stdlib records through the same formatter."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from datetime import datetime, timezone

import pytest

from mergewatch.daemon.logs import bound_context, configure_logging, get_logger

KEYS = {"event", "level", "logger", "timestamp"}


@pytest.fixture(autouse=True)
def restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


def lines(buf: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def test_json_lines_with_bound_context():
    buf = io.StringIO()
    configure_logging(json=True, stream=buf)
    log = get_logger(expert="ab12", step=4)
    log.info("merged", version=5)
    log.bind(version=6).warning("deploy_held", reason="gate")
    out = lines(buf)
    assert [o["event"] for o in out] == ["merged", "deploy_held"]
    for o in out:
        assert KEYS <= o.keys()
        assert o["expert"] == "ab12" and o["step"] == 4
        ts = datetime.fromisoformat(o["timestamp"].replace("Z", "+00:00"))
        assert ts.utcoffset() == timezone.utc.utcoffset(None)
    assert out[0]["version"] == 5 and out[0]["level"] == "info"
    assert out[1]["version"] == 6 and out[1]["level"] == "warning" and out[1]["reason"] == "gate"


def test_stdlib_records_use_the_same_formatter():
    buf = io.StringIO()
    configure_logging(json=True, stream=buf)
    get_logger().info("ours")
    logging.getLogger("apscheduler.scheduler").warning("Run time of job %r was missed", "rescan")
    logging.getLogger("watchdog.observers").error("inotify overflow")
    ours, aps, wd = lines(buf)
    assert ours.keys() == aps.keys() == wd.keys() == KEYS
    assert aps == {**aps, "event": "Run time of job 'rescan' was missed", "level": "warning", "logger": "apscheduler.scheduler"}
    assert wd["level"] == "error" and wd["logger"] == "watchdog.observers"


def test_contextvars_reach_third_party_records_and_exceptions_stay_one_line():
    buf = io.StringIO()
    configure_logging(json=True, stream=buf)
    with bound_context(expert="cd34", step=7):
        logging.getLogger("apscheduler.scheduler").warning("inside")
        try:
            raise ValueError("bad tensor")
        except ValueError:
            get_logger().exception("step_failed")
    get_logger().info("outside")
    inside, failed, outside = lines(buf)
    assert inside["expert"] == "cd34" and inside["step"] == 7
    assert failed["expert"] == "cd34" and "ValueError: bad tensor" in failed["exception"]
    assert "expert" not in outside


def test_level_and_quiet_third_party_loggers():
    buf = io.StringIO()
    configure_logging(json=True, level="warning", stream=buf)
    get_logger().info("hidden")
    get_logger().warning("shown")
    assert [o["event"] for o in lines(buf)] == ["shown"]

    buf = io.StringIO()
    configure_logging(json=True, level="info", stream=buf)
    logging.getLogger("apscheduler.executors.default").info("Running job heartbeat")  # every tick: held back
    logging.getLogger("apscheduler.executors.default").warning("maximum number of running instances reached")
    assert [o["event"] for o in lines(buf)] == ["maximum number of running instances reached"]
    with pytest.raises(ValueError, match="level"):
        configure_logging(level="verbose")


def test_idempotent_and_loggers_follow_reconfiguration():
    first, second = io.StringIO(), io.StringIO()
    log = get_logger(step=1)
    configure_logging(json=True, stream=first)
    configure_logging(json=True, stream=second)
    configure_logging(json=True, stream=second)
    log.info("once")
    ours = [h for h in logging.getLogger().handlers if getattr(h, "_mergewatch", False)]
    assert len(ours) == 1
    assert first.getvalue() == ""
    assert [o["event"] for o in lines(second)] == ["once"]


def test_console_mode_is_not_json():
    buf = io.StringIO()
    configure_logging(json=False, stream=buf)
    get_logger(expert="ab12").info("merged")
    text = buf.getvalue()
    assert "merged" in text and "expert=ab12" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text.splitlines()[0])


def test_auto_mode_picks_by_tty():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty, pipe = Tty(), io.StringIO()
    configure_logging(stream=tty)
    get_logger().info("to_terminal")
    configure_logging(stream=pipe)
    get_logger().info("to_pipe")
    assert not tty.getvalue().lstrip().startswith("{")
    assert json.loads(pipe.getvalue())["event"] == "to_pipe"


def test_default_stream_is_stdout_of_a_real_process():
    code = (
        "import logging\n"
        "from mergewatch.daemon.logs import configure_logging, get_logger\n"
        "configure_logging()\n"
        "get_logger(expert='e1', step=2, version=3).info('published')\n"
        "logging.getLogger('apscheduler.scheduler').info('Scheduler started')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    published, started = (json.loads(line) for line in proc.stdout.splitlines())
    assert published["event"] == "published" and (published["expert"], published["step"], published["version"]) == ("e1", 2, 3)
    assert started["logger"] == "apscheduler.scheduler" and started.keys() == KEYS


def test_readme_lists_exactly_the_events_the_daemon_logs():
    """The README's log-event list is the set of event names the daemon's code logs (a name that
    is only a ledger event kind, such as ``published``, must not be listed as a log event)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    code = "".join(p.read_text("utf-8") for p in (root / "mergewatch" / "daemon").glob("*.py"))
    logged = set(re.findall(r"\blog(?:\.bind\([^)]*\))?\.(?:info|warning|error|exception|critical)\(\s*\"([a-z_]+)\"", code))
    readme = (root / "README.md").read_text("utf-8")
    listed_block = readme[readme.index("**Logs**"):readme.index("APScheduler's and watchdog's own")]
    listed = set(re.findall(r"`([a-z_]+)`", listed_block.split("(The")[0].split("bound:", 1)[1])) - {"versions"}
    assert {"queued", "merged", "rejected", "recovered"} <= logged
    assert listed == logged, f"in the code only: {sorted(logged - listed)}; in the README only: {sorted(listed - logged)}"
