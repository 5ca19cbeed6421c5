"""MXNet Gluon: the user's gluon.Block. From the main environment (no MXNet here) the model is
built and run in the MXNet environment's worker (densenet_mxnet.worker), a handle on this
side; inside the MXNet environment, by densenet_mxnet.adapter in this process. The reference is
our Gluon DenseNet, in the same process as the user's model."""
from __future__ import annotations

import sys
from typing import Dict, Optional

import numpy as np

from densenet_parity.checking.subjects import Subject, adapter, class_is, keep_share_in_torch_words

FRAMEWORK = "mxnet"
VARIANTS = ("mxnet",)
#: what a factory returns for --recipe (the training-step check): the model with its optimiser
PAIR = "(block, trainer): a mxnet.gluon.Trainer over block.collect_params(), its schedule (if any) the optimizer's lr_scheduler"
#: its BatchNorm updates the running variance with the biased batch variance (accepted, noted)
BIASED_VARIANCE = True


class GluonSubject(Subject):
    framework = FRAMEWORK

    def bn_settings(self) -> Dict[str, dict]:
        return keep_share_in_torch_words(self.adapter.model_bn_settings(self.model), "Gluon")


class RemoteSubject(Subject):
    """A Gluon model that lives in the MXNet environment's worker (a handle here)."""

    framework = FRAMEWORK

    def __init__(self, backend, handle, owner: bool):
        super().__init__("mxnet", handle, None)
        self.backend, self.owner = backend, owner

    def tensors(self) -> dict:
        return self.backend.call("model_tensors", model=self.model)

    def load(self, arrays):
        self.model = self.backend.call("set_model_tensors", model=self.model, arrays=arrays)

    def run(self, **kw) -> dict:
        out = self.backend.call("model_run", model=self.model, **kw)
        out["logits"] = np.asarray(out["logits"])
        out.setdefault("outputs", {})
        return out

    def bn_settings(self) -> Dict[str, dict]:
        return keep_share_in_torch_words(self.backend.call("model_bn_settings", model=self.model),
                                         "Gluon")

    def sites(self) -> Dict[str, str]:
        return self.backend.call("model_sites", model=self.model)

    def optimizer(self):
        return self.backend.call("model_optimizer", model=self.model)

    def train_step(self, x, labels) -> dict:
        return self.backend.call("model_train_step", model=self.model, x=x, labels=labels)

    def close(self):
        if self.owner:
            self.backend.close()


def owns(obj) -> Optional[str]:
    return "mxnet" if class_is(obj, "mxnet.gluon", "Block") else None


def wrap(model, variant: str = "mxnet") -> Subject:
    return GluonSubject(variant, model, adapter("mxnet"))


def user(factory: str, path: Optional[str], size: int, in_channels: Optional[int],
         variant: str = "mxnet") -> Subject:
    if "mxnet" in sys.modules:  # inside the MXNet environment
        a = adapter("mxnet")
        return GluonSubject(variant, a.user_model(factory=factory, size=size, path=path,
                                                  in_channels=in_channels), a)
    from densenet_parity.backends import make_backend
    b = make_backend("mxnet")
    try:
        handle = b.call("user_model", factory=factory, path=path, size=size,
                        in_channels=in_channels)
    except Exception:
        b.close()
        raise
    return RemoteSubject(b, handle, owner=True)


def reference(config, size: int, user: Subject) -> Subject:
    if isinstance(user, RemoteSubject):
        return RemoteSubject(user.backend, user.backend.call(
            "user_model", config=config.to_dict(), size=size), owner=False)
    a = adapter("mxnet")
    return GluonSubject("mxnet", a.user_model(config=config.to_dict(), size=size), a)
