"""Evaluation fixtures for integration tests: a tiny real open_clip CLIP that the zero-shot evaluator
accepts (the CLIP tokenizer needs the full 49,408-token vocabulary), tensor datasets, and labels
taken from θ0's own predictions so that θ0 scores 100 % and a destroyed model visibly does not."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from mergewatch.checkpoint.writer import write_safetensors_file
from mergewatch.demo import TINY_CLIP, perturb, tiny_clip_state

EVAL_CLIP = copy.deepcopy(TINY_CLIP)
EVAL_CLIP["text_cfg"]["vocab_size"] = 49408
CLASSES = ("cat", "dog", "bird", "fish")


def write_eval_clip(tmp: Path, seed: int = 0) -> tuple[Path, Path]:
    """θ0 (``base.safetensors``) and its model config (``clip.json``) in ``tmp``."""
    (tmp / "clip.json").write_text(json.dumps(EVAL_CLIP), "utf-8")
    base = tmp / "base.safetensors"
    write_safetensors_file(base, tiny_clip_state(seed, cfg=EVAL_CLIP))
    return base, tmp / "clip.json"


def write_tensor_task(tmp: Path, name: str, n: int = 16, seed: int = 0, labels: torch.Tensor | None = None) -> Path:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    if labels is None:
        labels = torch.zeros(n, dtype=torch.int64)
    path = tmp / f"{name}.safetensors"
    write_safetensors_file(path, {"images": images, "labels": labels.to(torch.int64)})
    (tmp / f"{name}.classes.txt").write_text("\n".join(CLASSES) + "\n", "utf-8")
    return path


def eval_toml(tasks: list[str], *, model: str = "clip.json", extra: str = "", held_out: tuple[str, ...] = ()) -> str:
    out = f'[eval]\nevaluator = "clip_zeroshot"\nmodel = "{model}"\nbatch_size = 8\nretry_seconds = 1.0\n{extra}\n'
    for t in tasks:
        out += f'[[eval.tasks]]\nname = "{t}"\ndata = "{t}.safetensors"\n' + ("held_out = true\n" if t in held_out else "")
    return out


def predictions(base: Path, clip_json: Path, data: Path, state: dict | None = None) -> torch.Tensor:
    """The zero-shot predictions of ``state`` (default θ0) on a tensor task, by the real evaluator's
    model, preprocessing and θ0 text head."""
    from mergewatch.eval.data import open_dataset
    from mergewatch.eval.evaluators import build_evaluator
    from mergewatch.eval.settings import parse_eval

    es = parse_eval({"evaluator": "clip_zeroshot", "model": str(clip_json), "tasks": [{"name": "t", "data": str(data)}]}, data.parent, base)
    ev = build_evaluator(es, base, "open_clip_full")
    task = es.tasks[0]
    if state is None:
        from tests.helpers import load_all

        state = load_all(base)
    ev.model.visual.load_state_dict({k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")})
    ds = open_dataset(task)
    out = []
    with torch.inference_mode():
        for xs, _ in ds.batches(8, ev.preprocess):
            out.append((ev.model.encode_image(xs, normalize=True) @ ev.head(task, ds.classes).T).argmax(1))
    return torch.cat(out)


def labelled_by_base(tmp: Path, base: Path, clip_json: Path, name: str, n: int = 16, seed: int = 0) -> Path:
    """A tensor task whose labels are θ0's predictions (θ0's accuracy is 1 by construction)."""
    path = write_tensor_task(tmp, name, n, seed)
    return write_tensor_task(tmp, name, n, seed, labels=predictions(base, clip_json, path))


def write_expert(base_state: dict, path: Path, seed: int, scale: float) -> Path:
    write_safetensors_file(path, perturb(base_state, seed, scale))
    return path
