"""The glyph suite (mergewatch.quality.glyph_tasks / glyph_model, issue 16 vision): real Debian fonts
in the quality cache, the real open_clip ViT, the real ``heads`` evaluator.

The quick suite is built once for the module, in the quality cache (``$MERGEWATCH_CACHE`` or
``~/.cache/mergewatch/quality``): cold, it downloads the four font packages (18 MB), renders the
tasks, pre-trains θ0 and fine-tunes three experts (97 s measured on 2 cores); warm, the whole file
takes about 15 s. When the packages cannot be fetched the tests fail with the reason instead of
skipping: the CI machine has Debian's archive.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mergewatch import config
from mergewatch.checkpoint.reader import LazyCheckpoint
from mergewatch.checkpoint.roles import detect_table
from mergewatch.eval.evaluators import build_evaluator
from mergewatch.eval.settings import parse_eval
from mergewatch.quality import glyph_model as gm
from mergewatch.quality import glyph_tasks as gt
from mergewatch.quality.text_tasks import TaskDataError, cache_root


@pytest.fixture(scope="module")
def built():
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.fail("apt-get and dpkg-deb are needed to fetch the glyph suite's fonts from Debian packages")
    lines: list[str] = []
    try:
        suite = gt.build_glyph_suite(None, quick=True, strength="light", progress=lines.append)
    except TaskDataError as e:
        pytest.fail(f"could not build the glyph suite from Debian's font packages: {e}")
    return suite, lines


@pytest.fixture(scope="module")
def fonts(built):
    return gt._Fonts(cache_root(), lambda _msg: None)


@pytest.fixture(scope="module")
def classes(fonts):
    return gt.suite_classes(fonts, cache_root(), lambda _msg: None)


@pytest.fixture(scope="module")
def evaluator(built):
    suite, _ = built
    settings = parse_eval(suite.eval_table(), Path.cwd(), suite.base)
    table = detect_table(list(LazyCheckpoint(suite.base))).name
    return settings, build_evaluator(settings, suite.base, table)


def _view(path: Path) -> dict[str, torch.Tensor]:
    ck = LazyCheckpoint(path)
    return {k: ck[k] for k in ck}


def test_suite_api(built):
    suite, _ = built
    assert list(suite.tasks) == list(gt.QUICK_TASKS) == list(suite.experts)
    assert suite.base.is_file() and suite.model_config.is_file() and suite.strength == "light" and suite.quick
    for name, task in suite.tasks.items():
        assert task.data.is_file() and task.head.is_file() and task.train.is_file() and suite.experts[name].is_file()
        assert len(task.classes) == gt.N_CLASSES == len(set(task.classes))
    assert gt.task_names(5, quick=True) == [*gt.QUICK_TASKS, "devanagari", "tamil"]
    assert gt.task_names(None, quick=False) == list(gt.TASKS) and len(gt.TASKS) == 20
    with pytest.raises(ValueError, match="strength"):
        gt.build_glyph_suite(1, quick=True, strength="medium")
    with pytest.raises(ValueError, match="n_tasks"):
        gt.task_names(21, quick=False)


def test_rendering_is_deterministic(fonts, classes):
    pool = fonts.pool
    for cp in (ord("A"), classes["mixture"][-1], classes["tasks"]["georgian"][0], classes["tasks"]["tibetan"][3]):
        a = gt.render_glyph(pool, cp, "determinism:0")
        assert a.dtype == np.uint8 and a.shape == (3, gt.IMAGE_SIZE, gt.IMAGE_SIZE)
        assert np.array_equal(a, gt.render_glyph(pool, cp, "determinism:0"))
        assert not np.array_equal(a, gt.render_glyph(pool, cp, "determinism:1"))
        assert np.array_equal(a[0], a[1]) and np.array_equal(a[0], a[2])  # grey
    from sklearn.datasets import load_digits

    digits = load_digits()
    assert np.array_equal(gt.render_digit(digits.images[0], "d"), gt.render_digit(digits.images[0], "d"))


def test_only_covered_code_points_are_drawn(fonts, classes):
    """Every font a class is drawn in maps the code point (cmap) and draws real ink, not its .notdef box."""
    pool = fonts.pool
    cps = [cp for name in gt.SCRIPTS for cp in classes["tasks"][name]] + classes["mixture"][::7]
    for cp in cps:
        verified = pool.fonts_for(cp)
        assert len(verified) >= gt.MIN_FONTS, hex(cp)
        for i in verified:
            assert cp in pool.cmaps[i]
            m = pool.mask(cp, i)
            assert int((np.asarray(m) > 127).sum()) >= gt.MIN_INK
            assert (m.size, m.tobytes()) != pool._notdef_key(i), (hex(cp), pool.names[i])
    # the control: a font without Georgian draws its .notdef box for it, and the check refuses it
    liberation = next(i for i, n in enumerate(pool.names) if n.endswith("LiberationSans-Regular.ttf"))
    georgian = classes["tasks"]["georgian"][0]
    assert georgian not in pool.cmaps[liberation] and liberation not in pool.fonts_for(georgian)
    assert not pool.verify(georgian, liberation)


def test_task_images_are_not_blank(built):
    suite, _ = built
    for name, task in suite.tasks.items():
        for split in (task.train, task.data):
            images, labels = gt.read_split(split.parent, split.stem)
            assert images.dtype == torch.uint8 and tuple(images.shape[1:]) == (3, 32, 32)
            flat = images[:, 0].reshape(len(images), -1).float()
            span = flat.max(dim=1).values - flat.min(dim=1).values
            assert float(span.min()) >= 60, f"{name}: a blank image"  # glyph and background differ by >= 100 greys
            counts = torch.bincount(labels, minlength=gt.N_CLASSES)
            assert len(set(counts.tolist())) == 1, f"{name}: unbalanced"


def test_tasks_are_disjoint(classes, built):
    suite, _ = built
    mixture = set(classes["mixture"])
    assert len(mixture) >= 250
    seen: set[int] = set()
    for name in gt.SCRIPTS:
        cps = set(classes["tasks"][name])
        assert len(cps) == gt.N_CLASSES, name
        assert not cps & mixture, f"{name} shares code points with the pre-training mixture"
        assert not cps & seen, f"{name} shares code points with another task"
        seen |= cps
    names = [c for t in suite.tasks.values() for c in t.classes]
    assert len(names) == len(set(names))
    assert suite.tasks["digits"].classes == [f"handwritten digit {d}" for d in range(10)]
    assert suite.tasks["georgian"].classes == [gt.class_name(cp) for cp in classes["tasks"]["georgian"]]


def test_base_and_eval_table(built, evaluator):
    suite, _ = built
    base = _view(suite.base)
    assert detect_table(list(base)).name == "open_clip_visual"
    assert all(k.startswith("visual.") and v.dtype == torch.float32 for k, v in base.items())
    assert base["visual.transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 192, 192)
    assert json.loads(suite.model_config.read_text("utf-8"))["model_cfg"] == gm.GLYPH_VIT
    settings, _ = evaluator
    assert [t.name for t in settings.tasks] == list(suite.tasks) and settings.evaluator == "heads"
    parsed = config.parse({"workspace": "ws", "base": str(suite.base), "model": {"architecture": "auto", "companions": []},
                           "policy": {"deploy": "continual_wa"}, "eval": suite.eval_table()})
    assert parsed.eval.tasks == settings.tasks


def test_prototype_head_and_theta0_above_chance(built, evaluator):
    suite, _ = built
    settings, ev = evaluator
    base = _view(suite.base)
    for task in settings.tasks:
        w = LazyCheckpoint(task.head)["weight"]
        assert tuple(w.shape) == (gt.N_CLASSES, gm.GLYPH_VIT["embed_dim"])
        assert torch.allclose(w.norm(dim=1), torch.full((gt.N_CLASSES,), gm.HEAD_LOGIT_SCALE), atol=1e-3)
        acc = ev.evaluate(base, task)["accuracy"]
        assert acc >= 0.35, f"{task.name}: θ0 {acc:.3f}, chance is 0.1"
        assert acc == pytest.approx(suite.stats["tasks"][task.name]["theta0_test_accuracy"], abs=1e-6)


def test_each_expert_beats_theta0(built, evaluator):
    suite, _ = built
    settings, ev = evaluator
    base = _view(suite.base)
    for task in settings.tasks:
        expert = _view(suite.experts[task.name])
        assert list(expert) == list(base)
        for k, v in expert.items():
            assert v.dtype == torch.float32 and v.shape == base[k].shape
            if not k.startswith(gm.CHECKPOINT_PREFIX + gm.TRAINED_PREFIX):
                assert torch.equal(v, base[k]), f"{k} is not trained but changed"
        theta0, mine = ev.evaluate(base, task)["accuracy"], ev.evaluate(expert, task)["accuracy"]
        assert mine > theta0 + 0.05, f"{task.name}: expert {mine:.3f} vs θ0 {theta0:.3f}"


def test_finetuning_is_deterministic(built):
    suite, _ = built
    task = suite.tasks["georgian"]
    images, labels = gt.read_split(task.train.parent, "train")
    head = LazyCheckpoint(task.head)["weight"]
    params = gm.FinetuneParams(steps=3, batch_size=16, lr=5e-4)
    base = _view(suite.base)
    a, _ = gm.finetune(suite.model_config, base, head, images, labels, params)
    b, _ = gm.finetune(suite.model_config, base, head, images, labels, params)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["visual.transformer.resblocks.0.mlp.c_fc.weight"], base["visual.transformer.resblocks.0.mlp.c_fc.weight"])


def test_second_build_is_served_from_the_cache(built, monkeypatch):
    suite, _ = built

    def forbidden(*_a, **_k):
        raise AssertionError("a warm build must not render, pre-train or fine-tune")

    for mod, name in ((gm, "pretrain"), (gm, "finetune"), (gm, "prototype_head"), (gt, "render_glyph"), (gt, "render_digit"),
                      (gt, "FontPool")):
        monkeypatch.setattr(mod, name, forbidden)
    lines: list[str] = []
    again = gt.build_glyph_suite(None, quick=True, strength="light", progress=lines.append)
    assert again.base == suite.base and again.experts == suite.experts and again.tasks == suite.tasks
    assert any(line.startswith("glyph θ0: cached") for line in lines)
    assert sum("cached" in line and line.startswith("glyph expert") for line in lines) == len(gt.QUICK_TASKS)


def test_bench_quality_glyph_quick_end_to_end(built, tmp_path):
    """``mergewatch bench quality --suite glyph --quick``: the suite's θ0 and experts scored by the
    ``heads`` evaluator, merged in two orders; the held-out task gives A_ZS; TIME's init axis is real
    (init ft fine-tunes the second expert from the published init view, here the first expert)."""
    from mergewatch.cli import main

    suite, _ = built
    out = tmp_path / "glyph"
    nino = Path(__file__).resolve().parents[1].parent / "shared" / "nino" / "checkpoints" / "nino_mlp.pt"
    code = main(["bench", "quality", "--suite", "glyph", "--quick", "--orders", "2", "--held-out", "1", "--nino", str(nino),
                 "--methods", "continual_wa,opcm,metamerge,time-ft-ema,time-zs-ema", "--out", str(out)])
    assert code == 0
    res = json.loads((out / "results.json").read_text("utf-8"))
    assert res["suite"] == "glyph" and res["tasks"] == list(gt.QUICK_TASKS)
    held = gt.QUICK_TASKS[-1]
    assert res["held_out"] == [held] and set(res["individual"]) == set(gt.QUICK_TASKS[:-1])
    for t in gt.QUICK_TASKS:  # the protocol's scores are the suite's own measurements
        assert res["zero_shot"][t] == pytest.approx(suite.stats["tasks"][t]["theta0_test_accuracy"], abs=1e-6)
    for t in res["individual"]:
        assert res["individual"][t] == pytest.approx(suite.stats["tasks"][t]["expert_test_accuracy"], abs=1e-6)
        assert res["individual"][t] > res["zero_shot"][t]
    assert len(res["orders"]) == 2
    first, second = res["orders"][0]
    wa = res["methods"]["continual_wa"]["per_order"][0]["matrix"]
    assert wa[0][res["tasks"].index(first)] == pytest.approx(res["individual"][first], abs=1e-6)  # step 1 = expert 1
    ft, zs = res["methods"]["time-ft-ema"]["per_order"][0]["matrix"], res["methods"]["time-zs-ema"]["per_order"][0]["matrix"]
    assert ft[0] == zs[0] and ft[1] != zs[1]
    made = [json.loads(p.read_text("utf-8")) for p in (cache_root() / "glyph" / "experts").glob(f"{second}-light-*.json")]
    from_init = [m for m in made if "init_sha256" in m]
    assert from_init
    # started from expert 1 (which already knows task 1), not from θ0
    assert any(m["stats"]["theta0_test_accuracy"] != suite.stats["tasks"][second]["theta0_test_accuracy"] for m in from_init)
    assert list(res["methods"]) == ["continual_wa", "opcm", "metamerge", "time-ft-ema", "time-zs-ema"]
    for m in res["methods"].values():
        assert 0.0 <= m["acc_mean"] <= 1.0 and m["a_zs_mean"] is not None
    md = (out / "report.md").read_text("utf-8")
    assert "| opcm |" in md and "θ0" in md
