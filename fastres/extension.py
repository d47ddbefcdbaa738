"""The compiled extension ``fastres._C`` (csrc/) behind ``torch.library`` ops.

Ops, each as ``torch.ops.fastres.<name>`` with a fake implementation (so ``torch.compile`` and
``torch.export`` trace through them) and as a validating Python function here:

    preprocess(images, mean, std, *, dtype=torch.float16, pad_channels_to=4, border=None)
        uint8 images -> ((x / 255 - mean) / std) as a [N, C_pad, H, W] channels_last tensor
        (with border=(top, bottom, left, right): [N, C_pad, H+top+bottom, W+left+right], zeros outside)
    nchw_to_nhwc(x)   [N, C, H, W] contiguous     -> equal tensor in channels_last memory
    nchw_to_nhwc_padded(x, channels, border)
                      [N, C, H, W] float          -> [N, channels, H+top+bottom, W+left+right] channels_last,
                                                     zero border and zero extra channels (the stem's input)
    nhwc_to_nchw(y)   [N, C, H, W] channels_last  -> equal tensor in contiguous memory

CPU tensors run the C++ twins, CUDA tensors the CUDA kernels (on the tensor's device and the current
stream). When ``fastres._C`` is missing, or was built without CUDA and gets a CUDA tensor, the op
says so once in a one-line warning and computes the same result with plain PyTorch ops.

Only these steps are CUDA C++: the other small memory-bound steps of the plan (3x3/s2 max pooling,
global average pooling + FC) are Triton kernels in ``fastres.kernels`` and have no twin here, so each
op has exactly one public name.

Importing this module registers the ops but neither imports ``fastres._C`` nor queries a device.
"""
from __future__ import annotations

import functools
import importlib
import math
import warnings
from typing import Optional, Sequence

import torch

__all__ = [
    "load_extension", "extension_status", "preprocess", "preprocess_ref", "nchw_to_nhwc", "nhwc_to_nchw",
    "nchw_to_nhwc_padded", "nchw_to_nhwc_padded_ref",
]

BUILD_HINT = "pip install --no-build-isolation -e . (with CUDA_HOME set for the CUDA kernels)"

_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LAYOUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def _import_extension():
    """(module, None) or (None, reason): the import is tried once per process."""
    try:
        return importlib.import_module("fastres._C"), None
    except ImportError as error:
        return None, str(error)


def load_extension():
    """Return the ``fastres._C`` module; raise ImportError with the build command if it is not built."""
    module, reason = _import_extension()
    if module is None:
        raise ImportError(f"fastres._C is not built ({reason}); build it with: {BUILD_HINT}")
    return module


def extension_status() -> str:
    """One line saying what the extension provides here, e.g. for ``fastres inspect``."""
    module, reason = _import_extension()
    if module is None:
        return f"fastres._C: not built ({reason}); ops run as plain PyTorch"
    if not module.cuda_built:
        return "fastres._C: CPU twins only (built without CUDA); CUDA tensors run as plain PyTorch"
    archs = ", ".join(f"sm_{arch}" for arch in module.cuda_archs)
    return f"fastres._C: CPU twins and CUDA kernels for {archs}"


_noticed: set[str] = set()


def _notice_once(message: str) -> None:
    if message not in _noticed:
        _noticed.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _extension_for(device: torch.device, op: str):
    """The extension module able to run ``op`` on ``device``, or None (after a one-line notice)."""
    module, reason = _import_extension()
    if module is None:
        _notice_once(f"fastres: fastres._C is not built ({reason}); {op} runs as plain PyTorch. Build: {BUILD_HINT}")
        return None
    if device.type == "cuda" and not module.cuda_built:
        _notice_once(f"fastres: fastres._C was built without CUDA; {op} on CUDA tensors runs as plain PyTorch. "
                     f"Rebuild: {BUILD_HINT}")
        return None
    return module


def _launch(module, name: str, device: torch.device, *args) -> bool:
    """Call ``module.<name>_cpu`` or, on the tensor's device and current stream, ``<name>_cuda``."""
    if device.type == "cpu":
        return getattr(module, f"{name}_cpu")(*args)
    with torch.cuda.device(device):
        return getattr(module, f"{name}_cuda")(*args, torch.cuda.current_stream(device).cuda_stream)


def _require_tensor(x, op: str, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"fastres.{op}: {name} must be a torch.Tensor, got {type(x).__name__}")


def _check_device(x: torch.Tensor, op: str) -> None:
    if x.device.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"fastres.{op}: tensors on {x.device} are not supported (CPU or CUDA only)")


# ---------------------------------------------------------------------------------------------
# preprocess
# ---------------------------------------------------------------------------------------------

def _padded_channels(pad_channels_to: int) -> int:
    return -(-3 // pad_channels_to) * pad_channels_to


def _image_layout(images: torch.Tensor) -> tuple[int, int, int, bool]:
    """(N, H, W, planar) of a uint8 image batch, after checking its dtype, rank and memory format.

    A tensor whose last dimension is 3 is read as NHWC [N, H, W, 3] (a stack of decoded HWC images);
    otherwise it must be NCHW [N, 3, H, W], contiguous (planar) or channels_last (interleaved bytes,
    the same memory as NHWC). An NCHW batch that is 3 pixels wide therefore reads as NHWC: pass it
    as images.permute(0, 2, 3, 1).contiguous() instead.
    """
    _require_tensor(images, "preprocess", "images")
    if images.dtype != torch.uint8:
        raise TypeError(f"fastres.preprocess: images must be uint8 pixels (0-255), got {images.dtype}")
    if images.dim() != 4:
        raise ValueError(f"fastres.preprocess: images must be a batch [N, H, W, 3] or [N, 3, H, W], got shape "
                         f"{tuple(images.shape)} (add a batch dimension with images.unsqueeze(0))")
    _check_device(images, "preprocess")
    if images.shape[3] == 3:
        if not images.is_contiguous():
            raise ValueError(f"fastres.preprocess: NHWC images {tuple(images.shape)} must be contiguous, got strides "
                             f"{images.stride()}; call images.contiguous()")
        n, h, w = images.shape[:3]
        return n, h, w, False
    if images.shape[1] == 3:
        n, _, h, w = images.shape
        if images.is_contiguous():
            return n, h, w, True
        if images.is_contiguous(memory_format=torch.channels_last):
            return n, h, w, False
        raise ValueError(f"fastres.preprocess: NCHW images {tuple(images.shape)} must be contiguous or channels_last, "
                         f"got strides {images.stride()}; call images.contiguous()")
    raise ValueError(f"fastres.preprocess: images must be RGB, [N, H, W, 3] or [N, 3, H, W], got shape "
                     f"{tuple(images.shape)}")


def _check_border(border, op: str) -> tuple[int, int, int, int]:
    """(top, bottom, left, right): None means no border."""
    if border is None:
        return (0, 0, 0, 0)
    border = tuple(border)
    if len(border) != 4 or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in border):
        raise ValueError(f"fastres.{op}: border must be 4 non-negative ints (top, bottom, left, right), got {border!r}")
    return border


def _check_preprocess(images, mean, std, dtype, pad_channels_to) -> tuple[int, int, int, bool, int]:
    """(N, H, W, planar, C_pad) after checking every argument of preprocess."""
    n, h, w, planar = _image_layout(images)
    for name, values in (("mean", mean), ("std", std)):
        if len(values) != 3 or not all(math.isfinite(v) for v in values):
            raise ValueError(f"fastres.preprocess: {name} must be 3 finite per-channel values (0-1 scale), "
                             f"got {list(values)}")
    if any(v == 0 for v in std):
        raise ValueError(f"fastres.preprocess: std must be nonzero, got {list(std)}")
    if dtype not in _OUT_DTYPES:
        raise TypeError(f"fastres.preprocess: dtype must be one of {_OUT_DTYPES}, got {dtype}")
    if isinstance(pad_channels_to, bool) or not isinstance(pad_channels_to, int) or pad_channels_to < 1:
        raise ValueError(f"fastres.preprocess: pad_channels_to must be a positive int, got {pad_channels_to!r}")
    return n, h, w, planar, _padded_channels(pad_channels_to)


def _empty_nhwc(n, c, h, w, dtype, device) -> torch.Tensor:
    """An uninitialised [n, c, h, w] tensor in channels_last memory."""
    return torch.empty((n, h, w, c), dtype=dtype, device=device).permute(0, 3, 1, 2)


def preprocess_ref(images, mean, std, *, dtype=torch.float16, pad_channels_to=4, border=None) -> torch.Tensor:
    """Plain-PyTorch preprocess: the fallback when fastres._C cannot run, same layout and rounding path."""
    mean, std = _floats(mean, "mean"), _floats(std, "std")
    n, h, w, planar, c_pad = _check_preprocess(images, mean, std, dtype, pad_channels_to)
    top, bottom, left, right = _check_border(border, "preprocess")
    if (top, bottom, left, right) != (0, 0, 0, 0):
        inner = preprocess_ref(images, mean, std, dtype=dtype, pad_channels_to=pad_channels_to)
        out = _empty_nhwc(n, c_pad, h + top + bottom, w + left + right, dtype, images.device)
        out.zero_()
        out[:, :, top:top + h, left:left + w] = inner
        return out
    nhwc = images if images.shape[3] == 3 else images.permute(0, 2, 3, 1)
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32, device=images.device)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float32, device=images.device)
    out = _empty_nhwc(n, c_pad, h, w, dtype, images.device)
    out.permute(0, 2, 3, 1)[..., :3] = torch.addcmul(shift, nhwc.float(), scale)
    out.permute(0, 2, 3, 1)[..., 3:] = 0
    return out


@torch.library.custom_op("fastres::preprocess", mutates_args=())
def _preprocess_op(images: torch.Tensor, mean: list[float], std: list[float], *,
                   dtype: torch.dtype = torch.float16, pad_channels_to: int = 4,
                   border: Optional[list[int]] = None) -> torch.Tensor:
    n, h, w, planar, c_pad = _check_preprocess(images, mean, std, dtype, pad_channels_to)
    top, bottom, left, right = _check_border(border, "preprocess")
    module = _extension_for(images.device, "preprocess")
    if module is None:
        return preprocess_ref(images, mean, std, dtype=dtype, pad_channels_to=pad_channels_to, border=border)
    out = _empty_nhwc(n, c_pad, h + top + bottom, w + left + right, dtype, images.device)
    if out.numel():
        code = {torch.float16: module.OUT_FLOAT16, torch.bfloat16: module.OUT_BFLOAT16,
                torch.float32: module.OUT_FLOAT32}[dtype]
        _launch(module, "preprocess", images.device, images.data_ptr(), out.data_ptr(), n, h, w, planar,
                list(mean), list(std), c_pad, code, [top, bottom, left, right])
    return out


@_preprocess_op.register_fake
def _preprocess_fake(images, mean, std, *, dtype=torch.float16, pad_channels_to=4, border=None):
    n, h, w, _, c_pad = _check_preprocess(images, mean, std, dtype, pad_channels_to)
    top, bottom, left, right = _check_border(border, "preprocess")
    return _empty_nhwc(n, c_pad, h + top + bottom, w + left + right, dtype, images.device)


def _floats(values, name: str) -> list[float]:
    if isinstance(values, torch.Tensor):
        values = values.detach().flatten().tolist()
    try:
        return [float(v) for v in values]
    except TypeError:
        raise TypeError(f"fastres.preprocess: {name} must be a sequence of 3 numbers, got {values!r}") from None


def preprocess(images: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor, *,
               dtype: torch.dtype = torch.float16, pad_channels_to: int = 4,
               border: Sequence[int] | None = None) -> torch.Tensor:
    """Normalise a batch of uint8 RGB images for the stem: ``out = (x / 255 - mean) / std``.

    ``images`` is uint8 ``[N, H, W, 3]`` (contiguous) or ``[N, 3, H, W]`` (contiguous or channels_last);
    ``mean`` and ``std`` are per-channel in the 0-1 scale, as torchvision's ``Normalize`` takes them.
    Returns ``[N, C_pad, H, W]`` in ``dtype`` (float16, bfloat16 or float32) and channels_last memory,
    where ``C_pad`` is 3 rounded up to a multiple of ``pad_channels_to`` and the extra channels are 0.
    Computed in fp32 as ``fma(x, 1 / (255 std), -mean / std)`` and rounded once to ``dtype``.
    Inputs whose data pointer is not 16-byte aligned (e.g. slices) take the scalar path, not an error.

    ``border=(top, bottom, left, right)`` writes the image inside a zero border:
    ``[N, C_pad, H+top+bottom, W+left+right]``, every channel 0 outside the image (0 in normalised
    space, i.e. a conv's zero padding). With ``pad_channels_to=4`` and
    ``kernels.conv2d_nhwc.stem_input_padding(H, W)`` that is the stem's padded input (ROW_K).
    """
    _require_tensor(images, "preprocess", "images")
    return torch.ops.fastres.preprocess(images, _floats(mean, "mean"), _floats(std, "std"), dtype=dtype,
                                        pad_channels_to=pad_channels_to,
                                        border=list(border) if border is not None else None)


# ---------------------------------------------------------------------------------------------
# NCHW <-> NHWC
# ---------------------------------------------------------------------------------------------

def _check_layout_input(x, op: str, memory_format: torch.memory_format) -> None:
    _require_tensor(x, op, "input")
    if x.dtype not in _LAYOUT_DTYPES:
        raise TypeError(f"fastres.{op}: dtype must be one of {_LAYOUT_DTYPES}, got {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"fastres.{op}: expected a 4-d [N, C, H, W] tensor, got shape {tuple(x.shape)}")
    _check_device(x, op)
    if not x.is_contiguous(memory_format=memory_format):
        wanted = "contiguous (NCHW)" if memory_format == torch.contiguous_format else "channels_last (NHWC)"
        raise ValueError(f"fastres.{op}: input must be {wanted} in memory, got shape {tuple(x.shape)} with strides "
                         f"{x.stride()}; call x.contiguous(memory_format={memory_format})")


def _transpose(x: torch.Tensor, op: str, to_nhwc: bool) -> torch.Tensor:
    out = torch.empty_like(x, memory_format=torch.channels_last if to_nhwc else torch.contiguous_format)
    module = _extension_for(x.device, op)
    if module is None:
        out.copy_(x)
    elif out.numel():
        n, c, h, w = x.shape
        rows, cols = (c, h * w) if to_nhwc else (h * w, c)
        _launch(module, "transpose", x.device, x.data_ptr(), out.data_ptr(), n, rows, cols, x.element_size())
    return out


@torch.library.custom_op("fastres::nchw_to_nhwc", mutates_args=())
def _nchw_to_nhwc_op(x: torch.Tensor) -> torch.Tensor:
    _check_layout_input(x, "nchw_to_nhwc", torch.contiguous_format)
    return _transpose(x, "nchw_to_nhwc", to_nhwc=True)


@_nchw_to_nhwc_op.register_fake
def _nchw_to_nhwc_fake(x):
    _check_layout_input(x, "nchw_to_nhwc", torch.contiguous_format)
    return torch.empty_like(x, memory_format=torch.channels_last)


@torch.library.custom_op("fastres::nhwc_to_nchw", mutates_args=())
def _nhwc_to_nchw_op(y: torch.Tensor) -> torch.Tensor:
    _check_layout_input(y, "nhwc_to_nchw", torch.channels_last)
    return _transpose(y, "nhwc_to_nchw", to_nhwc=False)


@_nhwc_to_nchw_op.register_fake
def _nhwc_to_nchw_fake(y):
    _check_layout_input(y, "nhwc_to_nchw", torch.channels_last)
    return torch.empty_like(y, memory_format=torch.contiguous_format)


def nchw_to_nhwc(x: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` contiguous fp16/bf16/fp32 -> a tensor equal to ``x`` in channels_last memory.

    The shape stays ``[N, C, H, W]``; only the memory order changes (a tiled transpose).
    """
    _require_tensor(x, "nchw_to_nhwc", "input")
    return torch.ops.fastres.nchw_to_nhwc(x)


def nhwc_to_nchw(y: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` channels_last fp16/bf16/fp32 -> a tensor equal to ``y`` in contiguous memory."""
    _require_tensor(y, "nhwc_to_nchw", "input")
    return torch.ops.fastres.nhwc_to_nchw(y)


# ---------------------------------------------------------------------------------------------
# NCHW -> padded NHWC (the stem's input)
# ---------------------------------------------------------------------------------------------

def _check_pad_input(x, channels, border) -> tuple[int, int, int, int]:
    _require_tensor(x, "nchw_to_nhwc_padded", "input")
    if x.dtype not in _LAYOUT_DTYPES:
        raise TypeError(f"fastres.nchw_to_nhwc_padded: dtype must be one of {_LAYOUT_DTYPES}, got {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"fastres.nchw_to_nhwc_padded: expected a 4-d [N, C, H, W] tensor, got shape {tuple(x.shape)}")
    _check_device(x, "nchw_to_nhwc_padded")
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < x.shape[1]:
        raise ValueError(f"fastres.nchw_to_nhwc_padded: channels must be an int >= the input's {x.shape[1]}, "
                         f"got {channels!r}")
    return _check_border(border, "nchw_to_nhwc_padded")


def _padded_empty(x, channels, border) -> torch.Tensor:
    top, bottom, left, right = border
    n, _, h, w = x.shape
    return _empty_nhwc(n, channels, h + top + bottom, w + left + right, x.dtype, x.device)


def nchw_to_nhwc_padded_ref(x: torch.Tensor, channels: int = 4, border: Sequence[int] = (0, 0, 0, 0)) -> torch.Tensor:
    """Plain-PyTorch nchw_to_nhwc_padded (the fallback and the tests' reference)."""
    top, bottom, left, right = _check_pad_input(x, channels, border)
    out = _padded_empty(x, channels, (top, bottom, left, right)).zero_()
    out[:, :x.shape[1], top:top + x.shape[2], left:left + x.shape[3]] = x
    return out


@torch.library.custom_op("fastres::nchw_to_nhwc_padded", mutates_args=())
def _nchw_to_nhwc_padded_op(x: torch.Tensor, channels: int, border: list[int]) -> torch.Tensor:
    border = _check_pad_input(x, channels, border)
    module = _extension_for(x.device, "nchw_to_nhwc_padded")
    if module is None:
        return nchw_to_nhwc_padded_ref(x, channels, border)
    out = _padded_empty(x, channels, border)
    if out.numel():
        _launch(module, "pad_nhwc", x.device, x.data_ptr(), out.data_ptr(), list(x.shape), list(x.stride()),
                list(border), channels, x.element_size())
    return out


@_nchw_to_nhwc_padded_op.register_fake
def _nchw_to_nhwc_padded_fake(x, channels, border):
    return _padded_empty(x, channels, _check_pad_input(x, channels, border))


def nchw_to_nhwc_padded(x: torch.Tensor, channels: int = 4, border: Sequence[int] = (0, 0, 0, 0)) -> torch.Tensor:
    """``[N, C, H, W]`` fp16/bf16/fp32 (NCHW or channels_last memory, any strides) ->
    ``[N, channels, H+top+bottom, W+left+right]`` in channels_last memory: ``x`` inside a zero border
    ``border=(top, bottom, left, right)``, channels ``C..channels-1`` zero. Bits are copied, not rounded.

    With ``channels=4`` and ``kernels.conv2d_nhwc.stem_input_padding(H, W)`` it is the stem's padded
    input (the stem then runs with padding 0, ROW_K).
    """
    _require_tensor(x, "nchw_to_nhwc_padded", "input")
    return torch.ops.fastres.nchw_to_nhwc_padded(x, channels, list(border))
