"""Command line: ``mergewatch run | merge | submit | status | rollback | demo`` (DESIGN §3.6).

Exit codes: 0 success, 2 usage or configuration error (the message names the key), 1 anything else
(including experts that were rejected in a batch: the others are still merged).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mergewatch import __version__
from mergewatch.errors import CheckpointError, ConfigError, IncompatibleExpertError, MergewatchError


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
    expanded to its ``*.safetensors`` files and checkpoint sub-directories in name order."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir() and not any(p.glob("*.safetensors.index.json")) and not (p / "model.safetensors").is_file():
            for child in sorted(p.iterdir()):
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
    failed = 0
    out = []
    for i, path in enumerate(experts, 1):
        print(f"[{i}/{len(experts)}] {path}", file=sys.stderr) if progress.enabled else None
        try:
            res = ws.merge(path)
        except (CheckpointError, IncompatibleExpertError) as e:
            failed += 1
            print(f"rejected {path}: {e}", file=sys.stderr)
            out.append({"path": str(path), "status": "rejected", "reason": str(e)})
            continue
        if res.status == "duplicate":
            print(f"duplicate {path}: expert {res.expert_id[:12]} is already merged; skipped")
        else:
            views = ", ".join(
                f"{v} v{n} -> {ws.publishers[v].root / str(n)}" if n is not None else f"{v} unchanged"
                for v, n in res.versions.items()
            )
            print(f"merged {path} as step {res.step} (expert {res.expert_id[:12]}, {res.seconds:.2f}s): {views}")
        out.append({"path": str(path), "status": res.status, "id": res.expert_id, "step": res.step, "versions": res.versions})
    if args.json:
        print(json.dumps(out, indent=2))
    return 1 if failed else 0


def status_data(settings) -> dict:
    """Queue, experts with their statuses and reasons, last steps, current versions (DESIGN §3.6).

    The ledger is the source of truth when the daemon has run; a workspace used only by the batch
    CLI has none, and its committed state says what was merged."""
    from mergewatch.daemon.ledger import Ledger
    from mergewatch.deploy.publisher import Publisher
    from mergewatch.strategies.state import StateStore

    root = Path(settings.workspace)
    data: dict = {"workspace": str(root), "policy": {"init": settings.policy.init, "deploy": settings.policy.deploy}}
    for view in ("deploy", "init"):
        pub = Publisher(root / view, keep=settings.publish.keep)
        data[view] = {"current": pub.current(), "versions": pub.versions()}
    snap = StateStore(root / "state").latest() if (root / "state").is_dir() else None
    data["step"] = snap.t if snap else 0
    ledger_path = root / "ledger.sqlite"
    if ledger_path.is_file():
        led = Ledger(ledger_path, readonly=True)
        try:
            data["queue"] = led.queue_depth()
            data["counts"] = led.counts()
            data["experts"] = [e.public() for e in led.experts()]
            data["steps"] = led.steps(limit=10)
        finally:
            led.close()
    else:
        experts = []
        if snap is not None:
            names = snap.record.get("expert_names", [])
            for i, sha in enumerate(snap.expert_ids):
                experts.append({"id": sha, "name": names[i] if i < len(names) else "", "status": "merged", "reason": "", "step": i + 1})
        data["queue"] = 0
        data["experts"] = experts
        data["steps"] = []
    data["rejected"] = [e for e in data["experts"] if e["status"] == "rejected"]
    return data


def cmd_status(args) -> int:
    from mergewatch import config

    data = status_data(config.load(args.config))
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"workspace {data['workspace']}  policy init={data['policy']['init']} deploy={data['policy']['deploy']}  step {data['step']}")
    for view in ("deploy", "init"):
        print(f"  {view}: current {data[view]['current']}  versions {data[view]['versions']}")
    print(f"  queue: {data['queue']}")
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

    settings = config.load(args.config)
    pub = Publisher(Path(settings.workspace) / args.view, keep=settings.publish.keep)
    new = pub.rollback(args.version, reason=args.reason)
    ledger_path = Path(settings.workspace) / "ledger.sqlite"
    if ledger_path.is_file():  # the ledger is the record of what happened, rollbacks included
        from mergewatch.daemon.ledger import Ledger

        led = Ledger(ledger_path)
        try:
            led.record_version(args.view, new, pub.manifest(new).get("step", 0), note=f"rollback of {args.version}: {args.reason}")
        finally:
            led.close()
    print(f"{args.view}: version {args.version} republished as {new} (now current)")
    return 0


def cmd_run(args) -> int:
    from mergewatch.daemon.service import run

    return run(args.config)


def cmd_submit(args) -> int:
    from mergewatch import config
    from mergewatch.daemon.inbox import submit

    settings = config.load(args.config)
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
    from mergewatch.demo import run_demo

    return run_demo(Path(args.workdir) if args.workdir else None, n_experts=args.experts)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mergewatch", description="Continual model merging: merge experts as they arrive and publish the result.")
    p.add_argument("--version", action="version", version=f"mergewatch {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("merge", help="merge experts step by step with the configured policy and publish each step")
    m.add_argument("--config", required=True, help="TOML configuration file")
    m.add_argument("experts", nargs="+", help="expert checkpoints (.safetensors files, sharded dirs, or a folder of them)")
    m.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    m.add_argument("--quiet", action="store_true", help="no progress output even on a terminal")
    m.set_defaults(func=cmd_merge)

    s = sub.add_parser("status", help="current versions and merged experts")
    s.add_argument("--config", required=True)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    r = sub.add_parser("rollback", help="republish an old version as a new, current one")
    r.add_argument("--config", required=True)
    r.add_argument("version", type=int)
    r.add_argument("--view", choices=("deploy", "init"), default="deploy")
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

    d = sub.add_parser("demo", help="generate a tiny open_clip base and experts, merge them, show what was published")
    d.add_argument("--workdir", help="where to put the demo (default: ./demo-workspace)")
    d.add_argument("--experts", type=int, default=3)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
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
