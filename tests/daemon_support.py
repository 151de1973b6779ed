"""Running the real daemon as a subprocess in tests: config, start/stop, waiting, HTTP metrics."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from mergewatch.ledger import Ledger

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(tmp: Path, *, policy='init = "ema"\ndeploy = "ema"', watch="", publish="keep = 10", port: int | None = None, extra: str = "") -> Path:
    port = port or free_port()
    cfg = tmp / "mw.toml"
    cfg.write_text(
        f'workspace = "ws"\nbase = "base.safetensors"\nseed = 1\n'
        f"[policy]\n{policy}\n"
        f"[watch]\nquiet_seconds = 0.5\nrescan_seconds = 1.0\n{watch}\n"
        f"[publish]\n{publish}\n"
        f'[metrics]\nlisten = "127.0.0.1:{port}"\n{extra}',
        "utf-8",
    )
    return cfg


class DaemonProcess:
    def __init__(self, cfg: Path, env: dict | None = None):
        self.cfg = cfg
        self.log_path = cfg.parent / f"daemon-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")
        e = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        e.pop("NOTIFY_SOCKET", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mergewatch.cli", "run", "--config", str(cfg)], stdout=self._log, stderr=subprocess.STDOUT, env=e
        )

    def log(self) -> str:
        return self.log_path.read_text("utf-8", errors="replace")

    def lines(self) -> list[dict]:
        out = []
        for line in self.log().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def wait_ready(self, timeout: float = 180) -> None:
        wait_for(lambda: '"ready"' in self.log() or self.proc.poll() is not None, timeout, what="daemon ready")
        assert self.proc.poll() is None, self.log()

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        finally:
            self._log.close()
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        self._log.close()


def wait_for(pred, timeout: float, what: str = "condition", interval: float = 0.1):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def read_ledger(ws: Path, read) -> list:
    """``read(ledger)`` on the workspace's ledger opened read-only, or [] before it exists."""
    p = ws / "ledger.sqlite"
    if not p.exists():
        return []
    led = Ledger(p, readonly=True)
    try:
        return read(led)
    finally:
        led.close()


def ledger_rows(ws: Path) -> list:
    return read_ledger(ws, Ledger.experts)


def current(ws: Path, view: str = "deploy") -> int | None:
    p = ws / view / "CURRENT"
    try:
        return int(p.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def fetch_metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def metric_value(text: str, name: str, labels: str = "") -> float | None:
    key = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    return None
