"""Validation of configurations, with the error messages every backend raises (inputs:
``densenet_spec.shapes``)."""
from __future__ import annotations

import dataclasses
from typing import Optional

from densenet_spec.arithmetic import stage_channels
from densenet_spec.presets import (STEMS, TRANSITION_POOLS, DenseNetConfigError, MLPPreset,
                                   Preset, get_preset)


def _positive_int(what: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise DenseNetConfigError(f"{what} must be a positive integer, got {value!r}")


def _fraction(what: str, value, low_open: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        0.0 < value <= 1.0 if low_open else 0.0 <= value < 1.0)
    if not ok:
        raise DenseNetConfigError(f"{what} must be in {'(0, 1]' if low_open else '[0, 1)'}, "
                                  f"got {value!r}")


def _blocks(block_config) -> None:
    if not isinstance(block_config, tuple) or len(block_config) == 0:
        raise DenseNetConfigError(
            f"block_config must be a non-empty sequence of layer counts, got {block_config!r}")
    for i, n in enumerate(block_config):
        _positive_int(f"block_config[{i}] (layers in dense block {i + 1})", n)


def validate(p):
    """Check every option of ``p`` (either family); raise DenseNetConfigError naming the first
    bad one."""
    _positive_int("growth_rate", p.growth_rate)
    _blocks(p.block_config)
    if isinstance(p, MLPPreset):
        _positive_int("in_features", p.in_features)
        if not isinstance(p.stem_widths, tuple) or len(p.stem_widths) == 0:
            raise DenseNetConfigError(
                f"stem_widths must be a non-empty sequence of layer widths, got {p.stem_widths!r}")
        for i, w in enumerate(p.stem_widths):
            _positive_int(f"stem_widths[{i}] (width of stem layer {i + 1})", w)
        _positive_int("num_outputs", p.num_outputs)
        if not isinstance(p.transition_relu, bool):
            raise DenseNetConfigError(f"transition_relu must be True or False, got "
                                      f"{p.transition_relu!r}")
        what = "features"
    else:
        _positive_int("num_init_features", p.num_init_features)
        _positive_int("in_channels", p.in_channels)
        _positive_int("num_classes", p.num_classes)
        if p.bn_size is not None:
            _positive_int("bn_size", p.bn_size)
        if p.stem not in STEMS:
            raise DenseNetConfigError(f"stem must be one of {STEMS}, got {p.stem!r}")
        if p.transition_pool not in TRANSITION_POOLS:
            raise DenseNetConfigError(
                f"transition_pool must be one of {TRANSITION_POOLS} (the transition's 2x2 "
                f"pooling, stride 2), got {p.transition_pool!r}")
        what = "channels"
    _fraction("compression", p.compression, low_open=True)
    _fraction("drop_rate", p.drop_rate, low_open=False)
    for name, c in stage_channels(p):
        if c <= 0:
            raise DenseNetConfigError(f"compression {p.compression} leaves {name} with no {what}")
    return p


def _fields(p):
    return {f.name for f in dataclasses.fields(type(p))} - {"name", "source"}


def make_config(preset="book", **overrides):
    """A validated preset (either family): a named preset (or a preset object) with some options
    replaced. Unknown option names are refused, so a typo never builds a silently different
    network."""
    base = get_preset(preset)
    fields = _fields(base)
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise DenseNetConfigError(
            f"unknown {'MLP ' if base.family == 'mlp' else ''}DenseNet option(s) "
            f"{', '.join(unknown)}; options are {', '.join(sorted(fields))}")
    for key in ("block_config", "stem_widths"):
        if key in overrides:
            value = overrides[key]
            try:
                overrides[key] = tuple(value)
            except TypeError:
                raise DenseNetConfigError(
                    f"{key} must be a non-empty sequence of {'layer counts' if key == 'block_config' else 'layer widths'}, "
                    f"got {value!r}") from None
    if overrides:
        base = dataclasses.replace(base, **overrides)
    return validate(base)


_BLANK = {"conv": Preset("custom", (), 0, 0, None, 0.0, "", 0, 0, False),
          "mlp": MLPPreset("custom", 0, (), (), 0, 0.0, False, 0)}


def config_from_options(name: str = "custom", family: str = "conv", **options):
    """A validated preset from the keyword options of a backend's ``DenseNet(...)``
    (``family='mlp'``: of its ``MLPDenseNet(...)``)."""
    if family not in _BLANK:
        raise DenseNetConfigError(f"unknown DenseNet family {family!r}; families: conv, mlp")
    blank = dataclasses.replace(_BLANK[family], name=name)
    missing = sorted(_fields(blank) - set(options) - {"drop_rate", "transition_pool"})
    if missing:
        raise DenseNetConfigError(f"missing DenseNet option(s): {', '.join(missing)}")
    return make_config(blank, **options)


def check_layer_args(num_convs=None, input_channels=None, num_channels=None, bn_size=None,
                     pool=None):
    """Validation shared by the book's building blocks in every backend (the MLP's too: a
    layer count, input and output widths; a transition's ``pool``)."""
    if num_convs is not None:
        _positive_int("num_convs", num_convs)
    if input_channels is not None:
        _positive_int("input_channels", input_channels)
    if num_channels is not None:
        _positive_int("num_channels", num_channels)
    if bn_size is not None:
        _positive_int("bn_size", bn_size)
    if pool is not None and pool not in TRANSITION_POOLS:
        raise DenseNetConfigError(f"pool must be one of {TRANSITION_POOLS} (the transition's "
                                  f"2x2 pooling, stride 2), got {pool!r}")


def check_devices(batch: int, devices: int) -> None:
    """Raise ValueError unless a batch of ``batch`` splits evenly over ``devices`` devices (a
    data-parallel step gives every device the same share)."""
    if devices < 1:
        raise ValueError(f"devices must be at least 1, got {devices}")
    if batch % devices:
        raise ValueError(f"a batch of {batch} does not split evenly over {devices} devices")


def is_mlp(p: Optional[object]) -> bool:
    return isinstance(p, MLPPreset)
