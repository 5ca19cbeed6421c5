"""densenet_weights: DenseNet weights as files, without any framework.

The canonical form (torchvision's tensor names, PyTorch's layout, float32) in safetensors files
(``files``): no pickle ever crosses a framework boundary. numpy and safetensors only; a
framework is imported lazily, only for its own file format.

    files.py      canonical safetensors files (and the arrays the MXNet worker and the
                  data-parallel steps pass)
    formats/      every framework's file format, one module each (format_torch.py, ...,
                  format_onnx.py); its __init__ tells a file's format once and hands it to that
                  module: ``formats.load`` reads a file once and matches it (a ``Loaded``)
    match.py      structure matching of foreign tensors onto canonical names
    causes.py     the porting mistake most likely behind a structural difference
"""
from densenet_weights.files import FORMAT, load_state, save_state

__all__ = ["FORMAT", "load_state", "save_state"]
