"""sd_notify over a real AF_UNIX datagram socket (filesystem path and abstract namespace)."""

from __future__ import annotations

import os
import socket
import tempfile
import time
import uuid

import pytest

from mergewatch.daemon import sdnotify


class NotifySocket:
    """What systemd does: a bound datagram socket; ``env`` is the NOTIFY_SOCKET to hand over."""

    def __init__(self, address: str | bytes, env_value: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(2)
        self.env = {"NOTIFY_SOCKET": env_value}

    def recv(self) -> list[str]:
        return self.sock.recv(4096).decode().split("\n")

    def empty(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096)
        except BlockingIOError:
            return True
        finally:
            self.sock.settimeout(2)
        return False

    def close(self):
        self.sock.close()


@pytest.fixture
def path_socket():
    # A short directory: AF_UNIX paths are limited to 107 bytes, pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="mwsd-", dir="/tmp" if os.path.isdir("/tmp") else None) as d:
        path = os.path.join(d, "notify")
        s = NotifySocket(path, path)
        yield s
        s.close()


@pytest.fixture
def abstract_socket():
    name = f"mergewatch-test-{uuid.uuid4().hex}"
    s = NotifySocket(b"\0" + name.encode(), "@" + name)
    yield s
    s.close()


def test_unset_socket_is_a_quiet_no_op():
    assert sdnotify.notify("READY=1", environ={}) is False
    assert sdnotify.ready(environ={}) is False
    assert sdnotify.watchdog(environ={"NOTIFY_SOCKET": ""}) is False
    assert sdnotify.enabled({}) is False


def test_unreachable_socket_returns_false(tmp_path):
    assert sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": str(tmp_path / "nobody")}) is False
    assert sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": "vsock:2:1234"}) is False


def test_malformed_lines_are_refused_even_without_socket():
    with pytest.raises(ValueError):
        sdnotify.notify("READY=1\nWATCHDOG=1", environ={})
    with pytest.raises(ValueError):
        sdnotify.notify("READY", environ={})


@pytest.mark.parametrize("kind", ["path_socket", "abstract_socket"])
def test_messages_arrive(kind, request):
    s: NotifySocket = request.getfixturevalue(kind)
    env = s.env
    assert sdnotify.enabled(env)
    assert sdnotify.ready("recovered step 3\nqueue 0", environ=env)
    assert s.recv() == ["READY=1", "STATUS=recovered step 3 queue 0"]
    assert sdnotify.status("merging expert ab12 (step 4)", environ=env)
    assert s.recv() == ["STATUS=merging expert ab12 (step 4)"]
    assert sdnotify.watchdog(environ=env)
    assert s.recv() == ["WATCHDOG=1"]
    assert sdnotify.stopping(environ=env)
    assert s.recv() == ["STOPPING=1"]
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert sdnotify.reloading(environ=env)
    reloading, stamp = s.recv()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert reloading == "RELOADING=1"
    key, _, usec = stamp.partition("=")
    assert key == "MONOTONIC_USEC" and before <= int(usec) <= after
    assert s.empty()


def test_process_environment_is_the_default(path_socket, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", path_socket.env["NOTIFY_SOCKET"])
    assert sdnotify.notify("STATUS=hello")
    assert path_socket.recv() == ["STATUS=hello"]


def test_watchdog_interval():
    pid = str(os.getpid())
    assert sdnotify.watchdog_interval({}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "120000000"}) == 120.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "1500000", "WATCHDOG_PID": pid}) == 1.5
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "1500000", "WATCHDOG_PID": str(os.getpid() + 1)}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
