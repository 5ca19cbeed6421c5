"""Every backend builds the same network: the book's examples, per-stage shapes and channel
counts, trainable parameters and BatchNorm state, equal to the spec and to each other."""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import densenet_spec as spec
from densenet_parity import compare

IMAGENET = ["densenet121", "densenet161", "densenet169", "densenet201", "densenet264"]
CIFAR = ["densenet40", "densenet_bc100", "densenet_bc250", "densenet_bc190"]


def describe(b, cfg, batch, size, **kw):
    return b.call("describe", config=cfg.to_dict(), batch=batch, height=size, width=size, **kw)


def test_book_examples(backend):
    # DenseBlock(2 convs, 10 channels) on 4x3x8x8 -> 23 channels at 8x8; transition to 10 -> 4x4.
    ex = backend.call("book_examples")
    assert ex == {"dense_block": [4, 23, 8, 8], "transition": [4, 10, 4, 4]}


@pytest.mark.parametrize("size", [32, 96, 224, 61])
@pytest.mark.parametrize("batch", [1, 3])
def test_book_stages_match_spec(backend, size, batch):
    cfg = spec.get_preset("book")
    got = describe(backend, cfg, batch, size)
    assert compare.structure_problems(got, compare.expected_stages(cfg, batch, size, size)) == []


def test_book_at_28_is_too_small_in_every_backend(backend):
    # 28 -> 14 (conv) -> 7 (pool) -> 3 -> 1 -> 0: the third transition has nothing to pool.
    err = backend.call("input_error", config=spec.get_preset("book").to_dict(), shape=[2, 1, 28, 28])
    assert err["type"] == "DenseNetInputError"
    assert "28x28 is too small" in err["message"] and "at least 29x29" in err["message"]


def test_real_forward_agrees_with_abstract_evaluation(backend):
    cfg = spec.get_preset("book")
    assert describe(backend, cfg, 2, 64, abstract=False)["stages"] == \
        describe(backend, cfg, 2, 64, abstract=True)["stages"]


@pytest.mark.parametrize("name", IMAGENET)
@pytest.mark.parametrize("size", [224, 64])
def test_imagenet_presets_match_spec(backend, name, size):
    cfg = spec.get_preset(name)
    got = describe(backend, cfg, 2, size)
    assert compare.structure_problems(got, compare.expected_stages(cfg, 2, size, size)) == []


@pytest.mark.parametrize("name", CIFAR)
def test_cifar_presets_match_spec(backend, name):
    cfg = spec.get_preset(name)
    got = describe(backend, cfg, 2, 32)
    assert compare.structure_problems(got, compare.expected_stages(cfg, 2, 32, 32)) == []


@pytest.mark.parametrize("name, params", [
    ("densenet121", 7_978_856), ("densenet161", 28_681_000),
    ("densenet169", 14_149_480), ("densenet201", 20_013_928)])
def test_torchvision_parameter_counts_in_every_backend(backend, name, params):
    # Counted on the framework's own model, not taken from the spec.
    assert describe(backend, spec.get_preset(name), 1, 224)["params"] == params


@pytest.mark.parametrize("name", ["book", "densenet121", "densenet_bc100"])
def test_backends_agree_with_each_other(backends, name):
    cfg = spec.get_preset(name)
    size = 32 if cfg.stem == "cifar" else 96
    reports = [describe(b, cfg, 2, size)["stages"] for b in backends]
    assert all(r == reports[0] for r in reports[1:]), [b.name for b in backends]


configs = st.fixed_dictionaries({
    "block_config": st.lists(st.integers(1, 3), min_size=1, max_size=4).map(tuple),
    "growth_rate": st.integers(1, 12),
    "num_init_features": st.integers(1, 16),
    "bn_size": st.one_of(st.none(), st.integers(1, 4)),
    "compression": st.sampled_from([0.5, 1.0, 0.75]),
    "stem": st.sampled_from(["imagenet", "cifar"]),
    "in_channels": st.integers(1, 4),
    "num_classes": st.integers(1, 12),
    "conv_bias": st.booleans(),
    "transition_pool": st.sampled_from(["avg", "max"]),
})


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(options=configs, extra=st.integers(0, 40), batch=st.integers(1, 3))
def test_generated_configs_agree_across_backends(backends, options, extra, batch):
    cfg = spec.make_config("book", **options)
    size = spec.min_input_size(cfg) + extra
    expected = compare.expected_stages(cfg, batch, size, size)
    for b in backends:
        got = describe(b, cfg, batch, size)
        assert compare.structure_problems(got, expected) == [], b.name
