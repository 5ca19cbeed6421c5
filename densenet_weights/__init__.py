"""densenet_weights: DenseNet weights as files, without any framework.

The canonical form (torchvision's tensor names, PyTorch's layout, float32) in safetensors files
(``files``): no pickle ever crosses a framework boundary. numpy and safetensors only; a
framework is imported lazily, only for its own file format.
"""
from densenet_weights.files import FORMAT, load_state, save_state

__all__ = ["FORMAT", "load_state", "save_state"]
