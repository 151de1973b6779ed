"""The open_clip image encoder shared by ``clip_zeroshot`` and ``heads``.

The model is built once from its architecture (an open_clip built-in name such as ``ViT-B-32``, or
a model-config JSON: either a bare model config ``{"embed_dim", "vision_cfg", "text_cfg", ...}`` or
the ``open_clip_config.json`` layout ``{"model_cfg": ..., "preprocess_cfg": ...}``), never from
pretrained weights (nothing downloads), and each published version's visual tower is loaded into
it with a strict ``load_state_dict``.

Keys by role table (``mergewatch/checkpoint/roles``): ``open_clip_full`` checkpoints hold the whole
CLIP (``visual.*`` plus the text tower); ``open_clip_visual`` ones hold the vision tower alone,
either with the ``visual.`` prefix or as ``model.visual``'s own state dict. ``hf_clip_vision`` and
``generic`` bases are refused (a decision: the text tower and preprocessing of a Hugging Face CLIP
are not open_clip's).

Preprocessing is open_clip's own eval transform for the architecture (resize the shorter side,
centre crop, RGB, CLIP mean/std), with the ``preprocess_cfg`` of a JSON config when it has one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from mergewatch.errors import ConfigError
from mergewatch.eval.base import EvalError

OPEN_CLIP_TABLES = ("open_clip_full", "open_clip_visual")


def resolve_clip_config(value: str, root: Path) -> tuple[str, dict]:
    """``eval.model`` -> (the resolved name or absolute JSON path, {"model_cfg", "preprocess_cfg"}).

    A value ending in ``.json`` (or naming an existing file) is a path relative to ``root``; any
    other value is an open_clip architecture name. Raises ``ValueError`` with the reason.
    """
    import open_clip

    path = root / value
    if value.endswith(".json") or path.is_file():
        try:
            raw = json.loads(path.read_text("utf-8"))
        except OSError as e:
            raise ValueError(f"{path}: cannot read the model config: {e.strerror or e}") from e
        except ValueError as e:
            raise ValueError(f"{path}: invalid JSON: {e}") from e
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a model config must be a JSON object")
        model_cfg = raw.get("model_cfg", raw)
        pre = raw.get("preprocess_cfg", {}) if "model_cfg" in raw else {}
        where = str(path)
    else:
        model_cfg = open_clip.get_model_config(value)
        if model_cfg is None:
            raise ValueError(
                f"unknown open_clip architecture {value!r} (see open_clip.list_models(), e.g. 'ViT-B-32'), or give a model-config JSON path"
            )
        pre = {}
        where = value
    if not isinstance(model_cfg, dict) or not isinstance(model_cfg.get("vision_cfg"), dict) or not isinstance(model_cfg.get("text_cfg"), dict) or "embed_dim" not in model_cfg:
        raise ValueError(f"{where}: a model config needs 'embed_dim', 'vision_cfg' and 'text_cfg'")
    text_cfg = model_cfg["text_cfg"]
    if "hf_model_name" in text_cfg or "hf_tokenizer_name" in text_cfg or "multimodal_cfg" in model_cfg or "timm_model_name" in model_cfg["vision_cfg"]:
        raise ValueError(f"{where}: only open_clip's own towers are supported (no Hugging Face text model, timm vision tower or CoCa): they would need downloads")
    vocab = text_cfg.get("vocab_size", 49408)
    if vocab < 49408:
        raise ValueError(
            f"{where}: text vocab_size {vocab} is smaller than the CLIP tokenizer's 49408 token ids; zero-shot prompts cannot be encoded"
        )
    return where, {"model_cfg": model_cfg, "preprocess_cfg": pre}


def build_clip(cfg: dict) -> torch.nn.Module:
    """An open_clip ``CLIP`` (or ``CustomTextCLIP`` when the config says ``custom_text``) in eval mode."""
    import open_clip

    mc = dict(cfg["model_cfg"])
    custom = mc.pop("custom_text", False)
    cls = open_clip.CustomTextCLIP if custom else open_clip.CLIP
    try:
        model = cls(**mc)
    except TypeError as e:
        raise ConfigError("eval.model", f"cannot build the open_clip model from its config: {e}") from e
    return model.eval()


def image_preprocess(model: torch.nn.Module, cfg: dict):
    """open_clip's evaluation transform (PIL image -> normalised float tensor) for this model."""
    from dataclasses import asdict

    import open_clip
    from open_clip.transform import PreprocessCfg

    pp = {**asdict(PreprocessCfg()), **cfg.get("preprocess_cfg", {})}
    size = model.visual.image_size
    return open_clip.image_transform(
        size, is_train=False, mean=pp["mean"], std=pp["std"], resize_mode=pp["resize_mode"],
        interpolation=pp["interpolation"], fill_color=pp.get("fill_color", 0),
    )


def tokenizer_for(model: torch.nn.Module):
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=model.context_length)


def visual_state(view: Mapping[str, torch.Tensor], table_name: str) -> dict[str, torch.Tensor]:
    """The vision tower's own state dict (no ``visual.`` prefix) from a published model view."""
    if table_name == "open_clip_full":
        return {k[len("visual."):]: view[k] for k in view if k.startswith("visual.")}
    if table_name == "open_clip_visual":
        keys = list(view)
        if keys and all(k.startswith("visual.") for k in keys):
            return {k[len("visual."):]: view[k] for k in keys}
        return {k: view[k] for k in keys}
    raise EvalError(f"no open_clip vision tower in a {table_name!r} checkpoint")


def load_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """``load_state_dict(strict=True)`` with an ``EvalError`` that lists the mismatches."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(set(own) & set(state)) if tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s) {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s) {unexpected[:5]}")
        if shapes:
            parts.append(f"shape mismatch {shapes[:5]}")
        raise EvalError(f"{what} does not fit the evaluation model ({'; '.join(parts)}); check eval.model")
    with torch.no_grad():
        module.load_state_dict(dict(state), strict=True)


def image_encoder(evaluator: str, settings, table_name: str):
    """(model, preprocess) for an image evaluator: the open_clip CLIP of ``eval.model`` (built once,
    random init; versions are loaded into it) and its evaluation transform."""
    check_open_clip_table(evaluator, table_name)
    try:
        _, cfg = resolve_clip_config(settings.model, Path.cwd())
    except ValueError as e:
        raise ConfigError("eval.model", str(e)) from e
    model = build_clip(cfg)
    return model, image_preprocess(model, cfg)


def check_open_clip_table(evaluator: str, table_name: str) -> None:
    if table_name not in OPEN_CLIP_TABLES:
        raise ConfigError(
            "eval.evaluator",
            f"{evaluator} needs an open_clip base (open_clip_full or open_clip_visual); the base was detected as {table_name!r}"
            + (" (Hugging Face CLIP vision bases are not supported by this evaluator; use 'plugin')" if table_name == "hf_clip_vision" else ""),
        )
