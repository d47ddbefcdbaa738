"""BatchNorm folding: a pure tensor function, and the module rewrite built on it.

For a convolution followed by an eval-mode BatchNorm,

    scale = gamma / sqrt(running_var + eps)
    w'    = w * scale            (per output channel)
    b'    = (b - running_mean) * scale + beta      (b = 0 when the conv has no bias)

computed in fp32 whatever the parameters' dtype, and cast once to the compute dtype by the caller.
``fold_bn`` returns a module whose parameters all share one dtype (a plain module PyTorch's forward
can run); the plan and export files keep the biases in fp32.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

__all__ = ["fold_conv_bn", "fold_bn", "conv_norm_pairs", "NotFoldableError"]


class NotFoldableError(ValueError):
    """The model holds something the BN-folded plan cannot represent."""


def _norm_tensors(norm: nn.Module, channels: int, device):
    """(mean, var, gamma, beta, eps) of a foldable norm layer, or None for nn.Identity."""
    if isinstance(norm, nn.Identity):
        return None
    mean = getattr(norm, "running_mean", None)
    var = getattr(norm, "running_var", None)
    if mean is None or var is None or not hasattr(norm, "eps"):
        raise NotFoldableError(
            f"{type(norm).__name__} cannot be folded into a convolution: only BatchNorm layers that "
            "track running statistics (BatchNorm2d, FrozenBatchNorm2d) can")
    ones = torch.ones(channels, device=device)
    gamma = norm.weight if getattr(norm, "weight", None) is not None else ones
    beta = norm.bias if getattr(norm, "bias", None) is not None else torch.zeros_like(ones)
    return mean, var, gamma, beta, float(norm.eps)


def fold_conv_bn(conv: nn.Conv2d, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Folded (weight, bias) of ``norm(conv(x))`` in fp32; ``norm`` may be nn.Identity."""
    weight = conv.weight.detach().float()
    bias = (conv.bias.detach().float() if conv.bias is not None
            else torch.zeros(weight.shape[0], device=weight.device))
    stats = _norm_tensors(norm, weight.shape[0], weight.device)
    if stats is None:
        return weight, bias
    mean, var, gamma, beta, eps = (t.detach().float() if torch.is_tensor(t) else t for t in stats)
    scale = gamma * torch.rsqrt(var + eps)
    return weight * scale.reshape(-1, 1, 1, 1), (bias - mean) * scale + beta


def conv_norm_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """Names of every (conv, norm) pair of a torchvision-structured ResNet, in forward order."""
    pairs = [("conv1", "bn1")]
    for li in range(1, 5):
        for bi, block in enumerate(getattr(model, f"layer{li}")):
            prefix = f"layer{li}.{bi}"
            n_convs = 3 if hasattr(block, "conv3") else 2
            pairs += [(f"{prefix}.conv{k}", f"{prefix}.bn{k}") for k in range(1, n_convs + 1)]
            if block.downsample is not None:
                pairs.append((f"{prefix}.downsample.0", f"{prefix}.downsample.1"))
    return pairs


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def folded_skeleton_(model: nn.Module) -> nn.Module:
    """Rewrite ``model`` in place into the folded structure: convs with bias, norms -> Identity."""
    for conv_name, norm_name in conv_norm_pairs(model):
        conv = model.get_submodule(conv_name)
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels, device=conv.weight.device,
                                                 dtype=conv.weight.dtype))
        _replace(model, norm_name, nn.Identity())
    model.inference_only = True
    return model


def fold_bn(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """An inference-only copy of a ResNet with every BatchNorm folded into its convolution.

    Accepts a fastres or torchvision ResNet; the original is left untouched. Folding is computed in
    fp32 and cast once to the model's dtype (or ``dtype``): every parameter of the copy, conv and fc
    weights and biases alike, is in that one dtype, so the copy is an ordinary module that PyTorch's
    own forward runs and that ``.float()``, ``.double()``, ``.half()`` and ``.to()`` move like any
    other (the plan reads biases in fp32 whatever their dtype). The copy refuses ``train()``, has
    ``requires_grad`` off, and its outputs equal the unfolded eval model's within rounding of ``dtype``.
    """
    from .models import ResNet, from_torchvision

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

