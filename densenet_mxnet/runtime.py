"""What the parity adapter (adapter.py) and the data-parallel step (parallel.py) both run on:
a model built from a framework-free configuration (either family), loaded with a canonical
state. Same public names as densenet_torch/runtime.py and densenet_flax/runtime.py."""
from __future__ import annotations

import mxnet as mx

import densenet_spec as spec
from densenet_mxnet import model as model_lib


def device() -> str:
    return "gpu(0)" if mx.context.num_gpus() > 0 else "cpu"


def _context():
    # MXNet's last CUDA builds predate Hopper; a CPU build (or no GPU) runs on the CPU.
    return mx.gpu(0) if mx.context.num_gpus() > 0 else mx.cpu()


def from_config(config: dict, memory_efficient=False, **_):
    """Our model for a ``Preset.to_dict()`` of either family (the MLP family has no
    memory-efficient mode, in any framework)."""
    cfg = spec.config_from_dict(config)
    if cfg.family == "mlp":
        return model_lib.MLPDenseNet(**cfg.options(), name=cfg.name)
    return model_lib.DenseNet(**cfg.options(), memory_efficient=memory_efficient, name=cfg.name)


def loaded(config, state, memory_efficient=False, dtype="float32"):
    """A hybridized model with the canonical ``state`` loaded, at ``dtype``."""
    from densenet_mxnet.state import load_state
    model = from_config(config, memory_efficient=memory_efficient)
    with _context():
        load_state(model, state)
    if dtype != "float32":
        model.cast(dtype)
    model.hybridize()
    return model
