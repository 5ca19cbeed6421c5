"""Keras 3: the user's keras.Model (keras.applications' DenseNets, a Functional or Sequential
port, a subclassed model), run on Keras' JAX backend in this process. There is no Keras mirror:
the reference is our PyTorch DenseNet, given the same canonical weights.

Keras is imported with KERAS_BACKEND=jax unless the user set another backend first (Keras reads
the variable once, at its import); on another backend the check says so and stops (its train
step is JAX's: ``stateless_call`` under ``jax.value_and_grad``).

Conventions handled here: NHWC input (``keras.config.image_data_format()`` 'channels_last';
'channels_first' models get NCHW), HWIO kernels and [in, out] dense kernels (layout 'flax'),
a model ending in a softmax (keras.applications' default ``classifier_activation``): its logits
before the softmax are compared, and the report says so. The float64 step runs the model's
layers at float64 (their dtype policy, their variables' dtype, and Keras' type promotion, which
otherwise turns float64 into float32 and keeps BatchNormalization at float32 whatever the
policy; for that call only: the model's own variables are never changed).
"""
from __future__ import annotations

import contextlib
import gc
import os
from typing import Dict, Optional

import numpy as np

from densenet_parity.checking.subjects import CheckError, Subject, class_is, keep_share_in_torch_words

FRAMEWORK = "keras"
VARIANTS = ("keras",)
#: the optimiser is part of a compiled model: without --recipe it is not a request to check it
OPTIMIZER_IN_MODEL = True
#: what a factory returns for --recipe (the training-step check): the model with its optimiser
PAIR = "a keras.Model compiled with its optimizer (model.compile(optimizer=...), its schedule (if any) the optimizer's learning_rate)"
#: its BatchNorm updates the running variance with the biased batch variance (accepted, noted)
BIASED_VARIANCE = True
#: what its numbers are compared with
REFERENCE = "our PyTorch model"
#: XLA's options for the check's jitted calls, each compiled for one call, tried in this order
#: (an XLA that does not know an option refuses it with an error, caught: the next set is
#: tried). LLVM's optimisation level 0 (XLA's own graph passes run as ever; IEEE arithmetic
#: either way: no fast-math at any level) compiles keras.applications' DenseNet-121 float64
#: step in half the time; XLA's older elemental emitters in place of its MLIR fusion emitters
#: (jaxlib 0.10; gone from 0.11) then compile keras.applications' DenseNet-169 float64 step in
#: about half again (docs/performance/check-speed.md); one LLVM module in place of XLA's split
#: for parallel code generation (which the check's compilations run on one thread anyway:
#: their CPU time is their wall time) takes a tenth off again (keras.applications'
#: DenseNet-169 at 64 px: its three programs in 25-27 s of CPU where they took 28-30 s).
COMPILER_OPTIONS = ({"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False,
                     "xla_cpu_parallel_codegen_split_count": 1},
                    {"xla_backend_optimization_level": 0}, None)


def import_keras():
    """keras, on its JAX backend unless KERAS_BACKEND says otherwise (set before the import)."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    try:
        import keras
    except ImportError:
        raise CheckError("checking a Keras model needs keras (the main environment: `make env`; "
                         "pip install keras)") from None
    backend = keras.backend.backend()
    if backend != "jax":
        raise CheckError(f"Keras runs on its {backend!r} backend here (KERAS_BACKEND="
                         f"{os.environ.get('KERAS_BACKEND')!r}, read when keras was imported); "
                         "densenet check runs Keras on its JAX backend: set KERAS_BACKEND=jax "
                         "(or leave it unset) before keras is imported")
    return keras


class KerasSubject(Subject):
    framework = FRAMEWORK

    def optimizer(self):
        """A compiled model's optimiser ({"optimizer", "schedule"}), None if not compiled."""
        opt = getattr(self.model, "optimizer", None)
        if opt is None:
            return None
        rate = getattr(opt, "_learning_rate", None)
        return {"optimizer": f"keras.optimizers.{type(opt).__name__}",
                "schedule": type(rate).__name__ if isinstance(
                    rate, self.keras.optimizers.schedules.LearningRateSchedule) else None}

    def train_step(self, x, labels) -> dict:
        """One training step of the compiled model's own optimiser (``model.optimizer``) in
        float64, on Keras' JAX backend: the train-mode loss (cross-entropy against integer
        labels, the mean squared error against float targets) under ``jax.value_and_grad`` of
        ``stateless_call``, then the optimiser's ``stateless_apply``, compiled once and run
        on float64 copies of the model's and the optimiser's variables (the model's own are
        never changed). Keras keeps a constant learning rate in a float32 variable: it is read
        as the shortest decimal that prints that float32 (0.05 for float32's 0.0500000007), the
        rate the user typed. Returns the loss, the rate the step used and every tensor after
        the step (the model's variable paths)."""
        import jax
        import jax.numpy as jnp
        model, opt = self.model, self.model.optimizer
        st = self.__dict__.setdefault("_training", {})
        labels = np.asarray(labels)
        with self._as("float64"), self._optimizer_at_float64(opt):
            if "fn" not in st:
                if not opt.built:
                    opt.build(model.trainable_variables)
                st["tv"] = [self._float64(v) for v in model.trainable_variables]
                st["ntv"] = [self._float64(v) for v in model.non_trainable_variables]
                st["ov"] = [self._float64(v, rate=v is getattr(opt, "_learning_rate", None))
                            for v in opt.variables]

                def step(tv, ntv, ov, xs, ys):
                    def loss_fn(tv):
                        out, new_ntv = model.stateless_call(tv, ntv, xs, training=True)
                        return _loss(out, ys), new_ntv
                    (loss, new_ntv), grads = jax.value_and_grad(loss_fn, has_aux=True)(tv)
                    with self.keras.StatelessScope(state_mapping=list(zip(opt.variables, ov))):
                        lr = jnp.asarray(opt.learning_rate, jnp.float64)
                    new_tv, new_ov = opt.stateless_apply(ov, grads, tv)
                    return loss, lr, new_tv, new_ntv, new_ov
                st["step"] = step
                st["fn"] = None
            xs = jnp.asarray(self._nhwc(x, np.float64))
            ys = _targets(labels, np.float64)
            args = (st["tv"], st["ntv"], st["ov"], xs, ys)
            if st["fn"] is None:  # compiled once, for every step
                st["fn"] = self._pieces(st["step"], *args)
            loss, lr, st["tv"], st["ntv"], st["ov"] = st["fn"](*args)
            arrays = {v.path: np.asarray(a, np.float64) for v, a in zip(
                model.trainable_variables + model.non_trainable_variables, st["tv"] + st["ntv"])}
        return {"loss": float(loss), "lr": float(lr), "arrays": arrays}

    def _float64(self, v, rate: bool = False):
        """A variable's value as a float64 JAX array (integers, as the iteration count, kept);
        ``rate``: the learning rate's float32 read as the decimal it prints as."""
        import jax.numpy as jnp
        a = np.asarray(self.keras.ops.convert_to_numpy(v.value))
        if not np.issubdtype(a.dtype, np.floating):
            return jnp.asarray(a)
        # the rate as Keras holds it, a float32 (already widened when read inside
        # _optimizer_at_float64: the widened value is the float32's, 0.0500000007)
        if rate and a.ndim == 0 and float(np.float32(a)) == float(a):
            return jnp.asarray(float(np.format_float_positional(np.float32(a), unique=True)),
                               jnp.float64)
        return jnp.asarray(a, jnp.float64)

    @contextlib.contextmanager
    def _optimizer_at_float64(self, opt):
        """The optimiser's floating variables (its moments, its learning rate) holding float64
        values inside stateless_apply, for the duration."""
        own = [v for v in opt.variables if "float" in str(v._dtype)]
        dtypes = [v._dtype for v in own]
        try:
            for v in own:
                v._dtype = "float64"
            yield
        finally:
            for v, d in zip(own, dtypes):
                v._dtype = d

    def __init__(self, model):
        super().__init__("keras", model, None)
        self.built_at: Dict[str, str] = {}  # set by user(): the factory ran while recording
        self.compile_s = 0.0  # seconds spent tracing and compiling its jitted calls
        self.keras = import_keras()
        last = model.layers[-1] if getattr(model, "layers", None) else None
        self.softmax = last if getattr(last, "activation", None) is \
            self.keras.activations.softmax else None
        if self.softmax is not None:
            self.notes.append(f"the model ends in a softmax (its '{last.name}' layer's "
                              "activation): the logits before it are compared")
        self.channels_first = self.keras.config.image_data_format() == "channels_first"
        self.torch_threads = None  # PyTorch's thread count before reference(), restored by close()

    def close(self):
        if self.torch_threads is not None:
            import torch
            torch.set_num_threads(self.torch_threads)
            self.torch_threads = None

    # ------------------------------------------------------------------ tensors
    def _variables(self, which="weights"):
        out = {}
        for v in getattr(self.model, which):
            name = v.path
            if name in out:
                raise CheckError(f"the Keras model has two variables at {name!r}: give its "
                                 "layers unique names")
            out[name] = v
        return out

    def tensors(self) -> dict:
        arrays = {k: np.asarray(self.keras.ops.convert_to_numpy(v.value))
                  for k, v in self._variables().items()}
        return {"arrays": arrays, "trainable": list(self._variables("trainable_weights")),
                "layout": "flax", "ordered": True}

    def load(self, arrays: Dict[str, np.ndarray]) -> None:
        own = self._variables()
        bad = [k for k in arrays if k not in own or tuple(own[k].shape) != np.shape(arrays[k])]
        if bad:
            raise ValueError(f"cannot load {bad[:3]} into the model (unknown name or other shape)")
        for k, a in arrays.items():
            own[k].assign(np.asarray(a, dtype=own[k].dtype))

    def bn_settings(self) -> Dict[str, dict]:
        raw = {}
        for layer in self.model._flatten_layers(include_self=False, recursive=True):
            if isinstance(layer, self.keras.layers.BatchNormalization):
                v = layer.moving_mean
                raw[v.path.rsplit("/", 1)[0]] = {"epsilon": float(layer.epsilon),
                                                 "momentum": float(layer.momentum)}
        return keep_share_in_torch_words(raw, "Keras")

    def sites(self) -> Dict[str, str]:
        return dict(self.built_at)

    # ------------------------------------------------------------------ running
    def _layers_by_module(self) -> dict:
        """The model's module name (its variables' path less the leaf) -> the layer."""
        out = {}
        for layer in self.model._flatten_layers(include_self=False, recursive=True):
            own = list(getattr(layer, "_trainable_variables", [])) + list(
                getattr(layer, "_non_trainable_variables", []))
            if own:
                out[own[0].path.rsplit("/", 1)[0]] = layer
        return out

    @contextlib.contextmanager
    def _capturing(self, modules, captured):
        """Each of ``modules``' layers records its output into ``captured`` when called (its
        ``call`` wrapped, for the duration)."""
        by_module = self._layers_by_module()
        patched = []

        def wrap(name, layer):
            inner = layer.call

            def call(*args, **kwargs):
                out = inner(*args, **kwargs)
                captured.setdefault(name, out)
                return out
            return call
        try:
            for name in modules:
                layer = by_module.get(name)
                if layer is not None:
                    layer.call = wrap(name, layer)
                    patched.append(layer)
            yield
        finally:
            for layer in patched:
                del layer.call

    @contextlib.contextmanager
    def _as(self, dtype):
        """The model's layers (and those it creates as it runs) computing at ``dtype``, its
        variables taking values of that dtype inside stateless_call, and a final softmax
        left out, for the duration (all restored after)."""
        import jax
        keras = self.keras
        layers = list(self.model._flatten_layers(include_self=True, recursive=True))
        policies = [layer.dtype_policy for layer in layers]
        variables = list(self.model.variables)
        dtypes = [v._dtype for v in variables]
        softmax = self.softmax.activation if self.softmax is not None else None
        default = keras.config.dtype_policy()
        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(jax.default_matmul_precision("highest"))
                if dtype == "float64":
                    stack.enter_context(jax.enable_x64(True))
                    # layers the model creates as it runs (keras.layers.concatenate in a
                    # call) take the default policy
                    keras.config.set_dtype_policy("float64")
                    stack.enter_context(_promoting_float64())
                    for layer in layers:
                        layer.dtype_policy = keras.DTypePolicy("float64")
                    for v in variables:
                        v._dtype = "float64"
                if self.softmax is not None:
                    self.softmax.activation = keras.activations.linear
                yield
        finally:
            keras.config.set_dtype_policy(default)
            for layer, p in zip(layers, policies):
                layer.dtype_policy = p
            for v, d in zip(variables, dtypes):
                v._dtype = d
            if self.softmax is not None:
                self.softmax.activation = softmax

    def run(self, x, labels=None, modules=(), train: bool = False, dtype: str = "float32") -> dict:
        """Compiled (``stateless_call``, traced once and compiled in pieces): the logits, the
        outputs of ``modules`` (NCHW), and with labels the loss, gradients and BatchNorm
        statistics after the step."""
        import jax
        import jax.numpy as jnp
        model = self.model
        tv_vars, ntv_vars = model.trainable_variables, model.non_trainable_variables
        captured: dict = {}
        with self._as(dtype), self._capturing(list(modules), captured):
            value = (lambda v: jnp.asarray(np.asarray(self.keras.ops.convert_to_numpy(v.value)),
                                           dtype))
            tv, ntv = [value(v) for v in tv_vars], [value(v) for v in ntv_vars]
            xs = jnp.asarray(self._nhwc(x, dtype))

            def forward(tv, ntv, xs):
                captured.clear()
                out, new_ntv = model.stateless_call(tv, ntv, xs, training=train)
                return out, dict(captured), new_ntv

            if labels is None:
                logits, outs, _ = self._pieces(forward, tv, ntv, xs)(tv, ntv, xs)
                res = {"logits": np.asarray(logits, dtype)}
            else:
                # the float64 step: jax.value_and_grad of the loss, traced once and compiled
                # in pieces (densenet_flax.runtime.jit_in_pieces): XLA's compile time grows
                # much faster than the program (keras.applications' DenseNet-169 at 64 px,
                # each in its own process: 21.9 s as one program, 4.1 s as 16 pieces on two
                # threads; it took 8.8 + 19.9 s as a forward and a backward program)
                def step(tv, ntv, xs, ys):
                    def loss_fn(tv):
                        logits, outs, new_ntv = forward(tv, ntv, xs)
                        return _loss(logits, ys), (logits, outs, new_ntv)
                    return jax.value_and_grad(loss_fn, has_aux=True)(tv)
                ys = _targets(labels, dtype)
                (loss, (logits, outs, new_ntv)), grads = self._pieces(step, tv, ntv, xs, ys)(
                    tv, ntv, xs, ys)
                res = {"logits": np.asarray(logits, dtype), "loss": float(loss),
                       "grads": {v.path: np.asarray(g, dtype) for v, g in zip(tv_vars, grads)},
                       "state": {v.path: np.asarray(a, dtype) for v, a in zip(ntv_vars, new_ntv)}}
        res["outputs"] = {n: self._nchw(o, dtype) for n, o in outs.items()}
        return res

    def _pieces(self, fn, *args):
        """``fn`` traced for ``args`` and compiled in pieces (COMPILER_OPTIONS), on as many
        threads as this process has CPUs: a callable for arguments like ``args``; the seconds
        that took added to ``compile_s`` (the check's timings say how much of a phase was
        compilation)."""
        import time
        from densenet_flax.runtime import jit_in_pieces
        t = time.perf_counter()
        gc.disable()  # tracing makes many objects, none of them garbage: no collections then
        try:
            return jit_in_pieces(fn, *args, compile=self._compile)
        finally:
            gc.enable()
            self.compile_s += time.perf_counter() - t

    @staticmethod
    def _compile(lowered):
        """A lowered program compiled with the first of COMPILER_OPTIONS this XLA knows."""
        for options in COMPILER_OPTIONS:
            try:
                return lowered.compile(options)
            except Exception:  # noqa: BLE001 - an XLA that does not know an option
                if options is None:
                    raise

    def _nhwc(self, x, dtype):
        """The canonical NCHW input in the model's layout (an (N, features) input as it is)."""
        x = np.asarray(x, dtype)
        return x.transpose(0, 2, 3, 1) if x.ndim == 4 and not self.channels_first else x

    def _nchw(self, y, dtype):
        y = np.asarray(y, dtype)
        return np.ascontiguousarray(y.transpose(0, 3, 1, 2) if y.ndim == 4 and
                                    not self.channels_first else y)


def _targets(labels, dtype):
    """The loss's targets: integer labels as int32, float targets (the MLP family's prices) at
    ``dtype``."""
    import jax.numpy as jnp
    labels = np.asarray(labels)
    return jnp.asarray(labels, dtype if np.issubdtype(labels.dtype, np.floating) else jnp.int32)


def _loss(out, ys):
    """The batch mean of the softmax cross-entropy against integer labels, or of the squared
    error against float targets shaped as the outputs (the other subjects' loss)."""
    import jax
    import jax.numpy as jnp
    if jnp.issubdtype(ys.dtype, jnp.floating):
        return jnp.mean((out - ys.reshape(out.shape)) ** 2)
    logp = jax.nn.log_softmax(out, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, ys[:, None], axis=-1))


@contextlib.contextmanager
def _promoting_float64():
    """Keras' type promotion keeping float64 (for the duration). Keras 3 maps a promoted
    float64 to float32 on every backend but TensorFlow (keras.src.backend.common.dtypes:
    BIT64_TO_BIT32_DTYPE, 'to be aligned with JAX's default'), so its BatchNormalization, which
    computes at result_type(input, 'float32'), runs at float32 under any dtype policy; the float64
    step needs it at float64. A Keras without that table cannot run the step at float64: the
    error says so, and the check compares the step in float32 instead, with a note (engine)."""
    try:
        from keras.src.backend.common import dtypes
        table = dtypes.BIT64_TO_BIT32_DTYPE
    except (ImportError, AttributeError):
        import keras
        raise RuntimeError(f"Keras {keras.__version__} has no float64 type promotion table "
                           "(keras.src.backend.common.dtypes.BIT64_TO_BIT32_DTYPE): its "
                           "BatchNormalization would compute at float32") from None
    had = table.get("float64")
    table["float64"] = "float64"
    try:
        yield
    finally:
        table["float64"] = had


def owns(obj) -> Optional[str]:
    return "keras" if class_is(obj, "keras", "Model") else None


def wrap(model, variant: str = "keras") -> Subject:
    return KerasSubject(model)


def user(factory: str, path: Optional[str], size: int, in_channels: Optional[int],
         variant: str = "keras") -> Subject:
    import densenet_spec as spec
    from densenet_spec import sites
    keras = import_keras()
    record = []

    def build():
        with sites.recording([(keras.layers.Layer, "__init__", "self")]) as built:
            with _numpy_initializers(keras):
                model = spec.call_factory(factory, path)  # where each layer is built, recorded
        if not isinstance(model, keras.Model):
            raise TypeError(f"{factory} returned {type(model).__name__}, not a keras.Model")
        record[:] = [built]
        return model
    model = build()
    if not model.built:  # a subclassed model without an input shape: built by a first call,
        errors = []      # each try on a model built afresh (a failed one leaves layers built)
        for i, c in enumerate([in_channels] if in_channels else [1, 3]):
            model = model if i == 0 else build()
            shape = (1, c, size, size) if keras.config.image_data_format() == "channels_first" \
                else (1, size, size, c)
            try:
                with _numpy_initializers(keras):
                    model(np.zeros(shape, np.float32))
                break
            except Exception as e:  # noqa: BLE001 - try the next channel count, then report all
                errors.append(f"{c} input channel(s): {str(e).splitlines()[0]}")
        else:
            raise ValueError(f"the model does not build on a {size}x{size} input: "
                             + "; ".join(errors))
    subject = KerasSubject(model)
    subject.built_at = {name: record[0].of(layer) for name, layer in
                        subject._layers_by_module().items() if record[0].of(layer)}
    return subject


@contextlib.contextmanager
def _numpy_initializers(keras):
    """While the user's factory builds the model: the JAX backend's random draws (normal,
    uniform, truncated normal) and its zeros and ones made by NumPy. Keras' own compile a
    program for every shape (keras.applications' DenseNet-201: 109 programs, 8 s of a 10 s
    build on this 2-core CPU); the check never uses the values they make (every parameter and
    statistic is set from the canonical state before a number is compared), and zeros and ones
    are the same either way. Restored after, whatever happens; another backend: unchanged."""
    try:
        from keras.src.backend.jax import numpy as jnp_backend, random as random_backend
    except ImportError:  # not the JAX backend, or another Keras layout: Keras' own draws
        yield
        return
    import jax.numpy as jnp
    rng = np.random.default_rng(0)

    def made(a, dtype):  # a NumPy array as the backend's tensor of ``dtype``
        return jnp.asarray(a.astype(keras.backend.standardize_dtype(
            dtype or keras.backend.floatx())))

    def normal(shape, mean=0.0, stddev=1.0, dtype=None, seed=None):
        return made(rng.normal(mean, stddev, shape), dtype)

    def uniform(shape, minval=0.0, maxval=1.0, dtype=None, seed=None):
        return made(rng.uniform(minval, maxval, shape), dtype)

    def truncated_normal(shape, mean=0.0, stddev=1.0, dtype=None, seed=None):
        x = rng.standard_normal(shape)  # within 2 stddev, as Keras' own
        out = np.abs(x) > 2
        while out.any():
            x[out] = rng.standard_normal(int(out.sum()))
            out = np.abs(x) > 2
        return made(mean + stddev * x, dtype)

    def zeros(shape, dtype=None):
        return made(np.zeros(shape), dtype)

    def ones(shape, dtype=None):
        return made(np.ones(shape), dtype)
    made_here = {(random_backend, "normal"): normal, (random_backend, "uniform"): uniform,
                 (random_backend, "truncated_normal"): truncated_normal,
                 (jnp_backend, "zeros"): zeros, (jnp_backend, "ones"): ones}
    own = {k: getattr(*k) for k in made_here if hasattr(*k)}
    try:
        for (module, name), f in made_here.items():
            if (module, name) in own:
                setattr(module, name, f)
        yield
    finally:
        for (module, name), f in own.items():
            setattr(module, name, f)


APPLICATIONS = {"densenet121": "DenseNet121", "densenet169": "DenseNet169",
                "densenet201": "DenseNet201"}


def applications_model(config, size: int) -> KerasSubject:
    """keras.applications' DenseNet of a preset (weights=None: nothing is downloaded), for a
    weights file's numbers in Keras."""
    keras = import_keras()
    name = APPLICATIONS.get(config.name)
    if name is None:
        raise CheckError(f"keras.applications has no DenseNet of preset '{config.name}' (it has "
                         f"{', '.join(APPLICATIONS)}); check the file with another --framework")
    with _numpy_initializers(keras):  # the file's weights replace every value
        model = getattr(keras.applications, name)(
            weights=None, input_shape=(size, size, config.in_channels),
            classes=config.num_classes)
    return KerasSubject(model)


def run_weights(config, state, x, size: int):
    """A weights file's canonical ``state`` in keras.applications' DenseNet of its preset: its
    eval logits on ``x`` (NCHW), and what the report must say."""
    from densenet_weights import formats
    model = applications_model(config, size)
    model.load(formats.native(state, "keras")[1])
    return model.run(x=x)["logits"], model.notes + ["the weights in keras.applications' DenseNet"]


def reference(config, size: int, user: Subject) -> Subject:
    """Our PyTorch DenseNet (no Keras mirror), PyTorch on one thread until the check closes the
    model's subject: beside JAX in this process, on a machine shared with other work, PyTorch's
    two OpenMP threads ran its reference phases ~30x slower (keras.applications' DenseNet-121 at
    64 px, load average 3: 36 s on two threads, 1.2 s on one; the arithmetic is the same)."""
    import torch
    from densenet_parity.checking import subject_torch
    if isinstance(user, KerasSubject) and user.torch_threads is None:
        user.torch_threads = torch.get_num_threads()
        torch.set_num_threads(1)
    return subject_torch.reference(config, size, user)
