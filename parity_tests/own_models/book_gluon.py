"""The book's Gluon DenseNet (D2L's MXNet edition), as a reader types it: input channels are
inferred (``DenseBlock(num_convs, num_channels)``), the blocks concatenate with ``nd.concat``.
``net()`` is the book's; ``concat_reversed()`` and ``bn_momentum_as_torch()`` have one porting
bug each."""
from mxnet import nd
from mxnet.gluon import nn


def conv_block(num_channels, momentum=0.9):
    blk = nn.Sequential()
    blk.add(nn.BatchNorm(momentum=momentum), nn.Activation('relu'),
            nn.Conv2D(num_channels, kernel_size=3, padding=1))
    return blk


class DenseBlock(nn.Block):
    def __init__(self, num_convs, num_channels, reverse=False, momentum=0.9, **kwargs):
        super(DenseBlock, self).__init__(**kwargs)
        self.reverse = reverse
        self.net = nn.Sequential()
        for _ in range(num_convs):
            self.net.add(conv_block(num_channels, momentum))

    def forward(self, X):
        for blk in self.net:
            Y = blk(X)
            # Concatenate the input and output of each block on the channel dimension
            X = nd.concat(Y, X, dim=1) if self.reverse else nd.concat(X, Y, dim=1)
        return X


def transition_block(num_channels, momentum=0.9):
    blk = nn.Sequential()
    blk.add(nn.BatchNorm(momentum=momentum), nn.Activation('relu'),
            nn.Conv2D(num_channels, kernel_size=1),
            nn.AvgPool2D(pool_size=2, strides=2))
    return blk


def net(reverse=False, momentum=0.9):
    net = nn.Sequential()
    net.add(nn.Conv2D(64, kernel_size=7, strides=2, padding=3),
            nn.BatchNorm(momentum=momentum), nn.Activation('relu'),
            nn.MaxPool2D(pool_size=3, strides=2, padding=1))
    num_channels, growth_rate = 64, 32  # num_channels: the current number of channels
    num_convs_in_dense_blocks = [4, 4, 4, 4]
    for i, num_convs in enumerate(num_convs_in_dense_blocks):
        net.add(DenseBlock(num_convs, growth_rate, reverse=reverse, momentum=momentum))
        # This is the number of output channels in the previous dense block
        num_channels += num_convs * growth_rate
        # A transition layer that halves the number of channels is added between the dense blocks
        if i != len(num_convs_in_dense_blocks) - 1:
            num_channels //= 2
            net.add(transition_block(num_channels, momentum))
    net.add(nn.BatchNorm(momentum=momentum), nn.Activation('relu'), nn.GlobalAvgPool2D(),
            nn.Dense(10))
    return net


def concat_reversed():
    """Concatenation order: the new features first, then the input (the book: input first)."""
    return net(reverse=True)


def bn_momentum_as_torch():
    """BatchNorm momentum 0.1, PyTorch's, typed into Gluon, where it keeps only 0.1 of the
    running statistics (PyTorch's 0.9)."""
    return net(momentum=0.1)
