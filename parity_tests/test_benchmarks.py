"""The benchmark's fast paths compute what the plain configuration computes, and the benchmark
command runs.

Every fast path that benchmarks/bench.py measures (torch channels_last, cudnn.benchmark,
torch.compile, autocast bfloat16; Flax nnx.jit / jax.jit, donated buffers, bfloat16 compute;
Gluon hybridize, static_alloc/static_shape, AMP bfloat16) is run by the benchmark's own code
(benchmarks/run_*.py) next to its backend's plain configuration on the same weights and data,
and must agree at the parity suite's tolerances (bfloat16: the stated ones in
benchmarks/check_fast_paths.py). A fast path this machine cannot run (bfloat16 AMP in MXNet
without AVX-512) must say so clearly; it is never skipped silently. No timing is asserted.

The Flax checks compile every path with XLA (about a minute per backend on a small CPU), so
they are marked slow.
"""
from __future__ import annotations

import json
import re
import os
import subprocess
import sys

import pytest

from benchmarks import check_fast_paths as cfp
from densenet_parity.backends import ROOT
from parity_tests.conftest import need_mxnet

_results = {}


def _checks(backend):
    if backend == "mxnet":
        need_mxnet()
    if backend not in _results:
        _results[backend] = {r["name"]: r for r in cfp.run_backend(backend)}
    return _results[backend]


PARAMS = [pytest.param(b, name, id=f"{b}-{name}",
                       marks=[pytest.mark.slow] if b.startswith("flax") else [])
          for b, (_, checks) in cfp.CHECKS.items() for name, _, _ in checks]


@pytest.mark.parametrize("backend,name", PARAMS)
def test_fast_path_agrees_with_plain(backend, name):
    r = _checks(backend)[name]
    if r["status"] == "unsupported":
        # Only a hardware/build limitation may stop a fast path, and it must say which.
        assert r["dtype"] == "bfloat16" and "bfloat16" in r["error"]["message"], r
        return
    assert r["status"] == "ok", f"{backend} {name}: {r.get('error')}\n{r.get('stderr_tail', '')}"
    bad = {k: (r["diffs"][k], tol) for k, tol in r["tolerances"].items() if r["diffs"][k] > tol}
    assert not bad, (f"{backend} {name} differs from the plain configuration: "
                     + ", ".join(f"{k} {d:.2e} > {t:g}" for k, (d, t) in bad.items())
                     + f" (worst gradient {r.get('worst_gradient')})")


def test_bench_quick_writes_results(tmp_path):
    """The benchmark command end to end on the smallest case, run as the dry mode of the GPU
    evidence command (`make gpu`, benchmarks/gpu_check.py: no NVIDIA GPU here) runs it: every
    dry step passes and the folder's README.md says which; the benchmark's JSON has the
    documented keys, the markdown and plot are next to it."""
    out = tmp_path / "gpu"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry", "--out", str(out)],
                          cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    readme = (out / "README.md").read_text()
    assert readme.startswith("# GPU evidence (dry run on the CPU)")
    assert "python -m benchmarks.gpu_check --dry --out" in readme
    assert readme.count("| ok |") == 3 and "FAILED" not in readme and "not run" not in readme
    tests = (out / "test_gpu.txt").read_text()
    # every GPU test skipped, saying why (12 at the time of writing: a new one must skip too)
    counts = re.search(r"(\d+) skipped in", tests)
    assert counts and int(counts.group(1)) >= 12 and "no NVIDIA GPU" in tests, tests[-2000:]
    assert " passed" not in tests and " failed" not in tests and " error" not in tests
    assert "All backends agree." in (out / "report_book.txt").read_text()
    data = json.loads((out / "bench.json").read_text())
    assert {"command", "machine", "settings", "results", "started", "finished"} <= set(data)
    assert data["command"].startswith("python -m benchmarks.bench --quick")
    (r,) = data["results"]
    assert r["status"] == "ok", r
    assert {"case", "device", "versions", "opts", "phases"} <= set(r)
    for phase in ("eval", "train"):
        p = r["phases"][phase]
        assert {"img_s", "runs_img_s", "first_s", "step_s", "memory"} <= set(p)
        assert p["img_s"] > 0 and len(p["runs_img_s"]) == data["settings"]["repeats"]
        assert p["memory"]["rss_peak_bytes"] > 0
    md = (out / "bench.md").read_text()
    assert data["command"] in md and "(a) Backends" in md
    assert (out / "bench.png").stat().st_size > 10_000


def test_suite_profile_formats_what_the_monitor_wrote(tmp_path):
    """benchmarks.suite_profile --from: the table of docs/performance/test-suite.md from a
    profile in the monitor's format (parity_tests/suite_monitor.py): per module the summed
    seconds and the heaviest test's peak, the tests running at the peak, the heaviest and
    slowest tests, the outcomes."""
    from benchmarks import suite_profile
    from parity_tests.suite_monitor import GB
    tests = {
        "parity_tests/test_a.py::test_big@giants": {"seconds": 30.0, "peak_bytes": int(4.5 * GB),
                                                   "outcome": "passed"},
        "parity_tests/test_a.py::test_small": {"seconds": 1.0, "peak_bytes": int(1.0 * GB),
                                               "outcome": "passed"},
        "parity_tests/test_b.py::test_slow": {"seconds": 50.0, "peak_bytes": int(2.0 * GB),
                                              "outcome": "skipped"},
    }
    modules = {"parity_tests/test_a.py": {"seconds": 31.0, "peak_bytes": int(4.5 * GB), "tests": 2},
               "parity_tests/test_b.py": {"seconds": 50.0, "peak_bytes": int(2.0 * GB), "tests": 1}}
    prof = {"peak_bytes": int(6.25 * GB), "peak_at_seconds": 90.0, "wall_seconds": 300.0,
            "interval_seconds": 0.2, "samples": 1500, "measure": "RSS summed over the process tree",
            "running_at_peak": ["parity_tests/test_a.py::test_big@giants"],
            "peak_processes": [{"pid": 1, "bytes": int(4.5 * GB), "command": "pytest-xdist worker"}],
            "limit_gb": None, "tests": tests, "modules": modules}
    src = tmp_path / "profile.json"
    src.write_text(json.dumps(prof))
    out = tmp_path / "suite"
    assert suite_profile.main(["--from", str(src), "--ran", "bash .ci/run", "--out", str(out)]) == 0
    md = (out.with_suffix(".md")).read_text()
    assert "bash .ci/run" in md and "2 passed, 1 skipped" in md
    assert "**5.0 min**" in md and "**6.25 GB**" in md and "at 1.5 min" in md
    assert "running then: `test_a.py::test_big@giants`" in md
    rows = [line for line in md.splitlines() if line.startswith("| `test_")]
    assert rows[0].startswith("| `test_b.py` | 1 | 50 | 62% | 2.00 |"), rows  # most seconds first
    assert rows[1].startswith("| `test_a.py` | 2 | 31 | 38% | 4.50 | `test_big@giants` (30 s)"), rows
    heaviest = md.split("## The five heaviest tests by memory")[1].splitlines()[4]
    assert heaviest.startswith("| `test_a.py::test_big@giants` | 30.0 | 4.50 |"), heaviest
    assert json.loads(out.with_suffix(".json").read_text())["meta"]["run"]["command"] == "bash .ci/run"


def test_data_parallel_scaling_benchmark_runs(tmp_path):
    """benchmarks.data_parallel: 1 and 2 devices through data_parallel_step with timed steps
    (PyTorch's torchrun processes here, the quickest to start), the table with the command."""
    from benchmarks import data_parallel
    out = tmp_path / "dp"
    assert data_parallel.main(["--backends", "torch", "--size", "32", "--batch", "2",
                               "--steps", "2", "--out", str(out)]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    (row,) = data["results"]
    assert row["one"]["devices"] == 1 and row["many"]["devices"] == 2
    assert len(row["many"]["step_seconds"]) == 2 and row["many"]["examples_per_step"] == 4
    assert row["ratio"] == pytest.approx(row["many"]["examples_per_s"] / row["one"]["examples_per_s"])
    md = out.with_suffix(".md").read_text()
    assert "python -m benchmarks.data_parallel --backends torch" in md and "| torch |" in md


def test_exercises_params_tables_add_up(tmp_path):
    """benchmarks.exercises params (docs/exercises.md, exercises 2 and 4), its cheapest path:
    DenseNet-121's parameters per stage and per kind add up to the spec's total and to
    torchvision's published count; the Table 1 presets have the paper's blocks and growth
    rates and torchvision's counts."""
    from benchmarks import exercises
    import densenet_spec as spec
    rec = exercises.cmd_params(exercises.parse_args(
        ["params", "--no-torchvision", "--out", str(tmp_path)]))
    d = rec["densenet121"]
    assert d["total"] == spec.total_counts(spec.get_preset("densenet121"))[0] == 7_978_856
    assert sum(s["params"] for s in d["stages"]) == sum(d["by_kind"].values()) == d["total"]
    assert d["by_kind"]["classifier"] == 1024 * 1000 + 1000
    assert [p["matches_paper"] for p in rec["table1"]] == [True] * 4 + [None]  # 161: not in it
    assert [p["params"] == p["torchvision_params"] for p in rec["table1"]
            if p["torchvision_params"]] == [True] * 4
    assert json.loads((tmp_path / "params.json").read_text())["densenet121"] == d
