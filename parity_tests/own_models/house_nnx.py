"""The forum's MLP DenseNet (house_mlp) ported to Flax NNX as a user writes it: nnx.BatchNorm and
nnx.Linear with Flax's defaults (BatchNorm momentum 0.99, "keep 0.99": PyTorch's 0.01; epsilon
1e-5; the running variance updated with the biased batch variance, Flax's convention).
Everything else is the forum's network."""
import jax.numpy as jnp
from flax import nnx


class Layer(nnx.Module):
    def __init__(self, cin, cout, *, rngs):
        self.bn = nnx.BatchNorm(cin, rngs=rngs)
        self.linear = nnx.Linear(cin, cout, rngs=rngs)

    def __call__(self, x):
        return jnp.concatenate([x, self.linear(nnx.relu(self.bn(x)))], axis=-1)


class Transition(nnx.Module):
    def __init__(self, cin, cout, *, rngs):
        self.bn = nnx.BatchNorm(cin, rngs=rngs)
        self.linear = nnx.Linear(cin, cout, rngs=rngs)

    def __call__(self, x):
        return nnx.relu(self.linear(nnx.relu(self.bn(x))))


class MLPDenseNet(nnx.Module):
    def __init__(self, rngs, in_features=330, widths=(512, 1024), growth_rate=128,
                 blocks=(2, 2, 2, 2), outputs=1):
        stem, c = [], in_features
        for w in widths:
            stem.append(nnx.Linear(c, w, rngs=rngs))
            c = w
        self.stem = nnx.List(stem)
        layers = []
        for i, n in enumerate(blocks):
            for j in range(n):
                layers.append(Layer(c + growth_rate * j, growth_rate, rngs=rngs))
            c += n * growth_rate
            if i != len(blocks) - 1:
                layers.append(Transition(c, c // 2, rngs=rngs))
                c //= 2
        self.layers = nnx.List(layers)
        self.bn_final = nnx.BatchNorm(c, rngs=rngs)
        self.head = nnx.Linear(c, outputs, rngs=rngs)

    def __call__(self, x):
        for lin in self.stem:
            x = nnx.relu(lin(x))
        for layer in self.layers:
            x = layer(x)
        return self.head(nnx.relu(self.bn_final(x)))


def net():
    """The forum's network in NNX with nnx.BatchNorm's defaults."""
    return MLPDenseNet(nnx.Rngs(0))
