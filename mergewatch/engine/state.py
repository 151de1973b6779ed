"""Committed strategy state: ``state/<t>/`` directories written atomically (DESIGN §3.3).

A step's directory holds ``state.json`` (strategy fingerprint, t, expert ids, JSON meta, content
hashes of the tensor sets and views) beside the tensor sets and views written by
``steps.run_step``. It is produced in ``state/.staging/`` and renamed into place only when
complete, so the newest directory with a ``state.json`` is always a complete, durable state; a
later step is resumed from it exactly (sets are float32, so a resumed run is bit-identical to an
uninterrupted one).

``state/<t>/prepared/`` (optional, added atomically after the step is committed) holds the sets a
strategy prepared ahead from that state for step t+1 (``prepared.json`` + ``sets/<name>/``). It
is a cache: it is used only when its record matches the state it was computed from, and a missing
or unreadable one only means step t+1 computes the same tensors itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mergewatch.checkpoint.reader import LazyCheckpoint
from mergewatch.checkpoint.writer import atomic_directory, clear_staging, fsync_path
from mergewatch.errors import CheckpointError
from mergewatch.state_records import STATE_FORMAT, StateError, committed_steps, read_record

#: sub-directory of ``state/<t>/`` with the sets prepared ahead for step t+1 (a cache, base.py)
PREPARED = "prepared"


@dataclass
class StateSnapshot:
    t: int
    directory: Path
    record: dict  # the parsed state.json

    @property
    def expert_ids(self) -> list[str]:
        return list(self.record["expert_ids"])

    @property
    def meta(self) -> dict:
        return dict(self.record.get("meta", {}))

    def sets(self) -> dict[str, LazyCheckpoint]:
        return {name: LazyCheckpoint(self.directory / "sets" / name) for name in self.record.get("sets", {})}

    def view_dir(self, view: str) -> Path:
        return self.directory / "views" / view

    @property
    def prepared_dir(self) -> Path:
        return self.directory / PREPARED

    def prepared(self) -> dict[str, LazyCheckpoint]:
        """The sets prepared ahead from this state ({} when there are none). Raises StateError when
        the directory exists but cannot be used (unreadable, or computed from other state sets)."""
        d = self.prepared_dir
        if not d.exists():
            return {}
        try:
            record = json.loads((d / "prepared.json").read_text("utf-8"))
        except (OSError, ValueError) as e:
            raise StateError(f"{d}: unreadable prepared record: {e}") from e
        if record.get("format") != STATE_FORMAT or record.get("t") != self.t or record.get("state_sets") != self.record.get("sets"):
            raise StateError(f"{d}/prepared.json does not belong to the committed state of step {self.t}")
        try:
            return {name: LazyCheckpoint(d / "sets" / name) for name in record["sets"]}
        except (CheckpointError, OSError, KeyError, TypeError) as e:
            raise StateError(f"{d}: unusable prepared set: {e}") from e


class StateStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def steps(self) -> list[int]:
        return committed_steps(self.root)

    def latest(self) -> StateSnapshot | None:
        steps = self.steps()
        return self.load(steps[-1]) if steps else None

    def load(self, t: int) -> StateSnapshot:
        return StateSnapshot(t, self.root / str(t), read_record(self.root, t))

    @contextlib.contextmanager
    def staging(self, t: int) -> Iterator[Path]:
        """A staging directory that becomes ``state/<t>`` when the block succeeds."""
        with atomic_directory(self.root / str(t)) as stage:
            yield stage

    @contextlib.contextmanager
    def prepare_staging(self, t: int) -> Iterator[Path]:
        """A staging directory that becomes ``state/<t>/prepared`` when the block succeeds."""
        with atomic_directory(self.root / str(t) / PREPARED, staging_root=self.root / ".staging") as stage:
            yield stage

    @staticmethod
    def write_prepared_record(stage: Path, snap: StateSnapshot, sets: dict[str, str], seconds: float) -> None:
        record = {"format": STATE_FORMAT, "t": snap.t, "state_sets": snap.record.get("sets"), "sets": sets, "seconds": round(seconds, 6)}
        (stage / "prepared.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", "utf-8")

    def drop_prepared(self, t: int) -> None:
        """Remove ``state/<t>/prepared`` (e.g. an unusable one), atomically out of the way first."""
        d = self.root / str(t) / PREPARED
        if d.exists():
            self._bury(d, f"drop-prepared-{t}")
            fsync_path(d.parent)

    def _bury(self, d: Path, tomb_name: str) -> None:
        """Rename ``d`` into ``.staging`` (one atomic step: readers never see it half removed), then
        delete it; a crash in between leaves only staging leftovers, which ``recover`` clears."""
        tomb = self.root / ".staging" / tomb_name
        tomb.parent.mkdir(exist_ok=True)
        shutil.rmtree(tomb, ignore_errors=True)
        os.rename(d, tomb)
        shutil.rmtree(tomb, ignore_errors=True)

    @staticmethod
    def write_record(stage: Path, record: dict) -> None:
        record = {"format": STATE_FORMAT, **record}
        p = stage / "state.json"
        p.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", "utf-8")

    def recover(self) -> int:
        """Remove staging leftovers of interrupted steps; returns how many."""
        return clear_staging(self.root / ".staging")

    def retain(self, keep: int) -> list[int]:
        """Keep the newest ``keep`` committed steps (at least 1). Only the newest keeps its
        prepared sets: they serve the step after it alone (and OPCM's are 1.45× the model)."""
        steps = self.steps()
        drop = steps[: max(0, len(steps) - max(1, keep))]
        for t in drop:
            self._bury(self.root / str(t), f"drop-{t}")
        if drop:
            fsync_path(self.root)
        for t in steps[len(drop):-1]:
            self.drop_prepared(t)
        return drop
