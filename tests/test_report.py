"""``mergewatch report`` from a real SQLite ledger built through the Ledger API (issue 9, part 7)."""

from __future__ import annotations

import math
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from mergewatch.ledger import Ledger
from mergewatch.eval import report
from mergewatch.eval.report import ReportError, write_report

# a[task][step]; step 0 is θ0. D is trained at step 4, whose evaluation failed; its step-2 cell is
# missing. H is held out.
ACC = {
    "A": [0.50, 0.90, 0.80, 0.70],
    "B": [0.40, 0.45, 0.85, 0.75],
    "C": [0.30, 0.35, 0.40, 0.90],
    "D": [0.20, 0.22, None, 0.20],
    "H": [0.60, 0.58, 0.55, 0.50],
}


def ok_row(step: int, acc: dict = ACC, held_out=("H",)) -> dict:
    tasks = {t: {"accuracy": v[step], "n": 50, "seconds": 0.5} for t, v in acc.items() if v[step] is not None}
    return {"status": "ok", "evaluator": "clip_zeroshot", "tasks": tasks, "task_order": ["A", "B", "C"][:step], "held_out": list(held_out)}


def merge_step(led: Ledger, step: int, name: str, meta: dict | None = None) -> None:
    seq = led.add_drop(name, name, f"fp-{name}", meta)
    led.set_status(seq, "merging", id=f"sha-{step}")
    led.step_started(step, f"sha-{step}", seq)
    led.step_done(step, merge_seconds=0.1, versions={"deploy": step, "init": step}, contents={"deploy": f"c{step}", "init": f"c{step}"})
    led.set_status(seq, "merged", step=step)


def finished_ledger(ws: Path, acc: dict = ACC, held_out=("H",)) -> Ledger:
    ws.mkdir(parents=True, exist_ok=True)
    led = Ledger(ws / "ledger.sqlite")
    led.add_evaluation("base", 0, 0, ok_row(0, acc, held_out))
    merge_step(led, 1, "A.safetensors")  # task from the name's stem
    led.add_evaluation("deploy", 1, 1, {"status": "failed", "error": "EvalError: transient"})
    led.add_evaluation("deploy", 1, 1, ok_row(1, acc, held_out))  # the retry wins
    merge_step(led, 2, "expert-2.safetensors", {"task": "B"})  # task from the sidecar
    led.add_evaluation("deploy", 2, 2, ok_row(2, acc, held_out))
    merge_step(led, 3, "c-run", {"task": "C"})
    led.add_evaluation("deploy", 3, 3, ok_row(3, acc, held_out))
    merge_step(led, 4, "D.safetensors")
    led.add_evaluation("deploy", 4, 4, {"status": "failed", "error": "EvalError: task D: corrupt image d/17.png"})
    seq = led.add_drop("junk.bin", "junk.bin", "fp-junk")
    led.set_status(seq, "rejected", reason="not a .safetensors file")
    return led


@pytest.fixture
def finished(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    finished_ledger(ws).close()
    return ws


class Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs: list[str] = []
        self.tables = 0

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs)["src"])
        self.tables += tag == "table"


def md_row(*cells) -> str:
    return "| " + " | ".join(cells) + " |"


def test_report_of_a_finished_workspace(finished: Path):
    paths = write_report(finished)
    out = finished / "report"
    assert paths["markdown"] == out / "report.md" and paths["html"] == out / "report.html"
    plots = ["acc_bwt.png", "matrix.png", "per_task.png", "ka_zs.png"]
    assert sorted(p.name for p in paths.values()) == sorted(plots + ["report.md", "report.html"])
    for name in plots:
        with Image.open(out / name) as im:
            im.verify()
        with Image.open(out / name) as im:
            im.load()
            assert im.format == "PNG" and im.width >= 400 and im.height >= 250
            assert len(im.convert("L").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 20  # something was drawn, not a blank canvas
        assert (out / name).stat().st_size > 10_000
    md = (out / "report.md").read_text("utf-8")
    for name in plots:
        assert f"]({name})" in md
    # per-step metrics computed by hand (ACC/BWT/FWT/A_KA/A_ZS/GM in %, BWT with its denominator)
    assert md_row("1", "1", "A.safetensors", "A", "90.00", "—", "0", "—", "48.00", "58.00", f"{math.sqrt(.48 * .58) * 100:.2f}", "") in md
    assert md_row("2", "2", "expert-2.safetensors", "B", "82.50", "-10.00", "1", "+5.00", "68.33", "55.00", f"{math.sqrt(2.05 / 3 * .55) * 100:.2f}", "") in md
    assert md_row("3", "3", "c-run", "C", "78.33", "-15.00", "2", "+7.50", "63.75", "50.00", "56.46", "") in md
    assert md_row("4", "4", "D.safetensors", "D", *["—"] * 7, "evaluation failed") in md
    assert "ACC 78.33, BWT -15.00 (n=2)" in md
    # the matrix: own-step cells bold, the missing cell a dash, the failed step 4 not a column
    assert md_row("task", "own step", "θ0", "1", "2", "3") in md
    assert md_row("A", "1", "50.00", "**90.00**", "80.00", "70.00") in md
    assert md_row("D", "4", "20.00", "22.00", "—", "20.00") in md
    # failures are listed (not plotted); the superseded one is only counted
    assert "corrupt image d/17.png" in md and "transient" not in md
    assert "1 failed attempts superseded by a retry" in md
    assert "not a .safetensors file" in md  # the rejected drop is in the expert list
    html_text = (out / "report.html").read_text("utf-8")
    tags = Tags()
    tags.feed(html_text)
    assert sorted(tags.imgs) == sorted(plots)
    assert tags.tables >= 4  # per-step, matrix, held-out, failed, experts
    assert "<td><b>90.00</b></td>" in html_text and "<td>-15.00</td>" in html_text
    assert not list(finished.glob(".report.staging-*"))


def test_report_twice_replaces_and_drops_a_stale_plot(tmp_path: Path, finished: Path):
    out = tmp_path / "shared-out"
    assert "ka_zs" in write_report(finished, out)
    no_held = tmp_path / "ws2"
    acc = {t: v for t, v in ACC.items() if t != "H"}
    finished_ledger(no_held, acc, held_out=()).close()
    paths = write_report(no_held, out)
    assert "ka_zs" not in paths and not (out / "ka_zs.png").exists()
    md = (out / "report.md").read_text("utf-8")
    assert "ka_zs" not in md and "A_ZS" not in md.split("## Summary")[1].split("##")[0]
    assert sorted(p.name for p in out.iterdir()) == ["acc_bwt.png", "matrix.png", "per_task.png", "report.html", "report.md"]


def test_no_evaluations_yet(tmp_path: Path):
    ws = tmp_path / "ws"
    ws.mkdir()
    led = Ledger(ws / "ledger.sqlite")
    merge_step(led, 1, "A.safetensors")
    led.close()
    paths = write_report(ws)
    assert set(paths) == {"markdown", "html"}
    md = paths["markdown"].read_text("utf-8")
    assert "No evaluations yet" in md and "![" not in md
    assert md_row("1", "1", "A.safetensors", "—", *["—"] * 7, "not evaluated") in md
    assert "<img" not in paths["html"].read_text("utf-8")
    assert not list((ws / "report").glob("*.png"))


def test_report_while_a_writer_holds_the_ledger(finished: Path):
    writer = Ledger(finished / "ledger.sqlite")  # the daemon's connection, WAL mode
    try:
        with writer.tx():  # an open write transaction: its row must not show, and the reader must not block
            writer.add_evaluation("deploy", 4, 4, ok_row(3))
            md = write_report(finished)["markdown"].read_text("utf-8")
            assert md_row("4", "4", "D.safetensors", "D", *["—"] * 7, "evaluation failed") in md
        md = write_report(finished)["markdown"].read_text("utf-8")
        # committed now: step 4 repeats step 3's accuracies and D (trained at 4) joins ACC:
        # ACC (.7+.75+.9+.2)/4; BWT (-.2-.1+0)/3; FWT over B, C, D ((.45-.4)+(.4-.3)+(.2-.2))/3
        assert md_row("4", "4", "D.safetensors", "D", "63.75", "-10.00", "3", "+5.00", "63.75", "50.00", "56.46", "") in md
        assert "corrupt image" not in md  # the latest row for deploy v4 is ok now
    finally:
        writer.close()


def test_a_failed_write_leaves_the_previous_report(finished: Path, monkeypatch):
    write_report(finished)
    out = finished / "report"
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*_a, **_k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(report, "plot_per_task", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_report(finished)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not list(finished.glob(".report.staging-*"))


def test_unreadable_rows_rollbacks_and_odd_expert_tasks(tmp_path: Path):
    ws = tmp_path / "ws"
    ws.mkdir()
    led = Ledger(ws / "ledger.sqlite")
    acc = {"A": [0.5, 0.9, 0.8], "B": [0.4, 0.5, 0.9], "H": [0.6, 0.6, 0.6]}
    merge_step(led, 1, "A.safetensors")
    led.add_evaluation("deploy", 1, 1, ok_row(1, acc))
    merge_step(led, 2, "b.safetensors", {"task": "B"})
    led.add_evaluation("deploy", 2, 2, {**ok_row(2, acc), "tasks": {"A": {"accuracy": 1.5}}})
    led.add_evaluation("deploy", 5, 2, ok_row(2, acc))  # step 2 republished (rollback) and evaluated again
    merge_step(led, 3, "h.safetensors", {"task": "H"})  # a held-out task must never train an expert
    merge_step(led, 4, "m.safetensors", {"task": "mnist"})
    led.add_evaluation("init", 1, 1, ok_row(1, acc))
    led.close()
    md = write_report(ws)["markdown"].read_text("utf-8")
    failed = md.split("## Failed evaluations")[1].split("##")[0]
    assert "unreadable metrics" in failed and "'A'" in failed and "[0, 1]" in failed
    assert md_row("2", "5", "b.safetensors", "B", "85.00", "-10.00", "1", "—", "85.00", "60.00", f"{math.sqrt(.85 * .6) * 100:.2f}", "") in md
    assert "names held-out task 'H'" in md and "names task 'mnist', which no evaluation covers" in md
    assert "other views (init) are not plotted" in md
    assert md_row("H", "3") not in md  # not a matrix row
    assert "FWT —" in md  # no θ0 evaluation: no zero-shot baseline


def test_gate_hold_back_is_shown(tmp_path: Path):
    ws = tmp_path / "ws"
    ws.mkdir()
    led = Ledger(ws / "ledger.sqlite")
    merge_step(led, 1, "A.safetensors")
    led.add_evaluation("deploy", 1, 1, {**ok_row(1, {"A": [0.5, 0.9]}, ()), "held_back": True, "gate_reason": "ACC fell by 0.2 > 0.1"})
    led.close()
    md = write_report(ws)["markdown"].read_text("utf-8")
    assert "held back by the gate: ACC fell by 0.2 > 0.1" in md
    assert "ka_zs" not in md


def test_missing_ledger_is_a_clear_error(tmp_path: Path):
    with pytest.raises(ReportError, match=re.escape(str(tmp_path / "ledger.sqlite"))):
        write_report(tmp_path)


def test_ledger_evaluation_rows(tmp_path: Path):
    led = Ledger(tmp_path / "ledger.sqlite")
    try:
        i1 = led.add_evaluation("base", 0, 0, ok_row(0))
        i2 = led.add_evaluation("deploy", 1, 1, {"status": "failed", "error": "boom"})
        assert i2 > i1
        rows = led.evaluations()
        assert [r["id"] for r in rows] == [i1, i2]
        assert rows[0]["metrics"]["tasks"]["A"] == {"accuracy": 0.5, "n": 50, "seconds": 0.5}
        assert {k for k in rows[1]} == {"id", "view", "version", "step", "metrics", "created_at"}
        assert [r["id"] for r in led.evaluations("deploy")] == [i2]
        events = [dict(r) for r in led.db.execute("SELECT kind, step, version, data FROM events WHERE kind='evaluated' ORDER BY id")]
        assert [(e["step"], e["version"]) for e in events] == [(0, 0), (1, 1)]
        assert '"status": "failed"' in events[1]["data"] and f'"evaluation": {i2}' in events[1]["data"]
    finally:
        led.close()
    ro = Ledger(tmp_path / "ledger.sqlite", readonly=True)
    try:
        assert [r["view"] for r in ro.evaluations()] == ["base", "deploy"]
    finally:
        ro.close()


def test_only_the_base_evaluated(tmp_path: Path):
    ws = tmp_path / "ws"
    ws.mkdir()
    led = Ledger(ws / "ledger.sqlite")
    led.add_evaluation("base", 0, 0, ok_row(0))
    led.close()
    paths = write_report(ws)
    assert {"acc_bwt", "matrix", "per_task", "ka_zs"} <= set(paths)
    md = paths["markdown"].read_text("utf-8")
    assert "Latest evaluated step: θ0, the base model. ACC —, BWT — (n=0)" in md
    assert md_row("θ0", "base", "—", "—", "—", "—", "0", "—", "35.00", "60.00", f"{math.sqrt(.35 * .6) * 100:.2f}", "base model") in md
    assert md_row("A", "not trained", "50.00") in md


def test_a_corrupt_ledger_is_a_clear_error(tmp_path: Path):
    (tmp_path / "ledger.sqlite").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ReportError, match="cannot read the ledger"):
        write_report(tmp_path)
    assert not (tmp_path / "report").exists()


def test_ka_zs_colours_a_long_stream_by_step(tmp_path: Path):
    """30 steps: the points are coloured by step with a colour bar, and only the first and the last
    point carry a label (a label per point piled into a blob)."""
    steps = 30
    acc = {"A": [0.5 + 0.01 * i for i in range(steps + 1)], "H": [0.6 - 0.005 * i for i in range(steps + 1)]}
    ws = tmp_path / "ws"
    ws.mkdir()
    led = Ledger(ws / "ledger.sqlite")
    led.add_evaluation("base", 0, 0, ok_row(0, acc))
    for s in range(1, steps + 1):
        merge_step(led, s, f"A{s}.safetensors", {"task": "A"})
        row = ok_row(s, acc)
        row["task_order"] = ["A"]
        led.add_evaluation("deploy", s, s, row)
    led.close()
    data = report.collect(ws, report.read_ledger(ws / "ledger.sqlite"))
    fig = report.plot_ka_zs(data, tmp_path / "ka_zs.png")
    ax, bar = fig.axes
    assert bar.get_ylabel() == "step (0 = θ0)"
    colours = ax.collections[-1].get_array()
    assert list(colours) == list(range(steps + 1))
    assert [t.get_text() for t in ax.texts if not t.get_text().startswith("GM")] == [report._step_label(0), report._step_label(steps)]
