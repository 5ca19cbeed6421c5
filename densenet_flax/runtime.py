"""What the parity adapter (adapter.py) and the data-parallel step (parallel.py) both run on:
a model built from a framework-free configuration (either family, NNX or linen), loaded with a
canonical state; and, for Flax, the numerics both use (precision, float64), the NHWC input,
the loss and the SGD update. Same public names as densenet_torch/runtime.py and
densenet_mxnet/runtime.py, plus Flax's extras (parity_tests/test_mirrors.py names them)."""
from __future__ import annotations

import contextlib
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import densenet_spec as spec
from densenet_flax import linen, model as nnx_model
from densenet_flax.state import _device_array, load_state


def device() -> str:
    d = jax.devices()[0]
    return "cpu" if d.platform == "cpu" else f"{d.platform}:{d.id}"


def _module(variant):
    if variant not in ("nnx", "linen"):
        raise ValueError(f"unknown Flax variant {variant!r}; variants: nnx, linen")
    return nnx_model if variant == "nnx" else linen


def from_config(config: dict, memory_efficient=False, variant="nnx", seed=0, _rngs=None, **_):
    """Our model for a ``Preset.to_dict()`` of either family, NNX (``rngs=nnx.Rngs(seed)``)
    or linen (the MLP family has no memory-efficient mode)."""
    cfg = spec.config_from_dict(config)
    mod = _module(variant)
    rngs = nnx.Rngs(seed) if _rngs is None else _rngs
    if cfg.family == "mlp":
        kw = {"rngs": rngs} if variant == "nnx" else {}
        return mod.MLPDenseNet(**cfg.options(), name=cfg.name, **kw)
    if variant == "nnx":
        return nnx_model.DenseNet(**cfg.options(), memory_efficient=memory_efficient,
                                  name=cfg.name, rngs=rngs)
    return mod.DenseNet(**cfg.options(), memory_efficient=memory_efficient, name=cfg.name)


@functools.lru_cache(maxsize=8)
def _abstract_parts(config_json: str, memory_efficient: bool):
    """NNX's model for a configuration, built abstractly once (nnx.eval_shape: the shapes of
    every variable, no initialiser run; still seconds for the deepest presets)."""
    config = json.loads(config_json)
    keys = nnx.Rngs(0) if config.get("drop_rate") else nnx_model._ShapeOnlyKeys()
    model = nnx.eval_shape(lambda: from_config(config, memory_efficient=memory_efficient,
                                               _rngs=keys))
    return nnx.split(model)


def abstract(config: dict, memory_efficient: bool = False):
    """A fresh abstract NNX model (its own Variables) for ``config``."""
    return nnx.merge(*_abstract_parts(json.dumps(config, sort_keys=True), memory_efficient))


def loaded(config, state, memory_efficient=False, variant="nnx", dtype="float32"):
    """NNX: the model, loaded. linen: (model, variables). At ``dtype`` (inside numerics).
    NNX builds abstractly (nnx.eval_shape: no random initialisation, which would compile an
    initialiser per weight shape) unless dropout needs its RNG streams."""
    if variant == "nnx" and not config.get("drop_rate"):
        model = abstract(config, memory_efficient)
    else:
        model = from_config(config, memory_efficient=memory_efficient, variant=variant)
    variables = load_state(model, state, dtype=np.dtype(dtype))
    return model if variant == "nnx" else (model, variables)


@contextlib.contextmanager
def numerics(dtype="float32"):
    """Full-precision matmuls and convolutions (no TF32 or bf16 passes on GPUs); JAX's x64 mode
    for ``dtype`` 'float64'."""
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    with contextlib.ExitStack() as stack:
        stack.enter_context(jax.default_matmul_precision("highest"))
        if dtype == "float64":
            stack.enter_context(jax.enable_x64(True))
        yield


def nhwc(x, dtype="float32"):
    """A canonical input (NCHW images; (N, features) passes as it is) for Flax."""
    x = np.asarray(x, dtype=dtype)
    return _device_array(np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if x.ndim == 4 else x)


def targets(labels, dtype="float32"):
    """Integer labels as int32 (the conv family's classes); float targets at ``dtype`` (the MLP
    family's regression, (N, outputs))."""
    labels = np.asarray(labels)
    if np.issubdtype(labels.dtype, np.integer):
        return _device_array(labels, np.int32)
    return _device_array(labels, dtype)


def loss(outputs, labels):
    """Mean softmax cross-entropy against integer labels; the mean squared error against float
    targets (chosen by the targets' dtype, when the function is traced)."""
    if jnp.issubdtype(labels.dtype, jnp.integer):
        return optax.softmax_cross_entropy_with_integer_labels(outputs, labels).mean()
    return jnp.mean(jnp.square(outputs - labels))


_DROPOUT = {"dropout": jax.random.key(0)}  # linen: used only when drop_rate > 0


def linen_loss(model, batch_stats, x, labels):
    """linen: params -> (loss, updated batch_stats), train mode."""
    def loss_fn(params):
        logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                      train=True, mutable=["batch_stats"], rngs=_DROPOUT)
        return loss(logits, labels), updates["batch_stats"]
    return loss_fn


@jax.jit
def sgd(params, grads, lr):
    tx = optax.sgd(lr)
    updates, _ = tx.update(grads, tx.init(params), params)
    return optax.apply_updates(params, updates)


# ---------------------------------------------------------------- compiling a large program
#: About how many equations (those of the programs they call included) each program of
#: jit_in_pieces holds: DenseNet-264's float64 step (22,255) compiles as 37 pieces.
PIECE_EQUATIONS = 600


def _weight(eqn) -> int:
    """An equation's share of the program: 1, plus the equations of the programs it calls."""
    from jax.extend import core as jcore
    return 1 + sum(sum(_weight(e) for e in j.eqns) for j in jcore.jaxprs_in_params(eqn.params))


def jit_in_pieces(fn, *args, pieces=None, threads=None, compile=None, reuse=False):
    """``fn`` traced once for ``args`` (pytrees of arrays) and compiled as ``pieces`` programs
    of about equal size (default: one per PIECE_EQUATIONS equations) that run one after the
    other, each taking from the earlier ones what it needs: a callable for arguments of the
    same structure, shapes and dtypes, returning what ``fn`` returns.

    Why: XLA's compile time on the CPU grows much faster than the program. keras.applications'
    DenseNet-169 float64 train step (value and gradient, 10,426 equations) compiles in 21.9 s
    as one program, 12.5 s as 4 pieces one after the other; as 16 pieces on two threads in
    4.1 s. The pieces are the equations JAX traced, in their order, each compiled as XLA would
    compile it in the whole: the same operations in IEEE arithmetic, the program boundaries
    apart (XLA fuses within a piece only, so a value may round differently: ~1e-15 relative,
    which train-mode BatchNorm amplifies to ~1e-10 in a gradient of a deep preset).

    ``threads``: pieces compiled at once (default: the CPUs this process may use; XLA compiles
    a program on one thread). ``compile``: Lowered -> Compiled (default ``Lowered.compile()``).
    ``reuse``: a program traced again with the same text runs the pieces already compiled for
    it (the newest two kept; the text costs ~0.8 s for DenseNet-264's step, so only callers that
    trace one program twice ask: NNX, then linen).
    """
    import os
    from concurrent.futures import ThreadPoolExecutor
    from jax.extend import core as jcore
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    jaxpr, in_tree = closed.jaxpr, jax.tree.structure(args)
    out_tree = jax.tree.structure(out_shape)
    # the same equations traced again (NNX, then linen: densenet_flax/adapter.py): the pieces
    # already compiled, by the program's text (every equation, its parameters and every
    # variable's type; the constants are inputs of the pieces, not part of them)
    text = (str(jaxpr), in_tree, out_tree, pieces) if reuse else None
    if reuse and text in _COMPILED:
        _COMPILED[text] = _COMPILED.pop(text)  # the newest last
        first, parts, programs, drop = _COMPILED[text]  # its variables are the first trace's
        return _pieces_call(first, closed.consts, in_tree, out_tree, parts, programs, drop)
    eqns = jaxpr.eqns
    weights = np.cumsum([_weight(e) for e in eqns])
    total = int(weights[-1]) if len(eqns) else 0
    pieces = pieces or max(1, round(total / PIECE_EQUATIONS))
    cuts = [0] + [int(np.searchsorted(weights, total * i / pieces, side="left")) + 1
                  for i in range(1, pieces)] + [len(eqns)]
    cuts = sorted(set(min(c, len(eqns)) for c in cuts))
    if jaxpr.effects or len(cuts) <= 2:  # nothing to split, or effects to keep in order
        cuts = [0, len(eqns)]
    is_var = (lambda v: isinstance(v, jcore.Var) and not isinstance(v, jcore.DropVar))
    final = {v for v in jaxpr.outvars if is_var(v)}
    segments = [eqns[a:b] for a, b in zip(cuts, cuts[1:])]
    last_use = {}  # var -> index of the last piece that reads it
    for i, seg in enumerate(segments):
        for e in seg:
            for v in e.invars:
                if is_var(v):
                    last_use[v] = i
    parts = []
    for i, seg in enumerate(segments):
        made = {v for e in seg for v in e.outvars if is_var(v)}
        ins, seen = [], set()
        for e in seg:
            for v in e.invars:
                if is_var(v) and v not in made and v not in seen:
                    seen.add(v)
                    ins.append(v)
        outs = [v for e in seg for v in e.outvars
                if is_var(v) and (v in final or last_use.get(v, -1) > i)]
        sub = jcore.ClosedJaxpr(jcore.Jaxpr([], ins, outs, seg, jcore.no_effects,
                                            _debug_info(jaxpr.debug_info, ins, outs)), [])
        shapes = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in ins]
        parts.append((ins, outs, _lower(sub, shapes)))
    build = compile or (lambda lowered: lowered.compile())
    threads = threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                          else os.cpu_count() or 1)  # macOS and Windows have no affinity
    with ThreadPoolExecutor(max(1, min(threads, len(parts)))) as pool:
        programs = list(pool.map(build, [p[2] for p in parts]))
    drop = [[v for v, last in last_use.items() if last == i and v not in final]
            for i in range(len(parts))]
    if reuse:
        _COMPILED[text] = jaxpr, parts, programs, drop
        while len(_COMPILED) > _KEEP_COMPILED:
            _COMPILED.pop(next(iter(_COMPILED)))
    return _pieces_call(jaxpr, closed.consts, in_tree, out_tree, parts, programs, drop)


def _debug_info(parent, ins, outs):
    """A piece's debug information: the names jax.jit gives the arguments and results of a
    function of ``ins`` returning a list of ``outs`` (the parent's names are for its own)."""
    return parent._replace(arg_names=tuple(f"args[{i}]" for i in range(len(ins))),
                           result_paths=tuple(f"result[{i}]" for i in range(len(outs))))


def _lower(closed, shapes):
    """``jax.jit(jaxpr_as_fun(closed)).lower(*shapes)`` without tracing ``closed`` again: the
    public path evaluates every equation into a new trace to get the program it already is
    (DenseNet-264's float64 step: 1.8 s of its 4 s of lowering). JAX's own Traced stage is
    built around the program, with the parameters jax.jit gives a function of plain arrays
    (taken from a one-equation program traced the public way); where this JAX's internals
    differ, the public path."""
    from jax.extend import core as jcore
    try:
        from jax._src import pjit, stages
        n_in, n_out = len(closed.in_avals), len(closed.out_avals)
        template = _template()
        params = dict(template._params, jaxpr=closed)
        for name, n in (("in_shardings", n_in), ("in_layouts", n_in),
                        ("donated_invars", n_in), ("out_shardings", n_out),
                        ("out_layouts", n_out)):
            params[name] = template._params[name][:1] * n
        traced = stages.Traced([pjit.convert_to_metaty(s) for s in shapes], params,
                               jax.tree.structure((tuple(shapes), {})),
                               jax.tree.structure([0] * n_out), [])
        return traced.lower()
    except Exception:  # noqa: BLE001 - another JAX's internals: the public path
        return jax.jit(jcore.jaxpr_as_fun(closed)).lower(*shapes)


@functools.lru_cache(maxsize=1)
def _template():
    """jax.jit's Traced stage of a one-argument, one-result program (for _lower)."""
    from jax.extend import core as jcore
    one = jax.ShapeDtypeStruct((), np.float32)
    return jax.jit(jcore.jaxpr_as_fun(jax.make_jaxpr(lambda a: a + 1)(one))).trace(one)


#: jit_in_pieces' compiled pieces by the text of the program they were cut from: the newest.
_COMPILED: dict = {}
_KEEP_COMPILED = 2


def _pieces_call(jaxpr, const_values, in_tree, out_tree, parts, programs, drop):
    """The callable of jit_in_pieces: ``programs`` (compiled ``parts`` of ``jaxpr``) run in
    order on arguments with ``in_tree``, the constants' values beside them."""
    from jax.extend import core as jcore
    consts = dict(zip(jaxpr.constvars, const_values))
    is_var = (lambda v: isinstance(v, jcore.Var) and not isinstance(v, jcore.DropVar))

    def call(*call_args):
        leaves, tree = jax.tree.flatten(call_args)
        if tree != in_tree:
            raise TypeError(f"jit_in_pieces: traced for {in_tree}, called with {tree}")
        env = dict(consts)
        env.update(zip(jaxpr.invars, leaves))
        for (ins, outs, _), program, gone in zip(parts, programs, drop):
            env.update(zip(outs, program(*[env[v] for v in ins])))
            for v in gone:  # read by no later piece: its buffer goes now
                env.pop(v, None)
        return jax.tree.unflatten(out_tree, [env[v] if is_var(v) else v.val
                                             for v in jaxpr.outvars])
    call.pieces, call.programs = len(parts), programs
    return call
