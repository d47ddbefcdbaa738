"""3x3 / stride 2 / padding 1 max pooling over NHWC activations (the ResNet stem pool).

    out[n, c, oh, ow] = max over the 3x3 window at (2*oh - 1, 2*ow - 1) of x[n, c, ., .]

Positions of the window outside the image are ignored (they read as -inf), and a NaN anywhere in
the window gives NaN, as ``F.max_pool2d`` does. A maximum rounds nothing, so the result is
bit-exact for every dtype.

``x`` is an ``[N, C, H, W]`` tensor in ``torch.channels_last`` memory (so its bytes are
``[N, H, W, C]``); the output uses the same convention, ``OH = (H - 1) // 2 + 1`` and likewise OW.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import EIGHT_BIT_DTYPES, FLOAT_DTYPES, check_nhwc_input, check_out
from ._launch import KernelCall

KERNEL_SIZE, STRIDE, PADDING = 3, 2, 1


@triton.jit
def _max_pool2d_nhwc_kernel(
    x_ptr, out_ptr,
    P, C, H, W, OH, OW,                  # P = N * OH * OW output pixels
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    KERNEL_SIZE: tl.constexpr, STRIDE: tl.constexpr, PADDING: tl.constexpr,
):
    # One program: BLOCK_P output pixels x BLOCK_C channels. Channels are the contiguous axis in
    # NHWC, so every window tap is one coalesced [BLOCK_P, BLOCK_C] load.
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = offs_p < P
    c_ok = offs_c < C

    ow = offs_p % OW
    oh = (offs_p // OW) % OH
    # int64 image base: N * H * W * C passes 2**31 at large batches of big images.
    n = (offs_p // (OW * OH)).to(tl.int64)
    image = x_ptr + n * H * W * C

    result = tl.full((BLOCK_P, BLOCK_C), float("-inf"), tl.float32)
    for kh in tl.static_range(KERNEL_SIZE):
        ih = oh * STRIDE - PADDING + kh
        row_ok = p_ok & (ih >= 0) & (ih < H)
        for kw in tl.static_range(KERNEL_SIZE):
            iw = ow * STRIDE - PADDING + kw
            pix_ok = row_ok & (iw >= 0) & (iw < W)
            ptrs = image[:, None] + ((ih * W + iw) * C)[:, None] + offs_c[None, :]
            tap = tl.load(ptrs, mask=pix_ok[:, None] & c_ok[None, :], other=0.0)
            # fp16/bf16/int8/fp8 -> fp32 is exact, so the maximum (and the store back) stays bit-exact;
            # outside the image -inf (a select: int8 and e4m3 have no -inf to load as `other`).
            tap = tl.where(pix_ok[:, None], tap.to(tl.float32), float("-inf"))
            result = tl.maximum(result, tap, propagate_nan=tl.PropagateNan.ALL)

    out_ptrs = out_ptr + offs_p.to(tl.int64)[:, None] * C + offs_c[None, :]
    tl.store(out_ptrs, result.to(out_ptr.dtype.element_ty), mask=p_ok[:, None] & c_ok[None, :])


def max_pool2d_config(C, device_type="cuda"):
    """Tile rule: whole channel rows up to 128 channels, ~2048 elements per program.

    Only C changes the answer on a GPU: BLOCK_C covers C (64 in every ResNet) so a pixel's
    channels are one contiguous vector load, and BLOCK_P fills the rest of a 2048-element tile
    (16 values per thread per tap at 4 warps: no register pressure, enough bytes in flight per
    SM). Under the interpreter ("cpu") numpy time grows with the number of programs, so the tile
    is 8x larger.
    """
    block_c = min(triton.next_power_of_2(C), 128)
    elements = 16384 if device_type == "cpu" else 2048
    return dict(BLOCK_P=max(elements // block_c, 16), BLOCK_C=block_c, num_warps=4)


def max_pool2d_nhwc(x, *, out=None, config=None):
    """3x3/s2/p1 max pooling of a channels_last ``[N, C, H, W]`` tensor; see the module docstring.

    ``out`` (optional) receives the result: ``[N, C, OH, OW]``, x's dtype and device, channels_last.
    x may also be 8-bit (int8, float8_e4m3fn: the quantized plan's pool, same scale in and out).
    ``config`` overrides ``max_pool2d_config`` (benchmarks and tests try other tiles with it).
    """
    check_nhwc_input(x, "max_pool2d_nhwc", dtypes=FLOAT_DTYPES + EIGHT_BIT_DTYPES)
    N, C, H, W = x.shape
    OH = (H + 2 * PADDING - KERNEL_SIZE) // STRIDE + 1
    OW = (W + 2 * PADDING - KERNEL_SIZE) // STRIDE + 1
    if out is None:
        out = torch.empty((N, C, OH, OW), dtype=x.dtype, device=x.device,
                          memory_format=torch.channels_last)
    else:
        check_out(out, "max_pool2d_nhwc", (N, C, OH, OW), x, channels_last=True)
    P = N * OH * OW
    if P == 0 or C == 0:
        return out

    cfg = config or max_pool2d_config(C, x.device.type)
    KernelCall(
        kernel=_max_pool2d_nhwc_kernel,
        grid=(triton.cdiv(P, cfg["BLOCK_P"]), triton.cdiv(C, cfg["BLOCK_C"])),
        args=dict(x_ptr=x, out_ptr=out, P=P, C=C, H=H, W=W, OH=OH, OW=OW),
        constexprs=dict(BLOCK_P=cfg["BLOCK_P"], BLOCK_C=cfg["BLOCK_C"],
                        KERNEL_SIZE=KERNEL_SIZE, STRIDE=STRIDE, PADDING=PADDING),
        num_warps=cfg["num_warps"],
        num_stages=1,  # no loop to pipeline
        name=f"max_pool2d_nhwc[{KERNEL_SIZE}x{KERNEL_SIZE}/s{STRIDE}]",
        info=dict(N=N, C=C, H=H, W=W, OH=OH, OW=OW, flops=KERNEL_SIZE * KERNEL_SIZE * P * C,
                  bytes=(x.numel() + out.numel()) * x.element_size()),
    ).launch()
    return out


def max_pool2d_nhwc_ref(x):
    if x.dtype in EIGHT_BIT_DTYPES:     # exact through fp32 (PyTorch pools no int8 / fp8 on CPU)
        return F.max_pool2d(x.float(), kernel_size=3, stride=2, padding=1).to(x.dtype)
    return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
