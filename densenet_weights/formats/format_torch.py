"""PyTorch: a state_dict saved with ``torch.save`` (.pt, .pth, .bin), read with
``torch.load(weights_only=True)``: tensors and containers only, never code. Our model's file
(--to torch) has torchvision's names, so a torchvision DenseNet loads it too."""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Iterator, Mapping, Tuple

import numpy as np

from densenet_weights.formats.common import WeightsFormatError

FORMAT = "torch"
SUFFIXES = (".pt", ".pth", ".bin")
LAYOUT = "torch"
NATURAL = False
NATIVE = ("torch",)


def sniff(head: bytes, path: str) -> bool:
    """torch.save's zip archive, or the legacy pickle format."""
    return head[:4] == b"PK\x03\x04" or head[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04")


def read(path) -> "OrderedDict[str, np.ndarray]":
    """A state_dict saved with torch.save (a checkpoint's 'state_dict' / 'model' entry too),
    read with ``torch.load(weights_only=True)``: tensors and containers only, never code."""
    try:
        import torch
    except ImportError:
        raise WeightsFormatError("reading a PyTorch file needs torch (the main environment: "
                                 "`make env`)") from None
    try:
        obj = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle with anything but tensors and containers is refused
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        why = next((ln for ln in lines if ln.startswith("WeightsUnpickler error")),
                   lines[0] if lines else "")
        raise WeightsFormatError(
            f"{path}: refused: torch.load(weights_only=True) cannot read it ({why}). Only plain "
            "state_dicts are accepted; arbitrary pickles are never unpickled") from None
    for key in ("state_dict", "model", "model_state_dict", "net"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(hasattr(v, "shape") for v in obj.values()):
        raise WeightsFormatError(f"{path}: not a state_dict (a mapping of names to tensors)")
    out = OrderedDict()
    for k, v in obj.items():
        k = k[len("module."):] if k.startswith("module.") else k  # DataParallel's prefix
        v = v.detach().cpu()
        out[k] = v.numpy() if v.dtype != torch.bfloat16 else v.float().numpy()
    return out


def write(path, tensors: Mapping[str, np.ndarray]) -> None:
    import torch
    torch.save(OrderedDict((k, torch.from_numpy(np.ascontiguousarray(v)))
                           for k, v in tensors.items()), path)


def native(module: str, leaf: str, a: np.ndarray, is_bn: bool,
           target: str) -> Iterator[Tuple[str, np.ndarray]]:
    """torchvision's names, with the ``num_batches_tracked`` counters a state_dict has."""
    yield f"{module}.{leaf}", a
    if leaf == "running_var":
        yield f"{module}.num_batches_tracked", np.array(0, np.int64)
