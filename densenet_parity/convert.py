"""Convert DenseNet weights between frameworks, through the canonical form.

    densenet convert densenet121.pth model.safetensors
    densenet convert model.safetensors model.params --to mxnet
    densenet convert model.params model.msgpack --to flax-nnx
    densenet convert book_state_dict.pth book.msgpack --to flax-linen --preset book

Reads every framework's file (densenet_weights.formats, told by content): a PyTorch state_dict
(.pt/.pth/.bin, ``torch.load(weights_only=True)``: no code runs), Gluon parameters (.params,
ours, the model zoo's or the book's net), Flax msgpack (NNX or linen, ours or anyone's) or
safetensors, under any names: they are matched onto the preset's canonical names by structure
(densenet_weights.match), and a file that does not fit is refused with the first difference in
the book's words. Writes canonical safetensors (the default), or the file our model in a
framework reads: a PyTorch state_dict (--to torch; torchvision's DenseNet reads it too), Gluon
parameters (--to mxnet: ``net.load_parameters``), Flax msgpack (--to flax-nnx / flax-linen).
Every tensor is checked before anything is written; values are copied bit for bit.

Reading and writing need only numpy and the format's own library (torch for .pth, flax for
.msgpack): converting a Gluon file needs neither MXNet nor its environment.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np

import densenet_spec as spec
from densenet_weights import files, formats
from densenet_weights import match as matching

TARGETS = formats.NATIVE
TORCH_SUFFIXES = formats.SUFFIXES["torch"]


class ConvertError(ValueError):
    """A file this command cannot read (not a weights file, or refused)."""


class MismatchError(ValueError):
    """Weights that do not fit the preset: the message names the first difference."""


def read_checkpoint(path: str, preset=None, **options
                    ) -> Tuple[Dict[str, np.ndarray], spec.Preset]:
    """(canonical float32 state, its configuration) of any weights file: the preset given, the
    one in a canonical file's metadata, or the one its structure matches."""
    try:
        fmt, arrays = formats.read(path)
    except formats.WeightsFormatError as e:
        msg = str(e)
        raise ConvertError(msg if "refused" in msg else f"unknown format: {msg}") from None
    except FileNotFoundError as e:
        raise ConvertError(str(e)) from None
    if preset is None and fmt == "safetensors":
        _, preset = files.load_state(path)  # our canonical files carry their configuration
    m = matching.match(arrays, preset, layout=formats.LAYOUTS[fmt],
                       natural=fmt in ("flax", "safetensors"), **options)
    if not m.ok or m.state is None:
        from densenet_parity.checking import likely_structural_cause
        cause = likely_structural_cause(m.config, m.difference)
        raise MismatchError(f"{path} ({fmt}) is not DenseNet '{m.config.name}': {m.difference}"
                            + (f"; likely cause: {cause}" if cause else ""))
    return m.state, m.config


def write_checkpoint(state: Dict[str, np.ndarray], config: spec.Preset, dst: str,
                     to: str = "canonical") -> None:
    """Write a canonical state as the file our model in ``to`` reads."""
    if to not in TARGETS:
        raise ConvertError(f"unknown target {to!r}; targets: {', '.join(TARGETS)}")
    spec.check_state(config, {k: v.shape for k, v in state.items()})
    state = {name: state[name] for name, _, _ in spec.canonical_tensors(config)}  # its order:
    if to == "canonical":                                       # Keras' files number layers in it
        files.save_state(state, dst, config)
        return
    fmt, arrays = formats.native(state, to)
    formats.write(dst, arrays, fmt)


def convert(src: str, dst: str, to: str = "canonical", preset: Optional[str] = None,
            **options) -> spec.Preset:
    """Read ``src`` (any format, any names), write ``dst`` for ``to``; returns the config."""
    if to not in TARGETS:
        raise ConvertError(f"unknown target {to!r}; targets: {', '.join(TARGETS)}")
    state, cfg = read_checkpoint(src, preset, **options)
    write_checkpoint(state, cfg, dst, to)
    return cfg
