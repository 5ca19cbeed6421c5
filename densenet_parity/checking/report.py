"""The check's report: what was compared, what differs, the verdict, and its rendering."""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional

from densenet_parity.checking.numbers import EVAL_RTOL, STEP_RTOL


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
    #: every BatchNorm setting that differs from the reference's (densenet_parity.checking.settings)
    bn_settings: List[dict] = dataclasses.field(default_factory=list)
    #: with such differences: the numbers against our PyTorch model given the model's settings
    adjusted: Dict[str, float] = dataclasses.field(default_factory=dict)
    adjusted_first: Optional[dict] = None
    #: what the numbers are compared with (a subject module's REFERENCE)
    reference: str = "same framework"
    #: the model's module named by the first structural difference ('' none)
    structure_foreign: str = ""
    #: the line of the user's code that built each layer the report names (the model's module
    #: -> 'FILE:LINE'; only layers the check saw built: densenet_spec.sites)
    built_at: Dict[str, str] = dataclasses.field(default_factory=dict)
    #: the input's layout where it is not NCHW (an ONNX file's NHWC input: ``input_shape`` is
    #: then in that layout); "" for NCHW (or the MLP's (N, features))
    layout: str = ""
    #: where the check's time went: {"phases": phase -> seconds (model, structure, reference,
    #: bn_settings, weights, eval_model, eval_reference, train_model, train_reference, and with
    #: BatchNorm settings that differ the probe's probe_reference, probe_eval_reference,
    #: probe_train_reference; "other": the rest), "total", "compilation" (seconds of those
    #: phases spent compiling: Keras' jitted calls)}; empty for a weights file's check
    timings: Dict[str, object] = dataclasses.field(default_factory=dict)
    #: the training-step part (--recipe; densenet_parity.checking.trainstep): None without one
    training: Optional[dict] = None

    @property
    def same(self) -> bool:
        return self.structure is None and self.first is None and self.error is None and bool(
            self.numbers) and not self.bn_settings

    @property
    def same_architecture(self) -> bool:
        """The preset's architecture: the same network, or one whose BatchNorm settings are the
        only difference (with the model's settings, the reference computes what it computes)."""
        if self.same:
            return True
        return (self.structure is None and self.error is None and bool(self.bn_settings)
                and all(d["setting"] != "unread" for d in self.bn_settings) and bool(self.adjusted) and self.adjusted_first is None
                and all(v <= _tolerance(k) for k, v in self.adjusted.items()))

    @property
    def same_training(self) -> bool:
        """No training part, or one whose steps all agree with the recipe's."""
        t = self.training
        return t is None or (t["checked"] and t["first"] is None)

    @property
    def verdict(self) -> str:
        from densenet_parity.checking.trainstep import verdict
        if self.same:
            words = "same network"
        elif self.same_architecture:
            words = "same architecture, different BatchNorm settings"
        else:
            words = "different"
        return words + (f"; {verdict(self.training)}" if self.training else "")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["verdict"], d["same"], d["same_architecture"] = (self.verdict, self.same,
                                                           self.same_architecture)
        d["same_training"] = self.same_training
        return d

    def render(self) -> str:
        from densenet_parity.report import table
        fw = self.framework + (f" ({self.variant})" if self.framework == "flax" else "")
        lines = [f"densenet check: {self.model} ({fw}) against preset '{self.preset}', input "
                 f"{'x'.join(map(str, self.input_shape))} "
                 f"({self.layout or ('NCHW' if len(self.input_shape) == 4 else 'N, features')}), "
                 f"weights: {self.weights}", ""]
        rows = []
        for r in self.rows:
            rows.append([r["stage"], _n(r["spec_params"]), _n(r["spec_state"]),
                         _n(r["params"]), _n(r["state"]),
                         "ok" if r["ok"] else "not matched" if r["params"] is None else "DIFFERENT",
                         self._built(r.get("foreign"))])
        t = self.totals
        rows.append(["total", _n(t["spec_params"]), _n(t["spec_state"]), _n(t["params"]),
                     _n(t["state"]), "ok" if t["ok"] else "DIFFERENT", ""])
        head = ["stage", "spec params", "spec BN", "model params", "model BN", "verdict", "notes"]
        if not any(r[-1] for r in rows):  # a notes column only where there is a note
            head, rows = head[:-1], [r[:-1] for r in rows]
        lines.append(table(head, rows, "Structure (trainable parameters, BatchNorm running "
                                       "mean+var values; the model's counted from its own "
                                       "tensors; '-': not matched, after the first difference)"))
        if self.output_shape is not None:
            lines.append(f"output shape {list(self.output_shape)} (expected "
                         f"[{self.input_shape[0]}, "
                         f"{self.config.get('num_classes', self.config.get('num_outputs'))}])")
        if self.structure:
            lines += ["", f"STRUCTURE: {self.structure}"]
            if self._built(self.structure_foreign):
                lines.append(f"  {self._built(self.structure_foreign)}")
            if self.cause:
                lines.append(f"  likely cause: {self.cause}")
        if self.bn_settings:
            from densenet_parity.checking.settings import summary
            from densenet_spec.sites import shown
            lines += ["", "BATCHNORM SETTINGS (read from the model's layers) that differ from the "
                          "reference's:"]
            lines += [f"  {line}" for line in summary(self.bn_settings, {
                k: shown(v) for k, v in self.built_at.items()})]
        if self.numbers:
            lines += ["", f"Numbers (same canonical weights in the model and the reference, "
                          f"{self.reference}): largest relative difference"]
            lines += _number_lines(self.numbers)
        if self.first:
            lines += _first_lines(self.first, self.built_at)
        if self.adjusted:
            lines += ["", "Numbers against the reference (PyTorch) given the model's BatchNorm "
                          "settings:"]
            lines += _number_lines(self.adjusted)
            if self.adjusted_first:
                lines += _first_lines(self.adjusted_first, self.built_at)
        if self.error:
            lines += ["", f"ERROR: {self.error}"]
        if self.training:
            from densenet_parity.checking.trainstep import lines as training_lines
            lines += training_lines(self.training)
        for n in self.notes:
            lines.append(f"note: {n}")
        lines += ["", f"Verdict: {self.verdict}."]
        return "\n".join(lines)

    def _built(self, foreign: Optional[str]) -> str:
        """"the model's 'X' built at FILE:LINE" where the check saw that layer built, else ''."""
        from densenet_spec.sites import shown
        site = self.built_at.get(foreign or "")
        return f"the model's '{foreign}' built at {shown(site)}" if site else ""




LABELS = {"eval_logits": ("eval-mode logits (float32)", EVAL_RTOL),
          "train_loss": ("train-mode loss (float64)", STEP_RTOL),
          "gradients": ("gradients of every parameter (float64)", STEP_RTOL),
          "bn_statistics": ("BatchNorm statistics after the step (float64)", STEP_RTOL)}


def _tolerance(key: str) -> float:
    return LABELS[key][1]


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _number_lines(numbers: Dict[str, float]) -> List[str]:
    """One line per comparison; a value that is no finite number (the shapes differ, or the
    model's numbers hold NaN) is said in words: never 'nan' or 'inf' where a number is meant."""
    out = []
    for key, value in numbers.items():
        what, tol = LABELS[key]
        if _finite(value):
            out.append(f"  {what:<48} {value:9.2e}  (tolerance {tol:g})  "
                       f"{'ok' if value <= tol else 'DIFFERENT'}")
        else:
            out.append(f"  {what:<48} {_not_a_number(value)}  DIFFERENT")
    return out


def _not_a_number(value) -> str:
    if isinstance(value, float) and math.isinf(value):
        return ("not comparable (the shapes differ, a value is not a finite number, or the "
                "reference's values are all 0 where the model's are not)")
    return "not comparable (the model's or the reference's values are not finite numbers)"


def _first_lines(f: dict, built_at: Optional[Dict[str, str]] = None) -> List[str]:
    if _finite(f["max_abs"]) and _finite(f["rel"]):
        size = f"largest difference {f['max_abs']:.3g} ({f['rel']:.2e} relative)"
    elif _finite(f["max_abs"]):
        size = f"largest difference {f['max_abs']:.3g} (the reference's values are all 0 here)"
    else:
        size = _not_a_number(f["max_abs"] if not _finite(f["max_abs"]) else f["rel"])
    from densenet_spec.sites import shown
    site = (built_at or {}).get(f["foreign"])
    return ["", f"FIRST DIFFERENCE ({f['mode']}): {f['module']} ({f['stage']}), the "
                f"model's '{f['foreign']}': {size}"] + (
        [f"  built at {shown(site)}"] if site else []) + [
            f"  likely cause: {f['convention']}"]


def _n(v):
    return "-" if v is None else f"{v:,}"
