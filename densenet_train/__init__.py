"""``python -m densenet_train``: train a DenseNet with the book's recipe in PyTorch, MXNet Gluon
or Flax NNX. See densenet_train.cli and docs/training.md."""
from densenet_train.cli import main

__all__ = ["main"]
