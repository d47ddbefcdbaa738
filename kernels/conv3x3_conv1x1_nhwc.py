"""Back-to-back fusion of a bottleneck's 3x3 and last 1x1 convolution over NHWC activations.

    mid = round_to_dtype(relu(conv3x3(y1, W_mid; stride, padding, dilation, groups) + bias_mid))
    out = relu(mid @ W_out [+ conv1x1_stride_s(shortcut, W_sc)] + bias_out [+ residual])

One program owns BLOCK_M output pixels (grid: one program per M tile; every program produces all
C_out channels of its pixels). It computes their 3x3 outputs for *all* mid channels (an fp32
[BLOCK_M, C_mid] accumulator), applies bias and ReLU, rounds the tile to the compute dtype (what
the unfused pair stores and reloads) and keeps it in registers as the A operand of the 1x1 GEMM,
which it walks in chunks of BLOCK_N output channels; each chunk then adds the shortcut, bias,
residual and ReLU and is stored. The mid tensor never touches memory: per block that saves
writing and re-reading N*OH*OW*C_mid values, and one launch.

The 3x3 is one flat K loop over (tap, channel block) with pointer loads triton's pipeliner streams
through shared memory (cp.async, async wgmma on sm_90). A projection shortcut's [BLOCK_M, C_sc]
tile is loaded once, after it, and is the second A operand of every chunk's 1x1 GEMM (concat-K).
UNROLL_CHUNKS (the sm_90 tensor-core tiles): the chunks are straight-line code, each chunk one
wgmma group (K = C_mid, + C_sc) waited on by its own epilogue; otherwise a loop over chunks
(sm_80, where the pipeliner then streams the chunks' weight tiles, and fp32).

Operands and layouts are those of ``conv2d_nhwc`` (its module docstring explains them), and the
packing is its ``pack_conv_weight``:

* the 3x3 weight is [9 * group_in, C_mid], rows (kh, kw, c) of a packed group, tap-major K loop;
* the 1x1 weight is [C_mid (+ C_sc), C_out]; a projection shortcut is a concat-K second operand
  of the 1x1 GEMM (rows C_mid.. read ``shortcut`` at (oh*s, ow*s)), the caller pre-sums biases.

Mid blocks (MID_BLOCK, constexpr): the mid tile is computed MID_BLOCK channels at a time, each
block inside one packed group. MID_BLOCK = C_mid (groups == 1, the shipped dense tiles): the whole
tile once, before the chunk loop. MID_BLOCK < C_mid (ResNeXt, where one register tile cannot be
assembled from per-group pieces): the 1x1 GEMM's K is split by mid block instead, each block
computed and multiplied into the chunk's accumulator by its rows of W_out. That loop sits inside
the chunk loop, so the config rule gives such shapes one chunk (BLOCK_N >= C_out): more chunks
would recompute the 3x3.

8-bit (QUANTIZED; ``fastres.quantize``'s ``qconv_pair``): int8 or e4m3 operands, the mid tile
requantized in registers to the input's 8-bit dtype with the mid scale (the rounding the unfused
pair's first ``qconv`` stores), the output chunks through the requantizing epilogue of
``conv2d_nhwc`` (``QuantEpilogue``); weights packed K-major as ``conv2d_nhwc``'s 8-bit ones.
Reference: ``conv3x3_conv1x1_nhwc_8bit_ref``, the two 8-bit reference convs in sequence.

Which blocks the plan fuses is ``fuses_conv3x3_conv1x1`` (the rule and its reasons are in its
docstring); the tiles are ``fused_config``. Runtime ints are the batch and spatial sizes; channel
counts, stride, padding, dilation and the epilogue switches are constexpr. Pixel indices are
int32 (checked), element offsets int64.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import (EIGHT_BIT_DTYPES, FLOAT_DTYPES, INT32_MAX, MIN_TILE_CHANNELS, check_activation, check_bias,
                      check_packed_input, check_shortcut, conv_geometry, conv_output_hw, largest_pow2_divisor,
                      min_dot_k, overlaps, pow2_at_least, requantize_tile, round_to_bf16_nearest_even,
                      store_conv_epilogue, store_requantized_epilogue, tile_groups)
from ._launch import KernelCall
from ._target import DEFAULT_TARGET, Target, table_arch, target_for
from .conv2d_nhwc import (_EIGHT_BIT_NAMES, PackedConvWeight, QuantEpilogue, check_quant, conv2d_nhwc_8bit_ref,
                          conv2d_nhwc_ref, pack_conv_weight)


@triton.jit
def _mid_tile(y_ptr, w_mid_ptr, bias_mid_ptr, mid_acc_scale_ptr, MID_INV_SCALE, mid_block, img, oh, ow, m_mask, H, W,
              C_MID_IN: tl.constexpr, C_MID: tl.constexpr, GROUP_IN: tl.constexpr, GROUP_MID: tl.constexpr,
              MID_BLOCK: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
              PAD_H: tl.constexpr, PAD_W: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
              INTERPRETER_BF16: tl.constexpr, QUANTIZED: tl.constexpr, INTERPRETER_FP8: tl.constexpr,
              W_MID_K_STRIDE: tl.constexpr, W_MID_N_STRIDE: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """round_to_dtype(relu(conv3x3(y1) + bias_mid)) for mid channels [mid_block * MID_BLOCK, +MID_BLOCK),
    which lie in one packed group: [BLOCK_M, MID_BLOCK]. QUANTIZED: requantize_tile(relu(acc *
    mid_acc_scale + bias_mid), MID_INV_SCALE), the mid tile in y1's 8-bit dtype (what the unfused
    pair's first ``qconv`` stores).

    The tap-major K loop of conv2d_nhwc over the packed group's input channels: step kb covers
    channels [c0, c0 + BLOCK_K) of tap (kh, kw) = divmod(kb // CHUNKS, 3), c0 = (kb % CHUNKS) *
    BLOCK_K. (kh, kw, c0) are written inline: the interpreter turns every assigned value into a tensor.
    """
    CHUNKS: tl.constexpr = GROUP_IN // BLOCK_K
    offs_k = tl.arange(0, BLOCK_K)
    offs_mid = mid_block * MID_BLOCK + tl.arange(0, MID_BLOCK)
    group = mid_block * MID_BLOCK // GROUP_MID
    ih0 = oh * STRIDE_H - PAD_H
    iw0 = ow * STRIDE_W - PAD_W
    y_rows = y_ptr + ((img * H + ih0) * W + iw0).to(tl.int64) * C_MID_IN + group * GROUP_IN
    y_row_pitch = W * C_MID_IN
    w_ptrs = w_mid_ptr + offs_k[:, None] * W_MID_K_STRIDE + offs_mid[None, :] * W_MID_N_STRIDE
    ACC_DTYPE: tl.constexpr = tl.int32 if y_ptr.dtype.element_ty == tl.int8 else tl.float32
    acc = tl.zeros((BLOCK_M, MID_BLOCK), dtype=ACC_DTYPE)
    for kb in range(0, 9 * CHUNKS):
        if PAD_H == 0 and PAD_W == 0:
            row_ok = m_mask
        else:
            ih = ih0 + (kb // CHUNKS // 3) * DIL_H
            iw = iw0 + (kb // CHUNKS % 3) * DIL_W
            row_ok = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        y_ptrs = y_rows + ((kb // CHUNKS // 3) * DIL_H * y_row_pitch
                           + ((kb // CHUNKS % 3) * DIL_W * C_MID_IN + (kb % CHUNKS) * BLOCK_K))
        y_tile = tl.load(y_ptrs[:, None] + offs_k[None, :], mask=row_ok[:, None], other=0.0)
        w_tile = tl.load(w_ptrs)
        if INTERPRETER_BF16:
            y_tile, w_tile = y_tile.to(tl.float32), w_tile.to(tl.float32)
        acc = tl.dot(y_tile, w_tile, acc, input_precision="ieee")
        w_ptrs += BLOCK_K * W_MID_K_STRIDE
    if QUANTIZED:
        mid = acc.to(tl.float32) * tl.load(mid_acc_scale_ptr + offs_mid)[None, :]
        mid = mid + tl.load(bias_mid_ptr + offs_mid).to(tl.float32)[None, :]
        mid = tl.where(mid < 0.0, 0.0, mid)
        return requantize_tile(mid, MID_INV_SCALE, y_ptr.dtype.element_ty, INTERPRETER_FP8)
    acc += tl.load(bias_mid_ptr + offs_mid).to(tl.float32)[None, :]
    acc = tl.where(acc < 0.0, 0.0, acc)       # torch.relu keeps NaN; tl.maximum would drop it
    if INTERPRETER_BF16:
        return round_to_bf16_nearest_even(acc)   # stays fp32: the interpreter's dot runs in fp32
    return acc.to(y_ptr.dtype.element_ty)


# Sizes are not specialised (triton would compile a variant for batch 1 and for sizes divisible
# by 16, and nothing in the kernel gains from either): one binary per configuration, whatever the
# batch and resolution, which also keeps the AOT check to one compile per configuration.
@triton.jit(do_not_specialize=["BATCH", "H", "W", "OH", "OW", "SC_H", "SC_W"])
def _conv3x3_conv1x1_nhwc_kernel(
    y_ptr, w_mid_ptr, bias_mid_ptr, w_out_ptr, bias_out_ptr, out_ptr, residual_ptr, shortcut_ptr,
    mid_acc_scale_ptr, MID_INV_SCALE, acc_scale_ptr, RES_SCALE, OUT_INV_SCALE,
    BATCH, H, W, OH, OW, SC_H, SC_W,
    C_MID_IN: tl.constexpr, C_MID: tl.constexpr, C_OUT: tl.constexpr,
    GROUP_IN: tl.constexpr, GROUP_MID: tl.constexpr,            # per *packed* group of the 3x3
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    C_SC: tl.constexpr, SC_STRIDE: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, HAS_SHORTCUT_GEMM: tl.constexpr, INTERPRETER_BF16: tl.constexpr,
    QUANTIZED: tl.constexpr, INTERPRETER_FP8: tl.constexpr,
    W_MID_K_STRIDE: tl.constexpr, W_MID_N_STRIDE: tl.constexpr, W_OUT_K_STRIDE: tl.constexpr,
    W_OUT_N_STRIDE: tl.constexpr,
    BLOCK_M: tl.constexpr, MID_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_K_SC: tl.constexpr, UNROLL_CHUNKS: tl.constexpr,
):
    """out = relu(round(relu(conv3x3(y1) + b_mid)) @ W_out [+ shortcut @ W_sc] + b_out [+ residual]).

    fp32 accumulation for both GEMMs. INTERPRETER_BF16 (set by the wrapper only for bf16 under the
    interpreter, as in conv2d_nhwc): dot tiles are upcast to fp32 because the interpreter's bf16
    tl.dot is wrong, and both bf16 roundings (mid tile, output) are done by hand to nearest-even.

    QUANTIZED (8-bit y1, weights, shortcut and residual; int32 accumulators for int8, fp32 for
    e4m3): the mid tile is requantized in registers to y1's dtype (``_mid_tile``), the output
    chunks store through ``store_requantized_epilogue`` (acc * acc_scale + bias_out [+ RES_SCALE *
    residual] -> relu -> * OUT_INV_SCALE); the weights are K-major (W_*_K_STRIDE 1, see
    ``PackedConvWeight``). INTERPRETER_FP8: e4m3 roundings by hand, as in conv2d_nhwc.
    """
    pid = tl.program_id(0)
    M = BATCH * OH * OW
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    ow = offs_m % OW
    oh = (offs_m // OW) % OH
    img = offs_m // (OW * OH)
    MID_BLOCKS: tl.constexpr = C_MID // MID_BLOCK
    if MID_BLOCKS == 1:
        # The whole mid tile, once: it is the A operand of every output chunk.
        mid = _mid_tile(y_ptr, w_mid_ptr, bias_mid_ptr, mid_acc_scale_ptr, MID_INV_SCALE, 0, img, oh, ow, m_mask,
                        H, W, C_MID_IN, C_MID, GROUP_IN, GROUP_MID, MID_BLOCK, STRIDE_H, STRIDE_W, PAD_H, PAD_W,
                        DIL_H, DIL_W, INTERPRETER_BF16, QUANTIZED, INTERPRETER_FP8, W_MID_K_STRIDE, W_MID_N_STRIDE,
                        BLOCK_M, BLOCK_K)
    else:
        mid = None
    if HAS_SHORTCUT_GEMM:
        # The shortcut tile, once (all C_SC channels, a pow2 BLOCK_K_SC with the tail masked): the
        # concat-K A operand of every output chunk.
        offs_sc = tl.arange(0, BLOCK_K_SC)
        sc_rows = shortcut_ptr + ((img * SC_H + oh * SC_STRIDE) * SC_W + ow * SC_STRIDE).to(tl.int64) * C_SC
        sc_mask = m_mask[:, None] if C_SC == BLOCK_K_SC else m_mask[:, None] & (offs_sc < C_SC)[None, :]
        sc = tl.load(sc_rows[:, None] + offs_sc[None, :], mask=sc_mask, other=0.0)
        if INTERPRETER_BF16:
            sc = sc.to(tl.float32)
    else:
        sc = None
    if UNROLL_CHUNKS:
        # Straight-line chunks (tensor-core tiles: a few of them): no loop around a dot whose
        # result goes straight to an epilogue, and each chunk's weight loads can be issued early.
        for n0 in tl.static_range(0, C_OUT, BLOCK_N):
            _out_chunk(n0, mid, sc, y_ptr, w_mid_ptr, bias_mid_ptr, w_out_ptr, bias_out_ptr, out_ptr, residual_ptr,
                       mid_acc_scale_ptr, MID_INV_SCALE, acc_scale_ptr, RES_SCALE, OUT_INV_SCALE,
                       img, oh, ow, offs_m, m_mask, H, W, C_MID_IN, C_MID, C_OUT, GROUP_IN, GROUP_MID, STRIDE_H,
                       STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W, C_SC, HAS_RESIDUAL, HAS_SHORTCUT_GEMM,
                       INTERPRETER_BF16, QUANTIZED, INTERPRETER_FP8, W_MID_K_STRIDE, W_MID_N_STRIDE, W_OUT_K_STRIDE,
                       W_OUT_N_STRIDE, BLOCK_M, MID_BLOCK, BLOCK_N, BLOCK_K, BLOCK_K_SC)
    else:
        for n0 in range(0, C_OUT, BLOCK_N):
            _out_chunk(n0, mid, sc, y_ptr, w_mid_ptr, bias_mid_ptr, w_out_ptr, bias_out_ptr, out_ptr, residual_ptr,
                       mid_acc_scale_ptr, MID_INV_SCALE, acc_scale_ptr, RES_SCALE, OUT_INV_SCALE,
                       img, oh, ow, offs_m, m_mask, H, W, C_MID_IN, C_MID, C_OUT, GROUP_IN, GROUP_MID, STRIDE_H,
                       STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W, C_SC, HAS_RESIDUAL, HAS_SHORTCUT_GEMM,
                       INTERPRETER_BF16, QUANTIZED, INTERPRETER_FP8, W_MID_K_STRIDE, W_MID_N_STRIDE, W_OUT_K_STRIDE,
                       W_OUT_N_STRIDE, BLOCK_M, MID_BLOCK, BLOCK_N, BLOCK_K, BLOCK_K_SC)


@triton.jit
def _out_chunk(n0, mid, sc, y_ptr, w_mid_ptr, bias_mid_ptr, w_out_ptr, bias_out_ptr, out_ptr, residual_ptr,
               mid_acc_scale_ptr, MID_INV_SCALE, acc_scale_ptr, RES_SCALE, OUT_INV_SCALE,
               img, oh, ow, offs_m, m_mask, H, W, C_MID_IN: tl.constexpr, C_MID: tl.constexpr, C_OUT: tl.constexpr,
               GROUP_IN: tl.constexpr, GROUP_MID: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
               PAD_H: tl.constexpr, PAD_W: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
               C_SC: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_SHORTCUT_GEMM: tl.constexpr,
               INTERPRETER_BF16: tl.constexpr, QUANTIZED: tl.constexpr, INTERPRETER_FP8: tl.constexpr,
               W_MID_K_STRIDE: tl.constexpr, W_MID_N_STRIDE: tl.constexpr, W_OUT_K_STRIDE: tl.constexpr,
               W_OUT_N_STRIDE: tl.constexpr, BLOCK_M: tl.constexpr, MID_BLOCK: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_K_SC: tl.constexpr):
    """Output channels [n0, n0 + BLOCK_N): mid @ W_out [+ sc @ W_sc] and the epilogue, stored."""
    MID_BLOCKS: tl.constexpr = C_MID // MID_BLOCK
    EVEN_N: tl.constexpr = C_OUT % BLOCK_N == 0
    offs_mid = tl.arange(0, MID_BLOCK)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < C_OUT
    ACC_DTYPE: tl.constexpr = tl.int32 if y_ptr.dtype.element_ty == tl.int8 else tl.float32
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    if MID_BLOCKS == 1:
        w_ptrs = w_out_ptr + offs_mid[:, None] * W_OUT_K_STRIDE + offs_n[None, :] * W_OUT_N_STRIDE
        w_tile = tl.load(w_ptrs) if EVEN_N else tl.load(w_ptrs, mask=n_mask[None, :], other=0.0)
        if INTERPRETER_BF16:
            w_tile = w_tile.to(tl.float32)
        acc = tl.dot(mid, w_tile, acc, input_precision="ieee")
    else:
        # K of the 1x1 GEMM split by mid block: rows j*MID_BLOCK.. of W_out meet mid block j.
        for j in range(0, MID_BLOCKS):
            mid_j = _mid_tile(y_ptr, w_mid_ptr, bias_mid_ptr, mid_acc_scale_ptr, MID_INV_SCALE, j, img, oh, ow, m_mask,
                              H, W, C_MID_IN, C_MID, GROUP_IN, GROUP_MID, MID_BLOCK, STRIDE_H, STRIDE_W,
                              PAD_H, PAD_W, DIL_H, DIL_W, INTERPRETER_BF16, QUANTIZED, INTERPRETER_FP8,
                              W_MID_K_STRIDE, W_MID_N_STRIDE, BLOCK_M, BLOCK_K)
            w_ptrs = w_out_ptr + (j * MID_BLOCK + offs_mid)[:, None] * W_OUT_K_STRIDE + offs_n[None, :] * W_OUT_N_STRIDE
            w_tile = tl.load(w_ptrs) if EVEN_N else tl.load(w_ptrs, mask=n_mask[None, :], other=0.0)
            if INTERPRETER_BF16:
                w_tile = w_tile.to(tl.float32)
            acc = tl.dot(mid_j, w_tile, acc, input_precision="ieee")
    if HAS_SHORTCUT_GEMM:
        # Concat-K: the shortcut rows follow the C_MID rows of W_out (rows past C_SC meet zero channels).
        offs_sc = tl.arange(0, BLOCK_K_SC)
        wsc_ptrs = w_out_ptr + (C_MID + offs_sc)[:, None] * W_OUT_K_STRIDE + offs_n[None, :] * W_OUT_N_STRIDE
        if C_SC == BLOCK_K_SC:
            wsc = tl.load(wsc_ptrs) if EVEN_N else tl.load(wsc_ptrs, mask=n_mask[None, :], other=0.0)
        else:
            wsc = tl.load(wsc_ptrs, mask=(offs_sc < C_SC)[:, None] & n_mask[None, :], other=0.0)
        if INTERPRETER_BF16:
            wsc = wsc.to(tl.float32)
        acc = tl.dot(sc, wsc, acc, input_precision="ieee")
    if QUANTIZED:
        store_requantized_epilogue(acc, out_ptr, acc_scale_ptr, bias_out_ptr, residual_ptr, offs_m, RES_SCALE,
                                   OUT_INV_SCALE, offs_m, offs_n, m_mask, n_mask, C_OUT, C_OUT, 0, HAS_BIAS=True,
                                   HAS_RESIDUAL=HAS_RESIDUAL, APPLY_RELU=True, INTERPRETER_FP8=INTERPRETER_FP8)
    else:
        store_conv_epilogue(acc, out_ptr, bias_out_ptr, residual_ptr, offs_m, offs_n, m_mask, n_mask, C_OUT,
                            HAS_BIAS=True, HAS_RESIDUAL=HAS_RESIDUAL, APPLY_RELU=True,
                            INTERPRETER_BF16=INTERPRETER_BF16)


# ----------------------------------------------------------------------------------------------
# Packed weights


@dataclass
class PackedConv3x3Conv1x1:
    """The two weights of a fused 3x3 -> 1x1 pair, packed for ``_conv3x3_conv1x1_nhwc_kernel``.

    ``mid``: the 3x3, [9*group_in, C_mid] (conv2d_nhwc packing, block-diagonal packed groups);
    ``out``: the 1x1, [C_mid (+ C_sc), C_out], a projection shortcut's rows concatenated on K.
    """
    mid: PackedConvWeight
    out: PackedConvWeight

    @property
    def in_channels(self) -> int:           # of the 3x3 (y1's channels)
        return self.mid.in_channels

    @property
    def mid_channels(self) -> int:
        return self.mid.out_channels

    @property
    def out_channels(self) -> int:
        return self.out.out_channels

    @property
    def groups(self) -> int:
        return self.mid.groups

    @property
    def shortcut_in_channels(self) -> int:
        return self.out.shortcut_in_channels

    @property
    def dtype(self) -> torch.dtype:
        return self.mid.dtype

    @property
    def device(self) -> torch.device:
        return self.mid.device


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _kernel_layout_problem(group_in: int, group_mid: int, c_mid: int, dtype: torch.dtype) -> str:
    """Why the kernel cannot run a (packed) shape, or "" when it can. The narrowest tile is
    ``min_dot_k``: 16 channels, 32 for 8-bit operands (whose dots need K >= 32)."""
    narrowest = min_dot_k(dtype)
    if not _is_pow2(group_mid) or group_mid < narrowest:
        return (f"a packed group of {group_mid} mid channels (the kernel's register tile needs a power of two "
                f">= {narrowest})")
    if group_in % narrowest != 0:
        return (f"a packed group of {group_in} 3x3 input channels (the tap-major K loop needs a multiple of "
                f"{narrowest})")
    if dtype in EIGHT_BIT_DTYPES and group_mid != c_mid:
        return "several packed groups in 8-bit (the grouped tiles are 16 mid channels wide)"
    return ""


def pack_conv3x3_conv1x1(w_mid, w_out, *, groups=1, shortcut_weight=None) -> PackedConv3x3Conv1x1:
    """Pack the 3x3 weight [C_mid, C_mid_in/groups, 3, 3], the 1x1 weight [C_out, C_mid, 1, 1] and
    optionally a projection shortcut weight [C_out, C_sc, 1, 1] for ``conv3x3_conv1x1_nhwc_packed``.

    All in the compute dtype, on one device; works on meta tensors. Raises ValueError for shapes the
    kernel cannot run; ``fuses_conv3x3_conv1x1`` says which ones the plan should give it.
    """
    for name, t in (("w_mid", w_mid), ("w_out", w_out), ("shortcut_weight", shortcut_weight)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if w_mid.dim() != 4 or tuple(w_mid.shape[2:]) != (3, 3):
        raise ValueError(f"w_mid must be a 3x3 conv weight [C_mid, C_mid_in/groups, 3, 3], got shape "
                         f"{tuple(w_mid.shape)}")
    c_mid = w_mid.shape[0]
    if w_out.dim() != 4 or w_out.shape[1] != c_mid or tuple(w_out.shape[2:]) != (1, 1):
        raise ValueError(f"w_out must be a 1x1 conv weight [C_out, C_mid={c_mid}, 1, 1], got shape "
                         f"{tuple(w_out.shape)}")
    if w_out.dtype != w_mid.dtype or w_out.device != w_mid.device:
        raise ValueError(f"w_out ({w_out.dtype}, {w_out.device}) must match w_mid ({w_mid.dtype}, {w_mid.device})")
    if w_mid.dtype not in FLOAT_DTYPES + EIGHT_BIT_DTYPES:
        raise TypeError(f"weights must be float16, bfloat16 or float32 (or int8 / float8_e4m3fn: the 8-bit pair), "
                        f"got {w_mid.dtype}")
    mid = pack_conv_weight(w_mid, groups=groups)
    problem = _kernel_layout_problem(mid.group_in_channels, mid.group_out_channels, c_mid, w_mid.dtype)
    if problem:
        raise ValueError(f"conv3x3_conv1x1_nhwc cannot run {problem}; check fuses_conv3x3_conv1x1 first and "
                         "run the unfused pair")
    out = pack_conv_weight(w_out, shortcut_weight=shortcut_weight)
    return PackedConv3x3Conv1x1(mid=mid, out=out)


# ----------------------------------------------------------------------------------------------
# Which blocks fuse, and the tiles


@dataclass(frozen=True)
class FusedConfig:
    BLOCK_M: int
    MID_BLOCK: int      # mid channels per 3x3 tile (at most one packed group; all of C_mid: computed once)
    BLOCK_N: int        # output channels per chunk of the 1x1 GEMM
    BLOCK_K: int        # 3x3 input channels per K step (one tap)
    num_warps: int
    num_stages: int
    UNROLL_CHUNKS: bool = False  # output chunks as straight-line code (tl.static_range), else a loop
    BLOCK_K_SC: int = 0     # the whole shortcut tile's channels (pow2, loaded once): set by fit_config


# Untuned (no GPU has measured them). Every tile the rule gives the torchvision models that
# fuses_conv3x3_conv1x1 admits compiles for sm_80 and sm_90 with zero spills
# (tests/test_conv3x3_conv1x1_nhwc.py::test_aot_fused_blocks_fit_sm80_and_sm90, tests/test_plan_aot.py).
# Registers per thread size them: the fp32 mid accumulator [BLOCK_M, MID_BLOCK], then the rounded
# mid tile (and the shortcut tile) held as the 1x1's A operands next to a [BLOCK_M, BLOCK_N]
# output accumulator. The sm_90 rows; FUSED_ARCH_CONFIGS has those that differ on sm_80.
FUSED_CONFIGS = {
    # 16-bit, groups=1: the whole mid tile once (MID_BLOCK >= C_mid), then the output chunks.
    # 128 rows on 8 warps: two warpgroups on 64 rows each, so the mid accumulator is the 1x1's
    # A operand in registers as it is (no shared-memory reshuffle, no product computed twice).
    # 64-column chunks, unrolled: a chunk's wgmma result goes straight to its epilogue, and the
    # small output accumulator leaves 2 CTAs/SM (128-column chunks: 166-223 regs, 1 CTA/SM).
    "tc": FusedConfig(BLOCK_M=128, MID_BLOCK=128, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3,
                      UNROLL_CHUNKS=True),
    # fewer "tc" programs than the target has SMs (batch 1-2 at layer1-2): one warpgroup, 64 rows
    # (the smallest wgmma tile), twice the programs
    "tc_small_m": FusedConfig(BLOCK_M=64, MID_BLOCK=128, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3,
                              UNROLL_CHUNKS=True),
    # 16-bit, grouped: one mid block per packed group and one output chunk (C_out <= 256), so the
    # 3x3 runs once; the [64, 256] fp32 output accumulator is 64 regs/thread on 8 warps
    "tc_grouped": FusedConfig(BLOCK_M=64, MID_BLOCK=16, BLOCK_N=256, BLOCK_K=16, num_warps=8, num_stages=3,
                              UNROLL_CHUNKS=True),
    # fp32: IEEE dots on the FMA units, where a thread holds its rows (columns) of an operand
    # across the whole K of a dot. The mid tile (K = C_mid of the 1x1) is therefore met by narrow
    # 32-column output chunks; 128-column chunks spill on sm_80.
    "fp32": FusedConfig(BLOCK_M=32, MID_BLOCK=128, BLOCK_N=32, BLOCK_K=32, num_warps=8, num_stages=2),
    # 16 rows: on 32 rows ptxas caps the 8-warp grouped tile at 128 regs on sm_90 and spills 8 B
    "fp32_grouped": FusedConfig(BLOCK_M=16, MID_BLOCK=16, BLOCK_N=256, BLOCK_K=16, num_warps=8, num_stages=2),
    # Triton interpreter (CPU tensors): few large programs, one chunk, one K step per tap
    "interpreter": FusedConfig(BLOCK_M=128, MID_BLOCK=1024, BLOCK_N=1024, BLOCK_K=128, num_warps=4, num_stages=1),
}
# sm_80 (mma.sync: both operands pass through registers): 128 rows spill there, so 64 rows on
# 8 warps (32 on 4 for small M), and the chunks stay a loop whose weight tiles the pipeliner
# streams with cp.async (unrolled, the register-staged weight tiles spill next to a 256-channel
# shortcut tile).
FUSED_ARCH_CONFIGS = {
    ("tc", 80): FusedConfig(BLOCK_M=64, MID_BLOCK=128, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3),
    ("tc_small_m", 80): FusedConfig(BLOCK_M=32, MID_BLOCK=128, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
    # next to a 256-channel fp32 shortcut tile, 32-column chunks spill 8 B on sm_80
    ("fp32", 80): FusedConfig(BLOCK_M=32, MID_BLOCK=128, BLOCK_N=16, BLOCK_K=32, num_warps=8, num_stages=2),
}
_MAX_DENSE_MID = 128            # see fuses_conv3x3_conv1x1
_MAX_GROUPED_OUT = 256


def fused_tile(name: str, arch: int) -> FusedConfig:
    """The named tile on an architecture's table row (``table_arch``): FUSED_ARCH_CONFIGS', else FUSED_CONFIGS'."""
    return FUSED_ARCH_CONFIGS.get((name, arch), FUSED_CONFIGS[name])


def fit_config(cfg: FusedConfig, group_in: int, group_mid: int, c_out: int, c_sc: int,
               dtype: torch.dtype = torch.float16) -> FusedConfig:
    """Clamp a configuration's tiles to a shape: MID_BLOCK to the packed group's mid channels,
    BLOCK_N to C_out (pow2, >= 16), BLOCK_K to the largest power of two dividing the packed group's
    input channels (a K step must not straddle a tap), BLOCK_K_SC to all the shortcut channels
    (pow2, >= 16, >= 32 for 8-bit operands: it is a dot's K; a tail is masked): the shortcut tile
    is loaded once."""
    return dataclasses.replace(
        cfg,
        MID_BLOCK=min(cfg.MID_BLOCK, group_mid),
        BLOCK_N=min(cfg.BLOCK_N, max(MIN_TILE_CHANNELS, pow2_at_least(c_out))),
        BLOCK_K=min(cfg.BLOCK_K, largest_pow2_divisor(group_in)),
        BLOCK_K_SC=max(min_dot_k(dtype), pow2_at_least(c_sc)),
    )


@functools.lru_cache(maxsize=4096)
def fused_config(m: int, group_in: int, group_mid: int, c_mid: int, c_out: int, c_sc: int,
                 dtype: torch.dtype, device_type: str, target: Target = DEFAULT_TARGET) -> FusedConfig:
    """Tile rule, keyed on M = N*OH*OW, the packed 3x3 group widths, C_mid, C_out, the shortcut's
    channels, the operand width, whether the interpreter runs it and the target GPU.

    GPU: several packed groups (ResNeXt) -> tc_grouped / fp32_grouped; else 16-bit -> tc, or
    tc_small_m when M gives fewer tc programs than the target has SMs; fp32 -> fp32; each tile as
    the target architecture's row has it (``fused_tile``). 8-bit operands take the 16-bit tiles
    (untuned: BLOCK_K 64 elements is half the bytes per K step). Interpreter (device cpu): the
    interpreter tile, BLOCK_M shrunk to M. Then ``fit_config``.
    """
    grouped = group_mid < c_mid
    arch = table_arch(target.sm)
    if device_type == "cpu":
        cfg = FUSED_CONFIGS["interpreter"]
        cfg = dataclasses.replace(cfg, BLOCK_M=min(cfg.BLOCK_M, max(16, pow2_at_least(m))))
    elif dtype == torch.float32:
        cfg = fused_tile("fp32_grouped" if grouped else "fp32", arch)
    elif grouped:
        cfg = fused_tile("tc_grouped", arch)
    else:
        cfg = fused_tile("tc", arch)
        if triton.cdiv(m, cfg.BLOCK_M) < target.sms:
            cfg = fused_tile("tc_small_m", arch)
    return fit_config(cfg, group_in, group_mid, c_out, c_sc, dtype)


def fuses_conv3x3_conv1x1(c_mid: int, c_in_mid: int, c_out: int, groups: int, dtype: torch.dtype) -> bool:
    """Whether the plan runs a bottleneck's conv2 (3x3, ``c_in_mid`` -> ``c_mid``, ``groups``) and
    conv3 (1x1, ``c_mid`` -> ``c_out``) as this one kernel instead of two ``conv2d_nhwc`` launches.
    Stride, padding, dilation, batch, spatial size and the shortcut kind do not change the answer.

    The 3x3's groups are packed as ``conv2d_nhwc`` packs them (block-diagonal tiles of >= 16
    channels); the kernel needs power-of-two packed mid widths >= 16 and packed input widths that
    are multiples of 16, and dtype float16, bfloat16 or float32, or int8 / float8_e4m3fn
    (``fastres.quantize``'s ``qconv_pair``: one packed group, mid and input widths multiples of 32,
    the narrowest 8-bit dot). Then:

    * one packed group (groups == 1): fused when c_mid <= 128. The whole [BLOCK_M, c_mid] fp32 mid
      accumulator and its rounded copy live in registers next to an output-chunk accumulator
      (and a projection's shortcut tile); the shipped tiles compile for c_mid 64 and 128 without
      spills (the AOT tests carry the numbers). That covers resnet50/101/152 layer1-2 and
      wide_resnet50_2/101_2 layer1. c_mid = 256 (layer3; wide layer2) was re-checked on the
      128-row sm_90 tile: ~240 regs (1 CTA/SM) without a shortcut, and with layer3.0's 512-channel
      projection it spills: it stays unfused (the unfused 3x3 runs 2 CTAs/SM).
    * several packed groups (ResNeXt): fused when c_out <= 256. The 1x1 GEMM's K is split by packed
      group, so the whole [64, c_out] fp32 output accumulator stays in registers (with fewer
      columns per chunk the 3x3 would be recomputed per chunk): 123-184 regs (16-bit, 8 warps),
      76-110 (fp32, 16 rows). That is layer1 of resnext50_32x4d (32 groups of 4), resnext101_32x8d
      (32 of 8) and resnext101_64x4d (64 of 4). Their layer2 (c_out = 512) spills on sm_90 and
      needs 255 regs on sm_80: unfused.

    Every configuration this admits for those torchvision models compiles for sm_80 and sm_90
    with zero spills: tests/test_conv3x3_conv1x1_nhwc.py::test_aot_fused_blocks_fit_sm80_and_sm90.
    Otherwise the plan runs the unfused pair.
    """
    if dtype not in FLOAT_DTYPES + EIGHT_BIT_DTYPES:
        return False
    if min(c_mid, c_in_mid, c_out, groups) < 1 or c_mid % groups or c_in_mid % groups:
        return False
    t = tile_groups(groups, c_in_mid // groups, c_mid // groups)
    group_in, group_mid = t * c_in_mid // groups, t * c_mid // groups
    if _kernel_layout_problem(group_in, group_mid, c_mid, dtype):
        return False
    if group_mid == c_mid:
        return c_mid <= _MAX_DENSE_MID
    return c_out <= _MAX_GROUPED_OUT


# ----------------------------------------------------------------------------------------------
# Launch wrapper


def conv3x3_conv1x1_nhwc_packed(y1, packed: PackedConv3x3Conv1x1, bias_mid, bias_out, *, stride, padding,
                                dilation, residual=None, shortcut=None, shortcut_stride=1, out=None,
                                quant_mid: QuantEpilogue | None = None, quant: QuantEpilogue | None = None):
    """``relu(round(relu(conv3x3(y1) + bias_mid)) @ W_out [+ conv1x1_s(shortcut, W_sc)] + bias_out
    [+ residual])`` in one launch; see the module docstring.

    ``y1`` [N, C_mid_in, H, W] channels_last in ``packed.dtype``; ``bias_mid`` [C_mid] and
    ``bias_out`` [C_out] float (used in fp32; a projection's bias pre-summed into ``bias_out``);
    ``residual`` and ``out`` [N, C_out, OH, OW] channels_last (``out`` may be the residual buffer,
    never y1 or the shortcut); ``shortcut`` [N, C_sc, H_sc, W_sc] channels_last exactly when the
    packed weights carry a projection, read at (oh*shortcut_stride, ow*shortcut_stride).
    Works on meta tensors inside ``record_launches()``.

    8-bit (y1, the packed weights, residual and shortcut int8 or float8_e4m3fn): ``quant_mid`` is
    the 3x3's ``QuantEpilogue`` (acc_scale [C_mid], out_dtype y1's, out_inv_scale 1 / s_mid: the
    mid tile is requantized in registers as the unfused pair's first ``qconv`` stores it), ``quant``
    the 1x1's (with the residual's scale; out 8-bit or float); both given or neither. Reference:
    ``conv3x3_conv1x1_nhwc_8bit_ref``.
    """
    (sh, sw), (ph, pw), (dh, dw) = conv_geometry(stride, padding, dilation)
    if not isinstance(packed, PackedConv3x3Conv1x1):
        raise TypeError(f"packed must come from pack_conv3x3_conv1x1, got {type(packed).__name__}")
    check_packed_input(y1, "y1", packed)
    if (quant_mid is None) != (quant is None):
        raise ValueError("quant_mid and quant go together: give both (8-bit) or neither")
    out_dtype = check_quant(quant, y1, packed.out, None, residual)
    if quant_mid is not None:
        check_quant(quant_mid, y1, packed.mid, None, None)
        if quant_mid.out_dtype != y1.dtype:
            raise TypeError(f"quant_mid.out_dtype must be y1's dtype ({y1.dtype}): the mid tile stays 8-bit, "
                            f"got {quant_mid.out_dtype}")
    n, c_in, h, w = y1.shape
    oh, ow = conv_output_hw(h, w, (3, 3), (sh, sw), (ph, pw), (dh, dw))
    out_shape = (n, packed.out_channels, oh, ow)
    check_bias(bias_mid, "bias_mid", packed.mid_channels, y1.device)
    check_bias(bias_out, "bias_out", packed.out_channels, y1.device)
    if residual is not None:
        check_activation(residual, "residual", out_shape, y1, "y1")
    sc_h, sc_w = check_shortcut(shortcut, shortcut_stride, packed.shortcut_in_channels, n, oh, ow, y1, "y1")
    if out is None:
        out = torch.empty(out_shape, dtype=out_dtype, device=y1.device, memory_format=torch.channels_last)
    else:
        check_activation(out, "out", out_shape, y1 if quant is None else y1.new_empty(0, dtype=out_dtype),
                         "y1" if quant is None else "quant.out_dtype")
        # Programs read y1 and the shortcut around and beside their own pixels: out may not overlap
        # them. Each element of the residual is read by the program that writes it, just before.
        for what, t in (("y1", y1), ("shortcut", shortcut)):
            if t is not None and overlaps(out, t):
                raise ValueError(f"out must not overlap {what}")
        if residual is not None and overlaps(out, residual) and out.data_ptr() != residual.data_ptr():
            raise ValueError("out must be the residual buffer itself or not overlap it")
    if n == 0:
        return out
    if n * max(h * w, oh * ow, (sc_h or 0) * (sc_w or 0)) > INT32_MAX:
        raise ValueError(f"batch {n} x {h}x{w} pixels exceeds the kernel's int32 pixel index")
    _build_call(y1, packed, bias_mid, bias_out, out, stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw),
                residual=residual, shortcut=shortcut, shortcut_stride=shortcut_stride, quant_mid=quant_mid,
                quant=quant).launch()
    return out


def _build_call(y1, packed, bias_mid, bias_out, out, *, stride, padding, dilation, residual, shortcut,
                shortcut_stride, quant_mid=None, quant=None) -> KernelCall:
    """The KernelCall of one (already validated) fused pair; touches no tensor data."""
    n, c_in, h, w = y1.shape
    oh, ow = out.shape[2], out.shape[3]
    c_mid, c_out, c_sc = packed.mid_channels, packed.out_channels, packed.shortcut_in_channels
    group_in, group_mid = packed.mid.group_in_channels, packed.mid.group_out_channels
    m = n * oh * ow
    cfg = fused_config(m, group_in, group_mid, c_mid, c_out, c_sc, y1.dtype, y1.device.type, target_for(y1.device))
    args = dict(y_ptr=y1, w_mid_ptr=packed.mid.weight, bias_mid_ptr=bias_mid, w_out_ptr=packed.out.weight,
                bias_out_ptr=bias_out, out_ptr=out, BATCH=n, H=h, W=w, OH=oh, OW=ow)
    # Absent operands are None, which Triton treats as constexpr: they go with the constexprs.
    optional = dict(residual_ptr=residual, shortcut_ptr=shortcut,
                    SC_H=shortcut.shape[2] if shortcut is not None else None,
                    SC_W=shortcut.shape[3] if shortcut is not None else None,
                    mid_acc_scale_ptr=quant_mid.acc_scale if quant_mid is not None else None,
                    MID_INV_SCALE=quant_mid.out_inv_scale if quant_mid is not None else None,
                    acc_scale_ptr=quant.acc_scale if quant is not None else None,
                    RES_SCALE=quant.residual_scale if quant is not None else None,
                    OUT_INV_SCALE=quant.out_inv_scale if quant is not None else None)
    args.update({k: v for k, v in optional.items() if v is not None})
    constexprs = {k: v for k, v in optional.items() if v is None}
    constexprs.update(
        C_MID_IN=c_in, C_MID=c_mid, C_OUT=c_out, GROUP_IN=group_in, GROUP_MID=group_mid,
        STRIDE_H=stride[0], STRIDE_W=stride[1], PAD_H=padding[0], PAD_W=padding[1],
        DIL_H=dilation[0], DIL_W=dilation[1],
        C_SC=c_sc, SC_STRIDE=shortcut_stride if shortcut is not None else 1,
        HAS_RESIDUAL=residual is not None, HAS_SHORTCUT_GEMM=shortcut is not None,
        INTERPRETER_BF16=y1.dtype == torch.bfloat16 and y1.device.type == "cpu",
        QUANTIZED=quant is not None, INTERPRETER_FP8=y1.dtype == torch.float8_e4m3fn and y1.device.type == "cpu",
        W_MID_K_STRIDE=packed.mid.weight.stride(0), W_MID_N_STRIDE=packed.mid.weight.stride(1),
        W_OUT_K_STRIDE=packed.out.weight.stride(0), W_OUT_N_STRIDE=packed.out.weight.stride(1),
        BLOCK_M=cfg.BLOCK_M, MID_BLOCK=cfg.MID_BLOCK, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
        BLOCK_K_SC=cfg.BLOCK_K_SC, UNROLL_CHUNKS=cfg.UNROLL_CHUNKS,
    )
    groups = packed.groups
    name = (f"conv3x3_conv1x1_nhwc[s{stride[0]}" + (f"/d{dilation[0]}" if dilation[0] > 1 else "")
            + (f"/g{groups}" if groups > 1 else "") + (f"+sc{c_sc}/s{shortcut_stride}" if c_sc else "")
            + (f"/{_EIGHT_BIT_NAMES[y1.dtype]}" if quant is not None else "") + "]")
    k_mid = 9 * c_in // groups
    macs = m * (c_mid * k_mid + c_out * (c_mid + c_sc))
    itemsize = y1.element_size()
    weights = c_mid * k_mid + c_out * (c_mid + c_sc)   # as PyTorch holds them (modelled traffic)
    return KernelCall(
        kernel=_conv3x3_conv1x1_nhwc_kernel, grid=(triton.cdiv(m, cfg.BLOCK_M),), args=args,
        constexprs=constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages, name=name,
        # 8-bit: no FMA contraction, so the requantizations round as the interpreter and the reference do
        options=dict(enable_fp_fusion=False) if quant is not None else {},
        # the 3x3 GEMM is M x C_mid x K_mid, the 1x1 (with its concat-K shortcut) M x N x K
        info=dict(M=m, C_mid=c_mid, K_mid=k_mid, N=c_out, K=c_mid + c_sc, flops=2 * macs,
                  dtype=str(y1.dtype).replace("torch.", ""),
                  bytes=(y1.numel() + out.numel() * (2 if residual is not None else 1)
                         + (n * oh * ow * c_sc if shortcut is not None else 0) + weights) * itemsize
                  + 4 * (c_mid + c_out)
                  # 8-bit: the accumulator scales, and a float output's extra bytes
                  + (4 * (c_mid + c_out) + out.numel() * (out.element_size() - itemsize) if quant is not None
                     else 0)),
    )



# ----------------------------------------------------------------------------------------------
# Reference


def conv3x3_conv1x1_nhwc_ref(y1, w_mid, b_mid, w_out, b_out, *, stride, padding, dilation, groups,
                             residual=None, shortcut=None, shortcut_weight=None, shortcut_stride=1, upcast=False):
    """Plain-PyTorch reference of the fused pair: two ``conv2d_nhwc_ref`` calls, the mid rounded to
    ``y1.dtype`` in between (as the kernel and the unfused pair round it).

        mid = relu(conv3x3(y1, w_mid, b_mid; stride, padding, dilation, groups))       -> y1.dtype
        out = relu(conv1x1(mid, w_out) [+ conv1x1_s(shortcut, shortcut_weight)] + b_out [+ residual])

    ``upcast=True``: each conv computes in fp32 and rounds once, the kernel's numerics.
    """
    mid = conv2d_nhwc_ref(y1, w_mid, b_mid, stride=stride, padding=padding, dilation=dilation, groups=groups,
                          relu=True, upcast=upcast)
    return conv2d_nhwc_ref(mid, w_out, b_out, residual=residual, relu=True, shortcut=shortcut,
                           shortcut_weight=shortcut_weight, shortcut_stride=shortcut_stride, upcast=upcast)


def conv3x3_conv1x1_nhwc_8bit_ref(y1, w_mid, b_mid, w_out, b_out, quant_mid: QuantEpilogue, quant: QuantEpilogue, *,
                                  stride, padding, dilation, groups, residual=None, shortcut=None,
                                  shortcut_weight=None, shortcut_stride=1):
    """Reference of the 8-bit fused pair: the two ``conv2d_nhwc_8bit_ref`` calls the unfused plan
    runs (the 3x3 requantized by ``quant_mid`` to y1's dtype, then the 1x1 with ``quant``).

        mid = q_mid(relu(conv3x3(y1, w_mid) * acc_scale_mid + b_mid))                 8-bit
        acc = conv1x1(mid, w_out) [+ conv1x1_s(shortcut, shortcut_weight)]             exact
        out = q(relu(acc * acc_scale + b_out [+ residual_scale * residual]))
    """
    mid = conv2d_nhwc_8bit_ref(y1, w_mid, b_mid, quant_mid, stride=stride, padding=padding, dilation=dilation,
                               groups=groups, relu=True)
    return conv2d_nhwc_8bit_ref(mid, w_out, b_out, quant, residual=residual, relu=True, shortcut=shortcut,
                                shortcut_weight=shortcut_weight, shortcut_stride=shortcut_stride)
