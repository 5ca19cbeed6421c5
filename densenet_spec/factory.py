"""A user's own model: importing the factory that builds it."""
from __future__ import annotations

from typing import Optional

from densenet_spec.presets import DenseNetConfigError


def call_factory(factory: str, path: Optional[str] = None):
    """Import 'MODULE:FUNCTION' (from ``path``, else the working directory, first on the
    import path) and return FUNCTION() — the user's model. A clear error for a malformed name,
    a module that is not there, or a missing or non-callable FUNCTION; errors raised by the
    user's own code pass through unchanged."""
    import importlib
    import os
    import sys
    if not isinstance(factory, str) or factory.count(":") != 1 or not all(factory.split(":")):
        raise DenseNetConfigError(f"expected MODULE:FUNCTION (e.g. mymodels:densenet), got {factory!r}")
    module, func = factory.split(":")
    where = os.path.abspath(path or os.getcwd())
    if where not in sys.path:
        sys.path.insert(0, where)
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            raise DenseNetConfigError(f"no module {module!r} importable from {where}") from None
        raise
    fn = getattr(mod, func, None)
    if not callable(fn):
        raise DenseNetConfigError(f"{module} ({mod.__file__}) has no function {func!r}")
    return fn()


