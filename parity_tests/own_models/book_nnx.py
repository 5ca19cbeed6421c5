"""A Flax NNX DenseNet as a user writes it, with one porting bug: every BatchNorm keeps NNX's
default momentum 0.99 (PyTorch's momentum=0.1 is Flax's 0.9). Everything else is the book's."""
import jax.numpy as jnp
from flax import nnx


class ConvBlock(nnx.Module):
    def __init__(self, cin, cout, *, rngs):
        self.bn = nnx.BatchNorm(cin, rngs=rngs)
        self.conv = nnx.Conv(cin, cout, kernel_size=(3, 3), padding=((1, 1), (1, 1)), rngs=rngs)

    def __call__(self, x):
        return jnp.concatenate([x, self.conv(nnx.relu(self.bn(x)))], axis=-1)


class Transition(nnx.Module):
    def __init__(self, cin, cout, *, rngs):
        self.bn = nnx.BatchNorm(cin, rngs=rngs)
        self.conv = nnx.Conv(cin, cout, kernel_size=(1, 1), rngs=rngs)

    def __call__(self, x):
        return nnx.avg_pool(self.conv(nnx.relu(self.bn(x))), (2, 2), strides=(2, 2))


class DenseNet(nnx.Module):
    def __init__(self, rngs):
        self.conv0 = nnx.Conv(1, 64, kernel_size=(7, 7), strides=(2, 2),
                              padding=((3, 3), (3, 3)), rngs=rngs)
        self.bn0 = nnx.BatchNorm(64, rngs=rngs)
        layers, c = [], 64
        for i in range(4):
            for j in range(4):
                layers.append(ConvBlock(c + 32 * j, 32, rngs=rngs))
            c += 4 * 32
            if i != 3:
                layers.append(Transition(c, c // 2, rngs=rngs))
                c //= 2
        self.layers = nnx.List(layers)
        self.bn_final = nnx.BatchNorm(c, rngs=rngs)
        self.fc = nnx.Linear(c, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn0(self.conv0(x)))
        x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for layer in self.layers:
            x = layer(x)
        return self.fc(jnp.mean(nnx.relu(self.bn_final(x)), axis=(1, 2)))


def bn_momentum_default():
    return DenseNet(nnx.Rngs(0))
