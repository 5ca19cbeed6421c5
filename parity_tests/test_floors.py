"""The packages form floors, each importing only from the floors below it (DESIGN.md section 1).

Read from the import graph: every ``import`` and ``from ... import`` statement of every module,
at module level or inside a function (a lazy import is still a dependency), parsed with ``ast``
(nothing is imported to find out). Imports by name in a string (``importlib.import_module``,
``python -m``) are not statements and are not seen: the backend registry's reach down to the
mirrors, and the command line runs the benchmarks of a checkout as a program, never importing
them.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: package -> floor. A package may import its own modules and any package on a lower floor.
#: densenet_training sits above densenet_weights: its checkpoints are canonical safetensors
#: files. The three mirrors share a floor and never import one another.
FLOORS: Dict[str, int] = {
    "densenet_spec": 1,
    "densenet_weights": 2,
    "densenet_training": 3,
    "densenet_torch": 4, "densenet_mxnet": 4, "densenet_flax": 4,
    "densenet_parity": 5,
    "densenet_cli": 6,
    "parity_tests": 7, "benchmarks": 7,
}
TOP = max(FLOORS.values())  # the suite and the benchmarks: they may use each other
FRAMEWORKS = {"torch", "torchvision", "mxnet", "jax", "jaxlib", "flax", "optax", "onnx",
              "onnxruntime", "onnxscript", "keras", "h5py"}


def imports(source: str, package: str) -> Iterator[Tuple[int, str, bool]]:
    """(line, imported module, at module level?) for every import statement of a module of
    ``package`` (relative imports resolved against it)."""
    tree = ast.parse(source)
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, id(node) in top_level
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                module = package + ("." + module if module else "")
            yield node.lineno, module, id(node) in top_level


def violations(source: str, package: str, where: str) -> List[str]:
    """Every import in ``source`` (a module of ``package``) that reaches a higher floor, or a
    package on the same floor other than its own."""
    out = []
    for line, module, _ in sorted(imports(source, package)):
        target = module.split(".")[0]
        if target not in FLOORS or target == package:
            continue
        if FLOORS[target] < FLOORS[package] or FLOORS[target] == FLOORS[package] == TOP:
            continue
        out.append(f"{where}:{line}: {package} (floor {FLOORS[package]}) imports {module} "
                   f"(floor {FLOORS[target]})")
    return out


def modules(package: str) -> Iterator[Tuple[Path, str]]:
    for path in sorted((ROOT / package).rglob("*.py")):
        yield path, path.read_text()


def test_every_package_is_on_a_floor():
    found = {p.parent.name for p in ROOT.glob("*/__init__.py") if not p.parent.name.startswith(".")}
    assert found == set(FLOORS), (f"packages without a floor: {sorted(found - set(FLOORS))}; "
                                  f"floors without a package: {sorted(set(FLOORS) - found)}")


def test_no_package_imports_a_higher_floor():
    bad = [v for package in FLOORS for path, src in modules(package)
           for v in violations(src, package, str(path.relative_to(ROOT)))]
    assert not bad, "\n".join(bad)


def test_the_check_sees_upward_lazy_and_relative_imports():
    """The check itself can fail: an upward import is reported wherever it is written."""
    src = ("import densenet_spec\n"
           "from densenet_weights import files\n"
           "def f():\n    from densenet_parity.backends import make_backend\n"
           "from . import adapter\n"
           "import densenet_flax.model\n")
    got = violations(src, "densenet_torch", "x.py")
    assert got == ["x.py:4: densenet_torch (floor 4) imports densenet_parity.backends (floor 5)",
                   "x.py:6: densenet_torch (floor 4) imports densenet_flax.model (floor 4)"]
    assert violations("from parity_tests import conftest\n", "densenet_parity", "y.py") == [
        "y.py:1: densenet_parity (floor 5) imports parity_tests (floor 7)"]


def test_the_spec_is_pure_python():
    """densenet_spec: the standard library and nothing else (no numpy, no framework), so it
    imports in both environments and anywhere."""
    bad = []
    for path, src in modules("densenet_spec"):
        for line, module, _ in imports(src, "densenet_spec"):
            top = module.split(".")[0]
            if top != "densenet_spec" and top not in sys.stdlib_module_names:
                bad.append(f"{path.relative_to(ROOT)}:{line}: imports {module}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("package", ["densenet_weights", "densenet_training"])
def test_framework_free_floors_import_frameworks_only_lazily(package):
    """The weights and training packages run in both environments: a framework is imported
    inside the function that needs it (one file format), never when the module loads."""
    bad = [f"{path.relative_to(ROOT)}:{line}: imports {module} at module level"
           for path, src in modules(package)
           for line, module, top_level in imports(src, package)
           if top_level and module.split(".")[0] in FRAMEWORKS]
    assert not bad, "\n".join(bad)


def test_the_installed_packages_are_the_library_floors():
    """``pip install densenet-suite`` installs floors 1 to 6 and neither the suite nor the
    benchmarks (nothing a user's program imports lives in parity_tests/)."""
    import tomllib
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include: Set[str] = set(conf["tool"]["setuptools"]["packages"]["find"]["include"])
    assert include == {p for p, f in FLOORS.items() if f < TOP}
    assert conf["project"]["scripts"] == {"densenet": "densenet_cli.main:main"}
