"""The GPU evidence, in one command and one folder: ``make gpu OUT=DIR`` (``python -m
benchmarks.gpu_check --out DIR``).

On a machine with an NVIDIA GPU and the main environment's frameworks (torch with CUDA, JAX
with CUDA, Flax, optax, torchvision; no MXNet, no network), within a time budget (default
9 minutes), it writes into DIR:

  README.md             the GPU, driver, framework versions, the command, each step's status
                        and time, and what did not fit in the budget
  test_gpu.txt          pytest parity_tests/test_gpu.py: torch CUDA and both Flax variants
                        against a float64 CPU reference with TF32 off; torchvision's DenseNet-121
                        converted into every backend
  report_book.txt       densenet report, book at 96 px, each backend on the GPU
  report_densenet121.txt  densenet report, DenseNet-121 at 224 px
  bench.json/.md/.png   benchmarks.bench: DenseNet-121 at 224 px batch 256, float32 and
                        bfloat16, train and eval; the book at 96 px batch 256; memory-efficient
                        vs naive (DenseNet-121, batch 64)
  bench.log             the benchmark runs' own output

Eight files at most: what a lent GPU machine hands back from one command.

Steps run in that order, each in its own process with what is left of the budget; a step that
does not fit is not started, and README.md says so. Exit status 0 when every step that ran
passed.

Without an NVIDIA GPU (or with --dry) the same steps run in a short dry mode on the CPU, which
the test suite runs so that the command cannot rot: test_gpu.py (every test skips: no GPU), the
reports at 32 px without MXNet, and the benchmark's quick case.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = "torch,flax-nnx,flax-linen"  # MXNet has no CUDA build for Hopper (DESIGN.md 4)


def gpu_info() -> Optional[str]:
    """nvidia-smi's name, memory and driver of the first GPU, or None."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def versions() -> dict:
    code = ("import json, importlib\nout = {}\n"
            "for m in ('torch', 'torchvision', 'jax', 'jaxlib', 'flax', 'optax', 'numpy'):\n"
            "    try:\n        out[m] = importlib.import_module(m).__version__\n"
            "    except Exception as e:\n        out[m] = f'not importable ({type(e).__name__})'\n"
            "try:\n    import torch; out['cuda (torch)'] = torch.version.cuda; "
            "out['torch sees a GPU'] = torch.cuda.is_available()\nexcept Exception: pass\n"
            "try:\n    import jax; out['jax devices'] = [str(d) for d in jax.devices()]\n"
            "except Exception as e:\n    out['jax devices'] = str(e)\n"
            "print(json.dumps(out))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env=_env(), timeout=300)
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error": r.stderr[-500:]}


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                PYTHONUNBUFFERED="1")


def steps(out: Path, dry: bool) -> List[dict]:
    """(name, file, command, minimum seconds worth starting it with), in order of value."""
    py = sys.executable
    if dry:
        return [
            {"name": "GPU parity tests (dry: they skip without a GPU)", "file": "test_gpu.txt",
             "cmd": [py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                     "parity_tests/test_gpu.py"], "min": 5},
            {"name": "parity report, book (dry: 32 px)", "file": "report_book.txt",
             "cmd": [py, "-m", "densenet_cli", "report", "--preset", "book", "--size", "32",
                     "--backends", "torch,flax-nnx"], "min": 5},
            {"name": "benchmark (dry: the quick case)", "file": "bench.log",
             "cmd": [py, "-m", "benchmarks.bench", "--quick", "--backends", "torch",
                     "--out", str(out / "bench")], "min": 5},
        ]
    return [
        {"name": "GPU parity tests", "file": "test_gpu.txt",
         "cmd": [py, "-m", "pytest", "-v", "-rs", "-p", "no:cacheprovider",
                 "parity_tests/test_gpu.py"], "min": 60},
        {"name": "parity report, book at 96 px", "file": "report_book.txt",
         "cmd": [py, "-m", "densenet_cli", "report", "--preset", "book", "--size", "96",
                 "--backends", BACKENDS], "min": 30},
        {"name": "parity report, DenseNet-121 at 224 px", "file": "report_densenet121.txt",
         "cmd": [py, "-m", "densenet_cli", "report", "--preset", "densenet121", "--size", "224",
                 "--backends", BACKENDS], "min": 45},
        {"name": "benchmark: DenseNet-121, 224 px, batch 256, float32 and bfloat16",
         "file": "bench.log",
         "cmd": [py, "-m", "benchmarks.bench", "--backends", "torch,flax-nnx", "--preset",
                 "densenet121", "--size", "224", "--batch", "256", "--dtype",
                 "bfloat16,float32", "--repeats", "3", "--iters", "5", "--only-group", "main",
                 "--case-timeout", "150", "--out", str(out / "bench")], "min": 120},
        {"name": "benchmark: the book, 96 px, batch 256; memory-efficient vs naive",
         "file": "bench.log",
         "cmd": [py, "-m", "benchmarks.bench", "--backends", BACKENDS, "--preset", "book",
                 "--size", "96", "--batch", "256", "--dtype", "float32,bfloat16", "--repeats",
                 "3", "--iters", "10", "--memory", "--mem-batch", "64", "--mem-repeats", "2",
                 "--case-timeout", "120", "--merge", str(out / "bench.json"),
                 "--out", str(out / "bench")], "min": 120},
    ]


def run(out: Path, budget: float, dry: bool) -> int:
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    gpu = gpu_info()
    dry = dry or gpu is None
    vers = versions()
    rows, failed = [], 0
    for step in steps(out, dry):
        left = budget - (time.time() - t_start)
        if left < step["min"]:
            rows.append((step, "not run: out of time", 0.0))
            continue
        print(f"[gpu-check] {step['name']} ({left:.0f} s left) ...", file=sys.stderr, flush=True)
        t0 = time.time()
        with open(out / step["file"], "a" if (out / step["file"]).exists() and
                  any(r[0]["file"] == step["file"] for r in rows) else "w") as log:
            log.write(f"$ {' '.join(map(shlex.quote, step['cmd']))}\n\n")
            log.flush()
            try:
                rc = subprocess.run(step["cmd"], cwd=ROOT, env=_env(), stdout=log,
                                    stderr=subprocess.STDOUT, timeout=left).returncode
                status = "ok" if rc == 0 else f"FAILED (exit status {rc})"
            except subprocess.TimeoutExpired:
                rc, status = 124, "FAILED (stopped at the budget)"
        failed += rc != 0
        rows.append((step, status, time.time() - t0))
    write_readme(out, gpu, vers, rows, dry, budget, time.time() - t_start)
    return 0 if failed == 0 else 1


def write_readme(out: Path, gpu, vers, rows, dry, budget, seconds) -> None:
    cmd = "python -m benchmarks.gpu_check " + " ".join(map(shlex.quote, sys.argv[1:]))
    lines = [f"# GPU evidence{' (dry run on the CPU)' if dry else ''}", "",
             f"Made by `{cmd}` (`make gpu`) on {_dt.datetime.now().isoformat(timespec='seconds')}, "
             f"{seconds / 60:.1f} min of a {budget / 60:.0f} min budget.", "",
             f"- GPU: {gpu or 'none (nvidia-smi found no NVIDIA GPU): dry mode'}",
             f"- machine: {platform.node()}, {os.cpu_count()} CPU cores, Python "
             f"{platform.python_version()}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()), "",
             "| step | file | status | seconds |", "| --- | --- | --- | ---: |"]
    for step, status, secs in rows:
        lines.append(f"| {step['name']} | [{step['file']}]({step['file']}) | {status} | {secs:.0f} |")
    lines += ["", "Each file starts with the command that made it."]
    (out / "README.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="the folder to write")
    ap.add_argument("--budget", type=float, default=540.0,
                    help="seconds for all steps (default 540: 9 minutes)")
    ap.add_argument("--dry", action="store_true", help="the dry mode even with a GPU")
    args = ap.parse_args(argv)
    if args.budget <= 0:
        ap.error(f"--budget must be positive, got {args.budget}")
    return run(Path(args.out), args.budget, args.dry)


if __name__ == "__main__":
    sys.exit(main())
