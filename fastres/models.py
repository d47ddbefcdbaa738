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

from . import plan as _plan
from .fold import NotFoldableError

__all__ = [
    "ResNet", "BasicBlock", "Bottleneck", "from_torchvision", "CheckpointError",
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
    "wide_resnet50_2", "wide_resnet101_2",
]


class BasicBlock(tv.BasicBlock):
    """torchvision's BasicBlock (3x3 -> 3x3 + shortcut)."""


class Bottleneck(tv.Bottleneck):
    """torchvision's Bottleneck (1x1 -> 3x3 -> 1x1 + shortcut)."""


_BLOCKS = {"BasicBlock": BasicBlock, "Bottleneck": Bottleneck}


class ResNet(tv.ResNet):
    """torchvision's ResNet; in eval mode the forward runs the fused inference plan.

    The plan (BN folded, conv + bias + residual + ReLU fused, NHWC activations) is built on the first
    eval forward and rebuilt whenever a parameter or buffer changes: ``load_state_dict``, ``.to()``,
    ``.half()``, an optimizer step or an assignment are all seen through the tensors' identities and
    version counters (``fastres.plan.ParameterGuard``).

    When autograd has to reach the parameters (grad mode on and a parameter requires grad, or an
    input that requires grad on the Triton backend), the eval forward is torchvision's unfused one, so
    gradients stay exact; use ``torch.inference_mode()`` / ``torch.no_grad()`` (or
    ``requires_grad_(False)``) to serve from the plan.
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
        self._plan_cache = _plan.PlanCache()
        self._warned_autograd = False
        self._warned_unfoldable = False

    # -- modes --------------------------------------------------------------------------------
    def train(self, mode: bool = True):
        if mode and getattr(self, "inference_only", False):
            raise RuntimeError(
                "this ResNet is inference-only (its BatchNorm layers were folded into the "
                "convolutions by fastres.fold_bn/fastres.load); train the unfolded model instead")
        return super().train(mode)

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self._forward_impl(x)
        _plan.check_input(x, self)
        if self._needs_autograd(x):
            if not self._warned_autograd:
                self._warned_autograd = True
                warnings.warn(
                    "fastres: eval-mode forward with autograd reaching the parameters runs "
                    "torchvision's unfused forward so gradients stay exact; wrap inference in "
                    "torch.inference_mode() (or call requires_grad_(False)) to run the fused plan",
                    stacklevel=2)
            return self._forward_impl(x)
        try:
            plan = self.plan()
        except NotFoldableError as err:
            if not self._warned_unfoldable:
                self._warned_unfoldable = True
                warnings.warn(f"fastres: {err}; eval runs torchvision's unfused forward", stacklevel=2)
            return self._forward_impl(x)
        return plan.run(x)

    def _needs_autograd(self, x: torch.Tensor) -> bool:
        if self.inference_only or not torch.is_grad_enabled():
            return False
        return any(p.requires_grad for p in self.parameters()) or (
            x.requires_grad and _plan.backend_for(x.device) != "torch")

    def plan(self) -> "_plan.Plan":
        """The current inference plan (rebuilt if any parameter or buffer changed since)."""
        return self._plan_cache.get(self)

    def plan_cache_clear(self) -> None:
        """Drop the cached plan (needed only after writes through ``.data``, which bypass the
        version counters that guard it)."""
        self._plan_cache.clear()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        _check_state_dict_keys(self, state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def __deepcopy__(self, memo):
        # The cached plan holds weak references; a copy starts with an empty cache.
        cls = self.__class__
        new = cls.__new__(cls)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            new.__dict__[k] = _plan.PlanCache() if k == "_plan_cache" else copy.deepcopy(v, memo)
        return new


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
