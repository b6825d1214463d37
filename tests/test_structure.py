"""The package's import structure: no import circles, no library module importing the CLI, no core
package importing an optional one (the synthetic world registers itself as a plugin).

The graph is read from the source with ``ast`` (every ``import`` / ``from ... import``, also those
inside functions, except under ``if TYPE_CHECKING:``), file by file, and its strongly connected
components are the circles.
"""

from __future__ import annotations

import ast
from pathlib import Path

import zscl

ROOT = Path(zscl.__file__).resolve().parent
# The merge-rule registry's loader imports its rule modules, which register themselves in it.
ALLOWED_CIRCLES = [{"zscl.merging.base", "zscl.merging.soups", "zscl.merging.task_arithmetic", "zscl.merging.fisher",
                    "zscl.merging.mwa", "zscl.merging.magmax", "zscl.merging"}]


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts[:-1]) if rel.name == "__init__" else list(rel.parts)
        out[".".join(parts)] = path
    return out


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                lines.update(range(inner.lineno, (inner.end_lineno or inner.lineno) + 1))
    return lines


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_lines(tree)
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            for t in targets:
                hit = _resolve(t, modules) if t.startswith("zscl") else None
                if hit and hit != mod:
                    graph[mod].add(hit)
    return graph


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_circle_finder_finds_a_hand_built_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert circles(graph) == [{"a", "b", "c"}]


def test_no_import_circle_except_the_merge_rule_registry():
    found = circles(import_graph())
    unexpected = [sorted(c) for c in found if not any(c <= allowed for allowed in ALLOWED_CIRCLES)]
    assert not unexpected, f"import circles: {unexpected}"


def test_no_library_module_imports_the_cli():
    graph = import_graph()
    offenders = {m: sorted(t for t in ts if t.startswith("zscl.cli")) for m, ts in graph.items()
                 if not m.startswith("zscl.cli") and m != "zscl.__main__"}
    assert not {m: t for m, t in offenders.items() if t}


def test_core_packages_do_not_import_the_synthetic_world():
    graph = import_graph()
    core = ("zscl.models", "zscl.datasets", "zscl.methods", "zscl.runner", "zscl.evaluation", "zscl.settings")
    offenders = {m: sorted(t for t in ts if t.startswith("zscl.synthetic")) for m, ts in graph.items() if m.startswith(core)}
    assert not {m: t for m, t in offenders.items() if t}


# Lower layers first; an import from a module to one of a later layer is "upward".
LAYERS = ["zscl.utils", "zscl.registry", "zscl.resources", "zscl.plugins", "zscl.models", "zscl.datasets",
          "zscl.reference", "zscl.evaluation", "zscl.merging", "zscl.methods", "zscl.moe", "zscl.diki", "zscl.rail",
          "zscl.settings",
          "zscl.runner", "zscl.bench", "zscl.synthetic", "zscl.cli", "zscl.__main__"]


def _layer(module: str) -> int:
    for i, prefix in enumerate(LAYERS):
        if module == prefix or module.startswith(prefix + "."):
            return i
    return len(LAYERS)


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((m, t) for m, ts in graph.items() for t in ts if t != "zscl" and _layer(t) > _layer(m))


def test_at_most_one_upward_import():
    """The one allowed: ``zscl compare`` asks the settings registry what kind of result a file holds."""
    assert upward_imports(import_graph()) in ([], [("zscl.evaluation.compare", "zscl.settings")])
