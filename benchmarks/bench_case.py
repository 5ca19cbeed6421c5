"""One benchmark case in a fresh process: ``python -m benchmarks.bench_case --case JSON``.

Prints one line ``BENCH_RESULT {json}`` on stdout (everything else goes to stderr). A case is
a JSON object::

    {"backend": "torch" | "torchvision" | "mxnet" | "mxnet-zoo" | "flax-nnx" | "flax-linen",
     "preset": "book", "size": 96, "batch": 32, "dtype": "float32" | "bfloat16",
     "mode": "naive" | "efficient", "phases": ["eval", "train"],
     "opts": {fast-path switches of the backend, missing ones at their defaults},
     "warmup": 2, "repeats": 5, "iters": 2, "saved": false}

``saved``: also report what the framework keeps for the backward pass in this mode
(torch and Flax; benchmarks/saved_for_backward.py), measured after the timed phases.

Phases run in order in the same process: 'eval' is a forward pass in inference mode, 'train'
one SGD step (forward, cross-entropy, backward, update; lr 0.1). Memory per phase: the
process's peak RSS (getrusage; the process peak so far, so exact for the first phase and for a
train-only case), the RSS before the phase, and on a GPU the framework allocator's peak; for
JAX also XLA's memory analysis of the compiled step.

``--check`` instead runs the fast-path correctness check: the case's configuration against
the plain one (``--plain-opts``, float32) with the same weights and data; prints the relative
differences (max|a - ref| / max|ref|, the parity suite's measure) of eval logits, train loss,
gradients and BatchNorm running statistics after one step; for gradients max|ref| is floored at
1e-2 of the largest gradient (conv biases before train-mode BatchNorm have zero gradient), and
'gradients_l2' is the relative L2 difference of all gradients together.

Imports: the standard library, numpy, densenet_spec and the one framework of the case.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

from benchmarks import common

RUNNERS = {"torch": "run_torch", "torchvision": "run_torch", "mxnet": "run_mxnet",
           "mxnet-zoo": "run_mxnet", "flax-nnx": "run_flax", "flax-linen": "run_flax"}


def runner(backend):
    import importlib
    return importlib.import_module(f"benchmarks.{RUNNERS[backend]}")


def limit_threads(n) -> None:
    """Run this process on ``n`` CPUs: the affinity mask (which libgomp, XLA's thread pools and
    MXNet's OpenMP all size themselves by) and the usual thread-count variables. Called before
    any framework is imported."""
    n = int(n)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    if hasattr(os, "sched_setaffinity"):
        allowed = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, allowed[:n])


def run_case(case) -> dict:
    t0 = common.now()
    mod = runner(case["backend"])
    out = {"case": case, "machine": common.machine(), "phases": {},
           "import_s": common.now() - t0}
    rss0 = common.rss_bytes()
    t0 = common.now()
    try:
        bench = mod.prepare(case)
    except mod.Unsupported as e:
        out.update(status="unsupported", error={"type": "Unsupported", "message": str(e)})
        return out
    out["build_s"] = common.now() - t0
    out.update(mod.info(bench))
    if hasattr(os, "sched_getaffinity"):
        out["cpus"] = len(os.sched_getaffinity(0))
    out["rss_after_import_bytes"] = rss0
    out["rss_after_build_bytes"] = common.rss_bytes()
    for phase in case.get("phases", ["eval", "train"]):
        step = bench.eval_step if phase == "eval" else bench.train_step
        before = bench.memory_begin()
        rss_before = common.rss_bytes()
        try:
            timing = common.time_loop(step, bench.sync, batch=case["batch"],
                                      warmup=case.get("warmup", 2),
                                      repeats=case.get("repeats", 5), iters=case.get("iters", 2))
        except Exception as e:  # noqa: BLE001
            why = getattr(mod, "unsupported_reason", lambda e, c: None)(e, case)
            if why is None:
                raise
            out.update(status="unsupported", error={"type": "Unsupported", "message": why})
            return out
        mem = {"rss_before_bytes": rss_before, "rss_peak_bytes": common.peak_rss_bytes(),
               "rss_source": "getrusage ru_maxrss of this process (peak so far)"}
        mem.update(bench.memory_end(before))
        extra = getattr(bench, "compiled_memory", lambda p: None)(phase)
        if extra:
            mem["compiled"] = extra
        out["phases"][phase] = dict(timing, memory=mem)
        print(f"  {case['backend']} {phase}: {timing['img_s']:.2f} img/s, "
              f"first step {timing['first_s']:.1f} s", file=sys.stderr, flush=True)
    if case.get("saved"):
        # After the timed phases, so it cannot raise their peak: what the framework keeps for
        # the backward pass in this case's mode (benchmarks/saved_for_backward.py).
        from benchmarks.saved_for_backward import saved_bytes
        out["saved_for_backward"] = saved_bytes(case["backend"], case["preset"], case["size"],
                                                case["batch"], case["mode"] == "efficient")
    out["status"] = "ok"
    return out


#: Gradients: each tensor's scale is at least this share of the largest gradient (see worst()).
GRAD_FLOOR = 1e-2


def check_case(case, plain_opts) -> dict:
    """The fast-path correctness check: the case's configuration vs the plain one."""
    import numpy as np
    mod = runner(case["backend"])
    out = {"case": case, "plain_opts": plain_opts}
    try:
        plain, fast = mod.fast_path_pair(case, plain_opts)
    except mod.Unsupported as e:
        out.update(status="unsupported", error={"type": "Unsupported", "message": str(e)})
        return out
    out.update(mod.info(fast))

    def rel(a, ref, floor=0.0):
        a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
        scale = max(float(np.max(np.abs(ref))) if ref.size else 0.0, floor)
        d = float(np.max(np.abs(a - ref))) if ref.size else 0.0
        return d / scale if scale > 0 else d

    def worst(a, ref, floor_share=0.0):
        """The largest per-tensor relative difference and its tensor. ``floor_share``: each
        tensor's scale is at least this share of the largest magnitude over all tensors (the
        gradient of a conv bias followed by train-mode BatchNorm is zero in exact arithmetic:
        relative to itself its difference would be noise over noise)."""
        assert set(a) == set(ref), (sorted(set(a) ^ set(ref)))[:5]
        floor = floor_share * max(float(np.max(np.abs(v))) for v in ref.values())
        name = max(ref, key=lambda k: rel(a[k], ref[k], floor))
        return rel(a[name], ref[name], floor), name

    try:
        diffs = {"eval_logits": rel(fast.eval_logits(), plain.eval_logits())}
        lp, gp, sp = plain.train_result()
        lf, gf, sf = fast.train_result()
    except Exception as e:  # noqa: BLE001
        why = getattr(mod, "unsupported_reason", lambda e, c: None)(e, case)
        if why is None:
            raise
        out.update(status="unsupported", error={"type": "Unsupported", "message": why})
        return out
    diffs["train_loss"] = abs(lf - lp) / abs(lp)
    diffs["gradients"], out["worst_gradient"] = worst(gf, gp, GRAD_FLOOR)
    a = np.concatenate([np.ravel(gp[k]).astype(np.float64) for k in sorted(gp)])
    b = np.concatenate([np.ravel(gf[k]).astype(np.float64) for k in sorted(gp)])
    diffs["gradients_l2"] = float(np.linalg.norm(b - a) / np.linalg.norm(a))
    diffs["running_stats"], out["worst_running_stat"] = worst(sf, sp)
    out.update(status="ok", diffs=diffs)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", required=True,
                    help="the case, a JSON object (with --check: or a list of them)")
    ap.add_argument("--check", action="store_true", help="fast-path correctness check")
    ap.add_argument("--plain-opts", default="{}", help="JSON: the plain configuration (--check)")
    args = ap.parse_args(argv)
    case = json.loads(args.case)
    first = case[0] if isinstance(case, list) and case else case
    if isinstance(first, dict) and first.get("threads"):
        limit_threads(first["threads"])
    # stdout carries the result line only; frameworks' prints go to stderr.
    out_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    def one(case):
        try:
            return check_case(case, json.loads(args.plain_opts)) if args.check else run_case(case)
        except Exception as e:  # noqa: BLE001 - reported in the result, the parent carries on
            traceback.print_exc()
            return {"case": case, "status": "error", "error": common.error_info(e)}

    result = [one(c) for c in case] if isinstance(case, list) else one(case)
    with os.fdopen(out_fd, "w") as f:
        f.write("BENCH_RESULT " + json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
