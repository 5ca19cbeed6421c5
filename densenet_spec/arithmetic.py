"""The channel (width) and spatial arithmetic of both families, per stage, and each canonical
layer's arithmetic in the book's words."""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

from densenet_spec.presets import DenseNetConfigError, MLPPreset


def stage_names(p) -> List[str]:
    """Stages in order: stem, denseblock1, transition1, ..., denseblockN, head."""
    names = ["stem"]
    for i in range(len(p.block_config)):
        names.append(f"denseblock{i + 1}")
        if i != len(p.block_config) - 1:
            names.append(f"transition{i + 1}")
    names.append("head")
    return names


def transition_channels(p, channels: int) -> int:
    """floor(theta * m) channels (features) out of a transition with m in."""
    return int(math.floor(channels * p.compression + 1e-9))


def _stem_width(p) -> int:
    return p.stem_widths[-1] if isinstance(p, MLPPreset) else p.num_init_features


def _outputs(p) -> int:
    return p.num_outputs if isinstance(p, MLPPreset) else p.num_classes


def stage_channels(p) -> List[Tuple[str, int]]:
    """(stage, output channels or features) for each stage; the head's is the number of
    classes (outputs).

    The book: 64 -> 192 -> 96 -> 224 -> 112 -> 240 -> 120 -> 248 -> 10; the forum's MLP:
    1024 -> 1280 -> 640 -> 896 -> 448 -> 704 -> 352 -> 608 -> 1.
    """
    c = _stem_width(p)
    out = [("stem", c)]
    for i, n in enumerate(p.block_config):
        c += n * p.growth_rate
        out.append((f"denseblock{i + 1}", c))
        if i != len(p.block_config) - 1:
            c = transition_channels(p, c)
            out.append((f"transition{i + 1}", c))
    out.append(("head", _outputs(p)))
    return out


def final_features(p) -> int:
    """Channels (features) entering the classifier (the book's 248, the forum's 608)."""
    return stage_channels(p)[-2][1]


def _conv_out(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


def _stage_sizes(p, size: int) -> List[int]:
    """Spatial size after each stage except the head (may go to 0 or below: too small)."""
    if p.stem == "imagenet":
        s = _conv_out(_conv_out(size, 7, 2, 3), 3, 2, 1)
    else:
        s = _conv_out(size, 3, 1, 1)
    out = [s]
    for i in range(len(p.block_config)):
        out.append(s)
        if i != len(p.block_config) - 1:
            s = _conv_out(s, 2, 2, 0) if s >= 2 else 0
            out.append(s)
    return out


def _not_images(p) -> DenseNetConfigError:
    return DenseNetConfigError(f"'{p.name}' is an MLP DenseNet: it takes feature vectors "
                               f"(N, {p.in_features}), not images")


def min_input_size(p) -> int:
    """Smallest height (or width) for which every stage keeps at least one pixel (conv family)."""
    if isinstance(p, MLPPreset):
        raise _not_images(p)
    size = 1
    while min(_stage_sizes(p, size)) < 1:
        size += 1
    return size


def input_shape(p, batch: int = 1, height: Optional[int] = None,
                width: Optional[int] = None) -> Tuple[int, ...]:
    """The canonical input shape: (N, features) for the MLP family (no height or width); NCHW
    for the conv family, ``height`` x ``width`` (the smallest input it takes where None; width
    defaults to height)."""
    if isinstance(p, MLPPreset):
        return (batch, p.in_features)
    height = min_input_size(p) if height is None else height
    return (batch, p.in_channels, height, height if width is None else width)


def _block_starts(p) -> List[int]:
    """Channels (features) into each dense block."""
    starts, c = [], _stem_width(p)
    for i, n in enumerate(p.block_config):
        starts.append(c)
        c += n * p.growth_rate
        if i != len(p.block_config) - 1:
            c = transition_channels(p, c)
    return starts


def module_arithmetic(p, module: str) -> str:
    """What a canonical layer does to the channels (features), with the arithmetic behind it, in
    the book's words: 'transition2.conv maps 224 -> 112 = (96 + 4 x 32) // 2 channels'."""
    short = module[len("features."):] if module.startswith("features.") else module
    k = p.growth_rate
    mlp = isinstance(p, MLPPreset)
    unit = "features" if mlp else "channels"
    starts = _block_starts(p)
    theta = "// 2" if p.compression == 0.5 else f"x {p.compression:g}, rounded down"

    def block_out(b):  # "c0 + n x k"
        n = p.block_config[b - 1]
        return starts[b - 1] + n * k, f"{starts[b - 1]} + {n} x {k}"

    parts = short.split(".")
    if mlp and parts[0].startswith("linear") and len(parts) == 1:
        i = int(parts[0][len("linear"):])
        cin = p.in_features if i == 0 else p.stem_widths[i - 1]
        return (f"{short} (stem layer {i + 1} of {len(p.stem_widths)}) maps {cin} -> "
                f"{p.stem_widths[i]} features ({'in_features, ' if i == 0 else ''}"
                f"stem_widths[{i}])")
    if short == "conv0":
        kernel = "7x7/2" if p.stem == "imagenet" else "3x3"
        return (f"conv0 (the stem's {kernel} conv) maps {p.in_channels} -> "
                f"{p.num_init_features} channels (num_init_features)")
    if short == "norm0":
        return f"norm0 (the stem's BatchNorm) has {p.num_init_features} channels"
    if parts[0].startswith("denseblock"):
        b, j = int(parts[0][len("denseblock"):]), int(parts[1][len("denselayer"):])
        cin, why = starts[b - 1] + (j - 1) * k, f"{starts[b - 1]} + {j - 1} x {k}"
        width = (getattr(p, "bn_size", None) or 0) * k
        if parts[2] == "norm1":
            return f"{short} normalises the layer's input: {cin} = {why} {unit}"
        if parts[2] == "linear1":
            return f"{short} maps {cin} = {why} -> {k} features (the growth rate)"
        if parts[2] == "conv1" and p.bn_size is None:
            return (f"{short} maps {cin} = {why} -> {k} channels (the growth rate), "
                    f"a 3x3 conv")
        if parts[2] == "conv1":
            return (f"{short} maps {cin} = {why} -> {width} = {p.bn_size} x {k} channels "
                    f"(the 1x1 bottleneck)")
        if parts[2] == "norm2":
            return f"{short} has {width} = {p.bn_size} x {k} channels (the bottleneck's width)"
        return f"{short} maps {width} -> {k} channels (the growth rate), a 3x3 conv"
    if parts[0].startswith("transition"):
        t = int(parts[0][len("transition"):])
        c_in, why = block_out(t)
        if parts[1] == "norm":
            return f"{short} has {c_in} = {why} {unit} (dense block {t}'s output)"
        return (f"{short} maps {c_in} -> {transition_channels(p, c_in)} = ({why}) {theta} "
                f"{unit}")
    if parts[0].startswith("norm"):
        c_in, why = block_out(len(p.block_config))
        return f"{short} (the head's BatchNorm) has {c_in} = {why} {unit}"
    if short == "classifier":
        what = "outputs" if mlp else "classes"
        return (f"classifier maps {final_features(p)} -> {_outputs(p)} "
                f"(the number of {what})")
    raise ValueError(f"not a canonical DenseNet module: {module!r}")
