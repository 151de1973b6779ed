"""``plugin``: the user's own evaluation, ``module:function`` named in ``eval.plugin``.

The module is imported from ``sys.path`` when the evaluator is built (so an import error is found
before the first version is evaluated); the function is called as
``function(model_view, task, settings)`` and returns ``{"accuracy": float in [0, 1], "n": int}``
(``"seconds"`` is filled in with the call's wall time when absent). Anything else is an
``EvalError`` naming the plugin; an exception inside the plugin is an ``EvalError`` too (the
evaluation counts as failed and is retried, the daemon goes on).
"""

from __future__ import annotations

import importlib
import math
import time
from collections.abc import Mapping
from pathlib import Path

import torch  # noqa: F401  (model views hold torch tensors)

from mergewatch.errors import ConfigError, MergewatchError
from mergewatch.eval.base import EvalError


class PluginEvaluator:
    name = "plugin"

    def __init__(self, settings, base_path: Path | None = None, table_name: str = "generic"):
        self.settings = settings
        self.spec = settings.plugin
        mod_name, _, fn_name = self.spec.partition(":")
        try:
            module = importlib.import_module(mod_name)
        except Exception as e:  # any failure while importing user code is a config problem
            raise ConfigError("eval.plugin", f"cannot import module {mod_name!r} of plugin {self.spec!r}: {type(e).__name__}: {e}") from e
        fn = getattr(module, fn_name, None)
        if not callable(fn):
            raise ConfigError("eval.plugin", f"module {mod_name!r} has no function {fn_name!r} (plugin {self.spec!r})")
        self.function = fn

    def evaluate(self, model_view: Mapping[str, torch.Tensor], task) -> dict:
        t0 = time.perf_counter()
        try:
            out = self.function(model_view, task, self.settings)  # the plugin chooses its own grad mode
        except MergewatchError:
            raise
        except Exception as e:
            raise EvalError(f"task {task.name!r}: plugin {self.spec} raised {type(e).__name__}: {e}") from e
        seconds = time.perf_counter() - t0
        return _check_result(self.spec, task.name, out, seconds)


def _check_result(spec: str, task: str, out, seconds: float) -> dict:
    where = f"task {task!r}: plugin {spec}"
    if not isinstance(out, Mapping):
        raise EvalError(f"{where} returned {type(out).__name__}, expected a dict {{'accuracy', 'n'}}")
    acc, n = out.get("accuracy"), out.get("n")
    if isinstance(acc, bool) or not isinstance(acc, (int, float)) or not math.isfinite(acc) or not 0.0 <= acc <= 1.0:
        raise EvalError(f"{where}: 'accuracy' must be a number in [0, 1], got {acc!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise EvalError(f"{where}: 'n' must be a non-negative integer, got {n!r}")
    sec = out.get("seconds", seconds)
    if isinstance(sec, bool) or not isinstance(sec, (int, float)) or not math.isfinite(sec) or sec < 0:
        raise EvalError(f"{where}: 'seconds' must be a non-negative number, got {sec!r}")
    return {"accuracy": float(acc), "n": n, "seconds": float(sec)}
