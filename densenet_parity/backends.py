"""The backend registry: one small adapter interface over every backend.

Each backend package has an ``adapter`` module with the same functions (describe, input_error,
layer_error, book_examples, forward, gradients, train_step, init_state, ...). Torch and Flax
run in this process; MXNet runs in a worker process inside the MXNet environment
(``python -m densenet_mxnet.worker``), with arrays crossing as safetensors files in the
canonical form. Callers see the same ``Backend.call(fn, **kwargs)`` for all of them.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import List, Optional

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MXNET_HINT = ("MXNet environment not built: run `make mxnet-env` (Python 3.11 venv in "
              ".venv-mxnet with mxnet 1.9.1 and numpy 1.23.5), or point DENSENET_MXNET_PYTHON "
              "at its python")


class BackendUnavailable(RuntimeError):
    pass


class BackendError(RuntimeError):
    """An exception raised inside a backend (re-raised here with its type name and message)."""

    def __init__(self, backend, error_type, message, tb=""):
        self.backend, self.error_type, self.message, self.tb = backend, error_type, message, tb
        super().__init__(f"[{backend}] {error_type}: {message}\n{tb}")


class Backend:
    """name: 'torch', 'mxnet', 'flax-nnx' or 'flax-linen'."""

    name: str
    framework: str
    variant: str

    def call(self, fn: str, **kwargs):
        raise NotImplementedError

    def close(self):
        pass

    def memory(self) -> int:
        """Resident memory (bytes) of the process this backend computes in; 0 if none runs."""
        return process_memory(os.getpid())

    def __repr__(self):
        return f"<Backend {self.name}>"


def process_memory(pid: int) -> int:
    """Resident memory of a process in bytes (Linux /proc; 0 where it cannot be read)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


class LocalBackend(Backend):
    def __init__(self, framework: str, variant: str, name: str):
        self.framework, self.variant, self.name = framework, variant, name
        self._module = None

    @property
    def module(self):
        if self._module is None:
            try:
                self._module = importlib.import_module(f"densenet_{self.framework}.adapter")
            except ImportError as e:
                raise BackendUnavailable(f"{self.name}: cannot import its framework ({e}); "
                                         "run `make env`") from e
        return self._module

    def call(self, fn: str, **kwargs):
        return getattr(self.module, fn)(**kwargs, variant=self.variant)


def mxnet_python() -> Optional[str]:
    """The MXNet environment's interpreter: $DENSENET_MXNET_PYTHON if set (None if that path
    does not exist: an explicit choice is never silently replaced), else .venv-mxnet's; None if
    it is not built."""
    cand = os.environ.get("DENSENET_MXNET_PYTHON") or str(ROOT / ".venv-mxnet" / "bin" / "python")
    return cand if Path(cand).exists() else None


def _flatten_arrays(kwargs: dict):
    """Split kwargs into JSON and arrays (x, labels, state/<name>) for the worker."""
    plain, arrays = {}, {}
    for k, v in kwargs.items():
        if isinstance(v, np.ndarray):
            arrays[k] = v
        elif isinstance(v, dict) and v and all(isinstance(a, np.ndarray) for a in v.values()):
            for name, a in v.items():
                arrays[f"{k}/{name}"] = a
        else:
            plain[k] = v
    return plain, arrays


class MXNetBackend(Backend):
    """Forwards each call to ``python -m densenet_mxnet.worker`` in the MXNet environment."""

    framework, variant, name = "mxnet", "mxnet", "mxnet"

    def __init__(self):
        self._proc = None
        self._lock = threading.Lock()
        self._tmp = None
        self._n = 0

    def _start(self):
        py = mxnet_python()
        if py is None:
            raise BackendUnavailable(MXNET_HINT)
        self._tmp = tempfile.TemporaryDirectory(prefix="densenet-mxnet-")
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.setdefault("OMP_NUM_THREADS", "1")
        self._proc = subprocess.Popen([py, "-m", "densenet_mxnet.worker"], cwd=str(ROOT), env=env,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=None, text=True, bufsize=1)

    def call(self, fn: str, **kwargs):
        from safetensors.numpy import load_file, save_file
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._start()
            self._n += 1
            plain, arrays = _flatten_arrays(kwargs)
            req = {"id": self._n, "fn": fn, "kwargs": plain, "arrays": None}
            if arrays:
                path = os.path.join(self._tmp.name, f"req{self._n}.safetensors")
                save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, path)
                req["arrays"] = path
            self._proc.stdin.write(json.dumps(req) + "\n")
            self._proc.stdin.flush()
            line = self._proc.stdout.readline()
            if not line:
                raise BackendError("mxnet", "WorkerDied",
                                   f"the MXNet worker exited (code {self._proc.poll()}) during {fn}")
            resp = json.loads(line)
            if not resp.get("ok"):
                raise BackendError("mxnet", resp.get("error_type"), resp.get("error"),
                                   resp.get("traceback", ""))
            result = resp["result"]
            if resp.get("arrays"):
                from densenet_weights.files import join_arrays
                result = join_arrays(result, load_file(resp["arrays"]))
                os.remove(resp["arrays"])
            if req["arrays"]:
                os.remove(req["arrays"])
            return result

    def memory(self) -> int:
        running = self._proc is not None and self._proc.poll() is None
        return process_memory(self._proc.pid) if running else 0

    def close(self):
        if self._proc is not None and self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        if self._tmp is not None:
            self._tmp.cleanup()
        self._proc = None


BACKEND_NAMES = ("torch", "mxnet", "flax-nnx", "flax-linen")
REFERENCE = "torch"


def make_backend(name: str) -> Backend:
    if name == "torch":
        return LocalBackend("torch", "torch", "torch")
    if name == "mxnet":
        return MXNetBackend()
    if name in ("flax-nnx", "flax-linen"):
        return LocalBackend("flax", name.split("-")[1], name)
    raise ValueError(f"unknown backend {name!r}; backends: {', '.join(BACKEND_NAMES)}")


def make_backends(names=BACKEND_NAMES) -> List[Backend]:
    return [make_backend(n) for n in names]
