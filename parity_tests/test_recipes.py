"""Training recipes (densenet_spec/optim.py) in every backend, each built with its framework's
own optimiser (train.py's build_optimizer): over three float64 steps from the same canonical
state on the same batches, every backend that says it expresses a recipe exactly
(``recipe_limits`` empty) agrees with PyTorch to 1e-9 in the loss, the gradient norm, the
learning rate and every parameter and BatchNorm statistic (Gluon's statistics aside: its
biased running variance, conventions.md row 5; the biases whose exact gradient is 0, and under
Adam the running means they feed, against an absolute floor: their movement is rounding noise);
every backend that names a limit differs from PyTorch by more than that (the difference it
declares is real). Then the recipe grammar (pure Python) and the compare-training verdict.

Cheap: the book at 64 px with a batch of 2 (the smallest input that exercises every stage:
parity_tests/test_numeric.py's _size), the MLP on batches of 128 house-price rows; one session
per recipe and backend, all of a backend's run at its first use; Flax's gradient programs
compiled once per model and its updates once per optimiser kind (optax.inject_hyperparams).
"""
import numpy as np
import pytest

import densenet_spec as spec
from densenet_parity.side_by_side import absolute_floor, distance, moved, zero_gradient_names
from densenet_training.side_by_side import side_by_side
from parity_tests.conftest import get_backend

STEPS = 3
TOL = 1e-9
OTHERS = ["mxnet", "flax-nnx", "flax-linen"]
#: Recipes over every option; hyperparameters that float32 holds exactly where MXNet's
#: float32 operator arguments would otherwise be the only difference.
BOOK = [
    "sgd lr=0.125",
    "sgd lr=0.125 momentum=0.875 weight_decay=0.0009765625 exclude=bn,bias",
    "sgd lr=0.125 momentum=0.5 nesterov=1 weight_decay=0.0009765625",
    "sgd lr=0.125 momentum=0.875 nesterov=1 schedule=step step_size=1 gamma=0.5",
    "sgd lr=0.1 momentum=0.9 dampening=0.5",
    "sgd lr=0.1 schedule=cosine per=epoch",
    "adam lr=0.01 weight_decay=0.001 exclude=bn schedule=cosine",
    "adamw lr=0.01 weight_decay=0.1 exclude=bn,bias schedule=step step_size=1 gamma=0.5 per=epoch",
]
HOUSE = [
    "sgd lr=0.0009765625 momentum=0.875 weight_decay=0.0009765625 exclude=bias",
    "sgd lr=0.0009765625 momentum=0.5 nesterov=1 schedule=step step_size=1 gamma=0.5",
    "sgd lr=0.001 momentum=0.9 dampening=0.5 schedule=cosine per=epoch",
    "adam lr=0.001 betas=0.8,0.99 eps=1e-6 weight_decay=0.01",
    "adamw lr=0.001 weight_decay=0.1 exclude=bn,bias schedule=cosine",
]
CASES = [("book", r) for r in BOOK] + [("house_mlp", r) for r in HOUSE]
#: Flax's float64 book step compiles in seconds a variant, its update once per optimiser kind
#: (optax.inject_hyperparams): on the book the Flax variants run one recipe of each optimiser
#: with every option they carry (momentum, Nesterov, weight decay, exclusions, schedules per
#: step and per epoch); every recipe runs on the MLP.
FLAX_BOOK = (BOOK[2], BOOK[6], BOOK[7])
OTHER_CASES = [(o, p, r) for o in OTHERS for p, r in CASES
               if o == "mxnet" or p == "house_mlp" or r in FLAX_BOOK]


@pytest.fixture(scope="module")
def data():
    # steps_per_epoch 2 (not the data's): per=epoch schedules change within the three steps.
    # The MLP's batch is 128 rows: over 8 rows its BatchNorms see features active on one or
    # two rows, and float64's rounding grew ~300-fold a step (4e-8 apart after 3 steps).
    return {"book": side_by_side("book", STEPS, 2, size=64),
            "house_mlp": side_by_side("house_mlp", STEPS, 128, limit=256)}


def _judged(config, recipe, other):
    """(relatively judged parameters, relatively judged statistics, absolutely judged names)
    of ``config`` under ``recipe`` (a Recipe) for backend ``other``."""
    tensors = spec.canonical_tensors(config)
    zero = zero_gradient_names(config)
    params = [n for n, _, k in tensors if k == "param" and n not in zero]
    # MXNet's BatchNorm keeps its momentum as float32 (0.9 rounded: 2e-7 off in a step) and
    # updates the variance with the biased estimate: its statistics are not judged here
    stats = [] if other == "mxnet" else [n for n, _, k in tensors if k == "state"]
    # every BatchNorm's input carries a zero-gradient bias's channels: under Adam its running
    # mean takes in their noise (the shift the BatchNorm subtracts); its variance does not
    noisy = {n for n in stats if n.endswith("running_mean")} if recipe.adaptive else set()
    return params, [n for n in stats if n not in noisy], sorted(zero | noisy)


def _summary(ref, got, config, recipe, other, init):
    """Per step, what the test judges of ``got`` against torch's ``ref`` (the arrays are not
    kept: a step of the MLP's is 20 MB in float64)."""
    params, stats, absolute = _judged(config, recipe, other)
    out = []
    for t, (g, r) in enumerate(zip(got, ref)):
        worst = max(((float(np.max(np.abs(g["arrays"][n] - r["arrays"][n]))), n)
                     for n in absolute), default=(0.0, None))
        out.append({"loss": (g["loss"], r["loss"]), "grad_norm": (g["grad_norm"],
                                                                  r["grad_norm"]),
                    "lr": (g["lr"], r["lr"]), "params": distance(g["arrays"], r["arrays"], params),
                    "stats": distance(g["arrays"], r["arrays"], stats), "absolute": worst,
                    "floor": absolute_floor(recipe, t + 1, 2, STEPS, "float64",
                                            moved(r["arrays"], init, params))})
    return out


_runs = {}


def _session(name, d, recipe):
    b = get_backend(name)
    s = b.call("recipe_session", config=d.config.to_dict(), state=d.state, recipe=recipe,
               steps_per_epoch=2, total_steps=STEPS, dtype="float64")
    out = [b.call("recipe_step", session=s, x=x, labels=y) for x, y in d.batches]
    b.call("recipe_end", session=s)
    return out


@pytest.fixture(scope="module")
def runs(data):
    """Every case of every backend, run at the first test (so that no memory release between
    tests drops Flax's compiled programs half way), kept as torch's figures and each other
    backend's summary against torch: {(backend, preset, recipe): [per step]}, with the first
    step's arrays of two torch runs for the exclusion test."""
    if not _runs:
        for preset, recipe in CASES:
            d = data[preset]
            ref = _session("torch", d, recipe)
            _runs["torch", preset, recipe] = [{k: v for k, v in f.items() if k != "arrays"}
                                              for f in ref]
            if preset == "book" and recipe in (BOOK[0], BOOK[1]):
                _runs["arrays", preset, recipe] = ref[0]["arrays"]
            for other in OTHERS:
                if (other, preset, recipe) in OTHER_CASES:
                    _runs[other, preset, recipe] = _summary(
                        ref, _session(other, d, recipe), d.config, spec.parse_recipe(recipe),
                        other, d.state)
    return _runs


@pytest.mark.parametrize("preset,recipe", CASES)
def test_torch_runs_the_recipe_as_written(preset, recipe, runs):
    """PyTorch's schedulers give the spec's closed-form rates (densenet_spec.lr_at), and
    PyTorch names no limit (a recipe means what PyTorch computes)."""
    assert get_backend("torch").call("recipe_limits", recipe=recipe, dtype="float64") == []
    parsed = spec.parse_recipe(recipe)
    for t, fig in enumerate(runs["torch", preset, recipe]):
        assert np.isfinite(fig["loss"]) and fig["grad_norm"] > 0
        assert abs(fig["lr"] - spec.lr_at(parsed, t, 2, STEPS)) <= 1e-15 * parsed.lr


@pytest.mark.parametrize("other,preset,recipe", OTHER_CASES)
def test_recipe_steps_match_torch_or_the_limit_is_named(other, preset, recipe, runs):
    """A backend that names no limit agrees with PyTorch to 1e-9 at every step; one that
    names a limit differs by more (the difference it declares is real). The biases whose
    exact gradient is zero (zero_gradient_names) move by rounding noise only (under Adam
    normalised to up to lr a step, and the running means of the BatchNorms they feed take it
    in): these are judged by an absolute floor (absolute_floor), the rest relatively."""
    limits = get_backend(other).call("recipe_limits", recipe=recipe, dtype="float64")
    steps = runs[other, preset, recipe]
    worst = max(s["params"] for s in steps)
    if limits:
        assert worst[0] > TOL, (f"{other} names limits {limits} for {recipe!r}, yet its "
                                f"parameters agree with torch's to {worst[0]:.1e}")
        return
    parsed = spec.parse_recipe(recipe)
    for t, s in enumerate(steps):
        (g, r), (gn, rn), (gl, rl) = s["loss"], s["grad_norm"], s["lr"]
        assert abs(g - r) <= TOL * max(1.0, abs(r)), (t, g, r)
        assert abs(gn - rn) <= TOL * rn, (t, gn, rn)
        assert abs(gl - rl) <= 1e-12 * rl, (t, gl, rl)
        for what in ("params", "stats"):
            d, name = s[what]
            assert d <= TOL, f"{other} {recipe!r} step {t}: {name} differs by {d:.2e} > {TOL:g}"
        d, name = s["absolute"]
        floor = s["floor"]
        assert d <= floor, f"{other} {recipe!r} step {t}: {name} off by {d:.2e} > {floor:.2e}"


def test_weight_decay_exclusion_is_per_parameter(data, runs):
    """exclude=bn,bias leaves BatchNorm's parameters and every bias without decay: with lr
    and decay only (no gradient difference), torch's step differs from the undecayed one
    exactly in the decayed parameters."""
    plain = runs["arrays", "book", BOOK[0]]
    decayed = runs["arrays", "book", BOOK[1]]
    names = spec.decayed_names(data["book"].config, spec.parse_recipe(BOOK[1]))
    assert names and all(".norm" not in n and not n.endswith(".bias") for n in names)
    # the first step: momentum's buffer is the gradient itself, so only decay differs
    every = spec.decayed_names(data["book"].config, spec.parse_recipe("sgd"))
    assert names < every
    for n in every:
        if n not in names:
            assert np.array_equal(plain[n], decayed[n]), n
        elif np.any(data["book"].state[n]):  # a decay of zero weights (biases) is zero
            assert not np.array_equal(plain[n], decayed[n]), n


# ------------------------------------------------------------------ the grammar (pure Python)

GRID = [f"{o} lr={lr}{extra}{decay}{ex}{sched}"
        for o, extra in (("sgd", ""), ("sgd", " momentum=0.9 dampening=0.1"),
                         ("sgd", " momentum=0.9 nesterov=1"), ("adam", " betas=0.8,0.99 eps=1e-6"),
                         ("adamw", ""))
        for lr in ("0.1", "3e-4")
        for decay in ("", " weight_decay=5e-4")
        for ex in ("", " exclude=bn", " exclude=bias,bn")
        for sched in ("", " schedule=step step_size=3 gamma=0.5 per=epoch",
                      " schedule=cosine t_max=7 eta_min=1e-5", " schedule=cosine per=step")]


def test_recipe_round_trips_through_its_string():
    """str(recipe) writes every setting; parsing it gives the same recipe, for every optimiser,
    option, exclusion and schedule of the grid (240 recipes)."""
    for text in GRID:
        recipe = spec.parse_recipe(text)
        again = spec.parse_recipe(str(recipe))
        assert again == recipe, (text, str(recipe))
        assert str(again) == str(recipe)
    assert spec.parse_recipe("adamw").weight_decay == 0.01  # PyTorch's default
    assert spec.parse_recipe("sgd exclude=bias,bn").exclude == ("bn", "bias")


@pytest.mark.parametrize("text,expected", [
    ("", "recipe: empty"),
    ("rmsprop lr=0.1", "'rmsprop' is not an optimiser; expected one of sgd, adam, adamw"),
    ("sgd lr", "'lr': expected key=value"),
    ("sgd learning_rate=0.1", "unknown key 'learning_rate'; keys:"),
    ("sgd lr=0.1 lr=0.2", "lr given twice"),
    ("sgd lr=fast", "lr=fast: expected a number"),
    ("sgd lr=nan", "lr=nan: expected a finite number"),
    ("adam eps=inf", "eps=inf: expected a finite number"),
    ("sgd lr=0", "lr=0: expected > 0"),
    ("sgd momentum=1", "momentum=1: expected < 1"),
    ("sgd nesterov=yes", "nesterov=yes: expected one of 0, 1"),
    ("adam betas=0.9", "betas=0.9: expected two numbers b1,b2"),
    ("sgd exclude=bn,weights", "exclude=weights: expected one of none, bn, bias"),
    ("sgd decay=decoupled", "decay=decoupled with sgd: torch.optim.SGD adds weight decay"),
    ("adam decay=decoupled", "Adam with decoupled weight decay is AdamW: write adamw"),
    ("adamw decay=coupled", "AdamW's weight decay is decoupled"),
    ("sgd nesterov=1", "nesterov=1 needs momentum > 0 and dampening=0 (as torch.optim.SGD); "
                       "found momentum=0, dampening=0"),
    ("sgd momentum=0.9 dampening=0.1 nesterov=1", "found momentum=0.9, dampening=0.1"),
    ("adam momentum=0.9", "momentum is a setting of sgd, not of adam"),
    ("sgd betas=0.9,0.99", "betas is a setting of adam and adamw, not of sgd"),
    ("sgd schedule=cosine step_size=3", "step_size is a setting of schedule=step, and this "
                                        "recipe's schedule is cosine"),
    ("sgd t_max=3", "t_max is a setting of schedule=cosine, and this recipe's schedule is "
                    "constant"),
    ("sgd schedule=step", "schedule=step needs step_size=N"),
    ("sgd schedule=linear", "schedule=linear: expected one of constant, step, cosine"),
    ("sgd per=epoch", "per= says what a schedule counts, and this recipe has no schedule"),
    ("sgd schedule=step step_size=1.5", "step_size=1.5: expected an integer"),
])
def test_a_bad_recipe_is_one_message_naming_expected_and_found(text, expected):
    with pytest.raises(spec.RecipeError) as info:
        spec.parse_recipe(text)
    message = str(info.value)
    assert expected in message, message
    assert "\n" not in message and "Traceback" not in message


def test_compare_training_verdict_names_the_first_difference():
    """The command's verdict (densenet_parity.side_by_side._verdict) on figures made up for
    it: a backend without limits past 1e-9 at step 2 is named with its tensor (exit 1); one
    with limits is measured, not judged; statistics a backend does not judge do not count."""
    def entry(params, stats, limits=(), unjudged=None):
        return {"limits": list(limits), "stats_not_judged": unjudged, "params": params,
                "params_where": [f"p{t}" for t in range(len(params))], "stats": stats,
                "stats_where": [f"s{t}" for t in range(len(stats))],
                "absolute": [0.0] * len(params), "absolute_floor": [0.0] * len(params)}
    result = {"dtype": "float64", "backends": {
        "torch": {}, "a": entry([1e-12, 1e-12, 1e-12], [1e-12, 5e-9, 1e-12]),
        "b": entry([1e-3, 1e-2, 1e-1], [1.0] * 3, limits=["no such option"]),
        "c": entry([1e-12] * 3, [1.0] * 3, unjudged="biased variance")}}
    from densenet_parity.side_by_side import _verdict
    _verdict(result)
    assert result["agree"] is False
    assert result["first_difference"] == {"backend": "a", "step": 2, "tensor": "s1",
                                          "distance": 5e-9, "tolerance": 1e-9}
    assert result["backends"]["b"]["verdict"].startswith("limits named")
    assert result["backends"]["b"]["steps_until"] == {"1e-06": 1, "0.0001": 1, "0.01": 3}
    assert result["backends"]["c"]["verdict"] == "agrees"
    del result["backends"]["a"]
    _verdict(result)
    assert result["agree"] is True and result["first_difference"] is None
    # float32: the first step's loss and gradient norm are judged (1e-3), the drift measured
    result["dtype"] = "float32"
    result["backends"]["torch"] = {"loss": [2.0, 1.0, 0.5], "grad_norm": [3.0, 2.0, 1.0]}
    result["backends"]["c"].update(loss=[2.0, 1.0, 0.5], grad_norm=[3.0, 2.0, 1.0])
    result["backends"]["a"] = entry([1e-2, 1e-1, 1.0], [1e-6] * 3)
    result["backends"]["a"].update(loss=[2.0 * (1 + 5e-5), 1.0, 1.0], grad_norm=[3.0, 1.0, 1.0])
    _verdict(result)
    assert result["agree"] is True and result["backends"]["a"]["steps_until"]["0.01"] == 2
    result["backends"]["a"]["grad_norm"][0] = 3.0 * (1 + 2e-3)
    _verdict(result)
    assert result["first_difference"]["step"] == 1 and result["agree"] is False
    assert result["first_difference"]["tensor"] == "the grad norm"
    # PyTorch's loss not a number at step 3: steps 1 and 2 judged, and the run never agrees
    result["dtype"] = "float64"
    result["backends"]["a"] = entry([1e-12, 1e-12, float("nan")], [1e-12, 1e-12, 1e-12])
    result["diverged"] = 3
    _verdict(result)
    assert result["steps_judged"] == 2 and result["first_difference"] is None
    assert result["agree"] is False and result["backends"]["a"]["final"]["params"] == 1e-12
    # a run that amplifies rounding (result["drift"]: torch against torch on inputs 1e-13
    # apart): a step is judged within 100x that where it is more than 1e-9, and from where
    # torch's own two runs are 1e-4 apart not at all
    result = {"dtype": "float64", "steps": 3, "drift": [1e-13, 1e-10, 5e-4], "backends": {
        "torch": {}, "a": entry([1e-12, 5e-9, 1e-3], [1e-12] * 3)}}
    _verdict(result)
    assert result["agree"] is True and result["steps_judged"] == 2, result
    assert result["tolerances"] == pytest.approx([1e-9, 1e-8])
    result["backends"]["a"]["params"][1] = 2e-8
    _verdict(result)
    assert result["first_difference"]["step"] == 2 and result["agree"] is False
