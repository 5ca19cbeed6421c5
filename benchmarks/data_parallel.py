"""Data-parallel scaling: training examples/s on 1 and on N devices, per backend, on each
framework's own engine: ``python -m benchmarks.data_parallel``.

Each (backend, devices) runs ``data_parallel_step`` (densenet_<framework>/parallel.py) with
``--steps`` SGD steps on one fixed batch of ``--batch`` images *per device* (weak scaling: N
devices train N times the examples per step), each step timed; the first is dropped (warm-up,
compiling), the median of the rest gives examples/s. The ratio N devices / 1 device is the
figure to read (ideal: N); on a CPU the "devices" share the machine's cores (PyTorch: one
process per device, one thread each; JAX: host devices of one process; Gluon: cpu(i) contexts).

Writes <out>.json and <out>.md with the command and the machine.

    python -m benchmarks.data_parallel --out docs/performance/data_parallel
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import shlex
import statistics
import sys
from pathlib import Path

import numpy as np

from benchmarks import common

BACKENDS = ("torch", "mxnet", "flax-nnx", "flax-linen")


def measure(backend, cfg, size: int, batch: int, devices: int, steps: int) -> dict:
    state = backend.call("init_state", config=cfg.to_dict(), seed=0)["arrays"]
    rng = np.random.default_rng(0)
    n = batch * devices
    x = rng.standard_normal((n, cfg.in_channels, size, size)).astype(np.float32)
    labels = rng.integers(0, cfg.num_classes, n).astype(np.int64)
    out = backend.call("data_parallel_step", config=cfg.to_dict(), state=state, x=x,
                       labels=labels, devices=devices, lr=0.01, dtype="float32", steps=steps)
    timed = out["step_seconds"][1:]
    step = statistics.median(timed)
    return {"devices": devices, "platform": out["platform"], "examples_per_step": n,
            "step_seconds": out["step_seconds"], "median_step_s": step,
            "examples_per_s": n / step}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--preset", default="book")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8, help="images per device (default 8)")
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6, help="timed steps + 1 warm-up (default 6)")
    ap.add_argument("--out", default=None, help="path without suffix for .json and .md")
    args = ap.parse_args(argv)
    if args.steps < 2 or args.devices < 2:
        ap.error("--steps and --devices must be at least 2")
    import densenet_spec as spec
    from densenet_parity.backends import BackendUnavailable, make_backend
    cfg = spec.get_preset(args.preset)
    rows = []
    for name in args.backends.split(","):
        b = make_backend(name)
        try:
            b.call("info")
        except BackendUnavailable as e:
            print(f"{name}: skipped ({e})", file=sys.stderr)
            continue
        one = measure(b, cfg, args.size, args.batch, 1, args.steps)
        many = measure(b, cfg, args.size, args.batch, args.devices, args.steps)
        b.close()
        rows.append({"backend": name, "one": one, "many": many,
                     "ratio": many["examples_per_s"] / one["examples_per_s"]})
        print(f"{name:11s} 1 device {one['examples_per_s']:7.1f} ex/s   {args.devices} devices "
              f"{many['examples_per_s']:7.1f} ex/s   ratio {rows[-1]['ratio']:.2f}", flush=True)
    command = "python -m benchmarks.data_parallel " + " ".join(map(shlex.quote, argv or sys.argv[1:]))
    data = {"command": command, "date": _dt.datetime.now().isoformat(timespec="seconds"),
            "machine": common.machine(), "settings": vars(args), "results": rows}
    if args.out:
        out = Path(args.out)
        out.with_suffix(".json").write_text(json.dumps(data, indent=1))
        m = data["machine"]
        lines = ["# Data-parallel scaling (CPU)", "",
                 f"Made by `{command}` on {data['date']}, on {m['cpu']} ({m['cores']} cores), "
                 f"OMP_NUM_THREADS={m['omp_num_threads']}; the {args.preset} network at "
                 f"{args.size} px, float32, {args.batch} images per device, median of "
                 f"{args.steps - 1} timed SGD steps after one warm-up.", "",
                 "On a CPU the devices share its cores, so the ratio says how much of a second "
                 "core each engine turns into training speed, not what GPUs would do.", "",
                 f"| backend | 1 device (ex/s) | {args.devices} devices (ex/s) | ratio |",
                 "| --- | ---: | ---: | ---: |"]
        for r in rows:
            lines.append(f"| {r['backend']} | {r['one']['examples_per_s']:.1f} | "
                         f"{r['many']['examples_per_s']:.1f} | **{r['ratio']:.2f}** |")
        out.with_suffix(".md").write_text("\n".join(lines) + "\n")
        print(f"wrote {out}.md, {out}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
