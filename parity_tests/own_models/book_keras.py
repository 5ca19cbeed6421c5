"""The book's DenseNet in Keras 3, as a reader ports it from D2L's TensorFlow edition
(subclassed ConvBlock, DenseBlock and TransitionBlock layers in a Sequential), with the
reference's settings: BatchNorm epsilon 1e-5 and momentum 0.9 (Keras' 'keep 0.9', PyTorch's
0.1), the stem's 7x7/2 conv padded 3 on every side and its 3x3/2 max pool padded 1
(ZeroPadding2D and 'valid': Keras' padding='same' at stride 2 pads 2 before and 3 after; zeros
before the max pool equal -inf padding after a ReLU). ``net()`` is the book's network;
``stem_same_padding()`` has D2L's TensorFlow stem, one porting bug; ``transition_without_batchnorm()``
another: its first transition has no BatchNorm before the 1x1 conv."""
import keras
from keras import layers


def bn():
    return layers.BatchNormalization(epsilon=1e-5, momentum=0.9)


class ConvBlock(layers.Layer):
    def __init__(self, num_channels, **kwargs):
        super().__init__(**kwargs)
        self.bn = bn()
        self.relu = layers.ReLU()
        self.conv = layers.Conv2D(num_channels, kernel_size=3, padding="same")

    def call(self, x, training=False):
        y = self.conv(self.relu(self.bn(x, training=training)))
        return layers.concatenate([x, y], axis=-1)


class DenseBlock(layers.Layer):
    def __init__(self, num_convs, num_channels, **kwargs):
        super().__init__(**kwargs)
        self.blocks = [ConvBlock(num_channels) for _ in range(num_convs)]

    def call(self, x, training=False):
        for blk in self.blocks:
            x = blk(x, training=training)
        return x


class TransitionBlock(layers.Layer):
    def __init__(self, num_channels, norm=True, **kwargs):
        super().__init__(**kwargs)
        self.bn = bn() if norm else (lambda x, training=False: x)
        self.relu = layers.ReLU()
        self.conv = layers.Conv2D(num_channels, kernel_size=1)
        self.pool = layers.AveragePooling2D(pool_size=2, strides=2)

    def call(self, x, training=False):
        return self.pool(self.conv(self.relu(self.bn(x, training=training))))


def net(same_padding=False, transition_norm=(1, 2, 3)):
    if same_padding:  # D2L's TensorFlow stem
        stem = [layers.Conv2D(64, kernel_size=7, strides=2, padding="same"), bn(), layers.ReLU(),
                layers.MaxPool2D(pool_size=3, strides=2, padding="same")]
    else:
        stem = [layers.ZeroPadding2D(3), layers.Conv2D(64, kernel_size=7, strides=2), bn(),
                layers.ReLU(), layers.ZeroPadding2D(1), layers.MaxPool2D(pool_size=3, strides=2)]
    model = keras.Sequential([keras.Input((None, None, 1))] + stem)
    num_channels, growth_rate = 64, 32
    num_convs_in_dense_blocks = [4, 4, 4, 4]
    for i, num_convs in enumerate(num_convs_in_dense_blocks):
        model.add(DenseBlock(num_convs, growth_rate))
        num_channels += num_convs * growth_rate
        if i != len(num_convs_in_dense_blocks) - 1:
            num_channels //= 2
            model.add(TransitionBlock(num_channels, norm=i + 1 in transition_norm))
    model.add(bn())
    model.add(layers.ReLU())
    model.add(layers.GlobalAveragePooling2D())
    model.add(layers.Dense(10))
    return model


def stem_same_padding():
    return net(same_padding=True)


def transition_without_batchnorm():
    """The first transition is ReLU-1x1 conv-2x2 average pool: its BatchNorm left out."""
    return net(transition_norm=(2, 3))
