"""Keras 3 (on its JAX backend) as a framework for check and convert: keras.applications'
DenseNet-121 is densenet121's architecture with its own BatchNorm settings, named; the book's
network ported to Keras is the book's; a Keras porting bug is named at its layer; our weights go
into keras.applications' DenseNet and back bit for bit; a Keras file becomes torch, Flax and
Gluon files that compute what Keras computed.

One keras.applications DenseNet-121 is built for the module (seconds to minutes of Keras'
symbolic build on a loaded machine) and shared; inputs are 64 px for it (its last dense block at
2x2: the float64 step is well conditioned there) and 32 px for the book.
"""
from __future__ import annotations

import functools
import os
import re

import numpy as np
import pytest

import densenet_spec as spec
from densenet_parity import check
from densenet_parity.backends import ROOT, make_backend
from densenet_parity.checking import random_state, subject_keras
from densenet_parity.convert import convert
from densenet_weights import files, formats
from parity_tests.conftest import need_mxnet

keras = subject_keras.import_keras()  # KERAS_BACKEND=jax unless set: keras is in the main env
SIZE = 64


@functools.lru_cache(maxsize=None)
def densenet121():
    return keras.applications.DenseNet121(weights=None, input_shape=(SIZE, SIZE, 3))


def test_keras_applications_densenet121_is_densenet121_with_its_batchnorm_settings():
    r = check(densenet121(), preset="densenet121", size=SIZE)
    text = r.render()
    assert r.framework == "keras" and r.structure is None, text
    assert r.totals["params"] == 7_978_856 == spec.total_counts(spec.get_preset("densenet121"))[0]
    assert not r.same and r.same_architecture, text
    assert text.endswith("Verdict: same architecture, different BatchNorm settings."), text
    bns = [m for m, kind, _ in spec.canonical_modules(spec.get_preset("densenet121")) if kind == "bn"]
    eps = [d for d in r.bn_settings if d["setting"] == "epsilon"]
    mom = [d for d in r.bn_settings if d["setting"] == "momentum"]
    assert len(r.bn_settings) == 2 * len(bns) == 242, text  # exactly these, nothing else
    assert [d["module"] for d in eps] == [d["module"] for d in mom] == bns
    assert all(d["model"] == 1.001e-5 and d["reference"] == 1e-5 for d in eps), eps[:2]
    assert all(abs(d["model"] - 0.01) < 1e-12 and d["reference"] == 0.1 for d in mom), mom[:2]
    assert eps[0]["foreign"] == "conv1_bn" and mom[-1]["foreign"] == "bn"
    assert "epsilon 1.001e-05, the reference 1e-05 — Keras applications' value" in text
    assert "momentum (PyTorch's words) 0.01, the reference 0.1" in text and "PyTorch's 0.01" in text
    assert "the logits before it are compared" in text  # keras.applications ends in a softmax
    # the settings change the numbers; with them in the reference, everything agrees
    assert r.numbers["bn_statistics"] > 1e-2 and r.numbers["gradients"] > 1e-6, text
    assert max(r.adjusted.values()) < 1e-6 and r.adjusted_first is None, text


def test_the_books_network_ported_to_keras_is_the_book_network():
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the check runs PyTorch's reference on one, then gives them back
    try:
        r = check(framework="keras", factory="parity_tests.own_models.book_keras:net",
                  path=str(ROOT), size=32)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    text = r.render()
    assert r.same and r.preset == "book" and not r.bn_settings, text
    assert set(r.numbers) == {"eval_logits", "train_loss", "gradients", "bn_statistics"}
    assert r.numbers["train_loss"] < 1e-12 and r.numbers["gradients"] < 1e-6, text  # float64
    assert any("biased batch variance" in n for n in r.notes), text
    assert text.endswith("Verdict: same network."), text


def test_a_keras_porting_bug_is_named_at_its_layer():
    """D2L's TensorFlow stem: padding='same' at stride 2 pads 2 before and 3 after."""
    r = check(framework="keras", factory="parity_tests.own_models.book_keras:stem_same_padding",
              path=str(ROOT), size=32)
    text = r.render()
    assert not r.same and not r.same_architecture and text.endswith("Verdict: different."), text
    assert (r.first["mode"], r.first["module"], r.first["stage"]) == (
        "eval", "features.conv0", "stem"), text
    assert re.search(r"conv2d(_\d+)?$", r.first["foreign"]), text
    assert "Keras' padding='same'" in r.first["convention"], text
    # the line of the user's code that built that layer (the first frame in the user's file)
    path = ROOT / "parity_tests" / "own_models" / "book_keras.py"
    line = 1 + path.read_text().splitlines().index(
        '        stem = [layers.Conv2D(64, kernel_size=7, strides=2, padding="same"), bn(), '
        'layers.ReLU(),')
    assert r.built_at == {r.first["foreign"]: f"{path}:{line}"}, r.built_at
    assert f"\n  built at {os.path.relpath(path)}:{line}\n  likely cause: " in text, text


def test_our_weights_into_keras_applications_and_back_bit_for_bit(tmp_path):
    cfg = spec.get_preset("densenet121")
    state = random_state(cfg, seed=3)
    files.save_state(state, str(tmp_path / "ours.safetensors"), cfg)
    convert(str(tmp_path / "ours.safetensors"), str(tmp_path / "ours.weights.h5"), to="keras")
    model = densenet121()
    model.load_weights(str(tmp_path / "ours.weights.h5"))  # Keras' own loader accepts it
    bn = model.get_layer("conv2_block1_0_bn")
    assert np.array_equal(bn.moving_variance.numpy(),
                          state["features.denseblock1.denselayer1.norm1.running_var"])
    assert np.array_equal(model.get_layer("conv1_conv").kernel.numpy(),
                          state["features.conv0.weight"].transpose(2, 3, 1, 0))
    model.save_weights(str(tmp_path / "back.weights.h5"))
    model.save(str(tmp_path / "back.keras"))
    for name in ("back.weights.h5", "back.keras"):
        assert formats.detect(tmp_path / name) == "keras"
        convert(str(tmp_path / name), str(tmp_path / f"{name}.safetensors"))
        again, _ = files.load_state(str(tmp_path / f"{name}.safetensors"))
        assert set(again) == set(state)
        assert all(again[k].dtype == state[k].dtype and np.array_equal(again[k], state[k])
                   for k in state)  # bit for bit


def test_a_keras_file_into_torch_flax_and_gluon_files_computes_what_keras_computed(tmp_path):
    cfg = spec.get_preset("densenet121")
    model = densenet121()
    subject = subject_keras.KerasSubject(model)
    # non-trivial weights in the Keras model (our random canonical ones: Keras would start its
    # running statistics at 0 and 1), under keras.applications' names
    subject.load(formats.native(random_state(cfg, seed=7), "keras")[1])
    rng = np.random.default_rng(5)
    model.save_weights(str(tmp_path / "keras.weights.h5"))
    x = rng.standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    expected = subject.run(x=x)["logits"]
    assert np.max(np.abs(expected)) > 0.1
    for to, name, backend in [("torch", "w.pth", "torch"), ("flax-nnx", "w.msgpack", "flax-nnx"),
                              ("mxnet", "w.params", "mxnet")]:
        if backend == "mxnet":
            need_mxnet()
        convert(str(tmp_path / "keras.weights.h5"), str(tmp_path / name), to=to)
        b = make_backend(backend)
        try:  # the framework's own loader reads the file into our model there
            state = b.call("load_native", config=cfg.to_dict(), path=str(tmp_path / name))["arrays"]
            got = b.call("forward", config=cfg.to_dict(), state=state, x=x)["arrays"]["head"]
        finally:
            b.close()
        rel = float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))
        assert rel < 1e-5, (to, rel)


def test_keras_weights_files_are_told_by_content(tmp_path):
    """A .weights.h5 is HDF5, a .keras archive a zip holding model.weights.h5 (torch.save's zip
    holds none); only the weights are read, the archive's config.json never."""
    import zipfile
    arrays = formats.native(random_state(spec.get_preset("book"), 0), "keras")[1]
    formats.write(tmp_path / "a.weights.h5", arrays, "keras")
    with zipfile.ZipFile(tmp_path / "a.keras", "w") as z:
        z.write(tmp_path / "a.weights.h5", "model.weights.h5")
        z.writestr("config.json", '{"class_name": "Lambda", "config": {"function": "evil"}}')
    for name in ("a.weights.h5", "a.keras"):
        fmt, back = formats.read(tmp_path / name)
        assert fmt == "keras" and sorted(back) == sorted(arrays)
        assert all(np.array_equal(back[k], arrays[k]) for k in arrays)
        # each class of layers in the model's order (the file keeps no order across classes)
        for leaf in ("kernel", "moving_mean"):
            assert [k for k in back if k.endswith(leaf)] == [k for k in arrays if k.endswith(leaf)]
    assert list(arrays)[:2] == ["conv1_conv/kernel", "conv1_conv/bias"]
    (tmp_path / "junk.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
    with pytest.raises(formats.WeightsFormatError, match="junk.h5"):
        formats.read(tmp_path / "junk.h5")


def test_the_factory_draws_its_initial_values_without_compiling_them(caplog):
    """While the user's factory runs, the JAX backend's random draws and its zeros and ones are
    NumPy's (subject_keras._numpy_initializers): Keras' own compile a program for each shape
    (keras.applications' DenseNet-201: 109 programs, about 8 s on this 2-core CPU) for values
    the check replaces before it compares a number. The model is built as Keras builds it (every
    variable's shape and dtype, a random kernel, BatchNorm's ones and zeros), no XLA program but
    Keras' own variable staging is compiled, and the backend's functions are its own again
    after."""
    import logging

    import jax
    keras = subject_keras.import_keras()
    from keras.src.backend.jax import numpy as backend_numpy, random as backend_random
    own = (backend_random.uniform, backend_random.normal, backend_random.truncated_normal,
           backend_numpy.zeros, backend_numpy.ones)

    def build():  # shapes no other test uses: nothing comes from a cache
        inp = keras.Input((5, 5, 2))
        x = keras.layers.BatchNormalization()(keras.layers.Conv2D(7, 3)(inp))
        x = keras.layers.Dense(3, kernel_initializer="he_normal")(keras.layers.Flatten()(x))
        return keras.Model(inp, keras.layers.Dense(11, kernel_initializer="truncated_normal")(x))
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        with subject_keras._numpy_initializers(keras):
            model = build()
    compiled = [r.getMessage() for r in caplog.records
                if "Finished XLA compilation of" in r.getMessage()]
    assert all("jit(stage)" in m for m in compiled), compiled
    assert (backend_random.uniform, backend_random.normal, backend_random.truncated_normal,
            backend_numpy.zeros, backend_numpy.ones) == own
    weights = [np.asarray(w.value) for w in model.weights]
    assert sorted(w.shape for w in weights) == sorted(
        [(3, 3, 2, 7), (7,), (7,), (7,), (7,), (7,), (63, 3), (3,), (3, 11), (11,)])
    assert all(w.dtype == np.float32 for w in weights)
    kernel = np.asarray(model.layers[1].kernel.value)  # Glorot uniform: within its limit
    assert np.std(kernel) > 0 and np.all(np.abs(kernel) <= np.sqrt(6 / (18 + 63)) + 1e-7)
    bn = [np.asarray(v.value) for v in model.layers[2].weights]
    assert np.all(bn[0] == 1) and np.all(bn[1] == 0) and np.all(bn[3] == 1)
    truncated = np.asarray(model.layers[-1].kernel.value)
    assert np.all(np.abs(truncated) <= 2 * 0.05 + 1e-7) and np.std(truncated) > 0
