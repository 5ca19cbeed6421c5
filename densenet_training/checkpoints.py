"""Checkpoints: a directory per epoch with the canonical model state, the optimiser's state and
a small JSON; ``latest.json`` points at the newest complete one and is written last."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Dict, Optional

import numpy as np

import densenet_spec as spec
from densenet_training import data as dataset_lib
from densenet_training.recipe import CHECKPOINT_FORMAT, MOMENTUM_CONVENTION
from densenet_weights import files

def checkpoints_dir(out) -> Path:
    return Path(out) / "checkpoints"


def latest_checkpoint(out) -> Optional[Path]:
    """The newest complete checkpoint directory of the run in ``out``, or None."""
    pointer = checkpoints_dir(out) / "latest.json"
    if not pointer.exists():
        return None
    d = checkpoints_dir(out) / json.loads(pointer.read_text())["dir"]
    return d if (d / "checkpoint.json").exists() else None


def write_checkpoint(out, epoch: int, model_state: Dict[str, np.ndarray],
                     optimizer_state: Dict[str, np.ndarray], info: dict,
                     config: Optional[spec.Preset] = None) -> Path:
    """Write epoch ``epoch``'s checkpoint and point latest.json at it; older ones are removed.

    Files: model.safetensors (canonical state, densenet_weights.files), optimizer.safetensors
    (momentum buffers under the canonical parameter names and layout, in PyTorch's convention:
    float32, or float64 where a backend converts from its own convention and float32 would not
    round-trip, i.e. MXNet's; empty for plain SGD, which keeps no state) and checkpoint.json
    (epoch, optimiser settings and step count, the run's settings and its history so far). Written into a temporary directory renamed into place, then
    latest.json replaced: a kill at any moment leaves the previous checkpoint usable.
    """
    from safetensors.numpy import save_file
    root = checkpoints_dir(out)
    root.mkdir(parents=True, exist_ok=True)
    name = f"epoch-{epoch:04d}"
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    files.save_state(model_state, tmp / "model.safetensors", config)
    save_file({k: np.ascontiguousarray(v, dtype=np.float64 if v.dtype == np.float64 else np.float32)
               for k, v in optimizer_state.items()},
              str(tmp / "optimizer.safetensors"), metadata={"format": CHECKPOINT_FORMAT})
    (tmp / "checkpoint.json").write_text(json.dumps(
        {"format": CHECKPOINT_FORMAT, "epoch": epoch, "model": "model.safetensors",
         "optimizer_file": "optimizer.safetensors", **info}, indent=1))
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer_tmp = root / "latest.json.tmp"
    pointer_tmp.write_text(json.dumps({"epoch": epoch, "dir": name}))
    os.replace(pointer_tmp, root / "latest.json")
    for old in root.glob("epoch-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(directory) -> tuple:
    """(model state, optimizer arrays, info) of a checkpoint directory."""
    from safetensors.numpy import load_file
    directory = Path(directory)
    info = json.loads((directory / "checkpoint.json").read_text())
    state, _ = files.load_state(directory / info["model"])
    opt = load_file(str(directory / info["optimizer_file"]))
    return state, opt, info


def optimizer_info(lr: float, momentum: float, step: int) -> dict:
    return {"name": "sgd", "lr": lr, "momentum": momentum, "weight_decay": 0.0, "step": step,
            "buffers": "momentum_buffer per parameter" if momentum else "none",
            "convention": MOMENTUM_CONVENTION,
            "note": ("plain SGD without momentum keeps no state: the step count and settings are "
                     "all there is") if not momentum else ""}


def data_fingerprint(dataset: "dataset_lib.Dataset") -> str:
    h = hashlib.sha256()
    for a in (dataset.train_images, dataset.train_labels, dataset.test_images, dataset.test_labels):
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]
