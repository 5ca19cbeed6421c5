"""The check itself: structure, BatchNorm settings, numbers; and the weights-file check."""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Dict, List, Optional

import numpy as np

import densenet_spec as spec
from densenet_parity.checking import settings as bn_settings
from densenet_parity.checking import structure, trainstep
from densenet_parity.checking.numbers import (BATCH, EVAL_RTOL, GRAD_FLOOR, MLP_BATCH, STEP_RTOL,
                                              _bn_statistics, _first_difference, _rel,
                                              _to_canonical, _to_model, _worst)
from densenet_parity.checking.causes import convention
from densenet_parity.checking.report import Report
from densenet_parity.checking.subjects import CheckError, framework_of, subject_module
from densenet_parity.states import random_state
from densenet_weights import match as matching
from densenet_weights.causes import likely_structural_cause


def default_size(cfg) -> int:
    """The input size the check runs at: 0 for the MLP family (feature vectors, no size)."""
    if cfg is not None and cfg.family == "mlp":
        return 0
    return 96 if cfg is None or cfg.name == "book" else (16 if cfg.stem == "cifar" else 64)


def _inputs(config, size, seed, mlp_batch=MLP_BATCH):
    """The check's input (canonical) and targets: integer labels for the conv family, float
    targets for the MLP family (its loss is the mean squared error). The MLP's batch is 8, not
    2: train-mode BatchNorm1d over 2 examples maps every feature to -1 or +1 whatever came
    before, and the step could not tell many a bug from the reference (the training part's
    batches: ``mlp_batch``, trainstep.MLP_TRAIN_BATCH)."""
    rng = np.random.default_rng(seed + 2)
    if config.family == "mlp":
        x = rng.standard_normal(spec.input_shape(config, mlp_batch)).astype(np.float32)
        return x, rng.standard_normal((mlp_batch, config.num_outputs))
    x = rng.standard_normal(spec.input_shape(config, BATCH, size, size)).astype(np.float32)
    return x, rng.integers(0, config.num_classes, BATCH).astype(np.int64)


class Clock:
    """Seconds per phase of a check, in the order first entered (a phase entered twice adds
    up); ``done()`` adds "other" (what no phase covered) and "total", so the phases sum to the
    total."""

    def __init__(self):
        self.start, self.phases = time.perf_counter(), {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.phases[phase] = self.phases.get(phase, 0.0) + time.perf_counter() - t

    def done(self, *subjects) -> Dict[str, object]:
        """{"phases": phase -> seconds (with "other"), "total": seconds, "compilation": seconds
        of the phases spent compiling (the subjects' own ``compile_s``; 0 where nothing is
        compiled)}."""
        total = time.perf_counter() - self.start
        phases = {k: round(v, 3) for k, v in self.phases.items()}
        phases["other"] = round(max(total - sum(self.phases.values()), 0.0), 3)
        return {"phases": phases, "total": round(total, 3), "compilation": round(sum(
            getattr(s, "compile_s", 0.0) for s in subjects if s is not None), 3)}


def step_size(config, size: int) -> int:
    """The input size the train-mode step runs at: ``size``, or where that is larger than the
    preset's default check size, that default (or the smallest size at which the last dense
    block still runs at 2x2 or more, if larger). The step compares loss, every gradient and
    every BatchNorm statistic layer by layer, which no larger input exercises further, at a
    twelfth of the float64 work for 224 px; the eval-mode comparison keeps ``size``, so what
    depends on the input size (padding, pooling, a fixed-size layer) is compared there."""
    if config.family == "mlp" or not size:
        return size
    least = default_size(config)
    while min(spec.stage_shapes(config, 1, least, least)[-2][1][2:]) < 2 and least < size:
        least += 1
    return min(size, least)


def _width(cfg) -> Optional[int]:
    """What a model that infers its input is probed with: channels, or an MLP's features."""
    if cfg is None:
        return None
    return cfg.in_features if cfg.family == "mlp" else cfg.in_channels


def check(model=None, *, framework: Optional[str] = None, factory: Optional[str] = None,
          path: Optional[str] = None, weights: Optional[str] = None, preset=None,
          size: Optional[int] = None, seed: int = 0, in_channels: Optional[int] = None,
          variant: Optional[str] = None, progress=None, recipe: Optional[str] = None,
          steps: int = 5) -> Report:
    """Check ``model`` (or the model ``factory`` builds: 'MODULE:FUNCTION') against a preset
    (inferred when None). Returns the Report; ``report.same`` says whether it is the same
    network, ``report.same_architecture`` whether it is at least its architecture (the
    BatchNorm settings, named in ``report.bn_settings``, being the only difference).

    With ``recipe`` (a recipe string, densenet_spec/optim.py: what the user meant) the factory
    returns the model with its optimiser (each subject module's PAIR says how), and after the
    model part ``steps`` steps of that optimiser are compared with the recipe's
    (densenet_parity.checking.trainstep): ``report.training``, ``report.same_training``. A
    factory that returns an optimiser without ``recipe``, or ``recipe`` with a model alone:
    CheckError; a recipe that does not parse: RecipeError."""
    say = progress or (lambda msg: None)
    clock = Clock()
    if recipe is not None:
        spec.parse_recipe(recipe)  # RecipeError: one clear message, before anything is built
        if not isinstance(steps, int) or steps <= 0:
            raise CheckError(f"--steps: expected a positive number of training steps, found "
                             f"{steps!r}")
    if model is not None:
        framework, variant = framework_of(model)
    sub = subject_module(framework)
    variant = variant or sub.VARIANTS[0]
    cfg0 = spec.make_config(preset) if preset is not None else None
    size = size or default_size(cfg0)
    user = ref = adjusted = None
    try:
        say(f"[{framework}] building the model ...")
        with clock("model"):
            if model is not None:
                user = sub.wrap(model, variant)
            elif factory is None:
                raise CheckError("give a model, or MODULE:FUNCTION that builds one")
            else:
                user = sub.user(factory, path, size, in_channels or _width(cfg0), variant)
            variant = user.variant
            _optimizer_asked(user, sub, recipe, factory or "the model")
            tensors = user.tensors()
        with clock("structure"):
            natural = not tensors.get("ordered", True)
            m = matching.match(tensors["arrays"], preset, layout=tensors["layout"],
                               natural=natural)
            config = m.config
            name = factory or type(model[0] if isinstance(model, tuple) else model).__name__
            rows, totals = structure._structure_rows(config, m, tensors)
        mlp = config.family == "mlp"
        size = 0 if mlp else (size or default_size(config))
        x, labels = _inputs(config, size, seed)
        small = step_size(config, size)
        step = (x, labels) if small == size else _inputs(config, small, seed)
        report = Report(framework, variant, name, config.name, config.to_dict(),
                        list(x.shape), rows, totals, weights=weights or f"random (seed {seed})")
        report.notes += user.notes
        report.reference = getattr(sub, "REFERENCE", report.reference)
        built = user.sites()  # where the user's code built each layer ({}: not known)
        if not m.ok:
            report.structure = str(m.difference)
            report.cause = likely_structural_cause(config, m.difference)
            report.structure_foreign = m.difference.foreign
            for row in report.rows:  # the structure table's note names it at its stage
                if row["stage"] == m.difference.stage:
                    row["foreign"] = m.difference.foreign
            _built_at(report, built, [m.difference.foreign])
            if recipe is not None:
                report.training = trainstep.not_checked(
                    "the model's structure differs from the preset's (above): its training "
                    "steps are compared once it is the same network")
            report.timings = clock.done(user)
            return report
        spec.check_input(config, x.shape)
        last = spec.stage_shapes(config, BATCH, size, size)[-2][1]
        if not mlp and (last[2] == 1 or last[3] == 1):
            bigger = next(s for s in range(size, 4 * size) if
                          min(spec.stage_shapes(config, 1, s, s)[-2][1][2:]) > 1)
            report.notes.append(f"at {size}x{size} the last dense block runs at {last[2]}x{last[3]}: "
                                f"global max and average pooling are the same function there "
                                f"(--size {bigger} or more tells them apart)")
        say(f"[{framework}] building the reference ...")
        with clock("reference"):
            ref = sub.reference(config, size, user)
            order = [c for c, _, _ in spec.canonical_modules(config)]
            modules_u = structure._module_names(m.mapping, order)
            user.in_channels = ref.in_channels = _width(config)
            user.size = ref.size = size
            rt = ref.tensors()
            rm = matching.match(rt["arrays"], config, layout=rt["layout"], natural=natural)
            modules_r = structure._module_names(rm.mapping, order)
        with clock("bn_settings"):  # the BatchNorm settings, read from the layers before any number
            read_u = bn_settings.canonical(user.bn_settings(), modules_u)
            read_r = bn_settings.canonical(ref.bn_settings(), modules_r)
            report.bn_settings = bn_settings.differences(config, read_u, read_r, modules_u,
                                                         framework)
        with clock("weights"):
            state = _weights(weights, config) if weights else random_state(config, seed)
            user.load(_to_model(state, m.mapping, tensors["layout"]))
        runs = {}
        numbers, first, notes = _numbers(config, state, x, step, user, m.mapping, modules_u,
                                         tensors["layout"], ref, rm.mapping, modules_r,
                                         rt["layout"], framework, say,
                                         {k: v["momentum"] for k, v in read_r.items()}, runs,
                                         clock)
        report.output_shape = numbers.pop("output_shape")
        report.numbers, report.first = numbers, first
        report.notes += notes
        if report.bn_settings:
            if first:  # read, not guessed: the settings differ, and they change these numbers
                first["convention"] = (
                    "the BatchNorm settings named above (" + ", ".join(sorted({
                        d["setting"] for d in report.bn_settings})) + "), first seen here; "
                    "whether anything else differs: the numbers with the model's settings, "
                    "below" + ("" if first.get("fallback") else
                               f" (otherwise most likely: {first['convention']})"))
            say(f"[{framework}] the reference (PyTorch) with the model's BatchNorm settings ...")
            with clock("probe_reference"):
                torch_sub = subject_module("torch")
                adjusted = torch_sub.reference(config, size, user,
                                               settings=bn_settings.for_reference(read_u))
                at = adjusted.tensors()
                am = matching.match(at["arrays"], config, layout=at["layout"])
            numbers, first, more = _numbers(config, state, x, step, user, m.mapping, modules_u,
                                         tensors["layout"], adjusted, am.mapping,
                                         structure._module_names(am.mapping, order),
                                         at["layout"], framework, lambda msg: None,
                                         {k: v["momentum"] for k, v in read_u.items()}, runs,
                                         clock, "probe_")
            numbers.pop("output_shape")
            report.adjusted, report.adjusted_first = numbers, first
            report.notes += [n for n in more if n not in report.notes]
        _built_at(report, built, [f["foreign"] for f in (report.first, report.adjusted_first)
                                  if f] + [d["foreign"] for d in report.bn_settings])
        if recipe is not None and not report.same_architecture:
            report.training = trainstep.not_checked(
                "the model's numbers already differ from the reference's (above): the training "
                "steps of a different network say nothing of the optimiser")
        elif recipe is not None:
            biased = getattr(sub, "BIASED_VARIANCE", False)
            with clock("training"):
                report.training = trainstep.check_training(
                    config, state, user, m.mapping, tensors["layout"], framework, recipe, steps,
                    trainstep.batches(_inputs, config, small, steps, seed),
                    "none" if not report.same else "mean" if biased else "all", say)
        report.timings = clock.done(user, ref, adjusted)
        return report
    except (CheckError, spec.DenseNetConfigError):
        raise
    except Exception as e:  # noqa: BLE001 - the user's model failed: say so, not a traceback
        from densenet_parity.backends import BackendError
        if isinstance(e, BackendError) and e.error_type in ("CheckError", "DenseNetConfigError"):
            raise CheckError(e.message) from None
        usage = factory_error(e, factory, path) if factory else None
        if usage:
            raise CheckError(usage) from None
        msg = e.message if isinstance(e, BackendError) else str(e)
        fail = Report(framework, variant or "", factory or "model", str(preset or "?"), {}, [],
                      [], {"spec_params": None, "spec_state": None, "params": None, "state": None,
                           "ok": False})
        fail.error = f"{type(e).__name__ if not isinstance(e, BackendError) else e.error_type}: " \
                     f"{msg.strip().splitlines()[0] if msg.strip() else ''}"
        fail.timings = clock.done(user, ref, adjusted)
        return fail
    finally:
        for s in (user, ref, adjusted):
            if s is not None:
                s.close()


def _optimizer_asked(user, sub, recipe: Optional[str], name: str) -> None:
    """A factory's optimiser and ``recipe`` go together: one without the other is a usage
    error naming what to give."""
    opt = user.optimizer()
    if opt is not None and recipe is None and not getattr(sub, "OPTIMIZER_IN_MODEL", False):
        raise CheckError(f"{name} returned the model with its optimiser ({opt['optimizer']}): "
                         "give --recipe \"...\" (the recipe you meant, e.g. \"adam lr=1e-3 "
                         "weight_decay=1e-2\") to check its training step, or return the model "
                         "alone")
    if opt is None and recipe is not None:
        raise CheckError(f"--recipe checks your training step, and {name} returned the model "
                         f"alone; return {sub.PAIR}")


def factory_error(e: BaseException, factory: str, path: Optional[str]) -> Optional[str]:
    """A usage error's message if ``e`` (raised here, or in the MXNet worker: a BackendError
    with its traceback's text) came from importing the user's module or calling its factory,
    or is a factory's result that is no model; naming the user's file and line. None if the
    model itself failed later (then the report says so)."""
    import re
    import traceback
    from densenet_parity.backends import BackendError
    remote = isinstance(e, BackendError)
    kind = e.error_type if remote else type(e).__name__
    message = (e.message if remote else str(e)).strip()
    if kind == "TypeError" and message.startswith(f"{factory} returned "):
        where = factory_location(factory, path)
        return f"{where}: {message.splitlines()[0]}" if where else message.splitlines()[0]
    if remote:
        frames = [(f, int(n), fn) for f, n, fn in re.findall(
            r'File "([^"]+)", line (\d+)(?:, in (\S+))?', e.tb or "")]
    else:
        frames = [(f.filename, f.lineno, f.name) for f in traceback.extract_tb(e.__traceback__)]
    names = [fn for _, _, fn in frames]
    if "call_factory" not in names:
        return None
    after = frames[names.index("call_factory") + 1:]
    importing = any(fn in ("import_module", "_call_with_frames_removed") for _, _, fn in after) \
        or kind == "SyntaxError"
    own = [(f, n) for f, n, _ in after if _is_users(f)]
    if kind == "SyntaxError" and not remote and getattr(e, "filename", None):
        own.append((e.filename, e.lineno))
    where = f"{own[-1][0]}:{own[-1][1]}" if own else factory.split(":")[0]
    words = "the module does not import" if importing else f"{factory.split(':')[1]}() raised"
    return (f"{factory}: {words}: {where}: {kind}: "
            f"{message.splitlines()[0] if message else ''}")


def _is_users(filename: str) -> bool:
    """A traceback frame's file is the user's (not Python's, a library's or this project's)."""
    from densenet_spec import sites
    return sites.whose(filename) == "user"


def _built_at(report: Report, built: Dict[str, str], named: List[str]) -> None:
    """The report keeps where the user's code built each layer it names (the model's module ->
    'FILE:LINE'); a layer with no known site (a model given as an object, an ONNX graph, a layer
    our own code built) has none, and the report says nothing of it."""
    report.built_at.update({n: built[n] for n in named if n and built.get(n)})


def factory_location(factory: str, path: Optional[str]) -> Optional[str]:
    """'file:line' of the factory's definition, found by reading the module's source (its
    module is not imported again: nothing of the user's runs here)."""
    import ast
    import os
    module, func = factory.split(":")
    for base in [os.path.abspath(path or os.getcwd())] + sys.path:
        stem = os.path.join(base, *module.split("."))
        for cand in (stem + ".py", os.path.join(stem, "__init__.py")):
            if os.path.isfile(cand):
                try:
                    tree = ast.parse(open(cand, encoding="utf-8").read())
                except (SyntaxError, ValueError, OSError):
                    return cand
                line = next((n.lineno for n in tree.body if isinstance(
                    n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.name == func), None)
                return f"{cand}:{line}" if line else cand
    return None


def _numbers(config, state, x, step, user, mapping_u, modules_u, layout_u, ref, mapping_r,
             modules_r, layout_r, framework, say, momenta, runs=None, clock=None, prefix=""):
    """Eval-mode logits (float32) on ``x``, then one train-mode step (float64) on ``step`` (its
    input and labels: engine.step_size; the model's step reruns on ``x`` if it fails there, and
    the reference's step runs on the input the model's ran on): (numbers, the first difference
    or None, notes). ``momenta``: the reference's BatchNorm momenta (canonical
    module -> PyTorch's words). ``runs``: a dict keeping the model's own runs, reused when the
    same model is compared again (with another reference). ``clock``: an engine Clock, given
    the phases (``prefix`` + ) eval_model, eval_reference, train_model, train_reference."""
    runs = {} if runs is None else runs
    clock = clock or Clock()
    numbers, notes = {}, []
    ref.load(_to_model(state, mapping_r, layout_r))
    order = [c for c, _, _ in spec.canonical_modules(config)]
    say(f"[{framework}] eval mode, float32 ...")
    if "eval" not in runs:
        with clock(prefix + "eval_model"):
            runs["eval"] = user.run(x=x, modules=list(modules_u.values()), train=False)
    eu = runs["eval"]
    with clock(prefix + "eval_reference"):
        er = ref.run(x=x, modules=list(modules_r.values()), train=False)
    numbers["eval_logits"] = _rel(eu["logits"], er["logits"])
    numbers["output_shape"] = list(np.shape(eu["logits"]))
    if numbers["eval_logits"] > EVAL_RTOL:
        first = _first_difference(config, order, modules_u, modules_r, eu["outputs"],
                                  er["outputs"], EVAL_RTOL, "eval") or {
            "mode": "eval", "module": "classifier", "stage": "head", "foreign": modules_u.get(
                "classifier", ""), "max_abs": float(np.max(np.abs(
                    np.asarray(eu["logits"], np.float64) - er["logits"]))) if np.shape(
                        eu["logits"]) == np.shape(er["logits"]) else float("inf"),
            "rel": numbers["eval_logits"],
            "convention": convention(config, "classifier", "dense", eu["logits"],
                                     er["logits"], "eval")}
        return numbers, first, notes
    say(f"[{framework}] one train-mode step, float64 ...")
    if "train" not in runs:
        with clock(prefix + "train_model"):
            try:
                runs["train"] = step + _step(user, *step, list(modules_u.values()), runs)
            except Exception:  # noqa: BLE001 - a model that runs at the eval size only
                if step[0] is x:
                    raise
                runs.pop("note", None)
                runs["train"] = (x, step[1]) + _step(user, x, step[1],
                                                     list(modules_u.values()), runs)
    xt, labels, dtype, tu = runs["train"]
    if "note" in runs:
        notes.append(runs["note"])
    if xt is not x:
        notes.append(f"the train-mode step ran at {xt.shape[2]}x{xt.shape[3]} (every layer "
                     f"runs there, the last dense block at 2x2 or more), the eval-mode "
                     f"comparison at {x.shape[2]}x{x.shape[3]}")
    with clock(prefix + "train_reference"):
        tr = ref.run(x=xt, labels=labels, modules=list(modules_r.values()), train=True,
                     dtype=dtype)
    tol = STEP_RTOL if dtype == "float64" else 1e-3
    numbers["train_loss"] = _rel(np.float64(tu["loss"]), np.float64(tr["loss"]))
    gu = _to_canonical(tu["grads"], mapping_u, layout_u)
    gr = _to_canonical(tr["grads"], mapping_r, layout_r)
    numbers["gradients"], worst = _worst(gu, gr, GRAD_FLOOR)
    su = _to_canonical(tu["state"], mapping_u, layout_u)
    sr = _to_canonical(tr["state"], mapping_r, layout_r)
    numbers["bn_statistics"], bn_first, more = _bn_statistics(
        config, state, su, sr, framework, momenta,
        biased=getattr(subject_module(framework), "BIASED_VARIANCE", False))
    notes += more
    first = None
    if numbers["train_loss"] > tol or numbers["gradients"] > tol:
        first = _first_difference(config, order, modules_u, modules_r, tu["outputs"],
                                  tr["outputs"], tol, "train") or {
            "mode": "train", "module": worst.rsplit(".", 1)[0], "stage": spec.stage_of(worst),
            "foreign": mapping_u.get(worst, ""), "max_abs": float(np.max(np.abs(
                gu[worst] - gr[worst]))) if worst in gu else float("inf"),
            "rel": numbers["gradients"], "fallback": True,
            "convention": "the gradient differs while the forward pass agrees: dropout, or "
                          "a parameter the loss does not reach in the same way"}
    elif bn_first is not None:
        bn_first["foreign"] = modules_u.get(bn_first["module"], "")
        first = bn_first
    return numbers, first, notes


def _step(user, x, labels, modules, runs):
    """The model's train-mode step in float64, or, for a model that cannot run in float64, in
    float32 (its note in ``runs``): (dtype, the run)."""
    try:
        return "float64", user.run(x=x, labels=labels, modules=modules, train=True,
                                   dtype="float64")
    except Exception as e:  # noqa: BLE001 - a model that cannot run in float64
        runs["note"] = (f"the model does not run in float64 ({str(e).splitlines()[0]}); "
                        "the step is compared in float32 at 1e-3")
        return "float32", user.run(x=x, labels=labels, modules=modules, train=True)


def _weights(path: str, config) -> Dict[str, np.ndarray]:
    from densenet_weights import formats
    loaded = formats.load(path, config)
    if not loaded.ok:
        raise CheckError(f"{path} does not fit preset '{config.name}': {loaded.match.difference}")
    return loaded.state


def check_weights(path: str, preset=None, framework: Optional[str] = None, size=None,
                  seed: int = 0, progress=None) -> Report:
    """Check a weights file (any format densenet_weights.formats reads, under any names): its
    structure against the preset (inferred when None), per stage; then, with ``framework``,
    that it loads into our model there (Keras: keras.applications' DenseNet of the preset) and
    computes what PyTorch's does with the same weights (eval mode, 1e-5)."""
    from densenet_weights import formats
    say = progress or (lambda msg: None)
    loaded = formats.load(path, preset)  # read once, by its format
    if loaded.format == "onnx":  # a graph with its weights: run in onnxruntime
        from densenet_parity.checking import subject_onnx
        return subject_onnx.check_file(loaded, size, seed, progress)
    fmt, m = loaded.format, loaded.match
    config = m.config
    rows, totals = structure._structure_rows(config, m, structure.file_tensors(loaded.tensors))
    size = size or default_size(config)
    x, _ = _inputs(config, size, seed)
    report = Report(framework or "-", "", f"{path} ({fmt})", config.name, config.to_dict(),
                    list(x.shape), rows, totals, weights=path)
    if not m.ok:
        report.structure = str(m.difference)
        report.cause = likely_structural_cause(config, m.difference)
        return report
    if framework is None:
        report.numbers["eval_logits"] = 0.0
        report.notes.append("structure only: give --framework to run the weights")
        return report
    sub = subject_module(framework)  # a framework this check knows
    say(f"[{framework}] the weights in our {framework} model and in PyTorch's ...")
    from densenet_parity.backends import make_backend
    name = {"flax": "flax-nnx"}.get(framework, framework)
    outs = {}
    if hasattr(sub, "run_weights"):  # a framework without a mirror runs the weights itself
        logits, notes = sub.run_weights(config, m.state, x, size)
        outs[name] = {"head": logits}
        report.notes += notes
    for b in {name, "torch"} - set(outs):
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
