"""The report of a comparison (``mergewatch compare``, ``mergewatch bench quality``): Markdown + HTML
with PNG plots, built from ``results.json`` alone (``compare.py`` documents its layout).

Plots: ``acc_steps.png`` (ACC_t per step, mean ± std over the orders, θ0 and the experts alone as
reference lines), ``final.png`` (final ACC and BWT per policy with error bars), ``per_task.png``
(final accuracy per task and policy, θ0 and the experts alone as rows) and, when TIME policies are
compared, ``time_grid.png`` (final ACC over the init × deploy grid, one panel per technique).
Published like ``mergewatch report`` (staged, fsynced, moved in, the Markdown last).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from mergewatch.eval.report import publish_files
from mergewatch.eval.report.plots import _figure
from mergewatch.eval.report.render import Strong, to_html, to_markdown
from mergewatch.strategies.time_policy import DEPLOYS, INITS

PLOTS = ("acc_steps.png", "final.png", "per_task.png", "time_grid.png")
DOCS = ("report.html", "report.md")


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _pm(mean: float | None, std: float | None, signed: bool = False) -> str:
    if mean is None:
        return "—"
    m = f"{100 * mean:+.1f}" if signed else f"{100 * mean:.1f}"
    return f"{m} ± {100 * (std or 0.0):.1f}"


def _nan(x: float | None) -> float:
    return math.nan if x is None else 100 * x


def _mean(xs) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.fmean(vals) if vals else None


def reference_rows(res: dict) -> tuple[float | None, float | None]:
    """Mean accuracy of θ0 and of the experts alone over the adaptation tasks."""
    adapt = res["adaptation"]
    return _mean(res["zero_shot"].get(t) for t in adapt), _mean(res["individual"].get(t) for t in adapt)


def time_cell(table: dict) -> tuple[str, str, str] | None:
    """``(technique, init, deploy)`` of a TIME policy table (deploy ft/ema/all; the config's defaults
    for keys left out), else None (a method of its own: OPCM, NuFILT, ...)."""
    from mergewatch.config import PolicySettings
    from mergewatch.strategies.time_policy import DEPLOYS

    d = PolicySettings()
    deploy = str(table.get("deploy", d.deploy))
    if deploy not in DEPLOYS:
        return None
    return str(table.get("technique", d.technique)), str(table.get("init", d.init)), deploy


def time_grid(res: dict) -> dict[str, dict[tuple[str, str], float | None]]:
    """``{technique: {(init, deploy): final ACC mean}}`` of the TIME policies compared."""
    out: dict[str, dict] = {}
    for name, table in res["policies"].items():
        cell = time_cell(table)
        if cell is not None:
            out.setdefault(cell[0], {})[(cell[1], cell[2])] = res["methods"][name]["acc_mean"]
    return out


def plot_acc_steps(res: dict, path: Path) -> None:
    fig = _figure(9, 5)
    ax = fig.subplots()
    zs, ind = reference_rows(res)
    styles = ("o-", "s--", "^-.", "D:")  # the colour cycle has 10 colours: past them, the line style differs
    for i, (name, m) in enumerate(res["methods"].items()):
        ys = [_nan(x) for x in m["acc_steps_mean"]]
        sd = [100 * (s or 0.0) for s in m["acc_steps_std"]]
        xs = list(range(1, len(ys) + 1))
        (line,) = ax.plot(xs, ys, styles[(i // 10) % len(styles)], ms=3, label=name)
        ax.fill_between(xs, [y - s for y, s in zip(ys, sd)], [y + s for y, s in zip(ys, sd)], color=line.get_color(), alpha=0.12)
    if zs is not None:
        ax.axhline(100 * zs, color="grey", ls="--", lw=1, label="θ0 (zero-shot)")
    if ind is not None:
        ax.axhline(100 * ind, color="black", ls=":", lw=1, label="experts alone")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("merge step t")
    ax.set_ylabel("ACC_t (%)")
    gaps = "" if res["scope"] != "final" else "; scope 'final': only the last step has every task"
    ax.set_title(f"ACC_t over the stream (mean ± std over {len(res['orders'])} order(s)){gaps}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    fig.savefig(path)


def plot_final(res: dict, path: Path) -> None:
    names = list(res["methods"])
    ms = [res["methods"][n] for n in names]
    fig = _figure(max(7.0, 1.2 + 0.55 * len(names)) * 2, 4.8)
    left, right = fig.subplots(1, 2)
    xs = range(len(names))
    left.bar(xs, [_nan(m["acc_mean"]) for m in ms], yerr=[100 * (m["acc_std"] or 0) for m in ms], capsize=3, color="tab:blue")
    zs, ind = reference_rows(res)
    if zs is not None:
        left.axhline(100 * zs, color="grey", ls="--", lw=1, label="θ0")
    if ind is not None:
        left.axhline(100 * ind, color="black", ls=":", lw=1, label="experts alone")
    left.set_ylabel("final ACC (%)")
    left.set_title("final ACC (mean ± std over orders)", fontsize=10)
    left.legend(fontsize=8)
    right.axhline(0, color="grey", lw=0.8)
    right.bar(xs, [_nan(m["bwt_mean"]) for m in ms], yerr=[100 * (m["bwt_std"] or 0) for m in ms], capsize=3, color="tab:red")
    right.set_ylabel("final BWT (points)")
    right.set_title("final BWT (mean ± std over orders)", fontsize=10)
    for ax in (left, right):
        ax.set_xticks(list(xs), names, rotation=40, ha="right", fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    fig.savefig(path)


def _heatmap(ax, fig, values, rows, cols, title):
    import numpy as np
    from matplotlib import colormaps

    a = np.array([[math.nan if v is None else 100 * v for v in r] for r in values], dtype=float).reshape(len(rows), len(cols))
    cmap = colormaps["viridis"].with_extremes(bad="#d9d9d9")
    finite = a[np.isfinite(a)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 100.0)
    if hi - lo < 1.0:  # all (nearly) equal: a one-point colour range would be singular
        lo, hi = lo - 0.5, hi + 0.5
    im = ax.imshow(np.ma.masked_invalid(a), cmap=cmap, vmin=lo, vmax=hi, aspect="auto")
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    fs = max(5.0, min(9.0, 110.0 / max(len(rows), len(cols), 1)))
    mid = (lo + hi) / 2
    for i in range(len(rows)):
        for j in range(len(cols)):
            v = a[i, j]
            ax.text(j, i, "—" if math.isnan(v) else f"{v:.1f}", ha="center", va="center", fontsize=fs,
                    color="black" if math.isnan(v) or v > mid else "white")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=fs)
    ax.set_yticks(range(len(rows)), rows, fontsize=fs)
    ax.set_title(title, fontsize=10)


def plot_per_task(res: dict, path: Path) -> None:
    tasks = res["tasks"]
    rows = ["θ0 (zero-shot)", "experts alone"] + list(res["methods"])
    values = [[res["zero_shot"].get(t) for t in tasks], [res["individual"].get(t) for t in tasks]]
    values += [[m["final_mean"].get(t) for t in tasks] for m in res["methods"].values()]
    fig = _figure(min(30.0, 3.5 + 0.9 * len(tasks)), min(30.0, 1.8 + 0.4 * len(rows)))
    _heatmap(fig.subplots(), fig, values, rows, tasks, "final accuracy per task (%), mean over orders")
    fig.savefig(path)


def plot_time_grid(res: dict, path: Path) -> None:
    grids = time_grid(res)
    fig = _figure(5.0 * len(grids), 4.2)
    axes = fig.subplots(1, len(grids), squeeze=False)[0]
    for ax, (tech, cells) in zip(axes, sorted(grids.items())):
        inits = [x for x in INITS if any(i == x for i, _ in cells)]
        deploys = [x for x in DEPLOYS if any(d == x for _, d in cells)]
        _heatmap(ax, fig, [[cells.get((i, d)) for d in deploys] for i in inits], inits, deploys, f"TIME {tech}: final ACC (%)")
        ax.set_xlabel("deploy")
        ax.set_ylabel("init")
    fig.savefig(path)


def summary_table(res: dict) -> tuple:
    """The main table: θ0, the experts alone and every policy's final ACC / BWT (+ A_KA, A_ZS, GM)."""
    held = bool(res["held_out"])
    header = ["policy", "ACC", "BWT"] + (["A_KA", "A_ZS", "GM"] if held else [])
    zs, ind = reference_rows(res)
    zs_held = _mean(res["zero_shot"].get(t) for t in res["held_out"])
    zs_gm = math.sqrt(zs * zs_held) if zs is not None and zs_held is not None else None
    rows = [["θ0 (zero-shot)", _pct(zs), "—"] + ([_pct(zs), _pct(zs_held), _pct(zs_gm)] if held else []),
            ["experts alone (each on its own task)", _pct(ind), "—"] + (["—"] * 3 if held else [])]
    best = max((m["acc_mean"] for m in res["methods"].values() if m["acc_mean"] is not None), default=None)
    for name, m in res["methods"].items():
        cell = _pm(m["acc_mean"], m["acc_std"])
        row = [name, Strong(cell) if m["acc_mean"] == best else cell, _pm(m["bwt_mean"], m["bwt_std"], signed=True)]
        if held:
            row += [_pm(m.get("a_ka_mean"), m.get("a_ka_std")), _pm(m.get("a_zs_mean"), m.get("a_zs_std")), _pm(m.get("gm_mean"), m.get("gm_std"))]
        rows.append(row)
    return ("table", header, rows)


def summary_markdown(res: dict) -> str:
    """The main table as Markdown (what ``compare`` prints at the end)."""
    return to_markdown([summary_table(res)])


def title(res: dict) -> str:
    return "mergewatch compare" if res["suite"] == "compare" else f"mergewatch bench quality: {res['suite']} suite"


def build_document(res: dict, plots: list[str]) -> list[tuple]:
    n_orders = len(res["orders"])
    doc: list[tuple] = [("h1", title(res))]
    doc.append(("p", f"{len(res['experts'])} experts, {len(res['methods'])} policies, {n_orders} order(s) "
                     f"(seed {res['seed']}; the first order is {'a shuffle' if res['suite'] != 'compare' else 'the stream as given'}), "
                     f"tasks scored: {', '.join(res['tasks'])} (scope '{res['scope']}'). Accuracy in %, mean ± std over the orders; "
                     "ACC and BWT after the last step (SPEC §5)."))
    doc.append(summary_table(res))
    for p in plots:
        doc.append(("img", p, {"acc_steps.png": "ACC per step", "final.png": "final ACC and BWT", "per_task.png": "final accuracy per task",
                               "time_grid.png": "TIME init × deploy grid"}[p]))
    tasks = res["tasks"]
    doc.append(("h2", "Final accuracy per task"))
    trows = [["θ0 (zero-shot)"] + [_pct(res["zero_shot"].get(t)) for t in tasks],
             ["experts alone"] + [_pct(res["individual"].get(t)) for t in tasks]]
    trows += [[name] + [_pct(m["final_mean"].get(t)) for t in tasks] for name, m in res["methods"].items()]
    doc.append(("table", ["policy"] + tasks, trows))
    doc.append(("h2", "Per order"))
    orows = []
    for name, m in res["methods"].items():
        for k, o in enumerate(m["per_order"], 1):
            orows.append([name, str(k), " → ".join(o["order"]), _pct(o["acc"]), "—" if o["bwt"] is None else f"{100 * o['bwt']:+.1f}",
                          f"{o['seconds']['merge']:.0f} / {o['seconds']['eval']:.0f}"])
    doc.append(("table", ["policy", "order", "experts in order", "ACC", "BWT", "merge / eval s"], orows))
    doc.append(("h2", "Policies"))
    doc.append(("ul", [f"{name}: {table}" for name, table in res["policies"].items()]))
    doc.append(("p", "Every accuracy matrix is in results.json (per policy and order: matrix[j][i] is task i after step j + 1)."))
    return doc


def write_compare_report(res: dict, out: Path) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and the plots into ``out``; returns their paths."""
    out = Path(out)

    def build(stage: Path) -> list[str]:
        plots = []
        if res["methods"]:
            plot_acc_steps(res, stage / "acc_steps.png")
            plot_final(res, stage / "final.png")
            plots += ["acc_steps.png", "final.png"]
        plot_per_task(res, stage / "per_task.png")
        plots.append("per_task.png")
        if time_grid(res):
            plot_time_grid(res, stage / "time_grid.png")
            plots.append("time_grid.png")
        doc = build_document(res, plots)
        (stage / "report.md").write_text(to_markdown(doc), "utf-8")
        (stage / "report.html").write_text(to_html(doc, title(res)), "utf-8")
        return plots + list(DOCS)

    names = publish_files(out, build, PLOTS + DOCS)
    return {n.rsplit(".", 1)[0] if n.endswith(".png") else ("markdown" if n.endswith(".md") else "html"): out / n for n in names}
