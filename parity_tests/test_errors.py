"""Bad input gets a clear error in every backend, raised before the framework sees it."""
import pytest

import densenet_spec as spec

BOOK = spec.get_preset("book").to_dict()


@pytest.mark.parametrize("shape, match", [
    ([2, 3, 96, 96], "expects 1 input channel"),
    ([1, 96, 96], "4-D batch of images"),
    ([2, 1, 1, 96, 96], "4-D batch of images"),
    ([2, 1, 28, 28], "28x28 is too small for DenseNet 'book'.*at least 29x29"),
    ([2, 1, 96, 16], "96x16 is too small"),
])
def test_bad_input_shapes(backend, shape, match):
    err = backend.call("input_error", config=BOOK, shape=shape)
    assert err is not None, f"{backend.name} accepted input of shape {shape}"
    assert err["type"] == "DenseNetInputError", err
    import re
    assert re.search(match, err["message"]), err["message"]


def test_good_input_raises_nothing(backend):
    assert backend.call("input_error", config=BOOK, shape=[1, 1, 29, 29]) is None


def test_unknown_preset(backend):
    err = backend.call("layer_error", kind="preset", args=["densenet122"])
    assert err["type"] == "DenseNetConfigError"
    assert "unknown DenseNet preset 'densenet122'" in err["message"]


@pytest.mark.parametrize("options, match", [
    ({"growth_rate": 0}, "growth_rate must be a positive integer, got 0"),
    ({"block_config": (4, 0, 4)}, r"block_config\[1\]"),
    ({"num_classes": -1}, "num_classes must be a positive integer"),
    ({"transition_pool": "sum"}, r"transition_pool must be one of \('avg', 'max'\)"),
])
def test_bad_network_options(backend, options, match):
    import re
    err = backend.call("layer_error", kind="DenseNet", args=[options])
    assert err is not None and err["type"] == "DenseNetConfigError", err
    assert re.search(match, err["message"]), err["message"]


def _book_args(backend, kind, num_convs, input_channels, num_channels):
    """The book's arguments for this framework: PyTorch and Flax NNX take input channels,
    Gluon and Flax linen infer them."""
    infers = backend.name in ("mxnet", "flax-linen")
    if kind == "conv_block":
        return [num_channels] if infers else [input_channels, num_channels]
    if kind == "DenseBlock":
        return [num_convs, num_channels] if infers else [num_convs, input_channels, num_channels]
    return [num_channels] if infers else [input_channels, num_channels]


@pytest.mark.parametrize("kind, num_convs, num_channels, match", [
    ("DenseBlock", 0, 10, "num_convs must be a positive integer, got 0"),
    ("DenseBlock", 2, 0, r"num_channels must be a positive integer, got 0"),
    ("DenseBlock", 2, -4, r"num_channels must be a positive integer"),
    ("conv_block", None, 0, r"num_channels must be a positive integer"),
    ("transition_block", None, 0, r"num_channels must be a positive integer"),
])
def test_bad_layer_arguments(backend, kind, num_convs, num_channels, match):
    import re
    err = backend.call("layer_error", kind=kind,
                       args=_book_args(backend, kind, num_convs, 3, num_channels))
    assert err is not None, f"{backend.name} {kind} accepted a bad argument"
    assert err["type"] == "DenseNetConfigError", err
    assert re.search(match, err["message"]), err["message"]


def test_bad_transition_pool_is_refused_by_transition_block(backend):
    # transition_block(..., bias, pool) in every framework: the book's arguments, then these two.
    err = backend.call("layer_error", kind="transition_block",
                       args=_book_args(backend, "transition_block", None, 3, 10) + [True, "sum"])
    assert err is not None and err["type"] == "DenseNetConfigError", err
    assert "pool must be one of ('avg', 'max')" in err["message"] and "'sum'" in err["message"]
