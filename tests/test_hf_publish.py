"""A published version is a model a server loads as it is (issue 19 §1): every version of both views
of a tiny Hugging Face model (Qwen3, Llama, GPT-2, BERT; built from transformers configs, never
downloaded) loads with ``from_pretrained`` and gives finite outputs; its safetensors carry
``{"format": "pt"}``; both views follow the base's file layout (its shard boundaries, HF shard names,
an index with ``total_size``) unless ``publish.shard_bytes`` says otherwise; identical views are hard
links of one file in every dtype."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mergewatch import config
from mergewatch.checkpoint.reader import LazyCheckpoint
from mergewatch.workspace import Workspace
from tests.hf_support import load_and_run, low_rank_experts, tiny_bert, tiny_gpt2, tiny_llama, tiny_qwen3

pytest.importorskip("transformers")

#: the policies of the issue, in this repository's config syntax (README, examples/)
POLICIES = {
    "ema": 'init = "ema"\ndeploy = "ema"',
    "ties": 'init = "ema"\ndeploy = "all"\ntechnique = "ties"',
    "opcm": 'init = "zs"\ndeploy = "opcm"',
    "nufilt": 'init = "zs"\ndeploy = "nufilt"\n[policy.nufilt]\nr_p = 4\nr_l = 2\nr_v = 2\nsteps = 2',
    "wudi": 'init = "zs"\ndeploy = "wudi"',
}
BUILDERS = {"qwen3": tiny_qwen3, "llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

CASES = [
    *(("qwen3", "fp32", False, False, p) for p in POLICIES),
    *(("qwen3", "bf16", True, True, p) for p in POLICIES),
    ("llama", "bf16", False, True, "ema"),
    ("llama", "bf16", False, True, "ties"),
    ("llama", "fp32", True, False, "opcm"),
    ("gpt2", "fp32", True, True, "ema"),
    ("gpt2", "fp32", True, True, "opcm"),
    ("gpt2", "bf16", False, True, "wudi"),
    ("bert", "fp32", True, None, "ema"),
    ("bert", "bf16", True, None, "wudi"),
]


def _base(tmp: Path, arch: str, dtype: str, shards: bool, tied: bool | None) -> Path:
    kw = {} if tied is None else {"tied": tied}
    return BUILDERS[arch](tmp, dtype=DTYPES[dtype], shards=shards, **kw)


def _workspace(tmp: Path, base: Path, policy: str, extra: str = "") -> Workspace:
    p = tmp / "mw.toml"
    p.write_text(f'workspace = "ws"\nbase = "{base}"\nseed = 0\n{extra}\n[policy]\n{POLICIES[policy]}\n', "utf-8")
    return Workspace(config.load(p))


def _weights(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith((".safetensors", ".safetensors.index.json")))


def _held(d: Path) -> dict[str, list[str]]:
    """file name -> the tensors it holds"""
    c = LazyCheckpoint(d)
    return {f.name: [n for n in c if c.info(n).file == f] for f in c.files}


def _check_version(d: Path, base: Path, *, causal: bool) -> None:
    """Laid out as the base, ``format: pt`` in every header, an index with total_size, loadable."""
    assert _weights(d) == _weights(base)
    assert _held(d) == _held(base)
    for f in d.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            assert st.metadata() == {"format": "pt"}, f
    index = d / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        assert data["metadata"]["total_size"] == LazyCheckpoint(d).nbytes
        assert set(data["weight_map"].values()) == {f.name for f in d.glob("*.safetensors")}
    load_and_run(d, causal=causal)


@pytest.mark.parametrize("arch,dtype,shards,tied,policy", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_every_published_version_loads_with_from_pretrained(tmp_path, arch, dtype, shards, tied, policy):
    base = _base(tmp_path, arch, dtype, shards, tied)
    if shards:
        assert (base / "model.safetensors.index.json").is_file() and len(_held(base)) > 1
    ws = _workspace(tmp_path, base, policy)
    for e in low_rank_experts(base, tmp_path / "experts", 2, seed=3):
        assert ws.merge(e).status == "merged"
    causal = arch != "bert"
    for view in ("deploy", "init"):
        pub = ws.publishers[view]
        assert pub.versions()
        for v in pub.versions():
            _check_version(pub.path(v), base, causal=causal)
        # what a server is pointed at
        load_and_run(ws.root / view / "current", causal=causal)
    # the merge moved the deployed model away from θ0
    deployed = LazyCheckpoint(ws.root / "deploy" / "current")
    theta0 = LazyCheckpoint(base)
    assert any(not torch.equal(deployed[k], theta0[k]) for k in theta0)


def test_identical_views_are_one_file_in_every_dtype(tmp_path):
    """EMA's deploy and init views are the same model: one file, two names, whatever the dtype.
    (Before, a bf16 base got separate copies: after 2 steps the workspace was ~8× the model.)"""
    for dtype in ("fp32", "bf16", "fp16"):
        tmp = tmp_path / dtype
        tmp.mkdir()
        base = _base(tmp, "qwen3", dtype, False, False)
        ws = _workspace(tmp, base, "ema")
        for e in low_rank_experts(base, tmp / "experts", 2, seed=5):
            ws.merge(e)
        for v in (1, 2):
            dep = ws.publishers["deploy"].path(v) / "model.safetensors"
            init = ws.publishers["init"].path(v) / "model.safetensors"
            assert dep.read_bytes() == init.read_bytes()
            assert dep.stat().st_ino == init.stat().st_ino, dtype
            # ... and the very file of the committed state (published by hard link)
            assert dep.stat().st_ino == (ws.root / "state" / str(v) / "views" / "deploy" / "model.safetensors").stat().st_ino
        model = base.joinpath("model.safetensors").stat().st_size
        used = _disk(ws.root, exclude=("store",))
        # 2 steps: per step one view file (M) and the float32 EMA state (M in fp32, 2M in 16-bit)
        want = 2 * (1 + (1 if dtype == "fp32" else 2)) * model
        assert used <= want * 1.05, (dtype, used / model)


def _disk(root: Path, exclude: tuple[str, ...] = ()) -> int:
    """Bytes of the distinct files (by inode) under ``root``, minus the ``exclude`` subdirectories."""
    seen: dict[int, int] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == root:
            dirnames[:] = [d for d in dirnames if d not in exclude]
        for f in filenames:
            st = os.lstat(os.path.join(dirpath, f))
            seen[st.st_ino] = st.st_size
    return sum(seen.values())


def test_shard_bytes_overrides_the_base_layout_in_both_views(tmp_path):
    """``publish.shard_bytes``: shards of at most N bytes in both views, also for an init view that
    is θ0 itself (OPCM: init zs), which is then published as a re-laid-out copy of the base."""
    base = _base(tmp_path, "qwen3", "fp32", False, False)
    ws = _workspace(tmp_path, base, "opcm", extra="[publish]\nshard_bytes = 16384")
    for e in low_rank_experts(base, tmp_path / "experts", 2, seed=7):
        ws.merge(e)
    layouts = []
    for view in ("deploy", "init"):
        d = ws.root / view / "current"
        assert "model.safetensors" not in _weights(d) and "model.safetensors.index.json" in _weights(d)
        c = LazyCheckpoint(d)
        for f in c.files:
            held = [n for n in c if c.info(n).file == f]
            assert len(held) == 1 or sum(c.info(n).nbytes for n in held) <= 16384
        layouts.append(_held(d))
        _check_version(d.resolve(), d.resolve(), causal=True)
    assert layouts[0] == layouts[1]
    # 0: one file, whatever the base
    sharded = _base(tmp_path / "s", "qwen3", "fp32", True, False)
    ws = _workspace(tmp_path / "s", sharded, "opcm", extra="[publish]\nshard_bytes = 0")
    ws.merge(low_rank_experts(sharded, tmp_path / "s" / "experts", 1)[0])
    for view in ("deploy", "init"):
        assert _weights(ws.root / view / "current") == ["model.safetensors"]
        load_and_run(ws.root / view / "current")


def test_base_without_metadata_is_republished_not_linked(tmp_path):
    """A base whose files lack ``format: pt`` (or other base metadata) is published as θ0 through the
    writer (once, under base-view/): never the user's own file, and with the base's metadata kept."""
    from mergewatch.checkpoint.writer import write_checkpoint

    hf = _base(tmp_path, "qwen3", "fp32", True, True)
    base = tmp_path / "plain"
    theta0 = {k: v for k, v in LazyCheckpoint(hf).items()}
    write_checkpoint(base, theta0, shard_bytes=20_000, metadata={"producer": "a test"})
    (base / "config.json").write_bytes((hf / "config.json").read_bytes())
    assert safe_open(next(base.glob("*.safetensors")), "pt").metadata() == {"producer": "a test"}
    ws = _workspace(tmp_path, base, "opcm")
    ws.merge(low_rank_experts(base, tmp_path / "experts", 1)[0])
    for view in ("deploy", "init"):
        d = ws.root / view / "current"
        assert _held(d) == _held(base)
        for f in d.glob("*.safetensors"):
            assert safe_open(f, "pt").metadata() == {"format": "pt", "producer": "a test"}
            assert all(f.stat().st_ino != g.stat().st_ino for g in base.iterdir())
        load_and_run(d)
    init = ws.root / "init" / "current"
    assert {k: v for k, v in LazyCheckpoint(init).items()}.keys() == theta0.keys()
    assert all(torch.equal(LazyCheckpoint(init)[k], v) for k, v in theta0.items())
    # an HF base is already laid out as published: init zs links it (no copy)
    ws2 = _workspace(tmp_path / "hf", hf, "opcm") if (tmp_path / "hf").mkdir() is None else None
    ws2.merge(low_rank_experts(hf, tmp_path / "hf" / "experts", 1)[0])
    assert not (ws2.root / "base-view").exists()
    load_and_run(ws2.root / "init" / "current")
