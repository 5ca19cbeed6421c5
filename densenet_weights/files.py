"""Canonical state files: safetensors, float32, torchvision names, PyTorch layout.

Needs numpy and safetensors (both environments have them); no deep-learning framework.
No pickle ever crosses a framework boundary: these files hold tensors and a JSON header.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional, Tuple

import numpy as np

import densenet_spec as spec

FORMAT = "densenet-suite/canonical-v1"


def save_state(state: Dict[str, np.ndarray], path, config: Optional[spec.Preset] = None) -> None:
    """Write a canonical state (name -> float32 array) to a safetensors file."""
    from safetensors.numpy import save_file
    meta = {"format": FORMAT}
    if config is not None:
        meta["config"] = json.dumps(config.to_dict())
    arrays = {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in state.items()}
    tmp = f"{os.fspath(path)}.tmp"
    save_file(arrays, tmp, metadata=meta)
    os.replace(tmp, path)


def load_state(path) -> Tuple[Dict[str, np.ndarray], Optional[spec.Preset]]:
    """Read a canonical safetensors file: (state, config or None)."""
    from safetensors import safe_open
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such state file: {path}")
    try:
        with safe_open(os.fspath(path), framework="numpy") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own types for a non-safetensors file
        raise ValueError(f"{path} is not a safetensors file ({e})") from None
    return state, config_of(meta)


def config_of(metadata: Dict[str, str]) -> Optional[spec.Preset]:
    """The preset a canonical file's metadata records (save_state's ``config``), or None."""
    cfg = metadata.get("config")
    return spec.Preset.from_dict(json.loads(cfg)) if cfg else None


def split_arrays(result: dict) -> dict:
    """The entries of a result that are dicts of numpy arrays (an adapter's "arrays",
    "grads"), flattened to "<entry>/<name>" for one safetensors file, dtype kept (float64
    results stay float64). Used by the MXNet worker to send results across processes."""
    out = {}
    for key, value in result.items():
        if isinstance(value, dict) and value and all(isinstance(a, np.ndarray)
                                                    for a in value.values()):
            for name, a in value.items():
                out[f"{key}/{name}"] = np.ascontiguousarray(a)
    return out


ORDER = "__order__"  # a result's key in JSON: each array group's names in their order


def array_order(packed: dict) -> dict:
    """The order of the names in each group of split_arrays' output (a safetensors file keeps
    its tensors sorted by name; the order of a model's tensors is part of its structure)."""
    order: dict = {}
    for key in packed:
        group, name = key.split("/", 1)
        order.setdefault(group, []).append(name)
    return order


def join_arrays(result: dict, arrays: dict) -> dict:
    """The inverse of split_arrays: ``result`` with the flattened ``arrays`` put back, in the
    order that ``result[ORDER]`` (array_order's) gives."""
    result = dict(result) if isinstance(result, dict) else {"value": result}
    order = result.pop(ORDER, None) or array_order(arrays)
    for group, names in order.items():
        result[group] = {name: arrays[f"{group}/{name}"] for name in names}
    return result


def write_message(directory, name: str, message: dict) -> None:
    """``message`` (JSON values plus dicts of numpy arrays) as ``<name>.json`` and
    ``<name>.npz`` in ``directory``: how a parent and the child processes of a data-parallel
    step pass states and batches (split_arrays' form; never a pickle)."""
    from pathlib import Path
    packed = split_arrays(message)
    groups = {k.split("/", 1)[0] for k in packed}
    meta = {k: v for k, v in message.items() if k not in groups}
    meta[ORDER] = array_order(packed)
    np.savez(Path(directory) / f"{name}.npz", **packed)
    (Path(directory) / f"{name}.json").write_text(json.dumps(meta))


def read_message(directory, name: str) -> dict:
    """The inverse of write_message."""
    from pathlib import Path
    with np.load(Path(directory) / f"{name}.npz", allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    return join_arrays(json.loads((Path(directory) / f"{name}.json").read_text()), arrays)
