"""Kernel lab: the 1x1 conv (a plain [M, K] x [K, N] GEMM over NHWC pixels) with its operand tiles
loaded through host-side TMA tensor descriptors (``triton.tools.tensor_descriptor.TensorDescriptor``)
instead of per-thread pointers - the first step of issue #11 item 7, kept here until it is wired
into ``kernels/conv2d_nhwc.py`` for compute-bound sm_90 launches (>= 3 waves).

    out = relu?(x[M, K] @ w[K, N] + bias)        fp16/bf16 in, fp32 accumulation, out in x's dtype

On sm_90 the descriptor loads compile to UTMALDG (one TMA instruction per tile, out-of-bounds rows
zero-filled by the hardware, no address arithmetic per thread); sm_80 has no TMA and triton
lowers the same descriptor loads to ordinary loads, so the shipped kernels keep cp.async there.
Under TRITON_INTERPRET=1 the descriptor loads run (and zero-fill) on CPU tensors, so the lab kernel
is checked against its reference like every other kernel (tests/test_tma_gemm_lab.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from fastres.kernels._launch import KernelCall


@triton.jit
def _tma_gemm_kernel(x_desc, w_desc, out_ptr, bias_ptr, M, N: tl.constexpr, K: tl.constexpr,
                     APPLY_RELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = x_desc.load([pid_m * BLOCK_M, k])          # rows past M: zero-filled by the descriptor
        b = w_desc.load([k, pid_n * BLOCK_N])
        acc = tl.dot(a, b, acc)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc += tl.load(bias_ptr + offs_n).to(tl.float32)[None, :]
    if APPLY_RELU:
        acc = tl.where(acc < 0.0, 0.0, acc)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask)


def tma_gemm_call(x2d, w, bias, out2d, *, relu=True, block_m=128, block_n=128, block_k=64, num_warps=8,
                  num_stages=3) -> KernelCall:
    """The KernelCall of ``out2d = relu?(x2d @ w + bias)``: x2d [M, K], w [K, N] (contiguous), bias fp32 [N]."""
    m, k = x2d.shape
    n = w.shape[1]
    return KernelCall(
        kernel=_tma_gemm_kernel, grid=(triton.cdiv(m, block_m), triton.cdiv(n, block_n)),
        args=dict(x_desc=TensorDescriptor.from_tensor(x2d, [block_m, block_k]),
                  w_desc=TensorDescriptor.from_tensor(w, [block_k, block_n]), out_ptr=out2d, bias_ptr=bias, M=m),
        constexprs=dict(N=n, K=k, APPLY_RELU=relu, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k),
        num_warps=num_warps, num_stages=num_stages, name=f"tma_gemm_lab[{block_m}x{block_n}x{block_k}]")


def conv1x1_tma(x, weight, bias, *, relu=True, **tiles):
    """1x1/s1 conv over channels_last ``x`` [N, C, H, W] with ``weight`` [C_out, C, 1, 1], via the TMA GEMM."""
    n, c, h, w = x.shape
    x2d = x.permute(0, 2, 3, 1).reshape(n * h * w, c)           # a view: channels_last bytes
    w2d = weight[:, :, 0, 0].t().contiguous()
    out = torch.empty(n, weight.shape[0], h, w, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    tma_gemm_call(x2d, w2d, bias.float().contiguous(), out.permute(0, 2, 3, 1).reshape(n * h * w, -1), relu=relu,
                  **tiles).launch()
    return out
