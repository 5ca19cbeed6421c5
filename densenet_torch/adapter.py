"""The parity adapter for PyTorch: the same functions, with the same signatures, as
densenet_mxnet/adapter.py and densenet_flax/adapter.py. Everything that goes in or out is
framework-free: configs are densenet_spec.Preset dicts, shapes are canonical NCHW, arrays are
float32 numpy in canonical (PyTorch) layout.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import weakref

import numpy as np
import torch

import densenet_spec as spec
from densenet_spec import sites
from densenet_torch import model as model_lib
from densenet_torch.model import DenseNet, DenseBlock, conv_block, transition_block
from densenet_torch.runtime import device, from_config as _build, loaded as _loaded

BACKEND = "torch"
VARIANTS = ("torch",)


def _site_hooks():
    """Where the user's code builds a module (densenet_spec.sites): every nn.Module's __init__."""
    return [(torch.nn.Module, "__init__", "self")]


def versions() -> dict:
    return {"torch": torch.__version__, "numpy": np.__version__}


#: None: memory_efficient=True is supported; otherwise a line saying why not.
MEMORY_EFFICIENT = None


def info(variant: str = "torch") -> dict:
    """Backend, device, versions and the memory-efficient mode's status, for reports."""
    return {"backend": BACKEND, "variant": variant, "device": device(), "versions": versions(),
            "memory_efficient": MEMORY_EFFICIENT}


def _counts(modules):
    params = sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad)
    state = sum(b.numel() for m in modules for n, b in m.named_buffers()
                if n.rsplit(".", 1)[-1] in ("running_mean", "running_var"))
    return int(params), int(state)


def describe(config: dict, batch: int, height: int, width: int, variant: str = "torch",
             abstract: bool = True) -> dict:
    """Per-stage output shape (canonical NCHW), trainable parameters and BN state, measured on
    the framework's own model: abstract evaluation on the meta device, or a real forward."""
    dev = torch.device("meta") if abstract else torch.device("cpu")
    with dev:
        model = _build(config).eval()
        x = torch.zeros(*spec.input_shape(model.config, batch, height, width))
    with torch.no_grad():
        outputs = model.forward_stages(x)
    stages = []
    for name, modules in model.stage_modules().items():
        params, state = _counts(modules)
        stages.append({"name": name, "shape": list(outputs[name].shape),
                       "params": params, "state": state})
    params, state = _counts([model])
    return {"backend": BACKEND, "variant": variant, "device": "meta" if abstract else "cpu",
            "stages": stages, "params": params, "state": state}


def _error(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the point is to report what the user would see
        return {"type": type(e).__name__, "message": str(e),
                "is_spec_error": isinstance(e, (spec.DenseNetInputError, spec.DenseNetConfigError))}
    return None


def input_error(config: dict, shape, variant: str = "torch"):
    """Build ``config`` and feed zeros of canonical ``shape``; the error the user sees, or None."""
    model = _build(config).eval()
    return _error(lambda: model(torch.zeros(*shape)))


def layer_error(kind: str, args: list, variant: str = "torch"):
    """Call one of the book's pieces with the book's arguments for PyTorch; the error, or None.

    kind: 'conv_block' (input_channels, num_channels), 'DenseBlock' (num_convs,
    input_channels, num_channels), 'transition_block' (input_channels, num_channels),
    'preset' (name), 'DenseNet' (options dict); the MLP family's mlp_block,
    MLPDenseBlock, mlp_transition_block (the same arguments with features for channels) and
    'MLPDenseNet' (options dict).
    """
    if kind == "preset":
        return _error(lambda: model_lib.build(args[0]))
    if kind in ("DenseNet", "MLPDenseNet"):
        return _error(lambda: getattr(model_lib, kind)(**args[0]))
    fn = getattr(model_lib, kind)  # conv_block, DenseBlock, transition_block and the MLP's
    return _error(lambda: fn(*args))


def book_examples(variant: str = "torch") -> dict:
    """The book's two examples: DenseBlock(2 convs, 10 channels) on a 4x3x8x8 input, then
    transition_block to 10 channels. Shapes reported in canonical NCHW."""
    X = torch.rand(4, 3, 8, 8)
    Y = DenseBlock(2, 3, 10)(X)
    Z = transition_block(23, 10)(Y)
    return {"dense_block": list(Y.shape), "transition": list(Z.shape)}


# ---------------------------------------------------------------- numbers (same weights)
# Every function below builds ``config``, loads the canonical ``state``, and works on the
# canonical NCHW float32 input ``x``. Loss: mean softmax cross-entropy of the logits against
# integer ``labels``. SGD: plain, no momentum, no weight decay (the book's optimiser).

@contextlib.contextmanager
def _full_precision():
    """Parity runs with TF32 off on NVIDIA GPUs (PyTorch allows it for cuDNN convolutions by
    default), so a GPU difference means a real difference."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def _tensor(a, dtype="float32"):
    return torch.as_tensor(np.asarray(a)).to(device=device(), dtype=getattr(torch, dtype))


def _numpy(t, dtype="float32"):
    return t.detach().to("cpu", getattr(torch, dtype)).numpy().copy()


def _loss(outputs, labels, dtype="float32"):
    """Softmax cross-entropy against integer labels (the conv family's classes); the mean
    squared error against float targets (the MLP family's regression, (N, outputs))."""
    labels = np.asarray(labels)
    if np.issubdtype(labels.dtype, np.integer):
        y = torch.as_tensor(labels).to(device=outputs.device, dtype=torch.int64)
        return torch.nn.functional.cross_entropy(outputs, y)
    y = torch.as_tensor(labels).to(device=outputs.device, dtype=outputs.dtype)
    return torch.nn.functional.mse_loss(outputs, y)


def forward(config: dict, state: dict, x, train: bool = False, variant: str = "torch",
            memory_efficient: bool = False) -> dict:
    """Every stage's output (canonical NCHW) for eval mode or train mode (batch statistics)."""
    model = _loaded(config, state, memory_efficient).train(train)
    with torch.no_grad(), _full_precision():
        out = model.forward_stages(_tensor(x))
    return {"arrays": {k: _numpy(v) for k, v in out.items()}}


def gradients(config: dict, state: dict, x, labels, variant: str = "torch",
              memory_efficient: bool = False, dtype: str = "float32") -> dict:
    """Train-mode loss and its gradient for every trainable parameter (canonical names).
    ``dtype`` 'float64' computes in double precision (the parity suite's gradient check)."""
    model = _loaded(config, state, memory_efficient, dtype).train()
    with _full_precision():
        loss = _loss(model(_tensor(x, dtype)), labels, dtype)
        loss.backward()
    return {"loss": loss.item(),
            "arrays": {k: _numpy(p.grad, dtype) for k, p in model.named_parameters()}}


def train_step(config: dict, state: dict, x, labels, lr: float = 0.1, variant: str = "torch",
               memory_efficient: bool = False, dtype: str = "float32") -> dict:
    """One SGD step in train mode: the loss, the gradients it applied and the new canonical
    state (parameters and BatchNorm running statistics), at ``dtype``."""
    model = _loaded(config, state, memory_efficient, dtype).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    opt.zero_grad()
    with _full_precision():
        loss = _loss(model(_tensor(x, dtype)), labels, dtype)
        loss.backward()
    opt.step()
    return {"loss": loss.item(),
            "grads": {k: _numpy(p.grad, dtype) for k, p in model.named_parameters()},
            "arrays": {k: _numpy(v, dtype) for k, v in model.state_dict().items()
                       if not k.endswith("num_batches_tracked")}}


def init_state(config: dict, seed: int = 0, variant: str = "torch") -> dict:
    """A freshly initialised model's canonical state (the framework's own initialisers)."""
    from densenet_torch.state import export_state
    torch.manual_seed(seed)
    return {"arrays": export_state(_build(config))}


def roundtrip(config: dict, state: dict, variant: str = "torch") -> dict:
    """Load a canonical state into a fresh model and export it again."""
    from densenet_torch.state import export_state
    return {"arrays": export_state(_loaded(config, state))}


def load_error(config: dict, state: dict, variant: str = "torch"):
    """Try to load ``state``; the error the user sees (or None), and whether the model kept its
    own weights untouched (all-or-nothing loading)."""
    from densenet_torch.state import export_state, load_state
    model = _build(config)
    before = export_state(model)
    err = _error(lambda: load_state(model, state))
    after = export_state(model)
    if err is not None:
        err["unchanged"] = all(np.array_equal(before[k], after[k]) for k in before)
    return err


def save_native(config: dict, state: dict, path: str, variant: str = "torch") -> dict:
    """Write ``state`` as this framework's own checkpoint file (a PyTorch state_dict)."""
    torch.save(_loaded(config, state).state_dict(), path)
    return {"path": path}


def load_native(config: dict, path: str, variant: str = "torch") -> dict:
    """Read this framework's own checkpoint file back into the canonical form."""
    from densenet_torch.state import export_state, load_state
    model = _build(config)
    load_state(model, {k: v.numpy() for k, v in
                       torch.load(path, map_location="cpu", weights_only=True).items()})
    return {"arrays": export_state(model)}


def summary(config: dict, batch: int, height: int, width: int, variant: str = "torch") -> dict:
    """The framework-style per-layer summary text and its totals."""
    from densenet_torch.summary import summary as text, summary_rows
    model = _build(config)
    shape = spec.input_shape(model.config, batch, height, width)
    rows = summary_rows(model, shape)
    return {"text": text(model, shape), "params": rows[0][4], "state": rows[0][5]}


# ---------------------------------------------------------------- a user's model (densenet check)
# The same functions in every adapter. A model is the framework's own object (here an
# nn.Module); tensors are named as the model names them and laid out as the framework lays
# them out (here PyTorch's: the canonical layout). Inputs and captured outputs are canonical
# NCHW. The parity engine (densenet_parity.checking) matches the names onto canonical ones.

LAYOUT = "torch"


def user_model(factory: str = None, config: dict = None, size: int = 0, variant: str = "torch",
               path: str = None):
    """The model to check: the user's, built by ``factory`` ('MODULE:FUNCTION', imported from
    ``path`` or the working directory), or ours for ``config`` (the reference)."""
    if factory is None:
        return _build(config)
    with sites.recording(_site_hooks()) as built:  # where each module is built
        model = spec.call_factory(factory, path)
    model, optimizer = _with_optimizer(model, factory)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{factory} returned {type(model).__name__}, not a torch.nn.Module")
    sites.remember(model, {name: built.of(m) for name, m in model.named_modules()
                           if built.of(m)})
    if optimizer is not None:
        _optimizers[id(model)] = {"optimizer": optimizer, "step": 0}
        weakref.finalize(model, _optimizers.pop, id(model), None)
    return model


#: the optimiser a factory returned with its model (id(model) -> {"optimizer": (optimizer,
#: scheduler or None), "step": steps run}), for as long as the model lives
_optimizers: dict = {}
_PAIR = ("a torch.nn.Module, or (module, optimizer) or (module, optimizer, scheduler): a "
         "torch.optim optimizer over module.parameters() and a torch.optim.lr_scheduler "
         "scheduler of that optimizer")


def _with_optimizer(obj, factory: str):
    """A factory's result -> (model, (optimizer, scheduler or None) or None). A tuple that is
    not (module, optimizer[, scheduler]), or an optimizer the check cannot run: TypeError
    naming what was expected and what was found."""
    if not isinstance(obj, tuple):
        return obj, None
    found = "(" + ", ".join(type(o).__name__ for o in obj) + ")"
    sched = obj[2] if len(obj) == 3 else None
    if len(obj) not in (2, 3) or not isinstance(obj[0], torch.nn.Module) or not isinstance(
            obj[1], torch.optim.Optimizer) or not (sched is None or isinstance(
                sched, torch.optim.lr_scheduler.LRScheduler)):
        raise TypeError(f"{factory} returned {found}; expected {_PAIR}")
    module, opt = obj[0], obj[1]
    if isinstance(opt, torch.optim.LBFGS):
        raise TypeError(f"{factory} returned {found}: the check cannot run torch.optim.LBFGS, "
                        "whose step() needs a closure that evaluates the loss again; expected "
                        "an optimizer whose step() needs none (SGD, Adam, AdamW, ...)")
    if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise TypeError(f"{factory} returned {found}: the check cannot run ReduceLROnPlateau, "
                        "whose step() needs a validation metric; expected a scheduler stepped "
                        "without arguments (StepLR, CosineAnnealingLR, LambdaLR, ...)")
    own = {id(p) for p in module.parameters()}
    alien = sum(id(p) not in own for g in opt.param_groups for p in g["params"])
    if alien:
        raise TypeError(f"{factory} returned {found}: the optimizer holds {alien} tensor(s) "
                        "that are not the module's parameters; expected an optimizer over "
                        "module.parameters()")
    if sched is not None and sched.optimizer is not opt:
        raise TypeError(f"{factory} returned {found}: the scheduler steps another optimizer "
                        "than the one returned; expected the scheduler of that optimizer")
    return module, (opt, sched)


def model_tensors(model, variant: str = "torch") -> dict:
    """Every tensor of the model in the order it defines them: its state_dict (parameters and
    buffers; num_batches_tracked left out), which are trainable, and the layout."""
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    arrays = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()
              if not k.endswith("num_batches_tracked")}
    return {"arrays": arrays, "trainable": trainable, "layout": LAYOUT}


def set_model_tensors(model, arrays: dict, variant: str = "torch"):
    """Load ``arrays`` (the model's own names and layout) into the model: every name must be
    the model's and every shape its own, or nothing is loaded. Returns the model."""
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    bad = [k for k in arrays if k not in own or tuple(own[k].shape) != tuple(np.shape(arrays[k]))]
    if bad:
        raise ValueError(f"cannot load {bad[:3]} into the model (unknown name or other shape)")
    with torch.no_grad():
        for k, v in arrays.items():
            own[k].copy_(torch.as_tensor(np.array(v, dtype=np.float32)))
    return model


def model_run(model, x, labels=None, modules=(), train: bool = False, dtype: str = "float32",
              variant: str = "torch") -> dict:
    """Run the model (a copy, at ``dtype``) on the canonical NCHW ``x`` in eval or train mode:
    the logits and the output of every module in ``modules`` (forward hooks); in train mode with
    ``labels`` also the cross-entropy loss, the gradient of every trainable tensor and the
    BatchNorm statistics the forward pass updated (the model's names)."""
    import copy
    m = copy.deepcopy(model).to(dtype=getattr(torch, dtype)).train(train)
    captured, hooks = {}, []

    def hook(name):
        def record(mod, inp, out):  # returns None: the output goes on unchanged
            captured.setdefault(name, out.detach().clone())  # an in-place ReLU may follow
        return record
    for name in modules:
        hooks.append(m.get_submodule(name).register_forward_hook(hook(name)))
    try:
        with _full_precision(), torch.set_grad_enabled(labels is not None):
            logits = m(torch.as_tensor(np.asarray(x)).to(getattr(torch, dtype)))
            out = {"logits": _numpy(logits, dtype)}
            if labels is not None:
                loss = _loss(logits, labels, dtype)
                loss.backward()
                out["loss"] = float(loss.detach())
                out["grads"] = {k: _numpy(p.grad, dtype) for k, p in m.named_parameters()
                                if p.grad is not None}
                out["state"] = {k: _numpy(v, dtype) for k, v in m.state_dict().items()
                                if k.endswith(("running_mean", "running_var"))}
    finally:
        for h in hooks:
            h.remove()
    out["outputs"] = {k: _numpy(v, dtype) for k, v in captured.items()}
    return out


def save_model(model, path: str, variant: str = "torch") -> dict:
    """The framework's own file of the model: ``torch.save(model.state_dict(), path)``."""
    torch.save(model.state_dict(), path)
    return {"path": path}


def release_memory(variant: str = "torch") -> int:
    """Give memory back between computations: drop what the framework caches (nothing: PyTorch's CPU allocator keeps no cache), collect
    garbage and return freed heap pages to the system (glibc's malloc_trim: after compiling or
    running a large network the allocator keeps gigabytes it no longer uses). Returns the
    process's resident memory afterwards, in bytes."""
    gc.collect()
    return _trim_heap()


def _trim_heap() -> int:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def data_parallel_step(config: dict, state: dict, x, labels, devices: int = 2,
                       sync_bn: bool = False, lr: float = 0.1, dtype: str = "float64",
                       steps: int = 1, variant: str = "torch") -> dict:
    """One data-parallel SGD step on ``devices`` devices on the framework's own engine
    (densenet_torch/parallel.py): the mean loss, the new canonical state, the BatchNorm semantics."""
    from densenet_torch import parallel
    return parallel.data_parallel_step(config, state, x, labels, devices=devices,
                                       sync_bn=sync_bn, lr=lr, dtype=dtype, steps=steps)


def data_parallel_error(config: dict, state: dict, x, labels, devices: int = 2,
                        sync_bn: bool = False, variant: str = "torch"):
    """The error a data-parallel step raises for these arguments, or None."""
    return _error(lambda: data_parallel_step(config, state, x, labels, devices=devices,
                                             sync_bn=sync_bn, variant=variant))


def model_bn_settings(model, variant: str = "torch") -> dict:
    """Every BatchNorm of the model (its module name) -> {"epsilon", "momentum"} as the model
    has them (PyTorch's momentum: the share of the batch statistic taken per step; None: a
    cumulative average)."""
    return {name: {"epsilon": float(m.eps), "momentum": None if m.momentum is None
                   else float(m.momentum)}
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}


def model_optimizer(model, variant: str = "torch"):
    """What optimises the model, for a model user_model built from a factory that returned it
    with its optimiser: {"optimizer": its class, "schedule": the scheduler's class or None};
    None for a model alone."""
    got = _optimizers.get(id(model))
    if got is None:
        return None
    opt, sched = got["optimizer"]
    return {"optimizer": f"torch.optim.{type(opt).__name__}",
            "schedule": None if sched is None else type(sched).__name__}


def model_train_step(model, x, labels, variant: str = "torch") -> dict:
    """One training step of the user's own optimiser (model_optimizer) on (x, labels), in
    float64: the first call turns the model into float64 in place (module.double() keeps the
    Parameter objects the optimiser holds), then zero_grad, the loss (cross-entropy against
    integer labels, the mean squared error against float targets), backward, the optimiser's
    step and the scheduler's, as a training loop does. Returns the loss, the learning rate the
    step used and every tensor of the model after it (its names)."""
    from densenet_torch import train
    got = _optimizers[id(model)]
    if got["step"] == 0:
        model.double()
    with _full_precision():
        fig, = train.run_steps(model, got["optimizer"], [(x, labels)], spec.Recipe(), 1,
                               got["step"])
    got["step"] += 1
    return {**fig, "arrays": {k: _numpy(v, "float64") for k, v in model.state_dict().items()
                              if not k.endswith("num_batches_tracked")}}


def model_sites(model, variant: str = "torch") -> dict:
    """The line of the user's code that built each of the model's modules (its module name ->
    'FILE:LINE', densenet_spec.sites), for a model user_model built from a factory; {} for any
    other model, and no entry for a module this project's code built."""
    return sites.remembered(model)


# ---------------------------------------------------------------- training recipes
# A run of a training recipe (densenet_spec/optim.py) step by step: recipe_session loads the
# state into a model and builds the recipe with the framework's optimiser (train.py's
# build_optimizer); each recipe_step takes the next batch and returns the step's figures and
# the new canonical state. (MXNet's session stays in its worker, sent back as a handle.)

def recipe_limits(recipe: str, dtype: str = "float32", variant: str = "torch") -> list:
    """What this framework cannot express exactly of ``recipe`` (a recipe string), in words."""
    from densenet_torch import train
    return train.recipe_limits(spec.parse_recipe(recipe), dtype)


def recipe_session(config: dict, state: dict, recipe: str, steps_per_epoch: int = 1,
                   total_steps: int = 1, dtype: str = "float32", variant: str = "torch"):
    """A model loaded with ``state`` at ``dtype`` and ``recipe``'s optimiser for it."""
    import types
    from densenet_torch import train
    parsed = spec.parse_recipe(recipe)
    model = _loaded(config, state, dtype=dtype).train()
    return types.SimpleNamespace(model=model, recipe=parsed, dtype=dtype, step=0,
                                 steps_per_epoch=steps_per_epoch,
                                 optimizer=train.build_optimizer(model, parsed, steps_per_epoch,
                                                                 total_steps))


def recipe_step(session, x, labels, variant: str = "torch") -> dict:
    """The session's next step on (x, labels): loss, grad_norm, lr and the new canonical state
    (parameters and BatchNorm running statistics) at the session's dtype."""
    from densenet_torch import train
    with _full_precision():
        fig, = train.run_steps(session.model, session.optimizer, [(x, labels)], session.recipe,
                               session.steps_per_epoch, session.step)
    session.step += 1
    return {**fig, "arrays": {k: _numpy(v, session.dtype)
                              for k, v in session.model.state_dict().items()
                              if not k.endswith("num_batches_tracked")}}


def recipe_end(session, variant: str = "torch") -> None:
    """Let go of a session's model and optimiser (its memory back)."""
    session.__dict__.clear()
