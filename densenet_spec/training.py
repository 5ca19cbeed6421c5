"""The training recipe and everything about a training run that is not a framework.

Framework-free (numpy, plus safetensors for checkpoints; matplotlib only for the plot, which the
main process draws), importable in both environments. The three trainers
(densenet_torch/train.py, densenet_mxnet/train.py, densenet_flax/train.py) supply the model
code: ``train_epoch``, ``evaluate``, ``save_checkpoint``, ``load_checkpoint``; this module
supplies the rest, the same for all three:

* the book's recipe (``d2l.train_ch6``): SGD, learning rate 0.1, 10 epochs, batch 256,
  Xavier-uniform weights, softmax cross-entropy, the loss and accuracies reported per epoch;
* the command line (``make_parser``), shared by ``python -m densenet_train`` and the MXNet
  trainer's process;
* the Xavier initial state, drawn once in the canonical form from the seed, so every backend
  starts from the same weights (``xavier_state``);
* progress (a bar per epoch with running loss and accuracy), per-epoch lines, the book's final
  line, the metrics JSON and the plot;
* checkpoints: a directory per epoch with the canonical model state (safetensors), the
  optimiser's state (safetensors, canonical names) and a small JSON; ``latest.json`` points at
  the newest complete one and is written last, so a run killed at any moment resumes from the
  last finished epoch.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

import densenet_spec as spec
from densenet_spec import data as dataset_lib

# --------------------------------------------------------------------------- the recipe

#: The book's hyperparameters (d2l.train_ch6 as called in the DenseNet section).
BOOK_LR, BOOK_EPOCHS, BOOK_BATCH_SIZE = 0.1, 10, 256
BACKENDS = ("torch", "mxnet", "flax")
METRICS_FORMAT = "densenet-suite/train-metrics-v1"
CHECKPOINT_FORMAT = "densenet-suite/train-checkpoint-v1"
#: How momentum buffers are stored (PyTorch's and optax's convention; MXNet converts).
MOMENTUM_CONVENTION = ("buf = momentum * buf + grad; weight -= lr * buf "
                       "(PyTorch / optax; MXNet's mom = -lr * buf)")
#: Settings that must agree for --resume to continue the same run.
RESUME_KEYS = ("backend", "preset", "dataset", "resize", "limit", "batch_size", "lr", "momentum",
               "seed", "init")
EVENT_PREFIX = "@@densenet-event "


class UserError(RuntimeError):
    """Something for the user to fix (printed as one message, exit status 2)."""


class ResumeError(UserError, ValueError):
    """--resume (or a fresh start) that does not fit what is in the run directory."""


def user_errors() -> tuple:
    """Exceptions that are the user's to fix: printed as one message, exit status 2."""
    return (dataset_lib.DataError, spec.DenseNetConfigError, spec.DenseNetInputError,
            spec.StateMismatchError, UserError)


@dataclass
class TrainConfig:
    backend: str = "torch"
    preset: str = "book"
    dataset: str = "digits"
    data_dir: Optional[str] = None
    verify: bool = True
    download: Optional[bool] = None
    epochs: int = BOOK_EPOCHS
    batch_size: int = BOOK_BATCH_SIZE
    lr: float = BOOK_LR
    momentum: float = 0.0
    resize: Optional[int] = None
    device: str = "auto"
    seed: int = 0
    limit: Optional[int] = None
    out: Optional[str] = None
    resume: bool = False
    overwrite: bool = False
    init: Optional[str] = None
    progress: bool = True
    plot: bool = True

    def to_dict(self) -> Dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def finalize(self) -> "TrainConfig":
        """Fill the defaults that depend on other settings (size, output directory)."""
        if self.resize is None:
            self.resize = dataset_lib.DEFAULT_RESIZE.get(self.dataset)
        if self.out is None:
            self.out = os.path.join("runs", f"{self.dataset}-{self.preset}-{self.backend}")
        return self


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, except for flags (a '--no-x' flag's default True only confuses)."""

    def _get_help_string(self, action):
        if action.nargs == 0 or action.default is None:
            return action.help
        return super()._get_help_string(action)


def make_parser(prog: str = "densenet-train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Train a DenseNet with the book's recipe (d2l.train_ch6: SGD, "
        "Xavier init, cross-entropy) in PyTorch, MXNet Gluon or Flax NNX.",
        formatter_class=_Defaults)
    p.add_argument("--backend", choices=BACKENDS, default="torch")
    p.add_argument("--preset", default="book", choices=spec.preset_names(),
                   help="network; other presets than 'book' get 1 input channel and 10 classes")
    p.add_argument("--dataset", choices=dataset_lib.DATASETS, default="digits",
                   help="digits: scikit-learn's bundled 8x8 digits (offline); fashion-mnist: the "
                   "book's dataset (downloaded into the cache on first use, or --data-dir)")
    p.add_argument("--data-dir", default=None,
                   help="directory holding the four Fashion-MNIST .gz files (no download)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="do not check the Fashion-MNIST files' published MD5 sums")
    p.add_argument("--epochs", type=int, default=BOOK_EPOCHS)
    p.add_argument("--batch-size", type=int, default=BOOK_BATCH_SIZE)
    p.add_argument("--lr", type=float, default=BOOK_LR)
    p.add_argument("--momentum", type=float, default=0.0,
                   help="SGD momentum (the book: none)")
    p.add_argument("--resize", type=int, default=None,
                   help="image size (default: 96 for fashion-mnist as the book, 32 for digits)")
    p.add_argument("--device", default="auto",
                   help="auto (GPU if there is one), cpu, gpu or cuda[:N]")
    p.add_argument("--seed", type=int, default=0,
                   help="initial weights and batch order (the same in every backend)")
    p.add_argument("--limit", type=int, default=None,
                   help="use only the first N train and N test examples (quick runs)")
    p.add_argument("--out", default=None,
                   help="run directory: checkpoints, metrics.json, the plot "
                   "(default runs/DATASET-PRESET-BACKEND)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last complete epoch")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out that already has checkpoints")
    p.add_argument("--init", default=None, metavar="SAFETENSORS",
                   help="start from this canonical state instead of the Xavier init")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar (per-epoch lines only)")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="do not draw the PNG")
    return p


def config_to_argv(cfg: TrainConfig) -> List[str]:
    """The command-line arguments that give ``cfg`` back (for the MXNet trainer's process)."""
    argv = ["--backend", cfg.backend, "--preset", cfg.preset, "--dataset", cfg.dataset,
            "--epochs", str(cfg.epochs), "--batch-size", str(cfg.batch_size), "--lr", repr(cfg.lr),
            "--momentum", repr(cfg.momentum), "--device", cfg.device, "--seed", str(cfg.seed)]
    for flag, value in (("--data-dir", cfg.data_dir), ("--resize", cfg.resize),
                        ("--limit", cfg.limit), ("--out", cfg.out), ("--init", cfg.init)):
        if value is not None:
            argv += [flag, str(value)]
    for flag, on in (("--no-verify", not cfg.verify), ("--resume", cfg.resume),
                     ("--overwrite", cfg.overwrite), ("--no-progress", not cfg.progress),
                     ("--no-plot", not cfg.plot)):
        if on:
            argv.append(flag)
    return argv


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    cfg = TrainConfig.from_dict(vars(args))
    for name in ("epochs", "batch_size"):
        if getattr(cfg, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be positive")
    if cfg.lr <= 0:
        raise SystemExit("--lr must be positive")
    if not 0.0 <= cfg.momentum < 1.0:
        raise SystemExit("--momentum must be in [0, 1)")
    return cfg.finalize()


def model_options(cfg: TrainConfig, dataset: "dataset_lib.Dataset") -> Dict[str, int]:
    """The options every backend's ``build(preset, **options)`` gets for this dataset: one input
    channel and the dataset's classes (the book's preset has them already)."""
    return {"in_channels": 1, "num_classes": int(dataset.num_classes)}


def check_size(cfg: TrainConfig, dataset: "dataset_lib.Dataset") -> spec.Preset:
    """The network's configuration; a clear error if the images are too small for it."""
    config = spec.make_config(cfg.preset, **model_options(cfg, dataset))
    need = spec.min_input_size(config)
    if dataset.size < need:
        raise spec.DenseNetInputError(
            f"--resize {dataset.size} is too small for DenseNet '{cfg.preset}': it needs at least "
            f"{need}x{need} pixels; pass --resize {need} or more")
    return config


# --------------------------------------------------------------------------- Xavier init

def _hash_uniform(name: str, seed: int, n: int) -> np.ndarray:
    """n uniform [0, 1) doubles from (seed, tensor name): the same under every numpy."""
    key = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")
    with np.errstate(over="ignore"):
        bits = dataset_lib._splitmix64(np.arange(n, dtype=np.uint64) ^ np.uint64(key))
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def xavier_state(config: spec.Preset, seed: int = 0) -> Dict[str, np.ndarray]:
    """The book's initialisation as a canonical state: every conv and dense weight drawn from
    Xavier's (Glorot's) uniform U(-a, a), a = sqrt(6 / (fan_in + fan_out)), fans counted as
    PyTorch, MXNet and Flax count them (channels times kernel area); biases 0; BatchNorm weight
    1, bias 0, running mean 0, running variance 1.

    Drawn here once, in the canonical layout, rather than by each framework's initialiser: the
    distribution is the one ``nn.init.xavier_uniform_``, ``mx.init.Xavier()`` and
    ``jax.nn.initializers.glorot_uniform()`` draw from, and the same seed then gives the same
    weights in every backend (and Flax skips compiling its initialisers, which takes longer than
    a digits epoch on a CPU).
    """
    out = {}
    for name, shape, _ in spec.canonical_tensors(config):
        leaf = name.rsplit(".", 1)[1]
        if leaf == "weight" and len(shape) >= 2:
            receptive = int(np.prod(shape[2:], dtype=np.int64)) if len(shape) > 2 else 1
            fan_in, fan_out = shape[1] * receptive, shape[0] * receptive
            a = math.sqrt(6.0 / (fan_in + fan_out))
            u = _hash_uniform(name, seed, int(np.prod(shape, dtype=np.int64)))
            out[name] = ((2.0 * u - 1.0) * a).astype(np.float32).reshape(shape)
        elif leaf in ("weight", "running_var"):
            out[name] = np.ones(shape, np.float32)
        else:
            out[name] = np.zeros(shape, np.float32)
    return out


def initial_state(cfg: TrainConfig, config: spec.Preset) -> Dict[str, np.ndarray]:
    """--init's canonical state if given, else the Xavier state of --seed."""
    if cfg.init:
        from densenet_spec import files
        state, _ = files.load_state(cfg.init)
        return state
    return xavier_state(config, cfg.seed)


# --------------------------------------------------------------------------- progress

class Reporter:
    """What a trainer tells the user; the console one draws, the event one (the MXNet
    trainer's process) sends JSON lines to the parent, which draws them."""

    def start(self, info: dict) -> None: ...
    def epoch_start(self, epoch: int, epochs: int, num_batches: int) -> None: ...
    def batch(self, i: int, num_batches: int, loss: float, acc: float) -> None: ...
    def epoch_end(self, record: dict) -> None: ...
    def message(self, text: str) -> None: ...
    def finish(self, metrics: dict) -> None: ...


def epoch_line(r: dict, epochs: int) -> str:
    compiling = (f" (+{r['compile_time']:.1f} s compiling)" if r.get("compile_time", 0) >= 0.05
                 else "")
    return (f"epoch {r['epoch']}/{epochs}: loss {r['loss']:.3f}, train acc {r['train_acc']:.3f}, "
            f"test acc {r['test_acc']:.3f}, {r['examples_per_sec']:.1f} examples/sec{compiling}")


def book_lines(metrics: dict) -> List[str]:
    """The book's two closing lines."""
    f = metrics["final"]
    return [f"loss {f['loss']:.3f}, train acc {f['train_acc']:.3f}, test acc {f['test_acc']:.3f}",
            f"{f['examples_per_sec']:.1f} examples/sec on {metrics['device']}"]


class _TextBar:
    """A progress bar without tqdm (the MXNet environment has none): one line, redrawn."""

    def __init__(self, total, desc, stream):
        self.total, self.desc, self.stream, self.t0 = total, desc, stream, time.perf_counter()

    def update(self, i, postfix):
        width = 24
        done = int(width * i / max(self.total, 1))
        rate = i / max(time.perf_counter() - self.t0, 1e-9)
        self.stream.write(f"\r{self.desc}: |{'#' * done}{'.' * (width - done)}| {i}/{self.total} "
                          f"[{rate:.2f} batch/s, {postfix}]")
        self.stream.flush()

    def close(self):
        self.stream.write("\r" + " " * 100 + "\r")
        self.stream.flush()


class ConsoleReporter(Reporter):
    """A bar per epoch (tqdm where installed) on a terminal; a line per epoch; the book's line."""

    def __init__(self, progress: bool = True, stream=None, bar_stream=None):
        self.stream = stream or sys.stdout
        self.bar_stream = bar_stream or sys.stderr
        self.progress = progress and getattr(self.bar_stream, "isatty", lambda: False)()
        self._bar = None
        self.epochs = 0

    def start(self, info):
        self.epochs = info["epochs"]
        resumed = (f", resumed after epoch {info['resumed_from']}" if info.get("resumed_from")
                   else "")
        self._print(f"training {info['preset']} on {info['dataset']} ({info['train']} train / "
                    f"{info['test']} test, {info['size']}x{info['size']}) with {info['backend']} "
                    f"on {info['device']}: {info['epochs']} epochs, batch {info['batch_size']}, "
                    f"lr {info['lr']}{resumed}")

    def epoch_start(self, epoch, epochs, num_batches):
        if not self.progress:
            return
        desc = f"epoch {epoch}/{epochs}"
        try:
            from tqdm import tqdm
            self._bar = tqdm(total=num_batches, desc=desc, unit="batch", leave=False,
                             file=self.bar_stream, dynamic_ncols=True)
        except ImportError:
            self._bar = _TextBar(num_batches, desc, self.bar_stream)

    def batch(self, i, num_batches, loss, acc):
        if self._bar is None:
            return
        postfix = f"loss {loss:.3f}, acc {acc:.3f}"
        if isinstance(self._bar, _TextBar):
            self._bar.update(i, postfix)
        else:
            self._bar.set_postfix_str(postfix, refresh=False)
            self._bar.update(1)

    def epoch_end(self, record):
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._print(epoch_line(record, self.epochs))

    def message(self, text):
        self._print(text)

    def finish(self, metrics):
        for line in book_lines(metrics):
            self._print(line)

    def _print(self, text):
        print(text, file=self.stream, flush=True)


class EventReporter(Reporter):
    """JSON lines on ``stream`` (the MXNet trainer's stdout), replayed by ``relay``."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout

    def _send(self, event, **payload):
        self.stream.write(EVENT_PREFIX + json.dumps({"event": event, **payload}) + "\n")
        self.stream.flush()

    def start(self, info):
        self._send("start", info=info)

    def epoch_start(self, epoch, epochs, num_batches):
        self._send("epoch_start", epoch=epoch, epochs=epochs, num_batches=num_batches)

    def batch(self, i, num_batches, loss, acc):
        self._send("batch", i=i, num_batches=num_batches, loss=loss, acc=acc)

    def epoch_end(self, record):
        self._send("epoch_end", record=record)

    def message(self, text):
        self._send("message", text=text)

    def finish(self, metrics):
        self._send("finish", metrics=metrics)


def exit_with_parent() -> None:
    """For a trainer that reports to a parent process (MXNet's): die when the parent dies
    (Linux's PR_SET_PDEATHSIG, set here in the child rather than by a preexec_fn in a parent that
    may run threads). Elsewhere a dead parent closes the pipe and the next progress line ends
    the child."""
    try:
        import ctypes
        import signal
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    parent = os.environ.get("DENSENET_PARENT_PID")
    if parent and os.getppid() != int(parent):  # the parent died before prctl
        sys.exit(3)


def relay(line: str, reporter: Reporter) -> Optional[dict]:
    """Replay one line of an EventReporter's output on ``reporter``; other lines are printed.
    Returns the final metrics when the line is the 'finish' event."""
    if not line.startswith(EVENT_PREFIX):
        reporter.message(line.rstrip("\n"))
        return None
    ev = json.loads(line[len(EVENT_PREFIX):])
    kind = ev.pop("event")
    if kind == "start":
        reporter.start(ev["info"])
    elif kind == "epoch_start":
        reporter.epoch_start(**ev)
    elif kind == "batch":
        reporter.batch(**ev)
    elif kind == "epoch_end":
        reporter.epoch_end(ev["record"])
    elif kind == "message":
        reporter.message(ev["text"])
    elif kind == "finish":
        reporter.finish(ev["metrics"])
        return ev["metrics"]
    return None


# --------------------------------------------------------------------------- one epoch

class EpochMeter:
    """The book's Accumulator(3) over an epoch (loss sum, correct predictions, examples) and
    the points of its curve: d2l plots the running loss and accuracy 5 times per epoch."""

    def __init__(self, epoch: int, num_batches: int, reporter: Reporter):
        self.epoch, self.num_batches, self.reporter = epoch, num_batches, reporter
        self.loss_sum, self.correct, self.n, self.i = 0.0, 0, 0, 0
        self.curve: List[List[float]] = []
        self.first_loss: Optional[float] = None
        self.excluded = 0.0
        self.t0 = time.perf_counter()

    def exclude(self, seconds: float) -> None:
        """Time that is not training (compiling the step): reported apart, not in the rate."""
        self.excluded += seconds

    def update(self, loss: float, correct: int, n: int) -> None:
        """After each batch: its mean loss, its number of correct predictions, its size."""
        if self.first_loss is None:
            self.first_loss = float(loss)
        self.loss_sum += float(loss) * n
        self.correct += int(correct)
        self.n += int(n)
        self.i += 1
        loss_avg, acc = self.loss_sum / self.n, self.correct / self.n
        if self.i % max(self.num_batches // 5, 1) == 0 or self.i == self.num_batches:
            self.curve.append([self.epoch - 1 + self.i / self.num_batches, loss_avg, acc])
        self.reporter.batch(self.i, self.num_batches, loss_avg, acc)

    def result(self) -> dict:
        seconds = time.perf_counter() - self.t0 - self.excluded
        return {"epoch": self.epoch, "loss": self.loss_sum / max(self.n, 1),
                "train_acc": self.correct / max(self.n, 1), "examples": self.n,
                "train_time": seconds, "compile_time": self.excluded,
                "examples_per_sec": self.n / max(seconds, 1e-12),
                "first_loss": self.first_loss, "curve": self.curve}


# --------------------------------------------------------------------------- checkpoints

def checkpoints_dir(out) -> Path:
    return Path(out) / "checkpoints"


def latest_checkpoint(out) -> Optional[Path]:
    """The newest complete checkpoint directory of the run in ``out``, or None."""
    pointer = checkpoints_dir(out) / "latest.json"
    if not pointer.exists():
        return None
    d = checkpoints_dir(out) / json.loads(pointer.read_text())["dir"]
    return d if (d / "checkpoint.json").exists() else None


def write_checkpoint(out, epoch: int, model_state: Dict[str, np.ndarray],
                     optimizer_state: Dict[str, np.ndarray], info: dict,
                     config: Optional[spec.Preset] = None) -> Path:
    """Write epoch ``epoch``'s checkpoint and point latest.json at it; older ones are removed.

    Files: model.safetensors (canonical state, densenet_spec.files), optimizer.safetensors
    (momentum buffers under the canonical parameter names and layout, in PyTorch's convention:
    float32, or float64 where a backend converts from its own convention and float32 would not
    round-trip, i.e. MXNet's; empty for plain SGD, which keeps no state) and checkpoint.json
    (epoch, optimiser settings and step count, the run's settings and its history so far). Written into a temporary directory renamed into place, then
    latest.json replaced: a kill at any moment leaves the previous checkpoint usable.
    """
    from safetensors.numpy import save_file
    from densenet_spec import files
    root = checkpoints_dir(out)
    root.mkdir(parents=True, exist_ok=True)
    name = f"epoch-{epoch:04d}"
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    files.save_state(model_state, tmp / "model.safetensors", config)
    save_file({k: np.ascontiguousarray(v, dtype=np.float64 if v.dtype == np.float64 else np.float32)
               for k, v in optimizer_state.items()},
              str(tmp / "optimizer.safetensors"), metadata={"format": CHECKPOINT_FORMAT})
    (tmp / "checkpoint.json").write_text(json.dumps(
        {"format": CHECKPOINT_FORMAT, "epoch": epoch, "model": "model.safetensors",
         "optimizer_file": "optimizer.safetensors", **info}, indent=1))
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer_tmp = root / "latest.json.tmp"
    pointer_tmp.write_text(json.dumps({"epoch": epoch, "dir": name}))
    os.replace(pointer_tmp, root / "latest.json")
    for old in root.glob("epoch-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(directory) -> tuple:
    """(model state, optimizer arrays, info) of a checkpoint directory."""
    from safetensors.numpy import load_file
    from densenet_spec import files
    directory = Path(directory)
    info = json.loads((directory / "checkpoint.json").read_text())
    state, _ = files.load_state(directory / info["model"])
    opt = load_file(str(directory / info["optimizer_file"]))
    return state, opt, info


def optimizer_info(lr: float, momentum: float, step: int) -> dict:
    return {"name": "sgd", "lr": lr, "momentum": momentum, "weight_decay": 0.0, "step": step,
            "buffers": "momentum_buffer per parameter" if momentum else "none",
            "convention": MOMENTUM_CONVENTION,
            "note": ("plain SGD without momentum keeps no state: the step count and settings are "
                     "all there is") if not momentum else ""}


def data_fingerprint(dataset: "dataset_lib.Dataset") -> str:
    h = hashlib.sha256()
    for a in (dataset.train_images, dataset.train_labels, dataset.test_images, dataset.test_labels):
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- the run

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


# --------------------------------------------------------------------------- the plot

def plot_metrics(metrics: dict, path) -> Path:
    """The book's figure: train loss and train accuracy (5 points per epoch) and test accuracy
    (per epoch) against epochs. matplotlib, main process only."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    curve = [p for r in metrics["epochs"] for p in r["curve"]]
    fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=120)
    ax.plot([p[0] for p in curve], [p[1] for p in curve], "-", label="train loss")
    ax.plot([p[0] for p in curve], [p[2] for p in curve], "m--", label="train acc")
    ax.plot([r["epoch"] for r in metrics["epochs"]], [r["test_acc"] for r in metrics["epochs"]],
            "g-.", marker="o", markersize=3, label="test acc")
    ax.set_xlabel("epoch")
    ax.set_xlim(0, max(len(metrics["epochs"]), 1))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    d = metrics["dataset"]
    ax.set_title(f"{metrics['preset']} / {metrics['backend']} on {metrics['device']}: "
                 f"{d['name']} {d['size']}x{d['size']}", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_comparison(runs: List[dict], path) -> Path:
    """Several runs' metrics side by side (one line per run): train loss and test accuracy per
    epoch. For comparing backends trained with the same settings."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.2), dpi=120)
    for m in runs:
        epochs = [r["epoch"] for r in m["epochs"]]
        label = f"{m['backend']} ({m['device']})"
        left.plot(epochs, [r["loss"] for r in m["epochs"]], marker="o", markersize=3, label=label)
        right.plot(epochs, [r["test_acc"] for r in m["epochs"]], marker="o", markersize=3,
                   label=label)
    left.set_yscale("log")
    for ax, what in ((left, "train loss"), (right, "test acc")):
        ax.set_xlabel("epoch")
        ax.set_title(what, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    d = runs[0]["dataset"]
    fig.suptitle(f"{runs[0]['preset']} on {d['name']} {d['size']}x{d['size']}, same seed",
                 fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
