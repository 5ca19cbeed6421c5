"""Run in the MXNet environment by parity_tests/test_mxnet_concat.py: prints one JSON line.

densenet_mxnet concatenates with oneDNN's Concat where every channel count of a dense block is a
multiple of 16, and with a 5-D view (MXNet's own kernel) elsewhere, because oneDNN's backward
Concat fails on blocked layouts split at other offsets (densenet_mxnet/model.py, _concat).
This script reports which blocks of each preset take the oneDNN path, and on a small network
whose channels allow both, the float32 eval logits, loss and gradients of both paths, hybridized
with static_alloc/static_shape (the benchmark's default), so the test can compare them. It also
runs a float32 backward pass of a growth-rate-12 network (which must take the 5-D path)."""
import json
import sys

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

from densenet_mxnet import model as M


def blocks(net):
    return [b for _, b in net.features.named_children() if isinstance(b, M.DenseBlock)]


def run(options, onednn=None, size=32, batch=4):
    mx.random.seed(0)
    net = M.DenseNet(**options)
    if onednn is not None:
        for b in blocks(net):
            b._onednn_concat = onednn
    net.initialize(mx.init.Xavier())
    net.hybridize(static_alloc=True, static_shape=True)
    rs = np.random.RandomState(3)
    x = mx.nd.array(rs.standard_normal((batch, options["in_channels"], size, size)))
    y = mx.nd.array(rs.randint(0, options["num_classes"], batch))
    with autograd.predict_mode():
        logits = net(x).asnumpy()
    with autograd.record():
        loss = gluon.loss.SoftmaxCrossEntropyLoss()(net(x), y).mean()
    loss.backward()
    grads = {k: p.grad().asnumpy().tolist() for k, p in net._collect_params_with_prefix().items()
             if p.grad_req != "null"}  # structural names, the same in both networks
    return {"logits": logits.tolist(), "loss": float(loss.asscalar()), "grads": grads}


def main():
    out = {"paths": {name: [b._onednn_concat for b in blocks(M.build(name))]
                     for name in ("book", "densenet121", "densenet40", "densenet_bc100")}}
    small = dict(growth_rate=16, block_config=(2, 2), num_init_features=32, bn_size=4,
                 num_classes=10, stem="cifar", in_channels=3, conv_bias=False)
    out["small_paths"] = [b._onednn_concat for b in blocks(M.DenseNet(**small))]
    out["onednn"] = run(small, onednn=True)
    out["view5d"] = run(small, onednn=False)
    g12 = dict(small, growth_rate=12, num_init_features=24)
    out["growth12_paths"] = [b._onednn_concat for b in blocks(M.DenseNet(**g12))]
    out["growth12"] = run(g12)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
