"""Where the test suite's time and memory go: ``python -m benchmarks.suite_profile``.

Runs the README's test command (``make test``, which builds what is missing) with the suite's
monitor writing its profile (parity_tests/suite_monitor.py: the peak of the whole process tree,
every test's time and its process tree's peak memory), then writes

  <out>.json   the profile as the monitor wrote it, with the command and the machine
  <out>.md     per test module: test seconds (summed over the two workers), the peak memory of
               its heaviest test and its slowest test; the five heaviest tests by memory and
               by time; the run's wall time and peak

``--from PROFILE.json`` formats a profile written earlier (``DENSENET_SUITE_PROFILE=PROFILE.json
bash .ci/run``, or the same variable before ``make test``; pytest's ``--suite-profile`` option
is registered by the suite's conftest, too late for ``make test PYTEST_ARGS=...``, which
pytest refuses) instead of running the suite; ``--ran`` says what wrote it.

    python -m benchmarks.suite_profile --out docs/performance/test-suite
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import common

ROOT = Path(__file__).resolve().parent.parent
GB = 1e9


def run_suite(profile: Path) -> dict:
    env = dict(os.environ, DENSENET_SUITE_PROFILE=str(profile), DENSENET_REQUIRE_MXNET="1")
    t0 = time.time()
    proc = subprocess.run(["make", "test"], cwd=ROOT, env=env)
    return {"command": "make test", "exit_status": proc.returncode,
            "seconds": round(time.time() - t0, 1)}


def _gb(b):
    return f"{b / GB:.2f}"


def render(prof: dict, meta: dict) -> str:
    m = meta["machine"]
    status = meta["run"].get("exit_status")
    outcomes: dict = {}
    for t in prof["tests"].values():
        outcomes[t["outcome"]] = outcomes.get(t["outcome"], 0) + 1
    lines = ["# The test suite: where time and memory go", "",
             f"Made by `{meta['made_by']}` on {meta['date']}: {meta['run']['command']}"
             + (f" (exit status {status})" if status is not None else "")
             + f", on {m['cpu']}, {m['cores']} cores, {m['memory_gb']:.0f} GB memory, no GPU. "
             + ", ".join(f"{n} {k}" for k, n in sorted(outcomes.items())) + ".", "",
             f"- wall time of the run: **{prof['wall_seconds'] / 60:.1f} min** (budget 10; never above 15)",
             f"- peak memory of all its processes: **{_gb(prof['peak_bytes'])} GB** (budget 6, never above 8; "
             f"{prof['measure']}, sampled every {prof['interval_seconds']} s), at "
             f"{prof['peak_at_seconds'] / 60:.1f} min:"]
    for p in prof["peak_processes"][:6]:
        lines.append(f"  - {_gb(p['bytes'])} GB: {p['command']}")
    for nodeid in prof.get("running_at_peak", []):
        lines.append(f"  - running then: `{nodeid.split('/')[-1]}`")
    lines += ["", "Per test module. Test seconds are summed over the two workers (the wall time "
              "is about half their total); a test's memory is the peak of the process tree that "
              "ran it (its pytest worker, that worker's MXNet worker, its subprocesses), so it "
              "includes what the worker held already.", "",
              "| module | tests | test seconds | share | peak of its heaviest test (GB) | slowest test |",
              "| --- | ---: | ---: | ---: | ---: | --- |"]
    total = sum(t["seconds"] for t in prof["tests"].values()) or 1.0
    for mod, mm in sorted(prof["modules"].items(), key=lambda kv: -kv[1]["seconds"]):
        tests = {k: t for k, t in prof["tests"].items() if k.startswith(mod + "::")}
        slow = max(tests, key=lambda k: tests[k]["seconds"])
        lines.append(f"| `{mod.split('/')[-1]}` | {mm['tests']} | {mm['seconds']:.0f} | "
                     f"{mm['seconds'] / total:.0%} | {_gb(mm['peak_bytes'])} | "
                     f"`{slow.split('::', 1)[1]}` ({tests[slow]['seconds']:.0f} s) |")
    for key, title, unit in (("peak_bytes", "The five heaviest tests by memory", "GB"),
                             ("seconds", "The five slowest tests", "s")):
        lines += ["", f"## {title}", "", "| test | seconds | peak (GB) |", "| --- | ---: | ---: |"]
        for nodeid, t in sorted(prof["tests"].items(), key=lambda kv: -kv[1][key])[:5]:
            lines.append(f"| `{nodeid.split('/')[-1]}` | {t['seconds']:.1f} | {_gb(t['peak_bytes'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/performance/test-suite",
                    help="path without suffix for the .json and .md")
    ap.add_argument("--from", dest="source", metavar="PROFILE",
                    help="a profile written earlier, instead of running the suite")
    ap.add_argument("--ran", metavar="TEXT", default="make test (an earlier run)",
                    help="with --from: the command that wrote the profile, for the table's "
                         "header (e.g. 'bash .ci/run on a fresh clone of 7caa31c')")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.source:
        prof_path, run = Path(args.source), {"command": args.ran}
    else:
        prof_path = out.with_suffix(".json")
        run = run_suite(prof_path)
        if not prof_path.exists():
            print(f"error: the suite wrote no profile (exit status {run['exit_status']})",
                  file=sys.stderr)
            return 1
    prof = json.loads(prof_path.read_text())
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    meta = {"made_by": "python -m benchmarks.suite_profile " + " ".join(map(shlex.quote, argv or sys.argv[1:])),
            "date": _dt.date.today().isoformat(), "run": run,
            "machine": dict(common.machine(), memory_gb=mem_kb / 1024 / 1024)}
    out.with_suffix(".json").write_text(json.dumps(dict(prof, meta=meta), indent=1))
    out.with_suffix(".md").write_text(render(prof, meta))
    print(f"wrote {out}.md and {out}.json")
    return 0 if run.get("exit_status", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
