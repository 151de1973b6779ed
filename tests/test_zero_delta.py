"""The first-step trap (issue 16): a projection against an all-zero merged task vector must be skipped.

An SVD of a zero matrix returns an arbitrary basis; "removing the protected directions" of it
silently changes the new expert's update. Here expert 1 changes one layer only and expert 2 another
one only, so at step 2 the layer expert 2 changes has a zero merged task vector: its merged update
must be exactly along expert 2's task vector (the first expert's layer keeps its direction too),
through the real workspace, with and without OPCM's prepared SVDs, and for NuFILT.
"""

from __future__ import annotations

import pytest
import torch

from mergewatch import config
from mergewatch.checkpoint.writer import write_safetensors_file
from mergewatch.workspace import Workspace
from tests.helpers import load_all, make_open_clip_base

A = "visual.transformer.resblocks.0.mlp.c_fc.weight"
B = "visual.transformer.resblocks.1.mlp.c_fc.weight"


def _cos(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double().flatten(), y.double().flatten()
    return float(x @ y / (x.norm() * y.norm()))


@pytest.mark.parametrize("policy,prepare", [('deploy = "opcm"', False), ('deploy = "opcm"', True), ('deploy = "nufilt"', False)])
def test_zero_merged_task_vector_is_not_projected(tmp_path, policy, prepare):
    base = make_open_clip_base(tmp_path / "base.safetensors")
    b = load_all(base)
    g = torch.Generator().manual_seed(11)
    taus = {}
    for i, name in ((1, A), (2, B)):
        e = dict(b)
        taus[i] = 0.05 * torch.randn(b[name].shape, generator=g)
        e[name] = b[name] + taus[i]
        write_safetensors_file(tmp_path / f"e{i}.safetensors", e)
    cfg = tmp_path / "mw.toml"
    cfg.write_text(f'workspace = "ws"\nbase = "base.safetensors"\n[policy]\n{policy}\n', "utf-8")
    ws = Workspace(config.load(cfg))
    try:
        assert ws.merge(tmp_path / "e1.safetensors").status == "merged"
        if prepare:
            assert ws.prepare() is not None
        out = ws.merge(tmp_path / "e2.safetensors")
        assert out.status == "merged"
        if prepare:
            assert out.prepared == "used"
        dep = load_all(ws.publishers["deploy"].path(ws.publishers["deploy"].current()))
    finally:
        ws.close()
    got_b = dep[B].double() - b[B].double()
    got_a = dep[A].double() - b[A].double()
    assert got_b.norm() > 0.1 * taus[2].norm()  # not wiped
    assert _cos(got_b, taus[2]) > 1 - 1e-6  # nothing removed along an arbitrary basis
    assert _cos(got_a, taus[1]) > 1 - 1e-6
