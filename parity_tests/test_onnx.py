"""ONNX: ``densenet export`` (torch.onnx's dynamo exporter, proven in onnxruntime against the
frameworks' own outputs), ``densenet check model.onnx`` (structure from the graph, BatchNorm
settings from its nodes, numbers in onnxruntime, the first diverging node) and ONNX files through
``densenet convert``.

Small on purpose: the book at 32 px (64 px where the head's pooling kind matters), one export of
it shared by most tests, and one DenseNet-121 (torchvision's, at 64 px) for the folding an
exporter's optimizer does on a real network. The export's variants (dynamic size, old opsets,
the MLP family) are one export each, of a tiny configuration (one layer per block: every stage)
where the dynamo exporter's seconds go, of the book where the TorchScript exporter is cheap.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest

import densenet_spec as spec
from densenet_cli.main import main
from densenet_parity import convert
from densenet_parity import export as exporting
from densenet_parity.checking import check_weights, random_state
from densenet_weights import files, formats
from parity_tests.conftest import need_mxnet

torch = pytest.importorskip("torch", reason="the ONNX tests need torch (main environment)")
onnx = pytest.importorskip("onnx", reason="the ONNX tests need the onnx extra (`make env`)")
ort = pytest.importorskip("onnxruntime", reason="the ONNX tests need the onnx extra (`make env`)")

SIZE = 32


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def book_export(tmp_path_factory):
    """Our export of the book with random weights (seed 0), and the result of its proof."""
    dst = tmp_path_factory.mktemp("onnx") / "book.onnx"
    result = exporting.export("book", str(dst), size=SIZE)
    return dst, result


TINY = {"block_config": (1, 1), "num_init_features": 8, "growth_rate": 4}   # every stage, small
TINY_MLP = {"stem_widths": (16,), "block_config": (1, 1), "growth_rate": 8}
#: variant -> (source, the export's options, the input shapes it must run at). "tiny"/"mlp" are
#: canonical files of TINY/TINY_MLP; the shapes include ones the export's own proof did not run.
VARIANTS = {
    "dynamic-size": ("tiny", {"size": SIZE, "dynamic_size": True},
                     [(1, 1, 32, 32), (3, 1, 32, 32), (2, 1, 48, 40), (1, 1, 40, 56)]),
    "opset-13": ("book", {"size": SIZE, "opset": 13, "dynamic_size": True},
                 [(1, 1, 32, 32), (3, 1, 32, 32), (2, 1, 40, 56)]),
    "mlp": ("mlp", {}, [(1, 330), (5, 330)]),
    "mlp-opset-17": ("mlp", {"opset": 17}, [(1, 330), (5, 330)]),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """variant -> (path, config, canonical state, ExportResult): each exported once, when a test
    first asks for it."""
    folder = tmp_path_factory.mktemp("variants")
    sources = {"book": (spec.make_config("book"), None),
               "tiny": (spec.make_config("book", **TINY), None),
               "mlp": (spec.make_config("house_mlp", **TINY_MLP), None)}
    done = {}

    def get(variant):
        if variant not in done:
            source, options, _ = VARIANTS[variant]
            cfg, _ = sources[source]
            state = random_state(cfg, 0 if source == "book" else 3)
            src = source
            if source != "book":  # a canonical file records its configuration
                src = str(folder / f"{source}.safetensors")
                files.save_state(state, src, cfg)
            dst = folder / f"{variant}.onnx"
            done[variant] = (dst, cfg, state, exporting.export(src, str(dst), **options))
        return done[variant]
    return get


def _runs_as_our_model(path, cfg, state, shapes):
    """onnx's checker passes the file, and onnxruntime runs it at each shape and equals our
    PyTorch model with the same weights (float32, the export's tolerance)."""
    from densenet_torch import build
    from densenet_torch.state import load_state
    onnx.checker.check_model(str(path), full_check=True)
    model = build(cfg)
    load_state(model, state)
    model.eval()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(11)
    for shape in shapes:
        x = rng.standard_normal(shape).astype(np.float32)
        got = session.run(None, {session.get_inputs()[0].name: x})[0]
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        assert got.shape == want.shape, (shape, got.shape)
        rel = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
        assert rel <= exporting.EXPORT_RTOL, (path.name, shape, rel)


def _dims(path):
    """The file's input and output shapes: ints, symbolic axes by name."""
    m = onnx.load(str(path), load_external_data=False)
    return [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in (m.graph.input[0], m.graph.output[0])], m


def _torch_onnx(model, path, size, channels=1, nhwc=False):
    """What a user does: torch.onnx.export(..., dynamo=True) with its defaults (optimizer on);
    ``nhwc``: the model takes (N, H, W, C) (a Transpose to NCHW at the input)."""
    import contextlib
    import io
    import warnings
    shape = (1, size, size, channels) if nhwc else (1, channels, size, size)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(*shape),), str(path), dynamo=True)
    return path


def _randomised(model, config, seed=0):
    """random_state's canonical weights (non-trivial BatchNorm statistics) in a model with any
    names, placed by the structure match."""
    from densenet_weights import match
    sd = model.state_dict()
    m = match.match({k: v.numpy() for k, v in sd.items()}, config)
    assert m.ok, m.difference
    state = random_state(config, seed)
    with torch.no_grad():
        for canon, mine in m.mapping.items():
            sd[mine].copy_(torch.from_numpy(state[canon]))
    return model


def test_export_is_proven_and_writes_external_data(book_export, capsys):
    dst, result = book_export
    assert result.ok
    assert set(result.proof) == {"torch"} and 0 <= result.proof["torch"] <= exporting.EXPORT_RTOL
    text = result.render()
    assert "Verdict: the export computes the same network." in text
    assert f"{dst.name}.data" in text and "keep them side by side" in text
    assert (dst.parent / f"{dst.name}.data").exists()
    # every BatchNorm kept as a node, with PyTorch's settings in ONNX's words
    layers, info = formats.onnx_layers(dst)
    n_bn = sum(1 for _, kind, _ in spec.canonical_modules(spec.make_config("book")) if kind == "bn")
    assert info["ops"]["BatchNormalization"] == n_bn
    assert {(round(g.attributes["epsilon"], 9), round(g.attributes["momentum"], 6)) for g in layers
            if g.op == "BatchNormalization"} == {(1e-5, 0.9)}


def test_the_default_export_has_a_dynamic_batch_axis(book_export):
    """An exported DenseNet serves any batch: the batch axis is symbolic (height and width stay
    fixed), the proof ran at batch 1 and 2, and onnxruntime at batch 3 equals our model too."""
    import json
    dst, result = book_export
    (inp, out), m = _dims(dst)
    assert inp == ["batch", 1, SIZE, SIZE] and out == ["batch", 10], (inp, out)
    assert result.dynamic == ["batch"] and result.exporter == "dynamo" and not result.checker
    assert [(name, shape[0]) for name, shape, _ in result.proofs] == [("torch", 1), ("torch", 2)]
    assert "input batch x 1 x 32 x 32 (NCHW; dynamic: batch), opset 20" in result.render()
    meta = json.loads({p.key: p.value for p in m.metadata_props}["densenet_suite.export"])
    assert meta == {"exporter": "dynamo", "opset": None, "dynamic": ["batch"],
                    "example_input": [1, 1, SIZE, SIZE]}
    _runs_as_our_model(dst, spec.make_config("book"), random_state(spec.make_config("book"), 0),
                       [(1, 1, SIZE, SIZE), (3, 1, SIZE, SIZE)])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_variants_run_at_every_shape_they_claim(exported, variant):
    """--dynamic-size (height and width symbolic), --opset 13 and 17 (the TorchScript exporter,
    every BatchNorm still a node), the MLP family: onnx's checker passes, onnxruntime at two
    batch sizes (and two sizes) equals our PyTorch model, the opset is the one asked, and
    `densenet check` of the file says it is the same network."""
    path, cfg, state, result = exported(variant)
    _, options, shapes = VARIANTS[variant]
    assert result.ok, result.render()
    (inp, out), m = _dims(path)
    opset = {o.domain or "ai.onnx": o.version for o in m.opset_import}["ai.onnx"]
    assert opset == options.get("opset", result.opset) and (opset >= 18) == (result.exporter ==
                                                                             "dynamo"), opset
    if "opset" in options:
        assert result.exporter == "torchscript" and result.opset == options["opset"]
    want = (["batch", 1, "height", "width"] if options.get("dynamic_size") else
            ["batch", cfg.in_features])
    assert inp == want and out[0] == "batch", inp
    n_bn = sum(1 for _, kind, _ in spec.canonical_modules(cfg) if kind == "bn")
    assert result.ops["BatchNormalization"] == n_bn and not any("folded" in n for n in result.notes)
    assert len({tuple(shape) for _, shape, _ in result.proofs}) == (3 if "dynamic_size" in options
                                                                    else 2)
    _runs_as_our_model(path, cfg, state, shapes)
    report = check_weights(str(path), size=SIZE if cfg.family == "conv" else None)
    text = report.render()
    assert report.same and text.endswith("Verdict: same network."), text
    assert "dynamic: batch" in text and "folded" not in text, text


def test_keras_weights_export_and_every_format_has_a_source(tmp_path, capsys):
    """A Keras weights file exports (it crashed: no source backend for Keras), proven in our
    PyTorch model; here at opset 17 with a fixed batch (the TorchScript exporter: cheap).
    Every format the weights read has a backend to prove it in."""
    assert set(formats.FORMATS) <= set(exporting.SOURCE_BACKEND)
    fmt, arrays = formats.native(random_state(spec.make_config("book"), 4), "keras")
    src = tmp_path / "book.weights.h5"
    formats.write(src, arrays, fmt)
    dst = tmp_path / "book.onnx"
    code, out, err = run(capsys, "export", str(src), str(dst), "--size", str(SIZE), "--opset",
                         "17", "--fixed-batch")
    assert code == 0, out + err
    assert f"(weights: {src}, keras) -> {dst}, input 1x1x32x32 (NCHW; fixed), opset 17, torch.onnx " \
           "TorchScript exporter" in out, out
    assert "Keras has no mirror here: the file's weights are proven in our PyTorch model" in out
    assert "Verdict: the export computes the same network." in out
    assert _dims(dst)[0][0] == [1, 1, SIZE, SIZE]
    state, _ = convert.read_checkpoint(str(src))
    _runs_as_our_model(dst, spec.make_config("book"), state, [(1, 1, SIZE, SIZE)])
    session = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="invalid dimensions for input"):  # fixed: batch 2 refused
        session.run(None, {"x": np.zeros((2, 1, SIZE, SIZE), np.float32)})
    mlp = spec.make_config("house_mlp", **TINY_MLP)
    files.save_state(random_state(mlp, 0), str(tmp_path / "mlp.safetensors"), mlp)
    code, _, err = run(capsys, "export", str(tmp_path / "mlp.safetensors"), str(tmp_path / "m.onnx"),
                       "--dynamic-size")
    assert code == 2 and "--dynamic-size: DenseNet 'house_mlp' is an MLP DenseNet, its input is " \
                         "(N, features) with 330 features: no height or width" in err, err


def test_a_broken_export_fails_the_proof(book_export, tmp_path, capsys, monkeypatch):
    """The proof can fail: an export whose one initializer was patched exits 1, naming it."""
    src, _ = book_export

    def patched(model, x, dst, cfg, opset=None, dynamic=()):
        m = onnx.load(str(src))
        for t in m.graph.initializer:
            if t.name == "classifier.bias":
                a = onnx.numpy_helper.to_array(t).copy()
                a[0] += 0.5
                t.CopyFrom(onnx.numpy_helper.from_array(a, t.name))
        onnx.save(m, dst, save_as_external_data=True, location=f"{tmp_path.name}.data")
        return "dynamo"

    monkeypatch.setattr(exporting, "write_onnx", patched)
    code, out, _ = run(capsys, "export", "book", str(tmp_path / "broken.onnx"), "--size", str(SIZE))
    assert code == 1, out
    assert "DIFFERENT" in out and "does NOT compute the same network" in out


@pytest.mark.parametrize("target, suffix", [("flax-nnx", ".msgpack"), ("mxnet", ".params")])
def test_export_from_a_gluon_or_flax_file_is_proven_against_that_framework(tmp_path, capsys,
                                                                          target, suffix):
    """The proof runs the file in each framework at both batch sizes. The exporter is the
    TorchScript one (--opset 17: 0.2 s, where the dynamo one takes seconds): which exporter
    wrote the file does not change the proof, and the dynamo one is proven on the book above."""
    if target == "mxnet":
        need_mxnet()
    cfg = spec.make_config("book")
    fmt, arrays = formats.native(random_state(cfg, 3), target)
    src = tmp_path / f"book{suffix}"
    formats.write(src, arrays, fmt)
    code, out, _ = run(capsys, "export", str(src), str(tmp_path / "book.onnx"), "--preset", "book",
                       "--size", str(SIZE), "--opset", "17")
    assert code == 0, out
    rows = [line.split() for line in out.splitlines() if line.startswith("  ") and "tolerance" in line]
    assert [(r[0], r[1]) for r in rows] == [(name, f"{b}x1x{SIZE}x{SIZE}") for name in
                                            ("torch", target) for b in (1, 2)], out
    assert all(r[-1] == "ok" for r in rows), out  # both batch sizes, in each framework
    assert all(float(r[2]) <= exporting.EXPORT_RTOL for r in rows)
    assert "Verdict: the export computes the same network." in out


def test_check_our_export_is_the_same_network(book_export, capsys):
    dst, _ = book_export
    code, out, _ = run(capsys, "check", str(dst))
    assert code == 0, out
    assert "against preset 'book'" in out and "Verdict: same network." in out
    assert "folded" not in out
    assert "book.onnx.data" in out  # weights read from the external data file
    # its batch axis is symbolic: read as such, run at the check's batch
    assert "the file's input is batch x 1 x 32 x 32 (dynamic: batch): checked at 2x1x32x32" in out
    code, _, err = run(capsys, "check", str(dst), "--size", "48")
    assert code == 2 and "the file's input is batch x 1 x 32 x 32, its height and width fixed " \
                         "(NCHW: 32x32 pixels): --size 48 cannot run it" in err, err


def test_onnx_converts_losslessly_into_every_framework(book_export, tmp_path, capsys):
    """Our export keeps every BatchNorm: ONNX -> torch, Gluon, Flax files carry the exported
    weights bit for bit."""
    dst, _ = book_export
    want = random_state(spec.make_config("book"), 0)
    for to, suffix in (("torch", ".pth"), ("mxnet", ".params"), ("flax-linen", ".msgpack")):
        out_path = tmp_path / f"m{suffix}"
        code, out, _ = run(capsys, "convert", str(dst), str(out_path), "--to", to)
        assert code == 0, out
        state, cfg = convert.read_checkpoint(str(out_path), "book")
        assert set(state) == set(want)
        assert all(np.array_equal(state[k], want[k]) for k in want), to


def test_convert_and_check_read_the_file_once(book_export, tmp_path, capsys, monkeypatch):
    """`densenet convert` and `densenet check` of an ONNX file tell its format once and load
    the model once (formats.load: the check runs the graph it read)."""
    dst, _ = book_export
    calls = {"detect": 0, "onnx.load": 0}

    def counted(key, f):
        def run_counted(*args, **kwargs):
            calls[key] += 1
            return f(*args, **kwargs)
        return run_counted

    monkeypatch.setattr(formats, "detect", counted("detect", formats.detect))
    monkeypatch.setattr(onnx, "load", counted("onnx.load", onnx.load))
    for argv in (("convert", dst, tmp_path / "m.pth", "--to", "torch"), ("check", dst)):
        code, out, _ = run(capsys, *map(str, argv))
        assert code == 0, out
        assert calls == {"detect": 1, "onnx.load": 1}, (argv, calls)
        calls.update({"detect": 0, "onnx.load": 0})


def test_missing_external_data_is_a_clear_error(book_export, tmp_path, capsys):
    dst, _ = book_export
    lone = tmp_path / "lone.onnx"
    shutil.copy(dst, lone)  # without book.onnx.data beside it
    code, _, err = run(capsys, "check", str(lone))
    assert code == 2
    assert "external data file 'book.onnx.data'" in err and "Traceback" not in err
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(dst.read_bytes()[:5000])  # a truncated model
    for argv in (("check", cut), ("convert", cut, tmp_path / "x.pth", "--to", "torch"),
                 ("export", cut, tmp_path / "x.onnx")):
        code, _, err = run(capsys, *map(str, argv))
        assert code == 2 and "not a readable ONNX model" in err, (argv, err)
    for opset in ("3", "12", str(onnx.defs.onnx_opset_version() + 1)):
        code, _, err = run(capsys, "export", "book", str(tmp_path / "x.onnx"), "--opset", opset)
        assert code == 2 and f"--opset must be 13 to {onnx.defs.onnx_opset_version()}" in err \
            and f"got {opset}" in err and "Traceback" not in err, err
    with pytest.raises(exporting.ExportError, match="--opset 12: the export writes opset 13 to"):
        exporting.export("book", str(tmp_path / "x.onnx"), opset=12)


def test_onnxruntime_optimized_model_is_recognised_as_folded(book_export, tmp_path, capsys):
    """onnxruntime's saved optimized model folds the stem's BatchNorm into conv0 (and fuses the
    ReLU): recognised, said, and still the same network."""
    dst, _ = book_export
    for f in (dst, dst.parent / f"{dst.name}.data"):  # it refers to the export's data file
        shutil.copy(f, tmp_path / f.name)
    opt = tmp_path / "opt.onnx"
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(opt)
    ort.InferenceSession(str(tmp_path / dst.name), so, providers=["CPUExecutionProvider"])
    report = check_weights(str(opt))
    assert report.same, report.render()
    text = report.render()
    assert "BatchNorm folded into the convolutions by the exporter" in text and "(norm0)" in text
    assert "com.microsoft.FusedConv" in text
    # convert puts the folded BatchNorm back as an identity BatchNorm and says so
    code, out, _ = run(capsys, "convert", str(opt), str(tmp_path / "opt.pth"), "--to", "torch")
    assert code == 0 and "identity BatchNorms" in out


def test_bn_epsilon_difference_is_named(tmp_path):
    from densenet_torch import build
    from densenet_torch.state import load_state
    cfg = spec.make_config("book")
    model = build(cfg)
    load_state(model, random_state(cfg, 0))
    model.features.denseblock2.denselayer1.norm1.eps = 1e-3
    path = _torch_onnx(model, tmp_path / "eps.onnx", SIZE)
    report = check_weights(str(path))
    assert not report.same
    assert report.verdict == "same architecture, different BatchNorm settings", report.render()
    [d] = report.bn_settings
    assert d["module"] == "features.denseblock2.denselayer1.norm1" and d["setting"] == "epsilon"
    assert d["model"] == pytest.approx(1e-3) and d["reference"] == pytest.approx(1e-5)
    assert report.numbers["eval_logits"] > 1e-5 >= report.adjusted["eval_logits"]
    assert report.first["module"] == "features.denseblock2.denselayer1.norm1"
    assert "epsilon, 0.001" in report.first["convention"]
    assert "epsilon=0.001, momentum=0.9" in report.render()


def test_porting_bugs_exported_by_torch_onnx_are_named(tmp_path):
    from parity_tests.own_models import book_torch
    cfg = spec.make_config("book")
    head = _torch_onnx(_randomised(book_torch.head_max_pool(), cfg), tmp_path / "max.onnx", 64)
    report = check_weights(str(head))
    assert report.verdict == "different", report.render()
    assert report.first["module"] == "classifier" and "average" in report.first["convention"]
    trans = _torch_onnx(book_torch.transition_keeps_block_input(), tmp_path / "t.onnx", SIZE)
    report = check_weights(str(trans), preset="book")
    assert report.structure and "transition2" in report.structure, report.render()
    assert "transition" in (report.cause or "")
    # an ONNX graph has no construction site: nothing is said of one
    assert report.built_at == {} and "built at" not in report.render()


def test_a_batchnorm_dropped_after_a_conv_without_bias_is_missing_not_folded(tmp_path):
    """A port whose stem BatchNorm was dropped, written by torch.onnx: its conv0 has no bias and
    feeds no BatchNormalization. Folding always leaves the BatchNorm's shift as the conv's
    bias, so this is a missing BatchNorm, named at its place, never "folded" (a tiny config:
    one layer per block)."""
    from torch import nn

    from densenet_torch.model import DenseNet
    cfg = spec.make_config("book", conv_bias=False, block_config=(1, 1), num_init_features=8,
                           growth_rate=4)
    torch.manual_seed(0)
    model = DenseNet.from_preset(cfg)
    model.features.norm0 = nn.Identity()
    path = _torch_onnx(model, tmp_path / "no_norm0.onnx", 32)
    report = check_weights(str(path), preset=cfg)
    text = report.render()
    assert not report.same and "BatchNorm folded into" not in text, text
    assert [r["state"] for r in report.rows][:2] == [0, None], text  # norm0: not in the file
    assert report.structure.startswith(
        "first difference at features.norm0 (stem): the model has no BatchNorm after the stem's "
        "7x7 conv (the reference's norm0: a BatchNorm over 8 channels)"), text
    # its one conv -> BatchNorm position shows no fold to go by: read as missing, and said why
    assert report.structure.endswith(
        "not folded by an exporter: folding leaves the BatchNorm's shift as the conv's bias, and "
        "this conv has none (an exporter drops a bias only where it is zero, as folding an "
        "identity BatchNorm leaves it; with one conv -> BatchNorm position in the network the "
        "file shows no fold to go by)"), text
    assert report.cause.startswith("a BatchNorm left out of the port (the stem is"), text


#: a bottleneck DenseNet (DenseNet-121's kind: norm0 and every layer's norm2 follow a conv), one
#: layer per block: three conv -> BatchNorm positions
TINY_BC = {"block_config": (1, 1), "num_init_features": 8, "growth_rate": 4, "bn_size": 2,
           "num_classes": 5}


@pytest.fixture(scope="module")
def default_init_bc(tmp_path_factory):
    """TINY_BC at PyTorch's default init (every BatchNorm an identity: scale 1, shift 0, mean 0,
    variance 1) through torch.onnx's defaults: its optimizer folds norm0 and both norm2s into
    the convs before them, each fold's shift is zero, and it drops the zero biases: three
    bias-less convs with no BatchNorm after them, as torchvision's default DenseNet-121 gives."""
    from densenet_torch.model import DenseNet
    cfg = spec.make_config("densenet121", **TINY_BC)
    torch.manual_seed(0)
    path = _torch_onnx(DenseNet.from_preset(cfg), tmp_path_factory.mktemp("bc") / "bc.onnx",
                       SIZE, channels=3)
    m = onnx.load(str(path))
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    assert all(len(n.input) == 2 for n in convs)  # no conv has a bias: the case this is about
    assert sum(n.op_type == "BatchNormalization" for n in m.graph.node) == 4  # 7 less 3 folded
    return path, cfg, m


def test_uniform_folds_with_dropped_zero_biases_are_the_same_network(default_init_bc):
    """Every conv -> BatchNorm position has neither a BatchNorm node nor a bias, and every
    BatchNorm left is an identity: the exporter folded them all (it folds all or none) and
    dropped the zero biases. Read as folded, said so, and the numbers agree in onnxruntime."""
    path, cfg, _ = default_init_bc
    report = check_weights(str(path), preset=cfg)
    text = report.render()
    assert report.same and report.verdict == "same network", text
    assert "BatchNorm folded into the convolutions by the exporter: 3 BatchNorm(s) (norm0, " \
        "denseblock1.denselayer1.norm2, denseblock2.denselayer1.norm2)" in text, text
    assert "their folded biases were zero and the exporter dropped them" in text
    assert "indistinguishable from identity BatchNorms left out" in text
    assert "not folded by an exporter" not in text and report.numbers["eval_logits"] <= 1e-5


def test_a_bias_less_conv_among_kept_batchnorms_is_missing(default_init_bc, tmp_path):
    """The same file edited as a port's bugs would leave it, each still named "missing" with
    the evidence that applies: (a) denselayer1's conv1 carries a bias (its norm2 folded with a
    shift) while norm0's and the other norm2's convs have neither: an exporter folds all or
    none, so those are missing; (b) no conv has a bias but a BatchNorm left in the file is not
    an identity: a folded shift is zero in every channel only for an identity BatchNorm."""
    from onnx import numpy_helper
    _, cfg, m = default_init_bc
    mixed = onnx.ModelProto()
    mixed.CopyFrom(m)
    conv1 = [n for n in mixed.graph.node if n.op_type == "Conv"][1]  # denselayer1.conv1
    mixed.graph.initializer.append(numpy_helper.from_array(np.full(8, 0.25, np.float32), "b1"))
    conv1.input.append("b1")
    trained = onnx.ModelProto()
    trained.CopyFrom(m)
    scale = next(n for n in trained.graph.node if n.op_type == "BatchNormalization").input[1]
    t = next(t for t in trained.graph.initializer if t.name == scale)
    t.CopyFrom(numpy_helper.from_array(np.full(numpy_helper.to_array(t).shape, 2, np.float32),
                                       scale))
    for model, name, folds, why in (
            (mixed, "mixed.onnx", "1 BatchNorm(s) (denseblock1.denselayer1.norm2) are in the",
             "not folded by an exporter: an exporter folds every conv -> "
             "BatchNorm of a network or none, and 1 of this file's 3 keep theirs (a "
             "BatchNormalization node, or a folded bias on the conv) where this conv has "
             "neither"),
            (trained, "trained.onnx", None, "not folded by an exporter: folding leaves the BatchNorm's "
             "shift as the conv's bias, and this conv has none (an exporter drops a bias only "
             "where it is zero, as folding an identity BatchNorm leaves it, and this file's "
             "other BatchNorms are not identities)")):
        onnx.save(model, str(tmp_path / name))
        report = check_weights(str(tmp_path / name), preset=cfg)
        text = report.render()
        assert not report.same and "their folded biases were zero" not in text, text
        # the folds said are those with a bias, the only ones the file shows
        assert (folds in text) if folds else "BatchNorm folded into" not in text, text
        assert report.structure.startswith(
            "first difference at features.norm0 (stem): the model has no BatchNorm after the "
            "stem's 7x7 conv"), text
        assert report.structure.endswith(why), text
        assert report.cause.startswith("a BatchNorm left out of the port"), text


def test_torchvision_densenet121_exported_by_torch_onnx(tmp_path):
    """torchvision's DenseNet-121 through torch.onnx's defaults: its optimizer folds norm0 and
    every bottleneck's norm2 (59 BatchNorms) into the convolutions before them; recognised, and
    the same network in onnxruntime as our DenseNet-121 with the file's weights."""
    from benchmarks.common import import_torchvision
    tv = import_torchvision()
    assert tv is not None, "torchvision is in the test extra (pyproject.toml)"
    cfg = spec.make_config("densenet121")
    model = tv.models.densenet121(weights=None)
    state = random_state(cfg, 0)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    path = _torch_onnx(model, tmp_path / "tv121.onnx", 64, channels=3)
    report = check_weights(str(path))
    assert report.same and report.preset == "densenet121", report.render()
    assert "59 BatchNorm(s) (norm0, denseblock1.denselayer1.norm2" in report.render()


def test_default_initialised_export_with_shared_initializers(tmp_path):
    """At PyTorch's default init every BatchNorm has scale 1, shift 0, mean 0, variance 1:
    torch.onnx's optimizer deduplicates those tensors (one initializer feeds many nodes, as
    scale of one and variance of another) and folds norm0. The graph still gives every
    initializer its role."""
    from densenet_torch import build
    path = _torch_onnx(build("book"), tmp_path / "default.onnx", SIZE)
    m = onnx.load(str(path), load_external_data=False)
    bn_inputs = [i for n in m.graph.node if n.op_type == "BatchNormalization" for i in n.input[1:]]
    assert len(set(bn_inputs)) < len(bn_inputs)  # shared: the case this test is about
    report = check_weights(str(path))
    assert report.same, report.render()
    assert "(norm0)" in report.render()


def test_matmul_add_head_and_anonymous_initializers(book_export, tmp_path):
    """Other exporters (tf2onnx's Keras graphs) write the dense layer as MatMul + Add with an
    [in, out] kernel and name initializers anything: the graph still gives each its role."""
    from onnx import helper, numpy_helper
    dst, _ = book_export
    m = onnx.load(str(dst))
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    [gemm] = [n for n in g.node if n.op_type == "Gemm"]
    w = numpy_helper.to_array(inits[gemm.input[1]])
    w = w if helper.get_attribute_value(next(a for a in gemm.attribute if a.name == "transB")) == 0 \
        else w.T  # -> [in, out]
    g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w), "kernel_in_out"))
    i = list(g.node).index(gemm)
    g.node.remove(gemm)
    g.node.insert(i, helper.make_node("MatMul", [gemm.input[0], "kernel_in_out"], ["mm"]))
    g.node.insert(i + 1, helper.make_node("Add", ["mm", gemm.input[2]], [gemm.output[0]]))
    renamed = {}
    for k, t in enumerate(g.initializer):  # anonymous names, as folding exporters write them
        renamed[t.name] = f"initializer_{k}"
        t.name = renamed[t.name]
    for n in g.node:
        n.input[:] = [renamed.get(x, x) for x in n.input]
    for k, n in enumerate(g.node):
        n.name = f"n{k}"
        del n.metadata_props[:]
    path = tmp_path / "matmul.onnx"
    onnx.save(m, str(path))
    report = check_weights(str(path))
    assert report.same and report.preset == "book", report.render()
    state, _ = convert.read_checkpoint(str(path))
    want = random_state(spec.make_config("book"), 0)
    assert all(np.array_equal(state[k], want[k]) for k in want)


# --- NHWC files: TensorFlow's layout, as tf2onnx writes a Keras model ---------------------------

class _ChannelsLast(torch.nn.Module):
    """A model that takes NHWC input: ``x.permute(0, 3, 1, 2)``, then the NCHW network."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x.permute(0, 3, 1, 2))


@pytest.fixture(scope="module")
def nhwc_export(tmp_path_factory):
    """(a) what tf2onnx's optimizer leaves of a conv net: one Transpose at the input, then an
    NCHW body. The book (random_state seed 0) behind a permute, torch.onnx's defaults (its
    optimizer folds norm0); the source model too."""
    from densenet_torch import build
    from densenet_torch.state import load_state
    cfg = spec.make_config("book")
    net = build(cfg)
    load_state(net, random_state(cfg, 0))
    model = _ChannelsLast(net).eval()
    path = _torch_onnx(model, tmp_path_factory.mktemp("nhwc") / "nhwc.onnx", SIZE, nhwc=True)
    return path, model


def _unoptimised_tf2onnx(src, dst, keras3=False):
    """(b) an unoptimised tf2onnx graph, from our NCHW export: the input NHWC; a Transpose to
    NCHW before every Conv, BatchNormalization and pool and one back to NHWC after it (a conv
    feeding its BatchNorm through the pair); Relu in NHWC, Concat on axis 3, ReduceMean over
    axes [1, 2] without keepdims; each conv kernel a Transpose of an HWIO constant; Keras' head,
    MatMul with an [in, out] kernel + Add. ``keras3``: as Keras 3's ONNX export (torch backend)
    writes it: every BatchNorm but norm0 elementwise on the NHWC tensor, Sub(mean),
    Mul(scale / sqrt(var + eps)), Add(shift), a Cast after each, and a Softmax after the logits.
    Returns the rewritten file."""
    from onnx import helper, numpy_helper
    m = onnx.load(str(src))
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    # our export's batch axis is dynamic: its flatten reads the batch from Shape nodes. tf2onnx
    # writes a constant shape, [-1, features]: so here, and the Shape nodes go unused.
    features = next(numpy_helper.to_array(inits[n.input[1]]).shape[1] for n in g.node
                    if n.op_type == "Gemm")
    g.initializer.append(numpy_helper.from_array(np.array([-1, features], np.int64), "flat_shape"))
    for node in g.node:
        if node.op_type == "Reshape":
            node.input[1] = "flat_shape"
    used, live = {o.name for o in g.output}, []
    for node in reversed(list(g.node)):
        if any(o in used for o in node.output):
            live.append(node)
            used.update(node.input)
    del g.node[:]
    g.node.extend(reversed(live))
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
    x = g.input[0]
    n_, c_, h_, w_ = (d.dim_value or d.dim_param for d in x.type.tensor_type.shape.dim)
    x_name = x.name
    g.input.remove(x)
    g.input.insert(0, helper.make_tensor_value_info(x_name, onnx.TensorProto.FLOAT,
                                                    [n_, h_, w_, c_]))
    nodes, nchw_ops = [], ("Conv", "BatchNormalization", "MaxPool", "AveragePool")
    def cast(value):  # Keras 3's torch export puts a Cast (to float) after most ops
        nodes.append(helper.make_node("Cast", [value], [f"{value}_cast"], to=1))
        return f"{value}_cast"

    first_bn = next(n for n in g.node if n.op_type == "BatchNormalization")
    for k, node in enumerate(g.node):
        if keras3 and node.op_type == "BatchNormalization" and node is not first_bn:
            scale, shift, mean, var = (numpy_helper.to_array(inits[i]) for i in node.input[1:])
            eps = next(a.f for a in node.attribute if a.name == "epsilon")
            for name, a in ((f"bn{k}_mean", mean), (f"bn{k}_scale", scale / np.sqrt(var + eps)),
                            (f"bn{k}_shift", shift)):
                g.initializer.append(numpy_helper.from_array(a.astype(np.float32), name))
            nodes.append(helper.make_node("Sub", [node.input[0], f"bn{k}_mean"], [f"bn{k}_c"]))
            nodes.append(helper.make_node("Mul", [cast(f"bn{k}_c"), f"bn{k}_scale"], [f"bn{k}_s"]))
            nodes.append(helper.make_node("Add", [cast(f"bn{k}_s"), f"bn{k}_shift"], node.output))
        elif node.op_type in nchw_ops:
            inner_in, inner_out = f"t{k}_in", f"t{k}_out"
            nodes.append(helper.make_node("Transpose", [node.input[0]], [inner_in],
                                          perm=[0, 3, 1, 2]))
            if node.op_type == "Conv":
                w = numpy_helper.to_array(inits[node.input[1]])
                g.initializer.remove(inits[node.input[1]])
                g.initializer.append(numpy_helper.from_array(
                    np.ascontiguousarray(w.transpose(2, 3, 1, 0)), f"{node.input[1]}_hwio"))
                nodes.append(helper.make_node("Transpose", [f"{node.input[1]}_hwio"],
                                              [node.input[1]], perm=[3, 2, 0, 1]))
            out = node.output[0]
            node.input[0], node.output[0] = inner_in, inner_out
            nodes += [node, helper.make_node("Transpose", [inner_out], [out], perm=[0, 2, 3, 1])]
        elif node.op_type == "Concat":
            node.attribute.remove(next(a for a in node.attribute if a.name == "axis"))
            node.attribute.append(helper.make_attribute("axis", 3))
            nodes.append(node)
        elif node.op_type == "ReduceMean":
            g.initializer.append(numpy_helper.from_array(np.array([1, 2], np.int64), "axes_hw"))
            nodes.append(helper.make_node("ReduceMean", [node.input[0], "axes_hw"],
                                          node.output, keepdims=0))
        elif node.op_type == "Gemm":
            w = numpy_helper.to_array(inits[node.input[1]])  # [out, in] (transB=1)
            g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T), "dense_kernel"))
            nodes.append(helper.make_node("MatMul", [node.input[0], "dense_kernel"], ["dense_mm"]))
            if keras3:
                nodes += [helper.make_node("Add", [cast("dense_mm"), node.input[2]], ["dense"]),
                          helper.make_node("Softmax", [cast("dense")], node.output, axis=-1)]
            else:
                nodes.append(helper.make_node("Add", ["dense_mm", node.input[2]], node.output))
        else:
            assert node.op_type in ("Relu", "Reshape", "Constant"), node.op_type
            nodes.append(node)
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    assert not consts or all(c in {i for n in nodes for i in n.input} for c in consts)
    onnx.save(m, str(dst))
    return dst


def _proven_rewrite(src, dst, keras3=False):
    """The rewrite, proven first: it computes in onnxruntime what our export does on the same
    input transposed to NHWC (``keras3``: the softmax of it)."""
    dst = _unoptimised_tf2onnx(src, dst, keras3)
    x = np.random.default_rng(5).standard_normal((1, 1, SIZE, SIZE)).astype(np.float32)
    run_file = lambda p, a: ort.InferenceSession(  # noqa: E731
        str(p), providers=["CPUExecutionProvider"]).run(None, {"x": a})[0]
    want, got = run_file(src, x), run_file(dst, np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
    if keras3:
        want = np.exp(want - want.max()) / np.exp(want - want.max()).sum()
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want)), "the rewrite is wrong"
    ops = {n.op_type for n in onnx.load(str(dst)).graph.node}
    assert {"Transpose", "MatMul"} <= ops and "Gemm" not in ops
    assert (ops >= {"Sub", "Mul", "Cast", "Softmax"}) == keras3
    return dst


@pytest.fixture(scope="module")
def tf2onnx_style(book_export, tmp_path_factory):
    """(b), proven in onnxruntime."""
    return _proven_rewrite(book_export[0], tmp_path_factory.mktemp("tf2onnx") / "tf2onnx.onnx")


def test_nhwc_file_is_the_same_network_with_its_layout_said(nhwc_export, capsys):
    """(a) The check reads the layout from the graph, runs the file at its own NHWC shape (not
    "64x3 is too small"), feeds onnxruntime NHWC data and says so; --size as the file's works,
    another is one clear usage error naming the layout."""
    path, _ = nhwc_export
    code, out, err = run(capsys, "check", str(path))
    assert code == 0, out + err
    assert "Verdict: same network." in out and "too small" not in out + err
    assert f"input 1x{SIZE}x{SIZE}x1 (NHWC, a Transpose to NCHW at the input)" in out
    assert "note: input layout NHWC (a Transpose to NCHW at the input" in out
    assert "the file is fed our model's NCHW input transposed to NHWC" in out
    assert "(norm0)" in out  # torch.onnx's optimizer folded it; still found
    code, out, _ = run(capsys, "check", str(path), "--size", str(SIZE))
    assert code == 0 and "Verdict: same network." in out, out
    code, out, err = run(capsys, "check", str(path), "--size", str(2 * SIZE))
    assert code == 2 and "Traceback" not in err, out + err
    assert f"input is 1x{SIZE}x{SIZE}x1, its height and width fixed (NHWC: {SIZE}x{SIZE} pixels): --size {2 * SIZE}" in err


def test_nhwc_file_converts_to_the_source_models_numbers(nhwc_export, tmp_path, capsys):
    """`densenet convert` of the NHWC file: our PyTorch model with the weights it wrote (norm0
    put back as an identity BatchNorm) computes on NCHW input what the source model computes on
    the same input as NHWC."""
    from densenet_torch import build
    path, model = nhwc_export
    dst = tmp_path / "from_nhwc.pth"
    code, out, err = run(capsys, "convert", str(path), str(dst), "--to", "torch")
    assert code == 0 and "note: input layout NHWC (a Transpose to NCHW at the input" in out, out
    net = build("book").eval()
    net.load_state_dict(torch.load(dst, weights_only=True))
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((2, 1, SIZE, SIZE))
                         .astype(np.float32))
    with torch.no_grad():
        want, got = model(x.permute(0, 2, 3, 1)).numpy(), net(x).numpy()
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))


def test_unoptimised_tf2onnx_graph_is_the_same_network(tf2onnx_style, capsys):
    """(b) Transposes around every Conv, BatchNorm and pool, NHWC Concat and ReduceMean, kernels
    transposed from HWIO, a MatMul head: the same network, norm0 found behind the conv's
    Transpose pair (not "folded"), and every weight back in PyTorch's layout bit for bit."""
    report = check_weights(str(tf2onnx_style))
    text = report.render()
    assert report.same and report.preset == "book", text
    assert "folded" not in text and "input layout NHWC (a Transpose to NCHW" in text
    assert report.input_shape[1:] == [SIZE, SIZE, 1]  # the batch axis is dynamic
    state, _ = convert.read_checkpoint(str(tf2onnx_style))
    want = random_state(spec.make_config("book"), 0)
    assert set(state) == set(want) and all(np.array_equal(state[k], want[k]) for k in want)


def test_an_input_transpose_to_another_layout_is_one_clear_error(nhwc_export, tmp_path, capsys):
    """A Transpose at the input whose perm makes neither NCHW nor NHWC (here the input's height
    and width swapped: NWHC) is refused by check and convert, naming what it found and what is
    read."""
    src, _ = nhwc_export
    m = onnx.load(str(src))
    [t] = [n for n in m.graph.node if n.op_type == "Transpose"]
    t.attribute[0].ints[:] = [0, 3, 2, 1]
    bad = tmp_path / "nwhc.onnx"
    onnx.save(m, str(bad))
    for argv in (("check", bad), ("convert", bad, tmp_path / "x.pth", "--to", "torch")):
        code, out, err = run(capsys, *map(str, argv))
        assert code == 2 and "Traceback" not in err, (argv, out + err)
        assert "through Transpose perm [0, 3, 2, 1]: an input laid out NWHC" in err, err
        assert "NHWC (a Transpose with perm [0, 3, 1, 2] first" in err, err


def test_keras3_export_style_elementwise_batchnorms_and_softmax(book_export, tmp_path):
    """Keras 3's ONNX export (torch backend; docs/onnx.md has a real DenseNet-121's): BatchNorms
    as Sub, Mul, Add on the NHWC tensor (their epsilon and variance in the scale) are read as
    BatchNorms, the logits before the Softmax are compared: the same network. One
    concatenation's order swapped is named at the (elementwise) BatchNorm after it: its NHWC
    output is compared as NCHW."""
    src, _ = book_export
    path = _proven_rewrite(src, tmp_path / "keras3.onnx", keras3=True)
    report = check_weights(str(path))
    text = report.render()
    assert report.same and report.preset == "book", text
    assert "the file ends in a Softmax" in text and "input layout NHWC" in text
    assert "20 BatchNorm(s) (denseblock1.denselayer1.norm1, " in text, text
    state, _ = convert.read_checkpoint(str(path))
    want = random_state(spec.make_config("book"), 0)
    convs = [k for k in want if ".conv" in k or k.startswith("classifier")]
    assert all(np.array_equal(state[k], want[k]) for k in convs)
    m = onnx.load(str(path))  # a porting bug: one concatenation's order swapped
    concat = [n for n in m.graph.node if n.op_type == "Concat"][5]  # denseblock2.denselayer2's
    concat.input[:] = list(concat.input)[::-1]
    onnx.save(m, str(tmp_path / "keras3_bad.onnx"))
    report = check_weights(str(tmp_path / "keras3_bad.onnx"))
    first = report.first
    assert report.verdict == "different", report.render()
    assert first["module"] == "features.denseblock2.denselayer3.norm1", report.render()
    assert "Sub+Mul+Add" in first["foreign"] and 0 < first["rel"] < 10, report.render()
