"""The parity adapter for MXNet Gluon: the same functions, with the same signatures, as
densenet_torch/adapter.py and densenet_flax/adapter.py. Everything that goes in or out is
framework-free: configs are densenet_spec.Preset dicts, shapes are canonical NCHW, arrays are
float32 numpy in canonical (PyTorch) layout. The parity suite reaches it through
``python -m densenet_mxnet.worker`` in the MXNet environment.
"""
from __future__ import annotations

import ctypes
import gc
import os
import re
import weakref

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

import densenet_spec as spec
from densenet_spec import sites
from densenet_mxnet import model as model_lib
from densenet_mxnet.model import DenseNet, DenseBlock, conv_block, transition_block
from densenet_mxnet.runtime import _context, device, from_config as _build, loaded as _loaded

BACKEND = "mxnet"
VARIANTS = ("mxnet",)


def _site_hooks():
    """Where the user's code builds a block (densenet_spec.sites): every gluon.Block's __init__."""
    return [(gluon.Block, "__init__", "self")]


def versions() -> dict:
    return {"mxnet": mx.__version__, "numpy": np.__version__}


def _memory_efficient_status():
    try:
        DenseBlock(1, 1, memory_efficient=True)
    except NotImplementedError as e:
        return str(e)
    return None


#: None: memory_efficient=True is supported; otherwise a line saying why not.
MEMORY_EFFICIENT = _memory_efficient_status()


def info(variant: str = "mxnet") -> dict:
    """Backend, device, versions and the memory-efficient mode's status, for reports."""
    return {"backend": BACKEND, "variant": variant, "device": device(), "versions": versions(),
            "memory_efficient": MEMORY_EFFICIENT}


def _numel(shape):
    return int(np.prod(shape, dtype=np.int64))


def _counts(modules, shapes):
    """Trainable parameters (grad_req != 'null') and BatchNorm running statistics of
    ``modules``; ``shapes`` maps Gluon's parameter names to the shapes the framework found."""
    params = sum(_numel(shapes[p.name]) for m in modules for p in m.collect_params().values()
                 if p.grad_req != "null")
    state = sum(_numel(shapes[p.name]) for m in modules
                for n, p in m._collect_params_with_prefix().items()
                if n.rsplit(".", 1)[-1] in ("running_mean", "running_var"))
    return int(params), int(state)


def describe(config: dict, batch: int, height: int, width: int, variant: str = "mxnet",
             abstract: bool = True) -> dict:
    """Per-stage output shape (canonical NCHW), trainable parameters and BN state, measured on
    the framework's own model: symbolic shape inference (nothing computed), or a real forward."""
    model = _build(config)
    shape = spec.input_shape(model.config, batch, height, width)
    if abstract:
        # A Symbol has no shape to check in forward_stages; check it as forward() would.
        spec.check_input(model.config, shape, layout="NCHW")
        outputs = model.forward_stages(mx.sym.var("data"))
        graph = mx.sym.Group(list(outputs.values()))
        arg_shapes, out_shapes, aux_shapes = graph.infer_shape(data=shape)
        out = dict(zip(outputs, out_shapes))
        shapes = dict(zip(graph.list_arguments(), arg_shapes))
        shapes.update(zip(graph.list_auxiliary_states(), aux_shapes))
    else:
        ctx = _context()
        model.initialize(ctx=ctx)
        outputs = model.forward_stages(mx.nd.zeros(shape, ctx=ctx))
        out = {k: v.shape for k, v in outputs.items()}
        shapes = {p.name: p.shape for p in model.collect_params().values()}
    stages = []
    for name, modules in model.stage_modules().items():
        params, state = _counts(modules, shapes)
        stages.append({"name": name, "shape": [int(d) for d in out[name]],
                       "params": params, "state": state})
    params, state = _counts([model], shapes)
    return {"backend": BACKEND, "variant": variant, "device": "symbolic" if abstract else device(),
            "stages": stages, "params": params, "state": state}


def _error(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the point is to report what the user would see
        return {"type": type(e).__name__, "message": str(e),
                "is_spec_error": isinstance(e, (spec.DenseNetInputError, spec.DenseNetConfigError))}
    return None


def input_error(config: dict, shape, variant: str = "mxnet"):
    """Build ``config`` and feed zeros of canonical ``shape``; the error the user sees, or None.
    The model is hybridized, as Gluon models are run: the check must come before the cached graph."""
    ctx = _context()
    model = _build(config)
    model.initialize(ctx=ctx)
    model.hybridize()
    return _error(lambda: model(mx.nd.zeros(tuple(shape), ctx=ctx)).wait_to_read())


def layer_error(kind: str, args: list, variant: str = "mxnet"):
    """Call one of the book's pieces with the book's arguments for Gluon; the error, or None.

    kind: 'conv_block' (num_channels), 'DenseBlock' (num_convs, num_channels),
    'transition_block' (num_channels), 'preset' (name), 'DenseNet' (options dict); the MLP family's mlp_block,
    MLPDenseBlock, mlp_transition_block (the same arguments with features for channels) and
    'MLPDenseNet' (options dict).
    Gluon infers input channels, so the book's Gluon signatures take none.
    """
    if kind == "preset":
        return _error(lambda: model_lib.build(args[0]))
    if kind in ("DenseNet", "MLPDenseNet"):
        return _error(lambda: getattr(model_lib, kind)(**args[0]))
    fn = getattr(model_lib, kind)  # conv_block, DenseBlock, transition_block and the MLP's
    return _error(lambda: fn(*args))


def book_examples(variant: str = "mxnet") -> dict:
    """The book's two examples: DenseBlock(2 convs, 10 channels) on a 4x3x8x8 input, then
    transition_block to 10 channels (input channels inferred, as in the book's Gluon code).
    Shapes reported in canonical NCHW."""
    X = mx.nd.random.uniform(shape=(4, 3, 8, 8))
    blk = DenseBlock(2, 10)
    blk.initialize()
    Y = blk(X)
    blk = transition_block(10)
    blk.initialize()
    Z = blk(Y)
    return {"dense_block": list(Y.shape), "transition": list(Z.shape)}


# ---------------------------------------------------------------- numbers (same weights)
# Every function below builds ``config``, loads the canonical ``state``, and works on the
# canonical NCHW float32 input ``x``. Loss: mean softmax cross-entropy of the logits against
# integer ``labels``. SGD: plain, no momentum, no weight decay (the book's optimiser).
# The models are hybridized (Gluon's cached graphs), as Gluon code runs them.

def _loss(model, x, labels, dtype="float32"):
    return _loss_of(model(mx.nd.array(x, ctx=_context(), dtype=dtype)), labels, dtype)


def _loss_of(outputs, labels, dtype="float32"):
    """Softmax cross-entropy against integer labels (the conv family's classes); the mean
    squared error against float targets (the MLP family's regression, (N, outputs))."""
    labels = np.asarray(labels)
    y = mx.nd.array(labels, ctx=outputs.context, dtype=dtype)
    if np.issubdtype(labels.dtype, np.integer):
        return gluon.loss.SoftmaxCrossEntropyLoss()(outputs, y).mean()
    return ((outputs - y) ** 2).mean()


def _state_in(model, dtype):
    """The canonical state at ``dtype`` (float32 is export_state; float64 keeps the precision
    of a float64 parity run)."""
    from densenet_mxnet.state import _canonical_params, export_state
    if dtype == "float32":
        return export_state(model)
    return {k: p.data().asnumpy().astype(dtype) for k, p in _canonical_params(model).items()}


def forward(config: dict, state: dict, x, train: bool = False, variant: str = "mxnet",
            memory_efficient: bool = False) -> dict:
    """Every stage's output (canonical NCHW) for eval mode or train mode (batch statistics)."""
    model = _loaded(config, state, memory_efficient)
    with autograd.train_mode() if train else autograd.predict_mode():
        out = model.forward_stages(mx.nd.array(x, ctx=_context(), dtype=np.float32))
    return {"arrays": {k: v.asnumpy() for k, v in out.items()}}


def gradients(config: dict, state: dict, x, labels, variant: str = "mxnet",
              memory_efficient: bool = False, dtype: str = "float32") -> dict:
    """Train-mode loss and its gradient for every trainable parameter (canonical names).
    ``dtype`` 'float64' computes in double precision (the parity suite's gradient check)."""
    model = _loaded(config, state, memory_efficient, dtype)
    with autograd.record():  # recording implies train mode: batch statistics, dropout
        loss = _loss(model, x, labels, dtype)
    loss.backward()
    return {"loss": float(loss.asscalar()), "arrays": _grads(model)}


def _grads(model):
    """Every trainable parameter's gradient, canonical names."""
    from densenet_mxnet.state import _canonical_params
    return {k: p.grad().asnumpy() for k, p in _canonical_params(model).items()
            if p.grad_req != "null"}


def train_step(config: dict, state: dict, x, labels, lr: float = 0.1, variant: str = "mxnet",
               memory_efficient: bool = False, dtype: str = "float32") -> dict:
    """One SGD step in train mode: the loss, the gradients it applied and the new canonical
    state (parameters and BatchNorm running statistics; Gluon updates the latter in the backward pass, with the
    biased batch variance where PyTorch uses the unbiased one)."""
    model = _loaded(config, state, memory_efficient, dtype)
    trainer = gluon.Trainer(model.collect_params(), "sgd", {"learning_rate": lr})
    with autograd.record():
        loss = _loss(model, x, labels, dtype)
    loss.backward()
    trainer.step(1)  # the loss is already the batch mean; step(batch_size) would divide again
    return {"loss": float(loss.asscalar()), "grads": _grads(model),
            "arrays": _state_in(model, dtype)}


def init_state(config: dict, seed: int = 0, variant: str = "mxnet") -> dict:
    """A freshly initialised model's canonical state (the framework's own initialisers: Xavier
    for weights as in the book's Gluon code, zeros for biases, BatchNorm ones / zeros)."""
    from densenet_mxnet.state import export_state
    mx.random.seed(seed)
    model = _build(config)
    model.initialize(mx.init.Xavier(), ctx=_context())
    return {"arrays": export_state(model)}


def roundtrip(config: dict, state: dict, variant: str = "mxnet") -> dict:
    """Load a canonical state into a fresh model and export it again."""
    from densenet_mxnet.state import export_state
    return {"arrays": export_state(_loaded(config, state))}


def load_error(config: dict, state: dict, variant: str = "mxnet"):
    """Try to load ``state``; the error the user sees (or None), and whether the model kept its
    own weights untouched (all-or-nothing loading)."""
    from densenet_mxnet.state import export_state, load_state
    model = _build(config)
    model.initialize(ctx=_context())
    before = export_state(model)
    err = _error(lambda: load_state(model, state))
    after = export_state(model)
    if err is not None:
        err["unchanged"] = all(np.array_equal(before[k], after[k]) for k in before)
    return err


def save_native(config: dict, state: dict, path: str, variant: str = "mxnet") -> dict:
    """Write ``state`` as this framework's own checkpoint file (Gluon's save_parameters, whose
    keys are the structural names: 'features.norm0.gamma', ...)."""
    _loaded(config, state).save_parameters(path)
    return {"path": path}


def load_native(config: dict, path: str, variant: str = "mxnet") -> dict:
    """Read this framework's own checkpoint file back into the canonical form."""
    from densenet_mxnet.state import export_state
    model = _build(config)
    model.load_parameters(path, ctx=_context())
    return {"arrays": export_state(model)}


def summary(config: dict, batch: int, height: int, width: int, variant: str = "mxnet") -> dict:
    """The framework-style per-layer summary text and its totals."""
    from densenet_mxnet.summary import summary as text, summary_rows
    model = _build(config)
    model.initialize(ctx=_context())
    shape = spec.input_shape(model.config, batch, height, width)
    rows = summary_rows(model, shape)
    return {"text": text(model, shape), "params": rows[0][4], "state": rows[0][5]}


# ---------------------------------------------------------------- a user's model (densenet check)
# The same functions in every adapter. A model is the framework's own object (here a Gluon
# Block, initialised); tensors are named as the model names them (its structural names,
# '0.net.1.2.weight') and laid out as Gluon lays them out (PyTorch's: the canonical layout).
# Inputs and captured outputs are canonical NCHW. From the main environment these run in the
# worker, which keeps the model and hands back a handle.

LAYOUT = "torch"


def user_model(factory: str = None, config: dict = None, size: int = 0, variant: str = "mxnet",
               path: str = None, in_channels: int = None):
    """The model to check, initialised: the user's, built by ``factory`` ('MODULE:FUNCTION',
    imported from ``path`` or the working directory), or ours for ``config`` (the reference).
    Gluon infers input channels at the first forward: ``in_channels`` if given, else 1, then 3,
    on a ``size`` x ``size`` input, each try on a model built afresh (a failed try leaves its
    inferred shapes behind). If no try runs, whether the model runs on 224 x 224 is said too."""
    ctx = _context()

    def fresh():
        if factory is None:
            model = _build(config)
        else:
            with sites.recording(_site_hooks()) as built:  # where each block is built
                model = spec.call_factory(factory, path)
            model, trainer = _with_optimizer(model, factory)
            if trainer is not None:
                _optimizers[id(model)] = {"trainer": trainer, "step": 0}
                weakref.finalize(model, _optimizers.pop, id(model), None)
            if not isinstance(model, gluon.Block):
                raise TypeError(f"{factory} returned {type(model).__name__}, not a mxnet.gluon.Block")
            sites.remember(model, {name: built.of(b) for name, b in _named_blocks(model)
                                   if built.of(b)})
        if any(p._data is None for p in model.collect_params().values()):
            model.initialize(ctx=ctx)
        return model

    def runs(model, c, s):
        with autograd.predict_mode():
            model(mx.nd.zeros((1, c, s, s) if s else (1, c), ctx=ctx)).wait_to_read()  # 0: features

    errors = []
    channels = [config.get("in_channels", config.get("in_features"))] if factory is None else ([in_channels] if in_channels
                                                                 else [1, 3])
    for i, c in enumerate(channels):
        model = fresh()
        try:
            runs(model, c, size)
            return model
        except Exception as e:  # noqa: BLE001 - try the next channel count, then report all
            errors.append(f"{c} input channel(s): {_error_line(e)}")
    msg = f"the model does not run on a {size}x{size} input: " + "; ".join(errors)
    if size and size != 224:
        try:
            runs(fresh(), channels[-1], 224)
            msg += (f"; it runs on 224x224 ({channels[-1]} channel(s)): a layer of fixed size "
                    "needs ImageNet's 224-px input")
        except Exception:  # noqa: BLE001 - not a matter of size: the errors above say it all
            pass
    pool = re.search(r"kernel size \((\d+)\) exceeds input \((\d+)", msg)
    if pool:
        k, d = pool.groups()
        msg += (f" (a fixed {k}x{k} pooling window over a {d}x{d} feature map: a head that pools "
                f"a fixed window, as the Gluon model zoo's DenseNets' AvgPool2D(pool_size=7), where "
                f"the book and torchvision pool globally, needs 224x224 input: give --size 224)")
    raise ValueError(msg)


#: the gluon.Trainer a factory returned with its block (id(block) -> {"trainer", "step"}),
#: for as long as the block lives
_optimizers: dict = {}
_PAIR = "a mxnet.gluon.Block, or (block, trainer): a mxnet.gluon.Trainer over its parameters"


def _with_optimizer(obj, factory: str):
    """A factory's result -> (block, gluon.Trainer or None). A tuple that is not (block,
    trainer), or a trainer over other parameters: TypeError naming what was expected and what
    was found."""
    if not isinstance(obj, tuple):
        return obj, None
    found = "(" + ", ".join(type(o).__name__ for o in obj) + ")"
    if len(obj) != 2 or not isinstance(obj[0], gluon.Block) or not isinstance(obj[1],
                                                                            gluon.Trainer):
        raise TypeError(f"{factory} returned {found}; expected {_PAIR}")
    own = {id(p) for p in obj[0].collect_params().values()}
    alien = sum(id(p) not in own for p in obj[1]._params)
    if alien:
        raise TypeError(f"{factory} returned {found}: the trainer holds {alien} parameter(s) "
                        "that are not the block's; expected gluon.Trainer(block.collect_params(), "
                        "...)")
    return obj[0], obj[1]


def _error_line(e) -> str:
    """The line of an exception's message that says what failed (MXNet's messages begin with
    a C++ traceback: the 'MXNetError: ...' line)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    said = [ln for ln in lines if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", ln)]
    return (said or lines or [type(e).__name__])[-1]


def _block(model, name: str):
    """The child block at a structural name ('0.net.1.2')."""
    for part in name.split(".") if name else []:
        model = model._children[part]
    return model


def model_tensors(model, variant: str = "mxnet") -> dict:
    """Every tensor of the model in the order it defines them (its structural parameter
    names), which are trainable (grad_req != 'null'), and the layout."""
    params = model._collect_params_with_prefix()
    return {"arrays": {k: p.data().asnumpy().astype(np.float32) for k, p in params.items()},
            "trainable": [k for k, p in params.items() if p.grad_req != "null"],
            "layout": LAYOUT}


def set_model_tensors(model, arrays: dict, variant: str = "mxnet"):
    """Load ``arrays`` (the model's own names and layout): every name must be the model's and
    every shape its own, or nothing is loaded. Returns the model."""
    params = model._collect_params_with_prefix()
    bad = [k for k in arrays if k not in params or params[k].shape != tuple(np.shape(arrays[k]))]
    if bad:
        raise ValueError(f"cannot load {bad[:3]} into the model (unknown name or other shape)")
    for k, v in arrays.items():
        params[k].set_data(mx.nd.array(v, ctx=_context(), dtype=params[k].dtype))
    return model


def model_run(model, x, labels=None, modules=(), train: bool = False, dtype: str = "float32",
              variant: str = "mxnet") -> dict:
    """Run the model at ``dtype`` on the canonical NCHW ``x`` in eval or train mode, imperatively
    (forward hooks fire only outside a cached graph): the logits and the output of every block
    in ``modules``; in train mode with ``labels`` also the loss, the gradient of every trainable
    tensor and the BatchNorm statistics the forward pass updated. The model is left as it was."""
    saved = model_tensors(model)["arrays"]
    if isinstance(model, gluon.HybridBlock):
        model.hybridize(active=False)
    captured, hooks = {}, []

    def hook(name):
        def record(blk, inp, out):
            captured.setdefault(name, out.asnumpy())
        return record
    for name in modules:
        hooks.append(_block(model, name).register_forward_hook(hook(name)))
    try:
        if dtype != "float32":
            model.cast(dtype)
        X = mx.nd.array(x, ctx=_context(), dtype=dtype)
        params = model._collect_params_with_prefix()
        if labels is None:
            with autograd.train_mode() if train else autograd.predict_mode():
                logits = model(X)
            out = {"logits": logits.asnumpy()}
        else:
            with autograd.record(train_mode=train):
                logits = model(X)
                loss = _loss_of(logits, labels, dtype)
            loss.backward()
            out = {"logits": logits.asnumpy(), "loss": float(loss.asscalar()),
                   "grads": {k: p.grad().asnumpy() for k, p in params.items()
                             if p.grad_req != "null"},
                   "state": {k: p.data().asnumpy() for k, p in params.items()
                             if k.endswith(("running_mean", "running_var"))}}
    finally:
        for h in hooks:
            h.detach()
        if dtype != "float32":
            model.cast("float32")
        set_model_tensors(model, saved)
    out["outputs"] = captured
    return out


def save_model(model, path: str, variant: str = "mxnet") -> dict:
    """The framework's own file of the model: ``model.save_parameters(path)``."""
    model.save_parameters(path)
    return {"path": path}


def release_memory(variant: str = "mxnet") -> int:
    """Give memory back between computations: drop what the framework caches (nothing: MXNet's CPU storage is freed with its arrays), collect
    garbage and return freed heap pages to the system (glibc's malloc_trim: after compiling or
    running a large network the allocator keeps gigabytes it no longer uses). Returns the
    process's resident memory afterwards, in bytes."""
    mx.nd.waitall()
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
                       steps: int = 1, variant: str = "mxnet") -> dict:
    """One data-parallel SGD step on ``devices`` devices on the framework's own engine
    (densenet_mxnet/parallel.py): the mean loss, the new canonical state, the BatchNorm semantics."""
    from densenet_mxnet import parallel
    return parallel.data_parallel_step(config, state, x, labels, devices=devices,
                                       sync_bn=sync_bn, lr=lr, dtype=dtype, steps=steps)


def data_parallel_error(config: dict, state: dict, x, labels, devices: int = 2,
                        sync_bn: bool = False, variant: str = "mxnet"):
    """The error a data-parallel step raises for these arguments, or None."""
    return _error(lambda: data_parallel_step(config, state, x, labels, devices=devices,
                                             sync_bn=sync_bn, variant=variant))


def model_bn_settings(model, variant: str = "mxnet") -> dict:
    """Every BatchNorm of the model (its structural name, '0.net.1.0') -> {"epsilon",
    "momentum"} as the model has them (Gluon's momentum: the share of the running statistics
    kept per step)."""
    return {name: {"epsilon": float(block._kwargs["eps"]),
                   "momentum": float(block._kwargs["momentum"])}
            for name, block in _named_blocks(model) if isinstance(block, gluon.nn.BatchNorm)}


def _named_blocks(model, prefix=""):
    """(structural name, block) for the model and every block under it ('' the model itself,
    '0.net.1.0' as model_tensors names their parameters)."""
    yield prefix, model
    for name, child in model._children.items():
        yield from _named_blocks(child, f"{prefix}.{name}" if prefix else name)


def model_optimizer(model, variant: str = "mxnet"):
    """What optimises the model, for a block user_model built from a factory that returned it
    with its gluon.Trainer: {"optimizer": the trainer's optimiser class, "schedule": its
    lr_scheduler's class or None}; None for a block alone."""
    got = _optimizers.get(id(model))
    if got is None:
        return None
    opt = got["trainer"]._optimizer
    return {"optimizer": f"gluon.Trainer ({type(opt).__name__.lower()})",
            "schedule": None if opt.lr_scheduler is None else type(opt.lr_scheduler).__name__}


def model_train_step(model, x, labels, variant: str = "mxnet") -> dict:
    """One training step of the user's own gluon.Trainer (model_optimizer) on (x, labels), in
    float64: the first call casts the block to float64 (block.cast keeps the Parameter objects
    the trainer holds); the loss (the batch mean: softmax cross-entropy against integer labels,
    the mean squared error against float targets) under autograd.record, backward, and
    trainer.step(1). Returns the loss, the learning rate and every tensor after the step (the
    model's names, in float64)."""
    from densenet_mxnet import train
    got = _optimizers[id(model)]
    if got["step"] == 0:
        model.cast("float64")
    fig, = train.run_steps(model, (got["trainer"], None), [(x, labels)], spec.Recipe(), 1,
                           got["step"])
    got["step"] += 1
    # the parameters as they are (float64): model_tensors rounds them to float32
    return {**fig, "arrays": {k: p.data().asnumpy().astype(np.float64)
                              for k, p in model._collect_params_with_prefix().items()}}


def model_sites(model, variant: str = "mxnet") -> dict:
    """The line of the user's code that built each of the model's blocks (its structural name
    -> 'FILE:LINE', densenet_spec.sites), for a model user_model built from a factory; {} for
    any other model, and no entry for a block this project's code built."""
    return sites.remembered(model)


# ---------------------------------------------------------------- training recipes
# A run of a training recipe (densenet_spec/optim.py) step by step: recipe_session loads the
# state into a model and builds the recipe with the framework's optimiser (train.py's
# build_optimizer); each recipe_step takes the next batch and returns the step's figures and
# the new canonical state. (The session stays in this worker, sent back as a handle.)

def recipe_limits(recipe: str, dtype: str = "float32", variant: str = "mxnet") -> list:
    """What this framework cannot express exactly of ``recipe`` (a recipe string), in words."""
    from densenet_mxnet import train
    return train.recipe_limits(spec.parse_recipe(recipe), dtype)


def recipe_session(config: dict, state: dict, recipe: str, steps_per_epoch: int = 1,
                   total_steps: int = 1, dtype: str = "float32", variant: str = "mxnet"):
    """A model loaded with ``state`` at ``dtype`` and ``recipe``'s optimiser for it."""
    import types
    from densenet_mxnet import train
    parsed = spec.parse_recipe(recipe)
    model = _loaded(config, state, dtype=dtype)
    return types.SimpleNamespace(model=model, recipe=parsed, dtype=dtype, step=0,
                                 steps_per_epoch=steps_per_epoch,
                                 optimizer=train.build_optimizer(model, parsed, steps_per_epoch,
                                                                 total_steps))


def recipe_step(session, x, labels, variant: str = "mxnet") -> dict:
    """The session's next step on (x, labels): loss, grad_norm, lr and the new canonical state
    (parameters and BatchNorm running statistics) at the session's dtype."""
    from densenet_mxnet import train
    fig, = train.run_steps(session.model, session.optimizer, [(x, labels)], session.recipe,
                           session.steps_per_epoch, session.step)
    session.step += 1
    return {**fig, "arrays": _state_in(session.model, session.dtype)}


def recipe_end(session, variant: str = "mxnet") -> None:
    """Let go of a session's model and optimiser (its memory back). Gluon's blocks, parameters
    and trainer refer to each other in cycles: only a collection frees them (without it the
    worker grew 25 MB a book session, 0.14 to 0.49 GB over test_recipes' thirteen)."""
    session.__dict__.clear()
    gc.collect()
