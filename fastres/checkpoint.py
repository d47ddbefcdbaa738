"""Export the BN-folded weights of a ResNet to a safetensors file, and load them back.

Written by ``fastres.export``, read by ``fastres.load``. The file holds only tensors and string
metadata (no pickle, nothing executes from it):

    tensors   the folded model's state_dict: conv weights and fc weight in the export dtype,
              conv biases (BN folded into them) and fc bias in fp32, as the kernels' epilogues use them
    metadata  format, format_version, arch, config (JSON constructor arguments), dtype,
              fastres_version, sha256 (over every tensor, so corruption of the data is caught),
              optional categories / preprocess (JSON)
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

import torch
from torch import nn

from .fold import folded_skeleton_
from .version import __version__

FORMAT = "fastres-folded-resnet"
FORMAT_VERSION = 1

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class ExportFormatError(ValueError):
    """A file that is not a readable fastres export (corrupt, truncated, other format/version)."""


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def export(model: nn.Module, path: str | os.PathLike, dtype: torch.dtype = torch.float16, *,
           categories: Optional[list[str]] = None, preprocess: Optional[dict] = None) -> str:
    """Write the BN-folded weights of ``model`` (fastres or torchvision ResNet) to ``path``.

    Weights are folded in fp32 and cast once to ``dtype``; biases stay fp32. ``categories`` and
    ``preprocess`` (``{"resize", "crop", "mean", "std"}``) default to what the model carries from
    torchvision ``weights=``.
    """
    from safetensors.torch import save_file

    from .models import fold_bn

    if dtype not in _DTYPES.values():
        raise ValueError(f"export dtype must be one of float16, bfloat16, float32; got {dtype}")
    folded = fold_bn(model, dtype=dtype)
    _check_reproducible(folded)
    if not isinstance(folded.fc, nn.Linear):
        raise ValueError(f"export supports an nn.Linear fc head; this model's fc is "
                         f"{type(folded.fc).__name__}")
    config = dict(folded.config, num_classes=folded.fc.out_features)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in folded.state_dict().items()}
    tensors["fc.weight"] = tensors["fc.weight"].to(dtype)
    if "fc.bias" in tensors:
        tensors["fc.bias"] = tensors["fc.bias"].float()
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
        "sha256": _digest(tensors),
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


def read_export(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of an export, validated: format, version, checksum."""
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no fastres export at {path}")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ExportFormatError(f"{path} is not a readable safetensors file (truncated or "
                                f"corrupt?): {err}") from err
    if metadata.get("format") != FORMAT:
        raise ExportFormatError(f"{path} is not a fastres export (format "
                                f"{metadata.get('format')!r}, expected {FORMAT!r})")
    version = metadata.get("format_version")
    if version != str(FORMAT_VERSION):
        raise ExportFormatError(f"{path} has fastres export format version {version!r}; this "
                                f"fastres ({__version__}) reads version {FORMAT_VERSION}")
    if metadata.get("sha256") != _digest(tensors):
        raise ExportFormatError(f"{path} is corrupt: its tensors do not match the recorded sha256")
    try:
        for key in ("config", "categories", "preprocess"):
            if key in metadata:
                metadata[key] = json.loads(metadata[key])
    except json.JSONDecodeError as err:
        raise ExportFormatError(f"{path} has unreadable {key!r} metadata: {err}") from err
    return tensors, metadata


def load(path: str | os.PathLike, device: str | torch.device | None = None, *,
         arch: Optional[str] = None) -> nn.Module:
    """A ready inference module (eval, inference-only) from a ``fastres.export`` file.

    ``arch``, when given, must match the file's architecture.
    """
    from .models import ResNet

    tensors, metadata = read_export(path)
    config = metadata.get("config")
    if not isinstance(config, dict):
        raise ExportFormatError(f"{path} lacks the model config")
    if arch is not None and metadata.get("arch") != arch:
        raise ValueError(f"{path} holds a {metadata.get('arch')} model, not {arch}")
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
    model.requires_grad_(False)
    if "categories" in metadata:
        model.meta["categories"] = metadata["categories"]
    if "preprocess" in metadata:
        model.meta["preprocess"] = metadata["preprocess"]
    model.meta["export_dtype"] = metadata.get("dtype")
    if device is not None:
        model.to(device)
    return model.eval()
