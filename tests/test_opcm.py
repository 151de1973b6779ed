"""OPCM (SPEC §3.1): the projection on small matrices, the rank rule, fused blocks, the norm identity
‖M_t‖ = mean‖τ_i‖ on a real stream, first step, resume, and config validation."""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from pathlib import Path

import pytest
import torch

from mergewatch import config
from mergewatch.checkpoint.roles import Role, TensorRole
from mergewatch.checkpoint.writer import write_safetensors_file
from mergewatch.errors import ConfigError
from mergewatch.strategies import METHODS, build_strategy
from mergewatch.strategies.opcm import (
    OPCM,
    factor_shapes,
    opcm_update,
    project_update,
    project_with,
    projection_rank,
    stack_factors,
    svd_factors,
    unstack_factors,
)
from mergewatch.workspace import Workspace
from tests.helpers import load_all, make_expert, make_open_clip_base, perturb

LINEAR = TensorRole(Role.LINEAR)
FUSED = TensorRole(Role.FUSED_LINEAR, blocks=3)
OTHER = TensorRole(Role.OTHER)


def decaying(d_out: int, d_in: int, seed: int, decay: float = 0.6) -> torch.Tensor:
    """A random d_out × d_in matrix with geometrically decaying singular values (so that α = 0.5
    protects a rank r > 1 and the top-left block is not just the first diagonal entry)."""
    g = torch.Generator().manual_seed(seed)
    p = min(d_out, d_in)
    u, _ = torch.linalg.qr(torch.randn(d_out, p, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d_in, p, generator=g, dtype=torch.float64))
    s = torch.tensor([decay**k for k in range(p)], dtype=torch.float64)
    return (u * s) @ v.T


def rand(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# The per-tensor projection ---------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(6, 6), (9, 5), (4, 11), (13, 5)])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.8, 0.95])
def test_projected_update_has_zero_diagonal_and_top_left_block(shape, alpha):
    delta = decaying(*shape, seed=1).float()
    tau = rand(shape, 2)
    out = project_update(tau, delta, alpha)
    assert out.dtype == torch.float32 and out.shape == tau.shape
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    r = projection_rank(s, alpha)
    if alpha >= 0.8:
        assert r >= 2  # the block is a real block, not just the (1, 1) diagonal entry
    q_new = u.T @ out.double() @ vh.T
    q_old = u.T @ tau.double() @ vh.T
    p = min(shape)
    assert torch.diagonal(q_new).abs().max() < 1e-5
    assert r == 0 or q_new[:r, :r].abs().max() < 1e-5
    # everything else of Q is untouched ...
    keep = torch.ones(p, p, dtype=torch.bool)
    keep[:r, :r] = False
    keep.fill_diagonal_(False)
    torch.testing.assert_close(q_new[keep], q_old[keep], atol=1e-5, rtol=0)
    # ... and so is the part of τ outside span(U) ⊗ span(V) (thin SVD of a non-square Δ)
    outside = tau.double() - u @ q_old @ vh
    torch.testing.assert_close(out.double() - u @ q_new @ vh, outside, atol=1e-5, rtol=0)
    # the update really changed something (the test can fail)
    assert (out - tau).abs().max() > 1e-3


def test_rank_rule():
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])  # c = 0.4, 0.7, 0.9, 1.0
    assert [projection_rank(s, a) for a in (0.0, 0.39, 0.4, 0.5, 0.7, 0.89, 0.9, 0.99)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert projection_rank(torch.zeros(4), 0.5) == 0  # zero Δ: 0/0 is no rank
    assert projection_rank(torch.tensor([1.0, 1.0, 1.0, 1.0]), 0.5) == 2  # c_2 = 0.5 ≤ α counts


def test_rank_zero_fallbacks():
    tau = rand((5, 7), 3)
    # zero Δ: no singular directions to protect, the update passes unchanged (module Decision)
    assert torch.equal(project_update(tau, torch.zeros(5, 7), 0.5), tau)
    # α below c_1: r = 0, only the diagonal of Q is removed
    delta = decaying(5, 7, seed=4, decay=0.2).float()  # c_1 ≈ 0.8
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    assert projection_rank(s, 0.5) == 0
    q = u.T @ tau.double() @ vh.T
    want = tau.double() - u @ torch.diag(torch.diagonal(q)) @ vh
    torch.testing.assert_close(project_update(tau, delta, 0.5).double(), want, atol=1e-6, rtol=0)
    # ... which is not the same as keeping the top-left block too (α high enough for r ≥ 2)
    assert not torch.allclose(project_update(tau, delta, 0.99), project_update(tau, delta, 0.5), atol=1e-4)


@pytest.mark.parametrize("shape", [(6, 6), (9, 5), (4, 11), (13, 5)])
def test_thin_svd_equals_full_svd_formulation(shape):
    delta = decaying(*shape, seed=5).float()
    tau = rand(shape, 6)
    alpha = 0.6
    # full SVD: U is d_out × d_out, V is d_in × d_in; Q = Uᵀ τ V is d_out × d_in and R keeps the
    # diagonal of its leading p × p part and the top-left r × r block.
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=True)
    p = min(shape)
    r = projection_rank(s[:p], alpha)
    assert r >= 1
    q = u.T @ tau.double() @ vh.T
    rmat = torch.zeros_like(q)
    idx = torch.arange(p)
    rmat[idx, idx] = q[idx, idx]
    rmat[:r, :r] = q[:r, :r]
    want = tau.double() - u @ rmat @ vh
    torch.testing.assert_close(project_update(tau, delta, alpha).double(), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(7, 7), (9, 5), (13, 5), (5, 13), (40, 6)])
def test_svd_factors_are_a_thin_svd_of_delta(shape):
    """Square and mildly rectangular Δ: LAPACK's SVD directly; long side ≥ 2× the short one: QR
    first (float64), then the SVD of R. Either way U, V orthonormal, σ descending and U Σ Vᵀ = Δ."""
    delta = decaying(*shape, seed=8).float()
    f = svd_factors(delta)
    p = min(shape)
    assert f.u.shape == (shape[0], p) and f.vh.shape == (p, shape[1]) and f.sigma.shape == (p,)
    assert f.u.dtype == f.vh.dtype == f.sigma.dtype == torch.float32
    eye = torch.eye(p, dtype=torch.float64)
    torch.testing.assert_close(f.u.double().T @ f.u.double(), eye, atol=1e-6, rtol=0)
    torch.testing.assert_close(f.vh.double() @ f.vh.double().T, eye, atol=1e-6, rtol=0)
    assert bool((f.sigma[:-1] >= f.sigma[1:]).all())
    # σ is the float64 SVD's, rounded once to float32 (the form in which it is stored ahead)
    assert torch.equal(f.sigma, torch.linalg.svdvals(delta.double()).float())
    torch.testing.assert_close((f.u.double() * f.sigma.double()) @ f.vh.double(), delta.double(), atol=1e-6, rtol=0)
    assert svd_factors(torch.zeros(shape)) is None
    tau = rand(shape, 9)
    assert torch.equal(project_with(tau, None, 0.5), tau)
    with pytest.raises(ValueError, match="shape"):
        project_with(tau.T.contiguous(), f, 0.5) if shape[0] != shape[1] else project_with(tau[:, :-1], f, 0.5)


def test_fused_blocks_are_projected_separately():
    blocks = [decaying(8, 8, seed=10 + i, decay=0.5 + 0.1 * i).float() for i in range(3)]
    delta = torch.cat(blocks)
    tau = rand((24, 8), 7)
    got = opcm_update(FUSED, tau, delta, 0.5)
    want = torch.cat([project_update(t, d, 0.5) for t, d in zip(tau.chunk(3), blocks)])
    assert torch.equal(got, want)
    # one SVD of the stacked matrix is a different (wrong) answer
    assert not torch.allclose(got, project_update(tau, delta, 0.5), atol=1e-4)
    # linear: the whole matrix; other: no projection
    assert torch.equal(opcm_update(LINEAR, tau, delta, 0.5), project_update(tau, delta, 0.5))
    assert torch.equal(opcm_update(OTHER, tau, delta, 0.5), tau)
    with pytest.raises(ValueError, match="2-D"):
        opcm_update(LINEAR, torch.zeros(2, 2, 2), torch.ones(2, 2, 2), 0.5)


# Config ------------------------------------------------------------------------------------------
def _parse(policy: str):
    return config.parse(tomllib.loads(f'workspace = "ws"\nbase = "b.safetensors"\n[policy]\n{policy}\n'), source=Path("/tmp/x/mw.toml"))


@pytest.mark.parametrize(
    "policy,key",
    [
        ("deploy = 'opcm'\n[policy.opcm]\nalpha = 1.0", "policy.opcm.alpha"),
        ("deploy = 'opcm'\n[policy.opcm]\nalpha = 1.5", "policy.opcm.alpha"),
        ("deploy = 'opcm'\nalpha = 1", "policy.opcm.alpha"),
        ("deploy = 'opcm'\nalpha = -0.1", "policy.opcm.alpha"),
        ("deploy = 'opcm'\nalpha = 'half'", "policy.alpha"),
        ("deploy = 'opcm'\nbeta = 0.5", "policy.beta"),
        ("deploy = 'opcm'\ninit = 'ema'", "policy.init"),
    ],
)
def test_bad_opcm_config_names_the_key(policy, key):
    with pytest.raises(ConfigError) as ei:
        _parse(policy)
    assert ei.value.key in (key, key.replace("policy.opcm.", "policy.")), str(ei.value)


def test_opcm_config_and_registry():
    assert METHODS["opcm"] is OPCM and OPCM.defaults == {"alpha": 0.5} and OPCM.requires_zs_init
    s = _parse("deploy = 'opcm'")
    assert build_strategy(s.policy).describe()["alpha"] == 0.5
    assert build_strategy(_parse("deploy = 'opcm'\n[policy.opcm]\nalpha = 0").policy).alpha == 0.0
    with pytest.raises(ValueError, match="'alpha'"):
        OPCM({"alpha": 1.0})


# A real stream ------------------------------------------------------------------------------------
SCALES = (0.01, 0.03, 0.02, 0.05, 0.015)


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    d = tmp_path_factory.mktemp("opcm")
    base = make_open_clip_base(d / "base.safetensors")
    experts = [make_expert(base, d / f"e{i}.safetensors", seed=200 + i, scale=s) for i, s in enumerate(SCALES, 1)]
    return d, base, experts


def _workspace(tmp: Path, base: Path, policy: str = 'deploy = "opcm"') -> Workspace:
    tmp.mkdir(parents=True, exist_ok=True)
    if not (tmp / "base.safetensors").exists():
        (tmp / "base.safetensors").symlink_to(base)
    p = tmp / "mw.toml"
    p.write_text(f'workspace = "ws"\nbase = "base.safetensors"\nseed = 7\n[policy]\n{policy}\n', "utf-8")
    return Workspace(config.load(p))


def _norm(d: dict, names) -> float:
    return math.sqrt(sum(float((d[n].double() ** 2).sum()) for n in names))


def test_norm_of_merged_task_vector_is_mean_task_vector_norm(tmp_path, stream):
    _, base, experts = stream
    ws = _workspace(tmp_path, base)
    names = [m.name for m in ws.model_info.mergeable]
    b = {k: v.double() for k, v in load_all(base).items()}
    norms = []
    for t, path in enumerate(experts[:4], 1):
        res = ws.merge(path)
        assert res.status == "merged" and res.step == t
        e = load_all(path)
        norms.append(_norm({n: e[n].double() - b[n] for n in names}, names))
        dep = load_all(ws.publishers["deploy"].path(ws.publishers["deploy"].current()))
        m_norm = _norm({n: dep[n].double() - b[n] for n in names}, names)
        mean = sum(norms) / t
        assert m_norm == pytest.approx(mean, rel=1e-5)
        assert abs(m_norm - norms[-1]) > 1e-3 * mean or t == 1  # the experts' norms differ: not trivial
        snap = ws.states.latest()
        meta = snap.meta
        assert meta["t"] == t and meta["sum_norms"] == pytest.approx(sum(norms), rel=1e-6)
        s_norm = _norm(load_all(snap.directory / "sets" / "S"), names)
        assert meta["lambda"] == pytest.approx(s_norm / mean, rel=1e-6)
        if t > 1:
            assert meta["lambda"] > 1.0  # projected updates add up to more than the mean norm
        # init zs: the published init view is the base itself
        assert snap.record["views"]["init"] == {"source": "base"}


def test_first_step_is_the_first_expert_bit_for_bit(tmp_path, stream):
    _, base, _ = stream
    # tiny values where θ0 is 1 (LayerNorm weights): θ0 + (θ1 − θ0) rounds to 0 there, not to θ1
    b = load_all(base)
    want = perturb(b, seed=5)
    want["ln_final.weight"][:4] = 1e-9
    expert = tmp_path / "e.safetensors"
    write_safetensors_file(expert, want)
    assert any(not torch.equal(b[k] + (want[k] - b[k]), want[k]) for k in want)
    ws = _workspace(tmp_path, base)
    ws.merge(expert)
    got = load_all(ws.publishers["deploy"].path(1))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert ws.states.latest().meta["lambda"] == 1.0


def test_stream_matches_naive_whole_model_computation(tmp_path, stream):
    """S_t, λ_t and the deploy view against a direct whole-state-dict evaluation of SPEC §3.1."""
    _, base, experts = stream
    ws = _workspace(tmp_path, base, 'deploy = "opcm"\nalpha = 0.7')
    metas = {m.name: m for m in ws.model_info.mergeable}
    b = load_all(base)
    s_prev = None
    norms = []
    for t, path in enumerate(experts[:3], 1):
        ws.merge(path)
        e = load_all(path)
        tau = {n: e[n] - b[n] for n in metas}
        norms.append(_norm(tau, metas))
        if s_prev is None:
            s_new = tau
        else:
            s_new = {n: s_prev[n] + opcm_update(metas[n].role, tau[n], s_prev[n], 0.7) for n in metas}
        lam = _norm(s_new, metas) / (sum(norms) / t) if t > 1 else 1.0
        dep = load_all(ws.publishers["deploy"].path(t))
        state = load_all(ws.states.latest().directory / "sets" / "S")
        for n in metas:
            assert torch.equal(state[n], s_new[n]), n
            want = e[n] if t == 1 else b[n] + s_new[n] / lam
            torch.testing.assert_close(dep[n], want, atol=1e-6, rtol=1e-6, msg=n)
        s_prev = s_new


def _digest(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*.safetensors"))}


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, stream):
    """Digests of every deploy version, the final meta and the final S of an uninterrupted run."""
    _, base, experts = stream
    ws = _workspace(tmp_path_factory.mktemp("straight"), base)
    for p in experts:
        ws.merge(p)
    deploys = {t: _digest(ws.publishers["deploy"].path(t)) for t in ws.publishers["deploy"].versions()}
    snap = ws.states.latest()
    return deploys, snap.meta, _digest(snap.directory / "sets" / "S")


@pytest.mark.parametrize("k", [1, 3])
def test_resume_after_step_k_is_bit_identical(tmp_path, stream, straight_run, k):
    _, base, experts = stream
    want, want_meta, want_s = straight_run
    ws = _workspace(tmp_path, base)
    for p in experts[:k]:
        ws.merge(p)
    del ws
    ws = _workspace(tmp_path, base)  # a new Workspace object: the state is read back from disk
    ws.recover()
    for p in experts[k:]:
        ws.merge(p)
    got = {t: _digest(ws.publishers["deploy"].path(t)) for t in ws.publishers["deploy"].versions()}
    assert got == want and len(want) >= 3
    snap = ws.states.latest()
    assert snap.meta == want_meta and snap.t == len(experts)
    assert _digest(snap.directory / "sets" / "S") == want_s


# SVDs computed ahead (prepared sets) ----------------------------------------------------------
def test_factors_stack_and_unstack_per_block_with_a_zero_block():
    delta = torch.cat([decaying(4, 6, seed=1), torch.zeros(4, 6), decaying(4, 6, seed=2)]).float()
    factors = [svd_factors(d) for d in delta.chunk(3, dim=0)]
    assert factors[1] is None
    stored = stack_factors(factors, FUSED, tuple(delta.shape))
    assert {k: tuple(v.shape) for k, v in stored.items()} == factor_shapes(FUSED, (12, 6)) == {
        "svd_u": (12, 4), "svd_s": (3, 4), "svd_vh": (12, 6)}
    back = unstack_factors(stored, FUSED, tuple(delta.shape))
    assert back[1] is None
    for f, g in zip(factors, back):
        if f is not None:
            assert torch.equal(f.u, g.u) and torch.equal(f.sigma, g.sigma) and torch.equal(f.vh, g.vh)
    tau = rand((12, 6), 3)
    assert torch.equal(opcm_update(FUSED, tau, delta, 0.5),
                       torch.cat([project_with(t, f, 0.5) for t, f in zip(tau.chunk(3), back)]))
    with pytest.raises(ValueError, match="svd_vh"):
        unstack_factors({**stored, "svd_vh": stored["svd_vh"][:-1]}, FUSED, (12, 6))


def test_prepared_svds_give_a_bit_identical_stream(tmp_path, stream, straight_run):
    """ws.prepare() after every step (what the daemon does when idle): each next step uses the
    factors computed ahead, and every deploy version, meta and S equals the run without them."""
    _, base, experts = stream
    want, want_meta, want_s = straight_run
    ws = _workspace(tmp_path, base)
    metas = ws.model_info.metas
    assert ws.prepare() is None and not ws.prepare_due()  # nothing committed yet
    for t, p in enumerate(experts, 1):
        out = ws.merge(p)
        assert out.prepared == ("none" if t == 1 else "used")
        assert ws.prepare_due()
        prep = ws.prepare()
        assert prep is not None and prep.step == t and set(prep.sets) == {"svd_u", "svd_s", "svd_vh"}
        assert not ws.prepare_due() and ws.prepare() is None  # done once
        if t == 2:  # the stored factors are the SVD of S_t for every linear map
            snap = ws.states.latest()
            sets = snap.prepared()
            s_t = load_all(snap.directory / "sets" / "S")
            linear = [n for n, m in metas.items() if m.role.role in (Role.LINEAR, Role.FUSED_LINEAR)]
            assert linear and set(sets["svd_u"]) == set(linear)
            for n in linear:
                f = [svd_factors(d) for d in s_t[n].chunk(metas[n].role.blocks if metas[n].role.role is Role.FUSED_LINEAR else 1)]
                stored = stack_factors(f, metas[n].role, metas[n].shape)
                assert all(torch.equal(sets[k][n], stored[k]) for k in stored), n
    got = {t: _digest(ws.publishers["deploy"].path(t)) for t in ws.publishers["deploy"].versions()}
    assert got == want
    snap = ws.states.latest()
    assert snap.meta == want_meta and _digest(snap.directory / "sets" / "S") == want_s
    # retention drops old states, and the prepared sets of every state but the newest (they serve
    # only the step after it)
    assert ws.states.steps() == [4, 5]
    assert [t for t in range(1, 6) if (ws.states.root / str(t) / "prepared").exists()] == [5]


@pytest.mark.parametrize("damage", ["record", "truncate", "foreign", "nan"])
def test_unusable_prepared_sets_are_ignored_and_removed(tmp_path, stream, straight_run, damage):
    _, base, experts = stream
    want = straight_run[0]
    ws = _workspace(tmp_path, base)
    ws.merge(experts[0])
    ws.prepare()
    d = ws.states.latest().prepared_dir
    if damage == "record":
        (d / "prepared.json").write_text("{not json", "utf-8")
    elif damage == "truncate":
        f = next((d / "sets" / "svd_u").glob("*.safetensors"))
        f.write_bytes(f.read_bytes()[:-100])
    elif damage == "nan":  # damaged inside the data: found only while the step runs
        f = next((d / "sets" / "svd_u").glob("*.safetensors"))
        raw = bytearray(f.read_bytes())
        raw[-4096:] = b"\xff" * 4096  # NaN bit patterns in the last tensor's U
        f.write_bytes(bytes(raw))
    else:  # computed from another state
        rec = json.loads((d / "prepared.json").read_text("utf-8"))
        rec["state_sets"] = {"S": "0" * 64}
        (d / "prepared.json").write_text(json.dumps(rec), "utf-8")
    out = ws.merge(experts[1])
    assert out.prepared.startswith("unusable: ")
    assert ("non-finite" in out.prepared) if damage == "nan" else (str(d) in out.prepared), out.prepared
    assert not (ws.states.root / "1" / "prepared").exists()
    assert _digest(ws.publishers["deploy"].path(2)) == want[2]


def test_interrupted_prepare_leaves_nothing_and_is_redone(tmp_path, stream):
    _, base, experts = stream
    ws = _workspace(tmp_path, base)
    ws.merge(experts[0])

    def stop(label, pass_no, n_passes, done, total):
        if done == total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ws.prepare(progress=stop)
    assert not ws.states.latest().prepared_dir.exists() and ws.prepare_due()
    assert not any((ws.states.root / ".staging").iterdir())
    assert ws.prepare() is not None and not ws.prepare_due()
