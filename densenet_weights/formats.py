"""Every framework's weights file, read and written as a flat, ordered mapping name -> numpy
array in the framework's own names and layout (no renaming here: ``match`` maps foreign names
onto canonical ones).

| format       | files                      | read with                                       |
| ------------ | -------------------------- | ----------------------------------------------- |
| torch        | .pt .pth .bin (state_dict) | ``torch.load(weights_only=True)``: no code runs  |
| gluon        | .params (NDArray list)     | this module, numpy only (MXNet's binary format)  |
| flax         | .msgpack                   | ``flax.serialization.msgpack_restore``           |
| safetensors  | .safetensors               | ``safetensors.numpy``                            |

The format is told by the file's first bytes, not its name; a file that is none of these is a
clear error naming what was expected. Frameworks are imported only for their own format, so
converting a Gluon file needs neither MXNet nor its environment.

Gluon's ``.params`` format (``mx.nd.save``, used by ``Block.save_parameters`` and the model
zoo): little-endian; u64 magic 0x112, u64 reserved; u64 count, then each array: u32 magic
(0xF993FAC9, or 0xF993FACA for NumPy-shape semantics), i32 storage type (0 dense), shape (i32
ndim, i64 dims), context (i32 device type, i32 device id), i32 type flag, the data; then u64
count of names, each a u64 length and its bytes. A symbolic checkpoint's names carry 'arg:' /
'aux:' prefixes, which are dropped.
"""
from __future__ import annotations

import os
import struct
from collections import OrderedDict
from typing import Dict, Mapping, Tuple

import numpy as np

FORMATS = ("torch", "gluon", "flax", "safetensors")
#: What ``native`` names: our models' own files in each framework.
NATIVE = ("canonical", "torch", "mxnet", "flax-nnx", "flax-linen")
SUFFIXES = {"torch": (".pt", ".pth", ".bin"), "gluon": (".params",), "flax": (".msgpack",),
            "safetensors": (".safetensors",)}

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
    raise WeightsFormatError(
        f"{path}: not a weights file this project reads; expected a PyTorch state_dict "
        f"({', '.join(SUFFIXES['torch'])}: torch.save), Gluon parameters (.params: "
        f"save_parameters / mx.nd.save), Flax msgpack (.msgpack: flax.serialization.to_bytes) "
        f"or safetensors; its first bytes are {head[:8]!r}")


def read(path) -> Tuple[str, "OrderedDict[str, np.ndarray]"]:
    """(format, name -> array in the file's order); nested trees (Flax) are flattened with
    '/' between the keys, so a path reads ``params/features/conv0/kernel``."""
    fmt = detect(path)
    reader = {"torch": read_torch, "gluon": read_gluon, "flax": read_flax,
              "safetensors": read_safetensors}[fmt]
    return fmt, reader(path)


def write(path, tensors: Mapping[str, np.ndarray], fmt: str) -> None:
    """Write ``tensors`` (name -> array, names as the format wants them: Flax's with '/'
    between the keys of the tree) as a file of format ``fmt``; written whole or not at all."""
    writer = {"torch": write_torch, "gluon": write_gluon, "flax": write_flax,
              "safetensors": write_safetensors}.get(fmt)
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
    scale, bias, mean, var; flax-linen: linen's variables, {'params', 'batch_stats'}."""
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
    fmt = {"canonical": "safetensors", "torch": "torch", "mxnet": "gluon"}.get(target, "flax")
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
