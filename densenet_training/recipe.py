"""The book's recipe (d2l.train_ch6) as a run's settings: ``TrainConfig``, the command line
shared by ``densenet train`` and the MXNet trainer's process, the check that the images are
large enough, and the Xavier initial state drawn once in the canonical form."""
from __future__ import annotations

import argparse
import hashlib
import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Dict, List, Optional

import numpy as np

import densenet_spec as spec
from densenet_training import data as dataset_lib

#: The book's hyperparameters (d2l.train_ch6 as called in the DenseNet section).
BOOK_LR, BOOK_EPOCHS, BOOK_BATCH_SIZE = 0.1, 10, 256
BACKENDS = ("torch", "mxnet", "flax")
METRICS_FORMAT = "densenet-suite/train-metrics-v1"
CHECKPOINT_FORMAT = "densenet-suite/train-checkpoint-v1"
#: How momentum buffers are stored (PyTorch's and optax's convention; MXNet converts).
MOMENTUM_CONVENTION = ("buf = momentum * buf + grad; weight -= lr * buf "
                       "(PyTorch / optax; MXNet's mom = -lr * buf)")
#: Settings that must agree for --resume to continue the same run.
RESUME_KEYS = ("backend", "preset", "transition_pool", "dataset", "resize", "limit", "batch_size", "lr", "momentum",
               "seed", "init", "devices", "sync_bn")
#: What a checkpoint written before a setting existed had (single-device runs).
RESUME_DEFAULTS = {"devices": 1, "sync_bn": False, "transition_pool": "avg"}
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
    transition_pool: str = "avg"
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
    devices: int = 1
    sync_bn: bool = False
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
            pool = "" if self.transition_pool == "avg" else f"-{self.transition_pool}pool"
            self.out = os.path.join("runs", f"{self.dataset}-{self.preset}{pool}-{self.backend}")
        return self


class _Defaults(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help, except for flags (a '--no-x' flag's default True only confuses)."""

    def _get_help_string(self, action):
        if action.nargs == 0 or action.default is None:
            return action.help
        return super()._get_help_string(action)


def make_parser(prog: str = "densenet train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Train a DenseNet with the book's recipe (d2l.train_ch6: SGD, "
        "Xavier init, cross-entropy) in PyTorch, MXNet Gluon or Flax NNX.",
        epilog="example:\n  densenet train --backend flax --dataset digits --epochs 10 --out runs/digits-flax",
        formatter_class=_Defaults)
    p.add_argument("--backend", choices=BACKENDS, default="torch")
    p.add_argument("--preset", default="book", choices=spec.preset_names(),
                   help="network; other presets than 'book' get 1 input channel and 10 classes")
    p.add_argument("--transition-pool", choices=spec.TRANSITION_POOLS, default="avg",
                   help="the transitions' 2x2 pooling (convolutional presets): the paper's "
                   "average, or max (the chapter's exercise 1; docs/exercises.md)")
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
    p.add_argument("--devices", type=int, default=1, metavar="N",
                   help="data-parallel training on N devices, each with an equal share of every "
                   "batch (--batch-size is the global batch), on the framework's own engine: "
                   "PyTorch DDP in N processes started by torchrun (gloo on the CPU, NCCL on "
                   "GPUs), a JAX mesh of N devices, a Gluon Trainer over N contexts with a "
                   "kvstore. --device auto takes N GPUs where there are N, else N CPU devices "
                   "(one per core). See docs/data_parallel.md")
    p.add_argument("--sync-bn", action="store_true",
                   help="synchronised BatchNorm with --devices: the moments of the whole batch "
                   "(PyTorch SyncBatchNorm, GPUs only; JAX one jitted step over the sharded "
                   "batch; Gluon: not available). Default: each framework's own per-device "
                   "BatchNorm")
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
    argv = ["--backend", cfg.backend, "--preset", cfg.preset,
            "--transition-pool", cfg.transition_pool, "--dataset", cfg.dataset,
            "--epochs", str(cfg.epochs), "--batch-size", str(cfg.batch_size), "--lr", repr(cfg.lr),
            "--momentum", repr(cfg.momentum), "--device", cfg.device, "--devices", str(cfg.devices), "--seed", str(cfg.seed)]
    for flag, value in (("--data-dir", cfg.data_dir), ("--resize", cfg.resize),
                        ("--limit", cfg.limit), ("--out", cfg.out), ("--init", cfg.init)):
        if value is not None:
            argv += [flag, str(value)]
    for flag, on in (("--no-verify", not cfg.verify), ("--resume", cfg.resume),
                     ("--overwrite", cfg.overwrite), ("--sync-bn", cfg.sync_bn), ("--no-progress", not cfg.progress),
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
    check_parallel(cfg)  # a UserError: printed as one message, exit status 2
    return cfg.finalize()


def check_parallel(cfg: TrainConfig) -> None:
    """--devices and --sync-bn, as far as they can be checked without a framework: a count of
    at least 1, a batch that splits evenly, synchronised BatchNorm only over several devices, at
    most a device per core on the CPU (each framework then checks its GPUs)."""
    if cfg.devices < 1:
        raise UserError(f"--devices must be at least 1, got {cfg.devices}")
    if cfg.sync_bn and cfg.devices < 2:
        raise UserError("--sync-bn synchronises BatchNorm across devices: it needs --devices 2 "
                        f"or more, got --devices {cfg.devices}")
    if cfg.batch_size % cfg.devices:
        lower = cfg.batch_size - cfg.batch_size % cfg.devices
        raise UserError(f"--batch-size {cfg.batch_size} does not split evenly over --devices "
                        f"{cfg.devices} (every device takes an equal share of the batch): pass a "
                        f"multiple of {cfg.devices}, such as {lower or cfg.devices} or "
                        f"{lower + cfg.devices}")
    if cfg.devices > 1 and cfg.device == "cpu":
        check_cpu_devices(cfg.devices)


def parallel_kind(name: str, devices: int, gpus: int, framework: str) -> str:
    """Where ``--devices N`` (N > 1) runs with ``--device name``, given the GPUs ``framework``
    sees: 'gpu' (GPUs 0..N-1: auto where there are N, gpu, cuda) or 'cpu' (N CPU devices: cpu,
    or auto with fewer GPUs). A UserError for one named device (cuda:K), fewer GPUs than asked
    for, or more CPU devices than cores."""
    if name not in ("auto", "cpu", "gpu", "cuda"):
        raise UserError(f"--device {name!r} names one device; with --devices {devices} pass "
                        "--device auto, cpu or gpu")
    if name in ("gpu", "cuda") and gpus < devices:
        raise UserError(f"--devices {devices} --device {name}: {framework} sees {gpus} GPU(s)")
    if name in ("gpu", "cuda") or (name == "auto" and gpus >= devices):
        return "gpu"
    check_cpu_devices(devices)
    return "cpu"


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_cpu_devices(devices: int) -> None:
    """N CPU devices (DDP processes, JAX host devices, Gluon contexts) need N cores: each
    device's share is computed alongside the others' only on a core of its own."""
    cores = cpu_cores()
    if devices > cores:
        raise UserError(f"--devices {devices} on the CPU: this machine has {cores} core(s) for "
                        f"this process, and each CPU device needs one; pass --devices {cores} or "
                        "fewer")


def model_options(cfg: TrainConfig, dataset: "dataset_lib.Dataset") -> Dict[str, object]:
    """The options every backend's ``build(preset, **options)`` gets for this dataset: one input
    channel and the dataset's classes (the book's preset has them already); --transition-pool
    where it is not the preset's average pool."""
    options: Dict[str, object] = {"in_channels": 1, "num_classes": int(dataset.num_classes)}
    if cfg.transition_pool != "avg":
        options["transition_pool"] = cfg.transition_pool
    return options


def check_size(cfg: TrainConfig, dataset: "dataset_lib.Dataset") -> spec.Preset:
    """The network's configuration; a clear error if the images are too small for it."""
    config = spec.make_config(cfg.preset, **model_options(cfg, dataset))
    need = spec.min_input_size(config)
    if dataset.size < need:
        raise spec.DenseNetInputError(
            f"--resize {dataset.size} is too small for DenseNet '{cfg.preset}': it needs at least "
            f"{need}x{need} pixels; pass --resize {need} or more")
    return config


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
        from densenet_weights import files
        state, _ = files.load_state(cfg.init)
        return state
    return xavier_state(config, cfg.seed)
