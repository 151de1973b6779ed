"""Command line: ``mergewatch run | merge | submit | status | rollback | promote | eval | report | compare | demo | bench``
(DESIGN §3.6).

Exit codes: 0 success, 2 usage or configuration error (the message names the key), 1 anything else
(including experts that were rejected in a batch: the others are still merged; also when the reader
of stdout went away, e.g. ``| head``, which ends the command quietly, without a traceback).

The light verbs (``status``, ``submit``, ``rollback``, ``promote``, ``--help``) import neither torch
nor open_clip nor transformers: they read the config with ``config.load(light=True)`` and use only
standard-library modules (publisher, ledger, inbox, state records), so they answer at once even on a
busy machine (issue 14; ``tests/test_cli_light.py`` checks it, ``bench/cli.py`` times it). Keep
heavy imports inside the verbs that merge or evaluate.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mergewatch import __version__
from mergewatch.checkpoint.durable import atomic_write
from mergewatch.errors import CheckpointError, ConfigError, IncompatibleExpertError, MergewatchError, SidecarError, rejection
from mergewatch.views import VIEWS


class Progress:
    """Per-expert lines and a per-pass tensor counter, on a terminal only (quiet otherwise)."""

    def __init__(self, stream=None, enabled: bool | None = None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self._last = 0.0

    def __call__(self, label: str, pass_no: int, n_passes: int, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if done != total and now - self._last < 0.1:
            return
        self._last = now
        width = 30
        filled = width * done // max(total, 1)
        self.stream.write(f"\r  pass {pass_no}/{n_passes} {label:<18} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} tensors")
        if done == total:
            self.stream.write("\n")
        self.stream.flush()


def expand_experts(paths: list[str]) -> list[Path]:
    """Expert paths in merge order: files and sharded directories as given; a folder of experts is
    expanded to its ``*.safetensors`` files and checkpoint sub-directories in natural order
    (``checkpoint-200`` before ``checkpoint-1000``: daemon/inbox.py, ``natural_key``)."""
    from mergewatch.daemon.inbox import natural_key

    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir() and not any(p.glob("*.safetensors.index.json")) and not (p / "model.safetensors").is_file():
            for child in sorted(p.iterdir(), key=lambda c: natural_key(c.name)):
                if child.name.startswith("."):
                    continue
                if child.is_file() and child.suffix == ".safetensors":
                    out.append(child)
                elif child.is_dir() and (any(child.glob("*.safetensors.index.json")) or (child / "model.safetensors").is_file()):
                    out.append(child)
                elif child.is_file() and child.suffix in (".pt", ".bin", ".pth", ".ckpt"):
                    out.append(child)  # refused with the reason when validated
        else:
            out.append(p)
    return out


def _sidecar_meta(path: Path) -> dict:
    """A batch expert's sidecar (``<name>.json`` beside a file, ``meta.json`` in a directory), or {}.
    A broken one raises ``SidecarError``: the expert is rejected like a bad checkpoint."""
    from mergewatch.daemon.inbox import file_sidecar, parse_sidecar

    side = (path / "meta.json") if path.is_dir() else file_sidecar(path)
    return parse_sidecar(side if side is not None and side.is_file() else None)


class BatchEval:
    """Evaluation in ``mergewatch merge`` (and ``mergewatch eval``): inline, booked in the ledger by
    the evaluation book like the daemon's, with a table row printed per step and the accuracy
    matrix written as JSON."""

    def __init__(self, settings, ws, *, matrix_path: Path | None = None, stream=None):
        from mergewatch.eval.book import EvalBook

        self.settings = settings
        self.ws = ws
        self.book = EvalBook(settings, ws.ledger, ws.publishers)
        self.matrix_path = matrix_path or Path(settings.workspace) / "accuracy_matrix.json"
        self.stream = stream or sys.stdout
        self._header = False

    def evaluate(self, job, *, settle: bool = False) -> tuple[dict, float]:
        """Evaluate one job inline and record it (a failure is a failed evaluation row, the batch
        goes on), with the gate settled on it if ``settle``; returns the ledger row and the
        seconds it took."""
        from mergewatch.eval.runner import try_evaluate

        ok, res, seconds = try_evaluate(self.settings, self.ws.table.name, job.path)
        row = self.book.conclude(job, ok, res)[0] if settle else self.book.record(job, ok, res)
        return row, seconds

    def run_pending(self, names: dict[int, str]) -> list[dict]:
        rows = []
        for job in self.book.pending():
            row, seconds = self.evaluate(job, settle=True)
            self.print_row(job, row, names.get(job.step, "θ0" if job.step == 0 else ""), seconds)
            rows.append(row)
        self.write_matrix()
        return rows

    def print_row(self, job, row: dict, expert: str, seconds: float) -> None:
        tasks = [t.name for t in self.settings.eval.tasks]
        if not self._header:
            self._header = True
            print("step  version  expert                ACC     BWT (n)        " + "  ".join(f"{t[:10]:>10}" for t in tasks), file=self.stream)
        if row["status"] != "ok":
            print(f"{job.step:>4}  {job.version:>7}  {expert[:20]:<20}  evaluation failed: {row['error']}", file=self.stream)
            return
        acc = "-" if row.get("acc") is None else f"{row['acc']:.4f}"
        bwt = "-" if row.get("bwt") is None else f"{row['bwt']:+.4f}"
        den = row.get("bwt_denominator", 0)
        cells = "  ".join(f"{row['tasks'][t]['accuracy']:>10.4f}" for t in tasks)
        note = f"  HELD BACK: {row['gate_reason']}" if row.get("held_back") else ""
        print(f"{job.step:>4}  {job.version:>7}  {expert[:20]:<20}  {acc:>6}  {bwt:>7} (n={den})  {cells}{note}", file=self.stream)

    def write_matrix(self) -> None:
        doc = self.book.matrix_document()
        atomic_write(self.matrix_path, json.dumps(doc, indent=2))


def cmd_merge(args) -> int:
    from mergewatch import config
    from mergewatch.workspace import Workspace

    settings = config.load(args.config)
    experts = expand_experts(args.experts)
    if not experts:
        raise ConfigError("experts", "no expert checkpoints given (files, sharded directories or a folder of them)")
    progress = Progress(enabled=None if not args.quiet else False)
    ws = Workspace(settings, progress=progress)
    ws.recover()
    ws.reconcile()  # steps an earlier run committed but stopped before recording
    evals = BatchEval(settings, ws, matrix_path=Path(args.matrix) if args.matrix else None) if settings.eval is not None else None
    names = {e.step: e.name for e in ws.ledger.experts("merged") if e.step}
    failed = 0
    out = []
    try:
        if evals is not None:
            evals.run_pending(names)  # θ0 (and anything an earlier run left unevaluated)
        for i, path in enumerate(experts, 1):
            print(f"[{i}/{len(experts)}] {path}", file=sys.stderr) if progress.enabled else None
            try:
                res = ws.record_merge(path, _sidecar_meta(path))
            except (CheckpointError, IncompatibleExpertError, SidecarError) as e:
                failed += 1
                klass, full, problems = rejection(e)
                print(f"rejected {path}: {full}", file=sys.stderr)
                out.append({"path": str(path), "status": "rejected", "reason": full, "reason_class": klass, "problems": problems})
                continue
            if res.status == "duplicate":
                print(f"duplicate {path}: expert {res.expert_id[:12]} is already merged; skipped")
            else:
                names[res.step] = path.name
                views = ", ".join(
                    f"{v} v{n} -> {ws.publishers[v].root / str(n)}" if n is not None else f"{v} unchanged"
                    for v, n in res.versions.items()
                )
                held = " (held back until evaluated)" if ws.gated else ""
                print(f"merged {path} as step {res.step} (expert {res.expert_id[:12]}, {res.seconds:.2f}s): {views}{held}")
                if evals is not None:
                    evals.run_pending(names)
            out.append({"path": str(path), "status": res.status, "id": res.expert_id, "step": res.step, "versions": res.versions})
    finally:
        ws.close()
    if evals is not None:
        print(f"accuracy matrix: {evals.matrix_path}")
    if args.json:
        print(json.dumps(out, indent=2))
    return 1 if failed else 0


def cmd_eval(args) -> int:
    """Evaluate one published deploy version now (default: current) and record it."""
    from mergewatch import config
    from mergewatch.eval.book import EvalJob
    from mergewatch.workspace import Workspace

    settings = config.load(args.config)
    if settings.eval is None:
        raise ConfigError("eval", "no [eval] tasks configured: nothing to evaluate with")
    ws = Workspace(settings)
    pub = ws.publishers["deploy"]
    version = args.version if args.version is not None else pub.current()
    if version is None or version not in pub.versions():
        raise ConfigError("VERSION", f"deploy version {version} is not published (have {pub.versions()})")
    try:
        evals = BatchEval(settings, ws)
        manifest = pub.manifest(version)
        step = manifest.get("step", 0)
        job = EvalJob("deploy", version, step, str(pub.path(version)))
        row, seconds = evals.evaluate(job)  # a failure is recorded and reported: exit code 1
        expert = (manifest.get("expert_names") or [""])[-1] if step else "θ0"  # the expert merged last
        evals.print_row(job, row, expert, seconds)
        if args.json:
            print(json.dumps(row, indent=2))
    finally:
        ws.close()
    return 0 if row["status"] == "ok" else 1


def cmd_promote(args) -> int:
    """Operator override of the deploy gate: make a published version current."""
    from mergewatch import config
    from mergewatch.deploy.publisher import Publisher

    settings = config.load(args.config, light=True)
    pub = Publisher(Path(settings.workspace) / args.view, keep=settings.publish.keep)
    before = pub.current()
    pub.promote(args.version)
    _record(settings, lambda led: led.record_event(
        "promoted", version=args.version, data={"view": args.view, "by": "operator", "from": before, "reason": args.reason}))
    print(f"{args.view}: version {args.version} is now current (was {before})")
    return 0


def _record(settings, write) -> None:
    """``write(ledger)`` in the workspace's ledger, if it has one: the ledger is the record of what
    happened, an operator's promotions and rollbacks included (light verbs: no workspace opened)."""
    from mergewatch.ledger import Ledger

    path = Path(settings.workspace) / "ledger.sqlite"
    if path.is_file():
        led = Ledger(path)
        try:
            write(led)
        finally:
            led.close()


def cmd_report(args) -> int:
    from mergewatch import config
    from mergewatch.eval.report import write_report

    settings = config.load(args.config)
    written = write_report(Path(settings.workspace), Path(args.out) if args.out else None)
    for kind, path in written.items():
        print(f"{kind}: {path}")
    return 0


def status_data(settings) -> dict:
    """Queue, experts with their statuses and reasons, last steps, current versions (DESIGN §3.6).

    The ledger is the source of truth, read in one snapshot (``Ledger.snapshot``); a workspace
    without one (nothing recorded yet) has its committed state say what was merged."""
    from mergewatch.ledger import Ledger
    from mergewatch.deploy.publisher import Publisher
    from mergewatch.state_records import latest_record

    root = Path(settings.workspace)
    data: dict = {"workspace": str(root), "policy": {"init": settings.policy.init, "deploy": settings.policy.deploy}}
    pubs = {view: Publisher(root / view, keep=settings.publish.keep) for view in VIEWS}
    for view, pub in pubs.items():
        data[view] = {"current": pub.current(), "versions": pub.versions()}
    latest = latest_record(root / "state")
    data["step"] = latest[0] if latest else 0
    ledger_path = root / "ledger.sqlite"
    if ledger_path.is_file():
        with Ledger.snapshot(ledger_path) as led:  # one consistent state, even while the daemon writes
            data["queue"] = led.queue_depth()
            data["counts"] = led.counts()
            data["experts"] = [e.public() for e in led.experts()]
            data["steps"] = led.steps(limit=10)
            if settings.eval is not None:
                from mergewatch.eval.book import EvalBook

                book = EvalBook(settings, led, pubs)
                data["eval"] = book.status()
                data["gate"] = {
                    "max_drop": settings.eval.gate_max_drop,
                    "held_back": book.held_back(),
                    "waiting_for_evaluation": book.waiting(),
                }
    else:
        experts = []
        if latest is not None:
            names = latest[1].get("expert_names", [])
            for i, sha in enumerate(latest[1]["expert_ids"]):
                experts.append({"id": sha, "name": names[i] if i < len(names) else "", "status": "merged", "reason": "", "step": i + 1})
        data["queue"] = 0
        data["experts"] = experts
        data["steps"] = []
    data["rejected"] = [e for e in data["experts"] if e["status"] == "rejected"]
    return data


def cmd_status(args) -> int:
    from mergewatch import config

    data = status_data(config.load(args.config, light=True))
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"workspace {data['workspace']}  policy init={data['policy']['init']} deploy={data['policy']['deploy']}  step {data['step']}")
    if not Path(data["workspace"]).is_dir():
        print("  the workspace does not exist yet: `mergewatch run` or `mergewatch merge` creates it")
    for view in VIEWS:
        current, versions = data[view]["current"], data[view]["versions"]
        if current is None and not versions:
            print(f"  {view}: no version published yet")
        else:
            print(f"  {view}: current {'none yet' if current is None else current}  versions {versions}")
    print(f"  queue: {data['queue']}")
    for key, e in (data.get("eval") or {}).items():
        if e["status"] == "ok":
            bwt = "-" if e.get("bwt") is None else f"{e['bwt']:+.4f} (n={e.get('bwt_denominator')})"
            acc = "-" if e.get("acc") is None else f"{e['acc']:.4f}"
            held = "  held back: " + e["gate_reason"] if e.get("held_back") else ""
            print(f"  eval {key:>4}: ACC {acc}  BWT {bwt}{held}")
        else:
            print(f"  eval {key:>4}: failed: {e.get('error')}")
    gate = data.get("gate")
    if gate and gate["max_drop"] is not None:
        for h in gate["held_back"]:
            print(f"  deploy version {h['version']} is held back by the gate: {h['reason']} (override: mergewatch promote {h['version']})")
        if gate["waiting_for_evaluation"]:
            print(f"  waiting for evaluation before becoming current: {gate['waiting_for_evaluation']}")
    if not data["experts"]:
        print("  no expert received yet (mergewatch submit puts one into the inbox; mergewatch merge merges files)")
    for e in data["experts"][-20:]:
        step = e["step"] if e["step"] is not None else "-"
        print(f"  step {step:>3}  {e['status']:<9} {(e['id'] or '-')[:12]:<12}  {e['name']}")
    if data["rejected"]:
        print("  rejected drops:")
        for e in data["rejected"][-20:]:
            print(f"    {e['name']}: {e['reason']}")
    return 0


def cmd_rollback(args) -> int:
    from mergewatch import config
    from mergewatch.deploy.publisher import Publisher

    settings = config.load(args.config, light=True)
    pub = Publisher(Path(settings.workspace) / args.view, keep=settings.publish.keep)
    new = pub.rollback(args.version, reason=args.reason)
    _record(settings, lambda led: led.record_version(args.view, new, pub.manifest(new).get("step", 0), note=f"rollback of {args.version}: {args.reason}"))
    print(f"{args.view}: version {args.version} republished as {new} (now current)")
    return 0


def cmd_run(args) -> int:
    from mergewatch.daemon.service import run

    return run(args.config)


def cmd_submit(args) -> int:
    from mergewatch import config
    from mergewatch.daemon.inbox import submit

    settings = config.load(args.config, light=True)
    meta = None
    if args.meta:
        try:
            meta = json.loads(Path(args.meta).read_text("utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError("--meta", f"cannot read sidecar JSON {args.meta}: {e}") from e
    if args.task:
        meta = {**(meta or {}), "task": args.task}
    dest = submit(args.path, Path(settings.workspace) / "inbox", meta=meta, name=args.name)
    print(f"submitted {args.path} -> {dest}")
    return 0


def cmd_demo(args) -> int:
    if args.batch:  # the batch walkthrough: tiny open_clip experts merged by `mergewatch merge`
        from mergewatch.demo import run_demo

        return run_demo(Path(args.workdir) if args.workdir else None, n_experts=args.experts, cli_main=main)
    from mergewatch.demo_live import run_live_demo

    return run_live_demo(Path(args.workdir) if args.workdir else None, quick=args.quick)


def cmd_compare(args) -> int:
    from mergewatch.quality.compare import load_compare, run_comparison

    def expand(paths: list[str]) -> list[tuple[Path, dict]]:
        return [(p, _sidecar_meta(p)) for p in expand_experts(paths)]

    comp = load_compare(Path(args.config), out=Path(args.out) if args.out else None,
                        experts=expand(args.experts) if args.experts else None, orders=args.orders, seed=args.seed,
                        scope=args.evaluate, keep_runs=args.keep_runs, expand=expand)
    res = run_comparison(comp)
    from mergewatch.quality.report import summary_markdown

    print(summary_markdown(res), end="")
    return 0


def cmd_bench_quality(args) -> int:
    from mergewatch.quality.protocol import run_quality
    from mergewatch.quality.report import summary_markdown

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    res = run_quality(suite=args.suite, out=Path(args.out), n_tasks=args.tasks, orders=args.orders, seed=args.seed,
                      methods=methods, extra_tasks=args.extra_task, quick=args.quick, scope=args.evaluate,
                      held_out=args.held_out, strength=args.strength, nino=args.nino)
    print(summary_markdown(res), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mergewatch", description="Continual model merging: merge experts as they arrive and publish the result.")
    p.add_argument("--version", action="version", version=f"mergewatch {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("merge", help="merge experts step by step with the configured policy and publish each step")
    m.add_argument("--config", required=True, help="TOML configuration file")
    m.add_argument("experts", nargs="+", help="expert checkpoints (.safetensors files, sharded dirs, or a folder of them)")
    m.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    m.add_argument("--quiet", action="store_true", help="no progress output even on a terminal")
    m.add_argument("--matrix", help="where to write the accuracy matrix JSON (default: <workspace>/accuracy_matrix.json)")
    m.set_defaults(func=cmd_merge)

    ev = sub.add_parser("eval", help="evaluate a published deploy version now (default: the current one)")
    ev.add_argument("--config", required=True)
    ev.add_argument("version", type=int, nargs="?", help="deploy version (default: current)")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=cmd_eval)

    pr = sub.add_parser("promote", help="make a published version current (overrides the deploy gate)")
    pr.add_argument("--config", required=True)
    pr.add_argument("version", type=int)
    pr.add_argument("--view", choices=VIEWS, default="deploy")
    pr.add_argument("--reason", default="operator promote")
    pr.set_defaults(func=cmd_promote)

    rp = sub.add_parser("report", help="write a Markdown + HTML report with plots from the ledger")
    rp.add_argument("--config", required=True)
    rp.add_argument("--out", help="output directory (default: <workspace>/report)")
    rp.set_defaults(func=cmd_report)

    s = sub.add_parser("status", help="current versions and merged experts")
    s.add_argument("--config", required=True)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    r = sub.add_parser("rollback", help="republish an old version as a new, current one")
    r.add_argument("--config", required=True)
    r.add_argument("version", type=int)
    r.add_argument("--view", choices=VIEWS, default="deploy")
    r.add_argument("--reason", default="operator rollback")
    r.set_defaults(func=cmd_rollback)

    run_p = sub.add_parser("run", help="run the daemon in the foreground (watch the inbox, merge, publish)")
    run_p.add_argument("--config", required=True)
    run_p.set_defaults(func=cmd_run)

    sm = sub.add_parser("submit", help="copy a checkpoint into the inbox safely (temp name, fsync, rename)")
    sm.add_argument("--config", required=True)
    sm.add_argument("path", help="a .safetensors file or a sharded checkpoint directory")
    sm.add_argument("--meta", help="sidecar JSON file (task, parent, tags)")
    sm.add_argument("--task", help="task name (added to the sidecar)")
    sm.add_argument("--name", help="name in the inbox (default: the file's name)")
    sm.set_defaults(func=cmd_submit)

    d = sub.add_parser("demo", help="the whole loop, live: the daemon merges, publishes and evaluates experts a producer fine-tunes")
    d.add_argument("--workdir", help="where to put the demo (default: ./demo-workspace)")
    d.add_argument("--quick", action="store_true", help="a tiny random BERT and 2 synthetic tasks: seconds, nothing downloaded")
    d.add_argument("--batch", action="store_true", help="the old batch walkthrough instead: tiny open_clip experts merged by `merge`")
    d.add_argument("--experts", type=int, default=3, help="--batch: how many experts")
    d.set_defaults(func=cmd_demo)

    c = sub.add_parser("compare", help="replay a stream of experts under several policies over seeded orders; report ACC/BWT")
    c.add_argument("--config", required=True, help="config with one [[policy]] table per policy, an [eval] table and optionally [compare]")
    c.add_argument("experts", nargs="*", help="experts in stream order (files, sharded dirs, or a folder: name order); default [compare] experts")
    c.add_argument("--orders", type=int, help="task orders: the given one, then seeded shuffles (default 3)")
    c.add_argument("--seed", type=int, help="seed of the shuffled orders (default 0)")
    c.add_argument("--evaluate", choices=("all", "seen", "final"), help="tasks scored after each step (default all)")
    c.add_argument("--out", help="output directory (default: [compare] out, else compare-results beside the config)")
    c.add_argument("--keep-runs", action="store_true", help="keep each run's workspace (default: removed once its scores are cached)")
    c.set_defaults(func=cmd_compare)

    b = sub.add_parser("bench", help="benchmarks: 'bench quality' runs the continual-merging protocol on real tasks")
    bsub = b.add_subparsers(dest="bench", required=True)
    q = bsub.add_parser("quality", help="fine-tune experts per task, merge them in seeded orders with each method, report ACC/BWT")
    q.add_argument("--suite", required=True, help="task suite: text (MiniLM on Debian text tasks) or glyph (tiny open_clip ViT on rendered scripts)")
    q.add_argument("--strength", choices=("light", "strong"), help="glyph suite: the experts' fine-tuning strength (default light)")
    q.add_argument("--nino", metavar="PATH", help="a local NiNo checkpoint (e.g. ../shared/nino/checkpoints/nino_mlp.pt): adds MetaMerge (pairwise fold beyond 4 experts)")
    q.add_argument("--tasks", type=int, help="the first N tasks of the suite (default: text all 8, glyph the first 8 of 20; --quick: 3 small ones)")
    q.add_argument("--orders", type=int, help="seeded task orders per method (default: the protocol's 10; --quick: 2)")
    q.add_argument("--seed", type=int, default=0, help="seed of the task orders and workspaces")
    q.add_argument("--methods", help="comma-separated methods: deploy names (opcm, nufilt, continual_ta, ...), TIME rows zs_ema_wa, zs_all_ties, or time_grid (every TIME init x deploy)")
    q.add_argument("--held-out", type=int, default=0, metavar="N", help="the last N tasks are held out: scored (A_ZS, GM), never fine-tuned")
    q.add_argument("--extra-task", action="append", default=[], metavar="DIR", help="a task directory of your own (repeatable)")
    q.add_argument("--evaluate", choices=("all", "seen", "final"), help="tasks scored after each step (default: all with --quick, else seen)")
    q.add_argument("--out", default="quality-results", help="output directory (results.json, report.md/.html, plots; cache/ for resuming)")
    q.add_argument("--quick", action="store_true", help="3 small tasks, capped test splits, short fine-tuning (minutes on a laptop)")
    q.set_defaults(func=cmd_bench_quality)
    return p


def _stdout_reader_gone() -> bool:
    """True when stdout is a pipe whose reader has gone away (``mergewatch status --json | head -c 10``)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # not a file descriptor (e.g. captured in-process)
        return False


def _silence_stdout() -> None:
    """Send what is still buffered for stdout to /dev/null, so that the interpreter's last flush
    does not print a BrokenPipeError either."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    """Run one verb; the exit code (see the module's docstring). A reader of stdout that goes away
    early (``| head``) ends the command quietly with 1 (DESIGN §3.6: "1 anything else")."""
    parser = build_parser()
    try:
        try:
            args = parser.parse_args(argv)
        finally:
            sys.stdout.flush()  # --help, --version: a closed pipe is found here rather than at exit
        code = _run(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError as e:
        if _stdout_reader_gone():
            _silence_stdout()
            return 1
        print(f"mergewatch: {e}", file=sys.stderr)
        return 1


def _run(args) -> int:
    try:
        return args.func(args)
    except BrokenPipeError:
        raise  # main tells a closed stdout from another broken pipe
    except ConfigError as e:
        print(f"mergewatch: {e}", file=sys.stderr)
        return 2
    except (MergewatchError, OSError, ValueError) as e:
        print(f"mergewatch: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mergewatch: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
