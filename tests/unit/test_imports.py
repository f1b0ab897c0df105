"""The import graph of streams, engines, indexer and schemas has no cycle.

Every `import` and `from ... import` of a first-party module counts, at module level and inside
functions alike (a deferred import still ties the two modules together); imports under
`if TYPE_CHECKING:` do not (they never run). `from pkg import name` is the module pkg.name when
pkg/name.py (or pkg/name/) exists, else pkg itself. The implicit import of a module's parent
packages is not an edge: it is how every submodule is reached.
"""

from __future__ import annotations

import ast
import functools
import itertools
from collections import deque
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("streams", "engines", "indexer", "schemas")

Graph = dict[str, dict[str, int]]  # module -> {imported module: first line}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _first_party(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth, except those under `if TYPE_CHECKING:`."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> Iterator[str]:
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name
        return
    if node.level:  # relative: from the module's package, one level up per extra dot
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, *([node.module] if node.module else [])])
    else:
        base = node.module or ""
    for alias in node.names:
        candidate = f"{base}.{alias.name}"
        yield candidate if alias.name != "*" and _is_module(candidate) else base


@functools.cache
def import_graph() -> Graph:
    graph: Graph = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            module = module_name(path)
            edges = graph.setdefault(module, {})
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in _runtime_imports(tree):
                for target in _targets(node, module, path.name == "__init__.py"):
                    if _first_party(target) and target != module and _is_module(target):
                        edges[target] = min(edges.get(target, node.lineno), node.lineno)
    return graph


def strongly_connected(graph: Graph) -> list[list[str]]:
    """Tarjan's algorithm, iterative: the components, each a sorted list of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, {}))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, {})))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def a_cycle(graph: Graph, component: list[str]) -> str:
    """One cycle through the component's first module, as `a (line N) -> b ... -> a`."""
    members = set(component)
    start = component[0]
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(graph[node]):
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                path.reverse()
                hops = [*path, start]
                return (
                    " -> ".join(f"{a} (line {graph[a][b]})" for a, b in itertools.pairwise(hops))
                    + f" -> {start}"
                )
            if child in members and child not in came_from and child != start:
                came_from[child] = node
                queue.append(child)
    return " <-> ".join(component)


def test_tarjan_finds_a_planted_cycle() -> None:
    graph: Graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3, "d": 4}, "d": {}}
    components = strongly_connected(graph)
    assert ["a", "b", "c"] in components and ["d"] in components
    assert a_cycle(graph, ["a", "b", "c"]) == "a (line 1) -> b (line 2) -> c (line 3) -> a"


def test_function_imports_count_and_type_checking_ones_do_not() -> None:
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import streams.config\nelse:\n    import streams.kafka\n"
        "def f():\n    from streams import errors\n"
    )
    nodes = list(_runtime_imports(tree))
    targets = {t for node in nodes for t in _targets(node, "streams.x", is_package=False)}
    assert targets == {"typing", "streams.kafka", "streams.errors"}


def test_config_and_auth_do_not_import_each_other() -> None:
    graph = import_graph()
    assert "streams.ops.auth" in graph["streams.config"]
    assert "streams.config" not in graph["streams.ops.auth"]


def test_the_first_party_import_graph_has_no_cycle() -> None:
    graph = import_graph()
    cycles = [c for c in strongly_connected(graph) if len(c) > 1]
    assert not cycles, "import cycles:\n" + "\n".join(a_cycle(graph, c) for c in cycles)
