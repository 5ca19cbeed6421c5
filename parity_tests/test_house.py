"""The house-price recipe in the three trainers: the same first step from the same canonical
weights on the same batch (PyTorch, MXNet, Flax; the MLP DenseNet and the linear model), the
metrics JSON and the plot, and a run interrupted mid-fold that resumes to bit-for-bit the
weights and figures of a run never stopped (in process for PyTorch and Flax, a kill -9 of the
command for MXNet).

Small on purpose: Kaggle-shaped CSV files written here (128 houses, 11 encoded features, with
missing values and a neighbourhood seen only in test.csv), 2 folds, batches of 32.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

import densenet_training as training
from densenet_weights import files
from densenet_parity.backends import ROOT
from parity_tests.conftest import cli_env, need_mxnet

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_kaggle(directory, n_train=128, n_test=16, seed=0):
    """Kaggle-shaped train.csv and test.csv: Id, three numeric columns (one with missing values),
    two categorical ones (one with missing values, one with a category only test.csv has) and,
    in train.csv, SalePrice."""
    import pandas as pd
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    lot = rng.integers(2000, 20000, n).astype(float)
    lot[rng.random(n) < 0.1] = np.nan
    qual = rng.integers(1, 11, n)
    year = rng.integers(1900, 2010, n)
    street = rng.choice(["Pave", "Grvl", None], n, p=[0.7, 0.2, 0.1])
    hood = rng.choice(["NAmes", "CollgCr", "OldTown"], n)
    hood[n_train:n_train + 2] = "Blueste"  # only in test.csv
    price = (30000 + 8 * np.nan_to_num(lot, nan=9000) + 15000 * qual + 300 * (year - 1900)
             + rng.normal(0, 10000, n)).round()
    frame = pd.DataFrame({"Id": np.arange(1, n + 1), "LotArea": lot, "OverallQual": qual,
                          "YearBuilt": year, "Street": street, "Neighborhood": hood,
                          "SalePrice": price})
    directory.mkdir(parents=True, exist_ok=True)
    frame.iloc[:n_train].to_csv(directory / "train.csv", index=False)
    frame.iloc[n_train:].drop(columns="SalePrice").to_csv(directory / "test.csv", index=False)
    return directory


class Quiet(training.Reporter):
    """Records nothing; ``stop_at``: raise Interrupted at that epoch_start (counted over the
    folds), as a kill between two epochs would stop the run."""

    def __init__(self, stop_at=None):
        self.stop_at, self.starts = stop_at, 0

    def epoch_start(self, epoch, epochs, num_batches):
        self.starts += 1
        if self.starts == self.stop_at:
            raise Interrupted


class Interrupted(Exception):
    pass


def house_config(backend, out, data_dir, **kw):
    settings = dict(backend=backend, dataset="kaggle-house", data_dir=str(data_dir), folds=2,
                    epochs=2, batch_size=32, seed=1, out=str(out), progress=False, plot=False)
    settings.update(kw)
    return training.TrainConfig(**settings).finalize()


def run(cfg, reporter=None):
    from densenet_cli.train import train
    return train(cfg, reporter or Quiet())


@pytest.fixture(scope="module")
def kaggle(tmp_path_factory):
    return write_kaggle(tmp_path_factory.mktemp("kaggle"))


@pytest.mark.parametrize("model", ["densenet", "linear"])
def test_first_step_is_the_same_in_every_backend(model, kaggle, tmp_path):
    """One epoch of each fold in each backend from the same canonical Xavier weights on the same
    batches: the first step's loss agrees to 1e-5 (the forward pass), the epoch's mean loss (the
    second batch after one Adam step) closely; PyTorch's run also writes its JSON and plot."""
    need_mxnet()
    runs = {b: run(house_config(b, tmp_path / b, kaggle, model=model, epochs=1, plot=b == "torch"))
            for b in ("torch", "flax", "mxnet")}
    ref = runs["torch"]
    assert ref["dataset"]["features"] == 11 and ref["dataset"]["test"] == 16
    for b, m in runs.items():
        assert m["first_step_loss"] == pytest.approx(ref["first_step_loss"], rel=1e-5), b
        for f, g in zip(m["folds"], ref["folds"]):
            assert f["epochs"][0]["first_loss"] == pytest.approx(g["epochs"][0]["first_loss"],
                                                                 rel=1e-5), (b, f["fold"])
            assert f["epochs"][0]["loss"] == pytest.approx(g["epochs"][0]["loss"], rel=1e-3), b
    # the JSON: per fold its rows and epochs, the average of the folds' last epochs
    saved = json.loads((tmp_path / "torch" / "metrics.json").read_text())
    assert saved["format"] == training.HOUSE_METRICS_FORMAT and saved["recipe"] == "house"
    assert [f["valid_rows"] for f in saved["folds"]] == [[0, 64], [64, 128]]
    assert saved["final"]["valid_log_rmse"] == pytest.approx(
        np.mean([f["epochs"][-1]["valid_log_rmse"] for f in saved["folds"]]), rel=1e-12)
    assert saved["book_line"].splitlines()[-2].startswith("2-fold validation: avg train log rmse")
    for m in runs.values():  # the book's measure (train mode) is eval mode's without BatchNorm
        same = [f[k] == f[f"{k}_book"] for f in m["folds"] for k in ("train_log_rmse",
                                                                      "valid_log_rmse")]
        assert all(same) if model == "linear" else not any(same)
    assert saved["optimizer"]["name"] == "adam" and saved["config"]["lr"] == 0.05
    assert (tmp_path / "torch" / "metrics.png").read_bytes()[:8] == PNG_MAGIC


def _final_arrays(out):
    from safetensors.numpy import load_file
    latest = training.latest_checkpoint(out)
    state, _ = files.load_state(latest / "model.safetensors")
    return state, load_file(str(latest / "optimizer.safetensors"))


def _same_run(a, b):
    assert [f["fold"] for f in a["folds"]] == [f["fold"] for f in b["folds"]]
    for fa, fb in zip(a["folds"], b["folds"]):
        for ea, eb in zip(fa["epochs"], fb["epochs"]):
            for key in ("loss", "first_loss", "train_log_rmse", "valid_log_rmse"):
                assert ea[key] == eb[key], (fa["fold"], ea["epoch"], key)
    assert a["final"]["valid_log_rmse"] == b["final"]["valid_log_rmse"]


def _same_arrays(whole, broken):
    (sa, oa), (sb, ob) = _final_arrays(whole), _final_arrays(broken)
    assert set(sa) == set(sb) and all(np.array_equal(sa[k], sb[k]) for k in sa)
    assert set(oa) == set(ob) and all(np.array_equal(oa[k], ob[k]) for k in oa)
    return sa, oa


@pytest.mark.parametrize("backend", ["torch", "flax"])
def test_interrupted_run_resumes_bit_for_bit(backend, kaggle, tmp_path):
    """Stopped before fold 2's second epoch (its first epoch's checkpoint written), resumed:
    the same figures and bit-for-bit the same weights and Adam moments as a run never stopped.
    Then --resume with other epochs, and a fresh start over the run, are refused."""
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    a = run(house_config(backend, whole, kaggle))
    with pytest.raises(Interrupted):
        run(house_config(backend, broken, kaggle), Quiet(stop_at=2 + 2))
    assert json.loads((training.checkpoints_dir(broken) / "latest.json").read_text())["epoch"] == 3
    assert not (broken / "metrics.json").exists()
    b = run(house_config(backend, broken, kaggle, resume=True))
    assert b["resumed_from"] == {"fold": 2, "epoch": 1} and a["resumed_from"] is None
    _same_run(a, b)
    state, adam = _same_arrays(whole, broken)
    trainable = training.house.trainable_names(house_config(backend, whole, kaggle), 11)
    assert set(adam) == {f"{k}/{n}" for k in ("exp_avg", "exp_avg_sq") for n in trainable}
    assert any(k.endswith("running_mean") for k in state)  # BatchNorm's statistics travel too
    with pytest.raises(training.ResumeError, match="epochs per fold"):
        run(house_config(backend, broken, kaggle, resume=True, epochs=3))
    with pytest.raises(training.ResumeError, match="already holds a run"):
        run(house_config(backend, broken, kaggle))


def test_mxnet_killed_run_resumes_bit_for_bit(kaggle, tmp_path):
    """kill -9 of `densenet train --backend mxnet` (its child in the MXNet environment dies with
    it) once a checkpoint is written, then --resume: the same figures and weights as a run never
    stopped."""
    need_mxnet()
    args = ["--backend", "mxnet", "--dataset", "kaggle-house", "--data-dir", kaggle, "--folds", 2,
            "--epochs", 6, "--batch-size", 32, "--seed", 1, "--no-plot", "--no-progress"]
    cli = lambda *extra: [sys.executable, "-m", "densenet_cli", "train",  # noqa: E731
                          *map(str, args), *map(str, extra)]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    subprocess.run(cli("--out", whole), cwd=ROOT, env=cli_env(), check=True, capture_output=True)
    proc = subprocess.Popen(cli("--out", broken), cwd=ROOT, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = training.checkpoints_dir(broken) / "latest.json"
    deadline = time.time() + 120
    while not pointer.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    done = json.loads(pointer.read_text())["epoch"]
    assert done < 12 and not (broken / "metrics.json").exists(), "killed too late"
    res = subprocess.run(cli("--out", broken, "--resume"), cwd=ROOT, env=cli_env(),
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    fold, epoch = (done - 1) // 6 + 1, (done - 1) % 6 + 1
    assert f"resumed after fold {fold} epoch {epoch}" in res.stdout
    a = json.loads((whole / "metrics.json").read_text())
    b = json.loads((broken / "metrics.json").read_text())
    _same_run(a, b)
    _same_arrays(whole, broken)
