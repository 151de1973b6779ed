"""Merge techniques (SPEC §1.1, §1.2): small hand-computed cases for every technique, plus invariants.

Hand cases use 2×3 tensors; the expected numbers are worked out in the comments next to them."""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergewatch.checkpoint.roles import Role, TensorRole
from mergewatch.strategies.techniques import (
    RECENCY_SCHEMES,
    SLERP,
    TECHNIQUES,
    TIES,
    Breadcrumbs,
    DARETaskArithmetic,
    DARETIES,
    MagMax,
    MergeInputs,
    ModelStock,
    TaskArithmetic,
    Technique,
    WeightAverage,
    breadcrumbs_mask,
    disjoint_merge,
    lines_scale,
    recency_weights,
    ties_keep_rank,
    ties_trim,
)

LINEAR = TensorRole(Role.LINEAR)
OTHER = TensorRole(Role.OTHER)


def T(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def inputs(base, taus=None, models=None, role=LINEAR, **kw) -> MergeInputs:
    """MergeInputs from θ0 and task vectors (or full models)."""
    base = base if isinstance(base, torch.Tensor) else T(base)
    if models is None:
        models = [base + (t if isinstance(t, torch.Tensor) else T(t)) for t in taus]
    return MergeInputs(name="w", role=role, base=base, models=models, **kw)


def seeded(seed: int = 0):
    """A generator factory as the caller provides it: one fresh seeded generator per (purpose, i)."""
    calls = []

    def gen(purpose: str, i: int) -> torch.Generator:
        calls.append((purpose, i))
        return torch.Generator().manual_seed(seed * 1000 + 17 * (i + 1) + len(purpose))

    gen.calls = calls
    return gen


def run_prep_passes(tech: Technique, xs: list[MergeInputs]) -> dict:
    """Simulate the engine: for each prep pass, sum the stats of every tensor (float64), finish,
    and hand the scalars to the next pass and to the merge."""
    scalars: dict = {}
    for pp in tech.prep_passes(len(xs[0].models)):
        totals: dict[str, torch.Tensor] = {}
        for x in xs:
            x.scalars = dict(scalars)
            for k, v in pp.stats(x).items():
                v = v.to(torch.float64)
                totals[k] = totals[k] + v if k in totals else v.clone()
        scalars.update(pp.finish(totals, scalars))
    for x in xs:
        x.scalars = dict(scalars)
    return scalars


ONES = [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]


# Registry and parameters -----------------------------------------------------------------------
def test_registry_names_flags_and_papers():
    assert set(TECHNIQUES) == {"wa", "ta", "ties", "dare_ties", "dare_ta", "breadcrumbs", "magmax", "slerp", "model_stock"}
    for name, cls in TECHNIQUES.items():
        assert cls.name == name and cls.paper
        cls()  # defaults are valid
    scaled = {n for n, c in TECHNIQUES.items() if c.lambda_scaled}
    assert scaled == {"ta", "ties", "dare_ties", "dare_ta", "breadcrumbs", "magmax"}
    assert TIES.defaults == {"p": 0.8, "merge": "mean", "trim": "tensor"}
    assert DARETIES.defaults["p"] == 0.7 and DARETaskArithmetic.defaults["p"] == 0.7
    assert Breadcrumbs.defaults == {"beta": 0.7, "gamma": 0.01, "merge": "mean"}
    assert SLERP.defaults == {"c": 0.5}


@pytest.mark.parametrize(
    "cls, params, key",
    [
        (TIES, {"p": 1.0}, "'p'"),
        (TIES, {"p": -0.1}, "'p'"),
        (TIES, {"p": "0.5"}, "'p'"),
        (TIES, {"merge": "median"}, "'merge'"),
        (TIES, {"trim": "layer"}, "'trim'"),
        (DARETIES, {"p": 1.0}, "'p'"),
        (DARETaskArithmetic, {"p": float("nan")}, "'p'"),
        (Breadcrumbs, {"beta": 1.0}, "'beta'"),
        (Breadcrumbs, {"gamma": -0.5}, "'gamma'"),
        (Breadcrumbs, {"beta": 0.7, "gamma": 0.3}, "'beta' + 'gamma'"),
        (SLERP, {"c": 1.5}, "'c'"),
    ],
)
def test_out_of_range_parameters_name_the_key(cls, params, key):
    with pytest.raises(ValueError, match=re.escape(key)):
        cls(**params)


def test_unknown_parameter_is_an_error_listing_allowed():
    with pytest.raises(TypeError, match=r"unknown parameter.*'density'.*allowed.*'p'"):
        TIES(density=0.2)


# WA, TA --------------------------------------------------------------------------------------
def test_wa_hand_case():
    m1, m2 = T([[1, 2, 3], [4, 5, 6]]), T([[3, 2, 1], [0, -1, 2]])
    x = inputs(torch.zeros(2, 3), models=[m1, m2])
    # uniform: (m1 + m2) / 2
    assert torch.equal(WeightAverage().merge(x), T([[2, 2, 2], [2, 2, 4]]))
    # 0.25 m1 + 0.75 m2 = [[0.25+2.25, 0.5+1.5, 0.75+0.75], [1+0, 1.25-0.75, 1.5+1.5]]
    x.weights = [0.25, 0.75]
    assert torch.allclose(WeightAverage().merge(x), T([[2.5, 2, 1.5], [1, 0.5, 3]]))


def test_wa_of_identical_experts_returns_them():
    m = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    x = inputs(torch.zeros(4, 5), models=[m, m.clone(), m.clone()], weights=[0.2, 0.3, 0.5])
    assert torch.allclose(WeightAverage().merge(x), m, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    vals=st.lists(st.lists(st.floats(-100, 100, width=32), min_size=6, max_size=6), min_size=1, max_size=4),
    raw_w=st.lists(st.floats(0.01, 1.0), min_size=4, max_size=4),
)
def test_wa_is_a_convex_combination(vals, raw_w):
    models = [T(v).reshape(2, 3) for v in vals]
    w = raw_w[: len(models)]
    w = [v / sum(w) for v in w]
    out = WeightAverage().merge(inputs(torch.zeros(2, 3), models=models, weights=w))
    stack = torch.stack(models)
    tol = 1e-4 * (1 + stack.abs().amax(dim=0))
    assert bool((out >= stack.amin(dim=0) - tol).all() and (out <= stack.amax(dim=0) + tol).all())


def test_ta_hand_case():
    t1, t2 = [[1, -2, 0], [3, 0, 1]], [[1, 1, -1], [-1, 0, 2]]
    # θ0 + 0.5 (τ1 + τ2) = 1 + 0.5 [[2, -1, -1], [2, 0, 3]]
    out = TaskArithmetic().merge(inputs(ONES, [t1, t2], lam=0.5))
    assert torch.equal(out, T([[2, 0.5, 0.5], [2, 1, 2.5]]))


def test_ta_with_lambda_zero_returns_base():
    base = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    x = inputs(base, [torch.randn(3, 4), torch.randn(3, 4)], lam=0.0)
    assert torch.equal(TaskArithmetic().merge(x), base)


@settings(max_examples=30, deadline=None)
@given(lam=st.floats(-3, 3), seed=st.integers(0, 2**16))
def test_lambda_scaled_techniques_are_linear_in_lambda(lam, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(4, 6, generator=g)
    taus = [torch.randn(4, 6, generator=g) for _ in range(3)]
    for name in ("ta", "ties", "dare_ties", "dare_ta", "breadcrumbs", "magmax"):
        tech = TECHNIQUES[name]()
        one = tech.merge(inputs(base, taus, lam=1.0, generator=seeded(seed))) - base
        got = tech.merge(inputs(base, taus, lam=lam, generator=seeded(seed))) - base
        assert torch.allclose(got, lam * one, atol=1e-4), name


# TIES ------------------------------------------------------------------------------------------
# p = 0.5 over d = 6: ⌊0.5·6⌋ = 3, k = 3, keep |x| ≥ the 3rd smallest |x|.
TIES_T1 = [[3, -1, 0.5], [-2, 4, 0.1]]  # |.| sorted .1 .5 1 2 3 4 -> m = 1 -> [[3, -1, 0], [-2, 4, 0]]
TIES_T2 = [[-1, 2, 0.2], [-3, -5, 1]]  # |.| sorted .2 1 1 2 3 5 -> m = 1 (tie kept) -> [[-1, 2, 0], [-3, -5, 1]]
# Σ trimmed = [[2, 1, 0], [-5, -1, 1]] -> elected sign [[+, +, 0], [-, -, +]]


@pytest.mark.parametrize(
    "merge, expected",
    [
        # mean of agreeing entries: (0,0) 3; (0,1) 2; (0,2) sign 0 -> θ0; (1,0) (-2-3)/2; (1,1) -5; (1,2) 1
        ("mean", [[3, 2, 0], [-2.5, -5, 1]]),
        ("sum", [[3, 2, 0], [-5, -5, 1]]),
        ("max", [[3, 2, 0], [-3, -5, 1]]),
    ],
)
def test_ties_hand_case(merge, expected):
    out = TIES(p=0.5, merge=merge).merge(inputs(ONES, [TIES_T1, TIES_T2]))
    assert torch.equal(out, T(ONES) + T(expected))


def test_disjoint_merge_cancelling_signs_stay_at_base():
    # (0) +1 and −1 cancel: elected sign 0 -> 0 (θ0); (1) 2 and 1 agree -> mean 1.5; (2) 3 vs −1 -> 3
    assert torch.equal(disjoint_merge([T([1, 2, 3]), T([-1, 1, -1])]), T([0, 1.5, 3]))
    assert torch.equal(disjoint_merge([T([1, 2, 3]), T([-1, 1, -1])], "max"), T([0, 2, 3]))


def test_ties_trim_keeps_ties_at_threshold():
    assert torch.equal(ties_trim(T(TIES_T2), 0.5), T([[-1, 2, 0], [-3, -5, 1]]))
    # all equal magnitudes: k = 4 - 2 = 2, m = 1, everything kept
    assert torch.equal(ties_trim(T([1, -1, 1, -1]), 0.5), T([1, -1, 1, -1]))


def test_ties_count_is_exact():
    # (1 − 0.8)·20 = 3.9999999999999996 in floats; exactly 4 -> keep ⌊4⌋ + 1 = 5 entries
    assert int((1 - 0.8) * 20) == 3  # the trap
    assert ties_keep_rank(0.8, 20) == 16
    t = torch.arange(1, 21, dtype=torch.float32) * torch.tensor([1.0, -1.0] * 10)
    kept = ties_trim(t, 0.8)
    assert int((kept != 0).sum()) == 5
    assert torch.equal(kept.abs()[kept != 0], torch.arange(16, 21, dtype=torch.float32))
    assert ties_keep_rank(0.0, 20) == 0  # p = 0: keep everything
    assert torch.equal(ties_trim(t, 0.0), t)


def test_ties_with_nothing_pruned_and_one_expert_is_ta():
    g = torch.Generator().manual_seed(3)
    base, tau = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    x = inputs(base, [tau], lam=0.7)
    assert torch.allclose(TIES(p=0.0).merge(x), TaskArithmetic().merge(x))


def test_ties_one_model_trims_it():
    # SPEC §1.2 one model: TIES trims τ_1 (here keep ⌊0.5·6⌋ + 1 = 4 entries) and scales by λ
    out = TIES(p=0.5).merge(inputs(ONES, [TIES_T1], lam=2.0))
    assert torch.equal(out, T(ONES) + 2 * T([[3, -1, 0], [-2, 4, 0]]))


def test_ties_fused_blocks_are_trimmed_separately():
    # 3 blocks of 2×2 at very different scales: a whole-tensor trim keeps only block 0.
    g = torch.Generator().manual_seed(4)
    scales = torch.tensor([100.0, 10.0, 1.0]).repeat_interleave(2)[:, None]
    taus = [torch.randn(6, 2, generator=g) * scales for _ in range(2)]
    base = torch.zeros(6, 2)
    fused = TensorRole(Role.FUSED_LINEAR, blocks=3)
    tech = TIES(p=0.5)
    got = tech.merge(inputs(base, taus, role=fused))
    per_block = torch.cat([tech.merge(inputs(base[i : i + 2], [t[i : i + 2] for t in taus])) for i in (0, 2, 4)])
    whole = tech.merge(inputs(base, taus, role=LINEAR))
    assert torch.equal(got, per_block)
    assert not torch.equal(got, whole)
    assert bool((got[4:] != 0).any()) and bool((whole[4:] == 0).all())


def _global_case(seed: int, n: int = 3):
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 5), (7,), (), (3, 2, 2), (6, 3)]
    base = {i: torch.randn(s, generator=g) for i, s in enumerate(shapes)}
    taus = {i: [torch.randn(s, generator=g) * (10.0 ** (i - 2)) for _ in range(n)] for i, s in enumerate(shapes)}
    taus[0][0][0, :3] = 0.0  # zeros and duplicated magnitudes
    taus[4][1][:, 0] = taus[4][1][0, 0]
    taus[1][2][:] = 1e-40  # subnormal magnitudes
    roles = [LINEAR, OTHER, OTHER, OTHER, TensorRole(Role.FUSED_LINEAR, blocks=3)]
    xs = [inputs(base[i], taus[i], role=roles[i]) for i in range(len(shapes))]
    return xs, taus


@pytest.mark.parametrize("p", [0.8, 0.5, 0.93, 0.0])
@pytest.mark.parametrize("hist_slice", [3, 1 << 20])
def test_ties_global_threshold_equals_concatenated_kthvalue(monkeypatch, p, hist_slice):
    import mergewatch.strategies.techniques as tech_mod

    monkeypatch.setattr(tech_mod, "_HIST_SLICE", hist_slice)  # 3: histograms summed over many slices
    xs, taus = _global_case(5)
    tech = TIES(p=p, trim="global")
    assert len(tech.prep_passes(3)) == 2 and TIES(p=p).prep_passes(3) == []
    scalars = run_prep_passes(tech, xs)
    d = sum(x.base.numel() for x in xs)
    assert scalars["ties.count"] == d
    k = ties_keep_rank(p, d)
    for i in range(3):
        allabs = torch.cat([x.task_vectors()[i].abs().reshape(-1) for x in xs])
        expect = 0.0 if k == 0 else float(torch.kthvalue(allabs, k).values)
        assert scalars["ties.threshold"][i] == expect
    # the merge then trims every tensor against its model's global threshold (blocks ignored)
    for x in xs:
        thr = scalars["ties.threshold"]
        trimmed = [torch.where(t.abs() >= m, t, torch.zeros_like(t)) for t, m in zip(x.task_vectors(), thr)]
        expect = x.base + TIES(p=0.0).task_merge(inputs(x.base, trimmed))
        assert torch.equal(tech.merge(x), expect)


@settings(max_examples=40, deadline=None)
@given(
    vals=st.lists(st.floats(-(2.0**100), 2.0**100, width=32, allow_subnormal=True), min_size=1, max_size=60),
    split=st.integers(0, 60),
    p=st.sampled_from([0.0, 0.2, 0.5, 0.8, 0.99]),
)
def test_ties_global_threshold_property(vals, split, p):
    t = T(vals)
    parts = [t[: split % (len(vals) + 1)], t[split % (len(vals) + 1) :]]
    xs = [inputs(torch.zeros_like(q), [q, -2 * q], role=OTHER) for q in parts]
    scalars = run_prep_passes(TIES(p=p, trim="global"), xs)
    k = ties_keep_rank(p, len(vals))
    for i, mult in enumerate((1.0, 2.0)):
        expect = 0.0 if k == 0 else float(torch.kthvalue((t * mult).abs(), k).values)
        assert scalars["ties.threshold"][i] == expect


def test_ties_global_without_prep_scalars_is_an_error():
    with pytest.raises(ValueError, match="ties.threshold"):
        TIES(trim="global").merge(inputs(ONES, [TIES_T1]))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 4))
def test_ties_result_has_elected_sign_and_bounded_magnitude(seed, n):
    g = torch.Generator().manual_seed(seed)
    taus = [torch.randn(3, 5, generator=g) for _ in range(n)]
    out = TIES(p=0.6).task_merge(inputs(torch.zeros(3, 5), taus))
    trimmed = torch.stack([ties_trim(t, 0.6) for t in taus])
    elected = torch.sign(trimmed.sum(0))
    assert bool(((out == 0) | (torch.sign(out) == elected)).all())
    assert bool((out.abs() <= trimmed.abs().amax(0) + 1e-6).all())


# TIES in place: the streaming kernel (slices, owned buffers) against a whole-tensor reference ----
def naive_ties(base, models, p, lam, mode="mean", blocks=1):
    """TIES on whole tensors as the reference code writes it (Yadav et al. 2023): τ_i = θ_i − θ0,
    kthvalue trim (per row block), sign of the sum, mean / sum / max of the agreeing entries."""

    def trim(t):
        d = t.numel()
        k = ties_keep_rank(p, d)
        if k <= 0 or d == 0:
            return t
        m = torch.kthvalue(t.abs().flatten(), k).values
        return torch.where(t.abs() >= m, t, torch.zeros_like(t))

    taus = [torch.cat([trim(c) for c in (m - base).chunk(blocks, dim=0)]) if blocks > 1 else trim(m - base) for m in models]
    total = torch.zeros_like(base)
    for t in taus:
        total += t
    sign = torch.sign(total)
    acc, cnt = torch.zeros_like(base), torch.zeros_like(base)
    for t in taus:
        agree = (torch.sign(t) == sign) & (sign != 0)
        cand = torch.where(agree, t, torch.zeros_like(t))
        if mode == "max":
            acc = torch.where(cand.abs() > acc.abs(), cand, acc)
        else:
            acc += cand
            cnt += agree.float()
    tau_m = acc / cnt.clamp_min(1.0) if mode == "mean" else acc
    return base + lam * tau_m


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns (torch.equal says 0.0 == -0.0)."""
    return t.contiguous().view(torch.int32)


def _ties_case(seed: int, shape, n: int):
    """θ0 and n experts with exact zeros, sign cancellations, -0.0 and tied magnitudes in τ."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    taus = [torch.randn(shape, generator=g) for _ in range(n)]
    flat = [t.view(-1) for t in taus]
    if flat[0].numel() >= 8:
        flat[0][:3] = 0.0
        flat[0][3] = -0.0
        flat[0][4:6] = 0.75  # tied magnitudes
        if n > 1:
            flat[1][6] = -flat[0][6]  # cancels exactly: elected sign 0
    return base, [base + t for t in taus]


@pytest.mark.parametrize("mode", ["mean", "sum", "max"])
@pytest.mark.parametrize("shape, blocks", [((37, 11), 1), ((12, 5), 3), ((97,), 1), ((), 1), ((0, 4), 1)])
@pytest.mark.parametrize("chunk", [5, 1 << 15])
def test_ties_in_place_equals_whole_tensor_reference_bit_for_bit(monkeypatch, mode, shape, blocks, chunk):
    import mergewatch.strategies.techniques as tech_mod

    monkeypatch.setattr(tech_mod, "CHUNK", chunk)  # 5: every step crosses many slice boundaries
    role = TensorRole(Role.FUSED_LINEAR, blocks=3) if blocks == 3 else LINEAR
    for seed, n, p, lam in ((1, 2, 0.8, 1.0), (2, 3, 0.5, 0.37), (3, 1, 0.3, 1.7), (4, 2, 0.0, 0.9)):
        base, models = _ties_case(seed, shape, n)
        want = naive_ties(base, models, p, lam, mode, blocks)
        tech = TIES(p=p, merge=mode)
        kept = [m.clone() for m in models]
        # not owned: inputs untouched
        got = tech.merge(inputs(base, models=models, role=role, lam=lam))
        assert torch.equal(bits(got), bits(want))
        assert all(torch.equal(bits(m), bits(k)) for m, k in zip(models, kept))
        # owned: the result is computed in the first model's buffer, the same bits
        owned = [m.clone() for m in models]
        ptr = owned[0].data_ptr()
        got = tech.merge(inputs(base, models=owned, role=role, lam=lam, owned=[True] * n))
        assert torch.equal(bits(got), bits(want))
        assert got.data_ptr() == ptr or got.numel() == 0
        # task_merge never consumes, even with ownership granted (Weight Weaving reads the models again)
        owned = [m.clone() for m in models]
        tech.task_merge(inputs(base, models=owned, role=role, owned=[True] * n))
        assert all(torch.equal(bits(m), bits(k)) for m, k in zip(owned, kept))


def test_disjoint_merge_in_slices_equals_one_slice_and_consume_reuses_the_first_buffer(monkeypatch):
    import mergewatch.strategies.techniques as tech_mod

    base, models = _ties_case(9, (23, 3), 3)
    taus = [m - base for m in models]
    for mode in ("mean", "sum", "max"):
        monkeypatch.setattr(tech_mod, "CHUNK", 1 << 20)
        whole = disjoint_merge(taus, mode)
        monkeypatch.setattr(tech_mod, "CHUNK", 4)
        kept = [t.clone() for t in taus]
        sliced = disjoint_merge(taus, mode)
        assert torch.equal(bits(sliced), bits(whole))
        assert all(torch.equal(bits(a), bits(b)) for a, b in zip(taus, kept))  # consume=False: untouched
        own = [t.clone() for t in taus]
        out = disjoint_merge(own, mode, consume=True)
        assert out is own[0] and torch.equal(bits(out), bits(whole))
    # a non-contiguous first tensor cannot be written slice by slice: a new result, same values
    t0 = taus[0].t().contiguous().t()
    out = disjoint_merge([t0, *taus[1:]], consume=True)
    assert out is not t0 and torch.equal(bits(out), bits(disjoint_merge(taus)))


def test_take_task_vectors_overwrites_only_owned_models():
    base = T([[1, 2, 3], [4, 5, 6]])
    m1, m2 = base + 1, base * 2
    x = inputs(base, models=[m1, m2], owned=[False, True])
    taus = x.take_task_vectors()
    assert taus[1] is m2 and torch.equal(m2, base)  # θ_2 − θ0 = θ0 here, in θ_2's buffer
    assert taus[0] is not m1 and torch.equal(m1, base + 1) and torch.equal(taus[0], torch.ones(2, 3))
    assert inputs(base, models=[base + 1]).owns(0) is False


# DARE ------------------------------------------------------------------------------------------
def test_dare_without_drops_hand_case():
    # p = 0: DARE keeps everything, so DARE-TIES is sign election + disjoint mean on the raw τ:
    # Σ = [[2, 1, 0.7], [-5, -1, 1.1]]; (0,2) (0.5+0.2)/2 = 0.35; (1,2) (0.1+1)/2 = 0.55
    out = DARETIES(p=0.0).merge(inputs(ONES, [TIES_T1, TIES_T2], generator=seeded()))
    assert torch.allclose(out, T(ONES) + T([[3, 2, 0.35], [-2.5, -5, 0.55]]))
    x = inputs(ONES, [TIES_T1, TIES_T2], generator=seeded(), lam=0.5)
    assert torch.allclose(DARETaskArithmetic(p=0.0).merge(x), TaskArithmetic().merge(x))


def test_dare_masks_come_from_the_generator():
    gen = seeded(7)
    t1, t2 = T([[2, -4, 6], [8, -10, 12]]), T([[-2, 4, 6], [1, 1, -1]])
    x = inputs(ONES, [t1, t2], generator=gen)
    out = DARETaskArithmetic(p=0.5).task_merge(x)
    assert gen.calls == [("dare", 0), ("dare", 1)]
    # survivors (rand >= 0.5) are doubled; reproduce the masks from the same seeds
    keep = [~(torch.rand((2, 3), generator=seeded(7)("dare", i)) < 0.5) for i in (0, 1)]
    expect = t1 * keep[0] * 2 + t2 * keep[1] * 2
    assert torch.equal(out, expect)
    ties_out = DARETIES(p=0.5).task_merge(inputs(ONES, [t1, t2], generator=seeded(7)))
    assert torch.equal(ties_out, disjoint_merge([t1 * keep[0] * 2, t2 * keep[1] * 2]))


def test_dare_is_deterministic_drops_about_p_and_rescales():
    tau = torch.full((200, 500), 3.0)
    x = inputs(torch.zeros(200, 500), [tau], generator=seeded(11))
    a = DARETaskArithmetic(p=0.7).task_merge(x)
    b = DARETaskArithmetic(p=0.7).task_merge(inputs(torch.zeros(200, 500), [tau], generator=seeded(11)))
    c = DARETaskArithmetic(p=0.7).task_merge(inputs(torch.zeros(200, 500), [tau], generator=seeded(12)))
    assert torch.equal(a, b) and not torch.equal(a, c)
    dropped = float((a == 0).float().mean())
    assert abs(dropped - 0.7) < 0.01
    assert torch.allclose(a[a != 0], torch.tensor(3.0 / 0.3))


def test_dare_needs_a_generator():
    with pytest.raises(ValueError, match="generator"):
        DARETIES().merge(inputs(ONES, [TIES_T1]))


# Breadcrumbs -----------------------------------------------------------------------------------
def test_breadcrumbs_hand_case():
    # β = γ = 0.4 on rows of 3: drop ⌊1.2⌋ = 1 smallest and 1 largest |value| -> keep the median
    t1 = [[3, -1, 2], [0.5, -4, 1]]  # -> [[0, 0, 2], [0, 0, 1]]
    t2 = [[-2, 5, -3], [2, 1, -6]]  # -> [[0, 0, -3], [2, 0, 0]]
    # Σ = [[0, 0, -1], [2, 0, 1]] -> elected [[0, 0, -], [+, 0, +]]; disjoint mean:
    out = Breadcrumbs(beta=0.4, gamma=0.4).merge(inputs(ONES, [t1, t2], lam=2.0))
    assert torch.equal(out, T(ONES) + 2 * T([[0, 0, -3], [2, 0, 1]]))


def test_breadcrumbs_drop_counts_per_row():
    g = torch.Generator().manual_seed(8)
    t = torch.randn(4, 100, generator=g)
    keep = breadcrumbs_mask(t, 0.7, 0.01)  # drop 70 small + 1 large per row
    assert keep.sum(dim=1).tolist() == [29] * 4
    for r in range(4):
        mags = t[r].abs()
        kept = mags[keep[r]]
        assert float(kept.min()) >= float(mags.sort().values[70])
        assert float(kept.max()) < float(mags.max())
    # exact counts: ⌊0.29·100⌋ = 29 although 0.29 * 100 = 28.999999999999996 in floats
    assert math.floor(0.29 * 100) == 28  # the trap
    assert int(breadcrumbs_mask(torch.arange(1.0, 101.0), 0.29, 0.0).sum()) == 71
    # equal magnitudes: ranked by position
    assert breadcrumbs_mask(torch.ones(5), 0.4, 0.2).tolist() == [False, False, True, True, False]
    # 0-D: one entry, never dropped for β, γ < 1; 1-D: one row
    assert bool(breadcrumbs_mask(torch.tensor(2.0), 0.7, 0.01))
    assert int(breadcrumbs_mask(torch.arange(1.0, 21.0), 0.5, 0.1).sum()) == 8


def test_breadcrumbs_error_if_a_row_keeps_nothing():
    with pytest.raises(ValueError, match="drop all"):
        breadcrumbs_mask(torch.ones(2, 4), 0.5, 0.5)


# MagMax ----------------------------------------------------------------------------------------
def test_magmax_hand_case_ties_to_later():
    t1 = [[1, -3, 2], [0, 5, -1]]
    t2 = [[-2, 3, 1], [0.5, -4, 1]]
    # |·| per coordinate: 1<2 -> -2; 3=3 tie -> later 3; 2>1 -> 2; 0<.5 -> .5; 5>4 -> 5; 1=1 tie -> later 1
    out = MagMax().merge(inputs(ONES, [t1, t2], lam=0.5))
    assert torch.equal(out, T(ONES) + 0.5 * T([[-2, 3, 2], [0.5, 5, 1]]))
    # reversed order: the ties now go to t1
    out = MagMax().task_merge(inputs(ONES, [t2, t1]))
    assert torch.equal(out, T([[-2, -3, 2], [0.5, 5, -1]]))


# SLERP -----------------------------------------------------------------------------------------
def test_slerp_identical_inputs_return_the_input():
    v = torch.randn(3, 4, generator=torch.Generator().manual_seed(9))
    for c in (0.0, 0.3, 1.0):
        assert torch.allclose(SLERP(c=c).merge(inputs(torch.zeros(3, 4), models=[v, v.clone()])), v)
    assert torch.equal(SLERP().merge(inputs(torch.zeros(3, 4), models=[v])), v)


def test_slerp_orthogonal_hand_case():
    v0 = T([[2, 0, 0], [0, 0, 0]])
    v1 = T([[0, 0, 0], [0, 2, 0]])
    # Ω = π/2, sin Ω = 1: c = 0.5 -> sin(π/4)(v0 + v1) = √2/2 · 2 = √2 on each
    out = SLERP().merge(inputs(ONES, models=[v0, v1]))
    r2 = math.sqrt(2.0)
    assert torch.allclose(out, T([[r2, 0, 0], [0, r2, 0]]))
    # weights [2/3, 1/3] -> c = 1/3: sin(π/3)·2 = √3 on v0's entry, sin(π/6)·2 = 1 on v1's
    out = SLERP().merge(inputs(ONES, models=[v0, v1], weights=[2 / 3, 1 / 3]))
    assert torch.allclose(out, T([[math.sqrt(3.0), 0, 0], [0, 1, 0]]))


def test_slerp_near_parallel_and_antiparallel_is_linear():
    v0 = T([[1, 2, 3], [4, 5, 6]])
    # cos = 1 -> (1 − c) v0 + c (2 v0) = 1.5 v0 for c = 0.5
    assert torch.allclose(SLERP().merge(inputs(ONES, models=[v0, 2 * v0])), 1.5 * v0)
    # cos = −1 -> linear: 0.75 v0 + 0.25 (−v0) = 0.5 v0
    assert torch.allclose(SLERP(c=0.25).merge(inputs(ONES, models=[v0, -v0])), 0.5 * v0)
    # a zero norm -> linear
    assert torch.allclose(SLERP(c=0.25).merge(inputs(ONES, models=[v0, torch.zeros(2, 3)])), 0.75 * v0)


def test_slerp_fold_of_three():
    e1, e2, e3 = (torch.eye(3)[i].reshape(1, 3) for i in range(3))
    # r = slerp(e1, e2, 1/2) = (e1 + e2)/√2; slerp(r, e3, 1/3) with Ω = π/2:
    # sin(π/3) r + sin(π/6) e3 = √(3/8)(e1 + e2) + e3/2
    out = SLERP().merge(inputs(torch.zeros(1, 3), models=[e1, e2, e3]))
    a = math.sqrt(3 / 8)
    assert torch.allclose(out, T([[a, a, 0.5]]))
    # explicit uniform weights give the same fold (c_k = w_k / Σ_{j≤k} w_j = 1/k)
    w = SLERP().merge(inputs(torch.zeros(1, 3), models=[e1, e2, e3], weights=[1 / 3] * 3))
    assert torch.allclose(w, out)


def test_slerp_fused_blocks_separately():
    fused = TensorRole(Role.FUSED_LINEAR, blocks=2)
    v0 = T([[1, 0], [0, 1]])
    v1 = T([[0, 1], [0, 1]])  # block 0 orthogonal, block 1 identical
    out = SLERP().merge(inputs(torch.zeros(2, 2), models=[v0, v1], role=fused))
    h = math.sqrt(0.5)
    assert torch.allclose(out, T([[h, h], [0, 1]]))
    whole = SLERP().merge(inputs(torch.zeros(2, 2), models=[v0, v1], role=LINEAR))
    assert not torch.allclose(out, whole)


# Model Stock -----------------------------------------------------------------------------------
def test_model_stock_two_models():
    t1, t2 = [[1, 1, 0], [0, 0, 0]], [[0, 1, 1], [0, 0, 0]]
    # cos = 1/(√2·√2) = 1/2; t = 2c/(1 + c) = 2/3; θ = θ0 + t·mean(τ) = 1 + (2/3)[[.5, 1, .5], 0]
    out = ModelStock().merge(inputs(ONES, [t1, t2]))
    assert torch.allclose(out, T(ONES) + T([[1 / 3, 2 / 3, 1 / 3], [0, 0, 0]]))
    assert ModelStock.ratio([T(t1), T(t2)]) == pytest.approx(2 * 0.5 / 1.5)


def test_model_stock_three_models():
    taus = [[[1, 1, 0], [0, 0, 0]], [[0, 1, 1], [0, 0, 0]], [[1, 0, 1], [0, 0, 0]]]
    # every pair has cos 1/2; t = 3·½ / (1 + 2·½) = 3/4; mean τ = [[2/3]*3, 0] -> θ0 + ½ on row 0
    out = ModelStock().merge(inputs(ONES, taus))
    assert torch.allclose(out, T([[1.5, 1.5, 1.5], [1, 1, 1]]))


def test_model_stock_edge_cases():
    t1 = T([[1, 2, 3], [0, 0, 0]])
    assert torch.equal(ModelStock().merge(inputs(ONES, [t1])), T(ONES) + t1)  # N = 1: θ_1
    # a zero task vector has cos 0 -> t = 0 -> θ0
    assert torch.equal(ModelStock().merge(inputs(ONES, [t1, torch.zeros(2, 3)])), T(ONES))
    # opposite task vectors: cos φ = −1 clamps to 0 -> θ0 (the formula would divide by 0)
    assert torch.equal(ModelStock().merge(inputs(ONES, [t1, -t1])), T(ONES))


def test_model_stock_fused_blocks_separately():
    fused = TensorRole(Role.FUSED_LINEAR, blocks=2)
    t1, t2 = T([[1, 0], [1, 1]]), T([[0, 1], [1, 1]])
    # block 0: cos 0 -> t = 0 -> θ0; block 1: cos 1 -> t = 1 -> mean θ
    out = ModelStock().merge(inputs(torch.zeros(2, 2), [t1, t2], role=fused))
    assert torch.allclose(out, T([[0, 0], [1, 1]]))


# LiNeS, recency --------------------------------------------------------------------------------
def test_lines_scales_by_block_depth():
    assert lines_scale(None, 4) == 0.5  # outside blocks: α
    assert lines_scale(0, 4) == 0.5
    assert lines_scale(3, 4) == 1.0
    assert lines_scale(1, 4) == pytest.approx(0.5 + 0.5 / 3)
    assert lines_scale(1, 4, variant="quadratic") == pytest.approx(0.5 + 0.5 / 9)
    assert lines_scale(1, 4, variant="sqrt") == pytest.approx(0.5 + 0.5 * math.sqrt(1 / 3))
    assert lines_scale(2, 5, alpha=0.1, beta=0.9) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lines_scale(0, 1, alpha=0.2, beta=0.7) == 0.2  # L = 1: ℓ/(L − 1) taken as 0
    scales = [lines_scale(b, 12) for b in range(12)]
    assert scales == sorted(scales) and len(set(scales)) == 12
    with pytest.raises(ValueError, match="variant"):
        lines_scale(0, 4, variant="cubic")
    with pytest.raises(ValueError, match="block index"):
        lines_scale(4, 4)


def test_lines_replaces_lambda_in_ta():
    tau = T([[2, 0, 0], [0, 0, 0]])
    lam = lines_scale(3, 4)
    assert torch.equal(TaskArithmetic().merge(inputs(ONES, [tau], lam=lam)), T(ONES) + tau)


def test_recency_weights():
    assert recency_weights(3, "uniform") == pytest.approx([1 / 3] * 3)
    assert recency_weights(3, "linear") == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    assert recency_weights(3, "reverse_linear") == pytest.approx([3 / 6, 2 / 6, 1 / 6])
    assert recency_weights(3, "exp") == pytest.approx([1 / 7, 2 / 7, 4 / 7])
    assert recency_weights(2, "quadratic") == pytest.approx([1 / 5, 4 / 5])
    assert recency_weights(2, "cubic") == pytest.approx([1 / 9, 8 / 9])
    assert recency_weights(2, "sqrt") == pytest.approx([1 / (1 + math.sqrt(2)), math.sqrt(2) / (1 + math.sqrt(2))])
    s = math.log(2) + math.log(3)
    assert recency_weights(2, "log") == pytest.approx([math.log(2) / s, math.log(3) / s])
    for scheme in RECENCY_SCHEMES:
        w = recency_weights(7, scheme)
        assert math.fsum(w) == pytest.approx(1.0) and all(v > 0 for v in w)
    assert math.fsum(recency_weights(3000, "exp")) == pytest.approx(1.0)  # no overflow
    with pytest.raises(ValueError, match="weights"):
        recency_weights(3, "newest")
