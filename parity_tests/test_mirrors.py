"""The three backends are mirrors: the same files, and in each file the same public names in the
same order, apart from a few framework-specific extras named here with their reason. Read from
the source with ``ast`` (MXNet is not importable in the main environment)."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List

import pytest

ROOT = Path(__file__).resolve().parent.parent
MIRRORS = ("torch", "mxnet", "flax")
FILES = ("__init__.py", "model.py", "state.py", "runtime.py", "adapter.py", "summary.py",
         "train.py", "parallel.py")
#: Files one mirror has beyond the shared ones.
EXTRA_FILES = {
    "mxnet": {"worker.py": "serves the adapter in the MXNet environment"},
    "flax": {"linen.py": "the book's linen version beside NNX"},
}
#: Public names one mirror's file has beyond the shared ones, and why.
EXTRA_NAMES: Dict[str, Dict[str, Dict[str, str]]] = {
    "model.py": {
        "mxnet": {"MemoryEfficientUnsupported": "Gluon's clear error for memory_efficient=True"},
        "flax": {"batch_norm_train": "PyTorch's BatchNorm semantics, shared with linen.py",
                 "normalize": "the same", "BatchNorm": "the same",
                 "Sequential": "nnx.Sequential names its layers 0, 1, ..., not torchvision's"},
    },
    "state.py": {
        "flax": {"to_canonical": "Flax trees (params, batch_stats, gradients) to canonical",
                 "from_canonical": "and back"},
    },
    "runtime.py": {
        "flax": {"abstract": "NNX models built by nnx.eval_shape (no initialiser compiled)",
                 "numerics": "JAX's precision and float64 (x64) context",
                 "nhwc": "Flax's NHWC input", "targets": "labels or regression targets as JAX arrays",
                 "loss": "cross-entropy or MSE, shared with parallel.py",
                 "linen_loss": "linen's functional train-mode loss",
                 "sgd": "optax's SGD update, compiled once",
                 "jit_in_pieces": "a large JAX program compiled as consecutive pieces (XLA's "
                                  "compile time on the CPU grows faster than the program)"},
    },
    "train.py": {
        "flax": {"enable_compilation_cache": "JAX's persistent compilation cache",
                 "Optimizer": "optax has no stateful optimizer object"},
    },
}


def public_names(path: Path) -> List[str]:
    """Top-level public functions and classes, in order of definition."""
    tree = ast.parse(path.read_text())
    return [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))
            and not n.name.startswith("_")]


def test_same_files():
    for m in MIRRORS:
        have = {p.name for p in (ROOT / f"densenet_{m}").glob("*.py")}
        assert have == set(FILES) | set(EXTRA_FILES.get(m, {})), m


@pytest.mark.parametrize("name", [f for f in FILES if f != "__init__.py"])
def test_same_public_names_in_the_same_order(name):
    shared = None
    for m in MIRRORS:
        extras = EXTRA_NAMES.get(name, {}).get(m, {})
        names = public_names(ROOT / f"densenet_{m}" / name)
        assert set(extras) <= set(names), f"{m}/{name}: documented extras gone: {set(extras) - set(names)}"
        own = [n for n in names if n not in extras]
        if shared is None:
            shared = own
        assert own == shared, f"densenet_{m}/{name} differs from densenet_torch/{name}: {own} != {shared}"


def test_same_exports():
    """Each package's ``__all__`` and model.py's ``__all__``: the book's names, the presets."""
    def all_of(path):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets):
                return ast.literal_eval(node.value)
        return None
    for f in ("__init__.py", "model.py"):
        got = {m: all_of(ROOT / f"densenet_{m}" / f) for m in MIRRORS}
        assert got["torch"] is not None and got["torch"] == got["mxnet"] == got["flax"], (f, got)
