"""What the kernel modules share: input checks of their launch wrappers, small integer rules and
the interpreter's bf16 rounding. No kernel lives here (one kernel per module stays the rule).

Activations are [N, C, H, W] tensors in ``torch.channels_last`` memory (NHWC bytes) everywhere.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
EIGHT_BIT_DTYPES = (torch.int8, torch.float8_e4m3fn)    # 8-bit conv operands (fastres.quantize)
MIN_TILE_CHANNELS = 16    # smallest tl.dot N and K tile, hence the narrowest packed conv group
INT32_MAX = 2**31 - 1     # pixel indices inside the kernels are int32


# ----------------------------------------------------------------------------------------------
# @triton.jit helpers of the convolution kernels (inlined into them when compiled)


@triton.jit
def round_to_bf16_nearest_even(x):
    """fp32 -> fp32 holding the nearest-even bf16 value: the triton 3.8 interpreter's fp32 -> bf16
    cast truncates, a GPU's cvt.rn rounds. NaN payloads must not carry into the sign bit."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return tl.where(x != x, x, rounded)


@triton.jit
def dot_contiguous_k(acc, a_ptrs, w_ptrs, offs_k, m_mask, n_mask, K: tl.constexpr, W_ROW_STRIDE: tl.constexpr,
                     EVEN_N: tl.constexpr, INTERPRETER_BF16: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc + A @ W, fp32 accumulation, where row m of A is K contiguous channels of one pixel and W
    has K rows W_ROW_STRIDE elements apart (a 1x1 conv, or a concat-K shortcut; 1 for a K-major W).

    ``a_ptrs`` [BLOCK_M, BLOCK_K] and ``w_ptrs`` [BLOCK_K, BLOCK_N] point at the first K step;
    ``offs_k`` is ``tl.arange(0, BLOCK_K)``. A K tail is masked; EVEN_N (BLOCK_N divides the
    columns) drops the column mask. INTERPRETER_BF16: the dot runs on fp32 tiles, because the
    triton 3.8 interpreter's bf16 tl.dot is wrong.
    """
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        if K % BLOCK_K == 0:
            a = tl.load(a_ptrs, mask=m_mask[:, None], other=0.0)
            b = tl.load(w_ptrs) if EVEN_N else tl.load(w_ptrs, mask=n_mask[None, :], other=0.0)
        else:
            k_ok = offs_k < K - kb * BLOCK_K
            a = tl.load(a_ptrs, mask=m_mask[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_ok[:, None] & n_mask[None, :], other=0.0)
        if INTERPRETER_BF16:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision="ieee")
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * W_ROW_STRIDE
    return acc


@triton.jit
def dot_concat_k(acc, a_rows, s_rows, w_ptrs, offs_k, m_mask, n_mask, K_A: tl.constexpr, K_S: tl.constexpr,
                 W_ROW_STRIDE: tl.constexpr, ROW_ALIGN_BYTES: tl.constexpr, EVEN_N: tl.constexpr,
                 INTERPRETER_BF16: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc + [A | S] @ W in one K loop (one pipeline fill): rows of A and S are K_A and K_S contiguous
    channels (``a_rows``, ``s_rows`` [BLOCK_M] pointers to each row's first channel), W has
    K_A + K_S rows W_ROW_STRIDE elements apart; BLOCK_K divides K_A and K_S.

    Step kb reads channels kb*BLOCK_K.. of A while kb < K_A / BLOCK_K, then of S: the row base is
    chosen per step by a select, so both operands stream through the same software pipeline
    (the concat-K projection shortcut, instead of a second loop that drains and refills it).
    ROW_ALIGN_BYTES: what every row base of both operands is a multiple of (the caller knows the
    base pointers' alignment and the channel counts; triton cannot see it through the select).
    """
    A_STEPS: tl.constexpr = K_A // BLOCK_K
    for kb in range(0, A_STEPS + K_S // BLOCK_K):
        rows = tl.where(kb < A_STEPS, a_rows + kb * BLOCK_K, s_rows + (kb - A_STEPS) * BLOCK_K)
        if ROW_ALIGN_BYTES > 1:
            rows = tl.multiple_of(rows, ROW_ALIGN_BYTES)
        a = tl.load(rows[:, None] + offs_k[None, :], mask=m_mask[:, None], other=0.0)
        b = tl.load(w_ptrs) if EVEN_N else tl.load(w_ptrs, mask=n_mask[None, :], other=0.0)
        if INTERPRETER_BF16:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision="ieee")
        w_ptrs += BLOCK_K * W_ROW_STRIDE
    return acc


@triton.jit
def store_conv_epilogue(acc, out_ptr, bias_ptr, residual_ptr, offs_m, offs_n, m_mask, n_mask, C_OUT: tl.constexpr,
                        HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, APPLY_RELU: tl.constexpr,
                        INTERPRETER_BF16: tl.constexpr):
    """out[m, n] = relu?(acc + bias [+ residual]) for an fp32 [BLOCK_M, BLOCK_N] tile of an NHWC
    output (pixel offs_m, channel offs_n, C_OUT channels), computed in fp32 and rounded once to
    out's dtype (to nearest-even by hand under INTERPRETER_BF16: the interpreter's cast truncates).
    """
    store_residual_block_epilogue(acc, out_ptr, bias_ptr, residual_ptr, offs_m, None, None, None, offs_m, offs_n,
                                  m_mask, n_mask, C_OUT, C_OUT, 0, HAS_BIAS, HAS_RESIDUAL, APPLY_RELU, False,
                                  False, INTERPRETER_BF16)


@triton.jit
def load_residual_tile(residual_ptr, res_rows, offs_n, out_mask, C_OUT: tl.constexpr, RES_C: tl.constexpr,
                       RES_C_OFFSET: tl.constexpr):
    """The fp32 residual tile of an epilogue: a [*, RES_C] NHWC tensor read at pixel ``res_rows`` and
    channel n - RES_C_OFFSET, zero outside [RES_C_OFFSET, RES_C_OFFSET + RES_C) and ``out_mask``."""
    if RES_C == C_OUT and RES_C_OFFSET == 0:
        res_offs = res_rows.to(tl.int64)[:, None] * C_OUT + offs_n[None, :]
        res_mask = out_mask
    else:
        res_c = offs_n - RES_C_OFFSET
        res_offs = res_rows.to(tl.int64)[:, None] * RES_C + res_c[None, :]
        res_mask = out_mask & ((res_c >= 0) & (res_c < RES_C))[None, :]
    return tl.load(residual_ptr + res_offs, mask=res_mask, other=0.0).to(tl.float32)


@triton.jit
def store_residual_block_epilogue(acc, out_ptr, bias_ptr, residual_ptr, res_rows, out2_ptr, scale2_ptr, shift2_ptr,
                                  offs_m, offs_n, m_mask, n_mask, C_OUT: tl.constexpr, RES_C: tl.constexpr,
                                  RES_C_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr,
                                  HAS_RESIDUAL: tl.constexpr, APPLY_RELU: tl.constexpr,
                                  HAS_OUT2: tl.constexpr, OUT2_RELU: tl.constexpr,
                                  INTERPRETER_BF16: tl.constexpr):
    """The residual-block epilogue of an fp32 [BLOCK_M, BLOCK_N] tile of an NHWC output:

        y = relu?(acc + bias [+ residual[res_rows, n - RES_C_OFFSET]])        -> out
        [out2 = relu?(y * scale2 + shift2)]                                   -> out2 (HAS_OUT2)

    The residual is a [*, RES_C] NHWC tensor read at pixel ``res_rows`` (offs_m for a same-shape
    residual; a strided sample for the CIFAR "option A" shortcut) and channel n - RES_C_OFFSET,
    zero outside [RES_C_OFFSET, RES_C_OFFSET + RES_C) (its zero channel padding). ``out2`` is a
    per-channel affine of the stored value (a pre-activation BatchNorm after the add, folded to
    scale2/shift2 in fp32, and its ReLU), a second output of the same shape. Both are computed in
    fp32 and rounded once (by hand to nearest-even under INTERPRETER_BF16); out2 is computed from
    the fp32 y, not from the rounded out. Returns the tile as stored in out (``store_channel_means``
    reads it; unused, it costs nothing).
    """
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_offs = offs_m.to(tl.int64)[:, None] * C_OUT + offs_n[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if HAS_RESIDUAL:
        acc += load_residual_tile(residual_ptr, res_rows, offs_n, out_mask, C_OUT, RES_C, RES_C_OFFSET)
    if APPLY_RELU:
        # torch.relu keeps NaN; tl.maximum would drop it.
        acc = tl.where(acc < 0.0, 0.0, acc)
    # out first, then out2 computed in place from the fp32 tile: one tile stays live, not two
    if INTERPRETER_BF16:
        stored = round_to_bf16_nearest_even(acc).to(out_ptr.dtype.element_ty)
    else:
        stored = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + out_offs, stored, mask=out_mask)
    if HAS_OUT2:
        scale = tl.load(scale2_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        shift = tl.load(shift2_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc = acc * scale[None, :] + shift[None, :]
        if OUT2_RELU:
            acc = tl.where(acc < 0.0, 0.0, acc)
        if INTERPRETER_BF16:
            acc = round_to_bf16_nearest_even(acc)
        tl.store(out2_ptr + out_offs, acc.to(out2_ptr.dtype.element_ty), mask=out_mask)
    return stored


@triton.jit
def store_channel_means(stored, mean_ptr, ws_ptr, counter_ptr, offs_m, offs_n, m_mask, n_mask, pid_m, pid_n,
                        num_pid_n, M, HW, SLOTS, C_OUT: tl.constexpr, INTERPRETER_BF16: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """mean[img, n] = sum of out[m, n] over the HW pixels m of image img / HW (the global average
    pool of a squeeze-and-excitation block), from the tile ``stored`` as it was written to out
    (rounded: the mean of the tensor the model holds), for rows m = img*HW + h*W + w.

    Deterministic, no float atomics: each program writes one fp32 partial sum per image its rows
    touch (a tile of BLOCK_M rows can span several images) into workspace slot
    ``ws[pid_m * SLOTS + img - first image of the tile, n]``; an int32 counter per (image, column
    tile) counts the programs done with it (an acq_rel atomic after a CTA barrier, as split-K's),
    and the last of them adds the image's partials in tile order, divides by HW and rounds once to
    mean's dtype. ``counter_ptr`` is zeroed by the launch; ``SLOTS`` is the most images one tile
    can touch (int32 offsets: the launch checks the workspace has < 2**31 elements).
    """
    y = tl.where(m_mask[:, None] & n_mask[None, :], stored.to(tl.float32), 0.0)
    img = offs_m // HW
    first = pid_m * BLOCK_M // HW
    last = (tl.minimum(pid_m * BLOCK_M + BLOCK_M, M) - 1) // HW
    for i in range(first, last + 1):
        part = tl.sum(tl.where((img == i)[:, None], y, 0.0), axis=0)
        tl.store(ws_ptr + (pid_m * SLOTS + i - first) * C_OUT + offs_n, part, mask=n_mask)
    tl.debug_barrier()
    for i in range(first, last + 1):
        t0 = i * HW // BLOCK_M
        t1 = ((i + 1) * HW - 1) // BLOCK_M
        arrived = tl.atomic_add(counter_ptr + i * num_pid_n + pid_n, 1, sem="acq_rel")
        if arrived == t1 - t0:
            total = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for t in range(t0, t1 + 1):
                slot = t * SLOTS + i - t * BLOCK_M // HW
                total += tl.load(ws_ptr + slot * C_OUT + offs_n, mask=n_mask, other=0.0,
                                 cache_modifier=".cg")
            mean = total / HW
            if INTERPRETER_BF16:
                mean = round_to_bf16_nearest_even(mean)
            tl.store(mean_ptr + i * C_OUT + offs_n, mean.to(mean_ptr.dtype.element_ty), mask=n_mask)


def channel_mean_slots(block_m: int, hw: int) -> int:
    """The most images BLOCK_M consecutive rows of an [N*HW, C] output can touch."""
    return (block_m - 1) // hw + 2


@triton.jit
def round_to_e4m3_nearest_even(x):
    """fp32 in [-448, 448] -> fp32 holding the nearest-even fp8 e4m3 value: the triton 3.8
    interpreter's fp32 -> fp8e4nv cast does not round to nearest (nor saturate), a GPU's
    cvt.rn.satfinite does; values already on the e4m3 grid it converts exactly. Normal numbers
    (|x| >= 2**-6) keep 3 mantissa bits; below that the grid is the subnormals' 2**-9."""
    bits = x.to(tl.uint32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
    magnitude = (tl.abs(x) + 24576.0) - 24576.0        # 1.5 * 2**14: its fp32 ulp is 2**-9
    subnormal = (magnitude.to(tl.uint32, bitcast=True) | (bits & 0x80000000)).to(tl.float32, bitcast=True)
    return tl.where(tl.abs(x) < 0.015625, subnormal, normal)


@triton.jit
def requantize_tile(y, OUT_INV_SCALE, OUT_DTYPE: tl.constexpr, INTERPRETER_FP8: tl.constexpr):
    """An fp32 tile to 8-bit: int8 ``sat_int8(round_half_even(y * OUT_INV_SCALE))``, e4m3
    ``e4m3_rn(clamp(y * OUT_INV_SCALE, -448, 448))`` (``store_requantized_epilogue`` explains the
    roundings; the fused 3x3 -> 1x1 requantizes its mid tile in registers with it)."""
    if OUT_DTYPE == tl.int8:
        q = tl.minimum(tl.maximum(y * OUT_INV_SCALE, -128.0), 127.0)
        q = (q + 12582912.0) - 12582912.0
    else:
        q = tl.minimum(tl.maximum(y * OUT_INV_SCALE, -448.0), 448.0)
        if INTERPRETER_FP8:
            q = round_to_e4m3_nearest_even(q)
    return q.to(OUT_DTYPE)


@triton.jit
def store_requantized_epilogue(acc, out_ptr, acc_scale_ptr, bias_ptr, residual_ptr, res_rows, RES_SCALE,
                               OUT_INV_SCALE, offs_m, offs_n, m_mask, n_mask, C_OUT: tl.constexpr,
                               RES_C: tl.constexpr, RES_C_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr,
                               HAS_RESIDUAL: tl.constexpr, APPLY_RELU: tl.constexpr,
                               INTERPRETER_FP8: tl.constexpr):
    """The epilogue of an 8-bit convolution tile (int32 accumulator of int8 operands, or fp32 of
    fp8 e4m3 ones), every operation one fp32 rounding (the launch turns FMA contraction off, so a
    GPU computes what the interpreter and ``requantize_ref`` compute):

        y = acc * acc_scale[n] + bias[n] [+ RES_SCALE * residual[res_rows, n - RES_C_OFFSET]]
        y = relu?(y)
        int8 out:  sat_int8(round_half_even(y * OUT_INV_SCALE))
        e4m3 out:  e4m3_rn(clamp(y * OUT_INV_SCALE, -448, 448))
        float out: y (rounded once to out's dtype)

    ``acc_scale`` [C_OUT] fp32 is s_x * s_w[n]; the residual (8-bit, dequantized by RES_SCALE) is
    read like ``store_residual_block_epilogue``'s. Rounding half to even: the clamped value plus
    and minus 1.5 * 2**23 (exact for |v| <= 2**22; a float -> int conversion truncates).
    INTERPRETER_FP8: round to e4m3 by hand (``round_to_e4m3_nearest_even``) before the cast.
    """
    y = acc.to(tl.float32) * tl.load(acc_scale_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_offs = offs_m.to(tl.int64)[:, None] * C_OUT + offs_n[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if HAS_RESIDUAL:
        y = y + load_residual_tile(residual_ptr, res_rows, offs_n, out_mask, C_OUT, RES_C, RES_C_OFFSET) * RES_SCALE
    if APPLY_RELU:
        y = tl.where(y < 0.0, 0.0, y)
    if out_ptr.dtype.element_ty == tl.int8 or out_ptr.dtype.element_ty == tl.float8e4nv:
        tl.store(out_ptr + out_offs, requantize_tile(y, OUT_INV_SCALE, out_ptr.dtype.element_ty, INTERPRETER_FP8),
                 mask=out_mask)
    else:
        tl.store(out_ptr + out_offs, y.to(out_ptr.dtype.element_ty), mask=out_mask)


# ----------------------------------------------------------------------------------------------
# Integer rules


def pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def largest_pow2_divisor(n: int) -> int:
    return n & -n


def min_dot_k(dtype: torch.dtype) -> int:
    """Smallest K tile of ``tl.dot`` for operands of ``dtype`` on a GPU: 32 for 8-bit, else 16."""
    return 2 * MIN_TILE_CHANNELS if dtype.itemsize == 1 else MIN_TILE_CHANNELS


def tile_groups(groups: int, in_per_group: int, out_per_group: int) -> int:
    """How many adjacent conv groups one packed (block-diagonal) group holds: the smallest divisor t
    of ``groups`` with t*in and t*out >= 16 (else all groups, one dense block)."""
    for t in range(1, groups + 1):
        if groups % t == 0 and t * in_per_group >= MIN_TILE_CHANNELS and t * out_per_group >= MIN_TILE_CHANNELS:
            return t
    return groups


# ----------------------------------------------------------------------------------------------
# Convolution arguments


def pair(v, name: str) -> tuple:
    """An int or a pair of ints (not bools) as a pair."""
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    try:
        v = tuple(v)
    except TypeError:
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}") from None
    if len(v) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return v


def conv_geometry(stride, padding, dilation) -> tuple:
    """(stride, padding, dilation) as pairs, checked: stride and dilation >= 1, padding >= 0."""
    (sh, sw), (ph, pw), (dh, dw) = pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation")
    if min(sh, sw, dh, dw) < 1 or min(ph, pw) < 0:
        raise ValueError(f"stride and dilation must be >= 1 and padding >= 0, got stride {(sh, sw)}, "
                         f"padding {(ph, pw)}, dilation {(dh, dw)}")
    return (sh, sw), (ph, pw), (dh, dw)


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def conv_output_hw(h: int, w: int, kernel_size, stride, padding, dilation) -> tuple:
    """(OH, OW) of a convolution over an H x W input; ValueError when either is < 1."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    oh, ow = conv_output_size(h, kh, sh, ph, dh), conv_output_size(w, kw, sw, pw, dw)
    if oh < 1 or ow < 1:
        raise ValueError(f"output size {oh}x{ow} < 1 for input {h}x{w}, kernel {kh}x{kw}, "
                         f"stride {(sh, sw)}, padding {(ph, pw)}, dilation {(dh, dw)}")
    return oh, ow


# ----------------------------------------------------------------------------------------------
# Tensors


def is_channels_last(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last)


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the bytes of two tensors on one (real) device overlap."""
    if a.device != b.device or a.device.type == "meta" or not a.numel() or not b.numel():
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


def check_packed_input(x, what: str, packed) -> None:
    """``x``: a 4-D channels_last tensor with ``packed``'s input channels, dtype and device."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{what} must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
    if x.shape[1] != packed.in_channels:
        raise ValueError(f"{what} has {x.shape[1]} channels, the packed weight expects {packed.in_channels}")
    if x.dtype != packed.dtype:
        raise TypeError(f"{what} dtype {x.dtype} != packed weight dtype {packed.dtype}")
    if x.device != packed.device:
        raise ValueError(f"{what} is on {x.device}, the packed weight on {packed.device}")
    if not is_channels_last(x):
        raise ValueError(f"{what} must be channels_last: call {what}.contiguous(memory_format=torch.channels_last)")


def check_activation(t, what: str, shape: tuple, like: torch.Tensor, like_what: str) -> None:
    """``t``: shaped ``shape``, channels_last, ``like``'s dtype and device (residual, out, shortcut)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{what} must have shape {shape}, got {tuple(t.shape)}")
    if t.dtype != like.dtype or t.device != like.device:
        raise TypeError(f"{what} ({t.dtype}, {t.device}) must match {like_what} ({like.dtype}, {like.device})")
    if not is_channels_last(t):
        raise ValueError(f"{what} must be channels_last: call .contiguous(memory_format=torch.channels_last)")


def check_residual(residual, stride, channel_offset: int, out_shape: tuple, like: torch.Tensor) -> None:
    """The residual of a conv epilogue: ``out_shape``, or (stride s / channel offset c0) an
    [N, C_r, H_r, W_r] map whose stride-s samples cover the output and whose channels land in
    [c0, c0 + C_r) of the output's; channels_last, ``like``'s dtype and device."""
    for what, v, low in (("residual_stride", stride, 1), ("residual_channel_offset", channel_offset, 0)):
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise ValueError(f"{what} must be an int >= {low}, got {v!r}")
    if stride == 1 and channel_offset == 0 and isinstance(residual, torch.Tensor) and tuple(residual.shape) == out_shape:
        return check_activation(residual, "residual", out_shape, like, "x")
    n, c_out, oh, ow = out_shape
    if not isinstance(residual, torch.Tensor) or residual.dim() != 4 or residual.shape[0] != n:
        raise ValueError(f"residual must be [N={n}, C, H, W], got "
                         f"{tuple(getattr(residual, 'shape', ())) or type(residual).__name__}")
    c_r, h_r, w_r = residual.shape[1:]
    if (h_r - 1) // stride + 1 != oh or (w_r - 1) // stride + 1 != ow:
        raise ValueError(f"residual {h_r}x{w_r} sampled at stride {stride} gives "
                         f"{(h_r - 1) // stride + 1}x{(w_r - 1) // stride + 1}, the conv output is {oh}x{ow}")
    if channel_offset + c_r > c_out:
        raise ValueError(f"residual channels [{channel_offset}, {channel_offset + c_r}) exceed the "
                         f"{c_out} output channels")
    check_activation(residual, "residual", tuple(residual.shape), like, "x")


def check_bias(bias, what: str, size: int, device: torch.device) -> None:
    """``bias``: a contiguous float [size] tensor on ``device`` (the kernels read it in fp32)."""
    if (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (size,) or not bias.is_floating_point()
            or bias.device != device):
        raise ValueError(f"{what} must be a float [{size}] tensor on {device}, got "
                         + (f"{tuple(bias.shape)} {bias.dtype} on {bias.device}" if isinstance(bias, torch.Tensor)
                            else type(bias).__name__))
    if not bias.is_contiguous():
        raise ValueError(f"{what} must be contiguous")


def check_shortcut(shortcut, shortcut_stride, shortcut_channels: int, n: int, oh: int, ow: int,
                   like: torch.Tensor, like_what: str):
    """The concat-K projection shortcut: given exactly when the packed weight has shortcut rows
    (``shortcut_channels`` > 0), [N, C_sc, H_sc, W_sc] channels_last with stride-s samples covering
    the OH x OW output. Returns (H_sc, W_sc), or (None, None) without a shortcut."""
    if (shortcut is None) != (shortcut_channels == 0):
        raise ValueError("shortcut must be given exactly when the packed weight has a shortcut weight "
                         f"(packed shortcut channels: {shortcut_channels})")
    if shortcut is None:
        return None, None
    if not isinstance(shortcut_stride, int) or isinstance(shortcut_stride, bool) or shortcut_stride < 1:
        raise ValueError(f"shortcut_stride must be a positive int, got {shortcut_stride!r}")
    if not isinstance(shortcut, torch.Tensor) or shortcut.dim() != 4 or shortcut.shape[:2] != (n, shortcut_channels):
        raise ValueError(f"shortcut must be [N={n}, C_sc={shortcut_channels}, H, W], got "
                         f"{tuple(getattr(shortcut, 'shape', ())) or type(shortcut).__name__}")
    sc_h, sc_w = shortcut.shape[2], shortcut.shape[3]
    s = shortcut_stride
    if (sc_h - 1) // s + 1 != oh or (sc_w - 1) // s + 1 != ow:
        raise ValueError(f"shortcut {sc_h}x{sc_w} with stride {s} gives "
                         f"{(sc_h - 1) // s + 1}x{(sc_w - 1) // s + 1}, the conv output is {oh}x{ow}")
    check_activation(shortcut, "shortcut", tuple(shortcut.shape), like, like_what)
    return sc_h, sc_w


def check_nhwc_input(x, op: str, dtypes: tuple = FLOAT_DTYPES) -> None:
    """``x`` of a pooling op: a 4-D tensor of one of ``dtypes`` in channels_last memory. Errors name ``op``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be [N, C, H, W], got shape {tuple(x.shape)}")
    if x.dtype not in dtypes:
        names = [str(d).removeprefix("torch.") for d in dtypes]
        raise TypeError(f"{op}: x dtype must be {', '.join(names[:-1])} or {names[-1]}, got {x.dtype}")
    if not is_channels_last(x):
        raise ValueError(f"{op}: x must be in torch.channels_last memory format (NHWC), "
                         f"got strides {x.stride()} for shape {tuple(x.shape)}")


def check_out(out: torch.Tensor, op: str, shape: tuple, like: torch.Tensor, *, channels_last: bool) -> None:
    """A preallocated ``out`` of a pooling op: ``shape``, ``like``'s dtype and device, dense."""
    if tuple(out.shape) != shape:
        raise ValueError(f"{op}: out must have shape {shape}, got {tuple(out.shape)}")
    if out.dtype != like.dtype or out.device != like.device:
        raise ValueError(f"{op}: out must be {like.dtype} on {like.device}, got {out.dtype} on {out.device}")
    if channels_last and not is_channels_last(out):
        raise ValueError(f"{op}: out must be in torch.channels_last memory format")
    if not channels_last and not out.is_contiguous():
        raise ValueError(f"{op}: out must be contiguous")
