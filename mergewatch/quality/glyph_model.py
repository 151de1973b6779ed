"""The glyph suite's model (issue 16, vision): a tiny open_clip ViT, its pre-training, prototype heads
and expert fine-tuning, all on uint8 glyph images (``glyph_tasks``).

**Model.** ``GLYPH_VIT``: open_clip's own ``CLIP`` whose ``VisionTransformer`` has image 32, patch 8
(4×4 patches + a class token), width 192, 6 layers, 3 heads (head width 64), MLP ratio 4, output
dimension 128: 2.73 M vision parameters under open_clip's real names (``visual.conv1.weight``,
``visual.transformer.resblocks.0.attn.in_proj_weight`` with q/k/v fused, ``visual.proj`` ...). The
model-config JSON (``write_model_config``, open_clip_config.json layout ``{"model_cfg",
"preprocess_cfg"}``) is the ``heads`` evaluator's ``eval.model``. The evaluator builds a whole CLIP
and refuses a text tower whose vocabulary cannot hold the CLIP tokenizer's ids, so the config carries
a minimal text tower (vocab 49408, width 32, 1 layer) that is built with random weights and never
used. Checkpoints hold the vision tower only (``visual.*``, float32, 80 tensors): the role table
``open_clip_visual`` is auto-detected for them and the ``heads`` evaluator loads them
(``clip_model.visual_state``); no text tower is needed. ``build_visual`` builds the tower exactly as
the evaluator does (``clip_model.resolve_clip_config`` + ``build_clip``).

Measured training speed on the 2-core machine (2 threads, batches of 64): this ViT 418 images/s,
width 128 × 6 layers 735, width 128 × 4 layers 841. At equal pre-training steps the width-192 tower
gave θ0s as good as the width-128 one (5-shot prototype accuracy 0.61–0.75 on the quick tasks for
both), so the issue's size is kept.

**Inputs.** ``to_input`` maps uint8 N×3×32×32 images to the evaluator's input: ``x / 255``, then
``(x - mean) / std`` with the config's (CLIP's) mean and std. That is bit for bit what open_clip's eval
transform gives at 32×32 (the resize and the crop are the identity; checked).

**Pre-training** (``pretrain``): prototypical-network episodes (a decision). Each step draws
``ways`` = 16 mixture classes and 2 + 2 fresh images of each (fonts and augmentations random per
image); the loss is the cross-entropy of the queries over ``PRETRAIN_SCALE · cos(query, normalised
mean of the class's support features)``. This is the way θ0 is later used (5-shot normalised
prototypes as a frozen head), and it learns where the alternative did not in the time there is.
Probes on a width-128 × 4 tower, 15 000 images each (240 steps of 64): supervised classification over
all 316 mixture classes through a temporary cosine head ended at 4.6 % training accuracy (loss 4.96 of
ln 316 = 5.76), while the 16-way episodes reached 0.62 / 0.58 5-shot accuracy on Georgian / Thai,
which they never saw. Both stayed at chance while the images were also shifted by ±2 px and drawn in
either polarity: a patch-8 ViT trained from scratch for minutes does not learn those invariances, so the
images have neither (``glyph_tasks.Augment``). AdamW (β 0.9/0.98, weight
decay 0.05 on matrices), lr 1e-3, linear warm-up over 5 % of the steps then cosine decay. Deterministic
for a thread count: ``pinned_threads``, seeded initialisation (the global RNG is left alone), episodes
fully decided by the step number.

**Heads** (``prototype_head``): per class the mean of θ0's L2-normalised features of its first
``shots`` training images, normalised, × ``HEAD_LOGIT_SCALE`` (30, the pre-training scale); the
``heads`` evaluator's logits ``normalize(visual(x)) @ weight.T`` are then ``30 · cos``.

**Experts** (``finetune``): the vision tower's transformer blocks (``visual.transformer.resblocks.*``:
attention in/out projections and biases, MLPs, both layer norms of every block) are trained with
cross-entropy through the frozen head (the evaluator's logits), AdamW without weight decay, constant
learning rate, batches from one seeded permutation of the train split per epoch. The patch embedding,
class and position embeddings, ``ln_pre``, ``ln_post`` and ``proj`` stay θ0's bit for bit, so the
head still means what it meant for θ0. The tower has no dropout. The expert holds every tensor of θ0
under θ0's names and shapes, float32.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from mergewatch.numeric import pinned_threads
from mergewatch.quality.finetune import epoch_batches, optimizer_step

#: the open_clip CLIP config of the glyph model (vision tower used; the text tower only satisfies the evaluator)
GLYPH_VIT = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 192, "layers": 6, "head_width": 64, "mlp_ratio": 4.0},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
#: open_clip's default (OpenAI CLIP) normalisation, written into the config so that it is explicit
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
PRETRAIN_SCALE = 30.0
HEAD_LOGIT_SCALE = 30.0
#: the prefix of the tensors fine-tuning changes (the vision tower's transformer blocks)
TRAINED_PREFIX = "transformer.resblocks."
CHECKPOINT_PREFIX = "visual."

#: ``progress(step, steps, loss)``
ProgressFn = Callable[[int, int, float], None]
#: ``sampler(step) -> uint8 episode [ways, support + query, 3, 32, 32]``
Sampler = Callable[[int], torch.Tensor]


def model_config(arch: Mapping | None = None) -> dict:
    """The open_clip_config.json layout of ``arch`` (default ``GLYPH_VIT``)."""
    return {"model_cfg": json.loads(json.dumps(arch or GLYPH_VIT)),
            "preprocess_cfg": {"mean": list(MEAN), "std": list(STD), "interpolation": "bicubic", "resize_mode": "shortest"}}


def write_model_config(path, arch: Mapping | None = None) -> Path:
    """Write the model-config JSON (atomically) and return its path."""
    from mergewatch.checkpoint.durable import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(model_config(arch), indent=2, sort_keys=True) + "\n")
    return path


def build_model(config_path, seed: int = 0) -> torch.nn.Module:
    """The open_clip ``CLIP`` of a model-config JSON, built as the evaluator builds it, with weights
    initialised from ``seed`` (the global torch RNG is left as it was)."""
    from mergewatch.eval.evaluators.clip_model import build_clip, resolve_clip_config

    config_path = Path(config_path)
    _, cfg = resolve_clip_config(str(config_path.resolve()), config_path.parent)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_clip(cfg)


def build_visual(config_path, seed: int = 0) -> torch.nn.Module:
    """The vision tower (open_clip ``VisionTransformer``) of ``build_model``, in eval mode."""
    return build_model(config_path, seed).visual.eval()


def checkpoint_state(visual: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tower's state dict as a checkpoint: ``visual.``-prefixed names, float32, contiguous copies."""
    return {CHECKPOINT_PREFIX + k: v.detach().to(torch.float32).contiguous().clone() for k, v in visual.state_dict().items()}


def load_checkpoint(visual: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """Load a ``visual.*`` checkpoint (a mapping or a safetensors path) into the tower, strictly."""
    from mergewatch.checkpoint.reader import LazyCheckpoint

    if not isinstance(state, Mapping):
        state = LazyCheckpoint(state)
    own = {k[len(CHECKPOINT_PREFIX):]: state[k] for k in state if k.startswith(CHECKPOINT_PREFIX)}
    with torch.no_grad():
        visual.load_state_dict(own, strict=True)
    return visual


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> the normalised float input of the evaluator's transform."""
    x = images.to(torch.float32).div(255.0)
    mean = torch.tensor(MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean) / std


def features(visual: torch.nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised image features [N, D] of uint8 images, without gradients."""
    out = []
    with torch.inference_mode():
        for lo in range(0, len(images), batch_size):
            out.append(torch.nn.functional.normalize(visual(to_input(images[lo:lo + batch_size])).float(), dim=-1))
    return torch.cat(out)


def prototype_head(visual: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, n_classes: int, *,
                   shots: int, logit_scale: float = HEAD_LOGIT_SCALE) -> torch.Tensor:
    """``weight`` [C, D]: per class the normalised mean of the normalised features of its first
    ``shots`` images (in the given order) × ``logit_scale``."""
    picks = []
    for c in range(n_classes):
        idx = (labels == c).nonzero().flatten()[:shots]
        if len(idx) < shots:
            raise ValueError(f"class {c} has {len(idx)} training images, fewer than {shots} shots")
        picks.append(idx)
    feats = features(visual, images[torch.cat(picks)])
    protos = feats.reshape(n_classes, shots, -1).mean(dim=1)
    return (torch.nn.functional.normalize(protos, dim=-1) * logit_scale).contiguous()


def accuracy(visual: torch.nn.Module, head: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
             bias: torch.Tensor | None = None) -> float:
    """Top-1 accuracy with the ``heads`` evaluator's logits ``normalize(visual(x)) @ head.T (+ bias)``."""
    logits = features(visual, images) @ head.T
    if bias is not None:
        logits = logits + bias
    return float((logits.argmax(dim=1) == labels).float().mean())


@dataclass(frozen=True)
class PretrainParams:
    """Episodic pre-training: ``steps`` episodes of ``ways`` classes × (``support`` + ``query``) images."""

    steps: int
    ways: int = 16
    support: int = 2
    query: int = 2
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: float = 0.05
    scale: float = PRETRAIN_SCALE
    seed: int = 0
    threads: int = 2

    @property
    def images_per_step(self) -> int:
        return self.ways * (self.support + self.query)


@dataclass(frozen=True)
class FinetuneParams:
    steps: int
    batch_size: int
    lr: float
    seed: int = 0
    threads: int = 2


def _lr_at(step: int, p: PretrainParams) -> float:
    warm = max(1, round(p.steps * p.warmup))
    if step <= warm:
        return p.lr * step / warm
    t = (step - warm) / max(1, p.steps - warm)
    return p.lr * 0.5 * (1.0 + math.cos(math.pi * t))


def episode_loss(visual: torch.nn.Module, episode: torch.Tensor, support: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Prototypical-network loss of one episode (uint8 [ways, support + query, 3, H, W]): the queries'
    cross-entropy over ``scale · cos(query, normalised mean of the support features)``; (loss, accuracy)."""
    ways, per = episode.shape[:2]
    feats = torch.nn.functional.normalize(visual(to_input(episode.flatten(0, 1))), dim=-1).view(ways, per, -1)
    protos = torch.nn.functional.normalize(feats[:, :support].mean(dim=1), dim=-1)
    queries = feats[:, support:].reshape(ways * (per - support), -1)
    target = torch.arange(ways).repeat_interleave(per - support)
    logits = scale * queries @ protos.T
    return torch.nn.functional.cross_entropy(logits, target), (logits.argmax(dim=1) == target).float().mean()


def pretrain(config_path, sampler: Sampler, params: PretrainParams, *,
             progress: ProgressFn | None = None, progress_every: int = 100) -> tuple[dict[str, torch.Tensor], dict]:
    """Pre-train the tower from scratch on ``sampler(step)``'s episodes (uint8 [ways, support + query,
    3, 32, 32], a class per row); ``(θ0 checkpoint state, stats)``."""
    if params.steps < 1 or params.ways < 2 or params.support < 1 or params.query < 1:
        raise ValueError(f"need steps >= 1, ways >= 2, support >= 1 and query >= 1, got {params}")
    t0 = time.perf_counter()
    with pinned_threads(params.threads):
        visual = build_visual(config_path, params.seed)
        decay = [p for p in visual.parameters() if p.ndim >= 2]
        no_decay = [p for p in visual.parameters() if p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": params.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=params.lr, betas=(0.9, 0.98))
        losses, accs = [], []
        render_s = 0.0
        for step in range(1, params.steps + 1):
            tr = time.perf_counter()
            episode = sampler(step)
            render_s += time.perf_counter() - tr
            if tuple(episode.shape[:2]) != (params.ways, params.support + params.query):
                raise ValueError(f"the sampler gave an episode of shape {tuple(episode.shape)}")
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, params)
            loss, acc = episode_loss(visual, episode, params.support, params.scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            accs.append(float(acc))
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"pre-training loss is {losses[-1]} at step {step}; lower lr")
            if progress is not None and (step % progress_every == 0 or step == params.steps):
                progress(step, params.steps, sum(losses[-progress_every:]) / len(losses[-progress_every:]))
        state = checkpoint_state(visual)
    tail = max(1, params.steps // 10)
    seconds = time.perf_counter() - t0
    return state, {"steps": params.steps, "images": params.steps * params.images_per_step,
                   "loss_first": losses[0], "loss_last_tenth": sum(losses[-tail:]) / tail,
                   "episode_accuracy_last_tenth": sum(accs[-tail:]) / tail,
                   "seconds": seconds, "render_seconds": render_s}


def finetune(config_path, base_state: Mapping[str, torch.Tensor], head: torch.Tensor, images: torch.Tensor,
             labels: torch.Tensor, params: FinetuneParams, *, bias: torch.Tensor | None = None,
             progress: ProgressFn | None = None, progress_every: int = 25) -> tuple[dict[str, torch.Tensor], dict]:
    """Fine-tune θ0's transformer blocks on uint8 ``images``/``labels`` through the frozen ``head``
    (``weight`` [C, D], logits as the ``heads`` evaluator computes them); ``(expert state, stats)``."""
    if params.steps < 1 or params.batch_size < 1 or not (params.lr > 0 and math.isfinite(params.lr)):
        raise ValueError(f"steps and batch_size must be >= 1 and lr positive, got {params}")
    t0 = time.perf_counter()
    with pinned_threads(params.threads):
        visual = load_checkpoint(build_visual(config_path), base_state)
        trained = []
        for name, p in visual.named_parameters():
            p.requires_grad_(name.startswith(TRAINED_PREFIX))
            if p.requires_grad:
                trained.append(p)
        head = head.detach().float()
        opt = torch.optim.AdamW(trained, lr=params.lr, weight_decay=0.0)
        gen = torch.Generator().manual_seed(params.seed)
        n = len(labels)
        batches = epoch_batches(n, params.batch_size, gen)
        losses = []
        for step in range(1, params.steps + 1):
            idx = next(batches)
            feats = torch.nn.functional.normalize(visual(to_input(images[idx])), dim=-1)
            logits = feats @ head.T
            if bias is not None:
                logits = logits + bias
            loss = torch.nn.functional.cross_entropy(logits, labels[idx])
            optimizer_step(opt, loss, losses, step, params.steps, progress, progress_every)
        state = checkpoint_state(visual)
    for k, v in base_state.items():
        if k not in state or tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(f"{k}: the expert does not match θ0's names and shapes")
    seconds = time.perf_counter() - t0
    return state, {"steps": params.steps, "batch_size": params.batch_size, "lr": params.lr, "seed": params.seed,
                   "threads": params.threads, "train_examples": n, "loss_first": losses[0], "loss_last": losses[-1],
                   "seconds": seconds, "trained_prefix": CHECKPOINT_PREFIX + TRAINED_PREFIX}
