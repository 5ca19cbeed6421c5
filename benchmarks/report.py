"""The benchmark's markdown tables and plot, from its JSON (``python -m benchmarks.report
RESULTS.json`` redraws them). On a CPU the tables give ratios (the absolute figures are in the
JSON); on a GPU they give absolute images/s and GiB as well.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional

GIB = 2 ** 30
BACKEND_ORDER = ("torch", "mxnet", "flax-nnx", "flax-linen", "torchvision", "mxnet-zoo")
FRAMEWORK = {"torch": "PyTorch", "torchvision": "PyTorch", "mxnet": "MXNet Gluon",
             "mxnet-zoo": "MXNet Gluon", "flax-nnx": "Flax NNX", "flax-linen": "Flax linen"}
GOAL_MEMORY, GOAL_TIME = 0.5, 1.2


# ----------------------------------------------------------------------------- lookups

def ok(r) -> bool:
    return bool(r) and r.get("status") == "ok"


def results(data, group) -> List[dict]:
    return [r for r in data["results"] if r["case"].get("group") == group]


def find(data, group, **kw) -> Optional[dict]:
    for r in results(data, group):
        if all(r["case"].get(k) == v for k, v in kw.items()):
            return r
    return None


def img_s(r, phase) -> Optional[float]:
    if ok(r) and phase in r.get("phases", {}):
        return r["phases"][phase]["img_s"]
    return None


def on_gpu(r) -> bool:
    return ok(r) and str(r.get("device", "")).startswith(("cuda", "gpu"))


def peak_bytes(r, phase="train") -> Optional[int]:
    """The phase's peak: the device allocator's on a GPU, the process's peak RSS on a CPU."""
    if not ok(r) or phase not in r.get("phases", {}):
        return None
    m = r["phases"][phase]["memory"]
    return m.get("device_peak_bytes") or m.get("rss_peak_bytes")


def growth_bytes(r, phase="train") -> Optional[int]:
    """Memory the phase added on top of what the process held before it (CPU: peak RSS minus
    RSS before the phase; GPU: allocator peak minus allocated before)."""
    if not ok(r) or phase not in r.get("phases", {}):
        return None
    m = r["phases"][phase]["memory"]
    if m.get("device_peak_over_before_bytes") is not None:
        return m["device_peak_over_before_bytes"]
    if m.get("rss_peak_bytes") and m.get("rss_before_bytes"):
        return m["rss_peak_bytes"] - m["rss_before_bytes"]
    return None


def xla_bytes(r, phase="train") -> Optional[int]:
    if not ok(r) or phase not in r.get("phases", {}):
        return None
    c = r["phases"][phase]["memory"].get("compiled") or {}
    return c.get("total_bytes")


def ratio(a, b) -> Optional[float]:
    return a / b if a is not None and b else None


def fmt(x, digits=2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def gib(x) -> str:
    return "—" if x is None else f"{x / GIB:.2f}"


def status_text(r) -> str:
    if r is None:
        return "not run"
    if ok(r):
        return "ok"
    e = r.get("error") or {}
    return f"{r.get('status')}: {e.get('message', '')}".replace("|", "/").replace("\n", " ")


def is_gpu_run(data) -> bool:
    return bool(data["machine"].get("gpu")) or any(on_gpu(r) for r in data["results"])


# ----------------------------------------------------------------------------- markdown

def header(data, title) -> List[str]:
    m = data["machine"]
    devices = sorted({r.get("device") for r in data["results"] if ok(r)})
    versions: Dict[str, List[str]] = {}
    for r in data["results"]:
        for k, v in (r.get("versions") or {}).items():
            if k in ("torch", "torchvision", "jax", "jaxlib", "flax", "mxnet", "cuda", "cudnn"):
                if v not in versions.setdefault(k, []):
                    versions[k].append(v)
    numpys = sorted({(r.get("versions") or {}).get("numpy") for r in data["results"]} - {None})
    loads = [x for r in data["results"] for x in (r.get("loadavg_before") or [])[:1]]
    lines = [f"# {title}", "",
             "Made by (from the repository root):", "", "```",
             *(data.get("commands") or [data["command"]]), "```", "",
             f"- Machine: {m['cpu']}, {m['cores']} cores (CPU flags: "
             f"{' '.join(m.get('cpu_flags') or []) or 'n/a'}); "
             + (f"GPU: {m['gpu']}" if m.get("gpu") else "no GPU"),
             f"- Devices used: {', '.join(devices) or 'none'}",
             "- Versions: " + ", ".join(k + " " + " / ".join(v) for k, v in versions.items())
             + "; "
             f"numpy {' / '.join(numpys)}; Python {m['python']}",
             f"- Started {data['started']}"
             + (f", took {data['duration_s'] / 60:.1f} min" if data.get("duration_s") else "")
             + (f" (the last command; {data['merged_from']['kept_results']} results kept from "
                "the earlier one(s))" if data.get("merged_from") else ""),
             ]
    if loads:
        lines.append(f"- Load average (1 min) at the start of the cases: {min(loads):.1f} to "
                     f"{max(loads):.1f} on {m['cores']} cores"
                     + (" — other work was running: figures are noisier than the repeats show"
                        if max(loads) > (m['cores'] or 1) + 0.5 else ""))
    s = data["settings"]
    lines += ["", "Method: each case is a fresh process; per phase "
              f"{s['warmup']} warm-up step(s) (the first one, which holds compilation, reported "
              f"apart), then the median of {s['repeats']} timed runs of {s['iters']} step(s) "
              "(the reference and memory suites may use fewer, see the JSON)"
              + (f"; each case run in {s['rounds']} rounds (interleaved fresh processes), the "
                 "median over rounds reported" if s.get("rounds", 1) > 1 else "")
              + ", the device "
              "synchronised before each clock read. 'eval' = forward in inference mode; 'train' "
              "= forward + cross-entropy + backward + plain SGD update (lr 0.1). Memory: CPU = "
              "the case process's peak RSS (getrusage), GPU = the framework allocator's peak "
              "(torch.cuda.max_memory_allocated; JAX memory_stats peak_bytes_in_use); for JAX "
              "also XLA's memory analysis of the compiled step (arguments + outputs + "
              "temporaries - aliased).", ""]
    return lines


def table(head: List[str], rows: List[List[str]]) -> List[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out + [""]


def section_main(data, gpu) -> List[str]:
    rs = results(data, "main")
    if not rs:
        return []
    c0 = rs[0]["case"]
    lines = [f"## (a) Backends: {c0['preset']}, {c0['size']} px, batch {c0['batch']}", ""]
    if gpu:
        lines.append("Absolute images/s and peak memory of the train step, and ratios to PyTorch "
                     "at the same dtype and mode (> 1: faster than PyTorch; memory < 1: less).")
    else:
        lines.append("Ratios to PyTorch at the same dtype and mode: throughput of the backend / "
                     "throughput of PyTorch (> 1: faster than PyTorch), peak memory of the backend "
                     "/ PyTorch's (< 1: less). The PyTorch rows give the ratio to PyTorch "
                     "float32. Absolute figures: the JSON.")
    lines.append("")
    head = ["backend", "dtype", "mode", "device"]
    if gpu:
        head += ["eval img/s", "train img/s", "train peak GiB"]
    head += ["eval vs torch", "train vs torch", "train peak memory vs torch", "fast paths", "status"]
    rows = []
    order = sorted(rs, key=lambda r: (BACKEND_ORDER.index(r["case"]["backend"]),
                                      r["case"]["dtype"], r["case"]["mode"]))
    for r in order:
        c = r["case"]
        ref = find(data, "main", backend="torch", dtype=c["dtype"], mode=c["mode"])
        if c["backend"] == "torch":
            ref = find(data, "main", backend="torch", dtype="float32", mode=c["mode"])
        row = [c["backend"], c["dtype"], c["mode"], str(r.get("device", "—"))]
        if gpu:
            row += [fmt(img_s(r, "eval"), 1), fmt(img_s(r, "train"), 1), gib(peak_bytes(r))]
        row += [fmt(ratio(img_s(r, "eval"), img_s(ref, "eval"))),
                fmt(ratio(img_s(r, "train"), img_s(ref, "train"))),
                fmt(ratio(peak_bytes(r), peak_bytes(ref))),
                opts_text(r), status_text(r)]
        rows.append(row)
    lines += table(head, rows)
    notes = sorted({n for r in rs if ok(r) for n in r.get("notes", [])})
    lines += [f"- {n}" for n in notes] + ([""] if notes else [])
    return lines


def opts_text(r) -> str:
    o = r.get("opts") if ok(r) else r["case"].get("opts")
    if not o:
        return "—"
    return ", ".join(f"{k}={v}" for k, v in o.items())


def section_reference(data, gpu) -> List[str]:
    rs = results(data, "reference")
    if not rs:
        return []
    c0 = rs[0]["case"]
    lines = [f"## (b) Ours vs the framework's own DenseNet: {c0['preset']}, {c0['size']} px, "
             f"batch {c0['batch']}", "",
             "Time ratio = our step time / the reference's step time (<= 1.0: ours at least as "
             "fast, the goal). Memory ratio = our train peak / the reference's. References: "
             "torchvision.models.densenet121 (PyTorch), mxnet.gluon.model_zoo.vision.densenet121 "
             "(Gluon; fixed 7x7 pool, so 224 px only), both with the same fast paths as ours. "
             "Flax has no reference DenseNet.", ""]
    head = ["framework", "dtype", "ours", "reference", "eval time ratio", "train time ratio",
            "train peak memory ratio", "goal (<= 1.0)"]
    if gpu:
        head[4:4] = ["ours eval / train img/s", "ref eval / train img/s"]
    rows = []
    for ours_name, ref_name in (("torch", "torchvision"), ("mxnet", "mxnet-zoo")):
        for dtype in sorted({r["case"]["dtype"] for r in rs}):
            o = find(data, "reference", backend=ours_name, dtype=dtype)
            f = find(data, "reference", backend=ref_name, dtype=dtype)
            if o is None and f is None:
                continue
            te = ratio(img_s(f, "eval"), img_s(o, "eval"))
            tt = ratio(img_s(f, "train"), img_s(o, "train"))
            if te is None or tt is None:
                goal = "n/a: " + (status_text(f) if not ok(f) else status_text(o))
            else:
                goal = "met" if max(te, tt) <= 1.0 else f"not met ({max(te, tt):.2f})"
            row = [FRAMEWORK[ours_name], dtype, status_text(o) if not ok(o) else "ok",
                   status_text(f) if not ok(f) else "ok"]
            if gpu:
                row += [f"{fmt(img_s(o, 'eval'), 1)} / {fmt(img_s(o, 'train'), 1)}",
                        f"{fmt(img_s(f, 'eval'), 1)} / {fmt(img_s(f, 'train'), 1)}"]
            row += [fmt(te), fmt(tt), fmt(ratio(peak_bytes(o), peak_bytes(f))), goal]
            rows.append(row)
    return lines + table(head, rows)


def section_memory(data, gpu) -> List[str]:
    rs = results(data, "memory")
    if not rs:
        return []
    c0 = rs[0]["case"]
    lines = [f"## (c) Memory-efficient vs naive: {c0['preset']} training, {c0['size']} px, "
             f"batch {c0['batch']}, {c0['dtype']}", "",
             "Ratios efficient / naive of the train step (train-only processes). 'Training "
             "memory' is what the train steps add on top of the process before them "
             + ("(allocator peak minus memory allocated before: activations, gradients, "
                "workspace)" if gpu else
                "(peak RSS minus RSS before the first step: activations, gradients, workspace, "
                "without the framework's own resident footprint)")
             + "; 'peak' is the whole process's (device) peak. Goal: training memory <= "
             f"{GOAL_MEMORY:.0%} of naive at <= {GOAL_TIME - 1:.0%} more time per step.", ""]
    lines += ["'Saved for backward' is what the framework itself keeps from the forward pass for "
              "the backward pass (torch: saved tensors; JAX: jax.vjp residuals; parameters "
              "excluded; benchmarks/saved_for_backward.py): the quantity the mode shrinks, "
              "before any allocator or compiler. On the CPU, XLA removes the optimization "
              "barriers that keep jax.checkpoint's recomputation apart and merges it back "
              "into the forward pass, so Flax's compiled step (XLA compiled ratio) is the same "
              "in both modes there.", ""]
    head = ["backend", "saved for backward ratio", "training memory ratio", "peak memory ratio",
            "XLA compiled ratio", "step time ratio", "goal"]
    if gpu:
        head[1:1] = ["naive / efficient training memory GiB"]
    else:
        head[1:1] = ["naive / efficient step (s)"]
    rows = []
    for b in BACKEND_ORDER:
        n = find(data, "memory", backend=b, mode="naive")
        e = find(data, "memory", backend=b, mode="efficient")
        if n is None and e is None:
            continue
        gm = ratio(growth_bytes(e), growth_bytes(n))
        tr = ratio(img_s(n, "train"), img_s(e, "train"))
        if not ok(e):
            goal = status_text(e)
        elif gm is None or tr is None:
            goal = "n/a"
        else:
            goal = ("met" if gm <= GOAL_MEMORY and tr <= GOAL_TIME else
                    "not met: " + ", ".join(
                        ([f"memory {gm:.2f} > {GOAL_MEMORY}"] if gm > GOAL_MEMORY else [])
                        + ([f"time {tr:.2f} > {GOAL_TIME}"] if tr > GOAL_TIME else [])))
        row = [b]
        if gpu:
            row.append(f"{gib(growth_bytes(n))} / {gib(growth_bytes(e))}")
        else:
            sn = r_step(n)
            se = r_step(e)
            row.append(f"{fmt(sn)} / {fmt(se)}")
        row += [fmt(ratio(saved_bytes(e), saved_bytes(n))), fmt(gm),
                fmt(ratio(peak_bytes(e), peak_bytes(n))),
                fmt(ratio(xla_bytes(e), xla_bytes(n))), fmt(tr), goal]
        rows.append(row)
    return lines + table(head, rows)


def saved_bytes(r) -> Optional[float]:
    return (r.get("saved_for_backward") or {}).get("bytes") if ok(r) else None


def r_step(r) -> Optional[float]:
    return r["phases"]["train"]["step_s"] if ok(r) and "train" in r.get("phases", {}) else None


def fast_rows(data):
    """(backend, variant, result, plain result, default-on text) in plan order; a last row with
    the backend's defaults (the main sweep's float32 naive case) unless a variant is it."""
    from benchmarks.defaults import default_opts
    gpu = is_gpu_run(data)
    out = []
    for b in BACKEND_ORDER:
        rs = [r for r in results(data, "fast") if r["case"]["backend"] == b]
        if not rs:
            continue
        plain = rs[0]
        defaults = default_opts(b, gpu)
        for r in rs:
            out.append((b, r["case"].get("variant", "?"), r, plain, default_on(r, plain, defaults)))
        default = find(data, "main", backend=b, dtype="float32", mode="naive")
        if default is not None and not any(
                r["case"]["opts"] == default["case"]["opts"] and r["case"]["dtype"] == "float32"
                for r in rs):
            out.append((b, "defaults: " + opts_text(default), default, plain, "(the defaults)"))
    return out


def default_on(r, plain, defaults) -> str:
    if r is plain:
        return "—"
    if r["case"]["dtype"] != "float32":
        return "no (a dtype: --dtype bfloat16)"
    po, ro = plain["case"]["opts"], r["case"]["opts"]
    toggled = {k: v for k, v in ro.items() if po.get(k) != v}
    if not toggled:
        return "—"
    if ro == defaults:
        return "yes"
    if all(defaults.get(k) == v for k, v in toggled.items()):
        # e.g. NNX 'nnx.jit + donate': donation is on by default, but with split/merge + jax.jit
        switches = ", ".join(f"{k}={v}" for k, v in toggled.items())
        return f"its switch ({switches}), not this combination"
    return "no"


def section_fast(data, gpu) -> List[str]:
    rows_ = fast_rows(data)
    if not rows_:
        return []
    c0 = results(data, "fast")[0]["case"]
    lines = [f"## (d) Fast paths: {c0['preset']}, {c0['size']} px, batch {c0['batch']}", "",
             "Speedup = throughput with the fast path / throughput of the backend's plain "
             "configuration (first row of each backend; > 1: faster). Memory ratio = train peak "
             "/ plain's. 'default' says whether the benchmark (and the defaults row, the "
             "backend's float32 row in table (a)) uses it. First step = the warm-up step that "
             "holds compilation / graph building, in seconds.", ""]
    head = ["backend", "fast path", "eval speedup", "train speedup", "train peak memory ratio",
            "first train step (s)", "default", "status"]
    if gpu:
        head[2:2] = ["eval img/s", "train img/s"]
    rows = []
    for b, name, r, plain, dflt in rows_:
        row = [b, name]
        if gpu:
            row += [fmt(img_s(r, "eval"), 1), fmt(img_s(r, "train"), 1)]
        first = r["phases"]["train"]["first_s"] if ok(r) and "train" in r["phases"] else None
        row += [fmt(ratio(img_s(r, "eval"), img_s(plain, "eval"))),
                fmt(ratio(img_s(r, "train"), img_s(plain, "train"))),
                fmt(ratio(peak_bytes(r), peak_bytes(plain))), fmt(first, 1), dflt,
                status_text(r)]
        rows.append(row)
    return lines + table(head, rows)


def markdown(data, title=None) -> str:
    gpu = is_gpu_run(data)
    title = title or ("DenseNet benchmarks: " + (data["machine"].get("gpu") or "CPU"))
    lines = header(data, title)
    for sec in (section_main, section_reference, section_memory, section_fast):
        lines += sec(data, gpu)
    problems = [r for r in data["results"] if r.get("status") in ("error", "timeout")]
    if problems:
        lines += ["## Failed cases", ""]
        for r in problems:
            c = r["case"]
            lines.append(f"- {c['group']} {c['backend']} {c['preset']} {c['dtype']} {c['mode']} "
                         f"{c.get('variant', '')}: {status_text(r)}")
        lines.append("")
    lines.append(f"Plot: {Path(data.get('out', 'bench')).name}.png; raw data: the JSON next to "
                 "this file.")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- plot

def plot(data, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    gpu = is_gpu_run(data)
    fig, axes = plt.subplots(2, 2, figsize=(15, 10.5))
    fig.suptitle(f"DenseNet benchmarks — {data['machine'].get('gpu') or data['machine']['cpu'] + ' (CPU)'}",
                 fontsize=14)

    # (a) throughput per backend
    ax = axes[0][0]
    rs = [r for r in results(data, "main") if r["case"]["mode"] == "naive"] or results(data, "main")
    backends = [b for b in BACKEND_ORDER if any(r["case"]["backend"] == b for r in rs)]
    series = [(p, d) for p in ("eval", "train") for d in ("float32", "bfloat16")
              if any(r["case"]["dtype"] == d for r in rs)]
    width = 0.8 / max(len(series), 1)
    colors = {"eval": ("#4C72B0", "#A1C4E8"), "train": ("#C44E52", "#F0A8AA")}
    for i, (phase, dtype) in enumerate(series):
        vals = []
        for b in backends:
            r = next((x for x in rs if x["case"]["backend"] == b and x["case"]["dtype"] == dtype), None)
            ref = next((x for x in rs if x["case"]["backend"] == "torch"
                        and x["case"]["dtype"] == "float32"), None)
            v = img_s(r, phase) if gpu else ratio(img_s(r, phase), img_s(ref, phase))
            vals.append(v or 0.0)
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(backends))]
        bars = ax.bar(xs, vals, width, label=f"{phase} {dtype}",
                      color=colors[phase][dtype == "bfloat16"])
        for x, v in zip(xs, vals):
            ax.text(x, v, "n/a" if v == 0 else f"{v:.2f}" if not gpu else f"{v:.0f}",
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(backends)))
    ax.set_xticklabels(backends)
    if rs:
        c0 = rs[0]["case"]
        ax.set_title(f"(a) throughput, {c0['preset']} {c0['size']} px, batch {c0['batch']}")
    ax.set_ylabel("images/s" if gpu else "images/s relative to torch float32 (same phase)")
    if not gpu:
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=9)

    # (b) ours vs reference
    ax = axes[0][1]
    labels, vals = [], []
    for ours_name, ref_name in (("torch", "torchvision"), ("mxnet", "mxnet-zoo")):
        for dtype in ("float32", "bfloat16"):
            o = find(data, "reference", backend=ours_name, dtype=dtype)
            f = find(data, "reference", backend=ref_name, dtype=dtype)
            if o is None and f is None:
                continue
            for phase in ("eval", "train"):
                labels.append(f"{FRAMEWORK[ours_name]}\n{dtype} {phase}")
                vals.append(ratio(img_s(f, phase), img_s(o, phase)))
    if labels:
        ax.bar(range(len(labels)), [v or 0 for v in vals],
               color=["#55A868" if (v or 9) <= 1.0 else "#C44E52" for v in vals])
        for i, v in enumerate(vals):
            ax.text(i, v or 0, "n/a (reference\nnot available)" if v is None else f"{v:.2f}",
                    ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_ylim(0, max([v or 0 for v in vals] + [1.2]) * 1.2)
    ax.set_ylabel("our step time / reference step time")
    ax.set_title("(b) ours vs the framework's own DenseNet-121 (<= 1: goal met)")

    # (c) memory-efficient vs naive
    ax = axes[1][0]
    bs, mem, tim, notes = [], [], [], []
    for b in BACKEND_ORDER:
        n = find(data, "memory", backend=b, mode="naive")
        e = find(data, "memory", backend=b, mode="efficient")
        if n is None and e is None:
            continue
        bs.append(b)
        mem.append(ratio(growth_bytes(e), growth_bytes(n)))
        tim.append(ratio(img_s(n, "train"), img_s(e, "train")))
        notes.append(None if ok(e) else (e or {}).get("status", "not run"))
    if bs:
        xs = range(len(bs))
        ax.bar([x - 0.2 for x in xs], [v or 0 for v in mem], 0.4, label="training memory ratio",
               color="#4C72B0")
        ax.bar([x + 0.2 for x in xs], [v or 0 for v in tim], 0.4, label="step time ratio",
               color="#DD8452")
        for x, m, t, note in zip(xs, mem, tim, notes):
            if note:
                ax.text(x, 0.05, note, ha="center", va="bottom", fontsize=9, rotation=90)
                continue
            ax.text(x - 0.2, m or 0, fmt(m), ha="center", va="bottom", fontsize=8)
            ax.text(x + 0.2, t or 0, fmt(t), ha="center", va="bottom", fontsize=8)
        ax.axhline(GOAL_MEMORY, color="#4C72B0", lw=0.8, ls="--", label=f"memory goal {GOAL_MEMORY}")
        ax.axhline(GOAL_TIME, color="#DD8452", lw=0.8, ls="--", label=f"time goal {GOAL_TIME}")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(bs)
        ax.legend(fontsize=8, loc="upper right")
        c0 = results(data, "memory")[0]["case"]
        ax.set_title(f"(c) memory-efficient / naive, {c0['preset']} train {c0['size']} px "
                     f"batch {c0['batch']}")
        ax.set_ylim(0, max([v or 0 for v in mem + tim] + [1.4]) * 1.15)
    ax.set_ylabel("efficient / naive")

    # (d) fast paths
    ax = axes[1][1]
    rows_ = [row for row in fast_rows(data) if not row[1].startswith("defaults")]
    rows_ = [row for row in rows_ if row[2] is not row[3]]
    if rows_:
        labels = [f"{b}: {name}" for b, name, *_ in rows_]
        tr = [ratio(img_s(r, "train"), img_s(p, "train")) for _, _, r, p, _ in rows_]
        ev = [ratio(img_s(r, "eval"), img_s(p, "eval")) for _, _, r, p, _ in rows_]
        ys = list(range(len(labels)))[::-1]
        ax.barh([y + 0.2 for y in ys], [v or 0 for v in ev], 0.4, label="eval", color="#4C72B0")
        ax.barh([y - 0.2 for y in ys], [v or 0 for v in tr], 0.4, label="train", color="#C44E52")
        for y, e, t in zip(ys, ev, tr):
            ax.text(e or 0, y + 0.2, " " + ("n/a" if e is None else f"{e:.2f}"), va="center", fontsize=7)
            ax.text(t or 0, y - 0.2, " " + ("n/a" if t is None else f"{t:.2f}"), va="center", fontsize=7)
        ax.set_yticks(ys)
        ax.set_yticklabels(labels, fontsize=8)
        ax.axvline(1.0, color="gray", lw=0.8, ls="--")
        vals = [v for v in ev + tr if v]
        if vals and min(vals) < 0.2:
            ax.set_xscale("log")
        ax.legend(fontsize=8, loc="lower right")
        c0 = results(data, "fast")[0]["case"]
        ax.set_title(f"(d) fast paths: speedup vs plain, {c0['preset']} {c0['size']} px "
                     f"batch {c0['batch']}")
    ax.set_xlabel("speedup vs the backend's plain configuration")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(data, out, title=None) -> None:
    out = Path(out)
    data["out"] = str(out)
    Path(str(out) + ".md").write_text(markdown(data, title))
    plot(data, str(out) + ".png")


def main(argv=None):
    ap = argparse.ArgumentParser(description="Redraw the tables and plot from a benchmark JSON.")
    ap.add_argument("json")
    ap.add_argument("--title", default=None)
    args = ap.parse_args(argv)
    path = Path(args.json)
    data = json.loads(path.read_text())
    write(data, path.with_suffix(""), title=args.title)


if __name__ == "__main__":
    main()
