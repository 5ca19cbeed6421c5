"""The loop of d2l.train_ch6 around a backend's trainer: train, evaluate, report, checkpoint,
resume; the metrics JSON."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import List, Optional

import densenet_spec as spec
from densenet_training import data as dataset_lib
from densenet_training.checkpoints import (checkpoints_dir, data_fingerprint, latest_checkpoint,
                                          optimizer_info)
from densenet_training.progress import EpochMeter, Reporter, book_lines
from densenet_training.recipe import (METRICS_FORMAT, RESUME_KEYS, ResumeError, TrainConfig,
                                      model_options)

def summarize(history: List[dict]) -> dict:
    """The book's final figures: last epoch's loss and accuracies; examples/sec over all epochs
    (d2l: examples of all epochs / time spent training, evaluation excluded)."""
    last = history[-1]
    examples = sum(r["examples"] for r in history)
    seconds = sum(r["train_time"] for r in history)
    return {"loss": last["loss"], "train_acc": last["train_acc"], "test_acc": last["test_acc"],
            "examples_per_sec": examples / max(seconds, 1e-12), "epochs": len(history)}


def run_epochs(cfg: TrainConfig, dataset: "dataset_lib.Dataset", model, optimizer, trainer,
               reporter: Reporter, device: str, versions: Optional[dict] = None) -> dict:
    """The loop of d2l.train_ch6 around a backend's ``trainer`` module: for each epoch, train
    (running loss and accuracy), evaluate, report, checkpoint. Resumes from the run's last
    checkpoint with ``cfg.resume``. Writes metrics.json into ``cfg.out``; returns the metrics.
    """
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = data_fingerprint(dataset)
    settings = {k: getattr(cfg, k) for k in RESUME_KEYS}
    history: List[dict] = []
    start = steps = 0
    latest = latest_checkpoint(out)
    if cfg.resume:
        if latest is None:
            raise ResumeError(f"--resume: no checkpoint in {checkpoints_dir(out)} "
                                    "(start the run without --resume)")
        info = json.loads((latest / "checkpoint.json").read_text())
        theirs = dict(info["settings"], data=info["data_fingerprint"])
        ours = dict(settings, data=fingerprint)
        diff = [f"{k}: checkpoint {theirs.get(k)!r}, now {ours.get(k)!r}"
                for k in ours if theirs.get(k) != ours.get(k)]
        if diff:
            raise ResumeError(f"--resume: {latest} is a different run:\n  " + "\n  ".join(diff))
        info = trainer.load_checkpoint(latest, model, optimizer)
        history, start, steps = info["history"], info["epoch"], info["optimizer"]["step"]
    elif latest is not None and not cfg.overwrite:
        raise ResumeError(f"{out} already holds a run (checkpoint {latest.name}); pass "
                              "--resume to continue it, --overwrite to start again, or another "
                              "--out")
    elif cfg.overwrite:
        shutil.rmtree(checkpoints_dir(out), ignore_errors=True)
        for name in ("metrics.json", "metrics.png"):
            (out / name).unlink(missing_ok=True)
    n_train = len(dataset.train_labels)
    reporter.start({"backend": cfg.backend, "device": device, "preset": cfg.preset,
                    "dataset": dataset.name, "train": n_train, "test": len(dataset.test_labels),
                    "size": dataset.size, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
                    "lr": cfg.lr, "resumed_from": start or None})
    if start >= cfg.epochs:
        reporter.message(f"nothing to do: the checkpoint has {start} epochs, --epochs {cfg.epochs}")
    for epoch in range(start + 1, cfg.epochs + 1):
        batches = dataset_lib.batch_indices(n_train, cfg.batch_size, cfg.seed, epoch - 1)
        meter = EpochMeter(epoch, len(batches), reporter)
        reporter.epoch_start(epoch, cfg.epochs, len(batches))
        trainer.train_epoch(model, optimizer, dataset, batches, meter)
        steps += len(batches)
        record = meter.result()
        record["test_acc"] = float(trainer.evaluate(model, dataset, cfg.batch_size))
        history.append(record)
        reporter.epoch_end(record)
        trainer.save_checkpoint(out, epoch, model, optimizer, {
            "backend": cfg.backend, "device": device, "settings": settings,
            "config": cfg.to_dict(), "data_fingerprint": fingerprint, "history": history,
            "optimizer": optimizer_info(cfg.lr, cfg.momentum, steps)})
    if not history:
        raise ValueError("no epochs trained")
    metrics = {
        "format": METRICS_FORMAT, "backend": cfg.backend, "device": device,
        "preset": cfg.preset, "network": spec.make_config(
            cfg.preset, **model_options(cfg, dataset)).to_dict(),
        "dataset": dataset.describe(), "data_fingerprint": fingerprint,
        "config": cfg.to_dict(), "recipe": {
            "optimizer": "sgd", "lr": cfg.lr, "momentum": cfg.momentum, "weight_decay": 0.0,
            "batch_size": cfg.batch_size, "epochs": cfg.epochs, "loss": "softmax cross-entropy",
            "init": cfg.init or f"xavier-uniform (seed {cfg.seed})"},
        "first_step_loss": history[0]["first_loss"], "epochs": history,
        "final": summarize(history), "resumed_from": start or None,
        "versions": versions or {}}
    metrics["book_line"] = "\n".join(book_lines(metrics))
    write_json(out / "metrics.json", metrics)
    reporter.finish(metrics)
    return metrics


def write_json(path, obj) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)
