"""The batched, no-grad evaluation loop every built-in evaluator shares."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from mergewatch.eval.base import EvalError
from mergewatch.eval.data import DataError, EvalProgress, open_dataset


def read_checkpoint(path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint (θ0, a text-tower source), or an ``EvalError``."""
    from mergewatch.checkpoint.reader import LazyCheckpoint
    from mergewatch.errors import CheckpointError

    try:
        ckpt = LazyCheckpoint(path)
        return {k: ckpt[k] for k in ckpt}
    except CheckpointError as e:
        raise EvalError(f"cannot read {path}: {e.reason}") from e


def open_task_data(task):
    """The task's dataset, re-checked at evaluation time (files may have changed since load time)."""
    try:
        return open_dataset(task)
    except DataError as e:
        raise EvalError(str(e)) from e


def classify(task, dataset, batch_size: int, logits: Callable, preprocess: Callable | None = None, started: float | None = None) -> dict:
    """Top-1 accuracy of ``argmax(logits(batch))`` against the labels, in inference mode.

    ``logits`` maps a batch (an image tensor or a list of texts) to [B, C] scores. Ties go to the
    lowest class index (``torch.argmax``). ``seconds`` is the wall time of the whole evaluation
    (from ``started`` when given, so model loading is included).
    """
    t0 = time.perf_counter() if started is None else started
    n_right = n = 0
    progress = EvalProgress(task.name, len(dataset))
    with torch.inference_mode():
        for xs, ys in dataset.batches(batch_size, preprocess):
            scores = logits(xs)
            if scores.ndim != 2 or scores.shape[0] != len(ys) or scores.shape[1] != len(dataset.classes):
                raise EvalError(f"task {task.name!r}: logits of shape {tuple(scores.shape)}, expected [{len(ys)}, {len(dataset.classes)}]")
            n_right += int((scores.argmax(dim=1) == ys).sum())
            n += len(ys)
            progress.update(len(ys))
    return {"accuracy": n_right / n, "n": n, "seconds": time.perf_counter() - t0}


def class_embeddings(encode: Callable, classes, templates, batch_size: int) -> torch.Tensor:
    """The zero-shot head: per class, the mean over templates of the L2-normalised embeddings of
    ``template.replace("{}", name)``, normalised again (CLIP's prompt ensembling). [C, D]."""
    prompts = [t.replace("{}", c) for c in classes for t in templates]
    with torch.inference_mode():
        embs = torch.cat([encode(prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size)])
        embs = torch.nn.functional.normalize(embs.float(), dim=-1)
        per_class = embs.reshape(len(classes), len(templates), -1).mean(dim=1)
        return torch.nn.functional.normalize(per_class, dim=-1)
