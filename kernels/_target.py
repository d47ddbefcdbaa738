"""The GPU a launch is sized for: its architecture and SM count (the tile rules count waves on it).

On a CUDA device both come from the device (read once per device, on first use: importing this
module queries nothing). Elsewhere (meta tensors recorded for ``fastres aot`` / ``inspect``, CPU
tensors under the interpreter) a default target is used, H100 SXM, or the one ``use_target``
sets for the current thread: ``fastres aot`` records each architecture's plan under its target.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Target:
    sm: int        # compute capability as an int: 80 (A100), 90 (H100/H200)
    sms: int       # streaming multiprocessors


# Public SM counts: H100 SXM5 132 (H200 too), A100 SXM4/PCIe 108.
TARGETS = {90: Target(90, 132), 80: Target(80, 108)}
DEFAULT_TARGET = TARGETS[90]

_local = threading.local()


@contextlib.contextmanager
def use_target(target: Target | int):
    """Size non-CUDA launches (meta recording) for ``target`` (a Target or an architecture in TARGETS)."""
    target = TARGETS[target] if isinstance(target, int) else target
    previous = getattr(_local, "target", None)
    _local.target = target
    try:
        yield target
    finally:
        _local.target = previous


@functools.lru_cache(maxsize=None)
def _cuda_target(index: int) -> Target:
    props = torch.cuda.get_device_properties(index)
    return Target(props.major * 10 + props.minor, props.multi_processor_count)


def target_for(device: torch.device) -> Target:
    """The target of a launch on ``device``: the device itself on CUDA, else the thread's or the default."""
    if device.type == "cuda" and torch.cuda.is_available():   # (fake CUDA tensors have no device)
        return _cuda_target(device.index if device.index is not None else torch.cuda.current_device())
    return getattr(_local, "target", None) or DEFAULT_TARGET


def table_arch(sm: int) -> int:
    """The architecture whose tuning table row applies to ``sm``: 90 for Hopper and newer, else 80."""
    return 90 if sm >= 90 else 80
