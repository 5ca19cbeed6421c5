"""PyTorch: the user's torch.nn.Module, run by densenet_torch.adapter in this process; the
reference is our PyTorch DenseNet (also the reference of frameworks without a mirror, and the
one the check reruns with a model's own BatchNorm settings)."""
from __future__ import annotations

from typing import Dict, Optional

from densenet_parity.checking.subjects import Subject, adapter, class_is

FRAMEWORK = "torch"
VARIANTS = ("torch",)
#: what a factory returns for --recipe (the training-step check): the model with its optimiser
PAIR = '(module, optimizer) or (module, optimizer, scheduler): a torch.optim optimizer over module.parameters() and, if the recipe has a schedule, its torch.optim.lr_scheduler scheduler'


class TorchSubject(Subject):
    framework = FRAMEWORK

    def bn_settings(self) -> Dict[str, dict]:
        return settings_in_torch_words(self.adapter.model_bn_settings(self.model))


def settings_in_torch_words(raw: Dict[str, dict]) -> Dict[str, dict]:
    out = {}
    for name, s in raw.items():
        m = s["momentum"]
        written = f"eps={s['epsilon']:g}, momentum=" + (
            "None (a cumulative average of every batch's statistics)" if m is None else f"{m:g}")
        out[name] = {"epsilon": float(s["epsilon"]), "momentum": None if m is None else float(m),
                     "as_written": written}
    return out


def owns(obj) -> Optional[str]:
    return "torch" if class_is(obj, "torch.nn", "Module") else None


def wrap(model, variant: str = "torch") -> Subject:
    return TorchSubject(variant, model, adapter("torch"))


def user(factory: str, path: Optional[str], size: int, in_channels: Optional[int],
         variant: str = "torch") -> Subject:
    a = adapter("torch")
    return TorchSubject(variant, a.user_model(factory=factory, path=path, variant=variant), a)


def reference(config, size: int, user: Subject, settings: Optional[Dict[str, dict]] = None
              ) -> Subject:
    """Our PyTorch DenseNet for ``config``; with ``settings`` (our module name -> epsilon and
    momentum in PyTorch's words), each BatchNorm set to them."""
    a = adapter("torch")
    s = TorchSubject("torch", a.user_model(config=config.to_dict(), size=size), a)
    if settings:
        for name, v in settings.items():
            m = s.model.get_submodule(name)
            m.eps, m.momentum = v["epsilon"], v["momentum"]
    return s
