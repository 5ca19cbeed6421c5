"""Speed and memory of the three DenseNet mirrors: ``python -m benchmarks.bench``.

For a preset, input size, batch size, dtypes and modes it measures, per backend (torch,
mxnet, flax-nnx, flax-linen): forward images/s in eval mode, train-step images/s (forward,
cross-entropy, backward, plain SGD lr 0.1) and peak memory. Optional suites:

  --fast-paths   each framework's fast paths against its plain configuration (same preset):
                 torch channels_last / torch.compile / autocast bf16 / cudnn.benchmark;
                 Flax jax.jit vs nnx.jit vs eager, donated buffers, bf16 compute;
                 Gluon hybridize(static_alloc, static_shape) vs hybridize() vs imperative
  --reference    ours vs the framework's own DenseNet-121 (torchvision where installed, the
                 Gluon model zoo), same size, batch and fast paths
  --memory       DenseNet-121 training, naive vs memory-efficient: peak memory and step time

Every case runs in a fresh process (``python -m benchmarks.bench_case``): the main
interpreter for torch and Flax, the MXNet environment's for MXNet (DENSENET_MXNET_PYTHON,
else .venv-mxnet/bin/python). Warm-up steps are excluded; each figure is the median of
--repeats timed runs of --iters steps. CPU memory is the case process's peak RSS; on a GPU the
framework allocator's peak; for JAX also XLA's memory analysis of the compiled step.

Writes <out>.json (every number), <out>.md (tables; on a CPU as ratios) and <out>.png.

Examples:
  python -m benchmarks.bench --quick --out /tmp/quick
  python -m benchmarks.bench --preset book --size 96 --batch 32 --dtype float32,bfloat16 \\
      --fast-paths --reference --memory --out docs/performance/cpu
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from benchmarks import common
from benchmarks.defaults import default_opts

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("torch", "mxnet", "flax-nnx", "flax-linen")
REFERENCE_OF = {"torch": "torchvision", "mxnet": "mxnet-zoo"}
#: backends whose memory cases also report what the framework keeps for the backward pass
#: (benchmarks/saved_for_backward.py)
SAVED_FOR_BACKWARD = ("torch", "flax-nnx", "flax-linen")
MXNET_HINT = ("MXNet environment not found: set DENSENET_MXNET_PYTHON to its python, or build "
              ".venv-mxnet with `make mxnet-env`")


def mxnet_python() -> Optional[str]:
    explicit = os.environ.get("DENSENET_MXNET_PYTHON")
    for cand in ([explicit] if explicit else []) + [str(ROOT / ".venv-mxnet" / "bin" / "python")]:
        if cand and Path(cand).exists():
            return cand
    return None


def gpu_name() -> Optional[str]:
    """The NVIDIA GPU's name (nvidia-smi), or None: decides which variants are planned."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    line = out.stdout.strip().splitlines()
    return line[0].strip() if out.returncode == 0 and line else None


# ----------------------------------------------------------------------------- plan

def fast_path_variants(backend: str, gpu: bool, compile_: bool, eager: bool):
    """(name, opts, dtype, timing override) per fast path, each measured against the first
    ('plain'). A variant equal to the backend's defaults is the same case as the main sweep's
    row and is run once."""
    if backend == "torch":
        plain = {"channels_last": False, "compile": False, "cudnn_benchmark": False}
        v = [("plain (eager, NCHW, float32)", plain, "float32", {}),
             ("channels_last", dict(plain, channels_last=True), "float32", {})]
        if gpu:
            v.append(("cudnn.benchmark", dict(plain, cudnn_benchmark=True), "float32", {}))
            v.append(("channels_last + cudnn.benchmark",
                      dict(plain, channels_last=True, cudnn_benchmark=True), "float32", {}))
        if compile_:
            v.append(("torch.compile", dict(plain, compile=True), "float32", {}))
        v.append(("autocast bfloat16", plain, "bfloat16", {}))
        if gpu:
            v.append(("channels_last + cudnn.benchmark + autocast bfloat16",
                      dict(plain, channels_last=True, cudnn_benchmark=True), "bfloat16", {}))
        return v
    if backend == "flax-nnx":
        v = [("plain (nnx.jit, no donation)", {"jit": "nnx", "donate": False}, "float32", {}),
             ("nnx.jit + donate", {"jit": "nnx", "donate": True}, "float32", {}),
             ("split/merge + jax.jit + donate", {"jit": "functional", "donate": True}, "float32", {}),
             ("bfloat16 compute (split/merge + jax.jit + donate)",
              {"jit": "functional", "donate": True}, "bfloat16", {})]
        if eager:
            v.append(("no jit (eager)", {"jit": "none", "donate": False}, "float32",
                      {"warmup": 1, "repeats": 2, "iters": 1}))
        return v
    if backend == "flax-linen":
        plain = {"jit": "jax", "donate": False}
        v = [("plain (jax.jit, no donation)", plain, "float32", {}),
             ("jax.jit + donate", {"jit": "jax", "donate": True}, "float32", {}),
             ("bfloat16 compute (jax.jit + donate)", {"jit": "jax", "donate": True}, "bfloat16", {})]
        if eager:
            v.append(("no jit (eager)", {"jit": "none", "donate": False}, "float32",
                      {"warmup": 1, "repeats": 2, "iters": 1}))
        return v
    if backend == "mxnet":
        return [("plain (imperative)", {"hybridize": "none"}, "float32", {}),
                ("hybridize()", {"hybridize": "plain"}, "float32", {}),
                ("hybridize(static_alloc, static_shape)", {"hybridize": "static"}, "float32", {}),
                ("AMP bfloat16 (hybridize static)", {"hybridize": "static"}, "bfloat16", {})]
    return []


def plan(args, gpu: bool) -> List[dict]:
    timing = {"warmup": args.warmup, "repeats": args.repeats, "iters": args.iters}
    cases = []

    def add(group, backend, preset, size, batch, dtype, mode, phases=("eval", "train"),
            opts=None, variant=None, **override):
        c = {"group": group, "backend": backend, "preset": preset, "size": size, "batch": batch,
             "dtype": dtype, "mode": mode, "phases": list(phases),
             "opts": dict(default_opts(backend, gpu), **(opts or {}))}
        if variant:
            c["variant"] = variant
        c.update(timing)
        if args.threads:
            c["threads"] = args.threads
        c.update(override)
        cases.append(c)

    for b in args.backends:
        for dtype in args.dtype:
            for mode in args.mode:
                add("main", b, args.preset, args.size, args.batch, dtype, mode)
    if args.fast_paths:
        for b in args.backends:
            for name, opts, dtype, over in fast_path_variants(b, gpu, args.compile, args.eager):
                add("fast", b, args.preset, args.size, args.batch, dtype, "naive", opts=opts,
                    variant=name, **over)
    if args.reference:
        for b in args.backends:
            if b not in REFERENCE_OF:
                continue
            for dtype in args.ref_dtype:
                for impl in (b, REFERENCE_OF[b]):
                    add("reference", impl, args.ref_preset, args.ref_size, args.ref_batch, dtype,
                        "naive", variant="reference" if impl != b else "ours",
                        **_timing_override(args.ref_repeats, args.ref_iters))
    if args.memory:
        backends = list(args.backends) + (["torchvision"] if args.reference and "torch" in
                                          args.backends else [])
        for b in backends:
            for mode in ("naive", "efficient"):
                add("memory", b, args.mem_preset, args.mem_size, args.mem_batch, args.mem_dtype,
                    mode, phases=("train",), **_timing_override(args.mem_repeats, args.mem_iters),
                    **({"saved": True} if b in SAVED_FOR_BACKWARD else {}))
    return cases


def _timing_override(repeats, iters):
    out = {}
    if repeats is not None:
        out["repeats"] = repeats
    if iters is not None:
        out["iters"] = iters
    return out


# ----------------------------------------------------------------------------- run

def run_one(case: dict, timeout: float, verbose: bool) -> dict:
    backend = case["backend"]
    if backend in ("mxnet", "mxnet-zoo"):
        py = mxnet_python()
        if py is None:
            return {"case": case, "status": "unavailable",
                    "error": {"type": "Unavailable", "message": MXNET_HINT}}
    else:
        py = sys.executable
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    child = {k: v for k, v in case.items() if k not in ("group", "variant")}
    cmd = [py, "-m", "benchmarks.bench_case", "--case", json.dumps(child)]
    t0 = time.perf_counter()
    load0 = os.getloadavg()
    try:
        proc = subprocess.run(cmd, cwd=str(ROOT), env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or b"")
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        return {"case": case, "status": "timeout", "wall_s": time.perf_counter() - t0,
                "error": {"type": "Timeout", "message": f"no result after {timeout:.0f} s"},
                "stderr_tail": tail[-2000:]}
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            result = json.loads(line[len("BENCH_RESULT "):])
    if verbose and proc.stderr:
        sys.stderr.write(proc.stderr)
    if result is None:
        result = {"case": child, "status": "error",
                  "error": {"type": "NoResult", "message": f"exit code {proc.returncode}"}}
    if result.get("status") != "ok":
        result["stderr_tail"] = proc.stderr[-3000:]
    result["case"] = case
    result["wall_s"] = time.perf_counter() - t0
    result["loadavg_before"] = load0
    result["loadavg_after"] = os.getloadavg()
    return result


def combine_rounds(rs: List[dict]) -> dict:
    """One result from the same case run in several rounds (fresh processes, interleaved with
    the other cases): per phase the median throughput over rounds, each round's figure kept
    in 'rounds_img_s'; everything else (memory included) from the round whose train (else
    first) phase throughput is the median. A failed round makes the case failed."""
    if len(rs) == 1 or any(r.get("status") != "ok" for r in rs):
        return next((r for r in rs if r.get("status") != "ok"), rs[-1])
    import statistics
    pick = "train" if "train" in rs[0]["phases"] else next(iter(rs[0]["phases"]))
    order = sorted(rs, key=lambda r: r["phases"][pick]["img_s"])
    out = copy.deepcopy(order[(len(order) - 1) // 2])
    for phase, p in out["phases"].items():
        vals = [r["phases"][phase]["img_s"] for r in rs]
        p["rounds_img_s"] = vals
        p["img_s"] = statistics.median(vals)
        p["step_s"] = out["case"]["batch"] / p["img_s"]
    out["rounds"] = len(rs)
    return out


def case_key(c: dict) -> str:
    """What makes two planned cases the same measurement (the suite and label do not)."""
    return json.dumps({k: v for k, v in c.items() if k not in ("group", "variant")},
                      sort_keys=True)


def measurement_key(c: dict) -> str:
    """What is measured, without how long (warm-up, repeats, iterations): for --merge."""
    return json.dumps({k: v for k, v in c.items()
                       if k not in ("group", "variant", "warmup", "repeats", "iters")},
                      sort_keys=True)


def describe_case(c: dict) -> str:
    s = (f"{c['group']:9s} {c['backend']:11s} {c['preset']} {c['size']}px b{c['batch']} "
         f"{c['dtype']} {c['mode']}")
    if c.get("variant"):
        s += f" [{c['variant']}]"
    return s


def summary_line(r: dict) -> str:
    if r.get("status") != "ok":
        e = r.get("error") or {}
        return f"{r.get('status')}: {e.get('message', '')[:160]}"
    parts = []
    for phase, p in r["phases"].items():
        parts.append(f"{phase} {p['img_s']:.2f} img/s")
        m = p["memory"]
        if m.get("device_peak_bytes"):
            parts.append(f"{phase} peak {m['device_peak_bytes'] / 2**30:.2f} GiB (device)")
        else:
            parts.append(f"{phase} peak RSS {m['rss_peak_bytes'] / 2**30:.2f} GiB")
    return ", ".join(parts)


def _csv(kind):
    def parse(s):
        items = [x.strip() for x in s.split(",") if x.strip()]
        if kind is not None:
            bad = [x for x in items if x not in kind]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {', '.join(bad)}; choose from {', '.join(kind)}")
        return items
    return parse


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench",
                                 description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--preset", default="book")
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--dtype", type=_csv(("float32", "bfloat16")), default=["float32", "bfloat16"])
    ap.add_argument("--mode", type=_csv(("naive", "efficient")), default=["naive"])
    ap.add_argument("--backends", type=_csv(BACKENDS), default=list(BACKENDS))
    ap.add_argument("--threads", type=int, default=None,
                    help="run each case on this many CPUs (affinity mask + OMP/MKL thread counts); "
                         "default: all. On a shared machine 1 avoids OpenMP oversubscription")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every case this many times, round after round (fresh processes, "
                         "interleaved), and report the median per phase: for noisy machines")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per phase (default 2)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per phase; median (default 5)")
    ap.add_argument("--iters", type=int, default=2, help="steps per timed run (default 2)")
    ap.add_argument("--fast-paths", action="store_true", help="measure each fast path vs plain")
    ap.add_argument("--compile", action="store_true",
                    help="include torch.compile among the fast paths (compiles for minutes on a CPU)")
    ap.add_argument("--eager", action="store_true", help="include eager (no jit) Flax among the fast paths")
    ap.add_argument("--reference", action="store_true",
                    help="ours vs torchvision / the Gluon model zoo (DenseNet-121)")
    ap.add_argument("--ref-preset", default="densenet121")
    ap.add_argument("--ref-size", type=int, default=224)
    ap.add_argument("--ref-batch", type=int, default=8)
    ap.add_argument("--ref-dtype", type=_csv(("float32", "bfloat16")), default=["float32"])
    ap.add_argument("--ref-repeats", type=int, default=None)
    ap.add_argument("--ref-iters", type=int, default=None)
    ap.add_argument("--memory", action="store_true",
                    help="memory-efficient vs naive training (DenseNet-121)")
    ap.add_argument("--mem-preset", default="densenet121")
    ap.add_argument("--mem-size", type=int, default=224)
    ap.add_argument("--mem-batch", type=int, default=8)
    ap.add_argument("--mem-dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--mem-repeats", type=int, default=None)
    ap.add_argument("--mem-iters", type=int, default=None)
    ap.add_argument("--all", action="store_true", help="--fast-paths --reference --memory")
    ap.add_argument("--quick", action="store_true",
                    help="a small smoke run: book, 48 px, batch 4, float32, 1 warm-up, 2 x 1 steps")
    ap.add_argument("--case-timeout", type=float, default=900.0, help="seconds per case (default 900)")
    ap.add_argument("--verbose", action="store_true", help="show each case's own output")
    ap.add_argument("--only-group", type=_csv(("main", "fast", "reference", "memory")), default=None,
                    help="run only these groups (e.g. to add a suite to an earlier JSON with --merge)")
    ap.add_argument("--merge", default=None, help="an earlier JSON whose results are kept unless re-run")
    ap.add_argument("--check", metavar="MODELS", default=None,
                    help="instead: how long `densenet check` takes on these models, phase by "
                         "phase (benchmarks/check_speed.py): torchvision:NAME, keras:NAME, "
                         "torch:PRESET, comma-separated")
    ap.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",") if v.strip()],
                    default=None, help="with --check: input sizes (default 64,224)")
    ap.add_argument("--title", default=None)
    ap.add_argument("--out", default=None, help="output path without extension (default "
                    "docs/performance/bench; with --check docs/performance/check-speed)")
    args = ap.parse_args(argv)
    args.out = args.out or ("docs/performance/check-speed" if args.check else
                            "docs/performance/bench")
    if args.all:
        args.fast_paths = args.reference = args.memory = True
    if args.quick:
        args.preset, args.size, args.batch = "book", 48, 4
        if "--dtype" not in " ".join(argv if argv is not None else sys.argv):
            args.dtype = ["float32"]
        args.warmup, args.repeats, args.iters = 1, 2, 1
        args.ref_batch = args.mem_batch = 2
        args.ref_repeats = args.mem_repeats = 2
        args.ref_iters = args.mem_iters = 1
    return args


def main(argv=None):
    args = parse_args(argv)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    if args.check:
        from benchmarks import check_speed
        try:
            return check_speed.main(args, argv_list, gpu_name())
        except ValueError as e:
            print(f"densenet bench: {e}", file=sys.stderr)
            sys.exit(2)
    command = "python -m benchmarks.bench " + shlex.join(argv_list)
    gpu = gpu_name()
    cases = plan(args, gpu is not None)
    if args.only_group:
        cases = [c for c in cases if c["group"] in args.only_group]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {"command": command, "argv": argv_list,
            "started": _dt.datetime.now().isoformat(timespec="seconds"),
            "machine": dict(common.machine(), gpu=gpu,
                            mxnet_python=mxnet_python(), main_python=sys.executable),
            "settings": {k: v for k, v in vars(args).items()}, "results": []}
    kept = []
    if args.merge:
        old = json.loads(Path(args.merge).read_text())
        # A case measured again replaces its earlier result, whatever the timing settings
        redo = {(c["group"], measurement_key(c)) for c in cases}
        kept = [r for r in old["results"] if (r["case"].get("group"), measurement_key(r["case"]))
                not in redo]
        data["merged_from"] = {"file": args.merge, "command": old.get("command"),
                               "kept_results": len(kept)}
        data["commands"] = old.get("commands", [old.get("command")]) + [command]
    print(f"densenet benchmarks: {len(cases)} case(s); machine: {data['machine']['cpu']}, "
          f"{data['machine']['cores']} cores, {'GPU ' + gpu if gpu else 'no GPU'}", file=sys.stderr)
    t_start = time.perf_counter()
    runs, combined = {}, {}  # case key -> one result per round; -> their combination

    def collected():
        """The results so far in plan order; a case planned by two suites appears twice."""
        out, first_group = [], {}
        for c in cases:
            key = case_key(c)
            if key in combined:
                r = dict(combined[key], case=c)
                if key in first_group:
                    r["same_as"] = first_group[key]
                first_group.setdefault(key, c.get("group"))
                out.append(r)
        return out

    for rnd in range(1, args.rounds + 1):
        done = {}  # case key -> group of the case that ran it this round
        tag = f" round {rnd}/{args.rounds}" if args.rounds > 1 else ""
        for i, case in enumerate(cases, 1):
            key = case_key(case)
            if key in done:  # the same measurement planned by two suites: run once
                print(f"[{i}/{len(cases)}{tag}] {describe_case(case)}: same case as in "
                      f"'{done[key]}', not run again", file=sys.stderr, flush=True)
                continue
            done[key] = case.get("group")
            print(f"[{i}/{len(cases)}{tag}] {describe_case(case)} ...", file=sys.stderr,
                  flush=True)
            runs.setdefault(key, []).append(run_one(case, args.case_timeout, args.verbose))
            r = combined[key] = combine_rounds(runs[key])
            print(f"    {summary_line(r)}  ({r.get('wall_s', 0):.0f} s)", file=sys.stderr,
                  flush=True)
            data["results"] = kept + collected()
            Path(str(out) + ".json").write_text(json.dumps(data, indent=1))
    data["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
    data["duration_s"] = time.perf_counter() - t_start
    Path(str(out) + ".json").write_text(json.dumps(data, indent=1))
    from benchmarks import report
    report.write(data, out, title=args.title)
    print(f"wrote {out}.json, {out}.md, {out}.png ({data['duration_s'] / 60:.1f} min)",
          file=sys.stderr)
    return data


if __name__ == "__main__":
    main()
