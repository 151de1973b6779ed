"""Fine-tuned "experts" of a real sentence encoder, offline (issue 16), and their scores.

A task is a directory with ``train.jsonl`` / ``test.jsonl`` (lines ``{"text", "label"}``, the label
an int index into ``classes.txt``), ``classes.txt`` and an optional ``template.txt`` (one prompt with
``{}`` where the class name goes; default ``"{}"``). The model is scored exactly as the
``text_zeroshot`` evaluator scores a published version (it *is* that evaluator): mean-pooled,
L2-normalised last hidden states against a frozen head made of θ0's normalised embeddings of the
class prompts, logits ``logit_scale · cos``.

``finetune_expert`` trains the encoder blocks (``encoder.*``) through that frozen head with
cross-entropy; embeddings and pooler stay θ0. It is deterministic on one machine: a fixed torch
thread count (``pinned_threads``), dropout off (the model stays in eval mode), batches drawn from a
seeded generator (one permutation of the train split per epoch), AdamW. The expert is the full state
dict under the base's tensor names and shapes, floating tensors as float32 (integer buffers such as
``embeddings.position_ids`` as in θ0), written atomically: ``mergewatch merge`` takes it as an
expert of that base.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

from mergewatch.checkpoint.reader import LazyCheckpoint
from mergewatch.checkpoint.writer import write_safetensors_file
from mergewatch.eval.evaluators.common import open_task_data
from mergewatch.eval.evaluators.text_zeroshot import TextZeroShot
from mergewatch.eval.settings import EvalSettings, TaskSettings
from mergewatch.numeric import pinned_threads

#: the prefix of the tensors fine-tuning changes (BERT's transformer blocks)
TRAINED_PREFIX = "encoder."
DEFAULT_LOGIT_SCALE = 100.0  # the text_zeroshot evaluator's default (CLIP's)
SPLITS = ("train", "test")

#: ``progress(step, steps, loss)``, called every ``progress_every`` steps and after the last one
ProgressFn = Callable[[int, int, float], None]


def task_settings(task_dir, split: str = "train") -> TaskSettings:
    """The evaluator's view of one split of a task directory (name = the directory's name)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    d = Path(task_dir)
    template = "{}"
    tpl = d / "template.txt"
    if tpl.is_file():
        lines = [ln.strip() for ln in tpl.read_text("utf-8").splitlines() if ln.strip()]
        if len(lines) != 1 or "{}" not in lines[0]:
            raise ValueError(f"{tpl}: expected one prompt with '{{}}' where the class name goes, got {lines!r}")
        template = lines[0]
    return TaskSettings(d.name, d / f"{split}.jsonl", "jsonl", d / "classes.txt", (template,))


def text_evaluator(base_dir, *, batch_size: int = 64, logit_scale: float = DEFAULT_LOGIT_SCALE, max_length: int | None = None) -> TextZeroShot:
    """The ``text_zeroshot`` evaluator for a Hugging Face model directory, θ0 = its ``model.safetensors``.
    ``max_length`` caps the tokenizer's length below the model's own (sentence-transformers') limit."""
    base_dir = Path(base_dir)
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    settings = EvalSettings(evaluator="text_zeroshot", model=str(base_dir), batch_size=batch_size, logit_scale=logit_scale,
                            max_length=max_length or 0)
    ev = TextZeroShot(settings, base_dir / "model.safetensors")
    return ev


def epoch_batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[list[int]]:
    """Endless training batches of ``min(batch_size, n)`` indices into ``n`` examples: one seeded
    permutation per epoch, read in order; a batch may straddle two epochs."""
    order, pos = torch.randperm(n, generator=gen), 0
    while True:
        idx: list[int] = []
        while len(idx) < min(batch_size, n):
            if pos == n:
                order, pos = torch.randperm(n, generator=gen), 0
            take = min(batch_size - len(idx), n - pos)
            idx.extend(order[pos:pos + take].tolist())
            pos += take
        yield idx


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, losses: list[float], step: int, steps: int,
                   progress: Callable[[int, int, float], None] | None, progress_every: int) -> None:
    """One optimiser step on ``loss``; its value is appended to ``losses`` (a non-finite loss stops
    training with an error) and reported to ``progress`` every ``progress_every`` steps and at the last."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    losses.append(float(loss.detach()))
    if not math.isfinite(losses[-1]):
        raise FloatingPointError(f"training loss is {losses[-1]} at step {step}; lower lr")
    if progress is not None and (step % progress_every == 0 or step == steps):
        progress(step, steps, losses[-1])


def finetune_expert(
    base_dir,
    task_dir,
    out_path,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    threads: int,
    logit_scale: float = DEFAULT_LOGIT_SCALE,
    weight_decay: float = 0.0,
    max_length: int | None = None,
    progress: ProgressFn | None = None,
    progress_every: int = 10,
    init=None,
) -> dict:
    """Fine-tune the encoder of ``base_dir`` on ``task_dir``'s train split; write the expert to
    ``out_path`` (safetensors, atomically). Returns the run's stats.

    ``init`` (a checkpoint path under the base's names, e.g. a published init view) is where training
    starts instead of θ0 (TIME's init axis); the head stays θ0's, as the evaluator's does."""
    if steps < 1 or batch_size < 1 or progress_every < 1:
        raise ValueError(f"steps, batch_size and progress_every must be >= 1, got {steps}, {batch_size}, {progress_every}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr}")
    t0 = time.perf_counter()
    base_dir, out_path = Path(base_dir), Path(out_path)
    task = task_settings(task_dir, "train")
    with pinned_threads(threads):
        ev = text_evaluator(base_dir, batch_size=max(batch_size, 16), logit_scale=logit_scale, max_length=max_length)
        data = open_task_data(task)
        head = ev.head(task, data.classes).clone()  # θ0's class prompts; a normal tensor (not an inference one)
        if init is not None:
            ev.load(LazyCheckpoint(init), f"the init checkpoint {init}")
        model = ev.model.eval()  # eval mode: dropout off (deterministic); gradients still flow
        trained = []
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(TRAINED_PREFIX))
            if p.requires_grad:
                trained.append(p)
        opt = torch.optim.AdamW(trained, lr=lr, weight_decay=weight_decay)
        gen = torch.Generator().manual_seed(seed)
        n = len(data)
        batches = epoch_batches(n, batch_size, gen)
        losses: list[float] = []
        t_train = time.perf_counter()
        for step in range(1, steps + 1):
            idx = next(batches)
            texts = [data.texts[i] for i in idx]
            labels = data.labels[idx]
            logits = logit_scale * (ev.encode(texts) @ head.T)
            loss = torch.nn.functional.cross_entropy(logits, labels)
            optimizer_step(opt, loss, losses, step, steps, progress, progress_every)
        train_seconds = time.perf_counter() - t_train
        sha = write_safetensors_file(out_path, expert_state(model, base_dir / "model.safetensors"))
    return {
        "task": task.name,
        "classes": list(data.classes),
        "train_examples": n,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "threads": threads,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "seconds": time.perf_counter() - t0,
        "train_seconds": train_seconds,
        "steps_per_second": steps / train_seconds if train_seconds > 0 else float("inf"),
        "content_sha256": sha,
        "init": str(init) if init is not None else None,
        "path": str(out_path),
    }


def expert_state(model: torch.nn.Module, base_path) -> dict[str, torch.Tensor]:
    """The model's weights under θ0's names, order and shapes: floating tensors float32, the rest
    (integer buffers, or tensors the model does not hold, e.g. ``embeddings.position_ids``) θ0's."""
    own = model.state_dict()
    theta0 = LazyCheckpoint(base_path)
    out = {}
    for k in theta0:
        ref = theta0[k]
        if k in own and ref.dtype.is_floating_point:
            v = own[k].detach()
            if tuple(v.shape) != tuple(ref.shape):
                raise ValueError(f"{k}: the model holds shape {tuple(v.shape)}, the base {tuple(ref.shape)}")
            out[k] = v.to(torch.float32).contiguous().clone()
        else:
            out[k] = ref.to(torch.float32) if ref.dtype.is_floating_point else ref
    return out


def evaluate_accuracy(
    model_weights,
    base_dir,
    task_dir,
    split: str = "test",
    *,
    batch_size: int = 64,
    logit_scale: float = DEFAULT_LOGIT_SCALE,
    threads: int = 1,
    max_length: int | None = None,
    evaluator: TextZeroShot | None = None,
) -> float:
    """Top-1 accuracy in [0, 1] of ``model_weights`` (a safetensors path or a state dict under the
    base's names) on a split of the task, scored as ``text_zeroshot`` scores it (head from θ0).
    ``evaluator`` (from ``text_evaluator``) reuses a built model across calls."""
    task = task_settings(task_dir, split)
    with pinned_threads(threads):
        ev = evaluator or text_evaluator(base_dir, batch_size=batch_size, logit_scale=logit_scale, max_length=max_length)
        weights = model_weights if isinstance(model_weights, Mapping) else LazyCheckpoint(model_weights)
        return float(ev.evaluate(weights, task)["accuracy"])
