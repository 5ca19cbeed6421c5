"""Check your own DenseNet: is this model (PyTorch, Gluon, Flax NNX or linen) the network of a
preset, and if not, where does it first differ, in the book's words?

1. *Structure.* The model's tensors are matched onto the preset's canonical names by structure
   (densenet_weights.match: each kind of layer in order, shapes in PyTorch's layout). The first
   layer that differs is named with the channel arithmetic behind it.
2. *Numbers.* The same canonical weights (random, with non-trivial BatchNorm statistics, or
   a given file) go into the model and into our reference in the same framework and the same
   process. Eval-mode logits must agree to 1e-5 (float32); one train-mode step in float64 must
   give the same loss, gradients and updated BatchNorm statistics (1e-6). Where they do not,
   the outputs of every matched layer (forward hooks in PyTorch and Gluon, traced intermediates
   in Flax) name the first layer whose output differs, its largest difference, and the
   convention most likely behind it.

Accepted as the same network: each framework's own BatchNorm running-variance convention (Gluon
and Flax update it with the biased batch variance, PyTorch with the unbiased one; the report
notes it). Everything else that changes a number is a difference.

    from densenet_parity import assert_same_densenet
    assert_same_densenet(model, preset="book")            # raises AssertionError with the report

``densenet check`` (densenet_cli) runs it on MODULE:FUNCTION or a weights file; Gluon models
from the main environment run in the MXNet environment's worker.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Dict, List, Optional, Tuple

import numpy as np

import densenet_spec as spec
from densenet_weights import match as matching

EVAL_RTOL = 1e-5     # float32 eval-mode outputs (same framework, same weights)
STEP_RTOL = 1e-6     # float64 loss, gradients, BatchNorm statistics after one step
GRAD_FLOOR = 1e-8    # a gradient is compared relative to at least this share of the largest
BATCH = 2
FRAMEWORKS = ("torch", "mxnet", "flax")


class CheckError(ValueError):
    """The check cannot run as asked (a bad option, a model of no known framework)."""


# --------------------------------------------------------------------------- the model's side

def framework_of(model) -> Tuple[str, str]:
    """(framework, variant) of a model object, from its class (no framework is imported)."""
    obj = model[0] if isinstance(model, tuple) and len(model) == 2 else model
    for cls in type(obj).__mro__:
        mod = cls.__module__ or ""
        if mod.startswith("torch.nn") and cls.__name__ == "Module":
            return "torch", "torch"
        if mod.startswith("mxnet.gluon") and cls.__name__ == "Block":
            return "mxnet", "mxnet"
        if mod.startswith("flax.nnx") and cls.__name__ == "Module":
            return "flax", "nnx"
        if mod.startswith("flax.linen") and cls.__name__ == "Module":
            return "flax", "linen"
    raise CheckError(f"{type(obj).__name__} is not a model of a framework this project checks: "
                     "expected a torch.nn.Module, a mxnet.gluon.Block, a flax.nnx.Module or a "
                     "flax.linen.Module (alone or with its variables)")


def _adapter(framework: str):
    import importlib
    return importlib.import_module(f"densenet_{framework}.adapter")


class Subject:
    """A model and the adapter that runs it, in this process."""

    def __init__(self, framework: str, variant: str, model):
        self.framework, self.variant, self.model = framework, variant, model
        self.adapter = _adapter(framework)

    def tensors(self) -> dict:
        return self.adapter.model_tensors(self.model, variant=self.variant)

    def load(self, arrays: Dict[str, np.ndarray]) -> None:
        self.model = self.adapter.set_model_tensors(self.model, arrays, variant=self.variant)

    def run(self, **kw) -> dict:
        return self.adapter.model_run(self.model, variant=self.variant, **kw)

    def close(self):
        pass


class RemoteSubject(Subject):
    """A Gluon model that lives in the MXNet environment's worker (a handle here)."""

    def __init__(self, backend, handle):
        self.framework, self.variant, self.backend, self.model = "mxnet", "mxnet", backend, handle

    def tensors(self) -> dict:
        return self.backend.call("model_tensors", model=self.model)

    def load(self, arrays):
        self.model = self.backend.call("set_model_tensors", model=self.model, arrays=arrays)

    def run(self, **kw) -> dict:
        out = self.backend.call("model_run", model=self.model, **kw)
        out["logits"] = np.asarray(out["logits"])
        out.setdefault("outputs", {})
        return out


# --------------------------------------------------------------------------- weights

def random_state(config: spec.Preset, seed: int = 0) -> Dict[str, np.ndarray]:
    """Canonical weights for the comparison: Xavier-uniform kernels (the book's initialiser),
    and everything a convention could hide behind made non-trivial: BatchNorm scale and shift,
    running mean and variance, conv and dense biases."""
    from densenet_training.recipe import xavier_state
    state = xavier_state(config, seed)
    rng = np.random.default_rng(seed + 1)
    for name, shape, _ in spec.canonical_tensors(config):
        module, leaf = name.rsplit(".", 1)
        is_bn = f"{module}.running_mean" in state
        if is_bn and leaf in ("weight", "running_var"):
            state[name] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif leaf in ("bias", "running_mean"):
            state[name] = rng.normal(0, 0.1, shape).astype(np.float32)
    return state


def _to_model(state: Dict[str, np.ndarray], mapping: Dict[str, str], layout: str):
    """Canonical arrays -> the model's names and layout."""
    out = {}
    for cname, fname in mapping.items():
        a = np.asarray(state[cname], np.float32)
        if layout == "flax" and a.ndim == 4:
            a = a.transpose(2, 3, 1, 0)
        elif layout == "flax" and a.ndim == 2:
            a = a.T
        out[fname] = np.ascontiguousarray(a)
    return out


def _to_canonical(arrays: Dict[str, np.ndarray], mapping: Dict[str, str], layout: str):
    inverse = {f: c for c, f in mapping.items()}
    out = {}
    for fname, a in arrays.items():
        if fname not in inverse:
            continue
        a = np.asarray(a)
        if layout == "flax" and a.ndim == 4:
            a = a.transpose(3, 2, 0, 1)
        elif layout == "flax" and a.ndim == 2:
            a = a.T
        out[inverse[fname]] = a
    return out


# --------------------------------------------------------------------------- the report

@dataclasses.dataclass
class Report:
    framework: str
    variant: str
    model: str
    preset: str
    config: dict
    input_shape: List[int]
    rows: List[dict]                      # per stage: spec and model counts
    totals: dict                          # the model's own totals, matched or not
    output_shape: Optional[List[int]] = None
    structure: Optional[str] = None       # the first structural difference
    cause: Optional[str] = None           # the convention most likely behind it
    numbers: Dict[str, float] = dataclasses.field(default_factory=dict)
    first: Optional[dict] = None          # the first layer whose output differs
    notes: List[str] = dataclasses.field(default_factory=list)
    error: Optional[str] = None           # the model could not run
    weights: str = "random"

    @property
    def same(self) -> bool:
        return self.structure is None and self.first is None and self.error is None and bool(
            self.numbers)

    @property
    def verdict(self) -> str:
        return "same network" if self.same else "different"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["verdict"], d["same"] = self.verdict, self.same
        return d

    def render(self) -> str:
        from densenet_parity.report import table
        fw = self.framework + (f" ({self.variant})" if self.framework == "flax" else "")
        lines = [f"densenet check: {self.model} ({fw}) against preset '{self.preset}', input "
                 f"{'x'.join(map(str, self.input_shape))} (NCHW), weights: {self.weights}", ""]
        rows = []
        for r in self.rows:
            rows.append([r["stage"], _n(r["spec_params"]), _n(r["spec_state"]),
                         _n(r["params"]), _n(r["state"]),
                         "ok" if r["ok"] else "not matched" if r["params"] is None else "DIFFERENT"])
        t = self.totals
        rows.append(["total", _n(t["spec_params"]), _n(t["spec_state"]), _n(t["params"]),
                     _n(t["state"]), "ok" if t["ok"] else "DIFFERENT"])
        lines.append(table(["stage", "spec params", "spec BN", "model params", "model BN", "verdict"],
                           rows, "Structure (trainable parameters, BatchNorm running mean+var "
                                 "values; the model's counted from its own tensors; '-': not "
                                 "matched, after the first difference)"))
        if self.output_shape is not None:
            lines.append(f"output shape {list(self.output_shape)} (expected "
                         f"[{self.input_shape[0]}, {self.config['num_classes']}])")
        if self.structure:
            lines += ["", f"STRUCTURE: {self.structure}"]
            if self.cause:
                lines.append(f"  likely cause: {self.cause}")
        if self.numbers:
            lines += ["", "Numbers (same canonical weights in the model and the reference, same "
                          "framework): largest relative difference"]
            labels = {"eval_logits": ("eval-mode logits (float32)", EVAL_RTOL),
                      "train_loss": ("train-mode loss (float64)", STEP_RTOL),
                      "gradients": ("gradients of every parameter (float64)", STEP_RTOL),
                      "bn_statistics": ("BatchNorm statistics after the step (float64)", STEP_RTOL)}
            for key, value in self.numbers.items():
                what, tol = labels[key]
                lines.append(f"  {what:<48} {value:9.2e}  (tolerance {tol:g})  "
                             f"{'ok' if value <= tol else 'DIFFERENT'}")
        if self.first:
            f = self.first
            lines += ["", f"FIRST DIFFERENCE ({f['mode']}): {f['module']} ({f['stage']}), the "
                          f"model's '{f['foreign']}': largest difference {f['max_abs']:.3g} "
                          f"({f['rel']:.2e} relative)",
                      f"  likely cause: {f['convention']}"]
        if self.error:
            lines += ["", f"ERROR: {self.error}"]
        for n in self.notes:
            lines.append(f"note: {n}")
        lines += ["", f"Verdict: {self.verdict}."]
        return "\n".join(lines)


def _n(v):
    return "-" if v is None else f"{v:,}"


# --------------------------------------------------------------------------- comparisons

def _rel(a, b, floor: float = 0.0) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    scale = max(float(np.max(np.abs(b))) if b.size else 0.0, floor, 1e-300)
    return float(np.max(np.abs(a - b))) / scale if b.size else 0.0


def _worst(got: Dict[str, np.ndarray], ref: Dict[str, np.ndarray], floor_share: float = 0.0):
    if not ref:
        return 0.0, None
    top = max(float(np.max(np.abs(v))) for v in ref.values()) * floor_share
    diffs = {k: _rel(got.get(k, np.zeros(0)), v, top) for k, v in ref.items()}
    k = max(diffs, key=diffs.get)
    return diffs[k], k


def _previous(config, module) -> str:
    """What feeds a canonical module, in the book's words (for the likely cause)."""
    short = module[len("features."):] if module.startswith("features.") else module
    parts = short.split(".")
    if short == "conv0":
        return "stem"
    if parts[0].startswith("denseblock") and parts[2] == "norm1":
        j, b = int(parts[1][len("denselayer"):]), int(parts[0][len("denseblock"):])
        if j == 1:
            return "stem pool" if b == 1 else "transition pool"
        return "concat"
    if parts[0].startswith("transition") and parts[1] == "norm" or (
            parts[0].startswith("norm") and parts[0] != "norm0"):
        return "block output"
    if short == "classifier":
        return "head"
    return "inside"


def convention(config, module: str, kind: str, u, r, mode: str) -> str:
    """The convention most likely behind a first difference at ``module``."""
    u, r = np.asarray(u, np.float64), np.asarray(r, np.float64)
    if u.shape != r.shape:
        return (f"the output's shape is {list(u.shape)}, the reference's {list(r.shape)}: "
                "a stride, padding or pooling size differs (layout: NCHW in PyTorch and Gluon, "
                "NHWC in Flax)")
    if u.ndim == 4 and u.shape[2] == u.shape[3] and np.allclose(u, r.transpose(0, 1, 3, 2),
                                                                 rtol=1e-4, atol=1e-5):
        return "height and width are swapped (a layout transpose: NCHW vs NHWC, or HWIO vs OIHW)"
    where = _previous(config, module)
    if where == "stem":
        return ("padding of the stem's 7x7/2 conv: PyTorch pads 3 on every side; Flax's "
                "padding='SAME' at stride 2 pads 2 before and 3 after (use ((3, 3), (3, 3)))")
    if where == "stem pool":
        return ("the stem's pooling: a 3x3 max pool, stride 2, padding 1 (kind or padding; "
                "Flax's padding='SAME' at stride 2 pads asymmetrically)")
    if where == "transition pool":
        return "the transition's pooling: a 2x2 average pool, stride 2, no padding"
    if where == "concat" or where == "block output":
        return ("concatenation order: the book concatenates the input first, then the new "
                "features (torch.cat((X, Y), dim=1)); or the ReLU before this BatchNorm's layer")
    if where == "head":
        return ("the head: ReLU, then global *average* pooling (one source text has "
                "AdaptiveMaxPool2d, a copy error), then the dense layer")
    if kind == "bn":
        if mode == "eval":
            return ("BatchNorm in eval mode: epsilon (1e-5 in PyTorch, Gluon and Flax only if "
                    "set) or the running statistics it normalises with")
        return "BatchNorm in train mode: it must normalise with the batch's statistics"
    return "the convolution's padding (3x3: padding 1), or the ReLU between BatchNorm and conv"


def _first_difference(config, order, mapping_u, mapping_r, out_u, out_r, tol, mode):
    """The first module, in the preset's order, whose output differs."""
    kinds = {m: k for m, k, _ in spec.canonical_modules(config)}
    for cmod in order:
        fu, fr = mapping_u.get(cmod), mapping_r.get(cmod)
        if fu not in out_u or fr not in out_r:
            continue
        d = _rel(out_u[fu], out_r[fr])
        if d > tol:
            a, b = np.asarray(out_u[fu], np.float64), np.asarray(out_r[fr], np.float64)
            max_abs = float(np.max(np.abs(a - b))) if a.shape == b.shape else float("inf")
            return {"mode": mode, "module": cmod, "stage": spec.stage_of(cmod + ".weight"),
                    "foreign": fu, "max_abs": max_abs, "rel": d,
                    "convention": convention(config, cmod, kinds[cmod], a, b, mode)}
    return None


def _bn_statistics(config, state, new_u, new_r, framework):
    """Compare the BatchNorm statistics after one step; name momentum or variance if they
    differ. Returns (relative difference, first difference or None, notes)."""
    notes = []
    order = [n for n, _, _ in spec.canonical_tensors(config)]
    means = {k: new_r[k] for k in order if k.endswith("running_mean") and k in new_r}
    d_mean, _ = _worst({k: new_u.get(k, np.zeros(0)) for k in means}, means)
    if d_mean > STEP_RTOL:  # name the first BatchNorm (in the network's order) that differs
        k_mean = next(k for k in means if _rel(new_u.get(k, np.zeros(0)), means[k]) > STEP_RTOL)
        old = np.asarray(state[k_mean], np.float64)
        batch = (np.asarray(new_r[k_mean]) - 0.9 * old) / 0.1
        moved = np.asarray(new_u[k_mean]) - old
        m = float(np.median(moved / np.where(np.abs(batch - old) > 1e-12, batch - old, np.nan)))
        module = k_mean.rsplit(".", 1)[0]
        return d_mean, {
            "mode": "train step", "module": module, "stage": spec.stage_of(k_mean),
            "foreign": "", "max_abs": float(np.max(np.abs(moved - (np.asarray(new_r[k_mean]) - old)))),
            "rel": d_mean, "convention": (
                f"BatchNorm momentum: the model's running mean moves {m:.3g} of the way to the "
                f"batch mean per step; the reference 0.1 (PyTorch momentum=0.1 is Gluon's and "
                f"Flax's momentum=0.9: 'keep 0.9')")}, notes
    vars_ = {k: new_r[k] for k in order if k.endswith("running_var") and k in new_r}
    d_var, _ = _worst({k: new_u.get(k, np.zeros(0)) for k in vars_}, vars_)
    if d_var > STEP_RTOL:
        k_var = next(k for k in vars_ if _rel(new_u.get(k, np.zeros(0)), vars_[k]) > STEP_RTOL)
        old = np.asarray(state[k_var], np.float64)
        ratio = float(np.median((np.asarray(new_u[k_var]) - 0.9 * old)
                                / (np.asarray(new_r[k_var]) - 0.9 * old)))
        if framework in ("mxnet", "flax") and ratio < 1.0 and abs(ratio - 1.0) < 0.5:
            notes.append(f"BatchNorm updates its running variance with the biased batch variance "
                         f"({ratio:.4f} of PyTorch's unbiased one), as {framework}'s BatchNorm "
                         "does: accepted as this framework's convention")
            return 0.0, None, notes
        return d_var, {
            "mode": "train step", "module": k_var.rsplit(".", 1)[0], "stage": spec.stage_of(k_var),
            "foreign": "", "max_abs": float(np.max(np.abs(np.asarray(new_u[k_var]) - new_r[k_var]))),
            "rel": d_var, "convention": (
                f"BatchNorm variance: the model's running-variance update is {ratio:.4f} of the "
                "reference's (PyTorch averages the unbiased batch variance, n/(n-1) times the "
                "biased one)")}, notes
    return max(d_mean, d_var), None, notes


# --------------------------------------------------------------------------- the check

def _structure_rows(config, match_, tensors):
    """Per stage: the spec's counts and the model's (its tensors mapped onto the stage)."""
    inverse = {f: c for c, f in match_.mapping.items()}
    counts = {s: [0, 0] for s in spec.stage_names(config)}
    arrays, trainable = tensors["arrays"], set(tensors["trainable"])
    params = state = 0
    for name, a in arrays.items():
        n = int(np.prod(np.shape(a), dtype=np.int64))
        is_stat = matching.split_name(name)[1] in ("running_mean", "running_var", "moving_mean",
                                                   "moving_var", "mean", "var")
        if name in trainable:
            params += n
        elif is_stat:
            state += n
        if name in inverse:
            counts[spec.stage_of(inverse[name])][1 if is_stat else 0] += n
    rows = []
    diff_stage = match_.difference.stage if match_.difference else None
    after = False  # matching stops at the first difference: later stages are not matched
    for stage, sp, sb in spec.stage_counts(config):
        mp, mb = (None, None) if after else counts[stage]
        rows.append({"stage": stage, "spec_params": sp, "spec_state": sb, "params": mp,
                     "state": mb, "ok": (mp, mb) == (sp, sb) and stage != diff_stage})
        after = after or stage == diff_stage
    tp, ts = spec.total_counts(config)
    totals = {"spec_params": tp, "spec_state": ts, "params": params, "state": state,
              "ok": (params, state) == (tp, ts)}
    return rows, totals


def likely_structural_cause(config, diff: matching.Difference) -> Optional[str]:
    """The porting mistake most likely behind a structural difference."""
    import re
    if diff is None or not diff.module:
        return None
    found = [int(x) for x in re.findall(r"over (\d+) channels|-> (\d+) channels", diff.found)
             for x in x if x]
    short = diff.module.replace("features.", "")
    if diff.kind == "bn" and short.endswith("norm1") and found:
        b, j = (int(t) for t in re.findall(r"\d+", short)[:2])
        c0 = spec.module_arithmetic(config, f"features.denseblock{b}.denselayer1.norm1")
        start = int(re.search(r"input: (\d+)", c0).group(1))
        if found[0] == start and j > 1:
            return ("the layer's input did not grow: the concatenation is on the wrong axis "
                    "(channels are axis 1 in PyTorch and Gluon, NCHW; the last axis in Flax, NHWC) "
                    "or missing")
        if found[0] == config.growth_rate:
            return ("this BatchNorm sees only the new features: the layer is conv-BN-ReLU "
                    "(post-activation) where the book's is BN-ReLU-conv")
    if diff.kind == "conv" and short.startswith("transition") and len(found) >= 1:
        if "-> " in diff.found and re.search(r"(\d+) -> (\d+)", diff.found):
            cin, cout = (int(x) for x in re.search(r"(\d+) -> (\d+)", diff.found).groups())
            if cout == cin:
                return "no compression: the transition keeps every channel (the book halves them)"
            return ("the transition's channels: num_channels // 2 must be taken after adding the "
                    "block's num_convs x growth_rate channels")
    if diff.kind == "dense" and short == "classifier":
        return ("the dense layer's inputs: the head must average over height and width, NCHW's "
                "dims 2 and 3 but NHWC's axes 1 and 2 (a layout slip), leaving the channels")
    if diff.kind == "conv" and short == "conv0":
        return "the stem: a 7x7 conv with stride 2 (ImageNet stem) or a 3x3 conv (CIFAR stem)"
    return None


def check(model=None, *, framework: Optional[str] = None, factory: Optional[str] = None,
          path: Optional[str] = None, weights: Optional[str] = None, preset=None,
          size: Optional[int] = None, seed: int = 0, in_channels: Optional[int] = None,
          variant: Optional[str] = None, progress=None) -> Report:
    """Check ``model`` (or the model ``factory`` builds: 'MODULE:FUNCTION') against a preset
    (inferred when None). Returns the Report; ``report.same`` says whether it is the same
    network."""
    say = progress or (lambda msg: None)
    if model is not None:
        framework, variant = framework_of(model)
    elif framework not in FRAMEWORKS:
        raise CheckError(f"--framework must be one of {', '.join(FRAMEWORKS)}, got {framework!r}")
    variant = variant or {"torch": "torch", "mxnet": "mxnet", "flax": "nnx"}[framework]
    cfg0 = spec.make_config(preset) if preset is not None else None
    size = size or (96 if cfg0 is None or cfg0.name == "book" else
                    (16 if cfg0.stem == "cifar" else 64))
    user = ref = None
    try:
        say(f"[{framework}] building the model ...")
        user = _subject(framework, variant, model, factory, path, size,
                        in_channels or (cfg0.in_channels if cfg0 else None))
        if model is None and framework == "flax" and user.model is not None:
            variant = "nnx" if not isinstance(user.model, tuple) else "linen"
            user.variant = variant
        tensors = user.tensors()
        natural = not tensors.get("ordered", True)
        m = matching.match(tensors["arrays"], preset, layout=tensors["layout"], natural=natural)
        config = m.config
        name = factory or type(model[0] if isinstance(model, tuple) else model).__name__
        rows, totals = _structure_rows(config, m, tensors)
        report = Report(framework, variant, name, config.name, config.to_dict(),
                        [BATCH, config.in_channels, size, size], rows, totals,
                        weights=weights or f"random (seed {seed})")
        if not m.ok:
            report.structure = str(m.difference)
            report.cause = likely_structural_cause(config, m.difference)
            return report
        spec.check_input(config, (BATCH, config.in_channels, size, size))
        last = spec.stage_shapes(config, BATCH, size, size)[-2][1]
        if last[2] == 1 or last[3] == 1:
            bigger = next(s for s in range(size, 4 * size) if
                          min(spec.stage_shapes(config, 1, s, s)[-2][1][2:]) > 1)
            report.notes.append(f"at {size}x{size} the last dense block runs at {last[2]}x{last[3]}: "
                                f"global max and average pooling are the same function there "
                                f"(--size {bigger} or more tells them apart)")
        say(f"[{framework}] building the reference ...")
        ref = _reference(framework, variant, config, size, user)
        rt = ref.tensors()
        rm = matching.match(rt["arrays"], config, layout=rt["layout"], natural=natural)
        state = _weights(weights, config) if weights else random_state(config, seed)
        user.load(_to_model(state, m.mapping, tensors["layout"]))
        ref.load(_to_model(state, rm.mapping, rt["layout"]))
        rng = np.random.default_rng(seed + 2)
        x = rng.standard_normal((BATCH, config.in_channels, size, size)).astype(np.float32)
        labels = rng.integers(0, config.num_classes, BATCH).astype(np.int64)
        order = [c for c, _, _ in spec.canonical_modules(config)]
        modules_u = _module_names(m.mapping, order)
        modules_r = _module_names(rm.mapping, order)
        say(f"[{framework}] eval mode, float32 ...")
        eu = user.run(x=x, modules=list(modules_u.values()), train=False)
        er = ref.run(x=x, modules=list(modules_r.values()), train=False)
        report.output_shape = list(np.shape(eu["logits"]))
        report.numbers["eval_logits"] = _rel(eu["logits"], er["logits"])
        if report.numbers["eval_logits"] > EVAL_RTOL:
            report.first = _first_difference(config, order, modules_u, modules_r, eu["outputs"],
                                             er["outputs"], EVAL_RTOL, "eval") or {
                "mode": "eval", "module": "classifier", "stage": "head", "foreign": modules_u.get(
                    "classifier", ""), "max_abs": float(np.max(np.abs(
                        np.asarray(eu["logits"]) - er["logits"]))),
                "rel": report.numbers["eval_logits"],
                "convention": convention(config, "classifier", "dense", eu["logits"],
                                         er["logits"], "eval")}
            return report
        say(f"[{framework}] one train-mode step, float64 ...")
        dtype = "float64"
        try:
            tu = user.run(x=x, labels=labels, modules=list(modules_u.values()), train=True,
                          dtype=dtype)
        except Exception as e:  # noqa: BLE001 - a model that cannot run in float64
            report.notes.append(f"the model does not run in float64 ({str(e).splitlines()[0]}); "
                                "the step is compared in float32 at 1e-3")
            dtype = "float32"
            tu = user.run(x=x, labels=labels, modules=list(modules_u.values()), train=True)
        tr = ref.run(x=x, labels=labels, modules=list(modules_r.values()), train=True, dtype=dtype)
        tol = STEP_RTOL if dtype == "float64" else 1e-3
        report.numbers["train_loss"] = abs(tu["loss"] - tr["loss"]) / max(abs(tr["loss"]), 1e-300)
        gu = _to_canonical(tu["grads"], m.mapping, tensors["layout"])
        gr = _to_canonical(tr["grads"], rm.mapping, rt["layout"])
        report.numbers["gradients"], worst = _worst(gu, gr, GRAD_FLOOR)
        su = _to_canonical(tu["state"], m.mapping, tensors["layout"])
        sr = _to_canonical(tr["state"], rm.mapping, rt["layout"])
        report.numbers["bn_statistics"], bn_first, notes = _bn_statistics(config, state, su, sr,
                                                                          framework)
        report.notes += notes
        if report.numbers["train_loss"] > tol or report.numbers["gradients"] > tol:
            report.first = _first_difference(config, order, modules_u, modules_r, tu["outputs"],
                                             tr["outputs"], tol, "train") or {
                "mode": "train", "module": worst.rsplit(".", 1)[0], "stage": spec.stage_of(worst),
                "foreign": m.mapping.get(worst, ""), "max_abs": float(np.max(np.abs(
                    gu[worst] - gr[worst]))) if worst in gu else float("inf"),
                "rel": report.numbers["gradients"],
                "convention": "the gradient differs while the forward pass agrees: dropout, or "
                              "a parameter the loss does not reach in the same way"}
        elif bn_first is not None:
            bn_first["foreign"] = modules_u.get(bn_first["module"], "")
            report.first = bn_first
        return report
    except (CheckError, spec.DenseNetConfigError):
        raise
    except Exception as e:  # noqa: BLE001 - the user's model failed: say so, not a traceback
        from densenet_parity.backends import BackendError
        msg = e.message if isinstance(e, BackendError) else str(e)
        fail = Report(framework, variant or "", factory or "model", str(preset or "?"), {}, [],
                      [], {"spec_params": None, "spec_state": None, "params": None, "state": None,
                           "ok": False})
        fail.error = f"{type(e).__name__ if not isinstance(e, BackendError) else e.error_type}: " \
                     f"{msg.strip().splitlines()[0] if msg.strip() else ''}"
        return fail
    finally:
        for s in (user, ref):
            if s is not None:
                s.close()


def _module_names(mapping: Dict[str, str], order: List[str]) -> Dict[str, str]:
    """canonical module -> the model's module (from the tensor mapping)."""
    out = {}
    for cmod in order:
        for leaf in ("weight", "running_mean"):
            fname = mapping.get(f"{cmod}.{leaf}")
            if fname:
                module, _ = matching.split_name(fname)
                out[cmod] = matching._strip_collection(module)
                break
    return out


def _weights(path: str, config) -> Dict[str, np.ndarray]:
    from densenet_weights import formats
    fmt, arrays = formats.read(path)
    m = matching.match(arrays, config, layout="flax" if fmt == "flax" else "torch",
                       natural=fmt in ("flax", "safetensors"))
    if not m.ok or m.state is None:
        raise CheckError(f"{path} does not fit preset '{config.name}': {m.difference}")
    return m.state


def _subject(framework, variant, model, factory, path, size, in_channels):
    if model is not None:
        return Subject(framework, variant, model)
    if factory is None:
        raise CheckError("give a model, or MODULE:FUNCTION that builds one")
    if framework == "mxnet" and "mxnet" not in sys.modules:
        from densenet_parity.backends import make_backend
        b = make_backend("mxnet")
        try:
            handle = b.call("user_model", factory=factory, path=path, size=size,
                            in_channels=in_channels)
        except Exception:
            b.close()
            raise
        s = RemoteSubject(b, handle)
        s.close = b.close
        return s
    adapter = _adapter(framework)
    kw = {"in_channels": in_channels} if framework != "torch" else {}
    return Subject(framework, variant, adapter.user_model(factory=factory, size=size, path=path,
                                                          variant=variant, **kw))


def _reference(framework, variant, config, size, user):
    if isinstance(user, RemoteSubject):
        handle = user.backend.call("user_model", config=config.to_dict(), size=size)
        s = RemoteSubject(user.backend, handle)
        return s
    adapter = _adapter(framework)
    return Subject(framework, variant, adapter.user_model(config=config.to_dict(), size=size,
                                                          variant=variant))


def check_weights(path: str, preset=None, framework: Optional[str] = None, size=None,
                  seed: int = 0, progress=None) -> Report:
    """Check a weights file (any format densenet_weights.formats reads, under any names): its
    structure against the preset (inferred when None), per stage; then, with ``framework``,
    that it loads into our model there and computes what PyTorch's does with the same weights
    (eval mode, 1e-5)."""
    from densenet_weights import formats
    say = progress or (lambda msg: None)
    fmt, arrays = formats.read(path)
    layout = "flax" if fmt == "flax" else "torch"
    m = matching.match(arrays, preset, layout=layout, natural=fmt in ("flax", "safetensors"))
    config = m.config
    stats = {n for n in arrays if matching.split_name(n)[1] in (
        "running_mean", "running_var", "moving_mean", "moving_var", "mean", "var")}
    tensors = {"arrays": arrays, "trainable": [n for n in arrays if n not in stats
                                                and matching.split_name(n)[1] in matching.ROLES]}
    rows, totals = _structure_rows(config, m, tensors)
    size = size or (96 if config.name == "book" else 16 if config.stem == "cifar" else 64)
    report = Report(framework or "-", "", f"{path} ({fmt})", config.name, config.to_dict(),
                    [BATCH, config.in_channels, size, size], rows, totals, weights=path)
    if not m.ok:
        report.structure = str(m.difference)
        report.cause = likely_structural_cause(config, m.difference)
        return report
    if framework is None:
        report.numbers["eval_logits"] = 0.0
        report.notes.append("structure only: give --framework to run the weights")
        return report
    say(f"[{framework}] the weights in our {framework} model and in PyTorch's ...")
    from densenet_parity.backends import make_backend
    x = np.random.default_rng(seed + 2).standard_normal(
        (BATCH, config.in_channels, size, size)).astype(np.float32)
    name = {"flax": "flax-nnx"}.get(framework, framework)
    outs = {}
    for b in {name, "torch"}:
        backend = make_backend(b)
        try:
            outs[b] = backend.call("forward", config=config.to_dict(), state=m.state, x=x)["arrays"]
        finally:
            backend.close()
    report.output_shape = list(outs[name]["head"].shape)
    report.numbers["eval_logits"] = _rel(outs[name]["head"], outs["torch"]["head"])
    return report


def assert_same_densenet(model, preset=None, framework: Optional[str] = None, **options) -> Report:
    """For a user's own tests: raise AssertionError carrying the check's report if ``model``
    is not the preset's network; return the report when it is. ``framework`` (optional) must
    agree with the model's own; ``options`` as for :func:`check` (size, seed, weights)."""
    if framework is not None and framework_of(model)[0] != framework:
        raise CheckError(f"framework={framework!r}, but the model is a {framework_of(model)[0]} model")
    report = check(model, preset=preset, **options)
    if not report.same:
        raise AssertionError("\n" + report.render())
    return report
