"""NuFILT (SPEC §3.2): the per-layer math on small matrices, then whole streams on tiny open_clip models."""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path

import pytest
import torch

from mergewatch import config
from mergewatch.checkpoint.roles import Role, detect_table
from mergewatch.errors import ConfigError
from mergewatch.strategies import METHODS, build_strategy
from mergewatch.strategies.base import TensorMeta, derive_seed
from mergewatch.strategies.nufilt import (
    LayerLoss,
    NuFILT,
    nufilt_layer,
    nufilt_loss,
    top_right_singular_vectors,
)
from mergewatch.workspace import Workspace
from tests.helpers import load_all, make_expert, make_open_clip_base


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors here are tiny: with several test processes sharing few cores, intra-op threads
    only add synchronisation cost (10× slower under load). Results do not depend on it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _layer_case(seed: int = 0, d_out: int = 48, d_in: int = 40):
    g = _gen(seed)
    tau = torch.randn(d_out, d_in, generator=g) * 0.02
    delta = torch.randn(d_out, d_in, generator=g) * 0.02
    return tau, delta


def _gens(seed: int):
    return lambda purpose: _gen(derive_seed(seed, purpose))


# Per-layer math ---------------------------------------------------------------------------------
def test_steps0_update_is_tau_p_and_kills_the_protected_subspace():
    tau, delta = _layer_case()
    s = NuFILT({"steps": 0, "r_p": 16})
    res = s.merge_layer(tau, delta, _gens(1))
    u = top_right_singular_vectors(delta, 16).float()
    assert u.shape == (40, 16)
    want = tau - (tau @ u) @ u.T
    torch.testing.assert_close(res.update, want, atol=1e-7, rtol=0)
    # merged weights: (W_t − W_{t−1}) U = τ P U = 0 while τ U itself is far from 0
    w0 = torch.randn(48, 40, generator=_gen(5))
    w_prev = w0 + delta
    w_new = w_prev + res.update
    assert float((tau @ u).norm()) > 0.1
    assert float(((w_new - w_prev) @ u).norm()) < 1e-5
    assert float((res.update @ u).norm()) < 1e-6


def test_loss_decreases_over_the_adam_steps():
    tau, delta = _layer_case(1)
    res = NuFILT({"r_p": 16}).merge_layer(tau, delta, _gens(2))
    assert len(res.losses) == 51
    assert res.losses[-1] < 0.6 * res.losses[0]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(res.losses, res.losses[1:]))  # deterministic run: monotone here
    # the first recorded loss is the literal loss at B = 0
    u, v1 = top_right_singular_vectors(delta, 16).float(), top_right_singular_vectors(tau, 8).float()
    a0 = torch.randn(64, 40, generator=_gens(2)("nufilt-lora")) * 0.02
    lit = float(nufilt_loss(tau, delta, u, v1, torch.zeros(40, 64), a0))
    assert res.losses[0] == pytest.approx(lit, rel=1e-5)
    # the optimiser really moved B away from 0 (the fused update is not just τP)
    assert float(res.b.abs().max()) > 1e-3
    assert float((res.update - (tau - (tau @ u) @ u.T)).abs().max()) > 1e-6


def test_loss_identity_for_random_lora_factors():
    tau, delta = _layer_case(2)
    u = top_right_singular_vectors(delta, 16).float()
    v1 = top_right_singular_vectors(tau, 8).float()
    g = _gen(9)
    b = torch.randn(40, 64, generator=g) * 0.1
    a = torch.randn(64, 40, generator=g) * 0.1
    p = torch.eye(40) - u @ u.T
    merged = delta + tau @ (p + b @ a)
    second = (delta @ u - merged @ u).norm()
    torch.testing.assert_close(second, (tau @ b @ a @ u).norm(), rtol=1e-4, atol=0)
    assert float(second) > 1e-2  # not trivially 0
    # the reassociated loss the optimiser uses equals the literal SPEC form
    lit = nufilt_loss(tau, delta, u, v1, b, a)
    torch.testing.assert_close(LayerLoss(tau, delta, u, v1)(b, a), lit, rtol=1e-4, atol=0)
    first = ((tau @ v1 - merged @ v1) ** 2).sum()
    torch.testing.assert_close(lit, first + second**2, rtol=1e-4, atol=0)


def test_zero_delta_gives_tau_and_rank_limits():
    tau, _ = _layer_case(3)
    res = nufilt_layer(tau, torch.zeros_like(tau), top_right_singular_vectors(torch.zeros_like(tau), 16), top_right_singular_vectors(tau, 8), torch.randn(64, 40, generator=_gen(1)) * 0.02)
    assert torch.equal(res.update, tau)
    # r_p larger than d_in: k = min(r_p, d_out, d_in)
    assert top_right_singular_vectors(tau, 128).shape == (40, 40)
    # numerically zero singular values are dropped (rank-3 matrix)
    g = _gen(4)
    low = torch.randn(48, 3, generator=g) @ torch.randn(3, 40, generator=g)
    assert top_right_singular_vectors(low, 16).shape == (40, 3)
    assert top_right_singular_vectors(low, 16, "randomized", _gen(1)).shape == (40, 3)


def _decaying(m: int, n: int, seed: int, rate: float = 0.8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64))
    w, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    s = rate ** torch.arange(n, dtype=torch.float64)
    return ((q * s) @ w.T).to(torch.float32)


@pytest.mark.parametrize("k", [8, 20, 40])
def test_randomized_svd_matches_full_subspace(k):
    x = _decaying(300, 200, seed=k)
    full = top_right_singular_vectors(x, k, "full")
    rnd = top_right_singular_vectors(x, k, "randomized", _gen(11))
    assert full.shape == rnd.shape == (200, k)
    diff = torch.linalg.matrix_norm(full @ full.T - rnd @ rnd.T, ord=2)
    assert float(diff) < 1e-8
    # seeded: the same generator seed gives the same basis bit for bit
    assert torch.equal(rnd, top_right_singular_vectors(x, k, "randomized", _gen(11)))
    # orthonormal columns
    torch.testing.assert_close(rnd.T @ rnd, torch.eye(k, dtype=torch.float64), atol=1e-10, rtol=0)


def test_randomized_layer_equals_full_layer():
    """Through the whole layer solve: the subspaces agree, so do the LoRA results."""
    x = _decaying(64, 48, seed=3) * 0.05
    tau = _decaying(64, 48, seed=4) * 0.05
    full = NuFILT({"r_p": 8}).merge_layer(tau, x, _gens(0))
    rnd = NuFILT({"r_p": 8, "svd": "randomized"}).merge_layer(tau, x, _gens(0))
    torch.testing.assert_close(rnd.update, full.update, atol=1e-6, rtol=1e-4)


# Parameters and config --------------------------------------------------------------------------
def test_registry_defaults_and_validation():
    assert METHODS["nufilt"] is NuFILT
    s = NuFILT({})
    assert s.params["r_p"] == 128 and s.params["r_l"] == 64 and s.params["r_v"] == 8
    assert s.params["lr"] == 1e-3 and s.params["steps"] == 50 and s.params["betas"] == [0.9, 0.999]
    assert s.params["others"] == "base" and s.params["svd"] == "full" and s.requires_zs_init
    for bad, key in (({"r_p": 0}, "r_p"), ({"r_l": 1.5}, "r_l"), ({"lr": -1.0}, "lr"), ({"steps": -1}, "steps"), ({"others": "all"}, "others"),
                     ({"svd": "lanczos"}, "svd"), ({"select": ["("]}, "select"), ({"select": []}, "select"), ({"betas": [0.9]}, "betas"), ({"lora_std": 0}, "lora_std")):
        with pytest.raises(ValueError, match=f"'{key}'"):
            NuFILT(bad)


def test_default_selection_on_open_clip_and_hf_names():
    s = NuFILT({})
    table = detect_table(["visual.transformer.resblocks.0.attn.in_proj_weight", "transformer.resblocks.0.attn.in_proj_weight"])

    def sel(name, shape=(32, 32)):
        return s.selected(TensorMeta(name, shape, torch.float32, table.role_of(name, shape, torch.float32)))

    assert sel("visual.transformer.resblocks.0.attn.in_proj_weight", (96, 32))
    assert sel("transformer.resblocks.3.attn.out_proj.weight")
    assert sel("visual.transformer.resblocks.0.mlp.c_fc.weight", (128, 32))
    assert not sel("visual.transformer.resblocks.0.mlp.c_proj.weight", (32, 128))
    assert not sel("visual.transformer.resblocks.0.attn.in_proj_bias", (96,))
    assert not sel("visual.proj")
    hf = detect_table(["vision_model.encoder.layers.0.self_attn.q_proj.weight"])
    for n, want in (("vision_model.encoder.layers.0.self_attn.q_proj.weight", True), ("vision_model.encoder.layers.0.self_attn.out_proj.weight", True),
                    ("vision_model.encoder.layers.0.mlp.fc1.weight", True), ("vision_model.encoder.layers.0.mlp.fc2.weight", False),
                    ("vision_model.encoder.layers.0.self_attn.q_proj.bias", False)):
        shape = (32, 32) if n.endswith("weight") else (32,)
        assert s.selected(TensorMeta(n, shape, torch.float32, hf.role_of(n, shape, torch.float32))) is want, n


def _parse(text: str):
    return config.parse(tomllib.loads('workspace = "ws"\nbase = "b.safetensors"\n' + text), source=Path("/tmp/x/mw.toml"))


def test_config_loads_and_names_bad_keys():
    s = _parse('[policy]\ndeploy = "nufilt"\n[policy.nufilt]\nr_p = 16\nselect = ["attn"]\nothers = "ta"')
    strat = build_strategy(s.policy)
    assert isinstance(strat, NuFILT) and strat.params["r_p"] == 16 and strat.params["select"] == ["attn"]
    for text, key in (("r_p = 0", "policy.nufilt.r_p"), ("svd = 'qr'", "policy.nufilt.svd"), ("select = ['(']", "policy.nufilt.select"), ("rp = 3", "policy.nufilt.rp"),
                      ("lr = 'fast'", "policy.nufilt.lr")):
        with pytest.raises(ConfigError) as ei:
            _parse(f'[policy]\ndeploy = "nufilt"\n[policy.nufilt]\n{text}')
        assert ei.value.key == key, str(ei.value)
    with pytest.raises(ConfigError) as ei:
        _parse('[policy]\ndeploy = "nufilt"\ninit = "ema"')
    assert ei.value.key == "policy.init"


# Streams on tiny open_clip models --------------------------------------------------------------
@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    d = tmp_path_factory.mktemp("nufilt")
    base = make_open_clip_base(d / "base.safetensors")
    experts = [make_expert(base, d / f"e{i}.safetensors", seed=200 + i) for i in range(1, 6)]
    return d, base, experts


def _workspace(root: Path, base: Path, policy: str) -> Workspace:
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "base.safetensors").exists():
        (root / "base.safetensors").symlink_to(base)
    (root / "mw.toml").write_text(f'workspace = "ws"\nbase = "base.safetensors"\nseed = 11\n[policy]\ndeploy = "nufilt"\n{policy}\n', "utf-8")
    return Workspace(config.load(root / "mw.toml"))


def _sha(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*.safetensors"))}


def _selected_names(ws: Workspace) -> set[str]:
    return {m.name for m in ws.model_info.metas.values() if ws.strategy.selected(m)}


def test_first_expert_is_copied_on_selected_layers_base_elsewhere(tmp_path, stream):
    _, base, experts = stream
    ws = _workspace(tmp_path, base, "")
    ws.merge(experts[0])
    got = load_all(ws.publishers["deploy"].path(1))
    b, e = load_all(base), load_all(experts[0])
    sel = _selected_names(ws)
    assert len(sel) == 9  # 3 resblocks × (in_proj (q, k, v), out_proj, c_fc)
    assert all("c_proj" not in n for n in sel)
    for k in b:
        assert torch.equal(got[k], e[k] if k in sel else b[k]), k
    # the init view is θ0 itself
    init = load_all(ws.publishers["init"].path(ws.publishers["init"].current()))
    assert all(torch.equal(init[k], b[k]) for k in b)


def test_five_expert_stream_replay_and_resume(tmp_path, stream):
    _, base, experts = stream
    runs = []
    for k in range(2):
        ws = _workspace(tmp_path / f"run{k}", base, "")
        for p in experts:
            ws.merge(p)
        runs.append(_sha(ws.root / "deploy" / "5"))
    assert runs[0] == runs[1]  # bit-identical replay
    b = load_all(base)
    got = load_all(ws.publishers["deploy"].path(5))
    assert set(got) == set(b)
    sel = _selected_names(ws)
    for k, v in b.items():
        assert got[k].shape == v.shape and got[k].dtype == v.dtype, k
        assert bool(torch.isfinite(got[k]).all()), k
        if k in sel:
            assert not torch.equal(got[k], v), k
        else:
            assert torch.equal(got[k], v), k  # others = "base": bit-equal θ0
    # the state keeps W^m of the selected layers only (float32)
    merged = ws.states.latest().sets()["merged"]
    assert set(merged) == sel and all(merged[k].dtype == torch.float32 for k in merged)
    assert ws.states.latest().meta == {"t": 5}
    # resume after step 3 in a new Workspace object equals the uninterrupted run
    ws = _workspace(tmp_path / "resumed", base, "")
    for p in experts[:3]:
        ws.merge(p)
    del ws
    ws = _workspace(tmp_path / "resumed", base, "")
    ws.recover()
    for p in experts[3:]:
        ws.merge(p)
    assert _sha(ws.root / "deploy" / "5") == runs[0]


def test_steps0_stream_update_is_orthogonal_to_previous_merge(tmp_path, stream):
    """With steps = 0 and r_p < d_in, each selected layer's update W^m_2 − W^m_1 = τ_2 P annihilates
    the top right singular vectors of Δ = W^m_1 − W0 (per q, k, v block)."""
    _, base, experts = stream
    ws = _workspace(tmp_path, base, "[policy.nufilt]\nsteps = 0\nr_p = 8")
    ws.merge(experts[0])
    ws.merge(experts[1])
    b = load_all(base)
    w1, w2 = load_all(ws.publishers["deploy"].path(1)), load_all(ws.publishers["deploy"].path(2))
    e2 = load_all(experts[1])
    for k in _selected_names(ws):
        meta = ws.model_info.metas[k]
        nb = meta.role.blocks if meta.role.role is Role.FUSED_LINEAR else 1
        for d, upd, tau in zip((w1[k] - b[k]).chunk(nb), (w2[k] - w1[k]).chunk(nb), (e2[k] - b[k]).chunk(nb)):
            u = top_right_singular_vectors(d, 8).float()
            assert float((tau @ u).norm()) > 1e-2
            assert float((upd @ u).norm()) < 1e-5 * float(tau.norm()) + 1e-6, k


def test_others_ta_running_average(tmp_path, stream):
    _, base, experts = stream
    ws = _workspace(tmp_path / "ta", base, 'others = "ta"')
    ref = _workspace(tmp_path / "base", base, "")
    for p in experts[:3]:
        ws.merge(p)
        ref.merge(p)
    got = load_all(ws.publishers["deploy"].path(3))
    want_sel = load_all(ref.publishers["deploy"].path(3))
    sel = _selected_names(ws)
    ex = [load_all(p) for p in experts[:3]]
    b = load_all(base)
    for k in b:
        if k in sel:
            assert torch.equal(got[k], want_sel[k]), k  # selected layers do not depend on `others`
            continue
        avg = ex[0][k].float()
        for t in (2, 3):
            avg = ((t - 1) * avg + ex[t - 1][k].float()) / t
        assert torch.equal(got[k], avg), k
        assert not torch.equal(got[k], b[k]), k
    assert set(ws.states.latest().sets()["merged"]) == set(b)


def test_half_precision_base_keeps_dtypes(tmp_path):
    base = make_open_clip_base(tmp_path / "src" / "base.safetensors", dtype=torch.bfloat16)
    experts = [make_expert(base, tmp_path / "src" / f"e{i}.safetensors", seed=i) for i in (1, 2)]
    ws = _workspace(tmp_path / "w", base, "[policy.nufilt]\nsteps = 5")
    for p in experts:
        ws.merge(p)
    got = load_all(ws.publishers["deploy"].path(2))
    b = load_all(base)
    assert all(got[k].dtype == b[k].dtype == torch.bfloat16 and bool(torch.isfinite(got[k].float()).all()) for k in b)


@pytest.mark.parametrize("policy", ["", 'svd = "randomized"\nr_p = 8'])
def test_subspaces_prepared_ahead_give_a_bit_identical_stream(tmp_path, stream, policy):
    """Δ's subspace computed ahead after every step (what the daemon does when idle) gives the same
    bits as computing it inside the next step; the stored U is ``delta_subspace`` of Δ = W^m_t − W0
    (randomized: seeded with expert t, the last one merged into Δ)."""
    _, base, experts = stream
    plain = _workspace(tmp_path / "plain", base, policy)
    ahead = _workspace(tmp_path / "ahead", base, policy)
    b = load_all(base)
    for t, p in enumerate(experts, 1):
        assert plain.merge(p).prepared == "none"
        assert ahead.merge(p).prepared == ("none" if t == 1 else "used")
        assert _sha(ahead.root / "deploy" / str(t)) == _sha(plain.root / "deploy" / str(t))
        out = ahead.prepare()
        assert out is not None and set(out.sets) == {"delta_u", "delta_rank"}
        if t == 2:
            snap = ahead.states.latest()
            sets, merged = snap.prepared(), load_all(snap.directory / "sets" / "merged")
            sel = _selected_names(ahead)
            assert set(sets["delta_u"]) == sel
            ctx_seed = lambda layer, purpose: torch.Generator().manual_seed(derive_seed(11, snap.expert_ids[-1], layer, purpose))
            for name in sel:
                meta = ahead.model_info.metas[name]
                nb = meta.role.blocks if meta.role.role is Role.FUSED_LINEAR else 1
                for j, d in enumerate((merged[name] - b[name]).chunk(nb, dim=0)):
                    want = ahead.strategy.delta_subspace(d, lambda purpose, _l=f"{name}#{j}": ctx_seed(_l, purpose))
                    r = int(sets["delta_rank"][name][j])
                    assert r == want.shape[1] > 0 and torch.equal(sets["delta_u"][name][j, :, :r], want), (name, j)
