"""Scheduler jobs (guarded, counted, never overlapping) and the progress-tied watchdog heartbeat."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import tempfile
import threading
import time

import pytest

from mergewatch.daemon.logs import configure_logging
from mergewatch.daemon.metrics import Metrics
from mergewatch.daemon.scheduler import Jobs, ProgressHeartbeat, make_scheduler


@pytest.fixture
def log_lines():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    buf = io.StringIO()
    configure_logging(json=True, stream=buf)
    yield lambda: [json.loads(line) for line in buf.getvalue().splitlines()]
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


def wait_for(predicate, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def failures(metrics: Metrics, job: str) -> float:
    return metrics.job_failures_total.labels(job=job)._value.get()


def test_failing_job_is_logged_counted_and_not_fatal(log_lines):
    metrics = Metrics()
    ran = []

    def broken():
        raise OSError("inbox vanished")

    jobs = make_scheduler([("rescan", 0.05, broken), ("retention", 0.05, lambda: ran.append(1))], metrics=metrics)
    try:
        assert wait_for(lambda: failures(metrics, "rescan") >= 3 and len(ran) >= 3)
        assert jobs.running and sorted(jobs.names) == ["rescan", "retention"]
    finally:
        jobs.shutdown()
    assert failures(metrics, "retention") == 0
    failed = [o for o in log_lines() if o["event"] == "job_failed"]
    assert failed and all(o["job"] == "rescan" and o["level"] == "error" for o in failed)
    assert "OSError: inbox vanished" in failed[0]["exception"]
    text = metrics.render().decode()
    assert 'mergewatch_job_failures_total{job="rescan"} ' in text


def test_runs_never_overlap_and_run_now():
    active, peak, runs = [0], [0], []
    lock = threading.Lock()

    def slow():
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.15)
        with lock:
            active[0] -= 1
        runs.append(time.monotonic())

    with Jobs(Metrics()) as jobs:
        jobs.add("evaluate", 0.02, slow)  # the interval is much shorter than a run
        assert wait_for(lambda: len(runs) >= 3)
        jobs.add("rescan", 60, lambda: runs.append("rescan"))
        jobs.run_now("rescan")
        assert wait_for(lambda: "rescan" in runs)
        jobs.reschedule("rescan", 30)
    assert peak[0] == 1
    assert not jobs.running


def test_job_names_and_intervals_are_checked():
    jobs = Jobs(Metrics(jobs=("rescan",)))
    with pytest.raises(ValueError, match="job"):
        jobs.add("unbounded-name", 1, lambda: None)
    with pytest.raises(ValueError, match="interval"):
        jobs.add("rescan", 0, lambda: None)
    Jobs(None).add("anything-goes-without-metrics", 1, lambda: None)


def test_heartbeat_logic_with_a_fake_clock(log_lines):
    now, sent = [100.0], []
    hb = ProgressHeartbeat(8.0, send=lambda: sent.append(now[0]) or True, clock=lambda: now[0])
    assert (hb.period, hb.stale_after) == (2.0, 8.0)
    assert hb.check() and sent == [100.0]  # fresh at construction
    now[0] = 107.9
    assert hb.check()
    now[0] = 108.0  # no beat for stale_after: silence
    assert not hb.check() and len(sent) == 2
    now[0] = 130.0
    assert not hb.check()
    hb.beat()
    now[0] = 131.0
    assert hb.check() and sent[-1] == 131.0
    events = [o["event"] for o in log_lines()]
    assert events == ["worker_stalled", "worker_stalled", "worker_progress_resumed"]


def test_heartbeat_from_environment():
    env = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid()), "NOTIFY_SOCKET": ""}
    hb = ProgressHeartbeat.from_environment(env)
    assert hb is not None and hb.interval == 2.0 and hb.period == 0.5
    assert ProgressHeartbeat.from_environment({}) is None
    with pytest.raises(ValueError):
        ProgressHeartbeat(0)


def test_heartbeat_pings_a_real_socket_only_while_beats_are_fresh(log_lines):
    with tempfile.TemporaryDirectory(prefix="mwhb-", dir="/tmp" if os.path.isdir("/tmp") else None) as d:
        path = os.path.join(d, "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.setblocking(False)

        def drain() -> list[bytes]:
            out = []
            while True:
                try:
                    out.append(sock.recv(4096))
                except BlockingIOError:
                    return out

        env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}  # 0.4 s: pings every 0.1 s
        hb = ProgressHeartbeat.from_environment(env)
        assert hb is not None
        stop = threading.Event()

        def worker_loop():  # a healthy loop: beats on every (idle) iteration
            while not stop.wait(0.02):
                hb.beat()

        metrics = Metrics()
        worker = threading.Thread(target=worker_loop, daemon=True)
        worker.start()
        jobs = make_scheduler([hb.job()], metrics=metrics)
        try:
            time.sleep(0.45)
            fresh = drain()
            assert len(fresh) >= 2 and set(fresh) == {b"WATCHDOG=1"}

            stop.set()  # the worker hangs
            worker.join()
            time.sleep(hb.stale_after + 0.25)  # pings may continue until the last beat goes stale
            drain()
            time.sleep(0.35)
            assert drain() == []  # silence: systemd would now kill and restart us
            assert any(o["event"] == "worker_stalled" for o in log_lines())

            hb.beat()  # progress again (e.g. the stuck tensor finished)
            assert wait_for(lambda: bool(drain()), timeout=1.0)
        finally:
            jobs.shutdown()
            sock.close()
    assert failures(metrics, "heartbeat") == 0
