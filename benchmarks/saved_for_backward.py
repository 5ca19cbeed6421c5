"""What a training step keeps for its backward pass, naive vs memory-efficient, measured in the
framework itself rather than in the process: ``python -m benchmarks.saved_for_backward``.

This is the quantity memory-efficient mode exists to shrink (the concatenations and the first
BatchNorm-ReLU outputs of every dense layer), independent of allocator, backend compiler and
machine:

* torch: the bytes of every distinct storage that autograd saves during the forward pass
  (torch.autograd.graph.saved_tensors_hooks), parameters excluded.
* Flax (NNX and linen): the residuals of ``jax.vjp`` of the training loss, i.e. what JAX hands
  from the forward to the backward computation, computed abstractly (jax.eval_shape: no
  arithmetic). Parameters are excluded by shape: for each parameter one residual of its
  shape and dtype is not counted (the weights a backward pass needs are not activations).

What XLA then does with the program is another matter: on the CPU, XLA removes the
optimization barriers that keep jax.checkpoint's recomputation apart from the forward pass,
merges the two again (common-subexpression elimination), and the compiled step needs the same
memory in both modes; ``xla_cpu_barriers`` reports that (barriers in the traced program vs in
the optimized one). On a GPU XLA keeps them.

Not for MXNet: Gluon has no memory-efficient mode (densenet_mxnet/model.py says why).
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from typing import Dict

import densenet_spec as spec


def torch_saved_bytes(preset: str, size: int, batch: int, efficient: bool) -> Dict[str, int]:
    import torch
    from densenet_torch import DenseNet
    cfg = spec.get_preset(preset)
    torch.manual_seed(0)
    model = DenseNet(**cfg.options(), memory_efficient=efficient, name=cfg.name).train()
    x = torch.randn(batch, cfg.in_channels, size, size)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: Dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).float().logsumexp(1).mean()
    return {"bytes": sum(seen.values()), "tensors": len(seen)}


def _nnx_train_loss(cfg, efficient: bool, abstract: bool):
    """(params, other state, loss): an NNX DenseNet in train mode, split, and its loss as a
    pure function (params, x, state) -> (mean logsumexp of the logits, new BatchNorm state).
    ``abstract``: built with nnx.eval_shape (shapes only, no initialisation)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from densenet_flax import model as M

    def build():
        return M.DenseNet(**cfg.options(), memory_efficient=efficient, rngs=nnx.Rngs(0))

    model = nnx.eval_shape(build) if abstract else build()
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, x, rest):
        # fresh Variables at this trace level: the BatchNorm update mutates them
        m = nnx.merge(graphdef, params, jax.tree.map(lambda a: a, rest))
        return jnp.mean(jax.nn.logsumexp(m(x), axis=-1)), nnx.state(m, nnx.BatchStat)

    return params, rest, loss


def flax_saved_bytes(preset: str, size: int, batch: int, efficient: bool,
                     variant: str = "nnx") -> Dict[str, int]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    cfg = spec.get_preset(preset)
    x = jax.ShapeDtypeStruct((batch, size, size, cfg.in_channels), jnp.float32)
    if variant == "nnx":
        params, rest, nnx_loss = _nnx_train_loss(cfg, efficient, abstract=True)

        def loss(params, x, rest):
            return nnx_loss(params, x, rest)[0]
    else:
        from densenet_flax import linen
        net = linen.DenseNet(**cfg.options(), memory_efficient=efficient)
        variables = jax.eval_shape(lambda x: net.init(jax.random.key(0), x, train=False), x)
        params, rest = variables["params"], variables["batch_stats"]

        def loss(params, x, rest):
            out, _ = net.apply({"params": params, "batch_stats": rest}, x, train=True,
                               mutable=["batch_stats"])
            return jnp.mean(jax.nn.logsumexp(out, axis=-1))

    residuals = jax.eval_shape(
        lambda p, r, x: jax.tree.leaves(jax.vjp(lambda p, x: loss(p, x, r), p, x)[1]),
        params, rest, x)
    left = Counter((tuple(a.shape), str(a.dtype)) for a in jax.tree.leaves(params))
    total, count = 0, 0
    for a in residuals:
        key = (tuple(a.shape), str(a.dtype))
        if left[key]:
            left[key] -= 1
            continue
        total += int(np.prod(a.shape)) * a.dtype.itemsize
        count += 1
    return {"bytes": total, "tensors": count}


def xla_cpu_barriers(preset: str, size: int, batch: int) -> Dict[str, int]:
    """Optimization barriers in the memory-efficient NNX training gradient: in the program JAX
    traces (StableHLO) and in what XLA compiled for this machine's default backend."""
    import jax
    import jax.numpy as jnp
    cfg = spec.get_preset(preset)
    params, rest, loss = _nnx_train_loss(cfg, True, abstract=False)
    x = jnp.zeros((batch, size, size, cfg.in_channels), jnp.float32)
    lowered = jax.jit(jax.grad(loss, has_aux=True)).lower(params, x, rest)
    compiled = lowered.compile()
    return {"backend": jax.default_backend(),
            "traced": lowered.as_text().count("optimization_barrier"),
            "compiled": compiled.as_text().count("opt-barrier"),
            "compiled_temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes)}


def saved_bytes(backend: str, preset: str, size: int, batch: int,
                efficient: bool) -> Dict[str, int]:
    """torch_saved_bytes or flax_saved_bytes by benchmark backend name."""
    if backend == "torch":
        return torch_saved_bytes(preset, size, batch, efficient)
    if backend in ("flax-nnx", "flax-linen"):
        return flax_saved_bytes(preset, size, batch, efficient, variant=backend.split("-")[1])
    raise ValueError(f"no saved-for-backward measure for {backend!r} (torch, flax-nnx, "
                     "flax-linen; MXNet Gluon has no memory-efficient mode)")


def measure(backend: str, preset: str, size: int, batch: int) -> Dict[str, object]:
    """Naive and efficient bytes and their ratio for one backend (torch, flax-nnx, flax-linen)."""
    naive = saved_bytes(backend, preset, size, batch, False)
    eff = saved_bytes(backend, preset, size, batch, True)
    return {"backend": backend, "preset": preset, "size": size, "batch": batch,
            "naive_bytes": naive["bytes"], "efficient_bytes": eff["bytes"],
            "ratio": eff["bytes"] / naive["bytes"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="densenet121")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--backends", default="torch,flax-nnx,flax-linen")
    ap.add_argument("--barriers", action="store_true",
                    help="also compile the Flax step and count XLA's optimization barriers")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = []
    for b in [s for s in args.backends.split(",") if s]:
        r = measure(b, args.preset, args.size, args.batch)
        rows.append(r)
        print(f"{b:10s} {args.preset} {args.size}px b{args.batch}: naive "
              f"{r['naive_bytes'] / 2**20:8.1f} MiB, efficient {r['efficient_bytes'] / 2**20:8.1f} "
              f"MiB, ratio {r['ratio']:.2f}", flush=True)
    out = {"saved_for_backward": rows}
    if args.barriers:
        out["xla_barriers"] = xla_cpu_barriers(args.preset, args.size, args.batch)
        print("optimization barriers (memory-efficient NNX step): "
              f"{out['xla_barriers']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
