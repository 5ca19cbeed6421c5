"""What every format module shares: the error a file that is not one raises, and ``Loaded``, a
weights file read once: its tensors, their match onto a preset, and what the reader noticed."""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Dict, List, Mapping, Optional

import numpy as np

import densenet_spec as spec
from densenet_weights import match as matching


class WeightsFormatError(ValueError):
    """A file that is not a weights file this project reads (or a damaged one). ``format``: the
    format its first bytes told (set by ``formats.load``), None where they told none."""

    def __init__(self, message: str, format: Optional[str] = None):
        super().__init__(message)
        self.format = format


@dataclasses.dataclass
class Loaded:
    """A weights file read once (``formats.load``): the canonical state, where it fits the
    preset, and everything the reader noticed on the way.

    ``tensors``: the file's own tensors as they were matched (its names and layout; ONNX:
    ``<module>.<role>``, folded BatchNorms put back); ``match``: them onto the preset given, the
    one the file records, or the one its structure fits (``densenet_weights.match.Match``: its
    config, mapping, first difference); ``recorded``: the preset the file records (canonical
    safetensors files and our ONNX exports carry it), or None; ``folded``: the canonical
    BatchNorms an exporter folded into the convolution before them (put back as identity
    BatchNorms); ``settings``: canonical BatchNorm module -> its settings as the file holds them
    (ONNX: epsilon, momentum in ONNX's words, the node, training_mode), empty where the file
    holds none; ``notes``: what to tell the user; ``info``: what the file says about itself
    (ONNX: producer, opset, external data, operators, input and outputs); ``layers``: ONNX's
    weight-carrying nodes (``OnnxLayer``); ``model``: the format's own object where a caller
    runs it (ONNX: the ModelProto, external data loaded)."""
    path: str
    format: str
    layout: str
    tensors: "OrderedDict[str, np.ndarray]"
    match: matching.Match
    recorded: Optional[spec.Preset] = None
    folded: List[str] = dataclasses.field(default_factory=list)
    settings: Dict[str, dict] = dataclasses.field(default_factory=dict)
    notes: List[str] = dataclasses.field(default_factory=list)
    info: Dict[str, object] = dataclasses.field(default_factory=dict)
    layers: list = dataclasses.field(default_factory=list)
    model: object = None

    @property
    def config(self) -> spec.Preset:
        return self.match.config

    @property
    def ok(self) -> bool:
        """Every tensor matched: ``state`` is the canonical state."""
        return self.match.ok and self.match.state is not None

    @property
    def state(self) -> Optional[Dict[str, np.ndarray]]:
        return self.match.state if self.ok else None


def by_structure(path, fmt: str, layout: str, natural: bool, tensors: Mapping[str, np.ndarray],
                 preset=None, recorded: Optional[spec.Preset] = None, **options) -> Loaded:
    """A file of named tensors (every format but ONNX) matched onto ``preset`` (else the one it
    records, else every preset) in the format's layout and order (``natural``: the file does
    not keep the model's order, so modules are matched in natural name order)."""
    m = matching.match(tensors, preset if preset is not None else recorded, layout=layout,
                       natural=natural, **options)
    return Loaded(path, fmt, layout, OrderedDict(tensors), m, recorded)
