"""The evaluators, one module each, in an explicit registry (STYLE §1).

``build_evaluator(settings, base_path, table_name)`` builds the configured evaluator once (slow
parts — the model, θ0's text tower — happen here or lazily per task, cached on the object); the
worker then calls ``evaluator.evaluate(model_view, task)`` for each version and task.
"""

from __future__ import annotations

import contextlib

from pathlib import Path

import torch

from mergewatch.errors import ConfigError
from mergewatch.eval.evaluators.clip_zeroshot import ClipZeroShot
from mergewatch.eval.evaluators.heads import LinearHeads
from mergewatch.eval.evaluators.plugin import PluginEvaluator
from mergewatch.eval.evaluators.text_zeroshot import TextZeroShot

EVALUATORS = {
    "clip_zeroshot": ClipZeroShot,
    "text_zeroshot": TextZeroShot,
    "heads": LinearHeads,
    "plugin": PluginEvaluator,
}


def build_evaluator(settings, base_path: Path, table_name: str):
    """The evaluator named by ``settings.evaluator``, built for the base θ0 at ``base_path``.

    ``table_name`` is the role table the workspace detected for θ0 ("open_clip_full",
    "open_clip_visual", "hf_clip_vision", "generic"): it says how the published keys are named.
    """
    cls = EVALUATORS.get(settings.evaluator)
    if cls is None:
        raise ConfigError("eval.evaluator", f"{settings.evaluator!r} is not one of {', '.join(EVALUATORS)}")
    return cls(settings, Path(base_path), table_name)


@contextlib.contextmanager
def eval_threads(settings):
    """Run the block with ``eval.threads`` torch threads, then restore the caller's count (the batch
    CLI evaluates in the process that merges; the daemon's worker process is its own)."""
    before = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
