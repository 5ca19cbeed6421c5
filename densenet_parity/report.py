"""The parity report: do all backends build the same network, and compute the same numbers?

    densenet report --preset book --size 96
    densenet report --preset densenet121 --size 224 --json report.json

Two tables. *Structure*: per stage, each backend's output shape, trainable parameters and
BatchNorm state, against densenet_spec's arithmetic. *Numbers*: the same canonical weights
(PyTorch's initialisation, exported) loaded into every backend, the same input, and per stage
the largest absolute and relative difference from the reference backend (torch), eval mode.
``densenet report`` (densenet_cli) prints it; exit status 0 all agree, 1 a mismatch or a
backend that could not run, 2 a usage error.
"""
from __future__ import annotations

import sys
import time

import numpy as np

import densenet_spec as spec
from densenet_parity import compare
from densenet_parity.backends import (REFERENCE, BackendError, BackendUnavailable,
                                   make_backend)

OK, BAD = "ok", "MISMATCH"


def _shape(s):
    return "x".join(str(d) for d in s[1:])


def _num(n):
    return f"{n:,}"


def table(headers, rows, title=None):
    """A plain text table: column widths fitted, numbers right-aligned."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]

    def fmt(row):
        cells = []
        for i, c in enumerate(row):
            c = str(c)
            right = c.replace(",", "").replace(".", "").replace("e-", "").replace("-", "").isdigit()
            cells.append(c.rjust(widths[i]) if right else c.ljust(widths[i]))
        return "  ".join(cells).rstrip()
    out = [title] if title else []
    out += [fmt(headers), "  ".join("-" * w for w in widths)]
    out += [fmt(r) for r in rows]
    return "\n".join(out)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def run(preset: str, size: int, batch: int, backends, numeric: bool, seed: int,
        memory_efficient: bool = False) -> dict:
    cfg = spec.make_config(preset)
    expected = compare.expected_stages(cfg, batch, size, size)
    shape = spec.input_shape(cfg, batch, size, size)
    result = {"preset": cfg.name, "input": list(shape),
              "layout": "(N, features)" if cfg.family == "mlp" else "NCHW",
              "reference": REFERENCE, "tolerance": {"eval_rel": compare.EVAL_RTOL},
              "expected": expected, "backends": {}, "numbers": {}}
    handles = {}
    for name in backends:
        b = make_backend(name)
        handles[name] = b
        entry = result["backends"][name] = {}
        t0 = time.perf_counter()
        log(f"[{name}] building {cfg.name} and evaluating shapes ...")
        try:
            entry["info"] = b.call("info")
            entry["describe"] = b.call("describe", config=cfg.to_dict(), batch=batch,
                                       height=size, width=size)
            entry["problems"] = compare.structure_problems(entry["describe"], expected)
        except (BackendUnavailable, BackendError) as e:
            entry["error"] = str(e).strip()
            log(f"[{name}] unavailable: {entry['error'].splitlines()[0]}")
        entry["seconds"] = round(time.perf_counter() - t0, 2)

    if numeric and REFERENCE in handles and "error" not in result["backends"][REFERENCE]:
        log(f"[{REFERENCE}] initialising canonical weights (seed {seed}) ...")
        state = handles[REFERENCE].call("init_state", config=cfg.to_dict(), seed=seed)["arrays"]
        rng = np.random.default_rng(seed)
        x = rng.standard_normal(shape).astype(np.float32)
        outputs = {}
        for name, b in handles.items():
            if "error" in result["backends"][name]:
                continue
            log(f"[{name}] forward with the shared weights ...")
            try:
                outputs[name] = b.call("forward", config=cfg.to_dict(), state=state, x=x,
                                       train=False)["arrays"]
            except BackendError as e:
                result["backends"][name]["error"] = str(e).strip()
        ref = outputs.get(REFERENCE)
        for name, out in outputs.items():
            if name != REFERENCE and ref is not None:
                result["numbers"][name] = compare.stage_diffs(out, ref)
    for b in handles.values():
        b.close()
    return result


def verdicts(result: dict):
    """(structure verdict per stage, numbers verdict per stage, overall exit code)."""
    code = 0
    stage_ok = {}
    for e in result["expected"]:
        ok = True
        for name, entry in result["backends"].items():
            if "error" in entry:
                continue
            if any(p.startswith(e["name"] + ":") for p in entry["problems"]):
                ok = False
        stage_ok[e["name"]] = ok
    num_ok = {}
    for name, diffs in result["numbers"].items():
        for stage, d in diffs.items():
            num_ok[stage] = num_ok.get(stage, True) and d["rel"] <= compare.EVAL_RTOL
    if not all(stage_ok.values()) or not all(num_ok.values()) or any(
            e.get("problems") for e in result["backends"].values()):
        code = 1
    if any("error" in e for e in result["backends"].values()):
        code = max(code, 2) if code == 0 else code
    return stage_ok, num_ok, code


def render(result: dict) -> str:
    stage_ok, num_ok, code = verdicts(result)
    names = list(result["backends"])
    live = [n for n in names if "error" not in result["backends"][n]]
    lines = [f"DenseNet parity report: preset '{result['preset']}', input "
             f"{'x'.join(map(str, result['input']))} "
             f"({'(N, features) in every framework' if result['layout'] != 'NCHW' else 'NCHW; Flax runs NHWC'})",
             ""]
    for n in names:
        e = result["backends"][n]
        if "error" in e:
            lines.append(f"  {n:<11} UNAVAILABLE: {e['error'].splitlines()[0]}")
            continue
        i = e["info"]
        vers = ", ".join(f"{k} {v}" for k, v in i["versions"].items())
        me = "memory-efficient: yes" if i.get("memory_efficient") is None else \
            f"memory-efficient: no ({i['memory_efficient']})"
        me = "" if result["layout"] != "NCHW" else f"; {me}"  # the MLP family has no such mode
        lines.append(f"  {n:<11} on {i['device']:<7} {vers}{me}")
    lines.append("")
    headers = ["stage", "spec shape", "spec params", "spec BN"]
    for n in live:
        headers += [f"{n} shape", "params", "BN"]
    headers.append("verdict")
    rows = []
    for e in result["expected"]:
        row = [e["name"], _shape(e["shape"]), _num(e["params"]), _num(e["state"])]
        for n in live:
            g = {s["name"]: s for s in result["backends"][n]["describe"]["stages"]}[e["name"]]
            row += [_shape(g["shape"]), _num(g["params"]), _num(g["state"])]
        row.append(OK if stage_ok[e["name"]] else BAD)
        rows.append(row)
    total = ["total", "", _num(sum(e["params"] for e in result["expected"])),
             _num(sum(e["state"] for e in result["expected"]))]
    for n in live:
        d = result["backends"][n]["describe"]
        total += ["", _num(d["params"]), _num(d["state"])]
    total.append(OK if all(not result["backends"][n]["problems"] for n in live) else BAD)
    rows.append(total)
    lines.append(table(headers, rows, "Structure (shape without the batch axis, trainable "
                                      "parameters, BatchNorm running mean+var values)"))
    if result["numbers"]:
        others = list(result["numbers"])
        headers = ["stage"] + [f"{n} max|d|" for n in others] + [f"{n} rel" for n in others] + ["verdict"]
        rows = []
        for e in result["expected"]:
            s = e["name"]
            row = [s] + [_e(result['numbers'][n][s]['abs']) for n in others]
            row += [_e(result['numbers'][n][s]['rel']) for n in others]
            row.append(OK if num_ok.get(s, False) else BAD)
            rows.append(row)
        lines += ["", table(headers, rows,
                            f"Numbers (same canonical weights and input, eval mode): difference "
                            f"from {result['reference']}; rel = max|d| / max|{result['reference']}|, "
                            f"tolerance {compare.EVAL_RTOL:g}")]
    lines.append("")
    for n in names:
        for p in result["backends"][n].get("problems", []):
            lines.append(f"  {n}: {p}")
    lines.append({0: "All backends agree.", 1: "MISMATCH: the backends do not agree (see above).",
                  2: "Incomplete: a backend could not run (see above)."}[code])
    return "\n".join(lines)


def _e(value) -> str:
    """A difference for the table; never 'nan' or 'inf' where a number is meant."""
    import math
    return f"{value:.2e}" if math.isfinite(value) else "not comparable"
