"""DenseNet in PyTorch: the book's pieces (conv_block, DenseBlock, transition_block) and the
paper's DenseNet / DenseNet-BC family, with torchvision's tensor names.

Read side by side with densenet_mxnet/model.py and densenet_flax/model.py: same names, same
order, same options. Layout: NCHW.
"""
from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import checkpoint as cp

import densenet_spec as spec
from densenet_spec import DenseNetInputError  # noqa: F401  (re-exported)

__all__ = ["conv_block", "DenseBlock", "transition_block", "DenseNet", "build",
           "book", "densenet121", "densenet161", "densenet169", "densenet201", "densenet264",
           "densenet40", "densenet_bc100", "densenet_bc250", "densenet_bc190",
           "mlp_block", "MLPDenseBlock", "mlp_transition_block", "MLPDenseNet", "house_mlp"]


def _batch_norm(channels):
    # PyTorch's defaults are the canonical ones: eps 1e-5, momentum 0.1, unbiased running var.
    return nn.BatchNorm2d(channels, eps=spec.BN_EPS, momentum=spec.TORCH_BN_MOMENTUM)


def conv_block(input_channels, num_channels, bn_size=None, drop_rate=0.0, bias=True):
    """The book's BN-ReLU-3x3 conv; with ``bn_size``, the paper's bottleneck layer
    BN-ReLU-1x1 conv (bn_size * num_channels) - BN-ReLU-3x3 conv (num_channels).
    ``drop_rate`` adds dropout after the new feature map (active in training only)."""
    spec.check_layer_args(input_channels=input_channels, num_channels=num_channels, bn_size=bn_size)
    layers = OrderedDict()
    if bn_size is None:
        layers["norm1"] = _batch_norm(input_channels)
        layers["relu1"] = nn.ReLU(inplace=True)
        layers["conv1"] = nn.Conv2d(input_channels, num_channels, kernel_size=3, padding=1, bias=bias)
    else:
        width = bn_size * num_channels
        layers["norm1"] = _batch_norm(input_channels)
        layers["relu1"] = nn.ReLU(inplace=True)
        layers["conv1"] = nn.Conv2d(input_channels, width, kernel_size=1, bias=bias)
        layers["norm2"] = _batch_norm(width)
        layers["relu2"] = nn.ReLU(inplace=True)
        layers["conv2"] = nn.Conv2d(width, num_channels, kernel_size=3, padding=1, bias=bias)
    if drop_rate:
        layers["drop"] = nn.Dropout(drop_rate)
    return nn.Sequential(layers)


# ---- memory-efficient mode: recompute concat + first BN-ReLU-conv in the backward pass.
# During the recomputation BatchNorm must normalise with the batch statistics exactly as in the
# forward pass but must NOT update its running statistics a second time (the known bug of naive
# checkpointing: running mean/var get two updates per step). torch.utils.checkpoint's
# ``context_fn`` tells us when we are recomputing.
_recompute = threading.local()


@contextlib.contextmanager
def _recomputing():
    _recompute.active = True
    try:
        yield
    finally:
        _recompute.active = False


def _checkpoint_contexts():
    return contextlib.nullcontext(), _recomputing()


def _norm_relu_conv(norm, relu, conv, x):
    if norm.training and getattr(_recompute, "active", False):
        # Same computation as the forward pass, on throw-away copies of the running stats.
        x = F.batch_norm(x, norm.running_mean.clone(), norm.running_var.clone(), norm.weight,
                         norm.bias, True, norm.momentum, norm.eps)
    else:
        x = norm(x)
    return conv(relu(x))


class DenseBlock(nn.Module):
    """``num_convs`` conv_blocks; each one's input is the concatenation (channel axis) of the
    block input and all earlier outputs. Output channels: input_channels + num_convs * num_channels.
    """

    def __init__(self, num_convs, input_channels, num_channels, bn_size=None, drop_rate=0.0,
                 bias=True, memory_efficient=False):
        super().__init__()
        spec.check_layer_args(num_convs=num_convs, input_channels=input_channels,
                              num_channels=num_channels, bn_size=bn_size)
        self.memory_efficient = memory_efficient
        for i in range(num_convs):
            self.add_module(f"denselayer{i + 1}",
                            conv_block(input_channels + i * num_channels, num_channels,
                                       bn_size=bn_size, drop_rate=drop_rate, bias=bias))

    def _first(self, layer, *features):
        return _norm_relu_conv(layer.norm1, layer.relu1, layer.conv1, torch.cat(features, 1))

    def forward(self, X):
        features = [X]
        for layer in self.children():
            if self.memory_efficient and torch.is_grad_enabled() and any(
                    f.requires_grad for f in features):
                Y = cp.checkpoint(self._first, layer, *features, use_reentrant=False,
                                  context_fn=_checkpoint_contexts)
            else:
                Y = self._first(layer, *features)
            for name, module in layer.named_children():
                if name not in ("norm1", "relu1", "conv1"):
                    Y = module(Y)
            features.append(Y)
        return torch.cat(features, 1)


def transition_block(input_channels, num_channels, bias=True, pool="avg"):
    """BN-ReLU-1x1 conv to ``num_channels``, then 2x2 pooling with stride 2: average (``pool``
    'avg', the book's and the paper's) or max ('max', exercise 1's alternative)."""
    spec.check_layer_args(input_channels=input_channels, num_channels=num_channels, pool=pool)
    pooling = nn.AvgPool2d if pool == "avg" else nn.MaxPool2d
    return nn.Sequential(OrderedDict([
        ("norm", _batch_norm(input_channels)),
        ("relu", nn.ReLU(inplace=True)),
        ("conv", nn.Conv2d(input_channels, num_channels, kernel_size=1, bias=bias)),
        ("pool", pooling(kernel_size=2, stride=2)),
    ]))


class DenseNet(nn.Module):
    """The DenseNet family. ``features`` holds stem, dense blocks, transitions and the final
    BatchNorm under torchvision's names; ``classifier`` is the dense layer. The head is
    BN - ReLU - global average pooling - dense, so any input at least ``min_input_size`` works.
    """

    def __init__(self, growth_rate=32, block_config=(4, 4, 4, 4), num_init_features=64,
                 bn_size=None, drop_rate=0.0, num_classes=10, compression=0.5, stem="imagenet",
                 in_channels=1, conv_bias=True, transition_pool="avg", memory_efficient=False,
                 name="custom"):
        super().__init__()
        self.config = cfg = spec.config_from_options(
            name, growth_rate=growth_rate,
            block_config=block_config, num_init_features=num_init_features, bn_size=bn_size,
            drop_rate=drop_rate, num_classes=num_classes, compression=compression, stem=stem,
            in_channels=in_channels, conv_bias=conv_bias,
            transition_pool=transition_pool)
        self.memory_efficient = memory_efficient
        c = cfg.num_init_features
        if cfg.stem == "imagenet":
            stem = [("conv0", nn.Conv2d(cfg.in_channels, c, kernel_size=7, stride=2, padding=3,
                                        bias=cfg.conv_bias)),
                    ("norm0", _batch_norm(c)),
                    ("relu0", nn.ReLU(inplace=True)),
                    ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))]
        else:
            stem = [("conv0", nn.Conv2d(cfg.in_channels, c, kernel_size=3, padding=1,
                                        bias=cfg.conv_bias))]
        self.features = nn.Sequential(OrderedDict(stem))
        for i, num_convs in enumerate(cfg.block_config):
            self.features.add_module(f"denseblock{i + 1}", DenseBlock(
                num_convs, c, cfg.growth_rate, bn_size=cfg.bn_size, drop_rate=cfg.drop_rate,
                bias=cfg.conv_bias, memory_efficient=memory_efficient))
            c += num_convs * cfg.growth_rate
            if i != len(cfg.block_config) - 1:
                out = spec.transition_channels(cfg, c)
                self.features.add_module(f"transition{i + 1}",
                                         transition_block(c, out, bias=cfg.conv_bias,
                                                          pool=cfg.transition_pool))
                c = out
        self.features.add_module(f"norm{len(cfg.block_config) + 1}", _batch_norm(c))
        self.classifier = nn.Linear(c, cfg.num_classes)

    @classmethod
    def from_preset(cls, preset, **options):
        """Build a named preset; keyword options override its values."""
        memory_efficient = options.pop("memory_efficient", False)
        cfg = spec.make_config(preset, **options)
        return cls(**cfg.options(), memory_efficient=memory_efficient, name=cfg.name)

    def stage_modules(self):
        """OrderedDict stage -> list of modules, in order (stem, denseblock1, ..., head)."""
        stages = OrderedDict(stem=[])
        for name, module in self.features.named_children():
            if name.startswith(("denseblock", "transition")):
                stages[name] = [module]
            elif len(stages) == 1:
                stages["stem"].append(module)
        stages["head"] = [self.features[-1], self.classifier]
        return stages

    def forward_stages(self, X):
        """Run the network and return an OrderedDict stage -> output (the head's is the logits)."""
        spec.check_input(self.config, X.shape, layout="NCHW")
        outputs = OrderedDict()
        for name, modules in self.stage_modules().items():
            if name == "head":
                outputs[name] = self._head(modules[0](X))
            else:
                for module in modules:
                    X = module(X)
                outputs[name] = X
        return outputs

    def _head(self, X):
        """ReLU - global average pooling - dense, on the final BatchNorm's output."""
        X = torch.flatten(F.adaptive_avg_pool2d(F.relu(X, inplace=True), 1), 1)
        return self.classifier(X)

    def forward(self, X):
        spec.check_input(self.config, X.shape, layout="NCHW")
        return self._head(self.features(X))


def build(preset="book", **options):
    """Build any preset by name (or a densenet_spec preset), of either family (DenseNet or
    MLPDenseNet); options override it."""
    if spec.get_preset(preset).family == "mlp":
        return MLPDenseNet.from_preset(preset, **options)
    return DenseNet.from_preset(preset, **options)


@spec.preset_builder("book")
def book(**options):
    return build("book", **options)


@spec.preset_builder("densenet121")
def densenet121(**options):
    return build("densenet121", **options)


@spec.preset_builder("densenet161")
def densenet161(**options):
    return build("densenet161", **options)


@spec.preset_builder("densenet169")
def densenet169(**options):
    return build("densenet169", **options)


@spec.preset_builder("densenet201")
def densenet201(**options):
    return build("densenet201", **options)


@spec.preset_builder("densenet264")
def densenet264(**options):
    return build("densenet264", **options)


@spec.preset_builder("densenet40")
def densenet40(**options):
    return build("densenet40", **options)


@spec.preset_builder("densenet_bc100")
def densenet_bc100(**options):
    return build("densenet_bc100", **options)


@spec.preset_builder("densenet_bc250")
def densenet_bc250(**options):
    return build("densenet_bc250", **options)


@spec.preset_builder("densenet_bc190")
def densenet_bc190(**options):
    return build("densenet_bc190", **options)


# ---------------------------------------------------------------- the MLP family (exercise 5)
# The chapter's exercise 5, as a reader answered it in the forum: the DenseNet idea on a
# multilayer perceptron, for the house-price data. BatchNorm1d-ReLU-Linear layers in place of
# BN-ReLU-conv, dense blocks that concatenate features, transitions that compress the width
# (the forum's end with a ReLU), a Linear-ReLU stem, a BN-ReLU-Linear head. Input (N, features).

def _batch_norm1d(features):
    return nn.BatchNorm1d(features, eps=spec.BN_EPS, momentum=spec.TORCH_BN_MOMENTUM)


def mlp_block(input_features, num_features, drop_rate=0.0):
    """The forum's ``conv_block_mlp``: BatchNorm1d-ReLU-Linear to ``num_features`` (the growth
    rate); ``drop_rate`` adds dropout after the new features (active in training only)."""
    spec.check_layer_args(input_channels=input_features, num_channels=num_features)
    layers = OrderedDict([
        ("norm1", _batch_norm1d(input_features)),
        ("relu1", nn.ReLU(inplace=True)),
        ("linear1", nn.Linear(input_features, num_features)),
    ])
    if drop_rate:
        layers["drop"] = nn.Dropout(drop_rate)
    return nn.Sequential(layers)


class MLPDenseBlock(nn.Module):
    """``num_layers`` mlp_blocks; each one's input is the concatenation (feature axis 1) of the
    block input and all earlier outputs. Output: input_features + num_layers * num_features."""

    def __init__(self, num_layers, input_features, num_features, drop_rate=0.0):
        super().__init__()
        spec.check_layer_args(num_convs=num_layers, input_channels=input_features,
                              num_channels=num_features)
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}", mlp_block(
                input_features + i * num_features, num_features, drop_rate=drop_rate))

    def forward(self, X):
        features = [X]
        for layer in self.children():
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


def mlp_transition_block(input_features, num_features, relu=True):
    """BatchNorm1d-ReLU-Linear to ``num_features``, then (the forum's) a ReLU."""
    spec.check_layer_args(input_channels=input_features, num_channels=num_features)
    layers = OrderedDict([
        ("norm", _batch_norm1d(input_features)),
        ("relu", nn.ReLU(inplace=True)),
        ("linear", nn.Linear(input_features, num_features)),
    ])
    if relu:
        layers["relu2"] = nn.ReLU(inplace=True)
    return nn.Sequential(layers)


class MLPDenseNet(nn.Module):
    """The MLP DenseNet family. ``features`` holds the stem (linear0, relu0, ...), the dense
    blocks, transitions and the final BatchNorm1d; ``classifier`` is the output Linear. The head
    is BN - ReLU - Linear. Input (N, in_features), output (N, num_outputs)."""

    def __init__(self, in_features=330, stem_widths=(512, 1024), block_config=(2, 2, 2, 2),
                 growth_rate=128, compression=0.5, transition_relu=True, num_outputs=1,
                 drop_rate=0.0, name="custom"):
        super().__init__()
        self.config = cfg = spec.config_from_options(
            name, family="mlp", in_features=in_features, stem_widths=stem_widths,
            block_config=block_config, growth_rate=growth_rate, compression=compression,
            transition_relu=transition_relu, num_outputs=num_outputs, drop_rate=drop_rate)
        stem, c = [], cfg.in_features
        for i, w in enumerate(cfg.stem_widths):
            stem += [(f"linear{i}", nn.Linear(c, w)), (f"relu{i}", nn.ReLU(inplace=True))]
            c = w
        self.features = nn.Sequential(OrderedDict(stem))
        for i, num_layers in enumerate(cfg.block_config):
            self.features.add_module(f"denseblock{i + 1}", MLPDenseBlock(
                num_layers, c, cfg.growth_rate, drop_rate=cfg.drop_rate))
            c += num_layers * cfg.growth_rate
            if i != len(cfg.block_config) - 1:
                out = spec.transition_channels(cfg, c)
                self.features.add_module(f"transition{i + 1}", mlp_transition_block(
                    c, out, relu=cfg.transition_relu))
                c = out
        self.features.add_module(f"norm{len(cfg.block_config) + 1}", _batch_norm1d(c))
        self.classifier = nn.Linear(c, cfg.num_outputs)

    @classmethod
    def from_preset(cls, preset, **options):
        """Build a named preset; keyword options override its values."""
        cfg = spec.make_config(preset, **options)
        return cls(**cfg.options(), name=cfg.name)

    # DenseNet's: the stages are found by name, and spec.check_input knows the family (the
    # MLP's (N, features) has no layout).
    stage_modules = DenseNet.stage_modules
    forward_stages = DenseNet.forward_stages

    def _head(self, X):
        """ReLU - Linear, on the final BatchNorm's output."""
        return self.classifier(F.relu(X))

    forward = DenseNet.forward


@spec.preset_builder("house_mlp")
def house_mlp(**options):
    return build("house_mlp", **options)
