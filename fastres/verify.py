"""Check fastres models against their torchvision twins (the ``fastres verify`` job).

Each architecture is built twice with the same weights — torchvision's model as the reference,
fastres's as the candidate — with BatchNorm statistics that are not the defaults, so folding is
really exercised. Both run eval on the same smooth, image-like inputs; the report gives the max
logit error relative to the logit scale and the top-1 agreement.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

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


# -- a user's own model ------------------------------------------------------------------------
def load_model(spec: str) -> nn.Module:
    """``MODULE:CALLABLE`` -> the nn.Module it returns (a class is instantiated without arguments).
    MODULE is an importable dotted name or a path to a ``.py`` file."""
    import importlib
    import importlib.util
    import os
    import sys

    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--model must be MODULE:CALLABLE (e.g. mypkg.nets:build or nets.py:ResNet20), got {spec!r}")
    if module_name.endswith(".py") or os.sep in module_name:
        path = os.path.abspath(module_name)
        sys.path.insert(0, os.path.dirname(path))    # its own sibling imports
        loaded = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
        if loaded is None:
            raise ValueError(f"--model: cannot load {path}")
        module = importlib.util.module_from_spec(loaded)
        loaded.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    target = module
    for part in attr.split("."):
        target = getattr(target, part)
    model = target() if callable(target) and not isinstance(target, nn.Module) else target
    if not isinstance(model, nn.Module):
        raise TypeError(f"--model {spec} gave a {type(model).__name__}, not an nn.Module")
    return model


def parse_input_shape(text: str) -> tuple:
    """``3x32x32`` -> (3, 32, 32)."""
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--input takes CxHxW, e.g. 3x32x32, got {text!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"--input takes CxHxW with positive sizes, got {text!r}")
    return shape


@dataclass
class ModelVerifyResult:
    device: str
    dtype: str
    backend: str
    max_rel_error: float            # worst over the outputs (feature maps or logits)
    top1_agreement: Optional[float]  # logits only
    fused_steps: int
    pytorch_steps: list             # "name: what runs as PyTorch"
    fallback: Optional[str]         # why the module's own forward ran instead of the plan
    seconds: float

    def ok(self, tolerance: float) -> bool:
        return self.fallback is None and self.max_rel_error <= tolerance


def _flat_outputs(y) -> list:
    if torch.is_tensor(y):
        return [y]
    if isinstance(y, dict):
        return [t for v in y.values() for t in _flat_outputs(v)]
    if isinstance(y, (list, tuple)):
        return [t for v in y for t in _flat_outputs(v)]
    return []


def verify_model(model: nn.Module, input_shape: tuple, *, device: str = "cpu", dtype: str = "fp32",
                 batch: int = 2, seed: int = 0) -> ModelVerifyResult:
    """``fastres.optimize(model)`` in ``dtype`` against ``model``'s own fp32 eval forward on an
    image-like batch of ``input_shape`` (C, H, W)."""
    import copy
    import warnings

    import fastres
    from .backend import backend_for
    from .capture import FallbackWarning, Unsupported

    reference = model.to(device).float().eval()
    c, h, w = input_shape
    x = image_batch(batch, h, seed)[:, :1].expand(-1, c, -1, -1) if c != 3 else image_batch(batch, h, seed)
    if w != h:
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    x = x.contiguous().to(device)
    candidate = reference if dtype == "fp32" else copy.deepcopy(reference).to(DTYPES[dtype])
    fast = fastres.optimize(candidate)
    with torch.inference_mode():
        expected = reference(x)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            start = time.perf_counter()
            got = fast(x.to(DTYPES[dtype]))
            if device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
    fallback = next((str(m.message) for m in caught if issubclass(m.category, FallbackWarning)), None)
    errors, top1 = [], None
    for e, g in zip(_flat_outputs(expected), _flat_outputs(got)):
        e, g = e.float(), g.float()
        errors.append(float((g - e).abs().max() / e.abs().max().clamp_min(1e-12)))
    if torch.is_tensor(expected) and expected.dim() == 2:
        top1 = float((got.float().argmax(1) == expected.argmax(1)).float().mean())
    try:
        plan = fast.plan()
        fused = sum(s.kind != "torch" for s in plan.steps)
        notes = list(plan.notes)
    except Unsupported as err:
        fused, notes, fallback = 0, [], fallback or str(err)
    return ModelVerifyResult(device=device, dtype=dtype, backend=backend_for(x.device),
                             max_rel_error=max(errors) if errors else float("nan"), top1_agreement=top1,
                             fused_steps=fused, pytorch_steps=notes, fallback=fallback, seconds=seconds)


# -- 8-bit: fastres.quantize against the same model in fp32 ------------------------------------------
@dataclass
class QuantizedVerifyResult:
    arch: str
    device: str
    dtype: str
    backend: str
    cosine: float               # of the logits, quantized vs fp32
    max_rel_error: float
    top1_agreement: float
    seconds: float              # the quantized forward


def verify_quantized(arch: str, *, dtype: str = "int8", device: str = "cpu", batch: int = 2, size: int = 224,
                     seed: int = 0, method: str = "percentile", calib_batch: int = 8) -> QuantizedVerifyResult:
    """``fastres.quantize`` of ``arch`` (non-default BN statistics), calibrated on ``calib_batch``
    image-like inputs, against the same model in fp32 on ``batch`` other ones."""
    import fastres
    from .backend import backend_for

    torch.manual_seed(seed)
    model = randomize_norm_stats_(getattr(fastres, arch)(), seed).eval().to(device)
    qmodel = fastres.quantize(model, [image_batch(calib_batch, size, seed + 1).to(device)], dtype=dtype,
                              method=method, progress=False)
    x = image_batch(batch, size, seed).to(device)
    with torch.inference_mode():
        expected = model(x).float()
        start = time.perf_counter()
        got = qmodel(x).float()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return QuantizedVerifyResult(
        arch=arch, device=device, dtype=dtype, backend=backend_for(x.device),
        cosine=float(F.cosine_similarity(got.flatten(), expected.flatten(), dim=0)),
        max_rel_error=float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12)),
        top1_agreement=float((got.argmax(1) == expected.argmax(1)).float().mean()), seconds=seconds)
