"""The forum's MLP DenseNet for the house-price data (the chapter's exercise 5), as a reader typed
it into the DenseNet thread (seed 004): names, layout and order as written there. ``net`` is the
forum's network; ``transition_keeps_width`` has one porting bug (its second transition keeps the
block's width instead of halving it)."""
import torch
from torch import nn


def conv_block_mlp(input_channels, num_channels):
    return nn.Sequential(
        nn.BatchNorm1d(input_channels), nn.ReLU(),
        nn.Linear(input_channels, num_channels)
    )


class DenseBlock_mlp(nn.Module):
    def __init__(self, num_convs, input_channels, num_channels) -> None:
        super().__init__()
        layer = []
        for i in range(num_convs):
            layer.append(conv_block_mlp(
                num_channels * i + input_channels, num_channels
            ))
        self.net = nn.Sequential(*layer)

    def forward(self, X):
        for blk in self.net:
            Y = blk(X)
            X = torch.cat((X, Y), dim=1)
        return X


def transition_block_mlp(input_channels, num_channels):
    return nn.Sequential(nn.BatchNorm1d(input_channels), nn.ReLU(),
                         nn.Linear(input_channels, num_channels), nn.ReLU()
                         )


def _net(halve=lambda i, c: c // 2):
    b1 = nn.Sequential(
        nn.Linear(330, 512), nn.ReLU(),
        nn.Linear(512, 1024), nn.ReLU()
    )
    # num_channels: the current width
    num_channels, growth_rate = 1024, 128
    num_convs_in_dense_blocks = [2, 2, 2, 2]
    blks = []
    for i, num_convs in enumerate(num_convs_in_dense_blocks):
        blks.append(DenseBlock_mlp(num_convs, num_channels, growth_rate))
        # the previous dense block's output width
        num_channels += num_convs * growth_rate
        # a transition between dense blocks halves the width
        if i != len(num_convs_in_dense_blocks) - 1:
            out = halve(i, num_channels)
            blks.append(transition_block_mlp(num_channels, out))
            num_channels = out
    return nn.Sequential(
        b1, *blks,
        nn.BatchNorm1d(num_channels), nn.ReLU(),
        nn.Linear(num_channels, 1))


def net():
    """net_ of the forum's listing (its head Linear(608, 1): 608 is the width computed here)."""
    return _net()


def transition_keeps_width():
    """The second transition keeps every feature: Linear(896, 896) where the forum's has
    Linear(896, 448)."""
    return _net(lambda i, c: c if i == 1 else c // 2)


def transition_without_relu():
    """The transitions' closing ReLU left out: BatchNorm1d-ReLU-Linear where the forum's
    transition is BatchNorm1d-ReLU-Linear-ReLU (transition_relu)."""
    model = _net()
    for blk in model:
        if isinstance(blk, nn.Sequential) and isinstance(blk[0], nn.BatchNorm1d) and len(blk) == 4:
            del blk[3]
    return model
