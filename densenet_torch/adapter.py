"""The parity adapter for PyTorch: the same functions, with the same signatures, as
densenet_mxnet/adapter.py and densenet_flax/adapter.py. Everything that goes in or out is
framework-free: configs are densenet_spec.Preset dicts, shapes are canonical NCHW, arrays are
float32 numpy in canonical (PyTorch) layout.
"""
from __future__ import annotations

import numpy as np
import torch

import densenet_spec as spec
from densenet_torch.model import DenseNet, DenseBlock, conv_block, transition_block

BACKEND = "torch"
VARIANTS = ("torch",)


def device() -> str:
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def versions() -> dict:
    return {"torch": torch.__version__, "numpy": np.__version__}


def _build(config: dict, memory_efficient=False, **_) -> DenseNet:
    cfg = spec.Preset.from_dict(config)
    return DenseNet(**cfg.options(), memory_efficient=memory_efficient, name=cfg.name)


def _counts(modules):
    params = sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad)
    state = sum(b.numel() for m in modules for n, b in m.named_buffers()
                if n.rsplit(".", 1)[-1] in ("running_mean", "running_var"))
    return int(params), int(state)


def describe(config: dict, batch: int, height: int, width: int, variant: str = "torch",
             abstract: bool = True) -> dict:
    """Per-stage output shape (canonical NCHW), trainable parameters and BN state, measured on
    the framework's own model: abstract evaluation on the meta device, or a real forward."""
    dev = torch.device("meta") if abstract else torch.device("cpu")
    with dev:
        model = _build(config).eval()
        x = torch.zeros(batch, config["in_channels"], height, width)
    with torch.no_grad():
        outputs = model.forward_stages(x)
    stages = []
    for name, modules in model.stage_modules().items():
        params, state = _counts(modules)
        stages.append({"name": name, "shape": list(outputs[name].shape),
                       "params": params, "state": state})
    params, state = _counts([model])
    return {"backend": BACKEND, "variant": variant, "device": "meta" if abstract else "cpu",
            "stages": stages, "params": params, "state": state}


def _error(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the point is to report what the user would see
        return {"type": type(e).__name__, "message": str(e),
                "is_spec_error": isinstance(e, (spec.DenseNetInputError, spec.DenseNetConfigError))}
    return None


def input_error(config: dict, shape, variant: str = "torch"):
    """Build ``config`` and feed zeros of canonical ``shape``; the error the user sees, or None."""
    model = _build(config).eval()
    return _error(lambda: model(torch.zeros(*shape)))


def layer_error(kind: str, args: list, variant: str = "torch"):
    """Call one of the book's pieces with the book's arguments for PyTorch; the error, or None.

    kind: 'conv_block' (input_channels, num_channels), 'DenseBlock' (num_convs,
    input_channels, num_channels), 'transition_block' (input_channels, num_channels),
    'preset' (name), 'DenseNet' (options dict).
    """
    if kind == "preset":
        return _error(lambda: DenseNet.from_preset(args[0]))
    if kind == "DenseNet":
        return _error(lambda: DenseNet(**args[0]))
    fn = {"conv_block": conv_block, "DenseBlock": DenseBlock, "transition_block": transition_block}[kind]
    return _error(lambda: fn(*args))


def book_examples(variant: str = "torch") -> dict:
    """The book's two examples: DenseBlock(2 convs, 10 channels) on a 4x3x8x8 input, then
    transition_block to 10 channels. Shapes reported in canonical NCHW."""
    X = torch.rand(4, 3, 8, 8)
    Y = DenseBlock(2, 3, 10)(X)
    Z = transition_block(23, 10)(Y)
    return {"dense_block": list(Y.shape), "transition": list(Z.shape)}
