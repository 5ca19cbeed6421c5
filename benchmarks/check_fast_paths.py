"""Correctness of every fast path the benchmark measures: ``python -m benchmarks.check_fast_paths``.

Each fast path (the same code the benchmark times: benchmarks/run_*.py) runs on the same
weights and data as its backend's plain configuration, and must agree with it at the parity
suite's tolerances (densenet_parity/compare.py: max|a - ref| / max|ref| per tensor, EVAL_RTOL for
eval logits, TRAIN_RTOL for the train-mode loss, every gradient and every BatchNorm running
statistic after one SGD step; a gradient tensor's scale is floored at 1e-2 of the largest
gradient, since conv biases before train-mode BatchNorm have zero gradient in exact arithmetic).
bfloat16 compute paths have their own, stated tolerances (BF16_RTOL, BF16_GRAD_L2): bfloat16
keeps 8 significant bits, so a float32 tolerance cannot apply.

The network is small (the book's layout, two dense blocks of two layers, growth rate 8) so
that the check, compilation included, takes seconds; the parity suite runs it
(parity_tests/test_fast_paths.py).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

from benchmarks.bench import ROOT, mxnet_python, MXNET_HINT

#: bfloat16 compute paths against float32 on the same weights and data. bfloat16 keeps 8
#: significant bits, and BatchNorm's training-mode backward subtracts batch means (cancelling
#: leading digits), so single gradient tensors differ by 10-25% on a small batch: what is
#: checked for gradients is their direction, the relative L2 difference of all of them together
#: (0.2: cosine similarity >= 0.98); logits, loss and running statistics per tensor at 2e-2.
#: Measured on the check network: logits <= 7e-3, loss <= 6e-4, running stats <= 1e-2,
#: gradients L2 0.07 (Flax) to 0.12 (torch autocast).
BF16_RTOL = 2e-2
BF16_GRAD_L2 = 0.2

CHECK_CASE = {"preset": "book", "size": 32, "batch": 4, "mode": "naive",
              "options": {"block_config": [2, 2], "growth_rate": 8, "num_init_features": 16}}

TORCH_PLAIN = {"channels_last": False, "compile": False, "cudnn_benchmark": False}

#: backend -> (plain opts, [(name, opts, dtype), ...])
CHECKS = {
    "torch": (TORCH_PLAIN, [
        ("channels_last", dict(TORCH_PLAIN, channels_last=True), "float32"),
        ("cudnn.benchmark", dict(TORCH_PLAIN, cudnn_benchmark=True), "float32"),
        ("channels_last + cudnn.benchmark", dict(TORCH_PLAIN, channels_last=True,
                                                 cudnn_benchmark=True), "float32"),
        ("torch.compile", dict(TORCH_PLAIN, compile=True), "float32"),
        ("autocast bfloat16", TORCH_PLAIN, "bfloat16"),
        ("channels_last + autocast bfloat16", dict(TORCH_PLAIN, channels_last=True), "bfloat16"),
    ]),
    "flax-nnx": ({"jit": "none", "donate": False}, [
        ("nnx.jit", {"jit": "nnx", "donate": False}, "float32"),
        ("nnx.jit + donate", {"jit": "nnx", "donate": True}, "float32"),
        ("split/merge + jax.jit", {"jit": "functional", "donate": False}, "float32"),
        ("split/merge + jax.jit + donate", {"jit": "functional", "donate": True}, "float32"),
        ("bfloat16 compute (jax.jit + donate)", {"jit": "functional", "donate": True}, "bfloat16"),
    ]),
    "flax-linen": ({"jit": "none", "donate": False}, [
        ("jax.jit", {"jit": "jax", "donate": False}, "float32"),
        ("jax.jit + donate", {"jit": "jax", "donate": True}, "float32"),
        ("bfloat16 compute (jax.jit + donate)", {"jit": "jax", "donate": True}, "bfloat16"),
    ]),
    "mxnet": ({"hybridize": "none"}, [
        ("hybridize()", {"hybridize": "plain"}, "float32"),
        ("hybridize(static_alloc, static_shape)", {"hybridize": "static"}, "float32"),
        ("AMP bfloat16 (hybridize static)", {"hybridize": "static"}, "bfloat16"),
    ]),
}


def tolerances(dtype: str) -> Dict[str, float]:
    from densenet_parity.compare import EVAL_RTOL, TRAIN_RTOL
    if dtype == "bfloat16":
        return {"eval_logits": BF16_RTOL, "train_loss": BF16_RTOL, "running_stats": BF16_RTOL,
                "gradients_l2": BF16_GRAD_L2}
    return {"eval_logits": EVAL_RTOL, "train_loss": TRAIN_RTOL, "gradients": TRAIN_RTOL,
            "gradients_l2": TRAIN_RTOL, "running_stats": TRAIN_RTOL}


def run_backend(backend: str, names=None, timeout: float = 600) -> List[dict]:
    """Run the checks of one backend in one fresh process; one result per check, each with
    'passed' (bool, or None where the path is not supported here) and the tolerances."""
    plain, checks = CHECKS[backend]
    checks = [c for c in checks if names is None or c[0] in names]
    if backend == "mxnet":
        py = mxnet_python()
        if py is None:
            return [{"backend": backend, "name": n, "status": "unavailable", "passed": None,
                     "error": {"message": MXNET_HINT}} for n, _, _ in checks]
    else:
        py = sys.executable
    cases = [dict(CHECK_CASE, backend=backend, opts=opts, dtype=dtype) for _, opts, dtype in checks]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    proc = subprocess.run([py, "-m", "benchmarks.bench_case", "--check", "--case", json.dumps(cases),
                           "--plain-opts", json.dumps(plain)], cwd=str(ROOT), env=env,
                          capture_output=True, text=True, timeout=timeout)
    line = [x for x in proc.stdout.splitlines() if x.startswith("BENCH_RESULT ")]
    if not line:
        raise RuntimeError(f"{backend} check process failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    out = []
    for (name, _, dtype), r in zip(checks, json.loads(line[-1][len("BENCH_RESULT "):])):
        r = dict(r, backend=backend, name=name, dtype=dtype)
        tol = tolerances(dtype)
        r["tolerances"] = tol
        if r.get("status") == "ok":
            r["passed"] = all(r["diffs"][k] <= tol[k] for k in tol)
        else:
            r["passed"] = None
            if r.get("status") == "error":
                r["stderr_tail"] = proc.stderr[-3000:]
        out.append(r)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", default=",".join(CHECKS))
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    results, failed = [], False
    for b in [x for x in args.backends.split(",") if x]:
        for r in run_backend(b):
            results.append(r)
            d = r.get("diffs") or {}
            verdict = {True: "ok", False: "FAILED", None: r.get("status")}[r["passed"]]
            failed |= r["passed"] is False or r.get("status") == "error"
            diffs = "  ".join(f"{k} {v:.1e}" for k, v in d.items())
            extra = "" if r.get("status") == "ok" else (r.get("error") or {}).get("message", "")[:150]
            print(f"{b:10s} {r['name']:38s} {r['dtype']:8s} {verdict:11s} {diffs}{extra}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
