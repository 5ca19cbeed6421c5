"""Export a DenseNet to ONNX, proven: any preset, with any framework's weights (or random ones).

    densenet export densenet121.pth densenet121.onnx --size 224
    densenet export book book.onnx                  # a preset's name: random weights (seed 0)
    densenet convert model.params model.onnx --to onnx

The weights (any file densenet_weights.formats reads, matched onto the preset's canonical names
as ``densenet convert`` does) go into our PyTorch model, which torch.onnx's dynamo exporter
(``torch.onnx.export(..., dynamo=True)``) writes as ONNX. Its optimizer is not run, because it
folds the stem's BatchNorm (and a bottleneck's second one) into the convolution before it: only
its constant folding is, so every BatchNorm stays a BatchNormalization node with its running
statistics, epsilon and momentum, and the file converts back losslessly. The weights are
written as external data, ``DST.data`` beside ``DST`` (torch.onnx's default): keep the two
together.

Then the proof, in the same command: onnxruntime runs the file on a random input, and its
logits are compared with our PyTorch model's and, where the weights came from a Gluon or Flax
file, with that framework's own forward pass (the backend registry: Gluon in the MXNet
environment's worker) with the same weights and input. Every one must agree to 1e-5 (largest
relative difference, float32) or the export has failed (exit status 1).

The input shape is fixed at export (N x C x SIZE x SIZE): the model checks its input's shape
in Python, so torch.export specialises it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Dict, List, Optional

import numpy as np

import densenet_spec as spec

EXPORT_RTOL = 1e-5
MIN_OPSET = 18  # the oldest opset torch.onnx's dynamo exporter implements
#: The source file's format -> the backend that computes with those weights in its framework.
SOURCE_BACKEND = {"torch": "torch", "safetensors": "torch", "gluon": "mxnet", "flax": "flax-nnx",
                  "onnx": "torch"}


class ExportError(ValueError):
    """The export cannot run as asked (a bad source, a missing package)."""


@dataclasses.dataclass
class ExportResult:
    source: str
    weights: str
    dst: str
    config: dict
    input_shape: List[int]
    files: Dict[str, int]                  # file written -> bytes
    ops: Dict[str, int]                    # ONNX operator -> count
    opset: int
    bn: dict                               # BatchNormalization attributes seen
    versions: Dict[str, str]
    proof: Dict[str, Optional[float]] = dataclasses.field(default_factory=dict)  # backend -> rel
    notes: List[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        done = [v for v in self.proof.values() if v is not None]
        return bool(done) and all(v <= EXPORT_RTOL for v in done)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ok"] = self.ok
        return d

    def render(self) -> str:
        def size(n):
            return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"
        main, *data = self.files
        lines = [f"densenet export: DenseNet '{self.config['name']}' ({self.weights}) -> "
                 f"{self.dst}, input {'x'.join(map(str, self.input_shape))} (NCHW, fixed), "
                 f"opset {self.opset}, torch.onnx dynamo exporter (torch {self.versions['torch']}, "
                 f"onnx {self.versions['onnx']})"]
        lines.append(f"  wrote {main} ({size(self.files[main])})" + (
            f" and its external data {', '.join(f'{d} ({size(self.files[d])})' for d in data)}: "
            "keep them side by side" if data else ""))
        ops = ", ".join(f"{n} {k}" for k, n in sorted(self.ops.items(), key=lambda kv: -kv[1]))
        lines.append(f"  graph: {ops}")
        if self.bn:
            lines.append(f"  BatchNormalization: epsilon {self.bn['epsilon']:g}, momentum "
                         f"{self.bn['momentum']:g} (ONNX keeps {self.bn['momentum']:g} of the running "
                         f"statistics: PyTorch's momentum {1 - self.bn['momentum']:.2g})")
        lines += ["", f"Proof: onnxruntime {self.versions['onnxruntime']} (CPU) against each "
                      "framework's own output, same weights and input: largest relative "
                      "difference of the logits"]
        for name, value in self.proof.items():
            if value is None:
                lines.append(f"  {name:<10} not run")
            elif not math.isfinite(value):  # never 'nan' or 'inf' where a number is meant
                lines.append(f"  {name:<10} not comparable (the shapes differ or a value is not "
                             "a finite number)  DIFFERENT")
            else:
                lines.append(f"  {name:<10} {value:9.2e}  (tolerance {EXPORT_RTOL:g})  "
                             f"{'ok' if value <= EXPORT_RTOL else 'DIFFERENT'}")
        for n in self.notes:
            lines.append(f"note: {n}")
        lines += ["", "Verdict: " + ("the export computes the same network." if self.ok else
                                     "the export does NOT compute the same network.")]
        return "\n".join(lines)


def default_size(config: spec.Preset) -> int:
    """The size a preset's network is used at: the book's 96 (Fashion-MNIST resized), CIFAR's
    32, ImageNet's 224."""
    if config.family == "mlp":
        return 0  # (N, features): no size
    return 96 if config.name == "book" else 32 if config.stem == "cifar" else 224


def _source(src: str, preset, seed: int, notes: List[str]):
    """(canonical state, config, source backend, words for the weights). A file is read once,
    as ``densenet convert`` reads it (densenet_parity.convert)."""
    from densenet_weights import formats
    if os.path.exists(src):
        from densenet_parity import convert
        try:
            loaded = formats.load(src, preset)
        except formats.WeightsFormatError as e:  # no weights file at all: the formats' words
            raise (ExportError(str(e)) if e.format is None else convert.refusal(e)) from None
        state, cfg = convert.matched(src, loaded)
        notes += loaded.notes
        fmt = loaded.format
        backend = SOURCE_BACKEND[fmt]
        if fmt == "flax":
            backend = ("flax-linen" if formats.format_flax.is_linen(loaded.tensors) else
                       "flax-nnx")
        return state, cfg, backend, f"weights: {src}, {fmt}"
    if src not in spec.preset_names():
        raise ExportError(f"no such file, and not a preset: {src!r} (a weights file, or one of "
                          f"{', '.join(spec.preset_names())} for random weights)")
    if preset is not None and preset != src:
        raise ExportError(f"the source is preset {src!r} but --preset says {preset!r}")
    from densenet_parity.states import random_state
    cfg = spec.make_config(src)
    return random_state(cfg, seed), cfg, "torch", f"random weights, seed {seed}"


def _torch_model(cfg: spec.Preset, state):
    from densenet_torch import build
    from densenet_torch.state import load_state
    model = build(cfg)
    load_state(model, state)
    return model.eval()


def write_onnx(model, x, dst: str, cfg: spec.Preset, opset: Optional[int] = None) -> None:
    """torch.onnx's dynamo exporter, its constant folding only (no fusion), the zero biases it
    adds to bias-free convolutions dropped, the preset recorded in the metadata."""
    import contextlib
    import io
    import warnings

    import logging

    import torch
    from onnxscript import optimizer
    loggers = [logging.getLogger(n) for n in ("onnxscript", "torch.onnx", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR + 10)
        program = torch.onnx.export(model, (torch.as_tensor(x),), dynamo=True, optimize=False,
                                    input_names=["x"], output_names=["logits"],
                                    opset_version=opset, verbose=False)
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    ir_model = program.model
    optimizer.fold_constants(ir_model)
    if not getattr(cfg, "conv_bias", True):  # aten.convolution without a bias becomes Conv with a zero bias
        for node in ir_model.graph:
            if node.op_type == "Conv" and len(node.inputs) == 3 and node.inputs[2] is not None:
                b = node.inputs[2].const_value
                if b is not None and not np.any(b.numpy()):
                    node.resize_inputs(2)
    optimizer.remove_unused_nodes(ir_model)
    ir_model.metadata_props["densenet_suite.preset"] = json.dumps(cfg.to_dict())
    for path in (dst, f"{dst}.data"):
        if os.path.exists(path):
            os.remove(path)
    program.save(dst, external_data=True)


def export(src: str, dst: str, preset: Optional[str] = None, size: Optional[int] = None,
           batch: int = 1, seed: int = 0, opset: Optional[int] = None, progress=None) -> ExportResult:
    """Export ``src`` (a weights file, or a preset's name for random weights) to ``dst`` and
    prove it in onnxruntime (``ExportResult.ok``)."""
    say = progress or (lambda msg: None)
    try:
        import onnx
        import onnxruntime as ort
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter needs it)
        import torch
    except ImportError as e:
        raise ExportError(f"exporting to ONNX needs torch, onnx, onnxscript and onnxruntime (the "
                          f"main environment's onnx extra: `make env`): {e}") from None
    from densenet_weights import formats
    if opset is not None and opset < MIN_OPSET:
        raise ExportError(f"--opset {opset}: torch.onnx's dynamo exporter writes opset "
                          f"{MIN_OPSET} or later")
    notes: List[str] = []
    state, cfg, source_backend, words = _source(src, preset, seed, notes)
    size = size or default_size(cfg)
    shape = spec.input_shape(cfg, batch, size, size)
    spec.check_input(cfg, shape)
    model = _torch_model(cfg, state)
    x = np.random.default_rng(seed + 2).standard_normal(shape).astype(np.float32)
    say(f"[onnx] exporting DenseNet '{cfg.name}' at {'x'.join(map(str, shape))} ...")
    try:
        write_onnx(model, x, dst, cfg, opset)
    except Exception as e:  # noqa: BLE001 - torch.export / torch.onnx: say, not a traceback
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        raise ExportError(f"torch.onnx.export(dynamo=True) failed: {type(e).__name__}: "
                          f"{lines[0] if lines else ''}") from None
    layers, info = formats.onnx_layers(dst)
    files = {dst: os.path.getsize(dst)}
    folder = os.path.dirname(os.path.abspath(dst))
    for f in info["external_data"]:
        files[os.path.join(os.path.dirname(dst), f)] = os.path.getsize(os.path.join(folder, f))
    bns = [g.attributes for g in layers if g.op == "BatchNormalization"]
    bn = {}
    if bns:
        settings = {(a["epsilon"], a["momentum"]) for a in bns}
        if len(settings) == 1:
            bn = {"epsilon": bns[0]["epsilon"], "momentum": bns[0]["momentum"]}
        else:
            notes.append(f"BatchNormalization nodes with different settings: {sorted(settings)}")
    n_bn = sum(1 for _, kind, _ in spec.canonical_modules(cfg) if kind == "bn")
    if len(bns) != n_bn:
        notes.append(f"{len(bns)} BatchNormalization nodes; the network has {n_bn} BatchNorms")
    result = ExportResult(src, words, dst, cfg.to_dict(), list(shape), files, info["ops"],
                          int(info["opset"].get("ai.onnx", 0)), bn,
                          {"torch": torch.__version__.split("+")[0], "onnx": onnx.__version__,
                           "onnxruntime": ort.__version__}, notes=notes)
    say("[onnx] onnxruntime ...")
    session = ort.InferenceSession(dst, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    from densenet_parity.compare import rel_diff
    with torch.no_grad():
        result.proof["torch"] = rel_diff(got, model(torch.as_tensor(x)).numpy())
    if source_backend != "torch":
        from densenet_parity.backends import BackendError, BackendUnavailable, make_backend
        say(f"[{source_backend}] the same weights in our {source_backend} model ...")
        b = make_backend(source_backend)
        try:
            out = b.call("forward", config=cfg.to_dict(), state=state, x=x)["arrays"]["head"]
            result.proof[source_backend] = rel_diff(got, out)
        except (BackendUnavailable, BackendError) as e:
            result.proof[source_backend] = None
            result.notes.append(f"{source_backend} could not run ({str(e).strip().splitlines()[0]});"
                                " the export is proven against PyTorch only")
        finally:
            b.close()
    return result
