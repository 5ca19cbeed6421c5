"""The house-price recipe (d2l "Predicting House Prices on Kaggle", with the forum's MLP DenseNet
of the DenseNet chapter's exercise 5) around a backend's trainer: K-fold cross-validation, per
fold a fresh network trained for E epochs with Adam on the mean squared error of the prices,
the train and validation log-rmse after every epoch, the per-fold and average figures;
progress, checkpoints after every epoch of every fold, resume, the metrics JSON.

The trainers (densenet_<backend>/train.py) supply ``build_house_model``, ``load_house_state``,
``house_state``, ``make_adam``, ``house_train_epoch``, ``house_predict``, ``adam_state`` and
``load_adam_state``; ``run_folds`` is the rest, the same for all three.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

import densenet_spec as spec
from densenet_training import tabular
from densenet_training.checkpoints import checkpoints_dir, read_checkpoint, write_checkpoint
from densenet_training.loop import check_run_dir, write_json
from densenet_training.progress import EpochMeter, Reporter, house_lines
from densenet_training.recipe import (RESUME_KEYS, ResumeError, TrainConfig, _hash_uniform,
                                      xavier_state)

HOUSE_METRICS_FORMAT = "densenet-suite/house-metrics-v1"
#: Adam as torch.optim.Adam's defaults (the book's house-price section uses them).
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8
#: The log-rmse figures of every epoch, fold and run: in eval mode (BatchNorm's running
#: statistics), and as the book's log_rmse measures them (train mode: its train() never calls
#: net.eval(), so BatchNorm normalises with the statistics of the set evaluated).
BOTH = ("train_log_rmse", "valid_log_rmse", "train_log_rmse_book", "valid_log_rmse_book")
ADAM_CONVENTION = ("torch.optim.Adam: g += wd * w; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2; "
                   "w -= lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)")


def house_network(cfg: TrainConfig, in_features: int) -> Optional[spec.Preset]:
    """The MLP preset's configuration for ``in_features`` inputs; None for --model linear."""
    if cfg.model == "linear":
        return None
    return spec.make_config(cfg.preset, in_features=int(in_features))


def linear_state(in_features: int, seed: int) -> Dict[str, np.ndarray]:
    """The linear model's canonical state (``classifier.weight`` [1, F], ``classifier.bias``
    [1]): Xavier-uniform weight from the seed, zero bias (as xavier_state draws them)."""
    a = math.sqrt(6.0 / (in_features + 1))
    u = _hash_uniform("classifier.weight", seed, in_features)
    return {"classifier.weight": ((2.0 * u - 1.0) * a).astype(np.float32).reshape(1, in_features),
            "classifier.bias": np.zeros((1,), np.float32)}


def check_linear_state(state: Dict[str, np.ndarray], in_features: int) -> None:
    """spec.StateMismatchError listing what is missing, unexpected or misshapen in a linear
    model's canonical state."""
    expected = {"classifier.weight": (1, int(in_features)), "classifier.bias": (1,)}
    found = {k: tuple(int(d) for d in np.shape(v)) for k, v in state.items()}
    missing = [(n, sh) for n, sh in expected.items() if n not in found]
    unexpected = [(n, sh) for n, sh in found.items() if n not in expected]
    misshapen = [(n, sh, found[n]) for n, sh in expected.items() if n in found and found[n] != sh]
    if missing or unexpected or misshapen:
        raise spec.StateMismatchError(missing, unexpected, misshapen)


def trainable_names(cfg: TrainConfig, in_features: int) -> List[str]:
    """The canonical names of the trained parameters (Adam's moments are kept for these)."""
    config = house_network(cfg, in_features)
    if config is None:
        return ["classifier.weight", "classifier.bias"]
    return [n for n, _, kind in spec.canonical_tensors(config) if kind == "param"]


def fold_initial_state(cfg: TrainConfig, in_features: int, fold: int) -> Dict[str, np.ndarray]:
    """Fold ``fold``'s (1-based) initial weights: a fresh network per fold as the book's
    get_net(), drawn from seed + fold - 1 (the same in every backend)."""
    config = house_network(cfg, in_features)
    seed = cfg.seed + fold - 1
    return linear_state(in_features, seed) if config is None else xavier_state(config, seed)


def fold_batches(cfg: TrainConfig, train_rows: np.ndarray, fold: int, epoch: int
                 ) -> List[np.ndarray]:
    """Epoch ``epoch`` (1-based) of fold ``fold``: the shuffled minibatches of the fold's train
    rows (indices into the whole data), the last one smaller (d2l.load_array keeps it)."""
    from densenet_training.data import batch_indices
    order = batch_indices(len(train_rows), cfg.batch_size, cfg.seed,
                          (fold - 1) * cfg.epochs + epoch - 1)
    return [train_rows[b] for b in order]


def adam_info(cfg: TrainConfig, step: int) -> dict:
    return {"name": "adam", "lr": cfg.lr, "betas": list(ADAM_BETAS), "eps": ADAM_EPS,
            "weight_decay": cfg.weight_decay, "step": int(step),
            "buffers": "exp_avg/<name> and exp_avg_sq/<name> per parameter (canonical names)",
            "convention": ADAM_CONVENTION}


def summarize_folds(folds: List[dict]) -> dict:
    """The book's closing figures: the average over folds of the last epoch's train and
    validation log-rmse; examples/sec over all epochs of all folds (evaluation excluded)."""
    epochs = [r for f in folds for r in f["epochs"]]
    seconds = sum(r["train_time"] for r in epochs)
    return {**{key: float(np.mean([f[key] for f in folds])) for key in BOTH},
            "folds": len(folds), "epochs": len(folds[0]["epochs"]) if folds else 0,
            "train_time": seconds,
            "examples_per_sec": sum(r["examples"] for r in epochs) / max(seconds, 1e-12)}


def _fold_record(fold: int, train_rows, valid_rows) -> dict:
    return {"fold": fold, "train_rows": [int(train_rows[0]), int(train_rows[-1]) + 1]
            if len(train_rows) else [], "train": int(len(train_rows)),
            "valid_rows": [int(valid_rows[0]), int(valid_rows[-1]) + 1], "valid": int(len(valid_rows)),
            "epochs": []}


def run_folds(cfg: TrainConfig, data: "tabular.HouseData", trainer, reporter: Reporter,
              device, versions: Optional[dict] = None) -> dict:
    """The book's k_fold around ``trainer`` (a densenet_<backend>.train module) on ``device``:
    for each fold a fresh network from fold_initial_state and a fresh Adam; for each epoch train
    on the fold's shuffled batches, then the log-rmse of the fold's train and validation rows (in
    eval mode, BatchNorm's running statistics; and as the book measures it, in train mode),
    report, checkpoint. Resumes from the run's last
    checkpoint with ``cfg.resume``. Writes metrics.json into ``cfg.out``; returns the metrics."""
    t_start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    x, y, n = data.features, data.labels, len(data.labels)
    fingerprint = tabular.fingerprint(data)
    settings = {k: getattr(cfg, k) for k in RESUME_KEYS}
    config = house_network(cfg, data.in_features)
    device_label = trainer.device_name(device)
    splits = [tabular.k_fold_indices(n, cfg.folds, i) for i in range(cfg.folds)]
    folds: List[dict] = []
    start_fold, start_epoch, resumed = 1, 0, None
    latest = check_run_dir(cfg, None, fingerprint)
    info = None
    if latest is not None:
        info = json.loads((latest / "checkpoint.json").read_text())
        if info.get("recipe") != "house" or info["config"]["epochs"] != cfg.epochs:
            raise ResumeError(f"--resume: {latest} is a different run: epochs per fold: "
                              f"checkpoint {info['config'].get('epochs')!r}, now {cfg.epochs!r}")
        folds, start_fold, start_epoch = info["history"], info["fold"], info["fold_epoch"]
        resumed = {"fold": start_fold, "epoch": start_epoch}
        if start_epoch >= cfg.epochs:  # that fold was finished: the next one starts afresh
            start_fold, start_epoch = start_fold + 1, 0
    elif cfg.overwrite:
        shutil.rmtree(checkpoints_dir(out), ignore_errors=True)
        for name in ("metrics.json", "metrics.png"):
            (out / name).unlink(missing_ok=True)
    reporter.start({"recipe": "house", "backend": cfg.backend, "device": device_label,
                    "preset": cfg.preset, "model": cfg.model, "dataset": data.name,
                    "train": n, "features": data.in_features, "folds": cfg.folds,
                    "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr,
                    "weight_decay": cfg.weight_decay, "resumed_from": resumed})
    for fold in range(start_fold, cfg.folds + 1):
        train_rows, valid_rows = splits[fold - 1]
        model = trainer.build_house_model(cfg, data.in_features, device)
        optimizer = trainer.make_adam(model, cfg.lr, cfg.weight_decay)
        first = start_epoch if fold == start_fold else 0
        if first:
            state, arrays, ck = read_checkpoint(latest)
            trainer.load_house_state(model, state)
            trainer.load_adam_state(model, optimizer, arrays, ck["optimizer"]["step"])
            steps = ck["optimizer"]["step"]
            record = folds.pop()
        else:
            trainer.load_house_state(model, fold_initial_state(cfg, data.in_features, fold))
            steps = 0
            record = _fold_record(fold, train_rows, valid_rows)
        reporter.message(f"fold {fold}/{cfg.folds}: {len(train_rows)} train rows, validation "
                         f"rows {int(valid_rows[0])}-{int(valid_rows[-1])}")
        for epoch in range(first + 1, cfg.epochs + 1):
            batches = fold_batches(cfg, train_rows, fold, epoch)
            meter = EpochMeter(epoch, len(batches), reporter)
            reporter.epoch_start(epoch, cfg.epochs, len(batches))
            trainer.house_train_epoch(model, optimizer, x, y, batches, meter)
            steps += len(batches)
            r = meter.result()
            e = {k: r[k] for k in ("epoch", "loss", "examples", "train_time", "compile_time",
                                   "examples_per_sec", "first_loss")}
            e["fold"] = fold
            for rows, key in ((train_rows, "train"), (valid_rows, "valid")):
                e[f"{key}_log_rmse"] = tabular.log_rmse(trainer.house_predict(model, x[rows]),
                                                        y[rows])
                e[f"{key}_log_rmse_book"] = tabular.log_rmse(
                    trainer.house_predict(model, x[rows], batch_stats=True), y[rows])
            record["epochs"].append(e)
            for key in BOTH:
                record[key] = e[key]
            reporter.epoch_end(e)
            write_checkpoint(out, (fold - 1) * cfg.epochs + epoch, trainer.house_state(model),
                             trainer.adam_state(model, optimizer), {
                                 "recipe": "house", "backend": cfg.backend,
                                 "device": device_label, "settings": settings,
                                 "config": cfg.to_dict(), "data_fingerprint": fingerprint,
                                 "fold": fold, "fold_epoch": epoch,
                                 "history": folds + [record],
                                 "optimizer": adam_info(cfg, steps)}, config)
        folds.append(record)
    if not folds:
        raise ValueError("no folds trained")
    metrics = {
        "format": HOUSE_METRICS_FORMAT, "recipe": "house", "backend": cfg.backend,
        "device": device_label, "preset": cfg.preset, "model": cfg.model,
        "network": config.to_dict() if config is not None else
        {"name": "linear", "in_features": data.in_features, "num_outputs": 1},
        "dataset": data.describe(), "data_fingerprint": fingerprint, "config": cfg.to_dict(),
        "optimizer": dict(adam_info(cfg, 0), step=None),
        "loss": "mean squared error of the prices (torch.nn.MSELoss)",
        "metric": "log_rmse = sqrt(mean((log(max(pred, 1)) - log(y))^2)); *_log_rmse in eval "
        "mode (BatchNorm's running statistics), *_log_rmse_book in train mode as the book's "
        "log_rmse (BatchNorm over the set evaluated; running statistics left unchanged)",
        "init": f"xavier-uniform, seed {cfg.seed} + fold - 1",
        "first_step_loss": folds[0]["epochs"][0]["first_loss"], "folds": folds,
        "final": summarize_folds(folds), "resumed_from": resumed,
        "wall_time": time.perf_counter() - t_start, "versions": versions or {}}
    metrics["book_line"] = "\n".join(house_lines(metrics))
    write_json(out / "metrics.json", metrics)
    reporter.finish(metrics)
    return metrics
