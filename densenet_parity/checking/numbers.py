"""The numbers: how outputs, gradients and BatchNorm statistics are compared (relative to the
reference's largest value), with the first layer whose output differs. (The canonical weights
compared, random_state, are densenet_parity.states': export draws them too.)"""
from __future__ import annotations

from typing import Dict

import numpy as np

import densenet_spec as spec
from densenet_parity.checking.causes import convention

EVAL_RTOL = 1e-5     # float32 eval-mode outputs (same weights)
STEP_RTOL = 1e-6     # float64 loss, gradients, BatchNorm statistics after one step
GRAD_FLOOR = 1e-8    # a gradient is compared relative to at least this share of the largest
BATCH = 2
MLP_BATCH = 8  # the MLP family: train-mode BatchNorm1d needs more than 2 examples (engine._inputs)


def _to_model(state: Dict[str, np.ndarray], mapping: Dict[str, str], layout: str):
    """Canonical arrays -> the model's names and layout."""
    out = {}
    for cname, fname in mapping.items():
        a = np.asarray(state[cname], np.float32)
        if layout == "flax" and a.ndim == 4:
            a = a.transpose(2, 3, 1, 0)
        elif layout == "flax" and a.ndim == 2:
            a = a.T
        out[fname] = np.ascontiguousarray(a)
    return out


def _to_canonical(arrays: Dict[str, np.ndarray], mapping: Dict[str, str], layout: str):
    inverse = {f: c for c, f in mapping.items()}
    out = {}
    for fname, a in arrays.items():
        if fname not in inverse:
            continue
        a = np.asarray(a)
        if layout == "flax" and a.ndim == 4:
            a = a.transpose(3, 2, 0, 1)
        elif layout == "flax" and a.ndim == 2:
            a = a.T
        out[inverse[fname]] = a
    return out


def _rel(a, b, floor: float = 0.0) -> float:
    """The largest difference relative to the reference's largest value; inf (said in words by
    the report, never printed) where there is no such number: the shapes differ, a value is
    not finite, or the reference is all 0 where the model is not."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    if not b.size:
        return 0.0
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return float("inf")
    diff = float(np.max(np.abs(a - b)))
    scale = max(float(np.max(np.abs(b))), floor)
    if scale == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / scale


def _median_ratio(num, den, *magnitudes):
    """The median of num / den over the entries where den is not (nearly) 0, next to the
    statistics' own ``magnitudes``, and both are finite; None where there is none (a feature
    with a batch variance of 0, a dead ReLU's, updates nothing: 0 / 0 says nothing about the
    convention)."""
    num, den = np.asarray(num, np.float64).ravel(), np.asarray(den, np.float64).ravel()
    ok = np.isfinite(num) & np.isfinite(den)
    if not ok.any():
        return None
    scale = max([float(np.max(np.abs(den[ok])))] + [
        float(np.max(np.abs(a[np.isfinite(a)]), initial=0.0))
        for a in map(np.asarray, magnitudes)])
    ok &= np.abs(den) > max(scale * 1e-9, 1e-300)
    if not ok.any():
        return None
    return float(np.median(num[ok] / den[ok]))


def _amount(a) -> str:
    """The largest magnitude of ``a``, in words where it is not a finite number."""
    a = np.asarray(a, np.float64)
    finite = a[np.isfinite(a)]
    if a.size == 0:
        return "nothing (no values)"
    if finite.size < a.size:
        return "not a finite number"
    return f"{float(np.max(np.abs(finite))):.3g}"


def _worst(got: Dict[str, np.ndarray], ref: Dict[str, np.ndarray], floor_share: float = 0.0):
    if not ref:
        return 0.0, None
    top = max(float(np.max(np.abs(v))) for v in ref.values()) * floor_share
    diffs = {k: _rel(got.get(k, np.zeros(0)), v, top) for k, v in ref.items()}
    k = max(diffs, key=diffs.get)
    return diffs[k], k


def _first_difference(config, order, mapping_u, mapping_r, out_u, out_r, tol, mode):
    """The first module, in the preset's order, whose output differs."""
    kinds = {m: k for m, k, _ in spec.canonical_modules(config)}
    for cmod in order:
        fu, fr = mapping_u.get(cmod), mapping_r.get(cmod)
        if fu not in out_u or fr not in out_r:
            continue
        d = _rel(out_u[fu], out_r[fr])
        if d > tol:
            a, b = np.asarray(out_u[fu], np.float64), np.asarray(out_r[fr], np.float64)
            max_abs = float(np.max(np.abs(a - b))) if a.shape == b.shape else float("inf")
            return {"mode": mode, "module": cmod, "stage": spec.stage_of(cmod + ".weight"),
                    "foreign": fu, "max_abs": max_abs, "rel": d,
                    "convention": convention(config, cmod, kinds[cmod], a, b, mode)}
    return None


def _bn_statistics(config, state, new_u, new_r, framework, momenta=None, biased=False):
    """Compare the BatchNorm statistics after one step; name momentum or variance if they
    differ. ``momenta``: the reference's momentum per canonical module, PyTorch's words (None:
    a cumulative average, all of the first batch; default 0.1). ``biased``: the framework's
    BatchNorm updates its running variance with the biased batch variance (its subject module's
    BIASED_VARIANCE), accepted and noted. Returns (relative difference, first difference or
    None, notes)."""
    notes = []
    momenta = momenta or {}

    def taken(key):
        m = momenta.get(key.rsplit(".", 1)[0], 0.1)
        return 1.0 if m is None else m

    order = [n for n, _, _ in spec.canonical_tensors(config)]
    means = {k: new_r[k] for k in order if k.endswith("running_mean") and k in new_r}
    d_mean, _ = _worst({k: new_u.get(k, np.zeros(0)) for k in means}, means)
    if d_mean > STEP_RTOL:  # name the first BatchNorm (in the network's order) that differs
        k_mean = next(k for k in means if _rel(new_u.get(k, np.zeros(0)), means[k]) > STEP_RTOL)
        old = np.asarray(state[k_mean], np.float64)
        t = taken(k_mean)
        batch = (np.asarray(new_r[k_mean]) - (1 - t) * old) / t
        moved = np.asarray(new_u[k_mean]) - old
        m = _median_ratio(moved, batch - old, old, batch)
        module = k_mean.rsplit(".", 1)[0]
        if not np.all(np.isfinite(moved)):
            moves = "the model's running mean is not a finite number after the step"
        elif m is None:
            moves = (f"the batch mean is the running mean here, so the reference's does not "
                     f"move; the model's moves by up to {_amount(moved)}")
        else:
            moves = f"the model's running mean moves {m:.3g} of the way to the batch mean per step"
        return d_mean, {
            "mode": "train step", "module": module, "stage": spec.stage_of(k_mean),
            "foreign": "", "max_abs": float(np.max(np.abs(moved - (np.asarray(new_r[k_mean]) - old)))),
            "rel": d_mean, "convention": (
                f"BatchNorm momentum: {moves}; the reference {t:.3g} (PyTorch momentum=0.1 is "
                f"Gluon's and Flax's momentum=0.9: 'keep 0.9')")}, notes
    vars_ = {k: new_r[k] for k in order if k.endswith("running_var") and k in new_r}
    d_var, _ = _worst({k: new_u.get(k, np.zeros(0)) for k in vars_}, vars_)
    if d_var > STEP_RTOL:
        def judged(k):
            """(ratio of the model's update to the reference's or None, words, biased?)"""
            old = np.asarray(state[k], np.float64)
            keep = 1 - taken(k)
            upd_u = np.asarray(new_u[k], np.float64) - keep * old
            upd_r = np.asarray(new_r[k], np.float64) - keep * old
            ratio = _median_ratio(upd_u, upd_r, old, np.asarray(new_r[k], np.float64))
            if not np.all(np.isfinite(upd_u)):
                update = "the model's running variance is not a finite number after the step"
            elif ratio is None:  # the reference's update is 0 everywhere: no ratio to speak of
                update = (f"the reference's running-variance update is 0 here (a batch variance "
                          f"of 0); the model's is up to {_amount(upd_u)}")
            else:
                update = f"the model's running-variance update is {ratio:.4f} of the reference's"
            # the biased over the unbiased batch variance: (n - 1) / n, n >= 2 values per channel
            return ratio, update, ratio is not None and 0.5 - 1e-9 <= ratio < 1.0 - 1e-9
        differing = [k for k in vars_ if _rel(new_u.get(k, np.zeros(0)), vars_[k]) > STEP_RTOL]
        seen = {k: judged(k) if k in new_u else (None, "the model has no running variance "
                                                 "here", False) for k in differing}
        # the biased batch variance is accepted only where it explains every BatchNorm that differs
        if biased and all(b for _, _, b in seen.values()):
            ratio = seen[differing[0]][0]
            notes.append(f"BatchNorm updates its running variance with the biased batch variance "
                         f"({ratio:.4f} of PyTorch's unbiased one), as {framework}'s BatchNorm "
                         "does: accepted as this framework's convention")
            return 0.0, None, notes
        k_var = next((k for k in differing if not seen[k][2]), differing[0]) if biased else \
            differing[0]
        update = seen[k_var][1]
        return d_var, {
            "mode": "train step", "module": k_var.rsplit(".", 1)[0], "stage": spec.stage_of(k_var),
            "foreign": "", "max_abs": float(np.max(np.abs(np.asarray(new_u[k_var]) - new_r[k_var])))
            if k_var in new_u else float("inf"),
            "rel": d_var, "convention": (
                f"BatchNorm variance: {update} (PyTorch averages the unbiased batch variance, "
                "n/(n-1) times the biased one)")}, notes
    return max(d_mean, d_var), None, notes
