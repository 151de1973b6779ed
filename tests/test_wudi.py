"""WUDI-Merging (SPEC §3.3): the objective, both solvers on small cases, and streams on tiny open_clip."""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path

import pytest
import torch

from mergewatch import config
from mergewatch.checkpoint.roles import Role
from mergewatch.errors import ConfigError
from mergewatch.strategies import METHODS, build_strategy
from mergewatch.strategies.wudi import WUDI, WudiGradient, adam_step_, gram_stats, wudi_adam, wudi_exact, wudi_loss, wudi_solve
from mergewatch.workspace import Workspace
from tests.helpers import load_all, make_expert, make_open_clip_base


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add synchronisation cost on a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _grad(x: torch.Tensor, taus) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    wudi_loss(x, taus).backward()
    return x.grad


# The closed form ---------------------------------------------------------------------------------
def test_exact_solution_zeroes_the_gradient():
    taus = [_randn(5, 4, seed=i) for i in range(3)]
    x = wudi_exact(taus)
    g0 = _grad(torch.zeros(5, 4, dtype=torch.float64), taus)
    assert float(g0.abs().max()) > 1.0  # the gradient is not trivially small
    assert float(_grad(x, taus).abs().max()) < 1e-10
    # a minimiser: any perturbation increases the loss
    base = float(wudi_loss(x, taus))
    for s in range(5):
        assert float(wudi_loss(x + 1e-3 * _randn(5, 4, seed=100 + s), taus)) > base


def test_exact_solution_rank_deficient():
    """Three rank-1 task vectors a_i b_iᵀ with b_3 = b_1 + b_2 in R^6: A = Σ G_i has rank 2."""
    b1, b2 = _randn(6, seed=1), _randn(6, seed=2)
    bs = [b1, b2, b1 + b2]
    taus = [torch.outer(_randn(5, seed=10 + i), b) for i, b in enumerate(bs)]
    a = sum(gram_stats(t)[0] for t in taus)
    assert int(torch.linalg.matrix_rank(a)) == 2
    x = wudi_exact(taus)
    assert float(wudi_loss(x, taus)) > 1e-3  # no exact fit: a real trade-off
    assert float(_grad(x, taus).abs().max()) < 1e-10
    # minimum norm: nothing outside span(b1, b2), where every τ_i vanishes
    q, _ = torch.linalg.qr(torch.stack([b1, b2], dim=1), mode="complete")
    null = q[:, 2:]
    assert float((x @ null).abs().max()) < 1e-12
    # a plain inverse is meaningless here; torch's own pseudo-inverse gives the same minimiser
    ref = sum(gram_stats(t)[1] for t in taus) @ torch.linalg.pinv(a, hermitian=True)
    torch.testing.assert_close(x, ref, atol=1e-10, rtol=1e-10)


def test_zero_task_vector_contributes_nothing():
    taus = [_randn(4, 3, seed=1), torch.zeros(4, 3, dtype=torch.float64)]
    g, tg = gram_stats(taus[1])
    assert not g.any() and not tg.any()
    torch.testing.assert_close(wudi_exact(taus), taus[0], atol=1e-12, rtol=0)
    assert torch.isfinite(wudi_loss(taus[0], taus))
    assert not wudi_solve(torch.zeros(3, 3), torch.zeros(4, 3)).any()


def test_adam_converges_to_the_exact_minimum():
    taus = [_randn(5, 4, seed=20 + i) for i in range(3)]
    exact = wudi_exact(taus)
    x = wudi_adam(taus, sum(taus), lr=1e-2, steps=2000)
    assert x.dtype == torch.float32
    want = float(wudi_loss(exact, taus))
    start = float(wudi_loss(sum(taus), taus))
    assert start > 1.5 * want
    assert float(wudi_loss(x.double(), taus)) == pytest.approx(want, rel=1e-6)
    torch.testing.assert_close(x.double(), exact, atol=1e-4, rtol=0)


def test_adam_reference_settings_hand_checked_2x2():
    """τ_1 = [[1, 0], [0, 0]] (‖τ_1‖² = 1, G_1 = diag(1, 0)), τ_2 = [[0, 0], [1, 1]] (‖τ_2‖² = 2,
    G_2 = [[.5, .5], [.5, .5]]); start X_0 = τ_1 + τ_2 = [[1, 0], [1, 1]].

    ∇L = 2 Σ_i (X − τ_i) G_i, so at X_0: 2 τ_2 G_1 + 2 τ_1 G_2 = 2 [[0, 0], [1, 0]] + [[1, 1], [0, 0]]
    = [[1, 1], [2, 0]].
    Adam step 1 (m̂ = g, v̂ = g²): X_1 = X_0 − lr · g / (|g| + 1e-8) = [[1 − 1e-5, −1e-5], [1 − 1e-5, 1]]
    (the (1, 1) entry has g = 0 and stays).
    Step 2: the three moving entries have ĝ ≈ their step-1 gradient (it changes by O(1e-5)), so
    they move by lr again. At X_1 the (1, 1) gradient is 2 (X_1 − τ_2)[1, :] G_2[:, 1] = 2 · (−ε/2)
    = −ε with ε = 1e-5 · 2/(2 + 1e-8) ≈ 1e-5; its first moments: m̂ = 0.1 g / (1 − 0.9²) = g · 0.1/0.19,
    v̂ = 0.001 g² / (1 − 0.999²) = g² · 0.001/0.001999, so the step is
    lr · (0.1/0.19) / (√(0.001/0.001999) + 1e-8/ε) = 1e-5 · 0.5263158 / (0.7072836 + 0.001)
    = 7.43085e-6 upwards: X_2 = [[1 − 2e-5, −2e-5], [1 − 2e-5, 1 + 7.43085e-6]]."""
    t1 = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    t2 = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    x0 = t1 + t2
    torch.testing.assert_close(_grad(x0, [t1, t2]), torch.tensor([[1.0, 1.0], [2.0, 0.0]]), atol=0, rtol=0)
    x1 = wudi_adam([t1, t2], x0, steps=1)
    torch.testing.assert_close(x1, torch.tensor([[1 - 1e-5, -1e-5], [1 - 1e-5, 1.0]]), atol=1e-7, rtol=0)
    assert x1[1, 1] == 1.0
    x2 = wudi_adam([t1, t2], x0, steps=2)
    torch.testing.assert_close(x2, torch.tensor([[1 - 2e-5, -2e-5], [1 - 2e-5, 1 + 7.43085e-6]]), atol=1.2e-7, rtol=0)
    assert float(x2[1, 1] - 1) == pytest.approx(7.43085e-6, abs=1.2e-7)
    # 50 steps (the reference) lower the loss from its start
    assert float(wudi_loss(wudi_adam([t1, t2], x0), [t1, t2])) < float(wudi_loss(x0, [t1, t2]))


# The analytic gradient and the hand-written Adam step ---------------------------------------------
@pytest.mark.parametrize("shape,mode", [((7, 4), "gram"), ((5, 5), "gram"), ((3, 8), "rows")])
def test_analytic_gradient_matches_autograd(shape, mode):
    taus = [_randn(*shape, seed=40 + i).float() for i in range(3)] + [torch.zeros(shape)]  # a zero τ is skipped
    x = _randn(*shape, seed=50).float()
    grad = WudiGradient(taus)
    assert grad.mode == mode and len(grad.terms) == 3
    want = _grad(x.double(), [t.double() for t in taus])
    assert float(want.abs().max()) > 1.0
    got = grad(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5 * float(want.abs().max()), rtol=0)
    # the buffer is reused: a second call at another point gives that point's gradient
    y = x + 1.0
    torch.testing.assert_close(grad(y).double(), _grad(y.double(), [t.double() for t in taus]), atol=1e-4, rtol=1e-5)
    assert not WudiGradient([torch.zeros(shape)])(x).any()


def test_adam_step_is_torch_adam_bit_for_bit():
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(6, 5, generator=g)
    grads = [torch.randn(6, 5, generator=g) * 10.0 ** (k % 3 - 1) for k in range(7)]
    ref = x0.clone()
    opt = torch.optim.Adam([ref], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, foreach=False)
    x, m, v, buf = x0.clone(), torch.zeros(6, 5), torch.zeros(6, 5), torch.empty(6, 5)
    for k, gk in enumerate(grads, 1):
        ref.grad = gk.clone()
        opt.step()
        adam_step_(x, gk, m, v, k, lr=1e-3, buffer=buf if k % 2 else None)
        assert torch.equal(x, ref), k
    assert not torch.equal(x, x0)


def _autograd_adam(taus, init, lr, steps):
    """The reference solver written with autograd and torch.optim.Adam (what ``wudi_adam`` replaced)."""
    x = init.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, foreach=False)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        wudi_loss(x, taus).backward()
        opt.step()
    return x.detach()


@pytest.mark.parametrize("shape", [(12, 6), (8, 8), (5, 16)])
def test_adam_matches_autograd_adam(shape):
    taus = [_randn(*shape, seed=60 + i).float() for i in range(2)]
    init = taus[0] + taus[1]
    want = _autograd_adam(taus, init, lr=1e-3, steps=50)
    got = wudi_adam(taus, init, lr=1e-3, steps=50)
    assert float((want - init).norm()) > 0.02 * float(init.norm())  # the steps really moved x
    assert float((got - want).norm()) <= 1e-6 * float(want.norm())
    # init is left alone unless handed over
    torch.testing.assert_close(init, taus[0] + taus[1], atol=0, rtol=0)
    owned = init.clone()
    assert wudi_adam(taus, owned, lr=1e-3, steps=50, overwrite_init=True) is owned
    assert torch.equal(owned, got)


# Parameters and config ---------------------------------------------------------------------------
def test_registry_defaults_and_validation():
    assert METHODS["wudi"] is WUDI
    s = WUDI({})
    assert s.params == {"solver": "adam", "lr": 1e-5, "steps": 50, "rcond": 1e-5} and s.requires_zs_init
    for bad, key in (({"solver": "lbfgs"}, "solver"), ({"lr": 0}, "lr"), ({"steps": 1.5}, "steps"), ({"rcond": 1.0}, "rcond"), ({"rcond": 0}, "rcond")):
        with pytest.raises(ValueError, match=f"'{key}'"):
            WUDI(bad)
    with pytest.raises(ValueError, match="unknown"):
        WUDI({"lambda": 1.0})


def _parse(text: str):
    return config.parse(tomllib.loads('workspace = "ws"\nbase = "b.safetensors"\n' + text), source=Path("/tmp/x/mw.toml"))


def test_config_loads_and_names_bad_keys():
    s = _parse('[policy]\ndeploy = "wudi"\nsolver = "exact"\nrcond = 1e-6')
    strat = build_strategy(s.policy)
    assert isinstance(strat, WUDI) and strat.solver == "exact" and strat.params["rcond"] == 1e-6
    for text, key in (("solver = 'newton'", "policy.wudi.solver"), ("rcond = 2.0", "policy.wudi.rcond"), ("steps = -1", "policy.wudi.steps"), ("lr = true", "policy.wudi.lr")):
        with pytest.raises(ConfigError) as ei:
            _parse(f'[policy]\ndeploy = "wudi"\n[policy.wudi]\n{text}')
        assert ei.value.key == key, str(ei.value)


# Streams on tiny open_clip models ---------------------------------------------------------------
@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    d = tmp_path_factory.mktemp("wudi")
    base = make_open_clip_base(d / "base.safetensors")
    experts = [make_expert(base, d / f"e{i}.safetensors", seed=300 + i) for i in range(1, 6)]
    return d, base, experts


def _workspace(root: Path, base: Path, policy: str = "") -> Workspace:
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "base.safetensors").exists():
        (root / "base.safetensors").symlink_to(base)
    (root / "mw.toml").write_text(f'workspace = "ws"\nbase = "base.safetensors"\nseed = 5\n[policy]\ndeploy = "wudi"\n{policy}\n', "utf-8")
    return Workspace(config.load(root / "mw.toml"))


def _sha(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*.safetensors"))}


def _blocks(meta) -> int:
    return meta.role.blocks if meta.role.role is Role.FUSED_LINEAR else 1


def test_paired_adam_form_through_the_workspace(tmp_path, stream):
    _, base, experts = stream
    ws = _workspace(tmp_path, base)
    b = load_all(base)
    taus = [{k: v.float() - b[k].float() for k, v in load_all(p).items()} for p in experts[:3]]
    m = None
    for t, p in enumerate(experts[:3], 1):
        ws.merge(p)
        got = load_all(ws.publishers["deploy"].path(t))
        if t == 1:
            m = dict(taus[0])
        else:
            new = {}
            for k, meta in ws.model_info.metas.items():
                if meta.role.matrix:
                    nb = _blocks(meta)
                    new[k] = torch.cat([wudi_adam([mp, tt], mp + tt) for mp, tt in zip(m[k].chunk(nb), taus[t - 1][k].chunk(nb))])
                else:
                    new[k] = (m[k] + taus[t - 1][k]) / 2
            m = new
        for k in b:
            torch.testing.assert_close(got[k], b[k] + m[k], atol=1e-7, rtol=0, msg=k)
    stored = ws.states.latest().sets()["merged"]
    assert all(torch.equal(stored[k], m[k]) for k in b)
    # the Adam steps really did something on the linear layers at t ≥ 2 (not just M + τ)
    k = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    assert float((m[k] - (taus[0][k] + taus[1][k]) / 2 - taus[2][k]).abs().max()) > 1e-6


def test_continual_exact_equals_batch_closed_form(tmp_path, stream):
    _, base, experts = stream
    ws = _workspace(tmp_path, base, 'solver = "exact"')
    for p in experts[:3]:
        ws.merge(p)
    b = load_all(base)
    taus = [{k: v.double() - b[k].double() for k, v in load_all(p).items()} for p in experts[:3]]
    got = load_all(ws.publishers["deploy"].path(3))
    n_linear = 0
    for k, meta in ws.model_info.metas.items():
        if meta.role.matrix:
            nb = _blocks(meta)
            want = torch.cat([wudi_exact([t[k].chunk(nb)[j] for t in taus]) for j in range(nb)])
            n_linear += 1
        else:
            want = sum(t[k] for t in taus) / 3
        assert float((got[k].double() - b[k].double() - want).abs().max()) < 1e-5 * max(1.0, float(want.abs().max())), k
    assert n_linear == 12
    # sufficient statistics: A stacked per block (blocks·d_in × d_in), B model-shaped, mean for the rest
    sets = ws.states.latest().sets()
    k = "visual.transformer.resblocks.0.attn.in_proj_weight"
    assert sets["A"].info(k).shape == (96, 32) and sets["B"].info(k).shape == (96, 32)
    assert sets["A"].info("visual.transformer.resblocks.0.mlp.c_proj.weight").shape == (128, 128)
    assert set(sets["mean"]) == {k for k, m in ws.model_info.metas.items() if not m.role.matrix}
    assert set(sets["A"]) == set(sets["B"]) == {k for k, m in ws.model_info.metas.items() if m.role.matrix}
    a_q = sets["A"][k].double()[:32]
    torch.testing.assert_close(a_q, sum(gram_stats(t[k].chunk(3)[0])[0] for t in taus), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("solver", ["adam", "exact"])
def test_five_expert_stream_replay_and_resume(tmp_path, stream, solver):
    _, base, experts = stream
    policy = f'solver = "{solver}"'
    runs = []
    for k in range(2):
        ws = _workspace(tmp_path / f"run{k}", base, policy)
        for p in experts:
            ws.merge(p)
        runs.append(_sha(ws.root / "deploy" / "5"))
    assert runs[0] == runs[1]  # bit-identical replay
    b = load_all(base)
    got = load_all(ws.publishers["deploy"].path(5))
    assert set(got) == set(b)
    for k, v in b.items():
        assert got[k].shape == v.shape and got[k].dtype == v.dtype, k
        assert bool(torch.isfinite(got[k]).all()) and not torch.equal(got[k], v), k
    assert ws.states.latest().meta == {"t": 5}
    init = load_all(ws.publishers["init"].path(ws.publishers["init"].current()))
    assert all(torch.equal(init[k], b[k]) for k in b)  # init view: θ0
    ws = _workspace(tmp_path / "resumed", base, policy)
    for p in experts[:2]:
        ws.merge(p)
    del ws
    ws = _workspace(tmp_path / "resumed", base, policy)
    ws.recover()
    for p in experts[2:]:
        ws.merge(p)
    assert _sha(ws.root / "deploy" / "5") == runs[0]
