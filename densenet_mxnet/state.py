"""Canonical state for MXNet Gluon: torchvision's names, PyTorch layout. Gluon's layouts are
already PyTorch's (Conv2D weights OIHW, Dense weights [out, in]), and the model's structural
parameter names are torchvision's except for BatchNorm's gamma / beta (weight / bias), so the
conversion is names, dtype and context. This is the only place where it happens.
Same functions as densenet_torch/state.py and densenet_flax/state.py."""
from __future__ import annotations

from typing import Dict

import mxnet as mx
import numpy as np

import densenet_spec as spec
from densenet_weights import files

# Gluon's BatchNorm parameter names -> PyTorch's; running_mean / running_var and the
# weight / bias of Conv2D and Dense are already the same.
_TO_CANONICAL = {"gamma": "weight", "beta": "bias"}


def _canonical_params(model) -> Dict[str, mx.gluon.Parameter]:
    """canonical name -> Gluon Parameter (trainable ones and BatchNorm running statistics).

    The structural names come from the attribute / child names ('features.norm0.gamma'),
    not from Gluon's global parameter names ('batchnorm0_gamma')."""
    out = {}
    for name, param in model._collect_params_with_prefix().items():
        path, _, leaf = name.rpartition(".")
        out[f"{path}.{_TO_CANONICAL.get(leaf, leaf)}"] = param
    return out


def export_state(model) -> Dict[str, np.ndarray]:
    """name -> float32 numpy array, torchvision names, PyTorch layout (OIHW, [out, in]). A
    model on several contexts gives the average of each parameter's copies, as Gluon's
    ``save_parameters`` does (they differ in the running statistics of data-parallel
    training; the trainable parameters are equal)."""
    return {k: _average(p).astype(np.float32, copy=True)
            for k, p in _canonical_params(model).items()}


def _average(param) -> np.ndarray:
    copies = param.list_data()
    if len(copies) == 1:
        return copies[0].asnumpy()
    return np.mean([c.asnumpy().astype(np.float64) for c in copies], axis=0)


def _set(param, value: np.ndarray) -> None:
    # As Gluon's own Block.load_parameters: set the value on every context the parameter lives
    # on, or, if it was never initialised, initialise it with the value on the current context.
    try:
        ctx = param.list_ctx()
    except RuntimeError:
        ctx = [mx.current_context()]
    param._load_init(mx.nd.array(value, ctx=ctx[0], dtype=np.float32), ctx)


def load_state(model, state: Dict[str, np.ndarray]) -> None:
    """Load a canonical state into ``model``: all or nothing. Old-style torchvision keys
    (``norm.1``) are accepted. Every missing, unexpected or misshapen tensor is reported."""
    state = spec.remap_legacy_keys({k: v for k, v in state.items()
                                    if not k.endswith("num_batches_tracked")})
    spec.check_state(model.config, {k: tuple(np.shape(v)) for k, v in state.items()})
    own = _canonical_params(model)
    for k, v in state.items():
        _set(own[k], np.asarray(v, dtype=np.float32))


def save(model, path) -> None:
    files.save_state(export_state(model), path, model.config)


def load(model, path) -> None:
    state, _ = files.load_state(path)
    load_state(model, state)
