"""
The shape of hammal's import graph: no module imports itself through
others, and packages form layers (no two packages import each other,
directly or through a third). Type-only imports count: a circle drawn for
the type checker is still a circle for the reader.
"""

from __future__ import annotations

import ast
import os

from twisted.trial.unittest import SynchronousTestCase

import hammal

Graph = dict[str, set[str]]


def _modules() -> dict[str, str]:
    """Every module of hammal, by dotted name, with its file."""
    top = os.path.dirname(os.path.dirname(os.path.abspath(hammal.__file__)))
    modules = {}
    for folder, _, files in os.walk(os.path.dirname(hammal.__file__)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, top)[:-3].replace(os.sep, ".")
                modules[dotted.removesuffix(".__init__")] = path
    return modules


def import_graph() -> Graph:
    """Which hammal modules each hammal module imports."""
    modules = _modules()
    graph: Graph = {name: set() for name in modules}
    for name, path in modules.items():
        with open(path, encoding="utf-8") as source:
            tree = ast.parse(source.read(), path)
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def package_graph(graph: Graph) -> Graph:
    """The graph between units: each subpackage of hammal, each top-level module."""

    def unit(name: str) -> str:
        return ".".join(name.split(".")[:2])

    units: Graph = {}
    for name, targets in graph.items():
        units.setdefault(unit(name), set())
        units[unit(name)].update(unit(t) for t in targets if unit(t) != unit(name))
    return units


def circles(graph: Graph) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


#: hammal's units from the top (what starts the process) to the bottom (what
#: every layer uses), as README.rst "Layout" walks them. A unit imports only
#: units of lower layers: no upward arrows, and none inside a layer.
LAYERS: list[set[str]] = [
    {"__main__", "tap"},
    {"app", "ops"},
    {"workers", "drain", "worker_metrics"},
    {"web"},
    {"pull", "status"},
    {"cluster", "tls"},
    {"config"},
    {"storage", "access"},
    {"cache"},
    {"upstream"},
    {"coalesce", "links"},
    {"replies", "ttlstore"},
    {
        "stream",
        "ranges",
        "conditional",
        "headers",
        "lru",
        "keyfile",
        "listen",
        "logs",
        "selfsigned",
        "trust",
        "accept",
        "turns",
        "collector",
        "fairpoll",
        "classpoll",
    },
    {"reference", "metrics", "minrate"},
    {"errors", ""},
]


def upward_arrows(units: Graph, layers: list[set[str]]) -> list[str]:
    """
    Every import between units that does not point to a lower layer, and
    every unit no layer names.
    """
    rank = {
        f"hammal.{name}" if name else "hammal": i
        for i, names in enumerate(layers)
        for name in names
    }
    found = [f"{unit} is in no layer" for unit in sorted(units) if unit not in rank]
    for unit, targets in sorted(units.items()):
        for target in sorted(targets):
            if unit in rank and target in rank and rank[target] <= rank[unit]:
                found.append(f"{unit} -> {target}")
    return found


class ImportGraphTests(SynchronousTestCase):
    def test_finds_circles(self) -> None:
        """The checker sees a circle, direct or through a third module."""
        self.assertEqual(
            circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}), [["a", "b", "c"]]
        )
        self.assertEqual(circles({"a": {"b"}, "b": set()}), [])
        units = package_graph(
            {"hammal.x.one": {"hammal.y.two"}, "hammal.y.two": {"hammal.x.three"}}
        )
        self.assertEqual(circles(units), [["hammal.x", "hammal.y"]])

    def test_graph_is_read(self) -> None:
        """The graph holds hammal's real imports (a guard against an empty graph)."""
        graph = import_graph()
        self.assertIn("hammal.app", graph)
        self.assertIn("hammal.web.v2", graph["hammal.app"])

    def test_no_module_circles(self) -> None:
        self.assertEqual(circles(import_graph()), [])

    def test_no_package_circles(self) -> None:
        """Packages are layers: none imports another that imports it back."""
        self.assertEqual(circles(package_graph(import_graph())), [])

    def test_finds_upward_arrows(self) -> None:
        """The layer checker sees an import that points up or sideways, and an unplaced unit."""
        layers = [{"web"}, {"pull", "status"}, {"cache"}]
        self.assertEqual(
            upward_arrows(
                {
                    "hammal.web": {"hammal.cache"},
                    "hammal.cache": {"hammal.pull"},
                    "hammal.pull": {"hammal.status"},
                    "hammal.new": set(),
                },
                layers,
            ),
            [
                "hammal.new is in no layer",
                "hammal.cache -> hammal.pull",
                "hammal.pull -> hammal.status",
            ],
        )

    def test_no_upward_arrows(self) -> None:
        """
        The data path reads from the folder names down: web -> pull ->
        cache/upstream -> the shared modules, never back up.
        """
        self.assertEqual(upward_arrows(package_graph(import_graph()), LAYERS), [])


class RuntimeCheckTests(SynchronousTestCase):
    def test_no_assert_statements(self) -> None:
        """
        hammal checks at run time with real code: C{assert} vanishes under
        C{python -O}.
        """
        found = []
        for name, path in sorted(_modules().items()):
            with open(path, encoding="utf-8") as source:
                tree = ast.parse(source.read(), path)
            found += [
                f"{name}:{node.lineno}" for node in ast.walk(tree) if isinstance(node, ast.Assert)
            ]
        self.assertEqual(found, [])
