"""Every framework's weights file, read and written as a flat, ordered mapping name -> numpy
array in the framework's own names and layout (no renaming here: ``match`` maps foreign names
onto canonical ones).

| format       | files                      | read with                                       |
| ------------ | -------------------------- | ----------------------------------------------- |
| torch        | .pt .pth .bin (state_dict) | ``torch.load(weights_only=True)``: no code runs  |
| gluon        | .params (NDArray list)     | this module, numpy only (MXNet's binary format)  |
| flax         | .msgpack                   | ``flax.serialization.msgpack_restore``           |
| safetensors  | .safetensors               | ``safetensors.numpy``                            |
| onnx         | .onnx (+ external data)    | ``onnx.load``: the graph gives each initializer  |
|              |                            | its role (Conv, BatchNormalization, Gemm inputs) |
| keras        | .weights.h5, .keras, .h5   | ``h5py`` (a .keras zip's model.weights.h5): never |
|              |                            | Keras' loader, never the archive's config.json   |

The format is told by the file's first bytes, not its name; a file that is none of these is a
clear error naming what was expected. Frameworks are imported only for their own format, so
converting a Gluon file needs neither MXNet nor its environment.

ONNX files hold a graph, not a state_dict: an initializer's name may be anything (torch.onnx
keeps the state_dict's names; an exporter that folded or deduplicated tensors writes
``onnx::Conv_238`` or ``val_170``, and one tensor may feed several nodes). So the *graph* says
what each initializer is: the weights of every Conv, BatchNormalization and Gemm (or MatMul +
Add) node, in the graph's (topological) order, each named ``<module>.<role>`` with the node's
module (the initializers' common prefix, torch.onnx's name scope, or the node's name) and the
role its input position gives it; Gemm and MatMul weights come out [out, in]. ``onnx_layers``
returns the nodes with their attributes (BatchNormalization's epsilon and momentum).
External data files (torch.onnx writes ``model.onnx.data`` beside ``model.onnx``) are read from
the file's folder.

Gluon's ``.params`` format (``mx.nd.save``, used by ``Block.save_parameters`` and the model
zoo): little-endian; u64 magic 0x112, u64 reserved; u64 count, then each array: u32 magic
(0xF993FAC9, or 0xF993FACA for NumPy-shape semantics), i32 storage type (0 dense), shape (i32
ndim, i64 dims), context (i32 device type, i32 device id), i32 type flag, the data; then u64
count of names, each a u64 length and its bytes. A symbolic checkpoint's names carry 'arg:' /
'aux:' prefixes, which are dropped.
"""
from __future__ import annotations

import dataclasses
import os
import struct
from collections import OrderedDict
from typing import Dict, List, Mapping, Tuple

import numpy as np

FORMATS = ("torch", "gluon", "flax", "safetensors", "keras", "onnx")
#: What ``native`` names: our models' own files in each framework (keras: the .weights.h5 a
#: keras.applications DenseNet loads with ``load_weights``).
NATIVE = ("canonical", "torch", "mxnet", "flax-nnx", "flax-linen", "keras")
SUFFIXES = {"torch": (".pt", ".pth", ".bin"), "gluon": (".params",), "flax": (".msgpack",),
            "safetensors": (".safetensors",), "keras": (".weights.h5", ".keras", ".h5"),
            "onnx": (".onnx",)}
#: Each format's layout: "torch" (OIHW, dense [out, in]) or "flax" (HWIO, dense [in, out]).
LAYOUTS = {"torch": "torch", "gluon": "torch", "flax": "flax", "safetensors": "torch",
           "keras": "flax", "onnx": "torch"}
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"

_LIST_MAGIC = 0x112
_ARRAY_MAGICS = (0xF993FAC9, 0xF993FACA)
_V1_MAGIC = 0xF993FAC8  # pre-1.0 MXNet: i64 dims without the i32 storage type
#: MXNet's type flags (mshadow): the dtypes a DenseNet's weights come in.
_MX_DTYPES = {0: np.float32, 1: np.float64, 2: np.float16, 3: np.uint8, 4: np.int32,
              5: np.int8, 6: np.int64}
_MX_FLAGS = {np.dtype(v): k for k, v in _MX_DTYPES.items()}


class WeightsFormatError(ValueError):
    """A file that is not a weights file this project reads (or a damaged one)."""


def detect(path) -> str:
    """The file's format, from its first bytes (and, for safetensors, its JSON header)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:8] == _HDF5_MAGIC:
        return "keras"  # Keras' .weights.h5 (or a Keras 2 .h5)
    if head[:4] == b"PK\x03\x04" and _is_keras_archive(path):
        return "keras"  # a .keras archive: a zip with model.weights.h5
    if head[:4] == b"PK\x03\x04" or head[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04"):
        return "torch"  # torch.save's zip archive, or the legacy pickle format
    if len(head) >= 8 and struct.unpack("<Q", head[:8])[0] == _LIST_MAGIC:
        return "gluon"
    if len(head) >= 9 and head[8:9] == b"{":
        n = struct.unpack("<Q", head[:8])[0]
        if 0 < n < os.path.getsize(path):
            return "safetensors"
    if head[:1] and (0x80 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF)):
        return "flax"  # a msgpack map (flax.serialization.to_bytes of a dict)
    if _looks_onnx(head):
        return "onnx"
    raise WeightsFormatError(
        f"{path}: not a weights file this project reads; expected a PyTorch state_dict "
        f"({', '.join(SUFFIXES['torch'])}: torch.save), Gluon parameters (.params: "
        f"save_parameters / mx.nd.save), Flax msgpack (.msgpack: flax.serialization.to_bytes) "
        f", safetensors, Keras weights (.weights.h5, .keras: save_weights / save) or ONNX "
        f"(.onnx); its first bytes are {head[:8]!r}")


def read(path) -> Tuple[str, "OrderedDict[str, np.ndarray]"]:
    """(format, name -> array in the file's order); nested trees (Flax) are flattened with
    '/' between the keys, so a path reads ``params/features/conv0/kernel``."""
    fmt = detect(path)
    reader = {"torch": read_torch, "gluon": read_gluon, "flax": read_flax,
              "safetensors": read_safetensors, "keras": read_keras, "onnx": read_onnx}[fmt]
    return fmt, reader(path)


def write(path, tensors: Mapping[str, np.ndarray], fmt: str) -> None:
    """Write ``tensors`` (name -> array, names as the format wants them: Flax's with '/'
    between the keys of the tree) as a file of format ``fmt``; written whole or not at all."""
    writer = {"torch": write_torch, "gluon": write_gluon, "flax": write_flax,
              "safetensors": write_safetensors, "keras": write_keras}.get(fmt)
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
    names and lays it out in its own files: (file format, name -> array).

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
    bn = {k.rsplit(".", 1)[0] for k in state if k.endswith(".running_mean")}
    out = OrderedDict()
    for name, a in state.items():
        module, leaf = name.rsplit(".", 1)
        a = np.ascontiguousarray(np.asarray(a, np.float32))
        if target in ("canonical", "torch"):
            out[name] = a
            if target == "torch" and leaf == "running_var":
                out[f"{module}.num_batches_tracked"] = np.array(0, np.int64)
        elif target == "keras":
            leaf = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean",
                    "running_var": "moving_variance"}[leaf] if module in bn else (
                "kernel" if leaf == "weight" else leaf)
            if leaf == "kernel":
                a = np.ascontiguousarray(a.transpose(2, 3, 1, 0) if a.ndim == 4 else a.T)
            out[f"{keras_layer_name(module)}/{leaf}"] = a
        elif target == "mxnet":
            out[f"{module}.{ {'weight': 'gamma', 'bias': 'beta'}.get(leaf, leaf) if module in bn else leaf}"] = a
        else:
            if module in bn:
                leaf = {"weight": "scale", "running_mean": "mean", "running_var": "var"}.get(leaf, leaf)
            elif leaf == "weight":
                leaf, a = "kernel", np.ascontiguousarray(a.transpose(2, 3, 1, 0) if a.ndim == 4 else a.T)
            path = module.replace(".", "/") + "/" + leaf
            if target == "flax-linen":
                path = ("batch_stats/" if leaf in ("mean", "var") else "params/") + path
            out[path] = a
    fmt = {"canonical": "safetensors", "torch": "torch", "mxnet": "gluon",
           "keras": "keras"}.get(target, "flax")
    return fmt, out


# --------------------------------------------------------------------------- PyTorch

def read_torch(path) -> "OrderedDict[str, np.ndarray]":
    """A state_dict saved with torch.save (a checkpoint's 'state_dict' / 'model' entry too),
    read with ``torch.load(weights_only=True)``: tensors and containers only, never code."""
    try:
        import torch
    except ImportError:
        raise WeightsFormatError("reading a PyTorch file needs torch (the main environment: "
                                 "`make env`)") from None
    try:
        obj = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle with anything but tensors and containers is refused
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        why = next((ln for ln in lines if ln.startswith("WeightsUnpickler error")),
                   lines[0] if lines else "")
        raise WeightsFormatError(
            f"{path}: refused: torch.load(weights_only=True) cannot read it ({why}). Only plain "
            "state_dicts are accepted; arbitrary pickles are never unpickled") from None
    for key in ("state_dict", "model", "model_state_dict", "net"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(hasattr(v, "shape") for v in obj.values()):
        raise WeightsFormatError(f"{path}: not a state_dict (a mapping of names to tensors)")
    out = OrderedDict()
    for k, v in obj.items():
        k = k[len("module."):] if k.startswith("module.") else k  # DataParallel's prefix
        v = v.detach().cpu()
        out[k] = v.numpy() if v.dtype != torch.bfloat16 else v.float().numpy()
    return out


def write_torch(path, tensors: Mapping[str, np.ndarray]) -> None:
    import torch
    torch.save(OrderedDict((k, torch.from_numpy(np.ascontiguousarray(v)))
                           for k, v in tensors.items()), path)


# --------------------------------------------------------------------------- Gluon

def read_gluon(path) -> "OrderedDict[str, np.ndarray]":
    with open(path, "rb") as f:
        buf = f.read()
    try:
        return _parse_ndarray_list(buf)
    except (struct.error, ValueError, IndexError) as e:
        raise WeightsFormatError(f"{path}: a damaged or truncated Gluon .params file ({e})") from None


def _parse_ndarray_list(buf: bytes) -> "OrderedDict[str, np.ndarray]":
    pos = 0

    def take(fmt):
        nonlocal pos
        vals = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return vals if len(vals) > 1 else vals[0]

    magic, _reserved = take("<QQ")
    if magic != _LIST_MAGIC:
        raise ValueError(f"magic {magic:#x}, expected {_LIST_MAGIC:#x}")
    arrays = []
    for _ in range(take("<Q")):
        amagic = take("<I")
        if amagic in _ARRAY_MAGICS:
            stype = take("<i")
            if stype != 0:
                raise ValueError(f"array {len(arrays)} is sparse (storage type {stype}); "
                                 "DenseNet weights are dense")
            ndim = take("<i")
            shape = take(f"<{ndim}q") if ndim > 0 else ()
        elif amagic == _V1_MAGIC:
            ndim = take("<I")
            shape = take(f"<{ndim}q") if ndim > 0 else ()
        else:
            ndim = amagic  # the oldest format: no magic, u32 ndim, u32 dims
            shape = take(f"<{ndim}I") if ndim > 0 else ()
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if ndim <= 0:
            arrays.append(np.zeros((0,), np.float32))
            continue
        take("<ii")  # context: device type and id (the data is on the host either way)
        flag = take("<i")
        if flag not in _MX_DTYPES:
            raise ValueError(f"array {len(arrays)} has MXNet type flag {flag}")
        dtype = np.dtype(_MX_DTYPES[flag])
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        arrays.append(np.frombuffer(buf, dtype.newbyteorder("<"), count=n // dtype.itemsize,
                                    offset=pos).reshape(shape).astype(dtype))
        pos += n
    names = []
    for _ in range(take("<Q")):
        length = take("<Q")
        names.append(buf[pos:pos + length].decode("utf-8"))
        pos += length
    if len(names) != len(arrays):
        raise ValueError(f"{len(arrays)} arrays but {len(names)} names")
    out = OrderedDict()
    for name, a in zip(names, arrays):
        out[name.split(":", 1)[1] if name.startswith(("arg:", "aux:")) else name] = a
    return out


def write_gluon(path, tensors: Mapping[str, np.ndarray]) -> None:
    """``mx.nd.save`` of the arrays under these names (what Block.load_parameters reads)."""
    parts = [struct.pack("<QQQ", _LIST_MAGIC, 0, len(tensors))]
    for name, a in tensors.items():
        a = np.ascontiguousarray(a)
        if a.dtype not in _MX_FLAGS:
            raise WeightsFormatError(f"{name}: MXNet has no type for {a.dtype}")
        parts.append(struct.pack("<Iii", _ARRAY_MAGICS[0], 0, a.ndim))
        parts.append(struct.pack(f"<{a.ndim}q", *a.shape))
        parts.append(struct.pack("<iii", 1, 0, _MX_FLAGS[a.dtype]))  # cpu(0)
        parts.append(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())
    parts.append(struct.pack("<Q", len(tensors)))
    for name in tensors:
        raw = name.encode("utf-8")
        parts.append(struct.pack("<Q", len(raw)) + raw)
    with open(path, "wb") as f:
        f.write(b"".join(parts))


# --------------------------------------------------------------------------- Flax

def read_flax(path) -> "OrderedDict[str, np.ndarray]":
    try:
        from flax import serialization
    except ImportError:
        raise WeightsFormatError("reading a Flax msgpack file needs flax (the main environment: "
                                 "`make env`)") from None
    with open(path, "rb") as f:
        try:
            tree = serialization.msgpack_restore(f.read())
        except Exception as e:  # noqa: BLE001 - msgpack raises several types for bad bytes
            raise WeightsFormatError(f"{path}: not a Flax msgpack file ({e})") from None
    if not isinstance(tree, dict):
        raise WeightsFormatError(f"{path}: a msgpack file that is not a tree of arrays")
    return flatten(tree)


def write_flax(path, tensors: Mapping[str, np.ndarray]) -> None:
    from flax import serialization
    with open(path, "wb") as f:
        f.write(serialization.msgpack_serialize(unflatten(tensors)))


def flatten(tree, prefix: str = "") -> "OrderedDict[str, np.ndarray]":
    """A nested dict of arrays -> 'a/b/c' -> array, in the tree's order."""
    out = OrderedDict()
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        elif hasattr(v, "shape"):
            out[key] = np.asarray(v)
        else:
            raise WeightsFormatError(f"{key}: not an array ({type(v).__name__})")
    return out


def unflatten(tensors: Mapping[str, np.ndarray]) -> Dict[str, object]:
    tree: Dict[str, object] = {}
    for key, a in tensors.items():
        node = tree
        *path, leaf = key.split("/")
        for p in path:
            node = node.setdefault(p, {})  # type: ignore[assignment]
        node[leaf] = np.ascontiguousarray(a)
    return tree


# --------------------------------------------------------------------------- safetensors

def read_safetensors(path) -> "OrderedDict[str, np.ndarray]":
    from safetensors import safe_open
    try:
        with safe_open(os.fspath(path), framework="numpy") as f:
            return OrderedDict((k, f.get_tensor(k)) for k in f.keys())
    except Exception as e:  # safetensors raises its own types for a bad file
        raise WeightsFormatError(f"{path}: not a readable safetensors file ({e})") from None


def write_safetensors(path, tensors: Mapping[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path)


# --------------------------------------------------------------------------- ONNX

#: ModelProto's fields as protobuf tags (field number << 3 | wire type): ir_version (1, a
#: varint) comes first in every writer's output, then producer_name (2), producer_version (3),
#: domain (4), model_version (5), doc_string (6), graph (7), opset_import (8), metadata (14).
_ONNX_NEXT_TAGS = (0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72)
#: An operator's inputs that are weights, by position, and the role each is.
ONNX_WEIGHT_INPUTS = {
    "Conv": {1: "weight", 2: "bias"}, "FusedConv": {1: "weight", 2: "bias"},
    "BatchNormalization": {1: "weight", 2: "bias", 3: "running_mean", 4: "running_var"},
    "Gemm": {1: "weight", 2: "bias"}, "MatMul": {1: "weight"}}
#: ONNX's defaults for BatchNormalization's attributes (the operator's specification).
ONNX_BN_DEFAULTS = {"epsilon": 1e-5, "momentum": 0.9}
_ONNX_LEAVES = ("weight", "bias", "running_mean", "running_var", "kernel", "gamma", "beta",
                "moving_mean", "moving_var", "scale", "mean", "var")


def _looks_onnx(head: bytes) -> bool:
    """A serialized ModelProto: tag 0x08 (ir_version), a small varint, then another field."""
    return len(head) >= 3 and head[0] == 0x08 and 1 <= head[1] <= 0x7F and (
        head[2] in _ONNX_NEXT_TAGS)


@dataclasses.dataclass
class OnnxLayer:
    """One weight-carrying node of an ONNX graph: the node's name and operator, the module name
    its weights get, role -> (initializer name, array: PyTorch's layout), its attributes, the
    graph value it outputs (a BatchNormalization's or Conv's output, Gemm's logits) and what
    feeds it."""
    node: str
    op: str
    module: str
    tensors: "OrderedDict[str, Tuple[str, np.ndarray]]"
    attributes: Dict[str, object]
    output: str
    inputs: Tuple[str, ...]


def _onnx_model(path):
    try:
        import onnx
    except ImportError:
        raise WeightsFormatError("reading an ONNX file needs the onnx package (the main "
                                 "environment's onnx extra: `make env`)") from None
    path = os.fspath(path)
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise WeightsFormatError(f"{path}: not a readable ONNX model ({e})") from None
    folder = os.path.dirname(os.path.abspath(path))
    files = sorted({kv.value for t in model.graph.initializer for kv in t.external_data
                    if kv.key == "location"})
    for f in files:
        target = os.path.normpath(os.path.join(folder, f))
        if os.path.isabs(f) or not target.startswith(folder + os.sep):
            raise WeightsFormatError(f"{path}: refused: its external data {f!r} lies outside "
                                     "the model's folder")
        if not os.path.exists(target):
            raise WeightsFormatError(f"{path}: its weights are in the external data file {f!r}, "
                                     f"which is not in {folder} (keep it beside the .onnx file)")
    if files:
        try:
            onnx.load_external_data_for_model(model, folder)
        except Exception as e:  # noqa: BLE001 - a truncated or damaged data file
            raise WeightsFormatError(f"{path}: its external data ({', '.join(files)}) cannot be "
                                     f"read ({e})") from None
    return model, files


def _onnx_attrs(node) -> Dict[str, object]:
    from onnx import helper
    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def _module_of(node, index: int, names: List[str], used: set) -> str:
    """The module a node's weights belong to: the common module of its initializers' names
    (``features.conv0.weight`` -> ``features.conv0``), else torch.onnx's name scope, else the
    node's name (``/features/conv0/Conv`` -> ``features.conv0``), unique in the graph."""
    candidates = []
    mods = {n.rsplit(".", 1)[0] for n in names if "." in n and n.rsplit(".", 1)[1] in _ONNX_LEAVES}
    if len(mods) == 1 and all("." in n and n.rsplit(".", 1)[1] in _ONNX_LEAVES for n in names):
        candidates.append(mods.pop())
    meta = {p.key: p.value for p in node.metadata_props}
    scopes = meta.get("pkg.torch.onnx.name_scopes")
    if scopes:
        import ast
        try:
            parts = ast.literal_eval(scopes)
            if isinstance(parts, list) and len(parts) >= 2 and parts[-2]:
                candidates.append(str(parts[-2]))
        except (ValueError, SyntaxError):
            pass
    if node.name.startswith("/") and node.name.count("/") >= 2:
        candidates.append(".".join(node.name.strip("/").split("/")[:-1]))
    candidates.append(node.name or f"{node.op_type}_{index}")
    for c in candidates:
        if c and c not in used:
            return c
    return f"{candidates[-1]}_{index}"


def onnx_layers(path) -> Tuple[List[OnnxLayer], Dict[str, object]]:
    """The weight-carrying nodes of an ONNX model in the graph's order, and what the file says
    about itself: producer, opset, external data files, the operators it uses (op -> count), its
    input's name and shape, its output's name."""
    from onnx import numpy_helper
    model, files = _onnx_model(path)
    g = model.graph
    consts: Dict[str, Tuple[str, np.ndarray]] = {
        t.name: (t.name, np.array(numpy_helper.to_array(t))) for t in g.initializer}
    for node in g.node:  # Constant nodes and Identity of a constant are constants too
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    consts[node.output[0]] = (node.output[0], np.array(numpy_helper.to_array(a.t)))
        elif node.op_type == "Identity" and node.input and node.input[0] in consts:
            consts[node.output[0]] = consts[node.input[0]]
    consumers: Dict[str, list] = {}
    for node in g.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    layers: List[OnnxLayer] = []
    used: set = set()
    for index, node in enumerate(g.node):
        roles = ONNX_WEIGHT_INPUTS.get(node.op_type)
        if roles is None or node.input[:1] == [] or node.input[0] in consts:
            continue
        tensors: "OrderedDict[str, Tuple[str, np.ndarray]]" = OrderedDict()
        for pos, role in roles.items():
            if pos < len(node.input) and node.input[pos] in consts:
                name, a = consts[node.input[pos]]
                tensors[role] = (name, np.asarray(a))
        if "weight" not in tensors:
            continue
        attrs = _onnx_attrs(node)
        output = node.output[0]
        if node.op_type in ("Gemm", "MatMul"):
            name, w = tensors["weight"]
            if w.ndim != 2 or attrs.get("transA", 0):
                continue
            w = w if node.op_type == "Gemm" and attrs.get("transB", 0) else w.T
            tensors["weight"] = (name, np.ascontiguousarray(w * attrs.get("alpha", 1.0)
                                                            if attrs.get("alpha", 1.0) != 1.0 else w))
            if "bias" in tensors and attrs.get("beta", 1.0) != 1.0:
                tensors["bias"] = (tensors["bias"][0], tensors["bias"][1] * attrs["beta"])
            nxt = consumers.get(output, [])
            if node.op_type == "MatMul" and len(nxt) == 1 and nxt[0].op_type == "Add":
                other = [i for i in nxt[0].input if i != output]
                if other and other[0] in consts:
                    tensors["bias"] = consts[other[0]]
                    output = nxt[0].output[0]
        if node.op_type == "BatchNormalization":
            for k, v in ONNX_BN_DEFAULTS.items():
                attrs.setdefault(k, v)
        module = _module_of(node, index, [n for n, _ in tensors.values()], used)
        used.add(module)
        layers.append(OnnxLayer(node.name or f"{node.op_type}_{index}", node.op_type, module,
                                tensors, attrs, output, tuple(node.input)))
    ops: Dict[str, int] = {}
    for node in g.node:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        ops[key] = ops.get(key, 0) + 1
    inputs = [i for i in g.input if i.name not in consts]
    shape = []
    if inputs:
        for d in inputs[0].type.tensor_type.shape.dim:
            shape.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?"))
    info = {"producer": f"{model.producer_name} {model.producer_version}".strip(),
            "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
            "external_data": files, "ops": ops,
            "input": inputs[0].name if inputs else "", "input_shape": shape,
            "outputs": [o.name for o in g.output],
            "metadata": {p.key: p.value for p in model.metadata_props}}
    return layers, info


def read_onnx(path) -> "OrderedDict[str, np.ndarray]":
    """An ONNX model's weights, ``<module>.<role>`` -> array (PyTorch's layout), in the graph's
    order (see ``onnx_layers``)."""
    layers, _ = onnx_layers(path)
    if not layers:
        raise WeightsFormatError(f"{path}: an ONNX model without Conv, BatchNormalization or "
                                 "Gemm weights (not a DenseNet)")
    return OrderedDict((f"{layer.module}.{role}", a) for layer in layers
                       for role, (_, a) in layer.tensors.items())


#: BatchNorms an exporter can fold into the convolution right before them (conv -> BN with
#: nothing between): the ImageNet stem's norm0 and a bottleneck layer's norm2. Every other
#: BatchNorm of a DenseNet follows a concatenation or a pooling.
FOLDABLE = (".norm0", ".norm2")


def _layer_kind(layer: OnnxLayer) -> str:
    if layer.op == "BatchNormalization":
        return "bn"
    return "conv" if layer.tensors["weight"][1].ndim == 4 else "dense"


def unfold_batchnorm(config, layers: List[OnnxLayer]):
    """The ONNX layers as ``match.Layer``s against preset ``config``, with every BatchNorm an
    exporter folded into the convolution before it (where the preset has conv -> BatchNorm, the
    graph's conv feeds no BatchNormalization; its bias, if any, is the folded shift: an optimizer
    drops a zero one) put back as an identity BatchNorm in eval mode. A Conv or Gemm without a
    bias where the preset has one gets a zero bias, and a zero bias where it has none is dropped
    (the same function in ONNX: optimizers drop zero biases) (scale 1, mean 0, variance 1 - eps, and the folded bias as its shift when the preset's
    convolution has none): the same function, so the weights load into our model and compute
    what the file computes. Returns (layers, the canonical names of the folded BatchNorms)."""
    from densenet_weights import match as matching
    ref = matching.canonical_layers(config)
    out, folded, j = [], [], 0
    eps = ONNX_BN_DEFAULTS["epsilon"]
    for i, r in enumerate(ref):
        g = layers[j] if j < len(layers) else None
        prev = out[-1] if out else None
        last = layers[j - 1] if j else None  # the ONNX node behind ``prev``
        if (r.kind == "bn" and r.name.endswith(FOLDABLE) and prev is not None
                and prev.kind == "conv"
                and (g is None or _layer_kind(g) != "bn" or g.inputs[0] != last.output)):
            c = r.shapes()["weight"][0]
            bias = np.zeros(c, np.float32)
            if ("bias" in prev.tensors and "bias" not in ref[i - 1].tensors
                    and prev.shapes()["weight"][0] == c):
                bias = np.asarray(prev.tensors.pop("bias")[1], np.float32)
            name = f"{r.name} (folded into {prev.name})"
            out.append(matching.Layer("bn", name, OrderedDict([
                ("weight", (f"{name}.weight", np.ones(c, np.float32))),
                ("bias", (f"{name}.bias", bias)),
                ("running_mean", (f"{name}.running_mean", np.zeros(c, np.float32))),
                ("running_var", (f"{name}.running_var", np.full(c, 1 - eps, np.float32)))])))
            folded.append(r.name)
            continue
        if g is None:
            break
        tensors = OrderedDict((role, (f"{g.module}.{role}", a)) for role, (_, a) in g.tensors.items())
        if _layer_kind(g) == r.kind != "bn":  # in ONNX no bias is a zero bias: exact either way
            w = tensors["weight"][1]
            if "bias" in r.tensors and "bias" not in tensors:
                tensors["bias"] = (f"{g.module}.bias", np.zeros(w.shape[0], w.dtype))
            elif "bias" not in r.tensors and "bias" in tensors and not np.any(tensors["bias"][1]):
                del tensors["bias"]
        out.append(matching.Layer(_layer_kind(g), g.module, tensors))
        j += 1
    for g in layers[j:]:
        out.append(matching.Layer(_layer_kind(g), g.module, OrderedDict(
            (role, (f"{g.module}.{role}", a)) for role, (_, a) in g.tensors.items())))
    return out, folded


def match_onnx(layers: List[OnnxLayer], preset=None, **options):
    """Match an ONNX model's layers (``onnx_layers``) onto ``preset`` (None: every preset, with
    the input channels and classes the model shows, and conv biases or none), folded
    BatchNorms put back (``unfold_batchnorm``). Returns (match.Match, folded BatchNorms, the
    layers matched): the full match with the fewest folded BatchNorms, else the closest."""
    import densenet_spec as spec
    from densenet_weights import match as matching
    convs = [g for g in layers if _layer_kind(g) == "conv"]
    dense = [g for g in layers if _layer_kind(g) == "dense"]
    seen: Dict[str, object] = {}
    if convs:
        seen["in_channels"] = int(convs[0].tensors["weight"][1].shape[1])
        if dense:
            seen["num_classes"] = int(dense[-1].tensors["weight"][1].shape[0])
    elif dense:  # Gemm layers only: an MLP DenseNet
        seen["in_features"] = int(dense[0].tensors["weight"][1].shape[1])
        seen["num_outputs"] = int(dense[-1].tensors["weight"][1].shape[0])
    seen.update(options)
    names = [preset] if preset is not None else spec.preset_names("conv" if convs else "mlp")
    best, best_folded, best_layers = None, [], []
    for name in names:
        default = getattr(spec.get_preset(name), "conv_bias", None)  # the MLP family: none
        biases = ([options["conv_bias"]] if "conv_bias" in options else
                  [None] if default is None else [default, not default])
        for bias in biases:  # the preset's own first: a zero bias matches either
            try:
                p = spec.make_config(name, **dict(seen if preset is None else options,
                                                  **({} if bias is None else {"conv_bias": bias})))
            except spec.DenseNetConfigError:
                if preset is not None and "conv_bias" in options:
                    raise
                continue
            mine, folded = unfold_batchnorm(p, layers)
            m = matching.match_layers(p, mine)
            if m.ok and (best is None or not best.ok or len(folded) < len(best_folded)):
                best, best_folded, best_layers = m, folded, mine
            elif best is None or (not best.ok and m.matched_layers > best.matched_layers):
                best, best_folded, best_layers = m, folded, mine
    return best, best_folded, best_layers


def onnx_preset(info: Dict[str, object]):
    """The preset our exports record in their metadata (``densenet_suite.preset``), or None."""
    import json

    import densenet_spec as spec
    raw = info.get("metadata", {}).get("densenet_suite.preset")
    if not raw:
        return None
    try:
        return spec.validate(spec.Preset.from_dict(json.loads(raw)))
    except (TypeError, ValueError, KeyError):
        return None

# --------------------------------------------------------------------------- Keras

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


def read_keras(path) -> "OrderedDict[str, np.ndarray]":
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


def write_keras(path, tensors: Mapping[str, np.ndarray]) -> None:
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
