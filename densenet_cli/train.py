"""``densenet train --backend torch|mxnet|flax ...``: train with the book's recipe.

Images (digits, fashion-mnist) train with d2l.train_ch6; house prices (``--dataset ames`` or
``kaggle-house``, an MLP preset such as ``house_mlp``, or ``--model linear``) with the book's
Kaggle recipe (``train_house``: K-fold cross-validation, Adam, log-rmse).

Loads the dataset (Fashion-MNIST or the offline digits), checks the network takes its size, then
runs the backend's trainer: PyTorch and Flax in this process, MXNet in its own environment as a
subprocess (``python -m densenet_mxnet.train``) that gets the prepared dataset as an .npz file
and streams its progress as JSON lines, which this process draws. The plot is drawn here, from
the run's metrics.json.

With ``--devices N``: PyTorch runs as N DDP processes that torchrun starts (``python -m
torch.distributed.run -m densenet_torch.train``, the same .npz and JSON lines, rank 0's); Flax
in this process with N JAX devices (on a CPU, XLA's host device count is set before JAX
starts); MXNet's child with N contexts. Settings a backend cannot honour are refused here
first, in one message.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

import densenet_training as training
from densenet_parity.backends import MXNET_HINT, ROOT, mxnet_python
from densenet_training import data as dataset_lib
from densenet_training import tabular


def run_child(cfg: training.TrainConfig, dataset, reporter: training.Reporter, launch: List[str],
              module: str, env: dict, what: str) -> dict:
    """Run a trainer in its own process(es): ``launch`` (a Python, or torchrun) starts
    ``python -m module`` with the dataset prepared as an .npz file in the run directory; the
    progress arrives as JSON lines (the lead process's), replayed on ``reporter``. Returns the
    metrics it reports."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".dataset-*.npz"):  # left by a run that was killed
        stale.unlink(missing_ok=True)
    fd, npz = tempfile.mkstemp(prefix=".dataset-", suffix=".npz", dir=out)
    os.close(fd)
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    cmd = [*launch, "-m", module, *training.config_to_argv(cfg), "--prepared", npz, "--events"]
    metrics = None
    try:
        (tabular.save_npz if cfg.house else dataset_lib.save_npz)(dataset, npz)
        proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=subprocess.PIPE, text=True,
                                bufsize=1)
        try:
            for line in proc.stdout:
                metrics = training.relay(line, reporter) or metrics
            rc = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    finally:
        os.unlink(npz)
    if rc == 2:  # a user error, printed by the child
        raise training.UserError(f"{what} stopped (its message is above)")
    if rc != 0 or metrics is None:
        raise RuntimeError(f"{what} failed (exit status {rc}): {' '.join(cmd)}")
    return metrics


def run_mxnet(cfg: training.TrainConfig, dataset, reporter: training.Reporter) -> dict:
    """Train in the MXNet environment; returns the metrics the child reports."""
    py = mxnet_python()
    if py is None:
        raise training.UserError(MXNET_HINT)
    return run_child(cfg, dataset, reporter, [py], "densenet_mxnet.train",
                     {"DENSENET_PARENT_PID": str(os.getpid())}, "the MXNet trainer")


def run_torchrun(cfg: training.TrainConfig, dataset, reporter: training.Reporter) -> dict:
    """PyTorch on ``cfg.devices`` devices: torchrun starts one process per device (rank 0
    reports and writes); returns the metrics rank 0 reports. The devices are checked here
    first, so that a request PyTorch cannot honour is one message, not torchrun's traceback."""
    from densenet_torch.train import select_devices
    select_devices(cfg.device, cfg.devices, cfg.sync_bn)
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, training.cpu_cores() // cfg.devices))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
              f"--nproc-per-node={cfg.devices}"]
    return run_child(cfg, dataset, reporter, launch, "densenet_torch.train",
                     {"OMP_NUM_THREADS": threads}, f"torchrun with {cfg.devices} processes")


def host_devices(devices: int) -> None:
    """Ask XLA for ``devices`` host (CPU) devices, before JAX starts (it fixes the number then);
    it changes nothing on GPUs, and JAX's device checks say what to do if it started already."""
    if "jax" in sys.modules:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = \
            f"{flags} --xla_force_host_platform_device_count={devices}".strip()


def train(cfg: training.TrainConfig, reporter: Optional[training.Reporter] = None) -> dict:
    """Load the data and train; returns the metrics (and writes metrics.json, the plot).
    PyTorch on several devices runs under torchrun (started here unless this process is one
    of torchrun's already), MXNet in its own environment, Flax in this process."""
    reporter = reporter or training.ConsoleReporter(cfg.progress)
    if cfg.house:
        return train_house(cfg, reporter)
    training.check_parallel(cfg)
    dataset = dataset_lib.load_dataset(cfg.dataset, cfg.resize, cfg.limit, cfg.data_dir,
                                       download=cfg.download, verify=cfg.verify)
    training.check_size(cfg, dataset)
    training.check_run_dir(cfg, dataset)
    if cfg.backend == "mxnet":
        metrics = run_mxnet(cfg, dataset, reporter)
    elif cfg.backend == "torch" and cfg.devices > 1 and "WORLD_SIZE" not in os.environ:
        metrics = run_torchrun(cfg, dataset, reporter)
    else:
        if cfg.backend == "flax" and cfg.devices > 1:
            host_devices(cfg.devices)
        trainer = importlib.import_module(f"densenet_{cfg.backend}.train")
        metrics = trainer.fit(cfg, dataset, reporter)
    if not training.lead_process():  # another torchrun process: rank 0 writes
        return metrics
    out = Path(cfg.out)
    if cfg.plot:
        png = training.plot_metrics(metrics, out / "metrics.png")
        reporter.message(f"plot: {png}")
    reporter.message(f"metrics: {out / 'metrics.json'}; checkpoint: "
                     f"{training.latest_checkpoint(out)}")
    return metrics


def train_house(cfg: training.TrainConfig, reporter: training.Reporter) -> dict:
    """The house-price recipe: the tables read and encoded here (pandas), then the backend's
    ``fit_house`` (MXNet's in its own environment, given the encoded arrays); the plot."""
    training.check_recipe(cfg)
    data = tabular.load_house(cfg.dataset, cfg.data_dir, cfg.limit)
    for i in range(cfg.folds):  # too few rows for the folds: one message before any work
        tabular.k_fold_indices(len(data.labels), cfg.folds, i)
    training.check_run_dir(cfg, None, tabular.fingerprint(data))
    if cfg.backend == "mxnet":
        metrics = run_mxnet(cfg, data, reporter)
    else:
        trainer = importlib.import_module(f"densenet_{cfg.backend}.train")
        metrics = trainer.fit_house(cfg, data, reporter)
    out = Path(cfg.out)
    if cfg.plot:
        png = training.plot_house(metrics, out / "metrics.png")
        reporter.message(f"plot: {png}")
    reporter.message(f"metrics: {out / 'metrics.json'}; checkpoint: "
                     f"{training.latest_checkpoint(out)}")
    return metrics


def main(argv: Optional[List[str]] = None) -> int:
    args = training.make_parser("densenet train").parse_args(argv)
    try:
        cfg = training.config_from_args(args)
        train(cfg)
    except training.user_errors() as e:
        if training.lead_process():
            print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
