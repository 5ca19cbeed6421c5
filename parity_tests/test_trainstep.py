"""``densenet check --recipe``: the user's own training step against the recipe they meant
(densenet_parity.checking.trainstep). The factories are written to a temporary module as a
user writes them: the forum's MLP DenseNet (house_mlp, the fastest preset) with a torch
optimiser that is right, or wrong in one way the check must name by measurement; one correct
port in Flax NNX; the MLP in Gluon with its gluon.Trainer (right, and decaying its
BatchNorm); the MLP in Keras with its compiled Adam (Keras' epsilon placement named, with and
without its default epsilon) and SGD (the same step); and the
usage errors (a wrong pair, an optimiser the check cannot run, an optimiser without --recipe,
--recipe without one, a recipe that does not parse): one clear message, exit 2."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from densenet_parity import check
from densenet_parity.checking import CheckError, subject_keras
import densenet_spec as spec
from densenet_spec import RecipeError
from parity_tests.conftest import cli_env, need_mxnet

torch = pytest.importorskip("torch", reason="the training-step tests need torch")

TORCH = textwrap.dedent('''
    import torch
    from parity_tests.own_models import house_torch

    def adamw():
        m = house_torch.net()
        return m, torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=1e-2)

    def adam_l2():  # Adam's weight_decay is L2 in the gradient: not AdamW
        m = house_torch.net()
        return m, torch.optim.Adam(m.parameters(), lr=1e-3, weight_decay=1e-2)

    def adam_keras_eps():  # Keras' default epsilon carried over into torch.optim.Adam
        m = house_torch.net()
        return m, torch.optim.Adam(m.parameters(), lr=1e-3, eps=1e-7)

    def sgd_decays_everything():
        m = house_torch.net()
        return m, torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)

    def sgd_plain_momentum():
        m = house_torch.net()
        return m, torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)

    def step_lr_stepped_early():  # the scheduler stepped once before training
        m = house_torch.net()
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
        opt.step()
        sched.step()
        return m, opt, sched

    class SGDW(torch.optim.SGD):  # decoupled decay (w -= lr wd w), ported from optax/Keras
        def __init__(self, params, lr, momentum, weight_decay):
            super().__init__(params, lr=lr, momentum=momentum)
            self.wd = weight_decay

        @torch.no_grad()
        def step(self, closure=None):
            for g in self.param_groups:
                for p in g["params"]:
                    p.mul_(1 - g["lr"] * self.wd)
            return super().step(closure)

    def sgd_decoupled():
        m = house_torch.net()
        return m, SGDW(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)

    def sgd_dampened():  # dampening=momentum: an exponential average of the gradients
        m = house_torch.net()
        return m, torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, dampening=0.9)

    def wrong_width():  # the structure differs (its second transition keeps its width)
        m = house_torch.transition_keeps_width()
        return m, torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=1e-2)

    def wrong_pair():
        m = house_torch.net()
        return m, "adam"

    def lbfgs():
        m = house_torch.net()
        return m, torch.optim.LBFGS(m.parameters())

    def alone():
        return house_torch.net()
''')

FLAX = textwrap.dedent('''
    import optax
    from flax import nnx
    from parity_tests.own_models import house_nnx

    def adamw():  # the forum's MLP at the tiny size (TINY): JAX compiles a small program
        m = house_nnx.MLPDenseNet(nnx.Rngs(0), in_features=8, widths=(16, 32), growth_rate=8,
                                  blocks=(2, 2))
        return m, optax.adamw(1e-3, weight_decay=1e-2)
''')

#: the forum's MLP DenseNet made small (every stage: a two-layer stem, two dense blocks and
#: the transition between them), for the JAX programs (Flax, Keras), whose compilation is
#: most of a check's time
TINY = spec.MLPPreset("tiny_mlp", in_features=8, stem_widths=(16, 32), block_config=(2, 2),
                      growth_rate=8, compression=0.5, transition_relu=True, num_outputs=1)

GLUON = textwrap.dedent('''
    from mxnet import gluon, nd
    from mxnet.gluon import nn


    class Net(nn.Block):  # the forum's MLP DenseNet in Gluon, at the tiny size
        def __init__(self, widths=(16, 32), growth=8, blocks=(2, 2), **kw):
            super().__init__(**kw)
            self.stem = nn.Sequential()
            for w in widths:
                self.stem.add(nn.Dense(w, activation="relu"))
            self.layers = nn.Sequential()
            c = widths[-1]
            self.kinds = []
            for i, n in enumerate(blocks):
                for _ in range(n):
                    blk = nn.Sequential()
                    blk.add(nn.BatchNorm(), nn.Activation("relu"), nn.Dense(growth))
                    self.layers.add(blk)
                    self.kinds.append("layer")
                    c += growth
                if i != len(blocks) - 1:
                    c //= 2
                    blk = nn.Sequential()
                    blk.add(nn.BatchNorm(), nn.Activation("relu"), nn.Dense(c, activation="relu"))
                    self.layers.add(blk)
                    self.kinds.append("transition")
            self.head = nn.Sequential()
            self.head.add(nn.BatchNorm(), nn.Activation("relu"), nn.Dense(1))

        def forward(self, x):
            x = self.stem(x)
            for kind, blk in zip(self.kinds, self.layers):
                x = nd.concat(x, blk(x), dim=1) if kind == "layer" else blk(x)
            return self.head(x)


    def sgd():
        m = Net()
        m.initialize()
        return m, gluon.Trainer(m.collect_params(), "sgd", {"learning_rate": 0.05})


    def sgd_decays_everything():  # Gluon decays every parameter unless its wd_mult is 0
        m = Net()
        m.initialize()
        return m, gluon.Trainer(m.collect_params(), "sgd", {"learning_rate": 0.05, "wd": 1e-2})
''')

KERAS = textwrap.dedent('''
    import keras
    from keras import layers


    def bn():
        return layers.BatchNormalization(epsilon=1e-5, momentum=0.9)


    def mlp():  # the forum's MLP DenseNet (house_torch) in Keras' Functional API, at TINY
        inp = keras.Input((8,))
        x = layers.ReLU()(layers.Dense(16)(inp))
        x = layers.ReLU()(layers.Dense(32)(x))
        width = 32
        for i in range(2):
            for _ in range(2):
                x = layers.concatenate([x, layers.Dense(8)(layers.ReLU()(bn()(x)))])
                width += 8
            if i != 1:
                width //= 2
                x = layers.ReLU()(layers.Dense(width)(layers.ReLU()(bn()(x))))
        return keras.Model(inp, layers.Dense(1)(layers.ReLU()(bn()(x))))


    def adam():
        m = mlp()
        m.compile(optimizer=keras.optimizers.Adam(1e-3, epsilon=1e-7))
        return m


    def adam_as_it_comes():  # its default epsilon, 1e-7
        m = mlp()
        m.compile(optimizer=keras.optimizers.Adam(1e-3))
        return m


    def sgd():  # Keras' momentum keeps lr in its buffer: PyTorch's update at a constant rate
        m = mlp()
        m.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
        return m
''')

ADAMW = "adamw lr=1e-3 weight_decay=1e-2"


@pytest.fixture(scope="module")
def where(tmp_path_factory):
    path = tmp_path_factory.mktemp("trainstep")
    for name, text in (("ts_torch", TORCH), ("ts_flax", FLAX), ("ts_gluon", GLUON),
                       ("ts_keras", KERAS)):
        (path / f"{name}.py").write_text(text)
    return str(path)


def _check(where, framework, fn, recipe, steps=3, **kw):
    module = {"torch": "ts_torch", "flax": "ts_flax", "mxnet": "ts_gluon",
              "keras": "ts_keras"}[framework]
    return check(framework=framework, factory=f"{module}:{fn}", path=where, recipe=recipe,
                 steps=steps, **kw)


def test_a_correct_torch_port_is_the_same_training_step(where):
    r = _check(where, "torch", "adamw", ADAMW)
    assert r.same and r.same_training, r.render()
    assert r.training["first"] is None and len(r.training["loss"]) == 3
    assert r.training["loss"] == r.training["reference_loss"]
    assert r.verdict == "same network; same training step"


@pytest.mark.parametrize("fn, recipe, cause", [
    ("adam_l2", ADAMW, "decay=coupled"),
    ("adam_keras_eps", "adam lr=1e-3", "eps=1e-07"),
    ("sgd_decays_everything", "sgd lr=0.05 momentum=0.9 weight_decay=1e-2 exclude=bn",
     "decay on bn"),
    ("sgd_plain_momentum", "sgd lr=0.05 momentum=0.9 nesterov=1", "nesterov=0"),
    ("step_lr_stepped_early", "sgd lr=0.05 schedule=step step_size=2 gamma=0.1",
     "schedule ahead"),
    ("sgd_decoupled", "sgd lr=0.05 momentum=0.9 weight_decay=1e-2", "decay=decoupled"),
    ("sgd_dampened", "sgd lr=0.05 momentum=0.9", "dampening=momentum"),
    ("sgd_plain_momentum", "sgd lr=0.05 momentum=0.9 dampening=0.5", "dampening=0"),
])
def test_a_torch_porting_mistake_is_named_by_measurement(where, fn, recipe, cause):
    r = _check(where, "torch", fn, recipe)
    t = r.training
    assert r.same and not r.same_training, r.render()
    assert t["first"]["step"] >= 1 and t["first"]["distance"] > 1e-6
    assert [c["key"] for c in t["causes"]] == [cause], (t["candidates"], t["causes"])
    assert r.verdict.startswith("same network; different training step: first differs at "
                                f"step {t['first']['step']} in {t['first']['tensor']}")
    text = r.render()
    assert "likely cause (measured" in text and "nan" not in text and "inf " not in text
    # causes belong to the recipe: no momentum cause for a recipe without momentum, no
    # schedule cause for a constant rate, no Adam cause for SGD
    if "momentum" not in recipe:
        assert not any(k.startswith(("nesterov", "dampening", "momentum", "buffer"))
                       for k in t["candidates"])
    if "schedule" not in recipe:
        assert not any(k.startswith("schedule") for k in t["candidates"])
    if recipe.startswith("sgd"):
        assert not any(k.startswith("eps") for k in t["candidates"])


def test_a_different_structure_is_not_training_checked(where):
    r = _check(where, "torch", "wrong_width", ADAMW)
    assert not r.same and not r.training["checked"], r.render()
    assert "TRAINING STEP not checked: the model's structure differs" in r.render()


def test_flax_nnx_same_training_step(where):
    r = _check(where, "flax", "adamw", ADAMW, steps=2, preset=TINY)
    assert r.same_architecture and r.same_training, r.render()  # its BatchNorm: Flax's 0.99
    assert r.training["reference"] == "flax-nnx" and r.training["stats_judged"] == "none"


def test_gluon_same_training_step_and_decay_on_batchnorm(where):
    """The forum's MLP in Gluon (TINY) with its own gluon.Trainer: within 1e-9 of our Gluon
    model's steps (float64; the parameters read as they are, not rounded to float32); a
    Trainer with wd decays the BatchNorm parameters too, which the recipe excludes: named by
    measurement (the reference rerun by Gluon's own Trainer with the decay on BatchNorm
    matches)."""
    need_mxnet()
    r = _check(where, "mxnet", "sgd", "sgd lr=0.05", steps=2, preset=TINY)
    assert r.same and r.same_training, r.render()
    assert r.training["reference"] == "mxnet" and r.training["tolerance"] == 1e-9
    r = _check(where, "mxnet", "sgd_decays_everything",
               "sgd lr=0.05 weight_decay=1e-2 exclude=bn", steps=2, preset=TINY)
    t = r.training
    assert r.same and not r.same_training, r.render()
    assert [c["key"] for c in t["causes"]] == ["decay on bn"], (t["candidates"], t["causes"])
    assert t["first"]["step"] == 1 and ".norm" in t["first"]["tensor"], t["first"]


def test_keras_adam_is_named_by_its_epsilon_placement(where):
    """A compiled Keras model's own optimiser, stepped in float64 on Keras' JAX backend
    (stateless_apply) against PyTorch's Adam with the same epsilon: Keras adds epsilon to
    sqrt(v) before the bias correction, which the check finds by measurement (the PyTorch run
    with that placement matches the Keras steps, and no other mutation does)."""
    subject_keras.import_keras()  # Keras on its JAX backend (KERAS_BACKEND=jax unless set)
    r = _check(where, "keras", "adam", "adam lr=1e-3 eps=1e-7", steps=2, preset=TINY)
    t = r.training
    assert r.same and not r.same_training, r.render()
    assert t["optimizer"]["optimizer"] == "keras.optimizers.Adam" and t["reference"] == "torch"
    assert t["first"]["step"] == 1 and t["first"]["distance"] > 1e-4, t["first"]
    assert [c["key"] for c in t["causes"]] == ["eps before bias correction"], (
        t["candidates"], t["causes"])
    assert t["loss"][0] == pytest.approx(t["reference_loss"][0], rel=1e-12)
    # Keras' Adam as it comes (epsilon 1e-7, before the bias correction) against PyTorch's
    # recipe (1e-8, after it): both named together, neither alone
    r = _check(where, "keras", "adam_as_it_comes", "adam lr=1e-3", steps=2, preset=TINY)
    t = r.training
    assert r.same and not r.same_training, r.render()
    assert [c["key"] for c in t["causes"]] == ["keras adam"], (t["candidates"], t["causes"])
    assert "eps=1e-07" in t["candidates"] and "nan" not in r.render()


def test_keras_sgd_with_momentum_is_the_same_training_step(where):
    """Keras' SGD keeps the learning rate in its momentum buffer (m = 0.9 m - lr g; w += m),
    PyTorch's outside it: the same update at a constant rate, within the JAX programs' 1e-6;
    in fact within float64's rounding: Keras' float32 rate (0.0500000007) is read as the 0.05
    the user typed (read as it was, every parameter was 1e-8 off after the first step)."""
    subject_keras.import_keras()
    r = _check(where, "keras", "sgd", "sgd lr=0.05 momentum=0.9", steps=2, preset=TINY)
    assert r.same and r.same_training, r.render()
    t = r.training
    assert t["optimizer"]["optimizer"] == "keras.optimizers.SGD" and t["first"] is None
    assert t["tolerance"] == 1e-6 and len(t["loss"]) == 2 and t["lr"][0] == 0.05
    assert max(t["distance"]) < 1e-12, t["distance"]
    assert r.verdict == "same network; same training step"


@pytest.mark.parametrize("fn, recipe, words", [
    ("wrong_pair", ADAMW, "returned (Sequential, str); expected a torch.nn.Module, or "
                          "(module, optimizer)"),
    ("lbfgs", ADAMW, "cannot run torch.optim.LBFGS"),
    ("adamw", None, "give --recipe"),
    ("alone", ADAMW, "returned the model alone; return (module, optimizer)"),
])
def test_usage_errors_name_what_was_expected(where, fn, recipe, words):
    with pytest.raises(CheckError) as e:
        _check(where, "torch", fn, recipe)
    assert words in str(e.value), str(e.value)


def test_a_bad_recipe_exits_2(where):
    with pytest.raises(RecipeError, match="lr=fast: expected a number"):
        _check(where, "torch", "adamw", "adamw lr=fast")
    out = subprocess.run([sys.executable, "-m", "densenet_cli", "check", "--framework",
                          "torch", "ts_torch:wrong_pair", "--recipe", ADAMW],
                         cwd=where, env=cli_env(), capture_output=True, text=True)
    assert out.returncode == 2 and "expected a torch.nn.Module" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_a_run_that_amplifies_rounding_is_judged_within_its_own_amplification():
    """The tolerance of each step (trainstep.step_tolerances): the check's own, or 100x the
    distance two reference runs 1e-13 apart reach there where that is larger; from the first
    step where they are 1e-4 apart (or not a number) nothing is judged, and the report says
    from which step and why, in words (no nan)."""
    from densenet_parity.checking import trainstep
    inf = float("inf")
    assert trainstep.step_tolerances(1e-6, [1e-13, 1e-9, 2e-7]) == pytest.approx([1e-6, 1e-6, 2e-5])
    assert trainstep.step_tolerances(1e-9, [1e-13, 5e-4, 1e-5]) == [1e-9, inf, inf]
    assert trainstep.step_tolerances(1e-9, [float("nan"), 0.0]) == [inf, inf]
    training = {"checked": True, "steps": 4, "recipe": "sgd lr=0.5", "reference": "torch",
                "optimizer": {"optimizer": "torch.optim.SGD"}, "loss": [1.0, 9.0, 80.0, 700.0],
                "reference_loss": [1.0, 9.0, 80.0, 700.0], "stats_judged": "all",
                "tolerance": 1e-9, "drift": [1e-13, 3e-10, 5e-4, float("nan")],
                "distance": [0.0, 2e-9, 1e-3, 1.0],
                "first": None, "causes": [], "candidates": []}
    training["tolerances"] = trainstep.step_tolerances(1e-9, training["drift"])
    text = "\n".join(trainstep.lines(training))
    assert ("two reference runs 1e-13 apart (relative) at the start are 3.00e-10 apart at "
            "step 2") in text
    assert "steps 3-4 not judged" in text and "after each of the first 2 steps" in text
    assert "nan" not in text.lower().replace("not a number", "")
    assert "or the run's own amplification (above)" in text
    # where the amplification changed nothing (every step within the tolerance), not a word
    training.update(drift=[1e-13, 3e-10], distance=[0.0, 1e-12], steps=2, loss=[1.0, 9.0],
                    reference_loss=[1.0, 9.0])
    training["tolerances"] = trainstep.step_tolerances(1e-9, training["drift"])
    text = "\n".join(trainstep.lines(training))
    assert "amplif" not in text and "within 1e-09 (relative) after every step" in text
