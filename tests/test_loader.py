"""Loader for inference code: resolve CURRENT once, verify, reload on change; races with the publisher."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from mergewatch.checkpoint.writer import SINGLE_FILE, write_checkpoint, write_safetensors_file
from mergewatch.deploy import (
    IntegrityError,
    LoadError,
    ModelWatcher,
    Publisher,
    VersionGoneError,
    load_current,
    state_dict,
)
from mergewatch.deploy import loader as loader_mod


def tensors(i: int) -> dict[str, torch.Tensor]:
    return {"w": torch.full((8, 8), float(i)), "b": torch.full((5,), float(i), dtype=torch.float16)}


def source(tmp_path: Path, i: int, *, sharded: bool = False) -> dict[str, Path]:
    """Destination name -> source path for a tiny checkpoint whose every value equals ``i``."""
    base = tmp_path / "src"
    if sharded:
        d = base / f"ckpt{i}"
        w = write_checkpoint(d, tensors(i), shard_bytes=64)
        return {n: d / n for n in w.files}
    base.mkdir(parents=True, exist_ok=True)
    p = base / f"{i}.safetensors"
    write_safetensors_file(p, tensors(i))
    return {SINGLE_FILE: p}


def publish(pub: Publisher, tmp_path: Path, i: int, **kw) -> int:
    return pub.publish(source(tmp_path, i, sharded=kw.pop("sharded", False)), {"step": i}, **kw)


def test_load_current_reads_the_current_version(tmp_path):
    root = tmp_path / "deploy"
    pub = Publisher(root)
    with pytest.raises(LoadError, match="no published version"):
        load_current(root)
    publish(pub, tmp_path, 0)
    publish(pub, tmp_path, 1, sharded=True)
    loaded = load_current(root)
    assert loaded.version == 2 and loaded.path == root / "2" and loaded.manifest == pub.manifest(2)
    assert loaded.manifest_sha256 == hashlib.sha256((root / "2" / "MANIFEST.json").read_bytes()).hexdigest()
    sd = state_dict(loaded)
    assert sorted(sd) == ["b", "w"]
    assert torch.equal(sd["w"], tensors(1)["w"]) and torch.equal(sd["b"], tensors(1)["b"])
    pub.rollback(1)
    assert load_current(root, verify=False).version == 3
    assert torch.equal(state_dict(load_current(root))["w"], tensors(0)["w"])


def test_tampered_file_is_detected(tmp_path):
    root = tmp_path / "deploy"
    pub = Publisher(root)
    v = publish(pub, tmp_path, 0)
    f = root / str(v) / SINGLE_FILE
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF  # same size, valid header: only the hash can tell
    os.unlink(f)
    f.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"model\.safetensors: sha256 .* does not match the manifest"):
        load_current(root)
    assert load_current(root, verify=False).version == v  # verify=False trusts the files
    f.unlink()
    with pytest.raises(IntegrityError, match="missing"):
        load_current(root)


def test_manifest_must_match_the_pointer(tmp_path):
    root = tmp_path / "deploy"
    pub = Publisher(root)
    v = publish(pub, tmp_path, 0)
    mpath = root / str(v) / "MANIFEST.json"
    m = json.loads(mpath.read_bytes())
    m["step"] = 99
    mpath.unlink()
    mpath.write_text(json.dumps(m))
    with pytest.raises(IntegrityError, match="differs from .* named by CURRENT"):
        load_current(root, verify=False)
    (root / "CURRENT").write_text("not a pointer\n")
    with pytest.raises(LoadError, match="malformed pointer"):
        load_current(root)


def test_symlink_fallback_without_current_file(tmp_path):
    root = tmp_path / "deploy"
    pub = Publisher(root)
    publish(pub, tmp_path, 0)
    (root / "CURRENT").unlink()
    assert load_current(root).version == 1


def test_version_removed_while_resolving_is_retried(tmp_path, monkeypatch):
    root = tmp_path / "deploy"
    pub = Publisher(root, keep=1)
    for i in range(3):
        publish(pub, tmp_path, i)
    stale = (1, "0" * 64)
    assert pub.retain() == [1, 2]
    real = loader_mod.read_pointer
    calls = []

    def stale_then_real(r):
        calls.append(r)
        return stale if len(calls) == 1 else real(r)

    monkeypatch.setattr(loader_mod, "read_pointer", stale_then_real)
    with pytest.raises(VersionGoneError) as e:
        load_current(root, retries=0)
    assert isinstance(e.value, FileNotFoundError)
    calls.clear()
    assert load_current(root, retries=1).version == 3 and len(calls) == 2


def test_watcher_returns_each_new_version_once(tmp_path):
    root = tmp_path / "deploy"
    pub = Publisher(root)
    w = ModelWatcher(root, interval=0.01)
    assert w.poll() is None  # nothing published yet
    publish(pub, tmp_path, 0)
    first = w.poll()
    assert first is not None and first.version == 1
    assert w.poll() is None and w.poll() is None
    publish(pub, tmp_path, 1, make_current=False)  # held back: not a new current
    assert w.poll() is None
    publish(pub, tmp_path, 2)
    second = w.poll()
    assert second.version == 3 and w.loaded is second
    assert w.poll() is None
    assert w.wait(timeout=0.05) is None
    t = threading.Timer(0.05, lambda: pub.rollback(1))
    t.start()
    try:
        got = w.wait(timeout=5)
    finally:
        t.join()
    assert got is not None and got.version == 4 and got.manifest["rolled_back_from"] == 1


def _publish_later(pub: Publisher, tmp_path: Path, i: int, delay: float, **kw) -> threading.Thread:
    """Publish ``tensors(i)`` from another thread after ``delay`` seconds (a running daemon's publish)."""
    t = threading.Thread(target=lambda: (time.sleep(delay), publish(pub, tmp_path, i, **kw)), daemon=True)
    t.start()
    return t


def test_watcher_waits_for_a_version_newer_than_the_current_one(tmp_path):
    root = tmp_path / "deploy"
    pub = Publisher(root)
    assert publish(pub, tmp_path, 0) == 1
    w = ModelWatcher(root, interval=0.01)
    # Version 1 was current when the watcher was created: it is not "new", so nothing to return.
    assert w.poll() is None and w.loaded is None
    t0 = time.monotonic()
    assert w.wait(timeout=0.3) is None
    assert time.monotonic() - t0 >= 0.3
    # A held-back publish (deploy gate) does not move CURRENT: still nothing new.
    publish(pub, tmp_path, 1, make_current=False)
    assert w.wait(timeout=0.1) is None
    writer = _publish_later(pub, tmp_path, 2, delay=0.3)
    t0 = time.monotonic()
    try:
        got = w.wait(timeout=30)
    finally:
        writer.join()
    assert time.monotonic() - t0 >= 0.3  # it waited for the publish instead of returning version 1
    assert got is not None and got.version == 3 and got.manifest["step"] == 2 and w.loaded is got
    assert torch.equal(state_dict(got)["w"], tensors(2)["w"])
    # Returned once: the next wait waits for yet another version and times out without one.
    assert w.wait(timeout=0.2) is None
    writer = _publish_later(pub, tmp_path, 3, delay=0.1)
    try:
        assert w.wait(timeout=30).version == 4
    finally:
        writer.join()


def test_watcher_since_a_loaded_model(tmp_path):
    root = tmp_path / "deploy"
    pub = Publisher(root)
    publish(pub, tmp_path, 0)
    model = load_current(root)
    publish(pub, tmp_path, 1)  # made current between load_current and the watcher's creation
    w = ModelWatcher(root, interval=0.01, since=model)
    assert w.loaded is model
    got = w.wait(timeout=5)
    assert got is not None and got.version == 2
    assert ModelWatcher(root, interval=0.01).wait(timeout=0.1) is None  # without since: 2 is known
    w = ModelWatcher(root, interval=0.01, since=got)
    assert w.poll() is None
    (root / "CURRENT").unlink()  # the symlink fallback names version 2 without a manifest hash
    assert w.wait(timeout=0.1) is None
    publish(pub, tmp_path, 2)
    assert w.wait(timeout=5).version == 3


def _read_pinned_current(root: Path) -> int:
    """Read through the ``current`` symlink the safe way: follow it once (open it as a directory) and
    verify every file named by that directory's manifest relative to the open descriptor."""
    fd = os.open(root / "current", os.O_RDONLY | os.O_DIRECTORY)
    try:
        def read(name: str) -> bytes:
            f = os.open(name, os.O_RDONLY, dir_fd=fd)
            with os.fdopen(f, "rb") as fh:
                return fh.read()

        manifest = json.loads(read("MANIFEST.json"))
        for name, expected in manifest["files"].items():
            if hashlib.sha256(read(name)).hexdigest() != expected:
                raise IntegrityError(f"{name} via current/ does not match its manifest")
        return manifest["version"]
    finally:
        os.close(fd)


def test_concurrent_reader_never_sees_a_partial_version(tmp_path):
    root = tmp_path / "deploy"
    pub = Publisher(root, keep=3)
    publish(pub, tmp_path, 0)
    stats = {"ok": 0, "link_ok": 0, "gone": 0, "iterations": 0}
    errors: list[str] = []
    seen: list[int] = []
    done = threading.Event()

    def reader():
        while not done.is_set():
            try:
                loaded = load_current(root, verify=True, retries=0)
                sd = state_dict(loaded)
                step = loaded.manifest["step"]
                if not all(torch.equal(t, torch.full_like(t, float(step))) for t in sd.values()):
                    errors.append(f"version {loaded.version}: tensors do not belong to step {step}")
                seen.append(loaded.version)
                stats["ok"] += 1
            except FileNotFoundError:  # VersionGoneError: retention won the race; allowed, counted
                stats["gone"] += 1
            except Exception as e:  # noqa: BLE001 - any other failure is what this test looks for
                errors.append(f"load_current: {type(e).__name__}: {e}")
            try:
                _read_pinned_current(root)
                json.loads((root / "current" / "MANIFEST.json").read_bytes())  # naive path: never partial
                stats["link_ok"] += 1
            except FileNotFoundError:
                stats["gone"] += 1
            except Exception as e:  # noqa: BLE001
                errors.append(f"current/: {type(e).__name__}: {e}")
            stats["iterations"] += 1

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        for i in range(1, 31):
            publish(pub, tmp_path, i, sharded=i % 3 == 0)
            pub.retain()
            # Let the reader run at least once against every pointer state, so the two interleave.
            start = stats["iterations"]
            deadline = time.monotonic() + 2
            while stats["iterations"] <= start and time.monotonic() < deadline and t.is_alive():
                time.sleep(0.0005)
    finally:
        done.set()
        t.join(timeout=10)
    assert not t.is_alive()
    assert errors == []
    assert stats["ok"] >= 20 and stats["link_ok"] >= 20, stats
    assert len(set(seen)) >= 10, sorted(set(seen))
    assert seen == sorted(seen)  # CURRENT only moves forward here, and a reader never sees it go back
    assert pub.versions() == [29, 30, 31] and load_current(root).version == 31
    assert list((root / ".staging").iterdir()) == []
