"""The contributor page's worked example works as the page says (docs/adding-a-method.md): its
class, registered as the page shows, runs in a workspace through the config, gives the formula's
result, and a bad parameter is refused with the key the page quotes."""

from __future__ import annotations

import re
import types
from pathlib import Path

import pytest
import torch

from mergewatch import config
from mergewatch.errors import ConfigError
from mergewatch.strategies import METHODS
from mergewatch.workspace import Workspace
from tests.helpers import load_all, make_expert, make_open_clip_base

DOC = Path(__file__).resolve().parent.parent / "docs" / "adding-a-method.md"


def _example_class() -> type:
    text = DOC.read_text("utf-8")
    section = text[text.index("## Worked example"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    module = types.ModuleType("ema_method")
    exec(compile(code, str(DOC), "exec"), module.__dict__)
    return module.ContinualEMA


def _config(tmp: Path, beta: str) -> Path:
    p = tmp / "mw.toml"
    p.write_text(f'workspace = "ws"\nbase = "base.safetensors"\n[policy]\ndeploy = "continual_ema"\n[policy.continual_ema]\nbeta = {beta}\n', "utf-8")
    return p


def test_the_worked_example_runs_as_documented(tmp_path, monkeypatch):
    cls = _example_class()
    monkeypatch.setitem(METHODS, "continual_ema", cls)  # "Register it in mergewatch/strategies/__init__.py"
    base = make_open_clip_base(tmp_path / "base.safetensors")
    experts = [make_expert(base, tmp_path / f"e{i}.safetensors", seed=i) for i in (1, 2)]
    ws = Workspace(config.load(_config(tmp_path, "0.3")))
    for e in experts:
        ws.merge(e)
    got = load_all(ws.publishers["deploy"].path(2))
    e1, e2 = load_all(experts[0]), load_all(experts[1])
    for k, v in got.items():
        if v.dtype.is_floating_point:
            torch.testing.assert_close(v, 0.7 * e1[k] + 0.3 * e2[k], rtol=0, atol=1e-6)
    with pytest.raises(ConfigError) as e:
        config.load(_config(tmp_path, "2"))
    assert str(e.value).startswith("config error at 'policy.continual_ema.beta': ")
    assert "config error at 'policy.continual_ema.beta'" in DOC.read_text("utf-8")
