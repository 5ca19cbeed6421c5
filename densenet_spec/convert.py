"""Convert a DenseNet checkpoint between frameworks, through the canonical form.

    python -m densenet_spec.convert densenet121.pth model.safetensors
    python -m densenet_spec.convert model.safetensors model.params --to mxnet
    python -m densenet_spec.convert model.safetensors model.msgpack --to flax-nnx

Inputs: a PyTorch state_dict file (.pt/.pth/.bin: a torchvision DenseNet's included, old-style
keys too; read only with ``torch.load(weights_only=True)``), or a canonical .safetensors file.
Outputs: canonical safetensors (default), a PyTorch state_dict (--to torch), Gluon parameters
(--to mxnet, written by the MXNet environment's worker) or Flax msgpack (--to flax-nnx /
flax-linen). The preset is read from the file's metadata or inferred from the tensor shapes
unless --preset is given. Every tensor is checked before anything is written.

This is the one module of densenet_spec that touches frameworks, and only lazily, for the
formats asked for.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, Optional, Tuple

import numpy as np

import densenet_spec as spec
from densenet_spec import files

TARGETS = ("canonical", "torch", "mxnet", "flax-nnx", "flax-linen")
TORCH_SUFFIXES = (".pt", ".pth", ".bin")


class ConvertError(ValueError):
    pass


def read_checkpoint(path: str) -> Tuple[Dict[str, np.ndarray], Optional[spec.Preset]]:
    """(canonical-named float32 state, config from the file's metadata or None)."""
    if not os.path.exists(path):
        raise ConvertError(f"no such file: {path}")
    if path.endswith(".safetensors"):
        state, cfg = files.load_state(path)
    elif path.endswith(TORCH_SUFFIXES):
        try:
            import torch
        except ImportError:
            raise ConvertError("reading a PyTorch checkpoint needs torch (the main environment: "
                               "`make env`)") from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle with anything but tensors and containers is refused
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            why = next((ln for ln in lines if ln.startswith("WeightsUnpickler error")), lines[0] if lines else "")
            raise ConvertError(
                f"{path}: refused: torch.load(weights_only=True) cannot read it ({why}). Only plain "
                "state_dicts are accepted; arbitrary pickles are never unpickled") from None
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(hasattr(v, "shape") for v in obj.values()):
            raise ConvertError(f"{path}: not a state_dict (a mapping of names to tensors)")
        state = {k[len("module."):] if k.startswith("module.") else k:
                 v.detach().to(torch.float32).numpy() for k, v in obj.items()
                 if not k.endswith("num_batches_tracked")}
        cfg = None
    else:
        raise ConvertError(f"{path}: unknown format; give a PyTorch state_dict "
                           f"({', '.join(TORCH_SUFFIXES)}) or a canonical .safetensors file")
    return spec.remap_legacy_keys(state), cfg


def convert(src: str, dst: str, to: str = "canonical", preset: Optional[str] = None,
            **options) -> spec.Preset:
    if to not in TARGETS:
        raise ConvertError(f"unknown target {to!r}; targets: {', '.join(TARGETS)}")
    state, cfg = read_checkpoint(src)
    if preset is not None:
        cfg = spec.make_config(preset, **options)
    elif cfg is None:
        cfg = spec.infer_config({k: v.shape for k, v in state.items()})
    spec.check_state(cfg, {k: v.shape for k, v in state.items()})
    if to == "canonical":
        files.save_state(state, dst, cfg)
    elif to == "torch":
        from densenet_torch.adapter import save_native
        save_native(cfg.to_dict(), state, dst)
    elif to == "mxnet":
        from parity_tests.backends import make_backend
        b = make_backend("mxnet")
        try:
            b.call("save_native", config=cfg.to_dict(), state=state, path=os.path.abspath(dst))
        finally:
            b.close()
    else:
        from densenet_flax.adapter import save_native
        save_native(cfg.to_dict(), state, dst, variant=to.split("-")[1])
    return cfg


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--to", default="canonical", choices=TARGETS)
    ap.add_argument("--preset", help="the preset that built it (default: from metadata or shapes)")
    args = ap.parse_args(argv)
    try:
        cfg = convert(args.src, args.dst, args.to, args.preset)
    except (ValueError, FileNotFoundError) as e:  # ConvertError, DenseNetConfigError, StateMismatchError
        print(f"error: {e}", file=sys.stderr)
        return 1
    n = len(spec.canonical_tensors(cfg))
    print(f"wrote {args.dst} ({args.to}): DenseNet '{cfg.name}', {n} tensors, "
          f"{spec.total_counts(cfg)[0]:,} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
