"""Files published beside the weights, so that a version directory alone rebuilds the model.

A serving stack needs more than tensors: open_clip needs its model configuration
(``open_clip_config.json``), a Hugging Face model its ``config.json``, ``generation_config.json``,
tokenizer files and chat template. These *companions* come from

* ``[model] companions = ["auto"]`` (the default): every regular, non-hidden file of a base
  *directory* that is not weights (``*.safetensors``, pickles and other weight formats, the shard
  index) nor the inbox marker ``_SUCCESS``; nothing for a base that is a bare file;
* ``[model] companions = [PATH, ...]``: exactly these files (``[]``: none);
* ``[model] config = PATH``: one more file, the model's configuration. A bare open_clip model config
  (``{"embed_dim", "vision_cfg", "text_cfg", ...}``, as in open_clip's ``model_configs/*.json``) is
  published as ``open_clip_config.json`` in the layout open_clip's ``local-dir:`` loader reads
  (``{"model_cfg": ...}``); any other file keeps its name.

Every publish snapshots them into ``<workspace>/companions/<sha256>/<name>`` (a copy: a user editing
their base directory later must never rewrite a published file in place) and hard-links the snapshot
into the version; the MANIFEST lists each under ``files`` with its sha256 and under ``companions``.
Rollback republishes them with the weights; retention removes them with their version.

Imports only the standard library (the light CLI verbs import the publisher).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mergewatch.checkpoint.durable import atomic_write
from mergewatch.errors import ConfigError

#: file endings that hold weights, never published as companions (the state writer publishes weights)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".h5", ".msgpack", ".onnx", ".gguf", ".index.json")
#: names a version directory reserves for itself or the inbox uses
RESERVED = ("MANIFEST.json", "EVAL.json", "_SUCCESS")
OPEN_CLIP_CONFIG = "open_clip_config.json"


def is_open_clip_model_config(data: object) -> bool:
    """A bare open_clip model configuration (what ``open_clip.get_model_config`` returns)."""
    return isinstance(data, dict) and "vision_cfg" in data and "embed_dim" in data and "model_cfg" not in data


def _publishable(name: str) -> bool:
    return not name.startswith(".") and not name.endswith(WEIGHT_SUFFIXES) and name not in RESERVED


def discover(base: Path, companions: tuple, config: str) -> dict[str, tuple[Path, bool]]:
    """Published name -> (source file, wrap as open_clip config) for a model's settings."""
    out: dict[str, tuple[Path, bool]] = {}
    if tuple(companions) == ("auto",):
        if base.is_dir():
            for f in sorted(base.iterdir()):
                if f.is_file() and _publishable(f.name):
                    out[f.name] = (f, False)
    else:
        for i, c in enumerate(companions):
            p = Path(c)
            if not _publishable(p.name):
                raise ConfigError(f"model.companions[{i}]", f"{p.name!r} cannot be published beside the weights (weights, hidden or reserved name)")
            out[p.name] = (p, False)
    if config:
        p = Path(config)
        try:
            wrap = p.suffix == ".json" and is_open_clip_model_config(json.loads(p.read_text("utf-8")))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ConfigError("model.config", f"cannot read {p}: {e}") from e
        name = OPEN_CLIP_CONFIG if wrap else p.name
        if not _publishable(name):
            raise ConfigError("model.config", f"{name!r} cannot be published beside the weights (weights, hidden or reserved name)")
        out[name] = (p, wrap)
    return out


class Companions:
    """The companions of one workspace: ``snapshot()`` before each publish."""

    def __init__(self, root: Path, sources: dict[str, tuple[Path, bool]]):
        self.root = Path(root)
        self.sources = dict(sources)

    def snapshot(self) -> dict[str, tuple[Path, str]]:
        """Published name -> (stored copy, sha256), each stored once per content (tmp, fsync, rename)."""
        out: dict[str, tuple[Path, str]] = {}
        for name, (src, wrap) in sorted(self.sources.items()):
            try:
                data = src.read_bytes()
            except OSError as e:
                raise ConfigError("model.companions", f"cannot read {src} (published beside every version): {e.strerror or e}") from e
            if wrap:
                data = (json.dumps({"model_cfg": json.loads(data)}, indent=2, sort_keys=True) + "\n").encode()
            sha = hashlib.sha256(data).hexdigest()
            dst = self.root / sha / name
            if not dst.is_file():
                dst.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(dst, data)
            out[name] = (dst, sha)
        return out
