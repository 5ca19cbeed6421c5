"""Gluon's concatenation fast path (densenet_mxnet/model.py, _concat): oneDNN's Concat where a
dense block's channel counts are all multiples of 16, a 5-D view elsewhere (oneDNN's backward
Concat fails on other offsets). Both paths must compute the same function, the fast one must be
taken where it is safe (DenseNet-121: ~15% of a train step, docs/performance/) and not where it
is not (growth rate 12)."""
import json
import subprocess

import numpy as np

from densenet_parity import compare
from densenet_parity.backends import ROOT
from parity_tests.conftest import cli_env, need_mxnet

_result = {}


def result():
    if not _result:
        proc = subprocess.run([need_mxnet(), "-m", "parity_tests.mxnet_concat_check"], cwd=ROOT,
                              env=cli_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        _result.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    return _result


def test_the_onednn_concat_is_taken_exactly_where_channels_are_multiples_of_16():
    paths = result()["paths"]
    assert paths["densenet121"] == [True] * 4  # 64 + k*32 channels throughout
    # The book's model: 64, 96, 112 input channels (growth 32), then 120 = 240 // 2.
    assert paths["book"] == [True, True, True, False]
    assert paths["densenet40"] == [False] * 3 and paths["densenet_bc100"] == [False] * 3
    assert result()["small_paths"] == [True, True]
    assert result()["growth12_paths"] == [False, False]


def test_both_concat_paths_compute_the_same_function():
    a, b = result()["onednn"], result()["view5d"]
    assert compare.rel_diff(np.array(a["logits"]), np.array(b["logits"])) <= compare.EVAL_RTOL
    assert abs(a["loss"] - b["loss"]) <= compare.TRAIN_RTOL * abs(b["loss"])
    assert set(a["grads"]) == set(b["grads"])
    scale = max(float(np.max(np.abs(g))) for g in b["grads"].values())
    for k in b["grads"]:
        ga, gb = np.array(a["grads"][k]), np.array(b["grads"][k])
        assert float(np.max(np.abs(ga - gb))) <= compare.TRAIN_RTOL * max(
            float(np.max(np.abs(gb))), 1e-2 * scale), k


def test_growth_rate_12_trains_in_float32_on_the_safe_path():
    g = result()["growth12"]
    assert np.isfinite(g["loss"])
    assert all(np.all(np.isfinite(v)) for v in g["grads"].values())
    assert any(np.any(np.array(v) != 0) for v in g["grads"].values())
