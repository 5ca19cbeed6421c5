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
    """The parameters whose exact gradient is 0, so that what an optimiser does with them is
    rounding noise (Adam divides it by its own size: up to lr per step, different in every
    framework): every bias of a layer whose output goes only into BatchNorms (a train-mode
    BatchNorm subtracts its batch mean, so a per-channel shift changes nothing). In the conv
    family every convolution's (each feeds BatchNorms, directly or through concatenation and
    pooling); in the MLP family each dense layer's linear1 (concatenated into the next
    BatchNorm). They are left out of the comparison."""
    mlp = isinstance(config, spec.MLPPreset)
    return {n for n, _, kind in spec.canonical_tensors(config)
            if kind == "param" and n.endswith(".bias")
            and ((".linear1." in n and ".denselayer" in n) if mlp else ".conv" in n)}


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
