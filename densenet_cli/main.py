"""``densenet``: one command for densenet-suite.

    densenet report    the parity report: do all backends build and compute the same network?
    densenet convert   weights from one framework's file to another's, through the canonical form
    densenet export    a DenseNet (any framework's weights, or a preset) to ONNX, proven in onnxruntime
    densenet summary   a preset's layer table in one backend, in the style its users know
    densenet check     is your own model or weights file the preset's network, and where not?
    densenet train     train with the book's recipe in PyTorch, MXNet Gluon or Flax
    densenet compare-training  a training recipe's run in every backend, step by step
    densenet bench     speed and memory benchmarks (a source checkout's benchmarks/)

``densenet COMMAND --help`` shows each command's options and an example. Exit status in every
command: 0 ok, 1 a mismatch or a failure, 2 a usage error (a bad option, a missing file).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Callable, Dict, List, Optional, Tuple

import densenet_spec as spec

OK, FAILED, USAGE = 0, 1, 2


def _parser(command: str, summary: str, example: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog=f"densenet {command}", description=summary,
        epilog=f"example:\n  {example}", formatter_class=argparse.RawDescriptionHelpFormatter)


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


# --------------------------------------------------------------------------- report

def report(argv: List[str]) -> int:
    from densenet_parity import report as engine
    from densenet_parity.backends import BACKEND_NAMES
    ap = _parser("report", "The parity report: per stage, each backend's output shape, trainable "
                 "parameters and BatchNorm state against the spec's arithmetic; then, with the "
                 "same canonical weights and input, each backend's difference from PyTorch "
                 "(eval mode). Exit status 0 all agree, 1 a mismatch or a backend that could "
                 "not run, 2 a usage error.",
                 "densenet report --preset densenet121 --size 224 --json report.json")
    ap.add_argument("--preset", default="book", help=f"one of: {', '.join(spec.preset_names())}")
    ap.add_argument("--size", type=int, default=96, help="input height and width (default 96; "
                    "an MLP preset takes (batch, features): no size)")
    ap.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    ap.add_argument("--backends", default=",".join(BACKEND_NAMES),
                    help=f"comma-separated subset of {','.join(BACKEND_NAMES)}")
    ap.add_argument("--no-numeric", action="store_true", help="structure only (no forward pass)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH",
                    help="also write the report's data as JSON ('-': to stdout, instead of the text)")
    args = ap.parse_args(argv)
    try:
        cfg = spec.make_config(args.preset)
        spec.check_input(cfg, spec.input_shape(cfg, args.batch, args.size, args.size))
        names = [n.strip() for n in args.backends.split(",") if n.strip()]
        for n in names:
            if n not in BACKEND_NAMES:
                raise ValueError(f"unknown backend {n!r}; backends: {', '.join(BACKEND_NAMES)}")
    except ValueError as e:
        ap.error(str(e))
    result = engine.run(args.preset, args.size, args.batch, names, not args.no_numeric, args.seed)
    _, _, code = engine.verdicts(result)
    result["exit_code"] = code
    if args.json == "-":
        print(json.dumps(result, indent=1))
    else:
        print(engine.render(result))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    return OK if code == 0 else FAILED


# --------------------------------------------------------------------------- convert

def convert(argv: List[str]) -> int:
    from densenet_parity import convert as engine
    ap = _parser("convert", "Convert DenseNet weights between frameworks through the canonical "
                 "form (torchvision's names, PyTorch's layout). Reads any framework's file, told "
                 "by its content: a PyTorch state_dict (.pt/.pth/.bin, read only with "
                 "torch.load(weights_only=True)), Gluon .params (ours, the model zoo's, the "
                 "book's net), Flax msgpack (NNX or linen), safetensors, Keras weights "
                 "(.weights.h5, .keras: read with h5py, never Keras' loader) or ONNX (each "
                 "initializer's role read from the graph; BatchNorms folded by the exporter put "
                 "back as identity BatchNorms, and said), under any names, "
                 "matched onto the preset by structure; writes canonical safetensors, the "
                 "file our model in a framework reads (--to keras: the .weights.h5 a "
                 "keras.applications DenseNet loads with load_weights), or ONNX (--to onnx: "
                 "`densenet export`, proven in onnxruntime). A file that does not fit is refused with "
                 "the first difference; every tensor is checked before anything is written.",
                 "densenet convert book_state_dict.pth book.msgpack --to flax-nnx")
    ap.add_argument("src", help="the weights file to read")
    ap.add_argument("dst", help="the file to write")
    ap.add_argument("--to", default="canonical", choices=engine.TARGETS,
                    help="the format to write (default: canonical safetensors)")
    ap.add_argument("--preset", help="the preset that built it (default: from metadata or shapes)")
    args = ap.parse_args(argv)
    if not os.path.exists(args.src):
        ap.error(f"no such file: {args.src}")
    if args.to == "onnx":
        return _export(args.src, args.dst, args.preset)
    notes: List[str] = []
    try:
        state, cfg = engine.read_checkpoint(args.src, args.preset, notes=notes)
        engine.write_checkpoint(state, cfg, args.dst, args.to)
    except (engine.ConvertError, spec.DenseNetConfigError) as e:  # not a file this reads
        _error(str(e))
        return USAGE
    except ValueError as e:  # MismatchError, StateMismatchError: not the preset's network
        _error(str(e))
        return FAILED
    n = len(spec.canonical_tensors(cfg))
    print(f"wrote {args.dst} ({args.to}): DenseNet '{cfg.name}', {n} tensors, "
          f"{spec.total_counts(cfg)[0]:,} parameters")
    for note in notes:
        print(f"note: {note}")
    return OK


# --------------------------------------------------------------------------- export

def _export(src: str, dst: str, preset: Optional[str] = None, size: Optional[int] = None,
            batch: int = 1, seed: int = 0, opset: Optional[int] = None,
            json_path: Optional[str] = None, fixed_batch: bool = False,
            dynamic_size: bool = False) -> int:
    from densenet_parity import convert as converting
    from densenet_parity import export as engine
    progress = (lambda msg: print(msg, file=sys.stderr, flush=True))
    try:
        result = engine.export(src, dst, preset, size, batch, seed, opset, progress,
                               fixed_batch=fixed_batch, dynamic_size=dynamic_size)
    except (engine.ExportError, converting.ConvertError, spec.DenseNetConfigError) as e:
        _error(str(e))
        return USAGE
    except ValueError as e:  # MismatchError: weights that are not the preset's network
        _error(str(e))
        return FAILED
    if json_path == "-":
        print(json.dumps(result.to_dict(), indent=1))
    else:
        print(result.render())
        if json_path:
            with open(json_path, "w") as f:
                json.dump(result.to_dict(), f, indent=1)
    return OK if result.ok else FAILED


def export(argv: List[str]) -> int:
    ap = _parser("export", "Export a DenseNet to ONNX with torch.onnx's dynamo exporter (opset 18 "
                 "and later; its TorchScript exporter for --opset 13 to 17) and prove the file: SRC "
                 "is any weights file `densenet convert` reads (PyTorch, Gluon, Flax, safetensors, "
                 "Keras, ONNX; matched onto the preset by structure) or a preset's name (random "
                 "weights). The file's batch axis is dynamic (--fixed-batch fixes it), height and "
                 "width with --dynamic-size. Every BatchNorm stays a BatchNormalization node; the "
                 "weights go into DST.data beside DST (keep them together). The proof: onnx's "
                 "checker, then onnxruntime's logits at every input shape the file claims (the "
                 "example batch and one more; a second size) against our PyTorch model's and, for "
                 "a Gluon or Flax file, that framework's own, with the same weights and input, to "
                 "1e-5. Exit status 0 proven, 1 the export differs (or the weights are not the "
                 "preset's), 2 a usage error. `densenet convert SRC DST --to onnx` does the same "
                 "with the defaults.",
                 "densenet export densenet121.pth densenet121.onnx --size 224")
    ap.add_argument("src", metavar="SRC", help="a weights file, or a preset's name "
                                               f"({', '.join(spec.preset_names())})")
    ap.add_argument("dst", metavar="DST", help="the .onnx file to write")
    ap.add_argument("--preset", help="the preset that built the weights (default: from the file)")
    ap.add_argument("--size", type=int, help="input height and width, fixed in the file unless "
                                             "--dynamic-size, where it is the example traced "
                                             "(default: 96 for the book, 32 for CIFAR presets, "
                                             "224 for ImageNet ones)")
    ap.add_argument("--batch", type=int, default=1,
                    help="the example batch size the exporter traces and the proof runs (with "
                         "one more); the file's batch axis stays dynamic unless --fixed-batch "
                         "(default 1)")
    ap.add_argument("--fixed-batch", action="store_true",
                    help="fix the file's batch size at --batch (default: a dynamic batch axis)")
    ap.add_argument("--dynamic-size", action="store_true",
                    help="height and width dynamic in the file too (from the preset's smallest "
                         "input up), proven at a second, non-square size")
    ap.add_argument("--seed", type=int, default=0, help="random weights and input (default 0)")
    ap.add_argument("--opset", type=int,
                    help="ONNX opset: 13 to 17 (torch.onnx's TorchScript exporter: TensorRT 8.x, "
                         "OpenVINO, converters back to PyTorch), 18 and later (the dynamo "
                         "exporter; default: its own, 20 with torch 2.13)")
    ap.add_argument("--json", metavar="PATH", help="also write the result as JSON ('-': stdout)")
    args = ap.parse_args(argv)
    for name in ("size", "batch"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            ap.error(f"--{name} must be positive, got {getattr(args, name)}")
    if not os.path.exists(args.src) and args.src not in spec.preset_names():
        ap.error(f"no such file, and not a preset: {args.src}")
    low, high = _export_opsets()
    if args.opset is not None and not low <= args.opset <= high:
        ap.error(f"--opset must be {low} to {high} (13-17: torch.onnx's TorchScript exporter; 18 "
                 f"and later: its dynamo exporter), got {args.opset}")
    return _export(args.src, args.dst, args.preset, args.size, args.batch, args.seed, args.opset,
                   args.json, args.fixed_batch, args.dynamic_size)


def _export_opsets():
    """(oldest, newest) opset `densenet export` writes (13, onnx's newest); (13, 99) without onnx,
    whose absence the export itself then says."""
    from densenet_parity import export as engine
    try:
        return engine.opset_range()
    except ImportError:
        return engine.MIN_OPSET, 99


# --------------------------------------------------------------------------- summary

def summary(argv: List[str]) -> int:
    from densenet_parity.backends import (BACKEND_NAMES, BackendError, BackendUnavailable,
                                          make_backend)
    ap = _parser("summary", "A preset's layers in one backend, as the framework builds them: "
                 "its own layer names and types and its own layout (Flax: NHWC), one row per "
                 "layer with output shape, trainable parameters and BatchNorm state, in the "
                 "table torchinfo prints for PyTorch (the same columns in every backend, so "
                 "that two summaries compare line by line; Gluon's Block.summary and Flax's "
                 "tabulate count running statistics as parameters). The totals are checked "
                 "against the spec's arithmetic.",
                 "densenet summary --backend flax-nnx --preset book --size 96")
    ap.add_argument("--backend", default="torch", choices=BACKEND_NAMES)
    ap.add_argument("--preset", default="book", help=f"one of: {', '.join(spec.preset_names())}")
    ap.add_argument("--size", type=int, default=96, help="input height and width (default 96; "
                    "an MLP preset takes (batch, features): no size)")
    ap.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    args = ap.parse_args(argv)
    try:
        cfg = spec.make_config(args.preset)
        spec.check_input(cfg, spec.input_shape(cfg, args.batch, args.size, args.size))
    except ValueError as e:
        ap.error(str(e))
    b = make_backend(args.backend)
    try:
        out = b.call("summary", config=cfg.to_dict(), batch=args.batch, height=args.size,
                     width=args.size)
    except (BackendUnavailable, BackendError) as e:
        _error(str(e).strip().splitlines()[0])
        return FAILED
    finally:
        b.close()
    print(out["text"])
    want = spec.total_counts(cfg)
    if (out["params"], out["state"]) != want:
        _error(f"{args.backend} counts {out['params']:,} parameters and {out['state']:,} BatchNorm "
               f"values; the spec says {want[0]:,} and {want[1]:,}")
        return FAILED
    return OK


# --------------------------------------------------------------------------- check

def fast_compile_flags() -> str:
    """XLA's flags for a process that compiles each program once or twice (a check, the parity
    suite): LLVM at optimisation level 0 without its expensive passes, and on jaxlib < 0.11 XLA's
    elemental emitters in place of its MLIR fusion emitters (together they compile a DenseNet's
    float64 train step in about a quarter of the default time), and there one LLVM module per
    program, not a split for parallel code generation that these compilations run on one thread
    anyway (a tenth less again; and keras.applications' eager initialisers, a hundred small
    programs, build faster). The arithmetic is IEEE with every flag (no fast-math): the same
    operations, other machine code. XLA aborts the process on a flag it does not know (jaxlib
    0.11 dropped the emitters' switch), so these are asked for only on the jaxlib they were
    measured on. Read before JAX starts."""
    flags = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    try:
        from importlib.metadata import version
        if tuple(int(p) for p in version("jaxlib").split(".")[:2]) < (0, 11):
            flags += (" --xla_cpu_use_fusion_emitters=false"
                      " --xla_cpu_parallel_codegen_split_count=1")
    except Exception:  # noqa: BLE001 - no jaxlib, or a version that is not numbers: no such flag
        pass
    return flags


def _compile_quickly() -> None:
    """XLA (JAX: Flax and Keras models) compiles for compile speed in this process
    (``fast_compile_flags``), unless XLA_FLAGS sets a level: a check runs each program once or
    twice, so compiling is most of its time (keras.applications' DenseNet-121 builds its layers
    in a quarter of the time, each of its eager initialisers being compiled); set before JAX
    starts, or it has no effect."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "jax" not in sys.modules and "xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " " + fast_compile_flags()).strip()


def check(argv: List[str]) -> int:
    _compile_quickly()
    from densenet_parity import checking as engine
    ap = _parser("check", "Is your DenseNet the book's (or a preset's) network? Matches your "
                 "model's tensors onto the preset by structure and names the first layer that "
                 "differs, with the channel arithmetic; then loads the same weights into your "
                 "model and our reference in the same framework and compares eval-mode outputs "
                 "and one float64 train step (loss, gradients, BatchNorm statistics), naming the "
                 "first layer whose output differs and the convention most likely behind it. "
                 "Each BatchNorm's epsilon and momentum are read from the model's layers and "
                 "every difference named; when they are the only difference the verdict is 'same "
                 "architecture, different BatchNorm settings'. Gluon models run in the MXNet "
                 "environment; Keras models on Keras' JAX backend, against our PyTorch model. With a weights file in place of "
                 "MODULE:FUNCTION: its structure, and with --framework, its numbers in our model "
                 "there against PyTorch's. An ONNX file (.onnx, its external data beside it): "
                 "structure from its graph (BatchNorms folded by the exporter said), its "
                 "BatchNormalization settings, then its numbers in onnxruntime against our "
                 "PyTorch model with its own weights and the first node that differs. Exit "
                 "status 0 same network, 1 different, 2 a usage error.",
                 "densenet check --framework torch mymodels:densenet --preset book --size 96")
    ap.add_argument("model", metavar="MODULE:FUNCTION|WEIGHTS",
                    help="a function that returns your model (importable from the working "
                         "directory), or a weights file (.pt/.pth/.bin, .params, .msgpack, "
                         ".safetensors, Keras' .weights.h5 or .keras, .onnx)")
    ap.add_argument("--framework", choices=engine.FRAMEWORKS,
                    help="the model's framework (required for MODULE:FUNCTION)")
    ap.add_argument("--preset", help=f"one of: {', '.join(spec.preset_names())} "
                                     "(default: inferred from the model)")
    ap.add_argument("--size", type=int, help="input height and width (default: 96 for the book, "
                                             "64 for ImageNet presets, 16 for CIFAR ones)")
    ap.add_argument("--weights", metavar="FILE",
                    help="compare with these weights instead of random ones (any format)")
    ap.add_argument("--seed", type=int, default=0, help="random weights and input (default 0)")
    ap.add_argument("--in-channels", type=int,
                    help="input channels, for a Gluon or linen model that infers them "
                         "(default: the preset's, else 1, then 3)")
    ap.add_argument("--json", metavar="PATH", help="also write the report as JSON ('-': stdout); "
                                                   "its 'timings' say where the time went")
    ap.add_argument("--timings", action="store_true",
                    help="also print the seconds of each phase of the check (model build, "
                         "reference build, eval forward, float64 step, the BatchNorm probe)")
    ap.add_argument("--recipe", metavar="RECIPE",
                    help="also check your training step: the factory returns the model with "
                         "its optimiser (torch (module, optimizer[, scheduler]); Gluon (block, "
                         "trainer); Flax (model, optax transformation); Keras a compiled "
                         "model), RECIPE is what you meant in the spec's words (e.g. \"adamw "
                         "lr=1e-3 weight_decay=1e-2\"; densenet_spec/optim.py). After the model "
                         "part, --steps steps from the same weights on the same batches in "
                         "float64 against our reference's own optimiser; where they differ, the "
                         "first step and parameter, and the mutation of the recipe (coupled or "
                         "decoupled decay, decay on BatchNorm or biases, Nesterov, dampening, "
                         "Adam's epsilon, the schedule off by one step, ...) whose run matches "
                         "yours (docs/check.md)")
    ap.add_argument("--steps", type=int, default=5,
                    help="training steps compared with --recipe (default 5)")
    args = ap.parse_args(argv)
    try:
        if args.preset is not None:
            spec.get_preset(args.preset)
        if args.size is not None and args.size <= 0:
            raise ValueError(f"--size must be positive, got {args.size}")
        if args.steps <= 0:
            raise ValueError(f"--steps: expected a positive number of training steps, found "
                             f"{args.steps}")
        if args.recipe is not None:
            spec.parse_recipe(args.recipe)
    except ValueError as e:
        ap.error(str(e))
    progress = (lambda msg: print(msg, file=sys.stderr, flush=True))
    is_file = os.path.exists(args.model) or ":" not in args.model
    try:
        if is_file:
            if not os.path.exists(args.model):
                ap.error(f"no such file: {args.model}")
            if args.recipe is not None:
                ap.error("--recipe checks the training step of a model a factory returns with "
                         "its optimiser (MODULE:FUNCTION), not of a weights file")
            report = engine.check_weights(args.model, args.preset, args.framework, args.size,
                                          args.seed, progress)
        else:
            if args.framework is None:
                ap.error(f"--framework {'|'.join(engine.FRAMEWORKS)} is required with "
                         "MODULE:FUNCTION")
            report = engine.check(framework=args.framework, factory=args.model, path=os.getcwd(),
                                  weights=args.weights, preset=args.preset, size=args.size,
                                  seed=args.seed, in_channels=args.in_channels, progress=progress,
                                  recipe=args.recipe, steps=args.steps)
    except (engine.CheckError, spec.DenseNetConfigError, FileNotFoundError) as e:
        _error(str(e))
        return USAGE
    except ValueError as e:  # a weights file that is not one (densenet_weights.formats)
        _error(str(e))
        return USAGE
    if args.json == "-":
        print(json.dumps(report.to_dict(), indent=1, default=str))
    else:
        print(report.render())
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report.to_dict(), f, indent=1, default=str)
    if args.timings and report.timings:
        t = report.timings
        print(f"timings: {t['total']:.1f} s: " + ", ".join(
            f"{k} {v:.1f} s" for k, v in t["phases"].items()) + (
            f"; of which compiling {t['compilation']:.1f} s" if t["compilation"] else ""),
            file=sys.stderr)
    return OK if report.same and report.same_training else FAILED


# --------------------------------------------------------------------------- compare-training

def compare_training(argv: List[str]) -> int:
    from densenet_parity.backends import BACKEND_NAMES
    ap = _parser("compare-training", "A training recipe (densenet_spec/optim.py) run side by "
                 "side: the same canonical initial weights, the same batches in the same order, "
                 "N steps in torch, Gluon, Flax NNX and linen, each with its framework's own "
                 "optimiser; per step the loss, the gradient norm and each backend's largest "
                 "relative distance from torch in the parameters and BatchNorm statistics, per "
                 "stage. The MLP presets train on the house-price data, the others on the "
                 "book's (digits). float64: exit 0 when every backend that expresses the recipe "
                 "exactly agrees to 1e-9 at every step (a backend that cannot says so and shows "
                 "its distance), 1 when one does not (the first step and tensor named); "
                 "float32: the steps until the runs drift 1e-6, 1e-4, 1e-2 apart, exit 1 when "
                 "the first step's loss or gradient norm differs beyond 1e-3. 2: a usage error "
                 "(a recipe that does not parse).",
                 'densenet compare-training --preset book --recipe "sgd lr=0.1 momentum=0.9 '
                 'weight_decay=5e-4 exclude=bn,bias schedule=cosine" --steps 100 --out /tmp/ct')
    ap.add_argument("--preset", default="book", help=f"one of: {', '.join(spec.preset_names())}")
    ap.add_argument("--recipe", required=True, help=spec.RECIPE_GRAMMAR)
    ap.add_argument("--steps", type=int, default=100, help="optimiser steps (default 100)")
    ap.add_argument("--dtype", default="float64", choices=("float32", "float64"))
    ap.add_argument("--batch-size", type=int, default=None,
                    help="examples a step (default 16 images, 128 house-price rows)")
    ap.add_argument("--size", type=int, default=None,
                    help="the images' side, the conv family (default 64)")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N examples")
    ap.add_argument("--backends", default=",".join(BACKEND_NAMES),
                    help=f"comma-separated, torch first: a subset of {','.join(BACKEND_NAMES)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--every", type=int, default=None,
                    help="a progress line every K steps (default: a tenth of the run)")
    ap.add_argument("--out", metavar="DIR",
                    help="write compare_training.json (every figure) and divergence.png there")
    args = ap.parse_args(argv)
    from densenet_parity import side_by_side as engine
    from densenet_training.data import DataError
    try:
        spec.parse_recipe(args.recipe)
        names = [n.strip() for n in args.backends.split(",") if n.strip()]
        for n in names:
            if n not in BACKEND_NAMES:
                raise ValueError(f"--backends: unknown backend {n!r}; backends: "
                                 f"{', '.join(BACKEND_NAMES)}")
        spec.make_config(args.preset)
    except (spec.RecipeError, ValueError, spec.DenseNetConfigError) as e:
        _error(str(e))
        return USAGE
    try:
        result = engine.compare_training(
            args.preset, args.recipe, args.steps, args.dtype, args.batch_size, args.size, names,
            args.seed, args.limit, progress=lambda line: print(line, flush=True),
            every=args.every)
    except (spec.RecipeError, ValueError, DataError, spec.DenseNetConfigError) as e:
        _error(str(e))
        return USAGE
    print(engine.render(result))
    if args.out:
        for path in engine.write_outputs(result, args.out):
            print(f"wrote {path}")
    return OK if result["agree"] else FAILED


# --------------------------------------------------------------------------- train, bench

def train(argv: List[str]) -> int:
    from densenet_cli.train import main as train_main
    return train_main(argv)


def bench(argv: List[str]) -> int:
    from densenet_parity.backends import ROOT
    if argv[:1] in (["-h"], ["--help"]) or not (ROOT / "benchmarks" / "bench.py").exists():
        print("usage: densenet bench [BENCHMARK OPTIONS]\n\n"
              "Runs `python -m benchmarks.bench` of a source checkout (the benchmarks are not part "
              "of the installed package) with the options given; its own --help lists them.\n\n"
              "example:\n  densenet bench --quick --backends torch --out /tmp/quick")
        if not (ROOT / "benchmarks" / "bench.py").exists():
            _error(f"no benchmarks/ next to {ROOT / 'densenet_cli'}: run it from a clone of the "
                   "repository")
            return USAGE
        if argv[:1] in (["-h"], ["--help"]):
            argv = ["--help"]
    return subprocess.call([sys.executable, "-m", "benchmarks.bench", *argv], cwd=str(ROOT),
                           env=dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep
                                    + os.environ.get("PYTHONPATH", "")))


# --------------------------------------------------------------------------- the command

COMMANDS: Dict[str, Tuple[Callable[[List[str]], int], str]] = {
    "report": (report, "the parity report: same shapes, counts and numbers in every backend?"),
    "convert": (convert, "weights from one framework's file to another's"),
    "export": (export, "a DenseNet to ONNX, proven in onnxruntime against the framework's output"),
    "summary": (summary, "a preset's layer table in one backend, in its framework's style"),
    "check": (check, "is your model (or weights file) the preset's network? where does it differ?"),
    "train": (train, "train with the book's recipe in PyTorch, MXNet Gluon or Flax"),
    "bench": (bench, "speed and memory benchmarks (from a source checkout)"),
    "compare-training": (compare_training, "a training recipe in every backend, step by step: "
                                           "where do the runs part?"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: densenet COMMAND [OPTIONS]", "",
             "One DenseNet in PyTorch, MXNet Gluon and Flax, and the tools that prove they are "
             "the same network.", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "`densenet COMMAND --help` for a command's options and an example.",
              "Exit status: 0 ok, 1 a mismatch or a failure, 2 a usage error."]
    return "\n".join(lines)


#: Python's cyclic garbage collector in the `densenet` program: every 50,000 new container
#: objects instead of 700 (the first generation's threshold; the others as Python sets them).
GC_THRESHOLD = (50_000, 10, 10)


def main(argv: Optional[List[str]] = None) -> int:
    if argv is None:  # the program itself (a caller's process keeps its own settings)
        # Tracing a deep network allocates millions of objects (JAX's tracers and equations,
        # NNX's graph walks); at Python's default thresholds the collector's passes over them
        # take about a fifth of the time (DenseNet-264's float64 step, traced and
        # differentiated: 7.5 to 6.0 s). Garbage without cycles is still freed at once.
        import gc
        gc.set_threshold(*GC_THRESHOLD)
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return OK if argv else USAGE
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(usage(), file=sys.stderr)
        _error(f"unknown command {name!r}; commands: {', '.join(COMMANDS)}")
        return USAGE
    try:
        return COMMANDS[name][0](rest)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2); a message: usage
        if isinstance(e.code, int) or e.code is None:
            return e.code or OK
        _error(str(e.code))
        return USAGE
