"""Training in PyTorch: the book's recipe (d2l.train_ch6: SGD, Xavier-uniform weights, softmax
cross-entropy, the loss and accuracies per epoch).

Same functions, same order, same options as densenet_mxnet/train.py and densenet_flax/train.py.
The epoch loop, the data, the checkpoint files and the reports are densenet_training's;
this file is what PyTorch does in them. Layout: NCHW. Run it through
``densenet train --backend torch``.
"""
from __future__ import annotations

import sys
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F

import densenet_training as training
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
        raise ValueError(f"--device {name!r}: expected auto, cpu, gpu, cuda or cuda:N")
    if torch.cuda.device_count() <= index:
        raise RuntimeError(f"--device {name}: PyTorch sees {torch.cuda.device_count()} GPU(s)")
    return torch.device(f"cuda:{index}")


def device_name(device: torch.device) -> str:
    return str(device)


def versions() -> dict:
    return {"torch": torch.__version__, "numpy": np.__version__}


def build_model(cfg: training.TrainConfig, dataset, device):
    """The preset, with one input channel and the dataset's classes, on ``device``."""
    return build(cfg.preset, **training.model_options(cfg, dataset)).to(device)


def xavier_init(model, seed: int = 0) -> None:
    """The book's init: Xavier-uniform conv and dense weights, zero biases, BatchNorm weight 1
    and bias 0 (training.xavier_state: the same weights in every backend for one seed)."""
    state_lib.load_state(model, training.xavier_state(model.config, seed))


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
    """One pass over ``batches`` (index arrays into the train set) in train mode."""
    model.train()
    device = next(model.parameters()).device
    for idx in batches:
        x, y = dataset.batch(idx, "train")
        loss, correct = train_step(model, optimizer, torch.from_numpy(x).to(device),
                                   torch.from_numpy(y).to(device))
        meter.update(loss.item(), correct.item(), len(idx))


def evaluate(model, dataset, batch_size: int) -> float:
    """Test accuracy in eval mode (BatchNorm running statistics)."""
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
    for name, p in model.named_parameters():
        buf = optimizer.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            out[name] = buf.detach().to("cpu", torch.float32).numpy().copy()
    return out


def load_optimizer_state(model, optimizer, buffers: Dict[str, np.ndarray]) -> None:
    for name, p in model.named_parameters():
        if name in buffers:
            optimizer.state[p]["momentum_buffer"] = torch.as_tensor(buffers[name]).to(p.device)


def save_checkpoint(out, epoch: int, model, optimizer, info: dict):
    """Epoch ``epoch``'s checkpoint: canonical model state, optimiser state, JSON (``info``)."""
    return training.write_checkpoint(out, epoch, state_lib.export_state(model),
                                     optimizer_state(model, optimizer), info, model.config)


def load_checkpoint(directory, model, optimizer) -> dict:
    """Load a checkpoint into ``model`` and ``optimizer``; its JSON."""
    state, buffers, info = training.read_checkpoint(directory)
    state_lib.load_state(model, state)
    load_optimizer_state(model, optimizer, buffers)
    return info


def fit(cfg: training.TrainConfig, dataset, reporter: Optional[training.Reporter] = None) -> dict:
    """Train ``cfg.preset`` on ``dataset`` as the book does; returns the metrics (also written
    to ``cfg.out``/metrics.json)."""
    reporter = reporter or training.ConsoleReporter(cfg.progress)
    device = select_device(cfg.device)
    model = build_model(cfg, dataset, device)
    if cfg.init:
        state_lib.load_state(model, training.initial_state(cfg, model.config))
    else:
        xavier_init(model, cfg.seed)
    optimizer = make_optimizer(model, cfg.lr, cfg.momentum)
    return training.run_epochs(cfg, dataset, model, optimizer, sys.modules[__name__], reporter,
                               device_name(device), versions())
