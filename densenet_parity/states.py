"""Canonical states the parity engine runs: ``random_state``, the weights the check compares a
model with and ``densenet export PRESET`` exports.

Here, beside the check and the export rather than in either, so both import it from beside
them. It builds on the book's initialisation (densenet_training.recipe.xavier_state), so its
floor is the parity engine's, not the weights package's below the training one.
"""
from __future__ import annotations

from typing import Dict

import numpy as np

import densenet_spec as spec


def random_state(config: spec.Preset, seed: int = 0) -> Dict[str, np.ndarray]:
    """Canonical weights for the comparison: Xavier-uniform kernels (the book's initialiser),
    and everything a convention could hide behind made non-trivial: BatchNorm scale and shift,
    running mean and variance, conv and dense biases."""
    from densenet_training.recipe import xavier_state
    state = xavier_state(config, seed)
    rng = np.random.default_rng(seed + 1)
    for name, shape, _ in spec.canonical_tensors(config):
        module, leaf = name.rsplit(".", 1)
        is_bn = f"{module}.running_mean" in state
        if is_bn and leaf in ("weight", "running_var"):
            state[name] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif leaf in ("bias", "running_mean"):
            state[name] = rng.normal(0, 0.1, shape).astype(np.float32)
    return state
