"""What the Triton kernel tests share: where the kernels run, when a test module has to be
skipped, and the tolerance rules of the convolution kernels (style guide #11, #12).

Importing this module imports no kernel, so a test module can call ``skip_without_gpu_or_interpreter``
before it imports ``fastres.kernels`` (the interpreter is chosen when a kernel is decorated).
"""
import functools
import math
import os

import pytest
import torch
import triton

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
CL = torch.channels_last


def _conv_shapes_of(model):
    """{(C_in, C_out, k, stride, padding, dilation, groups)} of every conv a 224x224 forward runs."""
    shapes = set()

    def hook(mod, inputs, output):
        shapes.add((mod.in_channels, mod.out_channels, mod.kernel_size[0], mod.stride[0], mod.padding[0],
                    mod.dilation[0], mod.groups))

    for mod in model.modules():
        if isinstance(mod, torch.nn.Conv2d):
            assert mod.kernel_size[0] == mod.kernel_size[1] and mod.stride[0] == mod.stride[1]
            mod.register_forward_hook(hook)
    model(torch.empty(1, 3, 224, 224, device="meta"))
    return shapes


@functools.lru_cache(maxsize=1)
def resnet_conv_shapes() -> list:
    """The conv shapes (C_in, C_out, k, stride, padding, dilation, groups) of the torchvision
    ResNets, read off the models themselves (sorted)."""
    import torchvision
    with torch.device("meta"):
        models = [torchvision.models.resnet50(), torchvision.models.resnet18(),
                  torchvision.models.resnext50_32x4d(),
                  torchvision.models.resnet50(replace_stride_with_dilation=[False, True, True])]
    shapes = set()
    for model in models:
        shapes |= _conv_shapes_of(model)
    return sorted(shapes)


def skip_without_gpu_or_interpreter(what):
    """Skip the calling test module (at import) when ``what`` can run neither on a GPU nor under the
    interpreter. Call it before importing fastres.kernels."""
    if not ON_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip(f"{what} needs a GPU or the interpreter: run with TRITON_INTERPRET=1 set in the "
                    "environment before Python starts", allow_module_level=True)


def skip_if_compiled_without_gpu(kernel):
    """Skip the calling test module when ``kernel`` was decorated before TRITON_INTERPRET=1 was set
    and there is no GPU to run it on."""
    if not ON_CUDA and isinstance(kernel, triton.runtime.JITFunction):
        pytest.skip("fastres.kernels was imported before TRITON_INTERPRET=1 was set: set it in the environment "
                    "before Python starts", allow_module_level=True)


def channels_last(t):
    return t.contiguous(memory_format=CL)


# ------------------------------------------------------------------------------------------------
# Convolution tolerances, (dtype, atol, rtol). atol is per sqrt(K), K the reduction length
# (C_in/groups * KH * KW, plus the concat-K shortcut channels): outputs are O(1) sums of K terms
# of size O(1/sqrt(K)), whose rounding error grows like sqrt(K).

FP32_TOL = (torch.float32, 1e-6, 1e-4)
# 16-bit: err_fastres <= 2 * err_torch + atol * sqrt(K), both max-abs errors against an fp64
# reference computed from the same rounded inputs. (In the fused 3x3 -> 1x1 pair both round the
# mid once; the fp64 reference rounds the exact mid, so a mid element may land one ulp apart,
# which atol covers.)
HALF_TOL = {torch.float16: (torch.float16, 1e-4, 0.0), torch.bfloat16: (torch.bfloat16, 1e-4, 0.0)}
# The kernels accumulate and run the epilogue in fp32 and round once: every element is within half
# an ulp of the exact result plus this fp32 accumulation noise (absolute, per sqrt(K)). That
# catches a truncating store (1 ulp), which the 2x-of-torch bound cannot.
ONE_ROUNDING_FP32_NOISE = 1e-6

_MANTISSA_BITS = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}
_SMALLEST_SUBNORMAL = {torch.float32: 2.0**-149, torch.float16: 2.0**-24, torch.bfloat16: 2.0**-133}


def ulp(ref64, dtype):
    """Elementwise spacing of ``dtype`` at the (fp64) values ``ref64``."""
    _, exponent = torch.frexp(ref64)                   # |ref| in [2**(e-1), 2**e)
    spacing = torch.ldexp(torch.ones_like(ref64), exponent - 1 - _MANTISSA_BITS[dtype])
    return spacing.clamp_min(_SMALLEST_SUBNORMAL[dtype])


def assert_fp32_close(out64, ref64, k_len, *, what):
    """fp32, elementwise: |out - ref| <= atol * sqrt(K) + rtol * |ref|."""
    _, atol, rtol = FP32_TOL
    worst = ((out64 - ref64).abs() - atol * math.sqrt(k_len) - rtol * ref64.abs()).max().item()
    assert worst <= 0, f"{what}: fp32 error exceeds |err| <= {atol}*sqrt(K) + {rtol}*|ref| by {worst:.3g}"


def assert_within_twice_torch(out64, torch64, ref64, dtype, k_len, *, what):
    """16-bit: max |out - ref| <= 2 * max |torch - ref| + atol * sqrt(K)."""
    _, atol, _ = HALF_TOL[dtype]
    err = (out64 - ref64).abs().max().item()
    err_torch = (torch64 - ref64).abs().max().item()
    assert err <= 2 * err_torch + atol * math.sqrt(k_len), \
        f"{what}: {dtype} error {err:.3g} > 2 * torch's {err_torch:.3g} + {atol}*sqrt({k_len})"


def assert_rounded_once(out64, exact64, dtype, k_len, *, what=""):
    """Every element of ``out64`` is the exact result rounded once to ``dtype`` (to nearest), up to
    fp32 accumulation noise."""
    bound = ulp(exact64, dtype) / 2 + ONE_ROUNDING_FP32_NOISE * math.sqrt(k_len)
    worst = ((out64 - exact64).abs() - bound).max().item()
    assert worst <= 0, f"{what}: {dtype} output is not the exact result rounded once (by {worst:.3g})"


def rel_err(got, expected) -> float:
    """max |got - expected| relative to the scale of ``expected`` (logits, feature maps)."""
    return float((got.float() - expected.float()).abs().max() / expected.float().abs().max())
