"""``mergewatch compare``: replay one stream of experts under several policies and score every step
(issue 16, part 1). ``mergewatch bench quality`` (``protocol.py``) runs on the same machinery.

What a comparison does, for every policy and each of K task orders:

* a fresh workspace ``OUT/runs/<policy>-o<k>`` with the config's settings and that policy; the
  experts are merged in the order with ``Workspace.merge`` (the same validation, engine, state
  commit and publisher as ``mergewatch merge`` and the daemon);
* after each step, the published deploy version (its ``MANIFEST`` verified) is scored by the
  configured ``[eval]`` evaluator on the tasks the *scope* asks for:

  - ``all``: every task at every step (the full accuracy matrix);
  - ``seen``: the tasks trained so far and the held-out tasks (ACC_t and BWT_t at every step);
  - ``final``: each task at its own step and every task at the last step (ACC_T and BWT_T only).

θ0 (``zero_shot``) is scored on every task, and each expert alone on its own task (``individual``).
Orders: the first is the stream as given, the others are ``random.Random(seed)`` shuffles
(``shuffle_first`` shuffles the first too: the benchmark's protocol).

**Resume.** A finished run is kept in ``OUT/cache/runs/<key>.json`` and a score of θ0 or an expert
in ``OUT/cache/scores/<key>.json``; the keys hash what the result depends on: the experts' bytes in
their order, the policy table, θ0's bytes, the model, engine and seed settings, the evaluator
settings and its task data, and ``COMPARE_VERSION``. An interrupted comparison run again redoes only
the run it was in; a change to any input recomputes what it touches, nothing else. A run's
workspace is removed once its result is cached (``keep_runs`` keeps it).

Results (``results.json``): ``{"suite", "tasks", "adaptation", "held_out", "experts", "orders",
"zero_shot", "individual", "policies", "scope", "methods": {name: {"acc_mean", "acc_std",
"bwt_mean", "bwt_std", ("a_ka_mean", "a_ka_std", "a_zs_mean", "a_zs_std", "gm_mean", "gm_std" with
held-out tasks,) "acc_steps_mean", "acc_steps_std", "final_mean": {task: acc}, "per_order": [{"order",
"matrix", "acc", "bwt", ...}]}}}``. ``matrix[j][i]`` is the accuracy on ``tasks[i]`` of the deploy
version after step ``j + 1`` (``null`` where the scope did not score it). Accuracies are in [0, 1];
ACC and BWT are SPEC §5's ``ACC_T`` and ``BWT_T``, computed with ``mergewatch.eval.metrics``; means
and (population) standard deviations are over the orders.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mergewatch.checkpoint.durable import atomic_write
from mergewatch.errors import ConfigError, MergewatchError
from mergewatch.quality.report import time_cell, write_compare_report

COMPARE_VERSION = 1
SCOPES = ("all", "seen", "final")


class CompareError(MergewatchError):
    """A run of the comparison failed (an expert was rejected, a step failed, ...)."""


@dataclass(frozen=True)
class Expert:
    """One expert of the stream: where it is, its name, the task it was trained on (or None)."""

    path: Path
    name: str
    task: str | None
    meta: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Policy:
    name: str
    table: dict  # the [policy] table as written (minus ``name``)


def policy_label(table: dict) -> str:
    """A readable default name: ``opcm``, ``continual_ta-lambda0.3``, ``time-ema-ema-wa``."""
    cell = time_cell(table)
    if cell is not None:
        base = f"time-{cell[1]}-{cell[2]}-{cell[0]}"
        skip = {"init", "deploy", "technique"}
    else:
        base = str(table.get("deploy", "policy"))
        skip = {"deploy"}
    extras = [f"{k}{v}" for k, v in sorted(table.items()) if k not in skip and isinstance(v, (int, float, str)) and not isinstance(v, bool)]
    name = "-".join([base, *extras])
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:80]


def make_policies(tables: Sequence[dict]) -> list[Policy]:
    """Policies from ``[[policy]]`` tables; ``name`` (optional) names a row of the results."""
    out: list[Policy] = []
    seen: set[str] = set()
    for i, t in enumerate(tables):
        if not isinstance(t, dict):
            raise ConfigError(f"policy[{i}]", f"expected a table, got {t!r}")
        t = dict(t)
        name = t.pop("name", None)
        if name is not None and (not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._-]{1,80}", name)):
            raise ConfigError(f"policy[{i}].name", f"expected 1-80 characters of A-Z a-z 0-9 . _ -, got {name!r}")
        name = name or policy_label(t)
        if name in seen:
            raise ConfigError(f"policy[{i}].name", f"two policies are named {name!r}; give them distinct 'name' keys")
        seen.add(name)
        out.append(Policy(name, t))
    if not out:
        raise ConfigError("policy", "no policy to compare: give [[policy]] tables")
    return out


def orders_of(items: Sequence, k: int, seed: int, *, shuffle_first: bool = False) -> list[list]:
    """K orders: the given one first (unless ``shuffle_first``), then ``random.Random(seed)`` shuffles."""
    if k < 1:
        raise ConfigError("--orders", f"must be >= 1, got {k}")
    rng = random.Random(seed)
    out = [] if shuffle_first else [list(items)]
    while len(out) < k:
        o = list(items)
        rng.shuffle(o)
        out.append(o)
    return out


# Content keys ----------------------------------------------------------------------------------

def sha256_file(path: Path, h=None):
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h


class Hashes:
    """sha256 of files and directories, memoised in ``memo`` (a JSON file) by path, size and mtime."""

    def __init__(self, memo: Path):
        self.memo = memo
        try:
            self._data = json.loads(memo.read_text("utf-8"))
        except (OSError, ValueError):
            self._data = {}

    def _stamp(self, p: Path) -> list:
        st = p.stat()
        return [st.st_size, st.st_mtime_ns]

    def file(self, p: Path) -> str:
        key = str(p.resolve())
        stamp = self._stamp(p)
        hit = self._data.get(key)
        if hit and hit[0] == stamp:
            return hit[1]
        sha = sha256_file(p).hexdigest()
        self._data[key] = [stamp, sha]
        self.memo.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.memo, json.dumps(self._data, indent=0, sort_keys=True))
        return sha

    def path(self, p: Path) -> str:
        """A file's sha256, or for a directory the hash of its files' relative names and hashes."""
        p = Path(p)
        if p.is_file():
            return self.file(p)
        if not p.is_dir():
            raise ConfigError("experts", f"{p} does not exist")
        h = hashlib.sha256()
        for f in sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith(".")):
            h.update(str(f.relative_to(p)).encode() + b"\0" + self.file(f).encode() + b"\0")
        return h.hexdigest()


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# The comparison ---------------------------------------------------------------------------------

@dataclass
class Comparison:
    """Everything a comparison needs. ``settings_for(policy, workspace)`` returns the ``Settings`` of
    one run (the user's config with that policy and workspace); ``eval_settings`` is their
    ``[eval]``; ``identity`` is what besides the experts, policy and evaluator the results depend on
    (θ0's hash, model/engine/seed settings)."""

    settings_for: Callable[[Policy, Path], object]
    eval_settings: object
    base: Path
    experts: list[Expert]
    policies: list[Policy]
    out: Path
    orders: int = 3
    seed: int = 0
    scope: str = "all"
    shuffle_first: bool = False
    keep_runs: bool = False
    suite: str = "compare"
    identity: dict = field(default_factory=dict)
    log: Callable[[str], None] | None = None
    #: where the expert of a step comes from: ``(policy, step, expert, workspace) -> path`` (default
    #: ``expert.path``). The benchmark fine-tunes TIME's experts from the stream's published init view
    #: here; the run's cache key covers it through ``identity`` (the source must be deterministic).
    expert_source: Callable[[Policy, int, Expert, object], Path] | None = None


class _Progress:
    """One status line on a terminal (rewritten in place), plain lines otherwise."""

    def __init__(self, log: Callable[[str], None] | None):
        self.tty = log is None and sys.stderr.isatty()
        self.log = log or (lambda msg: print(f"compare: {msg}", file=sys.stderr, flush=True))

    def status(self, msg: str) -> None:
        if self.tty:
            sys.stderr.write("\r\033[K" + msg[:160])
            sys.stderr.flush()

    def line(self, msg: str) -> None:
        if self.tty:
            sys.stderr.write("\r\033[K")
        self.log(msg)


class _Scorer:
    """Scores a checkpoint or a published version on some tasks with the ``[eval]`` evaluator (built
    once, reused for every policy and step), with results cached by content."""

    def __init__(self, c: Comparison, hashes: Hashes, table_name: str):
        self.c = c
        self.hashes = hashes
        self.table_name = table_name
        ev = c.eval_settings
        data_keys = {}
        for t in ev.tasks:
            data_keys[t.name] = [self.hashes.path(p) for p in (t.data, t.classes, t.head) if p is not None]
        self.eval_key = _key({"settings": repr(ev), "data": data_keys})

    def _evaluator(self):
        from mergewatch.eval.runner import _evaluator

        settings = self.c.settings_for(self.c.policies[0], self.c.out / "runs" / "_probe")
        return _evaluator(settings, self.table_name)

    def score(self, model, tasks: Sequence[str]) -> dict[str, float]:
        from mergewatch.eval.base import EvalError
        from mergewatch.eval.evaluators import eval_threads

        ev_settings = self.c.eval_settings
        out = {}
        with eval_threads(ev_settings):
            ev = self._evaluator()
            for name in tasks:
                acc = float(ev.evaluate(model, ev_settings.task(name))["accuracy"])
                if not 0.0 <= acc <= 1.0:
                    raise EvalError(f"task {name!r}: the evaluator returned accuracy {acc}, outside [0, 1]")
                out[name] = acc
        return out

    def score_file(self, path: Path, tasks: Sequence[str], what: str) -> dict[str, float]:
        """Scores of a checkpoint file (θ0 or an expert), cached by its content and the evaluator."""
        from mergewatch.checkpoint.reader import LazyCheckpoint

        key = _key({"v": COMPARE_VERSION, "model": self.hashes.path(path), "eval": self.eval_key, "tasks": sorted(tasks)})
        cache = self.c.out / "cache" / "scores" / f"{key[:32]}.json"
        try:
            return json.loads(cache.read_text("utf-8"))["scores"]
        except (OSError, ValueError, KeyError):
            pass
        res = self.score(LazyCheckpoint(path), tasks)
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache, json.dumps({"what": what, "scores": res}, indent=1))
        return res


def _tasks_to_score(scope: str, step: int, T: int, order: list[Expert], all_tasks: list[str], held_out: list[str]) -> list[str]:
    if scope == "all" or step == T:
        return list(all_tasks)
    seen = [e.task for e in order[:step] if e.task in all_tasks]
    if scope == "seen":
        return [t for t in all_tasks if t in seen or t in held_out]
    own = order[step - 1].task
    return [own] if own in all_tasks and own not in [e.task for e in order[:step - 1]] else []


def _run_one(c: Comparison, policy: Policy, order: list[Expert], k: int, scorer: _Scorer, prog: _Progress, label: str) -> list[dict]:
    """Merge ``order`` with ``policy`` in a fresh workspace; the scores after each step."""
    from mergewatch.deploy.loader import load_version
    from mergewatch.workspace import Workspace

    ws_dir = c.out / "runs" / f"{policy.name}-o{k}"
    if ws_dir.exists():
        shutil.rmtree(ws_dir)  # an interrupted run starts over (its finished siblings are cached)
    ws = Workspace(c.settings_for(policy, ws_dir))
    tasks = [t.name for t in c.eval_settings.tasks]
    held = list(c.eval_settings.held_out)
    rows = []
    T = len(order)
    try:
        for step, e in enumerate(order, 1):
            prog.status(f"{label} step {step}/{T}: merging {e.name}")
            t0 = time.perf_counter()
            path = e.path if c.expert_source is None else c.expert_source(policy, step, e, ws)
            res = ws.merge(path, name=e.name)
            t1 = time.perf_counter()
            if res.status != "merged":
                raise CompareError(f"policy {policy.name}: expert {e.name} was not merged ({res.status}"
                                   + (f": it has the same content as an earlier expert)" if res.status == "duplicate" else ")"))
            pub = ws.publishers["deploy"]
            version = res.versions.get("deploy") or pub.current()
            want = _tasks_to_score(c.scope, step, T, order, tasks, held)
            prog.status(f"{label} step {step}/{T}: scoring deploy v{version} on {len(want)} task(s)")
            scores = scorer.score(load_version(pub.root, version).checkpoint, want) if want else {}
            rows.append({"step": step, "expert": e.name, "version": version, "tasks": scores,
                         "merge_seconds": round(t1 - t0, 3), "eval_seconds": round(time.perf_counter() - t1, 3)})
    finally:
        ws.close()
    return rows


def _summarize_order(rows: list[dict], order: list[Expert], tasks: list[str], adaptation: list[str], held: list[str], scope: str) -> dict:
    from mergewatch.eval import metrics as M

    trained = M.first_trained((i, e.task) for i, e in enumerate(order, 1) if e.task in adaptation)
    m = M.build_matrix([{"step": r["step"], "tasks": {n: {"accuracy": a} for n, a in r["tasks"].items()}} for r in rows],
                       list(trained), trained)
    T = len(order)
    b, n = M.bwt(m, T)
    final = rows[-1]["tasks"] if rows else {}
    ka, zs = M.a_ka(final, adaptation), M.a_zs(final, held)
    return {
        "order": [e.name for e in order],
        "matrix": [[r["tasks"].get(t) for t in tasks] for r in rows],
        "acc": M.acc(m, T), "bwt": b, "bwt_denominator": n,
        # scope "final" scores only each task's own step before the last: ACC_t is unknown there
        "acc_steps": [M.acc(m, t) if scope != "final" or t == T else None for t in range(1, T + 1)],
        "a_ka": ka, "a_zs": zs, "gm": M.gm(ka, zs),
        "seconds": {"merge": round(sum(r["merge_seconds"] for r in rows), 3), "eval": round(sum(r["eval_seconds"] for r in rows), 3)},
    }


def mean_std(xs: Sequence[float | None]) -> tuple[float | None, float | None]:
    vals = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.pstdev(vals) if len(vals) > 1 else 0.0)


def _aggregate(per_order: list[dict], tasks: list[str], held: bool) -> dict:
    out: dict = {}
    metrics = ["acc", "bwt"] + (["a_ka", "a_zs", "gm"] if held else [])
    for name in metrics:
        out[f"{name}_mean"], out[f"{name}_std"] = mean_std([o[name] for o in per_order])
    T = max((len(o["acc_steps"]) for o in per_order), default=0)
    steps = [mean_std([o["acc_steps"][t] for o in per_order if t < len(o["acc_steps"])]) for t in range(T)]
    out["acc_steps_mean"] = [s[0] for s in steps]
    out["acc_steps_std"] = [s[1] for s in steps]
    out["final_mean"] = {t: mean_std([o["matrix"][-1][i] for o in per_order if o["matrix"]])[0] for i, t in enumerate(tasks)}
    out["per_order"] = per_order
    return out


def run_comparison(c: Comparison) -> dict:
    """Run (or resume) the comparison; write ``results.json`` and the report; return the results."""
    if c.scope not in SCOPES:
        raise ConfigError("--evaluate", f"{c.scope!r} is not one of {', '.join(SCOPES)}")
    if not c.experts:
        raise ConfigError("experts", "no expert checkpoints given")
    if c.eval_settings is None or not c.eval_settings.tasks:
        raise ConfigError("eval", "compare needs an [eval] table with tasks to score the merged models on")
    names = [e.name for e in c.experts]
    if len(set(names)) != len(names):
        raise ConfigError("experts", f"two experts have the same name: {sorted(n for n in names if names.count(n) > 1)}")
    out = Path(c.out)
    out.mkdir(parents=True, exist_ok=True)
    prog = _Progress(c.log)
    t_start = time.perf_counter()
    hashes = Hashes(out / "cache" / "files.json")
    tasks = [t.name for t in c.eval_settings.tasks]
    adaptation = list(c.eval_settings.adaptation)
    held = list(c.eval_settings.held_out)
    unknown = sorted({e.task for e in c.experts if e.task is not None and e.task not in tasks})
    if unknown:
        raise ConfigError("experts", f"experts name task(s) {unknown} that [eval] does not list (tasks: {tasks})")
    if not any(e.task in adaptation for e in c.experts):
        raise ConfigError("experts", "no expert is linked to an [eval] task (a sidecar 'task', or a file named after the task): "
                                     "ACC and BWT need to know which task each expert was trained on")
    prog.line(f"{len(c.policies)} policies x {c.orders} order(s) x {len(c.experts)} experts, scoring {len(tasks)} task(s) "
              f"(scope {c.scope}) -> {out}")
    expert_sha = {e.name: hashes.path(e.path) for e in c.experts}
    from mergewatch.checkpoint.roles import resolve_table
    from mergewatch.checkpoint.reader import LazyCheckpoint

    probe = c.settings_for(c.policies[0], out / "runs" / "_probe")
    table_name = resolve_table(probe.model.architecture, list(LazyCheckpoint(c.base)), list(probe.model.roles)).name
    scorer = _Scorer(c, hashes, table_name)

    prog.status("scoring θ0")
    zero_shot = scorer.score_file(c.base, tasks, "θ0")
    individual = {}
    for e in c.experts:
        if e.task in adaptation and e.task not in individual:
            prog.status(f"scoring expert {e.name} alone on {e.task}")
            individual[e.task] = scorer.score_file(e.path, [e.task], e.name)[e.task]
    prog.line("θ0: " + ", ".join(f"{t} {100 * a:.1f}" for t, a in zero_shot.items()))
    prog.line("experts alone: " + ", ".join(f"{t} {100 * a:.1f}" for t, a in individual.items()))

    order_list = orders_of(c.experts, c.orders, c.seed, shuffle_first=c.shuffle_first)
    base_sha = hashes.path(c.base)
    total = len(c.policies) * len(order_list)
    methods: dict = {}
    done = 0
    for policy in c.policies:
        per_order = []
        for k, order in enumerate(order_list):
            done += 1
            label = f"[{done}/{total}] {policy.name} order {k + 1}/{len(order_list)}"
            key = _key({"v": COMPARE_VERSION, "policy": policy.table, "experts": [expert_sha[e.name] for e in order],
                        "names": [e.name for e in order], "base": base_sha, "eval": scorer.eval_key, "scope": c.scope,
                        "identity": c.identity})
            cache = out / "cache" / "runs" / f"{key[:32]}.json"
            t0 = time.perf_counter()
            try:
                rows, cached = json.loads(cache.read_text("utf-8"))["rows"], True
            except (OSError, ValueError, KeyError):
                rows, cached = _run_one(c, policy, order, k, scorer, prog, label), False
                cache.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(cache, json.dumps({"policy": policy.name, "order": [e.name for e in order], "rows": rows}, indent=1))
                if not c.keep_runs:
                    shutil.rmtree(out / "runs" / f"{policy.name}-o{k}", ignore_errors=True)
            s = _summarize_order(rows, order, tasks, adaptation, held, c.scope)
            if cached:
                prog.line(f"{label}: done earlier (cached)")
            else:
                prog.line(f"{label}: ACC {_pct(s['acc'])}, BWT {_pct(s['bwt'], signed=True)} "
                          f"({time.perf_counter() - t0:.0f}s: merge {s['seconds']['merge']:.0f}s, eval {s['seconds']['eval']:.0f}s)")
            per_order.append(s)
        methods[policy.name] = _aggregate(per_order, tasks, bool(held))
        m = methods[policy.name]
        prog.line(f"{policy.name}: ACC {_pm(m['acc_mean'], m['acc_std'])}, BWT {_pm(m['bwt_mean'], m['bwt_std'], signed=True)}")
    shutil.rmtree(out / "runs" / "_probe", ignore_errors=True)
    if (out / "runs").is_dir() and not any((out / "runs").iterdir()):
        (out / "runs").rmdir()
    res = {
        "suite": c.suite, "tasks": tasks, "adaptation": adaptation, "held_out": held,
        "experts": [{"name": e.name, "path": str(e.path), "task": e.task, "sha256": expert_sha[e.name]} for e in c.experts],
        "orders": [[e.name for e in o] for o in order_list],
        "zero_shot": zero_shot, "individual": individual,
        "policies": {p.name: p.table for p in c.policies}, "scope": c.scope, "seed": c.seed,
        "methods": methods,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    atomic_write(out / "results.json", json.dumps(res, indent=2, ensure_ascii=False) + "\n")
    write_compare_report(res, out)
    prog.line(f"done in {res['seconds']:.0f}s: {out / 'results.json'}, {out / 'report.md'}, {out / 'report.html'}")
    return res


def _pct(x: float | None, *, signed: bool = False) -> str:
    if x is None:
        return "—"
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def _pm(mean: float | None, std: float | None, *, signed: bool = False) -> str:
    if mean is None:
        return "—"
    return f"{_pct(mean, signed=signed)} ± {100 * (std or 0.0):.1f}"


# The config surface -----------------------------------------------------------------------------

COMPARE_KEYS = ("experts", "orders", "seed", "evaluate", "out")


def load_compare(path: Path, *, out: Path | None = None, experts: Sequence[tuple[Path, dict]] | None = None, orders: int | None = None,
                 seed: int | None = None, scope: str | None = None, keep_runs: bool = False,
                 expand: Callable[[list[str]], list[tuple[Path, dict]]] | None = None) -> Comparison:
    """A ``Comparison`` from a config file: the usual keys (``base``, ``[model]``, ``[engine]``,
    ``[eval]``, ...) with ``[[policy]]`` tables (one per policy, optional ``name``) instead of one
    ``[policy]``, and an optional ``[compare]`` table (``experts``, ``orders``, ``seed``, ``evaluate``,
    ``out``). Arguments given here override the file. ``workspace`` may be left out (runs live under
    ``out``). Experts are ``(path, sidecar metadata)`` pairs; ``expand`` turns the file's ``experts``
    strings (relative to the config) into such pairs. An expert's task is its sidecar's ``task``, else
    its name's stem when that is an ``[eval]`` task (``metrics.expert_task``)."""
    import tomllib

    from mergewatch import config

    path = Path(path)
    try:
        data = tomllib.loads(path.read_text("utf-8"))
    except OSError as e:
        raise ConfigError("<file>", f"cannot read {path}: {e.strerror or e}") from e
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError("<file>", f"{path} is not valid TOML: {e}") from e
    tables = data.pop("policy", None)
    if tables is None:
        raise ConfigError("policy", "compare needs [[policy]] tables, one per policy to compare")
    if isinstance(tables, dict):
        tables = [tables]
    policies = make_policies(tables)
    opts = data.pop("compare", {})
    if not isinstance(opts, dict):
        raise ConfigError("compare", f"expected a table, got {opts!r}")
    for k in opts:
        if k not in COMPARE_KEYS:
            raise ConfigError(f"compare.{k}", f"unknown key; allowed keys in [compare]: {', '.join(COMPARE_KEYS)}")
    root = path.resolve().parent
    out = Path(out) if out is not None else root / str(opts.get("out", "compare-results"))
    data.pop("workspace", None)
    if "base" not in data:
        raise ConfigError("base", "required")
    for k in ("orders", "seed"):
        if k in opts and (isinstance(opts[k], bool) or not isinstance(opts[k], int)):
            raise ConfigError(f"compare.{k}", f"expected an integer, got {opts[k]!r}")
    orders = orders if orders is not None else opts.get("orders", 3)
    seed = seed if seed is not None else opts.get("seed", 0)
    scope = scope or opts.get("evaluate", "all")
    if scope not in SCOPES:
        raise ConfigError("compare.evaluate", f"{scope!r} is not one of {', '.join(SCOPES)}")

    cache: dict = {}

    def settings_for(policy: Policy, workspace: Path):
        key = (policy.name, str(workspace))
        if key not in cache:
            try:
                cache[key] = config.parse({**data, "workspace": str(workspace), "policy": policy.table}, source=path.resolve())
            except ConfigError as e:
                i = policies.index(policy)
                where = f"policy[{i}]" + (e.key.removeprefix("policy") if e.key.startswith("policy") else f" ({e.key})")
                raise ConfigError(where, e.message) from None
        return cache[key]

    first = None
    for p in policies:  # every policy is checked before any work
        s = settings_for(p, out / "runs" / "_probe")
        first = first or s
    if experts is None:
        listed = opts.get("experts")
        if listed is None:
            raise ConfigError("experts", "no experts: list them on the command line or in [compare] experts")
        if not isinstance(listed, list) or not all(isinstance(x, str) for x in listed):
            raise ConfigError("compare.experts", "expected a list of paths (files, sharded directories or folders)")
        if expand is None:
            raise ConfigError("compare.experts", "no way to read the expert list")
        experts = expand([str(root / x) for x in listed])
    from mergewatch.eval.metrics import expert_task

    if first.eval is None:
        raise ConfigError("eval", "compare needs an [eval] table with tasks to score the merged models on")
    names = [t.name for t in first.eval.tasks]
    experts = [Expert(Path(p), Path(p).name, expert_task(Path(p).name, meta, names), dict(meta)) for p, meta in experts]
    identity = {"seed": first.seed, "model": repr(first.model), "engine": repr(first.engine), "dtype": first.model.dtype_policy}
    return Comparison(settings_for=settings_for, eval_settings=first.eval, base=Path(first.base), experts=list(experts),
                      policies=policies, out=out, orders=orders, seed=seed, scope=scope, keep_runs=keep_runs, identity=identity)
