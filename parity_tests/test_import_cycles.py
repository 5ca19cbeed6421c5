"""No import loops: within every package, each module imports only modules below or beside it,
never one that (through others) imports it back.

The graph is read from the sources with ``ast`` (nothing is imported to find out), one node per
module of the packages in test_floors.FLOORS, one edge per ``import`` or ``from ... import``
statement anywhere in a module (inside a function too: a lazy import is still a dependency),
resolved to a module of this repository: ``import a.b.c`` is an edge to ``a.b.c``; ``from pkg
import name`` is an edge to ``pkg.name`` where that is a module (a submodule), else to ``pkg``
(its ``__init__``); relative imports are resolved against the importing module's package.
Imports of anything outside the repository are not edges. A loop is a strongly connected
component of more than one module; each is named by the shortest cycle through each of its
modules, as ``a -> b -> a``.

Run as a script (``python parity_tests/test_import_cycles.py [PACKAGE ...]``) it prints every
loop of the packages named (default: all of FLOORS) and exits 1 if there is one.
"""
from __future__ import annotations

import ast
import sys
from collections import deque
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Set

import pytest

ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__":  # run as a script: the repository's packages on the path
    sys.path.insert(0, str(ROOT))

from parity_tests.test_floors import FLOORS  # noqa: E402


def module_name(path: Path, root: Path = ROOT) -> str:
    """'densenet_parity/checking/engine.py' -> 'densenet_parity.checking.engine'; a package's
    __init__.py is the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources(packages: Iterable[str], root: Path = ROOT) -> Dict[str, tuple]:
    """module -> (source, is a package) for every .py file of ``packages``."""
    out = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            out[module_name(path, root)] = (path.read_text(), path.name == "__init__.py")
    return out


def _known(name: str, modules: Set[str]):
    """The longest prefix of a dotted name that is a module of ours, or None."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return None


def graph(mods: Mapping[str, tuple]) -> Dict[str, Set[str]]:
    """module -> the modules of ``mods`` it imports (see the module's docstring)."""
    names = set(mods)
    edges: Dict[str, Set[str]] = {m: set() for m in mods}
    for module, (source, is_package) in mods.items():
        here = module if is_package else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(source)):
            targets = []
            if isinstance(node, ast.Import):
                targets = [_known(a.name, names) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = here.split(".")[:len(here.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in names else _known(base, names))
            edges[module].update(t for t in targets if t and t != module)
    return edges


def components(edges: Mapping[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    out: List[List[str]] = []

    def visit(v):  # iterative: a deep import chain must not hit the recursion limit
        work = [(v, iter(sorted(edges[v])))]
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(out)


def _shortest_cycle(start: str, edges: Mapping[str, Set[str]], within: Set[str]) -> List[str]:
    """The shortest path start -> ... -> start inside one component (breadth first)."""
    prev: Dict[str, str] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(edges[v] & within):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(prev[path[-1]])
                return path[::-1] + [start]
            if w not in prev:
                prev[w] = v
                queue.append(w)
    return [start]


def cycles(edges: Mapping[str, Set[str]]) -> List[str]:
    """Every loop, as 'a -> b -> a': per component, the shortest cycle through each module
    (the same cycle named once, from its first module in sorted order)."""
    out: List[str] = []
    for comp in components(edges):
        for start in comp:
            path = _shortest_cycle(start, edges, set(comp))[:-1]
            i = path.index(min(path))
            line = " -> ".join(path[i:] + path[:i] + [min(path)])
            if line not in out:
                out.append(line)
    return out


def test_the_detector_finds_a_planted_cycle():
    """The check can fail: a loop through a lazy import, a relative import and a
    ``from package import submodule`` is found and named; a module importing its own package's
    names from a sibling, and imports from outside, are no loop."""
    mods = {
        "pkg": ("from pkg.a import f\n", True),
        "pkg.a": ("import numpy\nfrom . import b\ndef f():\n    pass\n", False),
        "pkg.b": ("def g():\n    from pkg.sub import c\n", False),
        "pkg.sub": ("", True),
        "pkg.sub.c": ("from ..a import f\nimport os.path\n", False),
        "pkg.d": ("from pkg import a, sub\nfrom pkg.sub import c\n", False),
        "other": ("import pkg.d\nfrom pkg import f\n", False),
    }
    edges = graph(mods)
    assert edges["pkg.b"] == {"pkg.sub.c"} and edges["pkg.d"] == {"pkg.a", "pkg.sub", "pkg.sub.c"}
    assert edges["other"] == {"pkg.d", "pkg"} and edges["pkg.sub.c"] == {"pkg.a"}
    assert components(edges) == [["pkg.a", "pkg.b", "pkg.sub.c"]]
    assert cycles(edges) == ["pkg.a -> pkg.b -> pkg.sub.c -> pkg.a"]
    # two loops through one module: each named
    mods["pkg.sub"] = ("from pkg.d import x\n", True)
    assert cycles(graph(mods)) == ["pkg.a -> pkg.b -> pkg.sub.c -> pkg.a",
                                   "pkg.d -> pkg.sub -> pkg.d"]


@pytest.mark.parametrize("package", sorted(FLOORS))
def test_no_import_loops(package):
    found = cycles(graph(sources([package])))
    assert not found, f"import loops in {package}:\n" + "\n".join(found)


def test_no_import_loops_across_packages():
    """Floors already forbid an upward import; this says so for the graph as a whole."""
    found = cycles(graph(sources(FLOORS)))
    assert not found, "import loops:\n" + "\n".join(found)


if __name__ == "__main__":
    loops = cycles(graph(sources(sys.argv[1:] or FLOORS)))
    print("\n".join(loops) if loops else "no import loops")
    sys.exit(1 if loops else 0)
