"""The ``densenet`` command: every subcommand has --help with an example; exit status 0 ok,
1 a mismatch or a failure, 2 a usage error; the parity report (the README's main job) and the
summary in every backend."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

import densenet_spec as spec
from densenet_cli.main import COMMANDS
from densenet_parity.backends import ROOT
from parity_tests.conftest import cli_env, need_mxnet


def densenet(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "densenet_cli", *map(str, args)], cwd=ROOT,
                          env=cli_env(), capture_output=True, text=True, timeout=timeout)


def test_the_command_lists_its_subcommands():
    r = densenet("--help")
    assert r.returncode == 0
    for name in ("report", "convert", "export", "summary", "check", "train", "bench"):
        assert f"  {name} " in r.stdout
    assert densenet().returncode == 2
    r = densenet("frobnicate")
    assert r.returncode == 2 and "unknown command 'frobnicate'" in r.stderr


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_subcommand_has_help_with_an_example(name):
    r = densenet(name, "--help")
    assert r.returncode == 0, r.stderr
    assert f"densenet {name}" in r.stdout and "example:" in r.stdout


def test_the_parity_report(tmp_path):
    """The README's main job, by its own command (torch and both Flax variants here; every
    backend's numbers are test_numeric.py's): structure and numbers agree, exit 0, the JSON
    carries what the text shows."""
    out = tmp_path / "r.json"
    r = densenet("report", "--preset", "book", "--size", "32", "--backends",
                 "torch,flax-nnx,flax-linen", "--json", out)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "All backends agree." in r.stdout
    rows = [ln.split() for ln in r.stdout.splitlines() if ln.startswith(("stem", "total"))]
    assert rows[0][0] == "stem" and rows[0][-1] == "ok" and rows[1][-1] == "ok"
    data = json.loads(out.read_text())
    assert data["exit_code"] == 0 and set(data["numbers"]) == {"flax-nnx", "flax-linen"}
    assert data["backends"]["torch"]["describe"]["params"] == 758_226


@pytest.mark.parametrize("args, words", [
    (("--preset", "densenet122"), "unknown DenseNet preset 'densenet122'"),
    (("--size", "28"), "28x28 is too small"),
    (("--backends", "torch,caffe"), "unknown backend 'caffe'")])
def test_report_usage_errors(args, words):
    r = densenet("report", *args)
    assert r.returncode == 2 and words in r.stderr, r.stderr


def test_report_exits_1_when_a_backend_cannot_run(tmp_path):
    r = subprocess.run([sys.executable, "-m", "densenet_cli", "report", "--size", "32",
                        "--backends", "torch,mxnet", "--no-numeric"], cwd=ROOT,
                       env=cli_env(DENSENET_MXNET_PYTHON=str(tmp_path / "none")),
                       capture_output=True, text=True)
    assert r.returncode == 1 and "UNAVAILABLE" in r.stdout and "make mxnet-env" in r.stdout


@pytest.mark.parametrize("backend", ["torch", "mxnet", "flax-nnx", "flax-linen"])
def test_summary_in_every_backend(backend):
    if backend == "mxnet":
        need_mxnet()
    r = densenet("summary", "--backend", backend, "--preset", "book", "--size", "32")
    assert r.returncode == 0, r.stderr
    assert "Total params: 758,226" in r.stdout and "BatchNorm state (running mean + var): 6,608" \
        in r.stdout
    assert ("[1, 1, 1, 248]" in r.stdout) == backend.startswith("flax")  # NHWC in Flax


def test_convert_usage_errors(tmp_path):
    r = densenet("convert", tmp_path / "missing.pth", tmp_path / "o.safetensors")
    assert r.returncode == 2 and "no such file" in r.stderr
    junk = tmp_path / "junk.pth"
    junk.write_text("not weights")
    r = densenet("convert", junk, tmp_path / "o.safetensors")
    assert r.returncode == 2 and "unknown format" in r.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_train_usage_error_and_bench_help():
    r = densenet("train", "--epochs", "0")
    assert r.returncode == 2 and "--epochs must be positive" in r.stderr
    r = densenet("bench", "--help")
    assert r.returncode == 0 and "python -m benchmarks.bench" in r.stdout


def test_compare_training_runs_every_backend_and_writes_its_figures(tmp_path, capsys):
    """`densenet compare-training` on the book at 64 px (its last block at 2x2: at 32 px it is
    1x1 and BatchNorm over 2 values makes even float64 runs chaotic), 3 float32 steps in the four backends:
    progress on the console, exit 0 (the first step's float32 loss and gradient norm agree
    to 1e-3), the
    JSON of every figure (per step and per stage, the steps until each threshold) and the
    log-scale plot; MXNet names its limit (its momentum holds the cosine's learning rate)."""
    need_mxnet()
    rc = COMMANDS["compare-training"][0]([  # in this process: its start is not what is tested
        "--preset", "book", "--size", "64", "--batch-size", "2", "--steps", "3", "--every", "1",
        "--dtype", "float32", "--recipe",
        "sgd lr=0.05 momentum=0.9 weight_decay=0.001 exclude=bn schedule=cosine",
        "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    assert "step 1/3: torch loss" in out and "step 3/3" in out
    assert "AGREE" in out and "Traceback" not in err
    result = json.loads((tmp_path / "compare_training.json").read_text())
    assert result["steps"] == 3 and result["dtype"] == "float32" and result["agree"] is True
    assert set(result["backends"]) == {"torch", "mxnet", "flax-nnx", "flax-linen"}
    # the conv biases, zero in exact arithmetic: judged by an absolute floor
    assert "features.conv0.bias" in result["absolute_names"]
    for name in ("mxnet", "flax-nnx", "flax-linen"):
        e = result["backends"][name]
        assert len(e["loss"]) == len(e["params"]) == len(e["stats"]) == 3
        assert set(e["steps_until"]) == {"1e-06", "0.0001", "0.01"}
        assert set(e["stages"]) >= {"stem", "denseblock1", "transition3", "head"}
        assert 0 < e["params"][0] and e["steps_until"]["1e-06"] == 1, e["params"]
        assert abs(e["loss"][0] / result["backends"]["torch"]["loss"][0] - 1) <= 1e-3
    assert any("learning rate" in lim for lim in result["backends"]["mxnet"]["limits"])
    assert (tmp_path / "divergence.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_training_stops_where_torchs_run_diverges(capsys):
    """The MLP on the house prices at lr 1 with momentum (batches of 16): PyTorch's own loss
    is not a number by step 7; the command (run in this process: its start is not what is
    tested) stops there, says so in words (never nan or inf where a number is meant), judges
    the steps before it and exits 1."""
    need_mxnet()
    rc = COMMANDS["compare-training"][0]([
        "--preset", "house_mlp", "--backends", "torch,mxnet", "--steps", "30", "--every", "2",
        "--batch-size", "16", "--recipe", "sgd lr=1.0 momentum=0.875"])
    out, err = capsys.readouterr()
    assert rc == 1, out + err
    assert "torch's loss is not a number: the recipe diverges on this data; stopping" in out
    assert "DIVERGED: torch's loss is not a number at step" in out
    assert "the backends are compared up to step" in out and "step 30/30" not in out
    assert not re.search(r"\b(nan|inf|-inf)\b", out, re.IGNORECASE), out
    assert "Traceback" not in err


def test_compare_training_bad_recipe_is_a_usage_error():
    r = densenet("compare-training", "--recipe", "sgd lr=0.1 nesterov=1", "--steps", 2)
    assert r.returncode == 2
    assert "nesterov=1 needs momentum > 0 and dampening=0" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
