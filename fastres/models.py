"""Drop-in torchvision ResNets whose eval-mode forward runs the fastres inference plan.

The classes subclass torchvision's, so module names, ``state_dict`` keys, constructor arguments and
train-mode behaviour are torchvision's by construction; only the eval forward differs, and it
produces the same logits from BN-folded, fused operations (see ``fastres.plan``).
"""
from __future__ import annotations

import copy
import functools
import os
import pickle
import struct
import warnings
from typing import Any, Optional, Union

import torch
from torch import nn
from torchvision.models import resnet as tv

from .capture import FastPath, is_graph_capture
from .fold import conv_norm_pairs, fold_conv_bn, folded_skeleton_
from .ir import Plan
from .kernels.conv3x3_conv1x1_nhwc import fuses_conv3x3_conv1x1

__all__ = [
    "ResNet", "BasicBlock", "Bottleneck", "from_torchvision", "CheckpointError",
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
    "wide_resnet50_2", "wide_resnet101_2", "fold_bn",
]


class BasicBlock(tv.BasicBlock):
    """torchvision's BasicBlock (3x3 -> 3x3 + shortcut)."""


class Bottleneck(tv.Bottleneck):
    """torchvision's Bottleneck (1x1 -> 3x3 -> 1x1 + shortcut)."""


_BLOCKS = {"BasicBlock": BasicBlock, "Bottleneck": Bottleneck}
_BLOCK_TYPES = (BasicBlock, Bottleneck, tv.BasicBlock, tv.Bottleneck)


class ResNet(tv.ResNet):
    """torchvision's ResNet; in eval mode the forward runs the fused inference plan.

    The plan (BN folded, conv + bias + residual + ReLU fused, NHWC activations) is captured from
    the eval forward by tracing it (``fastres.capture``) on the first eval call and rebuilt
    whenever anything that changes the answer changes: a parameter or buffer (``load_state_dict``,
    ``.to()``, ``.half()``, an optimizer step, assignment), a submodule or one of its attributes,
    hooks (``fastres.guard``). Where the plan cannot give exactly PyTorch's result (hooks,
    parametrizations, a submodule in train mode, autograd reaching the parameters, autocast,
    float64) the forward is torchvision's own, with a one-time ``fastres.FallbackWarning`` naming
    the reason. Scripting, ``torch.jit.trace``, ``torch.fx`` and ``torch.compile`` / ``torch.export``
    see torchvision's forward.
    """

    def __init__(self, block, layers, num_classes: int = 1000, zero_init_residual: bool = False,
                 groups: int = 1, width_per_group: int = 64,
                 replace_stride_with_dilation: Optional[list[bool]] = None, norm_layer=None):
        if isinstance(block, str):
            block = _BLOCKS[block]
        super().__init__(block, layers, num_classes=num_classes,
                         zero_init_residual=zero_init_residual, groups=groups,
                         width_per_group=width_per_group,
                         replace_stride_with_dilation=replace_stride_with_dilation,
                         norm_layer=norm_layer)
        self.config = {
            "block": "Bottleneck" if issubclass(block, tv.Bottleneck) else "BasicBlock",
            "layers": list(layers),
            "num_classes": num_classes,
            "groups": groups,
            "width_per_group": width_per_group,
            "replace_stride_with_dilation": list(replace_stride_with_dilation or [False] * 3),
        }
        self.arch = _arch_name(self.config)
        self.inference_only = False   # set by fastres.fold_bn / fastres.load
        self.meta: dict[str, Any] = {}   # categories, preprocessing, weights name (for export)
        self._fastres = FastPath()

    # -- modes --------------------------------------------------------------------------------
    def train(self, mode: bool = True):
        if mode and getattr(self, "inference_only", False):
            raise RuntimeError(
                "this ResNet is inference-only (its BatchNorm layers were folded into the "
                "convolutions by fastres.fold_bn/fastres.load); train the unfolded model instead")
        return super().train(mode)

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or torch.jit.is_scripting():
            return self._forward_impl(x)
        return self._eval_forward(x)

    @torch.jit.unused
    def _eval_forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return _graph_forward(self, x)
        if is_graph_capture():
            return self._forward_impl(x)
        return self._fastres(self, x, self._forward_impl, check_input)

    def plan(self) -> Plan:
        """The current inference plan (recaptured if anything it depends on changed since);
        raises ``fastres.capture.Unsupported`` naming the reason when the forward falls back."""
        return self._fastres.plan(self)

    def plan_cache_clear(self) -> None:
        """Drop the cached plan (needed only after writes through ``.data``, which bypass the
        version counters that guard it)."""
        self._fastres.clear()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        _check_state_dict_keys(self, state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


# -- what torch.compile and torch.export trace -----------------------------------------------------
# Dynamo cannot run the fx capture or the guard, so under it the eval forward is this plain Python
# over the live modules: one fastres op per kernel (``torch.ops.fastres.*``, fastres/library.py),
# BatchNorm folded inside the graph from the current parameters (the graph follows later weight
# edits, as torchvision's does; inductor's freezing can fold it at compile time), and dynamo's own
# guards on every attribute read here recompile it when the structure changes. Any module that
# is not torchvision's ResNet structure, or any hook, runs torchvision's forward instead.
def _graph_forward(model: "ResNet", x: torch.Tensor) -> torch.Tensor:
    from . import library  # noqa: F401 - registers torch.ops.fastres

    check_input(x, model)
    if not _graph_fusable(model, x):
        return model._forward_impl(x)
    ops = torch.ops.fastres
    x = _graph_conv(model.conv1, model.bn1, x, relu=True)
    x = ops.max_pool2d_nhwc(x)
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            x = _graph_block(block, x)
    return ops.avgpool_linear(x, model.fc.weight, model.fc.bias)


def _graph_fusable(model: "ResNet", x: torch.Tensor) -> bool:
    from torchvision.ops.misc import FrozenBatchNorm2d

    from .capture import SUPPORTED_DTYPES, _global_hook_dicts

    if x.dtype not in SUPPORTED_DTYPES or any(len(d) for d in _global_hook_dicts()):
        return False
    for m in model.modules():
        if m._forward_hooks or m._forward_pre_hooks:
            return False
        if isinstance(m, nn.Conv2d) and (type(m) is not nn.Conv2d or m.padding_mode != "zeros"
                                         or isinstance(m.padding, str)):
            return False
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (
                type(m) is not nn.BatchNorm2d or m.training or m.running_var is None):
            return False
        if isinstance(m, (tv.BasicBlock, tv.Bottleneck)) and (
                type(m).forward not in (tv.BasicBlock.forward, tv.Bottleneck.forward)
                or type(m.relu) is not nn.ReLU):
            return False
    norms = (nn.BatchNorm2d, FrozenBatchNorm2d, nn.Identity)
    pool = model.maxpool
    return (type(model.conv1) is nn.Conv2d and type(model.bn1) in norms
            and type(model.relu) is nn.ReLU and type(pool) is nn.MaxPool2d
            and pool.kernel_size in (3, (3, 3)) and pool.stride in (2, (2, 2))
            and pool.padding in (1, (1, 1)) and pool.dilation in (1, (1, 1)) and not pool.ceil_mode
            and type(model.avgpool) is nn.AdaptiveAvgPool2d and model.avgpool.output_size in (1, (1, 1))
            and type(model.fc) is nn.Linear
            and all(type(b) in _BLOCK_TYPES and _graph_downsample_ok(b.downsample)
                    for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer))


def _graph_downsample_ok(down) -> bool:
    return down is None or (type(down) is nn.Sequential and len(down) == 2 and type(down[0]) is nn.Conv2d)


def _graph_folded(conv, norm, dtype):
    weight, bias = fold_conv_bn(conv, norm)
    return weight.to(dtype), bias


def _graph_shortcut(shortcut, bias, dtype):
    """(input, folded weight, stride) of a 1x1 projection ``(conv, norm, input)`` as concat-K, and
    ``bias`` with the projection's bias added; (None, None, 1) and ``bias`` without one."""
    if shortcut is None:
        return None, None, 1, bias
    sc_conv, sc_norm, sc_x = shortcut
    sc_w, sc_b = _graph_folded(sc_conv, sc_norm, dtype)
    return sc_x, sc_w, sc_conv.stride[0], bias + sc_b


def _graph_conv(conv, norm, x, *, relu, residual=None, shortcut=None):
    """One conv2d_nhwc op; ``shortcut``: (conv, norm, input) of a 1x1 projection as concat-K."""
    weight, bias = _graph_folded(conv, norm, x.dtype)
    sc_x, sc_w, sc_stride, bias = _graph_shortcut(shortcut, bias, x.dtype)
    return torch.ops.fastres.conv2d_nhwc(x, weight, bias, list(conv.stride), list(conv.padding),
                                         list(conv.dilation), conv.groups, residual, relu, sc_x, sc_w,
                                         sc_stride)


def _graph_block(block, x):
    down = block.downsample
    shortcut, residual = None, x
    if down is not None:
        d = down[0]
        if (d.kernel_size == (1, 1) and d.padding == (0, 0) and d.groups == 1 and d.dilation == (1, 1)
                and d.stride[0] == d.stride[1]):
            shortcut, residual = (d, down[1], x), None
        else:
            residual = _graph_conv(d, down[1], x, relu=False)
    if isinstance(block, tv.BasicBlock):
        y = _graph_conv(block.conv1, block.bn1, x, relu=True)
        return _graph_conv(block.conv2, block.bn2, y, relu=True, residual=residual, shortcut=shortcut)
    y = _graph_conv(block.conv1, block.bn1, x, relu=True)
    c2 = block.conv2
    if (c2.kernel_size == (3, 3) and c2.stride[0] == c2.stride[1] and c2.padding[0] == c2.padding[1]
            and c2.dilation[0] == c2.dilation[1]
            and fuses_conv3x3_conv1x1(c_mid=c2.out_channels, c_in_mid=c2.in_channels,
                                      c_out=block.conv3.out_channels, groups=c2.groups, dtype=x.dtype)):
        w_mid, b_mid = _graph_folded(c2, block.bn2, x.dtype)
        w_out, b_out = _graph_folded(block.conv3, block.bn3, x.dtype)
        sc_x, sc_w, sc_stride, b_out = _graph_shortcut(shortcut, b_out, x.dtype)
        return torch.ops.fastres.conv3x3_conv1x1_nhwc(
            y, w_mid, b_mid, w_out, b_out, list(c2.stride), list(c2.padding), list(c2.dilation),
            c2.groups, residual, sc_x, sc_w, sc_stride)
    y = _graph_conv(c2, block.bn2, y, relu=True)
    return _graph_conv(block.conv3, block.bn3, y, relu=True, residual=residual, shortcut=shortcut)


def check_input(x, model) -> None:
    """Clear errors for inputs the network cannot take (instead of a failure deep in a kernel)."""
    if not torch.is_tensor(x):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"expected a 4-D input [N, C, H, W], got shape {tuple(x.shape)}")
    weight = getattr(model.conv1, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        return
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"expected {weight.shape[1]} input channels, got {x.shape[1]} "
                         f"(input shape {tuple(x.shape)}; images go in as [N, C, H, W])")
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"input of spatial size {x.shape[2]}x{x.shape[3]} is too small: "
                         "the network needs at least 1x1 pixels")
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"input dtype {x.dtype} does not match the model's {weight.dtype}: "
                        f"cast the input (x.to({weight.dtype})) or the model")
    if x.device != weight.device:
        raise ValueError(f"input is on {x.device} but the model is on {weight.device}")


def _arch_name(config: dict) -> str:
    for name, (block, layers, kw) in _ARCHS.items():
        if (block == config["block"] and layers == config["layers"]
                and kw.get("groups", 1) == config["groups"]
                and kw.get("width_per_group", 64) == config["width_per_group"]):
            return name
    return "resnet"


def _check_state_dict_keys(model: nn.Module, state_dict) -> None:
    """Turn the common ways a checkpoint fails to match into a message that says what to do."""
    keys = list(state_dict.keys())
    if keys and all(k.startswith("module.") for k in keys):
        raise KeyError("state_dict keys start with 'module.' (saved from DataParallel/"
                       "DistributedDataParallel); strip the prefix before loading")
    own = model.state_dict()
    if any(k.endswith(".running_mean") for k in own) and not any(
            k.endswith(".running_mean") for k in keys) and any(k.endswith("conv1.bias") for k in keys):
        raise KeyError("this state_dict holds BN-folded weights (conv biases, no BatchNorm keys): "
                       "load it with fastres.load() or into a model returned by fastres.fold_bn()")


# -- constructors (torchvision's signatures) ----------------------------------------------------
_ARCHS = {
    "resnet18": ("BasicBlock", [2, 2, 2, 2], {}),
    "resnet34": ("BasicBlock", [3, 4, 6, 3], {}),
    "resnet50": ("Bottleneck", [3, 4, 6, 3], {}),
    "resnet101": ("Bottleneck", [3, 4, 23, 3], {}),
    "resnet152": ("Bottleneck", [3, 8, 36, 3], {}),
    "resnext50_32x4d": ("Bottleneck", [3, 4, 6, 3], {"groups": 32, "width_per_group": 4}),
    "resnext101_32x8d": ("Bottleneck", [3, 4, 23, 3], {"groups": 32, "width_per_group": 8}),
    "resnext101_64x4d": ("Bottleneck", [3, 4, 23, 3], {"groups": 64, "width_per_group": 4}),
    "wide_resnet50_2": ("Bottleneck", [3, 4, 6, 3], {"width_per_group": 128}),
    "wide_resnet101_2": ("Bottleneck", [3, 4, 23, 3], {"width_per_group": 128}),
}
ARCHITECTURES = tuple(_ARCHS)

_WEIGHT_ENUMS = {
    "resnet18": tv.ResNet18_Weights, "resnet34": tv.ResNet34_Weights,
    "resnet50": tv.ResNet50_Weights, "resnet101": tv.ResNet101_Weights,
    "resnet152": tv.ResNet152_Weights, "resnext50_32x4d": tv.ResNeXt50_32X4D_Weights,
    "resnext101_32x8d": tv.ResNeXt101_32X8D_Weights, "resnext101_64x4d": tv.ResNeXt101_64X4D_Weights,
    "wide_resnet50_2": tv.Wide_ResNet50_2_Weights, "wide_resnet101_2": tv.Wide_ResNet101_2_Weights,
}


class CheckpointError(ValueError):
    """A local checkpoint given as ``weights=`` that cannot be read or does not fit the model."""


_LEGACY_WEIGHTS = "IMAGENET1K_V1"   # what torchvision's pretrained=True means for every ResNet


def _build(arch: str, weights, progress: bool, kwargs: dict) -> ResNet:
    block, layers, fixed = _ARCHS[arch]
    for key, value in fixed.items():
        if key in kwargs and kwargs[key] != value:
            raise ValueError(f"{arch} fixes {key}={value}, got {key}={kwargs[key]}")
        kwargs[key] = value
    checkpoint = path = None
    if isinstance(weights, (str, os.PathLike)) and os.path.isfile(weights):
        path = os.fspath(weights)
        checkpoint = read_checkpoint(path)
        fc_weight = checkpoint.get("fc.weight")
        if fc_weight is not None and fc_weight.dim() == 2:
            kwargs.setdefault("num_classes", fc_weight.shape[0])
        weights = None
    else:
        weights = _verify_weights(_WEIGHT_ENUMS[arch], weights)
        if weights is not None:
            categories = weights.meta["categories"]
            if "num_classes" in kwargs and kwargs["num_classes"] != len(categories):
                raise ValueError(f"num_classes={kwargs['num_classes']} does not match the "
                                 f"{len(categories)} classes of {weights}")
            kwargs["num_classes"] = len(categories)
    model = ResNet(block, layers, **kwargs)
    if weights is not None:
        model.load_state_dict(weights.get_state_dict(progress=progress, check_hash=True))
        model.meta.update(_weights_meta(weights))
    if checkpoint is not None:
        _check_checkpoint_fits(model, checkpoint, path, arch)
        model.load_state_dict(checkpoint)
    return model


def _verify_weights(enum, weights):
    if isinstance(weights, (str, os.PathLike)):
        name = os.fspath(weights)
        if os.path.isdir(name):
            raise CheckpointError(f"weights={name!r} is a directory, not a checkpoint file")
        if os.sep in name or name.endswith((".pth", ".pt", ".safetensors")):
            raise FileNotFoundError(f"weights={name!r}: no such checkpoint file")
    try:
        return enum.verify(weights)
    except KeyError:
        names = ", ".join(["DEFAULT", *enum.__members__])
        raise ValueError(f"unknown weights {weights!r} for {enum.__name__}; choose one of {names} "
                         "or give the path of a local checkpoint") from None


def _weights_meta(weights) -> dict:
    """Class names and preprocessing recorded with torchvision weights (used by export/Engine)."""
    meta = {"weights": str(weights), "categories": list(weights.meta["categories"])}
    transforms = weights.transforms()
    resize = getattr(transforms, "resize_size", None)
    crop = getattr(transforms, "crop_size", None)
    meta["preprocess"] = {
        "resize": int(resize[0]) if resize else None,
        "crop": int(crop[0]) if crop else None,
        "mean": [float(v) for v in transforms.mean],
        "std": [float(v) for v in transforms.std],
    }
    return meta


# Containers training scripts wrap a state_dict in (checked in this order, at most this deep)
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "ema")
_MAX_NESTING = 4


def read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """A torchvision-style state_dict from a local .pth/.pt or .safetensors file (no pickle code).

    Every failure is a ``CheckpointError`` naming the file and what is wrong with it (empty,
    truncated, not safetensors, pickled objects, no state_dict, non-tensor values).
    """
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    if path.endswith(".safetensors"):
        state = _read_safetensors(path)
    else:
        state = _read_pickle_checkpoint(path)
    for _ in range(_MAX_NESTING):
        if not isinstance(state, dict):
            break
        if state and all(torch.is_tensor(v) for v in state.values()):
            break
        inner = next((state[k] for k in _WRAPPER_KEYS if isinstance(state.get(k), dict)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a state_dict (a dict of tensors): it "
                              f"holds a {type(state).__name__}")
    if not state:
        raise CheckpointError(f"checkpoint {path} holds an empty dict, not a state_dict")
    bad = [(k, v) for k, v in state.items() if not (isinstance(k, str) and torch.is_tensor(v))]
    if bad:
        shown = ", ".join(f"{k!r}: {type(v).__name__}" for k, v in bad[:5])
        wrappers = " or ".join(repr(k) for k in _WRAPPER_KEYS)
        raise CheckpointError(
            f"checkpoint {path} is not a state_dict: {len(bad)} of its {len(state)} entries are not "
            f"tensors under string keys ({shown}); a wrapped state_dict must sit under {wrappers}")
    return state


def _read_safetensors(path: str) -> dict:
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, framework="pt") as f:
            if (f.metadata() or {}).get("format") == "fastres-folded-resnet":
                raise CheckpointError(f"{path} is a fastres BN-folded export; load it with fastres.load()")
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"checkpoint {path} is not a readable safetensors file (truncated, "
                              f"corrupt, or another format named .safetensors): {err}") from None


def _read_pickle_checkpoint(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = next((line.strip() for line in str(err).splitlines() if "Unsupported global" in line), "")
        if not detail:   # a bad opcode: not a pickle at all, or a damaged one
            raise CheckpointError(f"checkpoint {path} is not a readable PyTorch checkpoint (not written "
                                  "by torch.save, or corrupt)") from None
        raise CheckpointError(
            f"checkpoint {path} cannot be read safely: it holds pickled Python objects other than "
            f"tensors and plain containers ({detail}); save model.state_dict() with torch.save "
            "or safetensors") from None
    except (EOFError, RuntimeError, OSError, ValueError, KeyError, IndexError,
            AttributeError, TypeError, ImportError, struct.error) as err:
        text = (str(err).strip().splitlines() or [""])[0].split(". ")[0][:200]
        raise CheckpointError(f"checkpoint {path} is not a readable PyTorch checkpoint (truncated or "
                              f"corrupt?): {type(err).__name__}: {text}") from None


def _check_checkpoint_fits(model: nn.Module, state: dict, path: str, arch: str) -> None:
    """A CheckpointError naming the file and the keys/shapes that do not fit ``model``."""
    keys = list(state)
    if all(k.startswith("module.") for k in keys):
        raise CheckpointError(f"checkpoint {path}: keys start with 'module.' (saved from DataParallel/"
                              "DistributedDataParallel); strip the prefix and save it again")
    own = model.state_dict()
    if not any(k.endswith(".running_mean") for k in keys) and any(k.endswith("conv1.bias") for k in keys):
        raise CheckpointError(f"checkpoint {path} holds BN-folded weights (conv biases, no BatchNorm "
                              "keys): load it with fastres.load() or into fastres.fold_bn(model)")
    missing = [k for k in own if k not in state]
    unexpected = [k for k in keys if k not in own]
    wrong = [f"{k} {list(state[k].shape)} (expected {list(own[k].shape)})"
             for k in own if k in state and state[k].shape != own[k].shape]
    not_float = [f"{k} ({state[k].dtype})" for k in own if k in state and own[k].is_floating_point()
                 and not state[k].is_floating_point()]
    if missing or unexpected or wrong or not_float:
        parts = []
        for what, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong),
                            ("not floating point", not_float)):
            if items:
                more = f", ... ({len(items)} in all)" if len(items) > 4 else ""
                parts.append(f"{what}: {', '.join(items[:4])}{more}")
        raise CheckpointError(f"checkpoint {path} does not fit {arch} "
                              f"(config {model.config}): " + "; ".join(parts))


def _constructor(arch: str):
    from torchvision.models._utils import handle_legacy_interface

    enum = _WEIGHT_ENUMS[arch]

    def build(*, weights=None, progress: bool = True, **kwargs: Any) -> ResNet:
        return _build(arch, weights, progress, kwargs)

    build.__name__ = build.__qualname__ = arch
    build.__module__ = __name__
    # torchvision.models.get_model_weights reads the enum off the ``weights`` annotation
    build.__annotations__ = {"weights": Optional[Union[enum, str, os.PathLike]], "progress": bool,
                             "kwargs": Any, "return": ResNet}
    # pretrained=True/False (positional or keyword) as torchvision: its warning, its weights
    legacy = handle_legacy_interface(weights=("pretrained", enum[_LEGACY_WEIGHTS]))(build)

    @functools.wraps(legacy)
    def constructor(*args: Any, **kwargs: Any) -> ResNet:
        # a path object would read as a legacy ``pretrained`` flag to torchvision's wrapper
        if isinstance(kwargs.get("weights"), os.PathLike):
            kwargs["weights"] = os.fspath(kwargs["weights"])
        if args and isinstance(args[0], os.PathLike):
            args = (os.fspath(args[0]), *args[1:])
        return legacy(*args, **kwargs)

    constructor.__doc__ = (
        f"fastres {arch}: same signature and state_dict as torchvision.models.{arch}.\n\n"
        f"``weights`` takes a {enum.__name__} value or its name (downloaded through torchvision), "
        "or the path of a local checkpoint (.pth/.pt state_dict or .safetensors). "
        f"``pretrained=True`` (deprecated, as in torchvision) means {enum.__name__}.{_LEGACY_WEIGHTS}.")
    return constructor


resnet18 = _constructor("resnet18")
resnet34 = _constructor("resnet34")
resnet50 = _constructor("resnet50")
resnet101 = _constructor("resnet101")
resnet152 = _constructor("resnet152")
resnext50_32x4d = _constructor("resnext50_32x4d")
resnext101_32x8d = _constructor("resnext101_32x8d")
resnext101_64x4d = _constructor("resnext101_64x4d")
wide_resnet50_2 = _constructor("wide_resnet50_2")
wide_resnet101_2 = _constructor("wide_resnet101_2")


# -- conversion from a torchvision instance ------------------------------------------------------
def from_torchvision(model: tv.ResNet) -> ResNet:
    """A fastres ResNet equal to a (trained, possibly fine-tuned) torchvision ResNet instance.

    Copies the structure (block type, depths, groups, width, dilation, norm layer and its eps and
    momentum), every parameter and buffer, a replaced ``fc`` module, dtype, device and train/eval mode.
    """
    if isinstance(model, ResNet):
        return model
    if not isinstance(model, tv.ResNet):
        raise TypeError(f"from_torchvision expects a torchvision ResNet, got {type(model).__name__}")
    first = model.layer1[0]
    block = "Bottleneck" if isinstance(first, tv.Bottleneck) else "BasicBlock"
    groups = first.conv2.groups
    # layer1's 3x3 has width_per_group * groups channels (torchvision's Bottleneck width rule)
    width_per_group = first.conv2.out_channels // groups if block == "Bottleneck" else 64
    dilate = [layer[0].conv2.stride == (1, 1) if block == "Bottleneck" else
              layer[0].conv1.stride == (1, 1) for layer in (model.layer2, model.layer3, model.layer4)]
    norm = type(model.bn1)
    fc = model.fc
    num_classes = fc.out_features if isinstance(fc, nn.Linear) else 1000
    new = ResNet(block, [len(model.layer1), len(model.layer2), len(model.layer3), len(model.layer4)],
                 num_classes=num_classes, groups=groups, width_per_group=width_per_group,
                 replace_stride_with_dilation=dilate,
                 norm_layer=None if norm is nn.BatchNorm2d else norm)
    if not isinstance(fc, nn.Linear):
        new.fc = copy.deepcopy(fc)
        new.config["num_classes"] = None
    param = next(model.parameters())
    new.to(device=param.device, dtype=param.dtype)
    new.load_state_dict(model.state_dict())
    for (name, mine), (_, theirs) in zip(new.named_modules(), model.named_modules()):
        if not isinstance(mine, type(theirs)) and name != "":
            raise ValueError(f"from_torchvision: module {name!r} is {type(theirs).__name__} in the "
                             f"source but {type(mine).__name__} in the rebuilt model")
        for attr in ("eps", "momentum", "track_running_stats"):
            if hasattr(theirs, attr) and name != "":
                setattr(mine, attr, getattr(theirs, attr))
    new.train(model.training)
    return new


# -- folding ---------------------------------------------------------------------------------
def fold_bn(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """An inference-only copy of a ResNet with every BatchNorm folded into its convolution.

    Accepts a fastres or torchvision ResNet; the original is left untouched. Folding is computed in
    fp32 and cast once to the model's dtype (or ``dtype``): every parameter of the copy, conv and fc
    weights and biases alike, is in that one dtype, so the copy is an ordinary module that PyTorch's
    own forward runs and that ``.float()``, ``.double()``, ``.half()`` and ``.to()`` move like any
    other (the plan reads biases in fp32 whatever their dtype). The copy refuses ``train()``, has
    ``requires_grad`` off, and its outputs equal the unfolded eval model's within rounding of ``dtype``.
    """
    source = from_torchvision(model) if not isinstance(model, ResNet) else model
    if getattr(source, "inference_only", False):
        return source if dtype is None else copy.deepcopy(source).to(dtype)
    # 1. new weights first, from the untouched model
    folded = {conv: fold_conv_bn(source.get_submodule(conv), source.get_submodule(norm))
              for conv, norm in conv_norm_pairs(source)}
    # 2. then the structural swap on a copy
    out = copy.deepcopy(source)
    folded_skeleton_(out)
    out_dtype = dtype or source.conv1.weight.dtype
    with torch.no_grad():
        for conv_name, (weight, bias) in folded.items():
            conv = out.get_submodule(conv_name)
            conv.weight = nn.Parameter(weight.to(out_dtype), requires_grad=False)
            conv.bias = nn.Parameter(bias.to(out_dtype), requires_grad=False)
        for name, p in list(out.fc.named_parameters(recurse=False)):
            setattr(out.fc, name, nn.Parameter(p.detach().to(out_dtype), requires_grad=False))
    out.requires_grad_(False)
    return out.eval()
