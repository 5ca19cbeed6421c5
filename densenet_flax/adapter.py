"""The parity adapter for Flax: the same functions, with the same signatures, as
densenet_torch/adapter.py and densenet_mxnet/adapter.py. Everything that goes in or out is
framework-free: configs are densenet_spec.Preset dicts, shapes are canonical NCHW, arrays are
float32 numpy in canonical (PyTorch) layout. Flax itself runs NHWC; the transposes of inputs
and outputs are here, the conversion of weights is in densenet_flax/state.py.

``variant`` selects the API: 'nnx' (densenet_flax.model, the default) or 'linen'
(densenet_flax.linen, the book's JAX version).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import os
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import densenet_spec as spec
from densenet_spec import sites
from densenet_flax import linen, model as nnx_model, runtime as _runtime
from densenet_flax.runtime import (_DROPOUT, abstract as _abstract, loss as _loss,
                                   device, from_config as _build, jit_in_pieces as _jit_in_pieces,
                                   linen_loss as _linen_loss,
                                   loaded as _loaded, nhwc as _nhwc, numerics as _numerics,
                                   sgd as _sgd, targets as _targets)
from densenet_flax.state import _device_array, export_state, load_state, to_canonical

BACKEND = "flax"
VARIANTS = ("nnx", "linen")
#: Memory-efficient mode (recomputing concat + first BN-ReLU-conv in the backward pass) is
#: supported in both variants: None means "no reason why not".
MEMORY_EFFICIENT = None


def _module(variant):
    if variant not in VARIANTS:
        raise ValueError(f"unknown Flax variant {variant!r}; variants: {', '.join(VARIANTS)}")
    return nnx_model if variant == "nnx" else linen


def _site_hooks():
    """Where the user's code builds a module (densenet_spec.sites): an NNX module when its
    class is called (NNX modules need not call a base __init__), a linen module in its
    __post_init__ (at the factory's call, or in setup / @nn.compact as it runs), a linen clone
    keeping its original's site."""
    from flax import linen as nn
    return [(type(nnx.Module), "__call__", "returns"), (nn.Module, "__post_init__", "self"),
            (nn.Module, "clone", "copies")]


def versions() -> dict:
    import flax
    import jaxlib
    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
            "optax": optax.__version__, "numpy": np.__version__}


def info(variant: str = "nnx") -> dict:
    _module(variant)
    return {"backend": BACKEND, "variant": variant, "device": device(), "versions": versions(),
            "memory_efficient": MEMORY_EFFICIENT}


def _nhwc_shape(shape):
    """Canonical NCHW shape -> Flax's NHWC (other ranks are passed as they are)."""
    shape = tuple(shape)
    return (shape[0], shape[2], shape[3], shape[1]) if len(shape) == 4 else shape


def _nchw(y) -> np.ndarray:
    y = np.asarray(y, dtype=np.float32)
    return np.ascontiguousarray(y.transpose(0, 3, 1, 2) if y.ndim == 4 else y)


def _nchw_shape(shape) -> list:
    shape = [int(s) for s in shape]
    return [shape[0], shape[3], shape[1], shape[2]] if len(shape) == 4 else shape


def _size(leaf) -> int:
    return int(np.prod(leaf.shape))


def _counts(modules):
    """NNX: trainable parameters (nnx.Param) and BatchNorm state (nnx.BatchStat) of modules
    (the functions among them, ReLU and pooling, hold none)."""
    params = state = 0
    for m in modules:
        if isinstance(m, nnx.Module):  # one walk of the module for both kinds
            p, s = nnx.state(m, nnx.Param, nnx.BatchStat)
            params += sum(_size(a) for a in jax.tree.leaves(p))
            state += sum(_size(a) for a in jax.tree.leaves(s))
    return int(params), int(state)


def _tree_counts(variables, paths):
    """linen: parameters ('params') and BatchNorm state ('batch_stats') under module paths."""
    def total(collection, path):
        tree = variables.get(collection, {})
        for key in path:
            tree = tree.get(key, {})
        return sum(_size(a) for a in jax.tree.leaves(tree))
    return (int(sum(total("params", p) for p in paths)),
            int(sum(total("batch_stats", p) for p in paths)))


def describe(config: dict, batch: int, height: int, width: int, variant: str = "nnx",
             abstract: bool = True) -> dict:
    """Per-stage output shape (canonical NCHW), trainable parameters and BN state, measured on
    the framework's own model: abstract evaluation (nnx.eval_shape / jax.eval_shape: shapes
    only, no parameter memory, no compute), or a real forward (eval mode)."""
    x = jax.ShapeDtypeStruct(_nhwc_shape(spec.input_shape(spec.config_from_dict(config), batch,
                                                          height, width)), jnp.float32)
    if not abstract:
        x = jnp.zeros(x.shape, x.dtype)
    stages = []
    if _module(variant) is nnx_model:
        if abstract:
            model = _abstract(config)
        else:
            model = _build(config)
        model.eval()
        run = (lambda m, x: m.forward_stages(x))
        # the real forward compiled (nnx.jit): op by op, JAX compiles every primitive for
        # every new shape (12 s for the book, against 1 s compiled)
        outputs = nnx.eval_shape(run, model, x) if abstract else nnx.jit(run)(model, x)
        for name, modules in model.stage_modules().items():
            params, state = _counts(modules)
            stages.append({"name": name, "shape": _nchw_shape(outputs[name].shape),
                           "params": params, "state": state})
        params, state = _counts([model])
    else:
        model = _build(config, variant=variant)
        # one trace: initialising through forward_stages creates every variable (every stage's
        # modules and the classifier run) and gives every stage's output on the way
        init = functools.partial(model.init_with_output, train=False, method="forward_stages")
        key = jax.random.key(0)
        outputs, variables = jax.eval_shape(init, key, x) if abstract else jax.jit(init)(key, x)
        paths = model.stage_paths()
        for name, stage_paths in paths.items():
            params, state = _tree_counts(variables, stage_paths)
            stages.append({"name": name, "shape": _nchw_shape(outputs[name].shape),
                           "params": params, "state": state})
        params, state = _tree_counts(variables, [()])
    return {"backend": BACKEND, "variant": variant, "device": "abstract" if abstract else device(),
            "stages": stages, "params": params, "state": state}


def _error(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the point is to report what the user would see
        return {"type": type(e).__name__, "message": str(e),
                "is_spec_error": isinstance(e, (spec.DenseNetInputError, spec.DenseNetConfigError))}
    return None


def input_error(config: dict, shape, variant: str = "nnx"):
    """Build ``config`` and feed an input of canonical ``shape`` (as NHWC when 4-D); the error
    the user sees, or None. NNX: a call in eval mode; linen: ``model.init`` (its first forward).
    Evaluated abstractly (shapes only, nothing computed): the model checks its input before it
    computes anything, and an input it takes is traced through every layer."""
    x = jax.ShapeDtypeStruct(_nhwc_shape(shape), jnp.float32)
    if variant == "nnx":
        model = _abstract(config)
        model.eval()
        return _error(lambda: nnx.eval_shape(lambda m, x: m(x), model, x))
    model = _build(config, variant=variant)
    return _error(lambda: jax.eval_shape(
        lambda k, x: model.init(k, x, train=False), jax.random.key(0), x))


def layer_error(kind: str, args: list, variant: str = "nnx"):
    """Call one of the book's pieces with the book's arguments for this variant; the error, or
    None.

    kind: 'conv_block', 'DenseBlock', 'transition_block', 'preset' (name), 'DenseNet' (options
    dict). NNX takes input channels as PyTorch does: conv_block (input_channels, num_channels),
    DenseBlock (num_convs, input_channels, num_channels), transition_block (input_channels,
    num_channels); linen infers them, as the book's JAX code: conv_block (num_channels),
    DenseBlock (num_convs, num_channels), transition_block (num_channels).
    """
    mod = _module(variant)
    if kind == "preset":
        return _error(lambda: mod.build(args[0]))
    if kind in ("DenseNet", "MLPDenseNet"):
        return _error(lambda: getattr(mod, kind)(**args[0]))
    fn = getattr(mod, kind)  # conv_block, DenseBlock, transition_block and the MLP's
    if variant == "nnx":
        return _error(lambda: fn(*args, rngs=nnx.Rngs(0)))
    return _error(lambda: fn(*args))


def book_examples(variant: str = "nnx") -> dict:
    """The book's two examples: DenseBlock(2 convs, 10 channels) on a 4x8x8x3 input (NHWC),
    then transition_block to 10 channels. Shapes reported in canonical NCHW."""
    X = jax.random.uniform(jax.random.key(0), (4, 8, 8, 3))
    if _module(variant) is nnx_model:
        Y = nnx_model.DenseBlock(2, 3, 10, rngs=nnx.Rngs(0))(X)
        Z = nnx_model.transition_block(23, 10, rngs=nnx.Rngs(0))(Y)
    else:  # the book: blk.init_with_output(key, X)[0]
        Y = linen.DenseBlock(2, 10).init_with_output(jax.random.key(0), X)[0]
        Z = linen.transition_block(10).init_with_output(jax.random.key(0), Y)[0]
    return {"dense_block": _nchw_shape(Y.shape), "transition": _nchw_shape(Z.shape)}


# ---------------------------------------------------------------- numbers (same weights)
# Every function below builds ``config``, loads the canonical ``state``, and works on the
# canonical NCHW float32 input ``x`` (transposed to NHWC here). Loss: mean softmax
# cross-entropy of the logits against integer ``labels``. SGD: plain, no momentum, no weight
# decay (the book's optimiser). Matmuls and convolutions run at full precision: on GPUs JAX's
# default precision may use TF32 (or bf16 passes), which is not what a parity claim at 1e-5 is
# about; on the CPU 'highest' is what JAX does anyway. ``dtype`` 'float64' (gradients and
# train_step, the parity suite's gradient check) computes in double precision: JAX's x64 mode
# for the call, the loaded weights cast to float64, float64 results.

# The computations are compiled, as Flax code runs them: op-by-op ("eager") JAX compiles every
# primitive for every new shape, which for a DenseNet (a new channel count at every layer) is
# many times slower than one compilation of the network.
#
# The float64 step and the stages' forward pass are traced once and compiled in pieces
# (runtime.jit_in_pieces): the equations JAX traced, in their order, as consecutive programs.
# XLA's compile time on the CPU grows much faster than the program: DenseNet-264's float64 step
# took 43 s as a forward program (jax.vjp) and a backward one, 8.4 + 21.5 s of it compiling, and
# takes about 20 s as pieces (5 s of it compiling, on two threads). The gradients are
# jax.value_and_grad's of the traced forward pass (_train_program), the same autodiff of the
# same equations; the SGD step is optax.sgd, compiled once over the whole tree of parameters.
#
# NNX and linen trace the same programs, equation for equation: ``model`` below is NNX's
# GraphDef (its mode set before the split) or the linen module, and ``params`` and ``stats``
# are plain nested dicts with the same paths in both (NNX's as ``nnx.to_pure_dict``). The second
# variant then runs what was compiled for the first: the train step by its forward pass's text
# (_STEPS), the stages' forward by the program's text (jit_in_pieces' reuse);
# parity_tests/test_numeric.py checks that the two forward passes are the same and that linen
# runs NNX's step.

def _stages_fn(model, train):
    """Every stage's output, as a function of (params, stats, x)."""
    def stages(params, stats, x):
        if isinstance(model, nnx.GraphDef):
            return nnx.merge(model, params, stats).forward_stages(x)
        out = model.apply({"params": params, "batch_stats": stats}, x, train=train,
                          method="forward_stages", mutable=["batch_stats"] if train else False,
                          rngs=_DROPOUT)
        return out[0] if train else out
    return stages


def _forward_fn(model):
    """Train mode's forward pass, as a function of (params, stats, x, labels): (loss, updated
    BatchNorm statistics)."""
    if isinstance(model, nnx.GraphDef):
        def forward(params, stats, x, labels):
            # the statistics become Variables in this trace: NNX lets a Variable change only
            # in the trace that made it
            m = nnx.merge(model, params, stats)
            return _loss(m(x), labels), nnx.to_pure_dict(nnx.state(m, nnx.BatchStat))
        return forward
    return lambda params, stats, x, labels: _linen_loss(model, stats, x, labels)(params)


#: Compiled train steps by the text of the forward pass they differentiate (the newest few).
_STEPS: dict = {}
_KEEP_STEPS = 2


def _train_program(model, *args):
    """Train mode of ``model`` on ``args`` (params, stats, x, labels) as a compiled program:
    (loss, gradients, updated BatchNorm statistics). JAX differentiates the forward pass as
    traced (its program, which it would differentiate equation by equation anyway), so a
    forward pass of the same text reuses the step compiled for it: the second variant's
    (NNX, then linen) costs a forward trace (DenseNet-264's: ~1 s), not the autodiff's (~7 s)
    and its lowering (~4 s). The forward's constants are arguments of the step, not part of it."""
    from jax.extend import core as jcore
    closed, out_shape = jax.make_jaxpr(_forward_fn(model), return_shape=True)(*args)
    j, out_tree = closed.jaxpr, jax.tree.structure(out_shape)
    key = (str(j), jax.tree.structure(args), out_tree)
    consts = list(closed.consts)
    step = _STEPS.pop(key, None)
    if step is None:
        forward = jcore.jaxpr_as_fun(jcore.ClosedJaxpr(
            jcore.Jaxpr([], [*j.constvars, *j.invars], j.outvars, j.eqns, j.effects,
                        j.debug_info), []))

        def train(consts, params, stats, x, labels):
            def loss_fn(p):
                flat = forward(*consts, *jax.tree.leaves((p, stats, x, labels)))
                return jax.tree.unflatten(out_tree, flat)
            (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            return loss, grads, new_stats
        step = _jit_in_pieces(train, consts, *args)
    _STEPS[key] = step  # the newest last
    while len(_STEPS) > _KEEP_STEPS:
        _STEPS.pop(next(iter(_STEPS)))
    return lambda *a: step(consts, *a)


#: Compiled programs by (what, model, train mode, the arguments' structure, shapes and dtypes):
#: the last few, as jax.jit keeps its own (a preset's gradients and train step share one).
_PROGRAMS: dict = {}
_KEEP_PROGRAMS = 2


def _run(what, model, train, *args):
    """``what`` ('stages' or 'train') of ``model`` on ``args``, compiled in pieces once for
    their structure, shapes and dtypes."""
    build = (_in_pieces(lambda: _stages_fn(model, train)) if what == "stages"
             else functools.partial(_train_program, model))
    return _compiled((what, model, train), build, *args)


def _in_pieces(make):
    """A builder for _compiled: the function ``make()`` returns, compiled in pieces on the
    arguments (jit_in_pieces, its pieces kept by the program's text)."""
    return lambda *args: _jit_in_pieces(make(), *args, reuse=True)


def _compiled(key, build, *args):
    """The program ``build(*args)`` compiles, for ``key`` (what it computes, with its static
    arguments), run on ``args``: built once for their structure, shapes and dtypes (the newest
    few kept)."""
    leaves, tree = jax.tree.flatten(args)
    sig = tuple((np.shape(a), a.dtype if hasattr(a, "dtype") else np.result_type(a))
                for a in leaves)
    key = (key, tree, sig)
    program = _PROGRAMS.pop(key, None)
    if program is None:
        program = build(*args)
    _PROGRAMS[key] = program  # the newest last
    while len(_PROGRAMS) > _KEEP_PROGRAMS:
        _PROGRAMS.pop(next(iter(_PROGRAMS)))
    return program(*args)


def _step(config, state, x, labels, variant, memory_efficient, dtype):
    """Train mode at ``dtype``: (model, loss, gradients, parameters, updated BatchNorm
    statistics); plain nested dicts in both variants (NNX's as nnx.to_pure_dict)."""
    x, labels = _nhwc(x, dtype), _targets(labels, dtype)
    if _module(variant) is nnx_model:
        model = _loaded(config, state, memory_efficient, dtype=dtype)
        model.train()
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
        loss, grads, stats = _run("train", graphdef, True, params, rest, x, labels)
    else:
        model, variables = _loaded(config, state, memory_efficient, variant, dtype)
        params = variables["params"]
        loss, grads, stats = _run("train", model, True, params, variables["batch_stats"], x,
                                  labels)
    return model, loss, grads, params, stats


def forward(config: dict, state: dict, x, train: bool = False, variant: str = "nnx",
            memory_efficient: bool = False) -> dict:
    """Every stage's output (canonical NCHW) for eval mode or train mode (batch statistics)."""
    with _numerics():
        x = _nhwc(x)
        if _module(variant) is nnx_model:
            model = _loaded(config, state, memory_efficient)
            model.train() if train else model.eval()
            graphdef, params, rest = nnx.split(model, nnx.Param, ...)
            out = _run("stages", graphdef, train, nnx.to_pure_dict(params),
                       nnx.to_pure_dict(rest), x)
        else:
            model, variables = _loaded(config, state, memory_efficient, variant)
            out = _run("stages", model, train, variables["params"], variables["batch_stats"], x)
        return {"arrays": {k: _nchw(v) for k, v in out.items()}}


def gradients(config: dict, state: dict, x, labels, variant: str = "nnx",
              memory_efficient: bool = False, dtype: str = "float32") -> dict:
    """Train-mode loss and its gradient for every trainable parameter (canonical names), at
    ``dtype``."""
    with _numerics(dtype):
        _, loss, grads, _, _ = _step(config, state, x, labels, variant, memory_efficient, dtype)
        return {"loss": float(loss), "arrays": to_canonical(grads, dtype=dtype)}


def train_step(config: dict, state: dict, x, labels, lr: float = 0.1, variant: str = "nnx",
               memory_efficient: bool = False, dtype: str = "float32") -> dict:
    """One SGD step (optax.sgd) in train mode: the loss, the gradients it applied and the new
    canonical state (parameters and BatchNorm running statistics), at ``dtype``."""
    with _numerics(dtype):
        model, loss, grads, params, stats = _step(config, state, x, labels, variant,
                                                  memory_efficient, dtype)
        params = _sgd(params, grads, lr)
        if _module(variant) is nnx_model:
            nnx.update(model, params, stats)
            arrays = export_state(model, dtype=dtype)
        else:
            arrays = export_state(model, {"params": params, "batch_stats": stats}, dtype=dtype)
        return {"loss": float(loss), "grads": to_canonical(grads, dtype=dtype), "arrays": arrays}


def init_state(config: dict, seed: int = 0, variant: str = "nnx") -> dict:
    """A freshly initialised model's canonical state (the framework's own initialisers)."""
    if _module(variant) is nnx_model:
        return {"arrays": export_state(_build(config, seed=seed))}
    model = _build(config, variant=variant)
    return {"arrays": export_state(model, _linen_init(model, seed))}


def _linen_init(model, seed=0):
    """linen's variables for ``model``, initialised on the smallest input it takes."""
    x = jnp.zeros(_nhwc_shape(spec.input_shape(model.config)), jnp.float32)
    return jax.jit(functools.partial(model.init, train=False))(jax.random.key(seed), x)


def roundtrip(config: dict, state: dict, variant: str = "nnx") -> dict:
    """Load a canonical state into a fresh model and export it again."""
    if _module(variant) is nnx_model:
        return {"arrays": export_state(_loaded(config, state))}
    model, variables = _loaded(config, state, variant=variant)
    return {"arrays": export_state(model, variables)}


def load_error(config: dict, state: dict, variant: str = "nnx"):
    """Try to load ``state``; the error the user sees (or None), and whether the model kept its
    own weights untouched (all-or-nothing loading). linen loads return new variables, so the
    old ones cannot change; NNX loads in place."""
    if _module(variant) is nnx_model:
        model = _build(config)
        before = export_state(model)
        err = _error(lambda: load_state(model, state))
        after = export_state(model)
    else:
        model = _build(config, variant=variant)
        variables = _linen_init(model, seed=0)
        before = export_state(model, variables)
        err = _error(lambda: load_state(model, state))
        after = export_state(model, variables)
    if err is not None:
        err["unchanged"] = all(np.array_equal(before[k], after[k]) for k in before)
    return err


def _native_tree(model, variables=None):
    """This framework's own checkpoint tree: linen's variables {'params', 'batch_stats'}; for
    NNX the pure dict of the model's Param and BatchStat state (Flax names and layout)."""
    if variables is not None:
        return variables
    return nnx.to_pure_dict(nnx.state(model, (nnx.Param, nnx.BatchStat)))


def save_native(config: dict, state: dict, path: str, variant: str = "nnx") -> dict:
    """Write ``state`` as this framework's own checkpoint file: Flax msgpack
    (flax.serialization) of linen's variables, or of the NNX model's state as a pure dict."""
    from flax import serialization
    if _module(variant) is nnx_model:
        tree = _native_tree(_loaded(config, state))
    else:
        tree = _native_tree(*_loaded(config, state, variant=variant))
    with open(path, "wb") as f:
        f.write(serialization.to_bytes(tree))
    return {"path": path}


def load_native(config: dict, path: str, variant: str = "nnx") -> dict:
    """Read this framework's own checkpoint file back into the canonical form (checked
    against the model: every name and shape)."""
    from flax import serialization
    with open(path, "rb") as f:
        tree = serialization.msgpack_restore(f.read())
    if _module(variant) is nnx_model:
        model = _build(config)
        own = nnx.state(model, (nnx.Param, nnx.BatchStat))
        nnx.replace_by_pure_dict(own, tree)  # an unknown name is an error
        nnx.update(model, own)
        arrays = export_state(model)
    else:
        model = _build(config, variant=variant)
        arrays = export_state(model, tree)
    spec.check_state(model.config, {k: v.shape for k, v in arrays.items()})
    return {"arrays": arrays}


def summary(config: dict, batch: int, height: int, width: int, variant: str = "nnx") -> dict:
    """The framework-style per-layer summary text (NHWC shapes) and its totals."""
    from densenet_flax.summary import summary as text, summary_rows
    model = _build(config, variant=variant)
    shape = _nhwc_shape(spec.input_shape(model.config, batch, height, width))
    rows = summary_rows(model, shape)
    return {"text": text(model, shape), "params": rows[0][4], "state": rows[0][5]}


# ---------------------------------------------------------------- a user's model (densenet check)
# The same functions in every adapter. A model is the framework's own object: an NNX module,
# or for linen a (module, variables) pair. Tensors are named by their paths, '/' between the
# keys ('features/conv0/kernel'; linen's start with the collection: 'params/...',
# 'batch_stats/...'), in Flax's layout (HWIO kernels, [in, out] dense kernels). Inputs and
# captured outputs are canonical NCHW (transposed here). Computations are compiled whole, as
# Flax code runs them; the model passed in is never changed.

LAYOUT = "flax"
_MODE_ARGS = ("train", "training", "is_training")


def user_model(factory: str = None, config: dict = None, size: int = 0, variant: str = "nnx",
               path: str = None, in_channels: int = None):
    """The model to check: the user's, built by ``factory`` ('MODULE:FUNCTION', imported from
    ``path`` or the working directory), or ours for ``config`` (the reference). NNX: the
    module; linen: (module, variables), a factory's module without variables initialised on a
    ``size`` x ``size`` input with ``in_channels`` (else 1, then 3)."""
    from flax import linen as nn
    if factory is None:
        if variant == "nnx":
            return _build(config)
        module = _build(config, variant=variant)
        return module, _linen_init(module)
    with sites.recording(_site_hooks()) as built:  # where each module is built
        obj = spec.call_factory(factory, path)
    obj, tx = _with_optimizer(obj, factory)
    module, variables = obj if isinstance(obj, tuple) and len(obj) == 2 else (obj, None)
    if tx is not None:
        _optimizers[id(module)] = {"tx": tx, "step": 0}
        weakref.finalize(module, _optimizers.pop, id(module), None)
    if isinstance(module, nnx.Module):
        sites.remember(module, {p: built.of(node) for p, node in _named_modules(module)
                                if built.of(node)})
        return module
    if not isinstance(module, nn.Module):
        raise TypeError(f"{factory} returned {type(module).__name__}, not a Flax NNX or linen module")
    # linen builds its submodules as it runs (setup, @nn.compact): their sites are recorded
    # while it initialises (named by their paths as they are called)
    named = {}

    def name(next_fun, args, kwargs, context):
        named.setdefault("/".join(context.module.path), built.of(context.module))
        return next_fun(*args, **kwargs)
    with sites.recording(_site_hooks(), built), nn.intercept_methods(name):
        errors, got = [], variables
        for c in ([in_channels] if in_channels else [1, 3]):
            x = jnp.zeros((1, size, size, c) if size else (1, c), jnp.float32)  # 0: features
            try:
                named.clear()
                m, kw = _linen_mode(module, False)
                init = (lambda k, x: m.init(k, x, **kw))
                if variables is None:
                    got = jax.jit(init)(jax.random.key(0), x)
                else:  # its own variables: traced for the sites only, never computed
                    jax.eval_shape(init, jax.random.key(0), x)
                break
            except Exception as e:  # noqa: BLE001 - try the next channel count, then report all
                errors.append(f"{c} input channel(s): {str(e).splitlines()[0]}")
        else:
            if variables is None:
                raise ValueError(f"the model does not initialise on a {size}x{size} input: "
                                 + "; ".join(errors))
            named.clear()  # no sites: the check runs the model and says what fails
    variables = got
    sites.remember(module, {k: v for k, v in named.items() if v})
    return module, jax.tree.map(np.asarray, dict(variables))


#: the optax transformation a factory returned with its model (id(module) -> {"tx", "step",
#: and from the first step "state" (tx's) and linen's "variables"}), while the model lives
_optimizers: dict = {}
_PAIR = ("a Flax NNX or linen module (linen: alone or with its variables), or with an optax "
         "transformation after it: (model, tx), linen's (module, tx) or (module, variables, tx)")


def _with_optimizer(obj, factory: str):
    """A factory's result -> (the model as user_model reads it, the optax transformation or
    None). A tuple whose last item is no optax.GradientTransformation is the model (linen's
    (module, variables)); one that holds a transformation elsewhere, or too many items:
    TypeError naming what was expected and what was found."""
    if not isinstance(obj, tuple) or isinstance(obj, optax.GradientTransformation):
        return obj, None
    found = "(" + ", ".join(type(o).__name__ for o in obj) + ")"
    txs = [isinstance(o, optax.GradientTransformation) for o in obj]
    if not any(txs):
        return obj, None
    if txs.index(True) != len(obj) - 1 or len(obj) not in (2, 3) or sum(txs) > 1:
        raise TypeError(f"{factory} returned {found}; expected {_PAIR}")
    rest = obj[:-1]
    if len(rest) == 2 and not isinstance(rest[0], _linen_module()):
        raise TypeError(f"{factory} returned {found}; expected {_PAIR}")
    return (rest if len(rest) == 2 else rest[0]), obj[-1]


def _linen_module():
    from flax import linen as nn
    return nn.Module


def _linen_mode(module, train: bool):
    """How a linen module is told eval or train mode: a ``train``-like argument of __call__,
    ``deterministic`` / ``use_running_average`` (the inverse), or a ``training``-like field
    (the book's JAX code: ``training: bool``). Returns (module, keyword arguments)."""
    import inspect
    params = inspect.signature(module.__call__).parameters
    for name in _MODE_ARGS:
        if name in params:
            return module, {name: train}
    for name in ("deterministic", "use_running_average"):
        if name in params:
            return module, {name: not train}
    for name in _MODE_ARGS:
        if name in getattr(module, "__dataclass_fields__", {}):
            return module.clone(**{name: train}), {}
    return module, {}


def _flat(tree, prefix="", leaf=np.asarray):
    """A nested mapping -> 'a/b/c' -> leaf (numpy arrays; ``leaf`` as is inside a trace)."""
    from collections.abc import Mapping
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}/", leaf))
        elif isinstance(v, (tuple, list)):
            out.update(_flat({str(i): e for i, e in enumerate(v)}, f"{prefix}{k}/", leaf))
        else:
            out[f"{prefix}{k}"] = leaf(v)
    return out


def _unflat(arrays):
    tree = {}
    for key, a in arrays.items():
        node = tree
        *path, leaf = key.split("/")
        for p in path:
            node = node.setdefault(int(p) if p.isdigit() else p, {})
        node[int(leaf) if leaf.isdigit() else leaf] = a
    return tree


def _nnx_tensors(model):
    params = _flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    stats = _flat(nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))
    return params, stats


def _definition_order(module, prefix=""):
    """NNX: the paths of a module's variables in the order its code defines them (attributes
    keep their insertion order; lists and dicts of layers theirs). NNX's own state is sorted
    by name, which loses it ('bn_final' before 'layers/0/bn')."""
    items = vars(module).items() if isinstance(module, nnx.Module) else (
        module.items() if isinstance(module, dict) else enumerate(module))
    for name, value in items:
        path = f"{prefix}{name}"
        if isinstance(value, nnx.Variable):
            yield path
        elif isinstance(value, (nnx.Module, list, tuple, dict)) or type(value).__name__ == "List":
            yield from _definition_order(value, path + "/")


def model_tensors(model, variant: str = "nnx") -> dict:
    """Every tensor of the model by path, which are trainable (NNX: nnx.Param; linen: the
    'params' collection), the layout, and whether the order is the code's (NNX: yes; linen's
    trees are sorted by name, so a matcher orders them naturally: 'layers_10' after
    'layers_9')."""
    if isinstance(model, nnx.Module):
        params, stats = _nnx_tensors(model)
        both = {**params, **stats}
        order = [p for p in _definition_order(model) if p in both]
        order += [p for p in both if p not in set(order)]
        return {"arrays": {p: both[p] for p in order}, "trainable": list(params),
                "layout": LAYOUT, "ordered": True}
    arrays = _flat(dict(model[1]))
    return {"arrays": arrays, "trainable": [k for k in arrays if k.startswith("params/")],
            "layout": LAYOUT, "ordered": False}


def set_model_tensors(model, arrays: dict, variant: str = "nnx"):
    """Load ``arrays`` (the model's own paths and layout): every path must be the model's and
    every shape its own, or nothing is loaded. NNX: loads in place, returns the module; linen:
    returns (module, new variables)."""
    own = model_tensors(model)["arrays"]
    bad = [k for k in arrays if k not in own or own[k].shape != tuple(np.shape(arrays[k]))]
    if bad:
        raise ValueError(f"cannot load {bad[:3]} into the model (unknown path or other shape)")
    new = {k: np.asarray(arrays.get(k, v), dtype=own[k].dtype) for k, v in own.items()}
    if isinstance(model, nnx.Module):
        for kind in (nnx.Param, nnx.BatchStat):
            state = nnx.state(model, kind)
            keys = _flat(nnx.to_pure_dict(state))
            nnx.replace_by_pure_dict(state, _unflat({k: _device_array(new[k]) for k in keys}))
            nnx.update(model, state)
        return model
    return model[0], jax.tree.map(_device_array, _unflat(new))


def _named_modules(model):
    """NNX: (path, module) for the model and every module under it."""
    return [("/".join(map(str, path)), node) for path, node in nnx.iter_graph(model)
            if isinstance(node, nnx.Module)]


def _paths(model):
    """NNX: id(submodule) -> its path ('features/denseblock1/denselayer1/norm1'; lists too)."""
    return {id(node): "/".join(map(str, path)) for path, node in nnx.iter_graph(model)
            if isinstance(node, nnx.Module)}


def _nnx_run(model, x, labels, modules, train):
    """Inside a trace: the logits, the outputs of ``modules`` (by path) and, with labels, the
    loss and the gradients (the model is a copy: its BatchNorm statistics update in place)."""
    from densenet_flax.summary import _recording_calls
    wanted = set(modules)
    paths = _paths(model)
    classes = {type(n) for _, n in nnx.iter_graph(model) if isinstance(n, nnx.Module)
               and paths.get(id(n)) in wanted}
    captured = {}

    def record(m, out):
        if paths.get(id(m)) in wanted:
            captured.setdefault(paths[id(m)], out)

    model.train() if train else model.eval()
    with _recording_calls(classes, record):
        if labels is None:
            return {"logits": model(x), "outputs": captured}

        def loss_fn(m):
            logits = m(x)
            return _loss(logits, labels), logits
        (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    return {"logits": logits, "outputs": captured, "loss": loss,
            "grads": nnx.to_pure_dict(grads), "state": nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))}


def _linen_run(module, variables, x, labels, modules, train):
    """linen, inside a trace: as _nnx_run, the outputs by capture_intermediates."""
    wanted = {tuple(m.split("/")) for m in modules}
    m, kw = _linen_mode(module, train)
    capture = (lambda mdl, method: method == "__call__" and tuple(mdl.path) in wanted)
    mutable = ["intermediates"] + (["batch_stats"] if train and "batch_stats" in variables else [])

    def apply(params):
        out, upd = m.apply({**variables, "params": params}, x, **kw, capture_intermediates=capture,
                           mutable=mutable, rngs={"dropout": jax.random.key(0)})
        return out, upd

    def outputs(upd):
        flat = _flat(dict(upd.get("intermediates", {})), leaf=lambda a: a)
        return {k[: -len("/__call__/0")]: v for k, v in flat.items() if k.endswith("/__call__/0")}

    if labels is None:
        logits, upd = apply(variables["params"])
        return {"logits": logits, "outputs": outputs(upd)}

    def loss_fn(params):
        logits, upd = apply(params)
        return _loss(logits, labels), (logits, upd)
    (loss, (logits, upd)), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
    return {"logits": logits, "outputs": outputs(upd), "loss": loss, "grads": dict(grads),
            "state": dict(upd.get("batch_stats", {}))}


def model_run(model, x, labels=None, modules=(), train: bool = False, dtype: str = "float32",
              variant: str = "nnx") -> dict:
    """Run the model (compiled, at ``dtype``) on the canonical NCHW ``x`` in eval or train mode:
    the logits and the output of every module in ``modules`` (paths), NCHW; in train mode with
    ``labels`` also the loss, the gradient of every trainable tensor and the BatchNorm
    statistics the forward pass updated (the model's paths, linen's with their collection)."""
    with _numerics(dtype):
        cast = (lambda a: _device_array(a, dtype))
        xs = _nhwc(x, dtype)
        ys = None if labels is None else _targets(labels, dtype)
        if isinstance(model, nnx.Module):
            m = nnx.clone(model)
            for kind in (nnx.Param, nnx.BatchStat):
                nnx.update(m, jax.tree.map(cast, nnx.state(m, kind)))
            graphdef, state = nnx.split(m)
            state = nnx.to_pure_dict(state)
            out = _compiled(("run", graphdef, tuple(modules), train), _in_pieces(lambda: (
                lambda state, xs, ys: _nnx_run(nnx.merge(graphdef, state), xs, ys,
                                               tuple(modules), train))), state, xs, ys)
            prefix = {"grads": "", "state": ""}
        else:
            module, variables = model
            variables = jax.tree.map(cast, dict(variables))
            out = _compiled(("run", module, tuple(modules), train), _in_pieces(lambda: (
                lambda variables, xs, ys: _linen_run(module, variables, xs, ys, tuple(modules),
                                                     train))), variables, xs, ys)
            prefix = {"grads": "params/", "state": "batch_stats/"}
        res = {"logits": np.asarray(out["logits"], dtype=dtype),
               "outputs": {k: _nchw_as(v, dtype) for k, v in out["outputs"].items()}}
        if labels is not None:
            res["loss"] = float(out["loss"])
            for key in ("grads", "state"):
                res[key] = {prefix[key] + k: np.asarray(v, dtype=dtype)
                            for k, v in _flat(out[key]).items()}
        return res


def _nchw_as(y, dtype):
    y = np.asarray(y, dtype=dtype)
    return np.ascontiguousarray(y.transpose(0, 3, 1, 2) if y.ndim == 4 else y)


def save_model(model, path: str, variant: str = "nnx") -> dict:
    """The framework's own file of the model: flax.serialization's msgpack of the NNX state
    as a pure dict, or of linen's variables."""
    from flax import serialization
    tree = nnx.to_pure_dict(nnx.state(model, (nnx.Param, nnx.BatchStat))) \
        if isinstance(model, nnx.Module) else model[1]
    with open(path, "wb") as f:
        f.write(serialization.to_bytes(tree))
    return {"path": path}


def release_memory(variant: str = "nnx") -> int:
    """Give memory back between computations: drop what the framework caches (jax's compiled programs), collect
    garbage and return freed heap pages to the system (glibc's malloc_trim: after compiling or
    running a large network the allocator keeps gigabytes it no longer uses). Returns the
    process's resident memory afterwards, in bytes."""
    jax.clear_caches()
    _PROGRAMS.clear()
    _STEPS.clear()
    _runtime._COMPILED.clear()
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
                       steps: int = 1, variant: str = "nnx") -> dict:
    """One data-parallel SGD step on ``devices`` devices on the framework's own engine
    (densenet_flax/parallel.py): the mean loss, the new canonical state, the BatchNorm semantics."""
    from densenet_flax import parallel
    return parallel.data_parallel_step(config, state, x, labels, devices=devices,
                                       sync_bn=sync_bn, lr=lr, dtype=dtype, steps=steps,
                                       variant=variant)


def data_parallel_error(config: dict, state: dict, x, labels, devices: int = 2,
                        sync_bn: bool = False, variant: str = "nnx"):
    """The error a data-parallel step raises for these arguments, or None."""
    return _error(lambda: data_parallel_step(config, state, x, labels, devices=devices,
                                             sync_bn=sync_bn, variant=variant))


def model_bn_settings(model, variant: str = "nnx", in_channels: int = 3, size: int = 224) -> dict:
    """Every BatchNorm of the model (its path, as model_tensors names its variables less the
    leaf) -> {"epsilon", "momentum"} as the model has them (Flax's momentum: the share of the
    running statistics kept per step). NNX: every module with BatchStat variables and an
    epsilon and a momentum (nnx.BatchNorm, ours); linen: each nn.BatchNorm (or module with an
    epsilon and a momentum: ours) as it is called
    (read while tracing the model abstractly on a 224 x 224 input with ``in_channels``: its
    submodules exist only then)."""
    from flax import linen as nn
    if isinstance(model, nnx.Module):
        out = {}
        for path, node in nnx.iter_graph(model):
            if isinstance(node, nnx.Module) and hasattr(node, "epsilon") and hasattr(
                    node, "momentum") and any(isinstance(v, nnx.BatchStat) for v in vars(node).values()):
                out["/".join(map(str, path))] = {"epsilon": float(node.epsilon),
                                                 "momentum": float(node.momentum)}
        return out
    module, variables = model
    found = {}

    def record(next_fun, args, kwargs, context):
        m = context.module
        if context.method_name == "__call__" and (isinstance(m, nn.BatchNorm) or (
                hasattr(m, "epsilon") and hasattr(m, "momentum"))):  # nn.BatchNorm, ours
            found["/".join(m.path)] = {"epsilon": float(m.epsilon), "momentum": float(m.momentum)}
        return next_fun(*args, **kwargs)

    m, kw = _linen_mode(module, False)
    # never computed; size 0: an MLP's (1, features)
    x = jax.ShapeDtypeStruct((1, size or 224, size or 224, in_channels) if size else
                             (1, in_channels), jnp.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda v, x: m.apply(v, x, **kw), variables, x)
    return found


def model_optimizer(model, variant: str = "nnx"):
    """What optimises the model, for a model user_model built from a factory that returned it
    with an optax transformation: {"optimizer": "optax.GradientTransformation" (optax's
    transformations carry no name), "schedule": None (a schedule is inside it)}; None for a
    model alone."""
    got = _optimizers.get(id(model[0] if isinstance(model, tuple) else model))
    if got is None:
        return None
    return {"optimizer": f"optax {type(got['tx']).__name__}", "schedule": None}


def model_train_step(model, x, labels, variant: str = "nnx") -> dict:
    """One training step of the user's own optax transformation (model_optimizer) on (x,
    labels), in float64 (JAX's x64): the first call turns the model's parameters and batch
    statistics into float64 and initialises the transformation on them (tx.init); each step
    the train-mode loss's gradient (cross-entropy against integer labels, the mean squared
    error against float targets), tx.update and optax.apply_updates. Returns the loss, the
    learning rate (None: inside the transformation) and every tensor of the model after the
    step (model_tensors' names)."""
    linen_pair = isinstance(model, tuple)
    got = _optimizers[id(model[0] if linen_pair else model)]
    tx = got["tx"]
    if "update" not in got:  # tx.update and optax.apply_updates, compiled once
        def update(grads, state, params):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state
        got["update"] = jax.jit(update)
    with _numerics("float64"):
        cast = (lambda a: _device_array(a, "float64"))
        xs, ys = _nhwc(x, "float64"), _targets(labels, "float64")
        if linen_pair:
            if got["step"] == 0:
                got["variables"] = jax.tree.map(cast, dict(model[1]))
                got["state"] = tx.init(got["variables"]["params"])
            variables = got["variables"]
            out = jax.jit(_linen_run, static_argnums=(0, 4, 5))(model[0], variables, xs, ys,
                                                               (), True)
            params, got["state"] = got["update"](out["grads"], got["state"],
                                                 variables["params"])
            variables = {**variables, "params": params}
            if out["state"]:
                variables["batch_stats"] = out["state"]
            got["variables"] = variables
            arrays = _flat(variables)
        else:
            from densenet_flax import train
            if got["step"] == 0:
                for kind in (nnx.Param, nnx.BatchStat):
                    nnx.update(model, jax.tree.map(cast, nnx.state(model, kind)))
                got["state"] = tx.init(nnx.state(model, nnx.Param))
            model.train()
            graphdef, params, rest = nnx.split(model, nnx.Param, ...)
            loss, grads, rest = train._nnx_grads(graphdef, params, rest, xs, ys)
            params, got["state"] = got["update"](grads, got["state"], params)
            nnx.update(model, params, rest)
            out = {"loss": loss}
            arrays = model_tensors(model)["arrays"]
    got["step"] += 1
    return {"loss": float(out["loss"]), "lr": None,
            "arrays": {k: np.asarray(v, np.float64) for k, v in arrays.items()}}


def model_sites(model, variant: str = "nnx") -> dict:
    """The line of the user's code that built each of the model's modules (its path -> 'FILE:LINE',
    densenet_spec.sites), for a model user_model built from a factory (linen: the modules its
    initialisation called); {} for any other model, and no entry for a module this project's
    code built."""
    return sites.remembered(model[0] if isinstance(model, tuple) else model)


# ---------------------------------------------------------------- training recipes
# A run of a training recipe (densenet_spec/optim.py) step by step: recipe_session loads the
# state into a model and builds the recipe with the framework's optimiser (train.py's
# build_optimizer); each recipe_step takes the next batch and returns the step's figures and
# the new canonical state. (MXNet's session stays in its worker, sent back as a handle.)

def recipe_limits(recipe: str, dtype: str = "float32", variant: str = "nnx") -> list:
    """What this framework cannot express exactly of ``recipe`` (a recipe string), in words."""
    from densenet_flax import train
    _module(variant)
    return train.recipe_limits(spec.parse_recipe(recipe), dtype)


def recipe_session(config: dict, state: dict, recipe: str, steps_per_epoch: int = 1,
                   total_steps: int = 1, dtype: str = "float32", variant: str = "nnx"):
    """A model loaded with ``state`` at ``dtype`` and ``recipe``'s optimiser for it."""
    import types
    from densenet_flax import train
    parsed = spec.parse_recipe(recipe)
    with _numerics(dtype):
        model = _loaded(config, state, variant=variant, dtype=dtype)
        return types.SimpleNamespace(model=model, recipe=parsed, dtype=dtype, step=0,
                                     steps_per_epoch=steps_per_epoch,
                                     optimizer=train.build_optimizer(model, parsed,
                                                                     steps_per_epoch,
                                                                     total_steps))


def recipe_step(session, x, labels, variant: str = "nnx") -> dict:
    """The session's next step on (x, labels): loss, grad_norm, lr and the new canonical state
    (parameters and BatchNorm running statistics) at the session's dtype."""
    from densenet_flax import train
    with _numerics(session.dtype):
        fig, = train.run_steps(session.model, session.optimizer, [(x, labels)], session.recipe,
                               session.steps_per_epoch, session.step)
        session.step += 1
        if isinstance(session.model, tuple):
            arrays = export_state(session.model[0], session.optimizer.variables,
                                  dtype=session.dtype)
        else:
            arrays = export_state(session.model, dtype=session.dtype)
    return {**fig, "arrays": arrays}


def recipe_end(session, variant: str = "nnx") -> None:
    """Let go of a session's model and optimiser (its memory back)."""
    session.__dict__.clear()
