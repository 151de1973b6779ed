"""Why a drop is rejected: a bounded class (the metric's ``reason`` label), the full reason and every
problem (errors.rejection), sidecars validated strictly (inbox.parse_sidecar), and the batch CLI
rejecting an expert whose sidecar is broken."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mergewatch.checkpoint.reader import LazyCheckpoint
from mergewatch.checkpoint.validate import check_expert
from mergewatch.checkpoint.writer import write_safetensors_file
from mergewatch.daemon.inbox import parse_sidecar
from mergewatch.errors import REJECT_CLASSES, CheckpointError, IncompatibleExpertError, SidecarError, rejection
from tests.helpers import load_all, make_expert, make_open_clip_base, perturb
from tests.test_cli import run


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    d = tmp_path_factory.mktemp("rej")
    base = make_open_clip_base(d / "base.safetensors")
    good = make_expert(base, d / "good.safetensors", seed=1)
    return d, base, good


def _classify(base: Path, expert: Path) -> tuple[str, str, list[str]]:
    try:
        check_expert(LazyCheckpoint(expert), LazyCheckpoint(base))
    except (CheckpointError, IncompatibleExpertError) as e:
        return rejection(e)
    raise AssertionError(f"{expert} was accepted")


def _variant(d: Path, name: str, state: dict) -> Path:
    write_safetensors_file(d / name, state)
    return d / name


def test_every_kind_of_bad_checkpoint_has_its_class(made):
    d, base, good = made
    sd = load_all(base)
    raw = good.read_bytes()
    cases = {
        "truncated": (d / "t.safetensors", raw[: len(raw) // 2]),
        "header": (d / "h.safetensors", raw[:8] + b"{not json" + raw[17:]),
        "not_safetensors": (d / "n.safetensors", b"\x00" * 64),
        "pickle": (d / "p.pt", b"PK\x03\x04" + b"\x00" * 60),
    }
    for klass, (p, data) in cases.items():
        p.write_bytes(data)
        assert _classify(base, p)[0] == klass, p.name
    first = next(iter(sd))
    missing = _variant(d, "m.safetensors", {k: v for k, v in sd.items() if k != first})
    extra = _variant(d, "x.safetensors", {**sd, "extra.weight": torch.zeros(2)})
    dtype = _variant(d, "dt.safetensors", {k: (v.to(torch.int32) if k == first else v) for k, v in sd.items()})
    nan = perturb(sd, 3)
    nan[first] = nan[first].clone().fill_(float("nan"))
    nonfinite = _variant(d, "nan.safetensors", nan)
    for klass, p in {"missing_key": missing, "unexpected_key": extra, "dtype": dtype, "nonfinite": nonfinite}.items():
        got, full, problems = _classify(base, p)
        assert got == klass and len(problems) == 1 and problems[0] in full, (p.name, got, full)
    assert {*cases, "missing_key", "unexpected_key", "dtype", "nonfinite"} <= set(REJECT_CLASSES)


def test_the_full_reason_lists_every_problem(made):
    """The error message stops after 50 problems; the recorded reason never does."""
    d, base, _ = made
    sd = load_all(base)
    renamed = _variant(d, "renamed.safetensors", {f"other.{k}": v for k, v in sd.items()})
    klass, full, problems = _classify(base, renamed)
    assert klass == "missing_key" and len(problems) == 2 * len(sd)  # each tensor missing + unexpected
    assert all(p in full for p in problems)
    with pytest.raises(IncompatibleExpertError) as e:
        check_expert(LazyCheckpoint(renamed), LazyCheckpoint(base))
    assert "... and 50 more" in str(e.value)


@pytest.mark.parametrize("text, expect", [
    ('{"task": "a",\n}', "not valid JSON: Expecting property name enclosed in double quotes at line 2, column 1"),
    ("[1, 2]", "must be a JSON object, got list"),
    ('{"task": 3}', "field 'task' must be a string"),
    ('{"tags": [1]}', "field 'tags' must be a list of strings"),
    ('{"Task": "a"}', "unknown field 'Task' (allowed: task, parent, eval, tags)"),
])
def test_broken_sidecars_name_what_is_wrong(tmp_path, text, expect):
    p = tmp_path / "e.json"
    p.write_text(text, "utf-8")
    with pytest.raises(SidecarError) as e:
        parse_sidecar(p)
    assert expect in str(e.value) and "e.json" in str(e.value)
    assert rejection(e.value)[0] == "sidecar"


def test_valid_sidecars_and_none(tmp_path):
    assert parse_sidecar(None) == {}
    p = tmp_path / "e.json"
    meta = {"task": "cars", "parent": "3", "eval": "std", "tags": {"lr": 0.1, "run": "a", "ok": True}}
    p.write_text(json.dumps(meta), "utf-8")
    assert parse_sidecar(p) == meta


def test_batch_merge_rejects_an_expert_with_a_broken_sidecar(tmp_path):
    base = make_open_clip_base(tmp_path / "base.safetensors")
    (tmp_path / "experts").mkdir()
    make_expert(base, tmp_path / "experts" / "a.safetensors", seed=1)
    make_expert(base, tmp_path / "experts" / "b.safetensors", seed=2)
    (tmp_path / "experts" / "a.json").write_text('{"task": ', "utf-8")
    cfg = tmp_path / "mw.toml"
    cfg.write_text('workspace = "ws"\nbase = "base.safetensors"\n[policy]\ndeploy = "ema"\n', "utf-8")
    r = run("merge", "--config", str(cfg), str(tmp_path / "experts"), "--json")
    assert r.returncode == 1, r.stderr
    assert "rejected" in r.stderr and "a.json is not valid JSON" in r.stderr and "line 1, column 10" in r.stderr
    summary = json.loads(r.stdout[r.stdout.index("["):])
    assert [(s["status"], s.get("reason_class")) for s in summary] == [("rejected", "sidecar"), ("merged", None)]
    assert (tmp_path / "experts" / "a.json").is_file()  # the user's files are left alone
