"""DenseNet in Flax NNX: the book's pieces (conv_block, DenseBlock, transition_block) and the
paper's DenseNet / DenseNet-BC family, with torchvision's tensor names.

Read side by side with densenet_torch/model.py and densenet_mxnet/model.py: same names, same
order, same options. Layout: NHWC (kernels HWIO). The book's linen version is
densenet_flax/linen.py.
"""
from __future__ import annotations

from collections import OrderedDict

import jax
import jax.numpy as jnp
from flax import nnx

import densenet_spec as spec
from densenet_spec import DenseNetInputError  # noqa: F401  (re-exported)

__all__ = ["conv_block", "DenseBlock", "transition_block", "DenseNet", "build",
           "book", "densenet121", "densenet161", "densenet169", "densenet201", "densenet264",
           "densenet40", "densenet_bc100", "densenet_bc250", "densenet_bc190",
           "mlp_block", "MLPDenseBlock", "mlp_transition_block", "MLPDenseNet", "house_mlp"]


# ---- BatchNorm with PyTorch's semantics. Why not nnx.BatchNorm: it updates the running
# variance with the *biased* batch variance (and, by default, computes it as E[x^2] - E[x]^2);
# PyTorch, whose behaviour is the canonical one, normalises with the biased variance but
# updates the running variance with the *unbiased* one (times n / (n - 1), n = N * H * W), so
# a ported training run would drift. These two functions are shared with linen.py.

def batch_norm_train(x, running_mean, running_var, scale, bias, momentum, eps=spec.BN_EPS):
    """Train mode over the channel (last) axis, as PyTorch computes it: the output (normalised
    with the batch's biased variance) and the new running mean and variance (``momentum`` of
    the old, the rest the batch's mean and *unbiased* variance).

    The running statistics take the batch's moments through stop_gradient: they are outputs of
    a train step, never differentiated, and so the autodiff has no derivative of their update
    to build and drop. The centred batch ``x - mean`` is computed once, for the variance and
    the output (the same values: one subtraction instead of two equal ones)."""
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axis=axes)
    centred = x - mean
    var = jnp.mean(jnp.square(centred), axis=axes)
    n = x.size // x.shape[-1]
    batch_mean, batch_var = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
    new_mean = momentum * running_mean + (1 - momentum) * batch_mean
    new_var = momentum * running_var + (1 - momentum) * (batch_var * (n / max(n - 1, 1)))
    return centred * jax.lax.rsqrt(var + eps) * scale + bias, new_mean, new_var


def normalize(x, mean, var, scale, bias, eps=spec.BN_EPS):
    """Eval mode: ``x`` normalised with the running statistics."""
    return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias


class BatchNorm(nnx.Module):
    """BatchNorm over the channel (last) axis: params scale, bias; batch stats mean, var.
    eps 1e-5; running = 0.9 * running + 0.1 * batch (PyTorch's momentum 0.1)."""

    def __init__(self, num_features, *, use_running_average=False,
                 momentum=1.0 - spec.TORCH_BN_MOMENTUM, epsilon=spec.BN_EPS):
        self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
        self.use_running_average = use_running_average  # set by model.train() / model.eval()
        self.momentum, self.epsilon = momentum, epsilon

    def __call__(self, x):
        if self.use_running_average:
            return normalize(x, self.mean[...], self.var[...], self.scale[...],
                             self.bias[...], self.epsilon)
        out, mean, var = batch_norm_train(x, self.mean[...], self.var[...], self.scale[...],
                                          self.bias[...], self.momentum, self.epsilon)
        _assign(self.mean, mean)
        _assign(self.var, var)
        return out

    def set_view(self, use_running_average: bool | None = None):
        """For nnx.view(model, use_running_average=...), like nnx.BatchNorm."""
        if use_running_average is not None:
            self.use_running_average = use_running_average


def _assign(variable, value):
    """``variable[...] = value`` without its cost under tracing: Flax checks that a full
    replacement keeps the sharding, and asking a tracer for its sharding makes JAX walk the
    whole program traced so far (to word an error), once per BatchNorm: tracing grew with the
    square of the depth (11 s of 16 for DenseNet-BC-250's train step). set_value replaces the
    value as it is."""
    if hasattr(variable, "set_value"):
        variable.set_value(value)
    else:  # flax before set_value
        variable.value = value


def _batch_norm(channels):
    # Our BatchNorm: eps 1e-5, PyTorch's momentum, unbiased running variance (see above).
    return BatchNorm(channels)


class Sequential(nnx.Module):
    """Named layers applied in order, like torch's nn.Sequential(OrderedDict(...)). (nnx.Sequential
    names its layers 0, 1, ...; we want torchvision's names in the state.) Layers are modules or
    plain functions (nnx.relu, the pools); functions hold no state."""

    def __init__(self, layers):
        self._names = ()
        for name, layer in layers.items():
            self.add_module(name, layer)

    def add_module(self, name, layer):
        setattr(self, name, layer)
        self._names += (name,)

    def named_children(self):
        return [(name, getattr(self, name)) for name in self._names]

    def __getitem__(self, i):
        return getattr(self, self._names[i])

    def __call__(self, X):
        for _, layer in self.named_children():
            X = layer(X)
        return X


class _ShapeOnlyKeys:
    """Stands in for ``nnx.Rngs`` when a model is built only for its shapes, under
    ``nnx.eval_shape`` (no dropout: Dropout keeps its stream): every key is the same concrete
    key. A real ``Rngs`` counts its calls in a Variable that is traced there, and Flax compares
    the traced count's sharding at every call, which makes JAX describe the tracer's origin by
    walking all the program traced so far: quadratic in depth, 3.5 s of DenseNet-264's 5.9 s
    abstract build. The shapes, dtypes and graph come out the same (parity_tests/test_structure.py)."""

    def __init__(self):
        self._key = jax.random.key(0)

    def params(self):
        return self._key

    __call__ = params


def _conv(input_channels, num_channels, kernel_size, bias, rngs, stride=1, padding=0):
    # Explicit symmetric padding as in PyTorch: Flax's padding='SAME' with stride 2 pads
    # asymmetrically (more at the end) and would shift every output pixel of the stem.
    return nnx.Conv(input_channels, num_channels, kernel_size=(kernel_size, kernel_size),
                    strides=(stride, stride), padding=((padding, padding), (padding, padding)),
                    use_bias=bias, rngs=rngs)


def _max_pool_3x3_s2(X):
    # nn.MaxPool2d(kernel_size=3, stride=2, padding=1): Flax pads a max pool with -inf.
    return nnx.max_pool(X, window_shape=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def _avg_pool_2x2_s2(X):
    # nn.AvgPool2d(kernel_size=2, stride=2): no padding, an odd last row / column is dropped.
    return nnx.avg_pool(X, window_shape=(2, 2), strides=(2, 2), padding="VALID")


def _max_pool_2x2_s2(X):
    # nn.MaxPool2d(kernel_size=2, stride=2): no padding, an odd last row / column is dropped.
    return nnx.max_pool(X, window_shape=(2, 2), strides=(2, 2), padding="VALID")


def conv_block(input_channels, num_channels, bn_size=None, drop_rate=0.0, bias=True, *, rngs):
    """The book's BN-ReLU-3x3 conv; with ``bn_size``, the paper's bottleneck layer
    BN-ReLU-1x1 conv (bn_size * num_channels) - BN-ReLU-3x3 conv (num_channels).
    ``drop_rate`` adds dropout after the new feature map (active in training only)."""
    spec.check_layer_args(input_channels=input_channels, num_channels=num_channels, bn_size=bn_size)
    layers = OrderedDict()
    if bn_size is None:
        layers["norm1"] = _batch_norm(input_channels)
        layers["relu1"] = nnx.relu
        layers["conv1"] = _conv(input_channels, num_channels, 3, bias, rngs, padding=1)
    else:
        width = bn_size * num_channels
        layers["norm1"] = _batch_norm(input_channels)
        layers["relu1"] = nnx.relu
        layers["conv1"] = _conv(input_channels, width, 1, bias, rngs)
        layers["norm2"] = _batch_norm(width)
        layers["relu2"] = nnx.relu
        layers["conv2"] = _conv(width, num_channels, 3, bias, rngs, padding=1)
    if drop_rate:
        layers["drop"] = nnx.Dropout(drop_rate, rngs=rngs)
    return Sequential(layers)


# ---- memory-efficient mode: recompute concat + first BN-ReLU-conv in the backward pass.
# nnx.remat is jax.checkpoint lifted over modules: the modules' state goes in as inputs and the
# updated BatchNorm running statistics come out as outputs, computed once, by the forward pass.
# The backward pass recomputes values for the gradient only; being functional, it has no
# side effect to repeat, so the running statistics get exactly one update per step (the bug
# PyTorch must work around with a flag has no way to happen here; the parity tests check it).
# The naive mode is the plain call. (It used to be the same checkpointed function saving every
# intermediate, so that both modes were one program and rounded alike; the memory-efficient
# tests compare them in float64, where they agree to ~1e-12 anyway, and the plain call traces
# faster and lets the summary see every layer.)

def _first(norm, conv, *features):
    return conv(nnx.relu(norm(jnp.concatenate(features, axis=-1))))


_first_checkpointed = nnx.remat(_first)  # saves nothing: recomputed in the backward pass


class DenseBlock(nnx.Module):
    """``num_convs`` conv_blocks; each one's input is the concatenation (channel axis) of the
    block input and all earlier outputs. Output channels: input_channels + num_convs * num_channels.
    """

    def __init__(self, num_convs, input_channels, num_channels, bn_size=None, drop_rate=0.0,
                 bias=True, memory_efficient=False, *, rngs):
        spec.check_layer_args(num_convs=num_convs, input_channels=input_channels,
                              num_channels=num_channels, bn_size=bn_size)
        self.memory_efficient = memory_efficient
        self.num_convs = num_convs
        for i in range(num_convs):
            setattr(self, f"denselayer{i + 1}",
                    conv_block(input_channels + i * num_channels, num_channels,
                               bn_size=bn_size, drop_rate=drop_rate, bias=bias, rngs=rngs))

    def children(self):
        return [getattr(self, f"denselayer{i + 1}") for i in range(self.num_convs)]

    def __call__(self, X):
        features = [X]
        first = _first_checkpointed if self.memory_efficient else _first
        for layer in self.children():
            Y = first(layer.norm1, layer.conv1, *features)
            for name, module in layer.named_children():
                if name not in ("norm1", "relu1", "conv1"):
                    Y = module(Y)
            features.append(Y)
        return jnp.concatenate(features, axis=-1)


def transition_block(input_channels, num_channels, bias=True, pool="avg", *, rngs):
    """BN-ReLU-1x1 conv to ``num_channels``, then 2x2 pooling with stride 2: average (``pool``
    'avg', the book's and the paper's) or max ('max', exercise 1's alternative)."""
    spec.check_layer_args(input_channels=input_channels, num_channels=num_channels, pool=pool)
    return Sequential(OrderedDict([
        ("norm", _batch_norm(input_channels)),
        ("relu", nnx.relu),
        ("conv", _conv(input_channels, num_channels, 1, bias, rngs)),
        ("pool", _avg_pool_2x2_s2 if pool == "avg" else _max_pool_2x2_s2),
    ]))


class DenseNet(nnx.Module):
    """The DenseNet family. ``features`` holds stem, dense blocks, transitions and the final
    BatchNorm under torchvision's names; ``classifier`` is the dense layer. The head is
    BN - ReLU - global average pooling - dense, so any input at least ``min_input_size`` works.
    Training mode by default (as PyTorch); ``model.eval()`` / ``model.train()`` switch.
    """

    def __init__(self, growth_rate=32, block_config=(4, 4, 4, 4), num_init_features=64,
                 bn_size=None, drop_rate=0.0, num_classes=10, compression=0.5, stem="imagenet",
                 in_channels=1, conv_bias=True, transition_pool="avg", memory_efficient=False,
                 name="custom", *, rngs=None):
        self.config = cfg = spec.config_from_options(
            name, growth_rate=growth_rate,
            block_config=block_config, num_init_features=num_init_features, bn_size=bn_size,
            drop_rate=drop_rate, num_classes=num_classes, compression=compression, stem=stem,
            in_channels=in_channels, conv_bias=conv_bias,
            transition_pool=transition_pool)
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self.memory_efficient = memory_efficient
        c = cfg.num_init_features
        if cfg.stem == "imagenet":
            stem = [("conv0", _conv(cfg.in_channels, c, 7, cfg.conv_bias, rngs, stride=2,
                                    padding=3)),
                    ("norm0", _batch_norm(c)),
                    ("relu0", nnx.relu),
                    ("pool0", _max_pool_3x3_s2)]
        else:
            stem = [("conv0", _conv(cfg.in_channels, c, 3, cfg.conv_bias, rngs, padding=1))]
        self.features = Sequential(OrderedDict(stem))
        for i, num_convs in enumerate(cfg.block_config):
            self.features.add_module(f"denseblock{i + 1}", DenseBlock(
                num_convs, c, cfg.growth_rate, bn_size=cfg.bn_size, drop_rate=cfg.drop_rate,
                bias=cfg.conv_bias, memory_efficient=memory_efficient, rngs=rngs))
            c += num_convs * cfg.growth_rate
            if i != len(cfg.block_config) - 1:
                out = spec.transition_channels(cfg, c)
                self.features.add_module(f"transition{i + 1}",
                                         transition_block(c, out, bias=cfg.conv_bias,
                                                          pool=cfg.transition_pool, rngs=rngs))
                c = out
        self.features.add_module(f"norm{len(cfg.block_config) + 1}", _batch_norm(c))
        self.classifier = nnx.Linear(c, cfg.num_classes, rngs=rngs)

    @classmethod
    def from_preset(cls, preset, **options):
        """Build a named preset; keyword options override its values."""
        memory_efficient = options.pop("memory_efficient", False)
        rngs = options.pop("rngs", None)
        cfg = spec.make_config(preset, **options)
        return cls(**cfg.options(), memory_efficient=memory_efficient, name=cfg.name, rngs=rngs)

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
        spec.check_input(self.config, X.shape, layout="NHWC")
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
        X = jnp.mean(nnx.relu(X), axis=(1, 2))
        return self.classifier(X)

    def __call__(self, X):
        spec.check_input(self.config, X.shape, layout="NHWC")
        return self._head(self.features(X))


def build(preset="book", **options):
    """Build any preset by name (or a densenet_spec preset), of either family (DenseNet or
    MLPDenseNet); options override it (``rngs=nnx.Rngs(seed)`` and ``memory_efficient=True``
    included)."""
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
# multilayer perceptron, for the house-price data. BatchNorm-ReLU-Linear layers in place of
# BN-ReLU-conv, dense blocks that concatenate features, transitions that compress the width
# (the forum's end with a ReLU), a Linear-ReLU stem, a BN-ReLU-Linear head. Input (N, features).
# Our BatchNorm over the last axis of (N, features) is PyTorch's BatchNorm1d (n = N).

def mlp_block(input_features, num_features, drop_rate=0.0, *, rngs):
    """The forum's ``conv_block_mlp``: BatchNorm-ReLU-Linear to ``num_features`` (the growth
    rate); ``drop_rate`` adds dropout after the new features (active in training only)."""
    spec.check_layer_args(input_channels=input_features, num_channels=num_features)
    layers = OrderedDict([
        ("norm1", _batch_norm(input_features)),
        ("relu1", nnx.relu),
        ("linear1", nnx.Linear(input_features, num_features, rngs=rngs)),
    ])
    if drop_rate:
        layers["drop"] = nnx.Dropout(drop_rate, rngs=rngs)
    return Sequential(layers)


class MLPDenseBlock(nnx.Module):
    """``num_layers`` mlp_blocks; each one's input is the concatenation (feature axis) of the
    block input and all earlier outputs. Output: input_features + num_layers * num_features."""

    def __init__(self, num_layers, input_features, num_features, drop_rate=0.0, *, rngs):
        spec.check_layer_args(num_convs=num_layers, input_channels=input_features,
                              num_channels=num_features)
        self.num_layers = num_layers
        for i in range(num_layers):
            setattr(self, f"denselayer{i + 1}", mlp_block(
                input_features + i * num_features, num_features, drop_rate=drop_rate, rngs=rngs))

    def children(self):
        return [getattr(self, f"denselayer{i + 1}") for i in range(self.num_layers)]

    def __call__(self, X):
        features = [X]
        for layer in self.children():
            features.append(layer(jnp.concatenate(features, axis=-1)))
        return jnp.concatenate(features, axis=-1)


def mlp_transition_block(input_features, num_features, relu=True, *, rngs):
    """BatchNorm-ReLU-Linear to ``num_features``, then (the forum's) a ReLU."""
    spec.check_layer_args(input_channels=input_features, num_channels=num_features)
    layers = OrderedDict([
        ("norm", _batch_norm(input_features)),
        ("relu", nnx.relu),
        ("linear", nnx.Linear(input_features, num_features, rngs=rngs)),
    ])
    if relu:
        layers["relu2"] = nnx.relu
    return Sequential(layers)


class MLPDenseNet(nnx.Module):
    """The MLP DenseNet family. ``features`` holds the stem (linear0, relu0, ...), the dense
    blocks, transitions and the final BatchNorm; ``classifier`` is the output Linear. The head
    is BN - ReLU - Linear. Input (N, in_features), output (N, num_outputs). Training mode by
    default (as PyTorch); ``model.eval()`` / ``model.train()`` switch."""

    def __init__(self, in_features=330, stem_widths=(512, 1024), block_config=(2, 2, 2, 2),
                 growth_rate=128, compression=0.5, transition_relu=True, num_outputs=1,
                 drop_rate=0.0, name="custom", *, rngs=None):
        self.config = cfg = spec.config_from_options(
            name, family="mlp", in_features=in_features, stem_widths=stem_widths,
            block_config=block_config, growth_rate=growth_rate, compression=compression,
            transition_relu=transition_relu, num_outputs=num_outputs, drop_rate=drop_rate)
        rngs = nnx.Rngs(0) if rngs is None else rngs
        stem, c = [], cfg.in_features
        for i, w in enumerate(cfg.stem_widths):
            stem += [(f"linear{i}", nnx.Linear(c, w, rngs=rngs)), (f"relu{i}", nnx.relu)]
            c = w
        self.features = Sequential(OrderedDict(stem))
        for i, num_layers in enumerate(cfg.block_config):
            self.features.add_module(f"denseblock{i + 1}", MLPDenseBlock(
                num_layers, c, cfg.growth_rate, drop_rate=cfg.drop_rate, rngs=rngs))
            c += num_layers * cfg.growth_rate
            if i != len(cfg.block_config) - 1:
                out = spec.transition_channels(cfg, c)
                self.features.add_module(f"transition{i + 1}", mlp_transition_block(
                    c, out, relu=cfg.transition_relu, rngs=rngs))
                c = out
        self.features.add_module(f"norm{len(cfg.block_config) + 1}", _batch_norm(c))
        self.classifier = nnx.Linear(c, cfg.num_outputs, rngs=rngs)

    @classmethod
    def from_preset(cls, preset, **options):
        """Build a named preset; keyword options override its values (``rngs`` too)."""
        rngs = options.pop("rngs", None)
        cfg = spec.make_config(preset, **options)
        return cls(**cfg.options(), name=cfg.name, rngs=rngs)

    # DenseNet's: the stages are found by name, and spec.check_input knows the family (the
    # MLP's (N, features) has no layout).
    stage_modules = DenseNet.stage_modules
    forward_stages = DenseNet.forward_stages

    def _head(self, X):
        """ReLU - Linear, on the final BatchNorm's output."""
        return self.classifier(nnx.relu(X))

    __call__ = DenseNet.__call__


@spec.preset_builder("house_mlp")
def house_mlp(**options):
    return build("house_mlp", **options)
