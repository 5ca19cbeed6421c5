"""What the parity adapter (adapter.py) and the data-parallel step (parallel.py) both run on:
a model built from a framework-free configuration (either family), loaded with a canonical
state. Same public names as densenet_mxnet/runtime.py and densenet_flax/runtime.py."""
from __future__ import annotations

import torch

import densenet_spec as spec
from densenet_torch import model as model_lib


def device() -> str:
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def from_config(config: dict, memory_efficient=False, **_):
    """Our model for a ``Preset.to_dict()`` of either family (the MLP family has no
    memory-efficient mode: its layers keep no large activations)."""
    cfg = spec.config_from_dict(config)
    if cfg.family == "mlp":
        return model_lib.MLPDenseNet(**cfg.options(), name=cfg.name)
    return model_lib.DenseNet(**cfg.options(), memory_efficient=memory_efficient, name=cfg.name)


def loaded(config, state, memory_efficient=False, dtype="float32"):
    """A model with the canonical ``state`` loaded, on the GPU when there is one."""
    from densenet_torch.state import load_state
    model = from_config(config, memory_efficient=memory_efficient)
    load_state(model, state)
    return model.to(device=device(), dtype=getattr(torch, dtype))
