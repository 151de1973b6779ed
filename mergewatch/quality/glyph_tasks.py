"""The glyph suite (issue 16, vision): glyph-image tasks rendered offline from Debian fonts, with θ0,
prototype heads and experts of a tiny open_clip ViT (``glyph_model``), all cached.

**Fonts.** ``fonts-noto-core``, ``fonts-freefont-ttf``, ``fonts-liberation2`` and
``fonts-dejavu-extra`` (18 MB to download, 61 MB unpacked, 308 font files; noto-core is 12 MB / 43 MB
of it) are fetched with ``text_tasks.fetch_package`` into the quality cache and never copied
anywhere else. All 308 files form the pool (a decision: no subset is needed, reading their cmaps takes
0.6 s and a file is opened only when one of its glyphs is drawn). fontTools' best cmap says which
files map a code point; each (font, code point) pair is then *verified* before it is ever used: drawn
at 64 px/em its ink covers at least ``MIN_INK`` pixels and differs from that font's ``.notdef``
glyph, so no image is blank or tofu. A class needs ``MIN_FONTS`` verified fonts.

**Images.** 32×32 RGB, a light grey glyph on a darker grey background, the three channels equal. A
glyph is drawn with Pillow's basic layout (no shaping: one code point, its nominal glyph) at 64 px/em
with a random stroke (0–2 px at that size) in a random verified font, cut to its ink box, rotated by
±10°, scaled to 18–27 px/em (× 0.9–1.1 in width; shrunk to fit when wider or taller than 28 px),
centred by its ink box; glyph and background greys are 100–200 apart, then Gaussian noise σ ∈ [0, 10].
There is no random shift and no random polarity: with them the ViT learnt nothing in the pre-training
budget (measured, see ``glyph_model``). Each image's random choices, font included, come from a
numpy generator seeded with the sha256 of a string naming the image (task, split, class, index), so an
image is the same in every run, order and process; drawing one takes 0.4 ms.

**Pre-training mixture** (θ0's classes, ``MIXTURE``): Latin upper and lower case, digits, Greek,
Cyrillic, Armenian, Hebrew, Arabic letters (nominal forms) and 51 symbols, 360 code points; a code
point whose shape (ink box padded square, 16×16, zero-mean cosine, in its reference font) is at
least ``DUPLICATE_SIM`` like an earlier one is dropped (Greek Α after Latin A, Cyrillic о after o,
Armenian Օ after O, ∆ after Δ, ...): 316 classes.

**Downstream tasks** (``TASKS``, a fixed order; the first ``n_tasks`` are used): 19 scripts —
Georgian, Devanagari, Thai, Tamil, Ethiopic, Khmer, Cherokee, Bengali, Gujarati, Gurmukhi, Kannada,
Telugu, Malayalam, Sinhala, Tibetan, Runic, Ogham, Canadian syllabics, Tifinagh (Hangul was asked
for, but none of these fonts has it) — and ``digits``, scikit-learn's bundled handwritten digits
(8×8, 0..16, upscaled and then augmented like a glyph). A script task has ``N_CLASSES`` = 10 letters
drawn in a seeded order from the script's letters, skipping a letter whose shape is at least
``HOMOGLYPH_SIM`` like a mixture class (Cherokee Ꮪ like S, Runic ᚷ like X, Tifinagh ⵔ like O, ...) or
like a letter already taken. Script tasks are disjoint from each other and from the mixture as code
points. ``digits`` is the exception by design: its classes are the mixture's digits, handwritten
(the domain-shift task the issue asks for). A script task's train and test images share the fonts
and differ in their augmentations; ``digits`` splits the 1797 images (per class, seeded).

Files, all under ``<quality cache>/glyph/``, each written atomically and keyed by what it depends on:

* ``classes-<key>.json``: the chosen code points (key: builder version, font package versions,
  Pillow and FreeType versions, augmentation, mixture and script tables, thresholds);
* ``tasks/<name>-<key>/``: ``train.safetensors`` and ``test.safetensors`` (the ``tensors`` format
  of ``mergewatch.eval.data``: ``images`` uint8 N×3×32×32 and ``labels`` int64, balanced, shuffled),
  ``classes.txt`` (Unicode names such as "GEORGIAN LETTER BAN", or "handwritten digit 0") and
  ``task.json`` (key: as above plus the task's code points and sizes; for ``digits`` scikit-learn's
  version instead of the fonts);
* ``model/glyph-vit-<key>.json``: the model config (key: its content);
* ``base/theta0-<key>.safetensors`` + ``.json`` (key: as for the classes plus the mixture, the model
  config and the pre-training hyper-parameters, thread count included);
* ``heads/<task>-<key>.safetensors`` (key: θ0's content sha256, the task, shots and logit scale);
* ``experts/<task>-<strength>-<key>.safetensors`` + ``.json`` (key: θ0's sha256, the task, the
  sha256 of its train split and of its head, the strength's hyper-parameters and the trained prefix;
  the json holds the loss, time, and θ0's and the expert's test accuracy).

A cached file is used without opening a font, rendering or training. ``QUICK`` and ``FULL`` give the
sizes and hyper-parameters with the times measured on the 2-core machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import unicodedata
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from mergewatch.checkpoint.durable import atomic_write
from mergewatch.numeric import pinned_threads
from mergewatch.quality import glyph_model as gm
from mergewatch.quality.text_tasks import Progress, TaskDataError, cache_root, fetch_package, write_task_dir

#: bump when the images, classes or training for the same inputs change (part of every cache key)
BUILDER_VERSION = 1
FONT_PACKAGES = ("fonts-noto-core", "fonts-freefont-ttf", "fonts-liberation2", "fonts-dejavu-extra")
FONT_SUFFIXES = (".ttf", ".otf")
IMAGE_SIZE = 32
#: glyphs are drawn at this size (px per em) and then scaled down
EM_HI = 64
#: ink pixels a verified glyph has at least at EM_HI (a dot or an empty glyph is refused)
MIN_INK = 40
DUPLICATE_SIM = 0.95
HOMOGLYPH_SIM = 0.85
MIN_FONTS = 2
N_CLASSES = 10
SHAPE_SIZE = 16


@dataclass(frozen=True)
class Augment:
    """The random image parameters (uniform in each range). ``shift_px`` and ``dark_on_light`` are 0:
    with a ±2 px shift, or either polarity, the patch-8 ViT did not leave chance in the pre-training
    budget (``glyph_model``); the ink-box centring and the rotation still move the strokes around."""

    em_px: tuple[float, float] = (18.0, 27.0)
    max_extent: int = 28
    rotate_deg: float = 10.0
    aspect: tuple[float, float] = (0.9, 1.1)
    shift_px: int = 0
    stroke_hi: tuple[int, int] = (0, 2)
    contrast: tuple[int, int] = (100, 200)
    noise_sigma: tuple[float, float] = (0.0, 10.0)
    #: probability of a dark glyph on a lighter background (else light on darker)
    dark_on_light: float = 0.0


AUGMENT = Augment()

SYMBOLS = "#$%&@*+<=>?§¶©®°±×÷€£¥¢∞≈≠≤≥∑∏√∫∂∆∇←↑→↓↔♠♣♥♦♪/\\{}[]"

#: the pre-training mixture: (group, code point ranges (inclusive) or an explicit string)
MIXTURE: tuple[tuple[str, tuple[tuple[int, int], ...] | str], ...] = (
    ("latin_upper", ((0x41, 0x5A),)),
    ("latin_lower", ((0x61, 0x7A),)),
    ("digits", ((0x30, 0x39),)),
    ("greek_upper", ((0x391, 0x3A9),)),
    ("greek_lower", ((0x3B1, 0x3C9),)),
    ("cyrillic_upper", ((0x410, 0x42F),)),
    ("cyrillic_lower", ((0x430, 0x44F),)),
    ("armenian_upper", ((0x531, 0x556),)),
    ("armenian_lower", ((0x561, 0x586),)),
    ("hebrew", ((0x5D0, 0x5EA),)),
    ("arabic", ((0x621, 0x64A),)),
    ("symbols", SYMBOLS),
)

#: downstream script tasks, in the suite's fixed order (``digits`` last)
SCRIPTS: dict[str, tuple[tuple[int, int], ...]] = {
    "georgian": ((0x10D0, 0x10FA),),
    "devanagari": ((0x0905, 0x0939),),
    "thai": ((0x0E01, 0x0E2E),),
    "tamil": ((0x0B85, 0x0BB9),),
    "ethiopic": ((0x1200, 0x135A),),
    "khmer": ((0x1780, 0x17B3),),
    "cherokee": ((0x13A0, 0x13F5),),
    "bengali": ((0x0985, 0x09B9),),
    "gujarati": ((0x0A85, 0x0AB9),),
    "gurmukhi": ((0x0A05, 0x0A39),),
    "kannada": ((0x0C85, 0x0CB9),),
    "telugu": ((0x0C05, 0x0C39),),
    "malayalam": ((0x0D05, 0x0D39),),
    "sinhala": ((0x0D85, 0x0DC6),),
    "tibetan": ((0x0F40, 0x0F6C),),
    "runic": ((0x16A0, 0x16EA),),
    "ogham": ((0x1681, 0x169A),),
    "canadian": ((0x1401, 0x166C),),
    "tifinagh": ((0x2D30, 0x2D67),),
}
DIGITS_TASK = "digits"
TASKS = (*SCRIPTS, DIGITS_TASK)
LETTER_CATEGORIES = ("Lu", "Ll", "Lo")


def say(msg: str) -> None:
    print(f"quality: {msg}", file=sys.stderr, flush=True)


def seeded_rng(name: str) -> np.random.Generator:
    """A numpy generator seeded by the sha256 of ``name`` (the same stream on every platform)."""
    return np.random.default_rng(int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little"))


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


def render_versions() -> dict[str, str]:
    """The library versions the pixels depend on."""
    import PIL
    from PIL import features

    return {"pillow": PIL.__version__, "freetype": str(features.version("freetype2"))}


# --------------------------------------------------------------------------- fonts


class FontPool:
    """The font files of the fetched packages, their cmaps, and the verified (font, code point) pairs."""

    def __init__(self, packages: dict[str, tuple[str, Path]]):
        from fontTools.ttLib import TTFont

        self.files: list[Path] = []
        self.names: list[str] = []
        for pkg in FONT_PACKAGES:
            if pkg not in packages:
                continue
            root = packages[pkg][1]
            for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in FONT_SUFFIXES and p.is_file() and not p.is_symlink()):
                self.files.append(path)
                self.names.append(f"{pkg}:{path.name}")
        if not self.files:
            raise TaskDataError(f"no font files ({', '.join(FONT_SUFFIXES)}) in the packages {', '.join(packages)}")
        self.cmaps: list[frozenset[int]] = []
        for path in self.files:
            try:
                tt = TTFont(path, lazy=True, fontNumber=0)
                self.cmaps.append(frozenset((tt.getBestCmap() or {}).keys()))
                tt.close()
            except Exception as e:  # noqa: BLE001 - fontTools raises many kinds; a broken file is one to skip
                say(f"font {path.name}: cmap unreadable ({type(e).__name__}: {e}); skipped")
                self.cmaps.append(frozenset())
        self._fonts: dict[int, object] = {}
        self._notdef: dict[int, tuple] = {}
        self._verified: dict[int, tuple[int, ...]] = {}
        self._shapes: dict[tuple[int, int], np.ndarray] = {}

    def font(self, i: int):
        from PIL import ImageFont

        if i not in self._fonts:
            self._fonts[i] = ImageFont.truetype(str(self.files[i]), EM_HI, layout_engine=ImageFont.Layout.BASIC)
        return self._fonts[i]

    def mask(self, cp: int, i: int, stroke: int = 0):
        """The glyph of ``cp`` in font ``i`` at ``EM_HI`` px/em: an "L" image cut to its ink box (None: no ink)."""
        from PIL import Image, ImageDraw

        font = self.font(i)
        ch = chr(cp)
        left, top, right, bottom = font.getbbox(ch, stroke_width=stroke, anchor="ls")
        if right <= left or bottom <= top:
            return None
        im = Image.new("L", (right - left + 2, bottom - top + 2), 0)
        ImageDraw.Draw(im).text((1 - left, 1 - top), ch, fill=255, font=font, anchor="ls", stroke_width=stroke, stroke_fill=255)
        box = im.getbbox()
        return im.crop(box) if box else None

    def _notdef_key(self, i: int) -> tuple:
        if i not in self._notdef:
            # a code point the font does not map (private use planes first): PIL draws glyph 0 for it
            probe = next((cp for cp in (0x10FFFD, 0xFFFFD, 0xE000, 0xFFFF) if cp not in self.cmaps[i]), 0x10FFFD)
            m = self.mask(probe, i)
            self._notdef[i] = (m.size, m.tobytes()) if m is not None else ()
        return self._notdef[i]

    def covering(self, cp: int) -> list[int]:
        """Font indices whose cmap maps ``cp`` (not yet verified)."""
        return [i for i, cmap in enumerate(self.cmaps) if cp in cmap]

    def verify(self, cp: int, i: int) -> bool:
        """Font ``i`` really draws ``cp``: enough ink, and not its ``.notdef`` box."""
        m = self.mask(cp, i)
        if m is None or int((np.asarray(m) > 127).sum()) < MIN_INK:
            return False
        return (m.size, m.tobytes()) != self._notdef_key(i)

    def fonts_for(self, cp: int) -> tuple[int, ...]:
        """The verified fonts of ``cp``, in pool order (memoised)."""
        if cp not in self._verified:
            self._verified[cp] = tuple(i for i in self.covering(cp) if self.verify(cp, i))
        return self._verified[cp]

    def reference_font(self, cp: int) -> int | None:
        """The font whose glyph stands for ``cp`` in shape comparisons: the first verified Regular
        font of fonts-noto-core (sorted by file name), else the first verified font."""
        fonts = self.fonts_for(cp)
        if not fonts:
            return None
        regular = [i for i in fonts if self.names[i].startswith("fonts-noto-core:") and self.files[i].stem.endswith("-Regular")]
        return min(regular, key=lambda i: self.files[i].name) if regular else fonts[0]

    def shape(self, cp: int, i: int | None = None) -> np.ndarray | None:
        """The shape vector of ``cp``: its ink box padded to a square, ``SHAPE_SIZE``² pixels, zero mean, unit norm."""
        i = self.reference_font(cp) if i is None else i
        if i is None:
            return None
        if (cp, i) not in self._shapes:
            self._shapes[(cp, i)] = shape_vector(self.mask(cp, i))
        return self._shapes[(cp, i)]


def shape_vector(mask) -> np.ndarray:
    """An ink mask padded to a square, resized to ``SHAPE_SIZE``² (box filter), zero mean, unit norm:
    the dot product of two is their shape similarity (1 for the same glyph at any size)."""
    from PIL import Image

    w, h = mask.size
    side = max(w, h)
    sq = Image.new("L", (side, side), 0)
    sq.paste(mask, ((side - w) // 2, (side - h) // 2))
    v = np.asarray(sq.resize((SHAPE_SIZE, SHAPE_SIZE), Image.BOX), dtype=np.float64).ravel()
    v = v - v.mean()
    n = np.linalg.norm(v)
    return v / n if n > 0 else v


def fetch_fonts(cache: Path, progress: Progress) -> FontPool:
    """The font pool of ``FONT_PACKAGES`` (downloaded and unpacked into ``cache`` on first use)."""
    return FontPool({p: fetch_package(p, cache, progress) for p in FONT_PACKAGES})


# --------------------------------------------------------------------------- rendering


def augment_mask(mask, rng: np.random.Generator, aug: Augment | None = None) -> np.ndarray:
    """A high-resolution ink mask ("L", cut to its ink box, drawn at ``EM_HI`` px/em) -> a 3×32×32
    uint8 image: rotated, scaled, shifted, coloured and noised with ``rng``."""
    from PIL import Image

    aug = aug or AUGMENT
    angle = float(rng.uniform(-aug.rotate_deg, aug.rotate_deg))
    em = float(rng.uniform(*aug.em_px))
    aspect = float(rng.uniform(*aug.aspect))
    dx, dy = (int(v) for v in rng.integers(-aug.shift_px, aug.shift_px + 1, size=2))
    contrast = int(rng.integers(aug.contrast[0], aug.contrast[1] + 1))
    sign = -1 if rng.random() < aug.dark_on_light else 1
    bg = int(rng.integers(contrast, 256)) if sign < 0 else int(rng.integers(0, 256 - contrast))
    sigma = float(rng.uniform(*aug.noise_sigma))
    m = mask.rotate(angle, resample=Image.BICUBIC, expand=True, fillcolor=0)
    scale = em / EM_HI
    w, h = m.size[0] * scale * aspect, m.size[1] * scale
    fit = min(1.0, aug.max_extent / max(w, h))
    w, h = max(1, round(w * fit)), max(1, round(h * fit))
    m = m.resize((w, h), Image.LANCZOS)
    canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    x = min(max((IMAGE_SIZE - w) // 2 + dx, 0), IMAGE_SIZE - w)
    y = min(max((IMAGE_SIZE - h) // 2 + dy, 0), IMAGE_SIZE - h)
    canvas.paste(m, (x, y))
    fg = bg + sign * contrast
    a = np.asarray(canvas, dtype=np.float64) / 255.0
    img = bg + (fg - bg) * a + rng.normal(0.0, sigma, size=a.shape) if sigma > 0 else bg + (fg - bg) * a
    grey = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return np.repeat(grey[None], 3, axis=0)


def render_glyph(pool: FontPool, cp: int, seed: str, aug: Augment | None = None) -> np.ndarray:
    """One augmented image (uint8 3×32×32) of code point ``cp`` in a font chosen among its verified
    fonts; everything is decided by ``seed``."""
    fonts = pool.fonts_for(cp)
    if not fonts:
        raise TaskDataError(f"no font in {', '.join(FONT_PACKAGES)} draws U+{cp:04X}")
    rng = seeded_rng(f"glyph:{cp}:{seed}")
    font = fonts[int(rng.integers(len(fonts)))]
    aug = aug or AUGMENT
    stroke = int(rng.integers(aug.stroke_hi[0], aug.stroke_hi[1] + 1))
    return augment_mask(pool.mask(cp, font, stroke), rng, aug)


def digit_mask(image8: np.ndarray):
    """A scikit-learn digit (8×8, 0..16) as a high-resolution ink mask cut to its ink box."""
    from PIL import Image

    a = np.clip(np.asarray(image8, dtype=np.float64) / 16.0 * 255.0, 0, 255).astype(np.uint8)
    side = EM_HI * 3 // 4  # about a digit's height at EM_HI
    m = Image.fromarray(a, "L").resize((side, side), Image.BICUBIC)
    box = m.getbbox()
    return m.crop(box) if box else m


def render_digit(image8: np.ndarray, seed: str, aug: Augment | None = None) -> np.ndarray:
    """One augmented image (uint8 3×32×32) of a scikit-learn digit, decided by ``seed``."""
    rng = seeded_rng(f"digit:{seed}")
    return augment_mask(digit_mask(image8), rng, aug)


# --------------------------------------------------------------------------- classes


def _letters(ranges: tuple[tuple[int, int], ...] | str) -> list[int]:
    if isinstance(ranges, str):
        return [ord(c) for c in ranges]
    return [cp for lo, hi in ranges for cp in range(lo, hi + 1) if unicodedata.category(chr(cp)) in LETTER_CATEGORIES]


def select_mixture(pool: FontPool) -> list[int]:
    """The pre-training classes: ``MIXTURE``'s code points in order, with ``MIN_FONTS`` verified
    fonts, none whose shape is ``DUPLICATE_SIM`` like an earlier one."""
    kept: list[int] = []
    shapes: list[np.ndarray] = []
    for _, spec in MIXTURE:
        for cp in _letters(spec):
            if len(pool.fonts_for(cp)) < MIN_FONTS:
                continue
            v = pool.shape(cp)
            if shapes and float((np.stack(shapes) @ v).max()) >= DUPLICATE_SIM:
                continue
            kept.append(cp)
            shapes.append(v)
    return kept


def select_task_classes(pool: FontPool, name: str, mixture: Sequence[int], n_classes: int = N_CLASSES) -> list[int]:
    """``n_classes`` letters of script ``name`` (sorted): drawn in a seeded order from its letters with
    ``MIN_FONTS`` verified fonts, skipping homoglyphs of the mixture and of letters already taken."""
    ref = np.stack([pool.shape(cp) for cp in mixture])
    cands = [cp for cp in _letters(SCRIPTS[name]) if cp not in set(mixture) and len(pool.fonts_for(cp)) >= MIN_FONTS]
    cands = [cp for cp in cands if float((ref @ pool.shape(cp)).max()) < HOMOGLYPH_SIM]
    random.Random(f"glyph-classes:{name}").shuffle(cands)
    chosen: list[int] = []
    for cp in cands:
        if all(float(pool.shape(cp) @ pool.shape(o)) < HOMOGLYPH_SIM for o in chosen):
            chosen.append(cp)
            if len(chosen) == n_classes:
                break
    if len(chosen) < 2:
        raise TaskDataError(f"glyph task {name}: only {len(chosen)} usable letters in the fonts")
    return sorted(chosen)


def class_name(cp: int) -> str:
    return unicodedata.name(chr(cp), f"U+{cp:04X}")


def digit_class(d: int) -> str:
    return f"handwritten digit {d}"


class _Fonts:
    """The font pool, built on first need (a warm cache needs no font file opened)."""

    def __init__(self, cache: Path, progress: Progress):
        self.packages = {p: fetch_package(p, cache, progress) for p in FONT_PACKAGES}
        self.versions = {p: v for p, (v, _) in sorted(self.packages.items())}
        self._pool: FontPool | None = None

    @property
    def pool(self) -> FontPool:
        if self._pool is None:
            self._pool = FontPool(self.packages)
        return self._pool


def _identity(fonts: _Fonts) -> dict:
    return {"builder_version": BUILDER_VERSION, "packages": fonts.versions, "render": render_versions(),
            "augment": asdict(AUGMENT), "image_size": IMAGE_SIZE, "em_hi": EM_HI, "min_ink": MIN_INK}


def suite_classes(fonts: _Fonts, cache: Path, progress: Progress) -> dict:
    """``{"mixture": [cp...], "tasks": {name: [cp...]}}``, cached as ``glyph/classes-<key>.json``."""
    ident = {**_identity(fonts), "mixture": [[g, list(s) if not isinstance(s, str) else s] for g, s in MIXTURE],
             "scripts": {k: [list(r) for r in v] for k, v in SCRIPTS.items()}, "duplicate_sim": DUPLICATE_SIM,
             "homoglyph_sim": HOMOGLYPH_SIM, "min_fonts": MIN_FONTS, "n_classes": N_CLASSES, "shape_size": SHAPE_SIZE}
    path = cache / "glyph" / f"classes-{_key(ident)}.json"
    if path.is_file():
        return json.loads(path.read_text("utf-8"))
    progress("glyph classes: choosing (cmaps, verified glyphs, shapes)")
    pool = fonts.pool
    mixture = select_mixture(pool)
    tasks = {name: select_task_classes(pool, name, mixture) for name in SCRIPTS}
    out = {"mixture": mixture, "tasks": tasks, "identity": ident,
           "names": {str(cp): class_name(cp) for cp in sorted({*mixture, *(c for v in tasks.values() for c in v)})}}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(out, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    progress(f"glyph classes: {len(mixture)} pre-training classes, {len(tasks)} script tasks")
    return out


# --------------------------------------------------------------------------- task files


def _write_split(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    from mergewatch.checkpoint.writer import write_safetensors_file

    write_safetensors_file(path, {"images": torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)),
                                  "labels": torch.from_numpy(np.asarray(labels, dtype=np.int64))})


def _shuffled(name: str, images: list[np.ndarray], labels: list[int]) -> tuple[np.ndarray, np.ndarray]:
    order = seeded_rng(f"{name}:order").permutation(len(labels))
    return np.stack(images)[order], np.asarray(labels, dtype=np.int64)[order]


def _digit_splits(n_train: int, n_test: int) -> tuple[list[str], dict]:
    from sklearn.datasets import load_digits

    d = load_digits()
    splits: dict[str, tuple[list[np.ndarray], list[int]]] = {"train": ([], []), "test": ([], [])}
    for y in range(10):
        idx = np.flatnonzero(d.target == y)
        idx = idx[seeded_rng(f"digits:{y}").permutation(len(idx))]
        if len(idx) < n_train + n_test:
            raise TaskDataError(f"glyph task digits: class {y} has {len(idx)} images, fewer than {n_train} + {n_test}")
        for split, chosen in (("train", idx[:n_train]), ("test", idx[n_train:n_train + n_test])):
            for i in chosen:
                splits[split][0].append(render_digit(d.images[i], f"{split}:{i}"))
                splits[split][1].append(y)
    return [digit_class(y) for y in range(10)], splits


def build_task(name: str, classes: dict, fonts: _Fonts, cache: Path, *, train_per_class: int, test_per_class: int,
               progress: Progress) -> Path:
    """The task directory of ``name`` (built now when missing)."""
    ident = {**_identity(fonts), "task": name, "train_per_class": train_per_class, "test_per_class": test_per_class}
    if name == DIGITS_TASK:
        import sklearn

        ident["sklearn"] = sklearn.__version__
        ident["packages"] = {}  # the digits do not depend on the fonts
    else:
        ident["code_points"] = classes["tasks"][name]
    final = cache / "glyph" / "tasks" / f"{name}-{_key(ident)}"
    if (final / "task.json").is_file():
        progress(f"glyph task {name}: cached")
        return final
    if name == DIGITS_TASK:
        names, raw = _digit_splits(train_per_class, test_per_class)
    else:
        pool = fonts.pool
        cps = classes["tasks"][name]
        names = [class_name(cp) for cp in cps]
        raw = {}
        for split, n in (("train", train_per_class), ("test", test_per_class)):
            images, labels = [], []
            for y, cp in enumerate(cps):
                for i in range(n):
                    images.append(render_glyph(pool, cp, f"{name}:{split}:{i}"))
                    labels.append(y)
            raw[split] = (images, labels)
    splits = {split: _shuffled(f"{name}:{split}", *raw[split]) for split in ("train", "test")}
    meta = {**ident, "classes": names, "counts": {s: len(v[1]) for s, v in splits.items()}}
    final.parent.mkdir(parents=True, exist_ok=True)
    write_task_dir(final, {
        "train.safetensors": lambda p: _write_split(p, *splits["train"]),
        "test.safetensors": lambda p: _write_split(p, *splits["test"]),
        "classes.txt": "".join(n + "\n" for n in names),
        "task.json": json.dumps(meta, indent=1, sort_keys=True, ensure_ascii=False) + "\n",
    })
    progress(f"glyph task {name}: {len(names)} classes, {meta['counts']['train']} train / {meta['counts']['test']} test images")
    return final


def read_split(task_dir: Path, split: str):
    """``(images uint8 [N, 3, 32, 32], labels int64 [N])`` of a task directory's split, as torch tensors."""
    from mergewatch.checkpoint.reader import LazyCheckpoint

    ck = LazyCheckpoint(Path(task_dir) / f"{split}.safetensors")
    return ck["images"], ck["labels"].to(torch.int64)


# --------------------------------------------------------------------------- suite


@dataclass(frozen=True)
class SuiteParams:
    """Sizes and hyper-parameters of one suite mode (all of them are in the cache keys)."""

    train_per_class: int
    test_per_class: int
    shots: int
    pretrain: gm.PretrainParams
    finetune: dict[str, gm.FinetuneParams]


#: CI size: 3 tasks (``QUICK_TASKS``) of 30 train / 20 test images per class, θ0 from 300 episodes
#: (19 200 images). Measured cold in an empty cache (18 MB of fonts downloaded, classes chosen in
#: 8.5 s, θ0 pre-trained in 61–67 s, experts 3–4 s each): 97 s; warm 1.8 s. Test accuracy θ0 -> light
#: -> strong expert: georgian 0.640 -> 0.790 -> 0.925, thai 0.575 -> 0.750 -> 0.925, digits 0.560
#: -> 0.685 -> 0.785 (chance 0.1). The plain average of the 3 light experts scores 0.685 / 0.635 / 0.615.
QUICK = SuiteParams(train_per_class=30, test_per_class=20, shots=5, pretrain=gm.PretrainParams(steps=300),
                    finetune={"light": gm.FinetuneParams(steps=40, batch_size=32, lr=1e-4),
                              "strong": gm.FinetuneParams(steps=80, batch_size=32, lr=5e-4)})
#: 20 tasks of 100 train / 50 test images per class, θ0 from 600 episodes (38 400 images, 132 s; 1500
#: episodes took 292 s and gave a θ0 so good, mean 0.88, that the experts had little left to gain).
#: Experts: light about 10 s each (20 in 3.5 min), strong about 29 s each (20 in 10 min). Test
#: accuracy, mean over the 20 tasks: θ0 0.83 (0.59 bengali to 0.96 tifinagh), light experts 0.98
#: (0.89 digits to 1.0), strong experts 0.99 (each at least 0.97 except digits, 0.94). Task vectors:
#: norm 2.7 (light) / 7.7 (strong), mean pairwise cosine 0.17 / 0.09. Merging 20 interferes: the plain
#: average of the 20 experts scores 0.81 (light) / 0.81 (strong), below θ0; θ0 + 0.3 Σ τ 0.53 / 0.58.
FULL = SuiteParams(train_per_class=100, test_per_class=50, shots=5, pretrain=gm.PretrainParams(steps=600),
                   finetune={"light": gm.FinetuneParams(steps=100, batch_size=32, lr=1e-4),
                             "strong": gm.FinetuneParams(steps=300, batch_size=32, lr=5e-4)})
QUICK_TASKS = ("georgian", "thai", "digits")
STRENGTHS = ("light", "strong")


@dataclass(frozen=True)
class GlyphTask:
    """One downstream task: ``data`` is the test split the evaluator scores (``tensors`` format, its
    ``classes.txt`` beside it), ``head`` θ0's prototype head, ``train`` the split the experts learn."""

    data: Path
    head: Path
    classes: list[str]
    train: Path


@dataclass
class GlyphSuite:
    base: Path
    model_config: Path
    tasks: dict[str, GlyphTask]
    experts: dict[str, Path]
    strength: str = "light"
    quick: bool = False
    #: measured while building: θ0's record (pre-training stats) and per task θ0/expert test accuracy
    stats: dict = field(default_factory=dict)
    #: what ``expert_from`` needs: θ0's record, the fine-tuning parameters, the cache and the progress sink
    context: dict = field(default_factory=dict, repr=False)

    def eval_table(self, *, batch_size: int = 256, threads: int = 2, held_out: Collection[str] = ()) -> dict:
        """The raw ``[eval]`` table of the ``heads`` evaluator over the test splits (absolute paths);
        the tasks named in ``held_out`` are marked so (scored for A_ZS, never merged)."""
        return {"evaluator": "heads", "model": str(self.model_config), "batch_size": batch_size, "threads": threads,
                "tasks": [{"name": n, "data": str(t.data), "classes": str(t.data.parent / "classes.txt"),
                           "head": str(t.head), "held_out": n in held_out} for n, t in self.tasks.items()]}

    def expert_from(self, name: str, init: Path) -> Path:
        """The expert of task ``name`` at this suite's strength fine-tuned from the checkpoint ``init``
        instead of θ0 (TIME's init axis), cached by ``init``'s content."""
        c = self.context
        return expert_for(name, self.strength, self.tasks[name].train.parent, self.tasks[name].head, self.base,
                          c["base_rec"], self.model_config, c["ft"], c["root"], c["progress"], init=init)[0]


def task_names(n_tasks: int | None, quick: bool) -> list[str]:
    """The suite's tasks: ``QUICK_TASKS`` (quick) or ``TASKS``, then the rest of ``TASKS`` in order,
    cut to ``n_tasks`` (None: the whole first list)."""
    first = list(QUICK_TASKS) if quick else list(TASKS)
    if n_tasks is None:
        return first
    if isinstance(n_tasks, bool) or not isinstance(n_tasks, int) or not 0 <= n_tasks <= len(TASKS):
        raise ValueError(f"n_tasks must be an integer in 0..{len(TASKS)}, got {n_tasks!r}")
    return (first + [t for t in TASKS if t not in first])[:n_tasks]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, obj: dict) -> None:
    atomic_write(path, json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n")


def model_config_path(cache: Path) -> Path:
    """``glyph/model/glyph-vit-<key>.json``: the model config, named by the hash of its content."""
    cfg = gm.model_config()
    path = cache / "glyph" / "model" / f"glyph-vit-{_key(cfg)}.json"
    if not path.is_file():
        gm.write_model_config(path)
    return path


def base_for(fonts: _Fonts, classes: dict, config: Path, params: gm.PretrainParams, cache: Path,
             progress: Progress) -> tuple[Path, dict]:
    """θ0 (pre-trained now when missing); ``(path, its json record)``."""
    from mergewatch.checkpoint.writer import write_safetensors_file

    mixture = classes["mixture"]
    ident = {**_identity(fonts), "mixture": mixture, "model": gm.model_config(), "pretrain": asdict(params)}
    path = cache / "glyph" / "base" / f"theta0-{_key(ident)}.safetensors"
    record = path.with_suffix(".json")
    if path.is_file() and record.is_file():
        progress(f"glyph θ0: cached ({path})")
        return path, json.loads(record.read_text("utf-8"))
    pool = fonts.pool
    k = len(mixture)
    if params.ways > k:
        raise ValueError(f"{params.ways} ways but only {k} pre-training classes")
    per = params.support + params.query

    def sampler(step: int) -> torch.Tensor:
        chosen = seeded_rng(f"glyph-pretrain:{params.seed}:{step}").choice(k, size=params.ways, replace=False)
        images = [render_glyph(pool, mixture[c], f"pretrain:{params.seed}:{step}:{j}") for c in chosen for j in range(per)]
        return torch.from_numpy(np.stack(images)).view(params.ways, per, 3, IMAGE_SIZE, IMAGE_SIZE)

    progress(f"glyph θ0: pre-training {params.steps} episodes ({params.ways} of {k} classes × "
             f"{params.support}+{params.query} images, lr {params.lr}, {params.threads} threads)")

    def report(step: int, steps: int, loss: float) -> None:
        progress(f"glyph θ0: step {step}/{steps} loss {loss:.3f}")

    state, stats = gm.pretrain(config, sampler, params, progress=report, progress_every=max(1, params.steps // 5))
    path.parent.mkdir(parents=True, exist_ok=True)
    sha = write_safetensors_file(path, state)
    rec = {**ident, "content_sha256": sha, "classes": k, "stats": stats}
    _write_json(record, rec)
    progress(f"glyph θ0: done in {stats['seconds']:.1f}s (episode accuracy {stats['episode_accuracy_last_tenth']:.2f})")
    return path, rec


def head_for(name: str, task_dir: Path, base: Path, base_rec: dict, config: Path, shots: int, cache: Path,
             progress: Progress) -> Path:
    """θ0's prototype head of a task (computed now when missing)."""
    from mergewatch.checkpoint.writer import write_safetensors_file

    ident = {"builder_version": BUILDER_VERSION, "base": base_rec["content_sha256"], "task": task_dir.name,
             "shots": shots, "logit_scale": gm.HEAD_LOGIT_SCALE}
    path = cache / "glyph" / "heads" / f"{name}-{_key(ident)}.safetensors"
    if path.is_file():
        return path
    images, labels = read_split(task_dir, "train")
    n_classes = int(labels.max()) + 1
    with pinned_threads(base_rec["pretrain"]["threads"]):
        visual = gm.load_checkpoint(gm.build_visual(config), base)
        weight = gm.prototype_head(visual, images, labels, n_classes, shots=shots)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors_file(path, {"weight": weight})
    progress(f"glyph head {name}: {n_classes} prototypes of {shots} shots")
    return path


def expert_for(name: str, strength: str, task_dir: Path, head: Path, base: Path, base_rec: dict, config: Path,
               ft: gm.FinetuneParams, cache: Path, progress: Progress, init: Path | None = None) -> tuple[Path, dict]:
    """The expert of a task at a strength (fine-tuned now when missing); ``(path, its json record)``.
    ``init``: fine-tune from this checkpoint (a published init view's file) instead of θ0; its content
    sha256 is part of the key, and ``theta0_test_accuracy`` is then the start point's accuracy."""
    from mergewatch.checkpoint.reader import LazyCheckpoint
    from mergewatch.checkpoint.writer import write_safetensors_file

    ident = {"builder_version": BUILDER_VERSION, "base": base_rec["content_sha256"], "task": task_dir.name,
             "train_sha256": _sha256_file(task_dir / "train.safetensors"), "head_sha256": _sha256_file(head),
             "strength": strength, "ft": asdict(ft), "trained_prefix": gm.CHECKPOINT_PREFIX + gm.TRAINED_PREFIX}
    if init is not None:
        ident["init_sha256"] = _sha256_file(init)
    what = f"glyph expert {name} ({strength}" + (f", from init {ident['init_sha256'][:12]})" if init is not None else ")")
    path = cache / "glyph" / "experts" / f"{name}-{strength}-{_key(ident)}.safetensors"
    record = path.with_suffix(".json")
    if path.is_file() and record.is_file():
        progress(f"{what}: cached")
        return path, json.loads(record.read_text("utf-8"))
    images, labels = read_split(task_dir, "train")
    weight = LazyCheckpoint(head)["weight"].float()
    ck = LazyCheckpoint(base if init is None else init)
    start = {k: ck[k] for k in ck}
    progress(f"{what}: fine-tuning {ft.steps} steps (batch {ft.batch_size}, lr {ft.lr})")

    def report(step: int, steps: int, loss: float) -> None:
        progress(f"{what}: step {step}/{steps} loss {loss:.3f}")

    state, stats = gm.finetune(config, start, weight, images, labels, ft, progress=report, progress_every=max(1, ft.steps // 4))
    test_x, test_y = read_split(task_dir, "test")
    with pinned_threads(ft.threads):
        stats["theta0_test_accuracy"] = gm.accuracy(gm.load_checkpoint(gm.build_visual(config), start), weight, test_x, test_y)
        stats["expert_test_accuracy"] = gm.accuracy(gm.load_checkpoint(gm.build_visual(config), state), weight, test_x, test_y)
    path.parent.mkdir(parents=True, exist_ok=True)
    sha = write_safetensors_file(path, state)
    rec = {**ident, "content_sha256": sha, "stats": stats}
    _write_json(record, rec)
    progress(f"{what}: done in {stats['seconds']:.1f}s, test accuracy "
             f"{'θ0' if init is None else 'init'} {stats['theta0_test_accuracy']:.3f} -> {stats['expert_test_accuracy']:.3f}")
    return path, rec


def build_glyph_suite(n_tasks: int | None, *, quick: bool, strength: str = "light",
                      progress: Progress | None = say, cache: str | os.PathLike | None = None,
                      no_expert: Collection[str] = ()) -> GlyphSuite:
    """Build (or find in the cache) the glyph suite: fonts, classes, task files, θ0, and per task its
    prototype head and its expert at ``strength`` (none for the tasks in ``no_expert``: held-out
    tasks). ``n_tasks``: see ``task_names``. ``progress``: a callable receiving one line per stage
    (default: stderr), None for silence. ``cache``: the quality cache (default
    ``text_tasks.cache_root()``)."""
    if strength not in STRENGTHS:
        raise ValueError(f"strength must be one of {', '.join(STRENGTHS)}, got {strength!r}")
    names = task_names(n_tasks, quick)
    out = progress or (lambda _msg: None)
    root = cache_root(cache)
    params = QUICK if quick else FULL
    fonts = _Fonts(root, out)
    classes = suite_classes(fonts, root, out)
    config = model_config_path(root)
    dirs = {n: build_task(n, classes, fonts, root, train_per_class=params.train_per_class,
                          test_per_class=params.test_per_class, progress=out) for n in names}
    base, base_rec = base_for(fonts, classes, config, params.pretrain, root, out)
    tasks, experts, per_task = {}, {}, {}
    for n, d in dirs.items():
        head = head_for(n, d, base, base_rec, config, params.shots, root, out)
        tasks[n] = GlyphTask(data=d / "test.safetensors", head=head, train=d / "train.safetensors",
                             classes=[ln for ln in (d / "classes.txt").read_text("utf-8").splitlines() if ln])
        if n in no_expert:
            continue
        experts[n], rec = expert_for(n, strength, d, head, base, base_rec, config, params.finetune[strength], root, out)
        per_task[n] = {k: rec["stats"][k] for k in ("theta0_test_accuracy", "expert_test_accuracy", "seconds")}
    return GlyphSuite(base=base, model_config=config, tasks=tasks, experts=experts, strength=strength, quick=quick,
                      stats={"pretrain": base_rec["stats"], "pretrain_classes": base_rec["classes"], "tasks": per_task},
                      context={"base_rec": base_rec, "ft": params.finetune[strength], "root": root, "progress": out})
