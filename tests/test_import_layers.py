"""The package's imports go one way: the module map in docs/design.md §2 is the rule, this walks it.

Every ``import`` and ``from ... import`` in ``specdiff_fx`` (at module level and inside functions:
a lazy import still ties two modules together) is resolved to a module of the package and placed
in its unit (a top-level module, or a subpackage as a whole).  An import into a higher layer, an
import between two units of one layer, a cycle between modules, or a module the table does not
place fails, naming the import.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "specdiff_fx"


@functools.cache
def _layers() -> dict[str, int]:
    """unit -> layer, from the table under "## 2. Layers" in docs/design.md."""
    text = (ROOT / "docs" / "design.md").read_text()
    section = text.split("## 2. Layers", 1)[1].split("\n## ", 1)[0]
    layers = {}
    for line in section.splitlines():
        m = re.match(r"\|\s*(\d+)\s*\|(.*?)\|", line)
        if m:
            for unit in re.findall(r"`([^`]+)`", m.group(2)):
                layers[unit.removesuffix(".py").rstrip("/")] = int(m.group(1))
    assert layers, "docs/design.md §2 has no module table"
    return layers


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports (a name imported from a package resolves to
    its submodule where one exists)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in modules and m != name}


def _unit(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    return parts[1]


@functools.cache
def _graph():
    modules = _modules()
    return modules, {name: _imports(name, path, modules) for name, path in modules.items()}


def test_every_module_has_a_layer():
    layers = _layers()
    modules, _ = _graph()
    unplaced = sorted({_unit(m) for m in modules} - set(layers))
    assert not unplaced, f"place these units in docs/design.md §2's module table: {unplaced}"


def test_no_import_runs_upward_or_sideways():
    layers = _layers()
    _, graph = _graph()
    bad = []
    for source, targets in graph.items():
        for target in targets:
            a, b = _unit(source), _unit(target)
            if a == b:
                continue
            if layers[b] > layers[a]:
                bad.append(f"{source} (layer {layers[a]}) imports {target} (layer {layers[b]}): upward")
            elif layers[b] == layers[a]:
                bad.append(f"{source} imports {target}: two units of layer {layers[a]}")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycle():
    _, graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_walk_sees_lazy_imports():
    """The walk itself: a function-level import counts (the test would pass vacuously otherwise)."""
    modules, graph = _graph()
    assert "specdiff_fx.bench.plot" in graph["specdiff_fx.bench.tune_command"]  # imported inside main()
    assert "specdiff_fx.backend" in graph["specdiff_fx.tune"]
    assert len(modules) > 60


@pytest.mark.parametrize("tool", ["bench", "inspect", "demo", "cli", "testing", "reference"])
def test_the_library_never_imports_a_tool(tool):
    layers = _layers()
    _, graph = _graph()
    library = {u for u, layer in layers.items() if layer <= layers["__init__"]}
    offenders = [f"{s} imports {t}" for s, ts in graph.items() for t in ts
                 if _unit(s) in library and _unit(t) == tool]
    assert not offenders, offenders
