"""No module of core/ or webui/ imports, however far round, a module that imports it.

The graph is read from the source with `ast`, nothing imported: every `import` and
`from ... import` counts, at the top of a file or inside a function (a late import
still ties the two modules), relative ones resolved against the file's package. An
edge goes to the module named, or to the package whose name it takes from; a
package's own __init__.py is not counted as imported by each of its submodules.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "webui")


def module_files() -> dict[str, Path]:
    files = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join(parts)] = path
    return files


def _known_prefix(name: str, known: set[str]) -> str | None:
    """The longest leading part of a dotted name that is one of our modules."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            return candidate
    return None


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            # `from a import b`: b is a module of a, or a name defined in a.
            targets.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names)
    resolved = {_known_prefix(target, known) for target in targets}
    return {target for target in resolved if target is not None and target != name}


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files)
    return {name: imports_of(name, path, known) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One loop (a -> b -> ... -> a) through each group of modules that reach each other (Tarjan's components)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(set(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_loop_within(group, graph) for group in groups]


def _loop_within(group: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest path from the group's first module back to itself, inside the group."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node] & group):
                if target == start:
                    return paths[node] + [start]
                if target not in paths:
                    paths[target] = paths[node] + [target]
                    following.append(target)
        frontier = following
    raise AssertionError(f"{sorted(group)} reach each other but no loop was found")


def _loops_touching(package: str) -> list[str]:
    return [" -> ".join(loop) for loop in cycles(import_graph())
            if any(module == package or module.startswith(package + ".") for module in loop)]


def test_the_walk_sees_a_late_relative_import_and_names_the_loop(tmp_path):
    # The walk itself, on two modules that import each other, one of them inside a function.
    late = tmp_path / "a.py"
    late.write_text("def late():\n    from .b import thing\n")
    assert imports_of("core.a", late, {"core.a", "core.b"}) == {"core.b"}
    graph = {"core.a": {"core.b"}, "core.b": {"core.a"}, "core.c": {"core.a"}}
    assert cycles(graph) == [["core.a", "core.b", "core.a"]]


def test_the_graph_holds_every_module_of_core_and_webui():
    graph = import_graph()
    assert {"core.loader", "core.formats.registry", "core.formats.exl2.kernel", "webui.conversions"} <= set(graph)
    assert "core.formats.registry" in graph["core.loader"]
    assert "core.rope" in graph["core.kernels.reference"]


def test_core_has_no_import_cycle():
    loops = _loops_touching("core")
    assert not loops, "import cycles in core/: " + "; ".join(loops)


def test_webui_has_no_import_cycle():
    loops = _loops_touching("webui")
    assert not loops, "import cycles in webui/: " + "; ".join(loops)
