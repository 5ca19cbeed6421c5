"""A per-layer summary in the style PyTorch users know from torchinfo: one row per module,
its output shape, trainable parameters and BatchNorm state, then the totals.
Same function as densenet_mxnet/summary.py and densenet_flax/summary.py."""
from __future__ import annotations

import torch
from torch import nn

RULE = "=" * 100


def _own_counts(module):
    params = sum(p.numel() for p in module.parameters(recurse=False) if p.requires_grad)
    state = sum(b.numel() for n, b in module.named_buffers(recurse=False)
                if n in ("running_mean", "running_var"))
    return params, state


def summary_rows(model: nn.Module, input_size, depth: int = 4):
    """[(depth, path, type, output shape, params, BN state)] for modules up to ``depth``;
    a row's counts include its children's."""
    outputs, hooks = {}, []
    names = {m: n for n, m in model.named_modules()}

    def record(mod, inputs, output):
        outputs.setdefault(names[mod], tuple(output.shape))

    for m in model.modules():
        hooks.append(m.register_forward_hook(record))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            out = model(torch.zeros(*input_size))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    outputs[""] = tuple(out.shape)
    rows = []
    for path, m in model.named_modules():
        d = 0 if path == "" else path.count(".") + 1
        if d > depth:
            continue
        params = state = 0
        for sub in m.modules():
            p, s = _own_counts(sub)
            params, state = params + p, state + s
        shape = outputs.get(path)
        if shape is None:  # called piecewise (a dense layer, functional ReLU): last child's output
            shape = next((outputs[f"{path}.{n}"] for n, _ in reversed(list(m.named_children()))
                          if f"{path}.{n}" in outputs), None)
        rows.append((d, path or type(model).__name__, type(m).__name__, shape, params, state))
    return rows


def summary(model: nn.Module, input_size, depth: int = 4) -> str:
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
              f"Input size: {list(input_size)}  Output size: {list(rows[0][3])}", RULE]
    return "\n".join(lines)
