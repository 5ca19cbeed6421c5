"""The check's training-step part: the user's own optimiser (returned by the factory with the
model) against the recipe the user meant (``--recipe``, densenet_spec/optim.py), after the
model part has found the same architecture.

The same canonical weights are in the user's model (loaded by the model part) and in the
reference: the mirror of the same framework (our PyTorch model for Keras), with the recipe
built by that mirror's own ``build_optimizer`` (its adapter's ``recipe_session``). Both take N
steps in float64 on the same batches (the check's random inputs at the train-step size, a new
batch every step, seeds ``seed + 1000 + step``); after every step every parameter and BatchNorm
statistic is compared by canonical name (densenet_parity.side_by_side.distance: relative to the
tensor's largest magnitude; the biases whose exact gradient is zero, and under Adam the running
means they feed, against an absolute floor, side_by_side.absolute_floor).

Where the user's steps differ, the likely cause is *measured*: PyTorch's reference is run again
with each mutation of the recipe that could be the porting mistake (``candidates``: only those
that belong to the recipe — no momentum cause for Adam, no schedule cause for a constant rate,
no weight-decay cause without weight decay) and every mutation whose run the user's matches
within the tolerance is named. If none matches, only the step and the parameter are named.

Counting: the schedule counts optimiser steps (each of the check's steps is one epoch to a
per=epoch recipe, whose scheduler the check steps after every step, as with per=step).
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Dict, List, Optional

import numpy as np

import densenet_spec as spec
from densenet_parity.checking.numbers import STEP_RTOL, _to_canonical
from densenet_parity.side_by_side import (AGREE64, CHAOS_LIMIT, CHAOS_MARGIN, SHAKE,
                                          absolute_floor, distance, moved, shaken,
                                          step_tolerances, zero_gradient_names)

#: float64: the user's parameters and BatchNorm statistics agree with the reference's to this
#: (relative, side_by_side.distance) after every step (PyTorch's, Gluon's and optax's own
#: optimisers agree to 1.2e-10 over 100 steps: docs/conventions.md)
TRAIN_RTOL = AGREE64
#: float64 where the reference is Flax: the model part's own float64 tolerance
#: (numbers.STEP_RTOL). The user's program rounds otherwise than ours (XLA orders its sums by
#: the graph), and Adam carries it: measured after one step, the forum's MLP in NNX 1.4e-9
#: (optax.adamw: Adam divides a near-zero gradient's rounding noise by its own size). Gluon
#: is judged at TRAIN_RTOL: the book's Gluon listing with its own gluon.Trainer is within
#: 4e-15 of ours after two SGD steps (an earlier 5.8e-8 on every tensor was the check reading
#: the user's float64 parameters through model_tensors, which rounds them to float32).
#: Every porting mistake the check names moves the parameters by more than 1e-3 of themselves.
PROGRAM_RTOL = STEP_RTOL
#: the seed offset of the training part's batches (the model part's input is seed + 2)
BATCH_SEED = 1000


#: The MLP family's training batches: 32 rows. Over the model part's 8 rows train-mode
#: BatchNorm1d makes the MLP's steps chaotic: two PyTorch runs whose targets differ by 1e-13
#: (relative) part by 1.7e-8 after 5 SGD steps (lr 1e-3, momentum 0.9) and by 4.6e-3 after 5
#: Adam steps (lr 1e-3), so that two programs' float64 rounding alone (Keras' or Flax's XLA
#: against PyTorch) crossed the 1e-6 tolerance by step 3. Over 32 rows, inputs 1e-13 apart
#: stay 1.2e-9 apart over 5 Adam steps (16 rows: 5e-7; 64: 6e-10), at a quarter of 128 rows'
#: float64 work. The conv family's steps are stable at the check's batch (the book at 96 px,
#: batch 2: 1.7e-13 after 5 SGD steps, 8e-9 after 5 of Adam). What amplification remains (a
#: rate the loss cannot take) is measured by every check (SHAKE).
MLP_TRAIN_BATCH = 32


def batches(make, config, size: int, steps: int, seed: int) -> list:
    """``steps`` batches [(x, labels)] from ``make`` (the engine's _inputs) at ``size``."""
    return [make(config, size, seed + BATCH_SEED + t, mlp_batch=MLP_TRAIN_BATCH)
            for t in range(steps)]


def check_training(config, state, user, mapping, layout, framework: str, recipe: str,
                   steps: int, data: list, judge_stats: str = "all", say=None) -> dict:
    """The training-step part: the user's ``steps`` steps (``user.train_step``) against the
    reference's (our model of the framework and the recipe's optimiser) on ``data``.
    ``judge_stats``: "all", "mean" (a BatchNorm whose running variance is the biased one:
    accepted by the model part, so only running means are judged) or "none" (the model's
    BatchNorm settings differ). Returns the report's ``training`` entry."""
    say = say or (lambda msg: None)
    parsed = spec.parse_recipe(recipe)
    say(f"[{framework}] the training step: {steps} steps of your optimiser, float64 ...")
    got = []
    for x, y in data:
        out = user.train_step(x, y)
        got.append({"loss": float(out["loss"]), "lr": out.get("lr"),
                    "arrays": _to_canonical(out["arrays"], mapping, layout)})
    backend = {"mxnet": "mxnet", "flax": f"flax-{user.variant}"}.get(framework, "torch")
    say(f"[{framework}] the reference's {steps} steps of \"{parsed}\" ({backend}) ...")
    ref = _reference(backend, config, state, recipe, steps, data, getattr(user, "backend", None))
    names = _names(config, parsed, judge_stats)
    tol = PROGRAM_RTOL if backend.startswith("flax") or framework == "keras" else TRAIN_RTOL
    # how much this run amplifies rounding, measured: the reference again on inputs SHAKE apart
    say(f"[{framework}] how far the reference's own run amplifies rounding ...")
    again = _reference(backend, config, state, recipe, steps, shaken(data),
                       getattr(user, "backend", None))
    drift = [distance(a["arrays"], r["arrays"], names["params"])[0]
             for a, r in zip(again, ref)]
    tols = step_tolerances(tol, drift)
    first = _first(names, parsed, got, ref, state, steps, tols)
    out = {"checked": True, "recipe": str(parsed), "recipe_given": recipe, "steps": steps,
           "reference": backend, "optimizer": user.optimizer(), "tolerance": tol,
           "drift": drift, "tolerances": tols,
           "distance": [distance(g["arrays"], r["arrays"], names["params"])[0]
                        for g, r in zip(got, ref)],
           "loss": [g["loss"] for g in got], "reference_loss": [r["loss"] for r in ref],
           "lr": [g["lr"] for g in got], "reference_lr": [r["lr"] for r in ref],
           "stats_judged": judge_stats, "first": first, "causes": [], "candidates": []}
    if first is None:
        return out
    say(f"[{framework}] the training step differs at step {first['step']}: measuring the "
        "likely causes ...")
    apart = out["distance"]
    for key, words, change in candidates(parsed):
        if change[0] == "recipe":  # a recipe: the framework's own optimiser runs it
            run = _reference(backend, config, state, str(change[1]), steps, data,
                             getattr(user, "backend", None))
        else:  # no recipe writes it: PyTorch's optimiser with the change
            run = _torch_run(config, state, parsed, steps, data, change)
        out["candidates"].append(key)
        if _matches(names, parsed, got, run, state, steps, tols, apart):
            out["causes"].append({"key": key, "words": words})
    return out


def not_checked(why: str) -> dict:
    """The report's training entry where the training step was not checked, and ``why``."""
    return {"checked": False, "why": why}


# ------------------------------------------------------------------ comparing trajectories

def _names(config, recipe, judge_stats: str) -> dict:
    zero = zero_gradient_names(config)
    params, stats = [], []
    for n, _, kind in spec.canonical_tensors(config):
        if kind == "param" and n not in zero:
            params.append(n)
        elif kind == "state":
            stats.append(n)
    noisy = set(zero) | ({n for n in stats if n.endswith("running_mean")}
                         if zero and recipe.adaptive else set())
    judged = [n for n in stats if n not in noisy and (
        judge_stats == "all" or judge_stats == "mean" and n.endswith("running_mean"))]
    return {"params": params, "stats": judged,
            "noisy": sorted(n for n in noisy if n in zero or judge_stats != "none")}


def _first(names, recipe, got, ref, init, steps, tols) -> Optional[dict]:
    """The first step and tensor where ``got`` differs from ``ref`` beyond that step's
    tolerance (``tols``: relative; the zero-gradient tensors against their absolute floor), or
    None. Steps past CHAOS_LIMIT (tolerance inf) are not judged."""
    for t, (g, r) in enumerate(zip(got, ref)):
        if math.isinf(tols[t]):
            break
        miss = _step_miss(names, recipe, g, r, init, t, steps, tols[t])
        if miss is not None:
            return miss
    return None


def _step_miss(names, recipe, g, r, init, t, steps, tol) -> Optional[dict]:
    """Where step ``t`` (0-based) of ``g`` differs from ``r``'s, or None."""
    missing = [n for n in names["params"] + names["stats"] + names["noisy"]
               if n not in g["arrays"]]
    if missing:
        return {"step": t + 1, "tensor": missing[0], "distance": math.inf,
                "tolerance": tol, "why": "missing from the model's tensors"}
    checks = [distance(g["arrays"], r["arrays"], names["params"]) + (tol,),
              distance(g["arrays"], r["arrays"], names["stats"]) + (tol,)]
    if names["noisy"]:
        largest = moved(r["arrays"], init, names["params"])
        # at least the tolerance times the largest move: across programs (Keras against
        # PyTorch) a partly zero-gradient bias (the MLP's) carries the gradients' rounding
        floor = max(absolute_floor(recipe, t + 1, 1, steps, "float64", largest), tol * largest)
        worst = max(names["noisy"], key=lambda n: float(np.max(np.abs(
            np.asarray(g["arrays"][n], np.float64) - r["arrays"][n]))))
        checks.append((float(np.max(np.abs(np.asarray(g["arrays"][worst], np.float64)
                                           - r["arrays"][worst]))), worst, floor))
    for d, where, limit in checks:
        if where is not None and not d <= limit:  # nan: differs
            return {"step": t + 1, "tensor": where, "distance": float(d),
                    "tolerance": limit, "absolute": limit != tol}
    return None


def _reference(backend_name, config, state, recipe, steps, data, backend=None) -> List[dict]:
    """The reference's run: the mirror's recipe_session and recipe_step (``backend``: the
    MXNet worker the user's model lives in, reused)."""
    from densenet_parity.backends import make_backend
    own = backend is None
    backend = make_backend(backend_name) if own else backend
    session = None
    try:
        session = backend.call("recipe_session", config=config.to_dict(), state=state,
                               recipe=recipe, steps_per_epoch=1, total_steps=steps,
                               dtype="float64")
        out = []
        for x, y in data:
            fig = backend.call("recipe_step", session=session, x=x, labels=y)
            out.append({"loss": float(fig["loss"]), "lr": float(fig["lr"]),
                        "arrays": {k: np.asarray(v, np.float64) for k, v in fig["arrays"].items()}})
        return out
    finally:
        if session is not None:
            try:
                backend.call("recipe_end", session=session)
            except Exception:  # noqa: BLE001 - closing; the run's own error matters
                pass
        if own and hasattr(backend, "close"):
            backend.close()


#: a mutation's run matches the user's where, at every step, it is within the tolerance or
#: within this share of the reference's own distance from the user's: across frameworks Adam
#: turns the rounding noise of a zero gradient into moves of up to lr (side_by_side.noise_floor)
#: that later steps carry into every parameter (measured: 2.9e-5 after 5 steps of a coupled
#: Adam, the user's NNX model against PyTorch's, where the reference was 3.5e-2 away).
MATCH_SHARE = 1e-3
#: across programs (tolerance PROGRAM_RTOL: Flax, Keras), after the step where the user's run
#: first differs, a mutation that matched there (within the tolerance or MATCH_SHARE) may drift
#: from the user's by up to this share of the reference's distance: Adam turns the zero-gradient
#: biases' rounding noise, which two programs do not share, into moves of lr that later steps
#: carry on. Measured, Keras' Adam against PyTorch's with the epsilon before the bias
#: correction, the forum's MLP: 1.1e-9 at step 1 (the reference 1.2e-2 away), then 6.3e-4,
#: 1.4e-2, 2.3e-2, 4.4e-2 at steps 2-5 (the reference 3.8e-2, 6.4e-2, 8.9e-2, 0.11 away: at most
#: 0.39 of it); the other mutation (epsilon inside the square root) is 1.4e-2 away at step 1.
#: Within one program (PyTorch, Gluon) a mutation matches at MATCH_SHARE at every step.
LATER_SHARE = 0.5


def _matches(names, recipe, got, run, init, steps, tols, apart) -> bool:
    """Whether a mutation's ``run`` matches the user's ``got`` (MATCH_SHARE; across programs
    LATER_SHARE after the step where the user's first differs), at the judged steps."""
    first, base = None, min(tols)
    for t in range(steps):
        tol = tols[t]
        if math.isinf(tol):
            break
        miss = _step_miss({**names, "stats": []}, recipe, got[t], run[t], init, t, steps, tol)
        share = MATCH_SHARE if first is None or base <= TRAIN_RTOL else LATER_SHARE
        if miss is not None and not (miss.get("why") is None and not miss.get("absolute")
                                     and miss["distance"] <= share * apart[t]):
            return False
        if first is None and apart[t] > tol:
            first = t
    return True


# ------------------------------------------------------------------ the likely causes

#: Adam's epsilon as each framework's users get it without writing one (a port that keeps its
#: framework's default where the recipe has another).
ADAM_EPS = ((1e-8, "the default of torch.optim.Adam, optax.adam and Gluon's adam"),
            (1e-7, "the default of keras.optimizers.Adam and TensorFlow's"))
#: keras.optimizers.Adam's default epsilon, which it adds before the bias correction.
KERAS_EPS = 1e-7

def candidates(recipe) -> List[tuple]:
    """The porting mistakes that belong to ``recipe``: (key, words, change), ``change`` being
    what ``_torch_run`` does differently from the recipe (a mutated recipe, or a change to
    PyTorch's optimiser that no recipe writes)."""
    out = []
    r, wd = recipe, recipe.weight_decay
    if wd:
        if r.decay == "decoupled":
            out.append(("decay=coupled", "weight decay added to the gradient (coupled L2, "
                        "torch.optim.Adam's weight_decay or optax.add_decayed_weights before "
                        "optax.adam), where the recipe decouples it (AdamW: w -= lr wd w)",
                        ("recipe", dataclasses.replace(r, optimizer="adam"))))
        elif r.optimizer == "adam":
            out.append(("decay=decoupled", "weight decay decoupled from the gradient (w -= lr "
                        "wd w: torch.optim.AdamW, optax.adamw), where the recipe adds it to the "
                        "gradient (coupled L2, as torch.optim.Adam's weight_decay)",
                        ("recipe", dataclasses.replace(r, optimizer="adamw"))))
        else:
            out.append(("decay=decoupled", "weight decay decoupled from the gradient (w -= lr "
                        "wd w: torch.optim.AdamW, optax.adamw), where the recipe adds it to the "
                        "gradient (coupled L2, as torch.optim.SGD's weight_decay)",
                        ("decay", "decoupled")))
        for what, words in (("bn", "the BatchNorm parameters (weight and bias)"),
                            ("bias", "the biases (every *.bias)")):
            if what in r.exclude:
                out.append((f"decay on {what}", f"weight decay applied to {words}, which the "
                            f"recipe excludes (exclude={','.join(r.exclude)})",
                            ("recipe", dataclasses.replace(
                                r, exclude=tuple(e for e in r.exclude if e != what)))))
            else:
                out.append((f"no decay on {what}", f"no weight decay on {words}, which the "
                            "recipe decays", ("recipe", dataclasses.replace(r, exclude=tuple(
                                e for e in spec.optim.EXCLUDE if e in r.exclude or e == what)))))
        if len(r.exclude) == 2:
            out.append(("decay on bn,bias", "weight decay applied to every parameter, where "
                        "the recipe excludes the BatchNorm parameters and the biases "
                        "(exclude=bn,bias)", ("recipe", dataclasses.replace(r, exclude=()))))
    if r.optimizer == "sgd" and r.momentum:
        if r.nesterov:
            out.append(("nesterov=0", "Nesterov momentum missing (the recipe has nesterov=1)",
                        ("recipe", dataclasses.replace(r, nesterov=False))))
        elif not r.dampening:
            out.append(("nesterov=1", "Nesterov momentum, where the recipe has plain momentum",
                        ("recipe", dataclasses.replace(r, nesterov=True))))
        if r.dampening:
            out.append(("dampening=0", f"no dampening, where the recipe has dampening="
                        f"{r.dampening:g}", ("recipe", dataclasses.replace(r, dampening=0.0))))
            out.append(("buffer=zero", "the momentum buffer starting at zero (its first value "
                        "(1 - dampening) g), where PyTorch starts it at the first gradient",
                        ("buffer", "zero")))
        elif not r.nesterov:
            out.append(("dampening=momentum", f"dampening {r.momentum:g} (buf = m buf + "
                        "(1 - m) g, an exponential average), where the recipe has none",
                        ("recipe", dataclasses.replace(r, dampening=r.momentum))))
        if r.schedule != "constant" and not r.dampening:
            out.append(("momentum lr-scaled", "the learning rate inside the momentum buffer "
                        "(v = m v + lr g, as Gluon, Keras and TensorFlow write it), where "
                        "PyTorch scales the buffer by the current rate (equal for a constant "
                        "rate, not under a schedule)", ("buffer", "lr")))
    if r.adaptive:
        for value, whose in ADAM_EPS:
            if not math.isclose(value, r.eps, rel_tol=1e-9):
                out.append((f"eps={value:g}", f"Adam's epsilon {value:g} ({whose}), where the "
                            f"recipe has eps={r.eps:g}",
                            ("recipe", dataclasses.replace(r, eps=value))))
        out.append(("eps inside sqrt", "Adam's epsilon inside the square root "
                    "(sqrt(v_hat + eps)), where PyTorch adds it outside (sqrt(v_hat) + eps)",
                    ("eps", "inside")))
        out.append(("eps before bias correction", "Adam's epsilon added before the bias "
                    "correction (TensorFlow's and Keras' epsilon-hat: sqrt(v) + eps, the rate "
                    "scaled by sqrt(1 - b2^t) / (1 - b1^t)), where PyTorch adds it to "
                    "sqrt(v_hat)", ("eps", "hat")))
        if not math.isclose(KERAS_EPS, r.eps, rel_tol=1e-9):
            out.append(("keras adam", f"Keras' Adam as it comes: epsilon {KERAS_EPS:g} (its "
                        "default) added before the bias correction (sqrt(v) + eps, the rate "
                        "scaled by sqrt(1 - b2^t) / (1 - b1^t)), where the recipe has "
                        f"eps={r.eps:g} added to sqrt(v_hat) (PyTorch's)",
                        ("eps", ("hat", KERAS_EPS))))
    if r.schedule != "constant":
        out.append(("schedule ahead", "the schedule one step ahead (the scheduler stepped "
                    "before the optimiser's first step: step k used the rate of step k + 1)",
                    ("shift", 1)))
        out.append(("schedule behind", "the schedule one step behind (step k used the rate of "
                    "step k - 1: the scheduler's first step missing, or stepped before "
                    "optimizer.step() reads the rate)", ("shift", -1)))
    return out


def _torch_run(config, state, recipe, steps, data, change) -> List[dict]:
    """PyTorch's reference run of ``recipe`` with one ``change`` (candidates)."""
    import torch
    from densenet_torch import adapter
    kind, arg = change
    if kind == "eps" and isinstance(arg, tuple):  # the placement and another epsilon
        arg, recipe = arg[0], dataclasses.replace(recipe, eps=arg[1])
    text = str(arg) if kind == "recipe" else str(recipe)
    session = adapter.recipe_session(config.to_dict(), state, text, 1, steps, "float64")
    opt, sched = session.optimizer
    if kind == "decay":
        _decay_step(opt, arg)
    elif kind == "buffer" and arg == "zero":
        for g in opt.param_groups:
            for p in g["params"]:
                opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
    elif kind == "buffer":
        _lr_scaled_momentum(opt)
    elif kind == "eps":
        _adam_eps(opt, arg, decoupled=recipe.decay == "decoupled")
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the scheduler's order warning (the point of a shift)
        if kind == "shift" and arg > 0:
            sched.step()
        for t, (x, y) in enumerate(data):
            session.optimizer = (opt, None if kind == "shift" and arg < 0 and t == 0 else sched)
            fig = adapter.recipe_step(session, x, y)
            out.append({"loss": fig["loss"], "lr": fig["lr"], "arrays": fig["arrays"]})
    adapter.recipe_end(session)
    return out


def _decay_step(opt, mode: str) -> None:
    """The optimiser's step with its weight decay done by hand, ``mode`` 'coupled' (wd w added
    to the gradient) or 'decoupled' (w *= 1 - lr wd before the step), the optimiser's own
    weight decay set to 0 meanwhile."""
    import torch
    own = opt.step

    def step(closure=None):
        saved = [g["weight_decay"] for g in opt.param_groups]
        with torch.no_grad():
            for g in opt.param_groups:
                wd, g["weight_decay"] = g["weight_decay"], 0.0
                for p in g["params"]:
                    if wd and p.grad is not None:
                        if mode == "decoupled":
                            p.mul_(1 - g["lr"] * wd)
                        else:
                            p.grad.add_(p, alpha=wd)
        try:
            own()
        finally:
            for g, wd in zip(opt.param_groups, saved):
                g["weight_decay"] = wd
    opt.step = step


def _adam_eps(opt, where: str, decoupled: bool) -> None:
    """Adam (or AdamW) by hand with epsilon ``where``: 'inside' the square root, or 'hat'
    (added to sqrt(v) before the bias correction, the rate scaled instead)."""
    import torch

    def step(closure=None):
        with torch.no_grad():
            for g in opt.param_groups:
                (b1, b2), lr, eps, wd = g["betas"], g["lr"], g["eps"], g["weight_decay"]
                for p in g["params"]:
                    if p.grad is None:
                        continue
                    grad = p.grad
                    if wd and decoupled:
                        p.mul_(1 - lr * wd)
                    elif wd:
                        grad = grad.add(p, alpha=wd)
                    st = opt.state[p]
                    if "m" not in st:
                        st.update(m=torch.zeros_like(p), v=torch.zeros_like(p), t=0)
                    st["t"] += 1
                    t = st["t"]
                    st["m"].mul_(b1).add_(grad, alpha=1 - b1)
                    st["v"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
                    if where == "inside":
                        p.sub_(lr * (st["m"] / (1 - b1 ** t))
                               / torch.sqrt(st["v"] / (1 - b2 ** t) + eps))
                    else:
                        p.sub_(lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) * st["m"]
                               / (st["v"].sqrt() + eps))
    opt.step = step


def _lr_scaled_momentum(opt) -> None:
    """SGD with the learning rate inside the momentum buffer: v = m v + lr g (the first v =
    lr g), w -= v (Nesterov: w -= m v + lr g)."""
    import torch

    def step(closure=None):
        with torch.no_grad():
            for g in opt.param_groups:
                lr, m, wd = g["lr"], g["momentum"], g["weight_decay"]
                for p in g["params"]:
                    if p.grad is None:
                        continue
                    grad = p.grad.add(p, alpha=wd) if wd else p.grad
                    st = opt.state[p]
                    if "v" not in st:
                        st["v"] = grad.mul(lr)
                    else:
                        st["v"].mul_(m).add_(grad, alpha=lr)
                    p.sub_(st["v"].mul(m).add(grad, alpha=lr) if g["nesterov"] else st["v"])
    opt.step = step


# ------------------------------------------------------------------ the report's words

def verdict(training: Optional[dict]) -> str:
    """'same training step', 'different training step: first differs at step K in PARAM (rel.
    distance D)', or where it was not checked, why ('' without a training part)."""
    if not training:
        return ""
    if not training["checked"]:
        return "training step not checked"
    f = training["first"]
    if f is None:
        return "same training step"
    return (f"different training step: first differs at step {f['step']} in {f['tensor']} "
            f"({'abs.' if f.get('absolute') else 'rel.'} distance {_figure(f['distance'])})")


def _figure(v: float) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "not a number (the model's values are not finite)"
    if isinstance(v, float) and math.isinf(v):
        return "not comparable"
    return f"{v:.2e}"


def lines(training: Optional[dict]) -> List[str]:
    """The report's lines for the training part."""
    if not training:
        return []
    if not training["checked"]:
        return ["", f"TRAINING STEP not checked: {training['why']}"]
    opt = training["optimizer"] or {}
    what = opt.get("optimizer", "?") + (f" with {opt['schedule']}" if opt.get("schedule") else "")
    out = ["", f"Training step ({training['steps']} steps, float64, same weights and batches): "
               f"your {what} against \"{training['recipe']}\" "
               f"({training['reference']}'s own optimiser)"]
    u, r = training["loss"], training["reference_loss"]
    out.append("  loss per step, yours:     " + " ".join(_loss(v) for v in u))
    out.append("  loss per step, reference: " + " ".join(_loss(v) for v in r))
    if training["stats_judged"] == "mean":
        out.append("  BatchNorm running variances not judged (this framework's BatchNorm "
                   "updates them with the biased batch variance: accepted by the model part)")
    elif training["stats_judged"] == "none":
        out.append("  BatchNorm statistics not judged (the model's BatchNorm settings differ: "
                   "above)")
    out += _chaos_lines(training)
    f = training["first"]
    if f is None:
        judged = sum(1 for t in training.get("tolerances", ()) if math.isfinite(t))
        loose = any(d > training["tolerance"] for d in training.get("distance", ()))
        out.append(f"  every parameter and BatchNorm statistic within {training['tolerance']:g} "
                   "(relative)" + (" or the run's own amplification (above)" if loose else "")
                   + (" after every step" if judged == training["steps"] else
                      f" after each of the first {judged} steps"))
        return out
    out.append(f"  FIRST DIFFERENCE: step {f['step']}, {f['tensor']}: "
               + (f"{f['why']}" if f.get("why") else
                  f"{'absolute' if f.get('absolute') else 'relative'} distance "
                  f"{_figure(f['distance'])} (tolerance {f['tolerance']:.2g})"))
    if training["causes"]:
        for c in training["causes"]:
            out.append(f"  likely cause (measured: the reference run with this change "
                       f"matches your steps): {c['words']}")
    else:
        out.append("  likely cause: none of the mutations measured matches your steps ("
                   + (", ".join(training["candidates"]) or "none belong to this recipe")
                   + "); the step and parameter above are where to look")
    return out


def _chaos_lines(training: dict) -> List[str]:
    """What the reference's own amplification did to the judging, if anything."""
    tol, tols, drift = training["tolerance"], training.get("tolerances"), training.get("drift")
    if not tols or all(t == tol for t in tols):
        return []
    # said where it mattered: a step not judged, a step judged beyond the tolerance, or the
    # first difference reported against a tolerance it widened
    first, apart = training.get("first"), training.get("distance") or []
    widened = (first.get("tolerance") not in (None, tol) and not first.get("absolute")
               if first else any(d > tol for d in apart))
    if not (widened or any(math.isinf(t) for t in tols)):
        return []
    loose = next(t for t, v in enumerate(tols) if v != tol)
    out = [f"  this run amplifies rounding: two reference runs {SHAKE:g} apart (relative) at "
           f"the start are {_figure(drift[loose])} apart at step {loose + 1}; from there each "
           f"step is judged within {CHAOS_MARGIN:g}x their distance (at least {tol:g})"]
    lost = next((t for t, v in enumerate(tols) if math.isinf(v)), None)
    if lost is not None:
        out.append(f"  steps {lost + 1}-{training['steps']} not judged: there the reference's "
                   f"own two runs are more than {CHAOS_LIMIT:g} apart (a rate the loss cannot "
                   "take, or BatchNorm over few examples: try a smaller lr or fewer --steps)"
                   if lost + 1 < training["steps"] else
                   f"  step {lost + 1} not judged: there the reference's own two runs are more "
                   f"than {CHAOS_LIMIT:g} apart (a rate the loss cannot take, or BatchNorm over "
                   "few examples: try a smaller lr or fewer --steps)")
    return out


def _loss(v: float) -> str:
    return f"{v:.6g}" if math.isfinite(v) else "not-a-number"
