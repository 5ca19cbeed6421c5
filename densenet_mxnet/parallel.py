"""Data parallelism in MXNet Gluon: one SGD step of a DenseNet over N contexts, on Gluon's own
engine: the batch split over the contexts (``gluon.utils.split_and_load``), one backward pass
per context, and a ``Trainer`` whose kvstore sums the gradients.

Same functions, same order, same options as densenet_torch/parallel.py and
densenet_flax/parallel.py. What BatchNorm does there (docs/data_parallel.md):

- ``sync_bn=False`` (Gluon's default): every context normalises its share with its own
  moments (the biased batch variance, as on one device) and updates its own copy of the
  running statistics; the parameters stay equal (the kvstore sums the gradients, ``step``
  divides). But a ``Trainer`` given ``collect_params()`` (as the book's multi-GPU code does)
  holds the running statistics too, and at its first step its kvstore initialisation copies
  context 0's value of every parameter it holds to every context: after one step every copy
  is context 0's. From then on the copies drift apart; ``save_parameters`` writes their
  *average* (``Parameter._reduce``), and so does this step's canonical state.
- ``sync_bn=True``: ``gluon.contrib.nn.SyncBatchNorm`` syncs the moments across devices. On
  CPU contexts its forward pass never returns in MXNet 1.9.1 (it waits for the other
  devices' moments, which its CPU engine does not compute alongside), and MXNet's last CUDA
  builds predate the GPUs this project is lent: a clear error here, whatever the machine.
"""
from __future__ import annotations

import time
from typing import Optional

import numpy as np

import densenet_spec as spec

BACKEND = "mxnet"


def batchnorm_semantics(sync_bn: bool = False) -> str:
    """In words: what BatchNorm computes in this framework's data-parallel step."""
    if sync_bn:
        return "contrib.nn.SyncBatchNorm: the moments of all devices (GPU contexts only)"
    return ("Gluon's default: each context's own moments and copy of the running statistics; "
            "gradients summed by the kvstore; the Trainer's first step copies context 0's "
            "statistics to every context; saved: the average of the copies")


def sync_bn_unsupported(devices: int) -> Optional[str]:
    """Why synchronised BatchNorm cannot run on ``devices`` devices here (None: it can)."""
    import mxnet as mx
    return (f"--sync-bn: Gluon's contrib.nn.SyncBatchNorm needs GPU contexts (on CPU contexts "
            f"its forward pass never returns in MXNet {mx.__version__}), and this project has no "
            f"CUDA build of MXNet (DESIGN.md 4); this machine has {mx.context.num_gpus()} GPU(s) "
            "MXNet can use")


def data_parallel_step(config: dict, state: dict, x, labels, devices: int = 2,
                       sync_bn: bool = False, lr: float = 0.1, dtype: str = "float64",
                       steps: int = 1) -> dict:
    """One SGD step (lr ``lr``) of the Gluon DenseNet on ``devices`` contexts (``cpu(0)`` ..
    ``cpu(N-1)`` on a CPU, ``gpu(i)`` where there are N GPUs), the global batch ``x``
    (canonical NCHW) split evenly: the mean loss and the new canonical state. ``steps`` > 1
    repeats the step on the same batch and times each (``step_seconds``: the scaling
    benchmark); the loss is the first step's."""
    import mxnet as mx
    from mxnet import autograd, gluon

    from densenet_mxnet.runtime import from_config
    from densenet_mxnet.state import _canonical_params, load_state
    spec.check_devices(len(x), devices)
    gpus = mx.context.num_gpus()
    if sync_bn:
        raise ValueError(sync_bn_unsupported(devices))
    ctxs = [mx.gpu(i) for i in range(devices)] if gpus >= devices else \
        [mx.cpu(i) for i in range(devices)]
    model = from_config(config)
    with ctxs[0]:
        load_state(model, state)
    if dtype != "float32":
        model.cast(dtype)
    model.collect_params().reset_ctx(ctxs)
    model.hybridize()
    trainer = gluon.Trainer(model.collect_params(), "sgd", {"learning_rate": lr},
                            kvstore="device")
    xs = gluon.utils.split_and_load(mx.nd.array(np.asarray(x), dtype=dtype), ctxs)
    ys = gluon.utils.split_and_load(mx.nd.array(np.asarray(labels), dtype=dtype), ctxs)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    times, first = [], None
    for _ in range(steps):
        t0 = time.perf_counter()
        with autograd.record():
            losses = [loss_fn(model(a), b).mean() for a, b in zip(xs, ys)]
        for loss in losses:
            loss.backward()
        trainer.step(devices)  # the kvstore sums the per-context mean gradients; / devices
        mx.nd.waitall()
        times.append(time.perf_counter() - t0)
        first = first if first is not None else float(np.mean([l.asscalar() for l in losses]))
    arrays = {k: np.mean([d.asnumpy() for d in p.list_data()], axis=0).astype(dtype)
              for k, p in _canonical_params(model).items()}
    return {"loss": first, "arrays": arrays,
            "devices": devices, "platform": ctxs[0].device_type, "step_seconds": times,
            "semantics": batchnorm_semantics(sync_bn)}
