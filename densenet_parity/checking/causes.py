"""The conventions most likely behind a first numerical difference, in the book's words.

Every cause belongs to the preset's family: the conv family's (padding, pooling, layout) are
never offered for an MLP DenseNet, whose candidates are its own (the ReLUs between its Linear
layers, the transition's closing ReLU ``transition_relu``, BatchNorm1d, concatenation order,
dropout)."""
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
    if getattr(config, "family", "conv") == "mlp":
        return _mlp_convention(config, module, kind, u, r, mode)
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


def _mlp_convention(config, module: str, kind: str, u, r, mode: str) -> str:
    """The same for the MLP DenseNet: (N, features) throughout, no convolution, no pooling."""
    if u.shape != r.shape:
        return (f"the output's shape is {list(u.shape)}, the reference's {list(r.shape)}: a "
                "Linear layer's width differs (features are axis 1 of (N, features))")
    short = module[len("features."):] if module.startswith("features.") else module
    parts = short.split(".")
    relu = getattr(config, "transition_relu", True)
    dropout = (f"; or dropout after a dense layer's Linear (drop_rate {config.drop_rate:g}: "
               "inactive in eval mode)" if mode != "eval" else "")
    if short == "linear0":
        return ("the stem's first Linear: the input rows (N, features) must reach it as they "
                "are (the features' order, no scaling or transpose)")
    if parts[0].startswith("linear"):
        return "the stem's ReLU between its Linear layers (Linear-ReLU-Linear-ReLU)"
    if parts[0].startswith("denseblock") and parts[-1] == "norm1" and parts[1] == "denselayer1":
        if parts[0] == "denseblock1":
            return ("the stem's closing ReLU: the stem is Linear-ReLU-Linear-ReLU, and the "
                    "first dense block takes its output")
        return ("the transition's closing ReLU: " + (
            "the preset's transition is BatchNorm1d-ReLU-Linear-ReLU (transition_relu=True, the "
            "forum's); the model's leaves the last ReLU out" if relu else
            "the preset's transition is BatchNorm1d-ReLU-Linear with no ReLU after the Linear "
            "(transition_relu=False); the model's adds one") + dropout)
    if parts[0].startswith("denseblock") and parts[-1] == "norm1" or (
            parts[0].startswith("transition") and parts[-1] == "norm") or (
            parts[0].startswith("norm")):
        return ("concatenation order: each dense layer's input is torch.cat((X, Y), dim=1), "
                "the block's input first, then the new features (features are axis 1); or the "
                "ReLU between the previous layer's BatchNorm1d and Linear" + dropout)
    if short == "classifier":
        return ("the head: BatchNorm1d, ReLU, then the Linear to the outputs, on (N, features) "
                "as they are")
    if kind == "bn":
        if mode == "eval":
            return ("BatchNorm1d in eval mode: epsilon (1e-5 in PyTorch, Gluon and Flax only if "
                    "set) or the running statistics it normalises with")
        return ("BatchNorm1d in train mode: it must normalise with the batch's statistics "
                "(the biased batch variance)")
    return ("the ReLU between BatchNorm1d and the Linear (BatchNorm1d-ReLU-Linear), or the "
            "Linear's width" + dropout)
