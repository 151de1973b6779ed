"""Versioned, atomic publishing of one view directory (DESIGN §3.2; STYLE §5).

Layout of ``root`` (``workspace/deploy`` or ``workspace/init``)::

    1/ 2/ 3/ ...   integer versions (never zero-padded, never reused, immutable once renamed in)
       <files>        model.safetensors, or shards + model.safetensors.index.json
       MANIFEST.json  written once, in staging, before the directory gets its number
       EVAL.json      added later by ``write_eval`` (replaced only by rename)
    current -> N   relative symlink, replaced by renaming a new symlink over it
    CURRENT        "N <sha256 of N/MANIFEST.json>\\n", replaced by renaming a new file over it
    .staging/      work area: new versions, temporary pointers, versions being deleted
    .lock          flock(2) taken by every change, so a CLI rollback and the daemon never interleave

Publishing links (hard links, a copy across filesystems) the given files into ``.staging/<unique>/``,
writes MANIFEST.json, fsyncs files and directory, renames the directory to the next integer, fsyncs
``root`` and then points ``CURRENT`` and ``current`` at it. A reader therefore sees a version either
complete or not at all; see ``mergewatch.deploy.loader`` for the reading side.

``CURRENT`` is the authoritative pointer: it is replaced first (and made durable) and the symlink
second, so a crash between the two leaves ``CURRENT`` ahead and ``recover`` aligns the symlink with it.

Hard links share the inode with the source: the caller must treat a source file as immutable (replace
it only by rename, as the checkpoint writer does), or the published file would change with it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import threading
import uuid
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path

from mergewatch.checkpoint.durable import atomic_write, fsync_path
from mergewatch.deploy.loader import (
    EVAL_FILE,
    MANIFEST_FILE,
    POINTER_FILE,
    POINTER_LINK,
    STAGING_DIR,
    file_sha256,
    parse_pointer,
    parse_version_name,
)
from mergewatch.errors import MergewatchError

LOCK_FILE = ".lock"
#: File names a caller may not publish (they belong to the version directory's own bookkeeping).
RESERVED_NAMES = {MANIFEST_FILE, EVAL_FILE}


class PublishError(MergewatchError):
    """A publish, rollback or pointer operation was refused or failed."""


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _check_file_name(name: object) -> str:
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith(".") or name in RESERVED_NAMES:
        raise PublishError(f"invalid published file name {name!r} (plain names only, not {sorted(RESERVED_NAMES)})")
    return name


class Publisher:
    """Publish, point, roll back and prune the versions of one view directory.

    Every change holds an exclusive ``flock`` on ``root/.lock`` (re-entrant within a thread); reading
    methods take no lock, since everything they read is replaced by rename.
    """

    def __init__(self, root: str | os.PathLike, keep: int = 5):
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be an integer >= 1, got {keep!r}")
        self.root = Path(root)
        self.keep = keep
        self.staging = self.root / STAGING_DIR
        self._held = threading.local()

    # Reading --------------------------------------------------------------------------------
    def path(self, version: int) -> Path:
        return self.root / str(int(version))

    def _is_complete(self, version: int) -> bool:
        return (self.path(version) / MANIFEST_FILE).is_file()

    def _numbered_entries(self) -> dict[int, Path]:
        """Every integer-named entry in root, complete or not."""
        try:
            entries = list(self.root.iterdir())
        except FileNotFoundError:
            return {}
        out = {}
        for p in entries:
            v = parse_version_name(p.name)
            if v is not None:
                out[v] = p
        return out

    def versions(self) -> list[int]:
        """Complete versions (integer directory with a MANIFEST.json), ascending."""
        return sorted(v for v, p in self._numbered_entries().items() if p.is_dir() and self._is_complete(v))

    def manifest(self, version: int) -> dict:
        try:
            return json.loads((self.path(version) / MANIFEST_FILE).read_bytes())
        except FileNotFoundError:
            raise PublishError(f"{self.root}: no published version {version} (have {self.versions()})") from None
        except (OSError, ValueError) as e:
            raise PublishError(f"{self.path(version) / MANIFEST_FILE}: unreadable: {e}") from e

    def manifest_sha256(self, version: int) -> str:
        try:
            return file_sha256(self.path(version) / MANIFEST_FILE)
        except FileNotFoundError:
            raise PublishError(f"{self.root}: no published version {version} (have {self.versions()})") from None

    def _read_current_file(self) -> tuple[int, str] | None:
        try:
            return parse_pointer((self.root / POINTER_FILE).read_text("ascii"))
        except (OSError, UnicodeDecodeError, ValueError):
            return None

    def _read_current_link(self) -> int | None:
        try:
            return parse_version_name(os.readlink(self.root / POINTER_LINK))
        except OSError:
            return None

    def current(self) -> int | None:
        """The version ``CURRENT`` names (the symlink's if ``CURRENT`` is absent or unreadable)."""
        pointer = self._read_current_file()
        return pointer[0] if pointer is not None else self._read_current_link()

    def current_content_sha256(self) -> str | None:
        """``content_sha256`` from the current version's manifest (set by callers), to skip republishing
        an unchanged view. None if there is no current version or it has no such field."""
        cur = self.current()
        if cur is None:
            return None
        try:
            return self.manifest(cur).get("content_sha256")
        except PublishError:
            return None

    def find(self, key: str) -> int | None:
        """The newest version published with ``publish_key == key``, or None."""
        for v in reversed(self.versions()):
            try:
                if self.manifest(v).get("publish_key") == key:
                    return v
            except PublishError:  # removed meanwhile, or damaged: not a match
                continue
        return None

    # Locking and small durable operations ---------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        depth = getattr(self._held, "depth", 0)
        if depth:
            self._held.depth = depth + 1
            try:
                yield
            finally:
                self._held.depth -= 1
            return
        self.staging.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._held.depth = 1
            try:
                yield
            finally:
                self._held.depth = 0
        finally:
            os.close(fd)  # releases the flock

    def _tmp_name(self, prefix: str) -> Path:
        return self.staging / f"{prefix}.{os.getpid()}.{uuid.uuid4().hex[:12]}"

    def _set_current(self, version: int) -> None:
        """Point ``CURRENT`` then ``current`` at ``version`` (each by rename, each made durable)."""
        sha = self.manifest_sha256(version)
        atomic_write(self.root / POINTER_FILE, f"{version} {sha}\n", tmp_dir=self.staging)
        link = self._tmp_name("current")
        os.symlink(str(version), link)  # relative: resolves against the directory it is renamed into
        os.replace(link, self.root / POINTER_LINK)
        fsync_path(self.root)

    def _pointers_name(self, version: int) -> bool:
        pointer = self._read_current_file()
        return (
            pointer is not None
            and pointer[0] == version
            and pointer[1] == self.manifest_sha256(version)
            and self._read_current_link() == version
        )

    def _remove_dir(self, path: Path) -> None:
        """Delete a directory safely for readers: rename it out of the namespace first, then rmtree."""
        grave = self._tmp_name(f"removed-{path.name}")
        os.rename(path, grave)
        fsync_path(path.parent)
        shutil.rmtree(grave, ignore_errors=True)

    # Publishing -----------------------------------------------------------------------------
    def publish(
        self,
        files: Mapping[str, str | os.PathLike],
        manifest: dict,
        *,
        key: str | None = None,
        make_current: bool = True,
    ) -> int:
        """Publish ``files`` (destination name -> source path) as the next version; returns it.

        MANIFEST.json is ``manifest`` plus ``version``, ``files`` (name -> sha256), ``created_at``
        (ISO-8601 UTC) and ``publish_key`` (= ``key``); those four are always set here. If ``manifest``
        already holds ``files`` (name -> sha256 for exactly the names given, e.g. from the checkpoint
        writer), the hashes are trusted and not recomputed: the caller vouches for them.

        With a ``key``, publishing is idempotent: if a version with that ``publish_key`` exists, nothing
        is written and that version is returned (made current if ``make_current`` and it is the newest).
        ``make_current=False`` publishes a held-back version (deploy gate): pointers do not move.
        """
        names = {_check_file_name(n): Path(src) for n, src in files.items()}
        if not names:
            raise PublishError("nothing to publish: no files given")
        if not isinstance(manifest, dict):
            raise PublishError(f"manifest must be a dict, got {type(manifest).__name__}")
        given = manifest.get("files")
        if given is not None:
            if not isinstance(given, dict) or set(given) != set(names):
                raise PublishError(
                    f"manifest['files'] must map exactly the published names {sorted(names)} to sha256, got {given!r}"
                )
            given = dict(given)
        try:
            _manifest_bytes({**manifest, "files": {}})
        except (TypeError, ValueError) as e:
            raise PublishError(f"manifest is not JSON-serialisable: {e}") from e
        with self._locked():
            if key is not None:
                existing = self.find(key)
                if existing is not None:
                    if make_current and existing == max(self.versions()) and not self._pointers_name(existing):
                        self._set_current(existing)
                    return existing
            version = self._publish_locked(names, manifest, given, key)
            if make_current:
                self._set_current(version)
            return version

    def _publish_locked(self, names: dict[str, Path], manifest: dict, hashes: dict[str, str] | None, key: str | None) -> int:
        stage = self._tmp_name("publish")
        stage.mkdir()
        try:
            computed = {}
            for name, src in sorted(names.items()):
                dst = stage / name
                try:
                    os.link(src, dst)
                except FileNotFoundError:
                    raise PublishError(f"cannot publish {name!r}: source {src} does not exist") from None
                except OSError:  # other filesystem (EXDEV), protected_hardlinks (EPERM), link limit, ...
                    shutil.copy2(src, dst)
                if not dst.is_file():
                    raise PublishError(f"cannot publish {name!r}: source {src} is not a regular file")
                fsync_path(dst)
                if hashes is None:
                    computed[name] = file_sha256(dst)
            # The version number is taken under the lock, above every number ever used (numbered
            # entries, incomplete ones included, and the pointer), so a number is never reused.
            used = set(self._numbered_entries())
            pointer = self.current()
            version = max([0, *used, *([pointer] if pointer else [])]) + 1
            full = dict(manifest)
            full.update(version=version, files=hashes if hashes is not None else computed, created_at=_utc_now(), publish_key=key)
            with open(stage / MANIFEST_FILE, "wb") as f:
                f.write(_manifest_bytes(full))
                f.flush()
                os.fsync(f.fileno())
            fsync_path(stage)
            final = self.path(version)
            if os.path.lexists(final):  # cannot happen under the lock; rename(2) would replace an empty dir
                raise PublishError(f"{final} already exists")
            os.rename(stage, final)
            fsync_path(self.root)
            return version
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise

    def rollback(self, version: int, *, reason: str = "", key: str | None = None) -> int:
        """Publish the files of ``version`` again as a new, higher version and make it current.

        The new manifest copies the old one plus ``rolled_back_from`` and ``reason``; its ``publish_key``
        is ``key`` (not the old one, so the old step's key still finds the old version). The old files
        are hashed again first, so damage is not republished under a correct-looking manifest.
        """
        with self._locked():
            if version not in self.versions():
                raise PublishError(f"cannot roll back to version {version}: not published in {self.root} (have {self.versions()})")
            if key is not None:
                existing = self.find(key)
                if existing is not None:
                    return existing
            old = self.manifest(version)
            files = old.get("files")
            if not isinstance(files, dict) or not files:
                raise PublishError(f"cannot roll back to version {version}: its manifest lists no files")
            src = {_check_file_name(n): self.path(version) / n for n in files}
            for name, path in src.items():
                try:
                    got = file_sha256(path)
                except FileNotFoundError:
                    raise PublishError(f"cannot roll back to version {version}: {name} is missing") from None
                if got != files[name]:
                    raise PublishError(f"cannot roll back to version {version}: {name} does not match its manifest (damaged)")
            manifest = {**old, "rolled_back_from": version, "reason": reason}
            new = self._publish_locked(src, manifest, dict(files), key)
            self._set_current(new)
            return new

    def promote(self, version: int) -> None:
        """Make the published ``version`` current (the deploy gate letting a version through, or an
        operator overriding it with ``mergewatch promote``). Nothing is republished."""
        with self._locked():
            if version not in self.versions():
                raise PublishError(f"cannot promote version {version}: not published in {self.root} (have {self.versions()})")
            if not self._pointers_name(version):
                self._set_current(version)

    def write_eval(self, version: int, data: dict) -> Path:
        """Write (or replace) ``<version>/EVAL.json`` atomically: temp file, fsync, rename, fsync dir."""
        try:
            raw = _manifest_bytes(data)
        except (TypeError, ValueError) as e:
            raise PublishError(f"evaluation data is not JSON-serialisable: {e}") from e
        with self._locked():
            if version not in self.versions():
                raise PublishError(f"cannot write {EVAL_FILE}: no published version {version} in {self.root}")
            return atomic_write(self.path(version) / EVAL_FILE, raw, tmp_dir=self.staging)

    # Housekeeping ---------------------------------------------------------------------------
    def retain(self) -> list[int]:
        """Remove all but the newest ``keep`` versions, never the current one; returns those removed."""
        with self._locked():
            versions = self.versions()
            current = self.current()
            doomed = [v for v in versions[: -self.keep] if v != current]
            for v in doomed:
                self._remove_dir(self.path(v))
            return doomed

    def recover(self) -> dict:
        """Repair the view after a crash; call on start, before publishing.

        Clears ``.staging`` (unfinished publishes, temporary pointers, half-deleted versions), moves
        away numbered directories without MANIFEST.json, and makes both pointers name a complete
        version: ``CURRENT``'s if it is valid, else the symlink's, else the newest. A valid pointer to an
        older version (rollback, deploy gate) is kept. Returns what was done.
        """
        report: dict = {"staging_removed": [], "incomplete_removed": [], "current_before": None, "current": None, "repointed": False}
        with self._locked():
            for p in sorted(self.staging.iterdir()):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                report["staging_removed"].append(p.name)
            for v, p in sorted(self._numbered_entries().items()):
                if p.is_symlink() or not p.is_dir():
                    continue  # not ours; never delete what we did not create
                if not self._is_complete(v):
                    self._remove_dir(p)
                    report["incomplete_removed"].append(v)
            versions = self.versions()
            pointer = self._read_current_file()
            link = self._read_current_link()
            report["current_before"] = pointer[0] if pointer else link
            if pointer is not None and pointer[0] in versions:
                target = pointer[0]
            elif link is not None and link in versions:
                target = link
            else:
                target = versions[-1] if versions else None
            if target is not None and not self._pointers_name(target):
                self._set_current(target)
                report["repointed"] = True
            elif target is None and (pointer is not None or link is not None or (self.root / POINTER_FILE).exists()):
                # Pointers to nothing: remove them so readers get "no version yet", not a dangling path.
                (self.root / POINTER_FILE).unlink(missing_ok=True)
                if os.path.islink(self.root / POINTER_LINK):
                    (self.root / POINTER_LINK).unlink()
                fsync_path(self.root)
                report["repointed"] = True
            report["current"] = target
            return report
