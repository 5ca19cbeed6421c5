"""Structure matching: a foreign model's tensors, under any names, onto a preset's canonical
names, by structure.

The tensors are first grouped into *layers* (the tensors of one module: everything but the
last part of the name) and each layer gets a kind from its tensors' roles: a BatchNorm holds a
running mean and variance (PyTorch ``running_mean``, Gluon ``running_mean`` / ``moving_mean``,
Flax ``mean``, Keras ``moving_mean`` / ``moving_variance``), a convolution a 4-D kernel (``weight``, ``kernel``: HWIO in Flax), a dense layer a
2-D one (``[in, out]`` in Flax). Layouts are converted to PyTorch's.

Then each kind's layers are matched in order: the model's convolutions in the order it defines
them against the preset's, its BatchNorms against the preset's, its dense layer against the
classifier. Order within a kind is what every framework keeps: PyTorch's and Gluon's
registration order, and Flax's automatic names (``layers_10`` after ``layers_9``, ``Conv_2``
after ``Conv_1``: natural order), so the interleaving of kinds, which Flax's names do not keep,
does not matter. A layer whose shapes differ from the preset's is the first difference; it is
reported in the book's words with the channel arithmetic behind it
(``densenet_spec.module_arithmetic``).

Files whose names are already canonical (ours, torchvision's, our Gluon and Flax files) map by
name, in any order.
"""
from __future__ import annotations

import dataclasses
import re
from collections import OrderedDict
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

import densenet_spec as spec

#: Leaf name -> canonical role. BatchNorm's scale is 'weight' and its shift 'bias', as PyTorch.
ROLES = {"weight": "weight", "kernel": "weight", "gamma": "weight", "scale": "weight",
         "bias": "bias", "beta": "bias",
         "running_mean": "running_mean", "moving_mean": "running_mean", "mean": "running_mean",
         "running_var": "running_var", "moving_var": "running_var", "moving_variance": "running_var",
         "var": "running_var"}
IGNORED = ("num_batches_tracked",)
#: Flax collections: a BatchNorm's params and batch_stats belong to one layer.
COLLECTIONS = ("params", "batch_stats")
KIND_WORDS = {"conv": "convolution", "bn": "BatchNorm", "dense": "dense layer"}


@dataclasses.dataclass
class Layer:
    """One module's tensors: kind, the module's name, role -> (tensor name, canonical-layout
    array or shape)."""
    kind: str
    name: str
    tensors: Dict[str, Tuple[str, object]]

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        return {r: _shape(a) for r, (_, a) in self.tensors.items()}


@dataclasses.dataclass
class Difference:
    """The first place where the model is not the preset, in the preset's terms."""
    module: str            # canonical module name ('features.transition2.conv'), or '' at the end
    stage: str             # 'transition2'
    kind: str              # 'conv', 'bn', 'dense'
    expected: str          # what the reference has there
    found: str             # what the model has there
    foreign: str           # the model's module name, or ''
    arithmetic: str        # the channel arithmetic behind the expected shape

    def __str__(self):
        where = f"{self.module} ({self.stage})" if self.module else "after the last layer"
        line = f"first difference at {where}: the reference has {self.expected}; the model " \
               f"has {self.found}"
        if self.foreign:
            line += f" (its '{self.foreign}')"
        return line + (f". {self.arithmetic}" if self.arithmetic else "")


@dataclasses.dataclass
class Match:
    """The outcome: the configuration matched against, the mapping canonical name -> foreign
    name, the canonical state (float32, PyTorch layout) if every tensor matched, the first
    difference otherwise, and how many of the preset's layers matched before it."""
    config: spec.Preset
    mapping: Dict[str, str]
    state: Optional[Dict[str, np.ndarray]]
    difference: Optional[Difference]
    matched_layers: int
    by_name: bool

    @property
    def ok(self) -> bool:
        return self.difference is None


# --------------------------------------------------------------------------- foreign layers

def _shape(value) -> Tuple[int, ...]:
    """An array's shape; a tuple is a shape already (structure-only matching)."""
    return tuple(value) if isinstance(value, tuple) else tuple(np.shape(value))


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def split_name(name: str) -> Tuple[str, str]:
    """(module, leaf) of a tensor name: 'features.norm0.running_mean', 'conv0_weight' (Gluon's
    global names), 'params/Conv_0/kernel' (Flax paths) all split before the known leaf."""
    for leaf in sorted(ROLES, key=len, reverse=True) + list(IGNORED):
        for sep in ("/", ".", "_", ":"):
            if name.endswith(sep + leaf):
                return name[: -len(leaf) - 1], leaf
        if name == leaf:
            return "", leaf
    return name, ""


def _strip_collection(module: str) -> str:
    parts = module.split("/")
    return "/".join(parts[1:]) if parts and parts[0] in COLLECTIONS else module


def layers_of(tensors: Mapping[str, object], layout: str = "torch",
              natural: bool = False) -> Tuple[List[Layer], List[str]]:
    """Group tensors (name -> array or shape) into layers, in order; ``layout`` 'flax' means
    HWIO kernels and [in, out] dense kernels (converted here to PyTorch's layout).
    ``natural``: order modules by their names' natural order (for files that do not keep the
    definition order: Flax trees, safetensors). Returns (layers, names nobody could place)."""
    groups: "OrderedDict[str, Dict[str, Tuple[str, object]]]" = OrderedDict()
    stray = []
    for name, value in tensors.items():
        module, leaf = split_name(name)
        if leaf in IGNORED:
            continue
        if not leaf:
            stray.append(name)
            continue
        module = _strip_collection(module)
        role = ROLES[leaf]
        if _flax_kernel(leaf, value, layout):
            value = _from_flax(value)
        groups.setdefault(module, {})[role] = (name, value)
    names = sorted(groups, key=_natural_key) if natural else list(groups)
    out = []
    for module in names:
        t = groups[module]
        w = _shape(t["weight"][1]) if "weight" in t else ()
        if "running_mean" in t or "running_var" in t:
            kind = "bn"
        elif len(w) == 4:
            kind = "conv"
        elif len(w) == 2:
            kind = "dense"
        else:
            stray.extend(n for n, _ in t.values())
            continue
        out.append(Layer(kind, module, t))
    return out, stray


def _flax_kernel(leaf: str, value, layout: str) -> bool:
    """A weight in Flax's layout: a 'kernel' (Flax's word) or any 2-D/4-D weight of a Flax
    file."""
    return ROLES[leaf] == "weight" and len(_shape(value)) in (2, 4) and (
        leaf == "kernel" or layout == "flax")


def _from_flax(value):
    """A Flax kernel (conv HWIO, dense [in, out]) in PyTorch's layout; shapes too."""
    if isinstance(value, tuple):
        return (value[3], value[2], value[0], value[1]) if len(value) == 4 else value[::-1]
    a = np.asarray(value)
    return a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T if a.ndim == 2 else a


def canonical_layers(p: spec.Preset) -> List[Layer]:
    return [Layer(kind, module, {leaf: (f"{module}.{leaf}", shape) for leaf, shape in leaves.items()})
            for module, kind, leaves in spec.canonical_modules(p)]


# --------------------------------------------------------------------------- matching

def _describe(layer: Layer) -> str:
    s = layer.shapes()
    w = s.get("weight")
    if layer.kind == "conv":
        kh, kw = w[2], w[3]
        bias = "with a bias" if "bias" in s else "no bias"
        return f"a {kh}x{kw} convolution {w[1]} -> {w[0]} channels ({bias})"
    if layer.kind == "dense":
        return f"a dense layer {w[1]} -> {w[0]}" + ("" if "bias" in s else " without a bias")
    c = (s.get("running_mean") or s.get("weight") or (0,))[0]
    missing = [r for r in ("weight", "bias", "running_mean", "running_var") if r not in s]
    return f"a BatchNorm over {c} channels" + (f" without {', '.join(missing)}" if missing else "")


def _difference(p, ref: Optional[Layer], got: Optional[Layer], kind: str) -> Difference:
    if ref is None:
        return Difference("", "", kind, f"no more {KIND_WORDS[kind]}s",
                          f"another one, {_describe(got)}", got.name, "")
    return Difference(ref.name, spec.stage_of(ref.name + ".weight"), kind, _describe(ref),
                      _describe(got) if got is not None else f"no more {KIND_WORDS[kind]}s",
                      got.name if got is not None else "", spec.module_arithmetic(p, ref.name))


def match_layers(p: spec.Preset, layers: Sequence[Layer]) -> Match:
    """Match foreign layers onto preset ``p``: each kind's layers in order."""
    ref = canonical_layers(p)
    position = {r.name: i for i, r in enumerate(ref)}
    mapping: Dict[str, str] = {}
    state: Dict[str, np.ndarray] = {}
    first: Optional[Tuple[int, Difference]] = None
    for kind in ("conv", "bn", "dense"):
        mine = [r for r in ref if r.kind == kind]
        theirs = [g for g in layers if g.kind == kind]
        for i in range(max(len(mine), len(theirs))):
            r = mine[i] if i < len(mine) else None
            g = theirs[i] if i < len(theirs) else None
            if r is not None and g is not None and r.shapes() == g.shapes():
                for role, (cname, _) in r.tensors.items():
                    fname, value = g.tensors[role]
                    mapping[cname] = fname
                    if not isinstance(value, tuple):
                        state[cname] = np.ascontiguousarray(np.asarray(value, dtype=np.float32))
                continue
            at = position[r.name] if r is not None else len(ref)
            if first is None or at < first[0]:
                first = (at, _difference(p, r, g, kind))
            break
    matched = first[0] if first else len(ref)
    complete = first is None and len(state) == len(spec.canonical_tensors(p))
    return Match(p, mapping, state if complete else None, first[1] if first else None, matched,
                 by_name=False)


def match_by_name(p: spec.Preset, tensors: Mapping[str, object], layout: str) -> Optional[Match]:
    """If the tensors carry canonical names (leaves in any framework's words, Flax paths with
    '/'), the match by name; None otherwise."""
    renamed: Dict[str, Tuple[str, object]] = {}
    for name, value in tensors.items():
        module, leaf = split_name(name)
        if leaf in IGNORED:
            continue
        if not leaf:
            return None
        module = _strip_collection(module).replace("/", ".")
        if _flax_kernel(leaf, value, layout):
            value = _from_flax(value)
        renamed[f"{module}.{ROLES[leaf]}"] = (name, value)
    renamed = {spec.remap_legacy_keys({k: 0}).popitem()[0]: v for k, v in renamed.items()}
    want = {n: s for n, s, _ in spec.canonical_tensors(p)}
    if set(renamed) != set(want):
        return None
    wrong = [k for k in want if _shape(renamed[k][1]) != want[k]]
    if wrong:  # canonical names, a shape that is not: the first such layer is the difference
        ref = {r.name: r for r in canonical_layers(p)}
        module = wrong[0].rsplit(".", 1)[0]
        r = ref[module]
        got = Layer(r.kind, renamed[wrong[0]][0].rsplit(".", 1)[0].replace("/", "."),
                    {role: renamed[f"{module}.{role}"] for role in r.tensors})
        return Match(p, {}, None, _difference(p, r, got, r.kind),
                     list(ref).index(module), by_name=True)
    state = {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32))
             for k, (_, v) in renamed.items() if not isinstance(v, tuple)}
    return Match(p, {k: n for k, (n, _) in renamed.items()},
                 state if len(state) == len(want) else None, None,
                 len(canonical_layers(p)), by_name=True)


def infer_options(layers: Sequence[Layer]) -> Dict[str, object]:
    """The options a foreign model shows directly: input channels (its first convolution),
    classes (its dense layer) and whether its convolutions have biases; for a model of dense
    layers only (the MLP family), its input features and outputs."""
    opts: Dict[str, object] = {}
    convs = [g for g in layers if g.kind == "conv"]
    dense = [g for g in layers if g.kind == "dense"]
    if dense and not convs:  # an MLP DenseNet: input features and outputs
        return {"in_features": dense[0].shapes()["weight"][1],
                "num_outputs": dense[-1].shapes()["weight"][0]}
    if convs:
        opts["in_channels"] = convs[0].shapes()["weight"][1]
        opts["conv_bias"] = "bias" in convs[0].tensors
    if dense:
        opts["num_classes"] = dense[-1].shapes()["weight"][0]
    return opts


def match(tensors: Mapping[str, object], preset=None, layout: str = "torch",
          natural: bool = False, **options) -> Match:
    """Match a foreign model's tensors (name -> array, or name -> shape for a structure-only
    match) onto ``preset`` (a name or a Preset; None: every preset is tried and the one that
    matches, or else the closest, is returned). ``layout``: 'torch' (PyTorch and Gluon) or
    'flax'. ``options`` override the preset's (``in_channels``, ``num_classes``, ...); without
    them the input channels, classes and conv biases are read off the model."""
    tensors = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in tensors.items()}
    layers, stray = layers_of(tensors, layout, natural)
    if preset is not None:
        candidates = [spec.make_config(preset, **options)]
    else:
        seen = infer_options(layers)
        seen.update(options)
        candidates = []
        for name in spec.preset_names():
            try:
                candidates.append(spec.make_config(name, **seen))
            except spec.DenseNetConfigError:
                continue
    best: Optional[Match] = None
    for p in candidates:
        m = match_by_name(p, tensors, layout) or match_layers(p, layers)
        if m.ok:
            if stray:  # tensors that belong to no DenseNet layer
                m.difference = Difference("", "", "", "nothing else",
                                          f"tensors that are no DenseNet layer's: "
                                          f"{', '.join(stray[:5])}", "", "")
                m.state = None
            return m
        if best is None or m.matched_layers > best.matched_layers:
            best = m
    return best
