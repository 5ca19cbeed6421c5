"""The chapter's exercises, answered by measurement: ``python -m benchmarks.exercises CMD``.

Subcommands (each writes docs/exercises/<name>.json and prints the Markdown tables that
docs/exercises.md shows; every record names its command and machine):

  params    exercises 2 and 4: where DenseNet-121's parameters sit (per stage, per kind) from
            the spec's arithmetic, beside ResNet-50 (torchvision's published count, and the
            count of torchvision.models.resnet50 where torchvision imports); the Table 1
            presets against the paper and torchvision. Seconds, no framework needed.
  pooling   exercise 1: the book's model trained with average and with max pooling in the
            transitions (``densenet train --transition-pool``), same data and seeds, in each
            framework; curves (pooling.png) and final accuracies. Minutes.
  memory    exercise 3: peak training memory at 224x224 (the book's model, 1 channel, and
            DenseNet-121, 3 channels), naive vs memory-efficient, each case in its own process
            (benchmarks.bench's memory cases: peak RSS on a CPU). Minutes to tens of minutes.

Nothing here runs in the test suite but ``params`` (parity_tests/test_benchmarks.py).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import densenet_spec as spec
from benchmarks import common

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "exercises"
CPU_MACHINE = "this project's CPU machine (2 cores, 24 GiB, no GPU)"

#: torchvision's published parameter counts (torchvision.models weights' ``num_params``).
TORCHVISION = {"densenet121": 7_978_856, "densenet161": 28_681_000, "densenet169": 14_149_480,
               "densenet201": 20_013_928, "resnet50": 25_557_032}
#: The paper's Table 1 (Huang et al., CVPR 2017): layers per dense block and growth rate of
#: the four ImageNet DenseNet-BC; DenseNet-264 is in Table 1 and Figure 3 but has no
#: pretrained torchvision model (no published count to compare with).
PAPER_TABLE1 = {"densenet121": ((6, 12, 24, 16), 32), "densenet169": ((6, 12, 32, 32), 32),
                "densenet201": ((6, 12, 48, 32), 32), "densenet264": ((6, 12, 64, 48), 32)}
#: The ImageNet presets, Table 1's and DenseNet-161 (k = 48: the authors' released model, which
#: torchvision ships; not in Table 1).
IMAGENET = ("densenet121", "densenet169", "densenet201", "densenet264", "densenet161")
#: The forum's figures (the chapter's discussion thread, exercise 3): GPU memory in use while
#: training at 96x96 on a 4096 MiB card.
FORUM_MIB = {"densenet (the book's, 96x96)": 3161, "resnet-18 (the book's, 96x96)": 2725}


def machine() -> Dict[str, object]:
    return dict(common.machine(), words=CPU_MACHINE)


def command_line() -> str:
    return "python -m benchmarks.exercises " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def write(name: str, record: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def table(header: List[str], rows: List[List[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- params

def _kind(name: str) -> str:
    """What a canonical tensor is, in the words of exercise 2's answer."""
    module, leaf = name.rsplit(".", 1)
    if leaf in ("running_mean", "running_var"):
        return "bn state"
    if ".norm" in module or module.endswith("norm0"):
        return "bn"
    if module == "classifier":
        return "classifier"
    if module.endswith("conv0"):
        return "stem conv"
    if ".transition" in module:
        return "transition 1x1"
    if module.endswith("conv2"):
        return "layer 3x3"
    # conv1: the bottleneck's 1x1 (bn_size given) or the book's plain 3x3
    return "bottleneck 1x1"


def breakdown(cfg) -> Dict[str, Dict[str, int]]:
    """Trainable parameters per stage and per kind (BatchNorm state apart), from the spec."""
    out: Dict[str, Dict[str, int]] = {}
    for name, shape, _ in spec.canonical_tensors(cfg):
        kind = _kind(name)
        if kind == "bn state":
            continue
        if kind == "bottleneck 1x1" and cfg.bn_size is None:
            kind = "layer 3x3"
        n = 1
        for d in shape:
            n *= d
        stage = spec.stage_of(name)
        out.setdefault(stage, {}).setdefault(kind, 0)
        out[stage][kind] += n
    return out


def resnet50_breakdown() -> Optional[Dict[str, Dict[str, int]]]:
    """torchvision.models.resnet50's parameters counted per stage (conv1+bn1, layer1..4, fc)
    and per kind (7x7 stem conv, 1x1 convs, 3x3 convs, BatchNorm, fc), no weights downloaded;
    None where torchvision does not import."""
    try:
        tv = common.import_torchvision()
    except ImportError:
        return None
    if tv is None:
        return None
    from torch import nn
    model = tv.models.resnet50()
    out: Dict[str, Dict[str, int]] = {}
    for name, m in model.named_modules():
        own = sum(p.numel() for p in m.parameters(recurse=False))
        if not own:
            continue
        stage = name.split(".")[0] if name.startswith("layer") else (
            "fc" if name == "fc" else "stem")
        if isinstance(m, nn.Conv2d):
            kind = {7: "stem conv", 1: "1x1 conv", 3: "3x3 conv"}[m.kernel_size[0]]
        elif isinstance(m, nn.BatchNorm2d):
            kind = "bn"
        else:
            kind = "classifier"
        out.setdefault(stage, {}).setdefault(kind, 0)
        out[stage][kind] += int(own)
    return out


def book_resnet18() -> Dict[str, int]:
    """The book's ResNet-18 (the previous section of Dive into Deep Learning: 1 input channel,
    10 classes; every conv with a bias; ``Residual`` = 3x3 conv-BN-ReLU-3x3 conv-BN, a 1x1
    conv on the shortcut where the shape changes), counted per stage by arithmetic: what the
    forum's answer to exercise 2 compares the book's DenseNet with."""
    def conv(cin, cout, k):
        return k * k * cin * cout + cout

    def residual(cin, c, shortcut):
        return conv(cin, c, 3) + conv(c, c, 3) + (conv(cin, c, 1) if shortcut else 0) + 4 * c
    out = {"b1 (7x7 conv, BN)": conv(1, 64, 7) + 2 * 64}
    cin = 64
    for i, c in enumerate((64, 128, 256, 512)):
        out[f"resnet block {i + 2} ({c} channels)"] = residual(cin, c, c != cin) + residual(c, c, False)
        cin = c
    out["dense (512 -> 10)"] = 512 * 10 + 10
    return out


KINDS = ("stem conv", "bottleneck 1x1", "layer 3x3", "transition 1x1", "bn", "classifier")


def cmd_params(args) -> dict:
    cfg = spec.get_preset("densenet121")
    parts = breakdown(cfg)
    total = spec.total_counts(cfg)[0]
    stages = []
    c = cfg.num_init_features
    for name, channels in spec.stage_channels(cfg):
        stages.append({"stage": name, "out_channels": channels,
                       "params": sum(parts.get(name, {}).values()),
                       **{k: parts.get(name, {}).get(k, 0) for k in KINDS}})
    by_kind = {k: sum(s[k] for s in stages) for k in KINDS}
    resnet = None if args.no_torchvision else resnet50_breakdown()
    counted = sum(sum(v.values()) for v in resnet.values()) if resnet else None
    presets = []
    for name in IMAGENET:
        p = spec.get_preset(name)
        blocks, k = PAPER_TABLE1.get(name, (None, None))
        presets.append({
            "preset": name, "block_config": list(p.block_config), "growth_rate": p.growth_rate,
            "num_init_features": p.num_init_features, "bn_size": p.bn_size,
            "compression": p.compression,
            "paper_block_config": list(blocks) if blocks else None, "paper_growth_rate": k,
            "matches_paper": (tuple(p.block_config) == blocks and p.growth_rate == k)
            if blocks else None,
            "depth": 1 + 2 * sum(p.block_config) + len(p.block_config) - 1 + 1,
            "params": spec.total_counts(p)[0], "bn_state": spec.total_counts(p)[1],
            "torchvision_params": TORCHVISION.get(name)})
    book = spec.get_preset("book")
    record = {
        "command": command_line(), "machine": machine(),
        "source": "densenet_spec.canonical_tensors / stage_counts (analytic, no framework)",
        "densenet121": {"total": total, "stages": stages, "by_kind": by_kind,
                        "torchvision_published": TORCHVISION["densenet121"]},
        "resnet50": {"torchvision_published": TORCHVISION["resnet50"],
                     "counted_torchvision_models_resnet50": counted,
                     "stages": resnet},
        "book_resnet18": book_resnet18(),
        "book": {"total": spec.total_counts(book)[0], "stages": [
            {"stage": s, "params": sum(v.values()), **v} for s, v in breakdown(book).items()]},
        "table1": presets,
    }
    print(render_params(record))
    if not args.dry:
        print(f"\nwrote {write('params', record, Path(args.out))}")
    return record


def render_params(r: dict) -> str:
    d = r["densenet121"]
    rows = [[s["stage"], s["out_channels"], f"{s['params']:,}"] + [f"{s[k]:,}" for k in KINDS]
            for s in d["stages"]]
    rows.append(["**total**", "", f"**{d['total']:,}**"] + [f"{d['by_kind'][k]:,}" for k in KINDS])
    out = [table(["stage", "channels out", "params"] + list(KINDS), rows)]
    rn = r["resnet50"]
    out.append(f"\nDenseNet-121 {d['total']:,} (torchvision: {d['torchvision_published']:,}); "
               f"ResNet-50 {rn['torchvision_published']:,} published"
               + (f", {rn['counted_torchvision_models_resnet50']:,} counted on "
                  "torchvision.models.resnet50()" if rn["counted_torchvision_models_resnet50"]
                  else " (torchvision not importable here: not counted)")
               + f": ratio {rn['torchvision_published'] / d['total']:.2f}")
    if rn.get("stages"):
        kinds = ("stem conv", "1x1 conv", "3x3 conv", "bn", "classifier")
        rows = [[st, f"{sum(v.values()):,}"] + [f"{v.get(k, 0):,}" for k in kinds]
                for st, v in rn["stages"].items()]
        tot = {k: sum(v.get(k, 0) for v in rn["stages"].values()) for k in kinds}
        rows.append(["**total**", f"**{sum(tot.values()):,}**"] + [f"{tot[k]:,}" for k in kinds])
        out.append("\nResNet-50 (torchvision.models.resnet50, counted):\n\n"
                   + table(["stage", "params"] + list(kinds), rows))
    bk = {s["stage"]: s["params"] for s in r["book"]["stages"]}
    rs = r["book_resnet18"]
    out.append(f"\nThe book's models (1 channel, 10 classes): DenseNet {r['book']['total']:,} "
               f"({', '.join(f'{k} {v:,}' for k, v in bk.items())}); ResNet-18 "
               f"{sum(rs.values()):,} ({', '.join(f'{k} {v:,}' for k, v in rs.items())})")
    rows = [[p["preset"], "-".join(map(str, p["block_config"])), p["growth_rate"],
             p["num_init_features"],
             "-".join(map(str, p["paper_block_config"])) if p["paper_block_config"] else
             "not in Table 1", p["paper_growth_rate"] or "-",
             {True: "yes", False: "NO", None: "-"}[p["matches_paper"]],
             f"{p['params']:,}", f"{p['torchvision_params']:,}" if p["torchvision_params"] else "none",
             ("equal" if p["params"] == p["torchvision_params"] else "DIFFERENT")
             if p["torchvision_params"] else "-"] for p in r["table1"]]
    out.append("\n" + table(["preset", "blocks (ours)", "k", "initial features",
                             "blocks (paper)", "k (paper)", "matches", "params (spec)",
                             "torchvision", "counts"], rows))
    return "\n".join(out)


# ----------------------------------------------------------------------------- pooling

def _train(backend: str, pool: str, seed: int, args, where: Path) -> dict:
    out = where / f"{backend}-{pool}-{seed}"
    cmd = [sys.executable, "-m", "densenet_cli", "train", "--backend", backend,
           "--transition-pool", pool, "--dataset", "digits", "--resize", str(args.size),
           "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
           "--lr", repr(args.lr), "--seed", str(seed), "--out", str(out), "--overwrite",
           "--no-progress", "--no-plot"]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=str(ROOT), env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"backend": backend, "pool": pool, "seed": seed, "status": "error",
                "error": (proc.stderr or proc.stdout)[-2000:]}
    m = json.loads((out / "metrics.json").read_text())
    return {"backend": backend, "pool": pool, "seed": seed, "status": "ok", "wall_s": wall,
            "device": m["device"], "network": m["network"], "book_line": m["book_line"],
            "first_step_loss": m["first_step_loss"],
            "epochs": [{k: e[k] for k in ("epoch", "loss", "train_acc", "test_acc")}
                       for e in m["epochs"]],
            "final": {k: m["epochs"][-1][k] for k in ("loss", "train_acc", "test_acc")},
            "versions": m.get("versions"),
            "command": "densenet train " + " ".join(shlex.quote(a) for a in cmd[4:])}


def cmd_pooling(args) -> dict:
    if args.replot:
        record = json.loads((Path(args.out) / "pooling.json").read_text())
        plot_pooling(record, Path(args.out) / "pooling.png")
        print(render_pooling(record))
        return record
    runs = []
    with tempfile.TemporaryDirectory(prefix="exercise-pooling-") as tmp:
        for backend in args.backends:
            seeds = args.seeds if backend in args.all_seeds_for else args.seeds[:1]
            for seed in seeds:
                for pool in ("avg", "max"):
                    r = _train(backend, pool, seed, args, Path(tmp))
                    runs.append(r)
                    print(f"{backend} {pool} seed {seed}: " + (
                        f"test acc {r['final']['test_acc']:.3f}, loss {r['final']['loss']:.3f}"
                        f" ({r['wall_s']:.0f} s)" if r["status"] == "ok" else r["error"][-400:]),
                        flush=True)
    settings = {"dataset": "digits", "size": args.size, "epochs": args.epochs,
                "batch_size": args.batch_size, "lr": args.lr, "seeds": args.seeds,
                "threads": os.environ.get("OMP_NUM_THREADS")}
    out = Path(args.out)
    old = out / "pooling.json"
    if args.merge and old.exists():
        # Runs of other backends (or seeds) from an earlier command with the same settings stay.
        prev = json.loads(old.read_text())
        if {k: v for k, v in prev["settings"].items() if k != "seeds"} == {
                k: v for k, v in settings.items() if k != "seeds"}:
            mine = {(r["backend"], r["pool"], r["seed"]) for r in runs}
            runs = [r for r in prev["runs"] if (r["backend"], r["pool"], r["seed"]) not in mine] + runs
            settings["seeds"] = sorted({r["seed"] for r in runs})
    order = {b: i for i, b in enumerate(("torch", "mxnet", "flax"))}
    runs.sort(key=lambda r: (order.get(r["backend"], 9), r["seed"], r["pool"]))
    record = {"command": command_line(), "machine": machine(), "settings": settings, "runs": runs}
    write("pooling", record, out)
    plot_pooling(record, out / "pooling.png")
    print(render_pooling(record))
    return record


def plot_pooling(record: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(8.5, 3.4), dpi=120)
    colors = {"torch": "C0", "mxnet": "C1", "flax": "C2"}
    for r in record["runs"]:
        if r["status"] != "ok":
            continue
        ep = [e["epoch"] for e in r["epochs"]]
        style = "-" if r["pool"] == "avg" else "--"
        first = r["seed"] == record["settings"]["seeds"][0]
        label = f"{r['backend']} {r['pool']}" if first else None  # one entry per line style
        alpha = 1.0 if first else 0.35
        kw = dict(color=colors.get(r["backend"], "k"), linestyle=style, marker="o",
                  markersize=2.5, alpha=alpha, label=label)
        left.plot(ep, [e["loss"] for e in r["epochs"]], **kw)
        right.plot(ep, [e["test_acc"] for e in r["epochs"]], **kw)
    left.set_yscale("log")
    for ax, what in ((left, "train loss"), (right, "test accuracy")):
        ax.set_xlabel("epoch")
        ax.set_title(what, fontsize=9)
        ax.grid(True, alpha=0.3)
    right.legend(fontsize=6, ncol=2)
    s = record["settings"]
    fig.suptitle(f"the book's DenseNet, transition pooling avg (solid) vs max (dashed); seed "
                 f"{s['seeds'][0]} bold, seeds {', '.join(map(str, s['seeds'][1:]))} faint\n"
                 f"digits {s['size']}x{s['size']}, batch {s['batch_size']}, lr {s['lr']}, "
                 f"{s['epochs']} epochs; {CPU_MACHINE}", fontsize=7.5)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def render_pooling(record: dict) -> str:
    rows = []
    for r in record["runs"]:
        if r["status"] != "ok":
            rows.append([r["backend"], r["pool"], r["seed"], "error", "", "", ""])
            continue
        f = r["final"]
        best = max(e["test_acc"] for e in r["epochs"])
        rows.append([r["backend"], r["pool"], r["seed"], f"{f['loss']:.4f}", f"{f['train_acc']:.3f}",
                     f"{f['test_acc']:.3f}", f"{best:.3f}", f"{r['wall_s']:.0f} s"])
    runs = table(["backend", "pool", "seed", "final train loss", "final train acc",
                  "final test acc", "best test acc", "wall"], rows)
    groups: Dict[tuple, List[dict]] = {}
    for r in record["runs"]:
        if r["status"] == "ok":
            groups.setdefault((r["backend"], r["pool"]), []).append(r)
    rows = []
    for (backend, pool), rs in groups.items():
        acc = [r["final"]["test_acc"] for r in rs]
        loss = [r["final"]["loss"] for r in rs]
        rows.append([backend, pool, len(rs), f"{sum(acc) / len(acc):.3f}",
                     f"{min(acc):.3f} - {max(acc):.3f}", f"{sum(loss) / len(loss):.4f}"])
    summary = table(["backend", "pool", "seeds", "mean final test acc", "range",
                     "mean final train loss"], rows)
    return summary + "\n\n" + runs


# ----------------------------------------------------------------------------- memory

def cmd_memory(args) -> dict:
    from benchmarks import bench
    from benchmarks.defaults import default_opts
    if args.resnet:
        path = Path(args.out) / "memory.json"
        record = json.loads(path.read_text()) if path.exists() else {"results": []}
        record["torchvision"] = [torchvision_memory(m, args) for m in ("resnet50", "densenet121")]
        record["torchvision_command"] = command_line()
        for r in record["torchvision"]:
            print(r if r["status"] != "ok" else
                  f"torchvision {r['model']}: peak RSS {r['rss_peak_bytes'] / 2**20:.0f} MiB, "
                  f"training adds {(r['rss_peak_bytes'] - r['rss_before_bytes']) / 2**20:.0f} MiB")
        write("memory", record, Path(args.out))
        return record
    path = Path(args.out) / "memory.json"
    # the torchvision figures of an earlier `memory --resnet` stay
    earlier = json.loads(path.read_text()) if path.exists() else {}
    kept = {k: earlier[k] for k in ("torchvision", "torchvision_command") if k in earlier}
    results = []
    for preset in args.presets:
        for backend in args.backends:
            for mode in ("naive", "efficient"):
                case = {"group": "memory", "backend": backend, "preset": preset,
                        "size": args.size, "batch": args.batch, "dtype": "float32",
                        "mode": mode, "phases": ["train"], "opts": default_opts(backend, False),
                        "warmup": 1, "repeats": 1, "iters": 1, "threads": args.threads}
                r = bench.run_one(case, args.case_timeout, False)
                results.append(r)
                print(memory_line(r), flush=True)
                write("memory", {"command": command_line(), "machine": machine(),
                                 "partial": True, "results": results, **kept}, Path(args.out))
    record = {"command": command_line(), "machine": machine(),
              "settings": {k: v for k, v in vars(args).items() if k != "func"},
              "forum_gpu_mib_96px": FORUM_MIB, "results": results}
    record.update(kept)
    write("memory", record, Path(args.out))
    print(render_memory(record))
    return record


def _mem(r: dict) -> Optional[dict]:
    t = r.get("phases", {}).get("train", {})
    m = t.get("memory")
    if r.get("status") != "ok" or not m:
        return None
    return {"peak": m["rss_peak_bytes"], "before": m["rss_before_bytes"],
            "training": m["rss_peak_bytes"] - m["rss_before_bytes"], "step_s": t["step_s"]}


def memory_line(r: dict) -> str:
    c, m = r["case"], _mem(r)
    head = f"{c['preset']} {c['backend']} {c['mode']} batch {c['batch']} {c['size']}px:"
    if m is None:
        return f"{head} {r.get('status')}: {r.get('error', {}).get('message', '')[:200]}"
    return (f"{head} peak RSS {m['peak'] / 2**20:.0f} MiB, training adds "
            f"{m['training'] / 2**20:.0f} MiB, step {m['step_s']:.1f} s")


def render_memory(record: dict) -> str:
    rows = []
    by = {}
    for r in record["results"]:
        c = r["case"]
        by[(c["preset"], c["backend"], c["mode"])] = r
    for (preset, backend, mode), r in by.items():
        if mode != "naive":
            continue
        n, e = _mem(r), _mem(by.get((preset, backend, "efficient"), {}))
        eff = by.get((preset, backend, "efficient"), {})
        cell = lambda m, k: f"{m[k] / 2**20:,.0f}" if m else "—"  # noqa: E731
        note = "" if e else ("not available in Gluon (MXNet 1.9.1 cannot recompute in a "
                             "hybridized block)" if eff.get("status") == "unsupported" else
                             eff.get("status", "not run"))
        rows.append([preset, backend, r["case"]["batch"], cell(n, "peak"), cell(n, "training"),
                     cell(e, "peak"), cell(e, "training"),
                     f"{e['training'] / n['training']:.2f}" if n and e else "—", note])
    # (step times are in the JSON; on a shared machine they say little)
    return table(["network", "backend", "batch", "naive peak RSS (MiB)", "naive training (MiB)",
                  "efficient peak RSS (MiB)", "efficient training (MiB)",
                  "training efficient / naive", "note"], rows)


def cmd_tv_memory(args) -> dict:
    """One torchvision model's train step (forward, cross-entropy, backward, SGD) in this
    process, measured as bench_case measures ours: peak RSS, and the RSS before the first
    step. Run by ``memory --resnet`` in a process of its own."""
    import torch
    torch.set_num_threads(args.threads)
    tv = common.import_torchvision()
    if tv is None:
        rec = {"model": args.model, "status": "unavailable"}
        print("TV_RESULT " + json.dumps(rec))
        return rec
    torch.manual_seed(0)
    model = getattr(tv.models, args.model)().train()
    opt = torch.optim.SGD(model.parameters(), lr=common.LR)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 1000, (args.batch,))
    before = common.rss_bytes()
    times = []
    for _ in range(2):
        t0 = common.now()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        times.append(common.now() - t0)
    rec = {"model": args.model, "status": "ok", "batch": args.batch, "size": args.size,
           "params": int(sum(p.numel() for p in model.parameters())),
           "rss_before_bytes": before, "rss_peak_bytes": common.peak_rss_bytes(),
           "step_s": times[-1], "torchvision": tv.__version__, "torch": torch.__version__}
    print("TV_RESULT " + json.dumps(rec))
    return rec


def torchvision_memory(model: str, args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.exercises", "tv-memory", "--model",
                           model, "--batch", str(args.batch), "--size", str(args.size),
                           "--threads", str(args.threads)], cwd=str(ROOT), env=env,
                          capture_output=True, text=True, timeout=args.case_timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("TV_RESULT "):
            return json.loads(line[len("TV_RESULT "):])
    return {"model": model, "status": "error", "error": proc.stderr[-2000:]}


# ----------------------------------------------------------------------------- main

def _csv(s: str) -> List[str]:
    return [x for x in s.split(",") if x]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.exercises", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("params", help="exercises 2 and 4: parameter arithmetic, Table 1")
    p.add_argument("--no-torchvision", action="store_true",
                   help="do not count torchvision.models.resnet50 (the published figure only)")
    p.add_argument("--dry", action="store_true", help="print only, write nothing")
    p.set_defaults(func=cmd_params)
    p = sub.add_parser("pooling", help="exercise 1: average vs max pooling in the transitions")
    p.add_argument("--backends", type=_csv, default=["torch", "mxnet", "flax"])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--seeds", type=lambda s: [int(x) for x in _csv(s)], default=[0])
    p.add_argument("--all-seeds-for", type=_csv, default=["torch"],
                   help="backends run with every seed (the others with the first)")
    p.add_argument("--no-merge", dest="merge", action="store_false",
                   help="replace pooling.json (default: keep the runs of other backends and "
                   "seeds made with the same settings)")
    p.add_argument("--replot", action="store_true",
                   help="only redraw pooling.png and print the tables from pooling.json")
    p.set_defaults(func=cmd_pooling)
    p = sub.add_parser("memory", help="exercise 3: training memory at 224x224, naive vs efficient")
    p.add_argument("--presets", type=_csv, default=["book", "densenet121"])
    p.add_argument("--backends", type=_csv, default=["torch", "mxnet", "flax-nnx", "flax-linen"])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--case-timeout", type=float, default=900.0)
    p.add_argument("--resnet", action="store_true",
                   help="only torchvision's resnet50 and densenet121, same batch and size, each in "
                   "its own process (the same measurement as ours), into memory.json's 'torchvision'")
    p.set_defaults(func=cmd_memory)
    p = sub.add_parser("tv-memory", help="(internal) one torchvision model's train step memory")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=cmd_tv_memory)
    for p in sub.choices.values():
        p.add_argument("--out", default=str(OUT), help="directory for <name>.json (and .png)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
