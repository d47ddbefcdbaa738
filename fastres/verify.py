"""Check fastres models against their torchvision twins (the ``fastres verify`` job).

Each architecture is built twice with the same weights — torchvision's model as the reference,
fastres's as the candidate — with BatchNorm statistics that are not the defaults, so folding is
really exercised. Both run eval on the same smooth, image-like inputs; the report gives the max
logit error relative to the logit scale and the top-1 agreement.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def randomize_norm_stats_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm trained-looking statistics and affine parameters (in place)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.empty(c).uniform_(-0.3, 0.3, generator=g))
                m.running_var.copy_(torch.empty(c).uniform_(0.5, 2.0, generator=g))
                m.weight.copy_(torch.empty(c).uniform_(0.3, 1.0, generator=g))
                m.bias.copy_(torch.empty(c).uniform_(-0.2, 0.2, generator=g))
    return model


def image_batch(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Normalised, image-like inputs: smooth colour fields with edges, not white noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 8, 8, generator=g)
    img = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    img = img + 0.05 * torch.randn(n, 3, size, size, generator=g)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return ((img.clamp(0, 1) - mean) / std).contiguous()


@dataclass
class VerifyResult:
    arch: str
    device: str
    dtype: str
    backend: str
    max_rel_error: float
    top1_agreement: float
    seconds: float

    def ok(self, tolerance: float) -> bool:
        return self.max_rel_error <= tolerance


def verify_arch(arch: str, *, device: str = "cpu", dtype: str = "fp32", batch: int = 2,
                size: int = 224, seed: int = 0) -> VerifyResult:
    import fastres
    from .backend import backend_for

    torch.manual_seed(seed)
    reference = randomize_norm_stats_(getattr(torchvision.models, arch)(), seed).eval()
    model = getattr(fastres, arch)()
    model.load_state_dict(reference.state_dict())
    reference.to(device)
    model = model.to(device=device, dtype=DTYPES[dtype]).eval()
    x = image_batch(batch, size, seed).to(device)
    with torch.inference_mode():
        expected = reference(x).float()
        start = time.perf_counter()
        got = model(x.to(DTYPES[dtype])).float()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    scale = expected.abs().max().clamp_min(1e-12)
    return VerifyResult(
        arch=arch, device=device, dtype=dtype, backend=backend_for(x.device),
        max_rel_error=float((got - expected).abs().max() / scale),
        top1_agreement=float((got.argmax(1) == expected.argmax(1)).float().mean()),
        seconds=seconds)
