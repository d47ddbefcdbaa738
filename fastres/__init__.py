"""fastres: drop-in torchvision ResNets whose eval forward runs fused NHWC Triton kernels.

    import fastres
    model = fastres.resnet50().cuda().half().eval()     # torchvision's arguments and state_dict
    with torch.inference_mode():
        logits = model(images)

Importing fastres never touches a GPU or the compiled extension; the submodules that need
torchvision or triton load on first use of a name they define.
"""
import importlib

from .version import __version__
from .backend import set_backend, use_backend

_LAZY = {
    "fastres.models": ["ARCHITECTURES", "ResNet", "BasicBlock", "Bottleneck", "from_torchvision",
                       "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                       "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
                       "wide_resnet50_2", "wide_resnet101_2", "fold_bn"],
    "fastres.capture": ["FallbackWarning"],
    "fastres.optimized": ["optimize", "Optimized"],
    "fastres.checkpoint": ["export", "load"],
    "fastres.engine": ["Engine", "IMAGENET_MEAN", "IMAGENET_STD"],
    "fastres.quantize": ["quantize", "QuantizedModel", "QuantizationError"],
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}
_SUBMODULES = {"ops", "aot", "ir", "capture", "guard", "models", "checkpoint", "fold", "kernels",
               "extension", "normalize", "plan_report", "backend", "library", "ray", "ir_quant"}

__all__ = ["__version__", "set_backend", "use_backend", "ops", *_WHERE]


def __getattr__(name):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"fastres.{name}")
    raise AttributeError(f"module 'fastres' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
