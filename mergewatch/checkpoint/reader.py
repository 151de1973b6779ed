"""Lazy, validated, read-only access to safetensors checkpoints.

A checkpoint is a ``Mapping[str, Tensor]`` (STYLE §3): opening one reads and checks only the JSON
headers; ``ckpt[name]`` reads that one tensor's bytes with a positioned read (no memory map, so a
merge step's resident memory is what it holds, not what it has touched). A checkpoint is either a
single ``.safetensors`` file or a directory with ``*.safetensors.index.json`` (the standard Hugging
Face index: ``{"metadata": {...}, "weight_map": {tensor: shard file}}``) or a single
``model.safetensors``.

Pickle-based formats (``.pt``, ``.bin``, ``.pth``, ``.ckpt``) are refused: unpickling runs arbitrary
code from the file, and a daemon that loads whatever is dropped into a folder must never do that.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from mergewatch.errors import CheckpointError

#: safetensors dtype code -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
TORCH_TO_CODE = {dt: code for code, (dt, _) in DTYPES.items()}
FLOAT_CODES = {"F64", "F32", "F16", "BF16"}

#: Largest JSON header we accept (the format's own limit is 100 MB).
MAX_HEADER_BYTES = 100 * 1024 * 1024

PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle"}
PICKLE_REFUSAL = (
    "refusing to load a pickle-based checkpoint: unpickling can execute arbitrary code from the file. "
    "mergewatch reads only .safetensors; convert it once in a trusted environment, e.g. "
    "safetensors.torch.save_file(torch.load(path, weights_only=True), 'model.safetensors')"
)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is."""

    name: str
    dtype: str  # safetensors code, e.g. "F32"
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset in ``file``
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][0]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def _looks_like_pickle(head: bytes) -> bool:
    # torch.save's zip format starts with a local zip header; raw pickles (torch.save with
    # _use_new_zipfile_serialization=False, pickle.dump) start with PROTO 0x80 and a protocol byte.
    return head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))


def _sniff_pickle(path: Path, head: bytes) -> None:
    if _looks_like_pickle(head):
        raise CheckpointError(path, "file content is a PyTorch/pickle archive, not safetensors; " + PICKLE_REFUSAL, "pickle")


def _no_duplicates(pairs: list) -> dict:
    """json object hook: a repeated tensor name would silently shadow the first entry's bytes."""
    d: dict = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"duplicate key {k!r}")
        d[k] = v
    return d


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and structurally validate one safetensors file's header.

    Checks: the 8-byte length and the JSON fit in the file; every entry has a supported dtype, a
    shape and offsets whose length equals prod(shape) * itemsize; entries do not overlap and cover
    the data region exactly up to the end of the file (so a truncated or padded file is caught).

    Pickle sniffing only runs when the bytes cannot be safetensors: a valid header length such as
    128 (``80 00 ..``) or 640 (``80 02 ..``) starts with the same byte as a pickle, so the cheap
    magic-byte test alone would refuse perfectly good files.
    """
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(path, PICKLE_REFUSAL, "pickle")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                _sniff_pickle(path, head)
                what = "empty (0 bytes)" if size == 0 else f"{size} bytes: too short to be safetensors (truncated)"
                raise CheckpointError(path, f"file is {what}", "truncated")
            (n,) = struct.unpack("<Q", head)
            plausible = 0 < n <= MAX_HEADER_BYTES and 8 + n <= size
            first = f.read(1) if plausible else b""
            if first != b"{":
                _sniff_pickle(path, head)
                if not 0 < n <= MAX_HEADER_BYTES:
                    raise CheckpointError(path, f"header length {n} is not plausible: not a safetensors file or corrupt", "not_safetensors")
                if 8 + n > size:
                    raise CheckpointError(
                        path, f"header claims {n} bytes but the file has only {size - 8} after the length: truncated", "truncated"
                    )
                raise CheckpointError(path, "header does not start with '{': not a safetensors file or corrupt", "not_safetensors")
            raw = first + f.read(n - 1)
    except OSError as e:
        raise CheckpointError(path, f"cannot read: {e.strerror or e}", "vanished" if isinstance(e, FileNotFoundError) else "unreadable") from e
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(path, f"header is not valid JSON ({e}): corrupt file") from e
    if not isinstance(header, dict):
        raise CheckpointError(path, "header is not a JSON object: corrupt file")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(path, "__metadata__ must map strings to strings")
    data_start = 8 + n
    data_len = size - data_start
    infos: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise CheckpointError(path, f"tensor '{name}': header entry is not an object")
        dtype, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPES:
            raise CheckpointError(path, f"tensor '{name}': unsupported dtype {dtype!r} (supported: {', '.join(DTYPES)})")
        if not (isinstance(shape, list) and all(_is_int(s) and s >= 0 for s in shape)):
            raise CheckpointError(path, f"tensor '{name}': invalid shape {shape!r}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs)):
            raise CheckpointError(path, f"tensor '{name}': invalid data_offsets {offs!r}")
        begin, end = offs
        numel = 1
        for s in shape:
            numel *= s
        expect = numel * DTYPES[dtype][1]
        if begin < 0 or end < begin or end - begin != expect:
            raise CheckpointError(
                path, f"tensor '{name}': offsets {offs} hold {end - begin} bytes but shape {shape} x {dtype} needs {expect}"
            )
        if end > data_len:
            raise CheckpointError(
                path, f"tensor '{name}': data ends at byte {end} but the file has {data_len} data bytes: truncated", "truncated"
            )
        spans.append((begin, end, name))
        infos[name] = TensorInfo(name, dtype, tuple(shape), path, data_start + begin, end - begin)
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            what = "overlaps the previous tensor" if begin < pos else f"leaves a gap of {begin - pos} bytes"
            raise CheckpointError(path, f"tensor '{name}': {what}: header lies about sizes")
        pos = end
    if pos != data_len:
        raise CheckpointError(path, f"header describes {pos} data bytes but the file holds {data_len}: corrupt or padded file", "truncated")
    return infos, metadata


def _resolve_layout(path: Path) -> tuple[list[Path], Path | None]:
    """The shard files of a checkpoint and its index file (None for a single file)."""
    if path.is_file():
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise CheckpointError(path, PICKLE_REFUSAL, "pickle")
        return [path], None
    if not path.is_dir():
        raise CheckpointError(path, "no such file or directory", "vanished")
    pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise CheckpointError(path, f"several index files: {[p.name for p in indexes]}", "layout")
    if indexes:
        return [], indexes[0]
    singles = sorted(path.glob("*.safetensors"))
    if len(singles) == 1:
        return singles, None
    if not singles and pickles:
        raise CheckpointError(path, f"holds only pickle checkpoints {pickles}; " + PICKLE_REFUSAL, "pickle")
    if not singles:
        raise CheckpointError(path, "directory holds no .safetensors file", "not_safetensors")
    raise CheckpointError(path, f"directory holds {len(singles)} .safetensors files but no *.safetensors.index.json", "layout")


class LazyCheckpoint(Mapping):
    """Read-only mapping name -> tensor over a safetensors file or sharded directory.

    Construction validates every header (and, for a sharded checkpoint, the index: every shard
    present, every tensor in exactly the shard the index names). ``keys()`` iterate in sorted
    order, the canonical order used by the engine, the writer and content hashes.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        files, index = _resolve_layout(self.path)
        self.index_path = index
        #: the index's metadata (sharded) or the file header's ``__metadata__`` (single file)
        self.metadata: dict[str, str] = {}
        #: the ``__metadata__`` entries every file's header holds alike (e.g. ``{"format": "pt"}``)
        self.header_metadata: dict[str, str] | None = None
        infos: dict[str, TensorInfo] = {}
        if index is not None:
            try:
                data = json.loads(index.read_text("utf-8"))
            except (OSError, ValueError) as e:
                raise CheckpointError(index, f"invalid index file: {e}", "layout") from e
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict):
                raise CheckpointError(index, "invalid index file: needs an object 'weight_map' {tensor: shard file}", "layout")
            for tname, shard in weight_map.items():
                if not isinstance(shard, str) or not shard or "/" in shard or "\\" in shard or shard.startswith("."):
                    raise CheckpointError(index, f"invalid shard name {shard!r} for tensor '{tname}' in weight_map", "layout")
            shard_names = sorted(set(weight_map.values()))
            missing = [s for s in shard_names if not (self.path / s).is_file()]
            if missing:
                raise CheckpointError(self.path, f"index names shard(s) that are missing: {missing}", "layout")
            files = [self.path / s for s in shard_names]
            meta = data.get("metadata") or {}
            self.metadata = {k: str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}
        for f in files:
            part, meta = read_header(f)
            if index is None:
                self.metadata = meta
            common = self.header_metadata
            self.header_metadata = dict(meta) if common is None else {k: v for k, v in common.items() if meta.get(k) == v}
            for name, info in part.items():
                if name in infos:
                    raise CheckpointError(self.path, f"tensor '{name}' is stored in two shards", "layout")
                if index is not None and weight_map.get(name) != f.name:
                    said = f"says {weight_map[name]!r}" if name in weight_map else "does not list it"
                    raise CheckpointError(self.path, f"tensor '{name}' is in shard {f.name} but the index {said}", "layout")
                infos[name] = info
        if index is not None:
            absent = sorted(set(weight_map) - set(infos))
            if absent:
                raise CheckpointError(self.path, f"index lists tensors no shard holds: {absent[:10]}", "layout")
        self.files = files
        self.header_metadata = self.header_metadata or {}
        self._infos = dict(sorted(infos.items()))

    # Mapping protocol -------------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        info = self._infos[name]
        if info.nbytes:
            # An uninitialised buffer (``bytearray(n)`` would zero-fill it: one more pass over every
            # byte read, a sizeable share of a streaming step's CPU time). torch's CPU allocator
            # aligns it, so the byte tensor can be viewed as any dtype below.
            raw = torch.empty(info.nbytes, dtype=torch.uint8)
            # One positioned read of exactly this tensor's span; loop because a single read(2)
            # returns at most ~2 GiB on Linux (and may return less on network filesystems).
            view = memoryview(raw.numpy())
            got = 0
            with open(info.file, "rb", buffering=0) as f:
                f.seek(info.start)
                while got < info.nbytes:
                    k = f.readinto(view[got:])
                    if not k:
                        break
                    got += k
            if got != info.nbytes:
                raise CheckpointError(
                    info.file, f"tensor '{name}': short read, {got} of {info.nbytes} bytes (file changed or truncated)", "truncated"
                )
            t = raw.view(info.torch_dtype)
        else:
            t = torch.empty(0, dtype=info.torch_dtype)
        return t.reshape(info.shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    # Extras -----------------------------------------------------------------------------------
    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def infos(self) -> dict[str, TensorInfo]:
        return dict(self._infos)

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self._infos.values())

    @property
    def largest_tensor_bytes(self) -> int:
        return max((i.nbytes for i in self._infos.values()), default=0)

    def __repr__(self) -> str:
        return f"LazyCheckpoint({str(self.path)!r}, {len(self)} tensors, {self.nbytes} bytes)"


def open_checkpoint(path: str | os.PathLike) -> LazyCheckpoint:
    return LazyCheckpoint(path)
