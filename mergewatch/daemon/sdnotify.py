"""The systemd notification protocol (sd_notify(3)) with the standard library only (DESIGN §3.5).

systemd passes ``NOTIFY_SOCKET`` (a filesystem path, or an abstract socket name written with a leading
``@``) to a ``Type=notify`` service; the service sends newline-separated ``KEY=VALUE`` assignments as
one datagram. Outside systemd the variable is unset and every call is a cheap no-op returning False,
so the daemon runs unchanged in a terminal or a container.

A failed send is reported as False, never raised: losing a status line must not stop a merge (a
missed WATCHDOG=1 is systemd's business, which is exactly what the watchdog is for).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

__all__ = ["notify", "ready", "status", "watchdog", "stopping", "reloading", "watchdog_interval", "enabled"]


def _address(environ: Mapping[str, str] | None) -> str | bytes | None:
    env = os.environ if environ is None else environ
    path = env.get("NOTIFY_SOCKET")
    if not path:
        return None
    if path.startswith("@"):
        return b"\0" + os.fsencode(path[1:])  # Linux abstract namespace
    if path.startswith("/"):
        return path
    return None  # e.g. "vsock:..." (VMs): not supported here


def enabled(environ: Mapping[str, str] | None = None) -> bool:
    """True when a usable ``NOTIFY_SOCKET`` is set."""
    return _address(environ) is not None


def notify(*lines: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``lines`` (``"READY=1"``, ``"STATUS=..."``) as one datagram; True if it was sent."""
    # Checked even when there is nowhere to send: a malformed line must fail in tests, not only under systemd.
    for line in lines:
        if "\n" in line or "=" not in line:
            raise ValueError(f"a notification line is one KEY=VALUE without newlines, got {line!r}")
    address = _address(environ)
    if address is None or not lines:
        return False
    message = "\n".join(lines).encode("utf-8")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, address)
    except OSError:
        return False
    return True


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def ready(status_text: str | None = None, *, environ: Mapping[str, str] | None = None) -> bool:
    """READY=1: start-up (recovery) finished, or a reload finished."""
    lines = ["READY=1"]
    if status_text is not None:
        lines.append(f"STATUS={_one_line(status_text)}")
    return notify(*lines, environ=environ)


def status(text: str, *, environ: Mapping[str, str] | None = None) -> bool:
    """STATUS=...: the one-line state shown by ``systemctl status`` (newlines are folded to spaces)."""
    return notify(f"STATUS={_one_line(text)}", environ=environ)


def watchdog(*, environ: Mapping[str, str] | None = None) -> bool:
    """WATCHDOG=1: a keep-alive ping. Send it only on real progress (see ``scheduler.ProgressHeartbeat``)."""
    return notify("WATCHDOG=1", environ=environ)


def stopping(status_text: str | None = None, *, environ: Mapping[str, str] | None = None) -> bool:
    """STOPPING=1: shutdown began (finishing or abandoning the current step)."""
    lines = ["STOPPING=1"]
    if status_text is not None:
        lines.append(f"STATUS={_one_line(status_text)}")
    return notify(*lines, environ=environ)


def reloading(*, environ: Mapping[str, str] | None = None) -> bool:
    """RELOADING=1 with the CLOCK_MONOTONIC timestamp systemd (>= 253) requires; send ``ready()`` after."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}", environ=environ)


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """The watchdog timeout in seconds (``WatchdogSec=``), or None when no watchdog is expected of us.

    ``WATCHDOG_PID``, when set, names the process the watchdog is meant for: any other process (a
    forked child that inherited the environment) gets None.
    """
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1e6 if value > 0 else None
