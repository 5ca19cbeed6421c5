"""Each backend's default fast paths: what the benchmark uses unless a case says otherwise.
Framework-free, so the parent process (which plans cases and marks 'on by default') and the
case processes (which apply them) read the same table.

Why these (figures: docs/performance/):

* torch: channels_last on: faster on the CPU (oneDNN, eval and train) and what cuDNN's tensor
  core kernels want on a GPU. cudnn.benchmark on (GPU only: a fixed input shape, so the
  autotuning pays once). torch.compile off: it is measured, but it compiles for minutes on a
  CPU and its gain must be weighed against that.
* flax-nnx: split the model once (nnx.split) and jax.jit a pure function of its state that
  nnx.merge's it, with the parameters and BatchNorm state donated: nnx.jit over the module
  object pays a graph traversal per call. flax-linen: jax.jit with donation.
* mxnet: hybridize(static_alloc=True, static_shape=True).
* bfloat16 is a dtype choice (--dtype), not a default.
"""
from __future__ import annotations

from typing import Dict


def default_opts(backend: str, gpu: bool) -> Dict[str, object]:
    if backend in ("torch", "torchvision"):
        return {"channels_last": True, "compile": False, "cudnn_benchmark": gpu}
    if backend == "flax-nnx":
        return {"jit": "functional", "donate": True}
    if backend == "flax-linen":
        return {"jit": "jax", "donate": True}
    if backend in ("mxnet", "mxnet-zoo"):
        return {"hybridize": "static"}
    raise ValueError(f"unknown backend {backend!r}")
