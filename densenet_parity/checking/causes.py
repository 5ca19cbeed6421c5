"""The conventions most likely behind a first numerical difference, in the book's words."""
from __future__ import annotations

import numpy as np

def _previous(config, module) -> str:
    """What feeds a canonical module, in the book's words (for the likely cause)."""
    short = module[len("features."):] if module.startswith("features.") else module
    parts = short.split(".")
    if short == "conv0":
        return "stem"
    if parts[0].startswith("denseblock") and parts[2] == "norm1":
        j, b = int(parts[1][len("denselayer"):]), int(parts[0][len("denseblock"):])
        if j == 1:
            return "stem pool" if b == 1 else "transition pool"
        return "concat"
    if parts[0].startswith("transition") and parts[1] == "norm" or (
            parts[0].startswith("norm") and parts[0] != "norm0"):
        return "block output"
    if short == "classifier":
        return "head"
    return "inside"


def convention(config, module: str, kind: str, u, r, mode: str) -> str:
    """The convention most likely behind a first difference at ``module``."""
    u, r = np.asarray(u, np.float64), np.asarray(r, np.float64)
    if u.shape != r.shape:
        return (f"the output's shape is {list(u.shape)}, the reference's {list(r.shape)}: "
                "a stride, padding or pooling size differs (layout: NCHW in PyTorch and Gluon, "
                "NHWC in Flax)")
    if u.ndim == 4 and u.shape[2] == u.shape[3] > 1 and np.allclose(
            u, r.transpose(0, 1, 3, 2), rtol=1e-4, atol=1e-5) and not np.allclose(
            u, r, rtol=1e-4, atol=1e-5):
        return "height and width are swapped (a layout transpose: NCHW vs NHWC, or HWIO vs OIHW)"
    where = _previous(config, module)
    if where == "stem":
        return ("padding of the stem's 7x7/2 conv: PyTorch pads 3 on every side; Flax's "
                "padding='SAME' at stride 2 pads 2 before and 3 after (use ((3, 3), (3, 3))), "
                "as Keras' padding='same' does (use ZeroPadding2D(3) and padding='valid', as "
                "keras.applications' DenseNets do)")
    if where == "stem pool":
        return ("the stem's pooling: a 3x3 max pool, stride 2, padding 1 (kind or padding; "
                "Flax's padding='SAME' and Keras' padding='same' at stride 2 pad asymmetrically; "
                "Keras: ZeroPadding2D(1) then a 'valid' max pool, zeros after a ReLU being -inf "
                "padding)")
    if where == "transition pool":
        kind = "max" if getattr(config, "transition_pool", "avg") == "max" else "average"
        return f"the transition's pooling: a 2x2 {kind} pool, stride 2, no padding"
    if where == "concat" or where == "block output":
        return ("concatenation order: the book concatenates the input first, then the new "
                "features (torch.cat((X, Y), dim=1)); or the ReLU before this BatchNorm's layer")
    if where == "head":
        return ("the head: ReLU, then global *average* pooling (one source text has "
                "AdaptiveMaxPool2d, a copy error), then the dense layer")
    if kind == "bn":
        if mode == "eval":
            return ("BatchNorm in eval mode: epsilon (1e-5 in PyTorch, Gluon and Flax only if "
                    "set) or the running statistics it normalises with")
        return "BatchNorm in train mode: it must normalise with the batch's statistics"
    return "the convolution's padding (3x3: padding 1), or the ReLU between BatchNorm and conv"
