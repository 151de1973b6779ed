"""The batch walkthrough (``mergewatch demo --batch``): a tiny open_clip CLIP base and seeded experts,
generated locally (no downloads), merged by ``mergewatch merge`` with the TIME "Best-in-TIME" policy
(init ema, deploy ema, technique wa) and published. ``mergewatch demo`` itself is the live loop
(``demo_live.py``). The tiny CLIP helpers here (``TINY_CLIP``, ``tiny_clip_state``, ``perturb``) are
what many tests build their models with."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from mergewatch.checkpoint.writer import write_safetensors_file

#: A real open_clip CLIP architecture, small enough to build in well under a second.
TINY_CLIP = dict(
    embed_dim=16,
    vision_cfg=dict(image_size=32, layers=2, width=32, patch_size=8, head_width=16),
    text_cfg=dict(context_length=16, vocab_size=100, width=32, heads=2, layers=1),
)


def tiny_clip_state(seed: int = 0, dtype: torch.dtype = torch.float32, cfg: dict | None = None) -> dict[str, torch.Tensor]:
    """State dict of a randomly initialised (seeded) open_clip CLIP."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.CLIP(**(cfg or TINY_CLIP))
    return {k: v.detach().clone().to(dtype) if v.dtype.is_floating_point else v.detach().clone() for k, v in model.state_dict().items()}


def perturb(state: dict[str, torch.Tensor], seed: int, scale: float = 0.02) -> dict[str, torch.Tensor]:
    """An "expert": θ0 plus seeded Gaussian noise on every floating tensor."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        if v.dtype.is_floating_point:
            noise = torch.randn(v.shape, generator=g, dtype=torch.float32) * scale
            out[k] = (v.to(torch.float32) + noise).to(v.dtype)
        else:
            out[k] = v.clone()
    return out


DEMO_CONFIG = """\
# mergewatch demo configuration (generated)
workspace = "workspace"
base = "base.safetensors"
seed = 0

[model]
config = "tiny-clip.json"   # published as open_clip_config.json in every version

[policy]
init = "ema"
deploy = "ema"
technique = "wa"
w = 0.5

[publish]
keep = 5
"""


def run_demo(workdir: Path | None = None, n_experts: int = 3, *, cli_main) -> int:
    """Generate the demo's base, experts and config in ``workdir`` and merge them with ``cli_main``
    (the CLI's ``main``, passed in by ``mergewatch demo``: the demo sits below the CLI)."""
    workdir = Path(workdir or "demo-workspace").resolve()
    if (workdir / "workspace").exists():
        import shutil

        shutil.rmtree(workdir / "workspace")
    (workdir / "experts").mkdir(parents=True, exist_ok=True)
    base = tiny_clip_state(0)
    write_safetensors_file(workdir / "base.safetensors", base)
    for i in range(1, n_experts + 1):
        write_safetensors_file(workdir / "experts" / f"expert-{i:02d}.safetensors", perturb(base, seed=i))
    (workdir / "tiny-clip.json").write_text(json.dumps(TINY_CLIP, indent=2), "utf-8")
    (workdir / "mergewatch.toml").write_text(DEMO_CONFIG, "utf-8")
    print(f"demo: tiny open_clip CLIP base and {n_experts} experts generated in {workdir}")
    print(f"demo: policy init=ema deploy=ema technique=wa (Best-in-TIME); config {workdir / 'mergewatch.toml'}")
    rc = cli_main(["merge", "--config", str(workdir / "mergewatch.toml"), str(workdir / "experts")])
    if rc == 0:
        ws = workdir / "workspace"
        print(f"demo: deploy/current -> {(ws / 'deploy' / 'current').resolve().name}; "
              f"init/current -> {(ws / 'init' / 'current').resolve().name}")
        print(f"demo: inspect with: mergewatch status --config {workdir / 'mergewatch.toml'}")
    sys.stdout.flush()
    return rc
