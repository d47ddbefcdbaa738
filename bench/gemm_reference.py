"""Kernel lab: a plain Triton GEMM (the structure of triton's matmul tutorial) to compare the
compiled loops of fastres' kernels against (``fastres.sass``, tests/test_loop_stats.py).

Not shipped in fastres.kernels: it exists only as the yardstick of "a good GEMM's K loop" for the
same tiles - what one BLOCK_K step of a conv kernel should cost in SASS instructions, which MMA it
should issue and how wide its loads should be.

    C[M, N] = A[M, K] @ B[K, N]     fp16/bf16 in, fp32 accumulation, C in A's dtype;
                                    int8 in, int32 accumulation; e4m3 in, fp32; C fp32 (8-bit)

B is N-major ([K, N] contiguous) by default; ``b_k_major=True`` stores it as the transpose of a
contiguous [N, K] (what Hopper's 8-bit wgmma wants, and how fastres packs 8-bit weights).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastres.kernels._launch import KernelCall


@triton.jit
def _gemm_reference_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_bk, stride_bn, stride_cm,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m
    offs_am = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_bn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_am[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_bn[None, :] * stride_bn
    ACC_DTYPE: tl.constexpr = tl.int32 if a_ptr.dtype.element_ty == tl.int8 else tl.float32
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a = tl.load(a_ptrs, mask=offs_k[None, :] < K - k * BLOCK_K, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < K - k * BLOCK_K, other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk
    offs_cm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ptrs = c_ptr + offs_cm[:, None] * stride_cm + offs_cn[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_cm[:, None] < M) & (offs_cn[None, :] < N))


def gemm_reference_call(m: int, n: int, k: int, *, dtype=torch.float16, device="meta", block_m=128, block_n=64,
                        block_k=32, group_m=8, num_warps=4, num_stages=4, a=None, b=None, c=None,
                        b_k_major=False) -> KernelCall:
    """The KernelCall of ``c = a @ b`` with the given tiles (meta tensors by default: for AOT compiles)."""
    a = a if a is not None else torch.empty(m, k, dtype=dtype, device=device)
    if b is None:
        b = torch.empty(n, k, dtype=dtype, device=device).t() if b_k_major else torch.empty(k, n, dtype=dtype, device=device)
    c_dtype = torch.float32 if dtype.itemsize == 1 else dtype
    c = c if c is not None else torch.empty(m, n, dtype=c_dtype, device=device)
    return KernelCall(
        kernel=_gemm_reference_kernel, grid=(triton.cdiv(m, block_m) * triton.cdiv(n, block_n),),
        args=dict(a_ptr=a, b_ptr=b, c_ptr=c, M=m, N=n, K=k, stride_am=a.stride(0), stride_bk=b.stride(0),
                  stride_bn=b.stride(1), stride_cm=c.stride(0)),
        constexprs=dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m),
        num_warps=num_warps, num_stages=num_stages, name=f"gemm_reference[{block_m}x{block_n}x{block_k}]")
