"""DenseNet in Flax (NHWC): Flax NNX in densenet_flax.model (the names below), the book's
Flax linen version in densenet_flax.linen (the same names)."""
from densenet_spec import DenseNetConfigError, DenseNetInputError
from densenet_flax.model import (DenseBlock, DenseNet, book, build, conv_block, densenet40,
                                 densenet121, densenet161, densenet169, densenet201, densenet264,
                                 densenet_bc100, densenet_bc190, densenet_bc250, house_mlp,
                                 mlp_block, mlp_transition_block, MLPDenseBlock, MLPDenseNet,
                                 transition_block)

__all__ = ["conv_block", "DenseBlock", "transition_block", "DenseNet", "build", "book",
           "densenet121", "densenet161", "densenet169", "densenet201", "densenet264",
           "densenet40", "densenet_bc100", "densenet_bc250", "densenet_bc190",
           "mlp_block", "MLPDenseBlock", "mlp_transition_block", "MLPDenseNet", "house_mlp",
           "DenseNetConfigError", "DenseNetInputError"]
