"""Export a DenseNet to ONNX, proven: any preset, with any framework's weights (or random ones).

    densenet export densenet121.pth densenet121.onnx --size 224
    densenet export book book.onnx                  # a preset's name: random weights (seed 0)
    densenet export book book.onnx --dynamic-size   # height and width dynamic too
    densenet export book book13.onnx --opset 13     # TensorRT 8.x, OpenVINO, ...
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

The file's batch axis is dynamic (``batch``) unless ``fixed_batch``; ``dynamic_size`` makes
height and width dynamic too (``height``, ``width``, from the preset's smallest input up). The
model's ``forward`` checks its input's shape in Python (``spec.check_input``: ``int()`` of each
dimension, which torch.export would specialise), so the exporter traces the same modules without
that check (``_traced``: the model's own ``features`` and ``classifier``, so the initializers keep
the canonical names). The proof runs the file at every shape it claims: the example batch and
one more, and for a dynamic size a second, non-square size.

Opsets: torch.onnx's dynamo exporter implements opset 18 and later. Asked for 13 to 17 it
writes 18 and asks onnx's version converter, which fails on this graph (ReduceMean's axes are
not a constant yet when it converts), and keeps 18 with only a log line. onnx's converter on our
constant-folded graph fails too (onnx 1.23.2: to 15-17 the ReduceMean it rewrites keeps a
``noop_with_empty_axes`` those opsets lack; to 13-14 no adapter takes BatchNormalization from
15). So 13 to 17 are written by the
TorchScript exporter (``torch.onnx.export(..., dynamo=False)``; deprecated in torch, still
shipped), in ``TrainingMode.PRESERVE`` so that its eval-mode pass does not fold BatchNorms into
the convolutions: every BatchNorm stays a node there too, the initializers keep the canonical
names, and the same proof applies. What was chosen (exporter, opset, dynamic axes, the example
input) is recorded in the file's metadata, ``densenet_suite.export``.
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
DYNAMO_MIN_OPSET = 18  # the oldest opset torch.onnx's dynamo exporter implements
MIN_OPSET = 13         # the oldest offered (the TorchScript exporter, which writes older ones untested)
#: The source file's format -> the backend that computes with those weights in its framework
#: (Keras and ONNX have no mirror: their weights are proven in our PyTorch model).
SOURCE_BACKEND = {"torch": "torch", "safetensors": "torch", "gluon": "mxnet", "flax": "flax-nnx",
                  "keras": "torch", "onnx": "torch"}
#: The exporter that writes an opset: "dynamo" (18 and later) or "torchscript" (13 to 17).
EXPORTERS = {"dynamo": "torch.onnx dynamo exporter", "torchscript": "torch.onnx TorchScript exporter"}


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
    exporter: str = "dynamo"
    dynamic: List[str] = dataclasses.field(default_factory=list)  # the file's symbolic axes
    #: [backend, input shape, relative difference or None] for every shape the file was run at
    proofs: List[list] = dataclasses.field(default_factory=list)
    checker: str = ""  # what onnx.checker (full check) says against the file; "": it passes

    @property
    def ok(self) -> bool:
        done = [v for v in self.proof.values() if v is not None]
        return bool(done) and all(v <= EXPORT_RTOL for v in done) and not self.checker

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ok"] = self.ok
        return d

    def render(self) -> str:
        def size(n):
            return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"
        main, *data = self.files
        mlp = self.config.get("family") == "mlp"
        axes = ["batch", "features"] if mlp else ["batch", "channels", "height", "width"]
        dims = [a if a in self.dynamic else str(n) for a, n in zip(axes, self.input_shape)]
        lines = [f"densenet export: DenseNet '{self.config['name']}' ({self.weights}) -> "
                 f"{self.dst}, input {(' x ' if self.dynamic else 'x').join(dims)} "
                 f"({'N, features' if mlp else 'NCHW'}; "
                 + (f"dynamic: {', '.join(self.dynamic)}" if self.dynamic else "fixed")
                 + f"), opset {self.opset}, {EXPORTERS.get(self.exporter, self.exporter)} "
                 f"(torch {self.versions['torch']}, onnx {self.versions['onnx']})"]
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
                      "difference of the logits" + (", at every input shape below" if
                                                    len({tuple(r[1]) for r in self.proofs}) > 1
                                                    else "")]
        rows = self.proofs or [[name, self.input_shape, value] for name, value in self.proof.items()]
        width = max(len("x".join(map(str, r[1]))) for r in rows) if rows else 0
        for name, shape, value in rows:
            at = f"{'x'.join(map(str, shape)):<{width}}"
            if value is None:
                lines.append(f"  {name:<10} {at}  not run")
            elif not math.isfinite(value):  # never 'nan' or 'inf' where a number is meant
                lines.append(f"  {name:<10} {at}  not comparable (the shapes differ or a value is "
                             "not a finite number)  DIFFERENT")
            else:
                lines.append(f"  {name:<10} {at}  {value:9.2e}  (tolerance {EXPORT_RTOL:g})  "
                             f"{'ok' if value <= EXPORT_RTOL else 'DIFFERENT'}")
        lines.append("  onnx.checker (full check): " + (
            f"REJECTS the file: {self.checker}" if self.checker else "passes"))
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
        if fmt in ("keras", "onnx"):
            notes.append(f"{'Keras' if fmt == 'keras' else 'ONNX'} has no mirror here: the "
                         "file's weights are proven in our PyTorch model")
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


def _traced(model):
    """A module with ``model``'s own ``features`` and ``classifier`` (the initializers keep their
    canonical names) and its forward without the Python check of the input's shape, which
    torch.export would specialise (``int()`` of each dimension)."""
    import torch

    class _Traced(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.features, self.classifier = model.features, model.classifier

        def forward(self, X):
            return type(model)._head(self, self.features(X))

    return _Traced().eval()


def _axes(cfg: spec.Preset, dynamic) -> Dict[int, str]:
    """input axis -> its symbolic name, for the dynamic axes asked ("batch", "height", "width")."""
    names = {"batch": 0} if cfg.family == "mlp" else {"batch": 0, "height": 2, "width": 3}
    return {names[a]: a for a in dynamic}


def _dynamo(model, x, cfg, opset, dynamic):
    """torch.onnx's dynamo exporter, its constant folding only (no fusion), the zero biases it
    adds to bias-free convolutions dropped: the ONNX IR model."""
    import torch
    from onnxscript import optimizer
    axes = _axes(cfg, dynamic)
    low = spec.min_input_size(cfg) if cfg.family != "mlp" else 1
    shapes = ({"X": {i: torch.export.Dim(name, min=1 if i == 0 else low)
                     for i, name in axes.items()}} if axes else None)
    program = torch.onnx.export(_traced(model), (torch.as_tensor(x),), dynamo=True,
                                optimize=False, input_names=["x"], output_names=["logits"],
                                opset_version=opset, dynamic_shapes=shapes, verbose=False)
    ir_model = program.model
    optimizer.fold_constants(ir_model)
    if not getattr(cfg, "conv_bias", True):  # aten.convolution without a bias becomes Conv with a zero bias
        for node in ir_model.graph:
            if node.op_type == "Conv" and len(node.inputs) == 3 and node.inputs[2] is not None:
                b = node.inputs[2].const_value
                if b is not None and not np.any(b.numpy()):
                    node.resize_inputs(2)
    optimizer.remove_unused_nodes(ir_model)
    return program


def _torchscript(model, x, dst, cfg, opset, dynamic):
    """torch.onnx's TorchScript exporter at ``opset`` (13 to 17), in TrainingMode.PRESERVE on
    the eval-mode model: inference BatchNormalization nodes, none folded into a convolution."""
    import torch
    axes = _axes(cfg, dynamic)
    torch.onnx.export(_traced(model), (torch.as_tensor(x),), dst, dynamo=False,
                      opset_version=opset, input_names=["x"], output_names=["logits"],
                      dynamic_axes=({"x": axes, "logits": {0: "batch"} if 0 in axes else {}}
                                    if axes else None),
                      training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)


def write_onnx(model, x, dst: str, cfg: spec.Preset, opset: Optional[int] = None,
               dynamic=("batch",)) -> str:
    """Write ``model`` (eval mode) traced at ``x`` as ONNX at ``opset`` (None: the dynamo
    exporter's default) with the ``dynamic`` axes symbolic, every BatchNorm a node, the weights
    in ``DST.data``, the preset and the export's choices in the metadata. Returns the exporter
    used: "dynamo" (opset 18 and later) or "torchscript" (13 to 17; see the module's docstring)."""
    import contextlib
    import io
    import logging
    import warnings

    import onnx
    exporter = "torchscript" if opset is not None and opset < DYNAMO_MIN_OPSET else "dynamo"
    for path in (dst, f"{dst}.data"):
        if os.path.exists(path):
            os.remove(path)
    loggers = [logging.getLogger(n) for n in ("onnxscript", "torch.onnx", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR + 10)
        try:
            if exporter == "dynamo":
                program = _dynamo(model, x, cfg, opset, dynamic)
            else:
                _torchscript(model, x, dst, cfg, opset, dynamic)
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)
    meta = {"densenet_suite.preset": json.dumps(cfg.to_dict()),
            "densenet_suite.export": json.dumps({
                "exporter": exporter, "opset": opset, "dynamic": list(dynamic),
                "example_input": list(np.shape(x))})}
    if exporter == "dynamo":
        program.model.metadata_props.update(meta)
        program.save(dst, external_data=True)
        return exporter
    proto = onnx.load(dst)  # the TorchScript exporter writes one file: the same layout as dynamo's
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, dst, save_as_external_data=True, all_tensors_to_one_file=True,
              location=f"{os.path.basename(dst)}.data", size_threshold=1024)
    return exporter


def opset_range() -> tuple:
    """(oldest, newest) opset ``export`` writes: 13 (through the TorchScript exporter below 18;
    older ones are not offered: untested here) to the newest the installed onnx defines."""
    import onnx
    return MIN_OPSET, onnx.defs.onnx_opset_version()


def export(src: str, dst: str, preset: Optional[str] = None, size: Optional[int] = None,
           batch: int = 1, seed: int = 0, opset: Optional[int] = None, progress=None,
           fixed_batch: bool = False, dynamic_size: bool = False) -> ExportResult:
    """Export ``src`` (a weights file, or a preset's name for random weights) to ``dst`` and
    prove it in onnxruntime (``ExportResult.ok``): the batch axis dynamic unless
    ``fixed_batch`` (``batch`` is the example the exporter traces), height and width too with
    ``dynamic_size``; ``opset`` 13 to 17 through the TorchScript exporter (module docstring)."""
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
    low, high = opset_range()
    if opset is not None and not low <= opset <= high:
        raise ExportError(f"--opset {opset}: the export writes opset {low} to {high} (13-17 with "
                          f"torch.onnx's TorchScript exporter, {DYNAMO_MIN_OPSET} and later with "
                          f"its dynamo exporter; {high} is the newest onnx {onnx.__version__} and "
                          f"onnxruntime {ort.__version__} both run)")
    if batch < 1:
        raise ExportError(f"--batch must be positive, got {batch}")
    notes: List[str] = []
    state, cfg, source_backend, words = _source(src, preset, seed, notes)
    if dynamic_size and cfg.family == "mlp":
        raise ExportError(f"--dynamic-size: DenseNet '{cfg.name}' is an MLP DenseNet, its input "
                          f"is (N, features) with {cfg.in_features} features: no height or width")
    size = size or default_size(cfg)
    shape = spec.input_shape(cfg, batch, size, size)
    spec.check_input(cfg, shape)
    dynamic = ([] if fixed_batch else ["batch"]) + (["height", "width"] if dynamic_size else [])
    shapes = [shape]  # every shape the file claims to run at is proven
    if not fixed_batch:
        shapes.append(spec.input_shape(cfg, batch + 1, size, size))
    if dynamic_size:
        shapes.append(spec.input_shape(cfg, shapes[-1][0], size + 16, size + 8))
    model = _torch_model(cfg, state)
    rng = np.random.default_rng(seed + 2)
    xs = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    exporter = "torchscript" if opset is not None and opset < DYNAMO_MIN_OPSET else "dynamo"
    say(f"[onnx] exporting DenseNet '{cfg.name}' at {'x'.join(map(str, shape))} ("
        + (f"dynamic: {', '.join(dynamic)}" if dynamic else "fixed") + f"), "
        f"{EXPORTERS[exporter]} ...")
    try:
        write_onnx(model, xs[0], dst, cfg, opset, dynamic)
    except Exception as e:  # noqa: BLE001 - torch.export / torch.onnx: say, not a traceback
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        raise ExportError(f"torch.onnx.export(dynamo={exporter == 'dynamo'}) failed: "
                          f"{type(e).__name__}: {lines[0] if lines else ''}") from None
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
    symbolic = [d for d in info["input_shape"] if not isinstance(d, int)]
    if sorted(symbolic) != sorted(dynamic):
        notes.append(f"the file's input is {' x '.join(map(str, info['input_shape']))}: its "
                     f"symbolic axes are {symbolic or 'none'}, {dynamic or 'none'} were asked")
    result = ExportResult(src, words, dst, cfg.to_dict(), list(shape), files, info["ops"],
                          int(info["opset"].get("ai.onnx", 0)), bn,
                          {"torch": torch.__version__.split("+")[0], "onnx": onnx.__version__,
                           "onnxruntime": ort.__version__}, notes=notes, exporter=exporter,
                          dynamic=dynamic)
    try:
        onnx.checker.check_model(dst, full_check=True)
    except Exception as e:  # noqa: BLE001 - onnx.checker's ValidationError and friends
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        result.checker = lines[0] if lines else type(e).__name__
    say("[onnx] onnxruntime ...")
    from densenet_parity.compare import rel_diff
    try:
        session = ort.InferenceSession(dst, providers=["CPUExecutionProvider"])
        got = [session.run(None, {session.get_inputs()[0].name: x})[0] for x in xs]
    except Exception as e:  # noqa: BLE001 - onnxruntime's own errors: say, not a traceback
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        raise ExportError(f"onnxruntime {ort.__version__} cannot run the file written: "
                          f"{lines[0] if lines else type(e).__name__}") from None

    def prove(name, outputs):
        rels = [None if o is None else rel_diff(g, o) for g, o in zip(got, outputs)]
        result.proofs += [[name, list(s), r] for s, r in zip(shapes, rels)]
        done = [r for r in rels if r is not None]
        result.proof[name] = (None if not done else float("inf") if not all(
            math.isfinite(r) for r in done) else max(done))

    with torch.no_grad():
        prove("torch", [model(torch.as_tensor(x)).numpy() for x in xs])
    if source_backend != "torch":
        from densenet_parity.backends import BackendError, BackendUnavailable, make_backend
        say(f"[{source_backend}] the same weights in our {source_backend} model ...")
        b = make_backend(source_backend)
        try:
            prove(source_backend, [b.call("forward", config=cfg.to_dict(), state=state,
                                          x=x)["arrays"]["head"] for x in xs])
        except (BackendUnavailable, BackendError) as e:
            prove(source_backend, [None] * len(xs))
            result.notes.append(f"{source_backend} could not run ({str(e).strip().splitlines()[0]});"
                                " the export is proven against PyTorch only")
        finally:
            b.close()
    return result
