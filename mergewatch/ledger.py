"""The ledger: SQLite in WAL mode, the single source of truth for what happened (DESIGN §3.3).

Tables: ``experts`` (one row per drop, in arrival order ``seq``; ``id`` is the content sha256 once
known), ``steps`` (one row per merge step), ``versions`` (published versions per view),
``evaluations`` and ``events`` (an append-only log of every state change). The schema is versioned
with ``PRAGMA user_version`` and upgraded by the ordered ``MIGRATIONS`` on open.

A library beside the workspace, not part of the daemon: it imports only the standard library (the
light CLI verbs use it without torch). Who writes, one writer at a time: the workspace's bookkeeping
(``Workspace.merge_row``, ``record_merge``, ``reconcile``: a step's rows are written there only) on
behalf of the daemon's loop or the batch CLI (``mergewatch merge``/``eval``), the evaluation book
(``eval/book.py``) for evaluations and gate decisions, and the light verbs ``promote`` and
``rollback`` for one event or version row each. Readers (``mergewatch status``, ``mergewatch
report``) use :meth:`Ledger.snapshot`: a read-only connection whose reads all happen in one read
transaction, a consistent state that WAL lets them see while a writer goes on.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

STATUSES = ("queued", "merging", "merged", "rejected", "duplicate")

MIGRATIONS: list[str] = [
    # 1: initial schema
    """
    CREATE TABLE experts (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT,
        name TEXT NOT NULL,
        source TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('queued','merging','merged','rejected','duplicate')),
        reason TEXT NOT NULL DEFAULT '',
        step INTEGER,
        meta TEXT NOT NULL DEFAULT '{}',
        received_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX experts_status ON experts(status, seq);
    CREATE INDEX experts_id ON experts(id);
    CREATE TABLE steps (
        step INTEGER PRIMARY KEY,
        expert_id TEXT NOT NULL,
        expert_seq INTEGER NOT NULL,
        started_at REAL NOT NULL,
        committed_at REAL,
        published_at REAL,
        merge_seconds REAL,
        deploy_version INTEGER,
        init_version INTEGER
    );
    CREATE TABLE versions (
        view TEXT NOT NULL,
        version INTEGER NOT NULL,
        step INTEGER NOT NULL,
        content_sha256 TEXT,
        created_at REAL NOT NULL,
        note TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (view, version)
    );
    CREATE TABLE evaluations (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        view TEXT NOT NULL,
        version INTEGER NOT NULL,
        step INTEGER,
        metrics TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts REAL NOT NULL,
        kind TEXT NOT NULL,
        expert_seq INTEGER,
        expert_id TEXT,
        step INTEGER,
        version INTEGER,
        data TEXT NOT NULL DEFAULT '{}'
    );
    """,
    # 2: the class of a rejection (a bounded set, errors.REJECT_CLASSES) and every problem (JSON list)
    """
    ALTER TABLE experts ADD COLUMN reason_class TEXT NOT NULL DEFAULT '';
    ALTER TABLE experts ADD COLUMN problems TEXT NOT NULL DEFAULT '[]';
    """,
]


@dataclass
class ExpertRow:
    seq: int
    id: str | None
    name: str
    source: str
    fingerprint: str
    status: str
    reason: str
    step: int | None
    meta: dict
    received_at: float  # first seen in the inbox (batch: when the step began)
    updated_at: float
    reason_class: str = ""  # errors.REJECT_CLASSES for a rejected row, else ""
    problems: list = field(default_factory=list)  # every problem of a rejection, in full

    def public(self) -> dict:
        return {"seq": self.seq, "id": self.id, "name": self.name, "status": self.status, "reason": self.reason,
                "reason_class": self.reason_class, "problems": self.problems, "step": self.step}


class Ledger:
    def __init__(self, path: str | Path, *, readonly: bool = False):
        self.path = Path(path)
        if readonly:
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)
        else:
            self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
        self.db.row_factory = sqlite3.Row
        if not readonly:
            self._migrate()

    def close(self) -> None:
        self.db.close()

    @classmethod
    @contextmanager
    def snapshot(cls, path: str | Path) -> Iterator["Ledger"]:
        """The ledger opened read-only, every read inside one read transaction: one consistent
        state, while a writer may go on (WAL). Closed on exit; its write methods fail."""
        led = cls(path, readonly=True)
        try:
            led.db.execute("BEGIN")  # deferred: the snapshot is taken at the first read
            try:
                yield led
            finally:
                led.db.execute("COMMIT")
        finally:
            led.close()

    # Schema ----------------------------------------------------------------------------------
    @property
    def schema_version(self) -> int:
        return self.db.execute("PRAGMA user_version").fetchone()[0]

    def _migrate(self) -> None:
        v = self.schema_version
        if v > len(MIGRATIONS):
            raise RuntimeError(f"{self.path}: ledger schema {v} is newer than this mergewatch ({len(MIGRATIONS)})")
        for i in range(v, len(MIGRATIONS)):
            # One transaction per migration (SQLite DDL is transactional): all of it or nothing.
            self.db.executescript("BEGIN IMMEDIATE;" + MIGRATIONS[i] + f";PRAGMA user_version={i + 1};COMMIT;")

    def tx(self):
        return _Tx(self.db)

    # Experts ---------------------------------------------------------------------------------
    def add_drop(self, name: str, source: str, fingerprint: str, meta: dict | None = None, *, received_at: float | None = None) -> int:
        """A new queued row; ``received_at`` is when the drop was first seen (default: now)."""
        now = time.time()
        with self.tx():
            cur = self.db.execute(
                "INSERT INTO experts(name, source, fingerprint, status, meta, received_at, updated_at) VALUES (?,?,?,?,?,?,?)",
                (name, source, fingerprint, "queued", json.dumps(meta or {}), received_at or now, now),
            )
            seq = cur.lastrowid
            self._event("queued", seq, None, data={"name": name})
        return seq

    def is_pending_source(self, source: str) -> bool:
        """A drop at this inbox path is queued or being merged (so a rescan must not add it again)."""
        r = self.db.execute("SELECT 1 FROM experts WHERE source=? AND status IN ('queued','merging') LIMIT 1", (source,)).fetchone()
        return r is not None

    def next_queued(self) -> ExpertRow | None:
        r = self.db.execute("SELECT * FROM experts WHERE status IN ('merging','queued') ORDER BY (status='merging') DESC, seq LIMIT 1").fetchone()
        return _row(r) if r else None

    def get(self, seq: int) -> ExpertRow:
        return _row(self.db.execute("SELECT * FROM experts WHERE seq=?", (seq,)).fetchone())

    def experts(self, status: str | None = None, limit: int | None = None) -> list[ExpertRow]:
        q = "SELECT * FROM experts" + (" WHERE status=?" if status else "") + " ORDER BY seq" + (f" LIMIT {int(limit)}" if limit else "")
        return [_row(r) for r in self.db.execute(q, (status,) if status else ())]

    def queue_depth(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM experts WHERE status IN ('queued','merging')").fetchone()[0]

    def set_status(self, seq: int, status: str, *, id: str | None = None, reason: str | None = None, step: int | None = None,
                   meta: dict | None = None, reason_class: str | None = None, problems: list[str] | None = None) -> None:
        """Move a row to ``status``; a rejection keeps its full ``reason``, its class and every problem."""
        assert status in STATUSES
        sets, args = ["status=?", "updated_at=?"], [status, time.time()]
        for col, val in (("id", id), ("reason", reason), ("step", step), ("reason_class", reason_class)):
            if val is not None:
                sets.append(f"{col}=?")
                args.append(val)
        for col, obj in (("meta", meta), ("problems", problems)):
            if obj is not None:
                sets.append(f"{col}=?")
                args.append(json.dumps(obj))
        data = {k: v for k, v in (("reason", reason), ("reason_class", reason_class)) if v}
        with self.tx():
            self.db.execute(f"UPDATE experts SET {', '.join(sets)} WHERE seq=?", (*args, seq))
            self._event(status, seq, id, step=step, data=data)

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in STATUSES}
        for r in self.db.execute("SELECT status, COUNT(*) FROM experts GROUP BY status"):
            out[r[0]] = r[1]
        return out

    # Steps and versions ----------------------------------------------------------------------
    def step_started(self, step: int, expert_id: str, seq: int) -> None:
        with self.tx():
            self.db.execute(
                "INSERT OR REPLACE INTO steps(step, expert_id, expert_seq, started_at) VALUES (?,?,?,?)", (step, expert_id, seq, time.time())
            )
            self._event("step_started", seq, expert_id, step=step)

    def step_done(self, step: int, *, merge_seconds: float, versions: dict[str, int | None], contents: dict[str, str | None]) -> None:
        now = time.time()
        with self.tx():
            self.db.execute(
                "UPDATE steps SET committed_at=COALESCE(committed_at, ?), published_at=?, merge_seconds=?, deploy_version=?, init_version=? WHERE step=?",
                (now, now, merge_seconds, versions.get("deploy"), versions.get("init"), step),
            )
            for view, v in versions.items():
                if v is not None:
                    self.db.execute(
                        "INSERT OR IGNORE INTO versions(view, version, step, content_sha256, created_at) VALUES (?,?,?,?,?)",
                        (view, v, step, contents.get(view), now),
                    )
            self._event("published", None, None, step=step, version=versions.get("deploy"), data={"versions": versions})

    def record_version(self, view: str, version: int, step: int, note: str = "") -> None:
        with self.tx():
            self.db.execute(
                "INSERT OR IGNORE INTO versions(view, version, step, created_at, note) VALUES (?,?,?,?,?)", (view, version, step, time.time(), note)
            )
            self._event("version", None, None, step=step, version=version, data={"view": view, "note": note})

    def record_event(self, kind: str, *, step: int | None = None, version: int | None = None, data: dict | None = None) -> None:
        """Append an event that belongs to no expert row (deploy gate decisions, promotions)."""
        with self.tx():
            self._event(kind, None, None, step=step, version=version, data=data)

    def events(self, kind: str | None = None) -> list[dict]:
        q = "SELECT * FROM events" + (" WHERE kind=?" if kind else "") + " ORDER BY id"
        return [{**dict(r), "data": json.loads(r["data"] or "{}")} for r in self.db.execute(q, (kind,) if kind else ())]

    def steps(self, limit: int = 10) -> list[dict]:
        return [dict(r) for r in self.db.execute("SELECT * FROM steps ORDER BY step DESC LIMIT ?", (limit,))]

    # Evaluations ----------------------------------------------------------------------------
    def add_evaluation(self, view: str, version: int, step: int | None, metrics: dict) -> int:
        """Record one evaluation of a published version (issue 9); returns the row id.

        ``metrics`` is stored as JSON (the evaluation-row schema of the eval contract); an
        ``evaluated`` event carries the view, status and ACC so the event log alone tells the story.
        """
        with self.tx():
            cur = self.db.execute(
                "INSERT INTO evaluations(view, version, step, metrics, created_at) VALUES (?,?,?,?,?)",
                (view, version, step, json.dumps(metrics), time.time()),
            )
            row_id = cur.lastrowid
            data = {"view": view, "evaluation": row_id, "status": metrics.get("status"), "acc": metrics.get("acc")}
            self._event("evaluated", None, None, step=step, version=version, data=data)
        return row_id

    def evaluations(self, view: str | None = None) -> list[dict]:
        """Every evaluation row (of one view, or all), ordered by id, ``metrics`` decoded from JSON.

        Rows are never updated: a retry is a new row, and the latest row per (view, version) wins.
        """
        q = "SELECT * FROM evaluations" + (" WHERE view=?" if view else "") + " ORDER BY id"
        out = []
        for r in self.db.execute(q, (view,) if view else ()):
            d = dict(r)
            d["metrics"] = json.loads(d["metrics"])
            out.append(d)
        return out

    def _event(self, kind: str, seq, expert_id, *, step=None, version=None, data=None) -> None:
        self.db.execute(
            "INSERT INTO events(ts, kind, expert_seq, expert_id, step, version, data) VALUES (?,?,?,?,?,?,?)",
            (time.time(), kind, seq, expert_id, step, version, json.dumps(data or {}, default=str)),
        )


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT (or ROLLBACK on error); nested use joins the outer transaction."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db
        self.outer = False

    def __enter__(self):
        if not self.db.in_transaction:
            self.db.execute("BEGIN IMMEDIATE")
            self.outer = True
        return self.db

    def __exit__(self, et, ev, tb):
        if self.outer:
            self.db.execute("COMMIT" if et is None else "ROLLBACK")
        return False


def _row(r: sqlite3.Row) -> ExpertRow:
    d = dict(r)
    d["meta"] = json.loads(d.get("meta") or "{}")
    d["problems"] = json.loads(d.get("problems") or "[]")
    return ExpertRow(**d)
