"""Training in PyTorch: the book's recipe (d2l.train_ch6: SGD, Xavier-uniform weights, softmax
cross-entropy, the loss and accuracies per epoch).

Same functions, same order, same options as densenet_mxnet/train.py and densenet_flax/train.py.
The epoch loop, the data, the checkpoint files and the reports are densenet_training's;
this file is what PyTorch does in them. Layout: NCHW. Run it through
``densenet train --backend torch``.
"""
from __future__ import annotations

import os
import sys
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import densenet_spec as spec
import densenet_training as training
from densenet_torch import parallel
from densenet_torch import state as state_lib
from densenet_torch.model import build

BACKEND = "torch"


def select_device(name: str = "auto") -> torch.device:
    """auto: the first GPU if there is one, else the CPU; cpu; gpu / cuda / cuda:N."""
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    index = int(name.split(":", 1)[1]) if ":" in name else 0
    if name.split(":")[0] not in ("gpu", "cuda"):
        raise training.UserError(f"--device {name!r}: expected auto, cpu, gpu, cuda or cuda:N")
    if torch.cuda.device_count() <= index:
        raise training.UserError(f"--device {name}: PyTorch sees "
                                 f"{torch.cuda.device_count()} GPU(s)")
    return torch.device(f"cuda:{index}")


def select_devices(name: str = "auto", devices: int = 1, sync_bn: bool = False
                   ) -> List[torch.device]:
    """The devices of a run on ``devices`` devices, one per DDP process: GPUs 0..N-1 (auto
    where there are N, gpu, cuda) or N CPU processes (cpu, or auto with fewer GPUs). A clear
    error for more devices than there are, one named GPU (cuda:N) with several devices, and
    synchronised BatchNorm where PyTorch cannot run it."""
    if devices == 1:
        return [select_device(name)]
    kind = training.parallel_kind(name, devices, torch.cuda.device_count(), "PyTorch")
    why = parallel.sync_bn_unsupported(devices) if sync_bn else None
    if why:
        raise training.UserError(why)
    return ([torch.device(f"cuda:{i}") for i in range(devices)] if kind == "gpu"
            else [torch.device("cpu")] * devices)


def device_name(device: torch.device, devices: int = 1) -> str:
    if devices == 1:
        return str(device)
    return f"{devices} x {device.type} (DDP, {'NCCL' if device.type == 'cuda' else 'gloo'})"


def versions() -> dict:
    return {"torch": torch.__version__, "numpy": np.__version__}


def build_model(cfg: training.TrainConfig, dataset, device):
    """The preset, with one input channel and the dataset's classes, on ``device``."""
    return build(cfg.preset, **training.model_options(cfg, dataset)).to(device)


def _module(model):
    """The network inside a DistributedDataParallel wrapper (or the network itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def _share(model, idx):
    """This process's equal share of a batch's indices (all of them without DDP)."""
    if not isinstance(model, DistributedDataParallel):
        return idx
    n = len(idx) // dist.get_world_size()
    rank = dist.get_rank()
    return idx[rank * n:(rank + 1) * n]


def xavier_init(model, seed: int = 0) -> None:
    """The book's init: Xavier-uniform conv and dense weights, zero biases, BatchNorm weight 1
    and bias 0 (training.xavier_state: the same weights in every backend for one seed)."""
    state_lib.load_state(_module(model), training.xavier_state(_module(model).config, seed))


def make_optimizer(model, lr: float, momentum: float = 0.0):
    """The book's optimiser: SGD, no weight decay; momentum only if asked for."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)


def train_step(model, optimizer, x, y):
    """One SGD step on a batch: (mean loss, correct predictions), as tensors."""
    optimizer.zero_grad()
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    optimizer.step()
    return loss.detach(), (logits.detach().argmax(1) == y).sum()


def train_epoch(model, optimizer, dataset, batches, meter) -> None:
    """One pass over ``batches`` (index arrays into the train set) in train mode. Under DDP
    each process takes its share of every batch; the meter gets the whole batch's mean loss
    and correct predictions (one all-reduce of the two numbers)."""
    model.train()
    device = next(model.parameters()).device
    for idx in batches:
        x, y = dataset.batch(_share(model, idx), "train")
        loss, correct = train_step(model, optimizer, torch.from_numpy(x).to(device),
                                   torch.from_numpy(y).to(device))
        if isinstance(model, DistributedDataParallel):
            both = torch.stack([loss.double(), correct.double()])
            dist.all_reduce(both)
            loss, correct = both[0] / dist.get_world_size(), both[1]
        meter.update(loss.item(), int(correct.item()), len(idx))


def evaluate(model, dataset, batch_size: int) -> float:
    """Test accuracy in eval mode (BatchNorm running statistics; under DDP this process's
    network, without collective calls)."""
    model = _module(model)
    model.eval()
    device = next(model.parameters()).device
    correct, n = 0, len(dataset.test_labels)
    with torch.no_grad():
        for s in range(0, n, batch_size):
            x, y = dataset.batch(np.arange(s, min(s + batch_size, n)), "test")
            logits = model(torch.from_numpy(x).to(device))
            correct += int((logits.argmax(1).cpu() == torch.from_numpy(y)).sum())
    model.train()
    return correct / max(n, 1)


def optimizer_state(model, optimizer) -> Dict[str, np.ndarray]:
    """Momentum buffers under the canonical parameter names (none for plain SGD)."""
    out = {}
    for name, p in _module(model).named_parameters():
        buf = optimizer.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            out[name] = buf.detach().to("cpu", torch.float32).numpy().copy()
    return out


def load_optimizer_state(model, optimizer, buffers: Dict[str, np.ndarray]) -> None:
    for name, p in _module(model).named_parameters():
        if name in buffers:
            optimizer.state[p]["momentum_buffer"] = torch.as_tensor(buffers[name]).to(p.device)


def save_checkpoint(out, epoch: int, model, optimizer, info: dict):
    """Epoch ``epoch``'s checkpoint: canonical model state, optimiser state, JSON (``info``)."""
    return training.write_checkpoint(out, epoch, state_lib.export_state(_module(model)),
                                     optimizer_state(model, optimizer), info,
                                     _module(model).config)


def load_checkpoint(directory, model, optimizer) -> dict:
    """Load a checkpoint into ``model`` and ``optimizer``; its JSON."""
    state, buffers, info = training.read_checkpoint(directory)
    state_lib.load_state(_module(model), state)
    load_optimizer_state(model, optimizer, buffers)
    return info


def _process_group(cfg: training.TrainConfig, cuda: bool):
    """(rank, world size) of this process: (0, 1) on one device; under torchrun, join the
    process group (NCCL on GPUs, ``cuda``, else gloo). --devices must be torchrun's count."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != cfg.devices:
        launched = (f"torchrun started {world} processes" if "WORLD_SIZE" in os.environ else
                    "this process was not started by torchrun")
        raise training.UserError(
            f"--devices {cfg.devices}: PyTorch trains on several devices in one process each, "
            f"and {launched}. Run `densenet train ... --devices {cfg.devices}` (it starts "
            f"torchrun), or `torchrun --nproc-per-node {cfg.devices} -m densenet_cli train ... "
            f"--devices {cfg.devices}`")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def fit(cfg: training.TrainConfig, dataset, reporter: Optional[training.Reporter] = None) -> dict:
    """Train ``cfg.preset`` on ``dataset`` as the book does; returns the metrics (also written
    to ``cfg.out``/metrics.json). With ``cfg.devices`` > 1 this is one process of a DDP run
    under torchrun: its share of every batch, gradients averaged by DDP, BatchNorm per process
    or synchronised (``cfg.sync_bn``); rank 0 reports and writes."""
    reporter = reporter or training.ConsoleReporter(cfg.progress)
    devices = select_devices(cfg.device, cfg.devices, cfg.sync_bn)
    rank, world = _process_group(cfg, devices[0].type == "cuda")
    device = devices[rank]
    model = build_model(cfg, dataset, device)
    if cfg.init:
        state_lib.load_state(model, training.initial_state(cfg, model.config))
    else:
        xavier_init(model, cfg.seed)
    if world > 1:
        if cfg.sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = DistributedDataParallel(model, device_ids=[device.index] if device.index is not
                                        None else None)
    optimizer = make_optimizer(model, cfg.lr, cfg.momentum)
    try:
        metrics = training.run_epochs(cfg, dataset, model, optimizer, sys.modules[__name__],
                                      reporter, device_name(device, world), versions(),
                                      parallel.batchnorm_semantics(cfg.sync_bn), lead=rank == 0)
        if world > 1:
            dist.barrier()  # every rank done before any leaves: gloo aborts a rank whose peer left
    finally:
        if world > 1:
            dist.destroy_process_group()
    return metrics


# ------------------------------------------------------------------ house prices (tabular)

class _Linear(torch.nn.Module):
    """The book's linear model for house prices (get_net: one Linear layer), canonical name
    ``classifier``."""

    def __init__(self, in_features: int):
        super().__init__()
        self.classifier = torch.nn.Linear(in_features, 1)

    def forward(self, x):
        return self.classifier(x)


def build_house_model(cfg: training.TrainConfig, in_features: int, device):
    """The MLP preset for ``in_features`` inputs (float32 (N, F) -> (N, 1)), or with
    ``cfg.model == 'linear'`` the book's one Linear layer; on ``device``."""
    if cfg.model == "linear":
        return _Linear(in_features).to(device)
    return build(cfg.preset, in_features=in_features).to(device)


def load_house_state(model, state: Dict[str, np.ndarray]) -> None:
    """Load a canonical state (all of it, or a clear error) into a house-price model."""
    if isinstance(model, _Linear):
        training.house.check_linear_state(state, model.classifier.in_features)
        model.load_state_dict({k: torch.as_tensor(np.asarray(v, np.float32)) for k, v in
                               state.items()})
        return
    state_lib.load_state(model, state)


def house_state(model) -> Dict[str, np.ndarray]:
    """A house-price model's canonical state."""
    if isinstance(model, _Linear):
        return {k: v.detach().to("cpu").numpy().copy() for k, v in model.state_dict().items()}
    return state_lib.export_state(model)


def make_adam(model, lr: float, weight_decay: float = 0.0):
    """The book's optimiser for house prices: torch.optim.Adam (weight decay: L2 added to the
    gradient)."""
    return torch.optim.Adam(model.parameters(), lr=lr, betas=training.house.ADAM_BETAS,
                            eps=training.house.ADAM_EPS, weight_decay=weight_decay)


def house_step(model, optimizer, x, y):
    """One Adam step on a batch: the mean squared error of the prices (the book's
    nn.MSELoss), as a tensor."""
    optimizer.zero_grad()
    loss = F.mse_loss(model(x).reshape(-1), y)
    loss.backward()
    optimizer.step()
    return loss.detach()


def house_train_epoch(model, optimizer, features, labels, batches, meter) -> None:
    """One pass over ``batches`` (row indices into ``features``/``labels``) in train mode."""
    model.train()
    device = next(model.parameters()).device
    for idx in batches:
        loss = house_step(model, optimizer, torch.from_numpy(features[idx]).to(device),
                          torch.from_numpy(labels[idx]).to(device))
        meter.update(loss.item(), 0, len(idx))


def house_predict(model, features, batch_stats: bool = False) -> np.ndarray:
    """Predicted prices (N,) in eval mode (BatchNorm's running statistics), the whole set at once.
    ``batch_stats``: in train mode instead, BatchNorm normalising with the statistics of
    ``features`` themselves, as the book's log_rmse measures (its train() never calls
    net.eval()); the running statistics are left as they were."""
    saved = [b.detach().clone() for b in model.buffers()]
    model.train(batch_stats)
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(torch.from_numpy(features).to(device)).reshape(-1).to("cpu").numpy()
    model.train()
    with torch.no_grad():
        for b, old in zip(model.buffers(), saved):
            b.copy_(old)
    return out.copy()


def adam_state(model, optimizer) -> Dict[str, np.ndarray]:
    """Adam's moments under the canonical parameter names: exp_avg/<name>, exp_avg_sq/<name>
    (none before the first step)."""
    out = {}
    for name, p in model.named_parameters():
        st = optimizer.state.get(p)
        if st:
            for key in ("exp_avg", "exp_avg_sq"):
                out[f"{key}/{name}"] = st[key].detach().to("cpu", torch.float32).numpy().copy()
    return out


def load_adam_state(model, optimizer, arrays: Dict[str, np.ndarray], step: int) -> None:
    """Restore Adam's moments (adam_state's names) and its step count."""
    for name, p in model.named_parameters():
        if f"exp_avg/{name}" in arrays:
            optimizer.state[p] = {
                "step": torch.tensor(float(step)),
                "exp_avg": torch.as_tensor(arrays[f"exp_avg/{name}"]).to(p.device).clone(),
                "exp_avg_sq": torch.as_tensor(arrays[f"exp_avg_sq/{name}"]).to(p.device).clone()}


def fit_house(cfg: training.TrainConfig, data, reporter: Optional[training.Reporter] = None
              ) -> dict:
    """The house-price recipe (densenet_training.run_folds: K-fold cross-validation, Adam, MSE,
    log-rmse) on ``data`` (densenet_training.tabular.HouseData); returns the metrics (also
    written to ``cfg.out``/metrics.json)."""
    reporter = reporter or training.ConsoleReporter(cfg.progress)
    return training.run_folds(cfg, data, sys.modules[__name__], reporter,
                              select_device(cfg.device), versions())

# ------------------------------------------------------------------ training recipes

def recipe_limits(recipe, dtype: str = "float32") -> List[str]:
    """What PyTorch cannot express exactly of ``recipe`` (a densenet_spec.Recipe) at ``dtype``: nothing, since
    a recipe means what PyTorch computes (densenet_spec/optim.py)."""
    return []


def build_optimizer(model, recipe, steps_per_epoch: int = 1, total_steps: int = 1):
    """``recipe`` as PyTorch users write it: (optimizer, scheduler). torch.optim.SGD, Adam or
    AdamW over two parameter groups, with and without weight decay (``exclude``), and
    torch.optim.lr_scheduler's StepLR or CosineAnnealingLR (None for a constant rate), which
    run_steps steps after every optimiser step or after every epoch (``recipe.per``)."""
    decayed = spec.decayed_names(_module(model).config, recipe)
    named = [(n, p) for n, p in _module(model).named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if n in decayed]},
              {"params": [p for n, p in named if n not in decayed], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if recipe.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum,
                                    dampening=recipe.dampening, nesterov=recipe.nesterov,
                                    weight_decay=recipe.weight_decay)
    else:
        cls = torch.optim.AdamW if recipe.optimizer == "adamw" else torch.optim.Adam
        optimizer = cls(groups, lr=recipe.lr, betas=recipe.betas, eps=recipe.eps,
                        weight_decay=recipe.weight_decay)
    scheduler = None
    if recipe.schedule == "step":
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, recipe.step_size, recipe.gamma)
    elif recipe.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, spec.optim.cosine_t_max(recipe, total_steps, steps_per_epoch),
            eta_min=recipe.eta_min)
    return optimizer, scheduler


def _recipe_loss(outputs, y):
    """Softmax cross-entropy against integer labels; the mean squared error against float
    targets shaped as the outputs (the MLP family's prices)."""
    if not torch.is_floating_point(y):
        return F.cross_entropy(outputs, y)
    return F.mse_loss(outputs, y)


def run_steps(model, optimizer, batches, recipe, steps_per_epoch: int = 1, start: int = 0
              ) -> List[dict]:
    """Optimiser steps of ``recipe`` (``optimizer``: build_optimizer's pair) in train mode, one
    per (x, y) of ``batches`` (canonical NCHW numpy inputs, integer labels or float targets),
    the first being step ``start`` of the run. Per step: the loss, the global L2 norm of the
    loss's gradient (before weight decay) and the learning rate it used."""
    optimizer, scheduler = optimizer
    model.train()
    p0 = next(model.parameters())
    out = []
    for i, (x, y) in enumerate(batches):
        x = torch.as_tensor(np.asarray(x)).to(p0.device, p0.dtype)
        y = torch.as_tensor(np.asarray(y)).to(p0.device)
        y = y.to(p0.dtype) if torch.is_floating_point(y) else y
        lr = optimizer.param_groups[0]["lr"]
        optimizer.zero_grad()
        loss = _recipe_loss(model(x), y)
        loss.backward()
        norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters()
                              if p.grad is not None))
        optimizer.step()
        step = start + i
        if scheduler is not None and (recipe.per == "step" or (step + 1) % steps_per_epoch == 0):
            scheduler.step()
        out.append({"loss": loss.item(), "grad_norm": norm.item(), "lr": float(lr)})
    return out


def main(argv=None) -> int:
    """This trainer's own process (densenet_training.trainer_main): each DDP process that
    `densenet train --devices N` starts with torchrun."""
    return training.trainer_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
