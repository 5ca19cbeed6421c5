"""``densenet train --backend torch|mxnet|flax ...``: train with the book's recipe.

Loads the dataset (Fashion-MNIST or the offline digits), checks the network takes its size, then
runs the backend's trainer: PyTorch and Flax in this process, MXNet in its own environment as a
subprocess (``python -m densenet_mxnet.train``) that gets the prepared dataset as an .npz file
and streams its progress as JSON lines, which this process draws. The plot is drawn here, from
the run's metrics.json.
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


def run_mxnet(cfg: training.TrainConfig, dataset, reporter: training.Reporter) -> dict:
    """Train in the MXNet environment; returns the metrics the child reports."""
    py = mxnet_python()
    if py is None:
        raise training.UserError(MXNET_HINT)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".dataset-*.npz"):  # left by a run that was killed
        stale.unlink(missing_ok=True)
    fd, npz = tempfile.mkstemp(prefix=".dataset-", suffix=".npz", dir=out)
    os.close(fd)
    env = dict(os.environ, PYTHONUNBUFFERED="1", DENSENET_PARENT_PID=str(os.getpid()),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [py, "-m", "densenet_mxnet.train", *training.config_to_argv(cfg), "--prepared", npz,
           "--events"]
    metrics = None
    try:
        dataset_lib.save_npz(dataset, npz)
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
        raise training.UserError("the MXNet trainer stopped (its message is above)")
    if rc != 0 or metrics is None:
        raise RuntimeError(f"the MXNet trainer failed (exit status {rc}): {' '.join(cmd)}")
    return metrics


def train(cfg: training.TrainConfig, reporter: Optional[training.Reporter] = None) -> dict:
    """Load the data and train; returns the metrics (and writes metrics.json, the plot)."""
    reporter = reporter or training.ConsoleReporter(cfg.progress)
    dataset = dataset_lib.load_dataset(cfg.dataset, cfg.resize, cfg.limit, cfg.data_dir,
                                       download=cfg.download, verify=cfg.verify)
    training.check_size(cfg, dataset)
    if cfg.backend == "mxnet":
        metrics = run_mxnet(cfg, dataset, reporter)
    else:
        trainer = importlib.import_module(f"densenet_{cfg.backend}.train")
        metrics = trainer.fit(cfg, dataset, reporter)
    out = Path(cfg.out)
    if cfg.plot:
        png = training.plot_metrics(metrics, out / "metrics.png")
        reporter.message(f"plot: {png}")
    reporter.message(f"metrics: {out / 'metrics.json'}; checkpoint: "
                     f"{training.latest_checkpoint(out)}")
    return metrics


def main(argv: Optional[List[str]] = None) -> int:
    args = training.make_parser("densenet train").parse_args(argv)
    cfg = training.config_from_args(args)
    try:
        train(cfg)
    except training.user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
