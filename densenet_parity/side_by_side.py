"""Whole training runs side by side (``densenet compare-training``): the same canonical initial
weights and the same batches (densenet_training.side_by_side) through N steps of a training
recipe (densenet_spec/optim.py) in every backend, each with its framework's own optimiser
(``recipe_session`` / ``recipe_step`` of each adapter); per step the loss, the gradient norm,
and each backend's largest relative distance from PyTorch in the parameters and the BatchNorm
statistics, per stage.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np

import densenet_spec as spec

#: Below this share of the largest parameter a tensor is zero in exact arithmetic (every conv
#: bias before a BatchNorm: its gradient is rounding noise): judged by its absolute size.
ZERO_SHARE = 1e-10
#: The relative floor: a tensor is compared relative to at least this share of the largest.
FLOOR_SHARE = 1e-8


def zero_gradient_names(config) -> set:
    """The biases whose exact gradient is 0 in some or all of their elements, so that what an
    adaptive optimiser does with those elements is rounding noise (Adam divides a gradient by
    its own size: a noise of 1e-17 moves the element by up to lr a step, in a direction no two
    frameworks agree on). A train-mode BatchNorm subtracts its batch mean, so a per-feature
    shift of its input changes nothing: every bias of a layer whose output goes only into
    BatchNorms, directly or through concatenation and pooling (the conv family's convolutions;
    the MLP's dense layers' linear1), or through a ReLU that is active on every row of the
    batch (the MLP's last stem layer and its transitions' linear: those elements whose unit is
    active on the whole batch)."""
    if isinstance(config, spec.MLPPreset):
        stem = f"features.linear{len(config.stem_widths) - 1}.bias"
        return {n for n, _, kind in spec.canonical_tensors(config)
                if kind == "param" and n.endswith(".bias")
                and (n == stem or ".transition" in n and n.endswith(".linear.bias")
                     or (".linear1." in n and ".denselayer" in n))}
    return {n for n, _, kind in spec.canonical_tensors(config)
            if kind == "param" and n.endswith(".bias") and ".conv" in n}


def noise_floor(recipe, steps: int, steps_per_epoch: int = 1,
                total_steps: Optional[int] = None) -> float:
    """The absolute floor for a zero_gradient_names element after ``steps`` steps of an
    adaptive ``recipe`` (densenet_spec.Recipe): each of two frameworks moves it by at most
    Adam's largest step, lr_t max(1, (1 - b1) / sqrt(1 - b2)) (its normalised update: the
    sign of the noise, or a bias-corrected average of signs), in either direction, plus its
    weight decay's lr_t wd |w| (|w| <= 1 here: a bias starts at 0). ``total_steps``: the
    run's length (a cosine's period), ``steps`` by default."""
    b1, b2 = recipe.betas
    step = max(1.0, (1 - b1) / (1 - b2) ** 0.5) + recipe.weight_decay
    total = total_steps or steps
    return 2 * step * sum(spec.lr_at(recipe, t, steps_per_epoch, total) for t in range(steps))


#: The floor for a zero_gradient_names tensor (its exact movement is 0) in any recipe: this
#: many units of the dtype's rounding (numpy's eps) times the largest movement of any parameter
#: in PyTorch's run so far (its rounding noise is eps times the sums it cancels, which are at
#: most the size of the steps; measured: 2.5e-14 of it in float64, 4.5e-6 in float32).
ROUNDING_UNITS = 1e4


def absolute_floor(recipe, steps: int, steps_per_epoch: int, total_steps: int, dtype: str,
                   moved: float) -> float:
    """The absolute floor after ``steps`` steps for a tensor that is zero in exact arithmetic
    (the movement of a zero-gradient bias; under Adam also the running means they feed):
    ROUNDING_UNITS eps(dtype) ``moved`` (the largest movement of any parameter in torch's run),
    and under Adam at least noise_floor (normalised noise moves such a bias by up to lr)."""
    floor = ROUNDING_UNITS * float(np.finfo(dtype).eps) * moved
    if recipe.adaptive:
        floor = max(floor, noise_floor(recipe, steps, steps_per_epoch, total_steps))
    return floor


def moved(state: Dict[str, np.ndarray], init: Dict[str, np.ndarray], names) -> float:
    """The largest movement of any of ``names`` from ``init``."""
    return max((float(np.max(np.abs(np.asarray(state[k], np.float64) - init[k])))
                for k in names), default=0.0)


def distance(got: Dict[str, np.ndarray], ref: Dict[str, np.ndarray], names: Iterable[str]
             ) -> Tuple[float, Optional[str]]:
    """The largest relative distance over ``names`` and the name where it is: each tensor
    against its own largest magnitude (at least FLOOR_SHARE of the largest of all); a tensor
    that is zero in the reference (below ZERO_SHARE of the largest) by its absolute size in
    ``got`` over the largest of all. (0.0, None) for no names."""
    names = list(names)
    if not names:
        return 0.0, None
    big = max(float(np.max(np.abs(ref[k]))) for k in names) or 1.0
    d = {}
    for k in names:
        scale = float(np.max(np.abs(ref[k])))
        if scale <= ZERO_SHARE * big:
            d[k] = max(float(np.max(np.abs(got[k]))) - ZERO_SHARE * big, 0.0) / big
        else:
            d[k] = float(np.max(np.abs(got[k] - ref[k]))) / max(scale, FLOOR_SHARE * big)
    worst = max(d, key=d.get)
    return d[worst], worst


# ------------------------------------------------------------------ densenet compare-training

#: The measured amplification (compare-training, and check --recipe): the reference runs again
#: on inputs this far apart (relative, float64: ~450 units of rounding, above any two
#: programs' difference in one step: Keras' against PyTorch's, the forum's MLP, 1e-15 after a
#: step), and each step is judged within
#: CHAOS_MARGIN times the distance the two reference runs reach there, where that is more than
#: the tolerance: a run that amplifies rounding (a rate that makes the loss grow a
#: thousandfold in two steps, train-mode BatchNorm over few examples) parts two correct
#: programs by that much, and no porting mistake moves the parameters by less than 1e-3.
SHAKE = 1e-13
CHAOS_MARGIN = 100.0
#: Where the two reference runs are this far apart, the run is chaos from there on: those
#: steps are not judged (the report says from which step).
CHAOS_LIMIT = 1e-4


def shaken(data) -> list:
    """``data``'s batches with their inputs SHAKE apart (float64)."""
    return [(np.asarray(x, np.float64) * (1 + SHAKE), y) for x, y in data]


def step_tolerances(tol: float, drift: List[float]) -> List[float]:
    """Each step's tolerance: ``tol``, or CHAOS_MARGIN times the reference's own drift where
    that is larger; inf from the first step where the drift passes CHAOS_LIMIT (or is not a
    number)."""
    out, lost = [], False
    for d in drift:
        lost = lost or not d <= CHAOS_LIMIT
        out.append(math.inf if lost else max(tol, CHAOS_MARGIN * d))
    return out


#: float64: every backend that expresses the recipe exactly agrees with PyTorch to this, at
#: every step, in every parameter and BatchNorm statistic (relative distance: ``distance``).
AGREE64 = 1e-9
#: float32: the distances whose first crossing is reported (steps until the runs drift apart).
THRESHOLDS32 = (1e-6, 1e-4, 1e-2)
#: float32's verdict: the first step's loss and gradient norm (computed from the same weights)
#: agree to this, relatively (the book at 64 px, batch 16: loss 9e-8, gradient norm 1e-4).
#: The parameters are measured, not judged: a float32 gradient that is a sum with cancellation
#: (a BatchNorm bias's, over batch x height x width) carries ~1e-3 of itself in rounding, and
#: training amplifies it.
AGREE32_FIRST = 1e-3
#: Below every plotted distance (log scale has no 0): an exact agreement is drawn here.
PLOT_FLOOR = 1e-18
#: What is not judged, and why: the backend's BatchNorm statistics.
UNJUDGED_STATS = {
    "mxnet": "Gluon's BatchNorm updates the running variance with the biased batch variance "
             "(PyTorch: unbiased) and keeps its momentum as float32: its statistics are shown, "
             "not judged"}


def _stage_names(config):
    out = {}
    for n, _, kind in spec.canonical_tensors(config):
        out.setdefault((spec.stage_of(n), kind), []).append(n)
    return out


def compare_training(preset: str, recipe: str, steps: int, dtype: str = "float64",
                     batch_size: Optional[int] = None, size: Optional[int] = None,
                     backends: Iterable[str] = ("torch", "mxnet", "flax-nnx", "flax-linen"),
                     seed: int = 0, limit: Optional[int] = None, progress=None,
                     every: Optional[int] = None) -> dict:
    """``steps`` steps of ``recipe`` (a recipe string) on ``preset`` in every backend from the
    same canonical initial weights on the same batches (densenet_training.side_by_side); per
    step each backend's loss, gradient norm, learning rate and largest relative distance from
    PyTorch in the parameters and the BatchNorm statistics, overall and per stage. Raises
    RecipeError for a recipe that does not parse, ValueError for bad options. ``progress``: a
    function given a line every ``every`` steps (default: a tenth of the run)."""
    from densenet_parity.backends import make_backend
    from densenet_training.side_by_side import side_by_side
    parsed = spec.parse_recipe(recipe)
    if dtype not in ("float32", "float64"):
        raise ValueError(f"--dtype: expected float32 or float64, found {dtype!r}")
    if steps <= 0:
        raise ValueError(f"--steps: expected a positive number of steps, found {steps}")
    names = list(backends)
    if not names or names[0] != "torch":
        raise ValueError(f"--backends: expected torch first (the reference), found {names}")
    mlp = isinstance(spec.get_preset(preset), spec.MLPPreset)
    batch_size = batch_size or (128 if mlp else 16)
    data = side_by_side(preset, steps, batch_size, size=None if mlp else (size or 64),
                        seed=seed, limit=limit)
    config = data.config
    every = every or max(1, steps // 10)
    say = progress or (lambda line: None)
    zero = zero_gradient_names(config)
    groups = _stage_names(config)
    params = [n for (_, k), ns in groups.items() if k == "param" for n in ns if n not in zero]
    stats = [n for (_, k), ns in groups.items() if k == "state" for n in ns]
    noisy = sorted(zero | ({n for n in stats if n.endswith("running_mean")}
                           if zero and parsed.adaptive else set()))
    movable = [n for n in params]
    stats = [n for n in stats if n not in noisy]
    stages = sorted({s for s, _ in groups})
    made = {n: make_backend(n) for n in names}
    result = {"preset": preset, "recipe": str(parsed), "recipe_given": recipe, "steps": steps,
              "dtype": dtype, "batch_size": batch_size, "source": data.source,
              "steps_per_epoch": data.steps_per_epoch, "backends": {},
              "absolute_names": noisy,
              "absolute_why": ("are zero in exact arithmetic: the movement of the biases "
                               "whose exact gradient is 0 (before a BatchNorm) is rounding "
                               "noise" + (", which Adam normalises to up to lr a step, and the "
                                          "running means of the BatchNorms they feed take it "
                                          "in" if parsed.adaptive else "")
                               + ": judged by an absolute floor (absolute_floor), not "
                               "relatively") if noisy else None}
    sessions = {}
    try:
        for n, b in made.items():
            entry = {"limits": [] if n == "torch" else b.call("recipe_limits", recipe=recipe,
                                                                dtype=dtype),
                     "stats_not_judged": UNJUDGED_STATS.get(n),
                     "loss": [], "grad_norm": [], "lr": []}
            if n != "torch":
                entry.update({"params": [], "params_where": [], "stats": [], "stats_where": [],
                              "absolute": [], "absolute_floor": [],
                              "stages": {s: {"params": [], "stats": []} for s in stages}})
            result["backends"][n] = entry
            sessions[n] = b.call("recipe_session", config=config.to_dict(), state=data.state,
                                 recipe=recipe, steps_per_epoch=data.steps_per_epoch,
                                 total_steps=steps, dtype=dtype)
        # float64: how far the run itself amplifies rounding, measured by PyTorch again on
        # inputs SHAKE apart; each step judged within CHAOS_MARGIN times that where it is more
        # than AGREE64 (step_tolerances)
        shake = made["torch"] if dtype == "float64" else None
        if shake is not None:
            result["drift"] = []
            sessions["shaken"] = shake.call(
                "recipe_session", config=config.to_dict(), state=data.state, recipe=recipe,
                steps_per_epoch=data.steps_per_epoch, total_steps=steps, dtype=dtype)
        for t, (x, y) in enumerate(data.batches):
            ref = None
            for n, b in made.items():
                fig = b.call("recipe_step", session=sessions[n], x=x, labels=y)
                entry = result["backends"][n]
                for k in ("loss", "grad_norm", "lr"):
                    entry[k].append(float(fig[k]))
                if ref is None:
                    ref = fig["arrays"]
                    largest = moved(ref, data.state, movable)
                    continue
                got = fig["arrays"]
                d, where = distance(got, ref, params)
                entry["params"].append(d)
                entry["params_where"].append(where)
                d, where = distance(got, ref, stats)
                entry["stats"].append(d)
                entry["stats_where"].append(where)
                entry["absolute"].append(max((float(np.max(np.abs(got[k] - ref[k])))
                                              for k in noisy), default=0.0))
                # the floor, plus AGREE64 of how far PyTorch moved them: an element of the
                # MLP's stem or transition bias is zero-gradient only while its unit is active
                # on every row of the batch, and then moves for real
                entry["absolute_floor"].append(absolute_floor(
                    parsed, t + 1, data.steps_per_epoch, steps, dtype, largest)
                    + AGREE64 * moved(ref, data.state, noisy) if noisy else 0.0)
                for s in stages:
                    entry["stages"][s]["params"].append(distance(
                        got, ref, [k for k in groups.get((s, "param"), ()) if k in params])[0])
                    entry["stages"][s]["stats"].append(distance(
                        got, ref, [k for k in groups.get((s, "state"), ()) if k in stats])[0])
            if shake is not None:
                (xs, _), = shaken([(x, y)])
                fig = shake.call("recipe_step", session=sessions["shaken"], x=xs, labels=y)
                result["drift"].append(distance(fig["arrays"], ref, params)[0])
            loss = result["backends"]["torch"]["loss"][-1]
            if not np.isfinite(loss):
                # PyTorch's own run has diverged: nothing after this step can be compared
                result["diverged"] = t + 1
                say(f"step {t + 1}/{steps}: torch's loss is {_num(loss)}: the recipe diverges "
                    "on this data; stopping")
                break
            if (t + 1) % every == 0 or t + 1 == steps:
                parts = [f"{n} {_e(result['backends'][n]['params'][-1], '.1e')}"
                         for n in names[1:]]
                say(f"step {t + 1}/{steps}: torch loss {_num(loss)}; largest parameter distance "
                    f"from torch: {', '.join(parts) or '(no other backend)'}")
    finally:
        for n, b in [*made.items(), ("shaken", made.get("torch"))]:
            if n in sessions:
                try:
                    b.call("recipe_end", session=sessions[n])
                except Exception:  # noqa: BLE001 - closing; the run's own error matters
                    pass
            if n != "shaken" and hasattr(b, "close"):
                b.close()
    _verdict(result)
    return result


def _num(v: float, fmt: str = ".6g") -> str:
    """A figure in words where it is not a finite number (never nan/inf on the console)."""
    if np.isnan(v):
        return "not a number"
    if np.isinf(v):
        return "infinite"
    return format(v, fmt)


def _e(v: float, fmt: str = ".2e") -> str:
    """A distance, in words where it is not a finite number."""
    return _num(v, fmt)


def _verdict(result: dict) -> None:
    """result["agree"], result["first_difference"] (the first step and tensor where a backend
    that names no limit differs: float64 beyond AGREE64 at any step; float32 the first step's
    loss or gradient norm beyond AGREE32_FIRST), and the steps until each of THRESHOLDS32."""
    float64 = result["dtype"] == "float64"
    tol = AGREE64 if float64 else AGREE32_FIRST
    ref = result["backends"].get("torch", {})
    first = None
    # the steps compared: up to the one before PyTorch's loss stopped being a number
    run = result.get("steps") or max((len(e.get("params", ())) for e in
                                      result["backends"].values()), default=0)
    shown = result["diverged"] - 1 if result.get("diverged") else run
    tols = step_tolerances(tol, result["drift"][:shown]) if float64 and result.get("drift") \
        else [tol] * shown
    # from the first step where PyTorch's own two runs part by CHAOS_LIMIT: not judged
    judged = tols.index(math.inf) if math.inf in tols else shown
    result["steps_judged"], result["steps_shown"] = judged, shown
    result["tolerances"] = tols[:judged]
    for n, e in result["backends"].items():
        if n == "torch":
            continue
        e["steps_until"] = {f"{th:g}": next((t + 1 for t, d in enumerate(e["params"][:shown])
                                             if not d <= th), None) for th in THRESHOLDS32}
        last = shown - 1
        e["final"] = ({"params": e["params"][last], "stats": e["stats"][last]} if shown else
                      {"params": None, "stats": None})
        if e["limits"]:
            e["verdict"] = "limits named: measured, not judged"
            continue
        bad = None
        if not float64 and shown:
            for what in ("loss", "grad_norm"):
                got, want = e[what][0], ref[what][0]
                d = abs(got - want) / max(abs(want), 1e-30)
                if not d <= tol:
                    bad = {"backend": n, "step": 1, "tensor": f"the {what.replace('_', ' ')}",
                           "distance": d, "tolerance": tol}
                    break
        for t in range(judged if float64 else 0):
            checks = [("params", e["params"][t], e["params_where"][t], tols[t])]
            if not e["stats_not_judged"]:
                checks.append(("stats", e["stats"][t], e["stats_where"][t], tols[t]))
            if e["absolute_floor"][t]:
                checks.append(("absolute", e["absolute"][t], "a zero-gradient bias or running "
                               "mean", e["absolute_floor"][t]))
            for what, d, where, limit in checks:
                if not d <= limit:
                    bad = {"backend": n, "step": t + 1, "tensor": where, "distance": d,
                           "tolerance": limit}
                    break
            if bad:
                break
        e["verdict"] = "agrees" if bad is None else "differs"
        if bad and (first is None or bad["step"] < first["step"]):
            first = bad
    result["tolerance"] = tol
    result["agree"] = first is None and not result.get("diverged")
    result["first_difference"] = first


def render(result: dict) -> str:
    """The command's summary: the run, each backend's verdict, its limits, the distances."""
    lines = [f"compare-training: {result['preset']}, {result['steps']} steps of "
             f"\"{result['recipe']}\" in {result['dtype']}",
             f"data: {result['source']}; batch {result['batch_size']}, "
             f"{result['steps_per_epoch']} steps an epoch"]
    torch_e = result["backends"]["torch"]
    lines.append(f"torch: loss {_num(torch_e['loss'][0])} -> {_num(torch_e['loss'][-1])}, "
                 f"gradient norm {_num(torch_e['grad_norm'][-1])} at the last step")
    for n, e in result["backends"].items():
        if n == "torch":
            continue
        until = ", ".join(f"{k}: {'step ' + str(v) if v else 'never'}"
                          for k, v in e["steps_until"].items())
        last = result["steps_shown"]
        if not last:
            lines.append(f"{n}: {e['verdict']}; no step to compare")
            continue
        lines.append(f"{n}: {e['verdict']}; after step {last} parameters "
                     f"{_e(e['final']['params'])} (largest in {e['params_where'][last - 1]}), "
                     f"BatchNorm statistics {_e(e['final']['stats'])}"
                     + (f"; steps until {until}" if result["dtype"] == "float32" else ""))
        worst = sorted(((v["params"][last - 1], s) for s, v in e["stages"].items()),
                       reverse=True)[:3]
        lines.append("    largest per stage: " + ", ".join(f"{s} {_e(d, '.1e')}"
                                                          for d, s in worst))
        for lim in e["limits"]:
            lines.append(f"    limit: {lim}")
        if e["stats_not_judged"]:
            lines.append(f"    note: {e['stats_not_judged']}")
    if result["absolute_why"]:
        lines.append(f"note: {len(result['absolute_names'])} tensors {result['absolute_why']}")
    amplified = amplification_lines(result)
    lines += amplified
    if result.get("diverged"):
        t = result["diverged"]
        lines.append(f"DIVERGED: torch's loss is {_num(torch_e['loss'][t - 1])} at step {t}: "
                     "this recipe diverges on this data (a smaller lr?); the backends are "
                     + (f"compared up to step {t - 1}" if t > 1 else "not compared")
                     + (f", where {result['first_difference']['backend']} first differs at "
                        f"step {result['first_difference']['step']}"
                        if result["first_difference"] else
                        ", where every backend that expresses the recipe exactly agrees"
                        if t > 1 else ""))
    elif result["agree"]:
        widened = bool(amplified)
        judged, shown = result.get("steps_judged"), result.get("steps_shown")
        lines.append(f"AGREE: every backend that expresses the recipe exactly is within "
                     f"{result['tolerance']:g} of torch "
                     + (("or the run's own amplification " if widened else "")
                        + ("at every step" if judged == shown else
                           f"at each of the first {judged} steps (not judged after)")
                        if result["dtype"] == "float64" else
                        "in the first step's loss and gradient norm (float32; the parameters' "
                        "drift is measured, not judged)"))
    else:
        f = result["first_difference"]
        lines.append(f"DIFFER: {f['backend']} first differs at step {f['step']} in {f['tensor']} "
                     f"({_e(f['distance'])} > {f['tolerance']:g})")
    return "\n".join(lines)


def amplification_lines(result: dict) -> List[str]:
    """What the run's own amplification of rounding (result["drift"]: PyTorch's run against
    its run on inputs SHAKE apart) did to the judging, where it changed anything."""
    drift, tols, tol = result.get("drift"), result.get("tolerances", []), result["tolerance"]
    if not drift:
        return []
    out = []
    # said where it mattered: a judged backend beyond the tolerance at a step it widened
    used = any(e["params"][t] > tol or not e["stats_not_judged"] and e["stats"][t] > tol
               for n, e in result["backends"].items() if n != "torch" and not e["limits"]
               for t, v in enumerate(tols) if v > tol)
    loose = next((t for t, v in enumerate(tols) if v > tol), None) if used else None
    if loose is not None:
        out.append(f"the run amplifies rounding: two torch runs {SHAKE:g} apart (relative) at "
                   f"the start are {_e(drift[loose])} apart at step {loose + 1} and "
                   f"{_e(max(drift[:len(tols)]))} at most by step {len(tols)}; from step "
                   f"{loose + 1} each step is judged within {CHAOS_MARGIN:g}x their distance")
    if result["steps_judged"] < result["steps_shown"]:
        t = result["steps_judged"]
        out.append(f"steps {t + 1}-{result['steps_shown']} not judged: there two torch runs "
                   f"{SHAKE:g} apart at the start are more than {CHAOS_LIMIT:g} apart "
                   f"({_e(drift[t])} at step {t + 1}): a recipe this run cannot hold steady "
                   "(a smaller lr?); the distances above are shown, not judged")
    return out


def write_outputs(result: dict, out) -> list:
    """The JSON of every figure and the divergence plot (log scale, matplotlib's Agg) into
    folder ``out``; the paths written."""
    import json
    import os
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "compare_training.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for n, e in result["backends"].items():
        if n == "torch":
            continue
        steps = np.arange(1, len(e["params"]) + 1)  # fewer where torch's run diverged
        ax.plot(steps, np.maximum(e["params"], PLOT_FLOOR), label=f"{n} parameters")
        if not e["stats_not_judged"]:
            ax.plot(steps, np.maximum(e["stats"], PLOT_FLOOR), "--", label=f"{n} BN statistics")
    if result.get("drift"):
        ax.plot(np.arange(1, len(result["drift"]) + 1), np.maximum(result["drift"], PLOT_FLOOR),
                color="black", lw=0.8, ls="-.", label=f"torch, inputs {SHAKE:g} apart")
    ax.axhline(result["tolerance"], color="grey", lw=0.8, ls=":", label="tolerance")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("largest relative distance from torch")
    import textwrap
    ax.set_title("\n".join(textwrap.wrap(f"{result['preset']}, {result['dtype']}, "
                                          f"{result['steps']} steps: {result['recipe_given']}",
                                          90)), fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    plot = os.path.join(out, "divergence.png")
    fig.savefig(plot, dpi=100)
    plt.close(fig)
    return [path, plot]
