"""A Flax linen version of the book's DenseNet, in the style of D2L's JAX edition (``training``
as a field, ``nn.Sequential`` of layers and lambdas, input channels inferred), ported to be
PyTorch's network: the stem's conv and max pool pad symmetrically (explicit padding: Flax's
'SAME' at stride 2 pads 2 before and 3 after), BatchNorm momentum 0.9 (PyTorch's 0.1).
``net()`` is that version; the others have one porting bug each."""
import jax.numpy as jnp
from flax import linen as nn


class ConvBlock(nn.Module):
    num_channels: int
    training: bool = True
    axis: int = -1

    @nn.compact
    def __call__(self, X):
        Y = nn.relu(nn.BatchNorm(not self.training, momentum=0.9)(X))
        Y = nn.Conv(self.num_channels, kernel_size=(3, 3), padding=(1, 1))(Y)
        return jnp.concatenate((X, Y), axis=self.axis)


class DenseBlock(nn.Module):
    num_convs: int
    num_channels: int
    training: bool = True
    axis: int = -1

    def setup(self):
        self.net = nn.Sequential([ConvBlock(self.num_channels, self.training, self.axis)
                                  for _ in range(self.num_convs)])

    def __call__(self, X):
        return self.net(X)


class DenseNet(nn.Module):
    num_channels: int = 64
    growth_rate: int = 32
    arch: tuple = (4, 4, 4, 4)
    num_classes: int = 10
    training: bool = True
    stem_padding: str = "explicit"   # the book's JAX code: 'same'
    axis: int = -1                   # the channel axis of NHWC (PyTorch habit: 1)
    pool_axes: tuple = (1, 2)        # height and width of NHWC (PyTorch habit: (2, 3))

    def setup(self):
        pad = ((3, 3), (3, 3)) if self.stem_padding == "explicit" else "same"
        pool_pad = ((1, 1), (1, 1)) if self.stem_padding == "explicit" else "same"
        layers = [nn.Conv(self.num_channels, kernel_size=(7, 7), strides=(2, 2), padding=pad),
                  nn.BatchNorm(not self.training, momentum=0.9), nn.relu,
                  lambda x: nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding=pool_pad)]
        num_channels = self.num_channels
        for i, num_convs in enumerate(self.arch):
            layers.append(DenseBlock(num_convs, self.growth_rate, self.training, self.axis))
            num_channels += num_convs * self.growth_rate
            if i != len(self.arch) - 1:
                num_channels //= 2
                layers.extend([nn.BatchNorm(not self.training, momentum=0.9), nn.relu,
                               nn.Conv(num_channels, kernel_size=(1, 1)),
                               lambda x: nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))])
        layers.extend([nn.BatchNorm(not self.training, momentum=0.9), nn.relu,
                       lambda x: jnp.mean(x, axis=self.pool_axes),
                       nn.Dense(self.num_classes)])
        self.net = nn.Sequential(layers)

    def __call__(self, X):
        return self.net(X)


def net():
    return DenseNet()


def stem_same_padding():
    """Stem padding as in D2L's JAX code: padding='same' on the 7x7/2 conv and the 3x3/2 pool."""
    return DenseNet(stem_padding="same")


def head_pools_nchw_axes():
    """Layout: the head averages over axes (2, 3), NCHW's height and width (PyTorch's
    ``mean(dim=(2, 3))``); in NHWC those are the width and the channels."""
    return DenseNet(pool_axes=(2, 3))


def concat_on_axis_1():
    """Layout: the dense block concatenates on axis 1 (PyTorch's channel axis; in NHWC the
    height): the model cannot even be initialised."""
    return DenseNet(axis=1)
