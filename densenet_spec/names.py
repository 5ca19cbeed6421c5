"""The canonical tensor names (torchvision's DenseNet keys; the MLP family's in the same style)
with their PyTorch-layout shapes, the analytic parameter and BatchNorm-state counts that follow
from them, and the checks of a canonical state against a preset."""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Tuple

from densenet_spec.arithmetic import stage_names, transition_channels
from densenet_spec.presets import DenseNetConfigError, MLPPreset, iter_presets, preset_names


def canonical_tensors(p) -> List[Tuple[str, Tuple[int, ...], str]]:
    """Every tensor of the network: (torchvision-style name, PyTorch-layout shape, kind).

    kind is 'param' (trainable) or 'state' (BatchNorm running mean / variance). PyTorch's
    ``num_batches_tracked`` counter is not part of the canonical state.
    """
    out: List[Tuple[str, Tuple[int, ...], str]] = []

    def conv(name, cin, cout, k, bias):
        out.append((f"{name}.weight", (cout, cin, k, k), "param"))
        if bias:
            out.append((f"{name}.bias", (cout,), "param"))

    def bn(name, c):
        out.append((f"{name}.weight", (c,), "param"))
        out.append((f"{name}.bias", (c,), "param"))
        out.append((f"{name}.running_mean", (c,), "state"))
        out.append((f"{name}.running_var", (c,), "state"))

    if isinstance(p, MLPPreset):
        return _mlp_tensors(p, out, bn)
    c = p.num_init_features
    if p.stem == "imagenet":
        conv("features.conv0", p.in_channels, c, 7, p.conv_bias)
        bn("features.norm0", c)
    else:
        conv("features.conv0", p.in_channels, c, 3, p.conv_bias)
    for i, n in enumerate(p.block_config):
        for j in range(n):
            pre = f"features.denseblock{i + 1}.denselayer{j + 1}"
            cin = c + j * p.growth_rate
            bn(f"{pre}.norm1", cin)
            if p.bn_size is None:
                conv(f"{pre}.conv1", cin, p.growth_rate, 3, p.conv_bias)
            else:
                width = p.bn_size * p.growth_rate
                conv(f"{pre}.conv1", cin, width, 1, p.conv_bias)
                bn(f"{pre}.norm2", width)
                conv(f"{pre}.conv2", width, p.growth_rate, 3, p.conv_bias)
        c += n * p.growth_rate
        if i != len(p.block_config) - 1:
            cout = transition_channels(p, c)
            bn(f"features.transition{i + 1}.norm", c)
            conv(f"features.transition{i + 1}.conv", c, cout, 1, p.conv_bias)
            c = cout
    bn(f"features.norm{len(p.block_config) + 1}", c)
    out.append(("classifier.weight", (p.num_classes, c), "param"))
    out.append(("classifier.bias", (p.num_classes,), "param"))
    return out


def _mlp_tensors(p, out, bn):
    """The MLP family's tensors: stem linear0..., dense layers' norm1 / linear1, transitions'
    norm / linear, the head's norm<N+1> and classifier."""
    def linear(name, cin, cout):
        out.append((f"{name}.weight", (cout, cin), "param"))
        out.append((f"{name}.bias", (cout,), "param"))

    c = p.in_features
    for i, w in enumerate(p.stem_widths):
        linear(f"features.linear{i}", c, w)
        c = w
    for i, n in enumerate(p.block_config):
        for j in range(n):
            pre = f"features.denseblock{i + 1}.denselayer{j + 1}"
            cin = c + j * p.growth_rate
            bn(f"{pre}.norm1", cin)
            linear(f"{pre}.linear1", cin, p.growth_rate)
        c += n * p.growth_rate
        if i != len(p.block_config) - 1:
            cout = transition_channels(p, c)
            bn(f"features.transition{i + 1}.norm", c)
            linear(f"features.transition{i + 1}.linear", c, cout)
            c = cout
    bn(f"features.norm{len(p.block_config) + 1}", c)
    linear("classifier", c, p.num_outputs)
    return out


def canonical_modules(p) -> List[Tuple[str, str, Dict[str, Tuple[int, ...]]]]:
    """The layers that hold tensors, in order: (module name, kind, leaf -> shape), kind being
    'conv', 'bn' (BatchNorm) or 'dense'; e.g. ('features.norm0', 'bn', {'weight': (64,), ...})."""
    out: List[Tuple[str, str, Dict[str, Tuple[int, ...]]]] = []
    for name, shape, _ in canonical_tensors(p):
        module, leaf = name.rsplit(".", 1)
        if not out or out[-1][0] != module:
            kind = "conv" if len(shape) == 4 else "dense" if len(shape) == 2 else "bn"
            out.append((module, kind, {}))
        out[-1][2][leaf] = shape
    return out


def stage_of(name: str) -> str:
    """The stage a canonical tensor name belongs to."""
    parts = name.split(".")
    if parts[0] == "classifier":
        return "head"
    if parts[0] != "features" or len(parts) < 2:
        raise ValueError(f"not a canonical DenseNet tensor name: {name!r}")
    if parts[1] in ("conv0", "norm0") or (parts[1].startswith("linear") and len(parts) == 3):
        return "stem"
    if parts[1].startswith(("denseblock", "transition")):
        return parts[1]
    if parts[1].startswith("norm"):
        return "head"
    raise ValueError(f"not a canonical DenseNet tensor name: {name!r}")


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def stage_counts(p) -> List[Tuple[str, int, int]]:
    """(stage, trainable parameters, BatchNorm state values) per stage, analytic."""
    counts = {s: [0, 0] for s in stage_names(p)}
    for name, shape, kind in canonical_tensors(p):
        counts[stage_of(name)][0 if kind == "param" else 1] += _numel(shape)
    return [(s, a, b) for s, (a, b) in counts.items()]


def total_counts(p) -> Tuple[int, int]:
    """(trainable parameters, BatchNorm state values) of the whole network."""
    rows = stage_counts(p)
    return sum(r[1] for r in rows), sum(r[2] for r in rows)



class StateMismatchError(ValueError):
    """A canonical state that does not fit a model; the message lists every problem by name."""

    def __init__(self, missing, unexpected, misshapen):
        self.missing, self.unexpected, self.misshapen = list(missing), list(unexpected), list(misshapen)
        lines = [f"state does not fit the model; nothing was loaded "
                 f"({len(self.missing)} missing, {len(self.unexpected)} unexpected, "
                 f"{len(self.misshapen)} misshapen):"]
        lines += [f"  missing:    {n} (expected shape {tuple(s)})" for n, s in self.missing]
        lines += [f"  unexpected: {n} (shape {tuple(s)})" for n, s in self.unexpected]
        lines += [f"  misshapen:  {n}: expected {tuple(e)}, found {tuple(f)}"
                  for n, e, f in self.misshapen]
        super().__init__("\n".join(lines))


def check_state(p, shapes: Dict[str, Tuple[int, ...]]) -> None:
    """Raise StateMismatchError listing every missing, unexpected and misshapen tensor."""
    expected = {n: tuple(s) for n, s, _ in canonical_tensors(p)}
    found = {n: tuple(int(d) for d in s) for n, s in shapes.items()}
    missing = [(n, s) for n, s in expected.items() if n not in found]
    unexpected = [(n, s) for n, s in found.items() if n not in expected]
    misshapen = [(n, s, found[n]) for n, s in expected.items() if n in found and found[n] != s]
    if missing or unexpected or misshapen:
        raise StateMismatchError(missing, unexpected, misshapen)


_LEGACY = None


def remap_legacy_keys(state: Dict[str, object]) -> Dict[str, object]:
    """Rename old-style torchvision keys (``denselayer1.norm.1.weight``) to the current ones
    (``denselayer1.norm1.weight``), as torchvision's loader does; other keys pass unchanged."""
    import re
    global _LEGACY
    if _LEGACY is None:
        _LEGACY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|"
                             r"running_mean|running_var))$")
    out = {}
    for k, v in state.items():
        m = _LEGACY.match(k)
        out[m.group(1) + m.group(2) if m else k] = v
    return out


def infer_config(shapes: Dict[str, Tuple[int, ...]]):
    """The preset whose canonical tensors have exactly these shapes (input channels and classes
    read off ``features.conv0.weight`` and ``classifier.weight``; an MLP's input features off
    ``features.linear0.weight``); a clear error otherwise."""
    shapes = {k: tuple(v) for k, v in remap_legacy_keys(dict(shapes)).items()
              if not k.endswith("num_batches_tracked")}
    mlp = "features.linear0.weight" in shapes
    try:
        first = shapes["features.linear0.weight" if mlp else "features.conv0.weight"]
        in_ch, classes = first[1], shapes["classifier.weight"][0]
    except (KeyError, IndexError):
        raise DenseNetConfigError(
            "cannot tell which DenseNet this is: no features.conv0.weight (or an MLP's "
            "features.linear0.weight) / classifier.weight (not a torchvision-style DenseNet "
            "state); pass --preset") from None
    family = "mlp" if mlp else "conv"
    for p in iter_presets(family):
        cand = (dataclasses.replace(p, in_features=in_ch, num_outputs=classes) if mlp else
                dataclasses.replace(p, in_channels=in_ch, num_classes=classes))
        try:
            check_state(cand, shapes)
        except StateMismatchError:
            continue
        return cand
    what = "input feature(s) and" if mlp else "input channel(s) and"
    raise DenseNetConfigError(
        f"these tensors match no preset ({', '.join(preset_names(family))}) with {in_ch} {what} "
        f"{classes} {'outputs' if mlp else 'classes'}; pass --preset and the options that built it")
