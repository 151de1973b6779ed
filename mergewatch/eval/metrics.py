"""Continual-merging metrics over the accuracy matrix (SPEC §5, issue 9): pure functions, no I/O.

``a[i][j]`` is the accuracy on adaptation task ``i`` of the model deployed after merge step ``j``
(column 0, when present, is θ0 itself). Task ``i``'s *own step* ``s_i`` is the step at which an expert
for it was first merged, so ``a[i][s_i]`` is its just-learned accuracy. With ``z_i`` the accuracy of θ0
on task ``i``::

    ACC_t  = mean_{i: s_i <= t}      a[i][t]
    BWT_t  = (1/n) Σ_{i: s_i < t}    (a[i][t] − a[i][s_i])        textbook n = t − 1
    FWT_t  = mean_{i: 2 <= s_i <= t} (a[i][s_i − 1] − z_i)
    A_KA   = mean accuracy over every registered adaptation task (seen or not)       (TIME)
    A_ZS   = mean accuracy over the held-out tasks (never used for experts)          (TIME)
    GM     = √(A_KA · A_ZS)

With one task per step and every cell present, ``n = t − 1`` (Lopez-Paz & Ranzato 2017, the 1/(t−1)
of SPEC §5). **Decision** (SPEC is silent): a missing cell (an evaluation that failed or never ran, a
task absent from a row) is skipped, never imputed, and every mean is over the cells that exist; BWT
returns the denominator it actually used (tasks trained before ``t`` whose two cells both exist) so it
can be printed beside the figure. A mean over nothing is ``None``, never 0.

**Decision** (FWT): tasks whose own step is 1 are left out, as in the textbook sum from i = 2: the
model deployed before step 1 is θ0 itself, whose transfer over θ0 is 0 by definition.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePath


@dataclass
class AccuracyMatrix:
    """``values[i][j]`` = accuracy on ``tasks[i]`` after ``steps[j]``; ``None`` is a missing cell.

    ``trained_at`` maps a task to its own step (first merged expert for it); a task absent from it was
    never trained (registered but not seen yet). A step that is not a column reads as missing cells.
    """

    tasks: list[str]
    steps: list[int]
    values: list[list[float | None]]
    trained_at: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"accuracy matrix: duplicate task rows in {self.tasks}")
        if any(b <= a for a, b in zip(self.steps, self.steps[1:])):
            raise ValueError(f"accuracy matrix: steps must be strictly increasing, got {self.steps}")
        if len(self.values) != len(self.tasks) or any(len(r) != len(self.steps) for r in self.values):
            raise ValueError(f"accuracy matrix: values must be {len(self.tasks)} rows × {len(self.steps)} columns")
        unknown = sorted(set(self.trained_at) - set(self.tasks))
        if unknown:
            raise ValueError(f"accuracy matrix: trained_at names tasks that are not rows: {unknown}")
        self._row = {t: i for i, t in enumerate(self.tasks)}
        self._col = {s: j for j, s in enumerate(self.steps)}

    def get(self, task: str, step: int) -> float | None:
        """a[task][step]; ``None`` when the cell is missing (including a step with no column)."""
        if task not in self._row:
            raise KeyError(f"task {task!r} is not a row of the accuracy matrix (rows: {self.tasks})")
        j = self._col.get(step)
        return None if j is None else self.values[self._row[task]][j]


def accuracies(metrics: Mapping, where: str = "evaluation") -> dict[str, float]:
    """``{task: accuracy}`` from an evaluation row's ``metrics["tasks"]``, checked.

    Each entry must be ``{"accuracy": x, ...}`` with a real ``x`` in [0, 1]; anything else is a
    ``ValueError`` naming ``where`` and the task (a NaN accuracy is an error, not a missing cell).
    """
    tasks = metrics.get("tasks", {})
    if not isinstance(tasks, Mapping):
        raise ValueError(f"{where}: 'tasks' must be an object of task -> {{'accuracy': ...}}, got {type(tasks).__name__}")
    out: dict[str, float] = {}
    for name, entry in tasks.items():
        x = entry.get("accuracy") if isinstance(entry, Mapping) else None
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not (0.0 <= x <= 1.0):
            raise ValueError(f"{where}: task {name!r} needs an 'accuracy' number in [0, 1], got {entry!r}")
        out[str(name)] = float(x)
    return out


def build_matrix(evals: Iterable[Mapping], task_order: list[str], trained_at: Mapping[str, int] | None = None) -> AccuracyMatrix:
    """The accuracy matrix from evaluation rows ``[{"step": j, "tasks": {name: {"accuracy": ..}}}, ...]``.

    Rows are ``task_order`` (adaptation tasks in training order; a repeated name keeps its first
    place). Columns are the distinct steps of the rows, ascending; when two rows share a step the
    later one in ``evals`` wins (pass them in ledger id order). Rows with ``"status": "failed"`` are
    skipped (their cells are missing). ``trained_at`` gives each task's own step; without it the k-th
    task (0-based) is taken to be trained at step k + 1 (one expert per task, in order).
    """
    tasks = list(dict.fromkeys(task_order))
    by_step: dict[int, dict[str, float]] = {}
    for n, e in enumerate(evals):
        if e.get("status") == "failed":
            continue
        step = e.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"evaluation #{n}: 'step' must be an integer >= 0, got {step!r}")
        by_step[step] = accuracies(e, where=f"evaluation #{n} (step {step})")
    steps = sorted(by_step)
    values = [[by_step[s].get(t) for s in steps] for t in tasks]
    if trained_at is None:
        own = {t: k + 1 for k, t in enumerate(tasks)}
    else:
        own = {}
        for t, s in trained_at.items():
            if isinstance(s, bool) or not isinstance(s, int) or s < 1:
                raise ValueError(f"trained_at[{t!r}] must be a merge step >= 1, got {s!r}")
            own[t] = s
    return AccuracyMatrix(tasks=tasks, steps=steps, values=values, trained_at=own)


def own_step(m: AccuracyMatrix, task: str) -> int | None:
    """The step at which ``task`` was first trained (the column of a[i][i]); ``None`` if never."""
    if task not in m.tasks:
        raise KeyError(f"task {task!r} is not a row of the accuracy matrix (rows: {m.tasks})")
    return m.trained_at.get(task)


def _mean(xs: list[float]) -> float | None:
    return math.fsum(xs) / len(xs) if xs else None


def acc(m: AccuracyMatrix, t: int) -> float | None:
    """ACC_t: mean of a[i][t] over the tasks trained at steps <= t whose cell exists."""
    cells = [m.get(task, t) for task in m.tasks if (s := m.trained_at.get(task)) is not None and s <= t]
    return _mean([x for x in cells if x is not None])


def bwt(m: AccuracyMatrix, t: int) -> tuple[float | None, int]:
    """(BWT_t, n): mean of a[i][t] − a[i][s_i] over tasks trained before ``t`` whose two cells exist.

    ``n`` is the denominator used: ``t − 1`` in the textbook case (one task per step, nothing
    missing), fewer when cells are missing. ``(None, 0)`` when no task qualifies (e.g. ``t = 1``).
    """
    diffs = []
    for task in m.tasks:
        s = m.trained_at.get(task)
        if s is None or s >= t:
            continue
        now, then = m.get(task, t), m.get(task, s)
        if now is not None and then is not None:
            diffs.append(now - then)
    return _mean(diffs), len(diffs)


def fwt(m: AccuracyMatrix, zero_shot: Mapping[str, float], t: int) -> float | None:
    """FWT_t: mean of a[i][s_i − 1] − z_i over tasks with 2 <= s_i <= t (cells and z_i present).

    ``zero_shot`` is θ0's accuracy per task. Tasks first trained at step 1 are excluded (module doc).
    """
    diffs = []
    for task in m.tasks:
        s = m.trained_at.get(task)
        if s is None or s < 2 or s > t:
            continue
        before, z = m.get(task, s - 1), zero_shot.get(task)
        if before is not None and z is not None:
            diffs.append(before - z)
    return _mean(diffs)


def _task_mean(accs: Mapping[str, float], names: Iterable[str]) -> float | None:
    return _mean([accs[n] for n in dict.fromkeys(names) if accs.get(n) is not None])


def a_ka(accs: Mapping[str, float], adaptation: Iterable[str]) -> float | None:
    """TIME's knowledge accumulation: mean accuracy over all registered adaptation tasks, seen or
    not (a task with no accuracy in ``accs`` is skipped)."""
    return _task_mean(accs, adaptation)


def a_zs(accs: Mapping[str, float], held_out: Iterable[str]) -> float | None:
    """TIME's zero-shot retention: mean accuracy over the held-out tasks (never used for experts)."""
    return _task_mean(accs, held_out)


def gm(a_ka: float | None, a_zs: float | None) -> float | None:
    """Geometric mean √(A_KA · A_ZS); ``None`` if either is missing."""
    if a_ka is None or a_zs is None:
        return None
    if a_ka < 0 or a_zs < 0:
        raise ValueError(f"GM needs non-negative accuracies, got A_KA={a_ka}, A_ZS={a_zs}")
    return math.sqrt(a_ka * a_zs)


def summary(
    m: AccuracyMatrix,
    t: int,
    *,
    zero_shot: Mapping[str, float] | None,
    adaptation: Iterable[str],
    held_out: Iterable[str],
    accs: Mapping[str, float],
) -> dict:
    """Every metric at step ``t``: ``acc, bwt, bwt_denominator, fwt, a_ka, a_zs, gm``.

    ``accs`` is the evaluated version's accuracy per task (adaptation and held-out); ``fwt`` is
    ``None`` without ``zero_shot`` (θ0's accuracies).
    """
    b, n = bwt(m, t)
    ka, zs = a_ka(accs, adaptation), a_zs(accs, held_out)
    return {
        "acc": acc(m, t),
        "bwt": b,
        "bwt_denominator": n,
        "fwt": fwt(m, zero_shot, t) if zero_shot is not None else None,
        "a_ka": ka,
        "a_zs": zs,
        "gm": gm(ka, zs),
    }


# The expert ↔ task link (eval contract) -----------------------------------------------------------
def expert_task(name: str, meta: Mapping | None, tasks: Iterable[str]) -> str | None:
    """The task an expert was trained on: its sidecar's ``"task"`` (kept even if it is not one of
    ``tasks``, so the caller can report it), else the name's stem (``cars.safetensors`` or a
    directory ``cars``) when that is one of ``tasks``, else ``None``."""
    task = (meta or {}).get("task")
    if isinstance(task, str) and task:
        return task
    names = set(tasks)
    base = PurePath(name).name
    for cand in (base.removesuffix(".safetensors"), PurePath(base).stem):
        if cand in names:
            return cand
    return None


def first_trained(experts: Iterable[tuple[int, str | None]]) -> dict[str, int]:
    """``{task: own step}`` from ``(step, task)`` pairs of merged experts: the earliest step per task;
    ``None`` tasks are ignored. The dict is ordered by own step (then task name): training order."""
    own: dict[str, int] = {}
    for step, task in experts:
        if task is not None and (task not in own or step < own[task]):
            own[task] = step
    return dict(sorted(own.items(), key=lambda kv: (kv[1], kv[0])))
