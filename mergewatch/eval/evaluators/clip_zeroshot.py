"""``clip_zeroshot``: an open_clip CLIP whose zero-shot head comes from θ0's text tower.

The published version's visual tower replaces ``visual.*`` of θ0's full CLIP; the text tower is
θ0's (the issue's rule: the text tower is not what is merged, so it is always taken from θ0, even
when an ``open_clip_full`` version carries a text tower of its own). For a visual-only base the
full CLIP that θ0 came from is ``eval.text_checkpoint`` (when set, it is used for a full base too). Per task, class names × prompt templates
are encoded, normalised and averaged over templates (computed once, cached on the evaluator);
logits are the cosines of the normalised image features with those class embeddings.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import torch

from mergewatch.errors import ConfigError
from mergewatch.eval.base import EvalError
from mergewatch.eval.evaluators.clip_model import (
    image_encoder, load_strict, tokenizer_for, visual_state,
)
from mergewatch.eval.evaluators.common import class_embeddings, classify, open_task_data, read_checkpoint


class ClipZeroShot:
    name = "clip_zeroshot"

    def __init__(self, settings, base_path: Path, table_name: str):
        self.model, self.preprocess = image_encoder(self.name, settings, table_name)
        self.settings = settings
        self.table_name = table_name
        text_source = settings.text_checkpoint or (base_path if table_name == "open_clip_full" else None)
        if text_source is None:
            raise ConfigError("eval.text_checkpoint", f"the base {base_path} is visual-only: clip_zeroshot needs the full CLIP checkpoint for the text tower")
        try:
            load_strict(self.model, read_checkpoint(text_source), f"the text-tower checkpoint {text_source} (θ0's full CLIP)")
        except EvalError as e:  # the checkpoint and eval.model disagree: a configuration problem
            raise ConfigError("eval.text_checkpoint" if settings.text_checkpoint else "eval.model", str(e)) from e
        self.text_source = Path(text_source)
        self.tokenizer = tokenizer_for(self.model)
        self._heads: dict[tuple, torch.Tensor] = {}

    def head(self, task, classes) -> torch.Tensor:
        """[C, D] normalised, template-averaged class embeddings from θ0's text tower (cached per task)."""
        key = (task.name, tuple(classes), tuple(task.templates))
        if key not in self._heads:
            self._heads[key] = class_embeddings(
                lambda prompts: self.model.encode_text(self.tokenizer(prompts)), classes, task.templates, self.settings.batch_size
            )
        return self._heads[key]

    def evaluate(self, model_view: Mapping[str, torch.Tensor], task) -> dict:
        t0 = time.perf_counter()
        ds = open_task_data(task)
        load_strict(self.model.visual, visual_state(model_view, self.table_name), f"task {task.name!r}: the published visual tower")
        head = self.head(task, ds.classes)

        def logits(images):
            return self.model.encode_image(images, normalize=True) @ head.T

        return classify(task, ds, self.settings.batch_size, logits, self.preprocess, t0)

