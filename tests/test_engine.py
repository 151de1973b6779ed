"""The streaming engine: bounded live tensors, bit-identical replay, state round trip, dtypes, shards."""

from __future__ import annotations

import hashlib
import shutil
import weakref
from pathlib import Path

import pytest
import torch

from mergewatch import config
from mergewatch.checkpoint.reader import LazyCheckpoint
from mergewatch.checkpoint.writer import write_checkpoint, write_safetensors_file
from mergewatch.workspace import Workspace
from tests.helpers import load_all, perturb, tiny_clip_state


class CountingCheckpoint(LazyCheckpoint):
    """A real lazy checkpoint that counts how many of its tensors are alive at once."""

    live = 0
    peak = 0
    reads = 0

    def __getitem__(self, name):
        t = super().__getitem__(name)
        cls = CountingCheckpoint
        cls.live += 1
        cls.reads += 1
        cls.peak = max(cls.peak, cls.live)
        weakref.finalize(t, CountingCheckpoint._gone)
        return t

    @staticmethod
    def _gone():
        CountingCheckpoint.live -= 1


def _cfg(tmp: Path, policy: str, extra: str = "") -> Path:
    p = tmp / "mw.toml"
    p.write_text(f'workspace = "ws"\nbase = "base"\nseed = 3\n{extra}\n[policy]\n{policy}\n', "utf-8")
    return p


def _setup(tmp: Path, n: int = 3, dtype=torch.float32, sharded_base=False):
    base = tiny_clip_state(0, dtype)
    if sharded_base:
        write_checkpoint(tmp / "base", base, shard_bytes=20_000)
    else:
        (tmp / "base").mkdir()
        write_safetensors_file(tmp / "base" / "model.safetensors", base)
    paths = []
    for i in range(1, n + 1):
        p = tmp / f"e{i}.safetensors"
        write_safetensors_file(p, perturb(base, seed=i))
        paths.append(p)
    return base, paths


def test_step_never_materialises_the_model(tmp_path, monkeypatch):
    """Every checkpoint the engine opens counts its live tensors: at any moment only a handful
    (base, expert, state, buffered experts of one name) are alive, far fewer than the model has."""
    import mergewatch.strategies.state as state_mod
    import mergewatch.workspace as ws_mod
    import mergewatch.buffer.store as store_mod
    import mergewatch.strategies.engine as engine_mod

    for mod in (state_mod, ws_mod, store_mod, engine_mod):
        monkeypatch.setattr(mod, "LazyCheckpoint", CountingCheckpoint)
    _, paths = _setup(tmp_path, n=3)
    ws = Workspace(config.load(_cfg(tmp_path, 'init = "ema"\ndeploy = "all"\ntechnique = "ties"\n[policy.ties]\ntrim = "global"')))
    n_tensors = len(ws.base)
    CountingCheckpoint.peak = CountingCheckpoint.live = CountingCheckpoint.reads = 0
    for p in paths:
        ws.merge(p)
    assert CountingCheckpoint.reads > 3 * n_tensors  # it really streamed through the model
    # step 3 of deploy=all reads base + 3 experts + ema state for one name (+ validation's 1)
    assert CountingCheckpoint.peak <= 7, CountingCheckpoint.peak
    assert n_tensors > 40


def _digest_dir(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*.safetensors"))}


POLICIES = [
    'init = "ema"\ndeploy = "ema"\ntechnique = "wa"',
    'init = "zs"\ndeploy = "all"\ntechnique = "dare_ties"',
    'init = "ft"\ndeploy = "ema"\ntechnique = "ties"\n[policy.ties]\ntrim = "global"',
    'init = "zs"\ndeploy = "all"\ntechnique = "ta"\n[policy.weaving]\npool = "random"',
]


@pytest.mark.parametrize("policy", POLICIES)
def test_replay_is_bit_identical_and_resume_equals_uninterrupted(tmp_path, policy):
    _, paths = _setup(tmp_path, n=3)
    runs = []
    for k in range(2):
        sub = tmp_path / f"run{k}"
        sub.mkdir()
        shutil.copytree(tmp_path / "base", sub / "base")
        ws = Workspace(config.load(_cfg(sub, policy)))
        for p in paths:
            ws.merge(p)
        runs.append(_digest_dir(sub / "ws" / "deploy" / "3"))
    assert runs[0] == runs[1]
    # resume: a fresh Workspace object (new process in real life) after step 2 reloads the state
    sub = tmp_path / "resumed"
    sub.mkdir()
    shutil.copytree(tmp_path / "base", sub / "base")
    ws = Workspace(config.load(_cfg(sub, policy)))
    for p in paths[:2]:
        ws.merge(p)
    del ws
    ws = Workspace(config.load(_cfg(sub, policy)))
    ws.recover()
    ws.merge(paths[2])
    assert _digest_dir(sub / "ws" / "deploy" / "3") == runs[0]


def test_state_round_trip_is_exact(tmp_path):
    _, paths = _setup(tmp_path, n=2)
    ws = Workspace(config.load(_cfg(tmp_path, 'init = "ema"\ndeploy = "ema"\nw = 0.37')))
    ws.merge(paths[0])
    snap = ws.states.latest()
    ema = snap.sets()["ema"]
    assert all(ema.info(k).dtype == "F32" for k in ema if ema[k].dtype.is_floating_point)
    # the stored state equals the published view of an fp32 base bit for bit
    dep = load_all(ws.publishers["deploy"].path(1))
    assert all(torch.equal(ema[k], dep[k]) for k in dep)
    assert snap.record["sets"]["ema"] and snap.record["t"] == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoints(tmp_path, dtype):
    base, paths = _setup(tmp_path, n=2, dtype=dtype)
    ws = Workspace(config.load(_cfg(tmp_path, 'init = "zs"\ndeploy = "all"\ntechnique = "wa"')))
    for p in paths:
        ws.merge(p)
    got = load_all(ws.publishers["deploy"].path(2))
    e = [load_all(p) for p in paths]
    for k, v in got.items():
        assert v.dtype == base[k].dtype
        if v.dtype.is_floating_point:
            want = ((e[0][k].float() + e[1][k].float()) / 2).to(dtype)
            assert torch.equal(v, want), k  # float32 arithmetic, one rounding at the end


def test_sharded_base_and_experts(tmp_path):
    base, paths = _setup(tmp_path, n=2, sharded_base=True)
    assert len(list((tmp_path / "base").glob("*.safetensors"))) > 1
    sharded_expert = tmp_path / "e2-sharded"
    write_checkpoint(sharded_expert, load_all(paths[1]), shard_bytes=30_000)
    ws = Workspace(config.load(_cfg(tmp_path, 'init = "zs"\ndeploy = "all"', extra="[publish]\nshard_bytes = 25000")))
    ws.merge(paths[0])
    res = ws.merge(sharded_expert)
    assert res.step == 2
    out = ws.publishers["deploy"].path(2)
    assert (out / "model.safetensors.index.json").is_file()
    got = load_all(out)
    want = {k: (load_all(paths[0])[k].float() + load_all(paths[1])[k].float()) / 2 for k in base}
    for k in base:
        if base[k].dtype.is_floating_point:
            torch.testing.assert_close(got[k], want[k])
    # init zs publishes the sharded base itself
    init = ws.publishers["init"].path(1)
    assert (init / "model.safetensors.index.json").is_file()
    assert all(torch.equal(load_all(init)[k], base[k]) for k in base)
