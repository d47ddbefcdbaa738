"""The squeeze-and-excitation scale kernel against torch, in fp64: relu?(x * sigmoid?(gate) [+ r]).

Real SE layer shapes (SE-ResNet-50 stages at 224/32 = 7, timm seresnet widths) plus odd ones."""
import pytest
import torch
from kernel_testing import (CL, DEVICE, assert_rounded_once, channels_last, skip_if_compiled_without_gpu,
                            skip_without_gpu_or_interpreter)

skip_without_gpu_or_interpreter("the Triton SE scale kernel")

from fastres.kernels import se_scale_nhwc as se_module  # noqa: E402
from fastres.kernels._launch import record_launches  # noqa: E402
from fastres.kernels.se_scale_nhwc import se_scale_nhwc, se_scale_nhwc_ref  # noqa: E402

skip_if_compiled_without_gpu(se_module._se_scale_nhwc_kernel)

SHAPES = [(2, 256, 14, 14), (2, 512, 7, 7), (1, 2048, 2, 2), (3, 24, 5, 9), (1, 130, 3, 3), (2, 16, 16, 16)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("residual,relu,sigmoid", [(True, True, True), (False, False, True), (True, False, False)])
def test_se_scale(shape, dtype, residual, relu, sigmoid):
    if dtype != torch.float32 and shape not in (SHAPES[1], SHAPES[3]):
        pytest.skip("16-bit on two shapes")
    g = torch.Generator().manual_seed(0)
    n, c = shape[:2]
    x = channels_last(torch.randn(shape, generator=g).to(dtype)).to(DEVICE)
    gate = (2 * torch.randn(n, c, 1, 1, generator=g)).to(dtype).to(DEVICE)
    r = channels_last(torch.randn(shape, generator=g).to(dtype)).to(DEVICE) if residual else None
    out = se_scale_nhwc(x, gate, residual=r, relu=relu, sigmoid=sigmoid)
    assert out.dtype == dtype and out.is_contiguous(memory_format=CL)
    g64 = gate.double()
    y = x.double() * (torch.sigmoid(g64) if sigmoid else g64)
    y = y + r.double() if residual else y
    y = torch.relu(y) if relu else y
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), y, rtol=1e-6, atol=1e-6)
    else:   # computed in fp32, rounded once
        assert_rounded_once(out.double(), y, dtype, 1)
        torch_err = (se_scale_nhwc_ref(x, gate, residual=r, relu=relu, sigmoid=sigmoid).double() - y).abs().max()
        assert (out.double() - y).abs().max() <= torch_err + 1e-6


def test_se_scale_nan_and_preallocated_out():
    x = channels_last(torch.randn(1, 32, 4, 4)).to(DEVICE)
    x[0, 3, 1, 1] = float("nan")
    out = torch.empty_like(x)
    got = se_scale_nhwc(x, torch.zeros(1, 32), relu=True, out=out)
    assert got is out and torch.isnan(out[0, 3, 1, 1]) and torch.isfinite(out).sum() == 32 * 16 - 1
    torch.testing.assert_close(out[0, 0], torch.relu(x[0, 0] * 0.5))


def test_se_scale_bad_gate_and_launch_record():
    x = channels_last(torch.randn(2, 32, 4, 4)).to(DEVICE)
    with pytest.raises(ValueError, match="N\\*C = 64"):
        se_scale_nhwc(x, torch.zeros(1, 32, 1, 1))
    meta = channels_last(torch.empty(8, 256, 14, 14, device="meta", dtype=torch.float16))
    with record_launches() as calls:
        se_scale_nhwc(meta, torch.empty(8, 256, 1, 1, device="meta", dtype=torch.float16), residual=meta, relu=True)
    (call,) = calls
    assert call.name == "se_scale_nhwc[+residual][relu]"
    assert call.info["bytes"] == 3 * meta.numel() * 2 + 8 * 256 * 2
