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
