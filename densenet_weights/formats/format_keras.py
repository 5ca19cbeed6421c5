"""Keras: a ``.weights.h5`` (Keras 3's ``save_weights``), the model.weights.h5 inside a
``.keras`` archive, or a Keras 2 ``.h5``, read and written with ``h5py``: never Keras' loader,
never the archive's config.json (which may hold code). Our model's file (--to keras) is the
.weights.h5 a keras.applications DenseNet loads with ``load_weights``: its layer names
(``keras_layer_name``), kernels HWIO and [in, out], BatchNorm's gamma, beta, moving_mean,
moving_variance, in the canonical order (Keras' file numbers each class's layers in the order
they come)."""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Dict, Iterator, Mapping, Tuple

import numpy as np

from densenet_weights.formats.common import WeightsFormatError

FORMAT = "keras"
SUFFIXES = (".weights.h5", ".keras", ".h5")
LAYOUT = "flax"
NATURAL = False
NATIVE = ("keras",)
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def sniff(head: bytes, path: str) -> bool:
    """Keras' .weights.h5 (or a Keras 2 .h5), or a .keras archive: a zip with
    model.weights.h5."""
    return head[:8] == _HDF5_MAGIC or (head[:4] == b"PK\x03\x04" and _is_keras_archive(path))


def keras_layer_name(module: str) -> str:
    """A canonical module's name in keras.applications' DenseNets: features.conv0 -> conv1_conv,
    features.denseblock2.denselayer3.norm1 -> conv3_block3_0_bn (conv1 -> _1_conv, norm2 ->
    _1_bn, conv2 -> _2_conv), features.transition1.norm -> pool2_bn, features.norm5 -> bn,
    classifier -> predictions."""
    import re
    if module == "classifier":
        return "predictions"
    short = module[len("features."):]
    if short in ("conv0", "norm0"):
        return {"conv0": "conv1_conv", "norm0": "conv1_bn"}[short]
    m = re.fullmatch(r"denseblock(\d+)\.denselayer(\d+)\.(norm1|conv1|norm2|conv2)", short)
    if m:
        b, j, leaf = int(m.group(1)), int(m.group(2)), m.group(3)
        return f"conv{b + 1}_block{j}_" + {"norm1": "0_bn", "conv1": "1_conv", "norm2": "1_bn",
                                           "conv2": "2_conv"}[leaf]
    m = re.fullmatch(r"transition(\d+)\.(norm|conv)", short)
    if m:
        return f"pool{int(m.group(1)) + 1}_" + {"norm": "bn", "conv": "conv"}[m.group(2)]
    if re.fullmatch(r"norm\d+", short):
        return "bn"
    return module.replace(".", "_")


#: Keras' variables of a layer, in the order the layer creates them (the .weights.h5 numbers
#: them 0, 1, ...), by the layer's class as the file names it (snake case, a counter after).
_KERAS_VARS = {"batch_normalization": ("gamma", "beta", "moving_mean", "moving_variance"),
               "conv2d": ("kernel", "bias"), "dense": ("kernel", "bias")}


def _is_keras_archive(path) -> bool:
    import zipfile
    try:
        with zipfile.ZipFile(path) as z:
            return "model.weights.h5" in z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False


def _h5py():
    try:
        import h5py
    except ImportError:
        raise WeightsFormatError("reading or writing a Keras weights file needs h5py (the main "
                                 "environment: `make env`)") from None
    return h5py


def read(path) -> "OrderedDict[str, np.ndarray]":
    """Keras weights: a ``.weights.h5`` (Keras 3's ``save_weights``: layers/<class>_<n>/vars/<i>,
    the layer's name in the vars group's 'name' attribute), the model.weights.h5 inside a
    ``.keras`` archive (only that member is read: the archive's config.json, which may hold
    code, is never looked at), or a Keras 2 ``.h5`` (layer_names / weight_names attributes).
    Names: '<layer name>/<variable>' ('conv1_bn/moving_variance'), in the file's order of
    layers of each class (its counters; natural order), which is the model's."""
    import io
    import zipfile
    h5py = _h5py()
    path = os.fspath(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                data = z.read("model.weights.h5")
            f = h5py.File(io.BytesIO(data), "r")
        else:
            f = h5py.File(path, "r")
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        raise WeightsFormatError(f"{path}: not a readable Keras weights file ({e})") from None
    with f:
        root = f["model_weights"] if "model_weights" in f else f
        if "layer_names" in root.attrs:
            out = _read_keras2(root)
        else:
            out = OrderedDict()
            _read_keras3(f, "", out)
    if not out:
        raise WeightsFormatError(f"{path}: a HDF5 file with no Keras weights in it (expected "
                                 "layers/<layer>/vars/<i>, or Keras 2's layer_names)")
    return out


def _read_keras3(group, prefix: str, out) -> None:
    import re
    h5py = _h5py()
    natural = (lambda k: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", k)])
    if "vars" in group and isinstance(group["vars"], h5py.Group) and len(group["vars"]):
        vars_ = group["vars"]
        name = vars_.attrs.get("name", None)
        name = name.decode() if isinstance(name, bytes) else name
        cls = re.sub(r"_\d+$", "", group.name.rsplit("/", 1)[-1])
        keys = sorted(vars_.keys(), key=natural)
        arrays = [np.asarray(vars_[k]) for k in keys]
        roles = _KERAS_VARS.get(cls)
        if roles is None or len(roles) < len(arrays):
            roles = _keras_roles(arrays)
        layer = f"{prefix}{name or group.name.rsplit('/', 1)[-1]}"
        for role, a in zip(roles, arrays):
            out[f"{layer}/{role}"] = a
    if "layers" in group:
        sub = group["layers"]
        for k in sorted(sub.keys(), key=natural):
            inner = sub[k]
            nested = "layers" in inner
            vars_name = inner["vars"].attrs.get("name", k) if "vars" in inner else k
            vars_name = vars_name.decode() if isinstance(vars_name, bytes) else vars_name
            _read_keras3(inner, f"{prefix}{vars_name}/" if nested else prefix, out)


def _keras_roles(arrays):
    """A layer's variables by their shapes (a class this reader does not know)."""
    if arrays and np.ndim(arrays[0]) in (2, 4):
        return ("kernel", "bias")[:len(arrays)]
    if len(arrays) == 4 and len({np.shape(a) for a in arrays}) == 1:
        return _KERAS_VARS["batch_normalization"]
    return tuple(f"v{i}" for i in range(len(arrays)))


def _read_keras2(root) -> "OrderedDict[str, np.ndarray]":
    out = OrderedDict()
    for layer in root.attrs["layer_names"]:
        layer = layer.decode() if isinstance(layer, bytes) else layer
        g = root[layer]
        for w in g.attrs.get("weight_names", []):
            w = w.decode() if isinstance(w, bytes) else w
            leaf = w.rsplit("/", 1)[-1].split(":")[0]
            out[f"{layer}/{leaf}"] = np.asarray(g[w])
    return out


def write(path, tensors: Mapping[str, np.ndarray]) -> None:
    """A Keras 3 ``.weights.h5`` of tensors named '<layer>/<variable>' in the model's order:
    each layer's group named by its class and counter as Keras' save_weights names them
    (conv2d, conv2d_1, ..., batch_normalization, ..., dense), its variables numbered in the
    order the layer creates them; what ``model.load_weights`` of a model with these layers, in
    this order, reads."""
    h5py = _h5py()
    layers: "OrderedDict[str, Dict[str, np.ndarray]]" = OrderedDict()
    for name, a in tensors.items():
        layer, leaf = name.rsplit("/", 1)
        layers.setdefault(layer, {})[leaf] = a
    counters: Dict[str, int] = {}
    with h5py.File(os.fspath(path), "w") as f:
        f.create_group("vars")
        top = f.create_group("layers")
        for layer, leaves in layers.items():
            if "moving_mean" in leaves:
                cls = "batch_normalization"
            elif "kernel" in leaves:
                cls = "conv2d" if np.ndim(leaves["kernel"]) == 4 else "dense"
            else:
                raise WeightsFormatError(f"{layer}: not a layer Keras' file knows ({sorted(leaves)})")
            n = counters.get(cls, -1) + 1
            counters[cls] = n
            g = top.create_group(cls if n == 0 else f"{cls}_{n}").create_group("vars")
            g.attrs["name"] = layer
            order = [r for r in _KERAS_VARS[cls] if r in leaves]
            if sorted(order) != sorted(leaves):
                raise WeightsFormatError(f"{layer}: variables {sorted(leaves)}, expected "
                                         f"{list(_KERAS_VARS[cls])}")
            for i, role in enumerate(order):
                g.create_dataset(str(i), data=np.ascontiguousarray(leaves[role]))


def native(module: str, leaf: str, a: np.ndarray, is_bn: bool,
           target: str) -> Iterator[Tuple[str, np.ndarray]]:
    """keras.applications' layer names, kernels HWIO and [in, out], BatchNorm's gamma, beta,
    moving_mean, moving_variance."""
    leaf = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean",
            "running_var": "moving_variance"}[leaf] if is_bn else (
        "kernel" if leaf == "weight" else leaf)
    if leaf == "kernel":
        a = np.ascontiguousarray(a.transpose(2, 3, 1, 0) if a.ndim == 4 else a.T)
    yield f"{keras_layer_name(module)}/{leaf}", a
