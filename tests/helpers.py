"""Helpers for tests: tiny open_clip CLIP models and seeded experts as real safetensors files."""

from __future__ import annotations

from pathlib import Path

import torch

from mergewatch.checkpoint.writer import write_safetensors_file

TINY_CLIP = dict(
    embed_dim=16,
    vision_cfg=dict(image_size=32, layers=2, width=32, patch_size=8, head_width=16),
    text_cfg=dict(context_length=16, vocab_size=100, width=32, heads=2, layers=1),
)


def tiny_clip_state(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_CLIP)
    return {k: v.detach().clone().to(dtype) for k, v in model.state_dict().items()}


def perturb(state: dict[str, torch.Tensor], seed: int, scale: float = 0.02) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        if v.dtype.is_floating_point:
            noise = torch.randn(v.shape, generator=g, dtype=torch.float32) * scale
            out[k] = (v.to(torch.float32) + noise).to(v.dtype)
        else:
            out[k] = v.clone()
    return out


def make_open_clip_base(path: Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors_file(path, tiny_clip_state(seed, dtype))
    return path


def make_expert(base_path: Path, path: Path, seed: int, scale: float = 0.02) -> Path:
    from mergewatch.checkpoint.reader import LazyCheckpoint

    base = LazyCheckpoint(base_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors_file(path, perturb({k: base[k] for k in base}, seed, scale))
    return path
