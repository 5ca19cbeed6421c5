"""Training in Flax NNX: the book's recipe (d2l.train_ch6: SGD, Xavier-uniform weights, softmax
cross-entropy, the loss and accuracies per epoch), with optax.

Same functions, same order, same options as densenet_torch/train.py and densenet_mxnet/train.py.
The epoch loop, the data, the checkpoint files and the reports are densenet_training's;
this file is what Flax does in them. Layout: NHWC (the canonical NCHW batches are transposed
here). Run it through ``densenet train --backend flax``.

The training step is one ``jax.jit``-compiled function of (params, batch stats, optimiser state,
batch), on the model split with ``nnx.split``; the model is updated in place (``nnx.update``) at
the end of each epoch. Compilations are cached on disk (JAX's persistent compilation cache,
under the data cache directory; DENSENET_JAX_CACHE=off turns it off), so a second run, or a
resumed one, starts in seconds rather than compiling again.
"""
from __future__ import annotations

import functools
import os
import sys
import time
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import densenet_spec as spec
from densenet_training import data as dataset_lib
import densenet_training as training
from densenet_flax import state as state_lib
from densenet_flax.model import build

BACKEND = "flax"


def select_device(name: str = "auto"):
    """auto: JAX's default device (a GPU if there is one); cpu; gpu / cuda / cuda:N."""
    if name == "auto":
        return jax.devices()[0]
    if name == "cpu":
        return jax.devices("cpu")[0]
    kind, _, index = name.partition(":")
    if kind not in ("gpu", "cuda"):
        raise ValueError(f"--device {name!r}: expected auto, cpu, gpu, cuda or cuda:N")
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        gpus = []
    if len(gpus) <= int(index or 0):
        raise RuntimeError(f"--device {name}: JAX sees {len(gpus)} GPU(s)")
    return gpus[int(index or 0)]


def device_name(device) -> str:
    return f"{device.platform}:{device.id}"


def versions() -> dict:
    import flax
    return {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
            "numpy": np.__version__}


def enable_compilation_cache() -> None:
    """JAX's persistent compilation cache in DENSENET_JAX_CACHE (default: the data cache's
    jax-cache/), unless it is 'off' or the user configured a cache directory already."""
    where = os.environ.get("DENSENET_JAX_CACHE", "")
    if where.lower() in ("0", "off", "none") or jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir",
                      where or str(dataset_lib.cache_dir() / "jax-cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def build_model(cfg: training.TrainConfig, dataset, device):
    """The preset, with one input channel and the dataset's classes. Built abstractly
    (``nnx.eval_shape``): no initialiser runs, since every value then comes from xavier_init,
    --init or a checkpoint (and Flax's initialisers take long to compile on a CPU)."""
    options = training.model_options(cfg, dataset)
    with jax.default_device(device):
        if spec.make_config(cfg.preset, **options).drop_rate:
            return build(cfg.preset, rngs=nnx.Rngs(cfg.seed), **options)  # dropout keys are real
        return nnx.eval_shape(lambda: build(cfg.preset, rngs=nnx.Rngs(cfg.seed), **options))


def xavier_init(model, seed: int = 0) -> None:
    """The book's init: Xavier-uniform conv and dense weights, zero biases, BatchNorm weight 1
    and bias 0 (training.xavier_state: the same weights in every backend for one seed)."""
    state_lib.load_state(model, training.xavier_state(model.config, seed))


class Optimizer:
    """optax's SGD with its state, and the compiled training step for a model's graph."""

    def __init__(self, model, lr: float, momentum: float = 0.0):
        self.lr, self.momentum = lr, momentum
        self.tx = optax.sgd(lr, momentum=momentum or None)
        self.state = self.tx.init(nnx.state(model, nnx.Param))
        self._steps = {}

    def step_fn(self, graphdef, params, rest, x_shape):
        """The training step compiled (ahead of time) for this graph and batch shape (NHWC)."""
        key = (graphdef, tuple(x_shape))
        if key not in self._steps:
            x = jax.ShapeDtypeStruct(tuple(x_shape), jnp.float32)
            y = jax.ShapeDtypeStruct(tuple(x_shape[:1]), jnp.int32)
            self._steps[key] = jax.jit(functools.partial(_train_step, graphdef, self.tx),
                                       donate_argnums=(0, 1, 2)).lower(
                params, rest, self.state, x, y).compile()
        return self._steps[key]


def make_optimizer(model, lr: float, momentum: float = 0.0) -> Optimizer:
    """The book's optimiser: SGD (optax.sgd), no weight decay; momentum only if asked for."""
    return Optimizer(model, lr, momentum)


def _train_step(graphdef, tx, params, rest, opt_state, x, y):
    def loss_fn(params):
        model = nnx.merge(graphdef, params, rest, copy=True)
        logits = model(x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, (logits, nnx.split(model, nnx.Param, ...)[2])

    (loss, (logits, new_rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, new_rest, opt_state, loss, jnp.sum(jnp.argmax(logits, -1) == y)


def _nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def _batch(dataset, idx, split="train"):
    x, y = dataset.batch(idx, split)
    return _nhwc(x), y.astype(np.int32)


def train_step(model, optimizer, x, y):
    """One SGD step on a batch (canonical NCHW numpy): (mean loss, correct predictions)."""
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x, y = _nhwc(x), np.asarray(y, np.int32)
    params, rest, optimizer.state, loss, correct = optimizer.step_fn(
        graphdef, params, rest, x.shape)(params, rest, optimizer.state, x, y)
    nnx.update(model, params, rest)
    return loss, correct


def train_epoch(model, optimizer, dataset, batches, meter) -> None:
    """One pass over ``batches`` (index arrays into the train set) in train mode. The model's
    variables stay split (pure arrays through the compiled step) until the epoch ends. The
    step is compiled first, for each batch size of the epoch; that time is reported apart
    (``compile_time``), not counted in examples/sec."""
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    t0 = time.perf_counter()
    image = dataset.train_images.shape[1:] + (1,)  # H, W, C (grayscale)
    steps = {n: optimizer.step_fn(graphdef, params, rest, (n,) + image)
             for n in sorted({len(idx) for idx in batches})}
    meter.exclude(time.perf_counter() - t0)
    opt_state = optimizer.state
    try:
        for idx in batches:
            x, y = _batch(dataset, idx)
            params, rest, opt_state, loss, correct = steps[len(idx)](params, rest, opt_state, x, y)
            meter.update(float(loss), int(correct), len(idx))
    finally:
        nnx.update(model, params, rest)
        optimizer.state = opt_state


_predict_fns = {}


def _predict(graphdef, params, rest, x):
    return jnp.argmax(nnx.merge(graphdef, params, rest, copy=True)(x), -1)


def evaluate(model, dataset, batch_size: int) -> float:
    """Test accuracy in eval mode (BatchNorm running statistics). The last batch is padded to
    the batch size, so one compilation serves every batch."""
    model.eval()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    model.train()
    if graphdef not in _predict_fns:
        _predict_fns[graphdef] = jax.jit(functools.partial(_predict, graphdef))
    predict = _predict_fns[graphdef]
    correct, n = 0, len(dataset.test_labels)
    for s in range(0, n, batch_size):
        x, y = dataset.batch(np.arange(s, min(s + batch_size, n)), "test")
        if len(y) < batch_size and n > batch_size:
            x = np.concatenate([x, np.zeros((batch_size - len(y),) + x.shape[1:], x.dtype)])
        pred = np.asarray(predict(params, rest, _nhwc(x)))[:len(y)]
        correct += int((pred == y).sum())
    return correct / max(n, 1)


def optimizer_state(model, optimizer) -> Dict[str, np.ndarray]:
    """Momentum buffers (optax's trace) under the canonical parameter names and layout (none
    for plain SGD: optax keeps only empty states)."""
    if not optimizer.momentum:
        return {}
    return state_lib.to_canonical(optimizer.state[0].trace)


def load_optimizer_state(model, optimizer, buffers: Dict[str, np.ndarray]) -> None:
    if not optimizer.momentum or not buffers:
        return
    tree = state_lib.from_canonical(buffers)["params"]
    trace = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(trace, tree)
    trace = jax.tree.map(lambda _, new: jnp.asarray(new), optimizer.state[0].trace, trace)
    optimizer.state = (optimizer.state[0]._replace(trace=trace),) + tuple(optimizer.state[1:])


def save_checkpoint(out, epoch: int, model, optimizer, info: dict):
    """Epoch ``epoch``'s checkpoint: canonical model state, optimiser state, JSON (``info``)."""
    return training.write_checkpoint(out, epoch, state_lib.export_state(model),
                                     optimizer_state(model, optimizer), info, model.config)


def load_checkpoint(directory, model, optimizer) -> dict:
    """Load a checkpoint into ``model`` and ``optimizer``; its JSON."""
    state, buffers, info = training.read_checkpoint(directory)
    state_lib.load_state(model, state)
    load_optimizer_state(model, optimizer, buffers)
    return info


def fit(cfg: training.TrainConfig, dataset, reporter: Optional[training.Reporter] = None) -> dict:
    """Train ``cfg.preset`` on ``dataset`` as the book does; returns the metrics (also written
    to ``cfg.out``/metrics.json)."""
    reporter = reporter or training.ConsoleReporter(cfg.progress)
    enable_compilation_cache()
    device = select_device(cfg.device)
    with jax.default_device(device):
        model = build_model(cfg, dataset, device)
        if cfg.init:
            state_lib.load_state(model, training.initial_state(cfg, model.config))
        else:
            xavier_init(model, cfg.seed)
        optimizer = make_optimizer(model, cfg.lr, cfg.momentum)
        return training.run_epochs(cfg, dataset, model, optimizer, sys.modules[__name__],
                                   reporter, device_name(device), versions())
