"""The 8-bit step kinds of a quantized plan (``fastres.quantize``): their pack, launch and reference.

``fastres.ir``'s op table holds one row per kind; this module holds the functions of the 8-bit
rows, so the quantization numerics stay in one place:

    quantize     float [N, C, H, W] -> 8-bit, per-tensor scale: sat(round_half_even(x / s)) for
                 int8, e4m3_rn(clamp(x / s, +-448)) for fp8; for the ROW_K stem it writes the
                 zero-bordered 4-channel layout the stem reads (zero is exact: symmetric scales).
                 attrs pixels=True: uint8 pixels p [N, 3, H, W] (channels_last: the images' NHWC
                 bytes) -> int8 p - 128, exact, inside a zero border of the stem's padding on
                 every side (``pixel_stem`` below: the stem then corrects the border exactly)
    dequantize   8-bit -> fp32: q * s
    qconv        an 8-bit ``conv2d_nhwc`` (int8 x int8 -> int32, or e4m3 -> fp32) with the
                 requantizing epilogue (``kernels.conv2d_nhwc.QuantEpilogue``); reference
                 ``conv2d_nhwc_8bit_ref`` (exact accumulation, the same fp32 roundings)
    qconv_pair   a bottleneck's 3x3 -> 1x1 qconvs in one ``conv3x3_conv1x1_nhwc`` launch (8-bit):
                 the mid tile requantized in registers (``mid_acc_scale``, ``mid_inv_scale``), never
                 written; reference ``conv3x3_conv1x1_nhwc_8bit_ref`` (the two qconv references)
    qhead        average pool + Linear of an 8-bit map, fp32 (``avgpool_linear_8bit_packed``)

``max_pool`` runs unchanged on 8-bit values (a maximum commutes with a monotone quantization: the
output keeps the input's scale). Step tensors: ``weight`` 8-bit in PyTorch layout (the stem's
padded to 4 input channels), ``shortcut_weight`` 8-bit, ``bias`` and ``acc_scale`` fp32 [C_out].
Step attrs as a ``conv`` step's, plus ``out_dtype``, ``out_inv_scale`` (8-bit out) and
``residual_scale`` (with a residual); the scalars are fp32 values. A ``qconv_pair`` holds the 1x1's
tensors and attrs as a ``qconv`` does, the 3x3's as ``mid_weight``, ``mid_bias``, ``mid_acc_scale``
and ``mid_inv_scale`` (its stride, padding and dilation are the step's). The stem of a plan over
uint8 pixels (``pixel_stem``) also has tensor ``input_offset`` and attr ``input_offset_padding``.
"""
from __future__ import annotations

import dataclasses

import torch

from .kernels import avgpool_linear as _avgpool_linear
from .kernels import conv2d_nhwc as _conv
from .kernels import conv3x3_conv1x1_nhwc as _pair

INT8_MAX = 127.0
E4M3_MAX = 448.0
QMAX = {torch.int8: INT8_MAX, torch.float8_e4m3fn: E4M3_MAX}


def fp32(v: float) -> float:
    """``v`` rounded to the nearest fp32 value (the scalars a kernel receives are fp32)."""
    return float(torch.tensor(v, dtype=torch.float32))


def quantize_tensor(x: torch.Tensor, inv_scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``x`` (any float dtype) to ``dtype`` with one fp32 multiply by ``inv_scale`` = 1/s, then
    int8: clamp to [-128, 127] and round half to even; e4m3: clamp to +-448 and round to nearest
    even (the rounding of the conv epilogue)."""
    z = x.float() * torch.tensor(inv_scale, dtype=torch.float32)
    if dtype == torch.int8:
        return torch.round(z.clamp_(-128.0, 127.0)).to(torch.int8)
    if dtype == torch.float8_e4m3fn:
        return z.clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    raise TypeError(f"quantize to int8 or float8_e4m3fn, not {dtype}")


def _into(out, y):
    return out.copy_(y) if out is not None else y


# -- quantize / dequantize -----------------------------------------------------------------------
PIXEL_OFFSET = 128      # uint8 pixel p -> int8 p - 128 (its top bit flipped)


def quantize_reference(step, args, out, upcast):
    a, x = step.attrs, args["x"]
    if a.get("pixels"):
        return _into(out, _bordered_pixels(x, a["stem_border"][0]))
    q = quantize_tensor(x, a["inv_scale"], a["dtype"])
    if a.get("stem_border"):
        # the ROW_K stem's input: zero border (the conv's zero padding) and channels padded to 4
        padding, stride = a["stem_border"]
        top, bottom, left, right = _conv.stem_input_padding(x.shape[2], x.shape[3], padding, stride)
        n, c, h, w = q.shape
        bordered = q.new_zeros(n, h + top + bottom, w + left + right, _conv.STEM_CHANNELS)
        bordered[:, top:top + h, left:left + w, :c] = q.permute(0, 2, 3, 1)
        q = bordered.permute(0, 3, 1, 2)
    else:
        q = q.contiguous(memory_format=torch.channels_last)
    return _into(out, q)


def _bordered_pixels(x, padding):
    """uint8 [N, 3, H, W] -> int8 [N, 4, H + 2p, W + 2p] channels_last: p - 128 inside, 0 in the
    border and the 4th channel (the stem's layout; an exact conversion, no scale)."""
    if x.dtype != torch.uint8:
        raise TypeError(f"the pixel stem takes uint8 pixels, got {x.dtype}")
    n, c, h, w = x.shape
    bordered = x.new_zeros((n, h + 2 * padding, w + 2 * padding, _conv.STEM_CHANNELS), dtype=torch.int8)
    bordered[:, padding:padding + h, padding:padding + w, :c] = x.permute(0, 2, 3, 1).view(torch.int8) ^ -128
    return bordered.permute(0, 3, 1, 2)


def quantize_out_shape(step, shapes):
    n, c, h, w = shapes["x"]
    if not step.attrs.get("stem_border"):
        return (n, c, h, w)
    if step.attrs.get("pixels"):
        p = step.attrs["stem_border"][0]
        return (n, _conv.STEM_CHANNELS, h + 2 * p, w + 2 * p)
    padding, stride = step.attrs["stem_border"]
    top, bottom, left, right = _conv.stem_input_padding(h, w, padding, stride)
    return (n, _conv.STEM_CHANNELS, h + top + bottom, w + left + right)


def quantize_describe(step):
    if step.attrs.get("pixels"):
        return ["uint8 pixels - 128 -> int8+stem border"]
    return [f"quantize/{_dtype_name(step.attrs['dtype'])}" + ("+stem border" if step.attrs.get("stem_border") else "")]


def dequantize_reference(step, args, out, upcast):
    x = args["x"]
    y = x.float() * torch.tensor(step.attrs["scale"], dtype=torch.float32)
    if y.dim() == 4:
        y = y.contiguous(memory_format=torch.channels_last)
    return _into(out, y)


# -- qconv ---------------------------------------------------------------------------------------
def qconv_epilogue(step) -> _conv.QuantEpilogue:
    a = step.attrs
    return _conv.QuantEpilogue(acc_scale=step.tensors["acc_scale"], out_dtype=a["out_dtype"],
                               out_inv_scale=a.get("out_inv_scale"), residual_scale=a.get("residual_scale"))


def qconv_pack(step):
    t = step.tensors
    if step.attrs.get("row_k"):
        return _conv.pack_conv_weight(t["weight"], row_k=True)
    return _conv.pack_conv_weight(t["weight"], groups=step.attrs["groups"], shortcut_weight=t.get("shortcut_weight"))


def _residual_kwargs(step):
    a = step.attrs
    kw = dict(residual_stride=a.get("residual_stride", 1), residual_channel_offset=a.get("residual_channel_offset", 0))
    if "input_offset" in step.tensors:
        kw["input_offset"] = (step.tensors["input_offset"], a["input_offset_padding"])
    return kw


def qconv_launch(step, args, packed, out):
    a = step.attrs
    return _conv.conv2d_nhwc_packed(
        args["x"], packed, step.tensors["bias"], stride=a["stride"], padding=a["padding"], dilation=a["dilation"],
        residual=args.get("residual"), relu=a["relu"], shortcut=args.get("shortcut"),
        shortcut_stride=a.get("shortcut_stride", 1), out=out, quant=qconv_epilogue(step), **_residual_kwargs(step))


def qconv_reference(step, args, out, upcast):
    a, t = step.attrs, step.tensors
    y = _conv.conv2d_nhwc_8bit_ref(
        args["x"], t["weight"], t["bias"], qconv_epilogue(step), stride=a["stride"], padding=a["padding"],
        dilation=a["dilation"], groups=a["groups"], residual=args.get("residual"), relu=a["relu"],
        shortcut=args.get("shortcut"), shortcut_weight=t.get("shortcut_weight"),
        shortcut_stride=a.get("shortcut_stride", 1), **_residual_kwargs(step))
    return _into(out, y)


def qconv_describe_suffix(step):
    a = step.attrs
    x = _dtype_name(step.tensors["weight"].dtype)
    return ([f"{x} x {x} -> {'int32' if x == 'int8' else 'fp32'}"]
            + (["exact border offset"] if "input_offset" in step.tensors else [])
            + [f"requantize -> {_dtype_name(a['out_dtype'])}"])


# -- qconv_pair ----------------------------------------------------------------------------------
def qconv_pair_mid_epilogue(step) -> _conv.QuantEpilogue:
    """The 3x3's requantization of a ``qconv_pair``: to the operands' 8-bit dtype, by 1 / s_mid."""
    t = step.tensors
    return _conv.QuantEpilogue(acc_scale=t["mid_acc_scale"], out_dtype=t["mid_weight"].dtype,
                               out_inv_scale=step.attrs["mid_inv_scale"])


def qconv_pair_pack(step):
    t = step.tensors
    return _pair.pack_conv3x3_conv1x1(t["mid_weight"], t["weight"], shortcut_weight=t.get("shortcut_weight"))


def qconv_pair_launch(step, args, packed, out):
    a, t = step.attrs, step.tensors
    return _pair.conv3x3_conv1x1_nhwc_packed(
        args["x"], packed, t["mid_bias"], t["bias"], stride=a["stride"], padding=a["padding"], dilation=a["dilation"],
        residual=args.get("residual"), shortcut=args.get("shortcut"), shortcut_stride=a.get("shortcut_stride", 1),
        out=out, quant_mid=qconv_pair_mid_epilogue(step), quant=qconv_epilogue(step))


def qconv_pair_reference(step, args, out, upcast):
    a, t = step.attrs, step.tensors
    y = _pair.conv3x3_conv1x1_nhwc_8bit_ref(
        args["x"], t["mid_weight"], t["mid_bias"], t["weight"], t["bias"], qconv_pair_mid_epilogue(step),
        qconv_epilogue(step), stride=a["stride"], padding=a["padding"], dilation=a["dilation"], groups=1,
        residual=args.get("residual"), shortcut=args.get("shortcut"), shortcut_weight=t.get("shortcut_weight"),
        shortcut_stride=a.get("shortcut_stride", 1))
    return _into(out, y)


def split_qconv_pair(step) -> list:
    """A ``qconv_pair`` as the two ``qconv`` steps it fuses (what ``qconv_pair_reference`` computes:
    the 3x3 + ReLU requantized to the mid scale, then the 1x1 with the pair's shortcut, residual and
    epilogue), the mid value named ``<step output>:mid``; any other step as itself. (Steps made with
    ``dataclasses.replace``: ir imports this module, not the other way round.)"""
    if step.kind != "qconv_pair":
        return [step]
    a, t = step.attrs, step.tensors
    mid = f"{step.output}:mid"
    head, _, tail = step.name.partition("+")           # "layer1.0.conv2+conv3"
    first = dataclasses.replace(
        step, kind="qconv", name=head, inputs={"x": step.inputs["x"]}, output=mid,
        attrs=dict(stride=a["stride"], padding=a["padding"], dilation=a["dilation"], groups=1, relu=True,
                   out_dtype=t["mid_weight"].dtype, out_inv_scale=a["mid_inv_scale"]),
        tensors=dict(weight=t["mid_weight"], bias=t["mid_bias"], acc_scale=t["mid_acc_scale"]),
        fused=(), packed={}, extra_outputs=())
    attrs = {k: v for k, v in a.items() if k != "mid_inv_scale"}
    attrs.update(stride=type(a["stride"])((1, 1)), padding=type(a["padding"])((0, 0)),
                 dilation=type(a["dilation"])((1, 1)))
    second = dataclasses.replace(
        step, kind="qconv", name=".".join(filter(None, (head.rpartition(".")[0], tail or head + ":1x1"))),
        inputs=dict(step.inputs, x=mid), attrs=attrs,
        tensors={k: v for k, v in t.items() if not k.startswith("mid_")}, packed={}, extra_outputs=())
    return [first, second]


# -- qhead ---------------------------------------------------------------------------------------
def qhead_pack(step):
    return _avgpool_linear.pack_linear_weight(step.tensors["weight"])


def qhead_launch(step, args, packed, out):
    return _avgpool_linear.avgpool_linear_8bit_packed(args["x"], packed, step.tensors["bias"], out=out)


def qhead_reference(step, args, out, upcast):
    return _into(out, _avgpool_linear.avgpool_linear_8bit_ref(args["x"], step.tensors["weight"], step.tensors["bias"]))


def _dtype_name(dtype) -> str:
    return {torch.int8: "int8", torch.float8_e4m3fn: "e4m3"}.get(dtype, str(dtype).removeprefix("torch."))
