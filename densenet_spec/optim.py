"""A training recipe as data: the optimiser, its learning rate and schedule, and weight decay,
with PyTorch's semantics as the canonical meaning. Pure Python (no numpy, no framework): each
mirror builds the recipe with its own framework's optimiser (densenet_torch/train.py,
densenet_mxnet/train.py, densenet_flax/train.py: ``build_optimizer``) and says what it cannot
express exactly (``recipe_limits``).

The grammar, in one place (``parse_recipe``): an optimiser name, then ``key=value`` settings
separated by spaces, in any order, each at most once::

    sgd   lr=0.1 momentum=0.9 dampening=0 nesterov=1 weight_decay=5e-4 exclude=bn,bias
    adam  lr=1e-3 betas=0.9,0.999 eps=1e-8 weight_decay=1e-4
    adamw lr=1e-3 weight_decay=0.01 schedule=cosine per=epoch t_max=10

    key           optimisers      value                          default (PyTorch's)
    lr            all             a positive number              1e-3
    momentum      sgd             0 <= m < 1                     0
    dampening     sgd             0 <= d < 1                     0
    nesterov      sgd             0 or 1 (needs momentum > 0     0
                                  and dampening 0)
    betas         adam, adamw     b1,b2 with 0 <= b < 1          0.9,0.999
    eps           adam, adamw     a positive number              1e-8
    weight_decay  all             a number >= 0                  0 (adamw: 0.01)
    decay         all             coupled (sgd, adam) or         the optimiser's
                                  decoupled (adamw): a check
    exclude       all             none, bn, bias or bn,bias:     none
                                  the parameters without
                                  weight decay
    schedule      all             constant, step or cosine       constant
    per           all             step or epoch: what the        step
                                  schedule counts
    step_size     schedule=step   a positive integer             (required)
    gamma         schedule=step   0 < gamma <= 1                 0.1
    t_max         schedule=cosine a positive integer             the run's length (steps or
                                                                 epochs, as ``per`` counts)
    eta_min       schedule=cosine a number >= 0                  0

What each recipe computes is what this PyTorch code computes (``g`` the gradient of the mean
loss, ``k`` the count of ``per``: scheduler.step() after every optimiser step, or after every
epoch)::

    decay = [p for name, p in params if name not in excluded]; rest = the others
    groups = [{"params": decay}, {"params": rest, "weight_decay": 0.0}]
    sgd:   torch.optim.SGD(groups, lr, momentum, dampening, weight_decay, nesterov)
           g += wd * w;  buf = g (first step) or momentum * buf + (1 - dampening) * g;
           g = g + momentum * buf (nesterov) or buf (momentum) or g;  w -= lr_k * g
    adam:  torch.optim.Adam(groups, lr, betas, eps, weight_decay)
           g += wd * w;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
           w -= lr_k * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    adamw: torch.optim.AdamW(groups, lr, betas, eps, weight_decay)
           w *= 1 - lr_k * wd;  then Adam's step without the L2 term
    step:   torch.optim.lr_scheduler.StepLR(opt, step_size, gamma):  lr_k = lr gamma^(k // step_size)
    cosine: torch.optim.lr_scheduler.CosineAnnealingLR(opt, t_max, eta_min):
            lr_k = eta_min + (lr - eta_min) (1 + cos(pi k / t_max)) / 2

``excluded``: with ``bn`` every BatchNorm parameter (weight and bias), with ``bias`` every
parameter named ``*.bias`` (BatchNorm's bias too); ``canonical_tensors``' names.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional, Set, Tuple

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine")
PER = ("step", "epoch")
EXCLUDE = ("bn", "bias")
GRAMMAR = ("RECIPE: an optimiser (sgd, adam, adamw) then key=value settings, e.g. "
           "\"sgd lr=0.1 momentum=0.9 nesterov=1 weight_decay=5e-4 exclude=bn,bias "
           "schedule=cosine per=epoch\"; keys: lr momentum dampening nesterov betas eps "
           "weight_decay decay exclude schedule per step_size gamma t_max eta_min "
           "(densenet_spec/optim.py)")
_ONLY = {"momentum": ("sgd",), "dampening": ("sgd",), "nesterov": ("sgd",),
         "betas": ("adam", "adamw"), "eps": ("adam", "adamw"),
         "step_size": "step", "gamma": "step", "t_max": "cosine", "eta_min": "cosine"}


class RecipeError(ValueError):
    """A recipe that does not parse or means nothing PyTorch can run (one clear message)."""


@dataclass(frozen=True)
class Recipe:
    """One training recipe (PyTorch's meaning: the module docstring). Build it with
    ``parse_recipe``; ``str(recipe)`` writes it back in full, every setting explicit."""
    optimizer: str = "sgd"
    lr: float = 1e-3
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    exclude: Tuple[str, ...] = ()
    schedule: str = "constant"
    per: str = "step"
    step_size: int = 0
    gamma: float = 0.1
    t_max: int = 0  # 0: the run's length
    eta_min: float = 0.0

    @property
    def decay(self) -> str:
        """'coupled' (L2 added to the gradient: SGD, Adam) or 'decoupled' (AdamW)."""
        return "decoupled" if self.optimizer == "adamw" else "coupled"

    @property
    def adaptive(self) -> bool:
        return self.optimizer in ("adam", "adamw")

    def __str__(self) -> str:
        out = [self.optimizer, f"lr={self.lr!r}"]
        if self.optimizer == "sgd":
            out += [f"momentum={self.momentum!r}", f"dampening={self.dampening!r}",
                    f"nesterov={int(self.nesterov)}"]
        else:
            out += [f"betas={self.betas[0]!r},{self.betas[1]!r}", f"eps={self.eps!r}"]
        out += [f"weight_decay={self.weight_decay!r}", f"decay={self.decay}",
                f"exclude={','.join(self.exclude) or 'none'}", f"schedule={self.schedule}"]
        if self.schedule != "constant":
            out.append(f"per={self.per}")
        if self.schedule == "step":
            out += [f"step_size={self.step_size}", f"gamma={self.gamma!r}"]
        if self.schedule == "cosine":
            out += [f"t_max={self.t_max}" if self.t_max else "", f"eta_min={self.eta_min!r}"]
        return " ".join(o for o in out if o)


def _number(key, text, low=None, high=None, low_open=False, high_open=True, integer=False):
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        raise RecipeError(f"recipe: {key}={text}: expected {'an integer' if integer else 'a number'}"
                          f"; {GRAMMAR}") from None
    if not math.isfinite(value):
        raise RecipeError(f"recipe: {key}={text}: expected a finite number")
    if low is not None and (value < low or (low_open and value == low)):
        raise RecipeError(f"recipe: {key}={text}: expected {'>' if low_open else '>='} {low:g}")
    if high is not None and (value > high or (high_open and value == high)):
        raise RecipeError(f"recipe: {key}={text}: expected {'<' if high_open else '<='} {high:g}")
    return value


def _choice(key, text, choices):
    if text not in choices:
        raise RecipeError(f"recipe: {key}={text}: expected one of {', '.join(choices)}")
    return text


def parse_recipe(text: str) -> Recipe:
    """A recipe string (the grammar: the module docstring) -> Recipe, or one RecipeError that
    names what was expected and what was found."""
    if not isinstance(text, str) or not text.split():
        raise RecipeError(f"recipe: empty; {GRAMMAR}")
    words = text.split()
    name = words[0].lower()
    if name not in OPTIMIZERS:
        raise RecipeError(f"recipe: {words[0]!r} is not an optimiser; expected one of "
                          f"{', '.join(OPTIMIZERS)} first; {GRAMMAR}")
    known = {f.name for f in fields(Recipe)} - {"optimizer"} | {"decay"}
    given = {}
    for word in words[1:]:
        key, eq, value = word.partition("=")
        if not eq or not key or not value:
            raise RecipeError(f"recipe: {word!r}: expected key=value; {GRAMMAR}")
        if key not in known:
            raise RecipeError(f"recipe: unknown key {key!r}; keys: {', '.join(sorted(known))}")
        if key in given:
            raise RecipeError(f"recipe: {key} given twice")
        given[key] = value
    kw = {"optimizer": name}
    if "lr" in given:
        kw["lr"] = _number("lr", given["lr"], 0.0, low_open=True)
    if "momentum" in given:
        kw["momentum"] = _number("momentum", given["momentum"], 0.0, 1.0)
    if "dampening" in given:
        kw["dampening"] = _number("dampening", given["dampening"], 0.0, 1.0)
    if "nesterov" in given:
        kw["nesterov"] = bool(_number("nesterov", _choice("nesterov", given["nesterov"],
                                                          ("0", "1")), integer=True))
    if "betas" in given:
        parts = given["betas"].split(",")
        if len(parts) != 2:
            raise RecipeError(f"recipe: betas={given['betas']}: expected two numbers b1,b2")
        kw["betas"] = tuple(_number("betas", p, 0.0, 1.0) for p in parts)
    if "eps" in given:
        kw["eps"] = _number("eps", given["eps"], 0.0, low_open=True)
    kw["weight_decay"] = (_number("weight_decay", given["weight_decay"], 0.0)
                          if "weight_decay" in given else 0.01 if name == "adamw" else 0.0)
    if "exclude" in given:
        parts = given["exclude"].split(",")
        if parts != ["none"]:
            for p in parts:
                _choice("exclude", p, ("none",) + EXCLUDE)
            if "none" in parts or len(set(parts)) != len(parts):
                raise RecipeError(f"recipe: exclude={given['exclude']}: expected none, bn, "
                                  "bias or bn,bias")
            kw["exclude"] = tuple(e for e in EXCLUDE if e in parts)
    if "schedule" in given:
        kw["schedule"] = _choice("schedule", given["schedule"], SCHEDULES)
    if "per" in given:
        kw["per"] = _choice("per", given["per"], PER)
    if "step_size" in given:
        kw["step_size"] = _number("step_size", given["step_size"], 1, integer=True)
    if "gamma" in given:
        kw["gamma"] = _number("gamma", given["gamma"], 0.0, 1.0, low_open=True, high_open=False)
    if "t_max" in given:
        kw["t_max"] = _number("t_max", given["t_max"], 1, integer=True)
    if "eta_min" in given:
        kw["eta_min"] = _number("eta_min", given["eta_min"], 0.0)
    recipe = Recipe(**kw)
    for key, only in _ONLY.items():
        if key not in given:
            continue
        if isinstance(only, tuple) and name not in only:
            raise RecipeError(f"recipe: {key} is a setting of {' and '.join(only)}, not of {name}")
        if isinstance(only, str) and recipe.schedule != only:
            raise RecipeError(f"recipe: {key} is a setting of schedule={only}, and this recipe's "
                              f"schedule is {recipe.schedule}")
    if "decay" in given:
        _choice("decay", given["decay"], ("coupled", "decoupled"))
        if given["decay"] != recipe.decay:
            why = {"sgd": "torch.optim.SGD adds weight decay to the gradient (coupled) and has "
                          "no decoupled form",
                   "adam": "Adam with decoupled weight decay is AdamW: write adamw",
                   "adamw": "AdamW's weight decay is decoupled; Adam with L2 in the gradient "
                            "is adam"}[name]
            raise RecipeError(f"recipe: decay={given['decay']} with {name}: {why}")
    if recipe.nesterov and (recipe.momentum <= 0 or recipe.dampening != 0):
        raise RecipeError("recipe: nesterov=1 needs momentum > 0 and dampening=0 (as "
                          f"torch.optim.SGD); found momentum={recipe.momentum:g}, "
                          f"dampening={recipe.dampening:g}")
    if recipe.schedule == "step" and "step_size" not in given:
        raise RecipeError("recipe: schedule=step needs step_size=N (the count of steps or "
                          "epochs, as per= says, between decays)")
    if "per" in given and recipe.schedule == "constant":
        raise RecipeError("recipe: per= says what a schedule counts, and this recipe has no "
                          "schedule (schedule=step or schedule=cosine)")
    return recipe


def schedule_count(recipe: Recipe, step: int, steps_per_epoch: int) -> int:
    """The scheduler's count ``k`` at optimiser step ``step`` (0-based): the step itself, or
    with per=epoch its epoch (``step // steps_per_epoch``)."""
    return step if recipe.per == "step" else step // max(1, steps_per_epoch)


def cosine_t_max(recipe: Recipe, total_steps: int, steps_per_epoch: int) -> int:
    """The cosine schedule's period: t_max, or the run's length in the unit ``per`` counts."""
    if recipe.t_max:
        return recipe.t_max
    if recipe.per == "step":
        return max(1, total_steps)
    return max(1, -(-total_steps // max(1, steps_per_epoch)))


def lr_at(recipe: Recipe, step: int, steps_per_epoch: int = 1, total_steps: int = 1) -> float:
    """The learning rate PyTorch uses at optimiser step ``step`` (0-based) of a run of
    ``total_steps`` steps with ``steps_per_epoch`` steps an epoch (closed forms of StepLR and
    CosineAnnealingLR)."""
    k = schedule_count(recipe, step, steps_per_epoch)
    if recipe.schedule == "step":
        return recipe.lr * recipe.gamma ** (k // recipe.step_size)
    if recipe.schedule == "cosine":
        t = cosine_t_max(recipe, total_steps, steps_per_epoch)
        return recipe.eta_min + (recipe.lr - recipe.eta_min) * (1 + math.cos(math.pi * k / t)) / 2
    return recipe.lr


def decayed_names(config, recipe: Recipe) -> Set[str]:
    """The canonical names of the trainable parameters that get weight decay: all of them but
    those ``exclude`` names (BatchNorm's weight and bias; every ``*.bias``). ``config``: a
    Preset or MLPPreset."""
    from densenet_spec.names import canonical_modules
    out = set()
    for module, kind, leaves in canonical_modules(config):
        for leaf in leaves:
            if leaf.startswith("running_"):
                continue
            if ("bn" in recipe.exclude and kind == "bn") or ("bias" in recipe.exclude
                                                             and leaf == "bias"):
                continue
            out.add(f"{module}.{leaf}")
    return out
