"""Squeeze-and-excitation channel scaling, fused with the block's residual add and ReLU.

    out[n, c, h, w] = relu?(x[n, c, h, w] * sigmoid?(gate[n, c]) [+ residual[n, c, h, w]])

``x``, ``residual`` and ``out`` are ``[N, C, H, W]`` tensors in ``torch.channels_last`` memory;
``gate`` holds N*C values (the excitation branch's ``[N, C, 1, 1]`` output, any float dtype, read in
fp32; SIGMOID applies the gate's sigmoid here, so the logits never round to the activation dtype).
Everything is computed in fp32 and rounded once to x's dtype: one read of x (and the residual), one
write, where PyTorch makes three passes (mul, add, relu) and rounds after each.
"""
import torch
import triton
import triton.language as tl

from ._common import check_activation, check_nhwc_input, round_to_bf16_nearest_even
from ._launch import KernelCall


@triton.jit
def _se_scale_nhwc_kernel(
    x_ptr, gate_ptr, residual_ptr, out_ptr,
    P, HW,                               # P = N * H * W pixels
    C: tl.constexpr,
    SIGMOID: tl.constexpr, HAS_RESIDUAL: tl.constexpr, APPLY_RELU: tl.constexpr,
    INTERPRETER_BF16: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program: BLOCK_P pixels x BLOCK_C channels (the contiguous NHWC axis)."""
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = offs_p < P
    c_ok = offs_c < C
    mask = p_ok[:, None] & c_ok[None, :]
    offs = offs_p.to(tl.int64)[:, None] * C + offs_c[None, :]
    img = offs_p // HW
    g = tl.load(gate_ptr + (img.to(tl.int64) * C)[:, None] + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
    if SIGMOID:
        g = 1.0 / (1.0 + tl.exp(-g))
    y = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) * g
    if HAS_RESIDUAL:
        y += tl.load(residual_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if APPLY_RELU:
        y = tl.where(y < 0.0, 0.0, y)     # keeps NaN, as torch.relu does
    if INTERPRETER_BF16:
        y = round_to_bf16_nearest_even(y)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def se_scale_config(C: int, device_type: str = "cuda") -> dict:
    """Whole channel rows up to 128 channels (one contiguous vector load per pixel), ~4096
    elements per program at 4 warps; 8x more under the interpreter, where programs cost most."""
    block_c = min(triton.next_power_of_2(C), 128)
    elements = 32768 if device_type == "cpu" else 4096
    return dict(BLOCK_P=max(elements // block_c, 16), BLOCK_C=block_c, num_warps=4)


def se_scale_nhwc(x, gate, *, residual=None, relu=False, sigmoid=True, out=None):
    """``relu?(x * sigmoid?(gate) [+ residual])``, see the module docstring."""
    check_nhwc_input(x, "se_scale_nhwc")
    n, c, h, w = x.shape
    if not isinstance(gate, torch.Tensor) or gate.numel() != n * c or not gate.is_floating_point():
        raise ValueError(f"se_scale_nhwc: gate must be a float tensor of N*C = {n * c} values "
                         f"([N, C, 1, 1] or [N, C]), got {tuple(getattr(gate, 'shape', ()))}")
    if gate.device != x.device:
        raise ValueError(f"se_scale_nhwc: gate is on {gate.device}, x on {x.device}")
    gate = gate.reshape(n, c).contiguous()
    if residual is not None:
        check_activation(residual, "residual", tuple(x.shape), x, "x")
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    else:
        check_activation(out, "out", tuple(x.shape), x, "x")
    p = n * h * w
    if p == 0 or c == 0:
        return out
    cfg = se_scale_config(c, x.device.type)
    KernelCall(
        kernel=_se_scale_nhwc_kernel,
        grid=(triton.cdiv(p, cfg["BLOCK_P"]), triton.cdiv(c, cfg["BLOCK_C"])),
        args=dict(x_ptr=x, gate_ptr=gate, out_ptr=out, P=p, HW=h * w,
                  **({"residual_ptr": residual} if residual is not None else {})),
        constexprs=dict(C=c, SIGMOID=bool(sigmoid), HAS_RESIDUAL=residual is not None, APPLY_RELU=bool(relu),
                        INTERPRETER_BF16=x.dtype == torch.bfloat16 and x.device.type == "cpu",
                        BLOCK_P=cfg["BLOCK_P"], BLOCK_C=cfg["BLOCK_C"],
                        **({"residual_ptr": None} if residual is None else {})),
        num_warps=cfg["num_warps"], num_stages=1,
        name="se_scale_nhwc" + ("[+residual]" if residual is not None else "") + ("[relu]" if relu else ""),
        info=dict(M=p, N=c, K=1, flops=p * c * (2 + (residual is not None) + bool(relu)),
                  bytes=(x.numel() * (3 if residual is not None else 2)) * x.element_size()
                  + gate.numel() * gate.element_size()),
    ).launch()
    return out


def se_scale_nhwc_ref(x, gate, *, residual=None, relu=False, sigmoid=True, upcast=False):
    """Plain PyTorch: ``relu?(x * sigmoid?(gate) [+ residual])`` with ``gate`` broadcast by
    PyTorch's rules, as the module's own ``x * gate`` does (the kernel's gate is [N, C, 1, 1]).
    ``upcast``: in fp32, rounded once to x's dtype (the kernel's numerics)."""
    dtype = x.dtype
    if upcast:
        x, gate = x.float(), gate.float()
        residual = residual.float() if residual is not None else None
    y = x * (torch.sigmoid(gate) if sigmoid else gate)
    if residual is not None:
        y = y + residual
    if relu:
        y = torch.relu(y)
    y = y.to(dtype)
    if x.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous(memory_format=torch.channels_last):
        y = y.contiguous(memory_format=torch.channels_last)
    return y
