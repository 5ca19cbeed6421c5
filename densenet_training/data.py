"""Datasets for training, framework-free (numpy only; importable in both environments).

* Fashion-MNIST, the book's dataset: the four IDX gzip files of Zalando's release, checked
  against their published MD5 sums, downloaded into a cache directory on first use where the
  network allows, or read from a local directory (``--data-dir``).
* scikit-learn's bundled 8x8 digits (1,797 images): a real dataset that works offline, for quick
  runs and tests (scikit-learn is in the main environment only; the MXNet trainer gets its data
  prepared by the parent process as an ``.npz`` file, see ``save_npz`` / ``load_npz``).
* Bilinear resizing in numpy, like the book's ``transforms.Resize`` on 8-bit images: the
  result is rounded back to uint8, so every backend sees the same bytes.
* The batch order of every epoch from the seed alone, with an integer hash that gives the same
  permutation under numpy 1.23 and numpy 2 (numpy's generators promise no stream stability
  across versions), so the three backends train on the same batches in the same order.

Images are kept as uint8 (N, H, W); ``Dataset.batch`` returns float32 NCHW in [0, 1] (what the
book's ``ToTensor`` gives) and int64 labels.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import struct
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

__all__ = [
    "DataError", "FASHION_MNIST_FILES", "FASHION_MNIST_MIRRORS", "FASHION_MNIST_CLASSES",
    "DATASETS", "DEFAULT_RESIZE", "read_idx", "write_idx", "md5sum", "cache_dir",
    "load_fashion_mnist", "load_digits", "resize_bilinear", "epoch_order", "batch_indices",
    "even_batches",
    "Dataset", "load_dataset", "save_npz", "load_npz",
]


class DataError(RuntimeError):
    """A dataset that cannot be read: missing, truncated, corrupt or the wrong files."""


#: The published MD5 sums of Fashion-MNIST's files (github.com/zalandoresearch/fashion-mnist,
#: README "Get the Data"; the same values as torchvision's FashionMNIST.resources).
FASHION_MNIST_FILES: Dict[str, str] = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
FASHION_MNIST_MIRRORS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)
FASHION_MNIST_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                         "sneaker", "bag", "ankle boot")

DATASETS = ("digits", "fashion-mnist")
#: Image size when --resize is not given: the book's 96 for Fashion-MNIST; 32 for the digits
#: (8x8 upsampled 4x, the smallest power of two the book's network takes: it needs 29).
DEFAULT_RESIZE = {"fashion-mnist": 96, "digits": 32}

# IDX type codes (yann.lecun.com/exdb/mnist): 0x08 ubyte ... 0x0E double, big-endian data.
_IDX_TYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_CODES = {np.dtype(v).newbyteorder("=").str[1:]: k for k, v in _IDX_TYPES.items()}


# --------------------------------------------------------------------------- IDX files

def read_idx(path) -> np.ndarray:
    """The array in an IDX file (gzip-compressed if the name ends in .gz).

    Raises DataError naming the file when it is missing, not gzip, truncated, or when its
    header and size disagree.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: corrupt or truncated gzip file ({e}); delete it and "
                        "download it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, {ndim} dimensions)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    count = int(np.prod(dims, dtype=np.int64))
    expected = count * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{path}: truncated or corrupt IDX file: its header says shape "
                        f"{tuple(dims)} ({expected} bytes of data), the file has "
                        f"{len(raw) - header} bytes of data")
    out = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(dims)
    return out.astype(dtype.newbyteorder("="))


def write_idx(path, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file (gzip if the name ends in .gz). For tests and tools."""
    array = np.asarray(array)
    code = _IDX_CODES[array.dtype.newbyteorder("=").str[1:]]
    data = array.astype(np.dtype(_IDX_TYPES[code])).tobytes()
    blob = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + data
    path = Path(path)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(blob)
    else:
        path.write_bytes(blob)


def md5sum(path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- Fashion-MNIST

def cache_dir() -> Path:
    """Where downloads go: $DENSENET_DATA_CACHE, else .data/ in the source checkout (ignored
    by git), else ~/.cache/densenet-suite."""
    env = os.environ.get("DENSENET_DATA_CACHE")
    if env:
        return Path(env)
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").exists() and os.access(root, os.W_OK):
        return root / ".data"
    return Path.home() / ".cache" / "densenet-suite"


def _download(name: str, directory: Path, timeout: float = 30.0) -> Optional[str]:
    """Fetch one file into ``directory``; None on success, else why every mirror failed."""
    errors = []
    for mirror in FASHION_MNIST_MIRRORS:
        url = mirror + name
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp, \
                    tempfile.NamedTemporaryFile(dir=directory, delete=False) as tmp:
                shutil.copyfileobj(resp, tmp)
            digest = md5sum(tmp.name)
            if digest != FASHION_MNIST_FILES[name]:
                os.remove(tmp.name)
                errors.append(f"{url}: MD5 {digest} != {FASHION_MNIST_FILES[name]}")
                continue
            os.replace(tmp.name, directory / name)
            return None
        except Exception as e:  # noqa: BLE001 - any network failure means: try the next mirror
            errors.append(f"{url}: {e}")
    return "; ".join(errors)


def _missing_message(directory: Path, missing: List[str], why: str) -> str:
    files = "\n".join(f"  {n}  (MD5 {FASHION_MNIST_FILES[n]})" for n in missing)
    return (f"Fashion-MNIST files missing in {directory} ({why}):\n{files}\n"
            f"Download them from {FASHION_MNIST_MIRRORS[0]} (or {FASHION_MNIST_MIRRORS[1]}) "
            "into a directory and pass it with --data-dir DIR, or use --dataset digits, which "
            "works offline.")


def load_fashion_mnist(data_dir=None, download: Optional[bool] = None, verify: bool = True
                       ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, test images, test labels): uint8 (N, 28, 28) and int64 (N,).

    ``data_dir`` given: read the four files there (no download unless ``download=True``).
    Otherwise the cache directory, downloading what is missing. ``verify`` checks every
    file's MD5 against the published sums (turn it off for your own IDX files).
    """
    if data_dir is not None:
        directory, download = Path(data_dir), bool(download)
        if not directory.is_dir():
            raise DataError(f"--data-dir {directory}: no such directory. " + _missing_message(
                directory, list(FASHION_MNIST_FILES), "no directory"))
    else:
        directory = cache_dir() / "fashion-mnist"
        download = True if download is None else download
    missing = [n for n in FASHION_MNIST_FILES if not (directory / n).exists()]
    why = "not downloaded (download disabled)"
    if missing and download:
        directory.mkdir(parents=True, exist_ok=True)
        failures = {n: _download(n, directory) for n in missing}
        missing = [n for n, err in failures.items() if err]
        if missing:
            why = "download failed: " + failures[missing[0]]
    elif missing and data_dir is not None:
        why = "not found in --data-dir"
    if missing:
        raise DataError(_missing_message(directory, missing, why))
    if verify:
        for name, want in FASHION_MNIST_FILES.items():
            got = md5sum(directory / name)
            if got != want:
                raise DataError(
                    f"{directory / name}: MD5 {got} does not match the published {want}: the file "
                    "is corrupt, truncated or not Fashion-MNIST's. Delete it (it is downloaded "
                    "again) or, for your own IDX files, pass --no-verify.")
    arrays = [read_idx(directory / n) for n in FASHION_MNIST_FILES]
    xtr, ytr, xte, yte = arrays
    for (xs, ys, what) in ((xtr, ytr, "train"), (xte, yte, "t10k")):
        if xs.ndim != 3 or ys.ndim != 1 or len(xs) != len(ys):
            raise DataError(f"{directory}: {what} images {xs.shape} and labels {ys.shape} do not "
                            "form a dataset (expected (N, H, W) images and N labels)")
        if ys.size and (ys.min() < 0 or ys.max() > 9):
            raise DataError(f"{directory}: {what} labels outside 0..9")
    return (xtr.astype(np.uint8), ytr.astype(np.int64), xte.astype(np.uint8), yte.astype(np.int64))


# --------------------------------------------------------------------------- digits

def load_digits(test_fraction: float = 0.2
                ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits as uint8 images (0..16 scaled to 0..255) with a fixed
    train/test split: 1,437 train, 360 test (a seeded permutation, the same everywhere)."""
    flat = _digits_table()
    images = np.rint(flat[:, :-1].reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)
    labels = flat[:, -1].astype(np.int64)
    order = epoch_order(len(labels), seed=20240601, epoch=0)
    n_test = int(np.ceil(len(labels) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return images[train], labels[train], images[test], labels[test]


def _digits_table() -> np.ndarray:
    """The file behind sklearn.datasets.load_digits (1,797 rows: 64 pixels, then the label),
    read from scikit-learn's package folder without importing scikit-learn (1.2 s a process:
    every `densenet train` on the digits paid it for one CSV file)."""
    import importlib.util
    spec = importlib.util.find_spec("sklearn")
    path = None
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
    if path is None or not path.is_file():
        raise DataError("the digits dataset needs scikit-learn (it is in the main environment; "
                        "the MXNet trainer receives data prepared by `densenet train`)"
                        + ("" if spec is None else f"; {path} is not there"))
    with gzip.open(path, "rt") as f:
        flat = np.loadtxt(f, delimiter=",")
    if flat.shape != (1797, 65):
        raise DataError(f"{path}: expected 1797 rows of 64 pixels and a label, found a table "
                        f"of shape {flat.shape}")
    return flat


# --------------------------------------------------------------------------- resize

def _linear_weights(in_size: int, out_size: int):
    # Half-pixel centres (align_corners=False), source index clamped at 0: the same as
    # torch.nn.functional.interpolate(mode='bilinear') and PIL when upsampling.
    scale = in_size / out_size
    src = np.maximum((np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = src - i0
    return i0, i1, 1.0 - w1, w1


def resize_bilinear(images: np.ndarray, size, chunk: int = 4096) -> np.ndarray:
    """Bilinear resize of (N, H, W) images to ``size`` (int or (h, w)).

    Float input gives float32 output; uint8 input is rounded and clipped back to uint8 (the
    book resizes 8-bit PIL images before ToTensor). No antialiasing: for downsampling, use it
    with care.
    """
    images = np.asarray(images)
    if images.ndim != 3:
        raise ValueError(f"resize_bilinear expects (N, H, W) images, got shape {images.shape}")
    oh, ow = (size, size) if np.isscalar(size) else tuple(size)
    n, h, w = images.shape
    if (oh, ow) == (h, w):
        return images.copy()
    r0, r1, rw0, rw1 = _linear_weights(h, oh)
    c0, c1, cw0, cw1 = _linear_weights(w, ow)
    is_uint8 = images.dtype == np.uint8
    out = np.empty((n, oh, ow), dtype=np.uint8 if is_uint8 else np.float32)
    for s in range(0, n, chunk):
        x = images[s:s + chunk].astype(np.float64)
        rows = x[:, r0, :] * rw0[None, :, None] + x[:, r1, :] * rw1[None, :, None]
        y = rows[:, :, c0] * cw0[None, None, :] + rows[:, :, c1] * cw1[None, None, :]
        out[s:s + chunk] = np.clip(np.rint(y), 0, 255) if is_uint8 else y
    return out


# --------------------------------------------------------------------------- batch order

_M64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & np.uint64(_M64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of ``n`` examples for ``epoch`` (0-based) of a run with ``seed``.

    A pure function of (n, seed, epoch), identical under every numpy version, so every backend
    and a resumed run see the same batches.
    """
    key = (int(seed) * 0xD1B54A32D192ED03 + int(epoch) * 0x8CB92BA72F3D8DD7 + 1) & _M64
    with np.errstate(over="ignore"):
        keys = _splitmix64(np.arange(n, dtype=np.uint64) ^ np.uint64(key))
    return np.argsort(keys, kind="stable").astype(np.int64)


def batch_indices(n: int, batch_size: int, seed: int, epoch: int) -> List[np.ndarray]:
    """The epoch's minibatches (index arrays), shuffled; the last one may be smaller (the book's
    DataLoader keeps it)."""
    order = epoch_order(n, seed, epoch)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def even_batches(batches: List[np.ndarray], devices: int) -> List[np.ndarray]:
    """The batches for ``devices`` devices that each take an equal share: every batch cut to
    a multiple of ``devices`` (only the epoch's last, smaller batch can lose examples: at most
    devices - 1, different ones each epoch since the order is reshuffled), empty ones dropped."""
    out = [b[:len(b) - len(b) % devices] for b in batches]
    return [b for b in out if len(b)]


# --------------------------------------------------------------------------- dataset

@dataclass
class Dataset:
    """uint8 images (N, H, W), already at the training size, and int64 labels."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    size: int
    num_classes: int = 10
    info: Dict[str, object] = field(default_factory=dict)

    @staticmethod
    def to_float(images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W) -> float32 (N, 1, H, W) in [0, 1], NCHW (the canonical layout)."""
        return (images.astype(np.float32) * np.float32(1.0 / 255.0))[:, None, :, :]

    def batch(self, indices, split: str = "train") -> Tuple[np.ndarray, np.ndarray]:
        images, labels = ((self.train_images, self.train_labels) if split == "train"
                          else (self.test_images, self.test_labels))
        return self.to_float(images[indices]), labels[indices]

    def describe(self) -> Dict[str, object]:
        return {"name": self.name, "train": int(len(self.train_labels)),
                "test": int(len(self.test_labels)), "size": int(self.size),
                "num_classes": int(self.num_classes), **self.info}


def load_dataset(name: str = "digits", resize: Optional[int] = None, limit: Optional[int] = None,
                 data_dir=None, download: Optional[bool] = None, verify: bool = True) -> Dataset:
    """A dataset ready for training: resized, optionally cut to its first ``limit`` train and
    test examples (quick runs)."""
    if name == "fashion-mnist":
        xtr, ytr, xte, yte = load_fashion_mnist(data_dir, download=download, verify=verify)
    elif name == "digits":
        xtr, ytr, xte, yte = load_digits()
    else:
        raise DataError(f"unknown dataset {name!r}; datasets: {', '.join(DATASETS)}")
    if limit is not None:
        if limit <= 0:
            raise DataError(f"--limit must be positive, got {limit}")
        xtr, ytr, xte, yte = xtr[:limit], ytr[:limit], xte[:limit], yte[:limit]
    size = int(resize or DEFAULT_RESIZE[name])
    if size <= 0:
        raise DataError(f"--resize must be positive, got {size}")
    original = int(xtr.shape[1])
    return Dataset(name, resize_bilinear(xtr, size), ytr, resize_bilinear(xte, size), yte,
                   size=size, info={"original_size": original, "limit": limit})


def save_npz(dataset: Dataset, path) -> None:
    """Write a prepared dataset for another process (the MXNet trainer)."""
    np.savez(path, name=np.array(dataset.name), size=np.array(dataset.size),
             num_classes=np.array(dataset.num_classes),
             original_size=np.array(dataset.info.get("original_size", dataset.size)),
             limit=np.array(-1 if dataset.info.get("limit") is None else dataset.info["limit"]),
             train_images=dataset.train_images, train_labels=dataset.train_labels,
             test_images=dataset.test_images, test_labels=dataset.test_labels)


def load_npz(path) -> Dataset:
    with np.load(path, allow_pickle=False) as z:
        limit = int(z["limit"])
        return Dataset(str(z["name"]), z["train_images"], z["train_labels"].astype(np.int64),
                       z["test_images"], z["test_labels"].astype(np.int64), size=int(z["size"]),
                       num_classes=int(z["num_classes"]),
                       info={"original_size": int(z["original_size"]),
                             "limit": None if limit < 0 else limit})
