"""What the parity adapter (adapter.py) and the data-parallel step (parallel.py) both run on:
a model built from a framework-free configuration (either family, NNX or linen), loaded with a
canonical state; and, for Flax, the numerics both use (precision, float64), the NHWC input,
the loss and the SGD update. Same public names as densenet_torch/runtime.py and
densenet_mxnet/runtime.py, plus Flax's extras (parity_tests/test_mirrors.py names them)."""
from __future__ import annotations

import contextlib
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import densenet_spec as spec
from densenet_flax import linen, model as nnx_model
from densenet_flax.state import _device_array, load_state


def device() -> str:
    d = jax.devices()[0]
    return "cpu" if d.platform == "cpu" else f"{d.platform}:{d.id}"


def _module(variant):
    if variant not in ("nnx", "linen"):
        raise ValueError(f"unknown Flax variant {variant!r}; variants: nnx, linen")
    return nnx_model if variant == "nnx" else linen


def from_config(config: dict, memory_efficient=False, variant="nnx", seed=0, _rngs=None, **_):
    """Our model for a ``Preset.to_dict()`` of either family, NNX (``rngs=nnx.Rngs(seed)``)
    or linen (the MLP family has no memory-efficient mode)."""
    cfg = spec.config_from_dict(config)
    mod = _module(variant)
    rngs = nnx.Rngs(seed) if _rngs is None else _rngs
    if cfg.family == "mlp":
        kw = {"rngs": rngs} if variant == "nnx" else {}
        return mod.MLPDenseNet(**cfg.options(), name=cfg.name, **kw)
    if variant == "nnx":
        return nnx_model.DenseNet(**cfg.options(), memory_efficient=memory_efficient,
                                  name=cfg.name, rngs=rngs)
    return mod.DenseNet(**cfg.options(), memory_efficient=memory_efficient, name=cfg.name)


@functools.lru_cache(maxsize=8)
def _abstract_parts(config_json: str, memory_efficient: bool):
    """NNX's model for a configuration, built abstractly once (nnx.eval_shape: the shapes of
    every variable, no initialiser run; still seconds for the deepest presets)."""
    config = json.loads(config_json)
    keys = nnx.Rngs(0) if config.get("drop_rate") else nnx_model._ShapeOnlyKeys()
    model = nnx.eval_shape(lambda: from_config(config, memory_efficient=memory_efficient,
                                               _rngs=keys))
    return nnx.split(model)


def abstract(config: dict, memory_efficient: bool = False):
    """A fresh abstract NNX model (its own Variables) for ``config``."""
    return nnx.merge(*_abstract_parts(json.dumps(config, sort_keys=True), memory_efficient))


def loaded(config, state, memory_efficient=False, variant="nnx", dtype="float32"):
    """NNX: the model, loaded. linen: (model, variables). At ``dtype`` (inside numerics).
    NNX builds abstractly (nnx.eval_shape: no random initialisation, which would compile an
    initialiser per weight shape) unless dropout needs its RNG streams."""
    if variant == "nnx" and not config.get("drop_rate"):
        model = abstract(config, memory_efficient)
    else:
        model = from_config(config, memory_efficient=memory_efficient, variant=variant)
    variables = load_state(model, state, dtype=np.dtype(dtype))
    return model if variant == "nnx" else (model, variables)


@contextlib.contextmanager
def numerics(dtype="float32"):
    """Full-precision matmuls and convolutions (no TF32 or bf16 passes on GPUs); JAX's x64 mode
    for ``dtype`` 'float64'."""
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    with contextlib.ExitStack() as stack:
        stack.enter_context(jax.default_matmul_precision("highest"))
        if dtype == "float64":
            stack.enter_context(jax.enable_x64(True))
        yield


def nhwc(x, dtype="float32"):
    """A canonical input (NCHW images; (N, features) passes as it is) for Flax."""
    x = np.asarray(x, dtype=dtype)
    return _device_array(np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if x.ndim == 4 else x)


def targets(labels, dtype="float32"):
    """Integer labels as int32 (the conv family's classes); float targets at ``dtype`` (the MLP
    family's regression, (N, outputs))."""
    labels = np.asarray(labels)
    if np.issubdtype(labels.dtype, np.integer):
        return _device_array(labels, np.int32)
    return _device_array(labels, dtype)


def loss(outputs, labels):
    """Mean softmax cross-entropy against integer labels; the mean squared error against float
    targets (chosen by the targets' dtype, when the function is traced)."""
    if jnp.issubdtype(labels.dtype, jnp.integer):
        return optax.softmax_cross_entropy_with_integer_labels(outputs, labels).mean()
    return jnp.mean(jnp.square(outputs - labels))


_DROPOUT = {"dropout": jax.random.key(0)}  # linen: used only when drop_rate > 0


def linen_loss(model, batch_stats, x, labels):
    """linen: params -> (loss, updated batch_stats), train mode."""
    def loss_fn(params):
        logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                      train=True, mutable=["batch_stats"], rngs=_DROPOUT)
        return loss(logits, labels), updates["batch_stats"]
    return loss_fn


@jax.jit
def sgd(params, grads, lr):
    tx = optax.sgd(lr)
    updates, _ = tx.update(grads, tx.init(params), params)
    return optax.apply_updates(params, updates)
