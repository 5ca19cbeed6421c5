"""The loop of d2l.train_ch6 around a backend's trainer: train, evaluate, report, checkpoint,
resume; the metrics JSON."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import List, Optional

import densenet_spec as spec
from densenet_training import data as dataset_lib
from densenet_training.checkpoints import (checkpoints_dir, data_fingerprint, latest_checkpoint,
                                          optimizer_info)
from densenet_training.progress import (ConsoleReporter, EventReporter, EpochMeter, Reporter,
                                        book_lines, exit_with_parent)
from densenet_training.recipe import (METRICS_FORMAT, RESUME_DEFAULTS, RESUME_KEYS, ResumeError,
                                      TrainConfig, config_from_args, check_size, make_parser,
                                      model_options, user_errors)


def summarize(history: List[dict]) -> dict:
    """The book's final figures: last epoch's loss and accuracies; examples/sec over all epochs
    (d2l: examples of all epochs / time spent training, evaluation excluded)."""
    last = history[-1]
    examples = sum(r["examples"] for r in history)
    seconds = sum(r["train_time"] for r in history)
    return {"loss": last["loss"], "train_acc": last["train_acc"], "test_acc": last["test_acc"],
            "examples_per_sec": examples / max(seconds, 1e-12), "epochs": len(history)}


def lead_process() -> bool:
    """Whether this process reports and writes: always, except in torchrun's processes other than
    rank 0 (PyTorch DDP)."""
    return os.environ.get("RANK", "0") == "0"


def check_run_dir(cfg: TrainConfig, dataset: "dataset_lib.Dataset",
                  fingerprint: Optional[str] = None):
    """What ``cfg.out`` holds, checked against ``cfg``: the checkpoint to resume from (None for a
    fresh start). ResumeError for --resume without a checkpoint or from a different run, and for
    a fresh start over a run without --overwrite. Nothing is changed on disk. ``fingerprint``:
    the dataset's ``data_fingerprint``, if the caller has it already (it hashes every image)."""
    latest = latest_checkpoint(cfg.out)
    if cfg.resume:
        if latest is None:
            raise ResumeError(f"--resume: no checkpoint in {checkpoints_dir(cfg.out)} "
                              "(start the run without --resume)")
        info = json.loads((latest / "checkpoint.json").read_text())
        theirs = dict(RESUME_DEFAULTS, **info["settings"], data=info["data_fingerprint"])
        ours = dict({k: getattr(cfg, k) for k in RESUME_KEYS}, data=fingerprint or data_fingerprint(dataset))
        diff = [f"{k}: checkpoint {theirs.get(k)!r}, now {ours.get(k)!r}"
                for k in ours if theirs.get(k) != ours.get(k)]
        if diff:
            raise ResumeError(f"--resume: {latest} is a different run:\n  " + "\n  ".join(diff))
        return latest
    if latest is not None and not cfg.overwrite:
        raise ResumeError(f"{cfg.out} already holds a run (checkpoint {latest.name}); pass "
                          "--resume to continue it, --overwrite to start again, or another --out")
    return None


def run_epochs(cfg: TrainConfig, dataset: "dataset_lib.Dataset", model, optimizer, trainer,
               reporter: Reporter, device: str, versions: Optional[dict] = None,
               batchnorm: Optional[str] = None, lead: bool = True) -> dict:
    """The loop of d2l.train_ch6 around a backend's ``trainer`` module: for each epoch, train
    (running loss and accuracy), evaluate, report, checkpoint. Resumes from the run's last
    checkpoint with ``cfg.resume``. Writes metrics.json into ``cfg.out``; returns the metrics.

    Data-parallel runs (``cfg.devices`` > 1) pass ``batchnorm``, the framework's BatchNorm
    semantics in words (``parallel.batchnorm_semantics``): it goes into the metrics and
    checkpoints with the devices and the engine (``device``); they train on ``even_batches``. In a run of several processes
    (PyTorch DDP) every process runs this loop, and only the ``lead`` one (rank 0) reports and
    writes the checkpoints and metrics.
    """
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if not lead:
        reporter = Reporter()
    fingerprint = data_fingerprint(dataset)
    settings = {k: getattr(cfg, k) for k in RESUME_KEYS}
    parallel = ({"devices": cfg.devices, "sync_bn": cfg.sync_bn, "engine": device,
                 "batchnorm": batchnorm} if cfg.devices > 1 else None)
    history: List[dict] = []
    start = steps = 0
    latest = check_run_dir(cfg, dataset, fingerprint)
    if latest is not None:
        info = trainer.load_checkpoint(latest, model, optimizer)
        history, start, steps = info["history"], info["epoch"], info["optimizer"]["step"]
    elif cfg.overwrite and lead:
        shutil.rmtree(checkpoints_dir(out), ignore_errors=True)
        for name in ("metrics.json", "metrics.png"):
            (out / name).unlink(missing_ok=True)
    n_train = len(dataset.train_labels)
    reporter.start({"backend": cfg.backend, "device": device, "preset": cfg.preset,
                    "dataset": dataset.name, "train": n_train, "test": len(dataset.test_labels),
                    "size": dataset.size, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
                    "lr": cfg.lr, "resumed_from": start or None, "devices": cfg.devices,
                    "sync_bn": cfg.sync_bn})
    if cfg.devices > 1:
        last = n_train % cfg.batch_size
        if last % cfg.devices:
            left = last % cfg.devices
            reporter.message(
                f"--devices {cfg.devices}: each epoch's last batch has {last} examples; {left} "
                f"of them {'is' if left == 1 else 'are'} left out of it so that every device "
                "gets an equal share")
        reporter.message(f"BatchNorm: {parallel['batchnorm']}")
    if start >= cfg.epochs:
        reporter.message(f"nothing to do: the checkpoint has {start} epochs, --epochs {cfg.epochs}")
    for epoch in range(start + 1, cfg.epochs + 1):
        batches = dataset_lib.batch_indices(n_train, cfg.batch_size, cfg.seed, epoch - 1)
        if cfg.devices > 1:
            batches = dataset_lib.even_batches(batches, cfg.devices)
        meter = EpochMeter(epoch, len(batches), reporter)
        reporter.epoch_start(epoch, cfg.epochs, len(batches))
        trainer.train_epoch(model, optimizer, dataset, batches, meter)
        steps += len(batches)
        record = meter.result()
        record["test_acc"] = float(trainer.evaluate(model, dataset, cfg.batch_size))
        history.append(record)
        reporter.epoch_end(record)
        if lead:
            trainer.save_checkpoint(out, epoch, model, optimizer, {
                "backend": cfg.backend, "device": device, "settings": settings,
                "config": cfg.to_dict(), "data_fingerprint": fingerprint, "history": history,
                "optimizer": optimizer_info(cfg.lr, cfg.momentum, steps),
                "data_parallel": parallel})
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
        "data_parallel": parallel, "versions": versions or {}}
    metrics["book_line"] = "\n".join(book_lines(metrics))
    if lead:
        write_json(out / "metrics.json", metrics)
    reporter.finish(metrics)
    return metrics


def trainer_main(trainer, argv=None) -> int:
    """A trainer's own process (``python -m densenet_<backend>.train``): the MXNet environment's
    trainer, and each process of a PyTorch DDP run under torchrun. With ``--prepared`` it takes
    the dataset ``densenet train`` prepared (images, or the house-price tables, which it then
    trains with ``trainer.fit_house``); with ``--events`` it reports as JSON lines on stdout
    for the parent to draw. Only the lead process (rank 0 under torchrun) reports or prints an
    error."""
    parser = make_parser(f"python -m {trainer.__name__}")
    parser.add_argument("--prepared", default=None, metavar="NPZ",
                        help="dataset prepared by `densenet train` (densenet_training.data)")
    parser.add_argument("--events", action="store_true",
                        help="report progress as JSON lines on stdout, for the parent process")
    args = parser.parse_args(argv)
    args.backend = trainer.BACKEND
    if args.events:
        exit_with_parent()
    lead = lead_process()
    try:
        cfg = config_from_args(args)
        reporter = EventReporter() if args.events else ConsoleReporter(cfg.progress)
        if cfg.house:
            from densenet_training import tabular
            data = (tabular.load_npz(args.prepared) if args.prepared else
                    tabular.load_house(cfg.dataset, cfg.data_dir, cfg.limit))
            trainer.fit_house(cfg, data, reporter)
            return 0
        if args.prepared:
            dataset = dataset_lib.load_npz(args.prepared)
        else:
            dataset = dataset_lib.load_dataset(cfg.dataset, cfg.resize, cfg.limit, cfg.data_dir,
                                               download=cfg.download, verify=cfg.verify)
        check_size(cfg, dataset)
        trainer.fit(cfg, dataset, reporter)
    except user_errors() as e:
        if lead:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


def write_json(path, obj) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)
