"""The import graph of the `ntksap` package: no cycles, and the library never imports the
command line (`ntksap.cli`, a package or a legacy module).

The graph is read from the source with `ast` (nothing is imported): every `import` and
`from ... import` naming an ntksap module, at module level or inside functions and classes,
relative imports resolved. `from ntksap.x import y` is an edge to `ntksap.x.y` when that is
a module, else to `ntksap.x` (the package's `__init__`). Imports under
`if TYPE_CHECKING:` never run and are left out. Edges from a package `__init__` to its own
submodules count like any other.
"""

from __future__ import annotations

import ast
import itertools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT_PACKAGE = "ntksap"
CLI = "ntksap.cli"
# `python -m ntksap` runs ntksap/__main__.py: the command line's entry point, not library
# code, so it may import ntksap.cli.
CLI_ENTRY_POINTS = {"ntksap.__main__"}


def is_cli(module: str) -> bool:
    return module == CLI or module.startswith(CLI + ".")


def module_files(src: Path = SRC, package: str = ROOT_PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package (packages by __init__).

    Example: {"ntksap": .../ntksap/__init__.py, "ntksap.data.cifar": .../data/cifar.py, ...}
    """
    out: dict[str, Path] = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement of `tree`, at any depth, except under `if TYPE_CHECKING:`."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:  # the else branch does run
                visit(child)
            return
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _resolve(target: str, modules: set[str]) -> str | None:
    """`target` if it is a module of the package, else its nearest enclosing one."""
    while target:
        if target in modules:
            return target
        target = target.rpartition(".")[0]
    return None


def imports_of(name: str, path: Path, modules: set[str]) -> dict[str, int]:
    """The ntksap modules that module `name` (file `path`) imports -> first line number."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    out: dict[str, int] = {}

    def add(target: str | None, line: int) -> None:
        if target is not None and target != name:
            out.setdefault(target, line)

    for node in _runtime_imports(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == ROOT_PACKAGE or alias.name.startswith(ROOT_PACKAGE + "."):
                    add(_resolve(alias.name, modules), node.lineno)
            continue
        if node.level:  # relative: level 1 is the module's own package
            package = name if is_package else name.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{node.module}" if node.module else package
        else:
            base = node.module or ""
        if not (base == ROOT_PACKAGE or base.startswith(ROOT_PACKAGE + ".")):
            continue
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            add(sub if sub in modules else _resolve(base, modules), node.lineno)
    return out


def import_graph(src: Path = SRC) -> tuple[dict[str, dict[str, int]], dict[str, Path]]:
    files = module_files(src)
    names = set(files)
    return {m: imports_of(m, p, names) for m, p in files.items()}, files


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative):
    each is a set of modules that all import one another, directly or not."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        work = [(root, iter(sorted(graph[root])))]
        while work:
            node, children = work[-1]
            for child in children:
                if child not in graph:
                    continue
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        comp.append(top)
                        if top == node:
                            break
                    if len(comp) > 1:
                        components.append(sorted(comp))
    return sorted(components)


def _shortest_cycle(graph: dict[str, dict[str, int]], start: str, members: set[str]) -> list[str]:
    """A shortest path start -> ... -> start inside `members` (breadth-first)."""
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph[node]):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if child in members and child not in parents:
                    parents[child] = node
                    nxt.append(child)
        frontier = nxt
    raise AssertionError(f"{start} is on no cycle")  # cannot happen inside a component


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The distinct shortest cycles through each module of each component, every cycle
    written from its alphabetically first module: ["a", "b", "a"] for a -> b -> a."""
    found: set[tuple[str, ...]] = set()
    for comp in strongly_connected(graph):
        for start in comp:
            ring = _shortest_cycle(graph, start, set(comp))[:-1]
            k = ring.index(min(ring))
            ring = ring[k:] + ring[:k]
            found.add((*ring, ring[0]))
    return [list(c) for c in sorted(found, key=lambda c: (len(c), c))]


def describe(cycle: list[str], graph: dict[str, dict[str, int]], files: dict[str, Path]) -> str:
    """'a -> b (a.py:12) -> a (b.py:3)': each edge with the line that makes it."""
    steps = [cycle[0]]
    for a, b in itertools.pairwise(cycle):
        steps.append(f"{b} ({files[a].relative_to(SRC)}:{graph[a][b]})")
    return " -> ".join(steps)


# --- the graph builder itself, on a tiny fake package ------------------------------------


def test_graph_builder_on_a_fake_package(tmp_path: Path) -> None:
    pkg = tmp_path / ROOT_PACKAGE
    (pkg / "data").mkdir(parents=True)
    (pkg / "cli").mkdir()
    files = {
        "__init__.py": "from ntksap.a import f\nfrom ntksap import data\n",
        "a.py": "import os\nfrom . import b\n\ndef g():\n    from ntksap.data import loaders\n",
        "b.py": (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ntksap import a\n"
            "from ntksap import helper_name\n"
        ),
        "data/__init__.py": "from .loaders import load\n",
        "data/loaders.py": "from ..a import f\nimport ntksap.cli.main\n",
        "cli/__init__.py": "",
        "cli/main.py": "import ntksap\n",
    }
    for rel, text in files.items():
        (pkg / rel).write_text(text)
    graph, _ = import_graph(tmp_path)
    assert graph["ntksap"] == {"ntksap.a": 1, "ntksap.data": 2}
    assert graph["ntksap.a"] == {"ntksap.b": 2, "ntksap.data.loaders": 5}  # function level
    assert graph["ntksap.b"] == {"ntksap": 4}  # a name, not a module: the package itself
    assert graph["ntksap.data"] == {"ntksap.data.loaders": 1}
    assert graph["ntksap.data.loaders"] == {"ntksap.a": 1, "ntksap.cli.main": 2}
    assert strongly_connected(graph) == [
        ["ntksap", "ntksap.a", "ntksap.b", "ntksap.cli.main", "ntksap.data", "ntksap.data.loaders"]
    ]
    assert cycles(graph) == [
        ["ntksap.a", "ntksap.data.loaders", "ntksap.a"],  # through the function-level import
        ["ntksap", "ntksap.a", "ntksap.b", "ntksap"],
        ["ntksap", "ntksap.a", "ntksap.data.loaders", "ntksap.cli.main", "ntksap"],
        ["ntksap", "ntksap.data", "ntksap.data.loaders", "ntksap.cli.main", "ntksap"],
    ]
    acyclic = {"x": {"y": 1}, "y": {"z": 1}, "z": {"w": 1}, "w": {}}
    assert cycles(acyclic) == [] and cycles({**acyclic, "w": {"y": 1}}) == [["w", "y", "z", "w"]]


# --- the real package ------------------------------------------------------------------------


def test_ntksap_import_graph_has_no_cycle() -> None:
    graph, files = import_graph()
    assert len(graph) > 10 and "ntksap.attach" in graph
    components = strongly_connected(graph)
    lines = [f"modules importing one another: {', '.join(c)}" for c in components]
    lines += [f"cycle: {describe(c, graph, files)}" for c in cycles(graph)]
    print("\n".join(lines) or "no import cycle")
    assert not components, (
        f"{len(components)} group(s) of ntksap modules import one another:\n  " + "\n  ".join(lines)
    )


def test_library_modules_do_not_import_the_command_line() -> None:
    graph, files = import_graph()
    bad = [
        f"{m} imports {t} ({files[m].relative_to(SRC)}:{line})"
        for m, targets in sorted(graph.items())
        if not is_cli(m) and m not in CLI_ENTRY_POINTS
        for t, line in sorted(targets.items())
        if is_cli(t)
    ]
    print("\n".join(bad) or "no library module imports ntksap.cli")
    assert not bad, "library modules import the command line:\n  " + "\n  ".join(bad)


_RUNTIME_CHECK = textwrap.dedent(
    """
    import importlib, pkgutil, sys

    import ntksap

    def is_cli(name):
        return name == "ntksap.cli" or name.startswith("ntksap.cli.")

    culprits = ["ntksap"] if "ntksap.cli" in sys.modules else []

    def walk(path, prefix):
        # not pkgutil.walk_packages: it imports every package, ntksap.cli included
        for info in pkgutil.iter_modules(path, prefix):
            if is_cli(info.name) or info.name == "ntksap.__main__":
                continue
            had_cli = "ntksap.cli" in sys.modules
            module = importlib.import_module(info.name)
            if not had_cli and "ntksap.cli" in sys.modules:
                culprits.append(info.name)
            if info.ispkg:
                walk(module.__path__, info.name + ".")

    walk(ntksap.__path__, "ntksap.")
    loaded = sorted(m for m in sys.modules if m.startswith("ntksap"))
    print("imported", len(loaded), "ntksap modules")
    assert not any(is_cli(m) for m in sys.modules), (
        "importing the library loaded the command line; first loaded by: " + ", ".join(culprits)
    )
    """
)


def test_importing_the_library_does_not_load_the_command_line() -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-c", _RUNTIME_CHECK],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


_LAZY_CHECK = """
import sys
import ntksap
heavy = ("ntksap.sparse", "ntksap.compact", "ntksap.export", "onnx", "torch_pruning")
assert not [m for m in heavy if m in sys.modules], [m for m in heavy if m in sys.modules]
assert callable(ntksap.sparse.convert) and callable(ntksap.sparse.save)
assert callable(ntksap.compact.compact) and callable(ntksap.export.export)
"""


def test_deployment_submodules_load_on_first_use() -> None:
    """`import ntksap` does not pull in the deployment code (onnx, torch-pruning, C++
    kernels), yet `ntksap.sparse.convert(...)` works after a plain `import ntksap`."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-c", _LAZY_CHECK], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


if __name__ == "__main__":  # python tests/test_import_graph.py: print the cycles
    g, f = import_graph()
    for c in cycles(g):
        print(describe(c, g, f))
    sys.exit(pytest.main([__file__, "-q"]))
