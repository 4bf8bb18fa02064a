"""The package's dependencies run one way: with every deferred import made
top-level, the modules still form no cycle (issue 28.2)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "avalanche_m2kd"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str) -> set:
    """Every avalanche_m2kd module ``path`` imports, at any depth of its code (deferred imports included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # "from . import losses" imports the module losses
                candidate = f"{target}.{alias.name}"
                found.add(candidate if _exists(candidate) else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.startswith("avalanche_m2kd") and _exists(m) and m != name}


def _exists(module: str) -> bool:
    path = PACKAGE.parent.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _graph() -> dict:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    # a package's __init__ re-exports its children: the edge parent -> child is the public API, not a dependency
    return {name: {m for m in _imports(path, name) if not (path.name == "__init__.py" and m.startswith(name + "."))}
            for name, path in modules.items()}


def _cycle(graph: dict):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_even_with_deferred_imports_made_top_level():
    graph = _graph()
    assert "avalanche_m2kd.models.surgery" in graph["avalanche_m2kd.checkpoint"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_models_import_nothing_above_them():
    graph = _graph()
    lower = ("avalanche_m2kd.models", "avalanche_m2kd._random")
    for name, deps in graph.items():
        if name.startswith("avalanche_m2kd.models"):
            assert all(d.startswith(lower) for d in deps), (name, deps)


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
