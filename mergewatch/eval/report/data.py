"""The report's data: one snapshot of the ledger, read into the accuracy matrix and per-step metrics.

Decisions (the issue is silent):

* The matrix columns are the ``deploy`` view's evaluations keyed by step, plus θ0 (``view="base"``)
  as column 0. The latest row per (view, version) wins; if several versions of one step are
  evaluated (a rollback republishes an old step), the latest row wins. Other views are not plotted.
* A failed latest row, or one whose metrics cannot be read, is listed with its error and not
  plotted; a failed attempt that a later retry superseded is only counted.
* Task rows: tasks with a merged expert in order of their first step (the expert ↔ task link of the
  eval contract), then registered adaptation tasks not trained yet. A sidecar naming a held-out or an
  unevaluated task is reported as a note and left out of the matrix.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from mergewatch.errors import MergewatchError
from mergewatch.eval.metrics import AccuracyMatrix, accuracies, build_matrix, expert_task, first_trained, summary
from mergewatch.ledger import Ledger

BASE_VIEW, DEPLOY_VIEW = "base", "deploy"


class ReportError(MergewatchError):
    """The report cannot be written (no ledger, unreadable ledger)."""


def step_label(s: int) -> str:
    """A step as the plots and tables name it (θ0 for the base)."""
    return "θ0" if s == 0 else str(s)


@dataclass
class Column:
    """One evaluated model: θ0 (step 0) or the deploy version of a merge step."""

    step: int
    view: str
    version: int
    row_id: int
    accs: dict[str, float]
    metrics: dict
    summary: dict = field(default_factory=dict)


@dataclass
class ReportData:
    workspace: Path
    experts: list
    steps: list[dict]
    tasks: list[str]  # every evaluated task, registry (first-seen) order
    adaptation: list[str]  # matrix rows: trained tasks in training order, then the unseen ones
    held_out: list[str]
    trained_at: dict[str, int]
    columns: list[Column]  # ascending step, θ0 first when evaluated
    failed: list[dict]
    retried: int  # failed attempts a later row for the same version superseded
    n_rows: int
    notes: list[str]
    matrix: AccuracyMatrix
    evaluator: str = ""

    def column(self, step: int) -> Column | None:
        return next((c for c in self.columns if c.step == step), None)


def read_ledger(path: Path) -> dict:
    """Experts, steps and evaluation rows of one consistent snapshot of the ledger (read-only)."""
    if not path.is_file():
        raise ReportError(f"{path}: no ledger here (is this a daemon workspace? `mergewatch run` creates it)")
    try:
        with Ledger.snapshot(path) as led:  # the report never writes
            return {"experts": led.experts(), "steps": sorted(led.steps(limit=2**62), key=lambda s: s["step"]), "evaluations": led.evaluations()}
    except sqlite3.Error as e:
        raise ReportError(f"{path}: cannot read the ledger: {e}") from e


def collect(workspace: Path, raw: dict) -> ReportData:
    """Select the evaluation rows, link experts to tasks, build the matrix and the per-step metrics."""
    notes: list[str] = []
    rows = [{**r, "metrics": r["metrics"] if isinstance(r["metrics"], dict) else {}} for r in raw["evaluations"]]
    latest: dict[tuple[str, int], dict] = {}
    for r in rows:  # ordered by id: the latest row per (view, version) wins
        latest[(r["view"], r["version"])] = r
    retried = sum(1 for r in rows if latest[(r["view"], r["version"])] is not r and r["metrics"].get("status") != "ok")

    failed: list[dict] = []
    base: Column | None = None
    by_step: dict[int, Column] = {}
    other_views: set[str] = set()
    for r in sorted(latest.values(), key=lambda r: r["id"]):
        m = r["metrics"]
        where = f"evaluation {r['id']} ({r['view']} v{r['version']})"
        status = m.get("status")
        if status != "ok":
            failed.append({**r, "error": str(m.get("error") or f"status {status!r}")})
            continue
        try:
            accs = accuracies(m, where=where)
        except ValueError as e:
            failed.append({**r, "error": f"unreadable metrics: {e}"})
            continue
        if r["view"] == BASE_VIEW:
            base = Column(0, r["view"], r["version"], r["id"], accs, m)
        elif r["view"] == DEPLOY_VIEW:
            if not isinstance(r["step"], int) or r["step"] < 1:
                failed.append({**r, "error": f"a deploy evaluation needs a merge step >= 1, got {r['step']!r}"})
                continue
            by_step[r["step"]] = Column(r["step"], r["view"], r["version"], r["id"], accs, m)
        else:
            other_views.add(r["view"])
    if other_views:
        notes.append(f"evaluations of other views ({', '.join(sorted(other_views))}) are not plotted")
    columns = ([base] if base else []) + [by_step[s] for s in sorted(by_step)]

    tasks: list[str] = []
    held: list[str] = []
    for c in columns:
        tasks += [t for t in c.accs if t not in tasks]
        ho = c.metrics.get("held_out", [])
        held += [t for t in ho if isinstance(t, str) and t not in held] if isinstance(ho, list) else []
    held_out = [t for t in tasks if t in held]
    registered = [t for t in tasks if t not in held]

    pairs = []
    for e in raw["experts"]:
        if e.status != "merged" or e.step is None:
            continue
        task = expert_task(e.name, e.meta, tasks)
        if task is None:
            continue
        if task in held_out:
            notes.append(f"expert {e.name} (step {e.step}) names held-out task {task!r}; it is kept out of the matrix")
        elif task not in registered:
            notes.append(f"expert {e.name} (step {e.step}) names task {task!r}, which no evaluation covers")
        else:
            pairs.append((e.step, task))
    trained_at = first_trained(pairs)
    adaptation = list(trained_at) + [t for t in registered if t not in trained_at]

    evals = [{"step": c.step, "tasks": {t: {"accuracy": a} for t, a in c.accs.items()}} for c in columns]
    matrix = build_matrix(evals, adaptation, trained_at)
    zero_shot = base.accs if base else None
    for c in columns:
        c.summary = summary(matrix, c.step, zero_shot=zero_shot, adaptation=registered, held_out=held_out, accs=c.accs)
    evaluator = next((str(c.metrics["evaluator"]) for c in reversed(columns) if c.metrics.get("evaluator")), "")
    return ReportData(
        workspace, raw["experts"], raw["steps"], tasks, adaptation, held_out, trained_at, columns, failed, retried, len(rows), notes, matrix, evaluator
    )
