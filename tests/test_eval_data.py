"""Evaluation data: every format loads, and every malformed form is an error naming task and file."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from mergewatch.checkpoint.writer import write_safetensors_file
from mergewatch.errors import ConfigError
from mergewatch.eval.base import EvalError
from mergewatch.eval.data import DataError, EvalProgress, TensorDataset, open_dataset
from mergewatch.eval.settings import TaskSettings, parse_eval

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)  # open_clip's OPENAI_DATASET_MEAN
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)


def images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def write_png(path: Path, chw: torch.Tensor) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(chw.permute(1, 2, 0).numpy()).save(path)
    return path


def make_imagefolder(root: Path, per_class: dict[str, torch.Tensor]) -> Path:
    for cls, imgs in per_class.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(imgs):
            write_png(root / cls / f"{i:03d}.png", im)
    return root


def make_tensors(path: Path, imgs: torch.Tensor, labels: torch.Tensor, classes: list[str] | None) -> Path:
    write_safetensors_file(path, {"images": imgs, "labels": labels})
    if classes is not None:
        path.with_name(f"{path.stem}.classes.txt").write_text("\n".join(classes) + "\n", "utf-8")
    return path


def make_jsonl(path: Path, rows: list, classes: list[str] | None) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), "utf-8")
    if classes is not None:
        path.with_name(f"{path.stem}.classes.txt").write_text("\n".join(classes) + "\n", "utf-8")
    return path


def preprocess_32():
    import open_clip

    return open_clip.image_transform(32, is_train=False)


def parse_task(root: Path, task: dict, evaluator: str = "plugin", **extra):
    """parse_eval with one task (the plugin evaluator runs every data check and needs no model)."""
    return parse_eval({"evaluator": evaluator, "plugin": "m:f", **extra, "tasks": [{"name": "cars", **task}]}, root, None)


def assert_names_task_and_file(err: ConfigError, key: str, path: Path) -> None:
    assert err.key == key
    assert "'cars'" in str(err) and str(path) in str(err), str(err)


# ImageFolder -------------------------------------------------------------------------------------

def test_imagefolder_classes_are_sorted_subdirectories_and_images_decode_at_eval_time(tmp_path):
    imgs = images(5)
    root = make_imagefolder(tmp_path / "cars", {"b_suv": imgs[:2], "a_sedan": imgs[2:5]})
    (root / "a_sedan" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    ds = open_dataset(TaskSettings("cars", root, "imagefolder"))
    assert ds.classes == ("a_sedan", "b_suv") and len(ds) == 5
    xs, ys = zip(*ds.batches(2, preprocess_32()))
    assert [len(y) for y in ys] == [2, 2, 1]
    assert torch.cat(ys).tolist() == [0, 0, 0, 1, 1]
    # PNG is lossless and 32×32 is the model's input size: the transform is (x/255 - mean)/std
    expected = (imgs[2].float() / 255 - MEAN) / STD
    torch.testing.assert_close(xs[0][0], expected, atol=1e-5, rtol=0)


def test_imagefolder_class_names_file_gives_prompt_names_in_subdirectory_order(tmp_path):
    make_imagefolder(tmp_path / "cars", {"n01": images(1), "n02": images(1, seed=1)})
    (tmp_path / "names.txt").write_text("sports car\n\nminivan\n")
    s = parse_task(tmp_path, {"data": "cars", "classes": "names.txt"})
    assert s.tasks[0].format == "imagefolder"
    assert open_dataset(s.tasks[0]).classes == ("sports car", "minivan")


@pytest.mark.parametrize(
    "case",
    ["names_count", "names_missing", "empty", "no_subdirs", "duplicate_names"],
)
def test_imagefolder_malformed(tmp_path, case):
    root = tmp_path / "cars"
    task = {"data": "cars"}
    key, path = "eval.tasks[0].data", root
    if case == "names_count":
        make_imagefolder(root, {"a": images(1), "b": images(1)})
        (tmp_path / "names.txt").write_text("only one\n")
        task["classes"] = "names.txt"
        key, path = "eval.tasks[0].classes", tmp_path / "names.txt"
    elif case == "names_missing":
        make_imagefolder(root, {"a": images(1)})
        task["classes"] = "absent.txt"
        key, path = "eval.tasks[0].classes", tmp_path / "absent.txt"
    elif case == "empty":
        (root / "a").mkdir(parents=True)
        (root / "a" / "readme.md").write_text("no images here")
    elif case == "no_subdirs":
        root.mkdir()
        write_png(root / "x.png", images(1)[0])
    elif case == "duplicate_names":
        make_imagefolder(root, {"a": images(1), "b": images(1)})
        (tmp_path / "names.txt").write_text("car\ncar\n")
        task["classes"] = "names.txt"
        key, path = "eval.tasks[0].classes", tmp_path / "names.txt"
    with pytest.raises(ConfigError) as ei:
        parse_task(tmp_path, task)
    assert_names_task_and_file(ei.value, key, path)


def test_imagefolder_corrupt_image_is_an_eval_error_at_eval_time(tmp_path):
    root = make_imagefolder(tmp_path / "cars", {"a": images(2)})
    bad = root / "a" / "001.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    ds = open_dataset(TaskSettings("cars", root, "imagefolder"))  # cheap checks only: no decoding yet
    with pytest.raises(EvalError) as ei:
        list(ds.batches(4, preprocess_32()))
    assert "'cars'" in str(ei.value) and str(bad) in str(ei.value)


# Tensors -----------------------------------------------------------------------------------------

def test_tensors_same_pixels_as_imagefolder_and_batched_reads(tmp_path):
    imgs = images(5, seed=3)
    labels = torch.tensor([0, 1, 1, 0, 1])
    make_tensors(tmp_path / "cars.safetensors", imgs, labels, ["sedan", "suv"])
    s = parse_task(tmp_path, {"data": "cars.safetensors"})
    t = s.tasks[0]
    assert t.format == "tensors" and t.classes == tmp_path / "cars.classes.txt"
    ds = open_dataset(t)
    assert isinstance(ds, TensorDataset) and ds.classes == ("sedan", "suv") and len(ds) == 5
    assert torch.equal(ds.read_images(1, 4), imgs[1:4])  # positioned read of a slice
    xs, ys = zip(*ds.batches(2, preprocess_32()))
    assert torch.cat(ys).tolist() == labels.tolist() and [len(y) for y in ys] == [2, 2, 1]
    # the same image as a PNG through the ImageFolder path gives the identical tensor
    folder = make_imagefolder(tmp_path / "folder", {"sedan": imgs[:1]})
    (fx, _), = open_dataset(TaskSettings("cars", folder, "imagefolder")).batches(1, preprocess_32())
    assert torch.equal(torch.cat(xs)[0], fx[0])
    torch.testing.assert_close(torch.cat(xs), (imgs.float() / 255 - MEAN) / STD, atol=1e-5, rtol=0)


def test_tensors_other_size_is_resized_to_the_model_input(tmp_path):
    # decision: resize (like an image file) rather than refuse; a constant image stays constant
    imgs = torch.full((2, 3, 48, 64), 128, dtype=torch.uint8)
    make_tensors(tmp_path / "d.safetensors", imgs, torch.tensor([0, 0]), ["x"])
    ds = open_dataset(parse_task(tmp_path, {"data": "d.safetensors"}).tasks[0])
    (xs, _), = ds.batches(8, preprocess_32())
    assert xs.shape == (2, 3, 32, 32)
    torch.testing.assert_close(xs, ((torch.full((3, 32, 32), 128 / 255) - MEAN) / STD).expand(2, 3, 32, 32), atol=1e-5, rtol=0)


def test_tensors_classes_txt_beside_and_explicit_classes(tmp_path):
    make_tensors(tmp_path / "d.safetensors", images(2), torch.tensor([0, 2]), None)
    (tmp_path / "classes.txt").write_text("a\nb\nc\n")
    assert open_dataset(parse_task(tmp_path, {"data": "d.safetensors"}).tasks[0]).classes == ("a", "b", "c")
    (tmp_path / "other.txt").write_text("x\ny\nz\nw\n")
    t = parse_task(tmp_path, {"data": "d.safetensors", "classes": "other.txt"}).tasks[0]
    assert open_dataset(t).classes == ("x", "y", "z", "w")


def _tensor_case(tmp_path: Path, case: str):
    p = tmp_path / "cars.safetensors"
    classes = ["a", "b", "c"]
    key = "eval.tasks[0].data"
    words = []
    if case == "missing_classes":
        make_tensors(p, images(2), torch.tensor([0, 1]), None)
        key, words = "eval.tasks[0].classes", ["class-names file missing"]
    elif case == "label_out_of_range":
        make_tensors(p, images(3), torch.tensor([0, 3, 1]), classes)
        words = ["label 3", "out of range", "example 1"]
    elif case == "negative_label":
        make_tensors(p, images(2), torch.tensor([0, -1]), classes)
        words = ["label -1"]
    elif case == "empty":
        make_tensors(p, torch.zeros((0, 3, 32, 32), dtype=torch.uint8), torch.zeros(0, dtype=torch.int64), classes)
        words = ["empty"]
    elif case == "one_channel":
        make_tensors(p, torch.zeros((2, 1, 32, 32), dtype=torch.uint8), torch.tensor([0, 1]), classes)
        words = ["N×3×H×W", "[2, 1, 32, 32]"]
    elif case == "three_d":
        make_tensors(p, torch.zeros((2, 32, 32), dtype=torch.uint8), torch.tensor([0, 1]), classes)
        words = ["N×3×H×W"]
    elif case == "float_images":
        make_tensors(p, torch.zeros((2, 3, 32, 32)), torch.tensor([0, 1]), classes)
        words = ["uint8"]
    elif case == "label_count":
        make_tensors(p, images(3), torch.tensor([0, 1]), classes)
        words = ["'labels' has 2", "'images' has 3"]
    elif case == "float_labels":
        make_tensors(p, images(2), torch.tensor([0.0, 1.0]), classes)
        words = ["integer"]
    elif case == "no_images_tensor":
        write_safetensors_file(p, {"pixels": images(2), "labels": torch.tensor([0, 1])})
        words = ["missing tensor 'images'"]
    elif case == "not_safetensors":
        p.write_bytes(b"this is not a safetensors file at all")
        words = ["not a valid safetensors"]
    return {"data": p.name}, key, p, words


TENSOR_CASES = ["missing_classes", "label_out_of_range", "negative_label", "empty", "one_channel", "three_d",
                "float_images", "label_count", "float_labels", "no_images_tensor", "not_safetensors"]


@pytest.mark.parametrize("case", TENSOR_CASES)
def test_tensors_malformed(tmp_path, case):
    task, key, path, words = _tensor_case(tmp_path, case)
    with pytest.raises(ConfigError) as ei:
        parse_task(tmp_path, task)
    assert_names_task_and_file(ei.value, key, path)
    for w in words:
        assert w in str(ei.value), str(ei.value)


def test_tensors_truncated_file_after_load_is_an_eval_error(tmp_path):
    p = make_tensors(tmp_path / "cars.safetensors", images(4), torch.tensor([0, 1, 0, 1]), ["a", "b"])
    ds = open_dataset(parse_task(tmp_path, {"data": p.name}).tasks[0])
    p.write_bytes(p.read_bytes()[:-100])  # the file changes under a long-running daemon
    with pytest.raises(EvalError, match="short read"):
        list(ds.batches(4, preprocess_32()))


# JSONL -------------------------------------------------------------------------------------------

def test_jsonl_loads_texts_and_labels(tmp_path):
    make_jsonl(tmp_path / "news.jsonl", [{"text": "goal!", "label": 1, "id": 7}, "", {"text": "rain", "label": 0}], ["weather", "sports"])
    t = parse_task(tmp_path, {"data": "news.jsonl"}).tasks[0]
    assert t.format == "jsonl" and t.templates == ("{}",)  # the text default template
    ds = open_dataset(t)
    assert ds.texts == ["goal!", "rain"] and ds.labels.tolist() == [1, 0] and ds.classes == ("weather", "sports")
    assert [(x, y.tolist()) for x, y in ds.batches(1)] == [(["goal!"], [1]), (["rain"], [0])]


@pytest.mark.parametrize(
    "case,rows,classes,key,words",
    [
        ("missing_classes", [{"text": "a", "label": 0}], None, "classes", ["class-names file missing"]),
        ("label_out_of_range", [{"text": "a", "label": 0}, {"text": "b", "label": 2}], ["x", "y"], "data", ["line 2", "label 2", "out of range"]),
        ("empty", ["", "  "], ["x"], "data", ["empty"]),
        ("bad_json", ['{"text": "a", "label": 0', ], ["x"], "data", ["line 1", "not valid JSON"]),
        ("no_text", [{"label": 0}], ["x"], "data", ["'text' must be a string"]),
        ("bool_label", [{"text": "a", "label": True}], ["x", "y"], "data", ["'label' must be an integer"]),
        ("not_object", [[1, 2]], ["x"], "data", ["expected an object"]),
    ],
)
def test_jsonl_malformed(tmp_path, case, rows, classes, key, words):
    p = make_jsonl(tmp_path / "cars.jsonl", rows, classes)
    with pytest.raises(ConfigError) as ei:
        parse_task(tmp_path, {"data": p.name})
    assert_names_task_and_file(ei.value, f"eval.tasks[0].{key}", p)
    for w in words:
        assert w in str(ei.value), str(ei.value)


def test_empty_class_names_file(tmp_path):
    p = make_jsonl(tmp_path / "cars.jsonl", [{"text": "a", "label": 0}], None)
    (tmp_path / "cars.classes.txt").write_text("\n \n")
    with pytest.raises(ConfigError) as ei:
        parse_task(tmp_path, {"data": p.name})
    assert_names_task_and_file(ei.value, "eval.tasks[0].classes", tmp_path / "cars.classes.txt")
    assert "no class" in str(ei.value)


def test_missing_data_and_unknown_suffix(tmp_path):
    with pytest.raises(ConfigError) as ei:
        parse_task(tmp_path, {"data": "nowhere"})
    assert_names_task_and_file(ei.value, "eval.tasks[0].data", tmp_path / "nowhere")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(ConfigError, match="cannot tell the format") as ei:
        parse_task(tmp_path, {"data": "d.csv"})
    assert_names_task_and_file(ei.value, "eval.tasks[0].data", tmp_path / "d.csv")
    # a given format that does not fit the path
    with pytest.raises(ConfigError, match="needs a directory") as ei:
        parse_task(tmp_path, {"data": "d.csv", "format": "imagefolder"})
    assert_names_task_and_file(ei.value, "eval.tasks[0].data", tmp_path / "d.csv")


def test_data_error_is_an_eval_error_naming_task_and_file(tmp_path):
    with pytest.raises(DataError) as ei:
        open_dataset(TaskSettings("cars", tmp_path / "x.jsonl", "jsonl"))
    assert isinstance(ei.value, EvalError) and ei.value.task == "cars" and ei.value.path == str(tmp_path / "x.jsonl")


# Progress ----------------------------------------------------------------------------------------

class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal_only():
    tty, pipe = _Tty(), io.StringIO()
    for stream in (tty, pipe):
        p = EvalProgress("cars", 4, stream=stream)
        p.update(2)
        p.update(2)
    assert pipe.getvalue() == ""
    out = tty.getvalue()
    assert out.endswith("4/4\n") and "eval cars" in out and "#" * 30 in out
