"""Content identity of a checkpoint (DESIGN §3.1: a drop is identified by the sha256 of its tensors).

The content hash is independent of file layout (single file vs shards, header order, metadata): it
hashes, for every tensor in sorted name order, its name, dtype code, shape and raw bytes, each
length-prefixed so that no two different checkpoints share a byte stream.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a tensor is turned into bytes
    import torch


class ContentHasher:
    def __init__(self) -> None:
        self._h = hashlib.sha256(b"mergewatch-content-v1\0")
        self._last: str | None = None

    def add(self, name: str, dtype_code: str, shape, data) -> None:
        if self._last is not None and name <= self._last:
            raise ValueError(f"content hash needs tensors in sorted order ('{name}' after '{self._last}')")
        self._last = name
        nb = name.encode("utf-8")
        meta = f"{dtype_code}:{','.join(map(str, shape))}".encode()
        self._h.update(struct.pack("<Q", len(nb)) + nb + struct.pack("<Q", len(meta)) + meta)
        self._h.update(struct.pack("<Q", len(data)))
        self._h.update(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def tensor_bytes(t: "torch.Tensor") -> memoryview:
    """The raw little-endian bytes of a tensor (works for bf16, which numpy lacks): what the content
    hash and the writer consume."""
    import torch

    t = t.detach().contiguous().cpu()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def content_sha256(ckpt: Mapping) -> str:
    """Content hash of a ``LazyCheckpoint`` (reads every tensor once, one at a time)."""
    h = ContentHasher()
    for name in sorted(ckpt):
        info = ckpt.info(name)
        h.add(name, info.dtype, info.shape, tensor_bytes(ckpt[name]))
    return h.hexdigest()
