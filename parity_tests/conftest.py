"""Fixtures: one adapter per backend for the whole session (the MXNet one is a worker process).

A backend that cannot run is a loud skip that names the command that builds it, except where
DENSENET_REQUIRE_MXNET=1 (CI): there a missing MXNet environment fails the test.
"""
from __future__ import annotations

import os

# XLA on the CPU: compile for compile speed, not run speed. The suite compiles dozens of whole
# networks once each on tiny batches, where XLA's default (LLVM -O2, fusion emitters) spends
# ~3x longer compiling than running. Same operations, same IEEE arithmetic: only the machine
# code differs. Set before JAX starts; the benchmarks (benchmarks/) keep XLA's defaults.
_FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                 "--xla_cpu_use_fusion_emitters=false")
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FAST_COMPILE).strip()

import pytest

from parity_tests.backends import (BACKEND_NAMES, MXNET_HINT, ROOT, BackendUnavailable,
                                   make_backend, mxnet_python)

#: The suite's time and memory monitor: prints the peak of the whole process tree and the
#: heaviest tests at the end of every run (parity_tests/suite_monitor.py).
pytest_plugins = ["parity_tests.suite_monitor"]

_cache = {}


def need_mxnet() -> str:
    """The MXNet interpreter, or a skip saying how to build it (a failure under
    DENSENET_REQUIRE_MXNET=1, as CI sets: there only GPU tests may skip)."""
    py = mxnet_python()
    if py is None:
        if os.environ.get("DENSENET_REQUIRE_MXNET") == "1":
            pytest.fail(f"DENSENET_REQUIRE_MXNET=1 but: {MXNET_HINT}")
        pytest.skip(MXNET_HINT)
    return py


def cli_env(**extra):
    """The environment for a command-line run of this project (and for the MXNet environment's
    interpreter). One thread per process: the suite runs under pytest -n 2 on two cores, where
    more threads only contend (PyTorch's OpenMP spins); every run of a comparison gets the same
    setting."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    py = mxnet_python()
    if py:
        env["DENSENET_MXNET_PYTHON"] = py
    env.update(extra)
    return env


def get_backend(name):
    if name == "mxnet":
        need_mxnet()
    if name not in _cache:
        _cache[name] = make_backend(name)
    b = _cache[name]
    try:
        b.call("info")
    except BackendUnavailable as e:
        pytest.skip(str(e))
    return b


@pytest.fixture(params=BACKEND_NAMES)
def backend(request):
    """Every backend in turn: torch, mxnet (worker), flax-nnx, flax-linen."""
    return get_backend(request.param)


@pytest.fixture
def backends():
    """All backends at once, for cross-backend comparisons."""
    return [get_backend(n) for n in BACKEND_NAMES]


def pytest_sessionfinish(session, exitstatus):
    for b in _cache.values():
        b.close()


def cuda_available() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def jax_gpu_available() -> bool:
    try:
        import jax
        return any(d.platform == "gpu" for d in jax.devices())
    except Exception:
        return False


requires_cuda = pytest.mark.skipif(not cuda_available(),
                                   reason="no NVIDIA GPU: torch.cuda.is_available() is False")
requires_jax_gpu = pytest.mark.skipif(not jax_gpu_available(),
                                      reason="no NVIDIA GPU: jax.devices() has no gpu device")
