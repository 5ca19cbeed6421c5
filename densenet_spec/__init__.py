"""densenet_spec: what a DenseNet *is*, independent of any framework.

Pure Python (no numpy, no framework), importable from both environments. It holds

* the presets (the book's model and the paper's DenseNet / DenseNet-BC family),
* validation of configurations and inputs, with the error messages every backend raises,
* the channel and spatial arithmetic per stage,
* the canonical tensor names (torchvision's DenseNet keys) with their PyTorch-layout shapes,
  from which the analytic parameter and BatchNorm-state counts follow.

The parity suite uses this module as its oracle; the backends read their presets from it.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

__all__ = [
    "DenseNetConfigError", "DenseNetInputError", "Preset", "PRESETS", "STEMS",
    "preset_names", "get_preset", "make_config", "config_from_options", "stage_names", "stage_channels",
    "stage_shapes", "min_input_size", "check_input", "canonical_tensors", "stage_of",
    "stage_counts", "total_counts", "BN_EPS", "TORCH_BN_MOMENTUM", "StateMismatchError",
    "check_state", "remap_legacy_keys", "infer_config", "canonical_modules", "module_arithmetic",
    "call_factory", "check_devices",
]

#: BatchNorm epsilon used by every backend (PyTorch's default; set explicitly in Gluon and Flax).
BN_EPS = 1e-5
#: PyTorch's BatchNorm momentum: new = (1 - m) * old + m * batch. Gluon and Flax use 1 - m.
TORCH_BN_MOMENTUM = 0.1

STEMS = ("imagenet", "cifar")


class DenseNetConfigError(ValueError):
    """A DenseNet configuration that cannot be built (unknown preset, bad option value)."""


class DenseNetInputError(ValueError):
    """An input the network cannot take (wrong rank, channel count or too small an image)."""


@dataclass(frozen=True)
class Preset:
    """Everything that defines one DenseNet architecture.

    bn_size None means the book's plain ``conv_block`` (BN-ReLU-3x3 conv); an int means the
    paper's bottleneck layer (BN-ReLU-1x1 conv to ``bn_size * growth_rate`` channels, then
    BN-ReLU-3x3 conv). ``compression`` is the paper's theta: a transition maps m channels to
    floor(theta * m).
    """

    name: str
    block_config: Tuple[int, ...]
    growth_rate: int
    num_init_features: int
    bn_size: Optional[int]
    compression: float
    stem: str
    in_channels: int
    num_classes: int
    conv_bias: bool
    drop_rate: float = 0.0
    source: str = ""

    def options(self) -> Dict[str, object]:
        """The keyword options every backend's ``DenseNet`` takes, with this preset's values."""
        return {
            "growth_rate": self.growth_rate,
            "block_config": tuple(self.block_config),
            "num_init_features": self.num_init_features,
            "bn_size": self.bn_size,
            "drop_rate": self.drop_rate,
            "num_classes": self.num_classes,
            "compression": self.compression,
            "stem": self.stem,
            "in_channels": self.in_channels,
            "conv_bias": self.conv_bias,
        }

    def to_dict(self) -> Dict[str, object]:
        d = dataclasses.asdict(self)
        d["block_config"] = list(self.block_config)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, object]) -> "Preset":
        d = dict(d)
        d["block_config"] = tuple(d["block_config"])  # type: ignore[arg-type]
        return cls(**d)  # type: ignore[arg-type]


_PAPER = "Huang, Liu, van der Maaten, Weinberger: Densely Connected Convolutional Networks, CVPR 2017"


def _imagenet(name, block_config, growth_rate, num_init_features, note):
    return Preset(name, block_config, growth_rate, num_init_features, bn_size=4, compression=0.5,
                  stem="imagenet", in_channels=3, num_classes=1000, conv_bias=False,
                  source=f"{note}. {_PAPER}, Table 1 (DenseNet-BC, ImageNet); layer names and "
                         "parameter counts as torchvision.models.")


def _cifar(name, depth, growth_rate, bc, note):
    per_block = (depth - 4) // (6 if bc else 3)
    return Preset(name, (per_block,) * 3, growth_rate,
                  num_init_features=2 * growth_rate if bc else 16,
                  bn_size=4 if bc else None, compression=0.5 if bc else 1.0, stem="cifar",
                  in_channels=3, num_classes=10, conv_bias=False,
                  source=f"{note}. {_PAPER}, Table 2 (CIFAR/SVHN): L={depth}, k={growth_rate}, "
                         f"3 dense blocks of {per_block} layers, 3x3 stem conv with "
                         f"{2 * growth_rate if bc else 16} channels.")


PRESETS: Dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("book", (4, 4, 4, 4), 32, 64, bn_size=None, compression=0.5, stem="imagenet",
               in_channels=1, num_classes=10, conv_bias=True,
               source="The model of Dive into Deep Learning, section 'Densely Connected Networks "
                      "(DenseNet)': 7x7/2 conv (64) + BN + ReLU + 3x3/2 max pool, four dense "
                      "blocks of 4 conv_blocks with growth rate 32, transitions halving channels "
                      "and size, BN + ReLU + global average pool + dense to 10 classes; "
                      "Fashion-MNIST, 1 input channel."),
        _imagenet("densenet121", (6, 12, 24, 16), 32, 64, "DenseNet-121 (k=32)"),
        _imagenet("densenet161", (6, 12, 36, 24), 48, 96, "DenseNet-161 (k=48, 96 initial features)"),
        _imagenet("densenet169", (6, 12, 32, 32), 32, 64, "DenseNet-169 (k=32)"),
        _imagenet("densenet201", (6, 12, 48, 32), 32, 64, "DenseNet-201 (k=32)"),
        _imagenet("densenet264", (6, 12, 64, 48), 32, 64, "DenseNet-264 (k=32)"),
        _cifar("densenet40", 40, 12, False, "DenseNet (L=40, k=12): no bottleneck, no compression"),
        _cifar("densenet_bc100", 100, 12, True, "DenseNet-BC (L=100, k=12)"),
        _cifar("densenet_bc250", 250, 24, True, "DenseNet-BC (L=250, k=24)"),
        _cifar("densenet_bc190", 190, 40, True, "DenseNet-BC (L=190, k=40)"),
    ]
}


def preset_names() -> List[str]:
    return list(PRESETS)


def get_preset(name: str) -> Preset:
    """The preset called ``name``; a clear error listing the known ones otherwise."""
    if isinstance(name, Preset):
        return name
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise DenseNetConfigError(
            f"unknown DenseNet preset {name!r}; known presets: {', '.join(PRESETS)}") from None


def _positive_int(what: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise DenseNetConfigError(f"{what} must be a positive integer, got {value!r}")


def validate(p: Preset) -> Preset:
    """Check every option of ``p``; raise DenseNetConfigError naming the first bad one."""
    _positive_int("growth_rate", p.growth_rate)
    if not isinstance(p.block_config, tuple) or len(p.block_config) == 0:
        raise DenseNetConfigError(
            f"block_config must be a non-empty sequence of layer counts, got {p.block_config!r}")
    for i, n in enumerate(p.block_config):
        _positive_int(f"block_config[{i}] (layers in dense block {i + 1})", n)
    _positive_int("num_init_features", p.num_init_features)
    _positive_int("in_channels", p.in_channels)
    _positive_int("num_classes", p.num_classes)
    if p.bn_size is not None:
        _positive_int("bn_size", p.bn_size)
    if not isinstance(p.compression, (int, float)) or not 0.0 < p.compression <= 1.0:
        raise DenseNetConfigError(f"compression must be in (0, 1], got {p.compression!r}")
    if not isinstance(p.drop_rate, (int, float)) or not 0.0 <= p.drop_rate < 1.0:
        raise DenseNetConfigError(f"drop_rate must be in [0, 1), got {p.drop_rate!r}")
    if p.stem not in STEMS:
        raise DenseNetConfigError(f"stem must be one of {STEMS}, got {p.stem!r}")
    for i, c in enumerate(stage_channels(p)):
        if c[1] <= 0:
            raise DenseNetConfigError(
                f"compression {p.compression} leaves {c[0]} with no channels")
    return p


def make_config(preset="book", **overrides) -> Preset:
    """A validated Preset: a named preset (or a Preset) with some options replaced.

    Unknown option names are refused, so a typo never builds a silently different network.
    """
    base = get_preset(preset)
    fields = {f.name for f in dataclasses.fields(Preset)} - {"name", "source"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise DenseNetConfigError(
            f"unknown DenseNet option(s) {', '.join(unknown)}; options are {', '.join(sorted(fields))}")
    if "block_config" in overrides:
        bc = overrides["block_config"]
        try:
            overrides["block_config"] = tuple(bc)
        except TypeError:
            raise DenseNetConfigError(
                f"block_config must be a non-empty sequence of layer counts, got {bc!r}") from None
    if overrides:
        base = dataclasses.replace(base, **overrides)
    return validate(base)


def config_from_options(name: str = "custom", **options) -> Preset:
    """A validated Preset from the keyword options of a backend's ``DenseNet(...)``."""
    fields = {f.name for f in dataclasses.fields(Preset)} - {"name", "source"}
    missing = sorted(fields - set(options) - {"drop_rate"})
    if missing:
        raise DenseNetConfigError(f"missing DenseNet option(s): {', '.join(missing)}")
    blank = Preset(name, (), 0, 0, None, 0.0, "", 0, 0, False)
    return make_config(blank, **options)


def check_layer_args(num_convs=None, input_channels=None, num_channels=None, bn_size=None):
    """Validation shared by the book's building blocks in every backend."""
    if num_convs is not None:
        _positive_int("num_convs", num_convs)
    if input_channels is not None:
        _positive_int("input_channels", input_channels)
    if num_channels is not None:
        _positive_int("num_channels", num_channels)
    if bn_size is not None:
        _positive_int("bn_size", bn_size)


# --------------------------------------------------------------------------- arithmetic

def stage_names(p: Preset) -> List[str]:
    """Stages in order: stem, denseblock1, transition1, ..., denseblockN, head."""
    names = ["stem"]
    for i in range(len(p.block_config)):
        names.append(f"denseblock{i + 1}")
        if i != len(p.block_config) - 1:
            names.append(f"transition{i + 1}")
    names.append("head")
    return names


def transition_channels(p: Preset, channels: int) -> int:
    """floor(theta * m) channels out of a transition with m channels in."""
    return int(math.floor(channels * p.compression + 1e-9))


def stage_channels(p: Preset) -> List[Tuple[str, int]]:
    """(stage, output channels) for each stage; the head's is the number of classes.

    The book: 64 -> 192 -> 96 -> 224 -> 112 -> 240 -> 120 -> 248 -> 10.
    """
    c = p.num_init_features
    out = [("stem", c)]
    for i, n in enumerate(p.block_config):
        c += n * p.growth_rate
        out.append((f"denseblock{i + 1}", c))
        if i != len(p.block_config) - 1:
            c = transition_channels(p, c)
            out.append((f"transition{i + 1}", c))
    out.append(("head", p.num_classes))
    return out


def final_features(p: Preset) -> int:
    """Channels entering the classifier (the book's 248)."""
    return stage_channels(p)[-2][1]


def _conv_out(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


def _stage_sizes(p: Preset, size: int) -> List[int]:
    """Spatial size after each stage except the head (may go to 0 or below: too small)."""
    if p.stem == "imagenet":
        s = _conv_out(_conv_out(size, 7, 2, 3), 3, 2, 1)
    else:
        s = _conv_out(size, 3, 1, 1)
    out = [s]
    for i in range(len(p.block_config)):
        out.append(s)
        if i != len(p.block_config) - 1:
            s = _conv_out(s, 2, 2, 0) if s >= 2 else 0
            out.append(s)
    return out


def min_input_size(p: Preset) -> int:
    """Smallest height (or width) for which every stage keeps at least one pixel."""
    size = 1
    while min(_stage_sizes(p, size)) < 1:
        size += 1
    return size


def stage_shapes(p: Preset, batch: int, height: int, width: int) -> List[Tuple[str, Tuple[int, ...]]]:
    """(stage, canonical NCHW output shape) for each stage; the head's is (N, classes)."""
    check_input(p, (batch, p.in_channels, height, width), layout="NCHW")
    hs, ws = _stage_sizes(p, height), _stage_sizes(p, width)
    out = []
    for (name, c), h, w in zip(stage_channels(p)[:-1], hs, ws):
        out.append((name, (batch, c, h, w)))
    out.append(("head", (batch, p.num_classes)))
    return out


def check_input(p: Preset, shape, layout: str = "NCHW") -> None:
    """Raise DenseNetInputError with a plain message if ``shape`` cannot go through ``p``."""
    shape = tuple(int(s) for s in shape)
    dims = "(N, C, H, W)" if layout == "NCHW" else "(N, H, W, C)"
    if len(shape) != 4:
        raise DenseNetInputError(
            f"DenseNet expects a 4-D batch of images {dims} ({layout}); got shape {shape} "
            f"with {len(shape)} dimension(s)" + (
                "; add a batch dimension for a single image" if len(shape) == 3 else ""))
    c_axis = 1 if layout == "NCHW" else 3
    h, w = (shape[2], shape[3]) if layout == "NCHW" else (shape[1], shape[2])
    if shape[c_axis] != p.in_channels:
        raise DenseNetInputError(
            f"DenseNet '{p.name}' expects {p.in_channels} input channel(s) on axis {c_axis} "
            f"of {dims} ({layout}); got {shape[c_axis]} (input shape {shape})")
    if shape[0] < 1:
        raise DenseNetInputError(f"empty batch: input shape {shape}")
    m = min_input_size(p)
    if h < m or w < m:
        raise DenseNetInputError(
            f"input {h}x{w} is too small for DenseNet '{p.name}': its stem and "
            f"{len(p.block_config) - 1} transition(s) need at least {m}x{m} pixels")


def check_devices(batch: int, devices: int) -> None:
    """Raise ValueError unless a batch of ``batch`` splits evenly over ``devices`` devices (a
    data-parallel step gives every device the same share)."""
    if devices < 1:
        raise ValueError(f"devices must be at least 1, got {devices}")
    if batch % devices:
        raise ValueError(f"a batch of {batch} does not split evenly over {devices} devices")


# --------------------------------------------------------------------------- canonical names

def canonical_tensors(p: Preset) -> List[Tuple[str, Tuple[int, ...], str]]:
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


def canonical_modules(p: Preset) -> List[Tuple[str, str, Dict[str, Tuple[int, ...]]]]:
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


def module_arithmetic(p: Preset, module: str) -> str:
    """What a canonical layer does to the channels, with the arithmetic behind it, in the book's
    words: 'transition2.conv maps 224 -> 112 = (96 + 4 x 32) // 2 channels'."""
    short = module[len("features."):] if module.startswith("features.") else module
    k = p.growth_rate
    starts, c = [], p.num_init_features  # channels into each dense block
    for i, n in enumerate(p.block_config):
        starts.append(c)
        c += n * k
        if i != len(p.block_config) - 1:
            c = transition_channels(p, c)
    theta = "// 2" if p.compression == 0.5 else f"x {p.compression:g}, rounded down"

    def block_out(b):  # "c0 + n x k"
        n = p.block_config[b - 1]
        return starts[b - 1] + n * k, f"{starts[b - 1]} + {n} x {k}"

    parts = short.split(".")
    if short == "conv0":
        kernel = "7x7/2" if p.stem == "imagenet" else "3x3"
        return (f"conv0 (the stem's {kernel} conv) maps {p.in_channels} -> "
                f"{p.num_init_features} channels (num_init_features)")
    if short == "norm0":
        return f"norm0 (the stem's BatchNorm) has {p.num_init_features} channels"
    if parts[0].startswith("denseblock"):
        b, j = int(parts[0][len("denseblock"):]), int(parts[1][len("denselayer"):])
        cin, why = starts[b - 1] + (j - 1) * k, f"{starts[b - 1]} + {j - 1} x {k}"
        width = (p.bn_size or 0) * k
        if parts[2] == "norm1":
            return f"{short} normalises the layer's input: {cin} = {why} channels"
        if parts[2] == "conv1" and p.bn_size is None:
            return (f"{short} maps {cin} = {why} -> {k} channels (the growth rate), "
                    f"a 3x3 conv")
        if parts[2] == "conv1":
            return (f"{short} maps {cin} = {why} -> {width} = {p.bn_size} x {k} channels "
                    f"(the 1x1 bottleneck)")
        if parts[2] == "norm2":
            return f"{short} has {width} = {p.bn_size} x {k} channels (the bottleneck's width)"
        return f"{short} maps {width} -> {k} channels (the growth rate), a 3x3 conv"
    if parts[0].startswith("transition"):
        t = int(parts[0][len("transition"):])
        c_in, why = block_out(t)
        if parts[1] == "norm":
            return f"{short} has {c_in} = {why} channels (dense block {t}'s output)"
        return (f"{short} maps {c_in} -> {transition_channels(p, c_in)} = ({why}) {theta} "
                f"channels")
    if parts[0].startswith("norm"):
        c_in, why = block_out(len(p.block_config))
        return f"{short} (the head's BatchNorm) has {c_in} = {why} channels"
    if short == "classifier":
        return (f"classifier maps {stage_channels(p)[-2][1]} -> {p.num_classes} "
                f"(the number of classes)")
    raise ValueError(f"not a canonical DenseNet module: {module!r}")


def stage_of(name: str) -> str:
    """The stage a canonical tensor name belongs to."""
    parts = name.split(".")
    if parts[0] == "classifier":
        return "head"
    if parts[0] != "features" or len(parts) < 2:
        raise ValueError(f"not a canonical DenseNet tensor name: {name!r}")
    if parts[1] in ("conv0", "norm0"):
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


def stage_counts(p: Preset) -> List[Tuple[str, int, int]]:
    """(stage, trainable parameters, BatchNorm state values) per stage, analytic."""
    counts = {s: [0, 0] for s in stage_names(p)}
    for name, shape, kind in canonical_tensors(p):
        counts[stage_of(name)][0 if kind == "param" else 1] += _numel(shape)
    return [(s, a, b) for s, (a, b) in counts.items()]


def total_counts(p: Preset) -> Tuple[int, int]:
    """(trainable parameters, BatchNorm state values) of the whole network."""
    rows = stage_counts(p)
    return sum(r[1] for r in rows), sum(r[2] for r in rows)


def preset_builder(name: str) -> Callable[[Callable], Callable]:
    """Decorator for the backends' preset functions: the docstring says where it comes from."""
    p = get_preset(name)

    def deco(fn):
        fn.__doc__ = (f"Build the '{name}' DenseNet. Source: {p.source}\n\n"
                      "Keyword options override the preset's (see DenseNet).")
        return fn
    return deco


def iter_presets() -> Iterator[Preset]:
    return iter(PRESETS.values())


# --------------------------------------------------------------------------- a user's model

def call_factory(factory: str, path: Optional[str] = None):
    """Import 'MODULE:FUNCTION' (from ``path``, else the working directory, first on the
    import path) and return FUNCTION() — the user's model. A clear error for a malformed name,
    a module that is not there, or a missing or non-callable FUNCTION; errors raised by the
    user's own code pass through unchanged."""
    import importlib
    import os
    import sys
    if not isinstance(factory, str) or factory.count(":") != 1 or not all(factory.split(":")):
        raise DenseNetConfigError(f"expected MODULE:FUNCTION (e.g. mymodels:densenet), got {factory!r}")
    module, func = factory.split(":")
    where = os.path.abspath(path or os.getcwd())
    if where not in sys.path:
        sys.path.insert(0, where)
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            raise DenseNetConfigError(f"no module {module!r} importable from {where}") from None
        raise
    fn = getattr(mod, func, None)
    if not callable(fn):
        raise DenseNetConfigError(f"{module} ({mod.__file__}) has no function {func!r}")
    return fn()


# --------------------------------------------------------------------------- canonical state

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


def check_state(p: Preset, shapes: Dict[str, Tuple[int, ...]]) -> None:
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


def infer_config(shapes: Dict[str, Tuple[int, ...]]) -> Preset:
    """The preset whose canonical tensors have exactly these shapes (input channels and classes
    read off ``features.conv0.weight`` and ``classifier.weight``); a clear error otherwise."""
    shapes = {k: tuple(v) for k, v in remap_legacy_keys(dict(shapes)).items()
              if not k.endswith("num_batches_tracked")}
    try:
        in_ch = shapes["features.conv0.weight"][1]
        classes = shapes["classifier.weight"][0]
    except (KeyError, IndexError):
        raise DenseNetConfigError(
            "cannot tell which DenseNet this is: no features.conv0.weight / classifier.weight "
            "(not a torchvision-style DenseNet state); pass --preset") from None
    for p in PRESETS.values():
        cand = dataclasses.replace(p, in_channels=in_ch, num_classes=classes)
        try:
            check_state(cand, shapes)
        except StateMismatchError:
            continue
        return cand
    raise DenseNetConfigError(
        f"these tensors match no preset ({', '.join(PRESETS)}) with {in_ch} input channel(s) and "
        f"{classes} classes; pass --preset and the options that built it")
