"""The CPU backend's own C++ kernels (float32, NHWC): the compiled ``fastres._cpu`` (csrc/cpu_ops.h),
the stem's max pool and the head's mean. Winograd's convolutions, which use the same module, are
in ``fastres.winograd``.

``max_pool3x3s2`` is ``F.max_pool2d(x, 3, stride=2, padding=1)`` bit for bit (the same window
order, -inf start and NaN propagation as PyTorch's CPU kernel; its reference is PyTorch's,
``kernels.max_pool2d_nhwc.max_pool2d_nhwc_ref``, and the tests compare bits), a channel
vector at a time, without the GIL: resnet50's stem pool at batch 8 takes 1.0 ms alone on the
AVX-512 machine against 2.2 ms in PyTorch's channels_last kernel (3.5 ms inside a forward).

``global_mean`` is ``x.mean((2, 3))``: each image's pixels summed in order in double and divided
once (the exact mean correctly rounded, where PyTorch's float32 mean is a few roundings off; and
the same bits for an image whatever the batch or thread count). PyTorch's mean took 0.27 ms as
the head's pool inside a resnet50 batch-1 forward for 11 us of work (csrc/pool_cpu.cpp says why).
"""
from __future__ import annotations

import torch

_extension = None
_extension_error = ""


def extension():
    """The compiled ``fastres._cpu`` module, or None (``unavailable_reason`` says why)."""
    global _extension, _extension_error
    if _extension is None and not _extension_error:
        try:
            from . import _cpu
            _extension = _cpu
        except ImportError as err:
            _extension_error = (f"fastres._cpu is not built ({err}): pip install --no-build-isolation -e . "
                                "builds it")
    return _extension


def available() -> bool:
    return extension() is not None


def unavailable_reason() -> str:
    extension()
    return _extension_error


def max_pool3x3s2(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 3, stride=2, padding=1)`` of a channels_last float32 CPU tensor, as a
    channels_last tensor."""
    ext = extension()
    if ext is None:
        raise RuntimeError(unavailable_reason())
    return ext.max_pool3x3s2(x)


def global_mean(x: torch.Tensor) -> torch.Tensor:
    """``x.mean((2, 3))`` of a channels_last float32 CPU tensor, as a contiguous [N, C] tensor."""
    ext = extension()
    if ext is None:
        raise RuntimeError(unavailable_reason())
    return ext.global_mean(x)
