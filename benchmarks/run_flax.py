"""Case runner for JAX / Flax: densenet_flax.model (NNX) and densenet_flax.linen.

Fast paths (case["opts"]):

* jit: how the steps are compiled. NNX: "functional" (nnx.split the model once into a graph
  definition and pure state, jax.jit a function of the state that nnx.merge's it: no graph
  traversal per call), "nnx" (nnx.jit over the model object, the idiomatic NNX API), "none"
  (eager, op by op). linen: "jax" (jax.jit of model.apply) or "none".
* donate: donate the parameters and BatchNorm state to the train step (donate_argnums), so
  XLA updates them in place instead of holding two copies.

dtype bfloat16 means bfloat16 *compute*: the float32 master parameters (and, for evaluation,
the running statistics) and the input are cast to bfloat16 inside the compiled step, the
gradients flow back to float32 and SGD updates float32; logits are cast to float32 for the loss.
densenet_flax has no compute-dtype option, so the cast is done here (see the notes).
"""
from __future__ import annotations

from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common


class Unsupported(Exception):
    """The case cannot run here (reported as 'not supported', with the reason)."""


def default_opts(variant: str) -> Dict[str, object]:
    from benchmarks.defaults import default_opts as d
    return d(f"flax-{variant}", jax.devices()[0].platform != "cpu")


def versions() -> Dict[str, str]:
    import flax
    v = {"jax": jax.__version__, "jaxlib": getattr(jax.lib, "__version__", ""),
         "flax": flax.__version__, "numpy": np.__version__}
    try:
        import jaxlib
        v["jaxlib"] = jaxlib.__version__
    except (ImportError, AttributeError):
        pass
    return v


def device_name() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{d.id} ({d.device_kind})" if d.platform != "cpu" else "cpu"


def cross_entropy(logits, labels):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))


def _cast(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                        tree)


def _paths(tree) -> Dict[str, np.ndarray]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(k): np.asarray(v, np.float32) for k, v in flat}


class Bench:
    def __init__(self, case, return_grads=False):
        self.case = case
        self.variant = case["backend"].split("-", 1)[1]
        self.opts = dict(default_opts(self.variant), **(case.get("opts") or {}))
        self.notes = []
        self.return_grads = return_grads
        p = common.config(case)
        n, s = case["batch"], case["size"]
        key_x, key_y = jax.random.split(jax.random.key(1))
        self.x = jax.random.normal(key_x, (n, s, s, p.in_channels), jnp.float32)
        self.y = jax.random.randint(key_y, (n,), 0, p.num_classes)
        self.compute = jnp.bfloat16 if case["dtype"] == "bfloat16" else jnp.float32
        if self.compute == jnp.bfloat16:
            self.notes.append("bfloat16 compute: densenet_flax has no dtype option, so the "
                              "benchmark casts parameters and input to bfloat16 inside the "
                              "compiled step (float32 master weights, SGD in float32)")
        eff = case["mode"] == "efficient"
        self.lowered = {}
        self._compiled = {}
        self._pending = []
        if self.variant == "nnx":
            self._build_nnx(case["preset"], eff)
        else:
            self._build_linen(case["preset"], eff)

    # ------------------------------------------------------------------ NNX
    def _build_nnx(self, preset, eff):
        from flax import nnx
        from densenet_flax import model as M
        self.model = M.build(preset, memory_efficient=eff, rngs=nnx.Rngs(self.case.get("seed", 0)),
                             **(self.case.get("options") or {}))
        jit = self.opts["jit"]
        if jit == "nnx":
            if self.compute != jnp.float32:
                raise Unsupported("jit='nnx' (nnx.jit over the model object) runs in the model's "
                                  "own dtype: float32 only (densenet_flax has no dtype option)")
            self._nnx_object_steps()
            return
        if jit not in ("functional", "none"):
            raise ValueError(f"flax-nnx jit must be functional, nnx or none, got {jit!r}")
        model = self.model
        model.eval()
        gd_eval = nnx.graphdef(model)
        model.train()
        gd_train, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
        self.params, self.stats = params, stats
        compute = self.compute

        def eval_fn(params, stats, x):
            m = nnx.merge(gd_eval, _cast(params, compute), _cast(stats, compute))
            return m(x.astype(compute))

        def train_fn(params, stats, x, y):
            def loss_fn(params):
                # fresh Variable objects at this trace level (tree.map makes copies): the
                # BatchNorm update mutates them inside the gradient's trace
                m = nnx.merge(gd_train, _cast(params, compute), jax.tree.map(lambda a: a, stats))
                loss = cross_entropy(m(x.astype(compute)), y)
                return loss, nnx.state(m, nnx.BatchStat)
            (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            new_params = jax.tree.map(lambda p, g: p - common.LR * g, params, grads)
            return (new_params, new_stats, loss) + ((grads,) if self.return_grads else ())

        self._functional(eval_fn, train_fn)

    def _nnx_object_steps(self):
        from flax import nnx
        donate = {"donate_argnums": 0} if self.opts["donate"] else {}

        @nnx.jit
        def eval_fn(model, x):
            return model(x)

        def train_fn(model, x, y):
            def loss_fn(model):
                return cross_entropy(model(x), y)
            loss, grads = nnx.value_and_grad(loss_fn)(model)
            params = nnx.state(model, nnx.Param)
            nnx.update(model, jax.tree.map(lambda p, g: p - common.LR * g, params, grads))
            return (loss, grads) if self.return_grads else loss

        train_fn = nnx.jit(train_fn, **donate)
        model = self.model

        def eval_step():
            model.eval()
            out = eval_fn(model, self.x)
            self._pending.append(out)
            return out

        def train_step():
            model.train()
            out = train_fn(model, self.x, self.y)
            if self.return_grads:
                out, self._grads = out
            self._pending.append(out)
            return out
        self.eval_step, self.train_step = eval_step, train_step
        self._nnx_object = True

    # ------------------------------------------------------------------ linen
    def _build_linen(self, preset, eff):
        from densenet_flax import linen as L
        model = L.build(preset, memory_efficient=eff, **(self.case.get("options") or {}))
        variables = jax.jit(lambda k, x: model.init(k, x, train=False))(
            jax.random.key(self.case.get("seed", 0)), self.x[:1])
        self.params, self.stats = variables["params"], variables["batch_stats"]
        compute = self.compute
        if self.opts["jit"] not in ("jax", "none"):
            raise ValueError(f"flax-linen jit must be jax or none, got {self.opts['jit']!r}")

        def eval_fn(params, stats, x):
            return model.apply({"params": _cast(params, compute),
                                "batch_stats": _cast(stats, compute)},
                               x.astype(compute), train=False)

        def train_fn(params, stats, x, y):
            def loss_fn(params):
                logits, upd = model.apply({"params": _cast(params, compute), "batch_stats": stats},
                                          x.astype(compute), train=True, mutable=["batch_stats"])
                return cross_entropy(logits, y), upd["batch_stats"]
            (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            new_params = jax.tree.map(lambda p, g: p - common.LR * g, params, grads)
            return (new_params, new_stats, loss) + ((grads,) if self.return_grads else ())

        self._functional(eval_fn, train_fn)

    # ------------------------------------------------------------------ shared
    def _functional(self, eval_fn, train_fn):
        jit = self.opts["jit"] != "none"
        if jit:
            donate = (0, 1) if self.opts["donate"] else ()
            eval_fn = jax.jit(eval_fn)
            train_fn = jax.jit(train_fn, donate_argnums=donate)
            self.lowered = {"eval": (eval_fn, (self.params, self.stats, self.x)),
                            "train": (train_fn, (self.params, self.stats, self.x, self.y))}
        elif self.opts["donate"]:
            self.opts["donate"] = False  # nothing to donate to without a compiled step
        self._eval_fn, self._train_fn = eval_fn, train_fn
        self._compiled = {}

    def _fn(self, phase):
        """The compiled step (AOT: lowered and compiled once, timed as the first step)."""
        if phase not in self._compiled:
            if phase in self.lowered:
                fn, args = self.lowered[phase]
                self._compiled[phase] = fn.lower(*args).compile()
            else:
                self._compiled[phase] = self._eval_fn if phase == "eval" else self._train_fn
        return self._compiled[phase]

    def eval_step(self):
        out = self._fn("eval")(self.params, self.stats, self.x)
        self._pending.append(out)
        return out

    def train_step(self):
        out = self._fn("train")(self.params, self.stats, self.x, self.y)
        self.params, self.stats, loss = out[:3]
        if self.return_grads:
            self._grads = out[3]
        self._pending.append(loss)
        return loss

    def sync(self):
        """Wait for every step dispatched since the last sync (JAX dispatches asynchronously;
        independent eval steps may even run concurrently, so waiting for the last is not
        enough)."""
        pending, self._pending = self._pending, []
        if getattr(self, "_nnx_object", False):
            from flax import nnx
            pending.append(nnx.state(self.model))
        elif hasattr(self, "params"):
            pending.append((self.params, self.stats))  # the current ones: never donated yet
        jax.block_until_ready(pending)

    # ---- for the fast-path correctness check
    def eval_logits(self):
        return np.asarray(self.eval_step(), np.float32)

    def train_result(self):
        loss = self.train_step()
        if getattr(self, "_nnx_object", False):
            from flax import nnx
            stats = nnx.state(self.model, nnx.BatchStat)
        else:
            stats = self.stats
        return float(loss), _paths(self._grads), _paths(stats)

    # ---- memory
    def memory_begin(self):
        d = jax.devices()[0]
        ms = d.memory_stats() if d.platform != "cpu" else None
        return {"in_use_before": ms.get("bytes_in_use")} if ms else {}

    def memory_end(self, before):
        d = jax.devices()[0]
        ms = d.memory_stats() if d.platform != "cpu" else None
        if not ms:
            return {}
        peak = ms.get("peak_bytes_in_use")
        out = {"device_peak_bytes": peak, "device_source":
               "jax device.memory_stats()['peak_bytes_in_use'] (process peak so far)"}
        if before.get("in_use_before") is not None and peak is not None:
            out["device_peak_over_before_bytes"] = peak - before["in_use_before"]
        return out

    def compiled_memory(self, phase):
        c = self._compiled.get(phase)
        if c is None or not hasattr(c, "memory_analysis"):
            return None
        try:
            m = c.memory_analysis()
        except Exception as e:  # noqa: BLE001 - not every backend offers it
            return {"error": common.error_info(e)}
        if m is None:
            return None
        keys = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
                "alias_size_in_bytes", "generated_code_size_in_bytes")
        out = {k: int(getattr(m, k, 0) or 0) for k in keys}
        out["total_bytes"] = (out["temp_size_in_bytes"] + out["argument_size_in_bytes"]
                              + out["output_size_in_bytes"] - out["alias_size_in_bytes"])
        out["source"] = "XLA compiled.memory_analysis(): arguments + outputs + temporaries - aliased"
        return out


def prepare(case):
    return Bench(case)


def fast_path_pair(case, plain_opts):
    """The plain configuration and the case's with the same weights (same seed). Full float32
    precision for convolutions and dots (no TF32 on a GPU), as in the parity suite's GPU tests."""
    jax.config.update("jax_default_matmul_precision", "highest")
    plain = Bench(dict(case, opts=plain_opts, dtype="float32"), return_grads=True)
    fast = Bench(case, return_grads=True)
    return plain, fast


def info(bench):
    return {"device": device_name(), "versions": versions(), "opts": bench.opts,
            "notes": bench.notes}
