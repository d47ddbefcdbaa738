"""ResNet head: global average pooling fused with the fully connected layer.

    out = mean_hw(x) @ weight.T + bias

``x`` is ``[N, C, H, W]`` in ``torch.channels_last`` memory, ``weight`` is ``[classes, C]`` (PyTorch's
``nn.Linear`` layout) and is packed once, at plan time, by ``pack_linear_weight`` into the
``[C, classes]`` layout the kernel reads. Numerics follow PyTorch's half-precision head: the mean
is summed in fp32 and rounded once to x's dtype, the product accumulates in fp32, the bias (fp32)
is added in fp32 and the result is rounded once to x's dtype. fp32 inputs use a true fp32
(IEEE, not TF32) product.

Work split: a program owns BLOCK_M batch rows x BLOCK_CLS classes and walks C in BLOCK_K chunks;
for each chunk it pools its rows over H*W once and multiplies the pooled [BLOCK_M, BLOCK_K] block
by the weight chunk. A row block's pooled vector is therefore recomputed once per class tile: the
alternative (holding a [rows, C] vector across all classes) needs a workspace or a second kernel.
The configuration rule keeps that count small where x is large (4 class tiles for 1000 classes at
batch 256) and class tiles are the fastest-varying grid axis, so the programs re-reading one row
block run together and find it in L2.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import EIGHT_BIT_DTYPES, FLOAT_DTYPES, check_nhwc_input, check_out
from ._launch import KernelCall


@triton.jit
def _avgpool_linear_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr,
    N, C, HW, CLASSES,
    stride_wk,                            # row stride of the packed [C, classes] weight
    HAS_BIAS: tl.constexpr,
    UPCAST_DOT_OPERANDS: tl.constexpr,    # dot in fp32 (IEEE): fp32 inputs, bf16 in the interpreter
    BLOCK_M: tl.constexpr, BLOCK_CLS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    pid_cls = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    classes = pid_cls * BLOCK_CLS + tl.arange(0, BLOCK_CLS)
    row_ok = rows < N
    cls_ok = classes < CLASSES
    # NHWC: x[n, hw, c] lives at (n * HW + hw) * C + c; int64 because N * HW * C passes 2**31.
    row_base = rows.to(tl.int64) * HW * C

    acc = tl.zeros((BLOCK_M, BLOCK_CLS), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < C
        pooled = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for hw0 in range(0, HW, BLOCK_HW):
            hws = hw0 + tl.arange(0, BLOCK_HW)
            ptrs = x_ptr + row_base[:, None, None] + (hws * C)[None, :, None] + ks[None, None, :]
            mask = row_ok[:, None, None] & (hws < HW)[None, :, None] & k_ok[None, None, :]
            tile = tl.load(ptrs, mask=mask, other=0.0)
            pooled += tl.sum(tile.to(tl.float32), axis=1)
        pooled = pooled / HW

        w_ptrs = w_ptr + ks[:, None] * stride_wk + classes[None, :]
        w = tl.load(w_ptrs, mask=k_ok[:, None] & cls_ok[None, :], other=0.0)
        if UPCAST_DOT_OPERANDS:
            acc = tl.dot(pooled, w.to(tl.float32), acc, input_precision="ieee")
        else:
            # Rounding the mean to x's dtype is what PyTorch's fp16/bf16 head does too.
            acc = tl.dot(pooled.to(w.dtype), w, acc)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + classes, mask=cls_ok, other=0.0)[None, :]
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * CLASSES + classes[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & cls_ok[None, :])


# Enough programs to spread the weight read over half an H100/A100's SMs.
TARGET_PROGRAMS = 64


def avgpool_linear_config(N, C, HW, classes, dtype=torch.float16, device_type="cuda"):
    """Tile rule, keyed on batch, H*W, classes, the element size and where the kernel runs.

    GPU (``device_type`` "cuda", and "meta" for recorded launches):

    - BLOCK_M = 16 rows: the smallest ``tl.dot`` tile; batch rows are the parallel axis for the
      activation read, so there is no gain in taller row blocks.
    - BLOCK_CLS: the widest of 256/128/64/32 that still gives TARGET_PROGRAMS programs. Small
      batches (weight-read bound) get narrow class tiles and many programs; batch 256 (activation
      bound) gets 256-wide tiles, so x is re-read only 4 times for 1000 classes. Never wider than
      the class count rounded up to a power of two (>= 16).
    - num_warps = 8 for class tiles of 128 or more, else 4: the weight tile stays at <= 64
      values per thread (at 4 warps a 256-wide fp16 tile needs 254 registers on sm_80, at 8 warps
      164; measured with ``fastres.aot``).
    - Tiles are sized in bytes, so fp32 gets half the channels per step: BLOCK_K = 128 bytes of
      channels (64 fp16/bf16, 32 fp32; ResNet widths are multiples of both) and BLOCK_HW the rest
      of an 8 KiB x tile, at most H*W rounded up (a 64-channel fp32 step spills on sm_80 at the
      256-wide tile; a larger x tile costs ~40 registers).

    Interpreter ("cpu"): numpy time grows with programs and loop trips, not registers, so one
    program takes up to 1024 classes and each trip 128 channels x up to 64 pixels.
    """
    block_m = 16
    if device_type == "cpu":
        return dict(BLOCK_M=block_m, BLOCK_CLS=min(max(triton.next_power_of_2(classes), 16), 1024),
                    BLOCK_K=128, BLOCK_HW=min(triton.next_power_of_2(HW), 64), num_warps=4, num_stages=1)
    row_blocks = triton.cdiv(N, block_m)
    block_cls = 32
    for width in (256, 128, 64):
        if row_blocks * triton.cdiv(classes, width) >= TARGET_PROGRAMS:
            block_cls = width
            break
    block_cls = min(block_cls, max(triton.next_power_of_2(classes), 16))
    num_warps = 8 if block_cls >= 128 else 4
    element_size = dtype.itemsize
    block_k = 128 // element_size
    block_hw = max(1, min(8192 // (block_m * block_k * element_size), triton.next_power_of_2(HW)))
    return dict(BLOCK_M=block_m, BLOCK_CLS=block_cls, BLOCK_K=block_k, BLOCK_HW=block_hw,
                num_warps=num_warps, num_stages=2)


def pack_linear_weight(weight):
    """``[classes, C]`` (nn.Linear layout) -> the kernel's ``[C, classes]``, classes contiguous.

    The rows are padded to a multiple of 16 elements (the result is a ``[C, classes]`` view of the
    padded buffer) so every row starts 16-element aligned and the weight loads vectorise whatever
    the class count; call once per plan, not per forward.
    """
    if weight.dim() != 2:
        raise ValueError(f"pack_linear_weight: weight must be [classes, C], got shape {tuple(weight.shape)}")
    classes, C = weight.shape
    padded = torch.zeros((C, triton.cdiv(max(classes, 1), 16) * 16), dtype=weight.dtype, device=weight.device)
    packed = padded[:, :classes]
    packed.copy_(weight.t())
    return packed


def _check_inputs(x, packed, bias, out, *, eight_bit=False):
    check_nhwc_input(x, "avgpool_linear", dtypes=EIGHT_BIT_DTYPES if eight_bit else FLOAT_DTYPES)
    if packed.dim() != 2 or packed.stride(1) != 1:
        raise ValueError("avgpool_linear: packed weight must be the [C, classes] tensor from "
                         f"pack_linear_weight, got shape {tuple(packed.shape)} strides {packed.stride()}")
    if packed.shape[0] != x.shape[1]:
        raise ValueError(f"avgpool_linear: x has {x.shape[1]} channels but the weight expects "
                         f"{packed.shape[0]} (packed weight shape {tuple(packed.shape)} is [C, classes])")
    weight_dtype = torch.float32 if eight_bit else x.dtype
    if packed.dtype != weight_dtype:
        raise TypeError(f"avgpool_linear: weight dtype {packed.dtype} does not match x dtype {x.dtype}"
                        + (" (an 8-bit x takes the fp32 weight of avgpool_linear_8bit_packed)" if eight_bit else ""))
    if packed.device != x.device:
        raise ValueError(f"avgpool_linear: weight is on {packed.device} but x is on {x.device}")
    classes = packed.shape[1]
    if bias is not None:
        if bias.shape != (classes,):
            raise ValueError(f"avgpool_linear: bias must have shape ({classes},), got {tuple(bias.shape)}")
        if bias.dtype != torch.float32:
            raise TypeError(f"avgpool_linear: the plan's bias must be float32, got {bias.dtype}")
        if bias.device != x.device:
            raise ValueError(f"avgpool_linear: bias is on {bias.device} but x is on {x.device}")
        if not bias.is_contiguous():
            raise ValueError("avgpool_linear: bias must be contiguous")
    if out is not None:
        check_out(out, "avgpool_linear", (x.shape[0], classes), packed if eight_bit else x, channels_last=False)


def avgpool_linear_packed(x, packed, bias=None, out=None, *, config=None):
    """The plan's entry point: ``out = mean_hw(x) @ W.T + bias`` with ``packed = pack_linear_weight(W)``.

    ``bias`` is float32 ``[classes]`` or None; ``out`` (optional) is ``[N, classes]`` in x's dtype.
    ``config`` overrides ``avgpool_linear_config`` (benchmarks and tests try other tiles with it).
    """
    _check_inputs(x, packed, bias, out)
    return _launch(x, packed, bias, out, config, x.dtype)


def avgpool_linear_8bit_packed(x, packed, bias=None, out=None, *, config=None):
    """The head of an 8-bit plan: ``out = mean_hw(x) @ W'.T + bias`` for int8 / e4m3 ``x`` and the
    fp32 ``packed = pack_linear_weight(W * s_x)`` (the activation scale folded into the weight),
    all in fp32 (the pooled sums of 8-bit values are exact), fp32 logits. Reference:
    ``avgpool_linear_8bit_ref``."""
    _check_inputs(x, packed, bias, out, eight_bit=True)
    return _launch(x, packed, bias, out, config, torch.float32)


def _launch(x, packed, bias, out, config, out_dtype):
    N, C, H, W = x.shape
    classes = packed.shape[1]
    if out is None:
        out = torch.empty((N, classes), dtype=out_dtype, device=x.device)
    if N == 0 or classes == 0:
        return out
    if C == 0 or H * W == 0:
        raise ValueError(f"avgpool_linear: cannot average an empty feature map, x shape {tuple(x.shape)}")

    # tiles sized by the weight's element size (an 8-bit x reads an fp32 weight)
    cfg = config or avgpool_linear_config(N, C, H * W, classes, packed.dtype, x.device.type)
    # The triton interpreter (CPU tensors) computes tl.dot on bf16 operands wrongly; there, and for
    # fp32 inputs, the dot runs on fp32 operands. Recorded launches (meta) keep the GPU kernel.
    interpreted_bf16 = x.dtype == torch.bfloat16 and x.device.type == "cpu"
    KernelCall(
        kernel=_avgpool_linear_kernel,
        grid=(triton.cdiv(classes, cfg["BLOCK_CLS"]), triton.cdiv(N, cfg["BLOCK_M"])),
        args=dict(x_ptr=x, w_ptr=packed, bias_ptr=bias, out_ptr=out,
                  N=N, C=C, HW=H * W, CLASSES=classes, stride_wk=packed.stride(0)),
        constexprs=dict(HAS_BIAS=bias is not None,
                        UPCAST_DOT_OPERANDS=packed.dtype == torch.float32 or interpreted_bf16,
                        BLOCK_M=cfg["BLOCK_M"], BLOCK_CLS=cfg["BLOCK_CLS"],
                        BLOCK_K=cfg["BLOCK_K"], BLOCK_HW=cfg["BLOCK_HW"]),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        name="avgpool_linear",
        info=dict(N=N, C=C, HW=H * W, classes=classes, flops=x.numel() + 2 * N * C * classes,
                  bytes=x.numel() * x.element_size() + (classes * C + out.numel()) * packed.element_size()
                  + (4 * classes if bias is not None else 0)),
    ).launch()
    return out


def avgpool_linear(x, weight, bias=None, *, out=None):
    """``mean_hw(x) @ weight.T + bias`` for channels_last x and an nn.Linear ``weight``/``bias``.

    Packs the weight on every call: models should pack once and call ``avgpool_linear_packed``.
    """
    if weight.dim() != 2:
        raise ValueError(f"avgpool_linear: weight must be [classes, C], got shape {tuple(weight.shape)}")
    if bias is not None:
        bias = bias.float()
    return avgpool_linear_packed(x, pack_linear_weight(weight), bias, out=out)


def avgpool_linear_ref(x, weight, bias=None, *, upcast=False):
    out_dtype = x.dtype
    if upcast:
        x, weight = x.float(), weight.float()
    pooled = x.mean(dim=(2, 3))
    bias = bias.to(pooled.dtype) if bias is not None else None
    return F.linear(pooled, weight, bias).to(out_dtype)


def avgpool_linear_8bit_ref(x, weight, bias=None):
    """Reference of ``avgpool_linear_8bit_packed``: ``weight`` [classes, C] fp32 with the activation
    scale folded in, ``x`` int8 / e4m3; fp32 pooling and product, fp32 logits."""
    return F.linear(x.float().mean(dim=(2, 3)), weight.float(), bias.float() if bias is not None else None)
