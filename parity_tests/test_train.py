"""Training: the data (Fashion-MNIST's IDX files, the digits, resizing, the batch order), the
book's recipe in each backend (metrics JSON, plot, checkpoints), resuming a killed run, and the
same first step from the same weights in PyTorch, MXNet and Flax.

Small on purpose (32x32 images, a few dozen examples): the whole file runs in about two minutes
on a 2-core CPU once JAX's compilation cache (under .data/jax-cache) is warm.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import densenet_spec as spec
import densenet_training as training
from densenet_training import data
from densenet_weights import files
from densenet_parity.backends import ROOT, mxnet_python
from parity_tests.conftest import cli_env, get_backend, need_mxnet

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METRIC_KEYS = {"format", "backend", "device", "preset", "network", "dataset", "config", "recipe",
               "first_step_loss", "epochs", "final", "book_line", "versions", "resumed_from"}
EPOCH_KEYS = {"epoch", "loss", "train_acc", "test_acc", "examples", "train_time", "compile_time",
              "examples_per_sec", "first_loss", "curve"}


def cli(*args):
    return [sys.executable, "-m", "densenet_cli", "train", "--no-progress", *map(str, args)]


# ------------------------------------------------------------------ Fashion-MNIST's IDX files

def write_fashion(directory: Path, n_train=20, n_test=10, size=28, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, n_train).astype(np.uint8),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, n_test).astype(np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, a in arrays.items():
        data.write_idx(directory / name, a)
    return arrays


def test_published_md5_sums():
    # github.com/zalandoresearch/fashion-mnist README (and torchvision's FashionMNIST.resources)
    assert data.FASHION_MNIST_FILES == {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    }


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip(tmp_path, dtype):
    a = (np.arange(2 * 3 * 5) - 7).astype(dtype).reshape(2, 3, 5)
    for name in ("a.idx", "a.idx.gz"):
        data.write_idx(tmp_path / name, a)
        got = data.read_idx(tmp_path / name)
        assert got.dtype == np.dtype(dtype).newbyteorder("=") and np.array_equal(got, a)


def test_idx_header_layout(tmp_path):
    # The format as published: 0, 0, type 0x08 (ubyte), 3 dims; big-endian sizes; then the data.
    raw = bytes([0, 0, 8, 3]) + (2).to_bytes(4, "big") + (2).to_bytes(4, "big") + \
        (3).to_bytes(4, "big") + bytes(range(12))
    (tmp_path / "x.gz").write_bytes(gzip.compress(raw))
    want = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    assert np.array_equal(data.read_idx(tmp_path / "x.gz"), want)


def test_fashion_mnist_loads_a_local_directory(tmp_path):
    arrays = write_fashion(tmp_path)
    xtr, ytr, xte, yte = data.load_fashion_mnist(tmp_path, verify=False)
    assert np.array_equal(xtr, arrays["train-images-idx3-ubyte.gz"])
    assert np.array_equal(ytr, arrays["train-labels-idx1-ubyte.gz"]) and ytr.dtype == np.int64
    assert np.array_equal(xte, arrays["t10k-images-idx3-ubyte.gz"])
    assert np.array_equal(yte, arrays["t10k-labels-idx1-ubyte.gz"])


def test_md5_mismatch_is_a_clear_error(tmp_path):
    write_fashion(tmp_path)
    with pytest.raises(data.DataError) as e:
        data.load_fashion_mnist(tmp_path, verify=True)
    msg = str(e.value)
    assert "train-images-idx3-ubyte.gz" in msg and "MD5" in msg
    assert "8d4fb7e6c68d591d4c3dfef9ec88bf0d" in msg and "--no-verify" in msg


def test_md5_match_passes_verification(tmp_path, monkeypatch):
    write_fashion(tmp_path)
    monkeypatch.setattr(data, "FASHION_MNIST_FILES",
                        {n: data.md5sum(tmp_path / n) for n in data.FASHION_MNIST_FILES})
    assert len(data.load_fashion_mnist(tmp_path, verify=True)[0]) == 20


def test_truncated_idx_is_a_clear_error(tmp_path):
    write_fashion(tmp_path)
    name = "train-images-idx3-ubyte.gz"
    raw = gzip.decompress((tmp_path / name).read_bytes())
    (tmp_path / name).write_bytes(gzip.compress(raw[:-100]))  # valid gzip, short data
    with pytest.raises(data.DataError, match="truncated or corrupt IDX file") as e:
        data.load_fashion_mnist(tmp_path, verify=False)
    assert name in str(e.value)


def test_truncated_gzip_is_a_clear_error(tmp_path):
    write_fashion(tmp_path)
    name = "t10k-images-idx3-ubyte.gz"
    blob = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(blob[: len(blob) // 2])
    with pytest.raises(data.DataError, match="corrupt or truncated gzip") as e:
        data.load_fashion_mnist(tmp_path, verify=False)
    assert name in str(e.value)


def test_garbage_is_a_clear_error(tmp_path):
    write_fashion(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"not an idx file"))
    with pytest.raises(data.DataError, match="not an IDX file"):
        data.load_fashion_mnist(tmp_path, verify=False)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"not even gzip")
    with pytest.raises(data.DataError, match="corrupt or truncated gzip"):
        data.load_fashion_mnist(tmp_path, verify=False)


def test_missing_files_name_the_files_and_data_dir(tmp_path):
    write_fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(data.DataError) as e:
        data.load_fashion_mnist(tmp_path)
    msg = str(e.value)
    assert "t10k-labels-idx1-ubyte.gz" in msg and "--data-dir" in msg and str(tmp_path) in msg
    assert "train-images-idx3-ubyte.gz" not in msg  # only what is missing
    with pytest.raises(data.DataError, match="--data-dir"):
        data.load_fashion_mnist(tmp_path / "nowhere")


def test_cache_download_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DENSENET_DATA_CACHE", str(tmp_path))

    def offline(*a, **k):
        raise OSError("network unreachable")
    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(data.DataError) as e:
        data.load_fashion_mnist()
    msg = str(e.value)
    assert "download failed" in msg and "network unreachable" in msg and "--data-dir" in msg
    assert all(n in msg for n in data.FASHION_MNIST_FILES)


def test_cache_download_fetches_verifies_and_reuses(tmp_path, monkeypatch):
    served = tmp_path / "server"
    arrays = write_fashion(served)
    monkeypatch.setattr(data, "FASHION_MNIST_FILES",
                        {n: data.md5sum(served / n) for n in data.FASHION_MNIST_FILES})
    monkeypatch.setenv("DENSENET_DATA_CACHE", str(tmp_path / "cache"))
    fetched = []

    def urlopen(url, timeout=None):
        fetched.append(url)
        return io.BytesIO((served / url.rsplit("/", 1)[1]).read_bytes())
    monkeypatch.setattr(data.urllib.request, "urlopen", urlopen)
    xtr = data.load_fashion_mnist()[0]
    assert np.array_equal(xtr, arrays["train-images-idx3-ubyte.gz"]) and len(fetched) == 4
    assert (tmp_path / "cache" / "fashion-mnist" / "train-images-idx3-ubyte.gz").exists()
    data.load_fashion_mnist()
    assert len(fetched) == 4  # cached: nothing downloaded again


def test_cli_reports_missing_data_dir(tmp_path, capsys):
    from densenet_cli.train import main
    rc = main(["--dataset", "fashion-mnist", "--data-dir", str(tmp_path), "--out",
               str(tmp_path / "run"), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--data-dir" in err and "train-images-idx3-ubyte.gz" in err


def test_fashion_mnist_dataset_resized_and_limited(tmp_path):
    write_fashion(tmp_path)
    ds = data.load_dataset("fashion-mnist", resize=40, limit=8, data_dir=tmp_path, verify=False)
    assert ds.train_images.shape == (8, 40, 40) and ds.test_images.shape == (8, 40, 40)
    x, y = ds.batch(np.arange(3))
    assert x.shape == (3, 1, 40, 40) and x.dtype == np.float32 and 0 <= x.min() <= x.max() <= 1
    assert y.dtype == np.int64


# ------------------------------------------------------------------ resize, digits, batch order

@pytest.mark.parametrize("shape, size", [((3, 8, 8), 32), ((2, 28, 28), 96), ((2, 28, 28), 13),
                                         ((1, 5, 7), (11, 3))])
def test_resize_matches_torch_bilinear(shape, size):
    import torch
    import torch.nn.functional as F
    x = np.random.default_rng(1).random(shape).astype(np.float32)
    got = data.resize_bilinear(x, size)
    hw = (size, size) if isinstance(size, int) else size
    want = F.interpolate(torch.from_numpy(x)[:, None], size=hw, mode="bilinear",
                         align_corners=False, antialias=False)[:, 0].numpy()
    np.testing.assert_allclose(got, want, atol=2e-6)


def test_resize_uint8_rounds_and_keeps_constants():
    x = np.full((2, 8, 8), 77, np.uint8)
    assert np.array_equal(data.resize_bilinear(x, 32), np.full((2, 32, 32), 77, np.uint8))
    ramp = np.tile(np.arange(0, 256, 32, dtype=np.uint8), (1, 8, 1))
    up = data.resize_bilinear(ramp, 16)
    assert up.dtype == np.uint8 and np.all(np.diff(up[0, 0].astype(int)) >= 0)
    assert np.array_equal(data.resize_bilinear(ramp, 8), ramp)


def test_digits():
    """The digits as scikit-learn's load_digits gives them, read without importing it."""
    import subprocess
    import sys
    code = ("import sys; from densenet_training import data; data.load_digits(); "
            "print('sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=cli_env(),
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    from sklearn.datasets import load_digits
    sk = load_digits()
    xtr, ytr, xte, yte = data.load_digits()
    order = data.epoch_order(1797, seed=20240601, epoch=0)  # the split: the first 360 test
    split = np.concatenate([order[360:], order[:360]])
    assert np.array_equal(np.concatenate([xtr, xte]),
                          np.rint(sk.images * (255.0 / 16.0)).astype(np.uint8)[split])
    assert np.array_equal(np.concatenate([ytr, yte]), sk.target[split])
    assert xtr.shape == (1437, 8, 8) and xte.shape == (360, 8, 8) and xtr.dtype == np.uint8
    assert set(np.unique(ytr)) == set(range(10)) == set(np.unique(yte))
    assert xtr.max() == 255 and xtr.min() == 0
    again = data.load_digits()
    assert np.array_equal(again[0], xtr) and np.array_equal(again[3], yte)
    ds = data.load_dataset("digits")
    assert ds.size == 32 and ds.train_images.shape == (1437, 32, 32)


def test_batch_order_is_a_pure_function_of_seed_and_epoch():
    order = data.epoch_order(1000, seed=3, epoch=2)
    assert sorted(order.tolist()) == list(range(1000))
    assert np.array_equal(order, data.epoch_order(1000, seed=3, epoch=2))
    assert not np.array_equal(order, data.epoch_order(1000, seed=3, epoch=1))
    assert not np.array_equal(order, data.epoch_order(1000, seed=4, epoch=2))
    batches = data.batch_indices(1000, 256, 3, 2)
    assert [len(b) for b in batches] == [256, 256, 256, 232]  # the last batch is kept, as d2l


def test_xavier_state_is_the_books_init():
    import torch
    cfg = spec.get_preset("book")
    st = training.xavier_state(cfg, seed=7)
    assert set(st) == {n for n, _, _ in spec.canonical_tensors(cfg)}
    for name, shape, _ in spec.canonical_tensors(cfg):
        a = st[name]
        assert a.shape == shape and a.dtype == np.float32
        if name.endswith("weight") and len(shape) > 1:  # conv / dense: U(-b, b), torch's b
            fan_in, fan_out = torch.nn.init._calculate_fan_in_and_fan_out(torch.empty(shape))
            bound = np.sqrt(6.0 / (fan_in + fan_out))
            assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound
            if a.size > 1000:
                assert abs(a.mean()) < 0.05 * bound
                assert abs(a.std() - bound / np.sqrt(3)) < 0.05 * bound
        elif name.endswith(("weight", "running_var")):
            assert np.all(a == 1)
        else:
            assert np.all(a == 0)
    assert all(np.array_equal(st[k], v) for k, v in training.xavier_state(cfg, seed=7).items())
    assert not np.array_equal(st["classifier.weight"],
                              training.xavier_state(cfg, seed=8)["classifier.weight"])


def test_batch_order_and_init_are_the_same_in_the_mxnet_environment():
    py = need_mxnet()
    code = ("import hashlib, numpy as np, densenet_spec as spec\n"
            "import densenet_training as training\nfrom densenet_training import data\n"
            "h = hashlib.sha256(data.epoch_order(5000, 11, 3).tobytes())\n"
            "st = training.xavier_state(spec.get_preset('book'), 5)\n"
            "[h.update(st[k].tobytes()) for k in sorted(st)]\n"
            "print(h.hexdigest(), np.__version__)")
    out = subprocess.run([py, "-c", code], cwd=ROOT, env=cli_env(), capture_output=True,
                         text=True, check=True).stdout.split()
    h = hashlib.sha256(data.epoch_order(5000, 11, 3).tobytes())
    st = training.xavier_state(spec.get_preset("book"), 5)
    [h.update(st[k].tobytes()) for k in sorted(st)]
    assert out[0] == h.hexdigest(), f"numpy {out[1]} (MXNet env) vs {np.__version__}"


# ------------------------------------------------------------------ the recipe, per backend

class Recorder(training.Reporter):
    def __init__(self):
        self.events = []

    def start(self, info): self.events.append(("start", info))
    def epoch_start(self, epoch, epochs, num_batches): self.events.append(("epoch_start", epoch))
    def batch(self, i, num_batches, loss, acc): self.events.append(("batch", i))
    def epoch_end(self, record): self.events.append(("epoch_end", record["epoch"]))
    def message(self, text): self.events.append(("message", text))
    def finish(self, metrics): self.events.append(("finish", metrics["final"]))


TINY = dict(dataset="digits", resize=32, limit=128, batch_size=32, epochs=2, seed=0)


def tiny_config(backend, out, **kw):
    return training.TrainConfig(**dict(TINY, backend=backend, out=str(out), progress=False,
                                       **kw)).finalize()


@pytest.fixture
def one_torch_thread():
    """PyTorch in this process on one thread while the test runs (pytest -n 2 on two cores:
    OpenMP threads that contend spin, and a 2-second run takes a minute)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def first_step_reference(seed=0):
    """PyTorch's parity adapter: one SGD step from the Xavier state of ``seed`` on the first
    batch of the TINY run; every trainer's first-step loss must be this one."""
    cfg = spec.get_preset("book")
    ds = data.load_dataset("digits", TINY["resize"], limit=TINY["limit"])
    x, y = ds.batch(data.batch_indices(TINY["limit"], TINY["batch_size"], seed, 0)[0])
    return get_backend("torch").call("train_step", config=cfg.to_dict(),
                                     state=training.xavier_state(cfg, seed), x=x, labels=y,
                                     lr=0.1)["loss"]


@pytest.mark.parametrize("backend", ["torch", "mxnet", "flax"])
def test_recipe_trains_and_writes_metrics_plot_and_checkpoint(backend, tmp_path,
                                                              one_torch_thread):
    """One tiny run (through densenet_cli.train.train, as the command does). Its first step is
    PyTorch's adapter's, from the same Xavier weights on the same batch: the same start and the
    same first step in every backend."""
    if backend == "mxnet":
        need_mxnet()
    from densenet_cli.train import train
    out, rec = tmp_path / "run", Recorder()
    metrics = train(tiny_config(backend, out), rec)
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    assert METRIC_KEYS <= set(on_disk) and on_disk["backend"] == backend
    assert [set(r) >= EPOCH_KEYS for r in on_disk["epochs"]] == [True, True]
    assert on_disk["recipe"]["optimizer"] == "sgd" and on_disk["recipe"]["lr"] == 0.1
    # it learns: the loss of the second epoch is below the first step's (about ln 10)
    assert on_disk["epochs"][-1]["loss"] < on_disk["first_step_loss"] - 0.3
    assert all(0 <= r["test_acc"] <= 1 and r["examples"] == 128 for r in on_disk["epochs"])
    lines = on_disk["book_line"].split("\n")
    assert lines[0].startswith("loss ") and ", train acc " in lines[0] and ", test acc " in lines[0]
    assert lines[1].endswith(f"examples/sec on {on_disk['device']}")
    png = (out / "metrics.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 5000
    ckpt = training.latest_checkpoint(out)
    assert ckpt.name == "epoch-0002"
    state, config = files.load_state(ckpt / "model.safetensors")
    spec.check_state(config, {k: v.shape for k, v in state.items()})
    info = json.loads((ckpt / "checkpoint.json").read_text())
    assert info["optimizer"]["step"] == 8 and info["optimizer"]["momentum"] == 0.0
    kinds = [e[0] for e in rec.events]
    assert kinds[0] == "start" and kinds.count("batch") == 8 and kinds.count("epoch_end") == 2
    assert "finish" in kinds  # the MXNet child's progress arrives as events too
    assert on_disk["first_step_loss"] == pytest.approx(first_step_reference(), rel=1e-5)


def test_same_canonical_weights_give_the_same_first_step(tmp_path, one_torch_thread):
    """--init: the weights of PyTorch's own initialisers, one step in each trainer, against the
    parity adapters' train_step on the same batch (PyTorch's and MXNet's worker)."""
    from densenet_cli.train import train
    cfg = spec.get_preset("book")
    init = get_backend("torch").call("init_state", config=cfg.to_dict(), seed=1)["arrays"]
    path = tmp_path / "init.safetensors"
    files.save_state(init, path, cfg)
    ds = data.load_dataset("digits", 32, limit=32)
    x, y = ds.batch(data.batch_indices(32, 32, 0, 0)[0])
    want = get_backend("torch").call("train_step", config=cfg.to_dict(), state=init, x=x,
                                     labels=y, lr=0.1)["loss"]
    losses = {}
    for backend in ("torch", "flax", "mxnet"):
        if backend == "mxnet" and mxnet_python() is None:
            continue
        m = train(tiny_config(backend, tmp_path / backend, limit=32, epochs=1, init=str(path),
                              plot=False), Recorder())
        losses[backend] = m["first_step_loss"]
    if "mxnet" in losses:
        losses["mxnet-adapter"] = get_backend("mxnet").call(
            "train_step", config=cfg.to_dict(), state=init, x=x, labels=y, lr=0.1)["loss"]
    for name, loss in losses.items():
        assert loss == pytest.approx(want, rel=1e-5), (name, losses, want)
    need_mxnet()


def test_transition_pool_reaches_the_network_and_the_mxnet_child():
    """--transition-pool: parsed, passed on to the MXNet trainer's process (config_to_argv), in
    the network every trainer builds (model_options), in the default run directory's name; a
    checkpoint written before the option existed resumes as an average-pool run."""
    args = training.make_parser().parse_args(["--transition-pool", "max", "--epochs", "3"])
    cfg = training.config_from_args(args)
    assert cfg.transition_pool == "max" and cfg.out.endswith("digits-book-maxpool-torch")
    again = training.config_from_args(training.make_parser().parse_args(
        training.config_to_argv(cfg)))
    assert again == cfg
    ds = data.load_dataset("digits", 32, limit=8)
    assert training.check_size(cfg, ds).transition_pool == "max"
    assert "transition_pool" not in training.model_options(training.TrainConfig(), ds)
    assert training.RESUME_DEFAULTS["transition_pool"] == "avg"
    assert "transition_pool" in training.RESUME_KEYS
    with pytest.raises(SystemExit):
        training.make_parser().parse_args(["--transition-pool", "sum"])


# ------------------------------------------------------------------ checkpoints and resume

def test_resume_refuses_a_different_run_and_a_silent_restart(tmp_path, one_torch_thread):
    from densenet_cli.train import main
    out = tmp_path / "run"
    base = ["--backend", "torch", "--limit", "32", "--batch-size", "32", "--epochs", "1",
            "--out", str(out), "--no-progress", "--no-plot"]
    assert main(["--resume", *base]) == 2  # nothing to resume
    assert main(base) == 0
    assert main(base) == 2  # would overwrite the run: needs --resume or --overwrite
    assert main([*base, "--resume", "--lr", "0.05"]) == 2  # a different run
    assert main([*base, "--resume", "--transition-pool", "max"]) == 2  # a different network
    assert main([*base, "--overwrite"]) == 0
    assert main([*base, "--resume", "--epochs", "2"]) == 0  # more epochs: fine
    assert json.loads((out / "metrics.json").read_text())["resumed_from"] == 1


def _kill_after_first_checkpoint(cmd, out, epochs):
    log = open(out.parent / f"{out.name}.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=cli_env(), stdout=log, stderr=subprocess.STDOUT)
    pointer = training.checkpoints_dir(out) / "latest.json"
    deadline = time.time() + 240
    while not pointer.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the run ended (or hung) before its first checkpoint: "
                        f"{(out.parent / f'{out.name}.log').read_text()[-3000:]}")
        time.sleep(0.01)
    proc.kill()  # SIGKILL: no chance to clean up
    proc.wait()
    log.close()
    done = json.loads(pointer.read_text())["epoch"]
    assert done < epochs and not (out / "metrics.json").exists(), "killed too late"
    return done


def _same_history(a, b):
    assert len(a["epochs"]) == len(b["epochs"])
    for ra, rb in zip(a["epochs"], b["epochs"]):
        for key in ("loss", "train_acc", "test_acc", "first_loss"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-6, abs=1e-7), (ra["epoch"], key)
        np.testing.assert_allclose(np.array(ra["curve"]), np.array(rb["curve"]), rtol=1e-6)


@pytest.mark.parametrize("backend, momentum", [("torch", 0.0), ("flax", 0.9), ("mxnet", 0.9)])
def test_killed_run_resumes_to_the_same_metrics(backend, momentum, tmp_path):
    """Kill -9 a run once its first checkpoint is written, resume it: the same metrics as a
    run never stopped, and bit-for-bit the same final weights."""
    if backend == "mxnet":
        need_mxnet()
    epochs, limit = 3, 64
    args = ["--backend", backend, "--limit", limit, "--batch-size", 32, "--epochs", epochs,
            "--momentum", momentum, "--seed", 3, "--no-plot"]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    subprocess.run(cli(*args, "--out", whole), cwd=ROOT, env=cli_env(), check=True,
                   capture_output=True)
    done = _kill_after_first_checkpoint(cli(*args, "--out", broken), broken, epochs)
    res = subprocess.run(cli(*args, "--out", broken, "--resume"), cwd=ROOT, env=cli_env(),
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed after epoch {done}" in res.stdout
    a = json.loads((whole / "metrics.json").read_text())
    b = json.loads((broken / "metrics.json").read_text())
    assert b["resumed_from"] == done and a["resumed_from"] is None
    _same_history(a, b)
    sa, _ = files.load_state(training.latest_checkpoint(whole) / "model.safetensors")
    sb, _ = files.load_state(training.latest_checkpoint(broken) / "model.safetensors")
    assert all(np.array_equal(sa[k], sb[k]) for k in sa)
    from safetensors.numpy import load_file
    buffers = load_file(str(training.latest_checkpoint(broken) / "optimizer.safetensors"))
    trainable = {n for n, _, kind in spec.canonical_tensors(spec.get_preset("book"))
                 if kind == "param"}
    assert set(buffers) == (trainable if momentum else set())


def test_torch_momentum_buffers_round_trip(tmp_path, one_torch_thread):
    """The optimiser section: PyTorch's momentum buffers under canonical names, restored so
    that the next step is bit for bit the one an unbroken optimiser takes."""
    import torch
    from densenet_torch import train as T
    ds = data.load_dataset("digits", 32, limit=64)
    cfg = tiny_config("torch", tmp_path, limit=64)
    batches = data.batch_indices(64, 32, 0, 0)

    def fresh():
        model = T.build_model(cfg, ds, "cpu")
        T.xavier_init(model, 0)
        return model, T.make_optimizer(model, 0.1, momentum=0.9)

    def step(model, opt, idx):
        x, y = ds.batch(idx)
        T.train_step(model, opt, torch.from_numpy(x), torch.from_numpy(y))

    a, opt_a = fresh()
    step(a, opt_a, batches[0])
    T.save_checkpoint(tmp_path, 1, a, opt_a, {"optimizer": training.optimizer_info(0.1, 0.9, 1)})
    b, opt_b = fresh()
    info = T.load_checkpoint(training.latest_checkpoint(tmp_path), b, opt_b)
    assert info["optimizer"]["momentum"] == 0.9 and info["optimizer"]["step"] == 1
    buffers = T.optimizer_state(b, opt_b)
    assert set(buffers) == {n for n, _ in a.named_parameters()}
    step(a, opt_a, batches[1])
    step(b, opt_b, batches[1])
    sa, sb = T.state_lib.export_state(a), T.state_lib.export_state(b)
    assert all(np.array_equal(sa[k], sb[k]) for k in sa)


def test_mxnet_unavailable_names_make_mxnet_env(tmp_path, monkeypatch):
    from densenet_cli import train as cli_mod
    monkeypatch.setenv("DENSENET_MXNET_PYTHON", str(tmp_path / "no-python"))
    monkeypatch.setattr(cli_mod, "ROOT", tmp_path)
    with pytest.raises(training.UserError, match="make mxnet-env"):
        cli_mod.train(tiny_config("mxnet", tmp_path / "run", limit=32, epochs=1))
