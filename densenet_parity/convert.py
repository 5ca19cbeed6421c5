"""Convert DenseNet weights between frameworks, through the canonical form.

    densenet convert densenet121.pth model.safetensors
    densenet convert model.safetensors model.params --to mxnet
    densenet convert model.params model.msgpack --to flax-nnx
    densenet convert book_state_dict.pth book.msgpack --to flax-linen --preset book
    densenet convert model.onnx model.pth --to torch
    densenet convert model.params model.onnx --to onnx      (densenet_parity.export, proven)

Reads every framework's file once (densenet_weights.formats.load: its format told by its
content once, the file read by that format's module): a PyTorch state_dict (.pt/.pth/.bin,
``torch.load(weights_only=True)``: no code runs), Gluon parameters (.params, ours, the model
zoo's or the book's net), Flax msgpack (NNX or linen, ours or anyone's), safetensors, Keras
weights or ONNX (the graph gives each initializer its role; external data read from the file's
folder; BatchNorms an exporter folded put back as identity BatchNorms), under any names: they
are matched onto the preset's canonical names by structure (densenet_weights.match), and a file
that does not fit is refused with the first difference in the book's words. Writes canonical
safetensors (the default), or the file our model in a framework reads: a PyTorch state_dict
(--to torch; torchvision's DenseNet reads it too), Gluon parameters (--to mxnet:
``net.load_parameters``), Flax msgpack (--to flax-nnx / flax-linen), Keras weights (--to keras).
Every tensor is checked before anything is written; values are copied bit for bit. ONNX is
written by densenet_parity.export (which reads its source with this module, and proves the
file): ``densenet convert --to onnx`` runs it, and this module never imports it.

Reading and writing need only numpy and the format's own library (torch for .pth, flax for
.msgpack): converting a Gluon file needs neither MXNet nor its environment.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np

import densenet_spec as spec
from densenet_weights import files, formats
from densenet_weights.causes import likely_structural_cause

TARGETS = formats.NATIVE + ("onnx",)  # what `densenet convert --to` takes (onnx: export's)
TORCH_SUFFIXES = formats.SUFFIXES["torch"]


class ConvertError(ValueError):
    """A file this command cannot read (not a weights file, or refused)."""


class MismatchError(ValueError):
    """Weights that do not fit the preset: the message names the first difference."""


def read_weights(path: str, preset=None, **options) -> formats.Loaded:
    """Any weights file, read once (its format told once, read by that format's module) and
    matched onto ``preset`` (the one given, the one the file records, or the one its structure
    matches): a ``formats.Loaded``. A file this does not read is a ConvertError."""
    try:
        return formats.load(path, preset, **options)
    except formats.WeightsFormatError as e:
        raise refusal(e) from None
    except FileNotFoundError as e:
        raise ConvertError(str(e)) from None


def refusal(e: formats.WeightsFormatError) -> ConvertError:
    """The ConvertError for a file the formats do not read: what its reader said where the file
    was refused or is ONNX (whose reader says what it lacks), else an unknown format."""
    msg = str(e)
    return ConvertError(msg if "refused" in msg or e.format == "onnx" else
                        f"unknown format: {msg}")


def matched(path: str, loaded: formats.Loaded) -> Tuple[Dict[str, np.ndarray], spec.Preset]:
    """(canonical state, configuration) of a file read, or MismatchError naming the first
    difference and the porting mistake most likely behind it."""
    m = loaded.match
    if not loaded.ok:
        cause = likely_structural_cause(m.config, m.difference)
        raise MismatchError(f"{path} ({loaded.format}) is not DenseNet '{m.config.name}': "
                            f"{m.difference}" + (f"; likely cause: {cause}" if cause else ""))
    return loaded.state, loaded.config


def read_checkpoint(path: str, preset=None, notes: Optional[list] = None, **options
                    ) -> Tuple[Dict[str, np.ndarray], spec.Preset]:
    """(canonical float32 state, its configuration) of any weights file: the preset given, the
    one the file records, or the one its structure matches. ``notes``, a list, gets what the
    caller should tell the user (BatchNorms an ONNX exporter folded)."""
    loaded = read_weights(path, preset, **options)
    state, cfg = matched(path, loaded)
    if notes is not None:
        notes += loaded.notes
    return state, cfg


def write_checkpoint(state: Dict[str, np.ndarray], config: spec.Preset, dst: str,
                     to: str = "canonical") -> None:
    """Write a canonical state as the file our model in ``to`` reads."""
    if to not in formats.NATIVE:
        raise ConvertError(f"unknown target {to!r}; targets: {', '.join(formats.NATIVE)} "
                           "(ONNX: densenet_parity.export)")
    spec.check_state(config, {k: v.shape for k, v in state.items()})
    state = {name: state[name] for name, _, _ in spec.canonical_tensors(config)}  # its order:
    if to == "canonical":                                       # Keras' files number layers in it
        files.save_state(state, dst, config)
        return
    fmt, arrays = formats.native(state, to)
    formats.write(dst, arrays, fmt)


def convert(src: str, dst: str, to: str = "canonical", preset: Optional[str] = None,
            **options) -> spec.Preset:
    """Read ``src`` (any format, any names), write ``dst`` for ``to``; returns the config.
    ``to='onnx'`` is densenet_parity.export.export (which proves the file; ``densenet convert
    --to onnx`` runs it and prints its result)."""
    if to not in TARGETS:
        raise ConvertError(f"unknown target {to!r}; targets: {', '.join(TARGETS)}")
    if to == "onnx":
        raise ConvertError("ONNX is written by densenet_parity.export.export(src, dst, preset), "
                           "which proves the file in onnxruntime (`densenet convert --to onnx` "
                           "runs it)")
    state, cfg = read_checkpoint(src, preset, **options)
    write_checkpoint(state, cfg, dst, to)
    return cfg
