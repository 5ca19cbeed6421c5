"""The subjects: a model in one framework, behind the small interface the check needs, and the
registry of the frameworks (one module ``subject_<framework>`` each; see the package's
docstring for what such a module provides)."""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Dict, Tuple

import numpy as np

#: The frameworks ``densenet check`` knows, each a module densenet_parity.checking.subject_<name>.
FRAMEWORKS = ("torch", "mxnet", "flax", "keras")


class CheckError(ValueError):
    """The check cannot run as asked (a bad option, a model of no known framework, a user's
    module that does not import, a factory that returns no model): a usage error."""


def subject_module(framework: str) -> ModuleType:
    """The subject module of ``framework`` (imports no framework by itself)."""
    if framework not in FRAMEWORKS:
        raise CheckError(f"--framework must be one of {', '.join(FRAMEWORKS)}, got {framework!r}")
    return importlib.import_module(f"densenet_parity.checking.subject_{framework}")


def framework_of(model) -> Tuple[str, str]:
    """(framework, variant) of a model object, from its class (no framework is imported)."""
    for name in FRAMEWORKS:
        variant = subject_module(name).owns(model)
        if variant:
            return name, variant
    obj = model[0] if isinstance(model, tuple) and len(model) == 2 else model
    raise CheckError(f"{type(obj).__name__} is not a model of a framework this project checks: "
                     "expected a torch.nn.Module, a mxnet.gluon.Block, a flax.nnx.Module or a "
                     "flax.linen.Module (alone or with its variables), or a keras.Model")


def class_is(obj, module_prefix: str, class_name: str) -> bool:
    """Whether ``obj``'s class derives from ``module_prefix``...``class_name`` (by the names in
    its MRO: nothing is imported)."""
    return any((cls.__module__ or "").startswith(module_prefix) and cls.__name__ == class_name
               for cls in type(obj).__mro__)


class Subject:
    """A model and the mirror's adapter that runs it, in this process (torch, Flax). The
    interface every subject has:

    tensors() -> {"arrays": name -> array (the model's names and layout), "trainable": [names],
                  "layout": "torch" (OIHW, [out, in]) or "flax" (HWIO, [in, out]),
                  "ordered": whether the arrays are in definition order}
    load(arrays)              the model's own names and layout; all or nothing
    run(x, labels=None, modules=(), train=False, dtype="float32") -> {"logits", "outputs":
        module -> NCHW output; with labels: "loss", "grads", "state" (BatchNorm statistics)}
    bn_settings() -> the model's module -> {"epsilon", "momentum" (PyTorch's words: the share
        of the batch statistic taken per step; None: a cumulative average), "as_written"}
    sites() -> the model's module -> 'FILE:LINE' of the user's code that built it (recorded
        while the factory ran, densenet_spec.sites; {} for a model given as an object)
    optimizer() -> None (a model alone), or what the factory returned to optimise it:
        {"optimizer": its class, "schedule": its schedule's, or None}
    train_step(x, labels) -> one step of that optimiser in float64 (the first turns the model
        into float64): {"loss", "lr", "arrays": every tensor after the step, the model's names}
    notes                     what the check must say about running this model (a list)
    close()
    """

    framework = ""

    def __init__(self, variant: str, model, adapter):
        self.variant, self.model, self.adapter = variant, model, adapter
        self.notes = []

    def tensors(self) -> dict:
        return self.adapter.model_tensors(self.model, variant=self.variant)

    def load(self, arrays: Dict[str, np.ndarray]) -> None:
        self.model = self.adapter.set_model_tensors(self.model, arrays, variant=self.variant)

    def run(self, **kw) -> dict:
        return self.adapter.model_run(self.model, variant=self.variant, **kw)

    def bn_settings(self) -> Dict[str, dict]:
        return {}

    def sites(self) -> Dict[str, str]:
        return self.adapter.model_sites(self.model, variant=self.variant)

    def optimizer(self):
        return self.adapter.model_optimizer(self.model, variant=self.variant)

    def train_step(self, x, labels) -> dict:
        return self.adapter.model_train_step(self.model, x, labels, variant=self.variant)

    def close(self):
        pass


def adapter(framework: str):
    return importlib.import_module(f"densenet_{framework}.adapter")


def keep_share_in_torch_words(settings: Dict[str, dict], framework_words: str) -> Dict[str, dict]:
    """Raw settings whose momentum is the share of the running statistics *kept* (Gluon, Flax,
    Keras) -> PyTorch's words (the share of the batch statistic taken: 1 - momentum)."""
    out = {}
    for name, s in settings.items():
        m = s.get("momentum")
        out[name] = {"epsilon": float(s["epsilon"]),
                     "momentum": None if m is None else round(1.0 - float(m), 12),
                     "as_written": f"epsilon={s['epsilon']:g}, momentum={m:g} ({framework_words}: "
                                   f"keeps {m:g} of the running statistics)"}
    return out


