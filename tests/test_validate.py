"""Expert validation against the base: layout comparison, NaN/Inf detection, content hash."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergewatch.checkpoint import ExpertReport, LazyCheckpoint, check_expert, compare_layout, content_sha256
from mergewatch.checkpoint.writer import write_safetensors_file
from mergewatch.errors import IncompatibleExpertError


def ckpt(tmp_path: Path, name: str, tensors: dict) -> LazyCheckpoint:
    p = tmp_path / f"{name}.safetensors"
    write_safetensors_file(p, tensors)
    return LazyCheckpoint(p)


BASE = {
    "a.weight": torch.zeros(4, 3),
    "a.bias": torch.zeros(4),
    "half": torch.zeros(2, dtype=torch.float16),
    "ids": torch.arange(5, dtype=torch.int64),
    "gone": torch.zeros(1),
}


@pytest.fixture
def base(tmp_path):
    return ckpt(tmp_path, "base", BASE)


def test_identical_layout_has_no_problems(tmp_path, base):
    e = ckpt(tmp_path, "e", {k: v + 1 for k, v in BASE.items()})
    assert compare_layout(e, base, "strict") == []
    assert compare_layout(e, base, "float_cast") == []


def test_compare_layout_lists_every_mismatch(tmp_path, base):
    expert = {
        "a.weight": torch.zeros(3, 4),  # shape
        "a.bias": torch.zeros(4, dtype=torch.bfloat16),  # float dtype
        "half": torch.zeros(3, dtype=torch.float32),  # shape and float dtype
        "ids": torch.arange(5, dtype=torch.int32),  # integer dtype
        "extra.one": torch.zeros(1),
        "extra.two": torch.zeros(1),
    }
    e = ckpt(tmp_path, "e", expert)
    strict = compare_layout(e, base, "strict")
    cast = compare_layout(e, base, "float_cast")
    assert "missing tensor 'gone' (in the base, not in the expert)" in strict
    assert "unexpected tensor 'extra.one' (in the expert, not in the base)" in strict
    assert "unexpected tensor 'extra.two' (in the expert, not in the base)" in strict
    assert "shape mismatch for 'a.weight': expert [3, 4] vs base [4, 3]" in strict
    assert "shape mismatch for 'half': expert [3] vs base [2]" in strict
    assert any("dtype mismatch for 'a.bias': expert BF16 vs base F32" in p for p in strict)
    assert any("dtype mismatch for 'half': expert F32 vs base F16" in p for p in strict)
    assert any("dtype mismatch for 'ids': expert I32 vs base I64" in p for p in strict)
    assert len(strict) == 8
    # float_cast forgives float-vs-float only; the integer mismatch and everything else stay
    assert not any("dtype mismatch for 'a.bias'" in p or "dtype mismatch for 'half'" in p for p in cast)
    assert any("dtype mismatch for 'ids'" in p for p in cast)
    assert len(cast) == 6
    assert set(cast) <= set(p.replace("strict", "float_cast") for p in strict)


def test_float_cast_does_not_forgive_float_vs_int(tmp_path, base):
    e = ckpt(tmp_path, "e", {**BASE, "ids": torch.arange(5, dtype=torch.float32)})
    assert compare_layout(e, base, "float_cast") == [
        "dtype mismatch for 'ids': expert F32 vs base I64 (dtype_policy=float_cast)"
    ]


def test_compare_layout_reads_headers_only(tmp_path, base):
    """The expert's data region is garbage, yet layout comparison works (no tensor is read)."""
    p = tmp_path / "garbage.safetensors"
    save_file(dict(BASE), p)
    (n,) = struct.unpack("<Q", p.read_bytes()[:8])
    raw = p.read_bytes()
    p.write_bytes(raw[: 8 + n] + b"\xa5" * (len(raw) - 8 - n))
    assert compare_layout(LazyCheckpoint(p), base) == []


def test_bad_dtype_policy(base):
    with pytest.raises(ValueError, match="dtype_policy"):
        compare_layout(base, base, "loose")


def test_check_expert_reports_hash_and_progress(tmp_path, base):
    e = ckpt(tmp_path, "e", {k: (v + 0.5 if v.is_floating_point() else v) for k, v in BASE.items()})
    seen = []
    rep = check_expert(e, base, progress=lambda i, n: seen.append((i, n)))
    assert isinstance(rep, ExpertReport)
    assert rep.content_sha256 == content_sha256(e)
    assert rep.content_sha256 != content_sha256(base)
    assert rep.n_tensors == len(BASE)
    assert rep.nbytes == e.nbytes == sum(v.numel() * v.element_size() for v in BASE.values())
    assert seen == [(i, len(BASE)) for i in range(1, len(BASE) + 1)]


def test_check_expert_finds_nan_and_inf(tmp_path, base):
    w = torch.zeros(4, 3)
    w[0, 0] = float("nan")
    w[1, 1] = float("nan")
    w[2, 2] = float("inf")
    b = torch.zeros(4)
    b[3] = float("-inf")
    h = torch.tensor([float("nan"), 1.0], dtype=torch.float16)
    e = ckpt(tmp_path, "e", {**BASE, "a.weight": w, "a.bias": b, "half": h})
    with pytest.raises(IncompatibleExpertError) as ei:
        check_expert(e, base)
    probs = ei.value.problems
    assert "non-finite values in 'a.weight': 2 NaN, 1 Inf" in probs
    assert "non-finite values in 'a.bias': 0 NaN, 1 Inf" in probs
    assert "non-finite values in 'half': 1 NaN, 0 Inf" in probs
    assert len(probs) == 3
    assert "3 problem(s)" in str(ei.value)


def test_check_expert_nan_in_bf16_with_float_cast(tmp_path, base):
    b = torch.zeros(4, dtype=torch.bfloat16)
    b[0] = float("nan")
    e = ckpt(tmp_path, "e", {**BASE, "a.bias": b})
    with pytest.raises(IncompatibleExpertError) as ei:
        check_expert(e, base, "float_cast")
    assert ei.value.problems == ["non-finite values in 'a.bias': 1 NaN, 0 Inf"]


def test_check_expert_layout_problems_raise_before_reading(tmp_path, base):
    w = torch.full((4, 3), float("nan"))
    e = ckpt(tmp_path, "e", {"a.weight": w, "new": torch.zeros(1)})
    with pytest.raises(IncompatibleExpertError) as ei:
        check_expert(e, base, progress=lambda i, n: pytest.fail("tensors were read"))
    probs = ei.value.problems
    assert any("missing tensor 'gone'" in p for p in probs)
    assert any("unexpected tensor 'new'" in p for p in probs)
    assert not any("non-finite" in p for p in probs)


def test_check_expert_strict_dtype(tmp_path, base):
    e = ckpt(tmp_path, "e", {**BASE, "half": torch.zeros(2, dtype=torch.float32)})
    assert check_expert(e, base, "float_cast").n_tensors == len(BASE)
    with pytest.raises(IncompatibleExpertError, match="dtype mismatch for 'half'"):
        check_expert(e, base, "strict")
