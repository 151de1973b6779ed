"""The inbox contract (DESIGN §3.1): when is a drop complete, how producers submit, where rejects go.

A drop is complete when
  (a) a ``*.safetensors`` file appeared by rename into the inbox (a watchdog "moved" event), or
  (b) a directory holds the marker file ``_SUCCESS`` (shards + ``*.safetensors.index.json``), or
  (c) a file has been unchanged (size, mtime) for the quiet period (the fallback for producers that
      write in place, and for everything found by a scan: a file already there when the daemon
      starts has been quiet since its mtime).
Ignored: dot-files, ``*.partial``, ``*.tmp``, sidecars (``<name>.json``, ``meta.json``) and
``*.reason.txt``. Anything else that is complete is a drop: non-safetensors files and symlinks are
rejected with a reason rather than left lying in the inbox; a directory without its marker is
waited for, never rejected.

Order. Drops are merged in arrival order; drops that arrive together (a startup scan, entries with the
same mtime) and the entries of a folder of experts (``mergewatch merge DIR``) go in natural order
(``natural_key``): ``checkpoint-200`` before ``checkpoint-1000``, as a Trainer wrote them.

Nothing here deletes user data: a rejected drop (and its sidecar) is *moved* to ``rejected/`` beside
a ``<name>.reason.txt``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from mergewatch.checkpoint.durable import atomic_write, fsync_path
from mergewatch.errors import SidecarError

MARKER = "_SUCCESS"
IGNORED_SUFFIXES = (".partial", ".tmp", ".json", ".reason.txt")


@dataclass(frozen=True)
class Drop:
    name: str  # entry name in the inbox
    path: Path
    kind: str  # "file" | "dir" | "symlink"
    fingerprint: str
    first_seen: float = 0.0  # wall-clock time the inbox first saw the entry (a cp drop's quiet period counts)

    @property
    def sidecar(self) -> Path | None:
        if self.kind == "dir":
            p = self.path / "meta.json"
            return p if p.is_file() and not p.is_symlink() else None
        return file_sidecar(self.path)


def file_sidecar(path: Path) -> Path | None:
    """The sidecar ``<name>.json`` beside a file drop (a directory keeps its ``meta.json`` inside,
    so it travels with the drop and has no separate sidecar to move): None if absent."""
    if path.is_dir():
        return None
    p = path.with_name(path.name.removesuffix(".safetensors") + ".json")
    return p if p.is_file() and not p.is_symlink() else None


_DIGITS = re.compile(r"([0-9]+)")


def natural_key(name: str) -> tuple:
    """Sort key that compares runs of digits by their value: ``checkpoint-200`` < ``checkpoint-1000``
    (name order would put 1000 first and merge an EMA in the wrong time order). Ties (``x01``,
    ``x1``) fall back to the name itself."""
    parts = _DIGITS.split(name)  # text, digits, text, ...: the same kind at the same position
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), name


def is_ignored(name: str) -> bool:
    return name.startswith(".") or name.endswith(IGNORED_SUFFIXES)


def fingerprint(path: Path) -> str:
    st = path.lstat()
    if path.is_dir() and not path.is_symlink():
        m = path / MARKER
        mst = m.stat().st_mtime_ns if m.exists() else 0
        return f"dir:{st.st_ino}:{mst}"
    return f"file:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


class Inbox:
    """Tracks candidate entries and says which are complete drops.

    ``note(path, moved_in)`` may be called from the watchdog thread; ``ready()`` from the worker.
    """

    def __init__(self, root: str | os.PathLike, quiet_seconds: float = 10.0):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.quiet_seconds = quiet_seconds
        self._lock = threading.Lock()
        self._candidates: dict[str, float] = {}  # name -> first seen (arrival order)
        self._moved_in: set[str] = set()
        self.wakeup = threading.Event()

    def note(self, path: str | os.PathLike, *, moved_in: bool = False) -> None:
        """An event for ``path`` (anything below the inbox: it names its top-level entry)."""
        try:
            rel = Path(path).resolve(strict=False).relative_to(self.root.resolve())
        except ValueError:
            return
        if not rel.parts:
            return
        name = rel.parts[0]
        if is_ignored(name):
            return
        with self._lock:
            self._candidates.setdefault(name, time.time())
            if moved_in and len(rel.parts) == 1:
                self._moved_in.add(name)
        self.wakeup.set()

    def scan(self) -> int:
        """Add every entry of the inbox as a candidate (startup and periodic rescans)."""
        entries = []
        for p in self.root.iterdir():
            if is_ignored(p.name):
                continue
            try:
                entries.append((p.lstat().st_mtime_ns, p.name))
            except FileNotFoundError:
                continue
        entries.sort(key=lambda e: (e[0], natural_key(e[1])))
        with self._lock:
            for _, name in entries:
                self._candidates.setdefault(name, time.time())
        if entries:
            self.wakeup.set()
        return len(entries)

    def forget(self, name: str) -> None:
        with self._lock:
            self._candidates.pop(name, None)
            self._moved_in.discard(name)

    def pending(self) -> int:
        with self._lock:
            return len(self._candidates)

    def ready(self, now: float | None = None) -> list[Drop]:
        """Complete drops, in arrival order; they stay candidates until ``forget``."""
        now = time.time() if now is None else now
        with self._lock:
            items = sorted(self._candidates.items(), key=lambda kv: (kv[1], natural_key(kv[0])))
            moved = set(self._moved_in)
        out = []
        for name, seen in items:
            p = self.root / name
            try:
                st = p.lstat()
            except FileNotFoundError:
                self.forget(name)
                continue
            if p.is_symlink():
                out.append(Drop(name, p, "symlink", fingerprint(p), seen))
            elif p.is_dir():
                if (p / MARKER).is_file():
                    out.append(Drop(name, p, "dir", fingerprint(p), seen))
            elif p.is_file():
                quiet = now - st.st_mtime >= self.quiet_seconds
                if (name in moved and name.endswith(".safetensors")) or quiet:
                    out.append(Drop(name, p, "file", fingerprint(p), seen))
        return out


#: The sidecar's fields (DESIGN §3.1) and what each must be.
SIDECAR_FIELDS = {
    "task": "a string (the task name the evaluation knows it by)",
    "parent": "a string (the init version or sha256 it was fine-tuned from)",
    "eval": "a string (an evaluation spec reference)",
    "tags": "a list of strings or an object of strings, numbers and booleans",
}


def _field_ok(key: str, value) -> bool:
    if key == "tags":
        if isinstance(value, list):
            return all(isinstance(v, str) for v in value)
        return isinstance(value, dict) and all(isinstance(v, (str, int, float, bool)) for v in value.values())
    return isinstance(value, str)


def parse_sidecar(path: Path | None) -> dict:
    """The metadata of a sidecar file ({} without one). Raises ``SidecarError`` naming what is wrong:
    the JSON error with its line and column, or every unknown or ill-typed field."""
    if path is None:
        return {}
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SidecarError(f"sidecar {path.name} is unreadable: {getattr(e, 'strerror', None) or e}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise SidecarError(f"sidecar {path.name} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from e
    if not isinstance(data, dict):
        raise SidecarError(f"sidecar {path.name} must be a JSON object, got {type(data).__name__}")
    problems = []
    for k, v in data.items():
        if k not in SIDECAR_FIELDS:
            problems.append(f"unknown field {k!r} (allowed: {', '.join(SIDECAR_FIELDS)})")
        elif not _field_ok(k, v):
            problems.append(f"field {k!r} must be {SIDECAR_FIELDS[k]}, got {json.dumps(v)[:80]}")
    if problems:
        raise SidecarError(f"sidecar {path.name}: " + "; ".join(problems))
    return data


def _unique(dest_dir: Path, name: str) -> Path:
    p = dest_dir / name
    i = 1
    while p.exists() or p.is_symlink() or (dest_dir / f"{p.name}.reason.txt").exists():
        p = dest_dir / f"{name}.{i}"
        i += 1
    return p


def reject(drop_path: Path, reason: str, rejected_dir: Path, sidecar: Path | None = None) -> Path:
    """Move a drop (and its sidecar) into ``rejected/`` and write ``<name>.reason.txt`` next to it."""
    rejected_dir.mkdir(parents=True, exist_ok=True)
    dest = _unique(rejected_dir, drop_path.name)
    reason_file = rejected_dir / f"{dest.name}.reason.txt"
    atomic_write(reason_file, reason.rstrip() + "\n")
    if drop_path.exists() or drop_path.is_symlink():
        os.rename(drop_path, dest)
    if sidecar is not None and sidecar.exists() and sidecar.parent != drop_path:
        os.rename(sidecar, rejected_dir / f"{dest.name}.json")
    fsync_path(rejected_dir)
    return dest


def submit(source: str | os.PathLike, inbox: str | os.PathLike, *, meta: dict | None = None, name: str | None = None) -> Path:
    """Copy a checkpoint into the inbox the safe way: temp name, fsync, rename (DESIGN §3.1).

    A directory (sharded checkpoint) is copied under a dot-name, given its ``_SUCCESS`` marker and
    renamed in. ``meta`` becomes the sidecar, written (atomically) before the model appears.
    Returns the final path in the inbox."""
    src = Path(source)
    inbox = Path(inbox)
    inbox.mkdir(parents=True, exist_ok=True)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or directory")
    base_name = name or src.name
    if is_ignored(base_name):
        raise ValueError(f"{base_name!r} would be ignored by the inbox (dot-file, .tmp, .partial or .json)")
    final = inbox / base_name
    stem, suffix = (base_name.removesuffix(".safetensors"), ".safetensors") if base_name.endswith(".safetensors") else (base_name, "")
    i = 1
    while final.exists():
        final = inbox / f"{stem}-{i}{suffix}"
        i += 1
    tag = uuid.uuid4().hex[:8]
    if meta is not None:
        side = (final / "meta.json") if src.is_dir() else final.with_name(final.name.removesuffix(".safetensors") + ".json")
        if not src.is_dir():
            atomic_write(side, json.dumps(meta, indent=2))
    if src.is_dir():
        tmp_dir = inbox / f".{final.name}.{tag}.tmp"
        tmp_dir.mkdir()
        try:
            for f in sorted(src.iterdir()):
                if f.is_file() and f.name != MARKER:
                    shutil.copyfile(f, tmp_dir / f.name)
                    fsync_path(tmp_dir / f.name)
            if meta is not None:
                (tmp_dir / "meta.json").write_text(json.dumps(meta, indent=2), "utf-8")
            (tmp_dir / MARKER).write_text("", "utf-8")
            fsync_path(tmp_dir)
            os.rename(tmp_dir, final)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
    else:
        tmp = inbox / f".{final.name}.{tag}.tmp"
        try:
            shutil.copyfile(src, tmp)
            fsync_path(tmp)
            os.rename(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    fsync_path(inbox)
    return final
