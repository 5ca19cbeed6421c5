"""The structure: per-stage counts of the model against the preset, the porting mistake most
likely behind a structural difference, and the model's module for each canonical one."""
from __future__ import annotations

from typing import Dict, List, Optional

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


def likely_structural_cause(config, diff: matching.Difference) -> Optional[str]:
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


def _mlp_cause(config, diff: matching.Difference, short: str) -> Optional[str]:
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
