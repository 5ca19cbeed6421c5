"""Check your own DenseNet: is this model (PyTorch, Gluon, Flax NNX or linen, Keras 3) the network
of a preset, and if not, where does it first differ, in the book's words?

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

Where the check builds the model (MODULE:FUNCTION), the line of the user's code that built each
layer is recorded while the factory runs (densenet_spec.sites: the first frame in the user's
files); the report prints ``built at FILE:LINE`` beside the layer it names (the first
difference, the structural one and its stage's note in the structure table, the first BatchNorm
of each setting that differs). A model given as an object, a weights or ONNX file, and a layer
this project's own code built have no line, and nothing is said of one.

Accepted as the same network: each framework's own BatchNorm running-variance convention (Gluon
and Flax update it with the biased batch variance, PyTorch with the unbiased one; the report
notes it). Everything else that changes a number is a difference.

    from densenet_parity import assert_same_densenet
    assert_same_densenet(model, preset="book")            # raises AssertionError with the report

``densenet check`` (densenet_cli) runs it on MODULE:FUNCTION or a weights file; Gluon models
from the main environment run in the MXNet environment's worker.

The package: the shared parts, each one subject, and one module per framework.

    subjects.py    the registry (FRAMEWORKS), framework_of, CheckError, the Subject interface
    structure.py   per-stage counts, canonical module -> the model's
    settings.py    BatchNorm settings: read, compared with the reference's, named
    numbers.py     the comparisons, the first layer that differs
    causes.py      the conventions most likely behind a numerical difference
    report.py      the Report, its verdict and rendering
    engine.py      check, check_weights, assert_same_densenet
    subject_torch.py, subject_mxnet.py, subject_flax.py, subject_keras.py   one per framework
    subject_onnx.py  an ONNX file: a graph with its own weights, checked by check_weights in
                   onnxruntime against our PyTorch model (eval mode; see its docstring)

From below it, re-exported here: the canonical random weights (random_state,
densenet_parity.states: the export draws them too) and the porting mistake most likely behind
a structural difference (likely_structural_cause, densenet_weights.causes: the converter says
it too). A weights file is read once, by densenet_weights.formats.load.

Adding a framework is one new file ``subject_<name>.py`` (and its name in
subjects.FRAMEWORKS). It imports its framework lazily (inside functions) and provides:

    FRAMEWORK = "<name>";  VARIANTS = ("<default variant>", ...)
    BIASED_VARIANCE = True           (optional) its BatchNorm updates the running variance
                                     with the biased batch variance: accepted, noted
    REFERENCE = "our PyTorch model"  (optional, default "same framework") what the numbers
                                     are compared with, for the report
    owns(obj) -> variant or None     is ``obj`` this framework's model? (from its class names,
                                     importing nothing: subjects.class_is)
    wrap(model, variant) -> Subject  a model object given to check()/assert_same_densenet
    user(factory, path, size, in_channels, variant) -> Subject
                                     the model 'MODULE:FUNCTION' builds (spec.call_factory:
                                     its import and usage errors become CheckError); a factory
                                     that returns no model of this framework: TypeError naming
                                     the factory and what it returned
    reference(config, size, user) -> Subject
                                     what the model's numbers are compared with: our model in
                                     the same framework, or where there is no mirror, our
                                     PyTorch model (subject_torch.reference; say so in
                                     REFERENCE)
    run_weights(config, state, x, size) -> (logits, notes)
                                     (optional; frameworks without a mirror) a canonical state
                                     in this framework's model of the preset, for check_weights
                                     --framework (others: the mirror's backend "forward")

A Subject (subjects.Subject) has ``variant``, ``notes`` (said in the report) and:

    tensors() -> {"arrays": name -> numpy array, the model's own names and layout, in
                  definition order where "ordered" (else matched in natural name order),
                  "trainable": [names], "layout": "torch" (OIHW, dense [out, in]) or "flax"
                  (HWIO, dense [in, out]), "ordered": bool}
    load(arrays)     the model's names and layout; every name the model's, or nothing loads
    run(x, labels=None, modules=(), train=False, dtype="float32") -> {"logits": [N, classes],
                     "outputs": the model's module -> its output (NCHW), and with labels:
                     "loss" (mean cross-entropy), "grads" and "state" (the BatchNorm statistics
                     after the step) by tensor name}; x is canonical NCHW float32; dtype
                     "float64" may raise (then the step is compared in float32)
    bn_settings() -> the model's module (as tensors() names it, less the leaf) ->
                     {"epsilon", "momentum" (PyTorch's words: the share of the batch statistic
                     taken per step, None for a cumulative average), "as_written" (the
                     framework's own words)}; read from the layers, never guessed
    sites()       -> the model's module (as tensors() names it) -> 'FILE:LINE' of the user's
                     code that built it, recorded while user() ran the factory (the mirrors'
                     adapter.model_sites; {} for a model given to wrap())
    close()
"""
from densenet_parity.checking.causes import convention
from densenet_parity.checking.engine import (assert_same_densenet, check, check_weights,
                                             default_size)
from densenet_parity.checking.numbers import BATCH, EVAL_RTOL, GRAD_FLOOR, STEP_RTOL
from densenet_parity.checking.report import Report
from densenet_parity.checking.subjects import (FRAMEWORKS, CheckError, Subject, framework_of,
                                               subject_module)
from densenet_parity.states import random_state
from densenet_weights.causes import likely_structural_cause

__all__ = ["BATCH", "EVAL_RTOL", "FRAMEWORKS", "GRAD_FLOOR", "STEP_RTOL", "CheckError", "Report",
           "Subject", "assert_same_densenet", "check", "check_weights", "convention",
           "default_size", "framework_of", "likely_structural_cause", "random_state",
           "subject_module"]
