"""The book's PyTorch DenseNet (D2L, "Densely Connected Networks"), as a reader types it:
``net()`` is the book's ``nn.Sequential(b1, *blks, ...)``. The other functions are the same
listing with one porting bug each (``densenet check`` must name where)."""
import torch
from torch import nn


def conv_block(input_channels, num_channels):
    return nn.Sequential(
        nn.BatchNorm2d(input_channels), nn.ReLU(),
        nn.Conv2d(input_channels, num_channels, kernel_size=3, padding=1))


class DenseBlock(nn.Module):
    def __init__(self, num_convs, input_channels, num_channels):
        super(DenseBlock, self).__init__()
        layer = []
        for i in range(num_convs):
            layer.append(conv_block(num_channels * i + input_channels, num_channels))
        self.net = nn.Sequential(*layer)

    def forward(self, X):
        for blk in self.net:
            Y = blk(X)
            # Concatenate the input and output of each block on the channel dimension
            X = torch.cat((X, Y), dim=1)
        return X


def transition_block(input_channels, num_channels):
    return nn.Sequential(
        nn.BatchNorm2d(input_channels), nn.ReLU(),
        nn.Conv2d(input_channels, num_channels, kernel_size=1),
        nn.AvgPool2d(kernel_size=2, stride=2))


def net(head_pool=nn.AdaptiveAvgPool2d, halve_before_growth=(), bn_momentum=0.1, bn_eps=1e-5):
    b1 = nn.Sequential(
        nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3),
        nn.BatchNorm2d(64, momentum=bn_momentum), nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
    num_channels, growth_rate = 64, 32
    num_convs_in_dense_blocks = [4, 4, 4, 4]
    blks = []
    for i, num_convs in enumerate(num_convs_in_dense_blocks):
        blks.append(DenseBlock(num_convs, num_channels, growth_rate))
        block_input = num_channels
        num_channels += num_convs * growth_rate
        if i != len(num_convs_in_dense_blocks) - 1:
            out = block_input if i + 1 in halve_before_growth else num_channels // 2
            blks.append(transition_block(num_channels, out))
            num_channels = out
    model = nn.Sequential(
        b1, *blks,
        nn.BatchNorm2d(num_channels, momentum=bn_momentum), nn.ReLU(),
        head_pool((1, 1)),
        nn.Flatten(),
        nn.Linear(num_channels, 10))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum, m.eps = bn_momentum, bn_eps
    return model


def head_max_pool():
    """One of the source texts' copy error: global *max* pooling in the head."""
    return net(head_pool=nn.AdaptiveMaxPool2d)


def transition_keeps_block_input():
    """Channel arithmetic: the second transition maps to its dense block's *input* channels
    (224 -> 96 where the book maps 224 -> 112 = (96 + 4 x 32) // 2)."""
    return net(halve_before_growth=(2,))


def bn_momentum_as_gluon():
    """BatchNorm momentum 0.9 (Gluon's and Flax's 'keep 0.9' typed into PyTorch, where it
    means 'move 0.9 of the way')."""
    return net(bn_momentum=0.9)


def bn_eps_as_keras():
    """BatchNorm epsilon 1.001e-5, keras.applications' value, copied from a Keras DenseNet
    (the reference's is 1e-5): a float64 gradient notices."""
    return net(bn_eps=1.001e-5)


def head_max_pool_and_bn_momentum_as_gluon():
    """Two bugs: Gluon's BatchNorm momentum and the head's max pool. The settings must not
    excuse the pool: with them in the reference, the head still differs."""
    return net(head_pool=nn.AdaptiveMaxPool2d, bn_momentum=0.9)


def transition_without_batchnorm():
    """The first transition's BatchNorm left out: ReLU-1x1 conv-2x2 average pool, where the
    book's transition_block is BatchNorm-ReLU-1x1 conv-2x2 average pool."""
    model = net()
    del model[2][0]
    return model
