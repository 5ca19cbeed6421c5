"""Memory-efficient mode (recompute concat + first BN-ReLU-conv in the backward pass): same
outputs, same gradients, and exactly one BatchNorm running-statistics update per step.
A backend whose framework cannot do it must say so with a clear error, not fake it.

Gradients and steps are compared in float64 (as test_numeric.py's): the recomputation runs in
the backward pass's program and rounds differently from the forward pass, and float32
train-mode BatchNorm at random initialisation amplifies that to ~1e-5 (Flax compiles its step
as consecutive pieces, densenet_flax/adapter.py: where a piece ends rounds too). In float64
the two modes agree to ~1e-12, so the tolerances below are a tighter test than in float32."""
import numpy as np
import pytest

import densenet_spec as spec
from densenet_parity import compare
from parity_tests.conftest import get_backend


def _setup(name, size, blocks=None):
    cfg = spec.get_preset(name) if blocks is None else spec.make_config(name, block_config=blocks)
    state = get_backend("torch").call("init_state", config=cfg.to_dict(), seed=5)["arrays"]
    rng = np.random.default_rng(11)
    x = rng.standard_normal((3, cfg.in_channels, size, size)).astype(np.float32)
    labels = rng.integers(0, cfg.num_classes, 3).astype(np.int64)
    return cfg, state, x, labels


#: The plain layer (the book) and the bottleneck layer with compression (DenseNet-BC-100's
#: layout, three layers a block instead of sixteen: every layer kind, every stage and a
#: three-way concatenation recomputed, at a third of the compile time of the float64 steps).
@pytest.mark.parametrize("name, size, blocks", [
    pytest.param("book", 32, None, id="book-32"),
    pytest.param("densenet_bc100", 16, (3, 3, 3), id="densenet_bc100-3x3-16")])
def test_memory_efficient_equals_naive(backend, name, size, blocks):
    cfg, state, x, labels = _setup(name, size, blocks)
    reason = backend.call("info")["memory_efficient"]
    kw = dict(config=cfg.to_dict(), state=state, x=x, labels=labels)
    if reason is not None:
        from densenet_parity.backends import BackendError
        with pytest.raises(BackendError) as e:
            backend.call("gradients", memory_efficient=True, **kw)
        assert reason in e.value.message
        return
    naive = backend.call("gradients", memory_efficient=False, dtype="float64", **kw)
    eff = backend.call("gradients", memory_efficient=True, dtype="float64", **kw)
    assert eff["loss"] == pytest.approx(naive["loss"], rel=1e-6)
    # The conv biases before a BatchNorm have an exact gradient of 0 (their float64 values are
    # rounding noise): each tensor is compared relative to at least 1e-8 of the largest
    # gradient, as in test_numeric.py.
    floor = 1e-8 * max(float(np.max(np.abs(g))) for g in naive["arrays"].values())
    for k, g in naive["arrays"].items():
        diff = compare.abs_diff(eff["arrays"][k], g)
        assert diff / max(float(np.max(np.abs(g))), floor) <= 1e-5, k
    out_naive = backend.call("forward", config=cfg.to_dict(), state=state, x=x, train=True)
    out_eff = backend.call("forward", config=cfg.to_dict(), state=state, x=x, train=True,
                           memory_efficient=True)
    for k, v in out_naive["arrays"].items():
        assert compare.rel_diff(out_eff["arrays"][k], v) <= 1e-6, k


def test_memory_efficient_updates_batchnorm_statistics_once(backend):
    cfg, state, x, labels = _setup("book", 32)
    kw = dict(config=cfg.to_dict(), state=state, x=x, labels=labels, lr=0.1)
    reason = backend.call("info")["memory_efficient"]
    if reason is not None:
        # No such mode in this framework: asking for it is a clear error, never a silent no-op.
        from densenet_parity.backends import BackendError
        with pytest.raises(BackendError) as e:
            backend.call("train_step", memory_efficient=True, **kw)
        assert reason in e.value.message
        return
    naive = backend.call("train_step", memory_efficient=False, dtype="float64", **kw)["arrays"]
    eff = backend.call("train_step", memory_efficient=True, dtype="float64", **kw)["arrays"]
    name = "features.denseblock2.denselayer3.norm1"
    old_mean = state[f"{name}.running_mean"]
    # One update moves the running mean by 0.1 * (batch mean - old); two would move it by 0.19.
    step = naive[f"{name}.running_mean"] - old_mean
    assert np.max(np.abs(step)) > 1e-4
    for k in state:
        if k.endswith(("running_mean", "running_var")):
            assert compare.rel_diff(eff[k], naive[k]) <= 1e-6, k
        else:
            assert compare.rel_diff(eff[k], naive[k]) <= 1e-5, k


@pytest.mark.parametrize("framework", ["torch", "flax-nnx", "flax-linen"])
def test_memory_efficient_keeps_at_most_half_for_the_backward_pass(framework):
    """What the framework keeps from the forward pass for the backward pass (torch: saved
    tensors; JAX: jax.vjp residuals; parameters excluded), DenseNet-121: the mode's purpose is
    to drop the concatenations and first BN-ReLU outputs, which are most of it (measured at
    224 px, batch 4: torch 0.48, Flax 0.44; docs/performance/). Independent of the machine:
    on the CPU, XLA merges jax.checkpoint's recomputation back into the forward pass (it
    removes the optimization barriers), so there the compiled Flax step does not shrink."""
    pytest.importorskip("jax" if framework.startswith("flax") else "torch")
    from benchmarks import saved_for_backward as sfb
    r = sfb.measure(framework, "densenet121", 64, 2)
    assert r["naive_bytes"] > 0 and r["efficient_bytes"] > 0
    assert r["ratio"] <= 0.5, r
