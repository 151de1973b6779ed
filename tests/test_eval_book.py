"""The evaluation record: expert ↔ task links, summaries recorded in the ledger, EVAL.json, the gate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mergewatch.ledger import Ledger
from mergewatch.deploy.publisher import Publisher
from mergewatch.eval import runner
from mergewatch.eval.book import EvalBook, EvalJob
from mergewatch.eval.settings import EvalSettings, TaskSettings


def _task(name: str, held_out: bool = False) -> TaskSettings:
    return TaskSettings(name=name, data=Path(f"/nonexistent/{name}.jsonl"), format="jsonl", classes=None, templates=("{}",), held_out=held_out)


class _S:  # the parts of Settings the book reads
    def __init__(self, gate=None, retries=2):
        self.base = Path("/nonexistent/base.safetensors")
        self.eval = EvalSettings(evaluator="plugin", plugin="x:y", tasks=(_task("a"), _task("b"), _task("c"), _task("z", True)),
                                 gate_max_drop=gate, retries=retries)


def _result(**accs) -> dict:
    return {"evaluator": "plugin", "tasks": {k: {"accuracy": v, "n": 10, "seconds": 0.0} for k, v in accs.items()}, "seconds": 0.0}


def test_task_links():
    s = _S().eval
    # sidecar task, else the stem; held-out and unknown tasks are not adaptation tasks; repeats keep
    # their first step; an expert without a task still takes its step
    experts = [(1, "b.safetensors", {}), (2, "x.safetensors", {}), (3, "e2", {"task": "a"}), (4, "b2", {"task": "b"}),
               (5, "z.safetensors", {}), (6, "q", {"task": "unknown"})]
    assert runner.trained_at(experts, s) == {"b": 1, "a": 3}
    assert list(runner.trained_at(experts, s)) == ["b", "a"]


def test_gate_decision_compares_on_the_same_tasks():
    cur = {"a": {"accuracy": 0.9}, "b": {"accuracy": 0.1}}
    ok, why = runner.gate_decision({"a": {"accuracy": 0.85}, "b": {"accuracy": 0.8}}, ["a"], cur, 0.1)
    assert ok and "drop 0.05" in why
    ok, why = runner.gate_decision({"a": {"accuracy": 0.7}, "b": {"accuracy": 1.0}}, ["a"], cur, 0.1)
    assert not ok and "0.2000 below" in why
    assert runner.gate_decision({"a": {"accuracy": 0.0}}, ["a"], None, 0.0)[0]


@pytest.fixture
def book_env(tmp_path):
    def make(gate=None, retries=2):
        led = Ledger(tmp_path / "ledger.sqlite")
        pubs = {v: Publisher(tmp_path / v) for v in ("deploy", "init")}
        return led, pubs, EvalBook(_S(gate, retries), led, pubs)

    return make


def _publish_step(led, pubs, tmp_path, step: int, task: str, *, current: bool = True) -> int:
    f = tmp_path / f"m{step}.bin"
    f.write_bytes(bytes([step]) * 16)
    v = pubs["deploy"].publish({"model.safetensors": f}, {"step": step}, key=f"step-{step}", make_current=current)
    seq = led.add_drop(f"{task}.safetensors", f"{task}.safetensors", f"fp{step}", {"task": task})
    led.set_status(seq, "merging", id=f"id{step}")
    led.step_started(step, f"id{step}", seq)
    led.step_done(step, merge_seconds=0.1, versions={"deploy": v}, contents={})
    led.set_status(seq, "merged", step=step)
    return v


def test_record_summaries_eval_json_and_matrix(book_env, tmp_path):
    led, pubs, book = book_env()
    assert [j.key for j in book.pending()] == [("base", 0)]
    book.record(book.pending()[0], True, _result(a=0.5, b=0.4, c=0.3, z=0.6))
    v1 = _publish_step(led, pubs, tmp_path, 1, "a")
    v2 = _publish_step(led, pubs, tmp_path, 2, "b")
    assert [j.key for j in book.pending()] == [("deploy", v1), ("deploy", v2)]
    r1 = book.record(book.pending()[0], True, _result(a=0.9, b=0.5, c=0.3, z=0.5))
    assert r1["acc"] == pytest.approx(0.9) and r1["bwt"] is None and r1["task_order"] == ["a"]
    r2 = book.record(book.pending()[0], True, _result(a=0.7, b=0.8, c=0.3, z=0.4))
    # ACC_2 = (0.7 + 0.8)/2; BWT_2 = (0.7 - 0.9)/1; A_KA over all adaptation tasks a, b, c; A_ZS over z
    assert r2["acc"] == pytest.approx(0.75)
    assert r2["bwt"] == pytest.approx(-0.2) and r2["bwt_denominator"] == 1
    assert r2["a_ka"] == pytest.approx((0.7 + 0.8 + 0.3) / 3)
    assert r2["a_zs"] == pytest.approx(0.4)
    assert r2["fwt"] is not None  # θ0 was evaluated
    doc = json.loads((pubs["deploy"].path(v2) / "EVAL.json").read_text())
    assert doc["version"] == v2 and doc["step"] == 2 and doc["acc"] == pytest.approx(0.75)
    assert book.pending() == []
    m = book.matrix_document()
    assert m["tasks"] == ["a", "b"] and m["steps"] == [1, 2]
    assert m["values"][0] == pytest.approx([0.9, 0.7]) and m["values"][1][1] == pytest.approx(0.8)
    st = book.status()
    assert st[str(v2)]["tasks"]["b"] == pytest.approx(0.8) and st["base"]["step"] == 0


def test_failed_evaluations_are_retried_up_to_the_limit(book_env, tmp_path):
    led, pubs, book = book_env(retries=2)
    book.record(book.pending()[0], True, _result(a=0.5, b=0.5, c=0.5, z=0.5))
    v1 = _publish_step(led, pubs, tmp_path, 1, "a")
    job = EvalJob("deploy", v1, 1, str(pubs["deploy"].path(v1)))
    for attempt in (1, 2, 3):
        assert book.pending() == [job]
        row = book.record(job, False, "EvalError: boom")
        assert row["status"] == "failed" and row["attempt"] == attempt
    assert book.pending() == []  # 1 try + 2 retries used up
    assert not (pubs["deploy"].path(v1) / "EVAL.json").exists()


def test_gate_holds_back_and_promotes(book_env, tmp_path):
    led, pubs, book = book_env(gate=0.1)
    book.record(book.pending()[0], True, _result(a=0.5, b=0.5, c=0.5, z=0.5))
    v1 = _publish_step(led, pubs, tmp_path, 1, "a", current=False)
    assert pubs["deploy"].current() is None and book.waiting() == [v1]
    job1 = book.pending()[0]
    r1 = book.record(job1, True, _result(a=0.9, b=0.5, c=0.5, z=0.5))
    assert not r1["held_back"] and book.apply_gate(job1, r1) and pubs["deploy"].current() == v1
    v2 = _publish_step(led, pubs, tmp_path, 2, "b", current=False)
    job2 = book.pending()[0]
    r2 = book.record(job2, True, _result(a=0.2, b=0.3, c=0.5, z=0.5))  # destroyed: way below v1 on a, b
    assert r2["held_back"] and "below the current version" in r2["gate_reason"]
    assert not book.apply_gate(job2, r2) and pubs["deploy"].current() == v1
    assert book.held_back() == [{"version": v2, "step": 2, "reason": r2["gate_reason"]}]
    v3 = _publish_step(led, pubs, tmp_path, 3, "c", current=False)
    job3 = book.pending()[0]
    r3 = book.record(job3, True, _result(a=0.85, b=0.8, c=0.9, z=0.5))
    assert not r3["held_back"] and book.apply_gate(job3, r3) and pubs["deploy"].current() == v3
    assert book.held_back() == []  # v2 is older than current now


def test_gate_compares_a_rollback_through_its_source(book_env, tmp_path):
    led, pubs, book = book_env(gate=0.05)
    book.record(book.pending()[0], True, _result(a=0.5, b=0.5, c=0.5, z=0.5))
    v1 = _publish_step(led, pubs, tmp_path, 1, "a", current=False)
    j = book.pending()[0]
    book.apply_gate(j, book.record(j, True, _result(a=0.9, b=0.5, c=0.5, z=0.5)))
    rb = pubs["deploy"].rollback(v1, reason="test")
    assert book.tasks_of_version(rb)["a"]["accuracy"] == pytest.approx(0.9)
