"""Data parallelism on each framework's own engine (densenet_<framework>/parallel.py): one SGD
step on 2 devices, against what the framework's BatchNorm semantics say it must be, computed
from single-device steps of the same backend (docs/data_parallel.md has the table):

- synchronised BatchNorm: the single-device step on the global batch;
- each framework's default: per-device moments; the parameters move by the mean of the
  per-device gradients; the running statistics are rank 0's (PyTorch DDP), context 0's after
  a Gluon Trainer's first step, or the devices' average (JAX shard_map).

float64 throughout (as test_numeric's steps): the comparisons are of the same arithmetic in
another order, ~1e-14 apart. The book's network at 64 px (the last block at 2x2, per-device
batch 2): every stage, well-conditioned BatchNorm. On a CPU JAX gets 2 host devices in a child
process, PyTorch 2 gloo processes from torchrun, Gluon the contexts cpu(0) and cpu(1).
"""
from __future__ import annotations

import numpy as np
import pytest

import densenet_spec as spec
from parity_tests.conftest import get_backend, need_mxnet

BACKENDS = ["torch", "mxnet", "flax-nnx", "flax-linen"]
CFG = spec.get_preset("book")
SIZE, BATCH, DEVICES, LR = 64, 4, 2, 0.1
#: float64 steps agree to ~1e-14, except MXNet's: its SGD operator takes the learning rate and
#: the gradient scale as float32 attributes, and 0.1 x 1/2 in float32 is 0.05 x (1 + 1.5e-8).
TOL = 1e-7


def _inputs():
    state = get_backend("torch").call("init_state", config=CFG.to_dict(), seed=2)["arrays"]
    rng = np.random.default_rng(3)
    x = rng.standard_normal((BATCH, 1, SIZE, SIZE)).astype(np.float32)
    labels = rng.integers(0, CFG.num_classes, BATCH).astype(np.int64)
    return state, x, labels


def _b(name):
    if name == "mxnet":
        need_mxnet()
    return get_backend(name)


def _worst(got, want):
    """Largest relative difference over tensors (floor 1e-8 for tensors near zero)."""
    assert set(got) == set(want), set(got) ^ set(want)
    return max(float(np.abs(np.asarray(got[k], np.float64) - want[k]).max()
                     / max(np.abs(want[k]).max(), 1e-8)) for k in want)


def _per_device_expectation(b, state, x, labels, stats):
    """The default semantics from single-device steps on each share: parameters minus lr
    times the mean gradient; running statistics of share 0 (``stats='first'``) or their mean."""
    n = BATCH // DEVICES
    shares = [(x[i * n:(i + 1) * n], labels[i * n:(i + 1) * n]) for i in range(DEVICES)]
    steps = [b.call("train_step", config=CFG.to_dict(), state=state, x=xs, labels=ys, lr=LR,
                    dtype="float64") for xs, ys in shares]
    want = {}
    for k in steps[0]["arrays"]:
        if k in steps[0]["grads"]:
            want[k] = state[k].astype(np.float64) - LR * np.mean(
                [s["grads"][k] for s in steps], axis=0)
        elif stats == "first":
            want[k] = steps[0]["arrays"][k]
        else:
            want[k] = np.mean([s["arrays"][k] for s in steps], axis=0)
    return want, float(np.mean([s["loss"] for s in steps]))


#: Whose running statistics one default step leaves: rank 0's (DDP broadcasts its buffers),
#: context 0's (the Gluon Trainer's first step copies its values to every context; the saved
#: average of equal copies is that copy), the devices' mean (shard_map + pmean).
DEFAULT_STATS = {"torch": "first", "mxnet": "first", "flax-nnx": "mean", "flax-linen": "mean"}


@pytest.mark.parametrize("name", BACKENDS)
def test_default_batchnorm_is_per_device(name):
    """Each framework's default: the step equals the per-device semantics of the table, and
    differs from the global-batch step (so the comparison can tell the two apart)."""
    b = _b(name)
    state, x, labels = _inputs()
    got = b.call("data_parallel_step", config=CFG.to_dict(), state=state, x=x, labels=labels,
                 devices=DEVICES, sync_bn=False, lr=LR)
    want, loss = _per_device_expectation(b, state, x, labels, DEFAULT_STATS[name])
    assert abs(got["loss"] - loss) <= 1e-12 * max(1.0, abs(loss))
    assert _worst(got["arrays"], want) <= TOL, name
    global_step = b.call("train_step", config=CFG.to_dict(), state=state, x=x, labels=labels,
                         lr=LR, dtype="float64")["arrays"]
    assert _worst(got["arrays"], global_step) > 1e-3, "per-device step equals the global one"
    assert got["devices"] == DEVICES and got["semantics"] and got["platform"] in ("cpu", "cuda", "gpu")


@pytest.mark.parametrize("name", ["flax-nnx", "flax-linen"])
def test_synchronised_batchnorm_is_the_global_batch_step(name):
    """JAX: one jitted step over a batch sharded on a 2-device mesh is the single-device step
    on the global batch (parameters and running statistics)."""
    b = _b(name)
    state, x, labels = _inputs()
    got = b.call("data_parallel_step", config=CFG.to_dict(), state=state, x=x, labels=labels,
                 devices=DEVICES, sync_bn=True, lr=LR)
    ref = b.call("train_step", config=CFG.to_dict(), state=state, x=x, labels=labels, lr=LR,
                 dtype="float64")
    assert abs(got["loss"] - ref["loss"]) <= 1e-12 * max(1.0, abs(ref["loss"]))
    assert _worst(got["arrays"], ref["arrays"]) <= TOL, name


@pytest.mark.parametrize("name, words", [
    ("torch", "SyncBatchNorm runs on GPUs only"),
    ("mxnet", "SyncBatchNorm needs GPU contexts"),
])
def test_synchronised_batchnorm_without_gpus_is_a_clear_error(name, words):
    """PyTorch's SyncBatchNorm and Gluon's contrib.nn.SyncBatchNorm do not run on a CPU (torch
    raises, Gluon's forward pass never returns): a clear error, not a hang or a traceback."""
    b = _b(name)
    import torch
    if name == "torch" and torch.cuda.device_count() >= DEVICES:
        pytest.skip(f"this machine has {DEVICES} GPUs: PyTorch's SyncBatchNorm runs here")
    state, x, labels = _inputs()
    err = b.call("data_parallel_error", config=CFG.to_dict(), state=state, x=x, labels=labels,
                 devices=DEVICES, sync_bn=True)
    assert err is not None and err["type"] == "ValueError" and words in err["message"], err


@pytest.mark.parametrize("name", BACKENDS)
def test_a_batch_that_does_not_split_is_a_clear_error(name):
    b = _b(name)
    state, x, labels = _inputs()
    err = b.call("data_parallel_error", config=CFG.to_dict(), state=state, x=x[:3],
                 labels=labels[:3], devices=DEVICES)
    assert err is not None and err["type"] == "ValueError", err
    assert "a batch of 3 does not split evenly over 2 devices" in err["message"]


def test_a_rank_that_fails_while_closing_gloo_after_the_step_is_said_not_fatal(tmp_path):
    """torchrun's exit status after the step (densenet_torch.parallel._outcome): a rank that
    aborts while gloo closes its connections, once every rank passed the final barrier (each
    rank's passed.RANK file), leaves rank 0's complete message, with that said; torchrun's
    failure before that (a rank missing its file, or no message) is an error with its output."""
    from densenet_torch import parallel
    from densenet_weights import files
    d = str(tmp_path)
    files.write_message(d, "out", {"loss": 1.5, "arrays": {"w": np.ones(3, np.float32)}})
    (tmp_path / "passed.0").touch()
    abort = ("E1205 ... failed (exitcode: -6) local_rank: 1\n"
             "terminate called without an active exception\nChildFailedError: ...\n")
    with pytest.raises(RuntimeError, match="(?s)torchrun with 2 processes failed:\n.*terminate called"):
        parallel._outcome(1, abort, d, 2)  # rank 1 never passed the barrier
    (tmp_path / "passed.1").touch()
    out = parallel._outcome(1, abort, d, 2)
    assert out["loss"] == 1.5 and np.array_equal(out["arrays"]["w"], np.ones(3, np.float32))
    assert out["teardown"].startswith("torchrun exited with status 1 after every rank had passed")
    assert "terminate called without an active exception" in out["teardown"]
    assert "teardown" not in parallel._outcome(0, "", d, 2)
    for ext in ("json", "npz"):
        (tmp_path / f"out.{ext}").unlink()
    with pytest.raises(RuntimeError, match="torchrun with 2 processes failed"):
        parallel._outcome(1, abort, d, 2)  # no message from rank 0
