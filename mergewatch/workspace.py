"""One workspace, one policy: validate an expert, run its step, commit the state, publish the views.

This is the single code path of a merge step, shared by the batch CLI (``mergewatch merge``) and the
daemon's worker (DESIGN §1): validate → claim into the store → strategy step (streamed) → commit
``state/<t>/`` atomically → publish ``deploy/`` and ``init/`` → retention. Every stage is
idempotent from the committed state: re-opening a workspace after a crash finishes publishing the
newest committed step (publishing is keyed by step, so it never happens twice) and clears staging
leftovers; an interrupted step simply has no committed state and is run again.

The workspace also keeps a step's books: its ledger rows (``ledger.sqlite``, :mod:`mergewatch.ledger`)
are written here only, ``step_started`` → ``step_done`` → ``merged`` in ``_record_step``, for the
daemon's queued rows (``merge_row``: rows first, the step between them), for the batch CLI
(``record_merge``: the step first, its rows after it) and for committed steps the ledger does not
know yet (``reconcile``). The daemon and the CLI decide when, and print.

Workspace layout (DESIGN §3.6): ``inbox/ store/ rejected/ state/ deploy/ init/ ledger.sqlite``.
``base-view/`` holds θ0 re-laid-out for publishing, when the base's own files are not laid out as
the published views are (``base_files``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from mergewatch import __version__
from mergewatch.buffer.store import ExpertStore
from mergewatch.checkpoint.durable import atomic_write
from mergewatch.checkpoint.hashing import content_sha256
from mergewatch.checkpoint.reader import LazyCheckpoint
from mergewatch.checkpoint.roles import model_config, resolve_table
from mergewatch.checkpoint.validate import ExpertReport, check_expert
from mergewatch.checkpoint.writer import CheckpointWriter, FileLayout, TensorSpec, atomic_directory, clear_staging
from mergewatch.config import Settings
from mergewatch.deploy.companions import Companions, discover
from mergewatch.deploy.publisher import Publisher
from mergewatch.engine import Progress, StateSnapshot, StateStore, build_model_info, run_prepare, run_step
from mergewatch.errors import CheckpointError, IncompatibleExpertError, MergewatchError, rejection
from mergewatch.faults import crash_point
from mergewatch.ledger import ExpertRow, Ledger
from mergewatch.state_records import StateError
from mergewatch.strategies import build_strategy
from mergewatch.strategies.base import VIEWS, BufferNeed, StepContext


class WorkspaceError(MergewatchError):
    pass


#: ``__metadata__`` of every published safetensors file, over the base's own: transformers reads
#: ``format`` (and many 4.x versions fail without it)
PUBLISHED_METADATA = {"format": "pt"}


@dataclass
class StepOutcome:
    #: "merged" | "duplicate" | "rejected" (``merge_row``: the row is marked rejected) |
    #: "caught_up" (``merge_row``: committed before a crash, now published and marked merged)
    status: str
    expert_id: str
    name: str
    step: int | None = None
    versions: dict[str, int | None] = field(default_factory=dict)  # view -> version published now (None: unchanged)
    seconds: float = 0.0  # the whole step
    merge_seconds: float = 0.0  # strategy step + state commit
    publish_seconds: float = 0.0
    #: the prepared sets of the previous state: "used", "none" (nothing prepared: computed in the
    #: step) or "unusable: <reason>" (ignored and removed; computed in the step)
    prepared: str = "none"
    reason: str = ""  # a rejection's full reason, its class (errors.REJECT_CLASSES) and every problem
    reason_class: str = ""
    problems: list[str] = field(default_factory=list)
    engine: dict = field(default_factory=dict)  # how the step ran (engine.steps.StepResult.engine)


@dataclass
class PrepareOutcome:
    step: int  # the committed step the sets were prepared from (for step + 1)
    sets: dict[str, str]  # prepared set -> content sha256
    seconds: float
    bytes_written: int
    engine: dict = field(default_factory=dict)  # how it ran (engine.steps.PrepareResult.engine)


class Workspace:
    def __init__(self, settings: Settings, *, progress: Progress | None = None):
        self.settings = settings
        self.root = Path(settings.workspace)
        for sub in ("inbox", "store", "rejected", "state", "deploy", "init"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.progress = progress
        self.base = LazyCheckpoint(settings.base)
        self.table = resolve_table(settings.model.architecture, list(self.base), list(settings.model.roles),
                                   model_config(settings.base, settings.model.config))
        self.model_info = build_model_info(self.base, self.table)
        #: how every file of a step is laid out: as the base (its shards, or one file) unless
        #: ``publish.shard_bytes`` says otherwise, with the base's header metadata + ``format: pt``
        self.layout = FileLayout.of(self.base, shard_bytes=settings.publish.shard_bytes,
                                    metadata={**self.base.header_metadata, **PUBLISHED_METADATA})
        self.strategy = build_strategy(settings.policy)
        #: treatment -> kind -> tensors (``Strategy.check_model``: refuses a model the method would
        #: leave as it is); in every MANIFEST and step record, and the daemon's ready log line
        self.treated = self.strategy.check_model(self.model_info)
        self.states = StateStore(self.root / "state")
        self.store = ExpertStore(self.root / "store")
        self.publishers = {v: Publisher(self.root / v, keep=settings.publish.keep) for v in VIEWS}
        m = settings.model
        self.companions = Companions(self.root / "companions", discover(Path(settings.base), m.companions, m.config))
        self._base_sha: str | None = None
        self._ledger: Ledger | None = None

    @property
    def gated(self) -> bool:
        """A deploy gate is configured: publishing a deploy version does not make it current."""
        ev = getattr(self.settings, "eval", None)
        return ev is not None and ev.gate_max_drop is not None

    # Identity ---------------------------------------------------------------------------------
    @property
    def base_sha256(self) -> str:
        """Content hash of θ0, cached in ``base.json`` keyed by path, size and mtime."""
        if self._base_sha is None:
            cache = self.root / "base.json"
            stamp = _stamp(self.base)
            try:
                data = json.loads(cache.read_text("utf-8"))
                if data.get("stamp") == stamp:
                    self._base_sha = data["content_sha256"]
            except (OSError, ValueError, KeyError):
                pass
            if self._base_sha is None:
                self._base_sha = content_sha256(self.base)
                atomic_write(cache, json.dumps({"stamp": stamp, "content_sha256": self._base_sha}))
        return self._base_sha

    def fingerprint(self) -> dict:
        """What a committed state depends on: resuming with a different one would be wrong."""
        return {
            "strategy": self.strategy.describe(),
            "base_sha256": self.base_sha256,
            "seed": self.settings.seed,
            "architecture": self.table.name,
        }

    # Steps ------------------------------------------------------------------------------------
    def latest(self) -> StateSnapshot | None:
        snap = self.states.latest()
        if snap is not None and snap.record.get("fingerprint") != self.fingerprint():
            raise WorkspaceError(
                f"{self.root}: the committed state was produced with a different policy, base, seed or architecture "
                f"({json.dumps(snap.record.get('fingerprint'), sort_keys=True)[:300]}); use a new workspace for a new policy"
            )
        return snap

    def merged_ids(self) -> list[str]:
        snap = self.latest()
        return snap.expert_ids if snap else []

    def validate(self, path: str | os.PathLike) -> tuple[LazyCheckpoint, ExpertReport]:
        """Open and fully check an expert against θ0 (raises CheckpointError/IncompatibleExpertError)."""
        ckpt = LazyCheckpoint(path)
        return ckpt, check_expert(ckpt, self.base, self.settings.model.dtype_policy)

    def check(self, path: str | os.PathLike) -> tuple[str, int | None]:
        """Validate an expert (``validate``: raises CheckpointError/IncompatibleExpertError) and look it
        up in the committed state, the truth about what is merged: ``(content id, the step that
        merged the same content or None)``."""
        _, report = self.validate(path)
        sha = report.content_sha256
        merged = self.merged_ids()
        return sha, (merged.index(sha) + 1 if sha in merged else None)

    def merge(self, path: str | os.PathLike, *, name: str | None = None, move: bool = False) -> StepOutcome:
        """Validate, store, merge and publish one expert (no ledger rows: ``record_merge``)."""
        path = Path(path)
        name = name or path.name
        sha, merged_at = self.check(path)
        if merged_at is not None:
            return StepOutcome("duplicate", sha, name)
        self.store.claim(path, sha, move=move)
        return self.step(sha, name)

    def step(self, expert_id: str, name: str) -> StepOutcome:
        """Merge a stored expert as the next step, commit, publish and apply retention."""
        t_start = time.monotonic()
        prev = self.latest()
        t = (prev.t if prev else 0) + 1
        expert_ids = (prev.expert_ids if prev else []) + [expert_id]
        names = (prev.record.get("expert_names", []) if prev else []) + [name]
        need_all = self.strategy.buffer_need() is BufferNeed.ALL
        experts = [self.store.open(i) for i in (expert_ids if need_all else [expert_id])]
        prev_sets = prev.sets() if prev else {}
        prepared = "none"
        if prev is not None and self.strategy.prepared_sets(prev.t):
            try:
                ahead = prev.prepared()
            except StateError as e:  # a cache: computed in the step instead
                prepared = f"unusable: {e}"
                self.states.drop_prepared(prev.t)
            else:
                if ahead:
                    prepared = "used"
                    try:
                        engine = self._run_and_commit(t, expert_ids, names, experts, prev, {**prev_sets, **ahead})
                    except (MergewatchError, OSError, ValueError) as e:
                        # e.g. a prepared file damaged inside its data: never the expert's fault.
                        # Run again without it; an error that is not the cache's comes back then.
                        prepared = f"unusable: {type(e).__name__}: {e}"
                        self.states.drop_prepared(prev.t)
        if prepared != "used":
            engine = self._run_and_commit(t, expert_ids, names, experts, prev, prev_sets)
        crash_point("after_commit")
        t_pub = time.monotonic()
        versions = self.publish(t)
        t_end = time.monotonic()
        self.apply_retention()
        return StepOutcome("merged", expert_id, name, t, versions, time.monotonic() - t_start, t_pub - t_start, t_end - t_pub, prepared,
                           engine=engine)

    def _run_and_commit(self, t: int, expert_ids: list[str], names: list[str], experts: list, prev: StateSnapshot | None,
                        prev_sets: dict) -> dict:
        """Run step ``t`` into a staging directory and commit it as ``state/<t>/``; returns how the
        engine ran it (``StepResult.engine``)."""
        ctx = StepContext(t=t, seed=self.settings.seed, expert_ids=expert_ids, model=self.model_info, meta=prev.meta if prev else {})
        with self.states.staging(t) as stage:
            result = run_step(
                self.strategy,
                ctx,
                self.base,
                experts,
                prev_sets,
                stage,
                layout=self.layout,
                progress=self._progress,
                threads=self.settings.engine.threads,
                engine=self.settings.engine,
            )
            self.states.write_record(
                stage,
                {
                    "t": t,
                    "expert_ids": expert_ids,
                    "expert_names": names,
                    "meta": result.meta,
                    "sets": result.sets,
                    "views": result.views,
                    "fingerprint": self.fingerprint(),
                    "treated": self.treated,
                    "created_at": _now(),
                    "seconds": round(result.seconds, 6),
                    "mergewatch": __version__,
                },
            )
        return result.engine

    def prepare_due(self) -> bool:
        """The newest committed state has sets to prepare for the next step and they are not there."""
        snap = self.latest()
        return snap is not None and bool(self.strategy.prepared_sets(snap.t)) and not (snap.prepared_dir / "prepared.json").is_file()

    def prepare(self, *, progress: Progress | None = None) -> PrepareOutcome | None:
        """Compute the newest committed state's prepared sets ahead of the next expert (strategies/
        base.py, "Prepared sets"): the daemon does this when idle after publishing, so that the
        next step's latency does not include it. ``None`` when there is nothing to prepare or it is
        already done. An unusable leftover is replaced. Results of the next step are the same with
        or without it."""
        snap = self.latest()
        if snap is None or not self.strategy.prepared_sets(snap.t):
            return None
        if snap.prepared_dir.exists():
            try:
                if snap.prepared():
                    return None
            except StateError:
                pass
            self.states.drop_prepared(snap.t)
        ctx = StepContext(t=snap.t, seed=self.settings.seed, expert_ids=snap.expert_ids, model=self.model_info, meta=snap.meta)

        def tick(label: str, pass_no: int, n_passes: int, done: int, total: int) -> None:
            if done == total // 2:
                crash_point("mid_prepare")
            if progress is not None:
                progress(label, pass_no, n_passes, done, total)

        with self.states.prepare_staging(snap.t) as stage:
            res = run_prepare(self.strategy, ctx, self.base, snap.sets(), stage,
                              layout=self.layout, progress=tick,
                              threads=self.settings.engine.threads, engine=self.settings.engine)
            self.states.write_prepared_record(stage, snap, res.sets, res.seconds)
        return PrepareOutcome(snap.t, res.sets, res.seconds, res.bytes_written, res.engine)

    def _progress(self, label: str, pass_no: int, n_passes: int, done: int, total: int) -> None:
        if done == total // 2:
            crash_point("mid_step")  # fault injection (tests): a kill with the state half written
        if self.progress is not None:
            self.progress(label, pass_no, n_passes, done, total)

    # Publishing -------------------------------------------------------------------------------
    def publish(self, t: int) -> dict[str, int | None]:
        """Publish both views of committed step ``t`` (idempotent: keyed by step and experts)."""
        snap = self.states.load(t)
        out: dict[str, int | None] = {}
        companions = self.companions.snapshot()  # the model's configuration, tokenizer, ... (deploy/companions.py)
        for view in VIEWS:
            info = snap.record["views"][view]
            pub = self.publishers[view]
            if info["source"] == "base":
                content, step, key = self.base_sha256, 0, "base"
            else:
                content, step, key = info["content_sha256"], t, publish_key(snap.expert_ids, t)
            existing = pub.find(key)
            if existing is not None:
                out[view] = existing
                continue
            if view == "init" and pub.current_content_sha256() == content:
                out[view] = None  # SPEC §1.2: a new init version only when its content changes
                continue
            if info["source"] == "base":
                files, file_hashes = self.base_files(), None
            else:
                d = snap.view_dir(view)
                files = {f.name: d / f.name for f in sorted(d.iterdir()) if f.is_file()}
                file_hashes = info["files"]
            manifest = {
                "view": view,
                "step": step,
                "state_version": t,
                "experts": snap.expert_ids[:step],
                "expert_names": snap.record.get("expert_names", [])[:step],
                "policy": self.strategy.describe(),
                "base_sha256": self.base_sha256,
                "content_sha256": content,
                "seed": self.settings.seed,
                "architecture": self.table.name,
                "treated": self.treated,
                "mergewatch": __version__,
            }
            files.update({name: stored for name, (stored, _) in companions.items()})
            manifest["companions"] = {name: sha for name, (_, sha) in companions.items()}
            if file_hashes is not None:
                manifest["files"] = {**file_hashes, **manifest["companions"]}
            # With a deploy gate, a new deploy version becomes current only after its evaluation.
            out[view] = pub.publish(files, manifest, key=key, make_current=not (view == "deploy" and self.gated))
            crash_point("mid_publish")
        return out

    def base_files(self) -> dict[str, Path]:
        """θ0 as the files of a published view (init ``zs``, a method's init): the base's own files
        when they are laid out as ``self.layout`` says, else a copy in that layout, written once
        under ``base-view/`` (streamed tensor by tensor). Either way both views of a workspace have
        the same file names, shard boundaries and metadata."""
        if self.layout.describes(self.base):
            return _checkpoint_files(self.base)
        digest = hashlib.sha256(repr(self.layout).encode()).hexdigest()[:16]
        d = self.root / "base-view" / f"{self.base_sha256[:16]}-{digest}"
        if not d.is_dir():
            specs = [TensorSpec(n, self.base.info(n).torch_dtype, self.base.info(n).shape) for n in self.base]
            with atomic_directory(d) as stage:
                w = CheckpointWriter(stage, specs, layout=self.layout)
                for s in w.specs:
                    w.write(s.name, self.base[s.name])
                w.close()
        return {f.name: f for f in sorted(d.iterdir()) if f.is_file()}

    def recover(self) -> dict:
        """Clear staging leftovers everywhere and finish publishing the newest committed step."""
        report = {"state_staging": self.states.recover(), "store_staging": self.store.recover(),
                  "base_view_staging": clear_staging(self.root / "base-view" / ".staging")}
        for view, pub in self.publishers.items():
            report[f"{view}_recover"] = pub.recover()
        snap = self.latest()
        if snap is not None:
            report["published"] = self.publish(snap.t)
        return report

    def apply_retention(self, keep_ids: set[str] | None = None) -> None:
        """Keep the last ``publish.keep_states`` states, ``publish.keep`` versions per view and the
        experts ``buffer.keep_experts`` says (buffer/store.py). ``keep_ids``: experts that must stay
        too (e.g. queued, not merged yet)."""
        self.states.retain(self.settings.publish.keep_states)
        keep = self.settings.buffer.keep_experts
        if keep != "all":
            merged = self.merged_ids()
            need = set(keep_ids or ())
            if self.strategy.buffer_need() is BufferNeed.ALL:
                need |= set(merged)
            if keep != "needed" and keep > 0:
                need |= set(merged[-keep:])
            self.store.retain(need)
        for pub in self.publishers.values():
            pub.retain()

    # Bookkeeping: the ledger -------------------------------------------------------------------
    @property
    def ledger(self) -> Ledger:
        """The workspace's ledger, opened on first use (a workspace that only merges has none)."""
        if self._ledger is None:
            self._ledger = Ledger(self.root / "ledger.sqlite")
        return self._ledger

    def close(self) -> None:
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None

    def merge_row(self, row: ExpertRow, src: Path, *, sidecar: Path | None = None,
                  started: Callable[[int], None] | None = None) -> StepOutcome:
        """The daemon's step of a ``merging`` row (content id known), its rows around it: claim the
        drop into the store (moved from ``src`` unless stored already; ``sidecar`` moved beside it)
        → ``step_started`` → ``started(step)`` → :meth:`step` → ``step_done``, ``merged``, with the
        crash points of faults.py between. A row committed before a crash is only published and
        marked merged (``caught_up``); a drop neither stored nor in the inbox (``vanished``) or one
        the strategy refuses (``step_failed``) is marked rejected with the full reason."""
        sha = row.id
        merged = self.merged_ids()
        if sha in merged:  # committed before a crash: only the ledger is behind
            step = merged.index(sha) + 1
            self.publish(step)
            self._catch_up(row.seq, merged, step)
            return StepOutcome("caught_up", sha, row.name, step)
        crash_point("before_claim")
        if not self.store.has(sha):
            if not src.exists():
                return self.reject_row(row, "vanished", "lost: neither in the store nor in the inbox")
            self.store.claim(src, sha, move=True)
        if sidecar is not None:
            self.store.keep_sidecar(sha, sidecar)  # moved beside the expert: a user's file is never deleted
        crash_point("after_claim")
        step = len(merged) + 1

        def run() -> StepOutcome:
            if started is not None:
                started(step)
            try:
                return self.step(sha, row.name)
            except (CheckpointError, IncompatibleExpertError) as e:
                _, full, problems = rejection(e)
                return self.reject_row(row, "step_failed", f"step failed: {full}", problems)

        return self._record_step(row.seq, sha, step, run)

    def record_merge(self, path: str | os.PathLike, meta: dict) -> StepOutcome:
        """The batch CLI's step: :meth:`merge` (a copy of ``path`` is stored), then its rows. They
        come after the step, so an interrupted batch leaves no row behind and never a ``merging``
        row naming the user's file; ``reconcile`` records a committed step whose rows are missing."""
        path = Path(path)
        res = self.merge(path)
        if res.status == "merged":
            self._record_merged(res, str(path), meta)
        return res

    def reconcile(self) -> list[tuple[int, str, int]]:
        """Bring the ledger up to the committed state: a ``merging`` row whose expert is committed
        (a crash between the commit and the rows) is marked merged; a committed step that no row
        knows (a batch run stopped before recording it) gets its rows. Returns ``(seq, expert id,
        step)`` of every row marked or added."""
        snap = self.latest()
        if snap is None:
            return []
        merged = snap.expert_ids
        out = []
        for row in self.ledger.experts("merging"):
            if row.id in merged:
                step = merged.index(row.id) + 1
                self._catch_up(row.seq, merged, step)
                out.append((row.seq, row.id, step))
        known = {e.id for e in self.ledger.experts("merged")}
        names = snap.record.get("expert_names", [])
        for t, sha in enumerate(merged, 1):
            if sha not in known:
                name = names[t - 1] if t - 1 < len(names) else sha[:12]
                versions = {v: pub.find(publish_key(merged, t)) for v, pub in self.publishers.items()}
                out.append((self._record_merged(StepOutcome("merged", sha, name, t, versions), name, {}), sha, t))
        return out

    def _catch_up(self, seq: int, merged: list[str], step: int) -> None:
        """The rows of a step committed and published before a crash left the ledger behind (e.g.
        a kill at ``after_step``): ``step_done`` with the versions its publish key finds (so the
        version is booked and gets evaluated), then ``merged``. Idempotent."""
        versions = {v: pub.find(publish_key(merged, step)) for v, pub in self.publishers.items()}
        contents = {v: self.publishers[v].manifest(n).get("content_sha256") for v, n in versions.items() if n is not None}
        seconds = float(self.states.load(step).record.get("seconds", 0.0)) if step in self.states.steps() else 0.0
        self.ledger.step_done(step, merge_seconds=seconds, versions=versions, contents=contents)
        self.ledger.set_status(seq, "merged", step=step)

    def reject_row(self, row: ExpertRow, reason_class: str, reason: str, problems: list[str] | None = None) -> StepOutcome:
        """Mark a row rejected, keeping the full reason, its class and every problem."""
        problems = problems if problems is not None else [reason]
        self.ledger.set_status(row.seq, "rejected", reason=reason, reason_class=reason_class, problems=problems)
        return StepOutcome("rejected", row.id or "", row.name, reason=reason, reason_class=reason_class, problems=problems)

    def _record_merged(self, outcome: StepOutcome, source: str, meta: dict) -> int:
        """Rows for a step merged outside the queue (batch, reconcile): a new row → ``merging`` → the
        step's rows; returns the row's ``seq``."""
        seq = self.ledger.add_drop(outcome.name, source, outcome.expert_id, meta)
        self.ledger.set_status(seq, "merging", id=outcome.expert_id)
        self._record_step(seq, outcome.expert_id, outcome.step, lambda: outcome)
        return seq

    def _record_step(self, seq: int, expert_id: str, step: int, run: Callable[[], StepOutcome]) -> StepOutcome:
        """The one place a step's rows are written: ``step_started`` → ``run()`` → (crash point
        ``after_step``: published, the ledger not updated yet) → ``step_done`` with the versions
        published and their contents → ``merged``."""
        self.ledger.step_started(step, expert_id, seq)
        outcome = run()
        if outcome.status != "merged":
            return outcome
        crash_point("after_step")
        versions = outcome.versions
        contents = {v: self.publishers[v].manifest(n).get("content_sha256") for v, n in versions.items() if n is not None}
        self.ledger.step_done(step, merge_seconds=outcome.merge_seconds, versions=versions, contents=contents)
        self.ledger.set_status(seq, "merged", step=step)
        return outcome


def publish_key(expert_ids: list[str], t: int) -> str:
    """The publish key of step ``t``'s versions (keyed by step and the experts merged so far)."""
    return f"step-{t}-{hashlib.sha256(chr(10).join(expert_ids[:t]).encode()).hexdigest()[:16]}"


def _checkpoint_files(ckpt: LazyCheckpoint) -> dict[str, Path]:
    """Published file names for a checkpoint given by the user (the base, for init ``zs``)."""
    if ckpt.index_path is None:
        return {"model.safetensors": ckpt.files[0]}
    files = {f.name: f for f in ckpt.files}
    files["model.safetensors.index.json"] = ckpt.index_path
    return files


def _stamp(ckpt: LazyCheckpoint) -> list:
    return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in ckpt.files]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")

