"""What every case runner shares: the timing loop, process memory, the machine's description.

Standard library only (plus nothing): imported by the case process in either environment.
"""
from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

#: Plain SGD, as in the book and the parity suite.
LR = 0.1


def now() -> float:
    return time.perf_counter()


def rss_bytes() -> Optional[int]:
    """The process's resident set size right now (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (getrusage; KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024


def time_loop(step: Callable[[], None], sync: Callable[[], None], *, batch: int, warmup: int,
              repeats: int, iters: int) -> Dict[str, object]:
    """Run ``step`` ``warmup`` times (untimed, the first one timed apart as 'first_s': it holds
    compilation, cuDNN autotuning, cached-graph building), then ``repeats`` timed runs of
    ``iters`` steps each, synchronising the device before the clock is read at both ends.
    Images per second per run; the median is the figure."""
    t0 = now()
    step()
    sync()
    first = now() - t0
    for _ in range(max(warmup - 1, 0)):
        step()
    sync()
    runs: List[float] = []
    for _ in range(repeats):
        sync()
        t0 = now()
        for _ in range(iters):
            step()
        sync()
        runs.append(batch * iters / (now() - t0))
    return {"img_s": statistics.median(runs), "runs_img_s": runs, "first_s": first,
            "step_s": batch / statistics.median(runs), "warmup": warmup, "repeats": repeats,
            "iters": iters}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> List[str]:
    """The CPU features that decide low-precision speed (AVX-512 BF16, AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return sorted(f for f in flags if f.startswith(("avx512", "amx", "avx2",
                                                                   "avx_vnni", "fma")))
    except OSError:
        pass
    return []


def machine() -> Dict[str, object]:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "cpu_flags": cpu_flags(),
            "python": platform.python_version(), "platform": platform.platform(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def config(case):
    """The case's densenet_spec.Preset: its preset with the case's "options" overrides (a
    smaller network for the correctness checks, for instance)."""
    import densenet_spec as spec
    return spec.make_config(case["preset"], **(case.get("options") or {}))


def error_info(e: BaseException) -> Dict[str, str]:
    msg = str(e).strip().splitlines()
    return {"type": type(e).__name__, "message": (msg[0] if msg else "")[:500]}


def import_torchvision():
    """torchvision, or None if it is not installed. PyPI's torchvision is a CUDA build: beside
    the CPU build of torch its import fails while registering fake (meta) kernels for its CUDA
    operators, so torch.library.register_fake is a no-op for the length of the import. Enough
    to build its models as a benchmark reference; never done in the package."""
    import torch
    try:
        import torchvision
        return torchvision
    except ImportError:
        return None
    except Exception:  # noqa: BLE001 - the CUDA build's registration on a CPU torch
        pass
    import sys
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    original = torch.library.register_fake
    torch.library.register_fake = lambda *a, **k: (lambda fn: fn)
    try:
        import torchvision
        return torchvision
    finally:
        torch.library.register_fake = original
