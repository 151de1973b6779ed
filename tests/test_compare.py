"""``mergewatch compare`` (issue 16, part 1): one stream replayed under several policies over seeded
orders, on a tiny real open_clip model with tensor tasks labelled by θ0 (so θ0 scores 1.0)."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from mergewatch.cli import main
from mergewatch.quality.compare import make_policies, orders_of, policy_label
from mergewatch.quality.report import time_cell
from tests.eval_support import eval_toml, labelled_by_base, write_eval_clip, write_expert
from tests.helpers import load_all

POLICIES = '''
[[policy]]
init = "ft"
deploy = "ft"
[[policy]]
name = "wa"
deploy = "continual_wa"
[[policy]]
deploy = "opcm"
'''


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    base, clip = write_eval_clip(tmp)
    for i, t in enumerate(("t1", "t2", "t3", "t4")):
        labelled_by_base(tmp, base, clip, t, n=12, seed=i)
    state = load_all(base)
    (tmp / "experts").mkdir()
    write_expert(state, tmp / "experts" / "t1.safetensors", seed=1, scale=0.002)
    write_expert(state, tmp / "experts" / "b-bad.safetensors", seed=2, scale=2.0)  # destroys the model
    (tmp / "experts" / "b-bad.json").write_text(json.dumps({"task": "t2"}))  # linked by its sidecar
    write_expert(state, tmp / "experts" / "t3.safetensors", seed=3, scale=0.002)
    return tmp


def write_config(tmp, name="cmp.toml", policies=POLICIES, compare='experts = ["experts"]\norders = 2\n', held_out=("t4",), scope_extra=""):
    cfg = tmp / name
    cfg.write_text('base = "base.safetensors"\n[compare]\n' + compare + scope_extra + policies
                   + eval_toml(["t1", "t2", "t3", "t4"], held_out=held_out))
    return cfg


@pytest.fixture(scope="module")
def compared(stream):
    cfg = write_config(stream)
    out = stream / "out"
    assert main(["compare", "--config", str(cfg), "--out", str(out)]) == 0
    return stream, cfg, out, json.loads((out / "results.json").read_text("utf-8"))


def test_results_follow_from_the_matrices(compared):
    tmp, _, out, res = compared
    assert res["tasks"] == ["t1", "t2", "t3", "t4"] and res["adaptation"] == ["t1", "t2", "t3"] and res["held_out"] == ["t4"]
    assert res["orders"][0] == ["b-bad.safetensors", "t1.safetensors", "t3.safetensors"]  # the folder in name order first
    assert len(res["orders"]) == 2 and sorted(res["orders"][1]) == sorted(res["orders"][0])
    assert res["zero_shot"] == {t: 1.0 for t in res["tasks"]}  # labels are θ0's predictions
    assert res["individual"]["t1"] == res["individual"]["t3"] == 1.0 and res["individual"]["t2"] < 0.6  # the destroyed expert
    assert list(res["methods"]) == ["time-ft-ft-wa", "wa", "opcm"]
    task_of = {e["name"]: e["task"] for e in res["experts"]}
    for name, m in res["methods"].items():
        accs, bwts = [], []
        for order, po in zip(res["orders"], m["per_order"]):
            assert po["order"] == order
            mat = po["matrix"]
            assert len(mat) == 3 and all(len(row) == 4 and all(0.0 <= a <= 1.0 for a in row) for row in mat)  # scope all
            own = {task_of[e]: j for j, e in enumerate(order)}
            col = {t: i for i, t in enumerate(res["tasks"])}
            acc = sum(mat[-1][col[t]] for t in own) / 3
            bwt = sum(mat[-1][col[t]] - mat[j][col[t]] for t, j in own.items() if j < 2) / 2
            assert po["acc"] == pytest.approx(acc) and po["bwt"] == pytest.approx(bwt) and po["bwt_denominator"] == 2
            assert po["a_zs"] == pytest.approx(mat[-1][col["t4"]])
            assert po["gm"] == pytest.approx(math.sqrt(po["a_ka"] * po["a_zs"]))
            if name == "time-ft-ft-wa":  # deploy ft: after step j the deploy model is expert j itself
                for j, e in enumerate(order):
                    assert mat[j][col[task_of[e]]] == res["individual"][task_of[e]]
            accs.append(acc)
            bwts.append(bwt)
        assert m["acc_mean"] == pytest.approx(sum(accs) / 2) and m["acc_std"] == pytest.approx(abs(accs[0] - accs[1]) / 2)
        assert m["bwt_mean"] == pytest.approx(sum(bwts) / 2)
        assert len(m["acc_steps_mean"]) == 3 and m["acc_steps_mean"][-1] == pytest.approx(m["acc_mean"])
    # the destroyed expert comes first in order 1: the ft deploy recovers, averaging keeps its damage
    ft, wa = res["methods"]["time-ft-ft-wa"]["per_order"][0], res["methods"]["wa"]["per_order"][0]
    assert ft["matrix"][-1][:3] == [1.0, 1.0, 1.0] or ft["acc"] >= wa["acc"]


def test_report_files(compared):
    _, _, out, res = compared
    for f in ("report.md", "report.html", "acc_steps.png", "final.png", "per_task.png", "time_grid.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    md = (out / "report.md").read_text("utf-8")
    assert "| θ0 (zero-shot) |" in md and "| experts alone" in md and "A_ZS" in md
    for name in res["methods"]:
        assert f"| {name} |" in md
    assert "time_grid.png" in md and "<img" in (out / "report.html").read_text("utf-8")
    assert not (out / "runs").exists()  # workspaces are removed once their scores are cached


def test_same_steps_as_mergewatch_merge(compared, tmp_path):
    """The first order of ``wa`` is exactly what ``mergewatch merge`` publishes and evaluates."""
    tmp, _, _, res = compared
    work = tmp_path / "m"
    shutil.copytree(tmp, work, ignore=shutil.ignore_patterns("out", "cmp*.toml", "again*"))
    cfg = work / "mw.toml"
    cfg.write_text('workspace = "ws"\nbase = "base.safetensors"\n[policy]\ndeploy = "continual_wa"\n'
                   + eval_toml(["t1", "t2", "t3", "t4"], held_out=("t4",)))
    assert main(["merge", "--config", str(cfg), "--quiet", *[str(work / "experts" / e) for e in res["orders"][0]]]) == 0
    m = json.loads((work / "ws" / "accuracy_matrix.json").read_text())
    ours = res["methods"]["wa"]["per_order"][0]["matrix"]
    for i, task in enumerate(m["tasks"]):
        for j, step in enumerate(m["steps"]):
            assert m["values"][i][j] == ours[step - 1][res["tasks"].index(task)]


def test_resume_recomputes_only_what_changed(compared, capsys):
    tmp, cfg, out, res = compared
    capsys.readouterr()
    assert main(["compare", "--config", str(cfg), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("done earlier (cached)") == 6 and "merge" not in err.split("done earlier")[-1].split("\n")[0]
    again = json.loads((out / "results.json").read_text("utf-8"))
    assert again["methods"] == res["methods"] and again["zero_shot"] == res["zero_shot"]

    # one more policy: only its two runs are computed
    cfg2 = write_config(tmp, "cmp2.toml", POLICIES + '[[policy]]\ninit = "ema"\ndeploy = "ema"\n')
    assert main(["compare", "--config", str(cfg2), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("done earlier (cached)") == 6 and err.count("time-ema-ema-wa order") == 2
    assert json.loads((out / "results.json").read_text("utf-8"))["methods"]["wa"] == res["methods"]["wa"]

    # a leftover of an interrupted run is cleared and the run done again; changed bytes are not "cached"
    (out / "runs" / "wa-o0").mkdir(parents=True)
    (out / "runs" / "wa-o0" / "junk").write_text("x")
    state = load_all(tmp / "experts" / "t3.safetensors")
    changed = tmp / "again"
    shutil.copytree(tmp / "experts", changed)
    write_expert(state, changed / "t3.safetensors", seed=9, scale=0.002)
    cfg3 = write_config(tmp, "cmp3.toml", compare='experts = ["again"]\norders = 2\n')
    assert main(["compare", "--config", str(cfg3), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "done earlier (cached)" not in err and not (out / "runs").exists()


def test_scopes(stream, tmp_path):
    for scope in ("seen", "final"):
        out = tmp_path / scope
        cfg = write_config(stream, f"cmp-{scope}.toml", '[[policy]]\ndeploy = "continual_wa"\n', compare='experts = ["experts"]\norders = 1\n')
        assert main(["compare", "--config", str(cfg), "--out", str(out), "--evaluate", scope]) == 0
        res = json.loads((out / "results.json").read_text("utf-8"))
        po = res["methods"]["continual_wa"]["per_order"][0]
        tasks_in_order = ["t2", "t1", "t3"]  # b-bad (t2), t1, t3
        for j, row in enumerate(po["matrix"][:-1]):
            scored = {t for t, a in zip(res["tasks"], row) if a is not None}
            want = set(tasks_in_order[: j + 1]) | {"t4"} if scope == "seen" else {tasks_in_order[j]}
            assert scored == want, (scope, j, row)
        assert None not in po["matrix"][-1]
        steps = po["acc_steps"]
        assert (None in steps) == (scope == "final") and steps[-1] == pytest.approx(po["acc"])


@pytest.mark.parametrize("policies,compare,message", [
    ("", 'experts = ["experts"]\n', "compare needs [[policy]] tables"),
    ('[[policy]]\ndeploy = "opcm"\n[[policy]]\ndeploy = "opcm"\n', 'experts = ["experts"]\n', "two policies are named 'opcm'"),
    ('[[policy]]\ndeploy = "opcm"\n[[policy]]\ndeploy = "continual_ta"\nlambda = -1.0\n', 'experts = ["experts"]\n', "policy[1].continual_ta.lambda"),
    ('[[policy]]\ndeploy = "opcm"\n', 'experts = ["experts"]\nbogus = 1\n', "compare.bogus"),
    ('[[policy]]\ndeploy = "opcm"\n', '', "no experts"),
])
def test_config_errors(stream, tmp_path, capsys, policies, compare, message):
    cfg = write_config(stream, "bad.toml", policies, compare=compare)
    assert main(["compare", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o" / "results.json").exists()


def test_expert_of_an_unknown_task_is_refused(stream, tmp_path, capsys):
    d = tmp_path / "ex"
    d.mkdir()
    shutil.copy(stream / "experts" / "t1.safetensors", d / "t1.safetensors")
    (d / "t1.json").write_text(json.dumps({"task": "cars"}))
    cfg = write_config(stream, "unk.toml", '[[policy]]\ndeploy = "opcm"\n', compare="")
    assert main(["compare", "--config", str(cfg), "--out", str(tmp_path / "o"), str(d)]) == 2
    assert "cars" in capsys.readouterr().err


def test_orders_and_labels():
    items = list("abcde")
    o = orders_of(items, 4, seed=3)
    assert o[0] == items and all(sorted(x) == items for x in o) and o == orders_of(items, 4, seed=3)
    assert orders_of(items, 2, seed=3, shuffle_first=True)[0] == o[1]
    assert policy_label({"deploy": "continual_ta", "lambda": 0.3}) == "continual_ta-lambda0.3"
    assert policy_label({"init": "ema", "deploy": "all", "technique": "ties"}) == "time-ema-all-ties"
    assert policy_label({"deploy": "ema", "w": 0.5}) == "time-zs-ema-wa-w0.5"  # the config's defaults: TIME init zs, technique wa
    assert time_cell({"deploy": "opcm"}) is None and time_cell({}) == ("wa", "zs", "ema")
    assert [p.name for p in make_policies([{"deploy": "opcm"}, {"name": "x", "deploy": "opcm"}])] == ["opcm", "x"]
