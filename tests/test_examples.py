"""Each example config merges real tiny open_clip experts (workspace and base redirected to tmp)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from mergewatch import config
from mergewatch.workspace import Workspace
from tests.helpers import make_expert, make_open_clip_base

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.toml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs_two_steps(tmp_path, path):
    data = tomllib.loads(path.read_text("utf-8"))
    base = make_open_clip_base(tmp_path / "base.safetensors")
    data["workspace"] = str(tmp_path / "ws")
    data["base"] = str(base)
    ws = Workspace(config.parse(data))
    for i in (1, 2):
        res = ws.merge(make_expert(base, tmp_path / f"e{i}.safetensors", seed=i))
        assert res.status == "merged" and res.step == i
    assert ws.publishers["deploy"].current() == 2
