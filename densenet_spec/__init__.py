"""densenet_spec: what a DenseNet *is*, independent of any framework.

Pure Python (no numpy, no framework), importable from both environments. Two families: the
convolutional one (the book's model, the paper's DenseNet / DenseNet-BC) and the MLP DenseNet of
the chapter's exercise 5 (the forum's house-price model). One idea a module:

* ``presets``    the presets of both families (``Preset``, ``MLPPreset``) and their constants,
* ``arithmetic`` the channel (width) and spatial arithmetic per stage, in numbers and in words,
* ``validation`` validation of configurations, with the error messages every backend raises,
* ``shapes``     whether an input can go through a preset (the message every backend raises
                 when it cannot) and each stage's output shape,
* ``names``      the canonical tensor names (torchvision's DenseNet keys) with their
                 PyTorch-layout shapes, from which the analytic parameter and BatchNorm-state
                 counts follow; checks of a canonical state,
* ``factory``    importing a user's own model factory,
* ``sites``      where the user's code built each layer while a factory ran (``built at
                 FILE:LINE`` in the check's report; each mirror names its framework's hooks).
* ``optim``      a training recipe as data (optimiser, weight decay, schedule), its grammar
                 and PyTorch's meaning of it.

``import densenet_spec as spec`` gives all of it; the parity suite uses it as its oracle and
the backends read their presets from it.
"""
from __future__ import annotations

from densenet_spec.arithmetic import (final_features, input_shape, min_input_size,
                                      module_arithmetic, stage_channels, stage_names,
                                      transition_channels)
from densenet_spec.factory import call_factory
from densenet_spec.optim import (GRAMMAR as RECIPE_GRAMMAR, Recipe, RecipeError,
                                 decayed_names, lr_at, parse_recipe)
from densenet_spec.names import (StateMismatchError, canonical_modules, canonical_tensors,
                                 check_state, infer_config, remap_legacy_keys, stage_counts,
                                 stage_of, total_counts)
from densenet_spec.presets import (BN_EPS, FAMILIES, PRESETS, STEMS, TORCH_BN_MOMENTUM,
                                   TRANSITION_POOLS,
                                   DenseNetConfigError, DenseNetInputError, MLPPreset, Preset,
                                   config_from_dict, get_preset, iter_presets, preset_builder,
                                   preset_names)
from densenet_spec.shapes import check_input, stage_shapes
from densenet_spec.validation import (check_devices, check_layer_args,
                                      config_from_options, is_mlp, make_config, validate)

__all__ = [
    "DenseNetConfigError", "DenseNetInputError", "Preset", "MLPPreset", "PRESETS", "STEMS",
    "FAMILIES", "preset_names", "get_preset", "make_config", "config_from_options",
    "config_from_dict", "stage_names", "stage_channels", "stage_shapes", "input_shape",
    "min_input_size", "check_input", "canonical_tensors", "stage_of", "stage_counts",
    "total_counts", "BN_EPS", "TORCH_BN_MOMENTUM", "StateMismatchError", "check_state",
    "remap_legacy_keys", "infer_config", "canonical_modules", "module_arithmetic",
    "call_factory", "check_devices", "validate", "check_layer_args", "transition_channels",
    "final_features", "preset_builder", "iter_presets", "is_mlp", "TRANSITION_POOLS",
    "Recipe", "RecipeError", "parse_recipe", "lr_at", "decayed_names", "RECIPE_GRAMMAR",
]
