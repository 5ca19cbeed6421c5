"""GPU parity: torch (CUDA) and Flax (JAX's GPU backend) against a float64 CPU reference
(PyTorch on the CPU in float64: the same function, computed exactly enough to judge float32).
Eval-mode outputs: float32 on the GPU, TF32 off (torch.backends flags; JAX matmul precision
'highest'), at the suite's eval tolerance; the TF32 tolerance is measured separately.
Gradients and the loss: float64 on the GPU (torch CUDA and XLA's GPU backend both compute in
double), at the suite's gradient tolerance, as test_numeric.py does and for its reasons: at
random initialisation train-mode BatchNorm is badly conditioned in some channels, and float32
gradients differ from float64 ones by far more than 1e-4 on any device (run on the CPU with the
GPU machine's versions: the book's conv biases, whose exact gradient is 0, by 5e-5 of the
network's largest gradient in torch; DenseNet-BC-100's in Flax by 8e-2 relative); and a tensor is
compared relative to at least 1e-8 of the network's largest gradient. Skipped, with that
reason, where there is no NVIDIA GPU. MXNet has no CUDA build for Hopper; its CPU results stand
in (test_numeric.py)."""
import numpy as np
import pytest

import densenet_spec as spec
from densenet_parity import compare


def cuda_available() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def jax_gpu_available() -> bool:
    try:
        import jax
        return any(d.platform == "gpu" for d in jax.devices())
    except Exception:
        return False


# Asked here, when this module is collected (in a worker), not in conftest.py: there it
# imported torch and JAX into pytest's controller process, 0.4 GB that did nothing.
requires_cuda = pytest.mark.skipif(not cuda_available(),
                                   reason="no NVIDIA GPU: torch.cuda.is_available() is False")
requires_jax_gpu = pytest.mark.skipif(not jax_gpu_available(),
                                      reason="no NVIDIA GPU: jax.devices() has no gpu device")

PRESETS = ["book", "densenet121", "densenet_bc100"]


def _case(name, seed=0):
    cfg = spec.get_preset(name)
    size = 32 if cfg.stem == "cifar" else 96
    from densenet_torch.adapter import init_state
    state = init_state(cfg.to_dict(), seed=seed)["arrays"]
    rng = np.random.default_rng(seed)
    for k in state:
        if k.endswith("running_mean"):
            state[k] = rng.normal(0, 0.1, state[k].shape).astype(np.float32)
        elif k.endswith("running_var"):
            state[k] = rng.uniform(0.5, 1.5, state[k].shape).astype(np.float32)
    x = rng.standard_normal((4, cfg.in_channels, size, size)).astype(np.float32)
    labels = rng.integers(0, cfg.num_classes, 4)
    return cfg, state, x, labels


def _torch_run(cfg, state, x, labels, device, dtype):
    """Eval stage outputs and train-mode gradients from densenet_torch on a device/dtype."""
    import torch
    from densenet_torch import DenseNet
    from densenet_torch.state import load_state
    model = DenseNet(**cfg.options(), name=cfg.name)
    load_state(model, state)
    model = model.to(device=device, dtype=dtype)
    xt = torch.as_tensor(x).to(device=device, dtype=dtype)
    with torch.no_grad():
        outs = {k: v.double().cpu().numpy() for k, v in model.eval().forward_stages(xt).items()}
    model.train()
    loss = torch.nn.functional.cross_entropy(model(xt), torch.as_tensor(labels).to(device))
    loss.backward()
    grads = {k: p.grad.double().cpu().numpy() for k, p in model.named_parameters()}
    return outs, grads, float(loss.detach())


_refs = {}


def reference(name):
    if name not in _refs:
        import torch
        cfg, state, x, labels = _case(name)
        _refs[name] = (cfg, state, x, labels,
                       _torch_run(cfg, state, x, labels, "cpu", torch.float64))
    return _refs[name]


def _worst(got, ref, floor=0.0):
    """The tensor that differs most and by how much: relative to its own largest magnitude, or
    to ``floor`` times the largest of all tensors where that is more (a conv bias before a
    BatchNorm has an exact gradient of 0: its float64 reference is rounding noise)."""
    assert set(got) == set(ref), f"names differ: {set(got) ^ set(ref)}"
    scale = floor * max(float(np.max(np.abs(v))) for v in ref.values())
    d = {k: compare.abs_diff(got[k], ref[k]) / max(float(np.max(np.abs(ref[k]))), scale, 1e-300)
         for k in ref}
    k = max(d, key=d.get)
    return k, d[k]


#: the smallest gradient scale a tensor is judged against (test_numeric.py's floor)
GRAD_FLOOR = 1e-8


@requires_cuda
@pytest.mark.parametrize("name", PRESETS)
def test_torch_cuda_matches_float64_cpu(name):
    import torch
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg, state, x, labels, (ref_out, ref_grad, ref_loss) = reference(name)
    outs, _, _ = _torch_run(cfg, state, x, labels, "cuda", torch.float32)
    k, d = _worst(outs, ref_out)
    assert d <= compare.EVAL_RTOL, f"float32 eval {k}: {d:.2e}"
    _, grads, loss = _torch_run(cfg, state, x, labels, "cuda", torch.float64)
    k, d = _worst(grads, ref_grad, GRAD_FLOOR)
    assert d <= compare.TRAIN_RTOL, f"float64 grad {k}: {d:.2e}"
    assert abs(loss - ref_loss) <= 1e-10 * max(1, abs(ref_loss))


@requires_jax_gpu
@pytest.mark.parametrize("variant", ["nnx", "linen"])
@pytest.mark.parametrize("name", PRESETS)
def test_flax_gpu_matches_float64_cpu(name, variant):
    import jax
    from densenet_flax import adapter
    assert jax.default_backend() == "gpu"
    cfg, state, x, labels, (ref_out, ref_grad, ref_loss) = reference(name)
    with jax.default_matmul_precision("highest"):
        outs = adapter.forward(cfg.to_dict(), state, x, train=False, variant=variant)["arrays"]
        g = adapter.gradients(cfg.to_dict(), state, x, labels, variant=variant, dtype="float64")
    k, d = _worst(outs, ref_out)
    assert d <= compare.EVAL_RTOL, f"float32 eval {k}: {d:.2e}"
    k, d = _worst(g["arrays"], ref_grad, GRAD_FLOOR)
    assert d <= compare.TRAIN_RTOL, f"float64 grad {k}: {d:.2e}"
    assert abs(g["loss"] - ref_loss) <= 1e-10 * max(1, abs(ref_loss))


@requires_cuda
def test_torchvision_densenet121_converts_into_our_backends(tmp_path):
    torchvision = pytest.importorskip(
        "torchvision", reason="torchvision not installed (it is on the GPU machine)")
    import torch
    from densenet_parity import convert
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    tv = torchvision.models.densenet121(weights=None).eval()
    # Non-trivial running statistics so that eval mode exercises them.
    for m in tv.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    src = tmp_path / "tv121.pth"
    torch.save(tv.state_dict(), src)
    canonical = tmp_path / "tv121.safetensors"
    cfg = convert.convert(str(src), str(canonical))
    assert cfg.name == "densenet121"
    assert [n for n, _, _ in spec.canonical_tensors(cfg)] == \
        [k for k in tv.state_dict() if not k.endswith("num_batches_tracked")]
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        ref = tv.double()(torch.as_tensor(x).double()).numpy()
    from densenet_weights import files
    state, _ = files.load_state(canonical)
    from densenet_torch.adapter import forward as torch_forward
    got = {"torch": torch_forward(cfg.to_dict(), state, x)["arrays"]["head"]}
    if compare_jax := __import__("importlib").util.find_spec("jax"):
        import jax
        from densenet_flax.adapter import forward as flax_forward
        with jax.default_matmul_precision("highest"):
            for v in ("nnx", "linen"):
                got[f"flax-{v}"] = flax_forward(cfg.to_dict(), state, x, variant=v)["arrays"]["head"]
    for name, logits in got.items():
        assert compare.rel_diff(logits, ref) <= compare.EVAL_RTOL, name


def cuda_count() -> int:
    try:
        import torch
        return torch.cuda.device_count()
    except ImportError:
        return 0


requires_two_gpus = pytest.mark.skipif(
    cuda_count() < 2, reason=f"fewer than 2 NVIDIA GPUs (torch.cuda.device_count() is "
    f"{cuda_count()}): PyTorch's SyncBatchNorm needs one GPU per process, and NCCL refuses two "
    "processes on one GPU")


@requires_two_gpus
@pytest.mark.parametrize("sync_bn", [False, True])
def test_torch_ddp_on_two_gpus_is_its_batchnorm_semantics(sync_bn):
    """The data-parallel rows of docs/data_parallel.md that need two GPUs: DDP over NCCL, one
    float64 step; with SyncBatchNorm it is the one-device step on the global batch, without it
    the per-device step (the parameters move by the mean of the shares' gradients, the running
    statistics are rank 0's); the two differ."""
    from densenet_torch.parallel import data_parallel_step
    from parity_tests.conftest import get_backend
    cfg = spec.get_preset("book")
    ref = get_backend("torch")
    state = ref.call("init_state", config=cfg.to_dict(), seed=2)["arrays"]
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 1, 64, 64)).astype(np.float32)
    labels = rng.integers(0, cfg.num_classes, 4).astype(np.int64)
    got = data_parallel_step(cfg.to_dict(), state, x, labels, devices=2, sync_bn=sync_bn,
                             lr=0.1, dtype="float64")
    assert got["platform"] == "cuda" and got["devices"] == 2

    def step(xs, ys):
        return ref.call("train_step", config=cfg.to_dict(), state=state, x=xs, labels=ys, lr=0.1,
                        dtype="float64")
    whole, halves = step(x, labels), [step(x[:2], labels[:2]), step(x[2:], labels[2:])]
    per_device = {k: (state[k] - 0.1 * (halves[0]["grads"][k] + halves[1]["grads"][k]) / 2
                      if k in halves[0]["grads"] else halves[0]["arrays"][k]) for k in state}
    want, other = (whole["arrays"], per_device) if sync_bn else (per_device, whole["arrays"])

    def worst(a, b):
        return max(float(np.abs(a[k] - b[k]).max() / max(np.abs(b[k]).max(), 1e-8)) for k in b)
    assert worst(got["arrays"], want) < 1e-9
    assert worst(got["arrays"], other) > 1e-3
