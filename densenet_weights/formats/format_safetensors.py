"""safetensors: tensors and a JSON header, no pickle. Our canonical files (--to canonical,
``densenet_weights.files``) are safetensors with torchvision's names, PyTorch's layout and the
preset in the metadata, which ``load`` reads with the tensors, in one open."""
from __future__ import annotations

import os
import struct
from collections import OrderedDict
from typing import Iterator, Mapping, Tuple

import numpy as np

from densenet_weights.formats.common import Loaded, WeightsFormatError, by_structure

FORMAT = "safetensors"
SUFFIXES = (".safetensors",)
LAYOUT = "torch"
NATURAL = True  # a safetensors file keeps its tensors sorted by name, not in the model's order
NATIVE = ("canonical",)


def sniff(head: bytes, path: str) -> bool:
    """A u64 header length (less than the file) and the JSON header's '{'."""
    if len(head) >= 9 and head[8:9] == b"{":
        n = struct.unpack("<Q", head[:8])[0]
        return 0 < n < os.path.getsize(path)
    return False


def _open(path):
    """(tensors, metadata) of a safetensors file."""
    from safetensors import safe_open
    try:
        with safe_open(os.fspath(path), framework="numpy") as f:
            return OrderedDict((k, f.get_tensor(k)) for k in f.keys()), f.metadata() or {}
    except Exception as e:  # safetensors raises its own types for a bad file
        raise WeightsFormatError(f"{path}: not a readable safetensors file ({e})") from None


def read(path) -> "OrderedDict[str, np.ndarray]":
    return _open(path)[0]


def load(path, preset=None, **options) -> Loaded:
    """The tensors and the preset our canonical files record, read in one open."""
    from densenet_weights.files import config_of
    tensors, meta = _open(path)
    return by_structure(path, FORMAT, LAYOUT, NATURAL, tensors, preset, config_of(meta),
                        **options)


def write(path, tensors: Mapping[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path)


def native(module: str, leaf: str, a: np.ndarray, is_bn: bool,
           target: str) -> Iterator[Tuple[str, np.ndarray]]:
    """The canonical names themselves."""
    yield f"{module}.{leaf}", a
