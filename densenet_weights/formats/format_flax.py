"""Flax: a ``.msgpack`` file (``flax.serialization.to_bytes`` of a tree of arrays), read with
``flax.serialization.msgpack_restore`` and flattened with '/' between the keys, so a path reads
``params/features/conv0/kernel``. Our models' files: flax-nnx, the NNX model's state as a pure
dict, kernels HWIO and [in, out], BatchNorm's scale, bias, mean, var; flax-linen, linen's
variables, {'params', 'batch_stats'}."""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Iterator, Mapping, Tuple

import numpy as np

from densenet_weights.formats.common import WeightsFormatError

FORMAT = "flax"
SUFFIXES = (".msgpack",)
LAYOUT = "flax"
NATURAL = True  # a tree's keys are not in the model's order: Flax's automatic names, naturally
NATIVE = ("flax-nnx", "flax-linen")


def sniff(head: bytes, path: str) -> bool:
    """A msgpack map (flax.serialization.to_bytes of a dict)."""
    return bool(head[:1]) and (0x80 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF))


def read(path) -> "OrderedDict[str, np.ndarray]":
    try:
        from flax import serialization
    except ImportError:
        raise WeightsFormatError("reading a Flax msgpack file needs flax (the main environment: "
                                 "`make env`)") from None
    with open(path, "rb") as f:
        try:
            tree = serialization.msgpack_restore(f.read())
        except Exception as e:  # noqa: BLE001 - msgpack raises several types for bad bytes
            raise WeightsFormatError(f"{path}: not a Flax msgpack file ({e})") from None
    if not isinstance(tree, dict):
        raise WeightsFormatError(f"{path}: a msgpack file that is not a tree of arrays")
    return flatten(tree)


def write(path, tensors: Mapping[str, np.ndarray]) -> None:
    from flax import serialization
    with open(path, "wb") as f:
        f.write(serialization.msgpack_serialize(unflatten(tensors)))


def flatten(tree, prefix: str = "") -> "OrderedDict[str, np.ndarray]":
    """A nested dict of arrays -> 'a/b/c' -> array, in the tree's order."""
    out = OrderedDict()
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        elif hasattr(v, "shape"):
            out[key] = np.asarray(v)
        else:
            raise WeightsFormatError(f"{key}: not an array ({type(v).__name__})")
    return out


def unflatten(tensors: Mapping[str, np.ndarray]) -> Dict[str, object]:
    tree: Dict[str, object] = {}
    for key, a in tensors.items():
        node = tree
        *path, leaf = key.split("/")
        for p in path:
            node = node.setdefault(p, {})  # type: ignore[assignment]
        node[leaf] = np.ascontiguousarray(a)
    return tree


def native(module: str, leaf: str, a: np.ndarray, is_bn: bool,
           target: str) -> Iterator[Tuple[str, np.ndarray]]:
    """Paths with '/', kernels HWIO and [in, out], BatchNorm's scale, bias, mean, var; linen's
    under 'params/' or 'batch_stats/'."""
    if is_bn:
        leaf = {"weight": "scale", "running_mean": "mean", "running_var": "var"}.get(leaf, leaf)
    elif leaf == "weight":
        leaf, a = "kernel", np.ascontiguousarray(a.transpose(2, 3, 1, 0) if a.ndim == 4 else a.T)
    path = module.replace(".", "/") + "/" + leaf
    if target == "flax-linen":
        path = ("batch_stats/" if leaf in ("mean", "var") else "params/") + path
    yield path, a


def is_linen(tensors: Mapping[str, np.ndarray]) -> bool:
    """A tree of linen's variables ({'params', 'batch_stats'}), not an NNX state."""
    return any(k.startswith(("params/", "batch_stats/")) for k in tensors)
