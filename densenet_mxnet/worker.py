"""A persistent worker for the parity suite: ``python -m densenet_mxnet.worker``.

JSON lines on stdin and stdout, one request and one response per line:

    request   {"id": int, "fn": name, "kwargs": {...}, "arrays": path or null}
    response  {"id": int, "ok": true, "result": <JSON>, "arrays": path or null}
              {"id": int, "ok": false, "error_type": str, "error": str, "traceback": str}

Arrays travel as safetensors files: in the request file, key "x" becomes kwargs["x"] and
"state/<name>" becomes kwargs["state"][name] (any "<kwarg>/<name>" alike). The call is
densenet_mxnet.adapter.<fn>(**kwargs); the entries of its result that are dicts of arrays
("arrays", "grads") go to a safetensors file next to the request file ("<entry>/<name>", dtype
kept), whose path the response gives. stdout carries the protocol and nothing
else: everything else (MXNet's logs, warnings, stray prints) goes to stderr. EOF ends the worker.

Objects that are not data (a user's Gluon model, for ``densenet check``) stay in the worker: a
result that JSON cannot carry is kept and sent as ``{"__handle__": n}``, and an argument of
that form is replaced by the object again. The objects live as long as the worker.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback


def _protocol_stdout():
    """Keep the real stdout for the protocol; send fd 1 and sys.stdout to stderr, so that
    nothing else (Python prints, C++ writes to stdout) can break a response line."""
    out = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return out


def _plain(obj):
    """json.dumps default: numpy scalars and arrays, tuples inside results."""
    import numpy as np
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"cannot send {type(obj).__name__} as JSON")


_objects: dict = {}


def _resolve(value):
    """{"__handle__": n} -> the object kept under n."""
    if isinstance(value, dict) and set(value) == {"__handle__"}:
        return _objects[value["__handle__"]]
    return value


def _keep(result):
    """A result JSON cannot carry is kept, and its handle sent instead."""
    if result is None or isinstance(result, (dict, list, tuple, str, int, float, bool)):
        return result
    for n, obj in _objects.items():
        if obj is result:
            return {"__handle__": n}
    n = len(_objects) + 1
    _objects[n] = result
    return {"__handle__": n}


def _handle(req: dict, adapter, scratch: str) -> dict:
    from safetensors.numpy import load_file, save_file

    from densenet_weights.files import ORDER, array_order, split_arrays

    fn = req.get("fn")
    if not isinstance(fn, str) or fn.startswith("_") or not callable(getattr(adapter, fn, None)):
        raise AttributeError(f"densenet_mxnet.adapter has no function {fn!r}")
    kwargs = dict(req.get("kwargs") or {})
    if req.get("arrays"):
        for key, value in load_file(req["arrays"]).items():
            if "/" in key:
                group, name = key.split("/", 1)
                kwargs.setdefault(group, {})[name] = value
            else:
                kwargs[key] = value
    result = _keep(getattr(adapter, fn)(**{k: _resolve(v) for k, v in kwargs.items()}))
    path = None
    packed = split_arrays(result) if isinstance(result, dict) else {}
    if packed:
        sent = {n.split("/", 1)[0] for n in packed}
        result = {k: v for k, v in result.items() if k not in sent}
        result[ORDER] = array_order(packed)
        folder = os.path.dirname(req["arrays"]) if req.get("arrays") else scratch
        path = os.path.join(folder, f"resp{req.get('id')}.safetensors")
        save_file(packed, path)
    return {"id": req.get("id"), "ok": True, "result": result, "arrays": path}


def main() -> None:
    out = _protocol_stdout()
    from densenet_mxnet import adapter  # imports MXNet, after stdout is safe
    with tempfile.TemporaryDirectory(prefix="densenet-mxnet-worker-") as scratch:
        for line in sys.stdin:
            if not line.strip():
                continue
            req = {}
            try:
                req = json.loads(line)
                resp = _handle(req, adapter, scratch)
                text = json.dumps(resp, default=_plain)
            except Exception as e:  # noqa: BLE001 - every failure goes back to the caller
                text = json.dumps({"id": req.get("id") if isinstance(req, dict) else None,
                                   "ok": False, "error_type": type(e).__name__, "error": str(e),
                                   "traceback": traceback.format_exc()})
            out.write(text + "\n")
            out.flush()


if __name__ == "__main__":
    main()
