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
from typing import Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import densenet_spec as spec
from densenet_training import data as dataset_lib
import densenet_training as training
from densenet_flax import parallel
from densenet_flax import state as state_lib
from densenet_flax.model import _ShapeOnlyKeys, build

BACKEND = "flax"


def select_device(name: str = "auto"):
    """auto: JAX's default device (a GPU if there is one); cpu; gpu / cuda / cuda:N."""
    if name == "auto":
        return jax.devices()[0]
    if name == "cpu":
        return jax.devices("cpu")[0]
    kind, _, index = name.partition(":")
    if kind not in ("gpu", "cuda"):
        raise training.UserError(f"--device {name!r}: expected auto, cpu, gpu, cuda or cuda:N")
    gpus = _gpus()
    if len(gpus) <= int(index or 0):
        raise training.UserError(f"--device {name}: JAX sees {len(gpus)} GPU(s)")
    return gpus[int(index or 0)]


def _gpus() -> list:
    try:
        return jax.devices("gpu")
    except RuntimeError:
        return []


def select_devices(name: str = "auto", devices: int = 1, sync_bn: bool = False) -> list:
    """The devices of a run on ``devices`` devices, a mesh's: GPUs 0..N-1 (auto where there
    are N, gpu, cuda) or N host CPU devices (cpu, or auto with fewer GPUs). A clear error for
    more devices than there are, one named GPU (cuda:N) with several devices, and a JAX that
    started with fewer host devices than asked for."""
    if devices == 1:
        return [select_device(name)]
    gpus = _gpus()
    why = parallel.sync_bn_unsupported(devices) if sync_bn else None
    if why:
        raise training.UserError(why)
    if training.parallel_kind(name, devices, len(gpus), "JAX") == "gpu":
        return gpus[:devices]
    cpus = jax.devices("cpu")
    if len(cpus) < devices:
        raise training.UserError(
            f"--devices {devices}: JAX in this process has {len(cpus)} CPU device(s), and it "
            "fixes the number when it starts. `densenet train` asks for N before JAX starts; "
            f"from Python, set XLA_FLAGS=--xla_force_host_platform_device_count={devices} "
            "before the first `import jax`")
    return cpus[:devices]


def device_name(device, devices: int = 1) -> str:
    if devices == 1:
        return f"{device.platform}:{device.id}"
    return f"{devices} x {device.platform} (JAX mesh)"


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
        return nnx.eval_shape(lambda: build(cfg.preset, rngs=_ShapeOnlyKeys(), **options))


def xavier_init(model, seed: int = 0) -> None:
    """The book's init: Xavier-uniform conv and dense weights, zero biases, BatchNorm weight 1
    and bias 0 (training.xavier_state: the same weights in every backend for one seed)."""
    state_lib.load_state(model, training.xavier_state(model.config, seed))


class Optimizer:
    """optax's SGD (or another optax transformation, ``tx``: build_optimizer's, for ``params``
    when they are not an NNX model's) with its state, and the compiled training step for a
    model's graph. With a
    ``mesh`` (several devices) the state and parameters are replicated over it and every batch
    is split along it; ``sync_bn`` chooses the step (densenet_flax/parallel.py: one jitted step
    over the sharded batch, whose BatchNorm sees the global batch, or shard_map's per-device
    step with averaged gradients and running statistics)."""

    def __init__(self, model, lr: float, momentum: float = 0.0, mesh: Optional[Mesh] = None,
                 sync_bn: bool = False, tx=None, params=None):
        self.lr, self.momentum, self.mesh, self.sync_bn = lr, momentum, mesh, sync_bn
        self.tx = tx if tx is not None else optax.sgd(lr, momentum=momentum or None)
        self.state = self.tx.init(params if params is not None else nnx.state(model, nnx.Param))
        self._steps = {}

    def replicate(self, tree):
        """``tree`` on every device of the mesh (as it is without one)."""
        return tree if self.mesh is None else jax.device_put(tree, NamedSharding(self.mesh, P()))

    def split(self, x):
        """A batch split along the mesh, an equal share per device (as it is without one)."""
        return x if self.mesh is None else jax.device_put(x, NamedSharding(self.mesh, P("data")))

    def step_fn(self, graphdef, params, rest, x_shape):
        """The training step compiled (ahead of time) for this graph and batch shape (NHWC)."""
        key = (graphdef, tuple(x_shape))
        if key not in self._steps:
            batch = None if self.mesh is None else NamedSharding(self.mesh, P("data"))
            x = jax.ShapeDtypeStruct(tuple(x_shape), jnp.float32, sharding=batch)
            y = jax.ShapeDtypeStruct(tuple(x_shape[:1]), jnp.int32, sharding=batch)
            step = functools.partial(_train_step, graphdef, self.tx)
            if self.mesh is not None and not self.sync_bn:
                step = jax.shard_map(functools.partial(step, axis="data"), mesh=self.mesh,
                                     in_specs=(P(), P(), P(), P("data"), P("data")),
                                     out_specs=(P(), P(), P(), P(), P()))
            self._steps[key] = jax.jit(step, donate_argnums=(0, 1, 2)).lower(
                params, rest, self.state, x, y).compile()
        return self._steps[key]


def make_optimizer(model, lr: float, momentum: float = 0.0, mesh: Optional[Mesh] = None,
                   sync_bn: bool = False) -> Optimizer:
    """The book's optimiser: SGD (optax.sgd), no weight decay; momentum only if asked for."""
    return Optimizer(model, lr, momentum, mesh, sync_bn)


def _train_step(graphdef, tx, params, rest, opt_state, x, y, axis=None):
    """One SGD step. With ``axis`` (inside shard_map) on one device's share: the loss is the
    devices' mean inside the differentiated function, so that the gradient of the replicated
    parameters is the mean gradient; the updated running statistics are averaged too."""
    def loss_fn(params):
        model = nnx.merge(graphdef, params, rest, copy=True)
        logits = model(x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        if axis:
            loss = jax.lax.pmean(loss, axis)
        return loss, (logits, nnx.split(model, nnx.Param, ...)[2])

    (loss, (logits, new_rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    correct = jnp.sum(jnp.argmax(logits, -1) == y)
    if axis:
        new_rest = jax.tree.map(lambda t: jax.lax.pmean(t, axis)
                                if jnp.issubdtype(t.dtype, jnp.floating) else t, new_rest)
        correct = jax.lax.psum(correct, axis)
    return params, new_rest, opt_state, loss, correct


def _nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def _batch(dataset, idx, split="train"):
    x, y = dataset.batch(idx, split)
    return _nhwc(x), y.astype(np.int32)


def train_step(model, optimizer, x, y):
    """One SGD step on a batch (canonical NCHW numpy): (mean loss, correct predictions)."""
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = optimizer.replicate(params), optimizer.replicate(rest)
    optimizer.state = optimizer.replicate(optimizer.state)
    x, y = _nhwc(x), np.asarray(y, np.int32)
    params, rest, optimizer.state, loss, correct = optimizer.step_fn(
        graphdef, params, rest, x.shape)(params, rest, optimizer.state, optimizer.split(x),
                                         optimizer.split(y))
    nnx.update(model, params, rest)
    return loss, correct


def train_epoch(model, optimizer, dataset, batches, meter) -> None:
    """One pass over ``batches`` (index arrays into the train set) in train mode. The model's
    variables stay split (pure arrays through the compiled step, replicated over the mesh of a
    data-parallel run, whose batches are split along it) until the epoch ends. The
    step is compiled first, for each batch size of the epoch; that time is reported apart
    (``compile_time``), not counted in examples/sec."""
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = optimizer.replicate(params), optimizer.replicate(rest)
    optimizer.state = optimizer.replicate(optimizer.state)
    t0 = time.perf_counter()
    image = dataset.train_images.shape[1:] + (1,)  # H, W, C (grayscale)
    steps = {n: optimizer.step_fn(graphdef, params, rest, (n,) + image)
             for n in sorted({len(idx) for idx in batches})}
    meter.exclude(time.perf_counter() - t0)
    opt_state = optimizer.state
    try:
        for idx in batches:
            x, y = _batch(dataset, idx)
            params, rest, opt_state, loss, correct = steps[len(idx)](
                params, rest, opt_state, optimizer.split(x), optimizer.split(y))
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
    trace = jax.tree.map(lambda _, new: state_lib._device_array(new), optimizer.state[0].trace, trace)
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
    to ``cfg.out``/metrics.json). With ``cfg.devices`` > 1: a mesh of that many devices, every
    batch split along it, BatchNorm per device or over the global batch (``cfg.sync_bn``)."""
    reporter = reporter or training.ConsoleReporter(cfg.progress)
    enable_compilation_cache()
    devices = select_devices(cfg.device, cfg.devices, cfg.sync_bn)
    mesh = Mesh(np.array(devices), ("data",)) if len(devices) > 1 else None
    with jax.default_device(devices[0]):
        model = build_model(cfg, dataset, devices[0])
        if cfg.init:
            state_lib.load_state(model, training.initial_state(cfg, model.config))
        else:
            xavier_init(model, cfg.seed)
        optimizer = make_optimizer(model, cfg.lr, cfg.momentum, mesh, cfg.sync_bn)
        return training.run_epochs(cfg, dataset, model, optimizer, sys.modules[__name__],
                                   reporter, device_name(devices[0], len(devices)), versions(),
                                   parallel.batchnorm_semantics(cfg.sync_bn))


# ------------------------------------------------------------------ house prices (tabular)

class _Linear(nnx.Module):
    """The book's linear model for house prices (get_net: one Linear layer), canonical name
    ``classifier`` (its kernel is the canonical weight transposed)."""

    def __init__(self, in_features: int, rngs: nnx.Rngs):
        self.in_features = in_features
        self.classifier = nnx.Linear(in_features, 1, rngs=rngs)

    def __call__(self, x):
        return self.classifier(x)


def build_house_model(cfg: training.TrainConfig, in_features: int, device):
    """The MLP preset for ``in_features`` inputs (float32 (N, F) -> (N, 1)), or with
    ``cfg.model == 'linear'`` the book's one Linear layer. Built abstractly (``nnx.eval_shape``)
    unless it has dropout: load_house_state sets every value."""
    with jax.default_device(device):
        if cfg.model == "linear":
            return nnx.eval_shape(lambda: _Linear(in_features, nnx.Rngs(cfg.seed)))
        if spec.make_config(cfg.preset, in_features=in_features).drop_rate:
            return build(cfg.preset, rngs=nnx.Rngs(cfg.seed), in_features=in_features)
        return nnx.eval_shape(lambda: build(cfg.preset, rngs=_ShapeOnlyKeys(),
                                            in_features=in_features))


def load_house_state(model, state: Dict[str, np.ndarray]) -> None:
    """Load a canonical state (all of it, or a clear error) into a house-price model."""
    if isinstance(model, _Linear):
        training.house.check_linear_state(state, model.in_features)
        params = nnx.state(model, nnx.Param)
        nnx.replace_by_pure_dict(params, {"classifier": {
            "kernel": state_lib._device_array(np.asarray(state["classifier.weight"], np.float32).T),
            "bias": state_lib._device_array(state["classifier.bias"], np.float32)}})
        nnx.update(model, params)
        return
    state_lib.load_state(model, state)


def house_state(model) -> Dict[str, np.ndarray]:
    """A house-price model's canonical state."""
    if isinstance(model, _Linear):
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))["classifier"]
        return {"classifier.weight": np.array(params["kernel"]).T.copy(),
                "classifier.bias": np.array(params["bias"])}
    return state_lib.export_state(model)


class _Adam:
    """optax's Adam (after add_decayed_weights: L2 added to the gradient, as torch.optim.Adam's
    weight_decay) with its state."""

    def __init__(self, model, lr: float, weight_decay: float):
        self.lr, self.weight_decay = lr, weight_decay
        b1, b2 = training.house.ADAM_BETAS
        self.tx = optax.chain(optax.add_decayed_weights(weight_decay),
                              optax.scale_by_adam(b1, b2, training.house.ADAM_EPS),
                              optax.scale(-lr))
        self.state = self.tx.init(nnx.split(model, nnx.Param, ...)[1])


def make_adam(model, lr: float, weight_decay: float = 0.0) -> _Adam:
    """The book's optimiser for house prices: optax.add_decayed_weights, then Adam."""
    return _Adam(model, lr, weight_decay)


def _house_step(graphdef, tx, params, rest, opt_state, x, y):
    def loss_fn(params):
        model = nnx.merge(graphdef, params, rest, copy=True)
        loss = jnp.mean((model(x).reshape(-1) - y) ** 2)
        return loss, nnx.split(model, nnx.Param, ...)[2]

    (loss, new_rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_rest, opt_state, loss


_house_steps: dict = {}


def house_step(model, optimizer, x, y):
    """One Adam step on a batch (numpy): the mean squared error of the prices (the book's
    nn.MSELoss). The step is compiled once per graph, settings and batch size."""
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    key = (graphdef, optimizer.lr, optimizer.weight_decay, x.shape)
    if key not in _house_steps:
        _house_steps[key] = jax.jit(functools.partial(_house_step, graphdef, optimizer.tx),
                                    donate_argnums=(0, 1, 2)).lower(
            params, rest, optimizer.state, x, y).compile()
    params, rest, optimizer.state, loss = _house_steps[key](params, rest, optimizer.state, x, y)
    nnx.update(model, params, rest)
    return loss


def house_train_epoch(model, optimizer, features, labels, batches, meter) -> None:
    """One pass over ``batches`` (row indices into ``features``/``labels``) in train mode;
    compiling a step for a new batch size is reported apart (``compile_time``)."""
    model.train()
    for idx in batches:
        x, y = features[idx], labels[idx]
        t0 = time.perf_counter()
        fresh = (nnx.graphdef(model), optimizer.lr, optimizer.weight_decay, x.shape) \
            not in _house_steps
        loss = house_step(model, optimizer, x, y)
        value = float(loss)
        if fresh:
            meter.exclude(time.perf_counter() - t0)
        meter.update(value, 0, len(idx))


_house_predict_fns: dict = {}


def _house_forward(graphdef, params, rest, x):
    return nnx.merge(graphdef, params, rest, copy=True)(x).reshape(-1)


def house_predict(model, features, batch_stats: bool = False) -> np.ndarray:
    """Predicted prices (N,) in eval mode (BatchNorm's running statistics), the whole set at once.
    ``batch_stats``: in train mode instead, BatchNorm normalising with the statistics of
    ``features`` themselves, as the book's log_rmse measures (its train() never calls
    net.eval()); the running statistics are left as they were."""
    model.train() if batch_stats else model.eval()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    model.train()
    if graphdef not in _house_predict_fns:
        _house_predict_fns[graphdef] = jax.jit(functools.partial(_house_forward, graphdef))
    return np.array(_house_predict_fns[graphdef](params, rest, features))


def _moments_model(model, moments):
    """A copy of ``model`` whose parameters are ``moments`` (a tree shaped as its params)."""
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    return nnx.merge(graphdef, moments, rest, copy=True)


def adam_state(model, optimizer) -> Dict[str, np.ndarray]:
    """Adam's moments under the canonical parameter names and layout: exp_avg/<name> (optax's
    mu), exp_avg_sq/<name> (nu)."""
    adam = optimizer.state[1]
    if int(adam.count) == 0:
        return {}
    trainable = set(house_state(model)) if isinstance(model, _Linear) else {
        n for n, _, kind in spec.canonical_tensors(model.config) if kind == "param"}
    out = {}
    for key, tree in (("exp_avg", adam.mu), ("exp_avg_sq", adam.nu)):
        for name, value in house_state(_moments_model(model, tree)).items():
            if name in trainable:
                out[f"{key}/{name}"] = value
    return out


def load_adam_state(model, optimizer, arrays: Dict[str, np.ndarray], step: int) -> None:
    """Restore Adam's moments (adam_state's names) and its step count."""
    if not arrays:
        return
    full = house_state(model)
    trees = {}
    for key in ("exp_avg", "exp_avg_sq"):
        shadow = _moments_model(model, nnx.split(model, nnx.Param, ...)[1])
        load_house_state(shadow, {**full, **{n[len(key) + 1:]: v for n, v in arrays.items()
                                             if n.startswith(key + "/")}})
        trees[key] = nnx.split(shadow, nnx.Param, ...)[1]
    adam = optimizer.state[1]
    like = lambda old, new: state_lib._device_array(new, old.dtype)  # noqa: E731
    adam = adam._replace(count=jnp.asarray(step, adam.count.dtype),
                         mu=jax.tree.map(like, adam.mu, trees["exp_avg"]),
                         nu=jax.tree.map(like, adam.nu, trees["exp_avg_sq"]))
    optimizer.state = (optimizer.state[0], adam) + tuple(optimizer.state[2:])


def fit_house(cfg: training.TrainConfig, data, reporter: Optional[training.Reporter] = None
              ) -> dict:
    """The house-price recipe (densenet_training.run_folds: K-fold cross-validation, Adam, MSE,
    log-rmse) on ``data`` (densenet_training.tabular.HouseData); returns the metrics (also
    written to ``cfg.out``/metrics.json)."""
    reporter = reporter or training.ConsoleReporter(cfg.progress)
    enable_compilation_cache()
    device = select_device(cfg.device)
    with jax.default_device(device):
        return training.run_folds(cfg, data, sys.modules[__name__], reporter, device,
                                  versions())

# ------------------------------------------------------------------ training recipes

def recipe_limits(recipe, dtype: str = "float32") -> List[str]:
    """What optax cannot express exactly of ``recipe`` (a densenet_spec.Recipe) at ``dtype``, each with the
    nearest that build_optimizer uses instead (empty: exact)."""
    out = []
    if recipe.optimizer == "sgd" and recipe.momentum and recipe.dampening:
        out.append("optax's trace has no dampening: the nearest, used here, scales the gradient "
                   "by 1 - dampening before optax.sgd's trace, which differs from PyTorch on the "
                   "first step (PyTorch's first buffer is the whole gradient) and after it")
    return out


def _schedule(recipe, steps_per_epoch: int, total_steps: int):
    """The learning rate as optax writes it: a number, or a schedule of optax's update count
    (optax.exponential_decay with staircase=True for step, optax.cosine_decay_schedule for
    cosine; of the epoch, count // steps_per_epoch, for per=epoch)."""
    if recipe.schedule == "constant":
        return recipe.lr
    if recipe.schedule == "step":
        fn = optax.exponential_decay(recipe.lr, transition_steps=recipe.step_size,
                                     decay_rate=recipe.gamma, staircase=True)
    else:
        fn = optax.cosine_decay_schedule(
            recipe.lr, spec.optim.cosine_t_max(recipe, total_steps, steps_per_epoch),
            alpha=recipe.eta_min / recipe.lr)
    if recipe.per == "epoch":
        return lambda count: fn(count // steps_per_epoch)
    return fn


def _recipe_chain(learning_rate, momentum, dampening, weight_decay, b1, b2, eps, *,
                  kind, mask):
    """The optax transformation of a recipe of ``kind`` (optimizer, nesterov, with momentum,
    with dampening, with weight decay): optax.sgd (momentum, nesterov) after
    optax.add_decayed_weights (L2 in the gradient, masked), optax.adam after
    add_decayed_weights, or optax.adamw (its weight decay masked)."""
    name, nesterov, with_momentum, with_dampening, with_decay = kind
    if name == "adamw":
        return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                           mask=mask)
    parts = [optax.add_decayed_weights(weight_decay, mask)] if with_decay else []
    if name == "adam":
        parts.append(optax.adam(learning_rate, b1=b1, b2=b2, eps=eps))
    else:
        if with_dampening:
            parts.append(optax.scale(1.0 - dampening))
        parts.append(optax.sgd(learning_rate, momentum=momentum if with_momentum else None,
                               nesterov=nesterov))
    return optax.chain(*parts) if len(parts) > 1 else parts[0]


_RECIPE_TX = {}


def _recipe_tx(config, recipe):
    """(transformation, compiled update) for ``recipe``'s kind and weight-decay mask: optax's
    inject_hyperparams keeps the learning rate, momentum, dampening, weight decay, betas and
    epsilon in the optimiser state, so one compiled update serves every recipe of a kind."""
    kind = (recipe.optimizer, recipe.nesterov, bool(recipe.momentum), bool(recipe.dampening),
            bool(recipe.weight_decay))
    decayed = frozenset(spec.decayed_names(config, recipe))
    key = (kind, decayed)
    if key not in _RECIPE_TX:
        mask = _decay_mask(decayed)

        def chain(learning_rate, momentum, dampening, weight_decay, b1, b2, eps):
            return _recipe_chain(learning_rate, momentum, dampening, weight_decay, b1, b2, eps,
                                 kind=kind, mask=mask)

        tx = optax.inject_hyperparams(chain)(
            learning_rate=recipe.lr, momentum=recipe.momentum, dampening=recipe.dampening,
            weight_decay=recipe.weight_decay, b1=recipe.betas[0], b2=recipe.betas[1],
            eps=recipe.eps)
        _RECIPE_TX[key] = tx, jax.jit(functools.partial(_apply, tx))
    return _RECIPE_TX[key]


def _decay_mask(decayed):
    """optax's mask for weight decay: a function of a parameter tree (NNX State or linen's
    params) giving True where the parameter decays (its canonical name in ``decayed``)."""

    def name(path):
        keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        keys = [k for k in keys if k != "value"]
        return ".".join(keys[:-1] + [state_lib._TO_CANONICAL[keys[-1]]])

    return lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: name(path) in decayed, params)


def build_optimizer(model, recipe, steps_per_epoch: int = 1, total_steps: int = 1
                    ) -> Optimizer:
    """``recipe`` as optax users write it, in an Optimizer (its optax state): optax.sgd
    (momentum, nesterov) after optax.add_decayed_weights (L2 in the gradient, masked),
    optax.adam after add_decayed_weights, or optax.adamw (its weight decay masked), wrapped in
    optax.inject_hyperparams; the schedule an optax schedule (_schedule) whose rate run_steps
    sets in the state's hyperparameters before each update (what inject_hyperparams does with
    a schedule, done outside the compiled update so that it serves every recipe of a kind).
    ``model``: an NNX model, or a linen (module, variables) pair, whose variables the Optimizer
    then carries (``variables``), updated by run_steps. What it cannot express exactly:
    recipe_limits."""
    linen_pair = isinstance(model, tuple)
    config = model[0].config if linen_pair else model.config
    tx, update = _recipe_tx(config, recipe)
    if linen_pair:
        optimizer = Optimizer(None, recipe.lr, recipe.momentum, tx=tx,
                              params=model[1]["params"])
        optimizer.variables = dict(model[1])
    else:
        optimizer = Optimizer(model, recipe.lr, recipe.momentum, tx=tx)
    dtype = jax.tree_util.tree_leaves(optimizer.state.hyperparams)[0].dtype
    optimizer.state.hyperparams.update({
        k: jnp.asarray(v, dtype) for k, v in (
            ("learning_rate", recipe.lr), ("momentum", recipe.momentum),
            ("dampening", recipe.dampening), ("weight_decay", recipe.weight_decay),
            ("b1", recipe.betas[0]), ("b2", recipe.betas[1]), ("eps", recipe.eps))})
    optimizer.schedule = _schedule(recipe, steps_per_epoch, total_steps)
    optimizer._update = update
    return optimizer


@functools.partial(jax.jit, static_argnums=(0,))
def _nnx_grads(graphdef, params, rest, x, y):
    """NNX, train mode: (loss, gradient, updated non-parameter state)."""
    from densenet_flax.runtime import loss as loss_of

    def loss_fn(params):
        model = nnx.merge(graphdef, params, rest, copy=True)
        return loss_of(model(x), y), nnx.split(model, nnx.Param, ...)[2]

    (loss, new_rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, grads, new_rest


@functools.partial(jax.jit, static_argnums=(0,))
def _linen_grads(module, params, batch_stats, x, y):
    """linen, train mode: (loss, gradient, updated batch_stats)."""
    from densenet_flax.runtime import linen_loss
    (loss, stats), grads = jax.value_and_grad(linen_loss(module, batch_stats, x, y),
                                              has_aux=True)(params)
    return loss, grads, stats


def _apply(tx, grads, opt_state, params):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, optax.global_norm(grads)


def run_steps(model, optimizer, batches, recipe, steps_per_epoch: int = 1, start: int = 0
              ) -> List[dict]:
    """Optimiser steps of ``recipe`` (``optimizer``: build_optimizer's) in train mode, one per
    (x, y) of ``batches`` (canonical NCHW numpy inputs, integer labels or float targets), the
    first being step ``start`` of the run (optax counts the steps itself). Per step: the loss,
    the global L2 norm of the loss's gradient (before weight decay) and the learning rate it
    used. The gradient is one compiled program per model and shape, the update another per
    optimiser (so every recipe shares the model's). ``model``: NNX (updated in place) or
    linen's (module, variables) (optimizer.variables updated)."""
    from densenet_flax.runtime import nhwc, targets
    linen_pair = isinstance(model, tuple)
    if linen_pair:
        module, variables = model[0], optimizer.variables
        params, rest = variables["params"], variables["batch_stats"]
    else:
        model.train()
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    lr = optimizer.schedule
    out = []
    for i, (x, y) in enumerate(batches):
        x, y = nhwc(x, dtype), targets(y, dtype)
        if linen_pair:
            loss, grads, rest = _linen_grads(module, params, rest, x, y)
        else:
            loss, grads, rest = _nnx_grads(graphdef, params, rest, x, y)
        rate = lr(start + i) if callable(lr) else lr
        hyper = optimizer.state.hyperparams
        hyper["learning_rate"] = jnp.asarray(rate, hyper["learning_rate"].dtype)
        params, optimizer.state, norm = optimizer._update(grads, optimizer.state, params)
        out.append({"loss": float(loss), "grad_norm": float(norm), "lr": float(rate)})
    if linen_pair:
        optimizer.variables = {"params": params, "batch_stats": rest}
    else:
        nnx.update(model, params, rest)
    return out


def main(argv=None) -> int:
    """This trainer's own process (densenet_training.trainer_main)."""
    return training.trainer_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
