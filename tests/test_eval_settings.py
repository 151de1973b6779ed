"""The [eval] table: defaults, strict keys and types, evaluator options, task checks, paths."""

from __future__ import annotations

import json
import pickle
import tomllib
from pathlib import Path

import pytest
import torch

from mergewatch.checkpoint.writer import write_safetensors_file
from mergewatch.demo import TINY_CLIP, tiny_clip_state
from mergewatch.errors import ConfigError
from mergewatch.eval.settings import IMAGE_TEMPLATES, EvalSettings, TaskSettings, parse_eval


def tensors_task(root: Path, name: str = "cars", n_classes: int = 3) -> str:
    imgs = torch.zeros((2, 3, 32, 32), dtype=torch.uint8)
    write_safetensors_file(root / f"{name}.safetensors", {"images": imgs, "labels": torch.tensor([0, n_classes - 1])})
    (root / f"{name}.classes.txt").write_text("\n".join(f"class {i}" for i in range(n_classes)))
    return f"{name}.safetensors"


def tiny_json(root: Path, vocab: int = 49408) -> str:
    cfg = json.loads(json.dumps(TINY_CLIP))
    cfg["text_cfg"]["vocab_size"] = vocab
    (root / "tiny.json").write_text(json.dumps(cfg))
    return "tiny.json"


def parse_toml(text: str, root: Path, base: Path | None = None):
    return parse_eval(tomllib.loads(text).get("eval"), root, base)


def test_no_table_or_no_tasks_is_none(tmp_path):
    assert parse_eval(None, tmp_path, None) is None
    assert parse_toml("[eval]\nbatch_size = 8\n", tmp_path) is None
    # keys of a table without tasks are still checked
    with pytest.raises(ConfigError) as ei:
        parse_toml("[eval]\nbatch_sise = 8\n", tmp_path)
    assert ei.value.key == "eval.batch_sise" and "batch_size" in str(ei.value)


def test_defaults_and_paths_relative_to_the_config_dir(tmp_path):
    data = tensors_task(tmp_path)
    model = tiny_json(tmp_path)
    s = parse_toml(f'[eval]\nmodel = "{model}"\n[[eval.tasks]]\nname = "cars"\ndata = "{data}"\n', tmp_path)
    assert isinstance(s, EvalSettings)
    assert (s.evaluator, s.batch_size, s.threads, s.retries, s.retry_seconds, s.gate_max_drop, s.logit_scale) == (
        "clip_zeroshot", 64, 1, 3, 30.0, None, 100.0)
    assert s.model == str(tmp_path / "tiny.json") and s.text_checkpoint is None
    t = s.tasks[0]
    assert t == TaskSettings("cars", tmp_path / data, "tensors", tmp_path / "cars.classes.txt", IMAGE_TEMPLATES, False, None)
    assert pickle.loads(pickle.dumps(s)) == s  # sent to the evaluation worker process
    assert hash(s) == hash(pickle.loads(pickle.dumps(s)))  # and used as a cache key there
    assert s.adaptation == ["cars"] and s.held_out == []


def test_full_table(tmp_path):
    data = tensors_task(tmp_path)
    other = tensors_task(tmp_path, "flowers", 2)
    text = f"""
[eval]
evaluator = "clip_zeroshot"
model = "ViT-B-32"
batch_size = 16
threads = 2
gate_max_drop = 0.05
retries = 0
retry_seconds = 1.5

[[eval.tasks]]
name = "cars"
data = "{data}"
format = "tensors"
templates = ["a photo of a {{}}.", "a {{}} car."]

[[eval.tasks]]
name = "flowers"
data = "{other}"
held_out = true
"""
    s = parse_toml(text, tmp_path)
    assert (s.model, s.batch_size, s.threads, s.gate_max_drop, s.retries, s.retry_seconds) == ("ViT-B-32", 16, 2, 0.05, 0, 1.5)
    assert s.tasks[0].templates == ("a photo of a {}.", "a {} car.")
    assert s.held_out == ["flowers"] and s.adaptation == ["cars"]
    assert s.task("flowers").held_out


@pytest.mark.parametrize(
    "line,key,words",
    [
        ("evaluator = 'knn'", "eval.evaluator", ["clip_zeroshot", "plugin"]),
        ("batch_size = 0", "eval.batch_size", [">= 1"]),
        ("batch_size = 2.5", "eval.batch_size", ["integer"]),
        ("threads = 0", "eval.threads", [">= 1"]),
        ("retries = -1", "eval.retries", [">= 0"]),
        ("retry_seconds = -1", "eval.retry_seconds", ["out of range"]),
        ("gate_max_drop = 1.5", "eval.gate_max_drop", ["out of range"]),
        ("gate_max_drop = true", "eval.gate_max_drop", ["number"]),
        ("plugin = 'x:y'", "eval.plugin", ["applies to evaluator plugin", "not 'clip_zeroshot'"]),
        ("logit_scale = 10.0", "eval.logit_scale", ["text_zeroshot"]),
        ("model = 'ViT-Nope-1'", "eval.model", ["unknown open_clip architecture"]),
        ("model = 'missing.json'", "eval.model", ["missing.json", "cannot read"]),
        ("text_checkpoint = 'nope.safetensors'", "eval.text_checkpoint", ["not found"]),
        ("tasks = 3", "eval.tasks", ["array of tables"]),
    ],
)
def test_bad_top_level_values(tmp_path, line, key, words):
    data = tensors_task(tmp_path)
    with pytest.raises(ConfigError) as ei:
        parse_toml(f'[eval]\n{line}\n' + ("" if line.startswith("tasks") else f'[[eval.tasks]]\nname = "cars"\ndata = "{data}"\n'), tmp_path)
    assert ei.value.key == key, str(ei.value)
    for w in words:
        assert w in str(ei.value), str(ei.value)


def test_model_required_and_plugin_spec(tmp_path):
    task = [{"name": "cars", "data": tensors_task(tmp_path)}]
    with pytest.raises(ConfigError, match="required by evaluator 'clip_zeroshot'") as ei:
        parse_eval({"tasks": task}, tmp_path, None)
    assert ei.value.key == "eval.model"
    with pytest.raises(ConfigError, match="required by evaluator 'plugin'"):
        parse_eval({"evaluator": "plugin", "tasks": task}, tmp_path, None)
    for bad in ("nocolon", "mod:", ":fn", "my-mod:fn", "mod:fn()"):
        with pytest.raises(ConfigError, match="module:function") as ei:
            parse_eval({"evaluator": "plugin", "plugin": bad, "tasks": task}, tmp_path, None)
        assert ei.value.key == "eval.plugin"
    s = parse_eval({"evaluator": "plugin", "plugin": "pkg.mod:evaluate", "model": "anything", "tasks": task}, tmp_path, None)
    assert (s.plugin, s.model) == ("pkg.mod:evaluate", "anything")


def test_model_config_json_checks(tmp_path):
    task = [{"name": "cars", "data": tensors_task(tmp_path)}]
    tiny_json(tmp_path, vocab=100)  # the demo's TINY_CLIP vocabulary cannot hold CLIP's token ids
    with pytest.raises(ConfigError, match="vocab_size 100") as ei:
        parse_eval({"model": "tiny.json", "tasks": task}, tmp_path, None)
    assert ei.value.key == "eval.model"
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="invalid JSON"):
        parse_eval({"model": "bad.json", "tasks": task}, tmp_path, None)
    (tmp_path / "hf.json").write_text(json.dumps({"embed_dim": 8, "vision_cfg": {}, "text_cfg": {"hf_model_name": "x"}}))
    with pytest.raises(ConfigError, match="downloads"):
        parse_eval({"model": "hf.json", "tasks": task}, tmp_path, None)
    (tmp_path / "nocfg.json").write_text(json.dumps({"embed_dim": 8}))
    with pytest.raises(ConfigError, match="vision_cfg"):
        parse_eval({"model": "nocfg.json", "tasks": task}, tmp_path, None)
    # the open_clip_config.json layout {"model_cfg", "preprocess_cfg"} is accepted too
    cfg = json.loads((tmp_path / "tiny.json").read_text())
    cfg["text_cfg"]["vocab_size"] = 49408
    (tmp_path / "oc.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {"mean": [0.5] * 3}}))
    assert parse_eval({"model": "oc.json", "tasks": task}, tmp_path, None).model == str(tmp_path / "oc.json")


@pytest.mark.parametrize(
    "task,key,words",
    [
        ({"name": "cars", "data": "D", "colour": 1}, "eval.tasks[0].colour", ["unknown key", "templates"]),
        ({"data": "D"}, "eval.tasks[0].name", ["required"]),
        ({"name": "cars"}, "eval.tasks[0].data", ["required"]),
        ({"name": " cars", "data": "D"}, "eval.tasks[0].name", ["non-empty"]),
        ({"name": "", "data": "D"}, "eval.tasks[0].name", ["non-empty"]),
        ({"name": "cars", "data": "D", "format": "csv"}, "eval.tasks[0].format", ["'cars'", "imagefolder"]),
        ({"name": "cars", "data": "D", "templates": []}, "eval.tasks[0].templates", ["'cars'", "non-empty"]),
        ({"name": "cars", "data": "D", "templates": ["a photo"]}, "eval.tasks[0].templates[0]", ["'cars'", "{}"]),
        ({"name": "cars", "data": "D", "held_out": "yes"}, "eval.tasks[0].held_out", ["true or false"]),
        ({"name": "cars", "data": "D", "head": "h.safetensors"}, "eval.tasks[0].head", ["heads evaluator only"]),
    ],
)
def test_bad_task_values(tmp_path, task, key, words):
    data = tensors_task(tmp_path)
    task = {k: (data if v == "D" else v) for k, v in task.items()}
    with pytest.raises(ConfigError) as ei:
        parse_eval({"model": tiny_json(tmp_path), "tasks": [task]}, tmp_path, None)
    assert ei.value.key == key, str(ei.value)
    for w in words:
        assert w in str(ei.value), str(ei.value)


def test_duplicate_task_names_and_evaluator_format_mismatch(tmp_path):
    data = tensors_task(tmp_path)
    model = tiny_json(tmp_path)
    with pytest.raises(ConfigError, match="used twice") as ei:
        parse_eval({"model": model, "tasks": [{"name": "cars", "data": data}, {"name": "cars", "data": data}]}, tmp_path, None)
    assert ei.value.key == "eval.tasks[1].name"
    (tmp_path / "t.jsonl").write_text('{"text": "a", "label": 0}\n')
    (tmp_path / "t.classes.txt").write_text("a\n")
    with pytest.raises(ConfigError, match="needs image data") as ei:
        parse_eval({"model": model, "tasks": [{"name": "news", "data": "t.jsonl"}]}, tmp_path, None)
    assert ei.value.key == "eval.tasks[0].format" and "'news'" in str(ei.value)
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="no tokenizer vocabulary") as ei:
        parse_eval({"evaluator": "text_zeroshot", "model": "bert", "tasks": [{"name": "news", "data": "t.jsonl"}]}, tmp_path, None)
    assert ei.value.key == "eval.model"
    (tmp_path / "bert" / "vocab.txt").write_text("[PAD]\n[UNK]\na\n")
    with pytest.raises(ConfigError, match="needs jsonl text data") as ei:
        parse_eval({"evaluator": "text_zeroshot", "model": "bert", "tasks": [{"name": "cars", "data": data}]}, tmp_path, None)
    assert ei.value.key == "eval.tasks[0].format"
    s = parse_eval({"evaluator": "text_zeroshot", "model": "bert", "logit_scale": 20, "tasks": [{"name": "news", "data": "t.jsonl"}]}, tmp_path, None)
    assert s.model == str(tmp_path / "bert") and s.logit_scale == 20.0 and s.tasks[0].templates == ("{}",)
    with pytest.raises(ConfigError, match="config.json") as ei:
        parse_eval({"evaluator": "text_zeroshot", "model": "nowhere", "tasks": [{"name": "news", "data": "t.jsonl"}]}, tmp_path, None)
    assert ei.value.key == "eval.model"


def test_heads_default_path_and_shape_checks(tmp_path):
    data = tensors_task(tmp_path, n_classes=3)
    model = tiny_json(tmp_path)  # embed_dim 16
    cfg = {"evaluator": "heads", "model": model, "tasks": [{"name": "cars", "data": data}]}
    head = tmp_path / "cars.head.safetensors"
    with pytest.raises(ConfigError, match="not found") as ei:
        parse_eval(cfg, tmp_path, None)
    assert ei.value.key == "eval.tasks[0].head" and str(head) in str(ei.value) and "'cars'" in str(ei.value)
    write_safetensors_file(head, {"weight": torch.zeros(3, 16), "bias": torch.zeros(3)})
    assert parse_eval(cfg, tmp_path, None).tasks[0].head == head
    for tensors, words in [
        ({"weight": torch.zeros(4, 16)}, "[3, D]"),
        ({"weight": torch.zeros(3, 8)}, "D = 8"),
        ({"weight": torch.zeros(3, 16), "bias": torch.zeros(4)}, "'bias'"),
        ({"weight": torch.zeros(3, 16), "scale": torch.zeros(1)}, "found"),
        ({"weight": torch.zeros(3, 16, dtype=torch.int64)}, "float"),
    ]:
        write_safetensors_file(head, tensors)
        with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]")) as ei:
            parse_eval(cfg, tmp_path, None)
        assert ei.value.key == "eval.tasks[0].head" and str(head) in str(ei.value)
    # ImageFolder: <data dir>/head.safetensors; an explicit path wins
    from PIL import Image

    (tmp_path / "folder" / "a").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(tmp_path / "folder" / "a" / "0.png")
    write_safetensors_file(tmp_path / "folder" / "head.safetensors", {"weight": torch.zeros(1, 16)})
    s = parse_eval({"evaluator": "heads", "model": model, "tasks": [{"name": "f", "data": "folder"}]}, tmp_path, None)
    assert s.tasks[0].head == tmp_path / "folder" / "head.safetensors"
    write_safetensors_file(tmp_path / "mine.safetensors", {"weight": torch.ones(1, 16)})
    s = parse_eval({"evaluator": "heads", "model": model, "tasks": [{"name": "f", "data": "folder", "head": "mine.safetensors"}]}, tmp_path, None)
    assert s.tasks[0].head == tmp_path / "mine.safetensors"


def test_visual_only_base_needs_text_checkpoint(tmp_path):
    data = tensors_task(tmp_path)
    model = tiny_json(tmp_path)
    cfg = json.loads((tmp_path / model).read_text())
    full = tiny_clip_state(0, cfg=cfg)
    write_safetensors_file(tmp_path / "full.safetensors", full)
    write_safetensors_file(tmp_path / "visual.safetensors", {k[7:]: v for k, v in full.items() if k.startswith("visual.")})
    task = [{"name": "cars", "data": data}]
    with pytest.raises(ConfigError, match="visual-only") as ei:
        parse_eval({"model": model, "tasks": task}, tmp_path, tmp_path / "visual.safetensors")
    assert ei.value.key == "eval.text_checkpoint"
    s = parse_eval({"model": model, "text_checkpoint": "full.safetensors", "tasks": task}, tmp_path, tmp_path / "visual.safetensors")
    assert s.text_checkpoint == tmp_path / "full.safetensors"
    assert parse_eval({"model": model, "tasks": task}, tmp_path, tmp_path / "full.safetensors").text_checkpoint is None
    with pytest.raises(ConfigError, match="not a full open_clip CLIP") as ei:  # the text tower must be in it
        parse_eval({"model": model, "text_checkpoint": "visual.safetensors", "tasks": task}, tmp_path, tmp_path / "visual.safetensors")
    assert ei.value.key == "eval.text_checkpoint"
    # a base that is not an open_clip CLIP at all
    write_safetensors_file(tmp_path / "bert.safetensors", {"encoder.layer.0.dense.weight": torch.zeros(4, 4)})
    for evaluator in ("clip_zeroshot", "heads"):
        with pytest.raises(ConfigError, match="needs an open_clip base") as ei:
            parse_eval({"evaluator": evaluator, "model": model, "tasks": task}, tmp_path, tmp_path / "bert.safetensors")
        assert ei.value.key == "eval.evaluator" and "'generic'" in str(ei.value)
    # a base that does not exist yet is checked when the evaluator is built
    assert parse_eval({"model": model, "tasks": task}, tmp_path, tmp_path / "later.safetensors") is not None
