"""Weight Weaving (SPEC §2, §1.2): pooling over {λ·τ_m} (∪ {τ_i}), hand cases and invariants."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergewatch.checkpoint.roles import Role, TensorRole
from mergewatch.strategies.techniques import SLERP, TIES, DARETIES, MagMax, TaskArithmetic, WeightAverage
from mergewatch.strategies.weaving import DEFAULT_LAMBDAS, WIDE_LAMBDAS, WeightWeaving
from tests.test_techniques import ONES, T, inputs, run_prep_passes, seeded

# τ_m for TA = τ1 + τ2 = [[2, 2, 0], [2, 4, 0]]
W_T1 = [[1, 0, 2], [-1, 4, 0]]
W_T2 = [[1, 2, -2], [3, 0, 0]]


def test_default_lambdas_and_validation():
    assert WeightWeaving(TaskArithmetic()).lambdas == [k / 10 for k in range(1, 11)]
    assert WeightWeaving(TIES()).lambdas == [k / 10 for k in range(1, 19)]
    assert WeightWeaving(DARETIES()).lambdas == list(WIDE_LAMBDAS)
    assert WeightWeaving(MagMax()).lambdas == list(DEFAULT_LAMBDAS)
    assert WeightWeaving(TaskArithmetic(), lambdas=[1.0, 0.2, 0.5]).lambdas == [0.2, 0.5, 1.0]  # ascending
    assert WeightWeaving.defaults == {"pool": "avg", "include_deltas": True, "lambdas": None}
    for bad in (WeightAverage(), SLERP()):
        with pytest.raises(ValueError, match="λ-scaled"):
            WeightWeaving(bad)
    with pytest.raises(ValueError, match="'pool'"):
        WeightWeaving(TaskArithmetic(), pool="max")
    with pytest.raises(ValueError, match="'lambdas'"):
        WeightWeaving(TaskArithmetic(), lambdas=[])
    with pytest.raises(ValueError, match="'include_deltas'"):
        WeightWeaving(TaskArithmetic(), include_deltas="yes")
    with pytest.raises(TypeError, match="unknown"):
        WeightWeaving(TaskArithmetic(), lam=1.0)
    d = WeightWeaving(TIES(p=0.9), pool="magmax").describe()
    assert d["inner"]["name"] == "ties" and d["inner"]["p"] == 0.9 and d["pool"] == "magmax" and len(d["lambdas"]) == 18


def test_avg_hand_case_with_deltas():
    # Λ = {0.5, 1}: members 0.5 τ_m, τ_m, τ1, τ2 -> mean = (1.5 τ_m + τ_m) / 4 = 0.625 τ_m
    w = WeightWeaving(TaskArithmetic(), lambdas=[0.5, 1.0])
    out = w.merge(inputs(ONES, [W_T1, W_T2], lam=7.0))  # λ of the caller is not used
    assert torch.equal(out, T(ONES) + T([[1.25, 1.25, 0], [1.25, 2.5, 0]]))


def test_magmax_hand_case_order_decides_ties():
    # members: 0.5τ_m = [[1, 1, 0], [1, 2, 0]], τ_m = [[2, 2, 0], [2, 4, 0]], τ1, τ2
    # (0,0) 1,2,1,1 -> 2; (0,1) 1,2,0,2 -> tie τ_m/τ2 -> later τ2 = 2; (0,2) 0,0,2,-2 -> tie -> τ2 = -2;
    # (1,0) 1,2,-1,3 -> 3; (1,1) 2,4,4,0 -> tie τ_m/τ1 -> τ1 = 4; (1,2) all 0 -> 0
    w = WeightWeaving(TaskArithmetic(), pool="magmax", lambdas=[1.0, 0.5])
    out = w.merge(inputs(ONES, [W_T1, W_T2]))
    assert torch.equal(out, T(ONES) + T([[2, 2, -2], [3, 4, 0]]))
    # with the deltas swapped the (0,2) tie goes to τ1 = +2
    out = w.merge(inputs(ONES, [W_T2, W_T1]))
    assert torch.equal(out, T(ONES) + T([[2, 2, 2], [3, 4, 0]]))


def test_avg_over_a_only_is_ta_at_mean_lambda():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 5, generator=g)
    taus = [torch.randn(4, 5, generator=g) for _ in range(3)]
    w = WeightWeaving(TaskArithmetic(), include_deltas=False)
    x = inputs(base, taus)
    mean_lam = sum(DEFAULT_LAMBDAS) / len(DEFAULT_LAMBDAS)  # 0.55
    expect = TaskArithmetic().merge(inputs(base, taus, lam=mean_lam))
    assert torch.allclose(w.merge(x), expect, atol=1e-5)
    # ... and the raw deltas make it differ
    assert not torch.allclose(WeightWeaving(TaskArithmetic()).merge(x), expect, atol=1e-3)


def test_random_pooling_is_deterministic_and_picks_members():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(8, 9, generator=g)
    taus = [torch.randn(8, 9, generator=g) for _ in range(2)]
    w = WeightWeaving(TaskArithmetic(), pool="random", lambdas=[0.25, 0.5, 1.0])
    gen = seeded(3)
    a = w.merge(inputs(base, taus, generator=gen))
    assert gen.calls == [("weave", -1)]
    b = w.merge(inputs(base, taus, generator=seeded(3)))
    c = w.merge(inputs(base, taus, generator=seeded(4)))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # reproduce: member j of [0.25τ_m, 0.5τ_m, τ_m, τ1, τ2] at index randint(0, 5)
    x = inputs(base, taus)
    tm = TaskArithmetic().task_merge(x)
    tv = x.task_vectors()
    members = torch.stack([0.25 * tm, 0.5 * tm, tm, tv[0], tv[1]])
    pick = torch.randint(0, 5, (8, 9), generator=seeded(3)("weave", -1))
    assert torch.equal(a, base + members.gather(0, pick[None])[0])
    assert len(set(pick.flatten().tolist())) == 5  # every member is used somewhere


def test_random_pooling_needs_a_generator():
    with pytest.raises(ValueError, match="generator"):
        WeightWeaving(TaskArithmetic(), pool="random").merge(inputs(ONES, [W_T1]))


def test_weaving_ties_global_delegates_prep_passes():
    g = torch.Generator().manual_seed(2)
    shapes = [(3, 4), (5,), (6, 2)]
    roles = [TensorRole(Role.LINEAR), TensorRole(Role.OTHER), TensorRole(Role.FUSED_LINEAR, blocks=3)]
    xs = [inputs(torch.randn(s, generator=g), [torch.randn(s, generator=g) for _ in range(2)], role=r) for s, r in zip(shapes, roles)]
    inner = TIES(trim="global")
    w = WeightWeaving(inner, pool="magmax")
    assert [p.name for p in w.prep_passes(2)] == [p.name for p in inner.prep_passes(2)]
    scalars = run_prep_passes(w, xs)
    assert len(scalars["ties.threshold"]) == 2
    for x in xs:
        tm = inner.task_merge(x)
        members = [lam * tm for lam in WIDE_LAMBDAS] + x.task_vectors()
        best = members[0]
        for m in members[1:]:
            best = torch.where(m.abs() >= best.abs(), m, best)
        assert torch.equal(w.merge(x), x.base + best)


def test_one_model():
    # SPEC §1.2: with one expert the pooled set is {λ τ_1} ∪ {τ_1}; avg over Λ = {1, 2} -> (1 + 2 + 1)/3 τ_1
    w = WeightWeaving(TaskArithmetic(), lambdas=[1.0, 2.0])
    out = w.merge(inputs(ONES, [[[3, 0, 0], [0, 0, 0]]]))
    assert torch.allclose(out, T(ONES) + T([[4, 0, 0], [0, 0, 0]]))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), pool=st.sampled_from(["avg", "random", "magmax"]), deltas=st.booleans())
def test_pooled_value_lies_within_the_members(seed, pool, deltas):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(3, 4, generator=g)
    taus = [torch.randn(3, 4, generator=g) for _ in range(3)]
    w = WeightWeaving(MagMax(), pool=pool, include_deltas=deltas, lambdas=[0.3, 1.2])
    x = inputs(base, taus, generator=seeded(seed))
    out = w.merge(x) - base
    members = torch.stack(list(w.members(x)))
    assert members.shape[0] == (5 if deltas else 2)
    tol = 1e-5
    assert bool((out >= members.amin(0) - tol).all() and (out <= members.amax(0) + tol).all())
    if pool == "magmax":
        assert torch.allclose(out.abs(), members.abs().amax(0))
