"""The shapes of a forward pass: whether an input can go through a preset (with the message every
backend raises when it cannot), and each stage's output shape for an input that can.

Above ``arithmetic`` (channels and sizes) and beside ``validation`` (configurations): each of the
three imports only what lies below it, so none imports another in a loop.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

from densenet_spec.arithmetic import _stage_sizes, min_input_size, stage_channels
from densenet_spec.presets import DenseNetInputError, MLPPreset


def check_input(p, shape, layout: str = "NCHW") -> None:
    """Raise DenseNetInputError with a plain message if ``shape`` cannot go through ``p``
    (an MLP DenseNet takes (N, features) in every framework: ``layout`` does not apply)."""
    shape = tuple(int(s) for s in shape)
    if isinstance(p, MLPPreset):
        if len(shape) != 2:
            raise DenseNetInputError(
                f"MLP DenseNet '{p.name}' expects a 2-D batch of feature vectors (N, features); "
                f"got shape {shape} with {len(shape)} dimension(s)" + (
                    "; add a batch dimension for a single example" if len(shape) == 1 else ""))
        if shape[1] != p.in_features:
            raise DenseNetInputError(
                f"MLP DenseNet '{p.name}' expects {p.in_features} input features on axis 1 of "
                f"(N, features); got {shape[1]} (input shape {shape})")
        if shape[0] < 1:
            raise DenseNetInputError(f"empty batch: input shape {shape}")
        return
    dims = "(N, C, H, W)" if layout == "NCHW" else "(N, H, W, C)"
    if len(shape) != 4:
        raise DenseNetInputError(
            f"DenseNet expects a 4-D batch of images {dims} ({layout}); got shape {shape} "
            f"with {len(shape)} dimension(s)" + (
                "; add a batch dimension for a single image" if len(shape) == 3 else ""))
    c_axis = 1 if layout == "NCHW" else 3
    h, w = (shape[2], shape[3]) if layout == "NCHW" else (shape[1], shape[2])
    if shape[c_axis] != p.in_channels:
        raise DenseNetInputError(
            f"DenseNet '{p.name}' expects {p.in_channels} input channel(s) on axis {c_axis} "
            f"of {dims} ({layout}); got {shape[c_axis]} (input shape {shape})")
    if shape[0] < 1:
        raise DenseNetInputError(f"empty batch: input shape {shape}")
    m = min_input_size(p)
    if h < m or w < m:
        raise DenseNetInputError(
            f"input {h}x{w} is too small for DenseNet '{p.name}': its stem and "
            f"{len(p.block_config) - 1} transition(s) need at least {m}x{m} pixels")



def stage_shapes(p, batch: int, height: Optional[int] = None,
                 width: Optional[int] = None) -> List[Tuple[str, Tuple[int, ...]]]:
    """(stage, canonical output shape) for each stage: NCHW for the conv family, (N, features)
    for the MLP family (which takes no height and width); the head's is (N, classes)."""
    if isinstance(p, MLPPreset):
        check_input(p, (batch, p.in_features))
        return [(name, (batch, c)) for name, c in stage_channels(p)]
    check_input(p, (batch, p.in_channels, height, width), layout="NCHW")
    hs, ws = _stage_sizes(p, height), _stage_sizes(p, width)
    out = []
    for (name, c), h, w in zip(stage_channels(p)[:-1], hs, ws):
        out.append((name, (batch, c, h, w)))
    out.append(("head", (batch, p.num_classes)))
    return out
