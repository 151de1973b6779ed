"""Load the published model for inference (DESIGN §3.2), from plain Python.

A view directory (``deploy/`` or ``init/``) holds integer version directories and two pointers:
``CURRENT`` (a file ``"N <sha256 of N/MANIFEST.json>\\n"``) and ``current -> N`` (a symlink). The loader
reads ``CURRENT`` once and from then on uses only the integer path ``root/N``. It never follows
``current`` twice: between two lookups the publisher may swap it, and a reader that took the manifest
from one version and the weights from the next would serve a model nobody published.

Version directories are immutable and their numbers are never reused, so once ``N`` is resolved,
everything under ``root/N`` is either exactly what was published or gone (retention removed it). Gone is
reported as ``VersionGoneError`` (a ``FileNotFoundError``) and ``load_current`` retries with a fresh
``CURRENT``; anything else that does not match the manifest is an ``IntegrityError``.

This module imports only the standard library, torch and ``mergewatch.checkpoint`` so that an inference
server can use it without the daemon's dependencies.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mergewatch.errors import CheckpointError, MergewatchError

if TYPE_CHECKING:  # torch is imported when a version is loaded: the publisher reads names from here (issue 14)
    import torch

    from mergewatch.checkpoint.reader import LazyCheckpoint

#: Names in a view directory (DESIGN §3.2).
POINTER_FILE = "CURRENT"
POINTER_LINK = "current"
MANIFEST_FILE = "MANIFEST.json"
EVAL_FILE = "EVAL.json"
STAGING_DIR = ".staging"

_VERSION_RE = re.compile(r"[1-9][0-9]*")
_SHA_RE = re.compile(r"[0-9a-f]{64}")


class LoadError(MergewatchError):
    """The published model cannot be loaded (no current version, unreadable pointer or manifest)."""


class IntegrityError(LoadError):
    """A published file does not match its manifest (tampered, corrupted or rewritten in place)."""


class VersionGoneError(LoadError, FileNotFoundError):
    """The version named by the pointer was removed (by retention) while it was being loaded."""


def parse_version_name(name: str) -> int | None:
    """The version number of a directory name, or None (``"01"``, ``"0"``, ``".staging"`` are not versions)."""
    return int(name) if _VERSION_RE.fullmatch(name) else None


def parse_pointer(text: str) -> tuple[int, str]:
    """Parse the content of ``CURRENT``: ``"N <manifest sha256>\\n"``. Raises ``ValueError``."""
    parts = text.split()
    if len(parts) != 2 or parse_version_name(parts[0]) is None or not _SHA_RE.fullmatch(parts[1]):
        raise ValueError(f"malformed pointer {text!r}: expected 'N <sha256>'")
    return int(parts[0]), parts[1]


def read_pointer(root: str | os.PathLike) -> tuple[int, str | None] | None:
    """``(version, manifest sha256)`` from ``CURRENT``, or ``(version, None)`` from the ``current``
    symlink when ``CURRENT`` is absent; None when the view has no current version yet.

    A malformed ``CURRENT`` is a ``LoadError``: it is replaced atomically, so it never reads half-written.
    """
    root = Path(root)
    try:
        text = (root / POINTER_FILE).read_text("ascii")
    except FileNotFoundError:
        try:
            target = os.readlink(root / POINTER_LINK)
        except OSError:  # absent, or not a symlink
            return None
        version = parse_version_name(target)
        if version is None:
            raise LoadError(f"{root / POINTER_LINK} points to {target!r}, not to a version directory") from None
        return version, None
    except (OSError, UnicodeDecodeError) as e:
        raise LoadError(f"{root / POINTER_FILE}: cannot read: {e}") from e
    try:
        return parse_pointer(text)
    except ValueError as e:
        raise LoadError(f"{root / POINTER_FILE}: {e}") from None


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclass(frozen=True)
class LoadedModel:
    """One resolved, verified version. ``checkpoint`` reads tensors lazily from ``path`` (= ``root/N``)."""

    version: int
    manifest: dict
    manifest_sha256: str
    path: Path
    checkpoint: LazyCheckpoint


def _manifest_files(manifest: dict, where: Path) -> dict[str, str]:
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise IntegrityError(f"{where}: manifest has no 'files' mapping")
    for name, sha in files.items():
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
            raise IntegrityError(f"{where}: manifest names an invalid file {name!r}")
        if not isinstance(sha, str) or not _SHA_RE.fullmatch(sha):
            raise IntegrityError(f"{where}: manifest sha256 of {name!r} is not a sha256 hex digest")
    return files


def load_version(root: str | os.PathLike, version: int, manifest_sha256: str | None = None, *, verify: bool = True) -> LoadedModel:
    """Load ``root/<version>``, checking its manifest against ``manifest_sha256`` (when given) and, with
    ``verify``, every file's sha256 against the manifest."""
    root = Path(root)
    vdir = root / str(version)
    try:
        raw = (vdir / MANIFEST_FILE).read_bytes()
    except FileNotFoundError:
        raise VersionGoneError(f"version {version} in {root} no longer exists (removed by retention?)") from None
    except OSError as e:
        raise LoadError(f"{vdir / MANIFEST_FILE}: cannot read: {e}") from e
    sha = hashlib.sha256(raw).hexdigest()
    if manifest_sha256 is not None and sha != manifest_sha256:
        raise IntegrityError(f"{vdir / MANIFEST_FILE}: sha256 {sha} differs from {manifest_sha256} named by {POINTER_FILE}")
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IntegrityError(f"{vdir / MANIFEST_FILE}: not valid JSON: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("version") != version:
        raise IntegrityError(f"{vdir / MANIFEST_FILE}: does not describe version {version}")
    files = _manifest_files(manifest, vdir)

    def gone_or(err: Exception) -> Exception:
        # A file missing from a version that still exists is damage; a missing directory is retention.
        if not vdir.exists():
            return VersionGoneError(f"version {version} in {root} was removed while loading (removed by retention?)")
        return err

    if verify:
        for name, expected in sorted(files.items()):
            try:
                got = file_sha256(vdir / name)
            except FileNotFoundError:
                raise gone_or(IntegrityError(f"{vdir / name}: listed in the manifest but missing")) from None
            if got != expected:
                raise IntegrityError(f"{vdir / name}: sha256 {got} does not match the manifest ({expected}): file damaged or tampered with")
    from mergewatch.checkpoint.reader import LazyCheckpoint

    try:
        ckpt = LazyCheckpoint(vdir)
    except CheckpointError as e:
        raise gone_or(IntegrityError(f"version {version}: {e}")) from e
    return LoadedModel(version, manifest, sha, vdir, ckpt)


def load_current(root: str | os.PathLike, *, verify: bool = True, retries: int = 3) -> LoadedModel:
    """Resolve ``CURRENT`` once and load that version.

    ``verify`` hashes every file (reads the whole model once) and compares with the manifest. If the
    version is removed while loading (a slow reader racing retention), ``CURRENT`` is read again, up to
    ``retries`` times, then ``VersionGoneError`` is raised.
    """
    root = Path(root)
    for attempt in range(retries + 1):
        pointer = read_pointer(root)
        if pointer is None:
            raise LoadError(f"{root}: no published version yet (no {POINTER_FILE} and no {POINTER_LINK} symlink)")
        try:
            return load_version(root, pointer[0], pointer[1], verify=verify)
        except VersionGoneError:
            if attempt == retries:
                raise
    raise AssertionError("unreachable")


def state_dict(loaded: LoadedModel) -> dict[str, torch.Tensor]:
    """Read every tensor of a loaded version into memory (sorted names).

    Do this soon after loading: the tensors are read by path, and retention removes a version once
    ``keep`` newer ones exist (it never removes the current one).
    """
    try:
        return {name: loaded.checkpoint[name] for name in loaded.checkpoint}
    except (FileNotFoundError, CheckpointError) as e:
        if not loaded.path.exists():
            raise VersionGoneError(f"version {loaded.version} was removed before its tensors were read") from e
        raise


class ModelWatcher:
    """Wait for a new current version: ``poll()`` / ``wait()`` return a ``LoadedModel`` only when the
    pointer names another version than the one the watcher already knows, else None.

    The known version is ``since`` (typically the model the caller serves, from ``load_current``) or,
    without it, whatever is current when the watcher is created (nothing, if nothing is published
    yet); after that, the version last returned. So::

        model = load_current(root)
        watcher = ModelWatcher(root, since=model)
        new = watcher.wait(timeout=60)   # a version made current after ``model``, or None

    Passing ``since`` closes the gap between ``load_current`` and the watcher's creation: a version
    made current in between is still reported. "New" means "made current since", not "a higher
    number": a rollback is published as a new, higher version anyway, and ``mergewatch promote`` of
    an older held-back version is reported too, since it changes what should be served.

    Only the small ``CURRENT`` file is read while nothing changes. Integrity errors propagate (the
    pointer is not marked as seen, so the next poll tries again); a version removed while loading is
    skipped, the next poll sees whatever replaced it.
    """

    def __init__(self, root: str | os.PathLike, interval: float = 1.0, *, verify: bool = True, since: LoadedModel | None = None):
        self.root = Path(root)
        self.interval = interval
        self.verify = verify
        #: The version last returned (or ``since``); None until one is.
        self.loaded: LoadedModel | None = since
        self._seen: tuple[int, str | None] | None = (
            (since.version, since.manifest_sha256) if since is not None else read_pointer(self.root)
        )

    def _is_seen(self, pointer: tuple[int, str | None]) -> bool:
        # The symlink fallback has no manifest hash: then the version number alone identifies it
        # (numbers are never reused); with both hashes known, a different hash is a different pointer.
        seen = self._seen
        if seen is None or seen[0] != pointer[0]:
            return False
        return seen[1] is None or pointer[1] is None or seen[1] == pointer[1]

    def poll(self) -> LoadedModel | None:
        """The current version if it is new (see the class), else None; never blocks."""
        pointer = read_pointer(self.root)
        if pointer is None or self._is_seen(pointer):
            return None
        try:
            loaded = load_version(self.root, pointer[0], pointer[1], verify=self.verify)
        except VersionGoneError:
            return None
        self._seen = pointer
        self.loaded = loaded
        return loaded

    def wait(self, timeout: float | None = None) -> LoadedModel | None:
        """Poll every ``interval`` seconds until a version newer than the known one is current and
        return it, or return None once ``timeout`` seconds pass (None: wait forever)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            loaded = self.poll()
            if loaded is not None:
                return loaded
            if deadline is None:
                time.sleep(self.interval)
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            time.sleep(min(self.interval, left))
