"""Streaming, atomic safetensors writer (STYLE §5: write to staging, fsync, rename).

The layout (names, dtypes, shapes) is known before the first byte is written (it is the base's), so
the header is written first and tensors are then appended one at a time in canonical (sorted) order:
the writer never holds more than the tensor it is given. A ``FileLayout`` says how the tensors are
split into files: one ``model.safetensors``, shards of at most ``shard_bytes`` of tensor data, or
given shards (the base's own boundaries, ``FileLayout.of``); shards carry Hugging Face's names
(``model-00001-of-00003.safetensors``) and a standard ``model.safetensors.index.json`` with
``metadata.total_size``, and every file's header carries the layout's ``__metadata__`` (published
views: ``{"format": "pt"}``, which transformers expects). While writing, the writer computes each
file's sha256 (for MANIFEST.json) and the checkpoint's content hash (see ``hashing``).

``atomic_directory`` gives the staging/rename protocol used by every durable artefact: write into a
fresh directory under ``.staging/``, fsync each file and the directory, rename into place, fsync the
parent. A crash leaves at most a staging directory, never a partial final directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from mergewatch.checkpoint.durable import fsync_path
from mergewatch.checkpoint.hashing import ContentHasher, tensor_bytes
from mergewatch.checkpoint.reader import DTYPES, TORCH_TO_CODE

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

#: Tensors at least this large are hashed on helper threads while they are written (see ``write``).
PARALLEL_HASH_BYTES = 1 << 20
_HASH_POOL: ThreadPoolExecutor | None = None
_HASH_POOL_LOCK = threading.Lock()


def _hash_pool() -> ThreadPoolExecutor:
    global _HASH_POOL
    with _HASH_POOL_LOCK:
        if _HASH_POOL is None:
            _HASH_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mergewatch-hash")
        return _HASH_POOL


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPES[TORCH_TO_CODE[self.dtype]][1]
        for s in self.shape:
            n *= s
        return n


def _header_bytes(specs: Sequence[TensorSpec], metadata: dict[str, str] | None) -> bytes:
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    off = 0
    for s in specs:
        header[s.name] = {"dtype": TORCH_TO_CODE[s.dtype], "shape": list(s.shape), "data_offsets": [off, off + s.nbytes]}
        off += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # align the data region to 8 bytes, as the reference writer does
    return struct.pack("<Q", len(raw)) + raw


@dataclass(frozen=True)
class FileLayout:
    """How a checkpoint's tensors are split into files, and the header metadata of every file.

    ``shards`` (names per file, in file order) wins over ``shard_bytes``; with neither, one
    ``model.safetensors``. Names a shard lists that a checkpoint does not hold are skipped (a state
    set may hold fewer names than the base), and so are shards left empty.
    """

    shard_bytes: int | None = None
    shards: tuple[tuple[str, ...], ...] | None = None
    metadata: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, ckpt, *, shard_bytes: int | None = None, metadata: dict[str, str] | None = None) -> FileLayout:
        """The layout of the checkpoint ``ckpt`` (a ``LazyCheckpoint``): its own shard boundaries
        unless ``shard_bytes`` is given (0: one file, N: shards of at most N bytes)."""
        meta = tuple(sorted((metadata or {}).items()))
        if shard_bytes is not None:
            return cls(shard_bytes=shard_bytes or None, metadata=meta)
        if ckpt.index_path is None:
            return cls(metadata=meta)
        by_file: dict[Path, list[str]] = {f: [] for f in ckpt.files}
        for name in ckpt:
            by_file[ckpt.info(name).file].append(name)
        return cls(shards=tuple(tuple(names) for names in by_file.values()), metadata=meta)

    def describes(self, ckpt) -> bool:
        """``ckpt``'s files are already what a writer with this layout makes of its tensors: the same
        files (Hugging Face's names for shards, an index with ``total_size``), the same tensors in
        each, and this metadata in every header; they can then be published as they are."""
        specs = [TensorSpec(n, ckpt.info(n).torch_dtype, ckpt.info(n).shape) for n in ckpt]
        plan = self.plan(specs)
        if len(plan) == 1:
            if ckpt.index_path is not None:
                return False
        elif ckpt.index_path is None or [f.name for f in ckpt.files] != shard_file_names(len(plan)) or "total_size" not in ckpt.metadata:
            return False
        held = [[n for n in ckpt if ckpt.info(n).file == f] for f in ckpt.files]
        return held == [[s.name for s in g] for g in plan] and ckpt.header_metadata == dict(self.metadata)

    def plan(self, specs: Sequence[TensorSpec]) -> list[list[TensorSpec]]:
        """``specs`` (sorted by name) grouped into files, in file order."""
        if self.shards is None:
            return plan_shards(specs, self.shard_bytes)
        shard_of = {name: i for i, names in enumerate(self.shards) for name in names}
        stray = [s.name for s in specs if s.name not in shard_of]
        if stray:
            raise ValueError(f"writer: tensor(s) {stray[:5]} belong to no shard of the layout")
        groups: list[list[TensorSpec]] = [[] for _ in self.shards]
        for s in specs:
            groups[shard_of[s.name]].append(s)
        return [g for g in groups if g] or [[]]


def shard_file_names(n: int) -> list[str]:
    """Hugging Face's names for ``n`` files: ``model.safetensors``, or ``model-00001-of-0000n...``."""
    return [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def plan_shards(specs: Sequence[TensorSpec], shard_bytes: int | None) -> list[list[TensorSpec]]:
    """Split specs (in order) into shards of at most ``shard_bytes`` data bytes (a larger tensor
    gets a shard of its own). ``None`` means one file."""
    if not shard_bytes:
        return [list(specs)]
    shards: list[list[TensorSpec]] = [[]]
    used = 0
    for s in specs:
        if shards[-1] and used + s.nbytes > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(s)
        used += s.nbytes
    return shards


class CheckpointWriter:
    """Write a checkpoint into ``directory`` (which must exist and be a staging location).

    Call ``write(name, tensor)`` once per spec, in spec order; ``close()`` finishes the files,
    fsyncs them and returns ``files`` (name -> sha256) and ``content_sha256``. The layout is
    ``layout``, or one built from ``shard_bytes`` and ``metadata``. Given shards need not be
    contiguous in name order (Hugging Face groups by module): every shard is appended to in name
    order, several may be open at once, and each is closed as soon as its last tensor is in.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        specs: Iterable[TensorSpec],
        *,
        shard_bytes: int | None = None,
        metadata: dict[str, str] | None = None,
        layout: FileLayout | None = None,
    ):
        self.directory = Path(directory)
        self.specs = sorted(specs, key=lambda s: s.name)
        # Checked up front, before any byte is written: a repeated name would produce a header
        # whose second entry shadows the first, and an unsupported dtype has no safetensors code.
        for a, b in zip(self.specs, self.specs[1:]):
            if a.name == b.name:
                raise ValueError(f"writer: tensor '{a.name}' appears twice in the layout")
        for s in self.specs:
            if s.dtype not in TORCH_TO_CODE:
                raise ValueError(
                    f"writer: tensor '{s.name}' has dtype {s.dtype}, which safetensors here does not support "
                    f"(supported: {', '.join(str(d) for d in TORCH_TO_CODE)})"
                )
        if layout is None:
            layout = FileLayout(shard_bytes=shard_bytes, metadata=tuple(sorted((metadata or {}).items())))
        elif shard_bytes is not None or metadata is not None:
            raise ValueError("writer: give either a layout or shard_bytes/metadata, not both")
        self.metadata = dict(layout.metadata) or None
        shards = layout.plan(self.specs)
        self._names = shard_file_names(len(shards))
        self._shards = shards
        self._shard_of = {s.name: i for i, sh in enumerate(shards) for s in sh}
        self._headers = [_header_bytes(sh, self.metadata) for sh in shards]
        self._offset: dict[str, int] = {}  # absolute byte offset of each tensor in its shard file
        for i, sh in enumerate(shards):
            off = len(self._headers[i])
            for sp in sh:
                self._offset[sp.name] = off
                off += sp.nbytes
        self._left = [len(sh) for sh in shards]  # tensors each shard still waits for
        self._pos = 0
        self._fhs: dict[int, object] = {}  # open shard files
        self._shas: dict[int, object] = {}
        self._done: dict[int, str] = {}  # finished shard -> sha256
        self.files: dict[str, str] = {}
        self._content = ContentHasher()
        self._pending: tuple = ()  # hash futures of the tensor being written
        self.content_sha256: str | None = None
        self.bytes_written = 0

    def _open_shard(self, i: int) -> None:
        self._fhs[i] = open(self.directory / self._names[i], "wb")
        self._shas[i] = hashlib.sha256()
        self._emit(i, self._headers[i])

    def _emit(self, i: int, data) -> None:
        self._fhs[i].write(data)
        self._shas[i].update(data)
        self.bytes_written += len(data)

    def _join(self) -> None:
        """Wait for the helper-thread hashes of the tensor being written (and raise what they raised)."""
        pending, self._pending = self._pending, ()
        for f in pending:
            f.result()

    def _finish_shard(self, i: int) -> None:
        fh = self._fhs.pop(i)
        fh.flush()
        os.fsync(fh.fileno())
        fh.close()
        self._done[i] = self._shas.pop(i).hexdigest()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._pos >= len(self.specs):
            raise ValueError(f"writer: unexpected extra tensor '{name}'")
        spec = self.specs[self._pos]
        if name != spec.name:
            raise ValueError(f"writer: expected tensor '{spec.name}' next, got '{name}'")
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(
                f"writer: tensor '{name}' is {tuple(tensor.shape)} {tensor.dtype}, layout says {spec.shape} {spec.dtype}"
            )
        shard = self._shard_of[name]
        if shard not in self._fhs:
            self._open_shard(shard)
        fh, sha = self._fhs[shard], self._shas[shard]
        data = tensor_bytes(tensor)
        code = TORCH_TO_CODE[spec.dtype]
        if len(data) >= PARALLEL_HASH_BYTES:
            # Every byte goes through two sha256 streams (the file's, for MANIFEST.json, and the
            # content hash) besides the write itself; hashlib releases the GIL, so both hashes run
            # on helper threads while this thread copies the bytes into the file. They are joined
            # before returning (so the caller's tensor is not kept alive, and the next update of
            # either stream comes after this one: the same byte order as sequential code).
            # Deferring the join to the next call was measured: ~4 % faster, at the price of one
            # more live tensor per writer during the next tensor's merge; not worth it.
            pool = _hash_pool()
            self._pending = (pool.submit(sha.update, data), pool.submit(self._content.add, name, code, spec.shape, data))
            try:
                fh.write(data)
                self.bytes_written += len(data)
            finally:
                self._join()
        else:
            self._emit(shard, data)
            self._content.add(name, code, spec.shape, data)
        self._pos += 1
        self._left[shard] -= 1
        if not self._left[shard]:
            self._finish_shard(shard)

    @property
    def layout_key(self) -> tuple:
        """Equal for two writers exactly when their files would be byte-identical given the same
        tensors: same specs, shard plan and metadata."""
        return (tuple(self.specs), tuple(self._headers), tuple(self._names))

    @property
    def position(self) -> int:
        """How many tensors have been written."""
        return self._pos

    def read_back(self, name: str) -> torch.Tensor:
        """A tensor this writer has already written, read back from its (possibly unfinished) file."""
        i = self._shard_of[name]
        spec = next(sp for sp in self._shards[i] if sp.name == name)
        if self.specs.index(spec) >= self._pos:
            raise ValueError(f"writer: tensor '{name}' has not been written yet")
        if i in self._fhs:
            self._fhs[i].flush()
        raw = torch.empty(spec.nbytes, dtype=torch.uint8)
        view = memoryview(raw.numpy())
        got = 0
        with open(self.directory / self._names[i], "rb", buffering=0) as f:
            f.seek(self._offset[name])
            while got < spec.nbytes:
                k = f.readinto(view[got:])
                if not k:
                    raise OSError(f"writer: short read back of '{name}' from {self._names[i]}")
                got += k
        return raw.view(spec.dtype).reshape(spec.shape)

    def adopt(self, leader: "CheckpointWriter") -> dict[str, str]:
        """Finish this (still empty) writer as a copy of ``leader``, which has been closed after
        receiving the tensors this one should have received: its files are hard-linked, not
        rewritten. Only valid when both have the same ``layout_key``."""
        if self._pos or self._fhs:
            raise ValueError("writer: adopt() needs a writer that has not written anything")
        if leader.layout_key != self.layout_key or leader.content_sha256 is None:
            raise ValueError("writer: adopt() needs a closed leader with the same layout")
        for fname in leader.files:
            os.link(leader.directory / fname, self.directory / fname)
        self._pos = len(self.specs)
        self.files = dict(leader.files)
        self.content_sha256 = leader.content_sha256
        return dict(self.files)

    def close(self) -> dict[str, str]:
        if self._pos != len(self.specs):
            missing = [s.name for s in self.specs[self._pos:]]
            raise ValueError(f"writer: {len(missing)} tensor(s) never written, first: {missing[0]}")
        if not self.specs:
            self._open_shard(0)
            self._finish_shard(0)
        self.files = {self._names[i]: self._done[i] for i in range(len(self._shards))}
        if len(self._shards) > 1:
            total = sum(s.nbytes for s in self.specs)
            index = {
                "metadata": {"total_size": total, **(self.metadata or {})},
                "weight_map": {s.name: self._names[self._shard_of[s.name]] for s in self.specs},
            }
            raw = json.dumps(index, indent=2, sort_keys=True).encode("utf-8")
            with open(self.directory / INDEX_FILE, "wb") as f:
                f.write(raw)
                f.flush()
                os.fsync(f.fileno())
            self.files[INDEX_FILE] = hashlib.sha256(raw).hexdigest()
        self.content_sha256 = self._content.hexdigest()
        return dict(self.files)


def write_checkpoint(
    directory: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    *,
    shard_bytes: int | None = None,
    metadata: dict[str, str] | None = None,
) -> CheckpointWriter:
    """Write an in-memory dict of tensors atomically to ``directory`` (tests, demo, small models)."""
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    with atomic_directory(directory) as stage:
        w = CheckpointWriter(stage, specs, shard_bytes=shard_bytes, metadata=metadata)
        for s in w.specs:
            w.write(s.name, tensors[s.name])
        w.close()
    return w


def write_safetensors_file(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata=None) -> str:
    """Write a single ``.safetensors`` file atomically (temp name, fsync, rename); returns its content sha."""
    path = Path(path)
    tmp_dir = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp_dir.mkdir(parents=True)
    try:
        specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
        w = CheckpointWriter(tmp_dir, specs, metadata=metadata)
        for s in w.specs:
            w.write(s.name, tensors[s.name])
        w.close()
        os.replace(tmp_dir / SINGLE_FILE, path)
        fsync_path(path.parent)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return w.content_sha256


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike, *, staging_root: str | os.PathLike | None = None) -> Iterator[Path]:
    """Yield a fresh staging directory that becomes ``final`` atomically when the block succeeds.

    ``staging_root`` defaults to ``<parent>/.staging`` (same filesystem, so the rename is atomic).
    ``final`` must not exist. On error the staging directory is removed and nothing appears.
    """
    final = Path(final)
    root = Path(staging_root) if staging_root is not None else final.parent / ".staging"
    root.mkdir(parents=True, exist_ok=True)
    if final.exists():
        # Fail before the caller spends time filling a staging directory that could never land.
        raise FileExistsError(f"{final} already exists; refusing to replace it")
    stage = root / f"{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    try:
        yield stage
        # Files and sub-directories (a directory's entries are only durable once it is fsynced).
        for p in sorted(stage.rglob("*"), key=lambda q: len(q.parts), reverse=True):
            if p.is_file() or p.is_dir():
                fsync_path(p)
        fsync_path(stage)
        if final.exists():
            raise FileExistsError(f"{final} already exists; refusing to replace it")
        os.rename(stage, final)
        fsync_path(final.parent)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def clear_staging(root: str | os.PathLike) -> int:
    """Remove leftovers of interrupted writes under a ``.staging`` directory; returns how many."""
    root = Path(root)
    if not root.is_dir():
        return 0
    n = 0
    for p in root.iterdir():
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        n += 1
    return n
