"""Evaluating published versions: the job the evaluation worker runs, and the bookkeeping around it.

Shared by the daemon (evaluation in its own worker process, DESIGN §1) and the batch CLI:

* ``evaluate_path`` is the job: open one published version directory (sha256-verified against its
  manifest), run the configured evaluator on every task, return per-task results. It runs in a
  worker process with its own torch thread count, so a slow evaluation never holds up a merge; the
  evaluator is built once per worker and reused (``_evaluator``).
* ``trained_at`` links merged experts to tasks (the sidecar's ``task``, else the expert name's
  stem when it is a task name) and ``summarize`` turns the results of the version of step t plus the
  earlier ones into the row recorded in the ledger (ACC, BWT with its denominator, FWT, A_KA, A_ZS,
  GM; SPEC §5). The ledger is the source of truth; ``EVAL.json`` beside the version is a copy.
* ``gate_decision`` is the deploy gate (issue 9 §5).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from mergewatch.eval import metrics as M
from mergewatch.eval.base import EvalError

#: view names used in the ledger's ``evaluations`` table; θ0 itself is evaluated as view "base", version 0
BASE_VIEW = "base"

_CACHE: dict = {}


def _evaluator(settings, table_name: str):
    """The evaluator for these settings, built once per process (worker or batch CLI)."""
    from mergewatch.eval.evaluators import build_evaluator

    key = (settings.eval, str(settings.base), table_name)
    ev = _CACHE.get(key)
    if ev is None:
        _CACHE.clear()
        ev = _CACHE[key] = build_evaluator(settings.eval, Path(settings.base), table_name)
    return ev


def evaluate_checkpoint(settings, table_name: str, model_view, *, progress=None) -> dict:
    """Run every configured task on ``model_view`` (a mapping of tensors); returns the results row.

    ``{"evaluator", "tasks": {name: {"accuracy", "n", "seconds"}}, "seconds"}``. Raises ``EvalError``
    (or any exception of the evaluator: the caller records it as a failed evaluation)."""
    from mergewatch.eval.evaluators import eval_threads

    t0 = time.monotonic()
    tasks = {}
    with eval_threads(settings.eval):
        ev = _evaluator(settings, table_name)
        for i, task in enumerate(settings.eval.tasks):
            res = ev.evaluate(model_view, task)
            acc = float(res["accuracy"])
            if not 0.0 <= acc <= 1.0:
                raise EvalError(f"task {task.name!r}: the evaluator returned accuracy {acc}, outside [0, 1]")
            tasks[task.name] = {"accuracy": acc, "n": int(res["n"]), "seconds": round(float(res.get("seconds", 0.0)), 6)}
            if progress is not None:
                progress(task.name, i + 1, len(settings.eval.tasks))
    return {"evaluator": settings.eval.evaluator, "tasks": tasks, "seconds": round(time.monotonic() - t0, 6)}


def evaluate_path(settings, table_name: str, path: str) -> dict:
    """The worker job: evaluate the published version at ``path`` (``<view>/<N>``, or θ0's checkpoint).

    A version directory is verified against its MANIFEST (sha256 of every file) before anything is
    read, so a damaged version is a failed evaluation, never a wrong figure."""
    from mergewatch.checkpoint.reader import LazyCheckpoint
    from mergewatch.deploy.loader import load_version

    p = Path(path)
    if (p / "MANIFEST.json").is_file():
        model = load_version(p.parent, int(p.name)).checkpoint
    else:
        model = LazyCheckpoint(p)
    return evaluate_checkpoint(settings, table_name, model)


def try_evaluate(settings, table_name: str, path: str, *, catch: type[BaseException] = Exception) -> tuple[bool, dict | str, float]:
    """``evaluate_path`` as a job outcome: ``(True, result, seconds)``, or ``(False, "Type: message",
    seconds)`` when it raised one of ``catch`` (recorded as a failed evaluation by the caller)."""
    t0 = time.monotonic()
    try:
        return True, evaluate_path(settings, table_name, path), time.monotonic() - t0
    except catch as e:  # noqa: BLE001 - every failure is a failed evaluation, never a crash
        return False, f"{type(e).__name__}: {e}", time.monotonic() - t0


# Bookkeeping ------------------------------------------------------------------------------------

def adaptation_tasks(eval_settings) -> list[str]:
    return [t.name for t in eval_settings.tasks if not t.held_out]


def held_out_tasks(eval_settings) -> list[str]:
    return [t.name for t in eval_settings.tasks if t.held_out]


def trained_at(experts: list[tuple[int, str, dict]], eval_settings) -> dict[str, int]:
    """``{adaptation task: the step its first expert was merged}`` in training order, from the merged
    experts ``[(step, name, meta)]`` (the link: sidecar ``task``, else the name's stem; SPEC §5)."""
    adapt = adaptation_tasks(eval_settings)
    own = M.first_trained((step, M.expert_task(name, meta, adapt)) for step, name, meta in experts)
    return {task: step for task, step in own.items() if task in adapt}


@dataclass
class StepEval:
    step: int
    tasks: dict  # name -> {"accuracy", ...}


def summarize(step: int, tasks: dict, earlier: list[StepEval], trained: dict[str, int], eval_settings, zero_shot: dict | None) -> dict:
    """The metrics of the version of ``step`` given the results of earlier steps (SPEC §5).

    ``trained`` maps the adaptation tasks trained at steps ≤ ``step`` to their own step (training
    order); ``zero_shot`` holds θ0's per-task accuracies (for FWT), or None when θ0 was not evaluated."""
    rows = [{"step": e.step, "tasks": e.tasks} for e in earlier if e.step != step] + [{"step": step, "tasks": tasks}]
    order = list(trained)
    matrix = M.build_matrix(rows, order, trained)
    accs = {k: v["accuracy"] for k, v in tasks.items()}
    zs = dict(zero_shot) if zero_shot else None
    out = M.summary(matrix, step, zero_shot=zs, adaptation=adaptation_tasks(eval_settings), held_out=held_out_tasks(eval_settings), accs=accs)
    out.update(task_order=list(order), trained_at=dict(trained), held_out=held_out_tasks(eval_settings))
    return out


def mean_over(tasks: dict, names: list[str]) -> float | None:
    vals = [tasks[n]["accuracy"] for n in names if n in tasks]
    return sum(vals) / len(vals) if vals else None


def gate_decision(new_tasks: dict, new_order: list[str], current_tasks: dict | None, max_drop: float) -> tuple[bool, str]:
    """Deploy gate: may the new version become current?

    Both versions are compared on the same tasks, the adaptation tasks the new version has seen
    (``new_order``; all evaluated tasks when none is known yet), so a version is not held back merely
    because its ACC covers one more, harder task. Returns ``(promote, reason)``."""
    if current_tasks is None:
        return True, "no evaluated current version to compare with"
    names = list(new_order) or sorted(new_tasks)
    new = mean_over(new_tasks, names)
    cur = mean_over(current_tasks, names)
    if new is None or cur is None:
        return True, "no common tasks to compare"
    drop = cur - new
    if drop > max_drop:
        return False, (
            f"ACC over {len(names)} task(s) {new:.4f} is {drop:.4f} below the current version's {cur:.4f} "
            f"(gate allows a drop of at most {max_drop:.4f})"
        )
    return True, f"ACC {new:.4f} vs current {cur:.4f} (drop {drop:.4f} <= {max_drop:.4f})"


def eval_document(view: str, version: int, step: int, row: dict) -> dict:
    """What ``EVAL.json`` holds: the ledger row's metrics plus where they belong."""
    return {"view": view, "version": version, "step": step, **row}
