"""``mergewatch bench quality`` (issue 16): the quick text protocol end to end on the real
all-MiniLM-L6-v2, its results.json schema, and the expert cache. Slow on a busy machine: the first
run fine-tunes three experts (cached in the quality cache afterwards, see README)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mergewatch.cli import main

METHODS = ["continual_wa", "opcm"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
    code = main(["bench", "quality", "--suite", "text", "--quick", "--orders", "2", "--methods", ",".join(METHODS), "--out", str(out)])
    assert code == 0
    return out


def test_results_schema_and_values(quick):
    res = json.loads((quick / "results.json").read_text("utf-8"))
    assert set(res) >= {"suite", "tasks", "orders", "zero_shot", "individual", "methods"}  # the schema (compare adds keys)
    assert res["suite"] == "text"
    tasks = res["tasks"]
    assert sorted(tasks) == ["foldoc", "fortune_lang", "wn_verb"]
    assert len(res["orders"]) == 2 and all(sorted(o) == sorted(tasks) for o in res["orders"])
    for key in ("zero_shot", "individual"):
        assert set(res[key]) == set(tasks) and all(0.0 <= v <= 1.0 for v in res[key].values())
    # every expert beats θ0 on its own task
    for t in tasks:
        assert res["individual"][t] > res["zero_shot"][t], t
    assert list(res["methods"]) == METHODS
    for name, m in res["methods"].items():
        assert set(m) >= {"acc_mean", "acc_std", "bwt_mean", "bwt_std", "per_order"}
        assert 0.0 <= m["acc_mean"] <= 1.0 and m["acc_std"] >= 0.0
        assert -1.0 <= m["bwt_mean"] <= 1.0 and m["bwt_std"] >= 0.0
        assert [p["order"] for p in m["per_order"]] == res["orders"]
        for p in m["per_order"]:
            assert set(p) >= {"order", "matrix"}
            assert len(p["matrix"]) == len(tasks) and all(len(row) == len(tasks) for row in p["matrix"])
            assert all(0.0 <= a <= 1.0 for row in p["matrix"] for a in row)
            # the deploy view after step 1 is the first expert itself for these methods
            first = p["order"][0]
            assert p["matrix"][0][tasks.index(first)] == pytest.approx(res["individual"][first], abs=0.05)
    # sanity: merging keeps most of the knowledge — ACC not far below θ0's mean, at most the best expert
    zs_mean = sum(res["zero_shot"].values()) / len(tasks)
    wa = res["methods"]["continual_wa"]["acc_mean"]
    assert zs_mean - 0.10 <= wa <= max(res["individual"].values()) + 1e-9
    md = (quick / "report.md").read_text("utf-8")
    assert "| continual_wa |" in md and "| opcm |" in md and "θ0" in md
    for f in ("report.html", "acc_steps.png", "final.png", "per_task.png"):
        assert (quick / f).is_file(), f


def test_second_run_reuses_cached_experts(quick, tmp_path, capsys):
    capsys.readouterr()
    code = main(["bench", "quality", "--suite", "text", "--quick", "--orders", "1", "--methods", "continual_wa", "--out", str(tmp_path / "again")])
    assert code == 0
    err = capsys.readouterr().err
    for t in ("foldoc", "fortune_lang", "wn_verb"):
        assert f"expert {t}: cached" in err
    assert "fine-tuning" not in err
    again = json.loads((tmp_path / "again" / "results.json").read_text("utf-8"))
    first = json.loads((quick / "results.json").read_text("utf-8"))
    assert again["individual"] == first["individual"] and again["zero_shot"] == first["zero_shot"]


def test_suite_options_are_checked_before_any_work(tmp_path, capsys):
    for argv, msg in ((["--suite", "image"], "unknown suite 'image'"),
                      (["--suite", "text", "--strength", "strong"], "only the glyph suite"),
                      (["--suite", "glyph", "--extra-task", str(tmp_path)], "extra tasks are text tasks"),
                      (["--suite", "glyph", "--tasks", "21"], "must be in 0..20"),
                      (["--suite", "glyph", "--methods", "metamerge"], "needs a NiNo checkpoint"),
                      (["--suite", "text", "--methods", "metamerge"], "use it with --suite glyph"),
                      (["--suite", "glyph", "--nino", str(tmp_path / "none.pt")], "is not a file")):
        assert main(["bench", "quality", *argv, "--out", str(tmp_path / "g")]) == 2, argv
        assert msg in capsys.readouterr().err, argv
        assert not (tmp_path / "g").exists()


def test_unknown_method_is_a_usage_error(tmp_path, capsys):
    assert main(["bench", "quality", "--suite", "text", "--quick", "--methods", "nope", "--out", str(tmp_path / "n")]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err


def test_a_bad_extra_task_is_a_usage_error(tmp_path, capsys):
    bad = tmp_path / "mytask"
    bad.mkdir()
    (bad / "classes.txt").write_text("a\nb\n", "utf-8")
    (bad / "train.jsonl").write_text('{"text": "x", "label": 0}\n', "utf-8")
    (bad / "test.jsonl").write_text('{"text": "y", "label": 5}\n', "utf-8")
    assert main(["bench", "quality", "--suite", "text", "--quick", "--extra-task", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "test.jsonl:1" in err and "out of range" in err


def test_time_grid_names():
    from mergewatch.quality.protocol import time_grid_methods

    grid = time_grid_methods()
    assert len(grid) == 11 and "time-zs-ft" not in grid  # SPEC §1: every pair but init zs with deploy ft
    assert grid["time-ema-all"] == {"init": "ema", "deploy": "all", "technique": "wa"}


def test_time_init_axis_is_real_and_held_out_tasks_are_scored(tmp_path):
    """init ft: the expert of step 2 is fine-tuned from the stream's published init view (the first
    expert), not from θ0; the held-out task gets no expert and gives A_ZS and GM."""
    from mergewatch.quality.compare import Hashes
    from mergewatch.quality.text_tasks import cache_root

    out = tmp_path / "grid"
    code = main(["bench", "quality", "--suite", "text", "--quick", "--tasks", "3", "--held-out", "1", "--orders", "1",
                 "--methods", "time-ft-ema,time-zs-ema", "--out", str(out)])
    assert code == 0
    res = json.loads((out / "results.json").read_text("utf-8"))
    held = res["tasks"][-1]
    assert res["held_out"] == [held] and held not in res["individual"] and len(res["experts"]) == 2
    first, second = res["orders"][0]
    by_name = {e["name"]: e for e in res["experts"]}
    # the expert fine-tuned from the init view after step 1 (init ft: that is expert 1 itself)
    made = [json.loads(p.read_text()) for p in (cache_root() / "experts").glob(f"{second}-*.json")]
    sourced = [m for m in made if m.get("init_sha256") == by_name[first]["sha256"]]
    assert sourced and sourced[0]["stats"]["init"] is not None
    assert Hashes(tmp_path / "h.json").path(Path(sourced[0]["stats"]["path"])) != by_name[second]["sha256"]
    ft, zs = res["methods"]["time-ft-ema"]["per_order"][0], res["methods"]["time-zs-ema"]["per_order"][0]
    assert ft["matrix"][0] == zs["matrix"][0]  # step 1 is the same for both (the θ0 expert)
    assert ft["matrix"][1] != zs["matrix"][1]  # step 2 merged a different expert
    for m in res["methods"].values():
        assert m["a_zs_mean"] is not None and m["gm_mean"] == pytest.approx((m["a_ka_mean"] * m["a_zs_mean"]) ** 0.5)
