"""Package exports imported on first use (PEP 562).

A package ``__init__`` that re-exports names of heavy submodules (torch) would make every import of
a light sibling heavy too; ``lazy_exports`` keeps the convenient ``from package import Name`` while
the CLI's light verbs (``status``, ``submit``, ``rollback``, ``promote``) import no torch (issue 14).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, tuple[str, ...]]) -> tuple[Callable[[str], object], list[str]]:
    """``(__getattr__, __all__)`` for ``package``, whose ``exports`` maps a submodule to the names it
    defines: a name is imported from its submodule when it is first asked for."""
    where = {name: sub for sub, names in exports.items() for name in names}

    def __getattr__(name: str) -> object:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{where[name]}"), name)

    return __getattr__, sorted(where)
