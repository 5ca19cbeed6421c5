"""The MLP DenseNet (the chapter's exercise 5, the forum's house-price model) in every backend:
the forum's widths and counts from the spec's arithmetic, per-stage widths, trainable parameters
and BatchNorm state equal to the spec in every backend (hypothesis-generated configurations
too); the same canonical weights give the same eval outputs (1e-5), train-mode outputs (1e-4),
and one float64 SGD step gives the same loss, gradients, parameters and BatchNorm statistics
(1e-6); dropout; bad input; bit-exact round trips.

The MLP's loss in the adapters is the mean squared error against float targets (the house-price
recipe's regression); the conv family's is cross-entropy against integer labels.
"""
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import densenet_spec as spec
from densenet_parity import compare
from parity_tests.conftest import get_backend

OTHERS = ["mxnet", "flax-nnx", "flax-linen"]
#: The forum's preset and one that exercises every other option value: no trailing ReLU in the
#: transitions, another compression (rounded down), three stem layers, odd widths.
CONFIGS = {
    "house_mlp": spec.get_preset("house_mlp"),
    "small": spec.make_config("house_mlp", in_features=13, stem_widths=(24, 20, 18),
                              block_config=(3, 1, 2), growth_rate=7, compression=0.75,
                              transition_relu=False, num_outputs=3),
}
#: A batch for train-mode BatchNorm1d that is well conditioned (n = batch per feature).
BATCH = 16
#: Values whose exact value is zero (the gradient of a Linear bias that feeds a BatchNorm: the
#: BatchNorm subtracts the batch mean, so the bias cancels) are judged against this absolute
#: floor, a share of the tensor set's largest magnitude; a relative tolerance alone would compare
#: rounding noise with rounding noise.
ZERO_FLOOR = 1e-9


def test_the_forums_widths_and_counts_come_from_the_arithmetic():
    p = spec.get_preset("house_mlp")
    assert [c for _, c in spec.stage_channels(p)] == [1024, 1280, 640, 896, 448, 704, 352, 608, 1]
    # Counted here from the layer list of the forum's listing, independently of the spec.
    linears = [(330, 512), (512, 1024)]
    bns, c = [], 1024
    for b in range(4):
        for j in range(2):
            bns.append(c + j * 128)
            linears.append((c + j * 128, 128))
        c += 2 * 128
        if b != 3:
            bns.append(c)
            linears.append((c, c // 2))
            c //= 2
    bns.append(c)
    linears.append((c, 1))
    assert c == 608
    params = sum(i * o + o for i, o in linears) + sum(2 * n for n in bns)
    assert spec.total_counts(p) == (params, sum(2 * n for n in bns))
    assert spec.module_arithmetic(p, "features.transition1.linear") == \
        "transition1.linear maps 1280 -> 640 = (1024 + 2 x 128) // 2 features"


def describe(b, cfg, batch):
    return b.call("describe", config=cfg.to_dict(), batch=batch, height=0, width=0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_stages_match_spec(backend, name):
    cfg = CONFIGS[name]
    got = describe(backend, cfg, 3)
    assert compare.structure_problems(got, compare.expected_stages(cfg, 3, 0, 0)) == []


def test_real_forward_agrees_with_abstract_evaluation(backend):
    cfg = CONFIGS["small"]
    kw = dict(config=cfg.to_dict(), batch=2, height=0, width=0)
    assert backend.call("describe", abstract=False, **kw)["stages"] == \
        backend.call("describe", abstract=True, **kw)["stages"]


configs = st.fixed_dictionaries({
    "in_features": st.integers(1, 40),
    "stem_widths": st.lists(st.integers(1, 32), min_size=1, max_size=3).map(tuple),
    "block_config": st.lists(st.integers(1, 3), min_size=1, max_size=4).map(tuple),
    "growth_rate": st.integers(1, 16),
    "compression": st.sampled_from([0.5, 1.0, 0.75]),
    "transition_relu": st.booleans(),
    "num_outputs": st.integers(1, 5),
})


@settings(max_examples=10, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(options=configs, batch=st.integers(1, 4))
def test_generated_configs_agree_across_backends(backends, options, batch):
    cfg = spec.make_config("house_mlp", **options)
    expected = compare.expected_stages(cfg, batch, 0, 0)
    for b in backends:
        assert compare.structure_problems(describe(b, cfg, batch), expected) == [], b.name


# ---------------------------------------------------------------- numbers

_cache = {}


def reference(name, what="forward", train=False, dtype="float32"):
    """Torch's results for a configuration: config, state, input, targets, result."""
    key = (name, what, train, dtype)
    if key not in _cache:
        cfg = CONFIGS[name]
        torch_b = get_backend("torch")
        state = torch_b.call("init_state", config=cfg.to_dict(), seed=1)["arrays"]
        rng = np.random.default_rng(7)
        for k in state:  # non-trivial BatchNorm statistics and biases
            if k.endswith("running_mean") or k.endswith(".bias"):
                state[k] = rng.normal(0, 0.1, state[k].shape).astype(np.float32)
            elif k.endswith("running_var"):
                state[k] = rng.uniform(0.5, 1.5, state[k].shape).astype(np.float32)
        x = rng.standard_normal(spec.input_shape(cfg, BATCH)).astype(np.float32)
        y = rng.standard_normal((BATCH, cfg.num_outputs))  # float targets: the MSE loss
        kw = dict(config=cfg.to_dict(), state=state, x=x)
        res = (torch_b.call("forward", train=train, **kw) if what == "forward" else
               torch_b.call(what, labels=y, dtype=dtype, **kw))
        _cache[key] = (cfg, state, x, y, res)
    return _cache[key]


def assert_close(got, ref, rtol, what):
    """Every tensor within ``rtol`` of its own largest magnitude, with ZERO_FLOOR (absolute,
    a share of the largest magnitude over all tensors) for tensors whose exact value is 0."""
    assert set(got) == set(ref), f"{what}: names differ: {set(got) ^ set(ref)}"
    top = max(float(np.max(np.abs(v))) for v in ref.values())
    for k, r in ref.items():
        diff = compare.abs_diff(got[k], r)
        scale = float(np.max(np.abs(r)))
        assert diff <= rtol * scale or diff <= ZERO_FLOOR * top, \
            f"{what}: {k} differs by {diff:.3g} (its largest value {scale:.3g})"


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("other", OTHERS)
def test_forward_every_stage(other, name, train):
    cfg, state, x, _, ref = reference(name, train=train)
    got = get_backend(other).call("forward", config=cfg.to_dict(), state=state, x=x, train=train)
    assert_close(got["arrays"], ref["arrays"], compare.TRAIN_RTOL if train else compare.EVAL_RTOL,
                 f"{other} {name} {'train' if train else 'eval'}")


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("other", OTHERS)
def test_one_float64_sgd_step(other, name):
    """One float64 SGD step (lr 0.1) on the MSE loss: loss, every gradient, the new parameters
    and BatchNorm running statistics against torch's (1e-6)."""
    cfg, state, x, y, ref = reference(name, what="train_step", dtype="float64")
    got = get_backend(other).call("train_step", config=cfg.to_dict(), state=state, x=x,
                                  labels=y, lr=0.1, dtype="float64")
    assert set(got["grads"]) == {n for n, _, k in spec.canonical_tensors(cfg) if k == "param"}
    assert abs(got["loss"] - ref["loss"]) <= 1e-12 * max(1.0, abs(ref["loss"]))
    assert_close(got["grads"], ref["grads"], 1e-6, f"{other} {name} gradients")
    want = dict(ref["arrays"])
    if other == "mxnet":  # Gluon updates the running variance with the biased batch variance
        for k in want:
            if k.endswith("running_var"):
                old = state[k].astype(np.float64)
                want[k] = 0.9 * old + 0.1 * (want[k] - 0.9 * old) / 0.1 * (BATCH - 1) / BATCH
    assert_close(got["arrays"], want, 1e-6, f"{other} {name} step")
    first = "features.denseblock1.denselayer1.norm1.running_mean"
    assert not np.allclose(got["arrays"][first], state[first])
    assert not np.allclose(got["arrays"]["classifier.weight"], state["classifier.weight"])


def test_round_trip_every_backend_is_bit_exact():
    cfg, state, _, _, _ = reference("house_mlp")
    cur = state
    for b in ["torch", "mxnet", "flax-nnx", "flax-linen", "torch"]:
        cur = get_backend(b).call("roundtrip", config=cfg.to_dict(), state=cur)["arrays"]
    assert set(cur) == set(state)
    for k in state:
        assert cur[k].dtype == np.float32 and np.array_equal(cur[k], state[k]), k


def test_dropout_inactive_in_eval_and_inverted_in_training(backend):
    """drop_rate in the MLP's dense layers: eval mode computes exactly the network without
    dropout; training zeroes about that share of each layer's new features (after its Linear)
    and scales the rest by 1 / (1 - p)."""
    cfg, state, x, _, _ = reference("house_mlp")
    plain, drop = cfg.to_dict(), dict(cfg.to_dict(), drop_rate=0.5)
    ev = backend.call("forward", config=drop, state=state, x=x)["arrays"]
    ev_ref = get_backend("torch").call("forward", config=plain, state=state, x=x)["arrays"]
    assert_close(ev, ev_ref, compare.EVAL_RTOL, f"{backend.name} eval with dropout")
    tr = backend.call("forward", config=drop, state=state, x=x, train=True)["arrays"]
    tr_ref = backend.call("forward", config=plain, state=state, x=x, train=True)["arrays"]
    # The first layer's new features (1024..1151) see the same input with and without dropout.
    new, base = tr["denseblock1"][:, 1024:1152], tr_ref["denseblock1"][:, 1024:1152]
    assert np.array_equal(tr["denseblock1"][:, :1024], tr_ref["denseblock1"][:, :1024])
    zeros = np.mean(new == 0)
    assert np.mean(base == 0) < 0.01  # a Linear's outputs: none is exactly zero by itself
    assert 0.4 < zeros < 0.6, f"{backend.name}: {zeros:.2f} of the new features dropped, not ~0.5"
    kept = new != 0
    np.testing.assert_allclose(new[kept], 2.0 * base[kept], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape, match", [
    ([4, 331], "expects 330 input features on axis 1 of \\(N, features\\); got 331"),
    ([330], "2-D batch of feature vectors.*add a batch dimension"),
    ([2, 1, 330, 1], "2-D batch of feature vectors"),
])
def test_bad_input_is_a_clear_error(backend, shape, match):
    err = backend.call("input_error", config=CONFIGS["house_mlp"].to_dict(), shape=shape)
    assert err is not None and err["type"] == "DenseNetInputError", err
    assert re.search(match, err["message"]), err["message"]


@pytest.mark.parametrize("options, match", [
    ({"in_features": 0}, "in_features must be a positive integer, got 0"),
    ({"stem_widths": ()}, "stem_widths must be a non-empty sequence"),
    ({"growth_rate": 8, "compression": 0.01, "block_config": (1, 1), "stem_widths": (4,)},
     "compression 0.01 leaves transition1 with no features"),
    ({"num_outputs": -1}, "num_outputs must be a positive integer"),
])
def test_bad_options_are_a_clear_error(backend, options, match):
    full = dict(spec.get_preset("house_mlp").options(), **options)
    err = backend.call("layer_error", kind="MLPDenseNet", args=[full])
    assert err is not None and err["type"] == "DenseNetConfigError", err
    assert re.search(match, err["message"]), err["message"]


# ---------------------------------------------------------------- check and convert

def test_the_forums_listing_is_the_house_mlp_network():
    """The forum's PyTorch listing as a reader typed it (nn.Sequential of its own blocks, no
    canonical names) is 'same network', its preset inferred from its structure."""
    from densenet_parity import assert_same_densenet
    from parity_tests.own_models import house_torch
    report = assert_same_densenet(house_torch.net())
    assert report.preset == "house_mlp" and report.input_shape == [8, 330]
    assert report.numbers["gradients"] <= 1e-6 and report.numbers["bn_statistics"] <= 1e-6


def test_a_wrong_transition_width_is_named_with_its_arithmetic():
    from densenet_parity import check
    from parity_tests.own_models import house_torch
    report = check(house_torch.transition_keeps_width(), preset="house_mlp")
    assert not report.same and report.numbers == {}  # named before any number
    assert report.structure.startswith(
        "first difference at features.transition2.linear (transition2): the reference has a "
        "dense layer 896 -> 448; the model has a dense layer 896 -> 896")
    assert "transition2.linear maps 896 -> 448 = (640 + 2 x 128) // 2 features" in report.structure
    assert "no compression" in report.cause
    assert [r["stage"] for r in report.rows if not r["ok"]][0] == "transition2"


#: causes of the conv family only: never offered for the MLP DenseNet
CONV_WORDS = re.compile(r"pool|padding|stride|convolution|\d+x\d+|NCHW|NHWC|height", re.I)


def test_a_transition_without_its_closing_relu_is_named_in_the_mlps_words():
    """The forum's listing with the transitions' closing ReLU left out: the first output that
    differs is the next dense block's BatchNorm1d, and the cause is the transition's ReLU
    (transition_relu), never a conv-family one (the transition's pooling)."""
    from densenet_parity import check
    from parity_tests.own_models import house_torch
    report = check(house_torch.transition_without_relu(), preset="house_mlp")
    text = report.render()
    assert report.structure is None and not report.same, text
    f = report.first
    assert (f["mode"], f["module"], f["stage"]) == (
        "eval", "features.denseblock2.denselayer1.norm1", "denseblock2"), text
    assert f["convention"].startswith("the transition's closing ReLU:"), f["convention"]
    assert "transition_relu=True" in f["convention"] and "leaves the last ReLU out" in f[
        "convention"], f["convention"]
    assert not CONV_WORDS.search(text.split("Numbers")[1]), text


def test_a_missing_batchnorm1d_is_named_missing_in_the_mlps_words():
    """The forum's listing with the second transition's BatchNorm1d left out: a missing
    BatchNorm before transition2's Linear, its cause the MLP transition's recipe."""
    from densenet_parity import check
    from parity_tests.own_models import house_torch
    model = house_torch.net()
    del model[4][0]  # the second transition: ReLU-Linear-ReLU
    report = check(model, preset="house_mlp")
    assert report.structure.startswith(
        "first difference at features.transition2.norm (transition2): the model has no BatchNorm "
        "before transition2's Linear (the reference's transition2.norm: a BatchNorm over 896 "
        "features)"), report.structure
    assert report.cause == ("a BatchNorm1d left out of the port (the transition is "
                            "BatchNorm1d-ReLU-Linear-ReLU, halving the features)"), report.cause
    assert not CONV_WORDS.search(report.structure + report.cause)


def test_the_forums_weights_convert_into_every_backend(tmp_path):
    """The forum's state_dict (its own Sequential keys) converted by the command into every
    backend's file computes there what the forum's model computes (eval, 1e-5)."""
    import torch
    from densenet_cli.main import main
    from densenet_parity.compare import EVAL_RTOL, rel_diff
    from parity_tests.own_models import house_torch
    torch.manual_seed(0)
    net = house_torch.net()
    rng = np.random.default_rng(3)
    with torch.no_grad():
        for name, b in net.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.as_tensor(rng.normal(0, 0.1, b.shape)))
            elif name.endswith("running_var"):
                b.copy_(torch.as_tensor(rng.uniform(0.5, 1.5, b.shape)))
    net.eval()
    src = tmp_path / "forum.pth"
    torch.save(net.state_dict(), src)
    x = rng.standard_normal((4, 330)).astype(np.float32)
    with torch.no_grad():
        want = net(torch.as_tensor(x)).numpy()
    cfg = spec.get_preset("house_mlp")
    for to, suffix in {"torch": ".pth", "mxnet": ".params", "flax-nnx": ".msgpack",
                       "flax-linen": ".msgpack"}.items():
        native = tmp_path / f"{to}{suffix}"
        assert main(["convert", str(src), str(native), "--to", to]) == 0
        b = get_backend(to)
        state = b.call("load_native", config=cfg.to_dict(), path=str(native))["arrays"]
        got = b.call("forward", config=cfg.to_dict(), state=state, x=x)["arrays"]["head"]
        assert rel_diff(got, want) <= EVAL_RTOL, (to, rel_diff(got, want))


def test_the_mlp_exports_to_onnx_proven_and_checks_as_the_same_network(tmp_path, capsys):
    """`densenet export house_mlp`: every BatchNorm1d a node, onnxruntime's outputs equal to
    torch's (the command's proof, 1e-5), and `densenet check` on the file: the same network."""
    pytest.importorskip("onnxruntime", reason="the onnx extra of the main environment")
    from densenet_cli.main import main
    from densenet_weights import formats
    dst = tmp_path / "house.onnx"
    assert main(["export", "house_mlp", str(dst)]) == 0
    out = capsys.readouterr().out
    # one row per input shape the file claims (its batch axis is dynamic): at batch 1 and 2
    for batch in (1, 2):
        assert re.search(rf"torch\s+{batch}x330\s+\S+\s+\(tolerance 1e-05\)\s+ok", out), out
    _, info = formats.onnx_layers(dst)
    bns = sum(1 for _, kind, _ in spec.canonical_modules(CONFIGS["house_mlp"]) if kind == "bn")
    assert info["ops"]["BatchNormalization"] == bns and "Conv" not in info["ops"]
    assert main(["check", str(dst)]) == 0
    out = capsys.readouterr().out
    # the file's batch axis is dynamic: checked at the check's own batch, and said
    assert "against preset 'house_mlp', input 2x330 (N, features)" in out, out
    assert "the file's input is batch x 330 (dynamic: batch): checked at 2x330" in out, out
    assert "Verdict: same network." in out
