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
from mergewatch.checkpoint.roles import Role, resolve_table
from mergewatch.checkpoint.writer import write_checkpoint, write_safetensors_file
from mergewatch.engine import build_model_info, run_step
from mergewatch.strategies.base import Pass, PassOutput, StepContext, Strategy, ViewSource
from mergewatch.workspace import Workspace
from tests.helpers import load_all, perturb, tiny_clip_state
from tests.test_techniques import bits, naive_ties


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
    import mergewatch.engine.state as state_mod
    import mergewatch.workspace as ws_mod
    import mergewatch.buffer.store as store_mod
    import mergewatch.engine.local as engine_mod

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


# Ownership of the tensors the engine reads (TensorInputs.owns) --------------------------------
class _SumOfTaskVectors(Strategy):
    """Test strategy: deploy = Σ_i (θ_i − θ0) over every buffered expert, computed in the experts'
    own buffers where the engine hands them over; records what it was given."""

    name = "sum_tv"

    def __init__(self):
        super().__init__({})
        self.seen: list[tuple[bool, list[bool], bool]] = []

    def view_sources(self, ctx):
        return {"deploy": "deploy", "init": ViewSource.BASE}

    def passes(self, ctx):
        def fn(meta, inp, ctx):
            self.seen.append((inp.owns(inp.base), [inp.owns(e) for e in inp.experts], inp.owns(torch.zeros(1))))
            taus = [e.sub_(inp.base) if inp.owns(e) else e - inp.base for e in inp.experts]
            out = taus[0]
            for t in taus[1:]:
                out += t
            return PassOutput(tensors={"deploy": out})

        return [Pass("sum", fn, writes=("deploy",), reads=frozenset({"experts"}))]


def test_engine_hands_over_the_tensors_it_reads_and_never_overwrites_a_callers(tmp_path):
    base_sd, paths = _setup(tmp_path, n=1)
    base = LazyCheckpoint(tmp_path / "base")
    e1 = LazyCheckpoint(paths[0])  # read from a file: a new tensor per access
    e2 = perturb(base_sd, seed=7)  # the caller's float32 tensors: read-only for the pass
    e3 = {k: v.to(torch.float16) if v.dtype.is_floating_point else v for k, v in perturb(base_sd, seed=8).items()}  # converted
    kept = {k: v.clone() for k, v in e2.items()}
    strat = _SumOfTaskVectors()
    table = resolve_table("auto", list(base))
    ctx = StepContext(t=3, seed=0, expert_ids=["a", "b", "c"], model=build_model_info(base, table), meta={})
    run_step(strat, ctx, base, [e1, e2, e3], {}, tmp_path / "out")
    assert strat.seen and all(s == (True, [True, False, True], False) for s in strat.seen)
    assert all(torch.equal(e2[k], kept[k]) for k in e2)  # the in-memory expert is untouched
    got = load_all(tmp_path / "out" / "views" / "deploy")
    e1_sd = load_all(paths[0])
    for k, b in base_sd.items():
        if ctx.model.metas[k].role.mergeable:
            want = (e1_sd[k] - b) + (e2[k] - b) + (e3[k].float() - b)
            assert torch.equal(got[k], want), k
        else:
            assert torch.equal(got[k], b), k


def _naive_all_ties(ws: Workspace, models: list[dict], p: float = 0.8, lam: float = 1.0) -> dict:
    base = load_all(ws.base.path)
    out = {}
    for k, b in base.items():
        role = ws.model_info.metas[k].role
        if not role.mergeable:
            out[k] = b
            continue
        blocks = role.blocks if role.role is Role.FUSED_LINEAR else 1
        out[k] = naive_ties(b, [m[k] for m in models], p, lam, "mean", blocks)
    return out


def _assert_bits_equal(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k in want:
        a, b = got[k], want[k]
        assert torch.equal(bits(a) if a.dtype == torch.float32 else a, bits(b) if b.dtype == torch.float32 else b), k


@pytest.mark.parametrize(
    "policy, views",
    [
        # init ft: θ_t is the init view, so the ALL merge must not compute in its buffer
        ('init = "ft"\ndeploy = "all"\ntechnique = "ties"', {"init": "ft"}),
        # ema_seed first: at t = 1 the EMA state *is* θ_1
        ('init = "ema"\ndeploy = "all"\nema_seed = "first"\ntechnique = "ties"', {"ema@1": "e1"}),
        # include_base: θ0 is a member of the ALL merge and also its base
        ('init = "zs"\ndeploy = "all"\ninclude_base = true\ntechnique = "ties"\n[policy.ties]\np = 0.5', {}),
        ('init = "zs"\ndeploy = "all"\ntechnique = "ties"', {}),
    ],
)
def test_all_merge_computes_in_the_experts_buffers_only_when_nothing_else_uses_them(tmp_path, policy, views):
    _, paths = _setup(tmp_path, n=2)
    ws = Workspace(config.load(_cfg(tmp_path, policy)))
    experts = [load_all(p) for p in paths]
    base = load_all(ws.base.path)
    include_base = "include_base" in policy
    p = 0.5 if include_base else 0.8
    for t in (1, 2):
        ws.merge(paths[t - 1])
        members = ([base] if include_base else []) + experts[:t]
        _assert_bits_equal(load_all(ws.publishers["deploy"].path(t)), _naive_all_ties(ws, members, p))
        if views.get("init") == "ft":
            _assert_bits_equal(load_all(ws.publishers["init"].path(t)), experts[t - 1])
        if t == 1 and "ema@1" in views:
            _assert_bits_equal(load_all(ws.states.latest().directory / "sets" / "ema"), experts[0])


# Prepared sets (work done ahead from a committed state) ---------------------------------------
class _Doubler(Strategy):
    """Test strategy with a prepared set: ``twice`` = 2·S computed ahead from the committed S."""

    name = "doubler"

    def __init__(self, view_in_prepare: bool = False):
        super().__init__({})
        self.view_in_prepare = view_in_prepare

    def prepared_sets(self, t):
        return ("twice",)

    def prepare_passes(self, ctx):
        sinks = ("twice", "deploy") if self.view_in_prepare else ("twice", "scratch")

        def fn(meta, inp, ctx):
            assert inp.experts == []  # a prepare reads no expert
            return PassOutput(tensors={k: inp.state["S"] * 2 for k in sinks})

        return [Pass("ahead", fn, writes=sinks, reads=frozenset({"state"}))]

    def passes(self, ctx):
        return []


def test_run_prepare_writes_only_the_prepared_sets_and_refuses_views(tmp_path):
    from mergewatch.engine import StrategyError, run_prepare

    base_sd, paths = _setup(tmp_path, n=1)
    base = LazyCheckpoint(tmp_path / "base")
    ctx = StepContext(t=1, seed=0, expert_ids=["a"], model=build_model_info(base, resolve_table("auto", list(base))), meta={})
    state = {"S": load_all(paths[0])}
    res = run_prepare(_Doubler(), ctx, base, state, tmp_path / "out")
    assert set(res.sets) == {"twice"} and sorted(p.name for p in (tmp_path / "out" / "sets").iterdir()) == ["twice"]
    got = load_all(tmp_path / "out" / "sets" / "twice")
    for k, v in state["S"].items():
        assert torch.equal(got[k], v * 2 if ctx.model.metas[k].role.mergeable else base_sd[k]), k
    with pytest.raises(StrategyError, match="cannot write a view"):
        run_prepare(_Doubler(view_in_prepare=True), ctx, base, state, tmp_path / "out2")
    with pytest.raises(StrategyError, match="nothing to prepare"):
        run_prepare(_SumOfTaskVectors(), ctx, base, state, tmp_path / "out3")


@pytest.mark.parametrize("trim", [False, True])
def test_a_trimming_pass_returns_freed_memory_after_every_tensor(tmp_path, monkeypatch, trim):
    from mergewatch.engine import local as engine

    calls: list[int] = []
    monkeypatch.setattr(engine, "release_freed_memory", lambda: calls.append(1))

    class Copy(Strategy):
        name = "copy"

        def view_sources(self, ctx):
            return {"deploy": "deploy", "init": ViewSource.BASE}

        def passes(self, ctx):
            return [Pass("copy", lambda meta, inp, ctx: PassOutput(tensors={"deploy": inp.expert}), writes=("deploy",), trim=trim)]

    _, paths = _setup(tmp_path, n=1)
    base = LazyCheckpoint(tmp_path / "base")
    info = build_model_info(base, resolve_table("auto", list(base)))
    run_step(Copy({}), StepContext(t=1, seed=0, expert_ids=["a"], model=info, meta={}), base, [LazyCheckpoint(paths[0])], {}, tmp_path / "out")
    n_mergeable = len(info.mergeable)
    assert n_mergeable > 1 and len(calls) == (n_mergeable + 1 if trim else 1)  # + the end of the pass
