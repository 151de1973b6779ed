"""Publisher: versions, pointers, idempotency, gate, rollback, retention, recovery (DESIGN §3.2)."""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch

from mergewatch.checkpoint.writer import INDEX_FILE, SINGLE_FILE, write_checkpoint, write_safetensors_file
from mergewatch.deploy import Publisher, PublishError
from mergewatch.errors import MergewatchError


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def make_source(tmp_path: Path, i: int) -> Path:
    src = tmp_path / "src" / f"{i}.safetensors"
    src.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors_file(src, {"w": torch.full((4, 4), float(i)), "b": torch.arange(3, dtype=torch.float32) + i})
    return src


def publish_n(pub: Publisher, tmp_path: Path, n: int, **kw) -> list[int]:
    return [pub.publish({SINGLE_FILE: make_source(tmp_path, i)}, {"step": i}, **kw) for i in range(n)]


def pointers(root: Path) -> tuple[int, str, str]:
    n, s = (root / "CURRENT").read_text().split()
    return int(n), s, os.readlink(root / "current")


def assert_pointers_name(root: Path, version: int) -> None:
    n, s, link = pointers(root)
    assert (root / "CURRENT").read_text().endswith("\n")
    assert n == version and link == str(version)
    assert s == sha(root / str(version) / "MANIFEST.json")


def test_publish_creates_numbered_versions_with_manifest(tmp_path):
    root = tmp_path / "deploy"
    pub = Publisher(root)
    before = datetime.now(timezone.utc).replace(microsecond=0)
    assert publish_n(pub, tmp_path, 3) == [1, 2, 3]
    assert sorted(p.name for p in root.iterdir()) == [".lock", ".staging", "1", "2", "3", "CURRENT", "current"]
    assert pub.versions() == [1, 2, 3]
    for v in (1, 2, 3):
        raw = (root / str(v) / "MANIFEST.json").read_bytes()
        m = json.loads(raw)
        assert raw == (json.dumps(m, sort_keys=True, indent=2) + "\n").encode()  # sorted keys
        assert m["version"] == v and m["step"] == v - 1 and m["publish_key"] is None
        assert m["files"] == {SINGLE_FILE: sha(root / str(v) / SINGLE_FILE)}
        assert m["files"][SINGLE_FILE] == sha(make_source(tmp_path, v - 1))
        created = datetime.fromisoformat(m["created_at"])
        assert created.utcoffset().total_seconds() == 0 and created >= before
        assert pub.manifest(v) == m
    assert list((root / ".staging").iterdir()) == []


def test_pointers_agree_and_name_manifest_sha(tmp_path):
    root = tmp_path / "deploy"
    pub = Publisher(root)
    assert pub.current() is None
    for i in range(2):
        v = pub.publish({SINGLE_FILE: make_source(tmp_path, i)}, {})
        assert_pointers_name(root, v)
        assert pub.current() == v
    assert (root / "current" / "MANIFEST.json").read_bytes() == (root / "2" / "MANIFEST.json").read_bytes()
    assert os.readlink(root / "current") == "2"  # relative, so the tree can be moved or mounted elsewhere


def test_published_files_are_hard_links(tmp_path):
    pub = Publisher(tmp_path / "deploy")
    src = make_source(tmp_path, 0)
    v = pub.publish({SINGLE_FILE: src}, {})
    assert (pub.path(v) / SINGLE_FILE).stat().st_ino == src.stat().st_ino


def test_sharded_publish_and_trusted_hashes(tmp_path):
    ckpt = tmp_path / "ckpt"
    w = write_checkpoint(ckpt, {f"t{i}": torch.randn(16) for i in range(4)}, shard_bytes=128)
    assert INDEX_FILE in w.files and len(w.files) > 2
    pub = Publisher(tmp_path / "deploy")
    v = pub.publish({n: ckpt / n for n in w.files}, {"files": w.files, "content_sha256": w.content_sha256})
    assert pub.manifest(v)["files"] == w.files
    assert all(sha(pub.path(v) / n) == h for n, h in w.files.items())
    assert pub.current_content_sha256() == w.content_sha256
    # Trusted means trusted: a caller's hash is recorded as given (documented), not recomputed.
    bogus = {n: "0" * 64 for n in w.files}
    v2 = pub.publish({n: ckpt / n for n in w.files}, {"files": bogus})
    assert pub.manifest(v2)["files"] == bogus
    with pytest.raises(PublishError, match="exactly the published names"):
        pub.publish({SINGLE_FILE: make_source(tmp_path, 1)}, {"files": {"other": "0" * 64}})


def test_publish_key_is_idempotent(tmp_path):
    root = tmp_path / "deploy"
    pub = Publisher(root)
    v = pub.publish({SINGLE_FILE: make_source(tmp_path, 0)}, {"step": 0}, key="step-0")
    listing = sorted(p.name for p in root.iterdir())
    current_stat = (root / "CURRENT").stat()
    again = pub.publish({SINGLE_FILE: make_source(tmp_path, 1)}, {"step": 0}, key="step-0")
    assert again == v == 1
    assert sorted(p.name for p in root.iterdir()) == listing
    assert (root / "CURRENT").stat().st_mtime_ns == current_stat.st_mtime_ns
    assert list((root / ".staging").iterdir()) == []
    assert pub.find("step-0") == 1 and pub.find("step-1") is None
    assert pub.publish({SINGLE_FILE: make_source(tmp_path, 1)}, {}, key="step-1") == 2


def test_idempotent_publish_after_crash_before_pointer_swap(tmp_path):
    root = tmp_path / "deploy"
    pub = Publisher(root)
    pub.publish({SINGLE_FILE: make_source(tmp_path, 0)}, {}, key="a")
    # A crash after the rename but before the swap looks like a held-back version.
    v = pub.publish({SINGLE_FILE: make_source(tmp_path, 1)}, {}, key="b", make_current=False)
    assert pub.current() == 1
    assert pub.publish({SINGLE_FILE: make_source(tmp_path, 1)}, {}, key="b") == v == 2
    assert_pointers_name(root, 2)
    # An older keyed version is returned but not made current (that would be a rollback).
    assert pub.publish({SINGLE_FILE: make_source(tmp_path, 0)}, {}, key="a") == 1
    assert_pointers_name(root, 2)


def test_make_current_false_holds_back(tmp_path):
    root = tmp_path / "deploy"
    pub = Publisher(root)
    publish_n(pub, tmp_path, 1)
    held = pub.publish({SINGLE_FILE: make_source(tmp_path, 5)}, {"gate": "held"}, make_current=False)
    assert held == 2 and pub.versions() == [1, 2]
    assert_pointers_name(root, 1)
    assert pub.publish({SINGLE_FILE: make_source(tmp_path, 6)}, {}) == 3
    assert_pointers_name(root, 3)


def test_rollback_publishes_a_new_current_version(tmp_path):
    root = tmp_path / "deploy"
    pub = Publisher(root)
    publish_n(pub, tmp_path, 3)
    new = pub.rollback(1, reason="ACC dropped")
    assert new == 4 and pub.current() == 4
    assert_pointers_name(root, 4)
    old, m = pub.manifest(1), pub.manifest(4)
    assert m["files"] == old["files"] and m["step"] == old["step"]
    assert m["rolled_back_from"] == 1 and m["reason"] == "ACC dropped" and m["version"] == 4
    assert sha(root / "4" / SINGLE_FILE) == old["files"][SINGLE_FILE]
    assert (root / "4" / SINGLE_FILE).stat().st_ino == (root / "1" / SINGLE_FILE).stat().st_ino
    assert pub.find("x") is None
    with pytest.raises(PublishError, match="version 9"):
        pub.rollback(9)
    assert issubclass(PublishError, MergewatchError)
    assert pub.versions() == [1, 2, 3, 4]


def test_rollback_refuses_damaged_version(tmp_path):
    pub = Publisher(tmp_path / "deploy")
    publish_n(pub, tmp_path, 2)
    f = pub.path(1) / SINGLE_FILE
    os.unlink(f)  # break the hard link, then damage only the published copy
    f.write_bytes(b"garbage")
    with pytest.raises(PublishError, match="damaged"):
        pub.rollback(1)
    assert pub.versions() == [1, 2] and pub.current() == 2


def test_retention_keeps_last_k_and_current(tmp_path):
    root = tmp_path / "deploy"
    pub = Publisher(root, keep=2)
    publish_n(pub, tmp_path, 4)
    assert pub.retain() == [1, 2]
    assert pub.versions() == [3, 4]
    assert pub.retain() == []
    # Roll back to 3 (-> 5), then hold back 6 and 7 behind the gate: current (5) must survive.
    assert pub.rollback(3) == 5
    for i in (6, 7):
        pub.publish({SINGLE_FILE: make_source(tmp_path, i)}, {}, make_current=False)
    assert pub.current() == 5
    assert pub.retain() == [3, 4]
    assert pub.versions() == [5, 6, 7]
    assert_pointers_name(root, 5)
    assert list((root / ".staging").iterdir()) == []
    # Numbers are never reused after deletion.
    assert pub.publish({SINGLE_FILE: make_source(tmp_path, 8)}, {}) == 8


def test_recover_clears_staging_and_repairs_pointers(tmp_path):
    root = tmp_path / "deploy"
    pub = Publisher(root)
    publish_n(pub, tmp_path, 3)
    (root / ".staging" / "publish.1.abc").mkdir()
    (root / ".staging" / "publish.1.abc" / SINGLE_FILE).write_bytes(b"half")
    (root / ".staging" / "CURRENT.1.abc").write_text("junk")
    (root / "4").mkdir()  # numbered but incomplete (no MANIFEST.json)
    (root / "CURRENT").unlink()
    os.unlink(root / "current")
    report = pub.recover()
    assert sorted(report["staging_removed"]) == ["CURRENT.1.abc", "publish.1.abc"]
    assert report["incomplete_removed"] == [4] and report["repointed"] and report["current"] == 3
    assert list((root / ".staging").iterdir()) == []
    assert not (root / "4").exists()
    assert_pointers_name(root, 3)
    # Dangling: both pointers name a version that does not exist.
    (root / "CURRENT").write_text(f"7 {'0' * 64}\n")
    os.unlink(root / "current")
    os.symlink("7", root / "current")
    assert pub.current() == 7
    report = pub.recover()
    assert report["current_before"] == 7 and report["current"] == 3
    assert_pointers_name(root, 3)
    # Nothing to do: reported as such, pointers untouched.
    report = pub.recover()
    assert report == {"staging_removed": [], "incomplete_removed": [], "current_before": 3, "current": 3, "repointed": False}


def test_recover_keeps_valid_older_pointer_and_aligns_symlink(tmp_path):
    root = tmp_path / "deploy"
    pub = Publisher(root)
    publish_n(pub, tmp_path, 3)
    pub.rollback(1)
    pub.publish({SINGLE_FILE: make_source(tmp_path, 9)}, {}, make_current=False)  # 5, held back
    # Crash between the CURRENT swap and the symlink swap: symlink still names the previous one.
    os.unlink(root / "current")
    os.symlink("3", root / "current")
    report = pub.recover()
    assert report["current"] == 4 and report["repointed"]
    assert_pointers_name(root, 4)
    # CURRENT unreadable: the symlink is used.
    (root / "CURRENT").write_text("garbage")
    assert pub.current() == 4
    assert pub.recover()["current"] == 4
    assert_pointers_name(root, 4)


def test_write_eval_replaces_atomically(tmp_path):
    pub = Publisher(tmp_path / "deploy")
    (v,) = publish_n(pub, tmp_path, 1)
    manifest_before = (pub.path(v) / "MANIFEST.json").read_bytes()
    p = pub.write_eval(v, {"acc": 0.5})
    assert json.loads(p.read_text()) == {"acc": 0.5}
    inode = p.stat().st_ino
    pub.write_eval(v, {"acc": 0.75})
    assert json.loads(p.read_text()) == {"acc": 0.75}
    assert p.stat().st_ino != inode  # replaced by rename, not rewritten
    assert (pub.path(v) / "MANIFEST.json").read_bytes() == manifest_before
    assert list((pub.root / ".staging").iterdir()) == []
    with pytest.raises(PublishError):
        pub.write_eval(5, {})


def test_invalid_inputs_publish_nothing(tmp_path):
    root = tmp_path / "deploy"
    pub = Publisher(root)
    src = make_source(tmp_path, 0)
    for files, manifest in [
        ({}, {}),
        ({"MANIFEST.json": src}, {}),
        ({"../x": src}, {}),
        ({SINGLE_FILE: tmp_path / "missing"}, {}),
        ({SINGLE_FILE: src}, {"bad": object()}),
    ]:
        with pytest.raises(PublishError):
            pub.publish(files, manifest)
    assert pub.versions() == [] and pub.current() is None
    assert not (root / ".staging").exists() or list((root / ".staging").iterdir()) == []
    with pytest.raises(ValueError):
        Publisher(root, keep=0)
