"""The converter: any framework's file (PyTorch state_dicts, old torchvision keys too; Gluon
.params, ours, the book net's and the model zoo's; Flax msgpack; safetensors), under any names,
to every framework's own file and back, bit for bit; the book's listings and the model zoo's
DenseNet-121 converted into every backend compute what they computed; pickles refused; a file
that does not fit is refused with the first difference."""
import re
import subprocess
import sys

import numpy as np
import pytest

import densenet_spec as spec
from densenet_parity import convert
from densenet_weights import files
from densenet_parity.backends import ROOT
from parity_tests.conftest import get_backend

torch = pytest.importorskip("torch", reason="the converter tests need torch (main environment)")


@pytest.fixture(scope="module")
def torchvision_style(tmp_path_factory):
    """A DenseNet-BC-100-sized torchvision-style state_dict saved the old way (norm.1 keys)."""
    from densenet_torch import build
    torch.manual_seed(0)
    model = build("densenet_bc100", num_classes=7)
    sd = model.state_dict()
    old = {re.sub(r"(denselayer\d+\.)(norm|conv)([12])\.", r"\1\2.\3.", k): v for k, v in sd.items()}
    path = tmp_path_factory.mktemp("ckpt") / "old.pth"
    torch.save(old, path)
    canon = {k: v.numpy() for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    return path, canon


def test_pth_to_canonical_infers_preset_and_keeps_every_tensor(torchvision_style, tmp_path):
    src, canon = torchvision_style
    out = tmp_path / "m.safetensors"
    r = subprocess.run([sys.executable, "-m", "densenet_cli", "convert", str(src), str(out)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "DenseNet 'densenet_bc100'" in r.stdout
    state, cfg = files.load_state(out)
    assert cfg.num_classes == 7 and cfg.block_config == (16, 16, 16)
    assert set(state) == set(canon)
    assert all(np.array_equal(state[k], canon[k]) for k in canon)


@pytest.mark.parametrize("target, backend_name, suffix", [
    ("torch", "torch", ".pt"), ("mxnet", "mxnet", ".params"),
    ("flax-nnx", "flax-nnx", ".msgpack"), ("flax-linen", "flax-linen", ".msgpack")])
def test_canonical_to_each_framework_file_and_back(torchvision_style, tmp_path, target,
                                                   backend_name, suffix):
    src, canon = torchvision_style
    b = get_backend(backend_name)  # skips (with the build command) if MXNet is not built
    mid = tmp_path / "m.safetensors"
    cfg = convert.convert(str(src), str(mid))
    native = tmp_path / f"m{suffix}"
    convert.convert(str(mid), str(native), to=target)
    back = b.call("load_native", config=cfg.to_dict(), path=str(native))["arrays"]
    assert set(back) == set(canon)
    assert all(np.array_equal(back[k], canon[k]) for k in canon)


def test_arbitrary_pickle_is_refused(tmp_path):
    import collections
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": collections.Counter(a=1), "hook": print}, path)
    with pytest.raises(convert.ConvertError, match="refused: torch.load\\(weights_only=True\\)"):
        convert.read_checkpoint(str(path))


def test_unknown_format_and_wrong_shapes_are_clear_errors(torchvision_style, tmp_path):
    with pytest.raises(convert.ConvertError, match="unknown format"):
        convert.read_checkpoint(__file__)
    src, canon = torchvision_style
    bad = dict(canon)
    bad["classifier.weight"] = np.zeros((7, 5), np.float32)
    p = tmp_path / "bad.safetensors"
    files.save_state(bad, p)
    with pytest.raises(convert.MismatchError, match=r"first difference at classifier \(head\): "
                       r"the reference has a dense layer 342 -> 7; the model has a dense layer 5 -> 7"):
        convert.convert(str(p), str(tmp_path / "o.safetensors"))
    with pytest.raises(convert.MismatchError, match=r"classifier maps 342 -> 7"):
        convert.convert(str(p), str(tmp_path / "o.safetensors"), preset="densenet_bc100",
                        num_classes=7)
    assert not (tmp_path / "o.safetensors").exists()


# ------------------------------------------------------------------ every direction

def _main(*argv):
    from densenet_cli.main import main
    return main(["convert", *map(str, argv)])


def test_round_trip_torch_gluon_flax_torch_by_files_is_bit_exact(torchvision_style, tmp_path):
    """With the command alone: PyTorch -> Gluon .params -> Flax NNX -> Flax linen -> PyTorch,
    each file read as that framework's (no metadata, matched by name), every tensor equal."""
    src, canon = torchvision_style
    chain = [("mxnet", "m.params"), ("flax-nnx", "m.msgpack"), ("flax-linen", "l.msgpack"),
             ("torch", "back.pth")]
    cur = src
    for to, name in chain:
        assert _main(cur, tmp_path / name, "--to", to) == 0
        cur = tmp_path / name
    back = torch.load(cur, weights_only=True)
    assert {k for k in back if not k.endswith("num_batches_tracked")} == set(canon)
    assert all(np.array_equal(back[k].numpy(), canon[k]) for k in canon)


def _same_outputs_in_every_backend(path, cfg, x, want, tmp_path):
    """Convert ``path`` into every backend's file, load it there, run eval mode on ``x``:
    the logits agree with ``want`` (1e-5 relative)."""
    from densenet_parity.compare import EVAL_RTOL, rel_diff
    targets = {"torch": ".pth", "mxnet": ".params", "flax-nnx": ".msgpack", "flax-linen": ".msgpack"}
    for to, suffix in targets.items():
        native = tmp_path / f"{to}{suffix}"
        assert _main(path, native, "--to", to) == 0
        b = get_backend(to)
        state = b.call("load_native", config=cfg.to_dict(), path=str(native))["arrays"]
        got = b.call("forward", config=cfg.to_dict(), state=state, x=x)["arrays"]["head"]
        assert rel_diff(got, want) <= EVAL_RTOL, (to, rel_diff(got, want))


def _perturbed(tensors, seed=0):
    """Non-trivial weights: every tensor moved, BatchNorm variances kept positive."""
    rng = np.random.default_rng(seed)
    return {k: (np.abs(v) + 0.5 if k.endswith(("running_var", "moving_var")) else
                v + rng.normal(0, 0.05, v.shape)).astype(np.float32) for k, v in tensors.items()}


def test_the_books_pytorch_listing_converts_into_every_backend(tmp_path):
    from parity_tests.own_models import book_torch
    net = book_torch.net().eval()
    net.load_state_dict({k: torch.as_tensor(v) for k, v in _perturbed(
        {k: v.numpy() for k, v in net.state_dict().items() if "num_batches" not in k}).items()},
        strict=False)
    path = tmp_path / "book.pth"
    torch.save(net.state_dict(), path)
    x = np.random.default_rng(1).standard_normal((2, 1, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want = net(torch.as_tensor(x)).numpy()
    _same_outputs_in_every_backend(path, spec.get_preset("book"), x, want, tmp_path)


@pytest.mark.parametrize("factory, preset, size", [
    ("parity_tests.own_models.book_gluon:net", "book", 32),
    ("mxnet.gluon.model_zoo.vision:densenet121", "densenet121", 224)],
    ids=["book-gluon", "model-zoo-densenet121"])
def test_gluon_files_convert_into_every_backend(tmp_path, factory, preset, size):
    """The book's Gluon net (input channels inferred) and the model zoo's DenseNet-121
    (pretrained=False: its own random weights; a fixed 7x7 pooling, hence 224 px), saved by
    Gluon's save_parameters, converted with their own names."""
    b = get_backend("mxnet")
    cfg = spec.get_preset(preset)
    model = b.call("user_model", factory=factory, path=str(ROOT), size=size,
                   in_channels=cfg.in_channels)
    tensors = b.call("model_tensors", model=model)["arrays"]
    model = b.call("set_model_tensors", model=model, arrays=_perturbed(tensors))
    path = tmp_path / "gluon.params"
    b.call("save_model", model=model, path=str(path))
    x = np.random.default_rng(2).standard_normal((1, cfg.in_channels, size, size)).astype(np.float32)
    want = np.asarray(b.call("model_run", model=model, x=x)["logits"])
    _same_outputs_in_every_backend(path, cfg, x, want, tmp_path)
