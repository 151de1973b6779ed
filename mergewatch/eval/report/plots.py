"""The report's plots (PNG, matplotlib's Agg canvas: no display, no pyplot state)."""

from __future__ import annotations

import math
from pathlib import Path

from mergewatch.eval.report.data import ReportData, step_label


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg: no display, no pyplot state
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _nan(x: float | None) -> float:
    return math.nan if x is None else x


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
    ax.set_xticks(range(cols), [step_label(s) for s in m.steps], fontsize=fontsize)
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
    ax.set_xticks(xs, [step_label(s) for s in xs]) if len(xs) <= 30 else ax.xaxis.set_major_locator(MaxNLocator(integer=True))
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
        ax.annotate(step_label(s), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("A_ZS: held-out tasks (%)")
    ax.set_ylabel("A_KA: adaptation tasks (%)")
    ax.set_title("knowledge accumulation vs zero-shot retention")
    ax.grid(alpha=0.3)
    fig.savefig(path)
    return fig
