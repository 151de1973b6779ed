"""``mergewatch report``: Markdown + HTML with PNG plots, from the ledger alone (issue 9, part 7).

Everything comes from ``<workspace>/ledger.sqlite``, read through one read-only snapshot
(``Ledger.snapshot``: consistent while the daemon writes): the experts (name, step, sidecar
``task``), the merge steps, the evaluation rows. Metrics are recomputed from the accuracy matrix
with :mod:`mergewatch.eval.metrics`, so every figure in the report follows from the matrix printed
in it. Written files: ``report.md``, ``report.html`` (self-contained: inline style, images by
relative path), ``acc_bwt.png``, ``matrix.png``, ``per_task.png`` and, when held-out tasks exist,
``ka_zs.png``.

Modules: :mod:`.data` reads the ledger and builds the matrix, :mod:`.plots` draws, :mod:`.render`
writes the document; this one publishes the files. Publishing: every file is written and fsynced in
a staging directory beside ``out``, then moved in with ``os.replace``, plots first and
``report.md`` last, so a reader never sees a half-written file nor a report that names a plot not
there yet. Plot files a previous run wrote that this run does not (``ka_zs.png`` once held-out
tasks are gone) are removed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from mergewatch.checkpoint.durable import fsync_path
from mergewatch.eval.report.data import Column, ReportData, ReportError, collect, read_ledger
from mergewatch.eval.report.data import step_label as _step_label
from mergewatch.eval.report.plots import plot_acc_bwt, plot_ka_zs, plot_matrix, plot_per_task
from mergewatch.eval.report.render import build_document, to_html, to_markdown

__all__ = ["publish_files", "Column", "ReportData", "ReportError", "collect", "read_ledger", "write_report", "build_document", "to_html", "to_markdown",
           "plot_acc_bwt", "plot_ka_zs", "plot_matrix", "plot_per_task", "_step_label"]

PLOTS = ("acc_bwt.png", "matrix.png", "per_task.png", "ka_zs.png")
DOCS = ("report.html", "report.md")  # published last, Markdown the very last


def publish_files(out: Path, build: Callable[[Path], list[str]], managed: Sequence[str]) -> list[str]:
    """Publish the files ``build(stage)`` writes into a staging directory beside ``out`` and returns
    (in publishing order: the document that names the others last). Each is fsynced and moved in with
    ``os.replace``; a ``managed`` file this run did not write is removed. Returns the names written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        names = build(stage)
        out.mkdir(parents=True, exist_ok=True)
        for name in names:
            fsync_path(stage / name)
            os.replace(stage / name, out / name)
        for name in managed:
            if name not in names:
                (out / name).unlink(missing_ok=True)
        fsync_path(out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return names


def write_report(workspace: Path, out: Path | None = None) -> dict[str, Path]:
    """Write the report of ``workspace`` into ``out`` (default ``<workspace>/report``).

    Returns the paths written: ``{"markdown", "html"}`` plus one key per plot (``acc_bwt``,
    ``matrix``, ``per_task``, ``ka_zs``). Safe on a running daemon's workspace (read-only snapshot).
    """
    workspace = Path(workspace)
    out = Path(out) if out is not None else workspace / "report"
    data = collect(workspace, read_ledger(workspace / "ledger.sqlite"))

    def build(stage: Path) -> list[str]:
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
        return plots + list(DOCS)

    plots = [n for n in publish_files(out, build, PLOTS + DOCS) if n.endswith(".png")]
    paths = {"markdown": out / "report.md", "html": out / "report.html"}
    paths.update({name.removesuffix(".png"): out / name for name in plots})
    return paths
