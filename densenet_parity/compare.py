"""The comparisons the suite and the report share: structure against the spec, numbers
against a reference backend. One definition of 'agree' for both."""
from __future__ import annotations

from typing import Dict, List

import numpy as np

import densenet_spec as spec

#: Tolerances, as relative differences max|a - ref| / max|ref| over a tensor (float32, CPU).
EVAL_RTOL = 1e-5
TRAIN_RTOL = 1e-4


def rel_diff(a: np.ndarray, ref: np.ndarray) -> float:
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    if a.shape != ref.shape:
        return float("inf")
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    diff = float(np.max(np.abs(a - ref))) if ref.size else 0.0
    return diff / scale if scale > 0 else diff


def abs_diff(a: np.ndarray, ref: np.ndarray) -> float:
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    if a.shape != ref.shape:
        return float("inf")
    return float(np.max(np.abs(a - ref))) if ref.size else 0.0


def expected_stages(config: spec.Preset, batch: int, height: int, width: int) -> List[dict]:
    """What every backend's describe() must report, from the spec's arithmetic alone."""
    shapes = dict(spec.stage_shapes(config, batch, height, width))
    return [{"name": s, "shape": list(shapes[s]), "params": p, "state": b}
            for s, p, b in spec.stage_counts(config)]


def structure_problems(described: dict, expected: List[dict]) -> List[str]:
    """Every way a backend's describe() differs from the spec (empty list: none)."""
    problems = []
    got = {s["name"]: s for s in described["stages"]}
    if [s["name"] for s in described["stages"]] != [s["name"] for s in expected]:
        problems.append(f"stages {[s['name'] for s in described['stages']]} != "
                        f"{[s['name'] for s in expected]}")
    for e in expected:
        g = got.get(e["name"])
        if g is None:
            continue
        if list(g["shape"]) != list(e["shape"]):
            problems.append(f"{e['name']}: shape {g['shape']} != {e['shape']}")
        if g["params"] != e["params"]:
            problems.append(f"{e['name']}: params {g['params']} != {e['params']}")
        if g["state"] != e["state"]:
            problems.append(f"{e['name']}: BN state {g['state']} != {e['state']}")
    tp, ts = sum(e["params"] for e in expected), sum(e["state"] for e in expected)
    if described["params"] != tp:
        problems.append(f"total params {described['params']} != {tp}")
    if described["state"] != ts:
        problems.append(f"total BN state {described['state']} != {ts}")
    return problems


def stage_diffs(outputs: Dict[str, np.ndarray], reference: Dict[str, np.ndarray]) -> Dict[str, dict]:
    return {k: {"abs": abs_diff(outputs[k], ref), "rel": rel_diff(outputs[k], ref)}
            for k, ref in reference.items() if k in outputs}
