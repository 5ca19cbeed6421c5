"""The GPU evidence, in one call of at most 7 minutes and one folder: ``make gpu OUT=DIR``
(``python -m benchmarks.gpu_check --out DIR``).

On a machine with an NVIDIA GPU and the frameworks installed (torch with CUDA, JAX with CUDA,
Flax, optax, torchvision; no MXNet, no network), within a time budget (default 360 s, at most
420 s: what one device call is planned for), it runs these steps, in order of value, each in its
own process with its own time limit, and writes into DIR:

  README.md    what ran, what failed and why (the tail of its log), what did not fit; each
               step's limit and wall time; the GPU, driver and framework versions; the command
  smoke.txt    1. smoke (<= 60 s): versions, each backend's device, one small forward each
               (the book at 32 px, batch 2) on the GPU, its difference from torch's
  test_gpu.txt 2. pytest parity_tests/test_gpu.py: torch CUDA and both Flax variants against a
               float64 CPU reference; torchvision's DenseNet-121 converted into every backend
  reports.txt  3. densenet report, the book at 96 px; 4. DenseNet-121 at 224 px (each backend
               on the GPU)
  bench.log    5.-8. benchmarks.bench, into one bench.json/.md/.png (--merge): DenseNet-121 at
  bench.json   224 px batch 256, train and eval, with torch's and Flax's fast paths (the
  bench.md     benchmark's defaults: channels_last + cudnn.benchmark; split/merge + jax.jit +
  bench.png    donation), 5. float32, 6. bfloat16; 7. the book at 96 px batch 256, every backend,
               both dtypes; 8. DenseNet-121 training, memory-efficient vs naive (batch 64, torch and flax-nnx)

Eight files: what a lent GPU machine hands back from one command. A step that fails (or meets
its limit: its whole process group is stopped) is recorded and the next one runs; a step that
no longer fits the budget is not started. Exit status 0 when every step ran and passed.

Without an NVIDIA GPU (or with --dry) the same eight steps run, in the same order, in a short
dry mode on the CPU (the book at 32-48 px, torch alone in the benchmark, the GPU tests skip),
which the test suite runs so that the command cannot rot. For that test,
DENSENET_GPU_CHECK_FAIL=STEP (a step's key, e.g. report_book) replaces that step's command by
one that fails.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = "torch,flax-nnx,flax-linen"  # MXNet has no CUDA build for Hopper (DESIGN.md 4)
BUDGET = 360.0      # default seconds for all steps
HARD_CAP = 420.0    # 7 minutes: the most one device call is planned for
SMOKE_LIMIT = 60.0
README_RESERVE = 5.0  # seconds kept back for README.md
#: every file it writes: no more than a device call hands back (8)
OUTPUT_FILES = ("README.md", "smoke.txt", "test_gpu.txt", "reports.txt", "bench.log",
                "bench.json", "bench.md", "bench.png")
FAIL_ENV = "DENSENET_GPU_CHECK_FAIL"


def gpu_info() -> Optional[str]:
    """nvidia-smi's name, memory and driver of the first GPU, or None."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                PYTHONUNBUFFERED="1")


# ----------------------------------------------------------------------------- smoke step

def smoke(expect_gpu: bool) -> int:
    """Step 1: versions, then each backend's device and one small forward (the book, 32 px,
    batch 2, eval mode), its head against torch's. Fails when a backend fails or, with a GPU,
    computes elsewhere. Prints 'VERSIONS {json}' first, for README.md."""
    import importlib
    import traceback
    vers = {"python": platform.python_version()}
    for m in ("torch", "torchvision", "jax", "jaxlib", "flax", "optax", "numpy", "safetensors"):
        try:
            vers[m] = importlib.import_module(m).__version__
        except Exception as e:  # reported, not fatal: the backends below say what it breaks
            vers[m] = f"not importable ({type(e).__name__}: {e})"[:200]
    try:
        import torch
        vers["torch cuda"] = torch.version.cuda
        vers["torch device"] = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
                                else "no CUDA device")
    except Exception:
        pass
    try:
        import jax
        vers["jax devices"] = ", ".join(str(d) for d in jax.devices())
    except Exception as e:
        vers["jax devices"] = f"{type(e).__name__}: {e}"[:200]
    print("VERSIONS " + json.dumps(vers), flush=True)

    import numpy as np
    import densenet_spec as spec
    from densenet_parity import compare
    from densenet_parity.backends import make_backend
    cfg = spec.get_preset("book").to_dict()
    x = np.random.default_rng(0).standard_normal((2, cfg["in_channels"], 32, 32)).astype(np.float32)
    failed, state, ref = 0, None, None
    for name in BACKENDS.split(","):
        t0 = time.time()
        try:
            b = make_backend(name)
            device = b.call("info")["device"]
            if state is None:  # torch's initial state, loaded by every backend
                state = b.call("init_state", config=cfg, seed=0)["arrays"]
            head = b.call("forward", config=cfg, state=state, x=x)["arrays"]["head"]
            if ref is None:
                ref, ref_name = head, name
            on_gpu = device.startswith(("cuda", "gpu"))
            bad = expect_gpu and not on_gpu
            failed += bad
            print(f"{name:11s} on {device}: forward of the book, 32 px, batch 2, in "
                  f"{time.time() - t0:.1f} s (first call: compiles); head differs from "
                  f"{ref_name}'s by {compare.rel_diff(head, ref):.1e} (rel)"
                  + ("  FAILED: not on the GPU" if bad else ""), flush=True)
        except Exception as e:
            failed += 1
            print(f"{name:11s} FAILED after {time.time() - t0:.1f} s: {type(e).__name__}: {e}",
                  flush=True)
            traceback.print_exc(limit=8, file=sys.stdout)
    print("smoke: " + ("FAILED" if failed else "ok"), flush=True)
    return 1 if failed else 0


# ----------------------------------------------------------------------------- the steps

#: What each step measures on a GPU, and the small stand-in its dry mode runs on a CPU: the
#: same steps, the same options, the book at 32-48 px and torch alone in the benchmark.
SCALE = {
    "gpu": dict(book=96, report=("densenet121", 224), big=("densenet121", 224, 256),
                small=("book", 96, 256), mem=("densenet121", 224, 64),
                big_backends="torch,flax-nnx", small_backends=BACKENDS,
                small_dtypes="float32,bfloat16", mem_backends="torch,flax-nnx",
                timing=["--repeats", "3", "--iters", "5"], mem_timing=["--mem-repeats", "2"],
                pytest=["-v", "--durations=20"]),
    "dry": dict(book=32, report=("book", 48), big=("book", 32, 2), small=("book", 32, 2),
                mem=("book", 32, 2), big_backends="torch", small_backends="torch",
                small_dtypes="float32", mem_backends="torch",
                timing=["--warmup", "1", "--repeats", "1", "--iters", "1"],
                mem_timing=["--mem-repeats", "1", "--mem-iters", "1"], pytest=["-q"]),
}
PRESET_NAMES = {"book": "the book", "densenet121": "DenseNet-121"}


def steps(out: Path, dry: bool) -> List[dict]:
    """The steps in order of value: key, name (what it ran), file, cmd, min (seconds worth
    starting it with) and max (its own limit); 'bench' marks a benchmarks.bench run."""
    py = sys.executable
    s = SCALE["dry" if dry else "gpu"]
    tag = " (dry run on the CPU)" if dry else ""

    def what(preset, size, batch=None):
        return f"{PRESET_NAMES[preset]}, {size} px" + (f", batch {batch}" if batch else "")

    def report(preset, size):
        return {"file": "reports.txt", "name": f"parity report, {what(preset, size)}, "
                f"{BACKENDS.replace(',', ', ')}{tag}",
                "cmd": [py, "-m", "densenet_cli", "report", "--preset", preset, "--size",
                        str(size), "--backends", BACKENDS]}

    def bench(case, backends, dtypes, group):
        preset, size, batch = case
        opts = (["--memory", "--mem-preset", preset, "--mem-size", str(size), "--mem-batch",
                 str(batch)] + s["mem_timing"]) if group == "memory" else \
            ["--preset", preset, "--size", str(size), "--batch", str(batch), "--dtype", dtypes]
        name = (f"benchmark: {what(*case)}, training, memory-efficient vs naive"
                if group == "memory" else
                f"benchmark: {what(*case)}, {dtypes.replace(',', ' and ')}, train and eval, "
                "each backend's default fast paths")
        return {"file": "bench.log", "bench": True,
                "name": f"{name}, {backends.replace(',', ', ')}{tag}",
                "cmd": [py, "-m", "benchmarks.bench", "--backends", backends] + opts
                + s["timing"] + ["--only-group", group, "--out", str(out / "bench")]}

    return [
        {"key": "smoke", "min": 10, "max": SMOKE_LIMIT, "file": "smoke.txt",
         "name": f"smoke: versions, each backend on the GPU, one small forward{tag}",
         "cmd": [py, "-m", "benchmarks.gpu_check", "--smoke"] + (["--dry"] if dry else [])},
        {"key": "test_gpu", "min": 30, "max": 150, "file": "test_gpu.txt",
         "name": "GPU parity tests" + (" (dry run on the CPU: they skip)" if dry else ""),
         "cmd": [py, "-m", "pytest"] + s["pytest"] + ["-rs", "-p", "no:cacheprovider",
                                                     "parity_tests/test_gpu.py"]},
        dict(report("book", s["book"]), key="report_book", min=15, max=45),
        dict(report(*s["report"]), key="report_densenet121", min=20, max=60),
        dict(bench(s["big"], s["big_backends"], "float32", "main"),
             key="bench_densenet121_float32", min=45, max=120),
        dict(bench(s["big"], s["big_backends"], "bfloat16", "main"),
             key="bench_densenet121_bfloat16", min=45, max=120),
        dict(bench(s["small"], s["small_backends"], s["small_dtypes"], "main"),
             key="bench_book", min=30, max=90),
        dict(bench(s["mem"], s["mem_backends"], "float32", "memory"),
             key="bench_memory", min=45, max=120),
    ]


def _run_step(cmd: List[str], log, limit: float) -> str:
    """Run ``cmd`` in its own process group with its output into ``log``; at ``limit`` seconds
    the whole group is stopped (a benchmark's case processes too, so none holds the GPU)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        rc = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        return f"FAILED (stopped at its limit, {limit:.0f} s)"
    return "ok" if rc == 0 else f"FAILED (exit status {rc})"


def _tail(path: Path, start: int, lines: int = 15) -> str:
    """The last ``lines`` lines a step wrote into ``path`` from byte ``start`` on."""
    with open(path, "rb") as f:
        f.seek(start)
        text = f.read().decode(errors="replace")
    return "\n".join(text.rstrip().splitlines()[-lines:]) or "(no output)"


def run(out: Path, budget: float, dry: bool, plan: Optional[List[dict]] = None,
        argv: Optional[List[str]] = None) -> int:
    """Run the steps (``plan``: steps(out, dry)) within ``budget`` seconds; README.md says
    what happened. 0 when every step ran and passed, else 1."""
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUT_FILES:  # an earlier run's files (bench.json would be merged)
        (out / name).unlink(missing_ok=True)
    t_start = time.time()
    gpu = gpu_info()
    dry = dry or gpu is None
    fail = os.environ.get(FAIL_ENV, "")
    plan = steps(out, dry) if plan is None else plan
    rows, written = [], set()
    for i, step in enumerate(plan, 1):
        left = budget - README_RESERVE - (time.time() - t_start)
        if left < step["min"]:
            rows.append(dict(step, status=f"not run: {left:.0f} s left, it needs {step['min']} s",
                             limit=0, seconds=0.0))
            continue
        limit = min(step["max"], left)
        cmd = list(step["cmd"])
        if step.get("bench"):  # it records a case that meets its limit, and goes on
            cmd += ["--case-timeout", str(max(10, int(limit - 10)))]
            if (out / "bench.json").exists():  # one bench.json/.md/.png for every bench step
                cmd += ["--merge", str(out / "bench.json")]
        if fail == step["key"]:
            cmd = [sys.executable, "-c", f"raise SystemExit('injected failure ({FAIL_ENV}="
                   f"{fail}): this step did not run')"]
        print(f"[gpu-check] {i}/{len(plan)} {step['name']} (limit {limit:.0f} s, "
              f"{left:.0f} s left) ...", file=sys.stderr, flush=True)
        path = out / step["file"]
        t0 = time.time()
        with open(path, "a" if step["file"] in written else "w") as log:
            if step["file"] in written:
                log.write("\n")
            written.add(step["file"])
            log.write(f"### step {i}: {step['name']}\n$ {shlex.join(cmd)}\n\n")
            log.flush()
            start = log.tell()
            status = _run_step(cmd, log, limit)
        row = dict(step, status=status, limit=limit, seconds=time.time() - t0)
        if status != "ok":
            row["why"] = _tail(path, start)
        print(f"[gpu-check]     {status} ({row['seconds']:.0f} s)", file=sys.stderr, flush=True)
        rows.append(row)
    command = "python -m benchmarks.gpu_check " + shlex.join(
        sys.argv[1:] if argv is None else argv)
    write_readme(out, command, gpu, rows, dry, budget, time.time() - t_start)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def _versions(out: Path) -> dict:
    try:
        for line in (out / "smoke.txt").read_text().splitlines():
            if line.startswith("VERSIONS "):
                return json.loads(line[len("VERSIONS "):])
    except (OSError, json.JSONDecodeError):
        pass
    return {}


def write_readme(out: Path, cmd: str, gpu, rows, dry, budget, seconds) -> None:
    vers = _versions(out)
    ran = [r for r in rows if not r["status"].startswith("not run")]
    bad = [r for r in ran if r["status"] != "ok"]
    lines = [f"# GPU evidence{' (dry run on the CPU)' if dry else ''}", "",
             f"Made by `{cmd}` (`make gpu`) on {_dt.datetime.now().isoformat(timespec='seconds')}: "
             f"{seconds:.0f} s of a {budget:.0f} s budget (hard cap {HARD_CAP:.0f} s). "
             f"{len(ran)} of {len(rows)} steps ran, {len(bad)} failed.", "",
             f"- GPU: {gpu or 'none (nvidia-smi found no NVIDIA GPU): dry mode'}",
             f"- machine: {platform.node()}, {os.cpu_count()} CPU cores, Python "
             f"{platform.python_version()} ({sys.executable})",
             "- versions (the smoke step's): " + (", ".join(f"{k} {v}" for k, v in vers.items())
                                                  or "unknown: see smoke.txt"), "",
             "| # | step | file | status | limit s | wall s |",
             "| ---: | --- | --- | --- | ---: | ---: |"]
    for i, r in enumerate(rows, 1):
        limit, secs = (f"{r['limit']:.0f}", f"{r['seconds']:.1f}") if r["limit"] else ("-", "-")
        # a link only to a file that is there (docs/ is link-checked: parity_tests/test_docs.py)
        where = f"[{r['file']}]({r['file']})" if (out / r["file"]).exists() else f"{r['file']} (none)"
        lines.append(f"| {i} | {r['name']} | {where} | {r['status']} | {limit} | {secs} |")
    lines += ["", "Each step's part of its file starts with `### step N` and the command."]
    if bad:
        lines += ["", "## What failed, and why (the last lines of its output)"]
        for r in bad:
            lines += ["", f"### {r['name']}: {r['status']}", "", "```", r["why"], "```"]
    skipped = [r for r in rows if r["status"].startswith("not run")]
    if skipped:
        lines += ["", "## Not run (out of time)", ""]
        lines += [f"- {r['name']}: {r['status']}" for r in skipped]
    (out / "README.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check",
                                 description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="the folder to write")
    ap.add_argument("--budget", type=float, default=BUDGET,
                    help=f"seconds for all steps (default {BUDGET:.0f}; at most {HARD_CAP:.0f})")
    ap.add_argument("--dry", action="store_true", help="the dry mode even with a GPU")
    ap.add_argument("--smoke", action="store_true",
                    help="only the smoke step, to standard output (what step 1 runs)")
    args = ap.parse_args(argv)
    if args.smoke:
        return smoke(expect_gpu=not args.dry and gpu_info() is not None)
    if not args.out:
        ap.error("--out DIR is required")
    if not 0 < args.budget <= HARD_CAP:
        ap.error(f"--budget must be more than 0 and at most {HARD_CAP:.0f} seconds (one device "
                 f"call of 7 minutes), got {args.budget:g}")
    return run(Path(args.out), args.budget, args.dry,
               argv=list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
