"""A version directory alone rebuilds the model: the base's configuration (and, for a base
directory, its tokenizer and other non-weight files) is published beside the weights of every
version of both views, listed with its sha256 in the MANIFEST, kept through rollback, and never a
link to the user's own file (deploy/companions.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from mergewatch import config
from mergewatch.checkpoint.writer import write_safetensors_file
from mergewatch.demo import TINY_CLIP, tiny_clip_state
from mergewatch.deploy.loader import load_current
from mergewatch.errors import ConfigError
from mergewatch.workspace import Workspace
from tests.helpers import load_all, make_expert


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _config(tmp: Path, model: str, base: str = "base.safetensors") -> Path:
    p = tmp / "mw.toml"
    p.write_text(f'workspace = "ws"\nbase = "{base}"\n[model]\n{model}\n[policy]\ninit = "ema"\ndeploy = "ema"\n', "utf-8")
    return p


def test_open_clip_config_published_and_loadable_by_open_clip(tmp_path):
    import open_clip

    write_safetensors_file(tmp_path / "base.safetensors", tiny_clip_state(0))
    (tmp_path / "tiny-clip.json").write_text(json.dumps(TINY_CLIP), "utf-8")  # open_clip's model_configs layout
    ws = Workspace(config.load(_config(tmp_path, 'config = "tiny-clip.json"')))
    for i in (1, 2):
        ws.merge(make_expert(tmp_path / "base.safetensors", tmp_path / f"e{i}.safetensors", seed=i))
    for view in ("deploy", "init"):
        pub = ws.publishers[view]
        for v in pub.versions():
            d = pub.path(v)
            man = json.loads((d / "MANIFEST.json").read_text())
            assert sorted(p.name for p in d.iterdir()) == ["MANIFEST.json", "model.safetensors", "open_clip_config.json"]
            assert man["companions"] == {"open_clip_config.json": _sha(d / "open_clip_config.json")}
            assert man["files"]["open_clip_config.json"] == man["companions"]["open_clip_config.json"]
    d = ws.publishers["deploy"].path(ws.publishers["deploy"].current())
    assert json.loads((d / "open_clip_config.json").read_text()) == {"model_cfg": TINY_CLIP}
    # open_clip rebuilds the model from the version directory alone
    model = open_clip.create_model(f"local-dir:{d}")
    published = load_all(d / "model.safetensors")
    assert all(torch.equal(v, published[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.isfinite(model.encode_image(torch.randn(2, 3, 32, 32))).all()
    # ... and so does the project's loader, which checks every file of the manifest
    loaded = load_current(ws.root / "deploy", verify=True)
    assert set(loaded.manifest["files"]) == {"model.safetensors", "open_clip_config.json"}
    # a rollback republishes the configuration with the weights
    new = ws.publishers["deploy"].rollback(1, reason="test")
    assert (ws.publishers["deploy"].path(new) / "open_clip_config.json").read_bytes() == (ws.publishers["deploy"].path(1) / "open_clip_config.json").read_bytes()


def test_base_directory_companions_are_snapshots_not_links(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    write_safetensors_file(base / "model.safetensors", tiny_clip_state(0))
    (base / "config.json").write_text('{"model_type": "clip"}', "utf-8")
    (base / "tokenizer.json").write_text('{"version": "1.0"}', "utf-8")
    (base / ".cache").write_text("hidden", "utf-8")
    (base / "README.md").write_text("# a model card", "utf-8")
    ws = Workspace(config.load(_config(tmp_path, "", base="base")))
    ws.merge(make_expert(base / "model.safetensors", tmp_path / "e1.safetensors", seed=1))
    d = ws.publishers["deploy"].path(1)
    assert sorted(p.name for p in d.iterdir()) == ["MANIFEST.json", "README.md", "config.json", "model.safetensors", "tokenizer.json"]
    init = ws.publishers["init"].path(ws.publishers["init"].current())
    assert (init / "config.json").read_text() == '{"model_type": "clip"}'
    # the user edits their base directory afterwards: nothing published changes
    (base / "config.json").write_text('{"model_type": "edited"}', "utf-8")
    assert (d / "config.json").read_text() == '{"model_type": "clip"}'
    assert (d / "config.json").stat().st_ino != (base / "config.json").stat().st_ino
    ws.merge(make_expert(base / "model.safetensors", tmp_path / "e2.safetensors", seed=2))
    assert (ws.publishers["deploy"].path(2) / "config.json").read_text() == '{"model_type": "edited"}'  # the next version takes the edit
    load_current(ws.root / "deploy", verify=True)


def test_explicit_companions_and_their_errors(tmp_path):
    write_safetensors_file(tmp_path / "base.safetensors", tiny_clip_state(0))
    (tmp_path / "gen.json").write_text("{}", "utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "gen.json").write_text("{}", "utf-8")
    (tmp_path / "w.safetensors").write_bytes(b"")
    ws = Workspace(config.load(_config(tmp_path, 'companions = ["gen.json"]')))
    ws.merge(make_expert(tmp_path / "base.safetensors", tmp_path / "e1.safetensors", seed=1))
    assert (ws.publishers["deploy"].path(1) / "gen.json").is_file()
    for model, key in (('config = "nope.json"', "model.config"), ('companions = ["nope.json"]', "model.companions[0]"),
                       ('companions = ["gen.json", "sub/gen.json"]', "model.companions")):
        with pytest.raises(ConfigError) as e:
            config.load(_config(tmp_path, model))
        assert e.value.key == key
    with pytest.raises(ConfigError) as e:
        Workspace(config.load(_config(tmp_path, 'companions = ["w.safetensors"]')))
    assert e.value.key == "model.companions[0]"
