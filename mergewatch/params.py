"""Declared parameters (STYLE §9, "declare once, derive the rest"; after gunicorn's settings and
mergekit's ``ConfigParameterDef``).

Every hyper-parameter of a strategy, a technique, LiNeS or Weight Weaving is one ``Param``: its name,
kind, default, range or choices, whether it is a path (relative to the config file) and a line of
documentation. From those declarations come

* the checks: ``validate(params, declared, where)`` applies the defaults, rejects unknown names
  (listing the allowed ones), checks kinds, ranges and choices, and raises ``ParamError``, which
  carries the parameter's name, so that the config turns it into ``ConfigError("policy.<table>.<name>")``
  without reading the message;
* the ``defaults`` dict of a class (``Declares``) and the config's knowledge of path parameters;
* the README's parameter tables (``markdown_table``; ``config.policy_reference`` assembles them and
  ``tests/test_params.py`` checks that the README holds exactly what they render).

Torch-free: the config (and its light mode, issue 14) imports this module.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from numbers import Real
from typing import Any, ClassVar

#: what a value of each kind is called in messages and tables
KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list"}


def coerce(value: Any, kind: type) -> Any:
    """``value`` as a ``kind`` (bool, int, float, str or list; an int is taken as a float), or a
    ValueError saying what was expected. Floats must be finite."""
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, Real) and not isinstance(value, bool)
        if ok and not math.isfinite(float(value)):
            raise ValueError(f"expected a finite number, got {value!r}")
        if ok:
            value = float(value)
    elif kind is str:
        ok = isinstance(value, str)
    elif kind is list:
        ok = isinstance(value, (list, tuple))
    else:
        raise AssertionError(kind)
    if not ok:
        raise ValueError(f"expected {KIND_NAMES[kind]}, got {value!r}")
    return value


def _g(x: float) -> str:
    return f"{x:g}"


def interval(lo: float | None, hi: float | None, lo_open: bool = False, hi_open: bool = False) -> str:
    """``[0, 1)``, ``>= 1``, ``> 0``, ``<= 5``: the set a bounded value must lie in."""
    if lo is not None and hi is not None:
        return f"{'(' if lo_open else '['}{_g(lo)}, {_g(hi)}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {_g(lo)}"
    return f"{'<' if hi_open else '<='} {_g(hi)}"


def inside(x: float, lo: float | None, hi: float | None, lo_open: bool = False, hi_open: bool = False) -> bool:
    return not (
        (lo is not None and (x < lo or (lo_open and x == lo))) or (hi is not None and (x > hi or (hi_open and x == hi)))
    )


class ParamError(ValueError, TypeError):
    """A parameter of ``where`` (a strategy, technique, ``lines``, ``weaving``) is unknown, of the wrong
    kind or out of range. ``names``: the parameter(s) to blame, first the most likely; ``index``: the
    list item at fault, if any. A TypeError too, as Python raises for an unexpected keyword argument,
    so that callers catching either keep working."""

    def __init__(self, where: str, names: str | Sequence[str], message: str, index: int | None = None):
        self.where = where
        self.names = (names,) if isinstance(names, str) else tuple(names)
        self.index = index
        super().__init__(f"{where}: {message}")

    @property
    def name(self) -> str:
        return self.names[0]

    def key(self, name: str | None = None) -> str:
        """The config key of ``name`` (default: the first blamed), with the list index if any."""
        return (name or self.name) + (f"[{self.index}]" if self.index is not None else "")


@dataclass(frozen=True)
class Param:
    """One declared parameter. ``kind`` is bool, int, float, str or list (of ``item``); ``min``/``max``
    bound a number (or every item of a list), open at that end with ``min_open``/``max_open``;
    ``choices`` are the allowed strings; a list is non-empty, of exactly ``length`` items when set;
    ``path``: a file or directory, relative to the config file; a ``None`` default means "not set"
    (``doc`` says what then)."""

    name: str
    kind: type
    default: Any
    doc: str = ""
    min: float | None = None
    max: float | None = None
    min_open: bool = False
    max_open: bool = False
    choices: tuple[str, ...] = ()
    item: type | None = None
    length: int | None = None
    path: bool = False

    @property
    def default_value(self) -> Any:
        """The default as a parameter value (a fresh list for a list)."""
        return list(self.default) if isinstance(self.default, tuple) and self.kind is list else self.default

    def allowed(self) -> str:
        """What the value must be, e.g. ``a number in [0, 1)``, ``one of mean, sum, max``."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        rng = ""
        if self.min is not None or self.max is not None:
            between = self.min is not None and self.max is not None
            rng = (" in " if between else " ") + interval(self.min, self.max, self.min_open, self.max_open)
        if self.kind is list:
            items = KIND_NAMES[self.item].split(" ", 1)[1] + "s"
            return f"a list of {self.length} {items}{rng}" if self.length else f"a non-empty list of {items}{rng}"
        if self.path:
            return "a path string"
        return KIND_NAMES[self.kind] + rng

    def coerce(self, value: Any, where: str) -> Any:
        """``value`` of this parameter's kind (items too), not yet range-checked; a None default
        accepts None."""
        if value is None and self.default is None:
            return None
        try:
            value = coerce(value, self.kind)
        except ValueError as e:
            raise ParamError(where, self.name, f"parameter '{self.name}': {e}") from None
        if self.kind is list and self.item is not None:
            out = []
            for i, v in enumerate(value):
                try:
                    out.append(coerce(v, self.item))
                except ValueError as e:
                    raise ParamError(where, self.name, f"parameter '{self.name}' item {i}: {e}", index=i) from None
            value = out
        return value

    def check(self, value: Any, where: str) -> Any:
        """``value`` coerced and checked against the range, choices and length."""
        value = self.coerce(value, where)
        if value is None:
            return None
        bad = f"parameter '{self.name}' must be {self.allowed()}, got {value!r}"
        if self.choices and value not in self.choices:
            raise ParamError(where, self.name, bad)
        if self.kind is list:
            if not value or (self.length is not None and len(value) != self.length):
                raise ParamError(where, self.name, bad)
            for i, v in enumerate(value):
                if isinstance(v, float) and not inside(v, self.min, self.max, self.min_open, self.max_open):
                    raise ParamError(where, self.name, bad, index=i)
        elif self.kind in (int, float) and not inside(value, self.min, self.max, self.min_open, self.max_open):
            raise ParamError(where, self.name, bad)
        return value


def by_name(declared: Sequence[Param]) -> dict[str, Param]:
    return {p.name: p for p in declared}


def validate(params: Mapping[str, Any], declared: Sequence[Param], where: str) -> dict[str, Any]:
    """Every declared parameter of ``where``: the given value, checked, or the default; in
    declaration order. An unknown name is a ``ParamError`` listing the allowed ones."""
    known = by_name(declared)
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ParamError(where, unknown, f"unknown parameter(s) {unknown}; allowed: {sorted(known) or 'none'}")
    return {p.name: p.check(params[p.name], where) if p.name in params else p.default_value for p in declared}


def with_defaults(declared: Sequence[Param], **defaults: Any) -> tuple[Param, ...]:
    """``declared`` with other defaults (a preset, e.g. continual TIES: global trim, sum)."""
    return tuple(replace(p, default=defaults[p.name]) if p.name in defaults else p for p in declared)


class Declares:
    """Mixin of a class that declares its parameters (``param_defs``); ``defaults`` (name ->
    default) is derived from them for every subclass."""

    param_defs: ClassVar[tuple[Param, ...]] = ()
    defaults: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        cls.defaults = {p.name: p.default_value for p in cls.param_defs}


#: ``enabled = false`` in an optional table ([policy.lines], [policy.weaving]): as if it were absent
ENABLED = Param("enabled", bool, True, "false: ignore this table, as if it were absent")


def _toml(v: Any) -> str:
    return "—" if v is None else json.dumps(list(v) if isinstance(v, tuple) else v, ensure_ascii=False)


def markdown_table(declared: Sequence[Param]) -> str:
    """The README table of ``declared``: key, default, allowed values, meaning."""
    rows = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    for p in declared:
        allowed = ", ".join(f"`{c}`" for c in p.choices) if p.choices else p.allowed()
        doc = p.doc + (" (relative to the config file)" if p.path else "")
        default = _toml(p.default)
        cells = (f"`{p.name}`", default if p.default is None else f"`{default}`", allowed, doc)
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)
