"""densenet_spec checked against published figures and its own invariants."""
import dataclasses

import pytest

import densenet_spec as spec


def test_book_dense_block_example_arithmetic():
    # The book: DenseBlock(2 convs, 10 channels) on 3 channels gives 3 + 2 x 10 = 23.
    p = spec.make_config("book", block_config=(2,), growth_rate=10, num_init_features=3)
    assert spec.stage_channels(p)[1] == ("denseblock1", 23)


def test_book_channels_per_stage_and_248_final_features():
    p = spec.get_preset("book")
    assert [c for _, c in spec.stage_channels(p)] == [64, 192, 96, 224, 112, 240, 120, 248, 10]
    assert spec.final_features(p) == 248


@pytest.mark.parametrize("name, params", [
    ("densenet121", 7_978_856), ("densenet161", 28_681_000),
    ("densenet169", 14_149_480), ("densenet201", 20_013_928)])
def test_torchvision_published_parameter_counts(name, params):
    assert spec.total_counts(spec.get_preset(name))[0] == params


@pytest.mark.parametrize("name, millions", [
    ("densenet40", 1.0), ("densenet_bc100", 0.8), ("densenet_bc250", 15.3), ("densenet_bc190", 25.6)])
def test_paper_table2_cifar_parameter_counts(name, millions):
    # Huang et al. 2017, Table 2, rounded to 0.1M.
    assert round(spec.total_counts(spec.get_preset(name))[0] / 1e6, 1) == millions


@pytest.mark.parametrize("name, depth", [
    ("densenet121", 121), ("densenet161", 161), ("densenet169", 169), ("densenet201", 201),
    # The paper's DenseNet-264 block config (6, 12, 64, 48) counts 265 layers this way: the
    # name is off by one in the paper itself; we keep the paper's configuration.
    ("densenet264", 265), ("densenet40", 40), ("densenet_bc100", 100), ("densenet_bc250", 250),
    ("densenet_bc190", 190)])
def test_preset_depth_matches_its_name(name, depth):
    # Depth L counts conv and dense layers: stem conv, 1 or 2 per dense layer, transitions, classifier.
    p = spec.get_preset(name)
    per_layer = 1 if p.bn_size is None else 2
    assert 1 + per_layer * sum(p.block_config) + (len(p.block_config) - 1) + 1 == depth


def test_every_preset_has_a_source_and_is_valid():
    for p in spec.iter_presets():
        assert spec.validate(p) is p
        assert len(p.source) > 40 and ("Huang" in p.source or "Dive into Deep Learning" in p.source)


def test_minimum_input_sizes():
    assert spec.min_input_size(spec.get_preset("book")) == 29
    assert spec.min_input_size(spec.get_preset("densenet121")) == 29
    assert spec.min_input_size(spec.get_preset("densenet_bc100")) == 4
    # At the minimum the last stage is 1x1; one pixel less and the last transition has nothing.
    shapes = dict(spec.stage_shapes(spec.get_preset("book"), 1, 29, 29))
    assert shapes["denseblock4"][2:] == (1, 1)


def test_stage_shapes_book_96():
    shapes = dict(spec.stage_shapes(spec.get_preset("book"), 4, 96, 96))
    assert shapes["stem"] == (4, 64, 24, 24)
    assert shapes["transition1"] == (4, 96, 12, 12)
    assert shapes["denseblock4"] == (4, 248, 3, 3)
    assert shapes["head"] == (4, 10)


def test_canonical_names_follow_torchvision():
    names = [n for n, _, _ in spec.canonical_tensors(spec.get_preset("densenet121"))]
    assert names[:6] == ["features.conv0.weight", "features.norm0.weight", "features.norm0.bias",
                         "features.norm0.running_mean", "features.norm0.running_var",
                         "features.denseblock1.denselayer1.norm1.weight"]
    assert "features.denseblock4.denselayer16.conv2.weight" in names
    assert "features.transition3.conv.weight" in names
    assert names[-2:] == ["classifier.weight", "classifier.bias"]
    assert "features.norm5.running_var" in names
    assert not any(n.endswith(".bias") and ".conv" in n for n in names)  # bias-free BC convs


def test_book_has_conv_biases_and_no_bottleneck():
    shapes = {n: s for n, s, _ in spec.canonical_tensors(spec.get_preset("book"))}
    assert shapes["features.conv0.weight"] == (64, 1, 7, 7)
    assert shapes["features.conv0.bias"] == (64,)
    assert shapes["features.denseblock1.denselayer4.conv1.weight"] == (32, 64 + 3 * 32, 3, 3)
    assert not any(".norm2." in n for n in shapes)


def test_stage_counts_sum_to_totals():
    for p in spec.iter_presets():
        rows = spec.stage_counts(p)
        assert [r[0] for r in rows] == spec.stage_names(p)
        assert (sum(r[1] for r in rows), sum(r[2] for r in rows)) == spec.total_counts(p)


@pytest.mark.parametrize("overrides, match", [
    ({"growth_rate": 0}, "growth_rate must be a positive integer, got 0"),
    ({"growth_rate": -3}, "growth_rate must be a positive integer"),
    ({"block_config": (4, 0)}, r"block_config\[1\] \(layers in dense block 2\) must be a positive"),
    ({"block_config": ()}, "block_config must be a non-empty sequence"),
    ({"compression": 0.0}, r"compression must be in \(0, 1\]"),
    ({"drop_rate": 1.0}, r"drop_rate must be in \[0, 1\)"),
    ({"stem": "resnet"}, "stem must be one of"),
    ({"transition_pool": "min"}, r"transition_pool must be one of \('avg', 'max'\).*got 'min'"),
    ({"in_channels": 0}, "in_channels must be a positive integer"),
    ({"grwoth_rate": 12}, "unknown DenseNet option"),
])
def test_bad_configs_are_refused_with_a_clear_message(overrides, match):
    with pytest.raises(spec.DenseNetConfigError, match=match):
        spec.make_config("book", **overrides)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(spec.DenseNetConfigError, match="unknown DenseNet preset 'densenet122'.*densenet121"):
        spec.get_preset("densenet122")


@pytest.mark.parametrize("shape, match", [
    ((1, 96, 96), "4-D batch of images.*3 dimension.*add a batch dimension"),
    ((2, 3, 96, 96), "expects 1 input channel"),
    ((2, 1, 28, 28), "28x28 is too small.*at least 29x29"),
    ((2, 1, 96, 20), "96x20 is too small"),
])
def test_bad_inputs_are_refused(shape, match):
    with pytest.raises(spec.DenseNetInputError, match=match):
        spec.check_input(spec.get_preset("book"), shape)


def test_nhwc_channel_check_names_the_layout():
    with pytest.raises(spec.DenseNetInputError, match=r"axis 3 of \(N, H, W, C\) \(NHWC\)"):
        spec.check_input(spec.get_preset("book"), (2, 96, 96, 3), layout="NHWC")


def test_check_state_reports_every_problem_by_name():
    p = spec.get_preset("book")
    shapes = {n: s for n, s, _ in spec.canonical_tensors(p)}
    del shapes["features.conv0.bias"]
    shapes["features.norm0.weight"] = (65,)
    shapes["extra.weight"] = (3,)
    with pytest.raises(spec.StateMismatchError) as e:
        spec.check_state(p, shapes)
    msg = str(e.value)
    assert "missing:    features.conv0.bias (expected shape (64,))" in msg
    assert "misshapen:  features.norm0.weight: expected (64,), found (65,)" in msg
    assert "unexpected: extra.weight (shape (3,))" in msg
    assert "nothing was loaded" in msg


def test_legacy_torchvision_keys_are_remapped():
    old = {"features.denseblock1.denselayer1.norm.1.weight": 1,
           "features.denseblock1.denselayer1.conv.2.weight": 2, "classifier.bias": 3}
    assert spec.remap_legacy_keys(old) == {
        "features.denseblock1.denselayer1.norm1.weight": 1,
        "features.denseblock1.denselayer1.conv2.weight": 2, "classifier.bias": 3}


def test_preset_round_trips_through_dict():
    for p in spec.iter_presets():
        assert spec.Preset.from_dict(p.to_dict()) == p
    assert dataclasses.replace(spec.get_preset("book")).options()["block_config"] == (4, 4, 4, 4)


def test_transition_pool_defaults_to_average_and_changes_no_count():
    # Every preset keeps the paper's average pool; a dict written before the option existed
    # (no 'transition_pool') reads as before; max pooling has no parameters to add.
    assert {p.transition_pool for p in spec.iter_presets("conv")} == {"avg"}
    old = spec.get_preset("densenet121").to_dict()
    del old["transition_pool"]
    assert spec.config_from_dict(old) == spec.get_preset("densenet121")
    for name in ("book", "densenet121"):
        avg, mx = spec.get_preset(name), spec.make_config(name, transition_pool="max")
        assert mx.options()["transition_pool"] == "max"
        assert spec.total_counts(mx) == spec.total_counts(avg)
        assert spec.stage_shapes(mx, 2, 64, 64) == spec.stage_shapes(avg, 2, 64, 64)
        assert spec.Preset.from_dict(mx.to_dict()) == mx
