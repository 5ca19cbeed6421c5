"""Where the user's code built each layer: while a user's factory runs, the constructor of every
layer (torch's ``nn.Module``, Gluon's ``Block``, Flax NNX's ``Module``, linen's module
dataclasses, Keras' ``Layer``: each mirror and check subject names its own hooks) records the
first frame of the stack in the user's own files, so that a report can say ``built at
FILE:LINE`` beside the layer it names.

The user's files are every file that is not a framework's or Python's (site-packages, the
standard library, frozen and generated code such as a dataclass's ``__init__``) and not this
project's own packages (``densenet_*``). A layer that this project's own code built (our model,
given back by a user's factory) has no site: the user's line would be the call of our builder,
the same for every layer, and the layer itself is the reference's. A layer a framework's own
builder made (``torchvision.models.densenet121()``, ``keras.applications.DenseNet121()``) has
the line of the user's call of that builder: the first frame in the user's files.

Standard library only: importable from both environments (the Gluon model is built in the
MXNet environment's worker).
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
import sysconfig
import threading
import weakref
from typing import Dict, Iterator, Optional, Sequence, Tuple

#: this project's root: files under ROOT/densenet_* are ours
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: top-level packages whose frames are never the user's, wherever they are installed
LIBRARIES = frozenset({
    "torch", "torchvision", "mxnet", "gluoncv", "flax", "jax", "jaxlib", "optax", "keras",
    "tensorflow", "tf_keras", "numpy", "ml_dtypes", "treescope", "orbax", "chex", "onnx",
    "onnxruntime", "safetensors", "pytest", "_pytest", "pluggy", "importlib", "runpy"})

_lock = threading.RLock()
_THIS = os.path.abspath(__file__)
#: the standard library's folders (and the environment's packages)
_LIBRARY_DIRS = tuple(sorted({os.path.abspath(p) + os.sep for k, p in sysconfig.get_paths().items()
                              if k in ("stdlib", "platstdlib", "purelib", "platlib") and p}))


@functools.lru_cache(maxsize=4096)
def whose(filename: str, module: str = "") -> str:
    """'user', 'ours' (this project's densenet_* packages) or 'library' (a framework's, Python's,
    frozen or generated code) for a frame's file and its module's ``__name__``."""
    if not filename or filename.startswith("<") or module.split(".")[0] in LIBRARIES:
        return "library"
    path = os.path.abspath(filename)
    if path == _THIS:  # a hook's own frame (recordings nest)
        return "library"
    if "site-packages" in path or "dist-packages" in path or path.startswith(_LIBRARY_DIRS) \
            or f"{os.sep}lib{os.sep}python3" in path:  # another environment's standard library
        return "library"
    rel = os.path.relpath(path, ROOT)
    return "ours" if rel.split(os.sep)[0].startswith("densenet_") else "user"


def first_users_frame(frame, obj=None) -> Optional[str]:
    """'FILE:LINE' of the first frame outwards from ``frame`` in the user's files, skipping a
    method of ``obj`` itself (a user's class's ``__init__`` calling ``super().__init__()``: the
    line wanted is where the object was made); None where this project's code comes first."""
    while frame is not None:
        code = frame.f_code
        kind = whose(code.co_filename, frame.f_globals.get("__name__", "") or "")
        if kind == "ours":
            return None
        if kind == "user" and not (obj is not None and code.co_argcount and frame.f_locals.get(
                code.co_varnames[0]) is obj):
            return f"{os.path.abspath(code.co_filename)}:{frame.f_lineno}"
        frame = frame.f_back
    return None


class Sites:
    """What one recording saw: the objects built (kept alive while the record is) -> 'FILE:LINE'
    or None."""

    def __init__(self):
        self._seen: Dict[int, Tuple[object, Optional[str]]] = {}

    def add(self, obj, site: Optional[str], replace: bool = False) -> None:
        if replace or id(obj) not in self._seen:
            self._seen[id(obj)] = (obj, site)

    def of(self, obj) -> Optional[str]:
        """Where ``obj`` was built, or None (not built while recording, or built by our code)."""
        got = self._seen.get(id(obj))
        return got[1] if got is not None and got[0] is obj else None

    def __len__(self):
        return len(self._seen)


#: a hook: (owner, attribute, how). how: 'self' wraps a function called with the new object
#: first (an ``__init__``, linen's ``__post_init__``); 'returns' wraps a callable returning the new
#: object (a metaclass ``__call__``, NNX's); 'copies' wraps a method returning a copy of its
#: object (linen's ``clone``), which keeps the original's site.
Hook = Tuple[object, str, str]


def _wrap(original, how: str, sites: Sites):
    if how == "self":
        def wrapper(self, *args, **kwargs):
            sites.add(self, first_users_frame(sys._getframe(1), self))
            return original(self, *args, **kwargs)
    elif how == "returns":
        def wrapper(*args, **kwargs):
            out = original(*args, **kwargs)
            sites.add(out, first_users_frame(sys._getframe(1), out))
            return out
    elif how == "copies":
        def wrapper(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            if id(self) in sites._seen:
                sites.add(out, sites.of(self), replace=True)
            return out
    else:
        raise ValueError(f"a hook is 'self', 'returns' or 'copies', got {how!r}")
    return functools.wraps(original)(wrapper)


@contextlib.contextmanager
def recording(hooks: Sequence[Hook], sites: Optional[Sites] = None) -> Iterator[Sites]:
    """Record where each object the hooks see is built, for the duration (into ``sites``, to
    go on with an earlier record); every hook is undone after, whatever happens. One recording
    at a time (a lock): objects another thread builds meanwhile are recorded too, and never
    asked for."""
    sites = Sites() if sites is None else sites
    with _lock:
        undo = []
        try:
            for owner, attr, how in hooks:
                own = attr in vars(owner)
                original = getattr(owner, attr)
                setattr(owner, attr, _wrap(original, how, sites))
                undo.append((owner, attr, original if own else None))
            yield sites
        finally:
            for owner, attr, original in reversed(undo):
                if original is None:
                    delattr(owner, attr)
                else:
                    setattr(owner, attr, original)


_remembered: Dict[int, Dict[str, str]] = {}


def remember(model, by_name: Dict[str, str]) -> None:
    """Keep a model's sites (its module name -> 'FILE:LINE') for as long as the model lives."""
    key = id(model)
    _remembered[key] = dict(by_name)
    weakref.finalize(model, _remembered.pop, key, None)


def remembered(model) -> Dict[str, str]:
    """The sites remember() kept for ``model`` ({} if none)."""
    return dict(_remembered.get(id(model), {}))


def shown(site: Optional[str], cwd: Optional[str] = None) -> str:
    """A site as a report shows it: its file relative to the working directory when it is
    under it, else as recorded (absolute)."""
    if not site:
        return ""
    path, _, line = site.rpartition(":")
    cwd = os.path.abspath(cwd or os.getcwd())
    if os.path.abspath(path).startswith(cwd + os.sep):
        path = os.path.relpath(path, cwd)
    return f"{path}:{line}"
