"""Flax: the user's NNX module, or linen module (with its variables, or initialised here), run by
densenet_flax.adapter in this process; the reference is our Flax DenseNet of the same variant."""
from __future__ import annotations

from typing import Dict, Optional

from densenet_parity.checking.subjects import Subject, adapter, class_is, keep_share_in_torch_words

FRAMEWORK = "flax"
VARIANTS = ("nnx", "linen")
#: what a factory returns for --recipe (the training-step check): the model with its optimiser
PAIR = "(model, tx): an NNX model or a linen module (or linen's (module, variables, tx)) with an optax.GradientTransformation, its schedule (if any) inside tx"
#: its BatchNorm updates the running variance with the biased batch variance (accepted, noted)
BIASED_VARIANCE = True


class FlaxSubject(Subject):
    framework = FRAMEWORK
    in_channels = 3  # linen's BatchNorms are read while tracing: the engine sets the preset's

    def bn_settings(self) -> Dict[str, dict]:
        return keep_share_in_torch_words(
            self.adapter.model_bn_settings(self.model, variant=self.variant,
                                           in_channels=self.in_channels,
                                           size=getattr(self, "size", 224)), "Flax")


def owns(obj) -> Optional[str]:
    obj = obj[0] if isinstance(obj, tuple) and len(obj) == 2 else obj
    if class_is(obj, "flax.nnx", "Module"):
        return "nnx"
    if class_is(obj, "flax.linen", "Module"):
        return "linen"
    return None


def wrap(model, variant: str = "nnx") -> Subject:
    return FlaxSubject(variant, model, adapter("flax"))


def user(factory: str, path: Optional[str], size: int, in_channels: Optional[int],
         variant: str = "nnx") -> Subject:
    a = adapter("flax")
    model = a.user_model(factory=factory, size=size, path=path, variant=variant,
                         in_channels=in_channels)
    return FlaxSubject("linen" if isinstance(model, tuple) else "nnx", model, a)


def reference(config, size: int, user: Subject) -> Subject:
    a = adapter("flax")
    return FlaxSubject(user.variant, a.user_model(config=config.to_dict(), size=size,
                                                  variant=user.variant), a)
