"""ONNX: ``densenet check model.onnx``. A file subject: an ONNX file carries its graph and its
weights, so it is checked with its own weights (``check_file``, which ``engine.check_weights``
calls for an ONNX file) against our PyTorch model (subject_torch.reference), in eval mode only.

1. *Structure*, from the graph: every Conv, BatchNormalization and Gemm (or MatMul + Add) node's
   initializers, in the graph's topological order, each given its role by its input position,
   matched onto the preset as any framework's tensors are (densenet_weights.formats' ONNX
   module, which reads the file once: ``formats.load``, whose ``Loaded`` this module checks). A
   BatchNorm an exporter folded into the convolution before it (torch.onnx's optimizer, the
   TorchScript exporter's eval mode, onnxruntime's saved optimized model all fold the stem's
   norm0, and a bottleneck's norm2) is recognised from the graph (the convolution, now with a
   bias, feeds no BatchNormalization; without a bias too where every such position is so and
   every BatchNorm left is an identity: a default-initialised network, whose zero folded biases
   torch.onnx's optimizer drops) and said, not reported as a different network: it is put
   back as an identity BatchNorm, which computes the same in eval mode.
2. *BatchNorm settings*, read from each BatchNormalization node's attributes: epsilon, and
   momentum in ONNX's words (the share of the running statistics kept, like Gluon's, Flax's and
   Keras': 0.9 is PyTorch's 0.1); every difference from the reference's is named.
3. *Numbers*, in onnxruntime against our PyTorch model with the file's own weights (mapped onto
   the canonical names), eval mode, float32, 1e-5. Where they differ, a copy of the graph with
   every matched node's output made a graph output runs once more, and the first node (in the
   preset's order) whose output differs from our model's module there (forward hooks) is named,
   with the convention most likely behind it. With BatchNorm settings that differ, our model is
   run again with the file's settings: if that agrees, the verdict is "same architecture,
   different BatchNorm settings".

The input's layout is the graph's: where it reaches the first convolution through a Transpose
to NCHW (perm [0, 3, 1, 2], as tf2onnx writes a Keras model, whether its optimizer left one
Transpose at the input or a pair around every Conv and BatchNormalization), the file's input is
NHWC: its fixed shape is read as such, onnxruntime is fed the reference's NCHW input transposed,
and the report says the layout. Every compared output is NCHW whatever the layout around it
(ONNX's Conv and BatchNormalization compute in NCHW).

An ONNX file is an inference graph: there is no train step to compare.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np

import densenet_spec as spec
from densenet_parity.checking import settings as bn_words
from densenet_parity.checking import structure, subject_torch
from densenet_parity.checking.causes import convention
from densenet_parity.checking.numbers import BATCH, EVAL_RTOL, _first_difference, _rel
from densenet_parity.checking.report import Report
from densenet_parity.checking.subjects import CheckError, keep_share_in_torch_words
from densenet_weights import formats
from densenet_weights.causes import likely_structural_cause

FRAMEWORK = "onnx"
#: ONNX's word for its momentum: the share of the running statistics kept (0.9 = PyTorch's 0.1).
WORDS = "ONNX BatchNormalization"


def bn_settings(settings: Dict[str, dict]) -> Dict[str, dict]:
    """canonical BatchNorm module -> {"epsilon", "momentum" (PyTorch's words: 1 - ONNX's),
    "as_written", "foreign" (the node), "training_mode"} for every BatchNormalization node the
    match placed, from the settings the file's reading kept (``Loaded.settings``: each node's
    attributes, ONNX's defaults where absent: 1e-5, 0.9)."""
    out = keep_share_in_torch_words({c: {"epsilon": v["epsilon"], "momentum": v["momentum"]}
                                     for c, v in settings.items()}, WORDS)
    for cmod, s in out.items():
        s["foreign"] = settings[cmod]["node"]
        s["training_mode"] = settings[cmod]["training_mode"]
    return out


def _session(model_proto, outputs: List[str]):
    """An onnxruntime session of the model with ``outputs`` added as graph outputs."""
    import onnx
    import onnxruntime as ort
    m = onnx.ModelProto()
    m.CopyFrom(model_proto)
    have = {o.name for o in m.graph.output}
    for name in outputs:
        if name not in have:
            m.graph.output.append(onnx.ValueInfoProto(name=name))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _input_shape(shape, config, size: Optional[int], perm=None):
    """(batch, height, width) to run the file at: its input's own where fixed (a different
    ``size`` is a usage error), else the check's defaults. ``perm``: how the file's input axes
    reach NCHW (``formats.format_onnx``'s ``input_perm``: ``[0, 3, 1, 2]`` for an NHWC input),
    None or the identity for an NCHW one."""
    dims = [d if isinstance(d, int) and d > 0 else None for d in (list(shape) + [None] * 4)[:4]]
    fixed = [dims[k] for k in perm] if perm and len(shape) == 4 else dims  # NCHW order
    if config.family == "mlp":  # (N, features): no height or width
        return fixed[0] or BATCH, 0, 0
    default = size or (96 if config.name == "book" else 16 if config.stem == "cifar" else 64)
    if size is not None and any(d is not None and d != size for d in fixed[2:]):
        layout = formats.format_onnx.layout_name(perm) or "NCHW"
        raise CheckError(f"the file's input is {_dims(shape)}, its height and width fixed "
                         f"({layout}: {fixed[2] or '?'}x{fixed[3] or '?'} pixels): --size {size} "
                         f"cannot run it (leave --size out)")
    return fixed[0] or BATCH, fixed[2] or default, fixed[3] or default


def _dims(shape) -> str:
    """The file's input shape in words: '1x1x96x96', 'batch x 1 x height x width' (symbolic
    axes by their names, '?' for an unnamed one)."""
    dims = [str(d) if isinstance(d, int) and d > 0 else str(d or "?") for d in shape]
    return (" x " if any(not d.isdigit() for d in dims) else "x").join(dims)


def check_file(loaded: "formats.Loaded", size: Optional[int] = None, seed: int = 0,
               progress=None) -> Report:
    """The check's Report for an ONNX file, read once (``formats.load``: its graph's layers
    matched, folded BatchNorms put back, its nodes' settings; see the module's docstring)."""
    say = progress or (lambda msg: None)
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise CheckError(f"checking an ONNX file needs onnx and onnxruntime (the main "
                         f"environment's onnx extra: `make env`): {e}") from None
    path, layers, info, folded = loaded.path, loaded.layers, loaded.info, loaded.folded
    if not layers:
        raise CheckError(formats.format_onnx.no_weights(path))
    m = loaded.match
    config = m.config
    rows, totals = structure._structure_rows(config, m, structure.file_tensors(loaded.tensors))
    perm = info.get("input_perm")
    batch, height, width = _input_shape(info["input_shape"], config, size, perm)
    nchw = list(spec.input_shape(config, batch, height, width))
    layout = formats.format_onnx.layout_name(perm)
    to_file = [int(k) for k in np.argsort(perm)] if layout not in ("", "NCHW") else None
    ops = ", ".join(f"{n} {k}" for k, n in sorted(info["ops"].items(), key=lambda kv: -kv[1]))
    report = Report(FRAMEWORK, "", f"{path} ({info['producer'] or 'unknown producer'}, "
                    f"opset {info['opset'].get('ai.onnx', '?')})", config.name, config.to_dict(),
                    [nchw[k] for k in to_file] if to_file else nchw, rows, totals,
                    weights="the file's own", reference="onnxruntime against our PyTorch model",
                    layout=f"{layout}, a Transpose to NCHW at the input" if to_file else "")
    if info["external_data"]:
        report.notes.append(f"weights read from the external data file(s) "
                            f"{', '.join(info['external_data'])} beside the model")
    symbolic = [str(d) for d in info["input_shape"] if not (isinstance(d, int) and d > 0)]
    if symbolic:
        report.notes.append(f"the file's input is {_dims(info['input_shape'])} (dynamic: "
                            f"{', '.join(symbolic)}): checked at "
                            f"{'x'.join(map(str, report.input_shape))}")
    report.notes.append(f"graph: {ops}")
    report.notes += loaded.notes  # an NHWC input, the BatchNorms an exporter folded
    if not m.ok:
        report.structure = str(m.difference)
        report.cause = likely_structural_cause(config, m.difference)
        return report
    read_u = bn_settings(loaded.settings)
    if any(v["training_mode"] for v in read_u.values()):
        report.notes.append("a BatchNormalization node has training_mode=1: it normalises with "
                            "the batch's statistics, not the running ones")
    spec.check_input(config, spec.input_shape(config, batch, height, width))
    say("[onnx] onnxruntime against our PyTorch model ...")
    x = np.random.default_rng(seed + 2).standard_normal(
        spec.input_shape(config, batch, height, width)).astype(np.float32)
    # canonical module -> the graph value that is its output (a folded BatchNorm's: its conv's)
    by_module = {g.module: g for g in layers}
    outputs_u: Dict[str, str] = {}
    nodes: Dict[str, str] = {}
    for cmod, kind, _ in spec.canonical_modules(config):
        fname = m.mapping.get(f"{cmod}.weight", "")
        g = by_module.get(fname.rsplit(".", 1)[0])
        if g is not None:
            outputs_u[cmod] = g.output
            nodes[g.output] = f"{g.node} ({g.op})"
    for bn in folded:  # the conv's output is the folded BatchNorm's; the conv's own is gone
        i = [c for c, _, _ in spec.canonical_modules(config)].index(bn)
        conv = spec.canonical_modules(config)[i - 1][0]
        if conv in outputs_u:
            outputs_u[bn] = outputs_u.pop(conv)
    logits_name = info.get("softmax_of") or info["outputs"][0]
    if info.get("softmax_of"):
        report.notes.append(f"the file ends in a Softmax (Keras' classifier_activation="
                            f"'softmax'): its input '{logits_name}', the logits, is compared")
    try:  # the graph as read (external data loaded), with the matched nodes' outputs added
        session = _session(loaded.model, list(outputs_u.values()) + [logits_name])
        names = [o.name for o in session.get_outputs()]
        feed = np.ascontiguousarray(x.transpose(to_file)) if to_file else x
        got = dict(zip(names, session.run(None, {session.get_inputs()[0].name: feed})))
    except Exception as e:  # noqa: BLE001 - onnxruntime's own errors: say, not a traceback
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        report.error = (f"onnxruntime {ort.__version__} cannot run the file: "
                        f"{lines[0] if lines else type(e).__name__}")
        return report
    for g in layers:  # a BatchNorm written as elementwise ops on an NHWC tensor
        if g.output_perm and g.output in got and np.ndim(got[g.output]) == 4:
            got[g.output] = np.ascontiguousarray(np.transpose(got[g.output], g.output_perm))
    logits = got[logits_name]
    report.output_shape = list(np.shape(logits))
    order = [c for c, _, _ in spec.canonical_modules(config)]
    reference_modules = [c for c in order if c in outputs_u]

    def compare(settings=None):
        """(relative difference of the logits, the first node that differs) against our
        PyTorch model with the file's weights (and ``settings``: its BatchNorms')."""
        ref = subject_torch.reference(config, height, None, settings=settings)
        ref.load(m.state)
        out = ref.run(x=x, modules=reference_modules, train=False)
        rel = _rel(logits, out["logits"])
        first = None
        if rel > EVAL_RTOL:
            first = _first_difference(
                config, order, outputs_u, {c: c for c in reference_modules}, got,
                out["outputs"], EVAL_RTOL, "eval") or {
                "mode": "eval", "module": "classifier", "stage": "head",
                "foreign": logits_name, "rel": rel,
                "max_abs": float(np.max(np.abs(np.asarray(logits, np.float64) - out["logits"]))),
                "convention": convention(config, "classifier", "dense", logits,
                                         out["logits"], "eval")}
            if first["foreign"] in nodes:
                first["foreign"] = f"{nodes[first['foreign']]} -> '{first['foreign']}'"
        return ref, rel, first

    ref, report.numbers["eval_logits"], report.first = compare()
    read_r = {c: dict(v, foreign=c) for c, v in ref.bn_settings().items()}
    for cmod in folded:  # no node holds them: folded into the conv, said in the notes above
        if cmod in read_r:
            read_u.setdefault(cmod, dict(read_r[cmod], foreign="", training_mode=0,
                                         as_written="folded into the convolution before it"))
    elementwise = {g.module for g in layers if g.op in (formats.format_onnx.DECOMPOSED_BN,
                                                        formats.format_onnx.SCALE_SHIFT_BN)}
    for cmod, fname in m.mapping.items():  # no epsilon or momentum in the file: none differ
        if cmod.endswith(".running_mean") and fname.rsplit(".", 1)[0] in elementwise:
            cmod = cmod.rsplit(".", 1)[0]
            if cmod in read_r:
                read_u.setdefault(cmod, dict(
                    read_r[cmod], foreign=fname.rsplit(".", 1)[0], training_mode=0,
                    as_written="elementwise ops: its epsilon and variance are in the scale"))
    report.bn_settings = bn_words.differences(config, read_u, read_r,
                                              {c: v["foreign"] for c, v in read_u.items()}, FRAMEWORK)
    report.notes.append(f"numbers: onnxruntime {ort.__version__} (CPU), the file's weights in "
                        "our PyTorch model, eval mode (an ONNX file is an inference graph: no "
                        "train step)" + (f"; the file is fed our model's NCHW input transposed "
                                         f"to {layout}" if to_file else ""))
    eps = {d["module"]: d for d in report.bn_settings if d["setting"] == "epsilon"}
    if report.first and report.first["module"] in eps:  # the difference is the setting's
        d = eps[report.first["module"]]
        report.first["convention"] = (f"this BatchNorm's epsilon, {d['model']:g} where the "
                                      f"reference has {d['reference']:g} (the settings above)")
    if report.bn_settings:
        _, rel, first = compare(bn_words.for_reference(read_u))
        report.adjusted, report.adjusted_first = {"eval_logits": rel}, first
    return report
