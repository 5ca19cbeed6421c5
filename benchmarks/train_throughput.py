"""Training throughput of the three trainers on one machine, in one run:
``python -m benchmarks.train_throughput``.

Each backend trains the same network on the same data with the same recipe, through the
training command itself (``densenet train``, one fresh process per run; MXNet in its
own environment), and reports examples per second as the book does (training time only,
evaluation excluded). The first epoch is a warm-up (JAX compiles, Gluon builds its cached
graph, PyTorch's allocator and oneDNN settle) and is left out: the figure is the median over
the other epochs, and over --rounds runs of every backend in turn (interleaved, so that a
machine that gets busier or quieter is shared out fairly).

Writes a table to --out (markdown, default docs/performance/train_throughput.md) and every
number to the same name with .json. On a CPU the table gives ratios to PyTorch, not absolute
figures (they say more about the CPU and its load than about the code); on a GPU, both.

Examples:
  python -m benchmarks.train_throughput                      # digits 32x32, batch 64, 4 epochs
  python -m benchmarks.train_throughput --size 96 --batch-size 256 --rounds 3
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("torch", "mxnet", "flax")


def machine() -> Dict[str, object]:
    from benchmarks import common
    info = common.machine()
    try:
        info["load_average"] = list(os.getloadavg())
    except OSError:
        pass
    try:
        gpus = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.split("\n")
        info["gpus"] = [g.strip() for g in gpus if g.strip()]
    except (OSError, subprocess.SubprocessError):
        info["gpus"] = []
    return info


def thread_env(threads) -> Dict[str, str]:
    """Environment that holds every framework to ``threads`` CPU threads (OpenMP for PyTorch
    and MXNet, XLA's flags for JAX); empty for the frameworks' defaults."""
    if not threads:
        return {}
    xla = (f"--xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'} "
           f"intra_op_parallelism_threads={threads}")
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " " + xla).strip()}


def run_one(backend: str, args, workdir: Path, round_: int) -> Dict[str, object]:
    out = workdir / f"{backend}-{round_}"
    cmd = [sys.executable, "-m", "densenet_cli", "train", "--backend", backend, "--preset", args.preset,
           "--dataset", args.dataset, "--resize", str(args.size), "--batch-size",
           str(args.batch_size), "--epochs", str(args.epochs), "--seed", str(args.seed),
           "--device", args.device, "--out", str(out), "--no-plot", "--no-progress"]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               **thread_env(args.threads))
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        return {"backend": backend, "error": (res.stderr or res.stdout).strip()[-2000:]}
    m = json.loads((out / "metrics.json").read_text())
    timed = m["epochs"][1:] or m["epochs"]
    return {"backend": backend, "device": m["device"], "versions": m["versions"],
            "examples_per_sec": statistics.median(r["examples_per_sec"] for r in timed),
            "per_epoch": [r["examples_per_sec"] for r in m["epochs"]],
            "first_epoch_s": m["epochs"][0]["train_time"] + m["epochs"][0]["compile_time"],
            "compile_s": m["epochs"][0]["compile_time"], "test_acc": m["final"]["test_acc"],
            "loss": m["final"]["loss"], "train": m["dataset"]["train"]}


def summarize(runs: List[Dict[str, object]], backends) -> Dict[str, Dict[str, object]]:
    out = {}
    for b in backends:
        ok = [r for r in runs if r["backend"] == b and "error" not in r]
        if not ok:
            errors = [r["error"] for r in runs if r["backend"] == b]
            out[b] = {"error": errors[0] if errors else "not run"}
            continue
        out[b] = dict(ok[0], examples_per_sec=statistics.median(r["examples_per_sec"] for r in ok),
                      rounds=[r["examples_per_sec"] for r in ok],
                      test_acc=[r["test_acc"] for r in ok])
    return out


def table(summary, on_gpu: bool) -> List[str]:
    ref = summary.get("torch", {}).get("examples_per_sec")
    head = "| backend | device | " + ("examples/s | " if on_gpu else "") + \
        "relative to PyTorch | first epoch (s, compile included) | test acc |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for b, s in summary.items():
        if "error" in s:
            lines.append(f"| {b} | - | " + ("- | " if on_gpu else "") +
                         f"failed: {s['error'].splitlines()[-1][:120]} | - | - |")
            continue
        rel = f"{s['examples_per_sec'] / ref:.2f}" if ref else "-"
        rate = f"{s['examples_per_sec']:.1f} | " if on_gpu else ""
        accs = ", ".join(f"{a:.3f}" for a in s["test_acc"])
        lines.append(f"| {b} | {s['device']} | {rate}{rel} | {s['first_epoch_s']:.1f} | {accs} |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--preset", default="book")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=4, help="the first one is a warm-up")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per framework (OMP_NUM_THREADS, XLA_FLAGS); default: theirs")
    p.add_argument("--out", default=str(ROOT / "docs" / "performance" / "train_throughput.md"))
    args = p.parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    started = _dt.datetime.now().astimezone()
    before = machine()
    runs = []
    with tempfile.TemporaryDirectory(prefix="densenet-throughput-") as tmp:
        for r in range(args.rounds):
            for b in backends:
                res = run_one(b, args, Path(tmp), r)
                runs.append(res)
                shown = (f"{res['examples_per_sec']:.1f} examples/s on {res['device']}"
                         if "error" not in res else "FAILED: " + res["error"].splitlines()[-1])
                print(f"round {r + 1}/{args.rounds} {b}: {shown}", flush=True)
    summary = summarize(runs, backends)
    after = machine()
    on_gpu = any(str(s.get("device", "")).startswith(("cuda", "gpu")) for s in summary.values())
    command = "python -m benchmarks.train_throughput " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    lines = table(summary, on_gpu)
    print("\n".join(lines))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    load = (f"load average {before.get('load_average', ['?'])[0]:.2f} before, "
            f"{after.get('load_average', ['?'])[0]:.2f} after" if "load_average" in before else "")
    md = [
        "# Training throughput: PyTorch, MXNet Gluon, Flax NNX",
        "",
        f"Written by `{command.strip()}` on {started:%Y-%m-%d %H:%M %Z}.",
        "",
        f"Machine: {before['cpu']}, {before['cores']} cores, "
        f"{'GPU ' + ', '.join(before.get('gpus') or ['?']) if on_gpu else 'no GPU (CPU only)'}; "
        f"Python {before['python']}; CPU threads per framework: "
        f"{args.threads or 'the frameworks’ defaults'}; {load}.",
        "",
        f"Each backend trained `{args.preset}` on {args.dataset} "
        f"({summary[backends[0]].get('train', '?')} train images) at {args.size}x{args.size}, "
        f"batch {args.batch_size}, {args.epochs} epochs, with the book's recipe (SGD lr 0.1, "
        "Xavier init, cross-entropy), through `densenet train` in a fresh process "
        "(MXNet in its own environment). Figure: training examples per second as d2l counts "
        "them (evaluation excluded), median over epochs 2 onwards (the first is a warm-up: "
        f"it holds JAX's compilation and Gluon's graph building) and over {args.rounds} "
        "interleaved round(s).",
        "",
    ]
    busy = max(before.get("load_average", [0])[0], after.get("load_average", [0])[0])
    if busy > 0.5 * (before.get("cores") or 1):
        md += [f"Note: a load average of {busy:.1f} on {before.get('cores')} cores means other work "
               "shared the machine during the run; the figures are rough (compare rounds in the "
               "JSON).", ""]
    if not on_gpu:
        md += ["On a CPU the figures are ratios to PyTorch: absolute CPU rates say more about the "
               "CPU (and what else runs on it) than about the code. The JSON next to this file "
               "has the absolute numbers.", ""]
    md += lines + ["", "Versions: " + "; ".join(
        f"{b}: " + ", ".join(f"{k} {v}" for k, v in s.get("versions", {}).items())
        for b, s in summary.items() if "versions" in s), ""]
    out.write_text("\n".join(md))
    out.with_suffix(".json").write_text(json.dumps(
        {"command": command.strip(), "started": started.isoformat(), "machine_before": before,
         "machine_after": after, "settings": vars(args), "runs": runs, "summary": summary},
        indent=1))
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0 if all("error" not in s for s in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
