"""The structure: per-stage counts of the model against the preset, and the model's module for
each canonical one. (The porting mistake most likely behind a structural difference is
densenet_weights.causes.likely_structural_cause: the converter says it too.)"""
from __future__ import annotations

from typing import Dict, List

import numpy as np

import densenet_spec as spec
from densenet_weights import match as matching


def _structure_rows(config, match_, tensors):
    """Per stage: the spec's counts and the model's (its tensors mapped onto the stage)."""
    inverse = {f: c for c, f in match_.mapping.items()}
    counts = {s: [0, 0] for s in spec.stage_names(config)}
    arrays, trainable = tensors["arrays"], set(tensors["trainable"])
    params = state = 0
    for name, a in arrays.items():
        n = int(np.prod(np.shape(a), dtype=np.int64))
        is_stat = matching.ROLES.get(matching.split_name(name)[1]) in (
            "running_mean", "running_var")
        if name in trainable:
            params += n
        elif is_stat:
            state += n
        if name in inverse:
            counts[spec.stage_of(inverse[name])][1 if is_stat else 0] += n
    rows = []
    diff_stage = match_.difference.stage if match_.difference else None
    after = False  # matching stops at the first difference: later stages are not matched
    for stage, sp, sb in spec.stage_counts(config):
        mp, mb = (None, None) if after else counts[stage]
        rows.append({"stage": stage, "spec_params": sp, "spec_state": sb, "params": mp,
                     "state": mb, "ok": (mp, mb) == (sp, sb) and stage != diff_stage})
        after = after or stage == diff_stage
    tp, ts = spec.total_counts(config)
    totals = {"spec_params": tp, "spec_state": ts, "params": params, "state": state,
              "ok": (params, state) == (tp, ts)}
    return rows, totals


def file_tensors(arrays) -> dict:
    """A weights file's tensors as ``_structure_rows`` counts them: its BatchNorm statistics
    are state, every other tensor with a role a parameter."""
    stats = {n for n in arrays if matching.ROLES.get(matching.split_name(n)[1]) in (
             "running_mean", "running_var")}
    return {"arrays": arrays, "trainable": [n for n in arrays if n not in stats
                                            and matching.split_name(n)[1] in matching.ROLES]}


def _module_names(mapping: Dict[str, str], order: List[str]) -> Dict[str, str]:
    """canonical module -> the model's module (from the tensor mapping)."""
    out = {}
    for cmod in order:
        for leaf in ("weight", "running_mean"):
            fname = mapping.get(f"{cmod}.{leaf}")
            if fname:
                module, _ = matching.split_name(fname)
                out[cmod] = matching._strip_collection(module)
                break
    return out
