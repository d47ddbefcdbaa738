"""What fastres's two file formats share: one safetensors read with clear errors and the checksum.

``fastres.checkpoint`` (BN-folded float weights) and ``fastres.quantize`` (8-bit plans) both write
tensors plus string metadata (no pickle) and record a sha256 over every tensor.
"""
from __future__ import annotations

import hashlib
import os

import torch


class ExportFormatError(ValueError):
    """A file that is not a readable fastres export (corrupt, truncated, other format/version)."""


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a safetensors file: FileNotFoundError when there is none,
    ExportFormatError when it cannot be read (the checksum is the format reader's to check)."""
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
    return tensors, metadata
