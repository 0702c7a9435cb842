"""The import graph of engine/, deployments/ and client/, read from the source (ast, nothing is
imported): no cycle anywhere, and each layer imports only the layers below it.

Every import counts wherever it is written: at module level, inside a function, under
TYPE_CHECKING. Relative imports are resolved. `from p import x` is an edge to the module p.x
when there is one, else to p (a name defined in p, or in its __init__.py).

The layers of deployments/ (README, "Layout"): http/ and ui/ over frontend/, which with
replica/ sits over telemetry/, which sits over contract/ and routing/. contract/ imports
engine/ only; routing/ imports nothing from this project (Serve loads it in its controller and
routers); app.py and local.py, which assemble the application, may import anything. engine/
imports neither Ray nor the packages above it; client/ imports nothing of the server's.

One check imports for real: the front ends' modules load without torch, transformers and peft.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("engine", "deployments", "client")

# What each part may import from this project (besides itself), and outside packages it must not.
ALLOWED = {
    "engine": set(),
    "client": set(),
    "deployments.contract": {"engine"},
    "deployments.routing": set(),
    "deployments.telemetry": {"engine", "deployments.contract", "deployments.routing"},
    "deployments.replica": {"engine", "deployments.contract", "deployments.routing", "deployments.telemetry"},
    "deployments.frontend": {"engine", "deployments.contract", "deployments.telemetry"},
    "deployments.http": {"engine", "deployments.contract", "deployments.frontend", "deployments.telemetry"},
    "deployments.ui": {"engine", "client", "deployments.contract", "deployments.frontend", "deployments.telemetry"},
}
ASSEMBLY = {"deployments", "deployments.app", "deployments.local"}  # may import anything
FORBIDDEN_OUTSIDE = {"engine": {"ray"}, "client": {"ray", "torch"}}


@dataclass(frozen=True)
class Edge:
    """`source` imports `target` (a module of the tree, or an outside package's top name) at `line`."""

    source: str
    target: str
    path: Path
    line: int

    def where(self, root: Path) -> str:
        return f"{self.path.relative_to(root)}:{self.line}"


def modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Module name -> file, for every .py file under the packages (a package is its __init__)."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def edges_of(name: str, path: Path, known: dict[str, Path]) -> list[Edge]:
    """Every import in the file `path` of module `name`, resolved (see the module docstring)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in dict.fromkeys(targets):
            edges.append(Edge(name, _known_prefix(target, known), path, node.lineno))
    return edges


def _known_prefix(target: str, known: dict[str, Path]) -> str:
    """The module of the tree `target` names (its longest known prefix), else its top-level name."""
    parts = target.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in known:
            return ".".join(parts[:end])
    return parts[0]


def import_graph(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, list[Edge]]:
    known = modules(root, packages)
    return {name: edges_of(name, path, known) for name, path in known.items()}


def cycles(graph: dict[str, list[Edge]]) -> list[tuple[list[str], list[Edge]]]:
    """Each group of modules that import each other, directly or not (sorted), with one cycle
    through it (its edges)."""
    inner = {name: [e for e in edges if e.target in graph and e.target != name] for name, edges in graph.items()}
    found = [([e.source], [e]) for edges in graph.values() for e in edges if e.target == e.source]
    for group in _strongly_connected(inner):
        if len(group) > 1:
            found.append((sorted(group), _cycle_in(group, inner)))
    return found


def _strongly_connected(graph: dict[str, list[Edge]]) -> list[set[str]]:
    """Tarjan's strongly connected components."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for edge in graph[node]:
            if edge.target not in index:
                visit(edge.target)
                low[node] = min(low[node], low[edge.target])
            elif edge.target in on_stack:
                low[node] = min(low[node], index[edge.target])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def _cycle_in(group: set[str], graph: dict[str, list[Edge]]) -> list[Edge]:
    """A shortest cycle through the group's first module (breadth first, inside the group)."""
    start = min(group)
    came_by: dict[str, Edge] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for edge in graph[node]:
                if edge.target == start:
                    path = [edge]
                    while path[0].source != start:
                        path.insert(0, came_by[path[0].source])
                    return path
                if edge.target in group and edge.target not in came_by:
                    came_by[edge.target] = edge
                    following.append(edge.target)
        frontier = following
    raise AssertionError(f"no cycle through {start}")


def describe(group: list[str], cycle: list[Edge], root: Path) -> str:
    """`n modules import each other (names): a (where it imports b) -> b (...) -> a`."""
    path = " -> ".join(f"{e.source} ({e.where(root)})" for e in cycle) + f" -> {cycle[0].source}"
    return f"{len(group)} modules import each other ({', '.join(group)}): {path}"


def part_of(module: str) -> str | None:
    """The layer `module` belongs to (a key of ALLOWED), None for the assembly modules."""
    if module in ASSEMBLY:
        return None
    for part in sorted(ALLOWED, key=len, reverse=True):
        if module == part or module.startswith(part + "."):
            return part
    return "unplaced"


def layer_violations(graph: dict[str, list[Edge]], root: Path) -> list[str]:
    """Imports that go against ALLOWED and FORBIDDEN_OUTSIDE, and deployments modules in no layer."""
    problems = []
    for name, edges in sorted(graph.items()):
        part = part_of(name)
        if part == "unplaced":
            problems.append(f"{name} belongs to no layer: put it in a package of ALLOWED (or in ASSEMBLY)")
            continue
        if part is None:
            continue
        for edge in edges:
            if edge.target in graph:
                target = part_of(edge.target) or edge.target
                if target != part and target not in ALLOWED[part]:
                    problems.append(f"{edge.where(root)}: {part} imports {edge.target} (it may import only "
                                    f"{', '.join(sorted(ALLOWED[part])) or 'itself'})")
            elif edge.target in FORBIDDEN_OUTSIDE.get(part, ()):
                problems.append(f"{edge.where(root)}: {part} imports {edge.target}")
    return problems


def test_no_import_cycle_in_engine_deployments_or_client():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(describe(*found_one, ROOT) for found_one in found)


def test_each_layer_imports_only_the_layers_below_it():
    problems = layer_violations(import_graph(), ROOT)
    assert not problems, "imports against the layers:\n" + "\n".join(problems)


def test_the_graph_sees_every_kind_of_import():
    """The checks above read this tree as they claim to: a module-level, a function-level and a
    TYPE_CHECKING import, and an outside package, are edges of its graph (relative imports: the
    tests below)."""
    graph = import_graph()
    targets = {name: {e.target for e in edges} for name, edges in graph.items()}
    assert "deployments.contract.errors" in targets["deployments.frontend.service"]
    assert "deployments.app" in targets["deployments.local"]  # inside a function
    assert "deployments.http.structured" in targets["deployments.http.openai_format"]  # under TYPE_CHECKING only
    assert "ray" in targets["deployments.replica.llm"]


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_a_cycle_is_named_through_relative_function_level_and_type_checking_imports(tmp_path):
    write(tmp_path, {
        "deployments/__init__.py": "",
        "deployments/http/__init__.py": "",
        "deployments/http/a.py": "from . import b\n",
        "deployments/http/b.py": "def f():\n    from deployments.http.c import x\n",
        "deployments/http/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import y\n",
        "deployments/http/d.py": "from deployments.http import a\n",  # into the cycle, not part of it
    })
    found = cycles(import_graph(tmp_path, ("deployments",)))
    assert [describe(group, cycle, tmp_path) for group, cycle in found] == [
        "3 modules import each other (deployments.http.a, deployments.http.b, deployments.http.c): "
        "deployments.http.a (deployments/http/a.py:1) -> deployments.http.b (deployments/http/b.py:2) -> "
        "deployments.http.c (deployments/http/c.py:3) -> deployments.http.a"
    ]


def test_an_import_up_the_layers_is_named(tmp_path):
    write(tmp_path, {
        "engine/__init__.py": "",
        "engine/core.py": "import ray\n",
        "deployments/__init__.py": "",
        "deployments/contract/__init__.py": "",
        "deployments/contract/messages.py": "from ..http.openai_format import ErrorResponse\n",
        "deployments/http/__init__.py": "",
        "deployments/http/openai_format.py": "from deployments.contract import messages\n",
        "deployments/flat.py": "",
    })
    problems = layer_violations(import_graph(tmp_path, ("engine", "deployments")), tmp_path)
    assert problems == [
        "deployments/contract/messages.py:1: deployments.contract imports deployments.http.openai_format "
        "(it may import only engine)",
        "deployments.flat belongs to no layer: put it in a package of ALLOWED (or in ASSEMBLY)",
        "engine/core.py:1: engine imports ray",
    ]


FRONT_END_MODULES = ("deployments.http.ingress", "deployments.ui.page", "deployments.routing.router")
MODEL_PACKAGES = ("torch", "transformers", "peft")


def test_the_front_ends_load_without_the_model_packages():
    """The ingress and chat page replicas (and the router they run) import neither torch,
    transformers nor peft: they start in about a third of the time and memory of the LLM
    replica, which matters when Serve starts them on a busy node. Imported for real, in a
    fresh interpreter (this one has torch loaded)."""
    code = ("import importlib, sys\n"
            f"for name in {FRONT_END_MODULES!r}:\n"
            "    importlib.import_module(name)\n"
            f"print(sorted(p for p in {MODEL_PACKAGES!r} if p in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", f"the front ends loaded {done.stdout.strip()} (find who: python -X importtime)"
