"""Fault injection for the crash-safety tests (inactive unless the environment asks for it).

``MERGEWATCH_CRASH_AT="<point>:<n>"`` makes the process SIGKILL itself the n-th time (1-based) it
reaches ``crash_point("<point>")``. Points: ``before_claim``, ``after_claim``, ``mid_step`` (half
the tensors of a pass written), ``after_commit``
(state durable, nothing published), ``mid_publish`` (deploy published, init not yet),
``after_step`` (published, ledger not yet updated), ``mid_prepare`` (half the tensors of a
prepare written, ``Workspace.prepare``), ``ray_task`` (a Ray task's first name written, in the
worker: ``crash_once``). Costs one dict lookup when unset.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

ENV = "MERGEWATCH_CRASH_AT"
_counts: dict[str, int] = {}


def crash_point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, _, n = spec.partition(":")
    if point != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] >= int(n or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def crash_once(name: str, spec: str | None, marker: Path) -> None:
    """``crash_point`` in a process that does not share the driver's environment (a Ray worker):
    ``spec`` is the driver's ``MERGEWATCH_CRASH_AT``, and only the first process to create
    ``marker`` dies, so that the retried attempt runs through."""
    point, _, n = (spec or "").partition(":")
    if point != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] < int(n or 1):
        return
    try:
        marker.touch(exist_ok=False)
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)
