"""`densenet train --devices 2 [--sync-bn]`: the book's recipe on two devices, on each framework's
own engine (PyTorch DDP under torchrun, a JAX mesh, Gluon contexts with a kvstore).

Each run's first epoch is one SGD step (16 digits, batch 16): its checkpoint must be what the
framework's BatchNorm semantics say one data-parallel step gives (docs/data_parallel.md), computed
from single-device float64 steps of the parity adapters on each share (per-device BatchNorm) or
on the whole batch (synchronised BatchNorm), and it must differ from the other semantics' result
(so the comparison can tell them apart). The trainers run in float32: 2e-4 of a tensor's
largest value covers float32 against float64 after one step (measured: up to 3e-6), plus 1e-4
for a gradient that is zero in exact arithmetic (see ``_far``).

Then the run is resumed for a second epoch (momentum 0.9, so that the optimiser's state is in
the checkpoint) and must end bit for bit where an unbroken two-epoch run ends: parameters,
momentum and running statistics, except Gluon's running statistics. A Gluon Trainer copies
context 0's value of every parameter it holds, running statistics included, to every context
at its first step; a resumed run has a new Trainer, whose first step is the run's second, so
its statistics are context 0's where the unbroken run's are the contexts' average
(docs/data_parallel.md); its parameters and momentum are bit for bit the unbroken run's.

Flax runs through the command line in a child process (JAX gets its two host devices before it
starts); PyTorch's runs start torchrun from this process; Gluon's, its environment's process.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import densenet_spec as spec
import densenet_training as training
from densenet_parity.backends import ROOT
from densenet_training import data
from densenet_weights import files
import jax  # noqa: F401  (imported before any in-process run, so that none sets XLA_FLAGS here)
from parity_tests.conftest import cli_env, get_backend, need_mxnet

DEVICES, LR, MOMENTUM = 2, 0.1, 0.9
#: One step per epoch: 16 examples (or 17: the last batch of 1 cannot be split and is dropped).
BASE = ["--devices", DEVICES, "--batch-size", 16, "--lr", LR, "--momentum", MOMENTUM,
        "--seed", 4, "--no-plot", "--no-progress"]
TOL, ATOL = 2e-4, 1e-4
#: name: (backend, extra options, whose running statistics, the reference: adapter and dtype).
#: Flax's reference is its own adapter in float32: XLA's float32 step on the CPU is up to 4% of
#: a tensor's largest value from float64 on this batch (BatchNorm biases of the third block),
#: on one device as on two (measured with `densenet train --backend flax`), against PyTorch's
#: 3e-6; the same arithmetic on one device leaves only the order of the devices' sums.
CASES = {
    "torch": ("torch", [], "first", ("torch", "float64")),
    "flax": ("flax", [], "mean", ("flax-nnx", "float32")),
    "flax-sync-bn": ("flax", ["--sync-bn"], "global", ("flax-nnx", "float32")),
    "mxnet": ("mxnet", [], "first", ("mxnet", "float64")),
}
RESUMED = ("torch", "flax-sync-bn", "mxnet")


def _train(backend, out, *args):
    """A run through the command line: in a child process for Flax (JAX must start with two
    host devices), here for PyTorch (it starts torchrun) and MXNet (its environment's process)."""
    argv = ["--backend", backend, "--out", str(out), *map(str, BASE), *map(str, args)]
    if backend == "flax":
        res = subprocess.run([sys.executable, "-m", "densenet_cli", "train", *argv], cwd=ROOT,
                             env=cli_env(), capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-3000:]
        return res.stdout
    from densenet_cli.train import main
    assert main(argv) == 0
    return ""


def _expectation(ref, stats, state, x, y, dtype="float64"):
    """One step's canonical state and loss under the semantics ``stats``: 'global' (the step
    on the whole batch), 'first' or 'mean' (per-device BatchNorm: parameters minus lr times the
    mean gradient of the shares; running statistics of share 0, or the shares' mean)."""
    cfg = spec.get_preset("book").to_dict()
    if stats == "global":
        r = ref.call("train_step", config=cfg, state=state, x=x, labels=y, lr=LR, dtype=dtype)
        return r["arrays"], r["loss"]
    n = len(x) // DEVICES
    steps = [ref.call("train_step", config=cfg, state=state, x=x[i * n:(i + 1) * n],
                      labels=y[i * n:(i + 1) * n], lr=LR, dtype=dtype)
             for i in range(DEVICES)]
    want = {}
    for k in steps[0]["arrays"]:
        if k in steps[0]["grads"]:
            want[k] = state[k].astype(np.float64) - LR * np.mean([s["grads"][k] for s in steps], 0)
        else:
            want[k] = (steps[0]["arrays"][k] if stats == "first"
                       else np.mean([s["arrays"][k] for s in steps], 0))
    return want, float(np.mean([s["loss"] for s in steps]))


def _worst(got, want):
    """The largest difference of a tensor, relative to its largest value (floor 1e-8)."""
    assert set(got) == set(want), set(got) ^ set(want)
    return max(float(np.abs(got[k].astype(np.float64) - want[k]).max()
                     / max(np.abs(want[k]).max(), 1e-8)) for k in want)


def _far(got, want, tol=TOL):
    """The tensors that differ by more than TOL relative to their largest value, plus ATOL: the
    float32 noise of a gradient that is zero in exact arithmetic (conv0's bias, which norm0
    cancels: 2e-5 after one float32 step)."""
    assert set(got) == set(want), set(got) ^ set(want)
    out = {}
    for k in want:
        d = float(np.abs(got[k].astype(np.float64) - want[k]).max())
        if d > ATOL + tol * np.abs(want[k]).max():
            out[k] = d
    return out


def _final(out):
    state, _ = files.load_state(training.latest_checkpoint(out) / "model.safetensors")
    return state


@pytest.mark.parametrize("case", list(CASES))
def test_two_device_training_is_the_frameworks_data_parallel_step(case, tmp_path):
    backend, extra, stats, (ref_name, dtype) = CASES[case]
    if "mxnet" in (backend, ref_name):
        need_mxnet()
    limit = 17 if case == "flax" else 16
    run = tmp_path / "run"
    printed = _train(backend, run, "--limit", limit, "--epochs", 1, *extra)
    metrics = json.loads((run / "metrics.json").read_text())
    par = metrics["data_parallel"]
    assert par["devices"] == DEVICES and par["sync_bn"] == ("--sync-bn" in extra)
    assert par["batchnorm"] and metrics["device"].startswith(f"{DEVICES} x ")
    assert [r["examples"] for r in metrics["epochs"]] == [16]
    if case == "flax":  # the 17th example is the last batch: it cannot be split over 2 devices
        assert "last batch has 1 examples; 1 of them is left out" in printed

    ckpt = training.latest_checkpoint(run)
    got, config = files.load_state(ckpt / "model.safetensors")  # the single-device format
    spec.check_state(config, {k: v.shape for k, v in got.items()})
    assert json.loads((ckpt / "checkpoint.json").read_text())["data_parallel"] == par

    book = spec.get_preset("book")
    ds = data.load_dataset("digits", 32, limit=limit)
    x, y = ds.batch(data.batch_indices(limit, 16, 4, 0)[0])
    state = training.xavier_state(book, 4)
    ref = get_backend(ref_name)
    want, loss = _expectation(ref, stats, state, x, y, dtype)
    assert metrics["first_step_loss"] == pytest.approx(loss, rel=1e-5)
    assert not _far(got, want), case
    other, _ = _expectation(ref, "first" if stats == "global" else "global", state, x, y, dtype)
    assert _worst(got, other) > 1e-3, f"{case}: the other BatchNorm semantics gives this too"

    if case not in RESUMED:
        return
    _train(backend, run, "--limit", limit, "--epochs", 2, "--resume", *extra)
    whole = tmp_path / "whole"
    _train(backend, whole, "--limit", limit, "--epochs", 2, *extra)
    a = json.loads((whole / "metrics.json").read_text())
    b = json.loads((run / "metrics.json").read_text())
    assert b["resumed_from"] == 1 and a["resumed_from"] is None
    assert [r["loss"] for r in a["epochs"]] == [r["loss"] for r in b["epochs"]]
    sa, sb = _final(whole), _final(run)
    params = {n for n, _, kind in spec.canonical_tensors(book) if kind == "param"}
    assert all(np.array_equal(sa[k], sb[k]) for k in params), case
    same_stats = all(np.array_equal(sa[k], sb[k]) for k in set(sa) - params)
    # Gluon: the resumed run's new Trainer copies context 0's running statistics to every
    # context at its first step, as the first run's Trainer did at step 1 (not at step 2)
    assert same_stats == (backend != "mxnet"), case
    from safetensors.numpy import load_file
    buffers = load_file(str(training.latest_checkpoint(run) / "optimizer.safetensors"))
    assert set(buffers) == params


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a refused run's --out would be


def _error(capfd, *argv):
    """The one message of a refused run (MXNet's child prints it, hence capfd)."""
    from densenet_cli.train import main
    assert main(["--limit", "16", "--out", "unused", "--no-plot", *map(str, argv)]) == 2
    err = capfd.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    return err


def test_a_batch_that_does_not_split_over_the_devices(capfd):
    err = _error(capfd, "--devices", 3, "--batch-size", 16)
    assert "--batch-size 16 does not split evenly over --devices 3" in err
    assert "such as 15 or 18" in err


@pytest.mark.parametrize("backend", ["torch", "flax", "mxnet"])
def test_more_cpu_devices_than_cores(backend, capfd):
    if backend == "mxnet":
        need_mxnet()
    n = training.cpu_cores() + 1
    err = _error(capfd, "--backend", backend, "--devices", n, "--batch-size", 2 * n)
    assert f"--devices {n} on the CPU: this machine has {n - 1} core(s)" in err


@pytest.mark.parametrize("backend, words", [
    ("torch", "PyTorch's SyncBatchNorm runs on GPUs only"),
    ("mxnet", "Gluon's contrib.nn.SyncBatchNorm needs GPU contexts"),
])
def test_synchronised_batchnorm_where_the_framework_cannot(backend, words, capfd):
    if backend == "mxnet":
        need_mxnet()
    import torch
    if backend == "torch" and torch.cuda.device_count() >= DEVICES:
        pytest.skip(f"this machine has {DEVICES} GPUs: PyTorch's SyncBatchNorm runs here")
    err = _error(capfd, "--backend", backend, "--devices", DEVICES, "--sync-bn")
    assert words in err


def test_options_that_cannot_be_honoured(capfd, monkeypatch):
    assert "it needs --devices 2 or more" in _error(capfd, "--sync-bn")
    assert "names one device" in _error(capfd, "--devices", 2, "--device", "cuda:1")
    # JAX fixes its number of host devices when it starts; this process has one
    import jax
    assert len(jax.devices("cpu")) < DEVICES
    err = _error(capfd, "--backend", "flax", "--devices", DEVICES, "--device", "cpu")
    assert "XLA_FLAGS=--xla_force_host_platform_device_count=2" in err
    # a torchrun of another size than --devices
    monkeypatch.setenv("WORLD_SIZE", "3")
    err = _error(capfd, "--backend", "torch", "--devices", DEVICES)
    assert "--devices 2: PyTorch trains on several devices in one process each, and torchrun " \
           "started 3 processes" in err


def test_resume_needs_the_same_devices(tmp_path, capfd):
    """A checkpoint of a two-device run resumes on two devices only (per-device BatchNorm makes
    it another run); checkpoints from before --devices existed count as one device."""
    from densenet_cli.train import main
    out = tmp_path / "run"
    base = ["--backend", "torch", "--limit", "16", "--batch-size", "16", "--epochs", "1",
            "--out", str(out), "--no-progress", "--no-plot"]
    assert main(base) == 0
    info_path = training.latest_checkpoint(out) / "checkpoint.json"
    info = json.loads(info_path.read_text())
    assert info["settings"]["devices"] == 1 and info["data_parallel"] is None
    for key in ("devices", "sync_bn"):  # as written before the options existed
        del info["settings"][key]
    info_path.write_text(json.dumps(info))
    assert main([*base, "--resume", "--epochs", "2"]) == 0
    capfd.readouterr()
    err = _error(capfd, *base[:-2], "--resume", "--epochs", "3", "--devices", "2")
    assert "is a different run" in err and "devices: checkpoint 1, now 2" in err


def test_even_batches():
    batches = data.batch_indices(37, 16, 0, 0)
    assert [len(b) for b in data.even_batches(batches, 2)] == [16, 16, 4]
    assert [len(b) for b in data.even_batches(batches, 5)] == [15, 15, 5]
    assert [len(b) for b in data.even_batches(data.batch_indices(33, 16, 0, 0), 2)] == [16, 16]
    kept = np.concatenate(data.even_batches(batches, 2))
    assert np.array_equal(kept, np.concatenate(batches)[:36])
