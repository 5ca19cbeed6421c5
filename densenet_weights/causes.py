"""The porting mistake most likely behind a structural difference: a ``match.Difference`` (the
first layer whose shapes are not the preset's) read in the book's words, for the converter's
refusal and the check's report alike. (The conventions behind a *numerical* difference are
the check's: densenet_parity.checking.causes.)"""
from __future__ import annotations

from typing import Optional

import densenet_spec as spec
from densenet_weights.match import Difference


def likely_structural_cause(config, diff: Difference) -> Optional[str]:
    """The porting mistake most likely behind a structural difference."""
    import re
    if diff is None or not diff.module:
        return None
    found = [int(x) for x in re.findall(r"over (\d+) channels|-> (\d+) channels", diff.found)
             for x in x if x]
    short = diff.module.replace("features.", "")
    if diff.change in ("missing", "extra"):
        return _layer_count_cause(config, diff, short)
    if config.family == "mlp":
        return _mlp_cause(config, diff, short)
    if diff.kind == "bn" and short.endswith("norm1") and found:
        b, j = (int(t) for t in re.findall(r"\d+", short)[:2])
        c0 = spec.module_arithmetic(config, f"features.denseblock{b}.denselayer1.norm1")
        start = int(re.search(r"input: (\d+)", c0).group(1))
        if found[0] == start and j > 1:
            return ("the layer's input did not grow: the concatenation is on the wrong axis "
                    "(channels are axis 1 in PyTorch and Gluon, NCHW; the last axis in Flax, NHWC) "
                    "or missing")
        if found[0] == config.growth_rate:
            return ("this BatchNorm sees only the new features: the layer is conv-BN-ReLU "
                    "(post-activation) where the book's is BN-ReLU-conv")
    if diff.kind == "conv" and short.startswith("transition") and len(found) >= 1:
        if "-> " in diff.found and re.search(r"(\d+) -> (\d+)", diff.found):
            cin, cout = (int(x) for x in re.search(r"(\d+) -> (\d+)", diff.found).groups())
            if cout == cin:
                return "no compression: the transition keeps every channel (the book halves them)"
            return ("the transition's channels: num_channels // 2 must be taken after adding the "
                    "block's num_convs x growth_rate channels")
    if diff.kind == "dense" and short == "classifier":
        return ("the dense layer's inputs: the head must average over height and width, NCHW's "
                "dims 2 and 3 but NHWC's axes 1 and 2 (a layout slip), leaving the channels")
    if diff.kind == "conv" and short == "conv0":
        return "the stem: a 7x7 conv with stride 2 (ImageNet stem) or a 3x3 conv (CIFAR stem)"
    return None


def _mlp_cause(config, diff: Difference, short: str) -> Optional[str]:
    """The porting mistake most likely behind a structural difference of an MLP DenseNet."""
    import re
    dense = re.search(r"dense layer (\d+) -> (\d+)", diff.found)
    norm = re.search(r"BatchNorm over (\d+)", diff.found)
    parts = short.split(".")
    if diff.kind == "bn" and parts[-1] == "norm1" and norm:
        b, j = (int(t) for t in re.findall(r"\d+", short)[:2])
        start = spec.module_arithmetic(config, f"features.denseblock{b}.denselayer1.norm1")
        if int(norm.group(1)) == int(re.search(r"input: (\d+)", start).group(1)) and j > 1:
            return ("the layer's input did not grow: each layer's input is the concatenation "
                    "torch.cat((X, Y), dim=1) of the block's input and every earlier output "
                    "(features are axis 1 of (N, features)); it is missing or on the wrong axis")
    if diff.kind == "dense" and dense:
        cin, cout = (int(x) for x in dense.groups())
        if parts[0].startswith("transition"):
            if cout == cin:
                return "no compression: the transition keeps every feature (the forum halves them)"
            return ("the transition's width: num_channels // 2 must be taken after adding the "
                    "block's num_convs x growth_rate features")
        if parts[0].startswith("denseblock"):
            return (f"a dense layer's output is the growth rate ({config.growth_rate}), its input "
                    "the block's input plus the growth rate per earlier layer")
        if parts[0].startswith("linear"):
            return (f"the stem's widths: {' -> '.join(map(str, (config.in_features,) + tuple(config.stem_widths)))}"
                    " (stem_widths; in_features is the data's column count)")
        if short == "classifier":
            return (f"the head's Linear takes the last dense block's output, "
                    f"{spec.final_features(config)} features")
    return None


def _recipe(config, short: str) -> str:
    """The part of the preset a canonical module belongs to, as the book (or the forum, for the
    MLP family) writes it."""
    part = short.split(".")[0]
    if config.family == "mlp":
        relu = "-ReLU" if getattr(config, "transition_relu", True) else ""
        if part.startswith("transition"):
            return f"the transition is BatchNorm1d-ReLU-Linear{relu}, halving the features"
        if part.startswith("denseblock"):
            return "each dense layer is BatchNorm1d-ReLU-Linear, its output concatenated to its input"
        if part.startswith("linear"):
            widths = " -> ".join(map(str, (config.in_features,) + tuple(config.stem_widths)))
            return f"the stem is Linear-ReLU per width ({widths})"
        return "the head is BatchNorm1d-ReLU-Linear to the outputs"
    if part.startswith("transition"):
        pool = "max" if getattr(config, "transition_pool", "avg") == "max" else "average"
        return f"the transition is BatchNorm-ReLU-1x1 conv-2x2 {pool} pool"
    if part.startswith("denseblock"):
        if getattr(config, "bn_size", None):
            return "each dense layer is BatchNorm-ReLU-1x1 conv-BatchNorm-ReLU-3x3 conv (bottleneck)"
        return "each conv_block is BatchNorm-ReLU-3x3 conv, its output concatenated to its input"
    if part in ("conv0", "norm0"):
        return ("the stem is a 7x7/2 conv-BatchNorm-ReLU-3x3/2 max pool"
                if getattr(config, "stem", "imagenet") == "imagenet" else "the stem is one 3x3 conv")
    return "the head is BatchNorm-ReLU-global average pool-dense layer"


def _layer_count_cause(config, diff: Difference, short: str) -> str:
    """A layer the model lacks or has in addition, in its family's words."""
    what = {"bn": "BatchNorm1d" if config.family == "mlp" else "BatchNorm",
            "conv": "convolution", "dense": "Linear" if config.family == "mlp" else
            "dense layer"}.get(diff.kind, "layer")
    if diff.change == "missing":
        return f"a {what} left out of the port ({_recipe(config, short)})"
    return f"an extra {what} in the port ({_recipe(config, short)})"
