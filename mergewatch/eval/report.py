"""``mergewatch report``: Markdown + HTML with PNG plots, from the ledger alone (issue 9, part 7).

Everything comes from ``<workspace>/ledger.sqlite``, opened read-only in one read transaction (a
consistent snapshot, which WAL allows while the daemon writes): the experts (name, step, sidecar
``task``), the merge steps, the evaluation rows. Metrics are recomputed from the accuracy matrix
with :mod:`mergewatch.eval.metrics`, so every figure in the report follows from the matrix printed
in it. Written files: ``report.md``, ``report.html`` (self-contained: inline style, images by
relative path), ``acc_bwt.png``, ``matrix.png``, ``per_task.png`` and, when held-out tasks exist,
``ka_zs.png``.

Decisions (the issue is silent):

* The matrix columns are the ``deploy`` view's evaluations keyed by step, plus θ0 (``view="base"``)
  as column 0. The latest row per (view, version) wins; if several versions of one step are
  evaluated (a rollback republishes an old step), the latest row wins. Other views are not plotted.
* A failed latest row, or one whose metrics cannot be read, is listed with its error and not
  plotted; a failed attempt that a later retry superseded is only counted.
* Task rows: tasks with a merged expert in order of their first step (the expert ↔ task link of the
  eval contract), then registered adaptation tasks not trained yet. A sidecar naming a held-out or an
  unevaluated task is reported as a note and left out of the matrix.
* Publishing: every file is written and fsynced in a staging directory beside ``out``, then moved in
  with ``os.replace``, plots first and ``report.md`` last, so a reader never sees a half-written
  file nor a report that names a plot not there yet. Plot files a previous run wrote that this
  run does not (``ka_zs.png`` once held-out tasks are gone) are removed.
"""

from __future__ import annotations

import html
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from mergewatch.checkpoint.writer import fsync_path
from mergewatch.errors import MergewatchError
from mergewatch.eval.metrics import AccuracyMatrix, accuracies, build_matrix, expert_task, first_trained, summary

PLOTS = ("acc_bwt.png", "matrix.png", "per_task.png", "ka_zs.png")
DOCS = ("report.html", "report.md")  # published last, Markdown the very last
BASE_VIEW, DEPLOY_VIEW = "base", "deploy"


class ReportError(MergewatchError):
    """The report cannot be written (no ledger, unreadable ledger)."""


# Reading the ledger ---------------------------------------------------------------------------
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
    import sqlite3

    from mergewatch.daemon.ledger import Ledger  # the ledger's reader API; the report never writes

    if not path.is_file():
        raise ReportError(f"{path}: no ledger here (is this a daemon workspace? `mergewatch run` creates it)")
    try:
        led = Ledger(path, readonly=True)
    except sqlite3.Error as e:
        raise ReportError(f"{path}: cannot open the ledger read-only: {e}") from e
    try:
        led.db.execute("BEGIN")  # one read transaction: every query below sees the same snapshot
        try:
            return {"experts": led.experts(), "steps": sorted(led.steps(limit=2**62), key=lambda s: s["step"]), "evaluations": led.evaluations()}
        finally:
            led.db.execute("COMMIT")
    except sqlite3.Error as e:
        raise ReportError(f"{path}: cannot read the ledger: {e}") from e
    finally:
        led.close()


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


# Plots ------------------------------------------------------------------------------------------
def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg: no display, no pyplot state
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _nan(x: float | None) -> float:
    return math.nan if x is None else x


def _step_label(s: int) -> str:
    return "θ0" if s == 0 else str(s)


def plot_acc_bwt(d: ReportData, path: Path) -> None:
    """ACC_t (top) and BWT_t with its denominator n (bottom) over the evaluated steps."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(8, 6)
    top, bottom = fig.subplots(2, 1, sharex=True)
    cols = [c for c in d.columns if c.step >= 1]
    xs = [c.step for c in cols]
    top.plot(xs, [_nan(c.summary["acc"]) * 100 for c in cols], "o-", label="ACC")
    if any(c.summary["a_ka"] is not None for c in cols):
        top.plot(xs, [_nan(c.summary["a_ka"]) * 100 for c in cols], "s--", alpha=0.7, label="A_KA (all adaptation tasks)")
    if any(c.summary["a_zs"] is not None for c in cols):
        top.plot(xs, [_nan(c.summary["a_zs"]) * 100 for c in cols], "^--", alpha=0.7, label="A_ZS (held-out tasks)")
    top.set_ylabel("accuracy (%)")
    top.set_title("ACC_t = mean over tasks trained by t of a[i][t]")
    top.grid(alpha=0.3)
    top.legend(loc="best", fontsize=8)
    bw = [c.summary["bwt"] for c in cols]
    bottom.axhline(0, color="grey", lw=0.8)
    bottom.plot(xs, [_nan(b) * 100 for b in bw], "o-", color="tab:red", label="BWT")
    for c in cols:
        if c.summary["bwt"] is not None:
            xy = (c.step, c.summary["bwt"] * 100)
            bottom.annotate(f"n={c.summary['bwt_denominator']}", xy, textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    bottom.set_ylabel("BWT (points)")
    bottom.set_xlabel("merge step t")
    bottom.set_title("BWT_t = (1/n) Σ_{i<t} (a[i][t] − a[i][i]); textbook n = t − 1 (n shown)")
    bottom.grid(alpha=0.3)
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    if not cols:
        top.text(0.5, 0.5, "no merge step evaluated yet", transform=top.transAxes, ha="center", va="center")
    fig.savefig(path)


def plot_matrix(d: ReportData, path: Path) -> None:
    """Heatmap of a[i][j] in percent, values written in the cells, own-step cells outlined."""
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.patches import Rectangle

    m = d.matrix
    rows, cols = len(m.tasks), len(m.steps)
    a = np.array([[math.nan if v is None else v * 100 for v in row] for row in m.values], dtype=float).reshape(rows, cols)
    fig = _figure(min(40.0, max(7.0, 2.5 + 0.65 * cols)), min(30.0, max(3.0, 1.6 + 0.45 * rows)))
    ax = fig.subplots()
    cmap = colormaps["viridis"].with_extremes(bad="#d9d9d9")
    im = ax.imshow(np.ma.masked_invalid(a), cmap=cmap, vmin=0, vmax=100, aspect="auto")
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    fontsize = max(4.0, min(9.0, 120.0 / max(cols, rows, 1)))
    for i in range(rows):
        for j in range(cols):
            v = a[i, j]
            text = "—" if math.isnan(v) else f"{v:.1f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=fontsize, color="black" if math.isnan(v) or v > 60 else "white")
        s = m.trained_at.get(m.tasks[i])
        if s in m.steps:
            j = m.steps.index(s)
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", lw=1.5))
    ax.set_xticks(range(cols), [_step_label(s) for s in m.steps], fontsize=fontsize)
    ax.set_yticks(range(rows), m.tasks, fontsize=fontsize)
    ax.set_xlabel("deploy model after step j")
    ax.set_ylabel("task i (training order)")
    ax.set_title("accuracy matrix a[i][j] (%); red: own step a[i][i]; —: missing", fontsize=10)
    fig.savefig(path)


def plot_per_task(d: ReportData, path: Path) -> None:
    """Accuracy of every task over steps; adaptation solid (star at the own step), held-out dashed."""
    from matplotlib.ticker import MaxNLocator

    from matplotlib import colormaps

    fig = _figure(9, 5)
    ax = fig.subplots()
    if len(d.tasks) > 10:  # the default cycle repeats after 10 colours
        ax.set_prop_cycle(color=[colormaps["tab20"](i % 20) for i in range(len(d.tasks))])
    xs = [c.step for c in d.columns]
    for t in d.adaptation + d.held_out:
        ys = [_nan(c.accs.get(t)) * 100 for c in d.columns]
        held = t in d.held_out
        (line,) = ax.plot(xs, ys, "--" if held else "-", marker="." if held else "o", ms=4, label=f"{t} (held-out)" if held else t)
        s = d.trained_at.get(t)
        if s in xs and not math.isnan(ys[xs.index(s)]):
            ax.plot([s], [ys[xs.index(s)]], "*", ms=12, color=line.get_color())
    ax.set_xticks(xs, [_step_label(s) for s in xs]) if len(xs) <= 30 else ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("merge step (θ0 = base)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("per-task accuracy over time (★ step the task was trained)")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, ncols=1 + len(d.tasks) // 25)
    fig.savefig(path)


def plot_ka_zs(d: ReportData, path: Path):
    """A_KA against A_ZS per step (TIME's trade-off), with iso-GM curves; returns the figure."""
    import numpy as np

    both = [c for c in d.columns if c.summary["a_ka"] is not None and c.summary["a_zs"] is not None]
    pts = [(c.step, c.summary["a_zs"] * 100, c.summary["a_ka"] * 100) for c in both]
    fig = _figure(6.5, 5.5)
    ax = fig.subplots()
    xs, ys = [p[1] for p in pts], [p[2] for p in pts]
    lo = max(0.0, min(xs + ys) - 10) if pts else 0.0
    hi = min(100.0, max(xs + ys) + 10) if pts else 100.0
    grid = np.linspace(max(lo, 1e-3), hi, 200)
    for g in range(10, 100, 10):
        ax.plot(grid, g * g / grid, ":", color="grey", lw=0.7)
        if lo <= g <= hi:  # the curve GM = g crosses the diagonal at (g, g)
            ax.annotate(f"GM {g}", (g, g), fontsize=7, color="grey", ha="left", va="bottom")
    ax.plot(xs, ys, "-", color="tab:blue", alpha=0.5)
    # Colour encodes the step (with a colour bar): labelling every point piled the labels of a long
    # stream into one unreadable blob; only the first and the last point are named.
    steps = [p[0] for p in pts]
    sc = ax.scatter(xs, ys, c=steps, cmap="viridis", vmin=min(steps, default=0), vmax=max(max(steps, default=1), 1), zorder=3)
    fig.colorbar(sc, ax=ax, label="step (0 = θ0)")
    for s, x, y in pts[:1] + pts[-1:] if len(pts) > 1 else pts:
        ax.annotate(_step_label(s), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("A_ZS: held-out tasks (%)")
    ax.set_ylabel("A_KA: adaptation tasks (%)")
    ax.set_title("knowledge accumulation vs zero-shot retention")
    ax.grid(alpha=0.3)
    fig.savefig(path)
    return fig


# The document --------------------------------------------------------------------------------
class Strong(str):
    """A table cell shown in bold."""


Block = tuple  # ("h1"|"h2"|"p"|"ul"|"table"|"img", ...)


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x * 100:.2f}"


def _signed(x: float | None) -> str:
    return "—" if x is None else f"{x * 100:+.2f}"


def _utc(ts: float | None) -> str:
    return "—" if ts is None else datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


DEFINITIONS = [
    "a[i][j]: accuracy (%) on adaptation task i of the deploy model after merge step j (θ0 = the base); "
    "the own step of a task is the step its first expert was merged.",
    "ACC_t = mean over tasks trained at steps ≤ t of a[i][t].",
    "BWT_t = (1/n) Σ over tasks trained before t of (a[i][t] − a[i][i]), in points; textbook n = t − 1, "
    "and n counts only tasks whose two cells exist (n is printed).",
    "FWT_t = mean over tasks with own step 2..t of (a[i][i−1] − accuracy of θ0 on task i).",
    "A_KA = mean accuracy over all registered adaptation tasks (seen or not); A_ZS = mean over the held-out tasks; GM = √(A_KA · A_ZS) (TIME).",
    "Missing cells (failed or absent evaluations) are skipped, never imputed; '—' marks a missing value.",
]


def build_document(d: ReportData, written_plots: list[str]) -> list[Block]:
    """The report as a list of blocks, rendered to both Markdown and HTML."""
    counts: dict[str, int] = {}
    for e in d.experts:
        counts[e.status] = counts.get(e.status, 0) + 1
    expert_line = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none yet"
    doc: list[Block] = [
        ("h1", "mergewatch report"),
        ("p", f"Workspace {d.workspace} — generated {_utc(datetime.now(timezone.utc).timestamp())} from ledger.sqlite alone."),
        ("ul", [
            f"Experts: {expert_line}. Merge steps: {len(d.steps)}.",
            f"Evaluations: {d.n_rows} rows; {len(d.columns)} evaluated models in the matrix; {len(d.failed)} failed"
            + (f"; {d.retried} failed attempts superseded by a retry" if d.retried else "") + ".",
            f"Tasks: {len(d.adaptation)} adaptation ({len(d.trained_at)} trained so far), {len(d.held_out)} held-out"
            + (f"; evaluator {d.evaluator}" if d.evaluator else "") + ".",
        ]),
    ]
    if not d.columns:
        doc.append(("p", "No evaluations yet: nothing to plot. The report fills in once the daemon has evaluated θ0 or a deployed version."))
    else:
        last = d.columns[-1]
        s = last.summary
        where = "θ0, the base model" if last.step == 0 else f"{last.step} (deploy version {last.version})"
        headline = f"Latest evaluated step: {where}. ACC {_pct(s['acc'])}, BWT {_signed(s['bwt'])} (n={s['bwt_denominator']})"
        headline += f", FWT {_signed(s['fwt'])}, A_KA {_pct(s['a_ka'])}"
        if d.held_out:
            headline += f", A_ZS {_pct(s['a_zs'])}, GM {_pct(s['gm'])}"
        doc += [("h2", "Summary"), ("p", headline + " (accuracies in %, BWT and FWT in points).")]
    doc += [("h2", "Metrics per step"), ("table", *per_step_table(d)), ("p", "Definitions:"), ("ul", DEFINITIONS)]
    captions = {
        "acc_bwt.png": "ACC and BWT over steps",
        "matrix.png": "Accuracy matrix heatmap",
        "per_task.png": "Per-task accuracy over time",
        "ka_zs.png": "A_KA vs A_ZS",
    }
    if written_plots:
        doc.append(("h2", "Plots"))
        for name in written_plots:
            doc += [("h3", f"{captions[name]} ({name})"), ("img", name, captions[name])]
    if d.columns and d.matrix.tasks:
        doc += [("h2", "Accuracy matrix"), ("p", "a[i][j] in %; bold: own step a[i][i]; —: missing."), ("table", *matrix_table(d))]
    if d.held_out and d.columns:
        header = ["held-out task"] + [_step_label(c.step) for c in d.columns]
        doc += [("h2", "Held-out tasks"), ("table", header, [[t] + [_pct(c.accs.get(t)) for c in d.columns] for t in d.held_out])]
    if d.failed:
        rows = [[str(f["id"]), f["view"], str(f["version"]), str(f["step"]), _utc(f["created_at"]), f["error"]] for f in d.failed]
        doc += [("h2", "Failed evaluations (not plotted)"), ("table", ["id", "view", "version", "step", "at", "error"], rows)]
    if d.notes:
        doc += [("h2", "Notes"), ("ul", d.notes)]
    if d.experts:
        rows = []
        for e in d.experts:
            task = expert_task(e.name, e.meta, d.tasks) or "—"
            rows.append([str(e.seq), "—" if e.step is None else str(e.step), e.name, task, e.status, e.reason or ""])
        doc += [("h2", "Experts"), ("table", ["seq", "step", "name", "task", "status", "reason"], rows)]
    return doc


def per_step_table(d: ReportData) -> tuple[list[str], list[list[str]]]:
    header = ["step", "deploy version", "expert", "task", "ACC", "BWT", "BWT n", "FWT", "A_KA", "A_ZS", "GM", "note"]
    by_seq = {e.seq: e for e in d.experts}
    failed_steps = {f["step"] for f in d.failed if f["view"] == DEPLOY_VIEW}
    rows = []
    base = d.column(0)
    if base is not None:
        s = base.summary
        rows.append(["θ0", "base", "—", "—", "—", "—", "0", "—", _pct(s["a_ka"]), _pct(s["a_zs"]), _pct(s["gm"]), "base model"])
    steps = {st["step"]: st for st in d.steps}
    for step in sorted(set(steps) | {c.step for c in d.columns if c.step >= 1}):
        st = steps.get(step, {})
        e = by_seq.get(st.get("expert_seq"))
        name = e.name if e else "—"
        task = (expert_task(e.name, e.meta, d.tasks) or "—") if e else "—"
        c = d.column(step)
        if c is None:
            note = "evaluation failed" if step in failed_steps else ("in progress" if st and st.get("published_at") is None else "not evaluated")
            version = st.get("deploy_version")
            rows.append([str(step), "—" if version is None else str(version), name, task] + ["—"] * 7 + [note])
            continue
        s = c.summary
        note = "held back by the gate: " + str(c.metrics.get("gate_reason") or "") if c.metrics.get("held_back") else ""
        figures = [_pct(s["acc"]), _signed(s["bwt"]), str(s["bwt_denominator"]), _signed(s["fwt"]), _pct(s["a_ka"]), _pct(s["a_zs"]), _pct(s["gm"])]
        rows.append([str(step), str(c.version), name, task, *figures, note.strip()])
    return header, rows


def matrix_table(d: ReportData) -> tuple[list[str], list[list[str]]]:
    m = d.matrix
    header = ["task", "own step"] + [_step_label(s) for s in m.steps]
    rows = []
    for task, values in zip(m.tasks, m.values):
        own = m.trained_at.get(task)
        cells = [Strong(_pct(v)) if s == own else _pct(v) for s, v in zip(m.steps, values)]
        rows.append([task, "not trained" if own is None else str(own)] + cells)
    return header, rows


def _md_cell(c: str) -> str:
    text = str(c).replace("|", "\\|").replace("\n", " ")
    return f"**{text}**" if isinstance(c, Strong) else text


def to_markdown(doc: list[Block]) -> str:
    out: list[str] = []
    for b in doc:
        kind = b[0]
        if kind in ("h1", "h2", "h3"):
            out += ["#" * int(kind[1]) + " " + b[1], ""]
        elif kind == "p":
            out += [b[1], ""]
        elif kind == "ul":
            out += [f"- {item}" for item in b[1]] + [""]
        elif kind == "img":
            out += [f"![{b[2]}]({b[1]})", ""]
        elif kind == "table":
            header, rows = b[1], b[2]
            out.append("| " + " | ".join(map(_md_cell, header)) + " |")
            out.append("|" + "|".join("---" for _ in header) + "|")
            out += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in rows]
            out.append("")
    return "\n".join(out)


STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f2f2f2; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; }
"""


def to_html(doc: list[Block]) -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', "<title>mergewatch report</title>"]
    out += [f"<style>{STYLE}</style>", "</head><body>"]
    for b in doc:
        kind = b[0]
        if kind in ("h1", "h2", "h3", "p"):
            out.append(f"<{kind}>{e(b[1])}</{kind}>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{e(i)}</li>" for i in b[1]) + "</ul>")
        elif kind == "img":
            out.append(f'<figure><img src="{e(b[1])}" alt="{e(b[2])}"><figcaption>{e(b[2])}</figcaption></figure>')
        elif kind == "table":
            cell = lambda c, tag: f"<{tag}><b>{e(c)}</b></{tag}>" if isinstance(c, Strong) else f"<{tag}>{e(c)}</{tag}>"  # noqa: E731
            out.append("<table><thead><tr>" + "".join(cell(h, "th") for h in b[1]) + "</tr></thead><tbody>")
            out += ["<tr>" + "".join(cell(c, "td") for c in r) + "</tr>" for r in b[2]]
            out.append("</tbody></table>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# Writing ----------------------------------------------------------------------------------------
def write_report(workspace: Path, out: Path | None = None) -> dict[str, Path]:
    """Write the report of ``workspace`` into ``out`` (default ``<workspace>/report``).

    Returns the paths written: ``{"markdown", "html"}`` plus one key per plot (``acc_bwt``,
    ``matrix``, ``per_task``, ``ka_zs``). Safe on a running daemon's workspace (read-only snapshot).
    """
    workspace = Path(workspace)
    out = Path(out) if out is not None else workspace / "report"
    data = collect(workspace, read_ledger(workspace / "ledger.sqlite"))
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        plots: list[str] = []
        if data.columns:
            plot_acc_bwt(data, stage / "acc_bwt.png")
            plots.append("acc_bwt.png")
            if data.matrix.tasks:
                plot_matrix(data, stage / "matrix.png")
                plots.append("matrix.png")
            plot_per_task(data, stage / "per_task.png")
            plots.append("per_task.png")
            if data.held_out:
                plot_ka_zs(data, stage / "ka_zs.png")
                plots.append("ka_zs.png")
        doc = build_document(data, plots)
        (stage / "report.md").write_text(to_markdown(doc), "utf-8")
        (stage / "report.html").write_text(to_html(doc), "utf-8")
        out.mkdir(parents=True, exist_ok=True)
        for name in plots + list(DOCS):
            fsync_path(stage / name)
            os.replace(stage / name, out / name)
        for name in PLOTS:
            if name not in plots:
                (out / name).unlink(missing_ok=True)
        fsync_path(out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    paths = {"markdown": out / "report.md", "html": out / "report.html"}
    paths.update({name.removesuffix(".png"): out / name for name in plots})
    return paths


def main_report(settings, out: Path | None = None) -> dict[str, Path]:
    """``mergewatch report --config F [--out DIR]``: the report of ``settings.workspace``."""
    return write_report(Path(settings.workspace), out)
