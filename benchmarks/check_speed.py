"""How long `densenet check` takes, phase by phase: ``densenet bench --check MODELS``
(``python -m benchmarks.bench --check ...`` runs ``benchmarks.check_speed``).

Each case is the command a user types, ``python -m densenet_cli check --framework F
MODULE:FUNCTION --size S --json ...``, in a fresh process, timed from outside (its wall time,
the interpreter's start and every import included); the report's ``timings`` (the check's
phases: densenet_parity.checking.engine.Clock) say where the time went. A model is one of

  torchvision:NAME   torchvision.models.NAME(weights=None) (torch subject; torchvision's PyPI
                     build imports beside the CPU torch with torch.library.register_fake made
                     a no-op for the import, as benchmarks.common.import_torchvision does)
  keras:NAME         keras.applications.NAME(weights=None) (Keras 3 on its JAX backend)
  torch:PRESET       our PyTorch mirror's preset (densenet_torch.model.PRESET()): a small one
                     (book) runs in seconds, for the suite's test of this benchmark

The targets (issue 26): DenseNet-121/169/201 checked in at most 90 s at 224 px and at most 45 s
at 64 px, in the torch and Keras subjects. The load average (os.getloadavg) before and after
each case is recorded beside it: on a shared machine it says how much the figure is inflated.

Writes <out>.json (every number) and <out>.md (the table, the command and the machine).

Example:
  densenet bench --check torchvision:densenet121,keras:DenseNet121 --sizes 64,224 \\
      --out docs/performance/check-speed
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parent.parent
#: seconds a check may take (issue 26), by input size; other sizes have no target
TARGETS = {224: 90.0, 64: 45.0}
#: the report's phases, grouped as the table shows them
GROUPS = {"model build": ("model",),
          "reference build": ("reference", "probe_reference"),
          "eval forward": ("eval_model", "eval_reference", "probe_eval_reference"),
          "float64 step": ("train_model", "train_reference", "probe_train_reference"),
          "rest": ("structure", "bn_settings", "weights", "other")}

FACTORIES = '''"""Factories for densenet bench --check (written by benchmarks/check_speed.py)."""
import importlib


def _torchvision():
    import torch
    try:
        return importlib.import_module("torchvision")
    except Exception:  # noqa: BLE001 - PyPI's CUDA build beside the CPU torch
        import sys
        for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
            del sys.modules[name]
    original = torch.library.register_fake
    torch.library.register_fake = lambda *a, **k: (lambda fn: fn)
    try:
        return importlib.import_module("torchvision")
    finally:
        torch.library.register_fake = original


def torchvision_model(name):
    return getattr(_torchvision().models, name)(weights=None)


def keras_model(name):
    import keras
    return getattr(keras.applications, name)(weights=None)


def torch_model(name):
    return getattr(importlib.import_module("densenet_torch.model"), name)()
'''


def parse_models(text: str) -> List[Dict[str, str]]:
    """'torchvision:densenet121,keras:DenseNet121,torch:book' -> the cases' models."""
    kinds = {"torchvision": "torch", "keras": "keras", "torch": "torch"}
    out = []
    for item in [s.strip() for s in text.split(",") if s.strip()]:
        kind, _, name = item.partition(":")
        if kind not in kinds or not name.isidentifier():
            raise ValueError(f"--check: {item!r} is not KIND:NAME with KIND one of "
                             f"{', '.join(kinds)} (e.g. torchvision:densenet121, "
                             "keras:DenseNet121, torch:book)")
        out.append({"model": item, "framework": kinds[kind], "kind": kind, "name": name})
    return out


def run_case(model: Dict[str, str], size: int, folder: Path, timeout: float) -> dict:
    """One check in a fresh process: its wall time, the report's timings and verdict."""
    (folder / "checkspeed_factories.py").write_text(FACTORIES)
    fn = f"{model['kind']}_{model['name']}"
    with open(folder / "checkspeed_factories.py", "a") as f:
        f.write(f"\n\ndef {fn}():\n    return {model['kind']}_model({model['name']!r})\n")
    report = folder / f"{fn}_{size}.json"
    cmd = [sys.executable, "-m", "densenet_cli", "check", "--framework", model["framework"],
           f"checkspeed_factories:{fn}", "--size", str(size), "--json", str(report)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    load_before = os.getloadavg()
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=str(folder), env=env, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"model": model["model"], "size": size, "status": "timeout",
                "wall_s": round(time.perf_counter() - t, 1), "load_before": load_before,
                "load_after": os.getloadavg()}
    wall = time.perf_counter() - t
    out = {"model": model["model"], "framework": model["framework"], "size": size,
           "wall_s": round(wall, 2), "exit": p.returncode, "load_before": list(load_before),
           "load_after": list(os.getloadavg()),
           "command": "densenet check " + shlex.join(cmd[4:-2])}
    if p.returncode not in (0, 1) or not report.exists():
        out["status"] = "error"
        out["error"] = (p.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
        return out
    r = json.loads(report.read_text())
    timings = r.get("timings") or {}
    phases = timings.get("phases", {})
    out.update(status="ok", verdict=r["verdict"], preset=r["preset"], phases=phases,
               check_s=timings.get("total"), compilation_s=timings.get("compilation"),
               groups={g: round(sum(phases.get(k, 0.0) for k in ks), 2)
                       for g, ks in GROUPS.items()},
               notes=[n for n in r.get("notes", []) if "train-mode step ran at" in n])
    out["groups"]["start and imports"] = round(wall - (timings.get("total") or 0.0), 2)
    if size in TARGETS:
        out["target_s"] = TARGETS[size]
        out["target_met"] = wall <= TARGETS[size]
    return out


def main(args, argv_list: List[str], gpu=None) -> dict:
    """Run the cases ``args.check`` x ``args.sizes`` (bench.py's options; ``gpu``: the GPU's
    name, None for none)."""
    from benchmarks import common
    models = parse_models(args.check)
    sizes = args.sizes or [64, 224]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {"command": "densenet bench " + shlex.join(argv_list),
            "started": _dt.datetime.now().isoformat(timespec="seconds"),
            "machine": dict(common.machine(), memory_gb=_memory_gb(), gpu=gpu or "no GPU"),
            "targets_s": TARGETS, "results": []}
    print(f"densenet bench --check: {len(models) * len(sizes)} check(s); machine: "
          f"{data['machine']['cpu']}, {data['machine']['cores']} cores", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="densenet_checkspeed_") as tmp:
        for model in models:
            for size in sizes:
                print(f"  {model['model']} at {size} px ...", file=sys.stderr, flush=True)
                r = run_case(model, size, Path(tmp), args.case_timeout)
                data["results"].append(r)
                print(f"    {summary(r)}", file=sys.stderr, flush=True)
                Path(str(out) + ".json").write_text(json.dumps(data, indent=1))
                Path(str(out) + ".md").write_text(markdown(data, args.title))  # so far
    data["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
    Path(str(out) + ".json").write_text(json.dumps(data, indent=1))
    Path(str(out) + ".md").write_text(markdown(data, args.title))
    print(f"wrote {out}.json, {out}.md", file=sys.stderr)
    return data


def _memory_gb():
    try:
        with open("/proc/meminfo") as f:
            return round(int(f.readline().split()[1]) / 2**20)
    except (OSError, ValueError, IndexError):
        return None


def summary(r: dict) -> str:
    if r.get("status") != "ok":
        return f"{r.get('status')}: {r.get('error', '')} ({r.get('wall_s')} s)"
    g = ", ".join(f"{k} {v:.1f} s" for k, v in r["groups"].items())
    return f"{r['wall_s']:.1f} s ({r['verdict']}): {g}; compiling {r['compilation_s']:.1f} s"


def markdown(data: dict, title=None) -> str:
    m = data["machine"]
    lines = [f"# {title or 'How long densenet check takes'}", "",
             f"Command: `{data['command']}`  ", f"Machine: {m['cpu']}, {m['cores']} cores, "
             f"{m.get('memory_gb')} GB, {m.get('gpu')}, Python {m['python']}; started "
             f"{data['started']}", "",
             "Seconds, each check a fresh process timed from outside (wall); the phases are the "
             "report's `timings` (`densenet check --json`), grouped: model build (the factory, "
             "imports of the framework included), reference build (our PyTorch model, twice "
             "where the BatchNorm settings differ), eval forward (model and reference, "
             "float32), float64 step (model and reference; and the reference again with the "
             "model's BatchNorm settings), rest (matching, settings, weights), start and "
             "imports (before the check starts). Compiling: seconds of those phases spent in "
             "XLA (Keras). Load: the 1-minute load average before / after the case.", ""]
    head = (["model", "px", "wall s", "target", "verdict"] + list(GROUPS) +
            ["start and imports", "compiling", "load"])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in data["results"]:
        load = f"{r['load_before'][0]:.1f} / {r['load_after'][0]:.1f}"
        if r.get("status") != "ok":
            lines.append(f"| {r['model']} | {r['size']} | {r['wall_s']} | | {r['status']}: "
                         f"{r.get('error', '')} |" + " |" * (len(head) - 5) + f" {load} |")
            continue
        target = (f"{r['target_s']:.0f}: {'met' if r['target_met'] else 'NOT met'}"
                  if "target_s" in r else "")
        g = r["groups"]
        lines.append("| " + " | ".join(
            [r["model"], str(r["size"]), f"{r['wall_s']:.1f}", target, r["verdict"]]
            + [f"{g[k]:.1f}" for k in list(GROUPS) + ["start and imports"]]
            + [f"{r['compilation_s']:.1f}", load]) + " |")
    return "\n".join(lines) + "\n"
