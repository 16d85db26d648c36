"""The pack's modules import one another without a cycle, and the layers point one way
(nodes -> core <- trainers): read from the source, every import (lazy ones too)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "trainers", "nodes")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imported(module: str, path: Path, node) -> list[str]:
    """The dotted names an import statement may load (a ``from X import y`` may load X.y)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:  # relative: from the module's package, one level up per extra dot
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for name in _imported(module, path, node):
                    while name and name not in modules:  # X.attribute -> X
                        name = name.rpartition(".")[0]
                    if name and name != module:
                        edges.add(name)
        graph[module] = edges
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the path that closes it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module):
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        state[module] = 2
        path.pop()
        return None

    for module in sorted(graph):
        if module not in state:
            found = visit(module)
            if found:
                return found
    return None


def test_the_walk_finds_imports_of_every_kind():
    graph = import_graph()
    assert "core.fileio" in graph["trainers.train"]  # absolute, at the top
    assert "trainers.presets" in graph["trainers.config"]  # lazy, inside a function
    assert "core.job_spec" in graph["nodes.job_manager"]  # relative, two dots
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle_among_the_packs_modules():
    cycle = _cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_layers_point_one_way():
    for module, targets in import_graph().items():
        layer = module.split(".")[0]
        allowed = {"core": {"core"}, "trainers": {"core", "trainers"}, "nodes": {"core", "nodes"}}[layer]
        wrong = sorted(t for t in targets if t.split(".")[0] not in allowed)
        assert not wrong, f"{module} imports {wrong}"
