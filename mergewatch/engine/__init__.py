"""The step engine: the I/O that runs a strategy's pure passes over a model (DESIGN §4).

A strategy (``mergewatch.strategies``) only declares passes, each a pure function of one tensor
name's inputs. This package reads those inputs, writes what the passes emit and keeps the result:

* ``steps``  ``run_step`` / ``run_prepare``: one step (or the work prepared ahead for the next one)
  into a staging directory, and the checks of what it must produce (state sets, views).
* ``local``  the local executor: the loop that streams every tensor name through the passes in
  this process (loads one name's inputs, hands them to ``work.tensor_work``, writes the outputs).
* ``work``   the unit of work: one name's inputs through one pass, checked and cast; no I/O. An
  executor that spreads a step over processes or machines calls it where the inputs are.
* ``sinks``  the checkpoints a pass writes (``sets/<name>/``, ``views/<view>/``), with the mirroring
  of sinks that receive the very same tensors.
* ``state``  the committed ``state/<t>/`` directories, their staging and the prepared sets.

The names below are imported on first use (PEP 562), like ``mergewatch.checkpoint``'s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergewatch.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "sinks": ("sink_path",),
    "state": ("PREPARED", "StateSnapshot", "StateStore"),
    "steps": ("PrepareResult", "Progress", "StepResult", "build_model_info", "run_prepare", "run_step"),
    "work": ("StrategyError", "tensor_work"),
})

if TYPE_CHECKING:
    from mergewatch.engine.sinks import sink_path
    from mergewatch.engine.state import PREPARED, StateSnapshot, StateStore
    from mergewatch.engine.steps import PrepareResult, Progress, StepResult, build_model_info, run_prepare, run_step
    from mergewatch.engine.work import StrategyError, tensor_work
