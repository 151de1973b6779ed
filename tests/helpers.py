"""Helpers for tests: tiny open_clip CLIP models and seeded experts as real safetensors files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mergewatch.checkpoint.reader import LazyCheckpoint
from mergewatch.checkpoint.writer import write_safetensors_file
from mergewatch.demo import TINY_CLIP, perturb, tiny_clip_state  # noqa: F401

#: the NiNo checkpoints and conformance fixtures, beside the repository (never copied into it)
NINO = Path(__file__).resolve().parents[1].parent / "shared" / "nino"
CONF = NINO / "conformance"

needs_nino = pytest.mark.skipif(
    not (CONF / "fixtures.json").is_file(),
    reason=f"{NINO} is absent: the NiNo checkpoints and conformance fixtures live beside the repository (CI has them)",
)


def make_open_clip_base(path: Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors_file(path, tiny_clip_state(seed, dtype))
    return path


def load_all(path) -> dict[str, torch.Tensor]:
    c = LazyCheckpoint(path)
    return {k: c[k] for k in c}


def make_expert(base_path: Path, path: Path, seed: int, scale: float = 0.02) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors_file(path, perturb(load_all(base_path), seed, scale))
    return path
