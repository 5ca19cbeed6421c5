"""ONNX: a ``.onnx`` file (+ external data), read with ``onnx.load``; the graph gives each
initializer its role (Conv, BatchNormalization, Gemm inputs).

ONNX files hold a graph, not a state_dict: an initializer's name may be anything (torch.onnx
keeps the state_dict's names; an exporter that folded or deduplicated tensors writes
``onnx::Conv_238`` or ``val_170``, and one tensor may feed several nodes). So the *graph* says
what each initializer is: the weights of every Conv, BatchNormalization and Gemm (or MatMul +
Add) node, in the graph's (topological) order, each named ``<module>.<role>`` with the node's
module (the initializers' common prefix, torch.onnx's name scope, or the node's name) and the
role its input position gives it; Gemm and MatMul weights come out [out, in]. ``onnx_layers``
returns the nodes with their attributes (BatchNormalization's epsilon and momentum).
External data files (torch.onnx writes ``model.onnx.data`` beside ``model.onnx``) are read from
the file's folder.

``load`` reads the file once and matches it (``match_onnx``): BatchNorms an exporter folded into
the convolution before them are put back as identity BatchNorms (``unfold_batchnorm``) and said
in the notes (``folded_words``; a conv with neither a BatchNorm after it nor a bias is a fold
whose zero bias the exporter dropped only where ``zero_shift_folds`` says so, else a missing
BatchNorm, its evidence said by ``missing_words``), as is an input that is NHWC (a Transpose to NCHW before the
first convolution, as tf2onnx writes a Keras model: ``info["input_layout"]``, ``layout_words``;
another layout is refused); the preset our exports record (``onnx_preset``) is used when
none is given; each matched BatchNormalization node's settings are kept. ONNX is read only:
``densenet_parity.export`` writes it, with torch.onnx.
"""
from __future__ import annotations

import dataclasses
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import numpy as np

from densenet_weights.formats.common import Loaded, WeightsFormatError

FORMAT = "onnx"
SUFFIXES = (".onnx",)
LAYOUT = "torch"
NATURAL = False
NATIVE = ()

#: ModelProto's fields as protobuf tags (field number << 3 | wire type): ir_version (1, a
#: varint) comes first in every writer's output, then producer_name (2), producer_version (3),
#: domain (4), model_version (5), doc_string (6), graph (7), opset_import (8), metadata (14).
_ONNX_NEXT_TAGS = (0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72)
#: An operator's inputs that are weights, by position, and the role each is.
ONNX_WEIGHT_INPUTS = {
    "Conv": {1: "weight", 2: "bias"}, "FusedConv": {1: "weight", 2: "bias"},
    "BatchNormalization": {1: "weight", 2: "bias", 3: "running_mean", 4: "running_var"},
    "Gemm": {1: "weight", 2: "bias"}, "MatMul": {1: "weight"}}
#: ONNX's defaults for BatchNormalization's attributes (the operator's specification).
ONNX_BN_DEFAULTS = {"epsilon": 1e-5, "momentum": 0.9}
_ONNX_LEAVES = ("weight", "bias", "running_mean", "running_var", "kernel", "gamma", "beta",
                "moving_mean", "moving_var", "scale", "mean", "var")


def sniff(head: bytes, path: str) -> bool:
    """A serialized ModelProto: tag 0x08 (ir_version), a small varint, then another field."""
    return len(head) >= 3 and head[0] == 0x08 and 1 <= head[1] <= 0x7F and (
        head[2] in _ONNX_NEXT_TAGS)


@dataclasses.dataclass
class OnnxLayer:
    """One weight-carrying node of an ONNX graph: the node's name and operator, the module name
    its weights get, role -> (initializer name, array: PyTorch's layout), its attributes, the
    graph value it outputs (a BatchNormalization's or Conv's output, Gemm's logits) and what
    feeds it."""
    node: str
    op: str
    module: str
    tensors: "OrderedDict[str, Tuple[str, np.ndarray]]"
    attributes: Dict[str, object]
    output: str
    inputs: Tuple[str, ...]
    #: the perm that puts ``output`` in NCHW where it is not (a BatchNorm written as elementwise
    #: ops on an NHWC tensor: [0, 3, 1, 2]), else None
    output_perm: Optional[List[int]] = None


#: A BatchNorm written as elementwise operators with per-channel constants, as Keras 3's
#: exporters and tf2onnx write an inference-mode BatchNormalization: (x - mean) * scale + shift,
#: or x * scale + shift (the mean folded into the shift). Its epsilon and variance are folded
#: into the scale.
DECOMPOSED_BN = "Sub+Mul+Add"
SCALE_SHIFT_BN = "Mul+Add"
#: Operators a value passes unchanged in meaning (what a Conv feeds its BatchNorm through).
_PASS = ("Identity", "Cast")


def _onnx_model(path):
    try:
        import onnx
    except ImportError:
        raise WeightsFormatError("reading an ONNX file needs the onnx package (the main "
                                 "environment's onnx extra: `make env`)") from None
    path = os.fspath(path)
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise WeightsFormatError(f"{path}: not a readable ONNX model ({e})") from None
    folder = os.path.dirname(os.path.abspath(path))
    files = sorted({kv.value for t in model.graph.initializer for kv in t.external_data
                    if kv.key == "location"})
    for f in files:
        target = os.path.normpath(os.path.join(folder, f))
        if os.path.isabs(f) or not target.startswith(folder + os.sep):
            raise WeightsFormatError(f"{path}: refused: its external data {f!r} lies outside "
                                     "the model's folder")
        if not os.path.exists(target):
            raise WeightsFormatError(f"{path}: its weights are in the external data file {f!r}, "
                                     f"which is not in {folder} (keep it beside the .onnx file)")
    if files:
        try:
            onnx.load_external_data_for_model(model, folder)
        except Exception as e:  # noqa: BLE001 - a truncated or damaged data file
            raise WeightsFormatError(f"{path}: its external data ({', '.join(files)}) cannot be "
                                     f"read ({e})") from None
    return model, files


def _onnx_attrs(node) -> Dict[str, object]:
    from onnx import helper
    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def _module_of(node, index: int, names: List[str], used: set) -> str:
    """The module a node's weights belong to: the common module of its initializers' names
    (``features.conv0.weight`` -> ``features.conv0``), else torch.onnx's name scope, else the
    node's name (``/features/conv0/Conv`` -> ``features.conv0``), unique in the graph."""
    candidates = []
    mods = {n.rsplit(".", 1)[0] for n in names if "." in n and n.rsplit(".", 1)[1] in _ONNX_LEAVES}
    if len(mods) == 1 and all("." in n and n.rsplit(".", 1)[1] in _ONNX_LEAVES for n in names):
        candidates.append(mods.pop())
    meta = {p.key: p.value for p in node.metadata_props}
    scopes = meta.get("pkg.torch.onnx.name_scopes")
    if scopes:
        import ast
        try:
            parts = ast.literal_eval(scopes)
            if isinstance(parts, list) and len(parts) >= 2 and parts[-2]:
                candidates.append(str(parts[-2]))
        except (ValueError, SyntaxError):
            pass
    if node.name.startswith("/") and node.name.count("/") >= 2:
        candidates.append(".".join(node.name.strip("/").split("/")[:-1]))
    candidates.append(node.name or f"{node.op_type}_{index}")
    for c in candidates:
        if c and c not in used:
            return c
    return f"{candidates[-1]}_{index}"


def onnx_layers(path) -> Tuple[List[OnnxLayer], Dict[str, object]]:
    """The weight-carrying nodes of an ONNX model in the graph's order, and what the file says
    about itself: producer, opset, external data files, the operators it uses (op -> count), its
    input's name and shape, its output's name."""
    return _graph(path)[1:]


def _graph(path):
    """(the ModelProto, external data loaded; onnx_layers' layers and info)."""
    from onnx import numpy_helper
    model, files = _onnx_model(path)
    g = model.graph
    consts: Dict[str, Tuple[str, np.ndarray]] = {
        t.name: (t.name, np.array(numpy_helper.to_array(t))) for t in g.initializer}
    for node in g.node:  # Constant nodes and Identity of a constant are constants too
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    consts[node.output[0]] = (node.output[0], np.array(numpy_helper.to_array(a.t)))
        elif node.op_type == "Identity" and node.input and node.input[0] in consts:
            consts[node.output[0]] = consts[node.input[0]]
        elif node.op_type == "Transpose" and node.input and node.input[0] in consts:
            # an unoptimised tf2onnx graph: a Conv's OIHW kernel is Transpose(HWIO constant)
            name, a = consts[node.input[0]]
            consts[node.output[0]] = (name, np.transpose(a, _perm(node, a.ndim)))
    consumers: Dict[str, list] = {}
    producer: Dict[str, object] = {}
    for node in g.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
        for o in node.output:
            producer[o] = node
    layers: List[OnnxLayer] = []
    used: set = set()
    has_conv = any(n.op_type in ("Conv", "FusedConv") for n in g.node)
    claimed: set = set()
    for index, node in enumerate(g.node):
        decomposed = _decomposed_bn(node, consts, consumers, producer, has_conv, claimed)
        if decomposed is not None:
            module = _module_of(node, index, [], used)
            used.add(module)
            tensors, inputs, output, perm, mine = decomposed
            claimed |= mine
            op = DECOMPOSED_BN if node.op_type == "Sub" else SCALE_SHIFT_BN
            layers.append(OnnxLayer(node.name or f"{op}_{index}", op, module, tensors,
                                    {"epsilon": None, "momentum": None}, output, inputs, perm))
            continue
        roles = ONNX_WEIGHT_INPUTS.get(node.op_type)
        if roles is None or node.input[:1] == [] or node.input[0] in consts:
            continue
        tensors: "OrderedDict[str, Tuple[str, np.ndarray]]" = OrderedDict()
        for pos, role in roles.items():
            if pos < len(node.input) and node.input[pos] in consts:
                name, a = consts[node.input[pos]]
                tensors[role] = (name, np.asarray(a))
        if "weight" not in tensors:
            continue
        attrs = _onnx_attrs(node)
        output = node.output[0]
        if node.op_type in ("Gemm", "MatMul"):
            name, w = tensors["weight"]
            if w.ndim != 2 or attrs.get("transA", 0):
                continue
            w = w if node.op_type == "Gemm" and attrs.get("transB", 0) else w.T
            tensors["weight"] = (name, np.ascontiguousarray(w * attrs.get("alpha", 1.0)
                                                            if attrs.get("alpha", 1.0) != 1.0 else w))
            if "bias" in tensors and attrs.get("beta", 1.0) != 1.0:
                tensors["bias"] = (tensors["bias"][0], tensors["bias"][1] * attrs["beta"])
            nxt, via = _next(output, consumers)  # Keras 3's torch export: MatMul, Cast, Add
            if node.op_type == "MatMul" and nxt is not None and nxt.op_type == "Add":
                other = [i for i in nxt.input if i != via]
                if other and other[0] in consts:
                    tensors["bias"] = consts[other[0]]
                    output = nxt.output[0]
        if node.op_type == "BatchNormalization":
            for k, v in ONNX_BN_DEFAULTS.items():
                attrs.setdefault(k, v)
        module = _module_of(node, index, [n for n, _ in tensors.values()], used)
        used.add(module)
        inputs = (_through_transposes(node.input[0], producer),) + tuple(node.input[1:])
        layers.append(OnnxLayer(node.name or f"{node.op_type}_{index}", node.op_type, module,
                                tensors, attrs, output, inputs))
    ops: Dict[str, int] = {}
    for node in g.node:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        ops[key] = ops.get(key, 0) + 1
    inputs = [i for i in g.input if i.name not in consts]
    shape = []
    if inputs:
        for d in inputs[0].type.tensor_type.shape.dim:
            shape.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?"))
    perm = _input_perm(path, inputs[0].name, len(shape), consumers) if inputs else None
    # a head that ends in a Softmax (Keras' classifier_activation): its input is the logits
    last = producer.get(g.output[0].name) if g.output else None
    while last is not None and last.op_type in _PASS:
        last = producer.get(last.input[0])
    logits = last.input[0] if last is not None and last.op_type == "Softmax" else None
    info = {"producer": f"{model.producer_name} {model.producer_version}".strip(),
            "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
            "external_data": files, "ops": ops,
            "input": inputs[0].name if inputs else "", "input_shape": shape,
            "input_perm": perm, "input_layout": layout_name(perm), "softmax_of": logits,
            "outputs": [o.name for o in g.output],
            "metadata": {p.key: p.value for p in model.metadata_props}}
    return model, layers, info


#: Operators that keep their input's layout (elementwise, or padding every axis as the layout
#: it is in): a path from the graph's input to its first convolution may pass them (Keras'
#: ZeroPadding2D is a Pad in NHWC before tf2onnx's Transpose; preprocessing is a Mul or Sub).
LAYOUT_KEEPING = frozenset({"Identity", "Cast", "Pad", "Relu", "Clip", "Add", "Sub", "Mul",
                            "Div", "Neg", "Abs", "Sqrt", "Exp", "Sigmoid", "Tanh", "LeakyRelu"})
#: The input layouts read: PyTorch's (no Transpose) and TensorFlow's (a Transpose to NCHW first).
READ_LAYOUTS = ("NCHW", "NHWC")


def _perm(node, ndim: int) -> List[int]:
    """A Transpose node's perm (ONNX's default: the axes reversed)."""
    for a in node.attribute:
        if a.name == "perm":
            return [int(v) for v in a.ints]
    return list(range(ndim))[::-1]


def _compose(first: List[int], then: List[int]) -> List[int]:
    """The perm of Transpose(Transpose(x, first), then): output axis i is x's axis
    first[then[i]]."""
    return [first[i] for i in then]


def _next(value: str, consumers: Dict[str, list]):
    """(the one node that consumes ``value``, past Identity and Cast; the value it reads), or
    (None, value) where not exactly one does."""
    for _ in range(8):
        nxt = consumers.get(value, [])
        if len(nxt) != 1:
            return None, value
        if nxt[0].op_type not in _PASS:
            return nxt[0], value
        value = nxt[0].output[0]
    return None, value


def _channel_const(node, consts, data: str):
    """(the constant input's name, its values as a vector, its original rank) of a binary
    elementwise node whose other input is ``data``, where the constant holds one value per
    channel (a vector, or [C, 1, 1] / [1, C, 1, 1]); else None."""
    if len(node.input) != 2 or data not in node.input:
        return None
    other = node.input[1] if node.input[0] == data else node.input[0]
    if other not in consts or other == data:
        return None
    name, a = consts[other]
    a = np.asarray(a)
    if a.ndim == 0 or sum(d != 1 for d in a.shape) != 1 or a.size < 2:
        return None
    return name, np.ascontiguousarray(a.reshape(-1), dtype=np.float32), a.ndim


def _decomposed_bn(node, consts, consumers, producer, has_conv, claimed=frozenset()):
    """A BatchNorm written as per-channel elementwise ops starting at ``node``: Sub(x, mean),
    Mul(scale), Add(shift), or Mul(x, scale), Add(shift) (``DECOMPOSED_BN``, ``SCALE_SHIFT_BN``;
    Identity and Cast between them). Returns (tensors: weight = the scale, bias = the shift,
    running_mean = the mean or 0, running_var = 1 - eps: the same function in eval mode; the
    layer's inputs (its data traced back through Transposes, Identity and Cast); the Add's
    output; the perm that makes that output NCHW) or None."""
    if (node.op_type not in ("Sub", "Mul") or not node.input or node.input[0] in consts
            or id(node) in claimed):  # the Mul of a Sub, Mul, Add already read
        return None
    data, steps, claimed = node.input[0], [], set()
    current, reads = node, data
    for op in (("Sub", "Mul", "Add") if node.op_type == "Sub" else ("Mul", "Add")):
        if current is None or current.op_type != op:
            return None
        c = _channel_const(current, consts, reads)
        if c is None or (op == "Sub" and current.input[0] != reads):
            return None
        steps.append(c)
        claimed.add(id(current))
        out = current.output[0]
        current, reads = _next(out, consumers)
    if len({len(c[1]) for c in steps}) != 1:
        return None
    ch = len(steps[0][1])
    eps = ONNX_BN_DEFAULTS["epsilon"]
    mean = steps[0] if node.op_type == "Sub" else None
    scale, shift = steps[-2], steps[-1]
    tensors: "OrderedDict[str, Tuple[str, np.ndarray]]" = OrderedDict([
        ("weight", scale[:2]), ("bias", shift[:2]),
        ("running_mean", mean[:2] if mean else (f"{scale[0]}.mean", np.zeros(ch, np.float32))),
        ("running_var", (f"{scale[0]}.var", np.full(ch, 1 - eps, np.float32)))])
    # a vector constant broadcasts over the last axis: in a conv net the data is NHWC there
    perm = [0, 3, 1, 2] if has_conv and scale[2] == 1 else None
    return tensors, (_through_transposes(data, producer, any_perm=True),), out, perm, claimed


def _through_transposes(value: str, producer: Dict[str, object], any_perm: bool = False) -> str:
    """The value a chain of Transpose (and Identity) nodes ending at ``value`` starts from,
    where the chain's perms compose to no change at all (tf2onnx's pair around a Conv: a
    Transpose to NHWC after it, one back to NCHW before the BatchNorm that follows), else
    ``value`` itself: so a Conv feeding a BatchNorm through such a pair still feeds it.
    ``any_perm``: through any Transposes (a BatchNorm written as per-channel elementwise ops
    reads its conv's output in NHWC, one Transpose after the conv)."""
    chain, v = [], value
    while v in producer and producer[v].op_type in ("Transpose",) + _PASS and producer[v].input:
        chain.append(producer[v])
        v = producer[v].input[0]
    best, perm = value, None
    for k, node in enumerate(chain):  # from ``value`` back towards the source
        if node.op_type == "Transpose":
            p = _perm(node, len(perm) if perm else 4)
            perm = p if perm is None else _compose(p, perm)
        if any_perm or perm is None or perm == sorted(perm):
            best = node.input[0]
    return best


def _input_perm(path, name: str, ndim: int, consumers: Dict[str, list]) -> Optional[List[int]]:
    """How the graph's input reaches its first convolution: the perm of the Transposes on the
    way (composed; ``[0, 1, 2, 3]``: none, the input is NCHW; ``[0, 3, 1, 2]``: the input is
    NHWC, as tf2onnx writes a Keras model's), following only ops that keep the layout
    (``LAYOUT_KEEPING``). None where no convolution is reached that way (an MLP, or a graph
    this does not follow: read as NCHW). An input whose layout is neither NCHW nor NHWC is
    refused: its weights would compute another network in ours."""
    seen, todo = set(), [(name, list(range(ndim)))]
    while todo:
        value, perm = todo.pop(0)
        for node in consumers.get(value, []):
            if node.op_type in ("Conv", "FusedConv") and node.input[0] == value:
                if len(perm) != 4:
                    return None
                layout = layout_name(perm)
                if layout not in READ_LAYOUTS:
                    raise WeightsFormatError(
                        f"{path}: its input reaches the first convolution ('{node.name or 'Conv'}')"
                        f" through Transpose perm {perm}: an input laid out {layout}; read are "
                        f"NCHW (no Transpose) and NHWC (a Transpose with perm [0, 3, 1, 2] first, "
                        f"as tf2onnx writes a Keras model)")
                return perm
            if node.output[0] in seen:
                continue
            if node.op_type == "Transpose":
                seen.add(node.output[0])
                todo.append((node.output[0], _compose(perm, _perm(node, len(perm)))))
            elif node.op_type in LAYOUT_KEEPING and node.input[0] == value:
                seen.add(node.output[0])
                todo.append((node.output[0], perm))
    return None


def layout_name(perm: Optional[List[int]]) -> str:
    """The input's layout a perm from ``_input_perm`` says: "NCHW", "NHWC", ...; "" for None."""
    if perm is None:
        return ""
    return "".join("NCHW"[k] for k in np.argsort(perm))


def layout_words(perm: List[int]) -> str:
    """The note for an input that is not NCHW (``_input_perm``'s perm)."""
    return (f"input layout {layout_name(perm)} (a Transpose to NCHW at the input, perm "
            f"{list(perm)}): the weights are those of the NCHW network after it (ONNX's Conv and "
            "BatchNormalization are NCHW); our models take the same images as NCHW")


def no_weights(path) -> str:
    """What an ONNX file with no weight-carrying node is told."""
    return (f"{path}: an ONNX model without Conv, BatchNormalization or Gemm weights (not a "
            "DenseNet)")


def read(path) -> "OrderedDict[str, np.ndarray]":
    """An ONNX model's weights, ``<module>.<role>`` -> array (PyTorch's layout), in the graph's
    order (see ``onnx_layers``)."""
    layers, _ = onnx_layers(path)
    if not layers:
        raise WeightsFormatError(no_weights(path))
    return OrderedDict((f"{layer.module}.{role}", a) for layer in layers
                       for role, (_, a) in layer.tensors.items())


#: BatchNorms an exporter can fold into the convolution right before them (conv -> BN with
#: nothing between): the ImageNet stem's norm0 and a bottleneck layer's norm2. Every other
#: BatchNorm of a DenseNet follows a concatenation or a pooling.
FOLDABLE = (".norm0", ".norm2")


def _layer_kind(layer: OnnxLayer) -> str:
    if layer.op in ("BatchNormalization", DECOMPOSED_BN, SCALE_SHIFT_BN):
        return "bn"
    return "conv" if layer.tensors["weight"][1].ndim == 4 else "dense"


def unfold_batchnorm(config, layers: List[OnnxLayer], missing: Optional[List[str]] = None,
                     bias_required: bool = True, positions: Optional[List[Tuple[str, str]]] = None):
    """The ONNX layers as ``match.Layer``s against preset ``config``, with every BatchNorm an
    exporter folded into the convolution before it (where the preset has conv -> BatchNorm, the
    graph's conv feeds no BatchNormalization and has a bias: folding always leaves the folded
    shift there) put back as an identity BatchNorm in eval mode. A conv *without* a bias and no
    BatchNorm after it folded nothing: its BatchNorm is missing (a porting bug), and the match
    names it so (``missing``, if given, gets the canonical names of such BatchNorms: the graph
    tells them where shapes cannot, the stem's norm0 having the shape of the first layer's
    norm1). ``bias_required=False``: a bias-less conv is taken as folded too (how far the
    graph would match with its missing BatchNorms in place: which preset it is closest to). A Conv or Gemm without a
    bias where the preset has one gets a zero bias, and a zero bias where it has none is dropped
    (the same function in ONNX: optimizers drop zero biases) (scale 1, mean 0, variance 1 - eps, and the folded bias as its shift when the preset's
    convolution has none): the same function, so the weights load into our model and compute
    what the file computes. ``positions``, if given, gets (canonical BatchNorm, what the graph
    has there) for every conv -> BatchNorm position the walk reached: "bn" (a BatchNorm node on
    the conv's output), "bias" (folded: the conv has a bias) or "none" (neither: missing, or
    folded with a zero shift whose bias the exporter dropped; ``match_onnx`` tells which).
    Returns (layers, the canonical names of the folded BatchNorms)."""
    from densenet_weights import match as matching
    ref = matching.canonical_layers(config)
    out, folded, j = [], [], 0
    eps = ONNX_BN_DEFAULTS["epsilon"]
    for i, r in enumerate(ref):
        g = layers[j] if j < len(layers) else None
        prev = out[-1] if out else None
        last = layers[j - 1] if j else None  # the ONNX node behind ``prev``
        at_position = (r.kind == "bn" and r.name.endswith(FOLDABLE) and prev is not None
                       and prev.kind == "conv")
        fed = at_position and g is not None and _layer_kind(g) == "bn" and g.inputs[0] == last.output
        if at_position and positions is not None:
            positions.append((r.name, "bn" if fed else "bias" if "bias" in last.tensors
                              else "none"))
        if at_position and not fed and ("bias" in last.tensors or not bias_required):
            c = r.shapes()["weight"][0]
            bias = np.zeros(c, np.float32)
            if ("bias" in prev.tensors and "bias" not in ref[i - 1].tensors
                    and prev.shapes()["weight"][0] == c):
                bias = np.asarray(prev.tensors.pop("bias")[1], np.float32)
            name = f"{r.name} (folded into {prev.name})"
            out.append(matching.Layer("bn", name, OrderedDict([
                ("weight", (f"{name}.weight", np.ones(c, np.float32))),
                ("bias", (f"{name}.bias", bias)),
                ("running_mean", (f"{name}.running_mean", np.zeros(c, np.float32))),
                ("running_var", (f"{name}.running_var", np.full(c, 1 - eps, np.float32)))])))
            folded.append(r.name)
            continue
        if missing is not None and at_position and not fed:
            missing.append(r.name)  # a conv without a bias and no BatchNorm on its output
        if g is None:
            break
        tensors = OrderedDict((role, (f"{g.module}.{role}", a)) for role, (_, a) in g.tensors.items())
        if _layer_kind(g) == r.kind != "bn":  # in ONNX no bias is a zero bias: exact either way
            w = tensors["weight"][1]
            if "bias" in r.tensors and "bias" not in tensors:
                tensors["bias"] = (f"{g.module}.bias", np.zeros(w.shape[0], w.dtype))
            elif "bias" not in r.tensors and "bias" in tensors and not np.any(tensors["bias"][1]):
                del tensors["bias"]
        out.append(matching.Layer(_layer_kind(g), g.module, tensors))
        j += 1
    for g in layers[j:]:
        out.append(matching.Layer(_layer_kind(g), g.module, OrderedDict(
            (role, (f"{g.module}.{role}", a)) for role, (_, a) in g.tensors.items())))
    return out, folded


def match_onnx(layers: List[OnnxLayer], preset=None, **options):
    """Match an ONNX model's layers (``onnx_layers``) onto ``preset`` (None: every preset, with
    the input channels and classes the model shows, and conv biases or none), folded
    BatchNorms put back (``unfold_batchnorm``; a conv -> BatchNorm with neither a BatchNorm node
    nor a bias is folded where ``zero_shift_folds`` says so, else missing). Returns (match.Match,
    folded BatchNorms, the layers matched, whether the folds' zero biases were dropped): the full
    match with the fewest folded BatchNorms, else the closest."""
    import densenet_spec as spec
    from densenet_weights import match as matching
    convs = [g for g in layers if _layer_kind(g) == "conv"]
    dense = [g for g in layers if _layer_kind(g) == "dense"]
    seen: Dict[str, object] = {}
    if convs:
        seen["in_channels"] = int(convs[0].tensors["weight"][1].shape[1])
        if dense:
            seen["num_classes"] = int(dense[-1].tensors["weight"][1].shape[0])
    elif dense:  # Gemm layers only: an MLP DenseNet
        seen["in_features"] = int(dense[0].tensors["weight"][1].shape[1])
        seen["num_outputs"] = int(dense[-1].tensors["weight"][1].shape[0])
    seen.update(options)
    names = [preset] if preset is not None else spec.preset_names("conv" if convs else "mlp")
    best, best_folded, best_layers, best_score, best_zero = None, [], [], (0, 0), False
    for name in names:
        default = getattr(spec.get_preset(name), "conv_bias", None)  # the MLP family: none
        biases = ([options["conv_bias"]] if "conv_bias" in options else
                  [None] if default is None else [default, not default])
        for bias in biases:  # the preset's own first: a zero bias matches either
            try:
                p = spec.make_config(name, **dict(seen if preset is None else options,
                                                  **({} if bias is None else {"conv_bias": bias})))
            except spec.DenseNetConfigError:
                if preset is not None and "conv_bias" in options:
                    raise
                continue
            missing: List[str] = []
            mine, folded = unfold_batchnorm(p, layers, missing)
            zero, positions, loose = False, [], []
            if missing:  # every position read as folded: the walk stays in step with the graph
                loose, loose_folded = unfold_batchnorm(p, layers, bias_required=False,
                                                       positions=positions)
                if zero_shift_folds(positions, layers):
                    mine, folded, missing, zero = loose, loose_folded, [], True
            m = matching.match_layers(p, mine)
            score = (m.matched_layers, 0)
            if missing and not m.ok:  # the graph names the missing BatchNorm, shapes may not
                # the closest preset: the one the graph matches furthest with them in place
                score = (0, matching.match_layers(p, loose).matched_layers)
                order = [r.name for r in matching.canonical_layers(p)]
                at = order.index(missing[0])
                if at <= m.matched_layers:  # nothing from there on is matched
                    m.mapping = {c: f for c, f in m.mapping.items()
                                 if order.index(c.rsplit(".", 1)[0]) < at}
                    m.difference, m.matched_layers = matching.missing_difference(p, missing[0]), at
                    score = (at, score[1])
                    m.difference.arithmetic += missing_words(positions, layers)
                    # the folds the note says: the positions with a bias (the walk without
                    # the missing BatchNorm in place is out of step with the graph after it)
                    folded = [name for name, state in positions if state == "bias"]
            if m.ok and (best is None or not best.ok or len(folded) < len(best_folded)):
                best, best_folded, best_layers, best_score, best_zero = (
                    m, folded, mine, score, zero)
            elif best is None or (not best.ok and (max(score), score[0]) > (
                    max(best_score), best_score[0])):
                best, best_folded, best_layers, best_score, best_zero = (
                    m, folded, mine, score, zero)
    return best, best_folded, best_layers, best_zero


def _identity_bn(layer: OnnxLayer) -> bool:
    """A BatchNorm node that computes (nearly) nothing: scale 1, shift 0, mean 0, variance 1 (as
    PyTorch, Keras and Gluon initialise one; a scale of 1/sqrt(1 + eps) where the exporter
    folded the variance into it)."""
    t = {role: np.asarray(a, np.float64) for role, (_, a) in layer.tensors.items()}
    return (all(not np.any(t[k]) for k in ("bias", "running_mean") if k in t)
            and all(np.allclose(t[k], 1.0, rtol=0, atol=1e-4)
                    for k in ("weight", "running_var") if k in t))


def zero_shift_folds(positions: List[Tuple[str, str]], layers: List[OnnxLayer]) -> bool:
    """Whether the conv -> BatchNorm positions with neither a BatchNorm node nor a bias
    (``unfold_batchnorm``'s ``positions``) are BatchNorms an exporter folded whose zero shift it
    then dropped (torch.onnx's optimizer drops a zero bias), not BatchNorms a port left out. An
    exporter folds uniformly, every conv -> BatchNorm or none, and a folded shift is zero in every
    channel only where the BatchNorm was an identity (default-initialised): so every position
    has neither, there are at least two (one alone shows no pattern to go by), and every
    BatchNorm left in the file is an identity one too."""
    return (len(positions) >= 2 and all(state == "none" for _, state in positions)
            and all(_identity_bn(g) for g in layers if _layer_kind(g) == "bn"))


def missing_words(positions: List[Tuple[str, str]], layers: List[OnnxLayer]) -> str:
    """Why a conv -> BatchNorm position with neither a BatchNorm node nor a bias is read as a
    missing BatchNorm (appended to the difference's arithmetic): the evidence that applies."""
    kept = [name for name, state in positions if state != "none"]
    if kept:
        return (f"; not folded by an exporter: an exporter folds every conv -> BatchNorm of a "
                f"network or none, and {len(kept)} of this file's {len(positions)} keep theirs "
                "(a BatchNormalization node, or a folded bias on the conv) where this conv has "
                "neither")
    words = ("; not folded by an exporter: folding leaves the BatchNorm's shift as the conv's "
             "bias, and this conv has none")
    if len(positions) < 2:
        return words + (" (an exporter drops a bias only where it is zero, as folding an "
                        "identity BatchNorm leaves it; with one conv -> BatchNorm position in "
                        "the network the file shows no fold to go by)")
    return words + (" (an exporter drops a bias only where it is zero, as folding an identity "
                    "BatchNorm leaves it, and this file's other BatchNorms are not identities)")


def onnx_preset(info: Dict[str, object]):
    """The preset our exports record in their metadata (``densenet_suite.preset``), or None."""
    import json

    import densenet_spec as spec
    raw = info.get("metadata", {}).get("densenet_suite.preset")
    if not raw:
        return None
    try:
        return spec.validate(spec.Preset.from_dict(json.loads(raw)))
    except (TypeError, ValueError, KeyError):
        return None


def load(path, preset=None, **options) -> Loaded:
    """The file read once: its graph's layers matched onto ``preset`` (else the one our export
    recorded, else every preset), folded BatchNorms put back and said, every matched
    BatchNormalization node's settings (``node_settings``). A graph without weight-carrying
    nodes loads (its match says what is missing; ``layers`` is empty)."""
    model, layers, info = _graph(path)
    recorded = onnx_preset(info)
    m, folded, mine, zero = match_onnx(layers, preset if preset is not None else recorded,
                                       **options)
    tensors = OrderedDict((n, a) for g in mine for n, a in g.tensors.values())
    elementwise = {g.module for g in layers if g.op in (DECOMPOSED_BN, SCALE_SHIFT_BN)}
    written = [c.rsplit(".", 1)[0] for c, f in m.mapping.items()
               if c.endswith(".running_var") and f.rsplit(".", 1)[0] in elementwise]
    notes = ([layout_words(info["input_perm"])] if info["input_layout"] not in ("", "NCHW")
             else []) + ([folded_words(folded, zero)] if folded else []) + (
        [elementwise_words(written)] if written else [])
    return Loaded(path, FORMAT, LAYOUT, tensors, m, recorded, folded,
                  node_settings(layers, m.mapping), notes, info, layers, model)


def node_settings(layers: List[OnnxLayer], mapping: Dict[str, str]) -> Dict[str, dict]:
    """canonical BatchNorm module -> {"epsilon", "momentum" (ONNX's words: the share of the
    running statistics kept), "node", "training_mode"} for every BatchNormalization node the
    match placed, read from its attributes (ONNX's defaults where absent: 1e-5, 0.9)."""
    by_module = {g.module: g for g in layers if g.op == "BatchNormalization"}
    out = {}
    for cname, fname in mapping.items():
        if cname.endswith(".running_mean"):
            g = by_module.get(fname.rsplit(".", 1)[0])
            if g is not None:
                out[cname.rsplit(".", 1)[0]] = {
                    "epsilon": float(g.attributes["epsilon"]),
                    "momentum": float(g.attributes["momentum"]), "node": g.node,
                    "training_mode": int(g.attributes.get("training_mode", 0))}
    return out


def elementwise_words(modules: List[str]) -> str:
    """The note for BatchNorms written as elementwise ops (canonical names)."""
    short = [f[len("features."):] if f.startswith("features.") else f for f in modules]
    listed = ", ".join(short[:3]) + (f" and {len(short) - 3} more" if len(short) > 3 else "")
    return (f"BatchNorm written as elementwise ops (Sub, Mul, Add) by the exporter: "
            f"{len(modules)} BatchNorm(s) ({listed}) are read with the file's scale "
            "(gamma / sqrt(variance + eps)) as their weight and variance 1 - eps: eval mode "
            "computes the same; their own variance and epsilon are not in the file")


def folded_words(folded: List[str], zero_bias: bool = False) -> str:
    """The note for BatchNorms an exporter folded (canonical names); ``zero_bias``: their folded
    shift was zero and the exporter dropped the bias (``zero_shift_folds``)."""
    short = [f[len("features."):] if f.startswith("features.") else f for f in folded]
    listed = ", ".join(short[:4]) + (f" and {len(short) - 4} more" if len(short) > 4 else "")
    words = (f"BatchNorm folded into the convolutions by the exporter: {len(folded)} BatchNorm(s) "
             f"({listed}) are in the convolution before them and are written as identity "
             "BatchNorms (scale 1, mean 0, variance 1 - eps, the folded bias as the shift): eval "
             "mode computes the same; their running statistics are not in the file")
    if zero_bias:
        words += ("; their folded biases were zero and the exporter dropped them (none of those "
                  "convolutions has a bias, every BatchNorm left in the file is an identity): "
                  "what folding default-initialised BatchNorms (identities) gives, and from the "
                  "file indistinguishable from identity BatchNorms left out")
    return words
