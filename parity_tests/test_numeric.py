"""Same weights, same numbers: every backend against PyTorch, from the same canonical state
(exported from a PyTorch-initialised model) and the same input.

Tolerances (relative to the largest magnitude of the reference tensor): eval-mode outputs
1e-5 and train-mode outputs 1e-4 in float32; gradients and one SGD step 1e-4 in float64.

Why float64 for gradients: at random initialisation train-mode BatchNorm is badly conditioned
in some channels (tiny batch variance), and PyTorch's own float32 gradients differ from its
float64 ones by up to 1e-1 relative in a few tensors (densenet121, densenet_bc100). No float32
implementation can then agree with another to 1e-4; in float64 the backends agree to ~1e-10,
so a 1e-4 tolerance there is a real test of "same function". A tensor is compared relative to
at least 1e-8 of the largest gradient of the network, not to its own rounding noise. The book's
conv biases all feed a BatchNorm, so their exact gradient is zero: those are judged against an
absolute floor (``zero_gradients``, ``zero_floor``), never by a relative tolerance.
"""
import numpy as np
import pytest

import densenet_spec as spec
from densenet_parity import compare
from densenet_parity.side_by_side import zero_gradient_names
from parity_tests.conftest import get_backend

OTHERS = ["mxnet", "flax-nnx", "flax-linen"]
PRESETS = ["book", "densenet121", "densenet161", "densenet169", "densenet201", "densenet264",
           "densenet40", "densenet_bc100", "densenet_bc250", "densenet_bc190"]


def _size(cfg):
    """The smallest input that exercises every stage with well-conditioned BatchNorm: 8 px for
    the CIFAR presets (8x8, 4x4 and 2x2 maps in the three blocks; both transitions pool),
    64 px for the ImageNet ones (stem to 16x16, blocks at 16, 8, 4 and 2): the last block runs
    at 2x2 in both. Not smaller: at 1x1 (an ImageNet preset at 32 px) train-mode BatchNorm
    over a batch of 2 sees two values per channel and amplifies rounding differences by up to
    1/sqrt(eps) per layer; float64 results then differ by 1e-2. The CIFAR presets ran at 32 px
    until the suite had to fit CI's time and memory budget: at 8 px the float64 step of every
    backend still agrees with torch to ~1e-14, as at 32 px, for 1/16 of the arithmetic and of
    the activations."""
    return 8 if cfg.stem == "cifar" else 64


_cache = {}
# References kept: one preset's eval forward and float64 step (the float64 steps of a preset run
# together, its giants' tests too: parity_tests/conftest.py); a float64 step of the largest
# presets holds ~1 GB of arrays.
_CACHED = 2


def reference(name, train=False, what="forward", dtype="float32", **options):
    """Torch's results for a preset (cached, the last few), ``options`` overriding it: config,
    state, input, labels, result."""
    key = (name, train, what, dtype, tuple(sorted(options.items())))
    if key in _cache:
        _cache[key] = _cache.pop(key)  # most recently used last
    else:
        # Another preset's results are not needed again (a preset's tests run together: the
        # giants' group in parity_tests/conftest.py, the others in collection order): drop them
        # before this preset's are computed, so that the deepest presets' float64 steps do not
        # share the worker with a previous preset's arrays.
        for old in [k for k in _cache if k[0] != name]:
            del _cache[old]
        while len(_cache) >= _CACHED:
            _cache.pop(next(iter(_cache)))
        cfg = spec.make_config(name, **options)
        torch_b = get_backend("torch")
        state = torch_b.call("init_state", config=cfg.to_dict(), seed=1)["arrays"]
        rng = np.random.default_rng(7)
        x = rng.standard_normal((2, cfg.in_channels, _size(cfg), _size(cfg))).astype(np.float32)
        labels = rng.integers(0, cfg.num_classes, size=2).astype(np.int64)
        # Non-trivial BatchNorm statistics, so that eval mode does not see mean 0 / var 1.
        for k in state:
            if k.endswith("running_mean"):
                state[k] = rng.normal(0, 0.1, state[k].shape).astype(np.float32)
            elif k.endswith("running_var"):
                state[k] = rng.uniform(0.5, 1.5, state[k].shape).astype(np.float32)
        kw = dict(config=cfg.to_dict(), state=state, x=x)
        if what == "forward":
            res = torch_b.call("forward", train=train, **kw)
        else:
            res = torch_b.call(what, labels=labels, dtype=dtype, **kw)
            torch_b.call("release_memory")  # what the float64 step freed, back to the system
        _cache[key] = (cfg, state, x, labels, res)
    return _cache[key]


def assert_close(got, ref, rtol, what, floor=0.0, zero=(), atol=0.0):
    """Every tensor of ``ref`` within ``rtol`` of its largest magnitude (at least ``floor``
    times the largest magnitude of all). The tensors named in ``zero`` are exactly zero in
    exact arithmetic: a relative measure of rounding noise against rounding noise means
    nothing, so both ``got`` and ``ref`` are judged against the absolute floor ``atol``."""
    assert set(got) == set(ref), f"{what}: names differ: {set(got) ^ set(ref)}"
    for k in zero:
        for side, v in (("result", got[k]), ("reference", ref[k])):
            size = float(np.max(np.abs(v))) if np.size(v) else 0.0
            assert size <= atol, f"{what}: {k} should be 0; the {side} is {size:.2e} > {atol:.2e}"
    scale = floor * max(float(np.max(np.abs(v))) for v in ref.values())
    bad = {k: compare.abs_diff(got[k], ref[k]) / max(float(np.max(np.abs(ref[k]))), scale, 1e-300)
           for k in ref if k not in zero}
    worst = max(bad, key=bad.get)
    assert bad[worst] <= rtol, f"{what}: {worst} differs by {bad[worst]:.2e} (rel) > {rtol:g}"


def zero_gradients(cfg):
    """The parameters whose exact gradient is 0: every convolution's bias. Each convolution of a
    DenseNet feeds BatchNorms only (the next BN directly, or through concatenation and pooling,
    which carry a per-channel constant through unchanged: average and max pooling alike), and a
    train-mode BatchNorm subtracts its batch mean, so a per-channel shift changes nothing.
    (densenet_parity.side_by_side's rule, which compare-training judges the same way.)"""
    assert cfg.family == "conv", cfg.family
    return sorted(zero_gradient_names(cfg))


def zero_floor(x, ref, eps):
    """An absolute floor for a gradient that is 0 in exact arithmetic but a sum of rounding
    errors in floating point: a bias's gradient sums its channel's gradient over every position
    of the batch (at most N x H x W terms, the stem conv's output map being the largest), each
    term at most the largest gradient, each addition off by at most ``eps`` of the running sum,
    so |result| <= terms x eps x largest. (Measured on the book at 64 px: ~30x below it in
    float32, ~400x below it in float64.)"""
    n, h = x.shape[0], x.shape[2]
    terms = n * ((h - 1) // 2 + 1) ** 2  # the stem's 7x7/2 conv output (largest map)
    return terms * eps * max(float(np.max(np.abs(v))) for v in ref.values())


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("other", OTHERS)
def test_eval_forward_every_stage(other, name):
    cfg, state, x, _, ref = reference(name)
    got = get_backend(other).call("forward", config=cfg.to_dict(), state=state, x=x, train=False)
    assert_close(got["arrays"], ref["arrays"], compare.EVAL_RTOL, f"{other} {name} eval")


@pytest.mark.parametrize("name", ["book", "densenet121", "densenet_bc100", "densenet40"])
@pytest.mark.parametrize("other", OTHERS)
def test_train_forward_every_stage(other, name):
    cfg, state, x, _, ref = reference(name, train=True)
    got = get_backend(other).call("forward", config=cfg.to_dict(), state=state, x=x, train=True)
    assert_close(got["arrays"], ref["arrays"], compare.TRAIN_RTOL, f"{other} {name} train")


def sgd_step(other, name):
    """One float64 SGD step of ``other`` from the reference state, and torch's."""
    cfg, state, x, labels, ref = reference(name, what="train_step", dtype="float64")
    got = get_backend(other).call("train_step", config=cfg.to_dict(), state=state, x=x,
                                  labels=labels, lr=0.1, dtype="float64")
    return cfg, state, x, ref, got


@pytest.mark.parametrize("other", OTHERS)
def test_gradients_function_equals_the_steps_gradients(other):
    """``gradients`` (no update) computes what ``train_step`` applied, and float32 gradients
    are close to the float64 ones for the book's model."""
    cfg, state, x, labels, _ = reference("book", what="train_step", dtype="float64")
    _, _, _, _, step = sgd_step(other, "book")
    kw = dict(config=cfg.to_dict(), state=state, x=x, labels=labels)
    g64 = get_backend(other).call("gradients", dtype="float64", **kw)
    assert abs(g64["loss"] - step["loss"]) <= 1e-12 * max(1.0, abs(step["loss"]))
    # Two compiled programs (Flax: with and without the update) round differently. The conv
    # biases (every one feeds a BatchNorm) have an exact gradient of 0: rounding noise in both
    # results, judged against an absolute floor (zero_floor), never relative to each other (MXNet's
    # float32 conv0.bias gradient, 3.5e-6, was 0.78 of the old relative bound: a coming flake).
    zero = zero_gradients(cfg)
    assert len(zero) == 20  # conv0, 16 dense layers' conv1, 3 transitions' conv
    assert_close(g64["arrays"], step["grads"], 1e-6, f"{other} gradients()", floor=1e-8,
                 zero=zero, atol=zero_floor(x, step["grads"], np.finfo(np.float64).eps))
    g32 = get_backend(other).call("gradients", **kw)
    assert abs(g32["loss"] - step["loss"]) <= 1e-5 * max(1.0, abs(step["loss"]))
    assert_close(g32["arrays"], step["grads"], 1e-3, f"{other} float32 gradients()", floor=1e-2,
                 zero=zero, atol=zero_floor(x, step["grads"], np.finfo(np.float32).eps))


def _biased_update(cfg, name, batch, size, old, torch_new):
    """What a BatchNorm that updates with the biased batch variance (MXNet) gives, derived
    from torch's unbiased update: new = 0.9 old + 0.1 var_b, var_b = var_u (n - 1) / n."""
    shapes = dict(spec.stage_shapes(cfg, batch, size, size))
    stage = spec.stage_of(name)
    if stage == "stem":  # norm0 sits after the 7x7/2 conv, before the max pool
        hw = ((size + 6 - 7) // 2 + 1) ** 2
    elif stage == "head":
        hw = shapes["denseblock%d" % len(cfg.block_config)][2] ** 2
    else:
        # a transition's BN sees the dense block's output, before pooling
        src = stage.replace("transition", "denseblock") if stage.startswith("transition") else stage
        hw = shapes[src][2] * shapes[src][3]
    n = batch * hw
    var_u = (torch_new - 0.9 * old) / 0.1
    return 0.9 * old + 0.1 * var_u * (n - 1) / n


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("other", OTHERS)
def test_gradients_and_one_sgd_step(other, name):
    """One float64 SGD step (lr 0.1): the loss, the gradient of every trainable parameter it
    applied, and the new parameters and BatchNorm running statistics, against torch's."""
    cfg, state, x, ref, got = sgd_step(other, name)
    assert set(got["grads"]) == {n for n, _, k in spec.canonical_tensors(cfg) if k == "param"}
    assert_close(got["grads"], ref["grads"], compare.TRAIN_RTOL, f"{other} {name} grads",
                 floor=1e-8, zero=zero_gradients(cfg),
                 atol=zero_floor(x, ref["grads"], np.finfo(np.float64).eps))
    assert abs(got["loss"] - ref["loss"]) <= 1e-10 * max(1.0, abs(ref["loss"]))
    new, want = got["arrays"], dict(ref["arrays"])
    if other == "mxnet":
        # MXNet's BatchNorm op updates the running variance with the biased batch variance and
        # offers no option to change it (docs/conventions.md); everything else matches torch.
        for k in want:
            if k.endswith("running_var"):
                want[k] = _biased_update(cfg, k, x.shape[0], x.shape[2], state[k], want[k])
    assert_close(new, want, compare.TRAIN_RTOL, f"{other} {name} sgd step", floor=1e-8)
    # The step did something: parameters and running statistics moved.
    assert not np.allclose(new["classifier.weight"], state["classifier.weight"])
    assert not np.allclose(new["features.norm0.running_mean" if cfg.stem == "imagenet" else
                               "features.denseblock1.denselayer1.norm1.running_mean"],
                           state["features.norm0.running_mean" if cfg.stem == "imagenet" else
                                 "features.denseblock1.denselayer1.norm1.running_mean"])


@pytest.mark.parametrize("name", ["book", "densenet121", "densenet_bc100"])
def test_round_trip_torch_mxnet_flax_torch_is_bit_exact(name):
    cfg, state, _, _, _ = reference(name)
    cur = state
    for b in ["torch", "mxnet", "flax-nnx", "flax-linen", "torch"]:
        cur = get_backend(b).call("roundtrip", config=cfg.to_dict(), state=cur)["arrays"]
    assert set(cur) == set(state)
    for k in state:
        assert cur[k].dtype == np.float32 and np.array_equal(cur[k], state[k]), k


def test_loading_a_wrong_state_names_every_problem_and_loads_nothing(backend):
    cfg = spec.get_preset("book")
    state = get_backend("torch").call("init_state", config=cfg.to_dict(), seed=3)["arrays"]
    state = {k: v + 1.0 for k, v in state.items()}
    state.pop("features.conv0.bias")
    state["features.norm0.weight"] = np.ones(65, np.float32)
    state["features.bogus.weight"] = np.ones(3, np.float32)
    err = backend.call("load_error", config=cfg.to_dict(), state=state)
    assert err is not None and err["type"] == "StateMismatchError", err
    assert "missing:    features.conv0.bias (expected shape (64,))" in err["message"]
    assert "misshapen:  features.norm0.weight: expected (64,), found (65,)" in err["message"]
    assert "unexpected: features.bogus.weight (shape (3,))" in err["message"]
    assert err["unchanged"], f"{backend.name} changed its weights although loading failed"


def test_old_style_torchvision_keys_load_in_every_backend(backend):
    cfg = spec.get_preset("densenet_bc100")
    state = get_backend("torch").call("init_state", config=cfg.to_dict(), seed=4)["arrays"]
    import re
    old = {re.sub(r"(denselayer\d+\.)(norm|conv)([12])\.", r"\1\2.\3.", k): v for k, v in state.items()}
    assert old != state
    back = backend.call("roundtrip", config=cfg.to_dict(), state=old)["arrays"]
    assert all(np.array_equal(back[k], state[k]) for k in state)


def test_eval_forward_at_an_odd_size(backend):
    """Pooling edge cases: at 45 px the stem's padded 3x3/2 max pool takes an odd map (23 -> 12)
    and the last transition's 2x2 average pool drops a row and a column (3 -> 1)."""
    cfg, state, _, _, _ = reference("book")
    x = np.random.default_rng(5).standard_normal((2, 1, 45, 45)).astype(np.float32)
    ref = get_backend("torch").call("forward", config=cfg.to_dict(), state=state, x=x)
    got = backend.call("forward", config=cfg.to_dict(), state=state, x=x)
    assert ref["arrays"]["transition3"].shape == (2, 120, 1, 1)
    assert_close(got["arrays"], ref["arrays"], compare.EVAL_RTOL, f"{backend.name} book at 45")


def check_dropout(backend, cfg, state, x, stage, new):
    """drop_rate 0.5 on ``cfg`` (a preset of either family, its own drop_rate ignored), with
    torch's ``state``: eval mode computes exactly the network without dropout; training zeroes
    about half of the first layer's *new* features (``new``: their slice of ``stage``'s output,
    on axis 1) and doubles the rest (inverted dropout in all three frameworks; the masks come
    from each framework's own RNG). Exact zeros and exact doubling pin dropout to the layer's
    output: dropout before its last linear map (a bottleneck's 3x3 conv2, say) would leave few
    exact zeros and no exact doubling."""
    plain = dict(cfg.to_dict(), drop_rate=0.0)
    drop = dict(cfg.to_dict(), drop_rate=0.5)
    ev = backend.call("forward", config=drop, state=state, x=x)["arrays"]
    ev_ref = get_backend("torch").call("forward", config=plain, state=state, x=x)["arrays"]
    assert_close(ev, ev_ref, compare.EVAL_RTOL, f"{backend.name} {cfg.name} eval with dropout")
    tr = backend.call("forward", config=drop, state=state, x=x, train=True)["arrays"]
    tr_ref = backend.call("forward", config=plain, state=state, x=x, train=True)["arrays"]
    # The first layer's new features see the same input with and without dropout.
    got, base = tr[stage][:, new], tr_ref[stage][:, new]
    assert np.mean(base == 0) < 0.01  # a zero below comes from dropout, not from the layer
    zeros = np.mean(got == 0)
    assert 0.4 < zeros < 0.6, f"{backend.name}: {zeros:.2f} of the new features dropped, not ~0.5"
    kept = got != 0
    np.testing.assert_allclose(got[kept], 2.0 * base[kept], rtol=1e-5, atol=1e-6)


def test_dropout_inactive_in_eval_and_inverted_in_training(backend):
    """The book's plain layer (BN-ReLU-3x3 conv, then dropout): its new channels are 64..95."""
    cfg, state, _, _, _ = reference("book")
    x = np.random.default_rng(6).standard_normal((4, 1, 32, 32)).astype(np.float32)
    check_dropout(backend, cfg, state, x, "denseblock1", slice(64, 96))


def test_dropout_in_a_bottleneck_layer_follows_its_3x3_conv(backend):
    """The paper's bottleneck layer (BN-ReLU-1x1 conv-BN-ReLU-3x3 conv) with dropout after the
    3x3 conv2, on the new features, as torchvision's _DenseLayer: no preset has drop_rate > 0,
    so this is the only test of where a bottleneck's dropout sits. DenseNet-BC-100's layer at
    8 px; its first layer's new channels are 24..35."""
    cfg = spec.make_config("densenet_bc100", block_config=(2, 1, 1))
    state = get_backend("torch").call("init_state", config=cfg.to_dict(), seed=2)["arrays"]
    x = np.random.default_rng(8).standard_normal((8, 3, 8, 8)).astype(np.float32)
    check_dropout(backend, cfg, state, x, "denseblock1", slice(24, 36))


@pytest.mark.parametrize("other", OTHERS)
def test_max_pool_transitions_match_torch(other):
    """transition_pool='max' (exercise 1): the eval forward of every stage and one float64 SGD
    step against torch's, as for the presets; and the option is real: with the same weights
    each transition's output is at least the average pool's (a max is at least a mean), and
    differs from it."""
    cfg, state, x, labels, ref = reference("book", transition_pool="max")
    b = get_backend(other)
    got = b.call("forward", config=cfg.to_dict(), state=state, x=x, train=False)["arrays"]
    assert_close(got, ref["arrays"], compare.EVAL_RTOL, f"{other} book max-pool eval")
    avg = dict(cfg.to_dict(), transition_pool="avg")
    mean = b.call("forward", config=avg, state=state, x=x, train=False)["arrays"]["transition1"]
    assert np.all(got["transition1"] >= mean - 1e-6) and not np.allclose(got["transition1"], mean)
    _, _, _, _, step_ref = reference("book", what="train_step", dtype="float64",
                                     transition_pool="max")
    step = b.call("train_step", config=cfg.to_dict(), state=state, x=x, labels=labels, lr=0.1,
                  dtype="float64")
    assert abs(step["loss"] - step_ref["loss"]) <= 1e-10 * max(1.0, abs(step_ref["loss"]))
    assert_close(step["grads"], step_ref["grads"], compare.TRAIN_RTOL, f"{other} max-pool grads",
                 floor=1e-8, zero=zero_gradients(cfg),
                 atol=zero_floor(x, step_ref["grads"], np.finfo(np.float64).eps))


def test_a_program_compiled_in_pieces_computes_what_one_program_does():
    """densenet_flax.runtime.jit_in_pieces (the Flax float64 steps and forwards, Keras' check):
    the equations JAX traced, as consecutive programs, give what jax.jit of the whole gives,
    for any number of pieces: pytrees in and out, a captured constant, an input returned as it
    is, a constant output, values that cross several pieces and values no later piece reads."""
    import jax
    import jax.numpy as jnp
    from densenet_flax.runtime import jit_in_pieces
    w = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)  # captured: a constant of the program

    def fn(tree, x):
        h = jnp.tanh(x @ w)  # read again at the end: crosses every piece
        unused = jnp.exp(h) * 3.0  # read by no one
        for i in range(6):
            h = jnp.sin(h * tree["scale"] + i) + jnp.cos(tree["shift"])
        g = jax.grad(lambda t: jnp.sum(jnp.tanh(x @ w * t) ** 2))(tree["scale"])
        del unused
        return {"out": h + jnp.tanh(x @ w), "grad": g, "x": x, "two": 2.0}, jnp.sum(h)

    rng = np.random.default_rng(0)
    tree = {"scale": jnp.asarray(rng.standard_normal(4)),
            "shift": jnp.asarray(rng.standard_normal(4))}
    x = jnp.asarray(rng.standard_normal((5, 3)))
    want = jax.jit(fn)(tree, x)
    counts = set()
    for pieces in (1, 2, 3, 7, 1000):
        program = jit_in_pieces(fn, tree, x, pieces=pieces, threads=2, reuse=True)
        counts.add(program.pieces)
        got = program(tree, x)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert np.shape(g) == np.shape(e)
            np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-6, atol=1e-6)
        # a second call of the same program, other numbers
        tree2 = {k: v + 0.5 for k, v in tree.items()}
        for g, e in zip(jax.tree.leaves(program(tree2, x)), jax.tree.leaves(jax.jit(fn)(tree2, x))):
            np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-6, atol=1e-6)
    assert min(counts) == 1 and len(counts) == 5, counts  # 1000: one piece per equation
    with pytest.raises(TypeError, match="traced for"):
        program(x, tree)
    # the same program traced again (NNX, then linen) runs the pieces compiled for its text,
    # with its own constants: another w, the same equations
    w = w * 2.0
    again = jit_in_pieces(fn, tree, x, pieces=1000, reuse=True)
    assert again.programs is program.programs  # not compiled again
    assert jit_in_pieces(fn, tree, x, pieces=1000).programs is not program.programs  # unasked
    for g, e in zip(jax.tree.leaves(again(tree, x)), jax.tree.leaves(jax.jit(fn)(tree, x))):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-6, atol=1e-6)


def test_a_piece_is_lowered_as_jax_jit_lowers_it_without_tracing_it_again(monkeypatch):
    """jit_in_pieces lowers each piece from the equations it holds (densenet_flax.runtime's
    _lower, JAX's Traced stage built around them): the same module, text for text, as
    ``jax.jit(jaxpr_as_fun(piece)).lower``, which traces every equation again; and on this
    JAX without that public path (jax.jit made to fail after the one template it traces)."""
    import jax
    import jax.numpy as jnp
    from jax.extend import core as jcore
    from densenet_flax import runtime

    def fn(tree, x):
        y = jnp.tanh(x @ tree["w"]) + jnp.arange(4.0)  # a captured constant
        return {"y": y, "relu": jax.nn.relu(y) * tree["b"], "sum": jnp.sum(y ** 2)}, x

    tree = {"w": jnp.ones((3, 4)), "b": jnp.float32(2.0)}
    j = jax.make_jaxpr(fn)(tree, jnp.ones((5, 3))).jaxpr
    ins = [*j.constvars, *j.invars]
    piece = jcore.ClosedJaxpr(jcore.Jaxpr([], ins, j.outvars, j.eqns, j.effects,
                                          runtime._debug_info(j.debug_info, ins, j.outvars)),
                              [])
    shapes = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in ins]
    public = jax.jit(jcore.jaxpr_as_fun(piece)).lower(*shapes).as_text()
    runtime._template()

    def no_jit(*a, **k):
        raise AssertionError("_lower took the public path (traced the piece again)")
    monkeypatch.setattr(jax, "jit", no_jit)
    lowered = runtime._lower(piece, shapes)
    assert lowered.as_text() == public
    monkeypatch.undo()
    out = lowered.compile()(*[jnp.full(s.shape, 0.5, s.dtype) for s in shapes])
    want = jcore.jaxpr_as_fun(piece)(*[jnp.full(s.shape, 0.5, s.dtype) for s in shapes])
    assert all(np.array_equal(a, b) for a, b in zip(out, want))


def test_nnx_and_linen_trace_the_same_float64_step():
    """The Flax adapter's train step differentiates one forward program for both variants,
    equation for equation, so the second variant runs the step compiled for the first (by the
    forward's text: densenet_flax/adapter.py); a BatchNorm that differs in one equation
    (linen's running statistics without NNX's stop_gradient) doubled the giants' compiling."""
    import jax
    from flax import nnx
    from densenet_flax import adapter
    cfg = spec.make_config("book", block_config=(2, 2))
    state = get_backend("torch").call("init_state", config=cfg.to_dict(), seed=1)["arrays"]
    x = np.zeros((2, cfg.in_channels, 32, 32), np.float32)
    with adapter._numerics("float64"):
        xs, ys = adapter._nhwc(x, "float64"), adapter._targets(np.zeros(2, np.int64), "float64")
        model = adapter._loaded(cfg.to_dict(), state, False, dtype="float64")
        model.train()
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        nnx_args = (nnx.to_pure_dict(params), nnx.to_pure_dict(rest), xs, ys)
        nnx_jaxpr = jax.make_jaxpr(adapter._forward_fn(graphdef))(*nnx_args)
        module, variables = adapter._loaded(cfg.to_dict(), state, False, "linen", "float64")
        linen_args = (variables["params"], variables["batch_stats"], xs, ys)
        linen_jaxpr = jax.make_jaxpr(adapter._forward_fn(module))(*linen_args)
        a, b = nnx_jaxpr.jaxpr.eqns, linen_jaxpr.jaxpr.eqns
        first = next((i for i, (e, f) in enumerate(zip(a, b)) if str(e) != str(f)), None)
        assert first is None and len(a) == len(b), (
            f"{len(a)} and {len(b)} equations; the first that differs, #{first}: "
            f"{a[first] if first is not None else ''} / {b[first] if first is not None else ''}")
        adapter._STEPS.clear()
        nnx_out = adapter._train_program(graphdef, *nnx_args)(*nnx_args)
        steps = list(adapter._STEPS.values())
        linen_out = adapter._train_program(module, *linen_args)(*linen_args)
        assert list(adapter._STEPS.values()) == steps and len(steps) == 1, \
            "linen compiled a step of its own"
        assert jax.tree.structure(nnx_out) == jax.tree.structure(linen_out)
        assert all(np.array_equal(u, v) for u, v in zip(jax.tree.leaves(nnx_out),
                                                       jax.tree.leaves(linen_out)))
