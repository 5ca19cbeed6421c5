"""DenseNet in Flax linen: the book's JAX version (Dive into Deep Learning), grown to the same
options, the same tensor names and the same numbers as densenet_flax/model.py (NNX) and
densenet_torch/model.py.

As in the book, input channels are inferred (``conv_block(num_channels)``,
``DenseBlock(num_convs, num_channels)``, ``transition_block(num_channels)``) and the mode is
chosen at call time::

    model = book()
    variables = model.init(jax.random.key(0), x, train=False)      # x: NHWC
    logits = model.apply(variables, x, train=False)
    logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"],
                                  rngs={"dropout": key})          # 'dropout' only if drop_rate

Layout: NHWC (kernels HWIO). Variables: ``params`` (conv kernel / bias, BatchNorm scale / bias,
dense kernel / bias) and ``batch_stats`` (BatchNorm mean / var), under torchvision's module
names (features/denseblock1/denselayer1/norm1, ...).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

import densenet_spec as spec
from densenet_spec import DenseNetInputError  # noqa: F401  (re-exported)
from densenet_flax.model import batch_norm_train, normalize

__all__ = ["conv_block", "DenseBlock", "transition_block", "DenseNet", "build",
           "book", "densenet121", "densenet161", "densenet169", "densenet201", "densenet264",
           "densenet40", "densenet_bc100", "densenet_bc250", "densenet_bc190",
           "mlp_block", "MLPDenseBlock", "mlp_transition_block", "MLPDenseNet", "house_mlp"]


class BatchNorm(nn.Module):
    """BatchNorm over the channel (last) axis with PyTorch's semantics: eps 1e-5, running =
    0.9 * running + 0.1 * batch, running variance updated with the *unbiased* batch variance
    while normalising with the biased one. nn.BatchNorm updates with the biased variance, so a
    ported training run would drift (see densenet_flax/model.py). Same variable names as
    nn.BatchNorm: params scale, bias; batch_stats mean, var."""

    momentum: float = 1.0 - spec.TORCH_BN_MOMENTUM
    epsilon: float = spec.BN_EPS

    @nn.compact
    def __call__(self, x, train: bool):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
        if not train:
            return normalize(x, ra_mean.value, ra_var.value, scale, bias, self.epsilon)
        out, mean, var = batch_norm_train(x, ra_mean.value, ra_var.value, scale, bias,
                                          self.momentum, self.epsilon)
        if not self.is_initializing():  # like nn.BatchNorm: init does not count as a step
            # the same function as NNX's (model.BatchNorm): both variants trace the same
            # program, equation for equation (densenet_flax/adapter.py compiles it once)
            ra_mean.value, ra_var.value = mean, var
        return out


def _conv(num_channels, kernel_size, bias, stride=1, padding=0):
    # Explicit symmetric padding as in PyTorch: padding='SAME' with stride 2 pads asymmetrically.
    return nn.Conv(num_channels, kernel_size=(kernel_size, kernel_size), strides=(stride, stride),
                   padding=((padding, padding), (padding, padding)), use_bias=bias)


def _max_pool_3x3_s2(X):
    # nn.MaxPool2d(kernel_size=3, stride=2, padding=1): Flax pads a max pool with -inf.
    return nn.max_pool(X, window_shape=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def _avg_pool_2x2_s2(X):
    # nn.AvgPool2d(kernel_size=2, stride=2): no padding, an odd last row / column is dropped.
    return nn.avg_pool(X, window_shape=(2, 2), strides=(2, 2), padding="VALID")


def _max_pool_2x2_s2(X):
    # nn.MaxPool2d(kernel_size=2, stride=2): no padding, an odd last row / column is dropped.
    return nn.max_pool(X, window_shape=(2, 2), strides=(2, 2), padding="VALID")


class ConvBlock(nn.Module):
    """What conv_block returns: BN-ReLU-conv (norm1, conv1), then for the bottleneck
    BN-ReLU-3x3 conv (norm2, conv2), then dropout (drop) if drop_rate. Unlike the book's
    ConvBlock it returns only the new feature map; DenseBlock concatenates."""

    num_channels: int
    bn_size: Optional[int] = None
    drop_rate: float = 0.0
    bias: bool = True

    def setup(self):
        if self.bn_size is None:
            self.norm1 = BatchNorm()
            self.conv1 = _conv(self.num_channels, 3, self.bias, padding=1)
        else:
            self.norm1 = BatchNorm()
            self.conv1 = _conv(self.bn_size * self.num_channels, 1, self.bias)
            self.norm2 = BatchNorm()
            self.conv2 = _conv(self.num_channels, 3, self.bias, padding=1)
        if self.drop_rate:
            self.drop = nn.Dropout(self.drop_rate)

    def first(self, X, train: bool):
        """norm1 - ReLU - conv1."""
        return self.conv1(nn.relu(self.norm1(X, train)))

    def rest(self, Y, train: bool):
        """Everything after conv1: the bottleneck's second half, dropout."""
        if self.bn_size is not None:
            Y = self.conv2(nn.relu(self.norm2(Y, train)))
        if self.drop_rate:
            Y = self.drop(Y, deterministic=not train)  # needs rngs={'dropout': key} in training
        return Y

    def __call__(self, X, train: bool = True):
        return self.rest(self.first(X, train), train)


def conv_block(num_channels, bn_size=None, drop_rate=0.0, bias=True):
    """The book's BN-ReLU-3x3 conv; with ``bn_size``, the paper's bottleneck layer
    BN-ReLU-1x1 conv (bn_size * num_channels) - BN-ReLU-3x3 conv (num_channels).
    ``drop_rate`` adds dropout after the new feature map (active in training only)."""
    spec.check_layer_args(num_channels=num_channels, bn_size=bn_size)
    return ConvBlock(num_channels, bn_size=bn_size, drop_rate=drop_rate, bias=bias)


# ---- memory-efficient mode: recompute concat + first BN-ReLU-conv in the backward pass.
# nn.remat is jax.checkpoint lifted over modules: the variables go in, the updated batch_stats
# come out once, from the forward pass; the backward pass only recomputes values for the
# gradient and has no side effect to repeat, so running statistics get one update per step.
# The naive mode is the plain call (see model.py).
# (static_argnums counts the module as argument 0: ``train`` is a Python bool.)

def _first(layer, features, train):
    return layer.first(jnp.concatenate(features, axis=-1), train)


_first_checkpointed = nn.remat(_first, static_argnums=(2,))  # recomputed in the backward pass


class DenseBlock(nn.Module):
    """``num_convs`` conv_blocks; each one's input is the concatenation (channel axis) of the
    block input and all earlier outputs. Output channels: input channels + num_convs * num_channels.
    """

    num_convs: int
    num_channels: int
    bn_size: Optional[int] = None
    drop_rate: float = 0.0
    bias: bool = True
    memory_efficient: bool = False

    def __post_init__(self):
        # linen modules are dataclasses: validate at construction, as the other backends do.
        spec.check_layer_args(num_convs=self.num_convs, num_channels=self.num_channels,
                              bn_size=self.bn_size)
        super().__post_init__()

    def setup(self):
        for i in range(self.num_convs):
            setattr(self, f"denselayer{i + 1}",
                    conv_block(self.num_channels, bn_size=self.bn_size,
                               drop_rate=self.drop_rate, bias=self.bias))

    def __call__(self, X, train: bool = True):
        features = [X]
        first = _first_checkpointed if self.memory_efficient else _first
        for i in range(self.num_convs):
            layer = getattr(self, f"denselayer{i + 1}")
            Y = layer.rest(first(layer, tuple(features), train), train)
            features.append(Y)
        return jnp.concatenate(features, axis=-1)


class Transition(nn.Module):
    """What transition_block returns: norm - ReLU - 1x1 conv - 2x2 pool ('avg' or 'max'),
    stride 2."""

    num_channels: int
    bias: bool = True
    pool: str = "avg"

    def setup(self):
        self.norm = BatchNorm()
        self.conv = _conv(self.num_channels, 1, self.bias)

    def __call__(self, X, train: bool = True):
        pool = _avg_pool_2x2_s2 if self.pool == "avg" else _max_pool_2x2_s2
        return pool(self.conv(nn.relu(self.norm(X, train))))


def transition_block(num_channels, bias=True, pool="avg"):
    """BN-ReLU-1x1 conv to ``num_channels``, then 2x2 pooling with stride 2: average (``pool``
    'avg', the book's and the paper's) or max ('max', exercise 1's alternative)."""
    spec.check_layer_args(num_channels=num_channels, pool=pool)
    return Transition(num_channels, bias=bias, pool=pool)


class Features(nn.Module):
    """torchvision's ``features``: conv0 (norm0, stem pool), denseblock1, transition1, ...,
    norm<N+1>, as named submodules. DenseNet runs them (see DenseNet.forward_stages)."""

    config: spec.Preset
    memory_efficient: bool = False

    def setup(self):
        cfg = self.config
        c = cfg.num_init_features
        if cfg.stem == "imagenet":
            self.conv0 = _conv(c, 7, cfg.conv_bias, stride=2, padding=3)
            self.norm0 = BatchNorm()
        else:
            self.conv0 = _conv(c, 3, cfg.conv_bias, padding=1)
        for i, num_convs in enumerate(cfg.block_config):
            setattr(self, f"denseblock{i + 1}", DenseBlock(
                num_convs, cfg.growth_rate, bn_size=cfg.bn_size, drop_rate=cfg.drop_rate,
                bias=cfg.conv_bias, memory_efficient=self.memory_efficient))
            c += num_convs * cfg.growth_rate
            if i != len(cfg.block_config) - 1:
                c = spec.transition_channels(cfg, c)
                setattr(self, f"transition{i + 1}",
                        transition_block(c, bias=cfg.conv_bias, pool=cfg.transition_pool))
        setattr(self, f"norm{len(cfg.block_config) + 1}", BatchNorm())


def _stage_paths(stem, blocks: int):
    """OrderedDict stage -> module paths into the variables: the stem's modules (names under
    ``features``), then denseblock1, transition1, ..., the head's norm<N+1> and classifier."""
    stages = OrderedDict(stem=[("features", name) for name in stem])
    for i in range(blocks):
        stages[f"denseblock{i + 1}"] = [("features", f"denseblock{i + 1}")]
        if i != blocks - 1:
            stages[f"transition{i + 1}"] = [("features", f"transition{i + 1}")]
    stages["head"] = [("features", f"norm{blocks + 1}"), ("classifier",)]
    return stages


class DenseNet(nn.Module):
    """The DenseNet family, with the options of densenet_flax.model.DenseNet as fields.
    ``name`` is linen's own module name, used as the preset name (None: 'custom').
    ``features`` holds stem, dense blocks, transitions and the final BatchNorm under
    torchvision's names; ``classifier`` is the dense layer. The head is BN - ReLU - global
    average pooling - dense, so any input at least ``min_input_size`` works.
    """

    growth_rate: int = 32
    block_config: Tuple[int, ...] = (4, 4, 4, 4)
    num_init_features: int = 64
    bn_size: Optional[int] = None
    drop_rate: float = 0.0
    num_classes: int = 10
    compression: float = 0.5
    stem: str = "imagenet"
    in_channels: int = 1
    conv_bias: bool = True
    transition_pool: str = "avg"
    memory_efficient: bool = False

    def __post_init__(self):
        # Validate at construction, as the other backends do (linen modules are dataclasses).
        object.__setattr__(self, "block_config", self.config.block_config)  # a list -> tuple
        super().__post_init__()

    @property
    def config(self) -> spec.Preset:
        return spec.config_from_options(
            self.name or "custom", growth_rate=self.growth_rate,
            block_config=self.block_config, num_init_features=self.num_init_features,
            bn_size=self.bn_size, drop_rate=self.drop_rate, num_classes=self.num_classes,
            compression=self.compression, stem=self.stem, in_channels=self.in_channels,
            conv_bias=self.conv_bias, transition_pool=self.transition_pool)

    @classmethod
    def from_preset(cls, preset, **options):
        """Build a named preset; keyword options override its values."""
        memory_efficient = options.pop("memory_efficient", False)
        cfg = spec.make_config(preset, **options)
        return cls(**cfg.options(), memory_efficient=memory_efficient, name=cfg.name)

    def setup(self):
        self.features = Features(self.config, self.memory_efficient)
        self.classifier = nn.Dense(self.num_classes)

    def stage_paths(self):
        """OrderedDict stage -> list of module paths into the variables, in order (stem,
        denseblock1, ..., head): linen's counterpart of stage_modules (modules are unbound
        here; their variables live outside). Needs no binding."""
        stem = ["conv0"] + (["norm0"] if self.config.stem == "imagenet" else [])
        return _stage_paths(stem, len(self.config.block_config))

    def forward_stages(self, X, train: bool = True):
        """Run the network and return an OrderedDict stage -> output (the head's is the logits).
        ``model.apply(variables, x, train=False, method="forward_stages")``."""
        spec.check_input(self.config, X.shape, layout="NHWC")
        f, n = self.features, len(self.config.block_config)
        outputs = OrderedDict()
        X = f.conv0(X)
        if self.config.stem == "imagenet":
            X = _max_pool_3x3_s2(nn.relu(f.norm0(X, train)))
        outputs["stem"] = X
        for i in range(n):
            X = outputs[f"denseblock{i + 1}"] = getattr(f, f"denseblock{i + 1}")(X, train)
            if i != n - 1:
                X = outputs[f"transition{i + 1}"] = getattr(f, f"transition{i + 1}")(X, train)
        outputs["head"] = self._head(getattr(f, f"norm{n + 1}")(X, train))
        return outputs

    def _head(self, X):
        """ReLU - global average pooling - dense, on the final BatchNorm's output."""
        X = jnp.mean(nn.relu(X), axis=(1, 2))
        return self.classifier(X)

    def __call__(self, X, train: bool = True):
        return self.forward_stages(X, train)["head"]


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
# As densenet_flax.model's MLP DenseNet (the forum's answer to the chapter's exercise 5), in
# linen: input widths inferred, the mode chosen at call time. Input (N, features).

class MLPBlock(nn.Module):
    """What mlp_block returns: BatchNorm-ReLU-Linear (norm1, linear1), then dropout (drop) if
    drop_rate; returns only the new features (MLPDenseBlock concatenates)."""

    num_features: int
    drop_rate: float = 0.0

    def setup(self):
        self.norm1 = BatchNorm()
        self.linear1 = nn.Dense(self.num_features)
        if self.drop_rate:
            self.drop = nn.Dropout(self.drop_rate)

    def __call__(self, X, train: bool = True):
        Y = self.linear1(nn.relu(self.norm1(X, train)))
        if self.drop_rate:
            Y = self.drop(Y, deterministic=not train)  # needs rngs={'dropout': key} in training
        return Y


def mlp_block(num_features, drop_rate=0.0):
    """The forum's ``conv_block_mlp``: BatchNorm-ReLU-Linear to ``num_features`` (the growth
    rate); ``drop_rate`` adds dropout after the new features (active in training only)."""
    spec.check_layer_args(num_channels=num_features)
    return MLPBlock(num_features, drop_rate=drop_rate)


class MLPDenseBlock(nn.Module):
    """``num_layers`` mlp_blocks; each one's input is the concatenation (feature axis) of the
    block input and all earlier outputs. Output: input features + num_layers * num_features."""

    num_layers: int
    num_features: int
    drop_rate: float = 0.0

    def __post_init__(self):
        spec.check_layer_args(num_convs=self.num_layers, num_channels=self.num_features)
        super().__post_init__()

    def setup(self):
        for i in range(self.num_layers):
            setattr(self, f"denselayer{i + 1}", mlp_block(self.num_features, self.drop_rate))

    def __call__(self, X, train: bool = True):
        features = [X]
        for i in range(self.num_layers):
            layer = getattr(self, f"denselayer{i + 1}")
            features.append(layer(jnp.concatenate(features, axis=-1), train))
        return jnp.concatenate(features, axis=-1)


class MLPTransition(nn.Module):
    """What mlp_transition_block returns: norm - ReLU - Linear, then a ReLU if ``relu``."""

    num_features: int
    relu: bool = True

    def setup(self):
        self.norm = BatchNorm()
        self.linear = nn.Dense(self.num_features)

    def __call__(self, X, train: bool = True):
        Y = self.linear(nn.relu(self.norm(X, train)))
        return nn.relu(Y) if self.relu else Y


def mlp_transition_block(num_features, relu=True):
    """BatchNorm-ReLU-Linear to ``num_features``, then (the forum's) a ReLU."""
    spec.check_layer_args(num_channels=num_features)
    return MLPTransition(num_features, relu=relu)


class MLPFeatures(nn.Module):
    """The MLP's ``features``: linear0, linear1, ... (the stem), denseblock1, transition1, ...,
    norm<N+1>, as named submodules. MLPDenseNet runs them."""

    config: spec.MLPPreset

    def setup(self):
        cfg = self.config
        for i, w in enumerate(cfg.stem_widths):
            setattr(self, f"linear{i}", nn.Dense(w))
        c = cfg.stem_widths[-1]
        for i, num_layers in enumerate(cfg.block_config):
            setattr(self, f"denseblock{i + 1}", MLPDenseBlock(num_layers, cfg.growth_rate,
                                                              drop_rate=cfg.drop_rate))
            c += num_layers * cfg.growth_rate
            if i != len(cfg.block_config) - 1:
                c = spec.transition_channels(cfg, c)
                setattr(self, f"transition{i + 1}",
                        mlp_transition_block(c, relu=cfg.transition_relu))
        setattr(self, f"norm{len(cfg.block_config) + 1}", BatchNorm())


class MLPDenseNet(nn.Module):
    """The MLP DenseNet family, with the options of densenet_flax.model.MLPDenseNet as fields.
    ``name`` is linen's own module name, used as the preset name (None: 'custom'). The head is
    BN - ReLU - Dense. Input (N, in_features), output (N, num_outputs)."""

    in_features: int = 330
    stem_widths: Tuple[int, ...] = (512, 1024)
    block_config: Tuple[int, ...] = (2, 2, 2, 2)
    growth_rate: int = 128
    compression: float = 0.5
    transition_relu: bool = True
    num_outputs: int = 1
    drop_rate: float = 0.0

    def __post_init__(self):
        cfg = self.config  # validates at construction, as the other backends do
        object.__setattr__(self, "block_config", cfg.block_config)  # a list -> tuple
        object.__setattr__(self, "stem_widths", cfg.stem_widths)
        super().__post_init__()

    @property
    def config(self) -> spec.MLPPreset:
        return spec.config_from_options(
            self.name or "custom", family="mlp", in_features=self.in_features,
            stem_widths=self.stem_widths, block_config=self.block_config,
            growth_rate=self.growth_rate, compression=self.compression,
            transition_relu=self.transition_relu, num_outputs=self.num_outputs,
            drop_rate=self.drop_rate)

    @classmethod
    def from_preset(cls, preset, **options):
        """Build a named preset; keyword options override its values."""
        cfg = spec.make_config(preset, **options)
        return cls(**cfg.options(), name=cfg.name)

    def setup(self):
        self.features = MLPFeatures(self.config)
        self.classifier = nn.Dense(self.num_outputs)

    def stage_paths(self):
        """OrderedDict stage -> list of module paths into the variables (as DenseNet's)."""
        cfg = self.config
        return _stage_paths([f"linear{i}" for i in range(len(cfg.stem_widths))],
                            len(cfg.block_config))

    def forward_stages(self, X, train: bool = True):
        """Run the network and return an OrderedDict stage -> output (the head's is the outputs).
        ``model.apply(variables, x, train=False, method="forward_stages")``."""
        spec.check_input(self.config, X.shape)
        f, cfg = self.features, self.config
        n = len(cfg.block_config)
        outputs = OrderedDict()
        for i in range(len(cfg.stem_widths)):
            X = nn.relu(getattr(f, f"linear{i}")(X))
        outputs["stem"] = X
        for i in range(n):
            X = outputs[f"denseblock{i + 1}"] = getattr(f, f"denseblock{i + 1}")(X, train)
            if i != n - 1:
                X = outputs[f"transition{i + 1}"] = getattr(f, f"transition{i + 1}")(X, train)
        outputs["head"] = self.classifier(nn.relu(getattr(f, f"norm{n + 1}")(X, train)))
        return outputs

    def __call__(self, X, train: bool = True):
        return self.forward_stages(X, train)["head"]


@spec.preset_builder("house_mlp")
def house_mlp(**options):
    return build("house_mlp", **options)
