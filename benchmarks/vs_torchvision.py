"""Our PyTorch DenseNet-121 against torchvision's, in one process: ``python -m
benchmarks.vs_torchvision``.

The same weights (torchvision's state_dict loads into ours: the names are canonical), the same
input, one thread; each (layout, phase) is timed in interleaved rounds, ours then torchvision's,
and the median step time of each gives the ratio ours / torchvision (below 1: ours is faster).
Interleaving in one process is what makes a ratio on a noisy shared machine worth reading:
both models see the same load. Before timing, the outputs (eval) and the loss and gradients
(train) are checked to be the same function.

Layouts: NCHW (contiguous) and channels_last (our default on the CPU). Phases: eval (forward,
no_grad) and train (forward, cross-entropy, backward, SGD step). A third contender, ours with
its ReLUs out of place (as before 2026-11-24: ``nn.ReLU()`` and ``F.relu(x)``), shows what
torchvision's one structural difference, in-place ReLUs, was worth in the same run.

Writes <out>.json and <out>.md with the command and the machine. torchvision from PyPI is a
CUDA build: common.import_torchvision imports it beside the CPU build of torch.

    python -m benchmarks.vs_torchvision --rounds 4 --out docs/performance/vs_torchvision
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import common

OLD = "ours, ReLU out of place"


def step_fn(model, x, labels, phase):
    if phase == "eval":
        def step():
            with torch.no_grad():
                model(x)
        return step
    opt = torch.optim.SGD(model.parameters(), lr=1e-9)

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), labels).backward()
        opt.step()
    return step


def relu_out_of_place(model):
    """A copy of our model whose ReLUs write new tensors (the module ReLUs and the head's)."""
    import copy
    import torch.nn.functional as F
    m = copy.deepcopy(model)
    for mod in m.modules():
        if isinstance(mod, torch.nn.ReLU):
            mod.inplace = False
    m._head = lambda X: m.classifier(torch.flatten(F.adaptive_avg_pool2d(F.relu(X), 1), 1))
    return m


def same_function(ours, tv, x, labels) -> dict:
    """Largest relative differences of the logits (eval) and of the gradients (train)."""
    ours.eval(), tv.eval()
    with torch.no_grad():
        a, b = ours(x), tv(x)
    eval_rel = float((a - b).abs().max() / b.abs().max())
    grads = {}
    for m in (ours, tv):
        m.train()
        m.zero_grad()
        torch.nn.functional.cross_entropy(m(x), labels).backward()
        grads[id(m)] = {k: p.grad.clone() for k, p in m.named_parameters()}
    g_ours, g_tv = grads[id(ours)], grads[id(tv)]
    grad_rel = max(float((g_ours[k] - g_tv[k]).abs().max() / g_tv[k].abs().max().clamp_min(1e-12))
                   for k in g_tv if g_tv[k].abs().max() > 0)
    return {"eval_rel": eval_rel, "grad_rel": grad_rel}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=4, help="interleaved rounds (default 4)")
    ap.add_argument("--iters", type=int, default=3, help="steps per round and model (default 3)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="path without suffix for .json and .md")
    args = ap.parse_args(argv)
    tv_mod = common.import_torchvision()
    if tv_mod is None:
        print("error: torchvision is not installed (pip install --no-deps torchvision==0.28.0 "
              "into a folder on PYTHONPATH)", file=sys.stderr)
        return 2
    import densenet_torch
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tv = tv_mod.models.densenet121(weights=None)
    with torch.no_grad():  # non-trivial BatchNorm statistics, for eval mode
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5)
    ours = densenet_torch.densenet121()
    ours.load_state_dict(tv.state_dict())
    x = torch.randn(args.batch, 3, args.size, args.size)
    labels = torch.randint(0, 1000, (args.batch,))
    check = same_function(ours, tv, x, labels)
    old = relu_out_of_place(ours)
    contenders = (("ours", ours), (OLD, old), ("torchvision", tv))
    results = []
    for layout in ("NCHW", "channels_last"):
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        xs = x.contiguous(memory_format=fmt)
        for phase in ("eval", "train"):
            steps = {}
            for name, m in contenders:
                m.to(memory_format=fmt).train(phase == "train")
                steps[name] = step_fn(m, xs, labels, phase)
                steps[name]()  # warm-up
            times = {name: [] for name, _ in contenders}
            for _ in range(args.rounds):
                for name, _ in contenders:
                    t0 = time.perf_counter()
                    for _ in range(args.iters):
                        steps[name]()
                    times[name].append((time.perf_counter() - t0) / args.iters)
            med = {k: statistics.median(v) for k, v in times.items()}
            results.append({"layout": layout, "phase": phase, "ours_s": med["ours"],
                            "torchvision_s": med["torchvision"],
                            "ratio": med["ours"] / med["torchvision"],
                            "old_s": med[OLD], "old_ratio": med[OLD] / med["torchvision"],
                            "rounds": times})
            print(f"{layout:14s} {phase:5s} ours {med['ours']:.3f} s  torchvision "
                  f"{med['torchvision']:.3f} s  ratio {med['ours'] / med['torchvision']:.3f}  "
                  f"(ReLU out of place: {med[OLD] / med['torchvision']:.3f})", flush=True)
    command = "python -m benchmarks.vs_torchvision " + " ".join(map(shlex.quote, argv or sys.argv[1:]))
    data = {"command": command, "date": _dt.datetime.now().isoformat(timespec="seconds"),
            "machine": common.machine(), "settings": vars(args),
            "versions": {"torch": torch.__version__, "torchvision": tv_mod.__version__},
            "same_function": check, "results": results}
    if args.out:
        out = Path(args.out)
        out.with_suffix(".json").write_text(json.dumps(data, indent=1))
        lines = ["# Our PyTorch DenseNet-121 against torchvision's (CPU)", "",
                 f"Made by `{command}` on {data['date']}, on {data['machine']['cpu']} "
                 f"({data['machine']['cores']} cores), torch {torch.__version__}, torchvision "
                 f"{tv_mod.__version__}, {args.threads} thread(s); DenseNet-121 at "
                 f"{args.size} px, batch {args.batch}; median of {args.rounds} interleaved "
                 f"rounds of {args.iters} steps in one process.", "",
                 f"Same function first: logits differ by {check['eval_rel']:.1e}, gradients by "
                 f"{check['grad_rel']:.1e} (relative).", "",
                 "| layout | phase | ours (s/step) | torchvision (s/step) | ours / torchvision "
                 "| ours, ReLU out of place / torchvision |",
                 "| --- | --- | ---: | ---: | ---: | ---: |"]
        for r in results:
            lines.append(f"| {r['layout']} | {r['phase']} | {r['ours_s']:.3f} | "
                         f"{r['torchvision_s']:.3f} | **{r['ratio']:.3f}** | {r['old_ratio']:.3f} |")
        out.with_suffix(".md").write_text("\n".join(lines) + "\n")
        print(f"wrote {out}.md, {out}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
