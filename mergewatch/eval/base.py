"""The evaluator contract (issue 9): one small interface, one module per evaluator.

An evaluator is built once from the ``[eval]`` settings (and θ0), then called for every published
version and task::

    evaluator.evaluate(model_view, task) -> {"accuracy": float in [0, 1], "n": int, "seconds": float}

``model_view`` is the published checkpoint as a ``Mapping[str, Tensor]`` (the same keys as θ0: a
``LazyCheckpoint`` or a state dict); ``task`` is a ``TaskSettings``. Evaluation runs batched, without
gradients, in inference mode. A problem with the data or the model is an ``EvalError`` that names
the task and the file; it never takes the daemon down (the evaluation is counted as failed and
retried).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from mergewatch.errors import MergewatchError

if TYPE_CHECKING:  # torch only in annotations: status reads evaluations without it (issue 14)
    import torch


class EvalError(MergewatchError):
    """An evaluation could not run or its data is malformed (the message names task and file)."""


class Evaluator(Protocol):
    name: str

    def evaluate(self, model_view: Mapping[str, torch.Tensor], task) -> dict:  # {"accuracy", "n", "seconds"}
        ...
