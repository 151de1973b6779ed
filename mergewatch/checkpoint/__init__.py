"""Checkpoints: lazy safetensors mappings, validation, the atomic writer and role tables."""

from mergewatch.checkpoint.hashing import content_sha256
from mergewatch.checkpoint.reader import LazyCheckpoint, TensorInfo, open_checkpoint
from mergewatch.checkpoint.roles import Role, RoleTable, TensorRole, resolve_table
from mergewatch.checkpoint.validate import ExpertReport, check_expert, compare_layout
from mergewatch.checkpoint.writer import CheckpointWriter, TensorSpec, atomic_directory, write_checkpoint

__all__ = [
    "CheckpointWriter",
    "ExpertReport",
    "LazyCheckpoint",
    "Role",
    "RoleTable",
    "TensorInfo",
    "TensorRole",
    "TensorSpec",
    "atomic_directory",
    "check_expert",
    "compare_layout",
    "content_sha256",
    "open_checkpoint",
    "resolve_table",
    "write_checkpoint",
]
