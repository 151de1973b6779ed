"""Evaluation data (issue 9 §3): ImageFolder directories, safetensors tensor datasets, JSONL text.

Nothing downloads: every task's data is a local path. Opening a dataset (``open_dataset``) runs the
cheap load-time checks the config loader needs to fail fast — the file or directory exists, the
class names are there, labels are in range, the dataset is not empty, the tensor shapes and dtypes
are right — and reads no pixels. Images are decoded at evaluation time, batch by batch; a corrupt
image then is an ``EvalError`` naming the task and the file.

Formats
  * ``imagefolder``: ``<data>/<class dir>/<image>``; class ``i`` is the ``i``-th sub-directory in
    sorted order (torchvision's ImageFolder rule). The class-names file, when given, holds the
    names used in prompts, one per line in that same order (its line count must equal the number
    of sub-directories); without one the sub-directory names are the class names. Files whose
    suffix is not an image suffix, and hidden files, are ignored.
  * ``tensors``: a ``.safetensors`` file with ``images`` (uint8, N×3×H×W) and ``labels`` (an
    integer dtype, shape [N]); other tensors are ignored. Images are read one batch at a time with
    positioned reads, so memory does not grow with N.
  * ``jsonl``: one JSON object per non-blank line, ``{"text": str, "label": int}`` (other fields
    ignored).

Class-names files are UTF-8, one name per line, surrounding whitespace stripped and blank lines
skipped; duplicates are refused (two classes with one prompt cannot be told apart). For the
``tensors`` and ``jsonl`` formats the file is required; when the config does not name one it is
looked up beside the data as ``<stem>.classes.txt``, then ``classes.txt``.
"""

from __future__ import annotations

import io
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from mergewatch.eval.base import EvalError

FORMATS = ("imagefolder", "tensors", "jsonl")
IMAGE_FORMATS = ("imagefolder", "tensors")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
INT_CODES = ("I64", "I32", "I16", "I8", "U8")


class DataError(EvalError):
    """A dataset is missing or malformed. ``field`` is the task option at fault: data, classes or head."""

    def __init__(self, task: str, path, message: str, field: str = "data"):
        self.task = task
        self.path = str(path)
        self.field = field
        super().__init__(f"task {task!r}: {path}: {message}")


def detect_format(path: Path) -> str | None:
    """The format a path implies: a directory is ImageFolder, ``.safetensors`` tensors, ``.jsonl`` text."""
    if path.is_dir():
        return "imagefolder"
    if path.suffix == ".safetensors":
        return "tensors"
    if path.suffix == ".jsonl":
        return "jsonl"
    return None


def default_classes_file(data: Path) -> Path | None:
    """``<stem>.classes.txt`` beside a data file, else ``classes.txt`` beside it; None if neither exists."""
    for cand in (data.with_name(f"{data.stem}.classes.txt"), data.with_name("classes.txt")):
        if cand.is_file():
            return cand
    return None


def read_class_names(task: str, path: Path) -> tuple[str, ...]:
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        raise DataError(task, path, "class-names file not found", "classes") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(task, path, f"cannot read the class-names file: {e}", "classes") from e
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not names:
        raise DataError(task, path, "the class-names file lists no class", "classes")
    seen: set[str] = set()
    for i, n in enumerate(names):
        if n in seen:
            raise DataError(task, path, f"class name {n!r} is listed twice (line {i + 1})", "classes")
        seen.add(n)
    return names


# Datasets ----------------------------------------------------------------------------------------

@dataclass
class ImageFolderDataset:
    task: str
    root: Path
    classes: tuple[str, ...]
    items: list[tuple[Path, int]]
    kind = "image"

    def __len__(self) -> int:
        return len(self.items)

    def batches(self, batch_size: int, preprocess: Callable) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images [B, 3, H, W] float, labels [B]) after ``preprocess`` (PIL image -> tensor)."""
        from PIL import Image

        for lo in range(0, len(self.items), batch_size):
            chunk = self.items[lo:lo + batch_size]
            xs = []
            for path, _ in chunk:
                try:
                    with Image.open(path) as im:
                        im.load()
                        xs.append(preprocess(im))
                except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # PIL's errors for bad files
                    raise EvalError(f"task {self.task!r}: {path}: cannot decode the image: {e}") from e
            yield torch.stack(xs), torch.tensor([y for _, y in chunk], dtype=torch.int64)


@dataclass
class TensorDataset:
    task: str
    path: Path
    classes: tuple[str, ...]
    labels: torch.Tensor  # int64 [N]
    image_shape: tuple[int, int, int]  # C, H, W
    images_start: int  # absolute byte offset of the uint8 images tensor in the file
    kind = "image"

    def __len__(self) -> int:
        return int(self.labels.numel())

    def read_images(self, lo: int, hi: int) -> torch.Tensor:
        """Images ``lo:hi`` as uint8 [hi-lo, C, H, W], read with one positioned read."""
        c, h, w = self.image_shape
        row = c * h * w
        n = (hi - lo) * row
        raw = torch.empty(n, dtype=torch.uint8)
        try:
            with open(self.path, "rb", buffering=0) as f:
                f.seek(self.images_start + lo * row)
                view = memoryview(raw.numpy())
                got = 0
                while got < n:
                    k = f.readinto(view[got:])
                    if not k:
                        break
                    got += k
        except OSError as e:
            raise EvalError(f"task {self.task!r}: {self.path}: cannot read images: {e}") from e
        if got != n:
            raise EvalError(f"task {self.task!r}: {self.path}: short read of images {lo}:{hi} (file changed or truncated)")
        return raw.reshape(hi - lo, c, h, w)

    def batches(self, batch_size: int, preprocess: Callable) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Each uint8 image goes through the same ``preprocess`` as a decoded image file (via PIL), so
        a tensor whose H×W differs from the model's input is resized and centre-cropped exactly as
        an ImageFolder image would be (a decision: resize rather than refuse; with the input size
        already right the resize is the identity and the result is (x/255 - mean)/std)."""
        from torchvision.transforms.functional import to_pil_image

        for lo in range(0, len(self), batch_size):
            hi = min(lo + batch_size, len(self))
            imgs = self.read_images(lo, hi)
            xs = [preprocess(to_pil_image(im)) for im in imgs]
            yield torch.stack(xs), self.labels[lo:hi]


@dataclass
class TextDataset:
    task: str
    path: Path
    classes: tuple[str, ...]
    texts: list[str]
    labels: torch.Tensor  # int64 [N]
    kind = "text"

    def __len__(self) -> int:
        return len(self.texts)

    def batches(self, batch_size: int, preprocess: Callable | None = None) -> Iterator[tuple[list[str], torch.Tensor]]:
        for lo in range(0, len(self.texts), batch_size):
            yield self.texts[lo:lo + batch_size], self.labels[lo:lo + batch_size]


Dataset = ImageFolderDataset | TensorDataset | TextDataset


def open_dataset(task) -> Dataset:
    """Open ``task.data`` in ``task.format`` and run the load-time checks; raises ``DataError``."""
    data = Path(task.data)
    if not data.exists():
        raise DataError(task.name, data, "not found")
    if task.format == "imagefolder":
        return _open_imagefolder(task, data)
    if task.format == "tensors":
        return _open_tensors(task, data)
    if task.format == "jsonl":
        return _open_jsonl(task, data)
    raise DataError(task.name, data, f"unknown format {task.format!r}; allowed: {', '.join(FORMATS)}", "format")


def _classes_for_file(task, data: Path) -> tuple[str, ...]:
    path = Path(task.classes) if task.classes is not None else default_classes_file(data)
    if path is None:
        raise DataError(
            task.name, data,
            f"class-names file missing: name one with 'classes' or put {data.stem}.classes.txt or classes.txt beside the data",
            "classes",
        )
    return read_class_names(task.name, path)


def _check_labels(task, data: Path, labels: torch.Tensor, n_classes: int, classes_file) -> None:
    if labels.numel() == 0:
        raise DataError(task.name, data, "the dataset is empty")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= n_classes:
        bad = lo if lo < 0 else hi
        idx = int(((labels < 0) | (labels >= n_classes)).nonzero()[0])
        where = f" ({classes_file})" if classes_file else ""
        raise DataError(task.name, data, f"label {bad} at example {idx} is out of range: {n_classes} classes{where}, labels must be in [0, {n_classes - 1}]")


def _open_imagefolder(task, root: Path) -> ImageFolderDataset:
    if not root.is_dir():
        raise DataError(task.name, root, "format 'imagefolder' needs a directory of class sub-directories")
    try:
        dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as e:
        raise DataError(task.name, root, f"cannot list the directory: {e}") from e
    if not dirs:
        raise DataError(task.name, root, "no class sub-directories (ImageFolder layout: <data>/<class>/<image>)")
    if task.classes is not None:
        names = read_class_names(task.name, Path(task.classes))
        if len(names) != len(dirs):
            raise DataError(
                task.name, task.classes,
                f"lists {len(names)} class names but {root} has {len(dirs)} class sub-directories (one name per sorted sub-directory)",
                "classes",
            )
    else:
        names = tuple(d.name for d in dirs)
    items = []
    for label, d in enumerate(dirs):
        for f in sorted(d.iterdir()):
            if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_SUFFIXES:
                items.append((f, label))
    if not items:
        raise DataError(task.name, root, f"the dataset is empty: no image files ({', '.join(IMAGE_SUFFIXES)}) in its class sub-directories")
    return ImageFolderDataset(task.name, root, names, items)


def _open_tensors(task, path: Path) -> TensorDataset:
    from mergewatch.checkpoint.reader import read_header
    from mergewatch.errors import CheckpointError

    if not path.is_file():
        raise DataError(task.name, path, "format 'tensors' needs a .safetensors file")
    try:
        infos, _ = read_header(path)
    except CheckpointError as e:
        raise DataError(task.name, path, f"not a valid safetensors file: {e.reason}") from e
    except OSError as e:
        raise DataError(task.name, path, f"cannot read: {e}") from e
    for key in ("images", "labels"):
        if key not in infos:
            raise DataError(task.name, path, f"missing tensor '{key}' (a tensor dataset holds 'images' uint8 N×3×H×W and 'labels' [N])")
    im, lb = infos["images"], infos["labels"]
    if im.dtype != "U8":
        raise DataError(task.name, path, f"'images' must be uint8, got {im.torch_dtype}")
    if len(im.shape) != 4 or im.shape[1] != 3:
        raise DataError(task.name, path, f"'images' must have shape N×3×H×W, got {list(im.shape)}")
    if im.shape[2] < 1 or im.shape[3] < 1:
        raise DataError(task.name, path, f"'images' has an empty image size {list(im.shape)}")
    if lb.dtype not in INT_CODES or len(lb.shape) != 1:
        raise DataError(task.name, path, f"'labels' must be a 1-D integer tensor, got {lb.torch_dtype} {list(lb.shape)}")
    if lb.shape[0] != im.shape[0]:
        raise DataError(task.name, path, f"'labels' has {lb.shape[0]} entries but 'images' has {im.shape[0]}")
    classes = _classes_for_file(task, path)
    if im.shape[0] == 0:
        raise DataError(task.name, path, "the dataset is empty")
    labels = _read_small(path, lb).to(torch.int64)
    _check_labels(task, path, labels, len(classes), task.classes)
    return TensorDataset(task.name, path, classes, labels, tuple(im.shape[1:]), im.start)


def _read_small(path: Path, info) -> torch.Tensor:
    with open(path, "rb") as f:
        f.seek(info.start)
        raw = f.read(info.nbytes)
    return torch.frombuffer(bytearray(raw), dtype=info.torch_dtype).reshape(info.shape).clone() if raw else torch.empty(info.shape, dtype=info.torch_dtype)


def _open_jsonl(task, path: Path) -> TextDataset:
    if not path.is_file():
        raise DataError(task.name, path, "format 'jsonl' needs a file of JSON lines")
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(task.name, path, f"cannot read: {e}") from e
    classes = _classes_for_file(task, path)
    texts, labels = [], []
    for no, line in enumerate(io.StringIO(text), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise DataError(task.name, path, f"line {no}: not valid JSON: {e}") from e
        if not isinstance(row, dict):
            raise DataError(task.name, path, f"line {no}: expected an object {{\"text\": ..., \"label\": ...}}")
        t, y = row.get("text"), row.get("label")
        if not isinstance(t, str):
            raise DataError(task.name, path, f"line {no}: 'text' must be a string, got {t!r}")
        if isinstance(y, bool) or not isinstance(y, int):
            raise DataError(task.name, path, f"line {no}: 'label' must be an integer, got {y!r}")
        if not 0 <= y < len(classes):
            raise DataError(task.name, path, f"line {no}: label {y} is out of range: {len(classes)} classes, labels must be in [0, {len(classes) - 1}]")
        texts.append(t)
        labels.append(y)
    if not texts:
        raise DataError(task.name, path, "the dataset is empty")
    return TextDataset(task.name, path, classes, texts, torch.tensor(labels, dtype=torch.int64))


# Progress ---------------------------------------------------------------------------------------

class EvalProgress:
    """``task [#####.....] done/total`` on a terminal only (quiet otherwise, as the CLI's Progress)."""

    def __init__(self, task: str, total: int, stream=None, enabled: bool | None = None):
        self.stream = stream or sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.enabled = (callable(isatty) and isatty()) if enabled is None else enabled
        self.task, self.total, self.done = task, total, 0
        self._last = 0.0

    def update(self, k: int) -> None:
        self.done += k
        if not self.enabled:
            return
        now = time.monotonic()
        if self.done < self.total and now - self._last < 0.1:
            return
        self._last = now
        width = 30
        filled = width * self.done // max(self.total, 1)
        self.stream.write(f"\r  eval {self.task:<18} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total}")
        if self.done >= self.total:
            self.stream.write("\n")
        self.stream.flush()
