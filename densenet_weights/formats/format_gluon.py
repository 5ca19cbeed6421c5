"""Gluon: a ``.params`` file (``mx.nd.save``, used by ``Block.save_parameters`` and the model
zoo), read and written here with numpy only, so converting a Gluon file needs neither MXNet nor
its environment. Our model's file (--to mxnet) has Gluon's structural names
(``save_parameters``), BatchNorm's weight and bias as gamma and beta.

The format: little-endian; u64 magic 0x112, u64 reserved; u64 count, then each array: u32 magic
(0xF993FAC9, or 0xF993FACA for NumPy-shape semantics), i32 storage type (0 dense), shape (i32
ndim, i64 dims), context (i32 device type, i32 device id), i32 type flag, the data; then u64
count of names, each a u64 length and its bytes. A symbolic checkpoint's names carry 'arg:' /
'aux:' prefixes, which are dropped.
"""
from __future__ import annotations

import struct
from collections import OrderedDict
from typing import Iterator, Mapping, Tuple

import numpy as np

from densenet_weights.formats.common import WeightsFormatError

FORMAT = "gluon"
SUFFIXES = (".params",)
LAYOUT = "torch"
NATURAL = False
NATIVE = ("mxnet",)

_LIST_MAGIC = 0x112
_ARRAY_MAGICS = (0xF993FAC9, 0xF993FACA)
_V1_MAGIC = 0xF993FAC8  # pre-1.0 MXNet: i64 dims without the i32 storage type
#: MXNet's type flags (mshadow): the dtypes a DenseNet's weights come in.
_MX_DTYPES = {0: np.float32, 1: np.float64, 2: np.float16, 3: np.uint8, 4: np.int32,
              5: np.int8, 6: np.int64}
_MX_FLAGS = {np.dtype(v): k for k, v in _MX_DTYPES.items()}


def sniff(head: bytes, path: str) -> bool:
    return len(head) >= 8 and struct.unpack("<Q", head[:8])[0] == _LIST_MAGIC


def read(path) -> "OrderedDict[str, np.ndarray]":
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


def write(path, tensors: Mapping[str, np.ndarray]) -> None:
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


def native(module: str, leaf: str, a: np.ndarray, is_bn: bool,
           target: str) -> Iterator[Tuple[str, np.ndarray]]:
    """Gluon's structural names: a BatchNorm's weight and bias are gamma and beta."""
    yield f"{module}.{ {'weight': 'gamma', 'bias': 'beta'}.get(leaf, leaf) if is_bn else leaf}", a
