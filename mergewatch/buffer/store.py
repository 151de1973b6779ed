"""The content-addressed expert store (DESIGN §3.1, SPEC §1 "buffer").

Experts are kept as ``store/<sha256>.safetensors`` (single file) or ``store/<sha256>/`` (sharded
directory), named by the sha256 of their tensor content, so the same expert is stored once whatever
its file name. A claimed drop's sidecar is kept beside it (``<sha256>.sidecar.json``).

What is deleted, and when, is the workspace's ``[buffer] keep_experts`` (``Workspace.apply_retention``
after every step): ``"all"`` (the default) deletes nothing; ``"needed"`` keeps only what the policy
still reads (every expert for a policy that merges over ``all``, nothing once merged for
``ema``/``ft`` and the DFCMM methods, whose running state is enough); an integer N keeps those plus
the N most recently merged experts. Experts still queued are always kept.

Entering the store is atomic: a file is linked, copied or moved under a temporary name, fsynced and
renamed; a directory is staged and renamed. ``claim(move=True)`` is the daemon's claim of an inbox
drop; the batch CLI copies (never hard-links: a user rewriting their file in place would otherwise
change a stored expert) so that the user's files stay where they are.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from mergewatch.checkpoint.reader import LazyCheckpoint
from mergewatch.checkpoint.writer import atomic_directory, clear_staging, fsync_path


#: a claimed drop's sidecar, kept beside its expert
SIDECAR_SUFFIX = ".sidecar.json"


class ExpertStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sha: str) -> Path | None:
        f = self.root / f"{sha}.safetensors"
        if f.is_file():
            return f
        d = self.root / sha
        return d if d.is_dir() else None

    def has(self, sha: str) -> bool:
        return self.path(sha) is not None

    def open(self, sha: str) -> LazyCheckpoint:
        p = self.path(sha)
        if p is None:
            raise FileNotFoundError(f"expert {sha[:12]} is not in the store {self.root}")
        return LazyCheckpoint(p)

    def ids(self) -> list[str]:
        out = []
        for p in self.root.iterdir():
            if p.name.startswith(".") or p.name.endswith(SIDECAR_SUFFIX):
                continue
            out.append(p.name.removesuffix(".safetensors"))
        return sorted(out)

    def sidecar_path(self, sha: str) -> Path:
        return self.root / f"{sha}{SIDECAR_SUFFIX}"

    def keep_sidecar(self, sha: str, sidecar: str | os.PathLike) -> Path:
        """Move a claimed drop's sidecar beside it (``<sha>.sidecar.json``; its content is also in the
        ledger): the daemon never deletes a file a user dropped, it only moves it."""
        dest = self.sidecar_path(sha)
        os.replace(sidecar, dest)
        fsync_path(self.root)
        return dest

    def claim(self, source: str | os.PathLike, sha: str, *, move: bool = False) -> Path:
        """Put ``source`` into the store under ``sha`` (no-op if already there)."""
        existing = self.path(sha)
        if existing is not None:
            return existing
        source = Path(source)
        if source.is_dir():
            final = self.root / sha
            if move:
                os.rename(source, final)
                fsync_path(self.root)
                return final
            with atomic_directory(final) as stage:
                for f in sorted(source.iterdir()):
                    if f.is_file():
                        _copy(f, stage / f.name)
            return final
        final = self.root / f"{sha}.safetensors"
        if move:
            os.rename(source, final)
        else:
            tmp = self.root / f".{sha}.{uuid.uuid4().hex[:8]}.tmp"
            _copy(source, tmp)
            fsync_path(tmp)
            os.replace(tmp, final)
        fsync_path(self.root)
        return final

    def remove(self, sha: str) -> None:
        self.sidecar_path(sha).unlink(missing_ok=True)
        p = self.path(sha)
        if p is None:
            return
        if p.is_dir():
            tomb = self.root / f".drop-{sha}-{uuid.uuid4().hex[:6]}"
            os.rename(p, tomb)
            shutil.rmtree(tomb, ignore_errors=True)
        else:
            p.unlink()

    def retain(self, keep: set[str]) -> list[str]:
        """Remove every stored expert not in ``keep``; returns the removed ids."""
        removed = [sha for sha in self.ids() if sha not in keep]
        for sha in removed:
            self.remove(sha)
        for side in self.root.glob(f"*{SIDECAR_SUFFIX}"):  # a sidecar whose expert is gone goes too
            if side.name.removesuffix(SIDECAR_SUFFIX) not in keep and not self.has(side.name.removesuffix(SIDECAR_SUFFIX)):
                side.unlink(missing_ok=True)
        return removed

    def recover(self) -> int:
        n = clear_staging(self.root / ".staging")
        for p in self.root.glob(".*.tmp"):
            p.unlink(missing_ok=True)
            n += 1
        return n


def _copy(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
