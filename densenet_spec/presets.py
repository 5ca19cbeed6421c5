"""What a DenseNet is: the presets of both families, as frozen dataclasses.

* ``Preset``: the convolutional family (the book's model, the paper's DenseNet and DenseNet-BC).
* ``MLPPreset``: the multilayer-perceptron family of the chapter's exercise 5 (the forum's
  house-price model): BatchNorm1d-ReLU-Linear layers in dense blocks that concatenate
  features, transitions that compress the width.

Each has ``family`` ('conv' or 'mlp'), ``options()`` (the keyword options of every backend's
model class) and ``to_dict`` / ``from_dict`` (framework-free, through JSON).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, ClassVar, Dict, Iterator, List, Optional, Tuple, Union

#: BatchNorm epsilon used by every backend (PyTorch's default; set explicitly in Gluon and Flax).
BN_EPS = 1e-5
#: PyTorch's BatchNorm momentum: new = (1 - m) * old + m * batch. Gluon and Flax use 1 - m.
TORCH_BN_MOMENTUM = 0.1

STEMS = ("imagenet", "cifar")
#: The transition's 2x2/2 pooling: the paper's and the book's average pool, or a max pool (the
#: chapter's exercise 1 asks why average; docs/exercises.md measures both).
TRANSITION_POOLS = ("avg", "max")
FAMILIES = ("conv", "mlp")


class DenseNetConfigError(ValueError):
    """A DenseNet configuration that cannot be built (unknown preset, bad option value)."""


class DenseNetInputError(ValueError):
    """An input the network cannot take (wrong rank, channel count or too small an image)."""


def _dict(p) -> Dict[str, object]:
    d = dataclasses.asdict(p)
    for k, v in d.items():
        if isinstance(v, tuple):
            d[k] = list(v)
    d["family"] = p.family
    return d


@dataclass(frozen=True)
class Preset:
    """Everything that defines one convolutional DenseNet.

    bn_size None means the book's plain ``conv_block`` (BN-ReLU-3x3 conv); an int means the
    paper's bottleneck layer (BN-ReLU-1x1 conv to ``bn_size * growth_rate`` channels, then
    BN-ReLU-3x3 conv). ``compression`` is the paper's theta: a transition maps m channels to
    floor(theta * m). ``transition_pool`` is the transition's 2x2 pooling with stride 2:
    'avg' (the paper's, every preset's) or 'max' (exercise 1's alternative); it has no
    parameters, so counts and tensor names do not depend on it.
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
    transition_pool: str = "avg"
    source: str = ""
    family: ClassVar[str] = "conv"

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
            "transition_pool": self.transition_pool,
        }

    def to_dict(self) -> Dict[str, object]:
        return _dict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, object]) -> "AnyPreset":
        """The preset of either family (``d['family']``; 'conv' when absent, as in files
        written before the MLP family existed)."""
        d = dict(d)
        family = d.pop("family", "conv")
        if family not in FAMILIES:
            raise DenseNetConfigError(f"unknown DenseNet family {family!r}; families: "
                                      f"{', '.join(FAMILIES)}")
        target = MLPPreset if family == "mlp" else Preset
        for k in ("block_config", "stem_widths"):
            if k in d:
                d[k] = tuple(d[k])  # type: ignore[arg-type]
        return target(**d)  # type: ignore[arg-type]


@dataclass(frozen=True)
class MLPPreset:
    """Everything that defines one MLP DenseNet (exercise 5; the forum's house-price model).

    The stem is Linear-ReLU per width in ``stem_widths``; each dense layer is
    BatchNorm1d-ReLU-Linear to ``growth_rate`` features (dropout after it with ``drop_rate``),
    its input the concatenation of the block's input and every earlier layer's output; a
    transition is BatchNorm1d-ReLU-Linear to floor(``compression`` x width) features, then a
    ReLU if ``transition_relu`` (the forum's); the head is BatchNorm1d-ReLU-Linear to
    ``num_outputs``.
    """

    name: str
    in_features: int
    stem_widths: Tuple[int, ...]
    block_config: Tuple[int, ...]
    growth_rate: int
    compression: float
    transition_relu: bool
    num_outputs: int
    drop_rate: float = 0.0
    source: str = ""
    family: ClassVar[str] = "mlp"

    def options(self) -> Dict[str, object]:
        """The keyword options every backend's ``MLPDenseNet`` takes, with this preset's values."""
        return {
            "in_features": self.in_features,
            "stem_widths": tuple(self.stem_widths),
            "block_config": tuple(self.block_config),
            "growth_rate": self.growth_rate,
            "compression": self.compression,
            "transition_relu": self.transition_relu,
            "num_outputs": self.num_outputs,
            "drop_rate": self.drop_rate,
        }

    def to_dict(self) -> Dict[str, object]:
        return _dict(self)

    from_dict = Preset.from_dict


AnyPreset = Union[Preset, MLPPreset]

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


PRESETS: Dict[str, AnyPreset] = {
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
        MLPPreset("house_mlp", in_features=330, stem_widths=(512, 1024), block_config=(2, 2, 2, 2),
                  growth_rate=128, compression=0.5, transition_relu=True, num_outputs=1,
                  source="The MLP DenseNet of Dive into Deep Learning's DenseNet exercise 5, as "
                         "a reader answered it in the chapter's forum thread: stem "
                         "Linear(330, 512)-ReLU-Linear(512, 1024)-ReLU, four dense blocks of 2 "
                         "BatchNorm1d-ReLU-Linear layers with growth rate 128, transitions "
                         "BatchNorm1d-ReLU-Linear(m, m // 2)-ReLU, head "
                         "BatchNorm1d-ReLU-Linear(608, 1); the Kaggle house-price data (330 "
                         "features after one-hot encoding)."),
    ]
}


def preset_names(family: Optional[str] = None) -> List[str]:
    """The presets' names, of one family ('conv', 'mlp') or of all."""
    return [n for n, p in PRESETS.items() if family is None or p.family == family]


def iter_presets(family: Optional[str] = None) -> Iterator[AnyPreset]:
    return (p for p in PRESETS.values() if family is None or p.family == family)


def get_preset(name) -> AnyPreset:
    """The preset called ``name`` (a preset passes as it is); a clear error listing the known
    ones otherwise."""
    if isinstance(name, (Preset, MLPPreset)):
        return name
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise DenseNetConfigError(
            f"unknown DenseNet preset {name!r}; known presets: {', '.join(PRESETS)}") from None


def config_from_dict(d: Dict[str, object]) -> AnyPreset:
    """A preset of either family from its ``to_dict()``."""
    return Preset.from_dict(d)


def preset_builder(name: str) -> Callable[[Callable], Callable]:
    """Decorator for the backends' preset functions: the docstring says where it comes from."""
    p = get_preset(name)

    def deco(fn):
        model = "MLPDenseNet" if p.family == "mlp" else "DenseNet"
        fn.__doc__ = (f"Build the '{name}' {model}. Source: {p.source}\n\n"
                      f"Keyword options override the preset's (see {model}).")
        return fn
    return deco
