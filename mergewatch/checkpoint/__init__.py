"""Checkpoints: lazy safetensors mappings, validation, the atomic writer and role tables.

The names below are imported on first use (PEP 562), so that importing a light submodule
(``durable``, ``hashing``) does not import torch: the CLI's light verbs rely on it (issue 14).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergewatch.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "hashing": ("content_sha256",),
    "reader": ("LazyCheckpoint", "TensorInfo", "open_checkpoint"),
    "roles": ("Role", "RoleTable", "TensorRole", "resolve_table"),
    "validate": ("ExpertReport", "check_expert", "compare_layout"),
    "writer": ("CheckpointWriter", "TensorSpec", "atomic_directory", "write_checkpoint"),
})

if TYPE_CHECKING:
    from mergewatch.checkpoint.hashing import content_sha256
    from mergewatch.checkpoint.reader import LazyCheckpoint, TensorInfo, open_checkpoint
    from mergewatch.checkpoint.roles import Role, RoleTable, TensorRole, resolve_table
    from mergewatch.checkpoint.validate import ExpertReport, check_expert, compare_layout
    from mergewatch.checkpoint.writer import CheckpointWriter, TensorSpec, atomic_directory, write_checkpoint
