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


def test_gpu_check_dry_runs_every_step_and_records_a_failure(tmp_path):
    """The GPU evidence command (`make gpu`, benchmarks/gpu_check.py) in its dry mode (no NVIDIA
    GPU here), with one step made to fail (DENSENET_GPU_CHECK_FAIL): the same steps as on a GPU
    in the same order, the smoke step first; the failed step is recorded with its reason and
    the next ones still run and pass; README.md says so with the budget and each step's limit
    and time; at most the 8 files a device call hands back. The benchmark steps (its smallest
    cases) merge into one JSON with the documented keys, the markdown and plot beside it."""
    from benchmarks import gpu_check
    out = tmp_path / "gpu"
    env = dict(os.environ, PYTHONPATH=str(ROOT), DENSENET_GPU_CHECK_FAIL="report_book")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry", "--out", str(out)],
                          cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]  # the injected failure
    assert sorted(p.name for p in out.iterdir()) == sorted(gpu_check.OUTPUT_FILES)
    assert len(gpu_check.OUTPUT_FILES) <= 8
    readme = (out / "README.md").read_text()
    assert readme.startswith("# GPU evidence (dry run on the CPU)")
    assert "python -m benchmarks.gpu_check --dry --out" in readme
    assert " s of a 360 s budget (hard cap 420 s). 8 of 8 steps ran, 1 failed." in readme
    # the dry mode's steps are the GPU's, in the same order; the README's rows follow them
    dry, real = gpu_check.steps(out, dry=True), gpu_check.steps(out, dry=False)
    keys = [s["key"] for s in dry]
    assert keys == [s["key"] for s in real] == [
        "smoke", "test_gpu", "report_book", "report_densenet121", "bench_densenet121_float32",
        "bench_densenet121_bfloat16", "bench_book", "bench_memory"]
    assert real[0]["max"] <= 60 and "--smoke" in real[0]["cmd"]
    rows = [line.split(" | ") for line in readme.splitlines() if re.match(r"\| \d+ \| ", line)]
    assert [r[1] for r in rows] == [s["name"] for s in dry]
    status = {k: r[3] for k, r in zip(keys, rows)}
    assert status.pop("report_book") == "FAILED (exit status 1)"
    assert set(status.values()) == {"ok"}, status
    assert all(float(r[4]) > 0 and float(r[5].rstrip(" |")) >= 0 for r in rows)  # limit, wall s
    # committed under docs/gpu/<date>/, its links must resolve (parity_tests/test_docs.py);
    # a step's file that is not there is named without a link
    from parity_tests.test_docs import check_links
    assert check_links([out / "README.md"], out) == []
    why = readme.split("## What failed, and why")[1]
    assert "injected failure (DENSENET_GPU_CHECK_FAIL=report_book)" in why
    assert "parity report, the book, 32 px" in why
    smoke = (out / "smoke.txt").read_text()
    for b in ("torch", "flax-nnx", "flax-linen"):
        assert re.search(rf"^{b} +on cpu: forward of the book, 32 px, batch 2, in [\d.]+ s", smoke,
                         re.M), smoke
    assert smoke.rstrip().endswith("smoke: ok")
    assert "- versions (the smoke step's): python " in readme and "jax devices cpu" in readme
    tests = (out / "test_gpu.txt").read_text()
    # every GPU test skipped, saying why (12 at the time of writing: a new one must skip too)
    counts = re.search(r"(\d+) skipped in", tests)
    assert counts and int(counts.group(1)) >= 12 and "no NVIDIA GPU" in tests, tests[-2000:]
    assert " passed" not in tests and " failed" not in tests and " error" not in tests
    reports = (out / "reports.txt").read_text()
    assert reports.count("### step ") == 2 and "All backends agree." in reports.split("### step 4")[1]
    data = json.loads((out / "bench.json").read_text())
    assert {"command", "machine", "settings", "results", "started", "finished"} <= set(data)
    assert len(data["commands"]) == 4 and all(c.startswith("python -m benchmarks.bench --backends")
                                             for c in data["commands"])
    got = sorted((r["case"]["group"], r["case"]["dtype"], r["case"]["mode"]) for r in data["results"])
    assert got == [("main", "bfloat16", "naive"), ("main", "float32", "naive"),
                   ("memory", "float32", "efficient"), ("memory", "float32", "naive")]
    for r in data["results"]:
        assert r["status"] == "ok", r
        assert {"case", "device", "versions", "opts", "phases"} <= set(r)
        for phase in ("eval", "train") if r["case"]["group"] == "main" else ("train",):
            p = r["phases"][phase]
            assert {"img_s", "runs_img_s", "first_s", "step_s", "memory"} <= set(p)
            assert p["img_s"] > 0 and len(p["runs_img_s"]) == 1
            assert p["memory"]["rss_peak_bytes"] > 0
    md = (out / "bench.md").read_text()
    assert data["command"] in md and "(a) Backends" in md
    assert (out / "bench.png").stat().st_size > 10_000


def test_gpu_check_stops_a_step_at_its_limit_and_skips_what_does_not_fit(tmp_path):
    """A step past its limit is stopped with its whole process group (a benchmark's case
    process too, which would hold the GPU), recorded, and the next one runs; a step that no
    longer fits the budget is not started; the budget is at most one device call's 420 s."""
    import psutil
    from benchmarks import gpu_check
    pid_file = tmp_path / "grandchild.pid"
    hang = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(60)']); open(sys.argv[1], 'w').write(str(p.pid)); "
            "print('started', flush=True); time.sleep(60)")
    py = sys.executable
    plan = [{"key": "hang", "name": "hangs", "file": "smoke.txt", "min": 1, "max": 3,
             "cmd": [py, "-c", hang, str(pid_file)]},
            {"key": "next", "name": "runs", "file": "test_gpu.txt", "min": 1, "max": 30,
             "cmd": [py, "-c", "print('fine')"]},
            {"key": "big", "name": "does not fit", "file": "reports.txt", "min": 10_000,
             "max": 10_000, "cmd": [py, "-c", "raise SystemExit(1)"]}]
    assert gpu_check.run(tmp_path / "out", 60, dry=True, plan=plan, argv=[]) == 1
    grandchild = int(pid_file.read_text())
    assert not psutil.pid_exists(grandchild) or \
        psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "| 1 | hangs | [smoke.txt](smoke.txt) | FAILED (stopped at its limit, 3 s) | 3 |" in readme
    assert "| 2 | runs | [test_gpu.txt](test_gpu.txt) | ok |" in readme
    # a step that did not run wrote no file: named, without a link that would not resolve
    assert "| 3 | does not fit | reports.txt (none) | not run: " in readme
    assert "it needs 10000 s | - | - |" in readme and "## Not run (out of time)" in readme
    assert "### hangs: FAILED (stopped at its limit, 3 s)" in readme and "started" in readme
    assert "2 of 3 steps ran, 1 failed." in readme
    for bad in ("421", "0"):
        with pytest.raises(SystemExit) as e:
            gpu_check.main(["--out", str(tmp_path / "x"), "--budget", bad])
        assert e.value.code == 2


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


def test_the_suite_monitor_gives_each_test_the_peak_of_the_process_that_ran_it(tmp_path):
    """The monitor (parity_tests/suite_monitor.py) as `make test` runs it, under pytest-xdist:
    the controller samples the tree, and a test's peak is what the tree of the worker that ran
    it held while it ran, with what that worker started (a child process's memory) and without
    what the other worker held at the same time."""
    from parity_tests import suite_monitor as sm
    # the window: the largest sample inside it, else the nearest; a process never seen: 0
    timeline = [(10.0, {1: 5, 2: 50}), (10.2, {1: 7, 2: 60}), (10.4, {1: 6, 2: 70}),
                (10.6, {1: 9})]
    assert sm.window_peak(timeline, 1, 10.1, 10.5) == 7
    assert sm.window_peak(timeline, 2, 10.1, 10.5) == 70
    assert sm.window_peak(timeline, 1, 10.45, 10.5) == 6  # nearest: 10.4, not 10.6
    assert sm.window_peak(timeline, 1, 10.55, 10.58) == 9
    assert sm.window_peak(timeline, 3, 10.0, 10.6) == 0
    (tmp_path / "test_inner.py").write_text(
        "import subprocess, sys, time\n"
        "def test_big():\n"
        "    held = b'x' * 400_000_000\n"
        "    time.sleep(1.0)\n"
        "    assert len(held)\n"
        "def test_child():\n"
        "    subprocess.run([sys.executable, '-c', "
        "\"import time; held = b'x' * 300_000_000; time.sleep(1.0)\"], check=True)\n"
        "def test_small():\n"
        "    time.sleep(1.0)\n")
    out = tmp_path / "profile.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    env.pop("DENSENET_SUITE_PROFILE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "xdist.plugin", "-p",
         "parity_tests.suite_monitor", "-n", "2", "-p", "no:cacheprovider",
         f"--suite-profile={out}", "--rootdir", str(tmp_path), str(tmp_path / "test_inner.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    prof = json.loads(out.read_text())
    peak = {n.split("::")[1]: t["peak_bytes"] for n, t in prof["tests"].items()}
    assert set(peak) == {"test_big", "test_child", "test_small"}, prof["tests"]
    assert all("pid" not in t for t in prof["tests"].values()), prof["tests"]
    assert 0 < peak["test_small"] < peak["test_big"] - 0.3e9, peak
    assert peak["test_child"] > peak["test_small"] + 0.2e9, peak
    assert prof["peak_bytes"] >= peak["test_big"] and prof["samples"] >= 5, prof
    assert "peak memory of the whole run" in proc.stdout, proc.stdout


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


def test_check_speed_benchmark_runs_the_check_command(tmp_path):
    """densenet bench --check: each case the real `densenet check` in a fresh process, its
    phases from the report's timings adding up to the check's time, the table naming the
    command and the machine; a model it does not know is a usage error naming the forms."""
    out = tmp_path / "cs"
    r = subprocess.run([sys.executable, "-m", "densenet_cli", "bench", "--check", "torch:book",
                        "--sizes", "32", "--out", str(out)], cwd=ROOT, capture_output=True,
                       text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr
    data = json.loads(out.with_suffix(".json").read_text())
    (row,) = data["results"]
    assert row["status"] == "ok" and row["verdict"] == "same network", row
    assert row["size"] == 32 and "target_s" not in row and len(row["load_before"]) == 3
    assert abs(sum(row["groups"].values()) - row["wall_s"]) < 0.05, row
    assert row["groups"]["float64 step"] > 0 and row["check_s"] < row["wall_s"]
    md = out.with_suffix(".md").read_text()
    assert "densenet bench --check torch:book --sizes 32" in md and "| torch:book | 32 |" in md
    assert data["machine"]["cores"] and data["machine"]["gpu"]
    bad = subprocess.run([sys.executable, "-m", "benchmarks.bench", "--check", "tf:DenseNet121",
                          "--out", str(tmp_path / "bad")], cwd=ROOT, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "'tf:DenseNet121' is not KIND:NAME" in bad.stderr, bad.stderr


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
