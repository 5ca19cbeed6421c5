"""Whole training runs side by side (``densenet compare-training``): the same canonical initial
weights and the same batches (densenet_training.side_by_side) through N steps of a training
recipe (densenet_spec/optim.py) in every backend, each with its framework's own optimiser
(``recipe_session`` / ``recipe_step`` of each adapter); per step the loss, the gradient norm,
and each backend's largest relative distance from PyTorch in the parameters and the BatchNorm
statistics, per stage.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Tuple

import numpy as np

import densenet_spec as spec

#: Below this share of the largest parameter a tensor is zero in exact arithmetic (every conv
#: bias before a BatchNorm: its gradient is rounding noise): judged by its absolute size.
ZERO_SHARE = 1e-10
#: The relative floor: a tensor is compared relative to at least this share of the largest.
FLOOR_SHARE = 1e-8


def zero_gradient_names(config) -> set:
    """The biases whose exact gradient is 0 in some or all of their elements, so that what an
    adaptive optimiser does with those elements is rounding noise (Adam divides a gradient by
    its own size: a noise of 1e-17 moves the element by up to lr a step, in a direction no two
    frameworks agree on). A train-mode BatchNorm subtracts its batch mean, so a per-feature
    shift of its input changes nothing: every bias of a layer whose output goes only into
    BatchNorms, directly or through concatenation and pooling (the conv family's convolutions;
    the MLP's dense layers' linear1), or through a ReLU that is active on every row of the
    batch (the MLP's last stem layer and its transitions' linear: those elements whose unit is
    active on the whole batch)."""
    if isinstance(config, spec.MLPPreset):
        stem = f"features.linear{len(config.stem_widths) - 1}.bias"
        return {n for n, _, kind in spec.canonical_tensors(config)
                if kind == "param" and n.endswith(".bias")
                and (n == stem or ".transition" in n and n.endswith(".linear.bias")
                     or (".linear1." in n and ".denselayer" in n))}
    return {n for n, _, kind in spec.canonical_tensors(config)
            if kind == "param" and n.endswith(".bias") and ".conv" in n}


def noise_floor(recipe, steps: int, steps_per_epoch: int = 1) -> float:
    """The absolute floor for a zero_gradient_names element after ``steps`` steps of an
    adaptive ``recipe`` (densenet_spec.Recipe): each of two frameworks moves it by at most
    Adam's largest step, lr_t max(1, (1 - b1) / sqrt(1 - b2)) (its normalised update: the
    sign of the noise, or a bias-corrected average of signs), in either direction, plus its
    weight decay's lr_t wd |w| (|w| <= 1 here: a bias starts at 0)."""
    b1, b2 = recipe.betas
    step = max(1.0, (1 - b1) / (1 - b2) ** 0.5) + recipe.weight_decay
    return 2 * step * sum(spec.lr_at(recipe, t, steps_per_epoch, steps) for t in range(steps))


def distance(got: Dict[str, np.ndarray], ref: Dict[str, np.ndarray], names: Iterable[str]
             ) -> Tuple[float, Optional[str]]:
    """The largest relative distance over ``names`` and the name where it is: each tensor
    against its own largest magnitude (at least FLOOR_SHARE of the largest of all); a tensor
    that is zero in the reference (below ZERO_SHARE of the largest) by its absolute size in
    ``got`` over the largest of all. (0.0, None) for no names."""
    names = list(names)
    if not names:
        return 0.0, None
    big = max(float(np.max(np.abs(ref[k]))) for k in names) or 1.0
    d = {}
    for k in names:
        scale = float(np.max(np.abs(ref[k])))
        if scale <= ZERO_SHARE * big:
            d[k] = max(float(np.max(np.abs(got[k]))) - ZERO_SHARE * big, 0.0) / big
        else:
            d[k] = float(np.max(np.abs(got[k] - ref[k]))) / max(scale, FLOOR_SHARE * big)
    worst = max(d, key=d.get)
    return d[worst], worst
