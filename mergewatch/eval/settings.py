"""The ``[eval]`` table: evaluator, tasks and their data, batching, the deploy gate (issue 9).

``parse_eval(data, root, base)`` turns the TOML table into frozen, picklable settings (the daemon
sends them to its evaluation worker) and runs every cheap load-time check, so ``mergewatch run`` and
``mergewatch merge`` fail fast on a bad task: the data exists and parses, the class names are there,
labels are in range, the dataset is not empty, tensor images are uint8 N×3×H×W, a linear head has
the right shape, the CLIP architecture is known. Errors are ``ConfigError`` with a dotted key in
the index style ``eval.tasks[0].data`` (0-based, like ``model.roles[0]``) and a message that names
the task and the file. Paths are relative to the config file's directory (``root``).

``light=True`` (the CLI verbs that never evaluate: ``status``, ``rollback``, ...) checks the keys,
types and ranges only and opens nothing (no data, model config, checkpoint or base), so that it
imports neither torch nor open_clip (issue 14).

Example::

    [eval]
    evaluator = "clip_zeroshot"     # clip_zeroshot | text_zeroshot | heads | plugin
    model = "ViT-B-32"              # open_clip architecture, or a model-config JSON path
    batch_size = 64
    threads = 1
    gate_max_drop = 0.02

    [[eval.tasks]]
    name = "cars"
    data = "eval/cars"              # ImageFolder dir | *.safetensors | *.jsonl
    templates = ["a photo of a {}.", "a photo of the {}, a type of car."]
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from mergewatch.errors import ConfigError

EVALUATORS = ("clip_zeroshot", "text_zeroshot", "heads", "plugin")
IMAGE_TEMPLATES = ("a photo of a {}.",)
TEXT_TEMPLATES = ("{}",)

#: evaluator options each evaluator accepts (any other of them set is an error naming the key)
EVALUATOR_OPTIONS = {
    "clip_zeroshot": ("model", "text_checkpoint"),
    "heads": ("model",),
    "text_zeroshot": ("model", "logit_scale", "max_length"),
    "plugin": ("plugin", "model"),  # a plugin may use ``model`` as it likes (passed through settings)
}
OPTION_KEYS = ("model", "text_checkpoint", "plugin", "logit_scale", "max_length")
#: a text model directory needs one of these (transformers would otherwise build an empty tokenizer)
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model")
TASK_KEYS = ("name", "data", "format", "classes", "templates", "held_out", "head")


@dataclass(frozen=True)
class TaskSettings:
    name: str
    data: Path
    format: str  # imagefolder | tensors | jsonl
    classes: Path | None = None
    templates: tuple[str, ...] = IMAGE_TEMPLATES
    held_out: bool = False  # TIME zero-shot retention task (never used for experts)
    head: Path | None = None  # heads evaluator: safetensors with "weight" [C, D] (+ "bias" [C])


@dataclass(frozen=True)
class EvalSettings:
    evaluator: str = "clip_zeroshot"
    tasks: tuple[TaskSettings, ...] = ()
    batch_size: int = 64
    threads: int = 1
    model: str = ""
    text_checkpoint: Path | None = None
    plugin: str = ""
    logit_scale: float = 100.0
    max_length: int = 0  # text_zeroshot: tokens per text at most (0: the model's own limit)
    gate_max_drop: float | None = None
    retries: int = 3
    retry_seconds: float = 30.0

    def task(self, name: str) -> TaskSettings:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def held_out(self) -> list[str]:
        return [t.name for t in self.tasks if t.held_out]

    @property
    def adaptation(self) -> list[str]:
        return [t.name for t in self.tasks if not t.held_out]


# Typed values ------------------------------------------------------------------------------------

def _str(key: str, v: Any) -> str:
    if not isinstance(v, str):
        raise ConfigError(key, f"expected a string, got {v!r}")
    return v


def _int(key: str, v: Any, lo: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(key, f"expected an integer, got {v!r}")
    if lo is not None and v < lo:
        raise ConfigError(key, f"{v} is out of range: must be >= {lo}")
    return v


def _float(key: str, v: Any, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(key, f"expected a finite number, got {v!r}")
    v = float(v)
    if (lo is not None and (v < lo or (lo_open and v == lo))) or (hi is not None and v > hi):
        lb = "(" if lo_open else "["
        raise ConfigError(key, f"{v} is out of range {lb}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]")
    return v


def _bool(key: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(key, f"expected true or false, got {v!r}")
    return v


# Parsing -----------------------------------------------------------------------------------------

TOP_KEYS = tuple(f.name for f in fields(EvalSettings))


def parse_eval(data: dict | None, root: Path, base: Path | None = None, *, light: bool = False) -> EvalSettings | None:
    """``[eval]`` -> ``EvalSettings`` (None when there is no table or it lists no task).

    The keys of a table without tasks are still checked, so a typo is never silently ignored.
    ``base`` (θ0) is used, when it exists, to find out early that a CLIP evaluator has an open_clip
    base and whether ``clip_zeroshot`` needs ``text_checkpoint`` (a visual-only base has no text
    tower); a base that does not exist yet is checked when the evaluator is built. ``light``: see
    the module's docstring.
    """
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ConfigError("eval", f"expected a table, got {data!r}")
    for k in data:
        if k not in TOP_KEYS:
            raise ConfigError(f"eval.{k}", f"unknown key; allowed keys in [eval]: {', '.join(TOP_KEYS)}")
    root = Path(root)
    evaluator = _str("eval.evaluator", data.get("evaluator", "clip_zeroshot"))
    if evaluator not in EVALUATORS:
        raise ConfigError("eval.evaluator", f"{evaluator!r} is not one of {', '.join(EVALUATORS)}")
    for k in OPTION_KEYS:
        if k in data and k not in EVALUATOR_OPTIONS[evaluator]:
            users = [e for e, opts in EVALUATOR_OPTIONS.items() if k in opts]
            raise ConfigError(f"eval.{k}", f"applies to evaluator {' / '.join(users)}, not {evaluator!r}")
    values: dict[str, Any] = {"evaluator": evaluator}
    if "batch_size" in data:
        values["batch_size"] = _int("eval.batch_size", data["batch_size"], 1)
    if "threads" in data:
        values["threads"] = _int("eval.threads", data["threads"], 1)
    if "retries" in data:
        values["retries"] = _int("eval.retries", data["retries"], 0)
    if "retry_seconds" in data:
        values["retry_seconds"] = _float("eval.retry_seconds", data["retry_seconds"], 0.0)
    if "gate_max_drop" in data:
        values["gate_max_drop"] = _float("eval.gate_max_drop", data["gate_max_drop"], 0.0, 1.0)
    if "logit_scale" in data:
        values["logit_scale"] = _float("eval.logit_scale", data["logit_scale"], 0.0, lo_open=True)
    if "max_length" in data:
        values["max_length"] = _int("eval.max_length", data["max_length"], 2)
    if "plugin" in data:
        values["plugin"] = _plugin_spec(_str("eval.plugin", data["plugin"]))
    if "text_checkpoint" in data:
        p = root / _str("eval.text_checkpoint", data["text_checkpoint"])
        if not light:
            if not p.exists():
                raise ConfigError("eval.text_checkpoint", f"{p} not found (a full open_clip CLIP checkpoint for the text tower)")
            _check_full_clip(p)
        values["text_checkpoint"] = p
    model_cfg = None
    if "model" in data:
        model = _str("eval.model", data["model"])
        values["model"], model_cfg = (model, None) if light else _model(evaluator, model, root)

    tasks_in = data.get("tasks", [])
    if not isinstance(tasks_in, list) or not all(isinstance(t, dict) for t in tasks_in):
        raise ConfigError("eval.tasks", "expected an array of tables ([[eval.tasks]] name = ..., data = ...)")
    if not tasks_in:
        return None
    if evaluator in ("clip_zeroshot", "heads", "text_zeroshot") and not values.get("model"):
        what = "a directory with config.json and tokenizer files" if evaluator == "text_zeroshot" else "an open_clip architecture name (e.g. 'ViT-B-32') or a model-config JSON path"
        raise ConfigError("eval.model", f"required by evaluator {evaluator!r}: {what}")
    if evaluator == "plugin" and not values.get("plugin"):
        raise ConfigError("eval.plugin", "required by evaluator 'plugin': 'module:function'")
    if evaluator in ("clip_zeroshot", "heads") and not light:
        _check_base(evaluator, base, "text_checkpoint" in values)

    tasks = []
    names: set[str] = set()
    for i, t in enumerate(tasks_in):
        task = _task(t, i, root, evaluator, model_cfg, light)
        if task.name in names:
            raise ConfigError(f"eval.tasks[{i}].name", f"task name {task.name!r} is used twice")
        names.add(task.name)
        tasks.append(task)
    values["tasks"] = tuple(tasks)
    return EvalSettings(**values)


def _plugin_spec(spec: str) -> str:
    mod, sep, fn = spec.partition(":")
    if not sep or not mod.strip() or not fn.strip() or not all(p.isidentifier() for p in mod.split(".")) or not fn.isidentifier():
        raise ConfigError("eval.plugin", f"expected 'module:function' (an importable module and a function in it), got {spec!r}")
    return spec


def _model(evaluator: str, value: str, root: Path) -> tuple[str, dict | None]:
    """Resolve ``eval.model``: a directory for text_zeroshot; an architecture name or a JSON path for
    the CLIP evaluators (returned with its model config, so head shapes can be checked now)."""
    if evaluator == "text_zeroshot":
        d = root / value
        if not (d / "config.json").is_file():
            raise ConfigError("eval.model", f"{d}: expected a model directory with config.json and tokenizer files (Hugging Face BERT layout)")
        if not any((d / f).is_file() for f in TOKENIZER_FILES):
            raise ConfigError("eval.model", f"{d}: no tokenizer vocabulary ({' or '.join(TOKENIZER_FILES)}) in the model directory")
        return str(d), None
    if evaluator == "plugin":
        return value, None
    from mergewatch.eval.evaluators.clip_model import resolve_clip_config

    try:
        resolved, cfg = resolve_clip_config(value, root)
    except ValueError as e:
        raise ConfigError("eval.model", str(e)) from e
    return resolved, cfg


def _check_full_clip(path: Path) -> None:
    from mergewatch.checkpoint.reader import LazyCheckpoint
    from mergewatch.checkpoint.roles import detect_table
    from mergewatch.errors import CheckpointError

    try:
        table = detect_table(list(LazyCheckpoint(path))).name
    except CheckpointError as e:
        raise ConfigError("eval.text_checkpoint", f"{path}: {e.reason}") from e
    if table != "open_clip_full":
        raise ConfigError("eval.text_checkpoint", f"{path} is not a full open_clip CLIP (it looks like {table!r}): the text tower comes from it")


def _check_base(evaluator: str, base: Path | None, has_text_checkpoint: bool) -> None:
    """The CLIP evaluators need an open_clip base; clip_zeroshot on a visual-only one needs
    ``text_checkpoint``. Checked from θ0's keys (auto-detected role table) when the base exists."""
    if base is None or not Path(base).exists():
        return  # checked again when the evaluator is built
    from mergewatch.checkpoint.reader import LazyCheckpoint
    from mergewatch.checkpoint.roles import detect_table
    from mergewatch.errors import CheckpointError

    try:
        table = detect_table(list(LazyCheckpoint(base))).name
    except CheckpointError:
        return  # the base's own problems are reported where the base is loaded
    if table not in ("open_clip_full", "open_clip_visual"):
        raise ConfigError("eval.evaluator", f"{evaluator} needs an open_clip base; {base} looks like {table!r} (use evaluator 'plugin' for other models)")
    if evaluator == "clip_zeroshot" and table == "open_clip_visual" and not has_text_checkpoint:
        raise ConfigError(
            "eval.text_checkpoint",
            f"the base {base} has no open_clip text tower (visual-only); clip_zeroshot needs the full CLIP checkpoint it came from as eval.text_checkpoint",
        )


def _task(t: dict, i: int, root: Path, evaluator: str, model_cfg: dict | None, light: bool = False):
    prefix = f"eval.tasks[{i}]"
    for k in t:
        if k not in TASK_KEYS:
            raise ConfigError(f"{prefix}.{k}", f"unknown key; allowed keys in [[eval.tasks]]: {', '.join(TASK_KEYS)}")
    for req in ("name", "data"):
        if req not in t:
            raise ConfigError(f"{prefix}.{req}", "required")
    name = _str(f"{prefix}.name", t["name"])
    if not name.strip() or name != name.strip():
        raise ConfigError(f"{prefix}.name", f"a task name must be non-empty without surrounding spaces, got {name!r}")
    data = root / _str(f"{prefix}.data", t["data"])
    held_out = _bool(f"{prefix}.held_out", t["held_out"]) if "held_out" in t else False
    if light:  # the task as written; its data, classes and head are not opened
        return TaskSettings(name, data, _str(f"{prefix}.format", t["format"]) if "format" in t else "", held_out=held_out)
    from mergewatch.eval import data as evdata

    detected = evdata.detect_format(data)
    if "format" in t:
        fmt = _str(f"{prefix}.format", t["format"])
        if fmt not in evdata.FORMATS:
            raise ConfigError(f"{prefix}.format", f"task {name!r}: {fmt!r} is not one of {', '.join(evdata.FORMATS)}")
    else:
        if not data.exists():
            raise ConfigError(f"{prefix}.data", f"task {name!r}: {data} not found")
        if detected is None:
            raise ConfigError(f"{prefix}.data", f"task {name!r}: {data}: cannot tell the format (a directory, *.safetensors or *.jsonl); set 'format'")
        fmt = detected
    text_task = fmt == "jsonl"
    if evaluator in ("clip_zeroshot", "heads") and text_task:
        raise ConfigError(f"{prefix}.format", f"task {name!r}: evaluator {evaluator!r} needs image data (imagefolder or tensors), not jsonl")
    if evaluator == "text_zeroshot" and not text_task:
        raise ConfigError(f"{prefix}.format", f"task {name!r}: evaluator 'text_zeroshot' needs jsonl text data, not {fmt}")
    classes = root / _str(f"{prefix}.classes", t["classes"]) if "classes" in t else None
    if classes is None and fmt != "imagefolder":
        classes = evdata.default_classes_file(data)  # None: open_dataset says what is missing
    if "templates" in t:
        tl = t["templates"]
        if not isinstance(tl, list) or not tl:
            raise ConfigError(f"{prefix}.templates", f"task {name!r}: expected a non-empty list of strings with '{{}}'")
        for j, s in enumerate(tl):
            if not isinstance(s, str) or "{}" not in s:
                raise ConfigError(f"{prefix}.templates[{j}]", f"task {name!r}: a template is a string with '{{}}' where the class name goes, got {s!r}")
        templates = tuple(tl)
    else:
        templates = TEXT_TEMPLATES if text_task else IMAGE_TEMPLATES
    head = None
    if "head" in t:
        if evaluator not in ("heads", "plugin"):
            raise ConfigError(f"{prefix}.head", f"task {name!r}: 'head' applies to the heads evaluator only")
        head = root / _str(f"{prefix}.head", t["head"])
    elif evaluator == "heads":
        head = default_head(data)
    task = TaskSettings(name, data, fmt, classes, templates, held_out, head)
    try:
        ds = evdata.open_dataset(task)
    except evdata.DataError as e:
        raise ConfigError(f"{prefix}.{e.field}", str(e)) from e
    if evaluator == "heads":
        _check_head(task, len(ds.classes), model_cfg, f"{prefix}.head")
    return task


def default_head(data: Path) -> Path:
    """``<data dir>/head.safetensors`` for an ImageFolder; ``<stem>.head.safetensors`` beside a data file."""
    return data / "head.safetensors" if data.is_dir() else data.with_name(f"{data.stem}.head.safetensors")


def _check_head(task: TaskSettings, n_classes: int, model_cfg: dict | None, key: str) -> None:
    from mergewatch.checkpoint.reader import FLOAT_CODES, read_header
    from mergewatch.errors import CheckpointError

    path = task.head
    if not path.is_file():
        raise ConfigError(key, f"task {task.name!r}: head file {path} not found (safetensors with 'weight' [C, D] and optional 'bias' [C])")
    try:
        infos, _ = read_header(path)
    except CheckpointError as e:
        raise ConfigError(key, f"task {task.name!r}: {path}: not a valid safetensors file: {e.reason}") from e
    extra = sorted(set(infos) - {"weight", "bias"})
    if "weight" not in infos or extra:
        raise ConfigError(key, f"task {task.name!r}: {path}: a head holds 'weight' [C, D] and optional 'bias' [C], found {sorted(infos)}")
    w = infos["weight"]
    if w.dtype not in FLOAT_CODES or len(w.shape) != 2 or w.shape[0] != n_classes:
        raise ConfigError(key, f"task {task.name!r}: {path}: 'weight' must be a float [{n_classes}, D] matrix ({n_classes} classes), got {w.dtype} {list(w.shape)}")
    dim = model_cfg["model_cfg"].get("embed_dim") if model_cfg else None
    if dim is not None and w.shape[1] != dim:
        raise ConfigError(key, f"task {task.name!r}: {path}: 'weight' has D = {w.shape[1]} but the model's image features have {dim} dimensions")
    if "bias" in infos:
        b = infos["bias"]
        if b.dtype not in FLOAT_CODES or list(b.shape) != [n_classes]:
            raise ConfigError(key, f"task {task.name!r}: {path}: 'bias' must be a float [{n_classes}] vector, got {b.dtype} {list(b.shape)}")


def settings_json(settings: EvalSettings) -> str:
    """A stable JSON rendering (e.g. for logs or the ledger)."""
    def conv(v):
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        if hasattr(v, "__dataclass_fields__"):
            return {f.name: conv(getattr(v, f.name)) for f in fields(v)}
        return v
    return json.dumps(conv(settings), sort_keys=True)
