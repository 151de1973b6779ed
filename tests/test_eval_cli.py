"""Evaluation from the command line: `merge` prints a row per step and writes the accuracy matrix;
`eval` re-evaluates a version; `promote` overrides the gate; `report` works on the result."""

from __future__ import annotations

import json

import pytest

from mergewatch.cli import main
from mergewatch.ledger import Ledger
from tests.eval_support import eval_toml, labelled_by_base, write_eval_clip, write_expert
from tests.helpers import load_all


@pytest.fixture
def batch(tmp_path):
    base, clip = write_eval_clip(tmp_path)
    for i, t in enumerate(("t1", "t2")):
        labelled_by_base(tmp_path, base, clip, t, n=12, seed=i)
    state = load_all(base)
    (tmp_path / "experts").mkdir()
    write_expert(state, tmp_path / "experts" / "a-t1.safetensors", seed=1, scale=0.002)
    (tmp_path / "experts" / "a-t1.json").write_text(json.dumps({"task": "t1"}))
    write_expert(state, tmp_path / "experts" / "b-bad.safetensors", seed=2, scale=2.0)
    (tmp_path / "experts" / "b-bad.json").write_text(json.dumps({"task": "t2"}))
    write_expert(state, tmp_path / "experts" / "t2.safetensors", seed=3, scale=0.002)

    def config(policy='init = "ft"\ndeploy = "ft"', extra=""):
        cfg = tmp_path / "mw.toml"
        cfg.write_text(f'workspace = "ws"\nbase = "base.safetensors"\n[policy]\n{policy}\n' + eval_toml(["t1", "t2"], extra=extra))
        return cfg

    return tmp_path, config


def test_merge_prints_rows_and_writes_the_matrix(batch, capsys):
    tmp, config = batch
    cfg = config()
    assert main(["merge", "--config", str(cfg), str(tmp / "experts"), "--quiet"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line[:4].strip().isdigit()]
    assert [int(line.split()[0]) for line in lines] == [0, 1, 2, 3]  # θ0, then one row per step
    assert "a-t1.safetensors" in lines[1] and "1.0000" in lines[1]
    m = json.loads((tmp / "ws" / "accuracy_matrix.json").read_text())
    assert m["tasks"] == ["t1", "t2"] and m["steps"] == [1, 2, 3]
    assert m["values"][1][1] < 0.5  # the destroyed expert (deploy ft: the expert itself)
    assert m["zero_shot"] == {"t1": 1.0, "t2": 1.0}
    per = {p["step"]: p for p in m["per_step"]}
    assert per[1]["acc"] == m["values"][0][0] == 1.0  # t2 is evaluated at step 1 but not counted: not trained yet
    assert per[2]["bwt_denominator"] == 1 and per[3]["acc"] == (m["values"][0][2] + m["values"][1][2]) / 2

    assert "BWT (n)" in out and "(n=1)" in lines[2]  # one notation for BWT's denominator everywhere

    # `eval` again on demand: a new ledger row, EVAL.json replaced; the row names the expert
    assert main(["eval", "--config", str(cfg), "2", "--json"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line[:4].strip() == "2")
    assert row.split()[:3] == ["2", "2", "b-bad.safetensors"]
    led = Ledger(tmp / "ws" / "ledger.sqlite", readonly=True)
    try:
        assert len([r for r in led.evaluations() if (r["view"], r["version"]) == ("deploy", 2)]) == 2
    finally:
        led.close()

    # the report from the same ledger
    assert main(["report", "--config", str(cfg)]) == 0
    md = (tmp / "ws" / "report" / "report.md").read_text()
    assert "matrix.png" in md and "acc_bwt.png" in md


def test_batch_gate_and_promote(batch, capsys):
    tmp, config = batch
    cfg = config(extra="gate_max_drop = 0.1")
    assert main(["merge", "--config", str(cfg), str(tmp / "experts" / "a-t1.safetensors"), str(tmp / "experts" / "b-bad.safetensors"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "HELD BACK" in out
    cur = (tmp / "ws" / "deploy" / "CURRENT").read_text().split()[0]
    assert cur == "1" and (tmp / "ws" / "deploy" / "2").is_dir()
    assert main(["status", "--config", str(cfg)]) == 0
    st = capsys.readouterr().out
    assert "deploy version 2 is held back by the gate" in st and "mergewatch promote 2" in st
    # the operator overrides the gate
    assert main(["promote", "--config", str(cfg), "2"]) == 0
    assert (tmp / "ws" / "deploy" / "CURRENT").read_text().split()[0] == "2"
    led = Ledger(tmp / "ws" / "ledger.sqlite", readonly=True)
    try:
        kinds = [e["kind"] for e in led.events()]
    finally:
        led.close()
    assert "held_back" in kinds and kinds.count("promoted") == 2  # version 1 by the gate, 2 by the operator
    assert main(["promote", "--config", str(cfg), "9"]) == 1  # not published: a clear error
    assert "cannot promote version 9" in capsys.readouterr().err


def _merge_and_matrix(tmp, cfg_text: str, experts: list) -> dict:
    cfg = tmp / "mw.toml"
    cfg.write_text(cfg_text)
    assert main(["merge", "--config", str(cfg), *map(str, experts), "--quiet"]) == 0
    return json.loads((tmp / "ws" / "accuracy_matrix.json").read_text())


def test_batch_text_zeroshot_on_a_bert_base(tmp_path, capsys):
    """text_zeroshot end to end: a tiny random BERT as θ0 (generic role table), texts that are the
    class prompts themselves, so θ0 classifies every one right (cos = 1 with its own class)."""
    from tests.test_evaluators import tiny_bert

    model_dir, base, state = tiny_bert(tmp_path)
    classes = ["alpha", "beta gamma", "red cat", "blue dog runs"]
    (tmp_path / "t.classes.txt").write_text("\n".join(classes) + "\n")
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": c, "label": i}) + "\n" for i, c in enumerate(classes)))
    experts = [write_expert(state, tmp_path / f"t{i}.safetensors", seed=i, scale=0.001) for i in (1, 2)]
    (tmp_path / "t1.json").write_text(json.dumps({"task": "t"}))
    m = _merge_and_matrix(tmp_path, (
        'workspace = "ws"\nbase = "bert.safetensors"\n[policy]\ninit = "ema"\ndeploy = "ema"\n'
        '[eval]\nevaluator = "text_zeroshot"\nmodel = "bert"\n[[eval.tasks]]\nname = "t"\ndata = "t.jsonl"\n'), experts)
    assert m["zero_shot"] == {"t": 1.0} and m["steps"] == [1, 2] and m["tasks"] == ["t"]
    assert m["values"] == [[1.0, 1.0]]  # a small task vector keeps every prompt on its own class
    assert "accuracy matrix" in capsys.readouterr().out


def test_batch_heads_evaluator(tmp_path):
    """heads end to end: a head whose rows are θ0's normalised features of four prototype images, so
    θ0 labels each prototype as its own class (Cauchy–Schwarz) and scores 1.0."""
    import torch

    from mergewatch.checkpoint.writer import write_safetensors_file
    from mergewatch.eval.data import open_dataset
    from mergewatch.eval.evaluators import build_evaluator
    from mergewatch.eval.settings import parse_eval
    from tests.eval_support import write_tensor_task

    base, _ = write_eval_clip(tmp_path)
    write_tensor_task(tmp_path, "h", n=4, seed=5, labels=torch.arange(4))

    write_safetensors_file(tmp_path / "h.head.safetensors", {"weight": torch.zeros(4, 16)})
    es = parse_eval({"evaluator": "heads", "model": "clip.json", "tasks": [{"name": "h", "data": "h.safetensors"}]}, tmp_path, base)
    ev = build_evaluator(es, base, "open_clip_full")
    state = load_all(base)
    ev.model.visual.load_state_dict({k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")})
    xs, _ = next(open_dataset(es.tasks[0]).batches(4, ev.preprocess))
    with torch.inference_mode():
        feats = ev.model.encode_image(xs, normalize=True)
    write_safetensors_file(tmp_path / "h.head.safetensors", {"weight": feats.clone()})
    experts = [write_expert(state, tmp_path / f"e{i}.safetensors", seed=i, scale=0.0005) for i in (1, 2)]
    m = _merge_and_matrix(tmp_path, (
        'workspace = "ws"\nbase = "base.safetensors"\n[policy]\ninit = "ema"\ndeploy = "ema"\n'
        '[eval]\nevaluator = "heads"\nmodel = "clip.json"\n[[eval.tasks]]\nname = "h"\ndata = "h.safetensors"\n'), experts)
    assert m["zero_shot"] == {"h": 1.0} and m["steps"] == [1, 2]
