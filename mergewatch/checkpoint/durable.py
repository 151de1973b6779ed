"""Durability helpers of the standard library only (no torch), for the light CLI verbs (issue 14)."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """fsync a file or directory by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | str, *, tmp_dir: Path | None = None) -> Path:
    """Replace ``path`` with ``data`` so that a reader sees the old content or the new, never a part,
    and the new content survives a power cut once this returns: a temp file (a dot-name ending in
    ``.tmp``, in ``tmp_dir`` or beside ``path``: ignored by the inbox and by staging sweeps), write,
    fsync, ``os.replace``, fsync the directory. The one atomic small-file write of the package."""
    import uuid

    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    tmp = Path(tmp_dir or path.parent) / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path
