"""Check your own DenseNet: structure matching of any framework's tensors onto a preset, and
``densenet check`` / ``assert_same_densenet`` on the book's listings as a reader types them
(each must be the 'book' network) and on versions with a porting bug (each must be named at the
right stage and layer, with its likely cause). The models are in parity_tests/own_models/.

Inputs are small (the book at 32 px where the head's pooling kind does not matter, 64 px where
it does: the last block must be larger than 1x1 for max and average pooling to differ).
"""
from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

import densenet_spec as spec
from densenet_parity import assert_same_densenet, check
from densenet_parity.backends import ROOT
from densenet_weights import match
from parity_tests.conftest import cli_env, need_mxnet

torch = pytest.importorskip("torch", reason="the check tests need torch (main environment)")


def factory(module, fn):
    return f"parity_tests.own_models.{module}:{fn}"


def built_line(module, marker, after=None):
    """'FILE:LINE' (absolute) of the first line of parity_tests/own_models/<module>.py that holds
    ``marker`` (after the first line holding ``after``): read from the source, so that an edit of
    the file moves the expected line with it."""
    path = ROOT / "parity_tests" / "own_models" / f"{module}.py"
    lines = path.read_text().splitlines()
    start = next(i for i, text in enumerate(lines) if after in text) if after else 0
    line = next(i for i, text in enumerate(lines) if i >= start and marker in text) + 1
    return f"{path}:{line}"


def shown(site):
    """A site as the report prints it: relative to the working directory when under it."""
    import os
    path, line = site.rsplit(":", 1)
    rel = os.path.relpath(path)
    return f"{path if rel.startswith('..') else rel}:{line}"


# ------------------------------------------------------------------ structure matching

def test_the_books_sequential_matches_by_structure():
    from parity_tests.own_models import book_torch
    sd = book_torch.net().state_dict()
    m = match.match({k: v.numpy() for k, v in sd.items()})
    assert m.ok and m.config.name == "book" and not m.by_name
    assert m.mapping["features.conv0.weight"] == "0.0.weight"
    assert m.mapping["features.denseblock1.denselayer1.norm1.running_var"] == "1.net.0.0.running_var"
    assert m.mapping["features.denseblock2.denselayer4.conv1.bias"] == "3.net.3.2.bias"
    assert m.mapping["features.transition1.conv.weight"] == "2.2.weight"
    assert m.mapping["features.norm5.weight"] == "8.weight"
    assert m.mapping["classifier.bias"] == "12.bias"
    assert len(m.state) == len(spec.canonical_tensors(m.config))
    assert all(np.array_equal(m.state[c], sd[f].numpy()) for c, f in m.mapping.items())


def _linen_style(config):
    """The preset's tensors as a linen Sequential would name them (layers_0, layers_1, ...;
    params and batch_stats apart; HWIO kernels), sorted by name as JAX's trees are."""
    out = {}
    for i, (module, kind, leaves) in enumerate(spec.canonical_modules(config)):
        for leaf, shape in leaves.items():
            if kind == "bn":
                name = {"weight": "params/{}/scale", "bias": "params/{}/bias",
                        "running_mean": "batch_stats/{}/mean", "running_var": "batch_stats/{}/var"}[leaf]
            else:
                name = "params/{}/" + ("kernel" if leaf == "weight" else "bias")
                if leaf == "weight":
                    shape = (shape[2], shape[3], shape[1], shape[0]) if len(shape) == 4 else shape[::-1]
            out[name.format(f"net/layers_{i}")] = np.full(shape, i, np.float32)
    return dict(sorted(out.items()))


def test_flax_names_match_in_natural_order():
    """layers_10 comes after layers_9: sorted by name (as JAX sorts trees) the layers are out
    of order, and only the natural order matches them."""
    cfg = spec.get_preset("book")
    tensors = _linen_style(cfg)
    m = match.match(tensors, "book", layout="flax", natural=True)
    assert m.ok, m.difference
    modules = [mod for mod, _, _ in spec.canonical_modules(cfg)]
    assert all(float(m.state[f"{mod}.{leaf}"].flat[0]) == i for i, mod in enumerate(modules)
               for leaf in ("weight",))
    assert m.state["features.conv0.weight"].shape == (64, 1, 7, 7)  # HWIO -> OIHW
    assert not match.match(tensors, "book", layout="flax", natural=False).ok


def test_canonical_names_in_any_framework_map_by_name():
    cfg = spec.get_preset("densenet121")
    shapes = {n: s for n, s, _ in spec.canonical_tensors(cfg)}
    m = match.match(shapes)
    assert m.ok and m.by_name and m.config.name == "densenet121" and m.state is None


def test_a_wrong_transition_is_named_with_its_channel_arithmetic():
    from parity_tests.own_models import book_torch
    sd = book_torch.transition_keeps_block_input().state_dict()
    m = match.match({k: tuple(v.shape) for k, v in sd.items()}, "book")
    d = m.difference
    assert (d.module, d.stage, d.kind, d.foreign) == ("features.transition2.conv", "transition2",
                                                      "conv", "4.2")
    assert "the model has a 1x1 convolution 224 -> 96 channels" in str(d)
    assert "transition2.conv maps 224 -> 112 = (96 + 4 x 32) // 2 channels" in str(d)


def test_a_missing_layer_is_named():
    """A dense block with one layer too few (names not canonical: matched by structure)."""
    cfg = spec.get_preset("book")
    shapes = {n.replace("features.", "f."): s for n, s, _ in spec.canonical_tensors(cfg)
              if not n.startswith("features.denseblock3.denselayer4.")}
    m = match.match(shapes, "book")
    assert not m.ok and m.difference.module == "features.denseblock3.denselayer4.norm1"
    assert m.difference.change == "missing"  # named as missing, not as a BatchNorm's other width
    assert ("the model has no BatchNorm before denseblock3.denselayer4's 3x3 conv (the "
            "reference's denseblock3.denselayer4.norm1: a BatchNorm over 208 channels)"
            in str(m.difference)), str(m.difference)
    assert ("the model's next BatchNorm (its 'f.transition3.norm') is the reference's next one"
            in str(m.difference)), str(m.difference)
    assert "over 240 channels" not in str(m.difference)
    assert "208 = 112 + 3 x 32" in str(m.difference)


def test_a_missing_batchnorm_is_named_missing_at_its_place():
    """The book's PyTorch listing with transition1's BatchNorm left out: named as a missing
    BatchNorm before transition1's 1x1 conv (not as the next BatchNorm's other width), with
    the transition's recipe as the cause; an extra BatchNorm is named as extra."""
    from torch import nn

    from parity_tests.own_models import book_torch
    r = check(book_torch.transition_without_batchnorm(), preset="book")
    assert not r.same and r.numbers == {}, r.render()  # named before any number
    # a model given as an object was built before the check ran: no line, and no words for it
    assert r.built_at == {} and "built at" not in r.render() and "notes" not in r.render()
    assert r.structure.startswith(
        "first difference at features.transition1.norm (transition1): the model has no BatchNorm "
        "before transition1's 1x1 conv (the reference's transition1.norm: a BatchNorm over 192 "
        "channels)"), r.structure
    assert "the model has a BatchNorm over 96 channels" not in r.structure
    assert "192 = 64 + 4 x 32 channels" in r.structure
    assert r.cause == ("a BatchNorm left out of the port (the transition is BatchNorm-ReLU-1x1 "
                       "conv-2x2 average pool)"), r.cause
    extra = book_torch.net()
    extra[2].insert(0, nn.BatchNorm2d(192))  # a second BatchNorm before transition1's
    m = match.match({k: tuple(v.shape) for k, v in extra.state_dict().items()}, "book")
    assert m.difference.change == "extra", str(m.difference)
    assert "the model has an extra layer, a BatchNorm over 192 channels (its '2.0')" in str(
        m.difference), str(m.difference)
    from densenet_parity.checking import likely_structural_cause
    assert likely_structural_cause(spec.get_preset("book"), m.difference).startswith(
        "an extra BatchNorm in the port")


# ------------------------------------------------------------------ densenet check

SAME = [("torch", "book_torch", "net", 32), ("mxnet", "book_gluon", "net", 32),
        ("flax", "book_linen", "net", 32)]
#: (framework, module, function, size, where: 'structure' or the mode, canonical module, stage,
#:  words of the likely cause, (the function the layer is built in, words on its line))
BUGS = [
    ("torch", "book_torch", "transition_keeps_block_input", 32, "structure",
     "features.transition2.conv", "transition2", "num_convs x growth_rate",
     ("def transition_block", "nn.Conv2d(input_channels, num_channels, kernel_size=1)")),
    ("flax", "book_linen", "stem_same_padding", 32, "eval", "features.conv0", "stem",
     "padding of the stem", ("class DenseNet", "nn.Conv(self.num_channels, kernel_size=(7, 7)")),
    ("torch", "book_torch", "head_max_pool", 64, "eval", "classifier", "head",
     "global *average* pooling", ("def net", "nn.Linear(num_channels, 10)")),
    ("mxnet", "book_gluon", "concat_reversed", 32, "eval", "features.denseblock1.denselayer2.norm1",
     "denseblock1", "concatenation order", ("def conv_block", "nn.BatchNorm(momentum=momentum)")),
    ("flax", "book_linen", "head_pools_nchw_axes", 32, "structure", "classifier", "head",
     "NHWC's axes 1 and 2", ("class DenseNet", "nn.Dense(self.num_classes)")),
]


@pytest.mark.parametrize("framework, module, fn, size", SAME, ids=[c[0] for c in SAME])
def test_the_books_listings_are_the_book_network(framework, module, fn, size):
    if framework == "mxnet":
        need_mxnet()
    r = check(framework=framework, factory=factory(module, fn), path=str(ROOT), size=size)
    assert r.same, r.render()
    assert r.preset == "book" and r.output_shape == [2, 10]
    assert r.totals["params"] == spec.total_counts(spec.get_preset("book"))[0]
    assert set(r.numbers) == {"eval_logits", "train_loss", "gradients", "bn_statistics"}
    assert r.render().endswith("Verdict: same network.")
    if framework == "flax":  # linen's BatchNorm: the biased running variance, accepted and said
        assert any("biased batch variance" in n for n in r.notes)


@pytest.mark.parametrize("framework, module, fn, size, where, cmod, stage, words, built", BUGS,
                         ids=[c[2] for c in BUGS])
def test_a_porting_bug_is_named_where_it_is(framework, module, fn, size, where, cmod, stage, words,
                                            built):
    """... and the layer it names with the line of the user's code that built it: the first
    frame in the user's file while the factory (linen: its initialisation) ran."""
    if framework == "mxnet":
        need_mxnet()
    r = check(framework=framework, factory=factory(module, fn), path=str(ROOT), size=size)
    text = r.render()
    assert not r.same and text.endswith("Verdict: different."), text
    site = built_line(module, built[1], after=built[0])
    if where == "structure":
        assert r.structure and f"first difference at {cmod} ({stage})" in r.structure, text
        assert words in (r.cause or ""), text
        # the stage of the difference and the ones before it are counted; later ones, which
        # matching never reached, say so instead of showing a count of zero
        at = [row["stage"] for row in r.rows].index(stage)
        assert all(row["params"] is not None for row in r.rows[:at + 1]), text
        assert all(row["params"] is None and not row["ok"] for row in r.rows[at + 1:]), text
        assert (not r.rows[at + 1:]) or "not matched" in text, text
        foreign = r.structure_foreign
        assert foreign and f"(its '{foreign}')" in r.structure and r.built_at == {foreign: site}
        said = f"the model's '{foreign}' built at {shown(site)}"
        assert f"\n  {said}\n  likely cause: " in text, text  # beside the difference
        assert re.search(rf"^{stage} .* DIFFERENT +{re.escape(said)}$", text, re.M), text  # table
    else:
        assert r.first and (r.first["mode"], r.first["module"], r.first["stage"]) == \
            (where, cmod, stage), text
        assert words in r.first["convention"], text
        assert r.built_at == {r.first["foreign"]: site}, (r.built_at, site)
        assert (f"the model's '{r.first['foreign']}': largest difference" in text and
                f"\n  built at {shown(site)}\n  likely cause: " in text), text
        assert "notes" not in text.split("\n")[3], text  # no structural note: no notes column


#: (framework, module, function, setting, the model's value in PyTorch's words, the reference's,
#:  words of the report, (where and what the line that built the first BatchNorm, norm0, says))
SETTINGS = [
    ("torch", "book_torch", "bn_momentum_as_gluon", "momentum", 0.9, 0.1, "'keep 0.9' typed into",
     ("def net", "nn.BatchNorm2d(64, momentum=bn_momentum)")),
    ("torch", "book_torch", "bn_eps_as_keras", "epsilon", 1.001e-5, 1e-5, "Keras applications'",
     ("def net", "nn.BatchNorm2d(64, momentum=bn_momentum)")),
    ("flax", "book_nnx", "bn_momentum_default", "momentum", 0.01, 0.1, "PyTorch's 0.01",
     ("class DenseNet", "self.bn0 = nnx.BatchNorm(64, rngs=rngs)")),
    ("mxnet", "book_gluon", "bn_momentum_as_torch", "momentum", 0.9, 0.1, "keeps 0.1 of the",
     ("def net", "nn.BatchNorm(momentum=momentum)")),
]


@pytest.mark.parametrize("framework, module, fn, setting, value, reference, words, built",
                         SETTINGS, ids=[c[2] for c in SETTINGS])
def test_batchnorm_settings_are_read_and_named(framework, module, fn, setting, value, reference,
                                               words, built):
    """Each BatchNorm's epsilon and momentum are read from the model's layers and every
    difference named before any number (the first with the line of the user's code that built
    it); with the model's settings in the reference the numbers agree: the same architecture,
    different BatchNorm settings."""
    if framework == "mxnet":
        need_mxnet()
    r = check(framework=framework, factory=factory(module, fn), path=str(ROOT), size=32)
    text = r.render()
    bns = [m for m, kind, _ in spec.canonical_modules(spec.get_preset("book")) if kind == "bn"]
    assert not r.same and r.same_architecture, text
    assert text.endswith("Verdict: same architecture, different BatchNorm settings."), text
    assert [d["module"] for d in r.bn_settings] == bns, text  # every BatchNorm, in order
    assert all((d["setting"], d["reference"]) == (setting, reference) for d in r.bn_settings)
    assert all(abs(d["model"] - value) < 1e-9 for d in r.bn_settings), text
    assert words in text and text.index("BATCHNORM SETTINGS") < text.index("Numbers"), text
    assert r.adjusted and max(r.adjusted.values()) <= 1e-6 and r.adjusted_first is None, text
    assert max(r.numbers.values()) > 1e-6, text  # the settings change the numbers
    assert "dropout" not in text, text
    norm0 = r.bn_settings[0]["foreign"]
    site = built_line(module, built[1], after=built[0])
    assert r.built_at[norm0] == site, (r.built_at, site)
    assert f"features.norm0 (the model's '{norm0}', built at {shown(site)}) and 20 more " \
           "BatchNorms: " in text, text


def test_batchnorm_settings_do_not_excuse_another_bug():
    r = check(framework="torch", factory=factory("book_torch", "head_max_pool_and_bn_momentum_as_gluon"),
              path=str(ROOT), size=64)
    text = r.render()
    assert r.bn_settings and not r.same_architecture and text.endswith("Verdict: different."), text
    assert r.adjusted_first and r.adjusted_first["module"] == "classifier", text
    assert "global *average* pooling" in r.adjusted_first["convention"], text


#: (framework, module name, its source, words the usage error must say, the line it must name)
BAD_INPUT = [
    ("torch", "bad_syntax", "import torch\n\n\ndef net(:\n    pass\n", "does not import", 4,
     "SyntaxError"),
    ("flax", "bad_import", "import jax\nimport tensorflow_is_not_here\n\n\ndef net():\n    "
     "return None\n", "does not import", 2, "No module named 'tensorflow_is_not_here'"),
    ("torch", "bad_factory", "def net():\n    return unknown_layer(3)\n", "net() raised", 2,
     "NameError"),
    ("mxnet", "not_a_model", "\n\ndef net():\n    return [1, 2]\n", "returned list, not a "
     "mxnet.gluon.Block", 3, ""),
    ("keras", "not_a_keras_model", "def net():\n    return 3\n", "returned int, not a "
     "keras.Model", 1, ""),
]


@pytest.mark.parametrize("framework, name, source, words, line, error", BAD_INPUT,
                         ids=[c[1] for c in BAD_INPUT])
def test_a_module_that_does_not_give_a_model_is_a_usage_error(tmp_path, framework, name, source,
                                                              words, line, error):
    """A user's module that does not import, a factory that raises or returns no model: a usage
    error naming the file and the line (the Gluon one from the MXNet environment's worker)."""
    from densenet_parity import CheckError
    if framework == "mxnet":
        need_mxnet()
    (tmp_path / f"{name}.py").write_text(source)
    with pytest.raises(CheckError) as e:
        check(framework=framework, factory=f"{name}:net", path=str(tmp_path), size=32)
    assert words in str(e.value) and f"{tmp_path / name}.py:{line}" in str(e.value), str(e.value)
    assert error in str(e.value), str(e.value)


def test_the_check_command_exits_2_on_a_module_that_does_not_import(tmp_path):
    (tmp_path / "typo.py").write_text("import torch\nfrom torch import nn\n\nnet = nn.Sequential(\n")
    r = subprocess.run([sys.executable, "-m", "densenet_cli", "check", "--framework", "torch",
                        "typo:net"], cwd=tmp_path, env=cli_env(), capture_output=True, text=True)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert f"{tmp_path / 'typo.py'}:4" in r.stderr and "SyntaxError" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr


def test_a_failed_probe_leaves_no_trace_for_the_next(tmp_path):
    """Gluon infers the input channels: the check tries 1, then 3. The model zoo's DenseNet-121
    at 64 px fails both for its head's fixed 7x7 pool, and each try is on a model built afresh:
    the report names the pool and 224 px, not a [64,1,7,7] weight the first try left behind."""
    need_mxnet()
    (tmp_path / "zoo121.py").write_text("from mxnet.gluon.model_zoo import vision\n\n\n"
                                        "def net():\n    return vision.densenet121(pretrained=False)\n")
    r = check(framework="mxnet", factory="zoo121:net", path=str(tmp_path), size=64)
    assert not r.same and r.error, r.render()
    assert "[64,1,7,7]" not in r.error and "kernel size (7) exceeds input (2" in r.error, r.error
    assert "it runs on 224x224" in r.error and "AvgPool2D(pool_size=7)" in r.error, r.error


def test_a_model_that_cannot_run_is_a_clear_report():
    r = check(framework="flax", factory=factory("book_linen", "concat_on_axis_1"),
              path=str(ROOT), size=32)
    assert not r.same and r.error and "does not initialise on a 32x32 input" in r.error
    assert "Cannot concatenate arrays" in r.error


def test_assert_same_densenet_in_a_users_tests():
    from parity_tests.own_models import book_torch
    report = assert_same_densenet(book_torch.net(), preset="book", size=32)
    assert report.same
    with pytest.raises(AssertionError) as e:
        assert_same_densenet(book_torch.head_max_pool(), preset="book", size=64)
    assert "FIRST DIFFERENCE (eval): classifier (head)" in str(e.value)
    with pytest.raises(ValueError, match="but the model is a torch model"):
        assert_same_densenet(book_torch.net(), framework="flax")


def test_a_layer_our_code_built_has_no_line(tmp_path):
    """The user's line is the first frame in the user's files. A layer this project's own code
    built (our model, given back by a factory) has none: the user's line would be the call of
    our builder, the same for every layer, and the layer is the reference's own. A layer the
    user's factory put into our model has the user's line."""
    from densenet_torch import adapter
    (tmp_path / "own_and_ours.py").write_text(
        "from torch import nn\nfrom densenet_torch.model import book\n\n\n"
        "def plain():\n    return book()\n\n\n"
        "def patched():\n    model = book()\n"
        "    model.features.transition2.conv = nn.Conv2d(224, 96, kernel_size=1)  # the user's\n"
        "    return model\n")
    line = 1 + (tmp_path / "own_and_ours.py").read_text().splitlines().index(
        "    model.features.transition2.conv = nn.Conv2d(224, 96, kernel_size=1)  # the user's")
    site = f"{tmp_path / 'own_and_ours.py'}:{line}"
    plain = adapter.user_model(factory="own_and_ours:plain", path=str(tmp_path))
    assert adapter.model_sites(plain) == {}
    patched = adapter.user_model(factory="own_and_ours:patched", path=str(tmp_path))
    assert adapter.model_sites(patched) == {"features.transition2.conv": site}
    r = check(framework="torch", factory="own_and_ours:patched", path=str(tmp_path), size=32)
    assert r.structure_foreign == "features.transition2.conv" and r.built_at == {
        "features.transition2.conv": site}, r.render()
    assert f"built at {shown(site)}" in r.render()


def test_a_linen_module_given_with_its_variables_has_its_lines(tmp_path):
    """linen builds its submodules as it runs: with the factory's own variables, the lines are
    recorded by tracing an initialisation (never computed), named by their paths."""
    from densenet_flax import adapter
    source = ("import jax\nimport jax.numpy as jnp\nfrom flax import linen as nn\n\n\n"
              "class Tiny(nn.Module):\n    @nn.compact\n    def __call__(self, x):\n"
              "        x = nn.Conv(4, (3, 3))(x)\n"
              "        return nn.Dense(2)(jnp.mean(x, axis=(1, 2)))\n\n\n"
              "def with_variables():\n    m = Tiny()\n"
              "    return m, m.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))\n")
    (tmp_path / "tiny_linen.py").write_text(source)
    lines = source.splitlines()
    at = {marker: f"{tmp_path / 'tiny_linen.py'}:{1 + next(i for i, t in enumerate(lines) if marker in t)}"
          for marker in ("nn.Conv(4", "nn.Dense(2)", "m = Tiny()")}
    model = adapter.user_model(factory="tiny_linen:with_variables", path=str(tmp_path), size=8)
    assert adapter.model_sites(model) == {"": at["m = Tiny()"], "Conv_0": at["nn.Conv(4"],
                                          "Dense_0": at["nn.Dense(2)"]}


class _Layer:
    def __init__(self, *args):
        self.args = args


class _Users(_Layer):
    def __init__(self):
        super().__init__(1)  # a method of the object being built: not the line wanted


class _Bare(_Layer):
    pass


def test_construction_sites_are_the_users_frames_and_every_hook_is_undone():
    from densenet_spec import sites
    original = _Layer.__init__
    with pytest.raises(RuntimeError, match="the factory failed"):
        with sites.recording([(_Layer, "__init__", "self"), (_Bare, "__init__", "self")]) as rec:
            users, line = _Users(), sys._getframe().f_lineno
            bare, line_bare = _Bare(), sys._getframe().f_lineno
            raise RuntimeError("the factory failed")
    assert vars(_Layer)["__init__"] is original and "__init__" not in vars(_Bare)  # undone
    assert rec.of(users) == f"{__file__}:{line}" and rec.of(bare) == f"{__file__}:{line_bare}"
    assert rec.of(_Layer()) is None  # built after the recording
    assert (sites.whose(__file__), sites.whose(spec.__file__), sites.whose(np.__file__),
            sites.whose(re.__file__), sites.whose("<string>")) == (
                "user", "ours", "library", "library", "library")


def test_the_check_command(tmp_path):
    """densenet check: 0 same network, 1 different, 2 a usage error; --json for machines."""
    def run(*args):
        return subprocess.run([sys.executable, "-m", "densenet_cli", "check", *args], cwd=ROOT,
                              env=cli_env(), capture_output=True, text=True)
    out = tmp_path / "r.json"
    same = run("--framework", "torch", factory("book_torch", "net"), "--size", "32", "--json", str(out))
    assert same.returncode == 0, same.stderr
    assert "Verdict: same network." in same.stdout and "denseblock4" in same.stdout
    report = json.loads(out.read_text())
    assert report["verdict"] == "same network"
    # where the time went: every phase of the check, summing to its total (the rest: "other")
    t = report["timings"]
    assert {"model", "structure", "reference", "bn_settings", "weights", "eval_model",
            "eval_reference", "train_model", "train_reference", "other"} == set(t["phases"])
    assert all(v >= 0 for v in t["phases"].values()) and t["compilation"] == 0  # torch: none
    assert abs(sum(t["phases"].values()) - t["total"]) < 0.01 + 1e-3 * len(t["phases"])
    assert t["phases"]["model"] > 0 and t["phases"]["train_model"] > 0
    bad = run("--framework", "torch", factory("book_torch", "transition_keeps_block_input"))
    assert bad.returncode == 1 and "STRUCTURE: first difference at features.transition2.conv" \
        in bad.stdout
    for args, words in [((factory("book_torch", "net"),), "--framework"),
                        (("--framework", "torch", "nowhere:net"), "no module 'nowhere'"),
                        (("--framework", "torch", factory("book_torch", "nothing")),
                         "has no function 'nothing'"),
                        (("--framework", "jax", "m:f"), "invalid choice")]:
        r = run(*args)
        assert r.returncode == 2 and words in r.stderr, (args, r.stderr)


def test_the_step_runs_at_the_default_size_and_a_fixed_size_model_at_its_own(tmp_path):
    """Above the preset's default size the train-mode step runs at that default (the eval-mode
    comparison at the size asked for; the report says so); a model that runs at one size only
    has its step rerun there, and is the same network."""
    from densenet_parity.checking.engine import step_size
    cfg121, book = spec.make_config("densenet121"), spec.make_config("book")
    assert [step_size(cfg121, s) for s in (224, 64, 40)] == [64, 64, 40]
    assert [step_size(book, s) for s in (200, 96, 32)] == [96, 96, 32]
    assert step_size(spec.make_config("house_mlp"), 0) == 0
    assert min(spec.stage_shapes(cfg121, 1, 64, 64)[-2][1][2:]) == 2  # every stage runs
    (tmp_path / "fixed_book.py").write_text(
        "from densenet_torch import model\n\n\n"
        "def net():\n"
        "    n = model.book()\n\n"
        "    class OnlyAt104(type(n)):\n"
        "        def forward(self, x):\n"
        "            if x.shape[-1] != 104:\n"
        "                raise ValueError(f'runs on 104x104 only, got {x.shape[-1]}')\n"
        "            return super().forward(x)\n"
        "    n.__class__ = OnlyAt104\n"
        "    return n\n\n\n"
        "def plain():\n"
        "    return model.book()\n")
    r = check(framework="torch", factory="fixed_book:plain", path=str(tmp_path), size=104)
    assert r.same and r.input_shape == [2, 1, 104, 104], r.render()
    assert any("train-mode step ran at 96x96" in n and "eval-mode comparison at 104x104" in n
               for n in r.notes), r.notes
    r = check(framework="torch", factory="fixed_book:net", path=str(tmp_path), size=104)
    assert r.same, r.render()
    assert not any("train-mode step ran at" in n for n in r.notes), r.notes


def test_checking_a_weights_file(tmp_path):
    from parity_tests.own_models import book_torch
    path = tmp_path / "book.pth"
    torch.save(book_torch.net().state_dict(), path)
    r = check_file(path)
    assert r.same and r.preset == "book" and r.totals["state"] == 6_608
    torch.save(book_torch.transition_keeps_block_input().state_dict(), path)
    r = check_file(path)
    assert not r.same and "features.transition2.conv" in r.structure


def check_file(path):
    from densenet_parity import check_weights
    return check_weights(str(path), framework="torch", size=32)


# ------------------------------------------------------------------ every cause, every number

#: words that belong to the conv family only (never offered for the MLP family) and to the MLP
#: family only (never offered for the conv family)
CONV_WORDS = re.compile(r"pool|padding|stride|convolution|\d+x\d+|NCHW|NHWC|height",
                        re.I)
MLP_WORDS = re.compile(r"BatchNorm1d|Linear|transition_relu|forum", re.I)
#: a number that is no number, as Python writes it
NOT_A_NUMBER = re.compile(r"\b(nan|inf|infinity)\b", re.I)


def _causes(config):
    """Every cause the check and the converter can give for ``config``: the numerical
    conventions at every canonical module (eval and train, equal and different shapes), and
    the structural causes at every module (missing, extra, other shapes)."""
    from densenet_parity.checking import convention, likely_structural_cause
    rng = np.random.default_rng(0)
    out = []
    for module, kind, _ in spec.canonical_modules(config):
        for mode in ("eval", "train"):
            a = rng.standard_normal((2, 4, 3, 3) if config.family == "conv" else (8, 4))
            out.append(convention(config, module, kind, a, a + 1, mode))
            out.append(convention(config, module, kind, a, a[..., :2], mode))
        d = match.missing_difference(config, module)
        out.append(likely_structural_cause(config, d))
        for change, found in (("extra", d.expected), ("shape", d.expected.replace("4", "5"))):
            out.append(likely_structural_cause(config, match.Difference(
                d.module, d.stage, kind, d.expected, found, "x", d.arithmetic, change)))
    return [c for c in out if c]


def test_every_cause_belongs_to_the_presets_family():
    """The MLP DenseNet is never offered a conv-family cause (pooling, padding, a kxk conv,
    layouts) and the conv family never an MLP one; a missing layer's cause names the family's
    own recipe."""
    mlp = _causes(spec.get_preset("house_mlp"))
    assert mlp and not [c for c in mlp if CONV_WORDS.search(c)], [
        c for c in mlp if CONV_WORDS.search(c)]
    assert any("transition_relu" in c for c in mlp) and any("BatchNorm1d" in c for c in mlp)
    for name in ("book", "densenet121", "densenet40"):
        conv = _causes(spec.get_preset(name))
        assert conv and not [c for c in conv if MLP_WORDS.search(c)], [
            c for c in conv if MLP_WORDS.search(c)]


def _rendered(config, numbers, first, settings=()):
    from densenet_parity.checking import Report
    r = Report("torch", "", "m:net", config.name, config.to_dict(),
               [2, 1, 32, 32] if config.family == "conv" else [8, 330],
               [], {"spec_params": 1, "spec_state": 1, "params": 1, "state": 1, "ok": True},
               output_shape=[2, 10], numbers=numbers, first=first, bn_settings=list(settings),
               adjusted=dict(numbers), adjusted_first=first)
    return r.render()


def test_no_report_says_nan_or_inf_where_a_number_is_meant():
    """Reports rendered from crafted inputs holding 0, NaN and infinite values (shapes that
    differ, a reference that is all 0, a running variance that does not move, a NaN in the
    model's statistics) say what happened in words: no 'nan' or 'inf' token."""
    from densenet_parity.checking.numbers import _bn_statistics, _first_difference, _rel
    cfg = spec.make_config("book", block_config=(1, 1), num_init_features=4, growth_rate=2)
    bn = [n for n, kind, _ in spec.canonical_modules(cfg) if kind == "bn"][0]
    c = spec.make_config(cfg).to_dict() and dict(spec.canonical_tensors(cfg) and
                                                 {n: s for n, s, _ in spec.canonical_tensors(cfg)})
    state = {n: np.ones(s, np.float64) for n, s in c.items()}
    texts = []
    # the running-variance update: the reference's is 0 everywhere (a batch variance of 0)
    new_r = {k: v.copy() for k, v in state.items()}
    new_u = {k: v.copy() for k, v in state.items()}
    new_r[f"{bn}.running_var"] = 0.9 * state[f"{bn}.running_var"]
    new_u[f"{bn}.running_var"] = 0.9 * state[f"{bn}.running_var"] + 0.031
    d, first, _ = _bn_statistics(cfg, state, new_u, new_r, "flax", biased=True)
    assert first and "the reference's running-variance update is 0 here" in first["convention"]
    assert "the model's is up to 0.031" in first["convention"], first["convention"]
    texts.append(_rendered(cfg, {"bn_statistics": d}, first))
    # 0 / 0 in some features (a dead ReLU's), the biased variance in the others: accepted
    upd = np.where(np.arange(4) < 2, 0.0, 1.0)
    new_r[f"{bn}.running_var"] = 0.9 * state[f"{bn}.running_var"] + 0.1 * upd
    new_u[f"{bn}.running_var"] = 0.9 * state[f"{bn}.running_var"] + 0.1 * upd * 7 / 8
    d, first, notes = _bn_statistics(cfg, state, new_u, new_r, "flax", biased=True)
    assert d == 0.0 and first is None and "0.8750 of PyTorch's unbiased one" in notes[0], notes
    # the running mean does not move in the reference (the batch mean is the running mean)
    new_u[f"{bn}.running_mean"] = state[f"{bn}.running_mean"] + 0.5
    d, first, _ = _bn_statistics(cfg, state, new_u, state, "torch")
    assert "the model's moves by up to 0.5" in first["convention"], first["convention"]
    texts.append(_rendered(cfg, {"bn_statistics": d}, first))
    # NaN in the model's statistics
    new_u[f"{bn}.running_mean"] = np.full(4, np.nan)
    d, first, _ = _bn_statistics(cfg, state, new_u, state, "torch")
    assert first is not None and d == float("inf")  # a NaN is a difference, never 'ok'
    texts.append(_rendered(cfg, {"bn_statistics": d}, first))
    # shapes that differ, a reference of zeros, NaN outputs
    assert _rel(np.ones(3), np.zeros(3)) == float("inf") and _rel(np.zeros(3), np.zeros(3)) == 0
    assert _rel(np.array([np.nan]), np.ones(1)) == float("inf")
    order = [m for m, _, _ in spec.canonical_modules(cfg)]
    for u, r in ((np.ones((2, 4, 3, 3)), np.ones((2, 4, 2, 2))),
                 (np.ones((2, 4, 3, 3)), np.zeros((2, 4, 3, 3))),
                 (np.full((2, 4, 3, 3), np.nan), np.ones((2, 4, 3, 3))),
                 (np.full((2, 4, 3, 3), np.inf), np.ones((2, 4, 3, 3)))):
        first = _first_difference(cfg, order, {order[0]: "a"}, {order[0]: "b"}, {"a": u},
                                  {"b": r}, 1e-5, "eval")
        assert first is not None
        texts.append(_rendered(cfg, {"eval_logits": _rel(u, r)}, first))
    for value in (float("nan"), float("inf"), float("-inf"), 0.0):
        first = {"mode": "eval", "module": "classifier", "stage": "head", "foreign": "fc",
                 "max_abs": value, "rel": value, "convention": "x"}
        settings = [{"module": bn, "foreign": "bn", "setting": "epsilon", "model": value,
                     "reference": 1e-5, "as_written": "", "words": ""}]
        text = _rendered(cfg, dict.fromkeys(
            ("eval_logits", "train_loss", "gradients", "bn_statistics"), value), first, settings)
        if value:
            texts.append(text)
        else:  # 0 is a number: said as one
            assert "0.00e+00  (tolerance 1e-05)  ok" in text and "epsilon 0, the" in text, text
    mlp = spec.get_preset("house_mlp")
    texts.append(_rendered(mlp, {"eval_logits": float("inf")}, {
        "mode": "eval", "module": "classifier", "stage": "head", "foreign": "fc",
        "max_abs": float("inf"), "rel": float("inf"), "convention": "x"}))
    from densenet_parity.export import ExportResult
    from densenet_parity.report import _e
    proof = ExportResult("book", "random", "x.onnx", {"name": "book"}, [1, 1, 32, 32],
                         {"x.onnx": 1000}, {"Conv": 1}, 20, {}, {
                             "torch": "2", "onnx": "1", "onnxruntime": "1"},
                         proof={"torch": float("nan"), "flax-nnx": float("inf")})
    assert not proof.ok
    texts.append(proof.render() + _e(float("nan")) + _e(float("inf")))
    for text in texts:
        assert not NOT_A_NUMBER.search(text), text
        assert "not comparable" in text or "is 0 here" in text or "up to" in text, text


def test_the_biased_variance_is_accepted_only_where_it_explains_every_batchnorm():
    """Flax's, Gluon's and Keras' biased running-variance update is accepted when it explains
    every BatchNorm whose variance differs, not when only the first one."""
    from densenet_parity.checking.numbers import _bn_statistics
    cfg = spec.make_config("book", block_config=(1, 1), num_init_features=4, growth_rate=2)
    bns = [n for n, kind, _ in spec.canonical_modules(cfg) if kind == "bn"]
    state = {n: np.ones(s, np.float64) for n, s, _ in spec.canonical_tensors(cfg)}
    new_r = {k: v.copy() for k, v in state.items()}
    for b in bns[:2]:
        new_r[f"{b}.running_var"] = 0.9 + 0.1 * np.arange(1, 1 + state[f"{b}.running_var"].size)
    new_u = {k: v.copy() for k, v in new_r.items()}
    for b in bns[:2]:
        new_u[f"{b}.running_var"] = 0.9 + 0.1 * np.arange(
            1, 1 + state[f"{b}.running_var"].size) * 3 / 4
    d, first, notes = _bn_statistics(cfg, state, new_u, new_r, "flax", biased=True)
    assert d == 0.0 and first is None and "0.7500 of PyTorch's unbiased one" in notes[0]
    new_u[f"{bns[1]}.running_var"] = new_r[f"{bns[1]}.running_var"] * 2  # another bug there
    d, first, notes = _bn_statistics(cfg, state, new_u, new_r, "flax", biased=True)
    assert d > 1e-6 and not notes and first["module"] == bns[1], (first, notes)
    assert "running-variance update is" in first["convention"]
