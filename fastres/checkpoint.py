"""Export the BN-folded weights of a ResNet to a safetensors file, and load them back.

Written by ``fastres.export``, read by ``fastres.load``. The file holds only tensors and string
metadata (no pickle, nothing executes from it). (A ``fastres.quantize`` module is written as its
8-bit plan instead: ``fastres.quantized.export_quantized`` / ``load_quantized``.)

    tensors   the folded model's state_dict: conv weights and fc weight in the export dtype,
              conv biases (BN folded into them) and fc bias in fp32, as the kernels' epilogues use them
    metadata  format, format_version, arch, config (JSON constructor arguments), dtype,
              fastres_version, sha256 (over every tensor, so corruption of the data is caught),
              optional categories / preprocess (JSON)
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Optional

import torch
from torch import nn

from .files import ExportFormatError, digest, read_safetensors
from .fold import folded_skeleton_
from .version import __version__

FORMAT = "fastres-folded-resnet"
FORMAT_VERSION = 1

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def export(model: nn.Module, path: str | os.PathLike, dtype: torch.dtype = torch.float16, *,
           categories: Optional[list[str]] = None, preprocess: Optional[dict] = None) -> str:
    """Write the BN-folded weights of ``model`` (fastres or torchvision ResNet) to ``path``.

    Weights are folded in fp32 and cast once to ``dtype``; biases stay fp32. ``categories`` and
    ``preprocess`` (``{"resize", "crop", "mean", "std"}``) default to what the model carries from
    torchvision ``weights=``.
    """
    from safetensors.torch import save_file

    from .models import fold_bn
    from .quantized import QuantizedModel, export_quantized

    if isinstance(model, QuantizedModel):       # fastres.quantize's module: its 8-bit plan and scales
        return export_quantized(model, path)
    if dtype not in _DTYPES.values():
        raise ValueError(f"export dtype must be one of float16, bfloat16, float32; got {dtype}")
    folded = fold_bn(model, dtype=torch.float32)    # folded in fp32; cast below
    if not isinstance(folded.fc, nn.Linear):
        raise ValueError(f"export supports an nn.Linear fc head; this model's fc is "
                         f"{type(folded.fc).__name__}")
    _check_reproducible(folded)
    config = dict(folded.config, num_classes=folded.fc.out_features)
    # weights in the export dtype, biases in fp32 (folded in fp32, never rounded through dtype)
    tensors = {k: (v.to(dtype) if k.endswith(".weight") else v).detach().to("cpu").contiguous()
               for k, v in folded.state_dict().items()}
    meta = getattr(folded, "meta", {}) or {}
    categories = categories if categories is not None else meta.get("categories")
    preprocess = preprocess if preprocess is not None else meta.get("preprocess")
    if categories is not None and len(categories) != config["num_classes"]:
        raise ValueError(f"{len(categories)} categories given for a model with "
                         f"{config['num_classes']} classes")
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "arch": folded.arch,
        "config": json.dumps(config),
        "dtype": str(dtype).removeprefix("torch."),
        "fastres_version": __version__,
        "sha256": digest(tensors),
    }
    if categories is not None:
        metadata["categories"] = json.dumps(list(categories))
    if preprocess is not None:
        metadata["preprocess"] = json.dumps(preprocess)
    path = os.fspath(path)
    save_file(tensors, path, metadata=metadata)
    return path


def _check_reproducible(folded: nn.Module) -> None:
    """An export holds a ResNet's folded weights and config, nothing else: refuse a model whose
    forward that would not reproduce (hooks, a replaced activation or pool, a custom block)."""
    from .capture import Unsupported, capture

    try:
        plan = capture(folded)
    except Unsupported as err:
        raise ValueError(f"fastres.export: this model cannot be exported faithfully: {err}") from None
    custom = [f"{s.name} ({s.ops[0]})" for s in plan.steps if s.kind == "torch"]
    if custom:
        raise ValueError("fastres.export: the export format holds a torchvision-structured ResNet, "
                         f"but this model computes more: {', '.join(custom[:5])} would be lost")


def read_export(path: str | os.PathLike, *, read: Optional[tuple] = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of an export, validated: format, version, checksum (``read``: the
    file's (tensors, metadata) when the caller has read it already)."""
    tensors, metadata = read if read is not None else read_safetensors(path)
    path = os.fspath(path)
    if metadata.get("format") != FORMAT:
        raise ExportFormatError(f"{path} is not a fastres export (format "
                                f"{metadata.get('format')!r}, expected {FORMAT!r})")
    version = metadata.get("format_version")
    if version != str(FORMAT_VERSION):
        raise ExportFormatError(f"{path} has fastres export format version {version!r}; this "
                                f"fastres ({__version__}) reads version {FORMAT_VERSION}")
    if metadata.get("sha256") != digest(tensors):
        raise ExportFormatError(f"{path} is corrupt: its tensors do not match the recorded sha256")
    for key in ("config", "categories", "preprocess"):
        if key in metadata:
            try:
                metadata[key] = json.loads(metadata[key])
            except (json.JSONDecodeError, RecursionError) as err:
                raise ExportFormatError(f"{path} has unreadable {key!r} metadata: "
                                        f"{'nested too deeply' if isinstance(err, RecursionError) else err}") from None
    _check_metadata(metadata, path)
    return tensors, metadata


def load(path: str | os.PathLike, device: str | torch.device | None = None, *,
         arch: Optional[str] = None) -> nn.Module:
    """A ready inference module (eval, inference-only) from a ``fastres.export`` file.

    Every parameter is in the file's dtype (the file's fp32 biases are rounded to it once), as for
    ``fastres.fold_bn``'s modules, so ``.float()``, ``.double()``, ``.half()``, ``.to()`` behave as
    on any module; reload the file for the exact fp32 biases.

    ``arch``, when given, must match the file's architecture.
    """
    from .models import ResNet
    from .quantized import is_quantized_file, load_quantized

    tensors, metadata = read_safetensors(path)
    if is_quantized_file(metadata):         # a fastres.quantize module's 8-bit plan
        if arch is not None:
            raise ValueError(f"{path} holds a quantized plan, which records no arch: load it without arch=")
        return load_quantized(path, device, read=(tensors, metadata))
    tensors, metadata = read_export(path, read=(tensors, metadata))
    config = metadata.get("config")
    if arch is not None and metadata.get("arch") != arch:
        raise ValueError(f"{path} holds a {metadata.get('arch')} model, not {arch}")
    config = validate_config(config, tensors, path, metadata.get("dtype"))
    try:
        with torch.device("meta"):
            model = ResNet(**config)
    except (TypeError, KeyError, ValueError) as err:
        raise ExportFormatError(f"{path} has an invalid model config {config}: {err}") from err
    folded_skeleton_(model)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if tensors[k].shape != expected[k])
    if missing or unexpected or wrong:
        raise ExportFormatError(
            f"{path}: tensors do not fit a {metadata.get('arch')} with config {config} "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape {wrong[:5]})")
    model.load_state_dict(tensors, assign=True)
    # one dtype for every parameter (fp32 biases of the file rounded once), like fold_bn's modules
    model.to(dtype=_DTYPES[metadata["dtype"]])
    model.requires_grad_(False)
    if "categories" in metadata:
        model.meta["categories"] = metadata["categories"]
    if "preprocess" in metadata:
        model.meta["preprocess"] = metadata["preprocess"]
    model.meta["export_dtype"] = metadata.get("dtype")
    if device is not None:
        model.to(device)
    return model.eval()


# -- validation of what a file claims, before anything is built from it ---------------------------
_CONFIG_KEYS = {"block", "layers", "num_classes", "groups", "width_per_group", "replace_stride_with_dilation"}
_MAX_BLOCKS_PER_STAGE = 64          # torchvision's deepest ResNet (152) has 36
_MAX_CHANNELS = 1 << 16             # per conv; wide_resnet101_2's widest has 2048
_MAX_CLASSES = 1 << 20
_MAX_METADATA_CHARS = 1 << 22       # categories and the rest; ImageNet-21k names are ~0.5 MB
_BLOCK_KEY = re.compile(r"layer([1-4])\.(\d+)\.")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_metadata(metadata: dict, path: str) -> None:
    """Types and sizes of every metadata entry fastres reads (an ExportFormatError names the entry)."""
    def bad(key, why):
        raise ExportFormatError(f"{path}: metadata {key!r} {why}")

    for key in ("arch", "dtype", "fastres_version"):
        if key in metadata and not (isinstance(metadata[key], str) and len(metadata[key]) <= 64):
            bad(key, "must be a short string")
    if metadata.get("dtype") not in _DTYPES:
        bad("dtype", f"is {metadata.get('dtype')!r}; expected one of {', '.join(_DTYPES)}")
    if "config" not in metadata:
        bad("config", "is missing: the file does not say which model its tensors belong to")
    if not isinstance(metadata["config"], dict):
        bad("config", f"must be a JSON object, got {type(metadata['config']).__name__}")
    if "categories" in metadata:
        cats = metadata["categories"]
        if not (isinstance(cats, list) and all(isinstance(c, str) for c in cats)):
            bad("categories", "must be a JSON list of strings (one class name per output)")
        if sum(len(c) for c in cats) > _MAX_METADATA_CHARS:
            bad("categories", f"holds more than {_MAX_METADATA_CHARS} characters")
    if "preprocess" in metadata:
        pre = metadata["preprocess"]
        if not isinstance(pre, dict):
            bad("preprocess", "must be a JSON object {resize, crop, mean, std}")
        unknown = sorted(set(pre) - {"resize", "crop", "mean", "std"})
        if unknown:
            bad("preprocess", f"has unknown keys {unknown}; expected resize, crop, mean, std")
        for key in ("resize", "crop"):
            v = pre.get(key)
            if v is not None and not (_is_int(v) and 1 <= v <= 16384):
                bad("preprocess", f"{key} must be null or an int in [1, 16384], got {v!r}")
        for key in ("mean", "std"):
            v = pre.get(key)
            if v is not None and not (isinstance(v, list) and len(v) == 3 and all(
                    isinstance(e, (int, float)) and not isinstance(e, bool) and math.isfinite(e) for e in v)):
                bad("preprocess", f"{key} must be null or a list of 3 finite numbers, got {v!r}")
            if key == "std" and v is not None and any(e <= 0 for e in v):
                bad("preprocess", f"std must be positive, got {v!r}")


def validate_config(config: dict, tensors: dict, path: str, dtype: Optional[str] = None) -> dict:
    """The constructor arguments a file's metadata claims, checked against bounds and against the
    tensors the file holds (block count per stage from the tensor names, widths and classes from
    their shapes), so a forged config is refused before any module is built."""
    def bad(why):
        raise ExportFormatError(f"{path}: invalid model config: {why}")

    unknown = sorted(set(config) - _CONFIG_KEYS)
    if unknown:
        bad(f"unknown keys {unknown}; expected {sorted(_CONFIG_KEYS)}")
    for key in ("block", "layers"):
        if key not in config:
            bad(f"missing {key!r}")
    block = config["block"]
    if block not in ("BasicBlock", "Bottleneck"):
        bad(f"block must be 'BasicBlock' or 'Bottleneck', got {block!r}")
    layers = config["layers"]
    if not (isinstance(layers, list) and len(layers) == 4 and all(_is_int(n) for n in layers)):
        bad(f"layers must be a list of 4 ints, got {layers!r}")
    if not all(1 <= n <= _MAX_BLOCKS_PER_STAGE for n in layers):
        bad(f"layers {layers} out of range: each stage has 1..{_MAX_BLOCKS_PER_STAGE} blocks")
    ints = {"num_classes": (1, _MAX_CLASSES), "groups": (1, _MAX_CHANNELS),
            "width_per_group": (1, _MAX_CHANNELS)}
    for key, (lo, hi) in ints.items():
        if key in config and not (_is_int(config[key]) and lo <= config[key] <= hi):
            bad(f"{key} must be an int in [{lo}, {hi}], got {config[key]!r}")
    groups, width = config.get("groups", 1), config.get("width_per_group", 64)
    if block == "BasicBlock" and (groups != 1 or width != 64):
        bad(f"BasicBlock takes groups=1 and width_per_group=64, got {groups} and {width}")
    if groups * width > _MAX_CHANNELS:
        bad(f"groups x width_per_group = {groups * width} channels exceeds {_MAX_CHANNELS}")
    dilation = config.get("replace_stride_with_dilation", [False] * 3)
    if not (isinstance(dilation, list) and len(dilation) == 3 and all(isinstance(d, bool) for d in dilation)):
        bad(f"replace_stride_with_dilation must be a list of 3 bools, got {dilation!r}")

    # the tensors present: blocks per stage, block type, widths, classes
    counts = [0, 0, 0, 0]
    seen: set = set()
    for name in tensors:
        m = _BLOCK_KEY.match(name)
        if m and (m.group(1), m.group(2)) not in seen:
            seen.add((m.group(1), m.group(2)))
            counts[int(m.group(1)) - 1] += 1
    if counts != layers:
        bad(f"layers {layers} but the file holds {counts} blocks per stage")
    has_conv3 = "layer1.0.conv3.weight" in tensors
    if has_conv3 != (block == "Bottleneck"):
        bad(f"block {block!r} but the tensors are those of a "
            f"{'Bottleneck' if has_conv3 else 'BasicBlock'} network")
    for name, want in (("conv1.weight", None), ("fc.weight", None), ("layer1.0.conv2.weight", None)):
        if name not in tensors:
            bad(f"the file has no {name!r} tensor")
    mid = tensors["layer1.0.conv2.weight"].shape[0]
    expected_mid = groups * width if block == "Bottleneck" else 64
    if mid != expected_mid:
        bad(f"groups={groups} x width_per_group={width} gives {expected_mid} channels in layer1's 3x3, "
            f"the file's layer1.0.conv2.weight has {mid}")
    fc = tensors["fc.weight"]
    num_classes = config.get("num_classes", 1000)
    if fc.dim() != 2 or fc.shape[0] != num_classes:
        bad(f"num_classes={num_classes} but fc.weight has shape {list(fc.shape)}")
    not_float = sorted(k for k, t in tensors.items() if not t.is_floating_point())
    if not_float:
        bad(f"non-float tensors {not_float[:5]}")
    if dtype in _DTYPES:
        wrong = sorted(k for k, t in tensors.items() if k.endswith(".weight") and t.dtype != _DTYPES[dtype])
        if wrong:
            bad(f"the file says dtype {dtype} but {wrong[:3]} are {tensors[wrong[0]].dtype}")
    return dict(config, layers=list(layers), replace_stride_with_dilation=list(dilation))
