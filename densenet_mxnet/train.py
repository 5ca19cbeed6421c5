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
from typing import Dict, Optional

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

from densenet_training import data as dataset_lib
import densenet_training as training
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
        raise ValueError(f"--device {name!r}: expected auto, cpu, gpu, cuda or cuda:N")
    if mx.context.num_gpus() <= int(index or 0):
        raise RuntimeError(f"--device {name}: MXNet sees {mx.context.num_gpus()} GPU(s)")
    return mx.gpu(int(index or 0))


def device_name(device: mx.Context) -> str:
    return str(device)


def versions() -> dict:
    return {"mxnet": mx.__version__, "numpy": np.__version__}


def build_model(cfg: training.TrainConfig, dataset, device):
    """The preset, with one input channel and the dataset's classes, on ``device``."""
    model = build(cfg.preset, **training.model_options(cfg, dataset))
    model.initialize(ctx=device)  # placeholder values: xavier_init or a checkpoint sets them
    return model


def xavier_init(model, seed: int = 0) -> None:
    """The book's init: Xavier-uniform conv and dense weights, zero biases, BatchNorm weight 1
    and bias 0 (training.xavier_state: the same weights in every backend for one seed; the
    distribution of the book's ``init.Xavier()``)."""
    state_lib.load_state(model, training.xavier_state(model.config, seed))


def make_optimizer(model, lr: float, momentum: float = 0.0) -> gluon.Trainer:
    """The book's optimiser: SGD, no weight decay; momentum only if asked for."""
    return gluon.Trainer(model.collect_params(), "sgd",
                         {"learning_rate": lr, "momentum": momentum, "wd": 0.0})


_loss = gluon.loss.SoftmaxCrossEntropyLoss()


def train_step(model, optimizer, x, y):
    """One SGD step on a batch: (mean loss, correct predictions), as NDArrays."""
    with autograd.record():
        logits = model(x)
        loss = _loss(logits, y).mean()
    loss.backward()
    optimizer.step(1)  # the loss is already the batch mean (PyTorch's and optax's convention)
    return loss, (logits.argmax(axis=1) == y).sum()


def train_epoch(model, optimizer, dataset, batches, meter) -> None:
    """One pass over ``batches`` (index arrays into the train set) in train mode."""
    ctx = model.classifier.weight.list_ctx()[0]
    for idx in batches:
        x, y = dataset.batch(idx, "train")
        loss, correct = train_step(model, optimizer, mx.nd.array(x, ctx=ctx),
                                   mx.nd.array(y, ctx=ctx, dtype=np.float32))
        meter.update(float(loss.asscalar()), int(correct.asscalar()), len(idx))


def evaluate(model, dataset, batch_size: int) -> float:
    """Test accuracy in predict mode (BatchNorm running statistics)."""
    ctx = model.classifier.weight.list_ctx()[0]
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
    states = optimizer._updaters[0].states
    return {name: states[i].asnumpy().astype(np.float64) / -lr
            for i, name in _indexed_names(model, optimizer) if states.get(i) is not None}


def load_optimizer_state(model, optimizer, buffers: Dict[str, np.ndarray]) -> None:
    if not optimizer._optimizer.momentum or not buffers:
        return
    updater, lr = optimizer._updaters[0], optimizer.learning_rate
    ctx = model.classifier.weight.list_ctx()[0]
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
    to ``cfg.out``/metrics.json)."""
    reporter = reporter or training.ConsoleReporter(cfg.progress)
    device = select_device(cfg.device)
    model = build_model(cfg, dataset, device)
    if cfg.init:
        state_lib.load_state(model, training.initial_state(cfg, model.config))
    else:
        xavier_init(model, cfg.seed)
    model.hybridize(static_alloc=True)
    optimizer = make_optimizer(model, cfg.lr, cfg.momentum)
    return training.run_epochs(cfg, dataset, model, optimizer, sys.modules[__name__], reporter,
                               device_name(device), versions())


def main(argv=None) -> int:
    """The MXNet environment's entry point (see the module docstring)."""
    parser = training.make_parser("python -m densenet_mxnet.train")
    parser.add_argument("--prepared", default=None, metavar="NPZ",
                        help="dataset prepared by `densenet train` (densenet_training.data)")
    parser.add_argument("--events", action="store_true",
                        help="report progress as JSON lines on stdout, for the parent process")
    args = parser.parse_args(argv)
    args.backend = BACKEND
    if args.events:
        training.exit_with_parent()
    cfg = training.config_from_args(args)
    reporter = training.EventReporter() if args.events else training.ConsoleReporter(cfg.progress)
    try:
        if args.prepared:
            dataset = dataset_lib.load_npz(args.prepared)
        else:
            dataset = dataset_lib.load_dataset(cfg.dataset, cfg.resize, cfg.limit, cfg.data_dir,
                                               download=cfg.download, verify=cfg.verify)
        training.check_size(cfg, dataset)
        fit(cfg, dataset, reporter)
    except training.user_errors() as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
