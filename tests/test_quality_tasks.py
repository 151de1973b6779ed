"""Text classification tasks built from Debian packages (mergewatch.quality.text_tasks, issue 16 part 2A).

The builds download a few MB from Debian's archive (``dict-foldoc``, ``fortunes``, ``wordnet-base``;
about 15 MB for ``dict-gcide``) into a temporary cache, and ``debian_section`` reads apt's package
lists. When that is impossible the tests fail with the reason instead of skipping: the CI machine has
the archive.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import shutil
import subprocess
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


def _assert_well_formed(cache: Path, name: str, d: Path) -> dict:
    """A built task directory is complete, balanced, capped and without train/test overlap; its task.json."""
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
    return meta


def test_tasks_are_well_formed_and_balanced(built):
    cache, dirs, lines = built
    assert set(dirs) == set(BUILT)
    for name, d in dirs.items():
        _assert_well_formed(cache, name, d)
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
    with pytest.raises(TaskDataError, match="unknown task.*nope; known: debian_section, foldoc, fortune_lang"):
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


# --------------------------------------------------------------------------- gcide_subject, gcide_etym, debian_section

NEW = ("gcide_subject", "gcide_etym", "debian_section")


@pytest.fixture(scope="module")
def built_new(tmp_path_factory) -> tuple[Path, dict[str, Path], list[str]]:
    """The three newer families in a cache of their own (``dict-gcide`` is about 15 MB)."""
    cache = tmp_path_factory.mktemp("quality-cache-new")
    lines: list[str] = []
    try:
        dirs = build_tasks(NEW, cache=cache, progress=lines.append)
    except TaskDataError as e:
        pytest.fail(f"could not build the gcide and debian_section tasks (apt-get download, apt lists): {e}")
    return cache, dirs, lines


def _gcide_root(cache: Path) -> Path:
    (root,) = [p for p in (cache / "debs").glob("dict-gcide_*") if (p / ".complete").exists()]
    return root


def _gcide_entry(root: Path, head: str) -> tt.GcideEntry:
    """The first entry of headword ``head`` (parsed from the cached package)."""
    return tt.gcide_entry(next(r for r in tt.gcide_raw_entries(root) if r.startswith(head + " \\")))


def _check_labels(task, collected: dict[str, list[str]]) -> None:
    """Every example's text is one of the texts collected under its class."""
    pools = {label: {tt.clean_text(x) for x in xs} for label, xs in collected.items()}
    for text, y in task.train + task.test:
        assert text in pools[task.classes[y]], (task.classes[y], text[:60])


def test_new_tasks_are_well_formed_and_balanced(built_new):
    cache, dirs, lines = built_new
    assert set(dirs) == set(NEW)
    for name, d in dirs.items():
        meta = _assert_well_formed(cache, name, d)
        assert meta["family_version"] == 1
    assert sum("dict-gcide" in line and "downloading" in line for line in lines) == 1  # one package, two tasks


def test_gcide_subject_content(built_new):
    cache, dirs, _ = built_new
    root = _gcide_root(cache)
    task = read_task_dir(dirs["gcide_subject"])
    assert {"zoology", "botany", "chemistry", "law", "music"} <= set(task.classes)
    assert len(task.classes) == 10 and len(task.train) == 10 * tt.TRAIN_PER_CLASS
    assert set(task.classes) <= set(tt.GCIDE_SUBJECTS.values())
    # no subject label left in any text, not even one of another sense
    assert not [t for t, _ in task.train + task.test if tt._GCIDE_HAS_SUBJECT.search(t)]
    collected = tt._gcide_subject({"dict-gcide": root})
    _check_labels(task, collected)
    # the label after the etymology applies to the definition; a numbered sense's own label to that sense
    labels, text = _gcide_entry(root, "Abactor").senses[0]
    assert labels == ("Law",) and "(Law)" not in text and "[" not in text and "--" not in text
    assert tt.clean_text(text) in {tt.clean_text(x) for x in collected["law"]}
    aback = _gcide_entry(root, "Aback").senses
    assert ("Naut",) in [labels for labels, _ in aback]
    assert all(not t.startswith("(") for _, t in aback)
    assert _gcide_entry(root, "Abaciscus").senses[0][0] == ("Arch",)  # header wrapped over two lines


def test_gcide_language():
    lang = tt.gcide_language
    assert lang("L. word, fr. Gr. word") == "Latin"
    assert lang("Cf. F. word.") == "French"
    assert lang("OE. word, F. word, fr. L. word, fr. word. See {Word}.") == "French"  # OE. defers
    assert lang("OE. word; akin to G. word") is None  # only cognates after the first clause
    assert lang("NL., fr. Gr. word + word") == "Greek"
    assert lang("NL.; word") == "Latin"
    assert lang("AS. word") == "Old English"
    assert lang("L. ab + E. word.") is None  # a hybrid formed in English
    assert lang("imp. & p. p. {Words}") is None
    assert lang("The native name.") is None
    assert lang("From Word, in Italy.") is None


def test_gcide_etym_content(built_new):
    cache, dirs, _ = built_new
    root = _gcide_root(cache)
    task = read_task_dir(dirs["gcide_etym"])
    assert {"Latin", "French", "Greek", "Old English", "Italian", "Spanish"} <= set(task.classes)
    rows = task.train + task.test
    # "headword: definition", the etymology bracket removed
    assert all(": " in t and "[" not in t for t, _ in rows)
    assert not [t for t, _ in rows if tt._GCIDE_HAS_LANGUAGE.search(t)]
    collected = tt._gcide_etym({"dict-gcide": root})
    _check_labels(task, collected)

    def language(head: str) -> str | None:
        return next(filter(None, map(tt.gcide_language, _gcide_entry(root, head).brackets)), None)

    assert language("Abactor") == "Latin"
    assert language("Liberty") == "French"  # "[OE. ..., F. ..., fr. L. ...]"
    assert language("Boy") == "Dutch"  # "[Cf. D. ...; akin to ...]"
    assert language("Abactinal") is None  # "[L. ab + E. actinal.]"
    assert any(t.startswith("Abactor: ") for t in collected["Latin"])


def test_debian_section_content(built_new):
    _, dirs, _ = built_new
    d = dirs["debian_section"]
    task = read_task_dir(d)
    assert {"games", "science", "fonts", "networking"} <= set(task.classes)
    assert set(task.classes) <= {name for name, _ in tt.DEBIAN_SECTIONS.values()}
    assert not [t for t, _ in task.train + task.test if tt._SECTION_WORDS.search(t)], "section words left"
    meta = json.loads((d / "task.json").read_text("utf-8"))
    assert meta["packages"] == {} and len(meta["texts_sha256"]) == 64
    lists = meta["sources"]["package_lists"]
    assert lists and all(row["origin"] == "Debian" and "-" not in row["codename"] for row in lists)
    for row in lists:
        assert len(row["sha256"]) == 64 and row["file"].startswith("/")
        if Path(row["file"]).exists() and Path(row["file"]).stat().st_size == row["bytes"]:
            assert hashlib.sha256(Path(row["file"]).read_bytes()).hexdigest() == row["sha256"]


def test_new_families_rebuild_identically(built_new, monkeypatch):
    cache, dirs, _ = built_new
    before = {name: _files(d) for name, d in dirs.items()}

    def no_download(package, version, dest):
        raise AssertionError(f"{package} downloaded again")

    monkeypatch.setattr(tt, "download_deb", no_download)
    names = ["gcide_subject", "debian_section"]  # gcide_etym is made the same way as gcide_subject
    for name in names:
        shutil.rmtree(dirs[name])
    lines: list[str] = []
    again = build_tasks(names, cache=cache, progress=lines.append)
    assert again == {name: dirs[name] for name in names}  # the same keys
    assert {name: _files(d) for name, d in again.items()} == {name: before[name] for name in names}  # byte-identical
    assert sum("building" in line for line in lines) == 2
    assert not [p for p in (cache / "tasks").iterdir() if p.name.startswith(".")], "staging leftovers"


def _write_packages(path: Path, records: list[tuple[str, str, str]]) -> Path:
    """A gzipped Packages file of ``(package, section, synopsis)`` records."""
    text = "\n".join(f"Package: {p}\nVersion: 1.0-1\nArchitecture: all\nDescription: {syn}\nDescription-md5: 0\n"
                     f"Tag: role::program,\n use::playing\nSection: {sec}\nPriority: optional\n"
                     for p, sec, syn in records)
    path.write_bytes(gzip.compress(text.encode("utf-8"), mtime=0))
    return path


def _synthetic_records() -> list[tuple[str, str, str]]:
    out = []
    for i in range(40):
        games = "games" if i % 4 else "contrib/games"
        out.append((f"puzzle{i}", games, f"tile puzzle game number {i} for the console"))
        out.append((f"lab{i}", "science", f"scientific simulation kit number {i} of the lab"))
        out.append((f"glyphs{i}", "fonts", f"serif font family number {i} with many glyphs"))
    out.append(("libthing1", "libs", "shared library for the thing decoder"))
    return out


def test_debian_section_is_pinned_by_its_texts(tmp_path, monkeypatch):
    lists = tmp_path / "lists"
    lists.mkdir()
    path = _write_packages(lists / "example_Packages.gz", _synthetic_records())
    row = {"file": str(path), "origin": "Debian", "codename": "test", "component": "main", "architecture": "all"}
    monkeypatch.setattr(tt, "package_lists", lambda: [dict(row)])
    first = tt.build_task("debian_section", tmp_path / "cache")
    task = read_task_dir(first)
    assert sorted(task.classes) == ["fonts", "games", "science"]
    texts = [t for t, _ in task.train + task.test]
    assert len(texts) == 3 * 40 and not [t for t in texts if re.search(r"(?i)\b(game|font|scientific)\b", t)]
    assert "tile puzzle number 0 for the console" in texts  # from "contrib/games", the word "game" removed
    meta = json.loads((first / "task.json").read_text("utf-8"))
    assert meta["sources"]["package_lists"] == [{**row, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                                                 "bytes": path.stat().st_size}]
    # The lists changed but not the texts (a section outside the task, a new version): the same task.
    _write_packages(path, _synthetic_records() + [("libother2", "libs", "another shared library for testing")])
    assert tt.build_task("debian_section", tmp_path / "cache") == first
    # A synopsis changed: a new task beside the old one, which stays as it was.
    changed = [(p, sec, syn.replace("number 7 ", "number seven ")) for p, sec, syn in _synthetic_records()]
    _write_packages(path, changed)
    second = tt.build_task("debian_section", tmp_path / "cache")
    assert second != first and first.exists()
    assert json.loads((second / "task.json").read_text("utf-8"))["texts_sha256"] != meta["texts_sha256"]


def test_package_lists_choose_debian_releases_and_fail_clearly(tmp_path, monkeypatch):
    files = {name: tmp_path / name for name in ("rel_Packages.lz4", "sec_Packages.lz4", "other_Packages")}
    for p in files.values():
        p.write_bytes(b"")
    out = "".join(f"{path}\t{origin}\t{codename}\tmain\tamd64\n" for path, origin, codename in (
        (files["rel_Packages.lz4"], "Debian", "bookworm"),
        (files["sec_Packages.lz4"], "Debian", "bookworm-security"),
        (files["other_Packages"], "nodesource", "nodistro"),
        (tmp_path / "missing_Packages", "Debian", "bookworm")))
    calls = []

    def fake_run(cmd, cwd=None):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout=out, stderr="")

    monkeypatch.setattr(tt, "_run", fake_run)
    monkeypatch.setattr(tt._Apt, "updated", True)  # no real apt-get update
    assert [row["file"] for row in tt.package_lists()] == [str(files["rel_Packages.lz4"])]
    assert calls[0][:2] == ["apt-get", "indextargets"]
    out = ""
    with pytest.raises(TaskDataError, match="no Debian Packages lists on this machine"):
        tt.package_lists()
    with pytest.raises(TaskDataError, match="no Debian Packages lists"):
        tt.build_task("debian_section", tmp_path / "cache")


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
