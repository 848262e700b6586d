"""The package's modules import each other without cycles (module-level and function-local
imports alike): a cycle hidden by a function-local import still ties the two modules together."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "osteo"


def import_graph(package_dir: Path, package: str = "osteo") -> dict:
    """{module: {modules of the same package it imports}} from the AST of ``package_dir/*.py``:
    ``from . import x``, ``from .x import y``, ``from osteo.x import y``, ``import osteo.x``, at any
    depth (inside functions too). The package's ``__init__`` is left out as a target: importing
    it from a module is the package importing itself."""
    mods = {p.stem for p in package_dir.glob("*.py")}
    graph = {}
    for path in sorted(package_dir.glob("*.py")):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 or node.module == package or (node.module or "").startswith(package + "."):
                    base = node.module or "" if node.level == 1 else (node.module or "")[len(package) + 1:]
                    if base:
                        deps.add(base.split(".")[0])
                    else:  # from . import x, y: the names are modules (or names of __init__)
                        deps.update(a.name for a in node.names if a.name in mods)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith(package + "."):
                        deps.add(a.name.split(".")[1])
        graph[path.stem] = {d for d in deps if d in mods and d != "__init__" and d != path.stem}
    return graph


def find_cycle(graph: dict) -> list | None:
    """One cycle as [a, b, ..., a], or None (depth-first search)."""
    state = {}  # 1: on the current path, 2: done
    stack = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycle_in_the_package():
    graph = import_graph(PACKAGE)
    assert {"experiments", "plots", "synthetic"} <= set(graph)  # it read the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_plots_do_not_import_experiments():
    assert "experiments" not in import_graph(PACKAGE)["plots"]


@pytest.mark.parametrize("style", [
    ("from .b import f", "from .a import g"),  # module level, relative
    ("from . import b", "def g():\n    from . import a\n    return a"),  # hidden in a function
    ("import osteo.b", "def g():\n    from osteo.a import f\n    return f"),  # absolute
])
def test_the_checker_catches_a_cycle(tmp_path, style):
    (tmp_path / "a.py").write_text(style[0] + "\n")
    (tmp_path / "b.py").write_text(style[1] + "\n")
    (tmp_path / "c.py").write_text("from .a import f\n")  # not part of the cycle
    graph = import_graph(tmp_path)
    assert graph["a"] == {"b"} and graph["b"] == {"a"} and graph["c"] == {"a"}
    cycle = find_cycle(graph)
    assert cycle in (["a", "b", "a"], ["b", "a", "b"])


def test_the_checker_passes_a_chain(tmp_path):
    (tmp_path / "a.py").write_text("from .b import f\nfrom . import c\n")
    (tmp_path / "b.py").write_text("def f():\n    from .c import h\n    return h\n")
    (tmp_path / "c.py").write_text("import numpy\nfrom . import __init__ as pkg\n")
    graph = import_graph(tmp_path)
    assert graph == {"a": {"b", "c"}, "b": {"c"}, "c": set()}
    assert find_cycle(graph) is None
