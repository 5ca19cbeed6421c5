"""Case runner for MXNet Gluon: our densenet_mxnet, and the Gluon model zoo's DenseNet
(mxnet.gluon.model_zoo.vision) as the reference. Runs in the MXNet environment.

Fast paths (case["opts"]): hybridize = "static" (hybridize(static_alloc=True,
static_shape=True): one cached graph with memory planned once), "plain" (hybridize()), or
"none" (imperative). dtype bfloat16 uses MXNet's AMP (mxnet.contrib.amp, target_dtype
'bfloat16', oneDNN on the CPU); where it cannot run the case is reported as not supported.
"""
from __future__ import annotations

import os
import tempfile
from typing import Dict

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

from benchmarks import common


class Unsupported(Exception):
    """The case cannot run here (reported as 'not supported', with the reason)."""


def default_opts() -> Dict[str, object]:
    from benchmarks.defaults import default_opts as d
    return d("mxnet", mx.context.num_gpus() > 0)


def context():
    return mx.gpu(0) if mx.context.num_gpus() > 0 else mx.cpu()


def versions() -> Dict[str, str]:
    feats = mx.runtime.Features()
    return {"mxnet": mx.__version__, "numpy": np.__version__,
            "mkldnn": str(feats.is_enabled("MKLDNN")), "cuda": str(feats.is_enabled("CUDA")),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "default"),
            "engine": os.environ.get("MXNET_ENGINE_TYPE", "ThreadedEnginePerDevice")}


def device_name() -> str:
    return "gpu(0)" if mx.context.num_gpus() > 0 else "cpu"


def build_net(case):
    if case["backend"] == "mxnet-zoo":
        from mxnet.gluon.model_zoo import vision
        fn = getattr(vision, case["preset"], None)
        if fn is None:
            raise Unsupported(f"the Gluon model zoo has no {case['preset']!r}")
        if case["mode"] == "efficient":
            raise Unsupported("the Gluon model zoo's DenseNet has no memory-efficient mode")
        if case["size"] != 224:
            raise Unsupported("the Gluon model zoo's DenseNet ends in a fixed 7x7 average pool: "
                              f"224x224 input only, not {case['size']}")
        return fn(pretrained=False)
    from densenet_mxnet import model as M
    try:
        return M.build(case["preset"], memory_efficient=case["mode"] == "efficient",
                       **(case.get("options") or {}))
    except NotImplementedError as e:  # MemoryEfficientUnsupported
        raise Unsupported(str(e)) from None


class Bench:
    def __init__(self, case, params_file=None):
        self.case, self.ctx = case, context()
        self.opts = dict(default_opts(), **(case.get("opts") or {}))
        self.notes = []
        self.bf16 = case["dtype"] == "bfloat16"
        if self.bf16:
            self._amp_init()
        mx.random.seed(case.get("seed", 0))
        self.net = build_net(case)
        if params_file:
            self.net.load_parameters(params_file, ctx=self.ctx)
        else:
            self.net.initialize(mx.init.Xavier(), ctx=self.ctx)
        h = self.opts["hybridize"]
        if h == "static":
            self.net.hybridize(static_alloc=True, static_shape=True)
        elif h == "plain":
            self.net.hybridize()
        elif h != "none":
            raise ValueError(f"mxnet hybridize must be static, plain or none, got {h!r}")
        p = common.config(case)
        rs = np.random.RandomState(1)
        n, s = case["batch"], case["size"]
        self.x = mx.nd.array(rs.standard_normal((n, p.in_channels, s, s)).astype(np.float32),
                             ctx=self.ctx)
        self.y = mx.nd.array(rs.randint(0, p.num_classes, n).astype(np.float32), ctx=self.ctx)
        self.loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
        self.trainer = None

    def _amp_init(self):
        try:
            from mxnet.contrib import amp
            if not mx.runtime.Features().is_enabled("MKLDNN") and mx.context.num_gpus() == 0:
                raise Unsupported("bfloat16 AMP needs MXNet built with oneDNN (MKLDNN)")
            amp.init(target_dtype="bfloat16")
        except Unsupported:
            raise
        except Exception as e:  # noqa: BLE001
            raise Unsupported(f"mxnet.contrib.amp.init(target_dtype='bfloat16') failed: "
                              f"{type(e).__name__}: {e}") from None
        self.notes.append("bfloat16 = mxnet.contrib.amp.init(target_dtype='bfloat16'): AMP casts "
                          "the ops on its bfloat16 list (convolutions, ...); float32 weights")

    def sync(self):
        mx.nd.waitall()

    def eval_step(self):
        with autograd.predict_mode():
            return self.net(self.x)

    def train_step(self):
        if self.trainer is None:
            self.trainer = gluon.Trainer(self.net.collect_params(), "sgd",
                                         {"learning_rate": common.LR})
        with autograd.record():
            loss = self.loss_fn(self.net(self.x), self.y).mean()
        loss.backward()
        self.trainer.step(1)  # the loss is already the batch mean
        return loss

    # ---- for the fast-path correctness check
    def eval_logits(self):
        return self.eval_step().astype("float32").asnumpy()

    def train_result(self):
        loss = self.train_step()
        params = self.net._collect_params_with_prefix()
        grads = {k: p.grad().astype("float32").asnumpy() for k, p in params.items()
                 if p.grad_req != "null"}
        stats = {k: p.data().astype("float32").asnumpy() for k, p in params.items()
                 if k.endswith(("running_mean", "running_var"))}
        return float(loss.asscalar()), grads, stats

    def memory_begin(self):
        return {}

    def memory_end(self, before):
        return {}


def unsupported_reason(e, case):
    """A failure that means 'this build of MXNet cannot do this here', not a bug."""
    if case["dtype"] == "bfloat16" and "primitive descriptor" in str(e):
        return ("bfloat16 AMP: oneDNN found no bfloat16 kernel for this CPU (oneDNN's bfloat16 "
                f"convolutions need AVX-512; CPU flags: {' '.join(common.cpu_flags())}): "
                + str(e).strip().splitlines()[0])
    return None


def prepare(case):
    return Bench(case)


def fast_path_pair(case, plain_opts):
    plain = Bench(dict(case, opts=plain_opts, dtype="float32"))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "plain.params")
        plain.net.save_parameters(path)
        fast = Bench(case, params_file=path)
    return plain, fast


def info(bench):
    return {"device": device_name(), "versions": versions(), "opts": bench.opts,
            "notes": bench.notes}
