"""BatchNorm folding: a pure tensor function, and the structural rewrite ``fastres.fold_bn`` uses.

For a convolution followed by an eval-mode BatchNorm,

    scale = gamma / sqrt(running_var + eps)
    w'    = w * scale            (per output channel)
    b'    = (b - running_mean) * scale + beta      (b = 0 when the conv has no bias)

computed in fp32 whatever the parameters' dtype, and cast once to the compute dtype by the caller.
``fold_bn`` returns a module whose parameters all share one dtype (a plain module PyTorch's forward
can run); the plan and export files keep the biases in fp32.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["fold_conv_bn", "conv_norm_pairs", "folded_skeleton_", "NotFoldableError"]


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
