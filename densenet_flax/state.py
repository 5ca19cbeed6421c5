"""Canonical state for Flax, NNX and linen: the one place where Flax's names and layouts are
converted to the canonical ones (torchvision's names, PyTorch layout) and back.
Same functions as densenet_torch/state.py and densenet_mxnet/state.py.

    Flax (path in the module tree)            canonical
    features/conv0/kernel    HWIO        <->  features.conv0.weight     OIHW
    features/conv0/bias                  <->  features.conv0.bias
    .../norm1/scale, bias    (params)    <->  .../norm1.weight, .bias
    .../norm1/mean, var      (batch_stats) <-> .../norm1.running_mean, .running_var
    classifier/kernel        [in, out]   <->  classifier.weight         [out, in]

The first argument is always the model, which knows its configuration. An NNX model holds its
own variables; a linen model's variables are passed alongside it and returned by loads:

    NNX                               linen
    export_state(model)               export_state(model, variables)
    load_state(model, state)          variables = load_state(model, state)
    save(model, path)                 save(model, path, variables)
    load(model, path)                 variables = load(model, path)
"""
from __future__ import annotations

from typing import Dict, Mapping

import jax
import numpy as np
from flax import nnx
from flax import traverse_util

import densenet_spec as spec
from densenet_weights import files

# Flax leaf name -> canonical leaf name. BatchNorm's scale and every kernel are both 'weight'.
_TO_CANONICAL = {"kernel": "weight", "scale": "weight", "bias": "bias",
                 "mean": "running_mean", "var": "running_var"}
_BATCH_STATS = {"running_mean": "mean", "running_var": "var"}


def _is_nnx(model) -> bool:
    return isinstance(model, nnx.Module)


def to_canonical(*trees, dtype=np.float32) -> Dict[str, np.ndarray]:
    """Flax trees (nested dicts such as linen's ``params`` / ``batch_stats``, or nnx.State:
    a model's variables or gradients) -> canonical name -> float32 numpy, PyTorch layout.
    (``dtype`` float64 only for the parity suite's double-precision checks.)"""
    out = {}
    for tree in trees:
        if isinstance(tree, nnx.State):
            tree = nnx.to_pure_dict(tree)
        for path, a in traverse_util.flatten_dict(dict(tree)).items():
            *module, leaf = (str(p) for p in path)
            if leaf not in _TO_CANONICAL:
                raise ValueError(f"not a DenseNet variable: {'/'.join(map(str, path))}")
            a = np.asarray(a, dtype=dtype)
            if leaf == "kernel":  # conv HWIO -> OIHW; dense [in, out] -> [out, in]
                a = a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T
            out[".".join(module + [_TO_CANONICAL[leaf]])] = np.ascontiguousarray(a)
    return out


def _device_array(a, dtype=None):
    """A numpy array (cast in numpy where ``dtype`` is given) on JAX's default device, copied
    as it is. Not ``jnp.asarray``: in jax 0.10 that stages a primitive and compiles one XLA
    program per new shape and dtype, ~12 ms each; loading DenseNet-264 (171 shapes) took 2.5 s
    of compiling for a copy."""
    return jax.device_put(np.asarray(a, dtype=dtype))


def from_canonical(state: Mapping[str, np.ndarray], dtype=np.float32) -> Dict[str, dict]:
    """Canonical state -> {'params': tree, 'batch_stats': tree} of float32 jax arrays, Flax
    names and layout. No checks: load_state checks first. (``dtype`` float64 only for the
    parity suite's double-precision checks: cast here, in numpy, because a cast of JAX arrays
    compiles one XLA program per tensor shape.)"""
    params, stats = {}, {}
    for name, a in state.items():
        *module, leaf = name.split(".")
        a = np.asarray(a, dtype=dtype)
        if leaf in _BATCH_STATS:
            stats[tuple(module + [_BATCH_STATS[leaf]])] = _device_array(a)
        elif leaf == "weight" and a.ndim == 1:  # BatchNorm
            params[tuple(module + ["scale"])] = _device_array(a)
        elif leaf == "weight":  # conv OIHW -> HWIO; dense [out, in] -> [in, out]
            a = a.transpose(2, 3, 1, 0) if a.ndim == 4 else a.T
            params[tuple(module + ["kernel"])] = _device_array(a)
        else:
            params[tuple(module + [leaf])] = _device_array(a)
    return {"params": traverse_util.unflatten_dict(params),
            "batch_stats": traverse_util.unflatten_dict(stats)}


def export_state(model, variables=None, dtype=np.float32) -> Dict[str, np.ndarray]:
    """name -> float32 numpy array, torchvision names, PyTorch layout (OIHW, [out, in]).
    NNX: ``export_state(model)``; linen: ``export_state(model, variables)``."""
    if _is_nnx(model):
        return to_canonical(nnx.state(model, (nnx.Param, nnx.BatchStat)), dtype=dtype)
    if variables is None:
        raise TypeError("a linen model holds no variables: export_state(model, variables)")
    return to_canonical(variables["params"], variables.get("batch_stats", {}), dtype=dtype)


def load_state(model, state: Dict[str, np.ndarray], dtype=np.float32):
    """Load a canonical state: all or nothing. Old-style torchvision keys (``norm.1``) are
    accepted. Every missing, unexpected or misshapen tensor is reported.
    NNX: loads into ``model`` in place (returns None); linen: returns the new variables
    ``{'params': ..., 'batch_stats': ...}`` for ``model``. (``dtype`` float64 only for the
    parity suite's double-precision checks, inside ``jax.enable_x64``.)"""
    state = spec.remap_legacy_keys({k: v for k, v in state.items()
                                    if not k.endswith("num_batches_tracked")})
    spec.check_state(model.config, {k: tuple(np.shape(v)) for k, v in state.items()})
    new = from_canonical(state, dtype)
    if not _is_nnx(model):
        return new
    own = [nnx.state(model, nnx.Param), nnx.state(model, nnx.BatchStat)]
    for current, tree in zip(own, (new["params"], new["batch_stats"])):
        have = set(traverse_util.flatten_dict(nnx.to_pure_dict(current)))
        if have != set(traverse_util.flatten_dict(tree)):  # a bug here, not in the state
            raise RuntimeError("the NNX model's variables do not follow the canonical names")
        nnx.replace_by_pure_dict(current, tree)
    nnx.update(model, *own)
    return None


def save(model, path, variables=None) -> None:
    files.save_state(export_state(model, variables), path, model.config)


def load(model, path):
    state, _ = files.load_state(path)
    return load_state(model, state)
