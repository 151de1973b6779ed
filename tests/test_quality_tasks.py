"""Text classification tasks built from Debian packages (mergewatch.quality.text_tasks, issue 16 part 2A).

The builds download a few MB from Debian's archive (``dict-foldoc``, ``fortunes``, ``wordnet-base``)
into a temporary cache. When that is impossible the tests fail with the reason instead of skipping:
the CI machine has the archive.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from mergewatch.quality import text_tasks as tt
from mergewatch.quality.text_tasks import TaskDataError, build_tasks, read_task_dir

BUILT = ("foldoc", "fortune_topic", "wn_verb")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict[str, Path], list[str]]:
    cache = tmp_path_factory.mktemp("quality-cache")
    lines: list[str] = []
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.fail("apt-get and dpkg-deb are needed to build the quality tasks from Debian packages")
    try:
        dirs = build_tasks(BUILT, cache=cache, progress=lines.append)
    except TaskDataError as e:
        pytest.fail(f"could not build the quality tasks from Debian's archive (apt-get download): {e}")
    return cache, dirs, lines


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_tasks_are_well_formed_and_balanced(built):
    cache, dirs, lines = built
    assert set(dirs) == set(BUILT)
    for name, d in dirs.items():
        assert d.parent == cache / "tasks" and d.name.startswith(name + "-")
        assert sorted(p.name for p in d.iterdir()) == sorted(tt.TASK_FILES)
        task = read_task_dir(d)
        assert 4 <= len(task.classes) <= 20, name
        assert len(set(task.classes)) == len(task.classes)
        assert "{}" in task.template
        for rows, cap in ((task.train, tt.TRAIN_PER_CLASS), (task.test, tt.TEST_PER_CLASS)):
            counts = Counter(y for _, y in rows)
            assert sorted(counts) == list(range(len(task.classes))), name
            assert len(set(counts.values())) == 1, (name, counts)  # balanced
            assert max(counts.values()) <= cap
            assert all(tt.MIN_CHARS <= len(t) <= tt.MAX_CHARS and t == t.strip() for t, _ in rows)
        assert not {t for t, _ in task.train} & {t for t, _ in task.test}, f"{name}: train/test overlap"
        meta = json.loads((d / "task.json").read_text("utf-8"))
        assert meta["task"] == name and meta["counts"]["train"] == len(task.train)
    assert any(line.startswith("package dict-foldoc") and "downloading" in line for line in lines)
    assert any(line.startswith("task foldoc:") for line in lines)
    # The wordnet package is fetched once for the two tasks that could use it.
    assert sum("wordnet-base" in line and "downloading" in line for line in lines) == 1


def test_known_content(built):
    _, dirs, _ = built
    assert "programming" in read_task_dir(dirs["foldoc"]).classes
    assert "computers" in read_task_dir(dirs["fortune_topic"]).classes
    verb = read_task_dir(dirs["wn_verb"])
    assert "walking, flying and swimming" in verb.classes and len(verb.classes) == 10
    assert len(verb.train) == 10 * tt.TRAIN_PER_CLASS and len(verb.test) == 10 * tt.TEST_PER_CLASS


def test_second_build_uses_the_cache_and_rebuilds_identically(built, monkeypatch):
    cache, dirs, _ = built
    before = {name: _files(d) for name, d in dirs.items()}
    debs = {p: p.stat().st_mtime_ns for p in (cache / "debs").glob("*.deb")}
    assert len(debs) == 3

    def no_download(package, version, dest):
        raise AssertionError(f"{package} downloaded again")

    monkeypatch.setattr(tt, "download_deb", no_download)
    lines: list[str] = []
    assert build_tasks(BUILT, cache=cache, progress=lines.append) == dirs
    assert all("cached" in line for line in lines), lines
    # Built again from the same package versions: byte-identical files.
    shutil.rmtree(dirs["foldoc"])
    shutil.rmtree(dirs["fortune_topic"])
    again = build_tasks(["foldoc", "fortune_topic"], cache=cache, progress=False)
    assert again == {n: dirs[n] for n in again}
    assert {n: _files(d) for n, d in again.items()} == {n: before[n] for n in again}
    assert {p: p.stat().st_mtime_ns for p in (cache / "debs").glob("*.deb")} == debs
    assert not [p for p in (cache / "tasks").iterdir() if p.name.startswith(".")], "staging leftovers"


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("MERGEWATCH_CACHE", str(tmp_path / "mw"))
    assert tt.cache_root() == tmp_path / "mw" / "quality"
    assert tt.cache_root(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("MERGEWATCH_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tt.cache_root() == tmp_path / "xdg" / "mergewatch" / "quality"


def test_unknown_task_is_refused(tmp_path):
    with pytest.raises(TaskDataError, match="unknown task.*nope; known: foldoc, fortune_lang"):
        build_tasks(["foldoc", "nope"], cache=tmp_path)


def test_split_is_balanced_capped_and_deterministic():
    texts = {"a": [f"alpha sample text number {i}" for i in range(500)],
             "b": [f"beta sample text number {i}" for i in range(60)] + ["shared text in two classes"],
             "c": [f"gamma sample text number {i}" for i in range(10)] + ["shared text in two classes"]}
    s = tt.make_split(texts, n_classes=5, train_per_class=200, test_per_class=100, seed="x")
    assert s.classes == ["a", "b"]  # c is too small
    assert Counter(y for _, y in s.train) == {0: 40, 1: 40} and Counter(y for _, y in s.test) == {0: 20, 1: 20}
    assert "shared text in two classes" not in {t for t, _ in s.train + s.test}
    assert tt.make_split(texts, n_classes=5, train_per_class=200, test_per_class=100, seed="x") == s
    assert tt.clean_text("a\x08a  b\n\tc " + "word " * 100, 50) == "a b c" + " word" * 8  # cut at a space


# --------------------------------------------------------------------------- read_task_dir


def _task(d: Path, *, classes="cat\ndog\n", template: str | None = "a photo of a {}.\n",
          train='{"text": "meow", "label": 0}\n{"text": "woof", "label": 1}\n',
          test='{"text": "purr", "label": 0}\n\n') -> Path:
    d.mkdir()
    (d / "classes.txt").write_text(classes, "utf-8")
    if template is not None:
        (d / "template.txt").write_text(template, "utf-8")
    (d / "train.jsonl").write_text(train, "utf-8")
    (d / "test.jsonl").write_text(test, "utf-8")
    return d


def test_read_task_dir_good(tmp_path):
    t = read_task_dir(_task(tmp_path / "pets"))
    assert (t.name, t.classes, t.template) == ("pets", ["cat", "dog"], "a photo of a {}.")
    assert t.train == [("meow", 0), ("woof", 1)] and t.test == [("purr", 0)]
    assert read_task_dir(_task(tmp_path / "plain", template=None)).template == tt.DEFAULT_TEMPLATE


@pytest.mark.parametrize(("change", "message"), [
    ({"classes": "cat\n"}, r"classes.txt: needs at least 2 classes"),
    ({"classes": "cat\ncat\n"}, r"classes.txt:2: class 'cat' repeats line 1"),
    ({"classes": "cat\n\ndog\n"}, r"classes.txt:2: empty class name"),
    ({"template": "a photo\n"}, r"template.txt:1: the template must contain '\{\}'"),
    ({"template": "a {} and {}\n"}, r"template.txt:1: the template must contain"),
    ({"template": "{} {0}\n"}, r"template.txt:1: not a usable template"),
    ({"template": "a {}\nb {}\n"}, r"template.txt: must hold exactly one template line"),
    ({"train": '{"text": "meow", "label": 0}\n{"text": "woof", "label": 2}\n'}, r"train.jsonl:2: label 2 is out of range"),
    ({"train": '{"text": "meow", "label": 0}\nnot json\n'}, r"train.jsonl:2: not valid JSON"),
    ({"train": '[1, 2]\n'}, r"train.jsonl:1: expected a JSON object"),
    ({"test": '{"text": "", "label": 0}\n'}, r"test.jsonl:1: \"text\" must be a non-empty string"),
    ({"test": '{"text": "x", "label": "cat"}\n'}, r"test.jsonl:1: \"label\" must be an integer"),
    ({"test": '{"text": "x", "label": true}\n'}, r"test.jsonl:1: \"label\" must be an integer"),
    ({"test": "\n"}, r"test.jsonl: has no examples"),
])
def test_read_task_dir_bad(tmp_path, change, message):
    d = _task(tmp_path / "bad", **change)
    with pytest.raises(TaskDataError, match=message):
        read_task_dir(d)


def test_read_task_dir_missing_and_binary(tmp_path):
    d = _task(tmp_path / "t")
    (d / "test.jsonl").unlink()
    with pytest.raises(TaskDataError, match=r"test.jsonl: missing"):
        read_task_dir(d)
    (d / "test.jsonl").write_bytes(b'{"text": "ok", "label": 0}\n{"text": "\xff", "label": 0}\n')
    with pytest.raises(TaskDataError, match=r"test.jsonl:2: not UTF-8"):
        read_task_dir(d)
    with pytest.raises(TaskDataError, match="not a directory"):
        read_task_dir(tmp_path / "nowhere")
