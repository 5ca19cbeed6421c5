"""Training in MXNet Gluon: the book's recipe (d2l.train_ch6: SGD, Xavier-uniform weights, softmax
cross-entropy, the loss and accuracies per epoch), with gluon.Trainer.

Same functions, same order, same options as densenet_torch/train.py and densenet_flax/train.py.
The epoch loop, the data, the checkpoint files and the reports are densenet_training's;
this file is what MXNet does in them. Layout: NCHW. The model is hybridized.

It runs in the MXNet environment: ``densenet train --backend mxnet`` (main
environment) prepares the dataset, starts ``python -m densenet_mxnet.train ... --prepared
DATA.npz --events`` here and draws the progress this process sends as JSON lines. Run directly
(``python -m densenet_mxnet.train --dataset fashion-mnist --data-dir DIR``), it loads the data
itself (the digits need scikit-learn, which this environment does not have) and draws its own
progress.
"""
from __future__ import annotations

import sys
from typing import Dict, List, Optional

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

import densenet_spec as spec
import densenet_training as training
from densenet_mxnet import parallel
from densenet_mxnet import state as state_lib
from densenet_mxnet.model import build

BACKEND = "mxnet"


def select_device(name: str = "auto") -> mx.Context:
    """auto: the first GPU if MXNet has one (its last CUDA builds predate Hopper), else the CPU;
    cpu; gpu / cuda / cuda:N."""
    if name == "auto":
        return mx.gpu(0) if mx.context.num_gpus() > 0 else mx.cpu()
    if name == "cpu":
        return mx.cpu()
    kind, _, index = name.partition(":")
    if kind not in ("gpu", "cuda"):
        raise training.UserError(f"--device {name!r}: expected auto, cpu, gpu, cuda or cuda:N")
    if mx.context.num_gpus() <= int(index or 0):
        raise training.UserError(f"--device {name}: MXNet sees {mx.context.num_gpus()} GPU(s)")
    return mx.gpu(int(index or 0))


def select_devices(name: str = "auto", devices: int = 1, sync_bn: bool = False
                   ) -> List[mx.Context]:
    """The contexts of a run on ``devices`` devices: gpu(0)..gpu(N-1) (auto where there are
    N, gpu, cuda) or cpu(0)..cpu(N-1) (cpu, or auto with fewer GPUs). A clear error for more
    devices than there are, one named GPU (cuda:N) with several devices, and synchronised
    BatchNorm, which Gluon cannot run here (densenet_mxnet/parallel.py)."""
    if devices == 1:
        return [select_device(name)]
    kind = training.parallel_kind(name, devices, mx.context.num_gpus(), "MXNet")
    why = parallel.sync_bn_unsupported(devices) if sync_bn else None
    if why:
        raise training.UserError(why)
    return [mx.gpu(i) if kind == "gpu" else mx.cpu(i) for i in range(devices)]


def device_name(device: mx.Context, devices: int = 1) -> str:
    if devices == 1:
        return str(device)
    return f"{devices} x {device.device_type} (Gluon contexts, kvstore device)"


def versions() -> dict:
    return {"mxnet": mx.__version__, "numpy": np.__version__}


def build_model(cfg: training.TrainConfig, dataset, device):
    """The preset, with one input channel and the dataset's classes, on ``device`` (a context,
    or a list of contexts: a copy on each)."""
    model = build(cfg.preset, **training.model_options(cfg, dataset))
    model.initialize(ctx=device)  # placeholder values: xavier_init or a checkpoint sets them
    return model


def xavier_init(model, seed: int = 0) -> None:
    """The book's init: Xavier-uniform conv and dense weights, zero biases, BatchNorm weight 1
    and bias 0 (training.xavier_state: the same weights in every backend for one seed; the
    distribution of the book's ``init.Xavier()``)."""
    state_lib.load_state(model, training.xavier_state(model.config, seed))


def make_optimizer(model, lr: float, momentum: float = 0.0) -> gluon.Trainer:
    """The book's optimiser: SGD, no weight decay; momentum only if asked for. Over several
    contexts the kvstore ('device') sums the gradients and every context updates its own copy
    (so that the momentum buffers are each context's, as on one device)."""
    if len(_contexts(model)) == 1:
        return gluon.Trainer(model.collect_params(), "sgd",
                             {"learning_rate": lr, "momentum": momentum, "wd": 0.0})
    return gluon.Trainer(model.collect_params(), "sgd",
                         {"learning_rate": lr, "momentum": momentum, "wd": 0.0},
                         kvstore="device", update_on_kvstore=False)


def _contexts(model) -> List[mx.Context]:
    return model.classifier.weight.list_ctx()


_loss = gluon.loss.SoftmaxCrossEntropyLoss()


def train_step(model, optimizer, x, y):
    """One SGD step on a batch, or on its equal shares (lists of NDArrays, one per context):
    (mean loss, correct predictions), as NDArrays on the first context."""
    xs, ys = (x, y) if isinstance(x, list) else ([x], [y])
    with autograd.record():
        logits = [model(a) for a in xs]
        losses = [_loss(out, b).mean() for out, b in zip(logits, ys)]
    autograd.backward(losses)
    # each loss is its share's mean (PyTorch's and optax's convention); the kvstore sums the
    # shares' gradients, and step(n) divides by the n shares: the gradient of the batch mean
    optimizer.step(len(xs))
    ctx = xs[0].context
    loss = mx.nd.add_n(*[l.as_in_context(ctx) for l in losses]) / len(xs)
    correct = mx.nd.add_n(*[(out.argmax(axis=1) == b).sum().as_in_context(ctx)
                            for out, b in zip(logits, ys)])
    return loss, correct


def train_epoch(model, optimizer, dataset, batches, meter) -> None:
    """One pass over ``batches`` (index arrays into the train set) in train mode; over several
    contexts every batch is split into equal shares (``gluon.utils.split_and_load``)."""
    ctxs = _contexts(model)
    for idx in batches:
        x, y = dataset.batch(idx, "train")
        if len(ctxs) == 1:
            x, y = mx.nd.array(x, ctx=ctxs[0]), mx.nd.array(y, ctx=ctxs[0], dtype=np.float32)
        else:
            x = gluon.utils.split_and_load(mx.nd.array(x), ctxs)
            y = gluon.utils.split_and_load(mx.nd.array(y, dtype=np.float32), ctxs)
        loss, correct = train_step(model, optimizer, x, y)
        meter.update(float(loss.asscalar()), int(correct.asscalar()), len(idx))


def evaluate(model, dataset, batch_size: int) -> float:
    """Test accuracy in predict mode (BatchNorm running statistics: the first context's, as the
    book's multi-GPU evaluation uses)."""
    ctx = _contexts(model)[0]
    correct, n = 0, len(dataset.test_labels)
    with autograd.predict_mode():
        for s in range(0, n, batch_size):
            x, y = dataset.batch(np.arange(s, min(s + batch_size, n)), "test")
            pred = model(mx.nd.array(x, ctx=ctx)).argmax(axis=1).asnumpy()
            correct += int((pred.astype(np.int64) == y).sum())
    return correct / max(n, 1)


def _indexed_names(model, optimizer):
    """(Trainer's parameter index, canonical name) of every trainable parameter."""
    names = {id(p): k for k, p in state_lib._canonical_params(model).items()}
    return [(i, names[id(p)]) for i, p in enumerate(optimizer._params) if p.grad_req != "null"]


def optimizer_state(model, optimizer) -> Dict[str, np.ndarray]:
    """Momentum buffers under the canonical parameter names, in PyTorch's convention
    (MXNet keeps mom = -lr * buf); none for plain SGD, which MXNet gives no state. Float64,
    so that converting back gives MXNet's float32 values bit for bit."""
    momentum, lr = optimizer._optimizer.momentum, optimizer.learning_rate
    if not momentum:
        return {}
    states = optimizer._updaters[0].states  # over several contexts: every copy the same
    return {name: states[i].asnumpy().astype(np.float64) / -lr
            for i, name in _indexed_names(model, optimizer) if states.get(i) is not None}


def load_optimizer_state(model, optimizer, buffers: Dict[str, np.ndarray]) -> None:
    if not optimizer._optimizer.momentum or not buffers:
        return
    lr = optimizer.learning_rate
    for updater, ctx in zip(optimizer._updaters, _contexts(model)):  # one per context
        for i, name in _indexed_names(model, optimizer):
            if name in buffers:
                updater.states[i] = mx.nd.array(
                    (-lr * buffers[name].astype(np.float64)).astype(np.float32), ctx=ctx)
                updater.states_synced[i] = True


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
    to ``cfg.out``/metrics.json). With ``cfg.devices`` > 1: a copy on each of that many
    contexts, every batch split over them, Gluon's per-context BatchNorm."""
    reporter = reporter or training.ConsoleReporter(cfg.progress)
    devices = select_devices(cfg.device, cfg.devices, cfg.sync_bn)
    model = build_model(cfg, dataset, devices if len(devices) > 1 else devices[0])
    if cfg.init:
        state_lib.load_state(model, training.initial_state(cfg, model.config))
    else:
        xavier_init(model, cfg.seed)
    model.hybridize(static_alloc=True)
    optimizer = make_optimizer(model, cfg.lr, cfg.momentum)
    return training.run_epochs(cfg, dataset, model, optimizer, sys.modules[__name__], reporter,
                               device_name(devices[0], len(devices)), versions(),
                               parallel.batchnorm_semantics(cfg.sync_bn))


# ------------------------------------------------------------------ house prices (tabular)

class _Linear(gluon.HybridBlock):
    """The book's linear model for house prices (get_net: one Dense layer), canonical name
    ``classifier``."""

    def __init__(self, in_features: int, **kwargs):
        super().__init__(**kwargs)
        self.in_features = in_features
        with self.name_scope():
            self.classifier = gluon.nn.Dense(1, in_units=in_features)

    def hybrid_forward(self, F, x):
        return self.classifier(x)


def build_house_model(cfg: training.TrainConfig, in_features: int, device):
    """The MLP preset for ``in_features`` inputs (float32 (N, F) -> (N, 1)), or with
    ``cfg.model == 'linear'`` the book's one Dense layer; on ``device``, hybridized."""
    model = (_Linear(in_features) if cfg.model == "linear"
             else build(cfg.preset, in_features=in_features))
    model.initialize(ctx=device)  # placeholder values: load_house_state sets them
    model.hybridize(static_alloc=True)
    return model


def _house_params(model) -> Dict[str, gluon.Parameter]:
    if isinstance(model, _Linear):
        return {"classifier.weight": model.classifier.weight,
                "classifier.bias": model.classifier.bias}
    return state_lib._canonical_params(model)


def load_house_state(model, state: Dict[str, np.ndarray]) -> None:
    """Load a canonical state (all of it, or a clear error) into a house-price model."""
    if isinstance(model, _Linear):
        training.house.check_linear_state(state, model.in_features)
        for name, p in _house_params(model).items():
            p.set_data(mx.nd.array(np.asarray(state[name], np.float32)))
        return
    state_lib.load_state(model, state)


def house_state(model) -> Dict[str, np.ndarray]:
    """A house-price model's canonical state."""
    if isinstance(model, _Linear):
        return {k: p.data().asnumpy().copy() for k, p in _house_params(model).items()}
    return state_lib.export_state(model)


def make_adam(model, lr: float, weight_decay: float = 0.0) -> gluon.Trainer:
    """The book's optimiser for house prices: gluon.Trainer 'adam' (wd: L2 added to the
    gradient, as torch.optim.Adam's weight_decay). MXNet adds epsilon to sqrt(v) before the bias
    correction, PyTorch after it: the same update but for epsilon's scale."""
    return gluon.Trainer(model.collect_params(), "adam", {
        "learning_rate": lr, "wd": weight_decay, "beta1": training.house.ADAM_BETAS[0],
        "beta2": training.house.ADAM_BETAS[1], "epsilon": training.house.ADAM_EPS})


def house_step(model, optimizer, x, y):
    """One Adam step on a batch: the mean squared error of the prices (the book's
    nn.MSELoss), as an NDArray."""
    with autograd.record():
        loss = ((model(x).reshape((-1,)) - y) ** 2).mean()
    loss.backward()
    optimizer.step(1)  # the loss is the batch mean already
    return loss


def house_train_epoch(model, optimizer, features, labels, batches, meter) -> None:
    """One pass over ``batches`` (row indices into ``features``/``labels``) in train mode."""
    ctx = _contexts(model)[0]
    for idx in batches:
        loss = house_step(model, optimizer, mx.nd.array(features[idx], ctx=ctx),
                          mx.nd.array(labels[idx], ctx=ctx))
        meter.update(float(loss.asscalar()), 0, len(idx))


def house_predict(model, features, batch_stats: bool = False) -> np.ndarray:
    """Predicted prices (N,) in predict mode (BatchNorm's running statistics), the whole set at
    once.
    ``batch_stats``: in train mode instead, BatchNorm normalising with the statistics of
    ``features`` themselves, as the book's log_rmse measures (its train() never calls
    net.eval()); the running statistics are left as they were."""
    stats = [p for p in model.collect_params().values() if p.grad_req == "null"]
    saved = [p.data().copy() for p in stats]
    with (autograd.train_mode() if batch_stats else autograd.predict_mode()):
        out = model(mx.nd.array(features, ctx=_contexts(model)[0])).asnumpy()
    for p, old in zip(stats, saved):
        p.set_data(old)
    return out.reshape(-1).copy()


def _house_indexed(model, optimizer):
    """(Trainer's parameter index, canonical name) of every trainable parameter."""
    names = {id(p): k for k, p in _house_params(model).items()}
    return [(i, names[id(p)]) for i, p in enumerate(optimizer._params) if p.grad_req != "null"]


def adam_state(model, optimizer) -> Dict[str, np.ndarray]:
    """Adam's moments under the canonical parameter names: exp_avg/<name>, exp_avg_sq/<name>
    (MXNet's mean and var; none before the first step)."""
    states = optimizer._updaters[0].states
    out = {}
    for i, name in _house_indexed(model, optimizer):
        if states.get(i) is not None:
            mean, var = states[i]
            out[f"exp_avg/{name}"] = mean.asnumpy().copy()
            out[f"exp_avg_sq/{name}"] = var.asnumpy().copy()
    return out


def load_adam_state(model, optimizer, arrays: Dict[str, np.ndarray], step: int) -> None:
    """Restore Adam's moments (adam_state's names) and its step count (MXNet's per-parameter
    update counts, which its bias correction reads)."""
    ctx = _contexts(model)[0]
    updater, opt = optimizer._updaters[0], optimizer._optimizer
    for i, name in _house_indexed(model, optimizer):
        if f"exp_avg/{name}" in arrays:
            updater.states[i] = (mx.nd.array(arrays[f"exp_avg/{name}"], ctx=ctx),
                                 mx.nd.array(arrays[f"exp_avg_sq/{name}"], ctx=ctx))
            updater.states_synced[i] = True
            opt._index_update_count[i] = int(step)
    opt.num_update = max(opt.num_update, int(step))


def fit_house(cfg: training.TrainConfig, data, reporter: Optional[training.Reporter] = None
              ) -> dict:
    """The house-price recipe (densenet_training.run_folds: K-fold cross-validation, Adam, MSE,
    log-rmse) on ``data`` (densenet_training.tabular.HouseData); returns the metrics (also
    written to ``cfg.out``/metrics.json)."""
    reporter = reporter or training.ConsoleReporter(cfg.progress)
    return training.run_folds(cfg, data, sys.modules[__name__], reporter,
                              select_device(cfg.device), versions())

# ------------------------------------------------------------------ training recipes

def recipe_limits(recipe, dtype: str = "float32") -> List[str]:
    """What Gluon (MXNet 1.9.1) cannot express exactly of ``recipe`` (a densenet_spec.Recipe) at ``dtype``,
    each with the nearest that build_optimizer uses instead (empty: exact)."""
    out = []
    if recipe.optimizer == "sgd" and recipe.momentum and recipe.dampening:
        out.append("Gluon's sgd has no dampening: the nearest, used here, is sgd with the same "
                   "momentum and no dampening")
    if recipe.optimizer == "sgd" and recipe.momentum and recipe.schedule != "constant":
        out.append("Gluon's momentum buffer holds the learning rate (mom = momentum mom - lr (g + "
                   "wd w)), PyTorch's does not (w -= lr buf): the same while lr is constant; "
                   "under a schedule Gluon's past gradients keep the rate they were taken with")
    if recipe.optimizer == "sgd" and recipe.nesterov and recipe.weight_decay:
        out.append("Gluon's nag (MXNet 1.9.1's nag_mom_update, run in place: out=weight) "
                   "computes the new weight first and then adds lr wd w to the momentum with "
                   "the new weight instead of the old (mom = m mom - lr (g + wd w_new)): "
                   "PyTorch's Nesterov SGD from the second step on, when weight decay is set")
    if recipe.adaptive:
        out.append("Gluon's adam adds epsilon to sqrt(v) before the bias correction (w -= lr "
                   "sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + eps)), PyTorch's after it: "
                   "Gluon's epsilon is PyTorch's times sqrt(1 - b2^t), the same epsilon a "
                   "different update")
    if recipe.optimizer == "adamw":
        out.append("MXNet 1.9.1 has no AdamW optimiser (only the operator "
                   "nd.contrib.adamw_update): the nearest, used here, is adam with wd, "
                   "weight decay added to the gradient (Adam with L2) instead of decoupled")
    if dtype == "float64":
        rates = [spec.lr_at(recipe, k) for k in range(64)] if recipe.schedule == "step" else \
            [recipe.lr] if recipe.schedule == "constant" else [0.1]
        if recipe.adaptive or recipe.schedule == "cosine" or not all(
                float(np.float32(v)) == v for v in rates + [recipe.momentum,
                                                            recipe.weight_decay]):
            out.append("MXNet's optimiser operators take the learning rate, momentum and weight "
                       "decay as float32 (Adam's bias-corrected rate too): in float64 a value "
                       "float32 cannot hold (0.1, a cosine's rates) is rounded, ~1e-8 relative "
                       "a step")
    return out


def build_optimizer(model, recipe, steps_per_epoch: int = 1, total_steps: int = 1):
    """``recipe`` as Gluon users write it: (trainer, epoch scheduler). A gluon.Trainer with
    'sgd', 'nag' (Nesterov) or 'adam', weight decay ``wd`` with each excluded parameter's
    ``wd_mult`` set to 0 (Gluon decays every parameter otherwise, BatchNorm's and biases too),
    and the schedule as mx.lr_scheduler's FactorScheduler or CosineScheduler: the optimiser's
    own ``lr_scheduler`` for per=step (called with the update count, from 1), or called by
    run_steps with the epoch (from 1) and set by trainer.set_learning_rate for per=epoch (None
    for a constant rate). What it cannot express exactly: recipe_limits."""
    params = state_lib._canonical_params(model)
    decayed = spec.decayed_names(model.config, recipe)
    for name, p in params.items():
        if p.grad_req != "null":
            p.wd_mult = 1.0 if name in decayed else 0.0
    kw = {"learning_rate": recipe.lr, "wd": recipe.weight_decay}
    if recipe.optimizer == "sgd":
        name = "nag" if recipe.nesterov else "sgd"
        kw["momentum"] = recipe.momentum
    else:
        name = "adam"
        kw.update(beta1=recipe.betas[0], beta2=recipe.betas[1], epsilon=recipe.eps)
    scheduler = None
    if recipe.schedule == "step":
        scheduler = mx.lr_scheduler.FactorScheduler(step=recipe.step_size, factor=recipe.gamma,
                                                    base_lr=recipe.lr)
    elif recipe.schedule == "cosine":
        # warmup_steps=1 at the base rate: the cosine starts at update 1 (PyTorch's k = 0)
        t_max = spec.optim.cosine_t_max(recipe, total_steps, steps_per_epoch)
        scheduler = mx.lr_scheduler.CosineScheduler(
            max_update=t_max + 1, base_lr=recipe.lr, final_lr=recipe.eta_min, warmup_steps=1,
            warmup_begin_lr=recipe.lr)
    if scheduler is not None and recipe.per == "step":
        kw["lr_scheduler"], scheduler = scheduler, None
    return gluon.Trainer(model.collect_params(), name, kw), scheduler


def _recipe_loss(outputs, y, kind):
    """Softmax cross-entropy against integer labels (``kind``: the labels' numpy dtype); the
    mean squared error against float targets shaped as the outputs (the MLP family's prices)."""
    if not np.issubdtype(kind, np.floating):
        return gluon.loss.SoftmaxCrossEntropyLoss()(outputs, y).mean()
    return ((outputs - y) ** 2).mean()


def run_steps(model, optimizer, batches, recipe, steps_per_epoch: int = 1, start: int = 0
              ) -> List[dict]:
    """Optimiser steps of ``recipe`` (``optimizer``: build_optimizer's pair) in train mode, one
    per (x, y) of ``batches`` (canonical NCHW numpy inputs, integer labels or float targets),
    the first being step ``start`` of the run. Per step: the loss, the global L2 norm of the
    loss's gradient (before weight decay) and the learning rate it used."""
    trainer, scheduler = optimizer
    first = next(iter(model.collect_params().values()))
    dtype, ctx = first.dtype, first.list_ctx()[0]
    out = []
    for i, (x, y) in enumerate(batches):
        step = start + i
        if scheduler is not None and step % steps_per_epoch == 0:
            trainer.set_learning_rate(scheduler(step // steps_per_epoch + 1))
        y = np.asarray(y)
        xs = mx.nd.array(np.asarray(x), ctx=ctx, dtype=dtype)
        with autograd.record():
            loss = _recipe_loss(model(xs), mx.nd.array(y, ctx=ctx, dtype=dtype), y.dtype)
        loss.backward()
        norm = float(np.sqrt(sum(float((p.grad().astype("float64") ** 2).sum().asscalar())
                                 for p in model.collect_params().values()
                                 if p.grad_req != "null")))
        opt = trainer._optimizer
        lr = (opt.lr_scheduler(opt.num_update + 1) if opt.lr_scheduler is not None
              else trainer.learning_rate)
        trainer.step(1)  # the loss is already the batch mean
        out.append({"loss": float(loss.asscalar()), "grad_norm": norm, "lr": float(lr)})
    return out


def main(argv=None) -> int:
    """This trainer's own process (densenet_training.trainer_main): the MXNet environment's."""
    return training.trainer_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
