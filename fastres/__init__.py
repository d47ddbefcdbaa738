"""fastres: drop-in torchvision ResNets whose eval forward runs fused NHWC Triton kernels.

    import fastres
    model = fastres.resnet50().cuda().half().eval()     # torchvision's arguments and state_dict
    with torch.inference_mode():
        logits = model(images)

Importing fastres never touches a GPU or the compiled extension.
"""
from .version import __version__
from .backend import set_backend, use_backend
from .fold import fold_bn
from .models import (
    ARCHITECTURES, BasicBlock, Bottleneck, ResNet, from_torchvision,
    resnet18, resnet34, resnet50, resnet101, resnet152,
    resnext50_32x4d, resnext101_32x8d, resnext101_64x4d, wide_resnet50_2, wide_resnet101_2,
)
from .export import export, load
from . import ops

__all__ = [
    "__version__", "ARCHITECTURES", "ResNet", "BasicBlock", "Bottleneck", "from_torchvision",
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
    "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
    "fold_bn", "export", "load", "ops", "set_backend", "use_backend",
]
