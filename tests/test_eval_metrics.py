"""Metrics of SPEC §5 on accuracy matrices written out by hand, plus invariants (hypothesis)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mergewatch.eval.metrics import (
    AccuracyMatrix,
    a_ka,
    a_zs,
    acc,
    accuracies,
    build_matrix,
    bwt,
    expert_task,
    first_trained,
    fwt,
    gm,
    own_step,
    summary,
)

# Three tasks trained at steps 1, 2, 3; column 0 is θ0. D is registered but never trained.
#          s0    s1    s2    s3
ROWS = {
    "A": [0.50, 0.90, 0.80, 0.70],
    "B": [0.40, 0.45, 0.85, 0.75],
    "C": [0.30, 0.35, 0.40, 0.90],
    "D": [0.20, 0.22, 0.21, 0.20],
}
ZS = {"A": 0.50, "B": 0.40, "C": 0.30, "D": 0.20}


def hand_matrix(rows=ROWS, trained_at=None) -> AccuracyMatrix:
    tasks = list(rows)
    trained = {"A": 1, "B": 2, "C": 3} if trained_at is None else trained_at
    return AccuracyMatrix(tasks=tasks, steps=[0, 1, 2, 3], values=[list(rows[t]) for t in tasks], trained_at=trained)


def evals_from(rows: dict, steps: list[int]) -> list[dict]:
    return [{"step": s, "tasks": {t: {"accuracy": v[j], "n": 10, "seconds": 0.1} for t, v in rows.items() if v[j] is not None}} for j, s in enumerate(steps)]


def test_acc_by_hand():
    m = hand_matrix()
    assert acc(m, 0) is None  # nothing trained yet
    assert acc(m, 1) == pytest.approx(0.90)
    assert acc(m, 2) == pytest.approx((0.80 + 0.85) / 2)
    assert acc(m, 3) == pytest.approx((0.70 + 0.75 + 0.90) / 3)


def test_bwt_textbook_denominator_by_hand():
    m = hand_matrix()
    assert bwt(m, 1) == (None, 0)  # t = 1: no task before it
    b2, n2 = bwt(m, 2)
    assert (b2, n2) == (pytest.approx(0.80 - 0.90), 1)
    b3, n3 = bwt(m, 3)
    assert n3 == 2 == 3 - 1  # the textbook t − 1
    assert b3 == pytest.approx(((0.70 - 0.90) + (0.75 - 0.85)) / 2)


def test_fwt_against_theta0_by_hand():
    m = hand_matrix()
    assert fwt(m, ZS, 1) is None  # the task of step 1 is left out (θ0 is the model before it)
    assert fwt(m, ZS, 2) == pytest.approx(0.45 - 0.40)
    assert fwt(m, ZS, 3) == pytest.approx(((0.45 - 0.40) + (0.40 - 0.30)) / 2)
    # a task without a zero-shot figure is skipped
    assert fwt(m, {"C": 0.30}, 3) == pytest.approx(0.40 - 0.30)


def test_single_step_matrix():
    m = AccuracyMatrix(tasks=["A"], steps=[1], values=[[0.8]], trained_at={"A": 1})
    assert acc(m, 1) == pytest.approx(0.8)
    assert bwt(m, 1) == (None, 0)
    assert fwt(m, {"A": 0.5}, 1) is None
    s = summary(m, 1, zero_shot={"A": 0.5}, adaptation=["A"], held_out=[], accs={"A": 0.8})
    assert s == {"acc": pytest.approx(0.8), "bwt": None, "bwt_denominator": 0, "fwt": None, "a_ka": pytest.approx(0.8), "a_zs": None, "gm": None}


def test_task_never_seen_is_out_of_acc_and_bwt_but_in_a_ka():
    m = hand_matrix()
    assert own_step(m, "D") is None
    assert own_step(m, "B") == 2
    with pytest.raises(KeyError, match="'Z'"):
        own_step(m, "Z")
    # D's 0.20 at step 3 would pull ACC_3 down if it were counted
    assert acc(m, 3) == pytest.approx(0.78333333333)
    assert bwt(m, 3)[1] == 2
    accs3 = {t: v[3] for t, v in ROWS.items()}
    assert a_ka(accs3, ["A", "B", "C", "D"]) == pytest.approx((0.70 + 0.75 + 0.90 + 0.20) / 4)


def test_missing_cells_are_skipped_and_the_denominator_says_so():
    rows = {**ROWS, "A": [0.50, 0.90, 0.80, None]}
    m = hand_matrix(rows)
    assert acc(m, 3) == pytest.approx((0.75 + 0.90) / 2)
    assert bwt(m, 3) == (pytest.approx(0.75 - 0.85), 1)
    # a missing just-learned cell a[i][i] drops that task from BWT too
    rows = {**ROWS, "B": [0.40, 0.45, None, 0.75]}
    m = hand_matrix(rows)
    assert bwt(m, 3) == (pytest.approx(0.70 - 0.90), 1)
    assert acc(m, 2) == pytest.approx(0.80)
    # every cell a task needs is missing: no figure at all, not 0
    rows = {**ROWS, "A": [0.5, None, 0.8, 0.7]}
    assert bwt(hand_matrix(rows), 2) == (None, 0)
    assert acc(hand_matrix(rows), 1) is None
    # a step with no column (its evaluation failed) reads as missing cells
    m = AccuracyMatrix(tasks=["A", "B"], steps=[1, 3], values=[[0.9, 0.7], [0.3, 0.8]], trained_at={"A": 1, "B": 2})
    assert m.get("A", 2) is None
    assert acc(m, 2) is None
    assert bwt(m, 3) == (pytest.approx(0.7 - 0.9), 1)  # B's a[B][2] is missing
    assert fwt(m, {"B": 0.25}, 3) == pytest.approx(0.3 - 0.25)


def test_task_trained_twice_keeps_its_first_step():
    # A at steps 1 and 3, B at 2: BWT_3 counts A (against a[A][1]) and B
    m = AccuracyMatrix(tasks=["A", "B"], steps=[1, 2, 3], values=[[0.9, 0.6, 0.95], [0.3, 0.8, 0.7]], trained_at={"A": 1, "B": 2})
    b, n = bwt(m, 3)
    assert n == 2
    assert b == pytest.approx(((0.95 - 0.9) + (0.7 - 0.8)) / 2)
    assert first_trained([(1, "A"), (2, "B"), (3, "A"), (4, None)]) == {"A": 1, "B": 2}
    assert list(first_trained([(5, "x"), (2, "y"), (9, "y")])) == ["y", "x"]


def test_time_metrics_by_hand():
    accs = {"A": 0.7, "B": 0.75, "C": 0.9, "D": 0.2, "H1": 0.6, "H2": 0.5}
    ka = a_ka(accs, ["A", "B", "C", "D"])
    zs = a_zs(accs, ["H1", "H2"])
    assert ka == pytest.approx(0.6375)
    assert zs == pytest.approx(0.55)
    assert gm(ka, zs) == pytest.approx(math.sqrt(0.6375 * 0.55))
    assert a_zs(accs, []) is None and gm(ka, None) is None and gm(None, zs) is None
    assert a_ka(accs, ["A", "A", "B"]) == pytest.approx((0.7 + 0.75) / 2)  # a name counts once
    assert a_ka({"A": 0.7}, ["A", "B"]) == pytest.approx(0.7)  # B not evaluated: skipped
    with pytest.raises(ValueError, match="non-negative"):
        gm(-0.1, 0.5)


def test_summary_at_step_3():
    m = hand_matrix()
    accs = {**{t: v[3] for t, v in ROWS.items()}, "H": 0.6}
    s = summary(m, 3, zero_shot=ZS, adaptation=["A", "B", "C", "D"], held_out=["H"], accs=accs)
    assert s["acc"] == pytest.approx(0.783333333333)
    assert s["bwt"] == pytest.approx(-0.15) and s["bwt_denominator"] == 2
    assert s["fwt"] == pytest.approx(0.075)
    assert s["a_ka"] == pytest.approx(0.6375) and s["a_zs"] == pytest.approx(0.6)
    assert s["gm"] == pytest.approx(math.sqrt(0.6375 * 0.6))
    assert summary(m, 3, zero_shot=None, adaptation=["A"], held_out=[], accs=accs)["fwt"] is None


def test_build_matrix_from_evaluation_rows():
    rows = {"A": [0.5, 0.9, 0.8], "B": [0.4, 0.45, 0.85], "H": [0.6, 0.58, 0.55]}
    evals = evals_from(rows, [0, 1, 2])
    evals = [evals[2], evals[0], evals[1]]  # arrival order does not matter: columns sorted
    m = build_matrix(evals, ["A", "B"])
    assert m.tasks == ["A", "B"] and m.steps == [0, 1, 2]  # H (held-out) is not a row
    assert m.values == [[0.5, 0.9, 0.8], [0.4, 0.45, 0.85]]
    assert m.trained_at == {"A": 1, "B": 2}  # default: k-th task at step k + 1
    assert acc(m, 2) == pytest.approx(0.825)


def test_build_matrix_failed_rows_repeats_and_missing_tasks():
    evals = [
        {"step": 1, "status": "ok", "tasks": {"A": {"accuracy": 0.1}}},
        {"step": 1, "status": "ok", "tasks": {"A": {"accuracy": 0.9}}},  # the later row for a step wins
        {"step": 2, "status": "failed", "error": "boom", "tasks": {}},
        {"step": 3, "status": "ok", "tasks": {"A": {"accuracy": 0.7}}},  # B absent: missing cell
    ]
    m = build_matrix(evals, ["A", "B", "A"], trained_at={"A": 1, "B": 2})
    assert m.tasks == ["A", "B"]
    assert m.steps == [1, 3]
    assert m.values == [[0.9, 0.7], [None, None]]
    assert bwt(m, 3) == (pytest.approx(-0.2), 1)
    m = build_matrix([], ["A"])
    assert m.steps == [] and m.values == [[]] and acc(m, 1) is None


@pytest.mark.parametrize(
    "row, match",
    [
        ({"step": 1, "tasks": {"cars": {"accuracy": 1.5}}}, "'cars'"),
        ({"step": 1, "tasks": {"cars": {"accuracy": float("nan")}}}, "'cars'"),
        ({"step": 1, "tasks": {"cars": {"n": 3}}}, "'cars'"),
        ({"step": 1, "tasks": {"cars": 0.5}}, "'cars'"),
        ({"step": 1, "tasks": ["cars"]}, "'tasks'"),
        ({"tasks": {}}, "'step'"),
        ({"step": -1, "tasks": {}}, "'step'"),
    ],
)
def test_build_matrix_rejects_bad_rows(row, match):
    with pytest.raises(ValueError, match=match):
        build_matrix([row], ["cars"])


def test_matrix_shape_checks():
    with pytest.raises(ValueError, match="rows"):
        AccuracyMatrix(tasks=["A"], steps=[1, 2], values=[[0.1]])
    with pytest.raises(ValueError, match="increasing"):
        AccuracyMatrix(tasks=["A"], steps=[2, 1], values=[[0.1, 0.2]])
    with pytest.raises(ValueError, match="duplicate"):
        AccuracyMatrix(tasks=["A", "A"], steps=[1], values=[[0.1], [0.2]])
    with pytest.raises(ValueError, match="'Z'"):
        AccuracyMatrix(tasks=["A"], steps=[1], values=[[0.1]], trained_at={"Z": 1})
    with pytest.raises(ValueError, match="trained_at"):
        build_matrix([], ["A"], trained_at={"A": 0})
    with pytest.raises(KeyError, match="'Q'"):
        hand_matrix().get("Q", 1)


def test_accuracies_reads_a_row():
    assert accuracies({"tasks": {"a": {"accuracy": 1, "n": 2}, "b": {"accuracy": 0.25}}}) == {"a": 1.0, "b": 0.25}
    with pytest.raises(ValueError, match="row 7"):
        accuracies({"tasks": {"a": {"accuracy": True}}}, where="row 7")


def test_expert_task_link():
    tasks = ["cars", "dtd"]
    assert expert_task("x.safetensors", {"task": "dtd"}, tasks) == "dtd"  # the sidecar wins
    assert expert_task("cars.safetensors", {}, tasks) == "cars"
    assert expert_task("cars", None, tasks) == "cars"  # a sharded directory
    assert expert_task("sub/dtd.safetensors", {"tags": []}, tasks) == "dtd"
    assert expert_task("mnist.safetensors", {}, tasks) is None
    assert expert_task("x.safetensors", {"task": "mnist"}, tasks) == "mnist"  # kept, for the caller to report


# Invariants -------------------------------------------------------------------------------------
acc_values = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


@st.composite
def lower_triangular(draw):
    """n tasks trained at steps 1..n; cells a[i][j] for j >= own step, None before it."""
    n = draw(st.integers(1, 6))
    values = [[draw(acc_values) if j >= i else None for j in range(n)] for i in range(n)]
    tasks = [f"t{i}" for i in range(n)]
    return AccuracyMatrix(tasks=tasks, steps=list(range(1, n + 1)), values=values, trained_at={t: i + 1 for i, t in enumerate(tasks)})


@given(c=acc_values, n=st.integers(1, 6))
def test_constant_matrix(c, n):
    tasks = [f"t{i}" for i in range(n)]
    m = AccuracyMatrix(tasks=tasks, steps=list(range(n + 1)), values=[[c] * (n + 1) for _ in tasks], trained_at={t: i + 1 for i, t in enumerate(tasks)})
    for t in range(1, n + 1):
        assert acc(m, t) == pytest.approx(c)
        b, k = bwt(m, t)
        assert k == t - 1
        assert (b is None) if t == 1 else b == pytest.approx(0.0, abs=1e-12)
        f = fwt(m, {x: c for x in tasks}, t)
        assert (f is None) if t == 1 else f == pytest.approx(0.0, abs=1e-12)
    assert a_ka({t: c for t in tasks}, tasks) == pytest.approx(c)
    assert gm(c, c) == pytest.approx(c)


@given(m=lower_triangular())
def test_nothing_changes_means_no_forgetting(m):
    frozen = [[row[i] if j >= i else None for j in range(len(row))] for i, row in enumerate(m.values)]  # a[i][j] = a[i][i]
    f = AccuracyMatrix(tasks=m.tasks, steps=m.steps, values=frozen, trained_at=m.trained_at)
    for t in m.steps[1:]:
        b, n = bwt(f, t)
        assert n == t - 1 and b == pytest.approx(0.0, abs=1e-12)


@given(m=lower_triangular())
def test_acc_and_bwt_are_the_textbook_sums(m):
    T = m.steps[-1]
    last = [row[-1] for row in m.values]
    assert acc(m, T) == pytest.approx(sum(last) / T)
    assert min(last) - 1e-12 <= acc(m, T) <= max(last) + 1e-12
    b, n = bwt(m, T)
    if T == 1:
        assert (b, n) == (None, 0)
    else:
        assert n == T - 1
        assert b == pytest.approx(sum(m.values[i][-1] - m.values[i][i] for i in range(T - 1)) / (T - 1))
        assert -1.0 - 1e-12 <= b <= 1.0 + 1e-12


@given(x=acc_values, y=acc_values)
def test_gm_lies_between_min_and_the_arithmetic_mean(x, y):
    g = gm(x, y)
    assert min(x, y) - 1e-12 <= g <= (x + y) / 2 + 1e-12
