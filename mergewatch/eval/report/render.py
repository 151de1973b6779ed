"""The report's document: a list of blocks built from the data, rendered to Markdown and to HTML."""

from __future__ import annotations

import html
from datetime import datetime, timezone

from mergewatch.eval.metrics import expert_task
from mergewatch.eval.report.data import DEPLOY_VIEW, ReportData, step_label


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
        header = ["held-out task"] + [step_label(c.step) for c in d.columns]
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
    header = ["task", "own step"] + [step_label(s) for s in m.steps]
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


def to_html(doc: list[Block], title: str = "mergewatch report") -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(title)}</title>"]
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
