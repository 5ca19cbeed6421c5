"""The converter: torchvision-style state_dicts (old keys too) -> canonical safetensors ->
every framework's own file format, and back, bit for bit; pickles refused."""
import re
import subprocess
import sys

import numpy as np
import pytest

import densenet_spec as spec
from densenet_spec import convert, files
from parity_tests.backends import ROOT
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
    r = subprocess.run([sys.executable, "-m", "densenet_spec.convert", str(src), str(out)],
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
    with pytest.raises(spec.DenseNetConfigError, match="match no preset"):
        convert.convert(str(p), str(tmp_path / "o.safetensors"))
    with pytest.raises(spec.StateMismatchError, match="misshapen:  classifier.weight"):
        convert.convert(str(p), str(tmp_path / "o.safetensors"), preset="densenet_bc100",
                        num_classes=7)
    assert not (tmp_path / "o.safetensors").exists()
