"""Reading the committed state records ``state/<t>/state.json`` with the standard library only.

``mergewatch.engine.state.StateStore`` reads its records through these functions; ``mergewatch
status`` uses them directly, so that it never imports the strategies (and torch) (issue 14).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mergewatch.errors import MergewatchError

STATE_FORMAT = 1
STATE_FILE = "state.json"


class StateError(MergewatchError):
    pass


def committed_steps(root: str | os.PathLike) -> list[int]:
    """The steps with a committed state directory under ``root`` (``state/``), ascending."""
    out = []
    for p in Path(root).iterdir():
        if p.name.isdigit() and (p / STATE_FILE).is_file():
            out.append(int(p.name))
    return sorted(out)


def read_record(root: str | os.PathLike, t: int) -> dict:
    """The parsed ``state.json`` of step ``t``; a ``StateError`` if unreadable or not step ``t``'s."""
    d = Path(root) / str(t)
    try:
        record = json.loads((d / STATE_FILE).read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise StateError(f"cannot read committed state {d}: {e}") from e
    if record.get("format") != STATE_FORMAT or record.get("t") != t:
        raise StateError(f"{d}/{STATE_FILE}: unexpected format or step ({record.get('format')}, {record.get('t')})")
    return record


def latest_record(root: str | os.PathLike) -> tuple[int, dict] | None:
    """``(t, record)`` of the newest committed step under ``root``, or None (none yet, or no ``root``)."""
    if not Path(root).is_dir():
        return None
    steps = committed_steps(root)
    return (steps[-1], read_record(root, steps[-1])) if steps else None
