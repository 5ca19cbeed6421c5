"""Canonical state for PyTorch. The canonical form *is* PyTorch's layout with torchvision's
names, so the conversion is only dtype, device and dropping ``num_batches_tracked``.
Same functions as densenet_mxnet/state.py and densenet_flax/state.py."""
from __future__ import annotations

from typing import Dict

import numpy as np
import torch

import densenet_spec as spec
from densenet_weights import files


def export_state(model) -> Dict[str, np.ndarray]:
    """name -> float32 numpy array, torchvision names, PyTorch layout (OIHW, [out, in])."""
    return {k: v.detach().to("cpu", torch.float32).numpy().copy()
            for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def load_state(model, state: Dict[str, np.ndarray]) -> None:
    """Load a canonical state into ``model``: all or nothing. Old-style torchvision keys
    (``norm.1``) are accepted. Every missing, unexpected or misshapen tensor is reported."""
    state = spec.remap_legacy_keys({k: v for k, v in state.items()
                                    if not k.endswith("num_batches_tracked")})
    spec.check_state(model.config, {k: tuple(np.shape(v)) for k, v in state.items()})
    own = model.state_dict()
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(torch.as_tensor(np.asarray(v)))


def save(model, path) -> None:
    files.save_state(export_state(model), path, model.config)


def load(model, path) -> None:
    state, _ = files.load_state(path)
    load_state(model, state)
