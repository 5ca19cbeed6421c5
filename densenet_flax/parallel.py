"""Data parallelism in JAX: one SGD step of a DenseNet over N devices, on JAX's own engine.

Same functions, same order, same options as densenet_torch/parallel.py and
densenet_mxnet/parallel.py. What BatchNorm does there (docs/data_parallel.md):

- ``sync_bn=True``: one jitted step over a batch sharded along a device mesh (jax.sharding).
  XLA partitions the program and all-reduces what needs all-reducing: BatchNorm sees the
  *global* batch, so the step is the single-device step on the global batch.
- ``sync_bn=False``: the per-device step of ``shard_map``: each device normalises its own
  share with its own moments; the gradients and the updated running statistics are averaged
  over the devices (``lax.pmean``, as Flax's ImageNet example averages ``batch_stats``).

On a CPU JAX has one device unless ``--xla_force_host_platform_device_count`` is set before it
starts, so ``data_parallel_step`` runs the step in a child process with N host CPU devices when
this process has fewer devices than N (a CPU, or fewer GPUs); the result names the platform.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from typing import Optional

import numpy as np

import densenet_spec as spec
from densenet_weights import files

BACKEND = "flax"


def batchnorm_semantics(sync_bn: bool = False) -> str:
    """In words: what BatchNorm computes in this framework's data-parallel step."""
    if sync_bn:
        return ("jit over a batch-sharded mesh: the global batch's moments (XLA all-reduces "
                "them); running statistics updated once from them")
    return ("shard_map: each device's own moments; gradients and updated running statistics "
            "averaged over the devices (lax.pmean)")


def sync_bn_unsupported(devices: int) -> Optional[str]:
    """Why synchronised BatchNorm cannot run on ``devices`` devices here (None: it can; a
    jitted step over a sharded batch runs on any JAX devices)."""
    return None


def data_parallel_step(config: dict, state: dict, x, labels, devices: int = 2,
                       sync_bn: bool = False, lr: float = 0.1, dtype: str = "float64",
                       steps: int = 1, variant: str = "nnx") -> dict:
    """One SGD step (lr ``lr``) of the NNX or linen DenseNet on ``devices`` devices, the global
    batch ``x`` (canonical NCHW) split evenly: the mean loss and the new canonical state.
    ``steps`` > 1 repeats the step on the same batch and times each (``step_seconds``: the
    scaling benchmark; the first includes compiling); the loss is the first step's."""
    if variant not in ("nnx", "linen"):
        raise ValueError(f"variant must be 'nnx' or 'linen', got {variant!r}")
    spec.check_devices(len(x), devices)
    import jax
    if jax.device_count() >= devices:
        return _step(config, state, np.asarray(x), np.asarray(labels), devices, sync_bn, lr,
                     dtype, variant, steps)
    # Fewer devices here than asked for (a CPU, or fewer GPUs): N host CPU devices in a child.
    return _in_child(config, state, x, labels, devices, sync_bn, lr, dtype, variant, steps)


def _step(config, state, x, labels, devices, sync_bn, lr, dtype, variant, steps=1):
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from flax import nnx

    from densenet_flax import runtime
    from densenet_flax.state import export_state
    mesh = Mesh(np.array(jax.devices()[:devices]), ("data",))
    with runtime.numerics(dtype):
        xs, ys = runtime.nhwc(x, dtype), runtime.targets(labels, dtype)
        if variant == "nnx":
            model = runtime.loaded(config, state, dtype=dtype)
            model.train()
            graphdef, params, rest = nnx.split(model, nnx.Param, ...)

            def loss_of(params, rest, xb, yb):
                def loss_fn(p):
                    m = nnx.merge(graphdef, p, jax.tree.map(lambda a: a, rest))
                    return runtime.loss(m(xb), yb), nnx.state(m, nnx.BatchStat)
                return loss_fn
        else:
            model, variables = runtime.loaded(config, state, variant="linen", dtype=dtype)
            params, rest = variables["params"], variables["batch_stats"]

            def loss_of(params, batch_stats, xb, yb):
                return runtime.linen_loss(model, batch_stats, xb, yb)

        def local(params, rest, xb, yb):
            (loss, stats), grads = jax.value_and_grad(loss_of(params, rest, xb, yb),
                                                      has_aux=True)(params)
            return loss, grads, stats

        if sync_bn:
            batch = NamedSharding(mesh, P("data"))
            xs, ys = jax.device_put(xs, batch), jax.device_put(ys, batch)
            fn = local
        else:
            def per_device(params, rest, xb, yb):
                # The loss is the devices' mean (pmean) inside the differentiated function:
                # shard_map's autodiff then gives the mean gradient for the replicated
                # parameters (it sums over devices where a replicated value meets per-device
                # ones); the running statistics are averaged explicitly.
                def mean_loss(p):
                    loss, stats = loss_of(params, rest, xb, yb)(p)
                    return jax.lax.pmean(loss, "data"), stats
                (loss, stats), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)
                return loss, grads, jax.tree.map(lambda t: jax.lax.pmean(t, "data"), stats)
            fn = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")),
                               out_specs=(P(), P(), P()))
        step, times, first = jax.jit(fn), [], None
        for _ in range(steps):
            t0 = time.perf_counter()
            loss, grads, stats = step(params, rest, xs, ys)
            params = jax.block_until_ready(runtime.sgd(params, grads, lr))
            times.append(time.perf_counter() - t0)
            first = float(loss) if first is None else first
            if variant == "nnx":
                nnx.update(model, params, stats)
                _, params, rest = nnx.split(model, nnx.Param, ...)
            else:
                rest = stats
        if variant == "nnx":
            arrays = export_state(model, dtype=dtype)
        else:
            arrays = export_state(model, {"params": params, "batch_stats": rest}, dtype=dtype)
    return {"loss": first, "arrays": arrays, "devices": devices,
            "platform": mesh.devices.flat[0].platform, "step_seconds": times,
            "semantics": batchnorm_semantics(sync_bn)}


def _in_child(config, state, x, labels, devices, sync_bn, lr, dtype, variant, steps):
    """The step in a child process with ``devices`` host devices (JAX fixes its device count
    when it starts); arrays travel as .npz files, never pickles."""
    with tempfile.TemporaryDirectory() as d:
        files.write_message(d, "in", {
            "config": config, "devices": devices, "sync_bn": sync_bn, "lr": lr, "dtype": dtype,
            "variant": variant, "steps": steps, "state": dict(state),
            "batch": {"x": np.asarray(x), "labels": np.asarray(labels)}})
        flags = os.environ.get("XLA_FLAGS", "")
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}".strip())
        proc = subprocess.run([sys.executable, "-m", "densenet_flax.parallel", d], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"the {devices}-device JAX step failed:\n{proc.stderr[-3000:]}")
        return files.read_message(d, "out")


def _child(d: str) -> None:
    a = files.read_message(d, "in")
    files.write_message(d, "out", _step(
        a["config"], a["state"], a["batch"]["x"], a["batch"]["labels"], a["devices"],
        a["sync_bn"], a["lr"], a["dtype"], a["variant"], a["steps"]))


if __name__ == "__main__":
    _child(sys.argv[1])
