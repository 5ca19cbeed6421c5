"""Every framework's weights file, read and written as a flat, ordered mapping name -> numpy
array in the framework's own names and layout (``read``, ``write``; ``match`` maps foreign names
onto canonical ones), or read once and matched onto a preset (``load``: a ``Loaded``, the
canonical state and what the reader noticed).

| format       | files                      | read with                                       |
| ------------ | -------------------------- | ----------------------------------------------- |
| torch        | .pt .pth .bin (state_dict) | ``torch.load(weights_only=True)``: no code runs  |
| gluon        | .params (NDArray list)     | this package, numpy only (MXNet's binary format) |
| flax         | .msgpack                   | ``flax.serialization.msgpack_restore``           |
| safetensors  | .safetensors               | ``safetensors.numpy``                            |
| onnx         | .onnx (+ external data)    | ``onnx.load``: the graph gives each initializer  |
|              |                            | its role (Conv, BatchNormalization, Gemm inputs) |
| keras        | .weights.h5, .keras, .h5   | ``h5py`` (a .keras zip's model.weights.h5): never |
|              |                            | Keras' loader, never the archive's config.json   |

The format is told by the file's first bytes, not its name; a file that is none of these is a
clear error naming what was expected. Frameworks are imported only for their own format, so
converting a Gluon file needs neither MXNet nor its environment.

The package: one module per format, and this one, which tells a file's format once
(``detect``) and hands the file to that format's module (``load``, ``read``, ``write``,
``native``).

    common.py               WeightsFormatError, Loaded, by_structure (the match of a file of
                            named tensors)
    format_torch.py, format_gluon.py, format_flax.py, format_safetensors.py, format_keras.py,
    format_onnx.py          one per format

Adding a format is one new file ``format_<name>.py`` (and its module in ``REGISTRY`` below, in
the order first bytes are told). It imports its framework lazily (inside functions) and
provides:

    FORMAT = "<name>";  SUFFIXES = (".ext", ...)
    LAYOUT = "torch" (OIHW, dense [out, in]) or "flax" (HWIO, dense [in, out])
    NATURAL = bool             the file does not keep the model's order: match modules in
                               natural name order
    NATIVE = ("<target>", ...) the targets of ``native`` whose files are this format (may be
                               empty)
    sniff(head, path) -> bool  the file's first 16 bytes are this format's
    read(path) -> OrderedDict  name -> array, the file's names and layout, in its order
    load(path, preset=None, **options) -> Loaded
                               (optional) the file read once and matched, where the format
                               knows more than its tensors (the preset it records, its graph);
                               without it: ``read``, matched by structure (common.by_structure)
    write(path, tensors)       (optional) the file of these tensors
    native(module, leaf, array, is_bn, target) -> (name, array) pairs
                               (with NATIVE) one canonical tensor as our model in ``target``
                               names and lays it out
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Mapping, Tuple

import numpy as np

from densenet_weights.formats import (format_flax, format_gluon, format_keras, format_onnx,
                                      format_safetensors, format_torch)
from densenet_weights.formats.common import Loaded, WeightsFormatError, by_structure
from densenet_weights.formats.format_flax import flatten, unflatten
from densenet_weights.formats.format_keras import keras_layer_name
from densenet_weights.formats.format_onnx import (FOLDABLE, ONNX_BN_DEFAULTS, ONNX_WEIGHT_INPUTS,
                                                  OnnxLayer, folded_words, match_onnx,
                                                  onnx_layers, onnx_preset, unfold_batchnorm)

#: The format modules in the order a file's first bytes are tried: a more specific signature
#: before a more general one (a .keras archive is a zip, like torch.save's; a safetensors
#: header's length may begin with a byte that also starts a msgpack map).
REGISTRY = (format_keras, format_torch, format_gluon, format_safetensors, format_flax,
            format_onnx)
_BY_NAME = {m.FORMAT: m for m in REGISTRY}
FORMATS = ("torch", "gluon", "flax", "safetensors", "keras", "onnx")
#: What ``native`` names: our models' own files in each framework (keras: the .weights.h5 a
#: keras.applications DenseNet loads with ``load_weights``).
NATIVE = ("canonical", "torch", "mxnet", "flax-nnx", "flax-linen", "keras")
_NATIVE_HOME = {t: m for m in REGISTRY for t in m.NATIVE}
assert set(FORMATS) == set(_BY_NAME) and set(NATIVE) == set(_NATIVE_HOME)
SUFFIXES = {f: _BY_NAME[f].SUFFIXES for f in FORMATS}
#: Each format's layout: "torch" (OIHW, dense [out, in]) or "flax" (HWIO, dense [in, out]).
LAYOUTS = {f: _BY_NAME[f].LAYOUT for f in FORMATS}

__all__ = ["FOLDABLE", "FORMATS", "LAYOUTS", "Loaded", "NATIVE", "ONNX_BN_DEFAULTS",
           "ONNX_WEIGHT_INPUTS", "OnnxLayer", "REGISTRY", "SUFFIXES", "WeightsFormatError",
           "detect", "flatten", "folded_words", "keras_layer_name", "load", "match_onnx",
           "native", "onnx_layers", "onnx_preset", "read", "unflatten", "unfold_batchnorm",
           "write"]


def detect(path) -> str:
    """The file's format, from its first bytes (and, for safetensors, its JSON header)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    with open(path, "rb") as f:
        head = f.read(16)
    for module in REGISTRY:
        if module.sniff(head, path):
            return module.FORMAT
    raise WeightsFormatError(
        f"{path}: not a weights file this project reads; expected a PyTorch state_dict "
        f"({', '.join(SUFFIXES['torch'])}: torch.save), Gluon parameters (.params: "
        f"save_parameters / mx.nd.save), Flax msgpack (.msgpack: flax.serialization.to_bytes) "
        f", safetensors, Keras weights (.weights.h5, .keras: save_weights / save) or ONNX "
        f"(.onnx); its first bytes are {head[:8]!r}")


def load(path, preset=None, **options) -> Loaded:
    """The file read once, by its format's module: its tensors matched onto ``preset`` (a name
    or a Preset; None: the one the file records, else every preset; ``options`` override the
    preset's), with what the reader noticed (see ``Loaded``). A file this package does not read
    raises WeightsFormatError, its ``format`` the one its first bytes told (None: none)."""
    fmt = detect(path)
    module = _BY_NAME[fmt]
    try:
        if hasattr(module, "load"):
            return module.load(path, preset, **options)
        return by_structure(path, fmt, module.LAYOUT, module.NATURAL, module.read(path), preset,
                            **options)
    except WeightsFormatError as e:
        e.format = fmt
        raise


def read(path) -> Tuple[str, "OrderedDict[str, np.ndarray]"]:
    """(format, name -> array in the file's order); nested trees (Flax) are flattened with
    '/' between the keys, so a path reads ``params/features/conv0/kernel``."""
    fmt = detect(path)
    return fmt, _BY_NAME[fmt].read(path)


def write(path, tensors: Mapping[str, np.ndarray], fmt: str) -> None:
    """Write ``tensors`` (name -> array, names as the format wants them: Flax's with '/'
    between the keys of the tree) as a file of format ``fmt``; written whole or not at all."""
    writer = getattr(_BY_NAME.get(fmt), "write", None)
    if writer is None:
        raise WeightsFormatError(f"unknown format {fmt!r}; formats: {', '.join(FORMATS)}")
    tmp = f"{os.fspath(path)}.tmp"
    try:
        writer(tmp, tensors)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def native(state: Mapping[str, np.ndarray], target: str) -> Tuple[str, "OrderedDict[str, np.ndarray]"]:
    """A canonical state (torchvision's names, PyTorch's layout) as our model in ``target``
    names and lays it out in its own files: (file format, name -> array), by the module of the
    target's format (its ``native``).

    torch: torchvision's names (a torchvision DenseNet loads it too), with the
    ``num_batches_tracked`` counters a state_dict has; mxnet: Gluon's structural names
    (``save_parameters``), BatchNorm's weight and bias as gamma and beta; flax-nnx: the NNX
    model's state as a pure dict, paths with '/', kernels HWIO and [in, out], BatchNorm's
    scale, bias, mean, var; flax-linen: linen's variables, {'params', 'batch_stats'}; keras:
    keras.applications' layer names (``keras_layer_name``), kernels HWIO and [in, out],
    BatchNorm's gamma, beta, moving_mean, moving_variance (``state`` in the canonical order:
    Keras' file numbers each class's layers in the order they come)."""
    if target not in NATIVE:
        raise WeightsFormatError(f"unknown target {target!r}; targets: {', '.join(NATIVE)}")
    home = _NATIVE_HOME[target]
    bn = {k.rsplit(".", 1)[0] for k in state if k.endswith(".running_mean")}
    out = OrderedDict()
    for name, a in state.items():
        module, leaf = name.rsplit(".", 1)
        a = np.ascontiguousarray(np.asarray(a, np.float32))
        out.update(home.native(module, leaf, a, module in bn, target))
    return home.FORMAT, out
