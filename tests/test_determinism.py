"""Bit-identity on one machine, whatever the calling process's thread count (mergewatch.numeric).

The same stream is merged in one process with torch's ambient thread count at 1 and at 3 (what
``OMP_NUM_THREADS`` would set), with and without the sets prepared ahead after every step (what the
daemon does when idle): every deploy version, init version and final state must be the same bytes.
The vision tower is 192 wide: at the test suite's tiny widths MKL computes everything in one
thread anyway, and the differences this guards against (OPCM's prepared factors used in another
memory layout, NuFILT's products split over another number of threads) never show.

Nothing here compares against bytes recorded elsewhere: every run is of this machine.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mergewatch import config
from mergewatch.checkpoint.writer import write_safetensors_file
from mergewatch.demo import perturb, tiny_clip_state
from mergewatch.numeric import pinned_threads
from mergewatch.workspace import Workspace

WIDE = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=32, layers=2, width=192, patch_size=8, head_width=32),
    text_cfg=dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1),
)

POLICIES = {
    "opcm": 'deploy = "opcm"',
    "nufilt": 'deploy = "nufilt"\n[policy.nufilt]\nsteps = 3\nr_p = 16\nr_l = 8',
    "nufilt_randomized": 'deploy = "nufilt"\n[policy.nufilt]\nsteps = 3\nr_p = 16\nr_l = 8\nsvd = "randomized"',
}


@pytest.fixture(scope="module")
def wide_stream(tmp_path_factory):
    d = tmp_path_factory.mktemp("wide")
    state = tiny_clip_state(3, cfg=WIDE)
    base = d / "base.safetensors"
    write_safetensors_file(base, state)
    experts = []
    for i in range(1, 4):
        p = d / f"e{i}.safetensors"
        write_safetensors_file(p, perturb(state, 500 + i, 0.02 * i))
        experts.append(p)
    return base, experts


def _config(root: Path, base: Path, policy: str, engine: str = "") -> Path:
    root.mkdir(parents=True)
    (root / "base.safetensors").symlink_to(base)
    (root / "mw.toml").write_text(f'workspace = "ws"\nbase = "base.safetensors"\nseed = 5\n{engine}[policy]\n{policy}\n', "utf-8")
    return root / "mw.toml"


def _digests(ws_root: Path) -> dict[str, str]:
    """Every published view file and every committed state set, by relative path."""
    out = {}
    for sub in ("deploy", "init", "state"):
        for p in sorted((ws_root / sub).rglob("*.safetensors")):
            if "prepared" not in p.parts:
                out[str(p.relative_to(ws_root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _run(root: Path, base: Path, experts: list[Path], policy: str, *, ambient: int, prepare: bool) -> dict[str, str]:
    ws = Workspace(config.load(_config(root, base, policy)))
    with pinned_threads(ambient):  # the process's own thread count, as OMP_NUM_THREADS would set it
        for t, e in enumerate(experts, 1):
            out = ws.merge(e)
            assert out.prepared == ("used" if prepare and t > 1 else "none")
            if prepare:
                assert ws.prepare() is not None
        assert torch.get_num_threads() == ambient  # the engine restored it after every step
    return _digests(ws.root)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_stream_bits_do_not_depend_on_thread_count_or_prepare(tmp_path, wide_stream, policy):
    base, experts = wide_stream
    runs = {
        (ambient, prepare): _run(tmp_path / f"{ambient}-{prepare}", base, experts, POLICIES[policy], ambient=ambient, prepare=prepare)
        for ambient in (1, 3)
        for prepare in (False, True)
    }
    ref = runs[(1, False)]
    assert len([k for k in ref if k.startswith("deploy/")]) == len(experts)
    for key, got in runs.items():
        assert got == ref, f"{policy}: ambient threads {key[0]}, prepared {key[1]} differ from 1 thread inline"


def test_engine_threads_is_a_config_key(tmp_path, wide_stream):
    base, _ = wide_stream
    s = config.load(_config(tmp_path / "a", base, 'deploy = "opcm"', "[engine]\nthreads = 1\n"))
    assert s.engine.threads == 1
    assert config.load(_config(tmp_path / "b", base, 'deploy = "opcm"')).engine.threads == 2
    for bad in ("threads = 0", "threads = 1.5", "thread = 2"):
        with pytest.raises(config.ConfigError) as e:
            config.load(_config(tmp_path / bad.replace(" ", "").replace(".", "_"), base, 'deploy = "opcm"', f"[engine]\n{bad}\n"))
        assert e.value.key.startswith("engine.thread"), e.value.key


def test_batch_cli_bits_do_not_depend_on_omp_num_threads(tmp_path, wide_stream):
    """The command a user runs, as a subprocess with OMP_NUM_THREADS=1 and =2 (OPCM: the SVDs and
    the projections are the thread-sensitive part)."""
    base, experts = wide_stream
    got = []
    for n in ("1", "2"):
        cfg = _config(tmp_path / n, base, 'deploy = "opcm"')
        env = {**os.environ, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}
        r = subprocess.run([sys.executable, "-m", "mergewatch.cli", "merge", "--config", str(cfg), *map(str, experts)],
                           env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        got.append(_digests(cfg.parent / "ws"))
    assert got[0] == got[1] and len(got[0]) > len(experts)
