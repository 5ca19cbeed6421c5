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
    #: 'shape': the layer is there with other shapes; 'missing': the model has no such layer
    #: (its later layers of this kind are the reference's later ones); 'extra': the model has
    #: one more layer here (its next ones are the reference's)
    change: str = "shape"
    place: str = ""        # where the missing or extra layer is, in the book's words

    def __str__(self):
        where = f"{self.module} ({self.stage})" if self.module else "after the last layer"
        if self.change == "missing":
            short = self.module.replace("features.", "")
            line = (f"first difference at {where}: the model has no {KIND_WORDS[self.kind]} "
                    f"{self.place} (the reference's {short}: {self.expected})")
            if self.foreign:
                line += (f"; the model's next {KIND_WORDS[self.kind]} (its '{self.foreign}') is "
                         "the reference's next one")
            return line + (f". {self.arithmetic}" if self.arithmetic else "")
        if self.change == "extra":
            line = (f"first difference at {where}: the model has an extra layer, {self.found} "
                    f"(its '{self.foreign}'), {self.place}; its next {KIND_WORDS[self.kind]} is "
                    f"the reference's {self.module.replace('features.', '')}")
            return line
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

def _describe(layer: Layer, p=None) -> str:
    """A layer in words; a BatchNorm of the MLP family (``p``) is over features, not channels."""
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
    unit = "features" if getattr(p, "family", "conv") == "mlp" else "channels"
    return f"a BatchNorm over {c} {unit}" + (f" without {', '.join(missing)}" if missing else "")


#: how many of the following layers of a kind must line up, shifted by one, for a layer to be
#: named missing or extra (fewer where the network ends sooner)
SHIFT_CHECK = 3


def _shifted(a: Sequence[Layer], b: Sequence[Layer]) -> bool:
    """``a``'s layers have ``b``'s shapes, as far as the shorter goes (at least one, or both
    at their end): ``a`` lines up with ``b``."""
    n = min(SHIFT_CHECK, len(a), len(b))
    if n == 0:
        return len(a) == len(b) == 0
    return all(a[t].shapes() == b[t].shapes() for t in range(n))


def _words_of(module: str, kind: str, shapes) -> str:
    """A canonical module in the book's words: "transition1's 1x1 conv", "the classifier"."""
    short = module[len("features."):] if module.startswith("features.") else module
    if short == "classifier":
        return "the classifier"
    owner = short.rsplit(".", 1)[0] if "." in short else "the stem"
    if kind == "conv":
        w = shapes["weight"]
        what = f"{w[2]}x{w[3]} conv"
    elif kind == "dense":
        what = f"Linear ({short.rsplit('.', 1)[-1]})" if owner == "the stem" else "Linear"
    else:
        what = "BatchNorm"
    return f"{owner}'s {what}"


def _place(p, module: str) -> str:
    """Where a layer of the preset sits: "before transition1's 1x1 conv" (a BatchNorm normalises
    what the next conv or Linear takes), "after the stem's 7x7 conv" (the BatchNorms right after
    their conv: the stem's norm0, a bottleneck's norm2), "after X" for the others."""
    mods = list(spec.canonical_modules(p))
    names = [m for m, _, _ in mods]
    i = names.index(module)
    kind = mods[i][1]
    prev = mods[i - 1] if i > 0 else None
    nxt = next((m for m in mods[i + 1:] if m[1] != "bn"), None)
    if kind == "bn" and prev is not None and module.endswith((".norm0", ".norm2")):
        return f"after {_words_of(*prev)}"
    if nxt is not None and kind == "bn":
        return f"before {_words_of(*nxt)}"
    if prev is not None:
        return f"after {_words_of(*prev)}"
    return "at the start"


def _next_same(n: int, kind: str) -> str:
    if n == 1:
        return f"the next {KIND_WORDS[kind]}, of the same shape"
    return f"one of the next {n} {KIND_WORDS[kind]}s, of the same shape"


def _shift_difference(p, mine: Sequence[Layer], theirs: Sequence[Layer], i: int,
                      kind: str) -> Optional[Difference]:
    """At the first mismatch ``i`` of a kind: a layer the model lacks (its layers from ``i`` are
    the reference's from ``i + 1``) or one it has in addition (its from ``i + 1`` are the
    reference's from ``i``), else None."""
    if i < len(mine) and _shifted(theirs[i:], mine[i + 1:]):
        k = i  # layers of equal shapes before it could be the missing one: name the first
        while k > 0 and mine[k - 1].shapes() == mine[i].shapes():
            k -= 1
        r = mine[k]
        g = theirs[k] if k < len(theirs) else None
        arithmetic = spec.module_arithmetic(p, r.name)
        if k < i:
            arithmetic += (f" (or the missing one is {_next_same(i - k, kind)}, up to "
                           f"{mine[i].name.replace('features.', '')}: shapes alone cannot tell)")
        return Difference(r.name, spec.stage_of(r.name + ".weight"), kind, _describe(r, p),
                          f"no {KIND_WORDS[kind]} here", g.name if g is not None else "",
                          arithmetic, "missing", _place(p, r.name))
    if i < len(theirs) and i < len(mine) and _shifted(theirs[i + 1:], mine[i:]):
        k = i
        while k > 0 and theirs[k - 1].shapes() == theirs[i].shapes():
            k -= 1
        r, g = mine[k], theirs[k]
        place = (f"after the reference's {mine[k - 1].name.replace('features.', '')}" if k
                 else "before the reference's first one")
        if k < i:
            place += f" (or it is {_next_same(i - k, kind)}: shapes alone cannot tell)"
        return Difference(r.name, spec.stage_of(r.name + ".weight"), kind, _describe(r, p),
                          _describe(g, p), g.name, "", "extra", place)
    return None


def missing_difference(p, module: str, foreign: str = "") -> Difference:
    """The difference "the model has no <kind> <place>" at canonical ``module`` of preset ``p``
    (for a format that tells a missing layer by more than shapes: ONNX's graph)."""
    r = next(r for r in canonical_layers(p) if r.name == module)
    return Difference(r.name, spec.stage_of(r.name + ".weight"), r.kind, _describe(r, p),
                      f"no {KIND_WORDS[r.kind]} here", foreign, spec.module_arithmetic(p, r.name),
                      "missing", _place(p, r.name))


def _difference(p, ref: Optional[Layer], got: Optional[Layer], kind: str) -> Difference:
    if ref is None:
        return Difference("", "", kind, f"no more {KIND_WORDS[kind]}s",
                          f"another one, {_describe(got, p)}", got.name, "")
    return Difference(ref.name, spec.stage_of(ref.name + ".weight"), kind, _describe(ref, p),
                      _describe(got, p) if got is not None else f"no more {KIND_WORDS[kind]}s",
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
                first = (at, _shift_difference(p, mine, theirs, i, kind)
                         or _difference(p, r, g, kind))
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
