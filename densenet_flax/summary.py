"""A per-layer summary in the layout of densenet_torch/summary.py (torchinfo's): one row per
module, its output shape, trainable parameters and BatchNorm state, then the totals.
Flax's own ``nnx.tabulate`` / ``Module.tabulate`` print another layout (a table per call, the
running statistics as 'BatchStat'); here they are the BN-state column, as in every backend.
Shapes are Flax's own, NHWC. ReLU and the pools are functions in Flax, not modules: no rows.
Same function as densenet_torch/summary.py and densenet_mxnet/summary.py.

NNX: ``summary(model, (N, H, W, C))``; linen: ``summary(model, (N, H, W, C))`` too (the
variables are initialised abstractly: the summary needs none).
"""
from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

RULE = "=" * 100


def _size(tree) -> int:
    return int(sum(np.prod(a.shape) for a in jax.tree.leaves(tree)))


def _named_modules(module, path=()):
    """NNX: (path, module) for ``module`` and its descendants in definition order (torch's
    named_modules): attributes keep their insertion order."""
    yield path, module
    for name, value in vars(module).items():
        if isinstance(value, nnx.Module):
            yield from _named_modules(value, path + (name,))


@contextlib.contextmanager
def _recording_calls(classes, record):
    """Wrap ``__call__`` of the given NNX classes for the duration (as nnx.tabulate does)."""
    owners = {next(c for c in cls.__mro__ if "__call__" in vars(c)) for cls in classes}
    saved = {c: vars(c)["__call__"] for c in owners}

    def wrap(original):
        def __call__(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            record(self, out)
            return out
        return __call__
    try:
        for c, original in saved.items():
            setattr(c, "__call__", wrap(original))
        yield
    finally:
        for c, original in saved.items():
            setattr(c, "__call__", original)


def _nnx_rows(model, input_size, depth):
    shapes = {}

    def run(model, x):
        model.eval()  # on the copy nnx.eval_shape traces, not on the caller's model
        paths = {id(m): p for p, m in _named_modules(model)}
        classes = {type(m) for _, m in _named_modules(model)}
        def record(m, out):  # a module copied inside nnx.remat is not the model's: no row
            if id(m) in paths:
                shapes.setdefault(paths[id(m)], tuple(out.shape))
        with _recording_calls(classes, record):
            return model(x)

    nnx.eval_shape(run, model, jax.ShapeDtypeStruct(tuple(input_size), jnp.float32))
    rows = []
    for path, m in _named_modules(model):
        params = _size(nnx.state(m, nnx.Param))
        state = _size(nnx.state(m, nnx.BatchStat))
        rows.append((path, type(m).__name__, params, state))
    return _finish(rows, shapes, type(model).__name__, depth)


def _linen_rows(model, input_size, depth):
    order, types, shapes = [], {}, {}

    def intercept(next_fun, args, kwargs, context):
        path = context.module.path
        if path not in types:
            order.append(path)
            types[path] = type(context.module).__name__
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and hasattr(out, "shape"):
            shapes.setdefault(path, tuple(out.shape))
        return out

    x = jax.ShapeDtypeStruct(tuple(input_size), jnp.float32)
    with nn.intercept_methods(intercept):
        variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)

    def subtree(collection, path):
        tree = variables.get(collection, {})
        for key in path:
            tree = tree.get(key, {})
        return tree
    rows = [(p, types[p], _size(subtree("params", p)), _size(subtree("batch_stats", p)))
            for p in order]
    return _finish(rows, shapes, type(model).__name__, depth)


def _finish(rows, shapes, top, depth):
    """Rows as densenet_torch.summary's: a module called piecewise (a dense layer, linen's
    Features) shows its last child's output."""
    out = []
    for path, typ, params, state in rows:
        if len(path) > depth:
            continue
        shape = shapes.get(path)
        if shape is None:
            children = [p for p, *_ in rows if len(p) == len(path) + 1 and p[:len(path)] == path]
            shape = next((shapes[c] for c in reversed(children) if c in shapes), None)
        out.append((len(path), ".".join(path) or top, typ, shape, params, state))
    return out


def summary_rows(model, input_size, depth: int = 4):
    """[(depth, path, type, output shape, params, BN state)] for modules up to ``depth``;
    a row's counts include its children's. ``input_size`` is NHWC. Abstract evaluation only:
    no compute, no parameter memory beyond the model's own."""
    if isinstance(model, nnx.Module):
        return _nnx_rows(model, input_size, depth)
    return _linen_rows(model, input_size, depth)


def summary(model, input_size, depth: int = 4) -> str:
    """The summary as text (torchinfo's layout, with a BN-state column)."""
    rows = summary_rows(model, input_size, depth)
    lines = [RULE, f"{'Layer (path: type)':<58}{'Output Shape':<20}{'Param #':>11}{'BN state':>11}", RULE]
    for d, path, typ, shape, params, state in rows[1:]:
        label = ("│    " * (d - 1) + "└─" + f"{path.rsplit('.', 1)[-1]}: {typ}")[:57]
        shape_s = str(list(shape)) if shape is not None else "--"
        lines.append(f"{label:<58}{shape_s:<20}{params:>11,}{state:>11,}")
    total_p, total_s = rows[0][4], rows[0][5]
    lines += [RULE, f"Total params: {total_p:,}", f"Trainable params: {total_p:,}",
              f"Non-trainable params: 0", f"BatchNorm state (running mean + var): {total_s:,}",
              f"Input size: {list(input_size)}{' (NHWC)' if len(input_size) == 4 else ''}  "
              f"Output size: {list(rows[0][3])}", RULE]
    return "\n".join(lines)
