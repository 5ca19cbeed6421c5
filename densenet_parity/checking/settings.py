"""BatchNorm settings, read from the user's layers (never guessed from the numbers): each
BatchNorm's epsilon and momentum, in PyTorch's words (momentum: the share of the batch
statistic taken per step; Gluon's, Flax's and Keras' momentum is the share of the running
statistic kept, 1 - PyTorch's), mapped onto the canonical module by the structure match and
compared with the reference's, read the same way from our model."""
from __future__ import annotations

from typing import Dict, List, Optional

#: epsilon values with a known origin, for the report's words.
EPSILON_WORDS = {1e-5: "PyTorch's, Gluon's and Flax's default",
                 1.001e-5: "Keras applications' value (keras.applications' DenseNets)",
                 1e-3: "Keras' and TensorFlow's BatchNormalization default"}
#: momentum values in PyTorch's words with a known origin.
MOMENTUM_WORDS = {0.1: "PyTorch's default",
                  0.01: "Flax's and Keras' default 0.99, which keeps 0.99 of the running "
                        "statistics: PyTorch's 0.01",
                  0.9: "Gluon's and Flax's 'keep 0.9' typed into PyTorch, where it takes 0.9 "
                       "of the batch statistic",
                  0.99: "Flax's and Keras' 'keep 0.99' typed into PyTorch"}
#: how close two settings must be to be the same (float32 and float64 copies of one number)
RTOL = 1e-6


def canonical(settings: Dict[str, dict], modules: Dict[str, str]) -> Dict[str, dict]:
    """The model's module -> settings  =>  canonical module -> settings (with 'foreign')."""
    out = {}
    for cmod, foreign in modules.items():
        if foreign in settings:
            out[cmod] = dict(settings[foreign], foreign=foreign)
    return out


def _differs(a, b) -> bool:
    if a is None or b is None:
        return (a is None) != (b is None)
    return abs(a - b) > RTOL * max(abs(b), 1e-30)


def _words(value, table) -> str:
    if value is None:
        return "a cumulative average of every batch's statistics (PyTorch's momentum=None)"
    for known, words in table.items():
        if not _differs(value, known):
            return words
    return ""


def differences(config, user: Dict[str, dict], ref: Dict[str, dict], modules: Dict[str, str],
                framework: str) -> List[dict]:
    """Every BatchNorm setting of the model that differs from the reference's, in the preset's
    order: {"module", "foreign", "setting", "model", "reference", "as_written", "words"}. A
    BatchNorm of the preset whose settings could not be read, in the model or in the reference,
    is a difference too (setting "unread"): a reader that finds nothing cannot pass silently."""
    import densenet_spec as spec
    out = []
    for cmod, kind, _ in spec.canonical_modules(config):
        if kind != "bn":
            continue
        u, r = user.get(cmod), ref.get(cmod)
        if u is None or r is None:
            whose = f"the {framework} model" if u is None else "the reference"
            out.append({"module": cmod, "foreign": modules.get(cmod, ""), "setting": "unread",
                        "model": None, "reference": None, "as_written": "",
                        "words": f"its settings could not be read from {whose}"})
            continue
        for key, table in (("epsilon", EPSILON_WORDS), ("momentum", MOMENTUM_WORDS)):
            if _differs(u[key], r[key]):
                out.append({"module": cmod, "foreign": u["foreign"], "setting": key,
                            "model": u[key], "reference": r[key],
                            "as_written": u.get("as_written", ""), "words": _words(u[key], table)})
    return out


def for_reference(user: Dict[str, dict]) -> Dict[str, dict]:
    """The model's settings (canonical module -> settings) for our PyTorch model, whose module
    names are the canonical ones: -> {"epsilon", "momentum"} (PyTorch's words are its own)."""
    return {cmod: {"epsilon": s["epsilon"], "momentum": s["momentum"]} for cmod, s in user.items()}


def summary(diffs: List[dict], built_at: Optional[Dict[str, str]] = None) -> List[str]:
    """Report lines: one per distinct difference (a setting, the model's value, the
    reference's), naming the first BatchNorm that has it (and the line that built it, where
    ``built_at``, the model's module -> 'FILE:LINE', knows it) and how many more do."""
    groups: Dict[tuple, List[dict]] = {}
    for d in diffs:
        groups.setdefault((d["setting"], d["model"], d["reference"]), []).append(d)
    lines = []
    for (setting, model, reference), ds in groups.items():
        d = ds[0]
        site = (built_at or {}).get(d["foreign"])
        where = f"{d['module']} (the model's '{d['foreign']}'" + (
            f", built at {site})" if site else ")") + (
            f" and {len(ds) - 1} more BatchNorm{'s' if len(ds) > 2 else ''}" if len(ds) > 1 else "")
        if setting == "unread":
            lines.append(f"{where}: {d['words']}")
            continue
        value, ref = _setting(model), _setting(reference)
        what = "momentum (PyTorch's words)" if setting == "momentum" else "epsilon"
        line = f"{where}: {what} {value}, the reference {ref}"
        if d["words"]:
            line += f" — {d['words']}"
        if d["as_written"]:
            line += f"; written as {d['as_written']}"
        lines.append(line)
    return lines



def _setting(value) -> str:
    """A setting as the report says it: None (PyTorch's cumulative average), a number, or, for a
    value that is no finite number, words."""
    import math
    if value is None:
        return "None"
    if not math.isfinite(value):
        return "not a finite number"
    return f"{value:.4g}"
