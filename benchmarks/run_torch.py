"""Case runner for PyTorch: our densenet_torch, and torchvision's DenseNet as the reference.

Fast paths (case["opts"]): channels_last (NHWC memory format for weights and input), compile
(torch.compile of the model, inductor), cudnn_benchmark (cuDNN autotuning; GPU only). The
dtype bfloat16 means autocast to bfloat16 (weights and SGD stay float32: mixed precision).
"""
from __future__ import annotations

import contextlib
import copy
from typing import Dict

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks import common

OPTS = ("channels_last", "compile", "cudnn_benchmark")


def default_opts(gpu: bool) -> Dict[str, bool]:
    from benchmarks.defaults import default_opts as d
    return d("torch", gpu)


def device() -> torch.device:
    return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")


def versions() -> Dict[str, str]:
    v = {"torch": torch.__version__, "numpy": np.__version__,
         "torch_threads": str(torch.get_num_threads())}
    torchvision = common.import_torchvision()
    v["torchvision"] = torchvision.__version__ if torchvision else "not installed"
    if torch.cuda.is_available():
        v["cuda"] = str(torch.version.cuda)
        v["cudnn"] = str(torch.backends.cudnn.version())
        v["cudnn_allow_tf32"] = str(torch.backends.cudnn.allow_tf32)
        v["matmul_allow_tf32"] = str(torch.backends.cuda.matmul.allow_tf32)
    return v


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"cuda:0 ({torch.cuda.get_device_name(0)})"
    return "cpu"


class Unsupported(Exception):
    """The case cannot run here (reported as 'not supported', with the reason)."""


def build_model(case):
    eff = case["mode"] == "efficient"
    if case["backend"] == "torchvision":
        torchvision = common.import_torchvision()
        if torchvision is None:
            raise Unsupported("torchvision not installed")
        fn = getattr(torchvision.models, case["preset"], None)
        if fn is None:
            raise Unsupported(f"torchvision has no preset {case['preset']!r}")
        return fn(weights=None, memory_efficient=eff)
    import densenet_torch
    return densenet_torch.build(case["preset"], memory_efficient=eff, **(case.get("options") or {}))


def in_channels(case) -> int:
    return common.config(case).in_channels


def num_classes(case) -> int:
    return common.config(case).num_classes


class Bench:
    """One configured model with its eval and train steps, as the benchmark times them."""

    def __init__(self, case, model=None):
        self.case, self.dev = case, device()
        gpu = self.dev.type == "cuda"
        self.opts = dict(default_opts(gpu), **(case.get("opts") or {}))
        self.notes = []
        if not gpu and self.opts["cudnn_benchmark"]:
            self.opts["cudnn_benchmark"] = False
        if gpu:
            torch.backends.cudnn.benchmark = bool(self.opts["cudnn_benchmark"])
        torch.manual_seed(case.get("seed", 0))
        self.model = (model if model is not None else build_model(case)).to(self.dev)
        self.fmt = torch.channels_last if self.opts["channels_last"] else torch.contiguous_format
        self.model = self.model.to(memory_format=self.fmt)
        self.run_model = torch.compile(self.model) if self.opts["compile"] else self.model
        self.bf16 = case["dtype"] == "bfloat16"
        if self.bf16:
            self.notes.append("bfloat16 = torch.autocast(bfloat16): float32 weights and SGD")
        g = torch.Generator().manual_seed(1)
        n, s = case["batch"], case["size"]
        self.x = torch.randn(n, in_channels(case), s, s, generator=g).to(
            self.dev).contiguous(memory_format=self.fmt)
        self.y = torch.randint(0, num_classes(case), (n,), generator=g).to(self.dev)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=common.LR)

    def autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.dev.type, dtype=torch.bfloat16)

    def set_input(self, x, y):
        self.x = torch.as_tensor(x).to(self.dev).contiguous(memory_format=self.fmt)
        self.y = torch.as_tensor(y, dtype=torch.int64).to(self.dev)

    def sync(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize()

    def eval_step(self):
        self.model.eval()
        with torch.no_grad(), self.autocast():
            return self.run_model(self.x)

    def train_step(self):
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        with self.autocast():
            loss = F.cross_entropy(self.run_model(self.x).float(), self.y)
        loss.backward()
        self.opt.step()
        return loss

    # ---- for the fast-path correctness check (benchmarks.bench_case --check)
    def eval_logits(self):
        return self.eval_step().float().cpu().numpy()

    def train_result(self):
        """One SGD step: loss, gradients and the BatchNorm running statistics after it."""
        loss = self.train_step()
        grads = {k: p.grad.float().cpu().numpy() for k, p in self.model.named_parameters()}
        stats = {k: b.float().cpu().numpy() for k, b in self.model.named_buffers()
                 if k.endswith(("running_mean", "running_var"))}
        return loss.item(), grads, stats

    # ---- memory
    def memory_begin(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return {"allocated_before": torch.cuda.memory_allocated()}
        return {}

    def memory_end(self, before):
        if self.dev.type != "cuda":
            return {}
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"device_peak_bytes": peak, "device_reserved_peak_bytes":
                torch.cuda.max_memory_reserved(),
                "device_peak_over_before_bytes": peak - before["allocated_before"],
                "device_source": "torch.cuda.max_memory_allocated"}


def prepare(case):
    return Bench(case)


def fast_path_pair(case, plain_opts):
    """The plain configuration and the case's configuration with the same weights. TF32 off
    (on NVIDIA GPUs PyTorch allows it for cuDNN convolutions by default), as in the parity
    suite's GPU tests: a difference is then the fast path's, not TF32's."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    plain = Bench(dict(case, opts=plain_opts, dtype="float32"))
    fast = Bench(case, model=copy.deepcopy(plain.model))
    return plain, fast


def info(bench):
    return {"device": device_name(bench.dev), "versions": versions(), "opts": bench.opts,
            "notes": bench.notes}
