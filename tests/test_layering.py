"""The import graph of the package (STYLE §8: small modules with one direction of imports).

Every ``import mergewatch...`` / ``from mergewatch... import`` in the source is an arrow between
two *units*: a sub-package (``checkpoint``, ``strategies``, ``engine``, ``daemon``, ...) or a
top-level module (``config``, ``workspace``, ``cli``, ...). Imports inside functions count too (a
lazy import is still a dependency); imports under ``if TYPE_CHECKING:`` do not (they never run).
The graph of units must have no cycle, and nothing below the daemon may import it.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "mergewatch"

#: units that must never import ``daemon`` (DESIGN §2 / issue 15)
BELOW_DAEMON = ("checkpoint", "strategies", "engine", "deploy", "eval", "buffer", "nino", "ledger", "workspace", "config")


def _unit(module: str) -> str:
    """``mergewatch.strategies.opcm`` -> ``strategies``; ``mergewatch.config`` -> ``config``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
            if name == "TYPE_CHECKING":
                for child in node.body:
                    for sub in ast.walk(child):
                        if hasattr(sub, "lineno"):
                            lines.add(sub.lineno)
    return lines


def _imports(path: Path) -> set[str]:
    """The ``mergewatch.*`` modules one source file imports (resolved relative imports included)."""
    tree = ast.parse(path.read_text("utf-8"))
    skip = _type_checking_lines(tree)
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("mergewatch")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("mergewatch"):
                out.add(mod)
                out |= {f"{mod}.{a.name}" for a in node.names if (PKG.parent / f"{mod}.{a.name}".replace(".", "/")).is_dir()}
    return out


def unit_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for path in PKG.rglob("*.py"):
        src = _unit(_module_name(path))
        graph.setdefault(src, set())
        for mod in _imports(path):
            dst = _unit(mod)
            if dst != src and dst != "mergewatch":
                graph[src].add(dst)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_the_unit_import_graph_has_no_cycle():
    graph = unit_graph()
    assert {"checkpoint", "strategies", "daemon", "cli"} <= set(graph)
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def module_graph() -> dict[str, set[str]]:
    """Module -> modules it imports, package ``__init__`` files left out (they only re-export)."""
    mods = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for m, p in mods.items():
        if p.name == "__init__.py":
            continue
        graph[m] = {d for d in _imports(p) if d in mods and mods[d].name != "__init__.py" and d != m}
    return graph


def test_the_module_import_graph_has_no_cycle():
    """Inside a unit too (e.g. checkpoint.hashing <-> checkpoint.writer was one)."""
    graph = module_graph()
    assert len(graph) > 40
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_nothing_below_the_daemon_imports_it():
    graph = unit_graph()
    bad = sorted(u for u in BELOW_DAEMON if "daemon" in graph.get(u, ()))
    assert not bad, f"{bad} import mergewatch.daemon"


def test_the_checker_sees_cycles_and_lazy_imports():
    """The checker itself: a cycle is found, and an import inside a function is an arrow."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    assert "strategies" in unit_graph()["workspace"]  # workspace imports strategies (lazily or not)


def test_views_are_defined_once():
    import re

    defs = [str(p.relative_to(PKG)) for p in PKG.rglob("*.py") if re.search(r"^VIEWS\s*=", p.read_text("utf-8"), re.M)]
    assert defs == ["views.py"]
    literal = [str(p.relative_to(PKG)) for p in PKG.rglob("*.py") if '("deploy", "init")' in p.read_text("utf-8") and p.name != "views.py"]
    assert literal == []
