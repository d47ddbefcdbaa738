"""Input normalisation folded into the stem convolution: raw pixels in, no preprocessing pass.

The stem normally sees ``x_n[c] = (x[c] / 255 - mean[c]) / std[c]`` of the raw 0-255 pixel ``x``.
That is affine per input channel, so for a convolution ``y = conv(x_n, W) + b``::

    y[o] = b[o] + sum_{c,i,j} W[o,c,i,j] * (x[c] / (255 std[c]) - mean[c] / std[c])
         = conv(x, W')[o] + b'[o]

    W'[o,c,i,j] = W[o,c,i,j] / (255 std[c])
    b'[o]       = b[o] - sum_{c,i,j} W[o,c,i,j] * mean[c] / std[c]

wherever the window lies inside the image. At the border the usual path pads ``x_n`` with zeros, and
``x_n[c] = 0`` is the raw value ``x[c] = 255 mean[c]``: padding the raw input with
``pad_value[c] = 255 mean[c]`` instead of 0 makes the folded convolution equal the
normalise-then-convolve path at every output pixel, border included. For ImageNet's mean
``255 mean`` is not an integer, so the padding belongs to the kernel's float domain (a masked load
that falls back to ``pad_value``), not to the uint8 image.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["fold_normalization_into_stem", "pad_per_channel", "folded_stem_conv_ref"]


def _per_channel(values, name: str, channels: int, dtype, device) -> torch.Tensor:
    tensor = torch.as_tensor(values, dtype=dtype, device=device).flatten()
    if tensor.numel() != channels:
        raise ValueError(f"fold_normalization_into_stem: {name} has {tensor.numel()} values but the stem weight "
                         f"has {channels} input channels")
    return tensor


def fold_normalization_into_stem(weight: torch.Tensor, bias: torch.Tensor | None,
                                 mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fold ``(x / 255 - mean) / std`` into the stem convolution (formulas in the module docstring).

    ``weight`` is ``[C_out, C_in, KH, KW]`` with ``C_in == len(mean) == len(std)``, ``bias`` is
    ``[C_out]`` or None; ``mean`` and ``std`` are in the 0-1 scale, as torchvision's ``Normalize``
    takes them. Returns ``(weight', bias', pad_value)`` in float64 when ``weight`` is float64 and in
    float32 otherwise (the math runs in that dtype; cast once to the compute dtype afterwards);
    ``pad_value = 255 * mean`` is the raw-pixel value to pad the input with.
    """
    if weight.dim() != 4:
        raise ValueError(f"fold_normalization_into_stem: weight must be [C_out, C_in, KH, KW], got shape "
                         f"{tuple(weight.shape)}")
    dtype = torch.promote_types(weight.dtype, torch.float32)
    c_out, c_in = weight.shape[:2]
    mean = _per_channel(mean, "mean", c_in, dtype, weight.device)
    std = _per_channel(std, "std", c_in, dtype, weight.device)
    if bool((std == 0).any()):
        raise ValueError(f"fold_normalization_into_stem: std must be nonzero, got {std.tolist()}")
    if bias is not None and tuple(bias.shape) != (c_out,):
        raise ValueError(f"fold_normalization_into_stem: bias must be [{c_out}], got shape {tuple(bias.shape)}")
    w = weight.detach().to(dtype)
    folded_weight = w / (255 * std).view(1, c_in, 1, 1)
    folded_bias = -(w * (mean / std).view(1, c_in, 1, 1)).sum(dim=(1, 2, 3))
    if bias is not None:
        folded_bias = folded_bias + bias.detach().to(dtype)
    return folded_weight, folded_bias, 255 * mean


def pad_per_channel(x: torch.Tensor, pad_value: torch.Tensor, padding: int) -> torch.Tensor:
    """Pad NCHW ``x`` by ``padding`` pixels on each side with ``pad_value[c]`` in channel c.

    The result has ``pad_value``'s dtype; interior pixels are copied exactly (uint8 -> float is exact).
    """
    if x.dim() != 4 or x.shape[1] != pad_value.numel():
        raise ValueError(f"pad_per_channel: x must be [N, {pad_value.numel()}, H, W], got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    out = pad_value.view(1, c, 1, 1).expand(n, c, h + 2 * padding, w + 2 * padding).clone()
    out[:, :, padding:padding + h, padding:padding + w] = x
    return out


def folded_stem_conv_ref(images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pad_value: torch.Tensor, *,
                         stride: int = 2, padding: int = 3) -> torch.Tensor:
    """Plain-PyTorch stem on raw pixels with the folded ``(weight, bias, pad_value)``.

    ``images`` is NCHW (uint8 0-255 or float raw pixels, any memory format). Equals
    ``conv2d((images / 255 - mean) / std, W, b, stride, padding)`` with zero padding. The reference
    for a stem kernel that reads uint8 images directly.
    """
    padded = pad_per_channel(images.to(weight.dtype), pad_value.to(weight.dtype), padding)
    return F.conv2d(padded, weight, bias.to(weight.dtype), stride=stride)
