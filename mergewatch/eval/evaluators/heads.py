"""``heads``: fixed per-task linear heads on the image encoder (the task-vectors protocol).

Each task has a safetensors head beside its data (``weight`` [C, D], optional ``bias`` [C]); the
image encoder is the published version's open_clip vision tower (shared with ``clip_zeroshot``).
Logits are ``normalize(visual(x)) @ weight.T + bias``: image features are L2-normalised as in the
task-vectors classification heads, which are built from normalised CLIP text embeddings.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import torch

from mergewatch.errors import CheckpointError
from mergewatch.eval.base import EvalError
from mergewatch.eval.evaluators.clip_model import image_encoder, load_strict, visual_state
from mergewatch.eval.evaluators.common import classify, open_task_data


class LinearHeads:
    name = "heads"

    def __init__(self, settings, base_path: Path, table_name: str):
        self.model, self.preprocess = image_encoder(self.name, settings, table_name)
        self.settings = settings
        self.table_name = table_name
        self._heads: dict[Path, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def head(self, task, n_classes: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        from mergewatch.checkpoint.reader import LazyCheckpoint

        path = Path(task.head)
        if path not in self._heads:
            try:
                ck = LazyCheckpoint(path)
                w = ck["weight"].float()
                b = ck["bias"].float() if "bias" in ck else None
            except (CheckpointError, KeyError, OSError) as e:
                raise EvalError(f"task {task.name!r}: {path}: cannot read the head: {e}") from e
            if w.ndim != 2 or w.shape[0] != n_classes or (b is not None and tuple(b.shape) != (n_classes,)):
                raise EvalError(f"task {task.name!r}: {path}: head shapes {tuple(w.shape)}/{None if b is None else tuple(b.shape)} do not fit {n_classes} classes")
            self._heads[path] = (w, b)
        return self._heads[path]

    def evaluate(self, model_view: Mapping[str, torch.Tensor], task) -> dict:
        t0 = time.perf_counter()
        if task.head is None:
            raise EvalError(f"task {task.name!r}: no head file configured")
        ds = open_task_data(task)
        load_strict(self.model.visual, visual_state(model_view, self.table_name), f"task {task.name!r}: the published visual tower")
        w, b = self.head(task, len(ds.classes))
        dim = getattr(self.model.visual, "output_dim", w.shape[1])
        if w.shape[1] != dim:
            raise EvalError(f"task {task.name!r}: {task.head}: head D = {w.shape[1]} but the image features have {dim} dimensions")

        def logits(images):
            feats = torch.nn.functional.normalize(self.model.visual(images).float(), dim=-1)
            out = feats @ w.T
            return out + b if b is not None else out

        return classify(task, ds, self.settings.batch_size, logits, self.preprocess, t0)
