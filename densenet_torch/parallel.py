"""Data parallelism in PyTorch: one SGD step of a DenseNet over N processes, on PyTorch's own
engine: DistributedDataParallel, launched by ``torchrun`` (gloo on the CPU, NCCL on GPUs).

Same functions, same order, same options as densenet_mxnet/parallel.py and
densenet_flax/parallel.py. What BatchNorm does there (docs/data_parallel.md):

- ``sync_bn=False`` (DDP's default): each process normalises its own share with its own
  moments and updates its own running statistics; DDP averages the gradients, and by default
  (``broadcast_buffers=True``) copies rank 0's buffers to every rank at the start of each
  forward pass, so the model that rank 0 saves carries the statistics of rank 0's share.
- ``sync_bn=True``: ``nn.SyncBatchNorm.convert_sync_batchnorm``: the moments of the whole
  process group. PyTorch implements it for GPUs only (its CPU forward raises, and its kernels
  have no CPU version in torch 2.13): on a CPU this is a clear error.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from typing import Optional

import numpy as np

import densenet_spec as spec
from densenet_weights import files

BACKEND = "torch"


def batchnorm_semantics(sync_bn: bool = False) -> str:
    """In words: what BatchNorm computes in this framework's data-parallel step."""
    if sync_bn:
        return ("SyncBatchNorm: the moments of the whole process group; running statistics "
                "updated once from them (GPUs only)")
    return ("DDP's default: each process's own moments and running statistics; gradients "
            "averaged; rank 0's buffers broadcast at each forward (saved: rank 0's)")


def sync_bn_unsupported(devices: int) -> Optional[str]:
    """Why synchronised BatchNorm cannot run on ``devices`` devices here (None: it can)."""
    import torch
    gpus = torch.cuda.device_count()
    if gpus >= devices:
        return None
    return (f"--sync-bn with {devices} devices: PyTorch's SyncBatchNorm runs on GPUs only (one "
            f"per process; its CPU forward pass raises), and this machine has {gpus}")


def data_parallel_step(config: dict, state: dict, x, labels, devices: int = 2,
                       sync_bn: bool = False, lr: float = 0.1, dtype: str = "float64",
                       steps: int = 1) -> dict:
    """One SGD step (lr ``lr``) of the DenseNet in ``devices`` DDP processes started by
    torchrun, the global batch ``x`` (canonical NCHW) split evenly: the mean loss and the new
    canonical state as rank 0 has it. ``steps`` > 1 repeats the step on the same batch and
    times each (``step_seconds``: the scaling benchmark); the loss is the first step's."""
    import torch
    spec.check_devices(len(x), devices)
    gpus = torch.cuda.device_count()
    why = sync_bn_unsupported(devices) if sync_bn else None
    if why:
        raise ValueError(why)
    with tempfile.TemporaryDirectory() as d:
        files.write_message(d, "in", {
            "config": config, "sync_bn": sync_bn, "lr": lr, "dtype": dtype,
            "cuda": gpus >= devices, "steps": steps, "state": dict(state),
            "batch": {"x": np.asarray(x), "labels": np.asarray(labels)}})
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={devices}", "-m", "densenet_torch.parallel", d]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        return _outcome(proc.returncode, proc.stderr, d, devices)


def _outcome(returncode: int, stderr: str, d: str, devices: int) -> dict:
    """Rank 0's message in folder ``d`` after torchrun exited with ``returncode``. A rank that
    aborts while gloo closes its connections (``terminate called without an active
    exception``: seen once in a suite run, a race in gloo's teardown) fails torchrun after the
    step is complete: when every rank has passed the final barrier (its ``passed.RANK`` file)
    the message stands, with that said in ``teardown``; any other failure is an error with
    torchrun's output."""
    passed = all(os.path.exists(os.path.join(d, f"passed.{r}")) for r in range(devices))
    written = all(os.path.exists(os.path.join(d, f"out.{ext}")) for ext in ("json", "npz"))
    if returncode != 0 and not (passed and written):
        raise RuntimeError(f"torchrun with {devices} processes failed:\n{stderr[-6000:]}")
    out = files.read_message(d, "out")
    if returncode != 0:
        lines = [line.strip() for line in stderr.splitlines() if line.strip()] or [""]
        why = next((line for line in lines if "terminate called" in line), lines[-1])
        out["teardown"] = (f"torchrun exited with status {returncode} after every rank had "
                           "passed the final barrier (the step is complete): a rank failed "
                           f"while closing its process group ({why[:200]})")
    return out


def _rank_main(d: str) -> None:
    """One torchrun process: its share of the batch, DDP, one SGD step; rank 0 writes."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from densenet_torch.runtime import from_config
    from densenet_torch.state import load_state
    args = files.read_message(d, "in")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if args["cuda"] else "cpu")
    dist.init_process_group("nccl" if args["cuda"] else "gloo")
    try:
        x, labels = args["batch"]["x"], args["batch"]["labels"]
        dtype = getattr(torch, args["dtype"])
        model = from_config(args["config"])
        load_state(model, args["state"])
        model = model.to(device=device, dtype=dtype).train()
        if args["sync_bn"]:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if args["cuda"] else None)
        n = len(x) // world
        xs = torch.as_tensor(x[rank * n:(rank + 1) * n]).to(device=device, dtype=dtype)
        ys = torch.as_tensor(labels[rank * n:(rank + 1) * n]).to(device=device, dtype=torch.int64)
        opt = torch.optim.SGD(ddp.parameters(), lr=args["lr"])
        times, first = [], None
        for _ in range(args["steps"]):
            t0 = time.perf_counter()
            opt.zero_grad()
            loss = F.cross_entropy(ddp(xs), ys)
            loss.backward()  # DDP all-reduces (averages) the gradients here
            opt.step()
            if args["cuda"]:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            first = loss.detach().clone() if first is None else first
        dist.all_reduce(first)
        if rank == 0:
            # SyncBatchNorm keeps BatchNorm2d's tensor names: the canonical ones
            arrays = {k: v.detach().to("cpu", dtype).numpy() for k, v in model.state_dict().items()
                      if not k.endswith("num_batches_tracked")}
            files.write_message(d, "out", {
                "loss": float(first) / world, "arrays": arrays, "devices": world,
                "platform": "cuda" if args["cuda"] else "cpu", "step_seconds": times,
                "semantics": batchnorm_semantics(args["sync_bn"])})
        dist.barrier()  # every rank done before any leaves: gloo aborts a rank whose peer left
        open(os.path.join(d, f"passed.{rank}"), "w").close()  # the step is complete (_outcome)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _rank_main(sys.argv[1])
