"""Implicit-GEMM convolution over NHWC activations with a fused epilogue.

    out = relu?(conv(x, W) [+ conv1x1_stride_s(shortcut, W_sc)] + bias [+ residual])

Activations are PyTorch tensors shaped [N, C, H, W] in ``torch.channels_last`` memory (NHWC bytes).
The convolution is one GEMM per output tile: M = N*OH*OW output pixels, N = C_out, and
K = KH*KW*C_in/groups, ordered (kh, kw, c_in) so that one K block of a 3x3 tap is a contiguous run
of channels of one input pixel.

Weights are packed once, at plan time (``pack_conv_weight``), into a [K, C_out] matrix in the
compute dtype (row k = (kh*KW + kw)*C_in_per_group + c, column = output channel). Two layouts fold
into that one matrix:

* groups: a tensor-core tile needs >= 16 output and input channels, but ResNeXt groups have 4..64.
  ``tile_groups`` adjacent conv groups are packed as one block-diagonal group (zeros off the
  diagonal blocks), so a "packed group" has >= 16 channels in and out. That costs tile_groups x
  the MACs of the grouped conv and reads each input channel once per packed group; groups=1 is the
  case tile_groups=1, one packed group.
* concat-K projection shortcut (HAS_SHORTCUT_GEMM): the rows of the 1x1 shortcut weight follow the
  main K rows, and the K loop walks the main input, then the shortcut input at (oh*s, ow*s). The
  downsampling branch of a residual block is then part of the same GEMM, never a tensor in memory;
  the caller pre-sums both biases. Behind a 1x1 main GEMM (the bottleneck's last conv) both
  operands run in one K loop whose row base is chosen per step (``dot_concat_k``: one pipeline
  fill); behind a 3x3 (BasicBlock) the shortcut steps follow the taps in the tap-major loop, the
  same way (a second loop only for a shortcut K that BLOCK_K does not divide).

K loop modes (constexpr, chosen from the shape):

* 1x1, stride 1, no padding: a plain GEMM over the [N*H*W, C_in] matrix (no spatial index math).
  TMA (sm_90, chosen by ``conv_config`` for the compute-bound ones): its operand tiles come from
  host-side tensor descriptors, one UTMALDG per tile, instead of per-thread cp.async.
* channels per packed group a multiple of 16 (every ResNet conv but the stem): tap-major; one
  BLOCK_K step loads BLOCK_K contiguous channels of one tap, 16-byte aligned vector loads.
  TMA (sm_90, stride 1, groups 1, chosen by ``conv_config`` where a box of pixels tiles the output
  with few idle rows, ``spatial_tile``): an M tile is TILE_IMGS x TILE_H x TILE_W output pixels
  instead of BLOCK_M consecutive ones, and a K step of tap (kh, kw) loads the 4-D box of x at
  (img0, oh0 + kh*d - p, ow0 + kw*d - p, c0) with one UTMALDG, its out-of-bounds zero fill being
  the padding (no per-element masks); rows past the output's edge or the batch are not stored.
* few channels, padding 0, stride/row alignment allowing it (ROW_K; the stem over its padded
  4-channel input, see ``pad_stem_weight`` and ``stem_input_padding``): one K step is one kernel row
  kh, the KW*C_in contiguous elements of input row ih0 + kh starting at pixel iw0 (7 taps x 4
  channels = 28 for the stem), padded to a power of two BLOCK_K (32) with zero weight rows: the
  extra elements read the next pixel(s) of the same row (the launch checks they exist; else they
  are masked) and are multiplied by zero. Every load is a 16-byte-aligned run (the wrapper passes
  the alignment the geometry guarantees as ROW_ALIGN), unmasked along K; the rows past M are
  clamped to the last pixel instead of masked. The stem becomes KH = 7 steps over K = 224.
* otherwise (FLAT_K; e.g. a 3-channel conv with padding): K is decoded per element into
  (kh, kw, c) and the tail past K is masked, i.e. scalar gathers: correct for any geometry, slow.

Runtime ints are the batch and spatial sizes; channel counts, kernel size, stride, padding,
dilation and the epilogue switches are constexpr. Pixel indices are int32 (N*H*W < 2**31 is
checked), element offsets int64 (except within one image in FLAT_K mode: H*W*C_in < 2**31, checked).

8-bit (QUANTIZED, ``QuantEpilogue``; ``fastres.quantize`` builds the plans): int8 x and W accumulate
in int32 (IMMA on sm_80, wgmma .s8 on sm_90), fp8 e4m3 in fp32 (wgmma .e4m3, sm_89+), and the
epilogue requantizes: ``acc * acc_scale[c] + bias [+ s_r * residual] -> relu -> round(. / s_out)``
to int8 / e4m3 (``store_requantized_epilogue``; reference ``conv2d_nhwc_8bit_ref``). An 8-bit K
tile has >= 32 elements (tl.dot's minimum), so a packed group of fewer than 32 channels runs
FLAT_K; no split-K. The 8-bit packed weight is K-major (``PackedConvWeight``), the kernel reads
its strides (W_K_STRIDE, W_N_STRIDE).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from . import _autotune
from ._common import (FLOAT_DTYPES, INT32_MAX, MIN_TILE_CHANNELS, check_activation, check_bias, check_packed_input,
                      check_residual, check_shortcut, conv_geometry, conv_output_hw, dot_concat_k, dot_contiguous_k,
                      is_channels_last, largest_pow2_divisor, pow2_at_least, store_residual_block_epilogue,
                      tile_groups)
from ._common import channel_mean_slots, store_channel_means
from ._common import EIGHT_BIT_DTYPES, min_dot_k, store_requantized_epilogue   # 8-bit variant (fastres.quantize)
from ._launch import KernelCall, is_recording
from ._target import DEFAULT_TARGET, Target, table_arch, target_for


@triton.jit
def _conv2d_nhwc_kernel(
    x_ptr, w_ptr, out_ptr, bias_ptr, residual_ptr, shortcut_ptr, out2_ptr, scale2_ptr, shift2_ptr,
    ws_ptr, counter_ptr, mean_ptr,
    x_desc, w_desc,
    acc_scale_ptr, RES_SCALE, OUT_INV_SCALE, offset_ptr,
    BATCH, H, W, OH, OW, SC_H, SC_W, RES_H, RES_W, MEAN_SLOTS,
    C_IN: tl.constexpr, C_OUT: tl.constexpr,
    CIN_PER_GROUP: tl.constexpr, COUT_PER_GROUP: tl.constexpr,   # per *packed* group
    KH: tl.constexpr, KW: tl.constexpr,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    C_SC: tl.constexpr, SC_STRIDE: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, APPLY_RELU: tl.constexpr,
    HAS_SHORTCUT_GEMM: tl.constexpr, FLAT_K: tl.constexpr, ROW_K: tl.constexpr,
    ROW_ALIGN: tl.constexpr, ROW_K_MASK: tl.constexpr, CONCAT_ALIGN: tl.constexpr, SPLIT_K: tl.constexpr,
    RES_C: tl.constexpr, RES_C_OFFSET: tl.constexpr, RES_STRIDE: tl.constexpr,
    HAS_OUT2: tl.constexpr, OUT2_RELU: tl.constexpr, HAS_MEAN: tl.constexpr,
    INTERPRETER_BF16: tl.constexpr,
    QUANTIZED: tl.constexpr, INTERPRETER_FP8: tl.constexpr, W_K_STRIDE: tl.constexpr, W_N_STRIDE: tl.constexpr,
    HAS_INPUT_OFFSET: tl.constexpr, OFFSET_PAD_H: tl.constexpr, OFFSET_PAD_W: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    TMA: tl.constexpr, TILE_IMGS: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
):
    """out = relu?(conv(x, W) [+ shortcut @ W_sc] + bias [+ residual]), fp32 accumulation;
    [out2 = relu?(out * scale2 + shift2)] (``store_residual_block_epilogue``);
    [mean[img, n] = mean over the image's OH*OW pixels of out[., n]] (``store_channel_means``, the
    squeeze of an SE block; ws_ptr/counter_ptr are then its partial sums and arrival counts, not
    split-K's, which it excludes). The residual is
    read at pixel (img, oh*RES_STRIDE, ow*RES_STRIDE) of a RES_H x RES_W map, into channels
    [RES_C_OFFSET, RES_C_OFFSET + RES_C) (a same-shape residual: stride 1, all channels).

    INTERPRETER_BF16 works around two bf16 bugs of the Triton interpreter (triton 3.8), and the
    wrapper sets it only for bf16 there: ``tl.dot`` on bf16 tiles returns garbage (so both tiles
    are cast to fp32 first) and the fp32 -> bf16 cast truncates (so the store is rounded to
    nearest-even by hand, as the GPU's cvt.rn does). bf16 loads, the epilogue and the bf16 store
    still run, so the interpreter checks those paths.

    QUANTIZED (8-bit x and W: int8 with an int32 accumulator, or fp8 e4m3 with fp32): the
    requantizing epilogue ``store_requantized_epilogue`` (acc * acc_scale[c] + bias [+ RES_SCALE *
    residual] -> relu -> * OUT_INV_SCALE -> int8 / e4m3, or a float out); no split-K, no out2.

    W_K_STRIDE / W_N_STRIDE: element strides of the packed weight's K rows and output columns
    (``PackedConvWeight``): (C_OUT, 1) N-major for 16-bit and fp32, (1, K) K-major for 8-bit.
    HAS_INPUT_OFFSET (a padding-0 conv over an input bordered by OFFSET_PAD_H/W zero pixels, no
    split-K): acc += offset[class of (oh, ow)] in fp32 before the epilogue, the correction that
    makes acc the convolution of (x - offset) over the image with a zero border
    (``input_offset_table``); the class is how many kernel rows/columns of the window fall in the
    top, bottom, left and right border.
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1) if SPLIT_K > 1 else 0     # split-K: this program's share of the K steps
    M = BATCH * OH * OW
    # SPATIAL_TILE (TMA behind a tap-major conv): an M tile is a box of TILE_IMGS x TILE_H x TILE_W
    # output pixels, so each K step's A tile is one 4-D descriptor load; else BLOCK_M consecutive pixels.
    SPATIAL_TILE: tl.constexpr = TILE_IMGS * TILE_H * TILE_W > 0
    if SPATIAL_TILE:
        tl.static_assert(TILE_IMGS * TILE_H * TILE_W == BLOCK_M)
        tiles_w = tl.cdiv(OW, TILE_W)
        tiles_hw = tl.cdiv(OH, TILE_H) * tiles_w
        num_pid_m = tl.cdiv(BATCH, TILE_IMGS) * tiles_hw
    else:
        num_pid_m = tl.cdiv(M, BLOCK_M)
    N_TILES_PER_GROUP: tl.constexpr = (COUT_PER_GROUP + BLOCK_N - 1) // BLOCK_N
    num_pid_n = (C_OUT // COUT_PER_GROUP) * N_TILES_PER_GROUP
    # Swizzle: GROUP_M consecutive programs share a weight tile column while they walk M, so the
    # activation rows they read stay in L2.
    num_pid_in_swizzle = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_swizzle) * GROUP_M
    swizzle_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_swizzle) % swizzle_m
    pid_n = (pid % num_pid_in_swizzle) // swizzle_m

    group = pid_n // N_TILES_PER_GROUP
    offs_n_in_group = (pid_n % N_TILES_PER_GROUP) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_n = group * COUT_PER_GROUP + offs_n_in_group
    n_mask = offs_n_in_group < COUT_PER_GROUP
    offs_k = tl.arange(0, BLOCK_K)
    if SPATIAL_TILE:
        # row r of the tile is pixel (img0 + r // (TILE_H*TILE_W), oh0 + r // TILE_W % TILE_H, ow0 + r % TILE_W);
        # rows past the batch or the output's edge are computed on zero-filled input and not stored
        img0 = pid_m // tiles_hw * TILE_IMGS
        oh0 = pid_m % tiles_hw // tiles_w * TILE_H
        ow0 = pid_m % tiles_w * TILE_W
        offs_r = tl.arange(0, BLOCK_M)
        img = img0 + offs_r // (TILE_H * TILE_W)
        oh = oh0 + offs_r // TILE_W % TILE_H
        ow = ow0 + offs_r % TILE_W
        m_mask = (img < BATCH) & (oh < OH) & (ow < OW)
        offs_m = (img * OH + oh) * OW + ow
    else:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        ow = offs_m % OW
        oh = (offs_m // OW) % OH
        img = offs_m // (OW * OH)
    # Loop invariants are hoisted and pointers advanced by scalars: the K loop does little more
    # than two loads and a dot (also what keeps the interpreter fast).
    w_ptrs = w_ptr + offs_k[:, None] * W_K_STRIDE + offs_n[None, :] * W_N_STRIDE
    W_STEP: tl.constexpr = BLOCK_K * W_K_STRIDE       # one K step down the packed weight
    EVEN_N: tl.constexpr = COUT_PER_GROUP % BLOCK_N == 0

    ACC_DTYPE: tl.constexpr = tl.int32 if x_ptr.dtype.element_ty == tl.int8 else tl.float32
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    PLAIN_GEMM: tl.constexpr = KH == 1 and KW == 1 and STRIDE_H == 1 and STRIDE_W == 1 and PAD_H == 0 and PAD_W == 0
    # A 1x1 main GEMM and its projection shortcut in one K loop when BLOCK_K divides both K's.
    CONCAT_ONE_LOOP: tl.constexpr = (HAS_SHORTCUT_GEMM and PLAIN_GEMM and CIN_PER_GROUP % BLOCK_K == 0
                                     and C_SC % BLOCK_K == 0)
    # Behind a tap-major conv (BasicBlock's second 3x3) the shortcut steps join the tap loop too.
    CONCAT_TAP_LOOP: tl.constexpr = (HAS_SHORTCUT_GEMM and not PLAIN_GEMM and not ROW_K and not FLAT_K
                                     and C_SC % BLOCK_K == 0)
    if CONCAT_ONE_LOOP:
        # groups == 1 with a shortcut (checked at pack time); the shortcut rows follow the main rows of W.
        sc_pixel = (img * SC_H + oh * SC_STRIDE) * SC_W + ow * SC_STRIDE
        acc = dot_concat_k(acc, x_ptr + offs_m.to(tl.int64) * C_IN, shortcut_ptr + sc_pixel.to(tl.int64) * C_SC,
                           w_ptrs, offs_k, m_mask, n_mask, C_IN, C_SC, W_K_STRIDE, CONCAT_ALIGN, EVEN_N, INTERPRETER_BF16,
                           BLOCK_K)
    elif TMA:
        # Operand tiles through TMA descriptors (sm_90: one UTMALDG per tile, no address math or
        # masks per thread); w_desc is the packed [K, C_OUT] weight; groups == 1, no split, BLOCK_K
        # divides C_IN (checked at launch). Plain GEMM: x_desc is x as [N*H*W, C_IN] (rows past M
        # come zero-filled). Tap-major (SPATIAL_TILE, stride 1): x_desc is x as [N, H, W, C_IN] and
        # step kb reads the box [TILE_IMGS, TILE_H, TILE_W, BLOCK_K] at (img0, oh0 + kh*DIL_H - PAD_H,
        # ow0 + kw*DIL_W - PAD_W, c0) (tap and c0 as in the tap-major loop below): the descriptor's
        # out-of-bounds zero fill, also at negative offsets, is the padding.
        tl.static_assert(PLAIN_GEMM or (SPATIAL_TILE and STRIDE_H == 1 and STRIDE_W == 1 and SPLIT_K == 1))
        CHUNKS: tl.constexpr = CIN_PER_GROUP // BLOCK_K
        n0 = (pid_n % N_TILES_PER_GROUP) * BLOCK_N
        for kb in range(0, KH * KW * CHUNKS):
            if SPATIAL_TILE:
                a = x_desc.load([img0, oh0 + (kb // CHUNKS // KW) * DIL_H - PAD_H,
                                 ow0 + (kb // CHUNKS % KW) * DIL_W - PAD_W, (kb % CHUNKS) * BLOCK_K])
                a = a.reshape(BLOCK_M, BLOCK_K)
            else:
                a = x_desc.load([pid_m * BLOCK_M, kb * BLOCK_K])
            b = w_desc.load([kb * BLOCK_K, n0])
            if INTERPRETER_BF16:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision="ieee")
    elif PLAIN_GEMM:
        # Plain GEMM: output pixel m reads input pixel m (split-K: channels [k0, k0 + C/SPLIT_K)).
        K_SPLIT: tl.constexpr = CIN_PER_GROUP // SPLIT_K
        a_ptrs = (x_ptr + (offs_m.to(tl.int64) * C_IN + group * CIN_PER_GROUP + pid_k * K_SPLIT)[:, None]
                  + offs_k[None, :])
        acc = dot_contiguous_k(acc, a_ptrs, w_ptrs + pid_k * K_SPLIT * W_K_STRIDE, offs_k, m_mask, n_mask, K_SPLIT,
                               W_K_STRIDE, EVEN_N, INTERPRETER_BF16, BLOCK_K)
    elif ROW_K:
        # Step kh reads x[img, oh*S + kh, ow*S + j // C_IN, j % C_IN] for j < BLOCK_K: one contiguous
        # run per output pixel (packed weight rows kh*BLOCK_K + j, zero for j >= KW*C_IN).
        offs_m_ld = tl.minimum(offs_m, M - 1)       # tail rows re-read the last pixel: no load mask
        ow_ld = offs_m_ld % OW
        oh_ld = (offs_m_ld // OW) % OH
        img_ld = offs_m_ld // (OW * OH)
        row0 = ((img_ld * H + oh_ld * STRIDE_H) * W + ow_ld * STRIDE_W).to(tl.int64) * C_IN
        x_row_pitch = W * C_IN
        for kh in range(0, KH):
            a_offs = tl.multiple_of(row0 + kh * x_row_pitch, ROW_ALIGN)
            a_ptrs = x_ptr + a_offs[:, None] + offs_k[None, :]
            if ROW_K_MASK:
                a = tl.load(a_ptrs, mask=(offs_k < KW * C_IN)[None, :], other=0.0)
            else:
                a = tl.load(a_ptrs)
            b = tl.load(w_ptrs) if EVEN_N else tl.load(w_ptrs, mask=n_mask[None, :], other=0.0)
            if INTERPRETER_BF16:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision="ieee")
            w_ptrs += W_STEP
    elif FLAT_K:
        K_MAIN: tl.constexpr = KH * KW * CIN_PER_GROUP
        ih0 = oh * STRIDE_H - PAD_H
        iw0 = ow * STRIDE_W - PAD_W
        x_img = x_ptr + (img * H).to(tl.int64) * W * C_IN + group * CIN_PER_GROUP
        for kb in range(0, tl.cdiv(K_MAIN, BLOCK_K)):
            k = kb * BLOCK_K + offs_k
            c = k % CIN_PER_GROUP
            tap = k // CIN_PER_GROUP
            ih = ih0[:, None] + (tap // KW)[None, :] * DIL_H
            iw = iw0[:, None] + (tap % KW)[None, :] * DIL_W
            k_ok = k < K_MAIN
            a_ok = m_mask[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a = tl.load(x_img[:, None] + (ih * W + iw) * C_IN + c[None, :], mask=a_ok, other=0.0)
            b = tl.load(w_ptrs, mask=k_ok[:, None] & n_mask[None, :], other=0.0)
            if INTERPRETER_BF16:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision="ieee")
            w_ptrs += W_STEP
    else:
        # Tap-major: step kb covers channels [c0, c0 + BLOCK_K) of tap (kh, kw) = divmod(kb // CHUNKS,
        # KW), c0 = (kb % CHUNKS) * BLOCK_K; BLOCK_K divides CIN_PER_GROUP, so packed row
        # kb*BLOCK_K + j is exactly (tap, c0 + j). Row r of the tap reads x_rows[r] +
        # (kh*DIL_H*W + kw*DIL_W)*C_IN + c0 + j. (kh, kw, c0) are written inline, not assigned: the
        # interpreter turns every assigned value into a tensor, which costs more than the dot here.
        CHUNKS: tl.constexpr = CIN_PER_GROUP // BLOCK_K
        ih0 = oh * STRIDE_H - PAD_H
        iw0 = ow * STRIDE_W - PAD_W
        x_rows = x_ptr + ((img * H + ih0) * W + iw0).to(tl.int64) * C_IN + group * CIN_PER_GROUP
        x_row_pitch = W * C_IN
        STEPS_PER_SPLIT: tl.constexpr = KH * KW * CHUNKS // SPLIT_K
        # CONCAT_TAP_LOOP (groups 1, no split): C_SC / BLOCK_K more steps read the shortcut input at
        # (oh*s, ow*s), whose weight rows follow the main rows; the row base is chosen per step, so
        # both stream through one pipeline (as dot_concat_k does behind a 1x1).
        MAIN_STEPS: tl.constexpr = KH * KW * CHUNKS
        SC_STEPS: tl.constexpr = C_SC // BLOCK_K if CONCAT_TAP_LOOP else 0
        if CONCAT_TAP_LOOP:
            sc_rows = shortcut_ptr + ((img * SC_H + oh * SC_STRIDE) * SC_W + ow * SC_STRIDE).to(tl.int64) * C_SC
        w_ptrs += pid_k * STEPS_PER_SPLIT * W_STEP
        for kb in range(pid_k * STEPS_PER_SPLIT, (pid_k + 1) * STEPS_PER_SPLIT + SC_STEPS):
            if PAD_H == 0 and PAD_W == 0:
                row_ok = m_mask       # without padding every tap of a valid output pixel is inside
            else:
                ih = ih0 + (kb // CHUNKS // KW) * DIL_H
                iw = iw0 + (kb // CHUNKS % KW) * DIL_W
                row_ok = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a_ptrs = x_rows + ((kb // CHUNKS // KW) * DIL_H * x_row_pitch
                               + ((kb // CHUNKS % KW) * DIL_W * C_IN + (kb % CHUNKS) * BLOCK_K))
            if CONCAT_TAP_LOOP:
                a_ptrs = tl.where(kb < MAIN_STEPS, a_ptrs, sc_rows + (kb - MAIN_STEPS) * BLOCK_K)
                row_ok = tl.where(kb < MAIN_STEPS, row_ok, m_mask)
                if CONCAT_ALIGN > 1:
                    a_ptrs = tl.multiple_of(a_ptrs, CONCAT_ALIGN)
            a = tl.load(a_ptrs[:, None] + offs_k[None, :], mask=row_ok[:, None], other=0.0)
            b = tl.load(w_ptrs) if EVEN_N else tl.load(w_ptrs, mask=n_mask[None, :], other=0.0)
            if INTERPRETER_BF16:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision="ieee")
            w_ptrs += W_STEP

    if HAS_SHORTCUT_GEMM and not CONCAT_ONE_LOOP and not CONCAT_TAP_LOOP:
        # groups == 1 here (checked at pack time) and w_ptrs now points at the shortcut rows, which
        # follow the KH*KW*C_IN main rows; the shortcut input is read at (oh*s, ow*s).
        sc_pixel = (img * SC_H + oh * SC_STRIDE) * SC_W + ow * SC_STRIDE
        w_ptrs = w_ptr + (KH * KW * CIN_PER_GROUP + offs_k)[:, None] * W_K_STRIDE + offs_n[None, :] * W_N_STRIDE
        a_ptrs = shortcut_ptr + (sc_pixel.to(tl.int64) * C_SC)[:, None] + offs_k[None, :]
        acc = dot_contiguous_k(acc, a_ptrs, w_ptrs, offs_k, m_mask, n_mask, C_SC, W_K_STRIDE, EVEN_N,
                               INTERPRETER_BF16, BLOCK_K)

    if HAS_INPUT_OFFSET:
        # the window of (oh, ow) starts at (oh*S, ow*S) of the bordered input; the image is
        # rows [PAD, H - PAD) and columns [PAD, W - PAD) of it
        top = tl.maximum(OFFSET_PAD_H - oh * STRIDE_H, 0)
        bottom = tl.maximum(oh * STRIDE_H + KH - (H - OFFSET_PAD_H), 0)
        left = tl.maximum(OFFSET_PAD_W - ow * STRIDE_W, 0)
        right = tl.maximum(ow * STRIDE_W + KW - (W - OFFSET_PAD_W), 0)
        cls = ((top * (OFFSET_PAD_H + 1) + bottom) * (OFFSET_PAD_W + 1) + left) * (OFFSET_PAD_W + 1) + right
        corr = tl.load(offset_ptr + (cls * C_OUT)[:, None] + offs_n[None, :],
                       mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        acc = acc.to(tl.float32) + corr

    if RES_STRIDE == 1 and RES_C == C_OUT:
        res_rows = offs_m
    else:
        res_rows = (img * RES_H + oh * RES_STRIDE) * RES_W + ow * RES_STRIDE
    if SPLIT_K > 1:
        tl.static_assert(not HAS_MEAN, "the channel-mean epilogue runs without split-K")
        # Each split adds its fp32 partial into the zeroed workspace; the last of the tile's SPLIT_K
        # programs to arrive (counted by an acq_rel atomic after a CTA barrier, so every thread's adds
        # are ordered before it) reads the sum back from L2 and runs the epilogue.
        ws_offs = offs_m.to(tl.int64)[:, None] * C_OUT + offs_n[None, :]
        tile_mask = m_mask[:, None] & n_mask[None, :]
        tl.atomic_add(ws_ptr + ws_offs, acc, mask=tile_mask, sem="relaxed")
        tl.debug_barrier()
        arrived = tl.atomic_add(counter_ptr + pid, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            acc = tl.load(ws_ptr + ws_offs, mask=tile_mask, other=0.0, cache_modifier=".cg")
            store_residual_block_epilogue(acc, out_ptr, bias_ptr, residual_ptr, res_rows, out2_ptr, scale2_ptr, shift2_ptr,
                                          offs_m, offs_n, m_mask, n_mask, C_OUT, RES_C, RES_C_OFFSET, HAS_BIAS, HAS_RESIDUAL,
                                          APPLY_RELU, HAS_OUT2, OUT2_RELU, INTERPRETER_BF16)
    elif QUANTIZED:
        store_requantized_epilogue(acc, out_ptr, acc_scale_ptr, bias_ptr, residual_ptr, res_rows, RES_SCALE,
                                   OUT_INV_SCALE, offs_m, offs_n, m_mask, n_mask, C_OUT, RES_C, RES_C_OFFSET, HAS_BIAS,
                                   HAS_RESIDUAL, APPLY_RELU, INTERPRETER_FP8)
    else:
        stored = store_residual_block_epilogue(acc, out_ptr, bias_ptr, residual_ptr, res_rows, out2_ptr, scale2_ptr,
                                               shift2_ptr, offs_m, offs_n, m_mask, n_mask, C_OUT, RES_C, RES_C_OFFSET,
                                               HAS_BIAS, HAS_RESIDUAL, APPLY_RELU, HAS_OUT2, OUT2_RELU, INTERPRETER_BF16)
        if HAS_MEAN:
            store_channel_means(stored, mean_ptr, ws_ptr, counter_ptr, offs_m, offs_n, m_mask, n_mask, pid_m, pid_n,
                                num_pid_n, M, OH * OW, MEAN_SLOTS, C_OUT, INTERPRETER_BF16, BLOCK_M, BLOCK_N)


# ----------------------------------------------------------------------------------------------
# Packed weights


@dataclass
class PackedConvWeight:
    """A conv weight packed for ``_conv2d_nhwc_kernel``: [K_main (+ C_sc), C_out] in the compute dtype.

    K_main = KH*KW*group_in_channels, rows ordered (kh, kw, c) within a packed group; see the
    module docstring for packed groups (``tile_groups`` conv groups, block-diagonal).
    16-bit and fp32 weights are N-major (contiguous); 8-bit ones K-major (the [K, C_out] transpose
    view of a contiguous [C_out, K]), because Hopper's 8-bit wgmma reads its B tile
    K-contiguous from shared memory: from an N-major weight triton loads B through registers and
    transposes it into shared memory each step, outside the cp.async pipeline (and sm_80's IMMA
    takes 8-byte instead of 16-byte cp.async rows). The kernel reads the strides.
    """
    weight: torch.Tensor
    out_channels: int
    in_channels: int
    kernel_size: tuple
    groups: int
    tile_groups: int
    shortcut_in_channels: int = 0
    row_k: int = 0          # ROW_K packing: BLOCK_K rows per kernel row (KW*C_in real, zeros after), else 0
    # TMA descriptors of ``weight`` by block shape, each with the (device, pointer, shape, strides, dtype)
    # it was built for: a descriptor encodes the address, so it is reused only while all of them hold
    _descriptors: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def tma_descriptor(self, block_shape: tuple) -> TensorDescriptor:
        """The host-side TensorDescriptor of ``weight`` with ``block_shape`` tiles, built once while
        the weight tensor stays the same (kernels launched with it read the weight through it)."""
        w = self.weight
        guard = (w.device, w.data_ptr(), tuple(w.shape), w.stride(), w.dtype)
        cached = self._descriptors.get(block_shape)
        if cached is None or cached[0] != guard:
            cached = self._descriptors[block_shape] = (guard, TensorDescriptor.from_tensor(w, list(block_shape)))
        return cached[1]

    @property
    def group_in_channels(self) -> int:      # input channels of one packed group
        return self.in_channels // self.groups * self.tile_groups

    @property
    def group_out_channels(self) -> int:     # output channels of one packed group
        return self.out_channels // self.groups * self.tile_groups

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.weight.device


def _packed_layout(packed: torch.Tensor) -> torch.Tensor:
    """The packed [K, C_out] weight in the layout the kernel reads for its dtype (``PackedConvWeight``):
    8-bit as the transposed view of a contiguous [C_out, K] (strides (1, K)), else contiguous."""
    return packed.t().contiguous().t() if packed.dtype in EIGHT_BIT_DTYPES else packed.contiguous()


def row_k_block(kernel_w: int, in_channels: int) -> int:
    """BLOCK_K of a ROW_K conv: one kernel row's KW*C_in elements rounded up to a power of two (>= 16)."""
    return max(MIN_TILE_CHANNELS, pow2_at_least(kernel_w * in_channels))


def row_k_fits(kernel_w: int, in_channels: int, groups: int) -> bool:
    """Whether a conv can be packed for ROW_K (it must then run with padding 0 and dilation 1):
    groups=1, fewer than 16 input channels (else tap-major is as good) and a kernel row of at
    most 64 elements."""
    return groups == 1 and in_channels % MIN_TILE_CHANNELS != 0 and kernel_w * in_channels <= 64


STEM_CHANNELS = 4     # the stem's 3 input channels padded to 4: a pixel is 8 bytes (fp16), 7 taps 56


def pad_stem_weight(weight, channels: int = STEM_CHANNELS):
    """[C_out, C_in, KH, KW] -> [C_out, channels, KH, KW] with zero weights for the added input channels.

    With the input zero-padded to the same channels (and its spatial padding written into a zero
    border, ``stem_input_padding``) the convolution is exact: the stem as a padding-0 conv over
    ``[N, 4, H+6, W+6(+1)]``, which packs for ROW_K (``pack_conv_weight(..., row_k=True)``).
    """
    c_out, c_in, kh, kw = weight.shape
    if c_in > channels:
        raise ValueError(f"pad_stem_weight: weight has {c_in} input channels, more than {channels}")
    return torch.cat([weight, weight.new_zeros(c_out, channels - c_in, kh, kw)], dim=1)


def pads_stem_input(weight, *, groups: int = 1, dilation: int = 1) -> bool:
    """Whether a conv with this PyTorch-layout weight should run as the padded-input ROW_K stem:
    at most ``STEM_CHANNELS`` input channels, groups 1, dilation 1 and a kernel row of <= 64
    elements over the padded channels (the ResNet stem, 7x7 over 3 channels)."""
    c_in, kw = weight.shape[1], weight.shape[3]
    return c_in <= STEM_CHANNELS and dilation == 1 and row_k_fits(kw, STEM_CHANNELS, groups)


def pack_stem_weight(weight) -> "PackedConvWeight":
    """The stem weight [C_out, C_in<=4, KH, KW] padded to 4 input channels and packed for ROW_K."""
    return pack_conv_weight(pad_stem_weight(weight), row_k=True)


def stem_input_padding(height: int, width: int, padding: int = 3, stride: int = 2) -> tuple:
    """(top, bottom, left, right) zero border that turns a conv with ``padding`` into one with padding 0.

    Top, bottom and left are ``padding``; the right border gets one more column when that makes the
    padded width even with stride 2, so that (i) every run the ROW_K loop reads starts 16-byte aligned
    (an fp16 row of an even number of 4-channel pixels is a multiple of 16 bytes, and stride-2
    columns are 16 bytes apart), and (ii) the 8-pixel run read for the last output column stays
    inside its row. The extra column is zero and never weighted (the output size does not change).
    """
    right = padding + ((width + 2 * padding) % 2 if stride % 2 == 0 else 0)
    return (padding, padding, padding, right)


def pack_conv_weight(weight, *, groups=1, shortcut_weight=None, row_k=False) -> PackedConvWeight:
    """Pack a PyTorch conv weight [C_out, C_in/groups, KH, KW] (and optionally a 1x1 projection
    shortcut weight [C_out, C_sc, 1, 1], groups=1 only) for ``conv2d_nhwc_packed``.

    ``row_k=True`` packs for the ROW_K loop (see the module docstring; ``row_k_fits`` says when it
    can): rows kh*BLOCK_K + kw*C_in + c, zero rows up to BLOCK_K = ``row_k_block(KW, C_in)``; the
    conv must then run with padding 0 and dilation 1 (pad the input instead: ``stem_input_padding``).
    Keeps ``weight.dtype`` (cast to the compute dtype first) and device (8-bit: K-major, see
    ``PackedConvWeight``); works on meta tensors.
    """
    weight = weight.detach()
    shortcut_weight = shortcut_weight.detach() if shortcut_weight is not None else None
    if weight.dim() != 4:
        raise ValueError(f"conv weight must be 4-D [C_out, C_in/groups, KH, KW], got shape {tuple(weight.shape)}")
    c_out, cin_g, kh, kw = weight.shape
    if groups < 1 or c_out % groups != 0:
        raise ValueError(f"groups={groups} must divide the {c_out} output channels of the weight")
    cout_g = c_out // groups
    if row_k:
        if not row_k_fits(kw, cin_g, groups) or shortcut_weight is not None:
            raise ValueError(f"row_k packing needs groups=1, no shortcut, C_in % 16 != 0 and KW*C_in <= 64, got "
                             f"groups={groups}, C_in={cin_g}, KW={kw}, shortcut={shortcut_weight is not None}")
        block_k = row_k_block(kw, cin_g)
        rows = weight.permute(2, 3, 1, 0).reshape(kh, kw * cin_g, c_out)
        packed = torch.cat([rows, rows.new_zeros(kh, block_k - kw * cin_g, c_out)], dim=1)
        return PackedConvWeight(weight=_packed_layout(packed.reshape(kh * block_k, c_out)), out_channels=c_out,
                                in_channels=cin_g, kernel_size=(kh, kw), groups=1, tile_groups=1, row_k=block_k)
    t = tile_groups(groups, cin_g, cout_g)
    if t > 1:
        # Block-diagonal packed groups: [s, i, o, j, c] = weight[s, i, o, c] if i == j else 0.
        w = weight.reshape(groups // t, t, cout_g, cin_g, kh, kw)
        block_diagonal = weight.new_zeros(groups // t, t, cout_g, t, cin_g, kh, kw)
        for i in range(t):
            block_diagonal[:, i, :, i] = w[:, i]
        weight_g = block_diagonal.reshape(c_out, t * cin_g, kh, kw)
    else:
        weight_g = weight
    packed = weight_g.permute(2, 3, 1, 0).reshape(kh * kw * t * cin_g, c_out)
    c_sc = 0
    if shortcut_weight is not None:
        if groups != 1:
            raise ValueError(f"a fused projection shortcut needs groups=1, got groups={groups}")
        if shortcut_weight.dim() != 4 or shortcut_weight.shape[0] != c_out or shortcut_weight.shape[2:] != (1, 1):
            raise ValueError(f"shortcut weight must be [C_out={c_out}, C_sc, 1, 1], "
                             f"got shape {tuple(shortcut_weight.shape)}")
        if shortcut_weight.dtype != weight.dtype or shortcut_weight.device != weight.device:
            raise ValueError(f"shortcut weight ({shortcut_weight.dtype}, {shortcut_weight.device}) must match the "
                             f"conv weight ({weight.dtype}, {weight.device})")
        c_sc = shortcut_weight.shape[1]
        packed = torch.cat([packed, shortcut_weight[:, :, 0, 0].t()], dim=0)
    return PackedConvWeight(weight=_packed_layout(packed), out_channels=c_out, in_channels=cin_g * groups,
                            kernel_size=(kh, kw), groups=groups, tile_groups=t, shortcut_in_channels=c_sc)


@dataclass(frozen=True)
class QuantEpilogue:
    """The requantizing epilogue of an 8-bit convolution (``store_requantized_epilogue``): x and the
    packed weight int8 (int32 accumulation) or fp8 e4m3 (fp32 accumulation), the residual in x's
    dtype, and

        out = q(relu?(acc * acc_scale[c] + bias[c] [+ residual_scale * residual]) * out_inv_scale)

    q: int8 saturating round-half-even, or e4m3 round-to-nearest-even clamped to +-448, by
    ``out_dtype``; a float ``out_dtype`` (the last step before a float consumer) stores the fp32
    value itself (``out_inv_scale`` None). The scales are fp32 values (``acc_scale`` an fp32 [C_out]
    tensor on x's device, s_x * s_w[c]; the two scalars exactly representable in fp32).
    """
    acc_scale: torch.Tensor
    out_dtype: torch.dtype
    out_inv_scale: float | None = None
    residual_scale: float | None = None


# ----------------------------------------------------------------------------------------------
# Configurations


@dataclass(frozen=True)
class ConvConfig:
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int
    num_warps: int
    num_stages: int
    SPLIT_K: int = 1        # programs sharing one output tile's K steps (fp32 atomics + last-arriver epilogue)
    TMA: bool = False       # operand tiles through host-side TMA descriptors (sm_90)
    TILE: tuple = ()        # TMA behind a 3x3: the M tile as (images, rows, columns) of output pixels


# Untuned starting points (no GPU has measured them); every tile the rule can reach for the
# torchvision ResNets compiles for sm_80 and sm_90 without spills (see the AOT check).
CONV_CONFIGS = {
    # 16-bit operands, tensor cores (mma.sync on sm_80, wgmma on sm_90: 4-warp multiples, BLOCK_M >= 64)
    "tc_wide": ConvConfig(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    "tc_narrow": ConvConfig(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
    "tc_small_m": ConvConfig(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
    # fp32: the dot runs in IEEE fp32 on the FMA units (no tf32), so smaller tiles; 8 warps because
    # with 4, ptxas for sm_90 spills some of these kernels (sm_80 does not)
    "fp32": ConvConfig(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=2),
    # Triton interpreter (CPU tensors): fewer, larger programs run faster in numpy
    "interpreter": ConvConfig(BLOCK_M=256, BLOCK_N=256, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=1),
}
# num_stages per architecture where it differs from the table: triton's sm_80 pipeliner keeps
# num_stages - 1 tiles in shared memory, so 3 would be double buffering; tc_wide is bound to one
# CTA per SM by registers on sm_80 anyway, so a third buffer costs no occupancy.
CONV_STAGES = {("tc_wide", 80): 4}
# Resident CTAs per SM of each tile (registers and shared memory of the compiled conv kernels, as
# `fastres aot --loop-stats` reports them; tests/test_loop_stats.py checks the table against them).
CONV_CTAS_PER_SM = {
    ("tc_wide", 80): 1, ("tc_wide", 90): 2,
    ("tc_narrow", 80): 2, ("tc_narrow", 90): 2,
    ("tc_small_m", 80): 3, ("tc_small_m", 90): 3,
}
FULL_WAVE_EFFICIENCY = 0.9     # a tile whose last wave leaves more than ~10% of the GPU idle gives way
MAX_SPLIT_K = 16               # split-K: at most this many programs per output tile,
MIN_STEPS_PER_SPLIT = 4        # each with at least this many BLOCK_K steps (enough to fill the pipeline)
# TMA descriptors (sm_90) for the compute-bound 1x1 GEMMs: K of at least TMA_MIN_K channels and at
# least TMA_MIN_WAVES waves of the chosen tile on the target (the tile loads are then a steady
# stream worth moving off the threads); everything else, and sm_80, keeps cp.async.
TMA_MIN_K = 256
TMA_MIN_WAVES = 3
# A stride-1 tap-major conv (3x3) takes TMA with spatial M tiles (``spatial_tile``): its rows past the
# output's edge are zero-filled MMA work the linear tiling does not do, so the tile must keep at
# least this fraction of its rows on real pixels (power-of-two boxes cover 56x56 or 28x28 exactly,
# 14x14 and 7x7 only with several images per tile).
TMA_MIN_TILE_FILL = 0.95
_FLAT_K_BLOCK_K = 32           # FLAT_K: K in steps of 32


def wave_efficiency(programs: int, ctas_per_sm: int, sms: int) -> float:
    """How full the waves of a launch keep the GPU: programs / (whole waves x CTA slots), 1.0 when the
    last wave is full; less than one wave counts the SMs it occupies (programs / SMs, at most 1)."""
    slots = ctas_per_sm * sms
    if programs < slots:
        return min(programs, sms) / sms
    return programs / (-(-programs // slots) * slots)


def spatial_tile(block_m: int, batch: int, oh: int, ow: int) -> tuple:
    """(images, rows, columns), powers of two with product ``block_m``: the box of output pixels an M
    tile covers that wastes the fewest rows over a batch x OH x OW output (then: the fewest images,
    the squarest), and the fraction of its rows on real pixels."""
    def fill(tile):
        i, h, w = tile
        return batch * oh * ow / (triton.cdiv(batch, i) * i * triton.cdiv(oh, h) * h * triton.cdiv(ow, w) * w)
    log_m = block_m.bit_length() - 1
    tiles = [(1 << a, 1 << b, 1 << (log_m - a - b)) for a in range(log_m + 1) for b in range(log_m + 1 - a)]
    best = max(tiles, key=lambda t: (fill(t), -t[0], -abs(t[1] - t[2]), t[2]))
    return best, fill(best)


def spatial_tiles(tile: tuple, batch: int, oh: int, ow: int) -> int:
    """M tiles of a launch whose tiles are ``tile`` = (images, rows, columns) boxes of output pixels."""
    return triton.cdiv(batch, tile[0]) * triton.cdiv(oh, tile[1]) * triton.cdiv(ow, tile[2])


def _split_k(steps: int, target: Target, ctas: int, cfg: ConvConfig, m: int, cout: int) -> int:
    block_n = min(cfg.BLOCK_N, max(MIN_TILE_CHANNELS, pow2_at_least(cout)))
    tiles = triton.cdiv(m, cfg.BLOCK_M) * triton.cdiv(cout, block_n)
    splits = [s for s in range(2, MAX_SPLIT_K + 1) if steps % s == 0 and steps // s >= MIN_STEPS_PER_SPLIT]
    if not splits:
        return 1
    full = [s for s in splits if wave_efficiency(tiles * s, ctas, target.sms) >= FULL_WAVE_EFFICIENCY]
    return full[0] if full else max(splits, key=lambda s: (wave_efficiency(tiles * s, ctas, target.sms), -s))


@functools.lru_cache(maxsize=4096)
def conv_config(m: int, group_out_channels: int, num_groups: int, group_in_channels: int, flat_k: bool,
                dtype: torch.dtype, device_type: str, target: Target = DEFAULT_TARGET,
                split_k_steps: int = 0, plain_gemm: bool = False, spatial: tuple | None = None) -> ConvConfig:
    """Tile rule, keyed on what changes the answer: M = N*OH*OW, the packed group widths, the
    K mode, the operand width, whether the interpreter runs it and the target GPU (architecture,
    SM count).

    GPU, 16-bit: candidates in order of preference, tc_wide (when a packed group has >= 128 output
    channels), tc_narrow, tc_small_m; the first whose waves on the target (programs over
    CONV_CTAS_PER_SM x SMs) are at least FULL_WAVE_EFFICIENCY full wins, else the candidate with the
    fullest waves (the first on ties). When even that leaves the waves below FULL_WAVE_EFFICIENCY
    and the conv may split K (``split_k_steps``: its K steps, > 0 for a groups=1 tap-major or 1x1
    conv without shortcut), SPLIT_K = the smallest divisor of the steps (<= MAX_SPLIT_K, >=
    MIN_STEPS_PER_SPLIT steps each) that fills the waves, else the one filling them most, on the
    tc_small_m tile: small M and large K, e.g. layer4 at batch 1-8. num_stages per architecture (CONV_STAGES).
    TMA on sm_90 for a ``plain_gemm`` (1x1/s1, groups 1, no shortcut) with K >= TMA_MIN_K whose
    tile (not split) runs at least TMA_MIN_WAVES waves; the same for a tap-major conv given
    ``spatial`` = (batch, OH, OW, KH*KW) (stride 1, groups 1, no shortcut), whose M tiles are then the
    ``spatial_tile`` boxes, when those keep TMA_MIN_TILE_FILL of their rows on real pixels and
    their programs make the waves. fp32: the fp32 tile. Interpreter (device cpu): the interpreter
    tile.
    Then BLOCK_N is clamped to the packed group width (pow2, >= 16) and BLOCK_K to the largest
    power of two dividing the group's input channels (tap-major K steps must not straddle a tap),
    or 32 in FLAT_K mode (ROW_K sets its own BLOCK_K at launch).
    """
    arch = table_arch(target.sm)
    if device_type == "cpu":
        cfg = CONV_CONFIGS["interpreter"]
        cfg = dataclasses.replace(cfg, BLOCK_M=min(cfg.BLOCK_M, max(16, pow2_at_least(m))))
    elif dtype == torch.float32:
        cfg = CONV_CONFIGS["fp32"]
    else:
        names = (["tc_wide"] if group_out_channels >= 128 else []) + ["tc_narrow", "tc_small_m"]

        def efficiency(name):
            c = CONV_CONFIGS[name]
            block_n = min(c.BLOCK_N, max(MIN_TILE_CHANNELS, pow2_at_least(group_out_channels)))
            programs = triton.cdiv(m, c.BLOCK_M) * num_groups * triton.cdiv(group_out_channels, block_n)
            return wave_efficiency(programs, CONV_CTAS_PER_SM[name, arch], target.sms)

        full = [name for name in names if efficiency(name) >= FULL_WAVE_EFFICIENCY]
        name = full[0] if full else max(names, key=efficiency)
        cfg = dataclasses.replace(CONV_CONFIGS[name], num_stages=CONV_STAGES.get((name, arch),
                                                                                 CONV_CONFIGS[name].num_stages))
        if not full and split_k_steps:
            # split-K runs the small tile: more programs to spread, and the atomic epilogue of a
            # 128-row tile spills on sm_80
            small = dataclasses.replace(CONV_CONFIGS["tc_small_m"], num_stages=CONV_STAGES.get(
                ("tc_small_m", arch), CONV_CONFIGS["tc_small_m"].num_stages))
            split = _split_k(split_k_steps, target, CONV_CTAS_PER_SM["tc_small_m", arch], small, m, group_out_channels)
            if split > 1:
                cfg = dataclasses.replace(small, SPLIT_K=split)
        k_tma = group_in_channels * (spatial[3] if spatial else 1)
        if (arch == 90 and (plain_gemm or spatial) and num_groups == 1 and k_tma >= TMA_MIN_K and cfg.SPLIT_K == 1
                and group_in_channels % cfg.BLOCK_K == 0):
            block_n = min(cfg.BLOCK_N, max(MIN_TILE_CHANNELS, pow2_at_least(group_out_channels)))
            m_tiles, tile = triton.cdiv(m, cfg.BLOCK_M), ()
            if spatial:
                tile, fill = spatial_tile(cfg.BLOCK_M, *spatial[:3])
                m_tiles = spatial_tiles(tile, *spatial[:3]) if fill >= TMA_MIN_TILE_FILL else 0
            slots = CONV_CTAS_PER_SM[name, arch] * target.sms
            if m_tiles * triton.cdiv(group_out_channels, block_n) >= TMA_MIN_WAVES * slots:
                cfg = dataclasses.replace(cfg, TMA=True, TILE=tile)
    block_n = min(cfg.BLOCK_N, max(MIN_TILE_CHANNELS, pow2_at_least(group_out_channels)))
    if flat_k:
        block_k = min(cfg.BLOCK_K, _FLAT_K_BLOCK_K)
    else:
        block_k = min(cfg.BLOCK_K, largest_pow2_divisor(group_in_channels))
    return dataclasses.replace(cfg, BLOCK_N=block_n, BLOCK_K=block_k)


# ----------------------------------------------------------------------------------------------
# Launch wrappers


def conv2d_nhwc_packed(x, packed: PackedConvWeight, bias=None, *, stride=1, padding=0, dilation=1,
                       residual=None, relu=False, shortcut=None, shortcut_stride=1, out=None,
                       residual_stride=1, residual_channel_offset=0, affine2=None, affine2_relu=False,
                       out2=None, channel_mean=False, mean_out=None, quant: QuantEpilogue | None = None,
                       input_offset=None):
    """``relu?(conv(x, packed) [+ conv1x1_s(shortcut, packed shortcut)] + bias [+ residual])``.

    ``residual_stride`` / ``residual_channel_offset``: the residual is [N, C_r, H_r, W_r] read at
    (oh*s, ow*s) into output channels [offset, offset + C_r), zero elsewhere: the CIFAR "option A"
    shortcut ``F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, p, p))`` without the padded tensor.
    ``affine2`` = (scale, shift), fp32 [C_out]: also write ``out2 = relu?(y * scale + shift)``
    (``affine2_relu``) of the result y, and return ``(out, out2)``: the sum a pre-activation block
    passes on and the BN -> ReLU of it the next convolution reads.
    ``channel_mean``: also write ``mean = out.mean((2, 3), keepdim=True)`` [N, C_out, 1, 1] (into
    ``mean_out`` if given; the mean of the stored, rounded out, summed in fp32 in a fixed order) and
    return ``(out, mean)``: the squeeze of a squeeze-and-excitation block. Not with ``affine2``.

    The plan's entry point: ``x`` [N, C_in, H, W] channels_last in ``packed.dtype``; ``bias`` [C_out]
    any float dtype (used in fp32); ``residual`` and ``out`` (optional preallocated output)
    [N, C_out, OH, OW] channels_last; ``shortcut`` [N, C_sc, H_sc, W_sc] channels_last when the
    packed weight carries a projection shortcut, read at (oh*shortcut_stride, ow*shortcut_stride).
    Works on meta tensors inside ``record_launches()``.

    ``quant`` (x and the packed weight int8 or fp8 e4m3): the 8-bit convolution, its epilogue the
    ``QuantEpilogue`` (reference: ``conv2d_nhwc_8bit_ref``); ``out`` is then in ``quant.out_dtype``.

    ``input_offset`` = (table, (pad_h, pad_w)): x is an image inside a zero border of pad_h rows and
    pad_w columns on each side and the conv runs with padding 0; the accumulator gets
    ``table[class]`` (``input_offset_table``), so it is the convolution of (x - offset) over the
    image, zero in the border: the stem over uint8 pixels as int8 p - 128, where the pixel value
    that normalises to zero (255 mean) is not an integer (``fastres.quantize``).
    """
    (sh, sw), (ph, pw), (dh, dw) = conv_geometry(stride, padding, dilation)
    check_packed_input(x, "x", packed)
    out_dtype = check_quant(quant, x, packed, affine2, residual)
    n, c_in, h, w = x.shape
    oh, ow = conv_output_hw(h, w, packed.kernel_size, (sh, sw), (ph, pw), (dh, dw))
    out_shape = (n, packed.out_channels, oh, ow)
    if residual is not None:
        check_residual(residual, residual_stride, residual_channel_offset, out_shape, x)
    if bias is not None:
        check_bias(bias, "bias", packed.out_channels, x.device)
    if packed.row_k and ((ph, pw) != (0, 0) or (dh, dw) != (1, 1)):
        raise ValueError(f"a weight packed with row_k=True runs with padding 0 and dilation 1, got padding {(ph, pw)}, "
                         f"dilation {(dh, dw)}: zero-pad the input instead (stem_input_padding, "
                         "fastres.extension.nchw_to_nhwc_padded / preprocess(padding=...))")
    if affine2 is not None:
        for what, t in zip(("affine2 scale", "affine2 shift"), affine2):
            check_bias(t, what, packed.out_channels, x.device)
    if input_offset is not None:
        _check_input_offset(input_offset, x, packed, (ph, pw), affine2, channel_mean)
    sc_h, sc_w = check_shortcut(shortcut, shortcut_stride, packed.shortcut_in_channels, n, oh, ow, x, "x")
    if out is None:
        out = torch.empty(out_shape, dtype=out_dtype, device=x.device, memory_format=torch.channels_last)
    else:
        check_activation(out, "out", out_shape, x if quant is None else x.new_empty(0, dtype=out_dtype),
                         "x" if quant is None else "quant.out_dtype")
        if x.device.type != "meta" and out.numel() and x.numel() and out.data_ptr() == x.data_ptr():
            raise ValueError("out must not alias x")
    if affine2 is not None:
        if out2 is None:
            out2 = torch.empty(out_shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
        else:
            check_activation(out2, "out2", out_shape, x, "x")
    if channel_mean:
        if quant is not None:
            raise ValueError("channel_mean has no 8-bit variant (quant)")
        if affine2 is not None:
            raise ValueError("channel_mean and affine2 cannot be combined (one extra output per launch)")
        mean_shape = (n, packed.out_channels, 1, 1)
        if mean_out is None:
            mean_out = torch.empty(mean_shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
        else:
            check_activation(mean_out, "mean_out", mean_shape, x, "x")
    elif mean_out is not None:
        raise ValueError("mean_out is given but channel_mean is False")
    result = (out, out2) if affine2 is not None else (out, mean_out) if channel_mean else out
    if n == 0:
        return result
    if n * max(h * w, oh * ow, (sc_h or 0) * (sc_w or 0)) > INT32_MAX or h * w * c_in > INT32_MAX:
        raise ValueError(f"batch {n} x {h}x{w} pixels x {c_in} channels exceeds the kernel's int32 pixel "
                         "(and per-image element) index")
    problem = dict(bias=bias, stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw), residual=residual,
                   relu=relu, shortcut=shortcut, shortcut_stride=shortcut_stride,
                   residual_stride=residual_stride, residual_channel_offset=residual_channel_offset,
                   affine2=affine2, affine2_relu=affine2_relu, out2=out2, mean_out=mean_out, quant=quant,
                   input_offset=input_offset)
    config = None
    if x.device.type == "cuda" and _autotune.enabled() and not is_recording():
        config = _tuned_config(x, packed, out, problem)
    _build_call(x, packed, out, config=config, **problem).launch()
    return result


def _check_input_offset(input_offset, x, packed, padding, affine2, channel_mean) -> None:
    try:
        table, (pad_h, pad_w) = input_offset
    except (TypeError, ValueError):
        raise TypeError("input_offset must be (table, (pad_h, pad_w))") from None
    if padding != (0, 0):
        raise ValueError(f"input_offset: the conv runs over the bordered input with padding 0, got {padding}")
    if affine2 is not None or channel_mean:
        raise ValueError("input_offset has no second output (affine2 / channel_mean)")
    classes = (pad_h + 1) ** 2 * (pad_w + 1) ** 2
    if (not torch.is_tensor(table) or table.dtype != torch.float32 or table.device != x.device
            or tuple(table.shape) != (classes, packed.out_channels) or not table.is_contiguous()):
        raise ValueError(f"input_offset table must be a contiguous float32 [{classes}, {packed.out_channels}] tensor "
                         f"on {x.device}, got " + (f"{table.dtype} {tuple(table.shape)} on {table.device}"
                                                   if torch.is_tensor(table) else type(table).__name__))
    if x.shape[2] < 2 * pad_h + packed.kernel_size[0] or x.shape[3] < 2 * pad_w + packed.kernel_size[1]:
        raise ValueError(f"input_offset: x {tuple(x.shape[2:])} is smaller than its ({pad_h}, {pad_w}) border "
                         "and one kernel window")


def input_offset_table(weight, offset, padding) -> torch.Tensor:
    """The accumulator correction of ``conv2d_nhwc_packed(..., input_offset=(table, padding))``:

        table[class, o] = -sum over the taps (i, j) inside the image of sum_c weight[o, c, i, j] * offset[c]

    in float64, rounded once to fp32; class = ((top*(P_H+1) + bottom)*(P_W+1) + left)*(P_W+1) + right,
    the kernel rows (top, bottom) and columns (left, right) of an output pixel's window that fall in
    the border (each 0..P). ``weight`` [C_out, C_in, KH, KW] (the 8-bit values), ``offset`` [C_in]:
    acc + table[class] = conv(x - offset) over the image with zero padding, exactly up to that one
    fp32 rounding of the table and the kernel's one fp32 addition.
    """
    pad_h, pad_w = padding
    kh, kw = weight.shape[2:]
    per_tap = torch.einsum("ocij,c->oij", weight.double(), torch.as_tensor(offset, dtype=torch.float64,
                                                                            device=weight.device))
    rows = []
    for top in range(pad_h + 1):
        for bottom in range(pad_h + 1):
            for left in range(pad_w + 1):
                for right in range(pad_w + 1):
                    inside = per_tap[:, top:max(top, kh - bottom), left:max(left, kw - right)]
                    rows.append(-inside.sum(dim=(1, 2)))
    return torch.stack(rows).float().contiguous()


def input_offset_ref(table, padding, kernel_size, stride, in_hw, out_hw) -> torch.Tensor:
    """[1, C_out, OH, OW] fp32: ``table`` read at each output pixel's class (the kernel's lookup)."""
    (pad_h, pad_w), (kh, kw), (sh, sw) = padding, kernel_size, stride
    (h, w), (oh, ow) = in_hw, out_hw
    r = torch.arange(oh, device=table.device) * sh
    c = torch.arange(ow, device=table.device) * sw
    top, bottom = (pad_h - r).clamp(min=0), (r + kh - (h - pad_h)).clamp(min=0)
    left, right = (pad_w - c).clamp(min=0), (c + kw - (w - pad_w)).clamp(min=0)
    row_class = top * (pad_h + 1) + bottom
    col_class = left * (pad_w + 1) + right
    cls = row_class[:, None] * (pad_w + 1) ** 2 + col_class[None, :]
    return table[cls].permute(2, 0, 1).unsqueeze(0)


def check_quant(quant, x, packed, affine2, residual) -> torch.dtype:
    """The output dtype of a conv with this ``quant`` (x's without one), the 8-bit operands checked."""
    if quant is None:
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"x is {x.dtype}: an 8-bit convolution needs quant=QuantEpilogue(...)")
        return x.dtype
    if not isinstance(quant, QuantEpilogue):
        raise TypeError(f"quant must be a QuantEpilogue, got {type(quant).__name__}")
    if x.dtype not in EIGHT_BIT_DTYPES:
        raise TypeError(f"quant needs int8 or float8_e4m3fn x and weight, got {x.dtype}")
    if affine2 is not None:
        raise ValueError("an 8-bit convolution has no second (affine2) output")
    check_bias(quant.acc_scale, "quant.acc_scale", packed.out_channels, x.device)
    if quant.acc_scale.dtype != torch.float32:
        raise TypeError(f"quant.acc_scale must be float32, got {quant.acc_scale.dtype}")
    if (residual is None) != (quant.residual_scale is None):
        raise ValueError("quant.residual_scale must be given exactly when there is a residual")
    out_8bit = quant.out_dtype in EIGHT_BIT_DTYPES
    # x's 8-bit dtype, a float, or e4m3 from int8 (an fp8 model's stem over uint8 pixels: int8 p - 128)
    mixed = (x.dtype, quant.out_dtype) == (torch.int8, torch.float8_e4m3fn)
    if quant.out_dtype not in EIGHT_BIT_DTYPES + FLOAT_DTYPES or (out_8bit and quant.out_dtype != x.dtype and not mixed):
        raise TypeError(f"quant.out_dtype must be x's dtype ({x.dtype}), a float dtype, or float8_e4m3fn from int8, "
                        f"got {quant.out_dtype}")
    if out_8bit != (quant.out_inv_scale is not None):
        raise ValueError("quant.out_inv_scale must be given exactly when the output is 8-bit")
    return quant.out_dtype


def _operand_shape(x, packed, out, stride, padding, shortcut, mean_out, quant) -> tuple:
    """(plain_gemm, spatial) of a conv: whether it is one plain GEMM (1x1, stride 1, no padding, groups
    1, no shortcut), and for a tap-major conv whose K steps can each be one box of the input (stride
    1, groups 1 and only the plain epilogue terms: a spatial tile's rows are not one run of pixels,
    which the channel means and split-K's workspace assume) its (N, OH, OW, taps), else None."""
    kh, kw = packed.kernel_size
    num_groups = packed.out_channels // packed.group_out_channels
    flat_k = packed.group_in_channels % min_dot_k(x.dtype) != 0
    plain_gemm = ((kh, kw) == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0) and num_groups == 1
                  and shortcut is None and not packed.row_k)
    spatial = ((x.shape[0], out.shape[2], out.shape[3], kh * kw) if tuple(stride) == (1, 1) and not plain_gemm
               and num_groups == 1 and shortcut is None and not flat_k and not packed.row_k and mean_out is None
               and quant is None else None)
    return plain_gemm, spatial


def _rule_config(x, packed, out, *, stride, padding, shortcut, mean_out, quant, input_offset=None, **_) -> ConvConfig:
    """``conv_config``'s choice for this conv (the launch's and the autotuner's "rule" candidate)."""
    kh, kw = packed.kernel_size
    cin_g, cout_g = packed.group_in_channels, packed.group_out_channels
    num_groups = packed.out_channels // cout_g
    flat_k = cin_g % min_dot_k(x.dtype) != 0
    splittable = (num_groups == 1 and shortcut is None and not flat_k and not packed.row_k and mean_out is None
                  and quant is None and input_offset is None)
    main_steps = kh * kw * cin_g // min(CONV_CONFIGS["tc_wide"].BLOCK_K, largest_pow2_divisor(cin_g)) if splittable else 0
    plain_gemm, spatial = _operand_shape(x, packed, out, stride, padding, shortcut, mean_out, quant)
    return conv_config(x.shape[0] * out.shape[2] * out.shape[3], cout_g, num_groups, cin_g, flat_k, x.dtype,
                       x.device.type, target_for(x.device), main_steps, plain_gemm, spatial)


def _candidate_configs(x, packed, out, problem) -> dict:
    """The rule's choice (TMA and split-K included, as the launch would pick it) and every other GPU
    tile for this operand width, clamped like the rule."""
    cin_g, cout_g = packed.group_in_channels, packed.group_out_channels
    flat_k = cin_g % min_dot_k(x.dtype) != 0
    names = ["fp32"] if x.dtype == torch.float32 else ["tc_wide", "tc_narrow", "tc_small_m"]
    block_k_cap = _FLAT_K_BLOCK_K if flat_k else largest_pow2_divisor(cin_g)
    target = target_for(x.device)
    arch = table_arch(target.sm)
    candidates = {name: dataclasses.replace(
        CONV_CONFIGS[name], BLOCK_N=min(CONV_CONFIGS[name].BLOCK_N, max(MIN_TILE_CHANNELS, pow2_at_least(cout_g))),
        BLOCK_K=min(CONV_CONFIGS[name].BLOCK_K, block_k_cap),
        num_stages=CONV_STAGES.get((name, arch), CONV_CONFIGS[name].num_stages)) for name in names}
    candidates["rule"] = _rule_config(x, packed, out, **problem)
    return candidates


def _tuned_config(x, packed, out, problem) -> ConvConfig:
    """FASTRES_AUTOTUNE=1 on a GPU: time the candidates once per problem, cache the choice on disk."""
    scratch = torch.empty_like(out)   # timing runs must not write into a live buffer (out may alias residual)
    timing = dict(problem, out2=torch.empty_like(out) if problem["out2"] is not None else None,
                  mean_out=torch.empty_like(problem["mean_out"]) if problem["mean_out"] is not None else None)
    residual = problem["residual"]
    key = (tuple(x.shape), str(x.dtype), packed.out_channels, packed.kernel_size, packed.groups,
           packed.shortcut_in_channels, problem["stride"], problem["padding"], problem["dilation"],
           residual is not None, bool(problem["relu"]))
    if residual is not None and tuple(residual.shape) != tuple(out.shape):
        key += (tuple(residual.shape), problem["residual_stride"], problem["residual_channel_offset"])
    if problem["affine2"] is not None:
        key += ("affine2", bool(problem["affine2_relu"]))
    if problem["mean_out"] is not None:
        key += ("mean",)
    return _autotune.choose(
        "conv2d_nhwc", key, _candidate_configs(x, packed, out, problem),
        run=lambda cfg: _build_call(x, packed, scratch, config=cfg, **timing).launch(),
        device=torch.cuda.get_device_name(x.device))


_EIGHT_BIT_NAMES = {torch.int8: "int8", torch.float8_e4m3fn: "e4m3"}


def _concat_align(x, shortcut, c_in: int, c_sc: int, block_k: int) -> int:
    """Bytes every row base of the one-loop concat-K (x rows, shortcut rows, + k*BLOCK_K) is a multiple
    of: 16 when both tensors start 16-byte aligned and every channel count is a multiple of 16 bytes."""
    if shortcut is None:
        return 1
    size = x.element_size()
    aligned = (x.data_ptr() % 16 == 0 and shortcut.data_ptr() % 16 == 0
               and all(c * size % 16 == 0 for c in (c_in, c_sc, block_k)))
    return 16 if aligned else 1


def _tma_fits(x, packed, cfg: ConvConfig, plain_gemm: bool, spatial: bool) -> bool:
    """Whether a conv can take its operand tiles from TMA descriptors: a 1x1 plain GEMM or (with a
    spatial tile) a stride-1 tap-major conv, groups 1, no split, BLOCK_K dividing C_in, and what a
    descriptor needs (16-byte aligned base and pitches: with C_in so aligned, so are W*C_in and
    H*W*C_in)."""
    size = x.element_size()
    return ((plain_gemm or (spatial and len(cfg.TILE) == 3)) and cfg.SPLIT_K == 1
            and packed.in_channels % cfg.BLOCK_K == 0
            and x.data_ptr() % 16 == 0 and packed.weight.data_ptr() % 16 == 0
            and packed.in_channels * size % 16 == 0 and packed.out_channels * size % 16 == 0)


def _tma_descriptors(x, packed, cfg: ConvConfig) -> dict:
    """x_desc / w_desc of a TMA launch (x as its [N*H*W, C_in] rows, or as [N, H, W, C_in] boxes of
    a spatial tile; the packed [K, C_out] weight), None (constexpr) otherwise."""
    if not cfg.TMA:
        return dict(x_desc=None, w_desc=None)
    # x's channels_last bytes described directly (no view tensor: a launch's host work), as
    # [N, H, W, C] or [N*H*W, C]; x's descriptor is built per launch, because a cached one would keep
    # its activation alive (the weight's is cached on the packed weight, which lives as long)
    n, c, h, w = x.shape
    if cfg.TILE:
        x_desc = TensorDescriptor(x, [n, h, w, c], [h * w * c, w * c, c, 1], [*cfg.TILE, cfg.BLOCK_K])
    else:
        x_desc = TensorDescriptor(x, [n * h * w, c], [c, 1], [cfg.BLOCK_M, cfg.BLOCK_K])
    return dict(x_desc=x_desc, w_desc=packed.tma_descriptor((cfg.BLOCK_K, cfg.BLOCK_N)))


def _build_call(x, packed, out, *, bias, stride, padding, dilation, residual, relu, shortcut,
                shortcut_stride, residual_stride=1, residual_channel_offset=0, affine2=None,
                affine2_relu=False, out2=None, mean_out=None, config: ConvConfig | None = None,
                quant: QuantEpilogue | None = None, input_offset=None) -> KernelCall:
    """The KernelCall of one (already validated) convolution; touches no tensor data."""
    n, c_in, h, w = x.shape
    oh, ow = out.shape[2], out.shape[3]
    kh, kw = packed.kernel_size
    cin_g, cout_g = packed.group_in_channels, packed.group_out_channels
    num_groups = packed.out_channels // cout_g
    flat_k = cin_g % min_dot_k(x.dtype) != 0
    m = n * oh * ow
    plain_gemm, spatial = _operand_shape(x, packed, out, stride, padding, shortcut, mean_out, quant)
    cfg = config or _rule_config(x, packed, out, stride=stride, padding=padding, shortcut=shortcut,
                                 mean_out=mean_out, quant=quant, input_offset=input_offset)
    if cfg.TMA and (quant is not None or not _tma_fits(x, packed, cfg, plain_gemm, spatial is not None)):
        cfg = dataclasses.replace(cfg, TMA=False, TILE=())
    if cfg.TILE and not cfg.TMA:
        raise ValueError(f"a spatial tile {cfg.TILE} needs TMA=True")
    row_align, row_k_mask = 1, False
    if packed.row_k:
        cfg = dataclasses.replace(cfg, BLOCK_K=packed.row_k)
        # elements every row start is a multiple of (x itself is 16-byte aligned or triton knows it
        # is not), capped at one 16-byte vector; the BLOCK_K run of the last column must stay in its row
        row_align = min(largest_pow2_divisor(math.gcd(stride[1] * c_in, w * c_in)), 16 // x.element_size())
        row_k_mask = (ow - 1) * stride[1] * c_in + packed.row_k > w * c_in
    m_tiles = spatial_tiles(cfg.TILE, n, oh, ow) if cfg.TILE else triton.cdiv(m, cfg.BLOCK_M)
    tiles = m_tiles * num_groups * triton.cdiv(cout_g, cfg.BLOCK_N)
    grid = (tiles, cfg.SPLIT_K) if cfg.SPLIT_K > 1 else (tiles,)
    args = dict(x_ptr=x, w_ptr=packed.weight, out_ptr=out, BATCH=n, H=h, W=w, OH=oh, OW=ow)
    # Absent operands are None, which Triton treats as constexpr: they go with the constexprs.
    res_c = residual.shape[1] if residual is not None else packed.out_channels
    strided_residual = residual is not None and (residual_stride != 1 or res_c != packed.out_channels)
    split = cfg.SPLIT_K > 1
    if split and mean_out is not None:
        raise ValueError("the channel-mean epilogue runs without split-K (its last tile adds the image's partials)")
    mean_slots = None
    if split:       # a zeroed fp32 sum per output element and an arrival count per tile
        ws = torch.zeros(m, packed.out_channels, dtype=torch.float32, device=x.device)
        counter = torch.zeros(tiles, dtype=torch.int32, device=x.device)
    elif mean_out is not None:      # fp32 partial sums per (tile, image), a zeroed count per (image, column tile)
        mean_slots = channel_mean_slots(cfg.BLOCK_M, oh * ow)
        if triton.cdiv(m, cfg.BLOCK_M) * mean_slots * packed.out_channels > INT32_MAX:
            raise ValueError(f"channel_mean: {n} images of {oh}x{ow} pixels x {packed.out_channels} channels "
                             "exceed the int32 index of its partial sums")
        ws = torch.empty(triton.cdiv(m, cfg.BLOCK_M) * mean_slots, packed.out_channels, dtype=torch.float32,
                         device=x.device)
        counter = torch.zeros(n * num_groups * triton.cdiv(cout_g, cfg.BLOCK_N), dtype=torch.int32, device=x.device)
    else:
        ws = counter = None
    optional = dict(bias_ptr=bias, residual_ptr=residual, shortcut_ptr=shortcut, ws_ptr=ws, counter_ptr=counter,
                    mean_ptr=mean_out, MEAN_SLOTS=mean_slots,
                    SC_H=shortcut.shape[2] if shortcut is not None else None,
                    SC_W=shortcut.shape[3] if shortcut is not None else None,
                    RES_H=residual.shape[2] if strided_residual else None,
                    RES_W=residual.shape[3] if strided_residual else None,
                    out2_ptr=out2 if affine2 is not None else None,
                    scale2_ptr=affine2[0] if affine2 is not None else None,
                    shift2_ptr=affine2[1] if affine2 is not None else None,
                    acc_scale_ptr=quant.acc_scale if quant is not None else None,
                    RES_SCALE=quant.residual_scale if quant is not None else None,
                    OUT_INV_SCALE=quant.out_inv_scale if quant is not None else None,
                    offset_ptr=input_offset[0] if input_offset is not None else None,
                    **_tma_descriptors(x, packed, cfg))
    args.update({k: v for k, v in optional.items() if v is not None})
    constexprs = {k: v for k, v in optional.items() if v is None}
    c_sc = packed.shortcut_in_channels
    constexprs.update(
        C_IN=c_in, C_OUT=packed.out_channels, CIN_PER_GROUP=cin_g, COUT_PER_GROUP=cout_g, KH=kh, KW=kw,
        STRIDE_H=stride[0], STRIDE_W=stride[1], PAD_H=padding[0], PAD_W=padding[1],
        DIL_H=dilation[0], DIL_W=dilation[1],
        C_SC=c_sc, SC_STRIDE=shortcut_stride if shortcut is not None else 1,
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, APPLY_RELU=bool(relu),
        HAS_SHORTCUT_GEMM=shortcut is not None, FLAT_K=flat_k and not packed.row_k, ROW_K=bool(packed.row_k),
        ROW_ALIGN=row_align, ROW_K_MASK=row_k_mask, CONCAT_ALIGN=_concat_align(x, shortcut, c_in, c_sc, cfg.BLOCK_K),
        RES_C=res_c, RES_C_OFFSET=residual_channel_offset if strided_residual else 0,
        RES_STRIDE=residual_stride if strided_residual else 1,
        HAS_OUT2=affine2 is not None, OUT2_RELU=bool(affine2_relu) and affine2 is not None,
        HAS_MEAN=mean_out is not None,
        INTERPRETER_BF16=x.dtype == torch.bfloat16 and x.device.type == "cpu",
        QUANTIZED=quant is not None, INTERPRETER_FP8=out.dtype == torch.float8_e4m3fn and x.device.type == "cpu",
        W_K_STRIDE=packed.weight.stride(0), W_N_STRIDE=packed.weight.stride(1),
        HAS_INPUT_OFFSET=input_offset is not None,
        OFFSET_PAD_H=input_offset[1][0] if input_offset is not None else 0,
        OFFSET_PAD_W=input_offset[1][1] if input_offset is not None else 0,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M, SPLIT_K=cfg.SPLIT_K,
        TMA=cfg.TMA, **dict(zip(("TILE_IMGS", "TILE_H", "TILE_W"), cfg.TILE or (0, 0, 0))),
    )
    k_main = kh * kw * cin_g
    name = (f"conv2d_nhwc[{kh}x{kw}/s{stride[0]}" + (f"/d{dilation[0]}" if dilation[0] > 1 else "")
            + (f"/g{packed.groups}" if packed.groups > 1 else "") + (f"+sc{c_sc}/s{shortcut_stride}" if c_sc else "")
            + ("/rowk" if packed.row_k else "") + (f"/splitk{cfg.SPLIT_K}" if split else "")
            + (f"+res{res_c}@{residual_channel_offset}/s{residual_stride}" if strided_residual else "")
            + ("+affine2" if affine2 is not None else "") + ("+mean" if mean_out is not None else "")
            + ("+offset" if input_offset is not None else "")
            + (f"/{_EIGHT_BIT_NAMES[x.dtype]}" if quant is not None else "") + "]")
    macs = m * packed.out_channels * (k_main // packed.tile_groups + c_sc)
    # K loop trips (the loop report divides an unrolled K loop's code by them)
    k_steps = ((kh if packed.row_k else triton.cdiv(k_main, cfg.BLOCK_K)) + triton.cdiv(c_sc, cfg.BLOCK_K)) // cfg.SPLIT_K
    return KernelCall(
        kernel=_conv2d_nhwc_kernel, grid=grid, args=args, constexprs=constexprs,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, name=name,
        # 8-bit: no FMA contraction, so the epilogue rounds as the interpreter and the reference do
        options=dict(enable_fp_fusion=False) if quant is not None else {},
        # modelled traffic: each input once (only the strided shortcut pixels), the output once,
        # the weights as PyTorch holds them (not the packed zeros of block-diagonal groups), fp32 bias
        info=dict(M=m, N=packed.out_channels, K=k_main + c_sc, k_steps=k_steps, flops=2 * macs, dtype=str(x.dtype).replace("torch.", ""),
                  bytes=(x.numel() + out.numel() * (2 if affine2 is not None else 1)
                         + (m * res_c if residual is not None else 0) + m * c_sc
                         + packed.out_channels * (k_main // packed.tile_groups + c_sc)
                         + (n * packed.out_channels if mean_out is not None else 0)) * x.element_size()
                  + (4 * packed.out_channels if bias is not None else 0)
                  + (out.numel() * (out.element_size() - x.element_size()) + 4 * packed.out_channels
                     if quant is not None else 0)
                  + (input_offset[0].numel() * 4 if input_offset is not None else 0)),
    )


def conv2d_nhwc(x, weight, bias=None, *, stride=1, padding=0, dilation=1, groups=1, residual=None, relu=False):
    """``relu?(conv2d(x, weight, bias, stride, padding, dilation, groups) [+ residual])`` over NHWC.

    ``x``, ``residual`` and the result are [N, C, H, W] tensors in channels_last memory; ``weight`` is
    in PyTorch layout [C_out, C_in/groups, KH, KW] and x's dtype (fp16, bf16 or fp32); ``bias`` any
    float dtype, used in fp32. Accumulates in fp32, rounds once to x's dtype.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("x and weight must be tensors")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D [C_out, C_in/groups, KH, KW], got shape {tuple(weight.shape)}")
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    (sh, sw), (ph, pw), (dh, dw) = conv_geometry(stride, padding, dilation)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x dtype must be float16, bfloat16 or float32, got {x.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} != x dtype {x.dtype}")
    if residual is not None and residual.dtype != x.dtype:
        raise TypeError(f"residual dtype {residual.dtype} != x dtype {x.dtype}")
    if bias is not None and not bias.is_floating_point():
        raise TypeError(f"bias must be a float tensor, got {bias.dtype}")
    for name, t in (("weight", weight), ("bias", bias), ("residual", residual)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}: move both to the same device")
    c_out, cin_g = weight.shape[0], weight.shape[1]
    if c_out % groups != 0 or x.shape[1] % groups != 0:
        raise ValueError(f"groups={groups} must divide the input channels ({x.shape[1]}) and output channels "
                         f"({c_out})")
    if x.shape[1] // groups != cin_g:
        raise ValueError(f"x has {x.shape[1]} channels = {groups} groups x {x.shape[1] // groups}, "
                         f"the weight expects {cin_g} input channels per group")
    if bias is not None and tuple(bias.shape) != (c_out,):
        raise ValueError(f"bias must have shape ({c_out},), got {tuple(bias.shape)}")
    if not is_channels_last(x):
        raise ValueError("x must be in channels_last memory format: call "
                         "x.contiguous(memory_format=torch.channels_last)")
    if bias is not None:
        bias = bias.contiguous()
    row_k = (ph, pw) == (0, 0) and (dh, dw) == (1, 1) and row_k_fits(
        weight.shape[3], cin_g, groups)
    packed = pack_conv_weight(weight, groups=groups, row_k=row_k)
    return conv2d_nhwc_packed(x, packed, bias, stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw),
                              residual=residual, relu=relu)


# ----------------------------------------------------------------------------------------------
# Reference


def conv2d_nhwc_ref(x, weight, bias=None, *, stride=1, padding=0, dilation=1, groups=1,
                    residual=None, relu=False, shortcut=None, shortcut_weight=None, shortcut_stride=1,
                    residual_stride=1, residual_channel_offset=0, affine2=None, affine2_relu=False,
                    channel_mean=False, upcast=False):
    """Plain-PyTorch reference of the fused convolution.

        y = relu?(conv(x, weight) [+ conv1x1(shortcut, shortcut_weight, stride=shortcut_stride)]
                  + bias [+ pad_c(residual[:, :, ::rs, ::rs])])
        [y2 = relu?(y * scale2 + shift2)]          (affine2 = (scale2, shift2); returns (y, y2))
        [mean = y.mean((2, 3), keepdim=True)]      (channel_mean; of the rounded y; returns (y, mean))

    where pad_c places the residual's channels at ``residual_channel_offset`` of y's, zeros
    elsewhere. ``upcast=True`` computes in fp32 and casts the result once to ``x.dtype`` — the
    numerics of the kernel (fp32 accumulation, fp32 epilogue, one rounding at the store; y2 from
    the fp32 y). channels_last in gives channels_last out.
    """
    out_dtype = x.dtype
    channels_last = is_channels_last(x)
    if upcast:
        x, weight = x.float(), weight.float()
        residual = residual.float() if residual is not None else None
        if shortcut is not None:
            shortcut, shortcut_weight = shortcut.float(), shortcut_weight.float()
    bias = bias.to(x.dtype) if bias is not None else None
    out = F.conv2d(x, weight, bias, stride=stride, padding=padding, dilation=dilation, groups=groups)
    if shortcut is not None:
        out = out.add_(F.conv2d(shortcut, shortcut_weight, stride=shortcut_stride))
    if residual is not None:
        r = residual[:, :, ::residual_stride, ::residual_stride]
        c0 = residual_channel_offset
        out[:, c0:c0 + r.shape[1]] += r
    if relu:
        out = out.relu_()
    out2 = None
    if affine2 is not None:
        scale, shift = (t.to(out.dtype).view(1, -1, 1, 1) for t in affine2)
        out2 = out * scale + shift
        if affine2_relu:
            out2 = out2.relu_()
        out2 = _as_output(out2, out_dtype, channels_last)
    out = _as_output(out, out_dtype, channels_last)
    if channel_mean:
        return out, out.mean((2, 3), keepdim=True)
    return out if affine2 is None else (out, out2)


def _as_output(out, dtype, channels_last):
    out = out.to(dtype)
    if channels_last and not is_channels_last(out):
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def conv2d_nhwc_8bit_ref(x, weight, bias, quant: QuantEpilogue, *, stride=1, padding=0, dilation=1, groups=1,
                         residual=None, relu=False, shortcut=None, shortcut_weight=None, shortcut_stride=1,
                         residual_stride=1, residual_channel_offset=0, input_offset=None):
    """Reference of the 8-bit convolution: the same accumulation and the same epilogue roundings.

        acc = conv(x, weight) [+ conv1x1_s(shortcut, shortcut_weight)]     exact, in float64
        out = requantize_ref(acc, ...)                                       (see QuantEpilogue)

    ``x``, ``weight`` (PyTorch layout), ``residual`` and the shortcut are int8 or float8_e4m3fn.
    Every product of two 8-bit values and every partial sum of a ResNet conv is exact in float64
    (int8: |sum| < K * 2**14 < 2**53; e4m3: products are multiples of 2**-18 below 2**18), so the
    accumulator is exact: the int32 of the int8 kernel, the exact sum that the fp8 kernel's fp32
    accumulation approximates. The accumulator is then rounded once to fp32 (exact for int8 up to
    2**24) [and gets the fp32 ``input_offset`` correction, ``input_offset_ref``]. channels_last in
    gives channels_last out.
    """
    acc = F.conv2d(x.double(), weight.double(), stride=stride, padding=padding, dilation=dilation, groups=groups)
    if shortcut is not None:
        acc += F.conv2d(shortcut.double(), shortcut_weight.double(), stride=shortcut_stride)
    if residual is not None:
        r = residual[:, :, ::residual_stride, ::residual_stride]
        c0 = residual_channel_offset
        padded = acc.new_zeros(acc.shape, dtype=torch.float32)
        padded[:, c0:c0 + r.shape[1]] = r.float()
        residual = padded
    acc = acc.float()
    if input_offset is not None:
        table, pad = input_offset
        acc = acc + input_offset_ref(table, pad, weight.shape[2:], conv_geometry(stride, padding, dilation)[0],
                                     x.shape[2:], acc.shape[2:])
    out = requantize_ref(acc, bias, quant, residual=residual, relu=relu)
    return _as_output(out, out.dtype, is_channels_last(x))


def requantize_ref(acc, bias, quant: QuantEpilogue, *, residual=None, relu=False):
    """``store_requantized_epilogue`` in PyTorch, one fp32 rounding per operation in its order:

        y = acc * acc_scale[c] (+ bias[c]) (+ residual * residual_scale); relu?
        int8:  clamp(y * out_inv_scale, -128, 127) rounded half to even;  e4m3: clamp to +-448, to e4m3 (RNE)

    ``acc`` is the fp32 accumulator [N, C, H, W]; ``residual`` its 8-bit (or dequantization-ready
    float) residual, zero where the kernel masks it."""
    view = (1, -1, 1, 1)
    y = acc.float() * quant.acc_scale.view(view)
    if bias is not None:
        y = y + bias.float().view(view)
    if residual is not None:
        y = y + residual.float() * torch.tensor(quant.residual_scale, dtype=torch.float32)
    if relu:
        y = torch.where(y < 0, torch.zeros_like(y), y)
    if quant.out_dtype == torch.int8:
        q = (y * torch.tensor(quant.out_inv_scale, dtype=torch.float32)).clamp_(-128.0, 127.0)
        return torch.round(q).to(torch.int8)           # torch.round: half to even
    if quant.out_dtype == torch.float8_e4m3fn:
        q = (y * torch.tensor(quant.out_inv_scale, dtype=torch.float32)).clamp_(-448.0, 448.0)
        return q.to(torch.float8_e4m3fn)               # round to nearest even
    return y.to(quant.out_dtype)
