"""A per-layer summary in the layout of densenet_torch/summary.py (torchinfo's): one row per
block, its output shape, trainable parameters and BatchNorm state, then the totals. Gluon's own
``Block.summary`` prints another layout and counts the running statistics as "non-trainable
params"; here they are the BN-state column, as in every backend.
Same function as densenet_torch/summary.py and densenet_flax/summary.py."""
from __future__ import annotations

import mxnet as mx

RULE = "=" * 100


def _named_blocks(block, path=""):
    """(path, block) for ``block`` and all its descendants, in order (torch's named_modules)."""
    yield path, block
    for name, child in block._children.items():
        yield from _named_blocks(child, f"{path}.{name}" if path else name)


def _counts(block):
    params = state = 0
    for name, p in block._collect_params_with_prefix().items():
        if p.grad_req != "null":
            params += p.data().size
        elif name.rsplit(".", 1)[-1] in ("running_mean", "running_var"):
            state += p.data().size
    return params, state


def _type_name(block):
    # Our private containers show as the Gluon class they extend (HybridSequential).
    cls = type(block)
    while cls.__name__.startswith("_"):
        cls = cls.__mro__[1]
    return cls.__name__


def summary_rows(model, input_size, depth: int = 4):
    """[(depth, path, type, output shape, params, BN state)] for blocks up to ``depth``;
    a row's counts include its children's. The model must be initialised and, as for Gluon's
    own Block.summary, not hybridized (a cached graph calls no child blocks to observe)."""
    if getattr(model, "_active", False):
        raise ValueError("summary needs a model that is not hybridized (as Gluon's Block.summary); "
                         "call model.hybridize(False) first")
    blocks = list(_named_blocks(model))
    names = {id(b): n for n, b in blocks}
    outputs, hooks = {}, []

    def record(block, inputs, output):
        outputs.setdefault(names[id(block)], tuple(output.shape))

    for _, b in blocks:
        hooks.append(b.register_forward_hook(record))
    try:
        with mx.autograd.predict_mode():
            model(mx.nd.zeros(tuple(input_size), ctx=model.collect_params().list_ctx()[0]))
    finally:
        for h in hooks:
            h.detach()
    rows = []
    for path, b in blocks:
        d = 0 if path == "" else path.count(".") + 1
        if d > depth:
            continue
        params, state = _counts(b)
        rows.append((d, path or type(model).__name__, _type_name(b), outputs.get(path), params, state))
    return rows


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
              f"Non-trainable params: 0",
              f"BatchNorm state (running mean + var): {total_s:,} "
              "(Gluon Parameters with grad_req='null')",
              f"Input size: {list(input_size)}  Output size: {list(rows[0][3])}", RULE]
    return "\n".join(lines)
