"""``fastres.quantize``: INT8 / FP8 inference with calibration, checked.

    qmodel = fastres.quantize(model.eval(), calibration_batches, dtype="int8")
    print(qmodel.report)                  # per-step cosine / relative error against fp32
    logits = qmodel(images)               # float NCHW in (as the eval model takes), fp32 logits out

What it does:

1. captures the model's fp32 plan (``fastres.capture``; a fused 3x3 -> 1x1 ``conv_pair`` is split
   back into its two convolutions, each calibrated and quantized on its own);
2. runs it on the calibration batches and keeps a histogram of |x| of every value a step writes
   (``Histogram``: 2048 bins over a range that doubles as larger values come);
3. chooses one scale per activation tensor (``choose_scale``: ``percentile`` of |x|, ``minmax``,
   or the clip of least squared quantization error, ``mse``) and per-output-channel symmetric
   weight scales after BN folding (``quantize_conv_weight``);
4. builds the quantized plan (``build_quantized_plan``): ``quantize`` the float input (into the
   stem's zero-bordered 4-channel layout), ``qconv`` steps (8-bit in, 8-bit out, the residual
   added in fp32 in the epilogue and the sum requantized once), ``max_pool`` on 8-bit values,
   ``qhead`` (average pool + Linear in fp32 from the 8-bit map). A step with no 8-bit kind
   (a PyTorch call, SE gating, a second BN output, a non-global pool) runs in fp32 between a
   ``dequantize`` and a ``quantize``. A bottleneck's 3x3 and 1x1 ``qconv`` that the fused kernel
   runs (``fuses_conv3x3_conv1x1`` for 8-bit operands) become one ``qconv_pair`` (``paired_qconvs``:
   the mid tensor is requantized in registers, never written).
   The module also holds the plan over uint8 pixels (``pixel_plan``): int8 p - 128 into a stem
   with the normalisation folded into its weights and the border corrected exactly in its
   accumulator (``forward_uint8``, and what ``fastres.Engine`` runs on uint8 images);
5. runs both plans on the first calibration batch(es) and reports, per step, the cosine and the
   relative L2 error of its output against fp32, end to end and for the step alone (its inputs the
   quantized fp32 values); ``min_cosine`` raises ``QuantizationError`` naming the worst steps.

Numerics: symmetric scales (zero point 0, so zero padding and ReLU's zeros are exact); int8
activations use [-128, 127] (post-ReLU values use half of it: no unsigned range yet), weights
[-127, 127]; e4m3 values +-448. The epilogue's formula and roundings are
``kernels.conv2d_nhwc.QuantEpilogue``'s. A projection shortcut stays concatenated K: one int32
accumulator, so both weights share the accumulator scale t[c] = max(s_x amax(W[c]),
s_sc amax(W_sc[c])) / qmax (the branch with the smaller products uses less than the full range).

Backends: CUDA tensors run the Triton 8-bit kernels (int8 on sm_80+, e4m3 on sm_89+); CPU tensors
run the CPU backend's program: int8 convs on oneDNN's int8 convolution (``onednn::qconv2d_pointwise``
for the exact int32 accumulation and ``acc * acc_scale``, the rest of the epilogue as PyTorch ops:
bit for bit the integer reference, ``fastres.backend._Int8Conv``), everything else (and all of
e4m3) on the integer reference (``conv2d_nhwc_8bit_ref``: exact accumulation in float64, the
kernel's fp32 epilogue); ``fastres.use_backend("reference")`` runs the reference throughout, and the
Triton kernels run under ``TRITON_INTERPRET=1`` with ``fastres.use_backend("triton")``.

The quantized model is a snapshot: it holds its own 8-bit weights and scales, so later edits of
the float model do not reach it (PyTorch steps of the plan still call the model's own layers).
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import types
from typing import Optional

import torch
from torch import nn

from .backend import backend_for, get_backend
from .ir import OPS, Plan, Ref, Step, bind_refs
from .ir_quant import PIXEL_OFFSET, QMAX, fp32, quantize_reference, quantize_tensor
from .kernels import conv2d_nhwc as _conv
from .kernels.conv3x3_conv1x1_nhwc import fuses_conv3x3_conv1x1
from .quantized import DTYPES, QuantizedModel, export_quantized, is_quantized_file, load_quantized  # noqa: F401

__all__ = ["quantize", "QuantizedModel", "QuantizationError", "QuantReport", "Histogram", "choose_scale",
           "quantize_conv_weight", "build_quantized_plan", "export_quantized", "load_quantized", "image_batches",
           "shape_only_plan", "pixel_plan", "DTYPES", "METHODS"]

METHODS = ("percentile", "minmax", "mse")
CALIBRATION_CHUNK = 64          # a 4-D calibration tensor is split into batches of this many images
REPORT_IMAGES = 64              # the report runs on at most this many of the first calibration images


class QuantizationError(RuntimeError):
    """The quantized model failed its accuracy check (``min_cosine``); ``.report`` has every step."""

    def __init__(self, message: str, report: "QuantReport"):
        super().__init__(message)
        self.report = report


# -- calibration statistics ------------------------------------------------------------------------
class Histogram:
    """Histogram of |x| over [0, top] in ``bins`` equal bins; ``top`` doubles (adjacent bins merge)
    whenever a batch brings a larger value, so one pass over the data suffices."""

    def __init__(self, bins: int = 2048):
        if bins < 2 or bins & (bins - 1):
            raise ValueError(f"bins must be a power of two >= 2, got {bins}")
        self.bins, self.top, self.counts, self.amax = bins, 0.0, None, 0.0

    def add(self, x: torch.Tensor) -> None:
        a = x.detach().float().abs().flatten()
        if not a.numel():
            return
        amax = float(a.max())
        if not math.isfinite(amax):
            raise ValueError("calibration produced a non-finite activation (inf or NaN)")
        self.amax = max(self.amax, amax)
        if self.counts is None:
            self.top = amax if amax > 0 else 1e-12
            self.counts = torch.zeros(self.bins, dtype=torch.float64)
        while amax > self.top:         # double the range: merge bin pairs into the lower half
            self.counts = torch.cat([self.counts.view(-1, 2).sum(1), torch.zeros(self.bins // 2, dtype=torch.float64)])
            self.top *= 2
        self.counts += torch.histc(a, self.bins, 0.0, self.top).double().cpu()

    @property
    def edges(self) -> torch.Tensor:
        return torch.linspace(0.0, self.top, self.bins + 1, dtype=torch.float64)

    def percentile(self, p: float) -> float:
        """The upper edge of the bin holding the p-th percentile of |x|."""
        cdf = self.counts.cumsum(0) / self.counts.sum()
        i = int(torch.searchsorted(cdf, torch.tensor(p / 100.0, dtype=torch.float64)).clamp(max=self.bins - 1))
        return float(self.edges[i + 1])


def _fake_quantize(v: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """v (float64) quantized with ``scale`` and dequantized (for choosing scales)."""
    if dtype == torch.int8:
        return (v / scale).round().clamp(-128, 127) * scale
    return (v / scale).clamp(-448, 448).float().to(torch.float8_e4m3fn).double() * scale


def choose_scale(hist: Histogram, method: str, dtype: torch.dtype, percentile: float = 99.99) -> float:
    """The per-tensor scale s (x ~ q * s) of an activation: clip / qmax, the clip being

    minmax       the largest |x| seen
    percentile   the ``percentile``-th percentile of |x| (bin upper edge), at most the largest
    mse          the clip (among 128 candidates up to the largest) of least squared error over the
                 histogram, each bin at its centre: clipping error above, rounding error below
    """
    qmax = QMAX[dtype]
    if hist.counts is None or hist.amax == 0:
        return fp32(1.0 / qmax)         # never saw a nonzero value: any scale represents zero
    if method == "minmax":
        clip = hist.amax
    elif method == "percentile":
        clip = min(hist.percentile(percentile), hist.amax)
    elif method == "mse":
        centres = (hist.edges[:-1] + hist.edges[1:]) / 2
        best = None
        for k in range(1, 129):
            clip = hist.amax * k / 128
            err = float((hist.counts * (centres - _fake_quantize(centres, clip / qmax, dtype)) ** 2).sum())
            if best is None or err < best[0]:
                best = (err, clip)
        clip = best[1]
    else:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    return fp32(max(clip, 1e-30) / qmax)


# -- weights ---------------------------------------------------------------------------------------
def _to_8bit(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.int8:
        return v.round().clamp(-127, 127).to(torch.int8)
    return v.clamp(-448, 448).float().to(torch.float8_e4m3fn)


def quantize_conv_weight(weight: torch.Tensor, x_scale: float, dtype: torch.dtype, shortcut_weight=None,
                         shortcut_scale: Optional[float] = None):
    """Per-output-channel symmetric quantization of a folded conv weight [C_out, C_in/g, KH, KW]
    (and its concatenated-K projection shortcut): returns (weight_q, shortcut_q or None, acc_scale),
    acc_scale[c] (fp32) = s_x * s_w[c] the scale of the accumulator, shared by both GEMMs of a
    concat-K conv: t[c] = max(s_x amax(W[c]), s_sc amax(W_sc[c])) / qmax and
    W_q = q(W s_x / t), W_sc_q = q(W_sc s_sc / t) (see the module docstring)."""
    qmax = QMAX[dtype]
    w = weight.detach().double()
    t = x_scale * w.abs().amax(dim=(1, 2, 3)) / qmax
    if shortcut_weight is not None:
        sc = shortcut_weight.detach().double()
        t = torch.maximum(t, shortcut_scale * sc.abs().amax(dim=(1, 2, 3)) / qmax)
    acc_scale = torch.where(t > 0, t, torch.full_like(t, x_scale / qmax)).float()
    t = acc_scale.double().view(-1, 1, 1, 1)
    weight_q = _to_8bit(w * x_scale / t, dtype)
    shortcut_q = _to_8bit(sc * shortcut_scale / t, dtype) if shortcut_weight is not None else None
    return weight_q, shortcut_q, acc_scale.contiguous()


# -- plans -----------------------------------------------------------------------------------------
def _unpaired(steps: list) -> list:
    """``conv_pair`` steps split back into their 3x3 and 1x1 ``conv`` steps (each quantized alone)."""
    out = []
    for s in steps:
        if s.kind != "conv_pair":
            out.append(s)
            continue
        a, t = s.attrs, s.tensors
        first, _, second = s.name.partition("+")
        mid_value = f"{first}:out"
        out.append(Step("conv", first, {"x": s.inputs["x"]}, mid_value,
                        dict(stride=a["stride"], padding=a["padding"], dilation=a["dilation"], groups=a["groups"],
                             relu=True), {"weight": t["mid_weight"], "bias": t["mid_bias"]}))
        last_attrs = dict(stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, relu=True)
        if "shortcut_stride" in a:
            last_attrs["shortcut_stride"] = a["shortcut_stride"]
        tensors = {k: t[k] for k in ("weight", "bias", "shortcut_weight") if k in t}
        out.append(Step("conv", f"{first.rpartition('.')[0]}.{second}" if second else s.name,
                        dict(s.inputs, x=mid_value), s.output, last_attrs, tensors, s.fused))
    return out


def float_plan(plan: Plan) -> Plan:
    """``plan`` (fp32) with its ``conv_pair`` steps split: the plan calibration runs."""
    return Plan(steps=_unpaired(plan.steps), output=plan.output, dtype=plan.dtype, device=plan.device,
                input_name=plan.input_name, in_channels=plan.in_channels, notes=list(plan.notes))


def _eight_bit_kind(step: Step) -> bool:
    if step.kind == "conv":
        return not step.extra_outputs
    if step.kind == "head":
        return step.attrs.get("pool") != "width"
    return step.kind == "max_pool"


def build_quantized_plan(plan: Plan, scales: dict, dtype: torch.dtype) -> tuple[Plan, dict]:
    """The 8-bit plan of an fp32 ``float_plan`` and per-value activation ``scales`` (see the module
    docstring). Returns (plan, value scales): the scale of every 8-bit value by its name in the new
    plan (an 8-bit version of value v is v itself when a step writes it, ``v:q`` when a
    ``quantize`` step makes it; a float copy of an 8-bit v is ``v:f``)."""
    steps = plan.steps
    readers: dict = {}
    for s in steps:
        for role, name in s.inputs.items():
            readers.setdefault(name, []).append((s, role))
    outputs = set(plan.output_names)
    eight_bit = {id(s) for s in steps if _eight_bit_kind(s)}

    def read_8bit(name):
        return any(id(s) in eight_bit for s, _ in readers.get(name, ()))

    def read_float(name):
        return name in outputs or any(id(s) not in eight_bit for s, _ in readers.get(name, ()))

    q_name, f_name, value_scale = {}, {}, {}
    bordered = set()            # quantize outputs in the ROW_K stem's zero-bordered 4-channel layout
    new_steps = []

    def quantize_step(name, stem_border=None):
        s = scales[name]
        q = f"{name}:q"
        new_steps.append(Step("quantize", f"quantize {name}", {"x": f_name[name]}, q,
                              dict(dtype=dtype, scale=s, inv_scale=fp32(1.0 / s), stem_border=stem_border)))
        q_name[name], value_scale[q] = q, s
        if stem_border:
            bordered.add(q)

    def dequantize_step(name):
        f = f"{name}:f"
        new_steps.append(Step("dequantize", f"dequantize {name}", {"x": q_name[name]}, f,
                              dict(scale=value_scale[q_name[name]])))
        f_name[name] = f

    # the plan input: float, quantized once for its 8-bit readers (for the ROW_K stem, bordered)
    inp = plan.input_name
    f_name[inp] = inp
    if read_8bit(inp):
        stems = [s for s, _ in readers[inp] if id(s) in eight_bit and s.attrs.get("padded_input")]
        border = None
        if len(stems) == 1 and len(readers[inp]) == 1:
            a = stems[0].attrs
            border = (a["padding"][0], a["stride"][0])
        quantize_step(inp, border)

    for s in steps:
        if id(s) not in eight_bit:
            for name in s.inputs.values():          # float readers of 8-bit-only values
                if name not in f_name:
                    dequantize_step(name)
            step = dataclasses.replace(s, inputs={r: f_name[n] for r, n in s.inputs.items()}, packed={})
            new_steps.append(step)
            for name in s.outputs:
                f_name[name] = name
                if read_8bit(name):
                    quantize_step(name)
            continue
        for name in s.inputs.values():               # 8-bit readers of float-only values
            if name not in q_name:
                quantize_step(name)
        inputs = {r: q_name[n] for r, n in s.inputs.items()}
        out = s.output
        if s.kind == "max_pool":
            new_steps.append(dataclasses.replace(s, inputs=inputs, packed={}))
            q_name[out], value_scale[out] = out, value_scale[inputs["x"]]
        elif s.kind == "head":
            s_x = value_scale[inputs["x"]]
            weight = (s.tensors["weight"].detach().double() * s_x).float().contiguous()
            new_steps.append(Step("qhead", s.name, inputs, out, dict(s.attrs),
                                  {"weight": weight, "bias": s.tensors["bias"].float().contiguous()}, s.fused))
            f_name[out] = out
        else:
            new_steps.append(_qconv_step(s, inputs, value_scale, scales, dtype, eight_bit_out=read_8bit(out),
                                         bordered=inputs["x"] in bordered))
            if read_8bit(out):
                q_name[out], value_scale[out] = out, scales[out]
            else:
                f_name[out] = out
        if out in q_name and read_float(out) and out not in f_name:
            dequantize_step(out)
    output = bind_refs(plan.output, {n: Ref(f_name[n]) for n in plan.output_names})
    new_steps = paired_qconvs(new_steps, {f_name[n] for n in plan.output_names})
    qplan = Plan(steps=new_steps, output=output, dtype=torch.float32, device=plan.device, input_name=inp,
                 in_channels=plan.in_channels, notes=list(plan.notes))
    return qplan, value_scale


def _qconv_step(s: Step, inputs: dict, value_scale: dict, scales: dict, dtype, *, eight_bit_out: bool,
                bordered: bool) -> Step:
    """The ``qconv`` of fp32 conv step ``s``; ``bordered``: its x is the stem's bordered input."""
    a, t = dict(s.attrs), s.tensors
    a.pop("padded_input", None)
    s_x = value_scale[inputs["x"]]
    s_sc = value_scale[inputs["shortcut"]] if "shortcut" in inputs else None
    weight_q, shortcut_q, acc_scale = quantize_conv_weight(t["weight"].float(), s_x, dtype, t.get("shortcut_weight"),
                                                           s_sc)
    if bordered:
        weight_q = _conv.pad_stem_weight(weight_q)
        a.update(padding=(0, 0), row_k=True)
    tensors = {"weight": weight_q.contiguous(), "bias": t["bias"].float().contiguous(), "acc_scale": acc_scale}
    if shortcut_q is not None:
        tensors["shortcut_weight"] = shortcut_q.contiguous()
    if eight_bit_out:
        a.update(out_dtype=dtype, out_inv_scale=fp32(1.0 / scales[s.output]))
    else:
        a.update(out_dtype=torch.float32)
    if "residual" in inputs:
        a["residual_scale"] = value_scale[inputs["residual"]]
    return Step("qconv", s.name, inputs, s.output, a, tensors, s.fused)


def _pairs(first: Step, second: Step, readers: dict, outputs: set) -> bool:
    """Whether ``second`` (the only reader of ``first``'s output) and ``first`` are a bottleneck's
    3x3 -> 1x1 the fused 8-bit kernel runs: a 3x3 qconv + ReLU to 8-bit, groups 1, nothing else read;
    a 1x1/s1 qconv + ReLU reading it, with at most a projection shortcut and a same-shape residual."""
    if not first.kind == second.kind == "qconv":
        return False
    a, b = first.attrs, second.attrs
    w_mid, w = first.tensors["weight"], second.tensors["weight"]
    return (set(first.inputs) == {"x"} and second.inputs["x"] == first.output
            and readers.get(first.output) == 1 and first.output not in outputs
            and tuple(w_mid.shape[2:]) == (3, 3) and a["groups"] == 1 and a["relu"] and not a.get("row_k")
            and a["out_dtype"] == w_mid.dtype
            and tuple(w.shape[2:]) == (1, 1) and tuple(b["stride"]) == (1, 1) and tuple(b["padding"]) == (0, 0)
            and b["groups"] == 1 and b["relu"] and not set(b) & {"residual_stride", "residual_channel_offset",
                                                                "residual_pad"}
            and set(second.inputs) <= {"x", "residual", "shortcut"}
            and fuses_conv3x3_conv1x1(w_mid.shape[0], w_mid.shape[1], w.shape[0], 1, w_mid.dtype))


def paired_qconvs(steps: list, outputs: set) -> list:
    """``steps`` with each 3x3 -> 1x1 pair of ``qconv`` steps the fused kernel runs (``_pairs``) as
    one ``qconv_pair`` in the 1x1's place: the 1x1's inputs (x: the 3x3's), output, tensors and
    attrs, the 3x3's stride, padding and dilation, its weight, bias and accumulator scale as
    ``mid_*`` and its output scale as ``mid_inv_scale``. ``outputs``: the plan's output values."""
    readers: dict = {}
    for s in steps:
        for name in s.inputs.values():
            readers[name] = readers.get(name, 0) + 1
    producer = {s.output: s for s in steps}
    firsts = {id(producer[s.inputs["x"]]) for s in steps
              if s.kind == "qconv" and s.inputs.get("x") in producer
              and _pairs(producer[s.inputs["x"]], s, readers, outputs)}
    out = []
    for s in steps:
        if id(s) in firsts:
            continue
        first = producer.get(s.inputs.get("x"))
        if first is None or id(first) not in firsts:
            out.append(s)
            continue
        a, t = first.attrs, first.tensors
        attrs = dict(s.attrs, stride=a["stride"], padding=a["padding"], dilation=a["dilation"],
                     mid_inv_scale=a["out_inv_scale"])
        tensors = dict(s.tensors, mid_weight=t["weight"], mid_bias=t["bias"], mid_acc_scale=t["acc_scale"])
        out.append(Step("qconv_pair", f"{first.name}+{s.name.rpartition('.')[2]}", dict(s.inputs, x=first.inputs["x"]),
                        s.output, attrs, tensors, first.fused + s.fused))
    return out


# -- uint8 pixels straight into the stem ----------------------------------------------------------
PIXELS = "uint8 pixels"       # the input value of a pixel plan (a space: no traced value has one)


def pixel_plan(fplan: Plan, qplan: Plan, mean, std) -> Optional[Plan]:
    """``qplan`` (from ``build_quantized_plan``) over uint8 pixels [N, 3, H, W] (channels_last: the
    images' NHWC bytes) instead of normalised float images: its first two steps (quantize into the
    stem's bordered layout, the stem) replaced by

        quantize    int8 q = p - 128, exact, in a zero border of the stem's padding
        the stem    an int8 conv with normalisation folded into it: W' = W / (255 std[c]) quantized
                    per output channel (acc_scale t[o], input scale 1: q is in pixel units), the
                    float stem's bias, output and scale; the accumulator corrected by
                    ``input_offset_table(W'_q, 255 mean - 128)`` for the output pixel's window

    so that the stem's accumulator is sum over the window's taps inside the image of
    W'_q * (p - 255 mean[c]): the normalised image (x / 255 - mean) / std convolved with its zero
    padding, whose zero is the non-integer pixel value 255 mean[c] (ImageNet: 123.675, ...). The
    one place that is not an integer is the correction (fp32, one rounding each for the table and
    the kernel's addition); the pixels need no quantization at all (no input rounding error).
    Always int8 (an fp8 model's stem too, writing e4m3): p - 128 is not exact in e4m3.

    None where the plan's input is not read by the bordered ROW_K stem alone (or the stem does not
    take 3 channels): such a plan takes normalised images only.
    """
    if len(qplan.steps) < 2:
        return None
    entry, stem = qplan.steps[0], qplan.steps[1]
    entry_values = {qplan.input_name, entry.output}
    if not (entry.kind == "quantize" and entry.attrs.get("stem_border") and entry.inputs == {"x": qplan.input_name}
            and stem.kind == "qconv" and stem.attrs.get("row_k") and stem.inputs == {"x": entry.output}
            and not any(entry_values & set(s.reads) for s in qplan.steps[2:])
            and qplan.input_name not in qplan.output_names):
        return None
    fstem = next((s for s in fplan.steps if s.name == stem.name and s.kind == "conv"), None)
    if fstem is None or fstem.tensors["weight"].shape[1] != 3 or len(mean) != 3 or len(std) != 3:
        return None
    a = fstem.attrs
    if a["padding"][0] != a["padding"][1]:
        return None
    per_channel = 255 * torch.tensor(std, dtype=torch.float64, device=fplan.device).view(1, 3, 1, 1)
    folded = fstem.tensors["weight"].detach().double() / per_channel
    weight_q, _, acc_scale = quantize_conv_weight(folded, 1.0, torch.int8)
    offset = [255 * m - PIXEL_OFFSET for m in mean]
    padding = tuple(a["padding"])
    tensors = {"weight": _conv.pad_stem_weight(weight_q).contiguous(), "bias": fstem.tensors["bias"].float().clone(),
               "acc_scale": acc_scale, "input_offset": _conv.input_offset_table(weight_q, offset, padding)}
    quantize_pixels = Step("quantize", "quantize pixels", {"x": PIXELS}, f"{PIXELS}:q",
                           dict(dtype=torch.int8, pixels=True, stem_border=(padding[0], a["stride"][0])))
    pixel_stem = Step("qconv", stem.name, {"x": quantize_pixels.output}, stem.output,
                      dict(stem.attrs, input_offset_padding=padding), tensors, stem.fused)
    return Plan(steps=[quantize_pixels, pixel_stem, *qplan.steps[2:]], output=qplan.output, dtype=qplan.dtype,
                device=qplan.device, input_name=PIXELS, in_channels=3, input_dtype=torch.uint8,
                notes=list(qplan.notes))


def _normalisation(model: nn.Module, mean, std) -> tuple:
    """(mean, std) the pixel stem folds: as given, else the model's export preprocessing, else ImageNet's."""
    from .engine import IMAGENET_MEAN, IMAGENET_STD

    pre = (getattr(model, "meta", None) or {}).get("preprocess") or {}
    stats = []
    for name, given, default in (("mean", mean, IMAGENET_MEAN), ("std", std, IMAGENET_STD)):
        values = given if given is not None else pre.get(name) or default
        try:
            values = tuple(float(v) for v in values)
        except (TypeError, ValueError):
            raise TypeError(f"fastres.quantize: {name} must be 3 numbers, got {values!r}") from None
        if len(values) != 3 or not all(math.isfinite(v) for v in values) or (name == "std" and 0 in values):
            raise ValueError(f"fastres.quantize: {name} must be 3 finite per-channel values (0-1 scale)"
                             + (", std nonzero" if name == "std" else "") + f", got {list(values)}")
        stats.append(values)
    return tuple(stats)


# -- running and reporting -----------------------------------------------------------------------
class _Recorder:
    """A backend that runs steps on ``base`` and hands every value a step writes to ``seen``."""

    def __init__(self, base, seen):
        self.base, self.seen, self.name = base, seen, base.name

    def prepare(self, step, op):
        return self.base.prepare(step, op)

    def layout(self, step, role, x):
        return self.base.layout(step, role, x)

    def run(self, step, op, args, out):
        y = self.base.run(step, op, args, out)
        for name, v in zip(step.outputs, y if step.extra_outputs else (y,)):
            self.seen(name, v)
        return y


def _run_recording(plan: Plan, x: torch.Tensor, backend) -> dict:
    values = {plan.input_name: x}

    def keep(name, v):
        values[name] = v
    with torch.no_grad():
        plan.run(x, _Recorder(backend, keep))
    return values


class _Agreement:
    """Running sums for the cosine and relative L2 error of ``got`` against ``ref`` (float64)."""

    def __init__(self):
        self.dot = self.got2 = self.ref2 = self.err2 = 0.0

    def add(self, got: torch.Tensor, ref: torch.Tensor) -> None:
        g, r = got.detach().double().flatten(), ref.detach().double().flatten()
        self.dot += float(g @ r)
        self.got2 += float(g @ g)
        self.ref2 += float(r @ r)
        self.err2 += float((g - r) @ (g - r))

    @property
    def cosine(self) -> float:
        if self.got2 == 0 and self.ref2 == 0:
            return 1.0
        return self.dot / math.sqrt(self.got2 * self.ref2) if self.got2 > 0 and self.ref2 > 0 else 0.0

    @property
    def rel_err(self) -> float:
        return math.sqrt(self.err2 / self.ref2) if self.ref2 > 0 else math.sqrt(self.err2)


@dataclasses.dataclass
class StepError:
    step: str
    kind: str
    value: str
    scale: Optional[float]
    cosine: float               # the quantized plan's value vs fp32's, end to end
    rel_err: float              # relative L2 error, end to end
    local_cosine: Optional[float] = None    # the step alone, from its quantized fp32 inputs
    local_rel_err: Optional[float] = None


@dataclasses.dataclass
class QuantReport:
    """Per-step quantization error of a quantized plan against its fp32 plan, on ``images`` inputs."""
    dtype: str
    method: str
    images: int
    steps: list
    output_cosine: float
    output_rel_err: float
    top1_agreement: Optional[float]     # share of images whose arg-max class agrees (classifiers)

    def worst(self, n: int = 3) -> list:
        """The ``n`` steps whose own quantization hurts most (lowest local cosine, else end to end)."""
        rated = [s for s in self.steps if s.kind in ("qconv", "qconv_pair", "qhead")]
        return sorted(rated, key=lambda s: s.local_cosine if s.local_cosine is not None else s.cosine)[:n]

    def __str__(self) -> str:
        head = [f"fastres.quantize: {self.dtype} ({self.method}), {self.images} images: output cosine "
                f"{self.output_cosine:.5f}, rel err {self.output_rel_err:.4f}"
                + (f", top-1 agreement {100 * self.top1_agreement:.2f}%" if self.top1_agreement is not None else "")]
        rows = [("step", "kind", "scale", "cosine", "rel err", "alone cos", "alone err")]
        for s in self.steps:
            rows.append((s.step, s.kind, f"{s.scale:.4g}" if s.scale is not None else "-", f"{s.cosine:.5f}",
                         f"{s.rel_err:.4f}", f"{s.local_cosine:.5f}" if s.local_cosine is not None else "-",
                         f"{s.local_rel_err:.4f}" if s.local_rel_err is not None else "-"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(head + lines)


def _dequantized(v: torch.Tensor, scale: Optional[float]) -> torch.Tensor:
    return v.float() * scale if v.dtype in (torch.int8, torch.float8_e4m3fn) else v.float()


def _origin(name: str) -> str:
    return name.rsplit(":", 1)[0] if name.endswith((":q", ":f")) else name


def measure(qplan: Plan, value_scale: dict, fplan: Plan, batches: list, backend, dtype_name: str,
            method: str) -> QuantReport:
    """``QuantReport`` of ``qplan`` against ``fplan`` on ``batches`` (run on ``backend``): both plans
    keep every value of one batch while it is compared (keep the batches small)."""
    producers = {s.output: s for s in qplan.steps}
    rows: dict = {}
    output, top1 = _Agreement(), []
    for x in batches:
        fv = _run_recording(fplan, x, backend)
        qv = _run_recording(qplan, x, backend)
        got, ref = bind_refs(qplan.output, qv), bind_refs(fplan.output, fv)
        if torch.is_tensor(got):
            output.add(got, ref)
            if got.dim() == 2:
                top1.append(got.argmax(1) == ref.argmax(1))
        for s in qplan.steps:
            if s.kind in ("quantize", "dequantize") or _origin(s.output) not in fv:
                continue
            ref = fv[_origin(s.output)]
            row = rows.setdefault(s.name, dict(step=s, end_to_end=_Agreement(), alone=None))
            row["end_to_end"].add(_dequantized(qv[s.output], value_scale.get(s.output)), ref)
            if s.kind in ("qconv", "qconv_pair", "qhead"):   # the step alone: its inputs the fp32 values, quantized
                args = {}
                for role, name in s.inputs.items():
                    src, f = producers.get(name), fv[_origin(name)]
                    if src is not None and src.kind == "quantize":     # (the stem's bordered layout)
                        args[role] = quantize_reference(src, {"x": f}, None, False)
                    else:
                        args[role] = quantize_tensor(f, fp32(1.0 / value_scale[name]), qv[name].dtype
                                                     ).contiguous(memory_format=torch.channels_last)
                with torch.no_grad():
                    y = backend.run(s, OPS[s.kind], args, None)
                row["alone"] = row["alone"] or _Agreement()
                row["alone"].add(_dequantized(y, value_scale.get(s.output)), ref)
        del fv, qv
    steps = []
    for row in rows.values():
        s, e2e, alone = row["step"], row["end_to_end"], row["alone"]
        steps.append(StepError(s.name, s.kind, s.output, value_scale.get(s.output), e2e.cosine, e2e.rel_err,
                               alone.cosine if alone else None, alone.rel_err if alone else None))
    return QuantReport(dtype_name, method, sum(x.shape[0] for x in batches), steps, output.cosine, output.rel_err,
                       float(torch.cat(top1).float().mean()) if top1 else None)


# -- the entry point -------------------------------------------------------------------------------
def image_batches(directory, meta: Optional[dict] = None, batch: int = CALIBRATION_CHUNK):
    """Normalised float [N, 3, crop, crop] batches of the images under ``directory``, preprocessed
    as ``fastres classify`` does for a model with this ``meta`` (resize / crop / mean / std of an
    export; ImageNet's by default). Unreadable files are skipped with a warning."""
    import warnings

    from .classify import find_images, preprocessing, read_image
    from .engine import IMAGENET_MEAN, IMAGENET_STD

    files, missing = find_images([os.fspath(directory)])
    if missing or not files:
        raise FileNotFoundError(f"calibration: no image files under {os.fspath(directory)}")
    resize, crop = preprocessing(meta or {})
    pre = (meta or {}).get("preprocess") or {}
    mean = torch.tensor(pre.get("mean") or IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(pre.get("std") or IMAGENET_STD).view(1, 3, 1, 1)
    images = []
    for path in files:
        image, error = read_image(path, resize, crop)
        if image is None:
            warnings.warn(f"calibration: skipped {path}: {error}")
            continue
        images.append(image)
        if len(images) == batch:
            yield (torch.stack(images).permute(0, 3, 1, 2).float() / 255 - mean) / std
            images = []
    if images:
        yield (torch.stack(images).permute(0, 3, 1, 2).float() / 255 - mean) / std


def _batches(calibration, num_batches: Optional[int], meta: Optional[dict] = None, stats: Optional[tuple] = None):
    if isinstance(calibration, (str, os.PathLike)):
        calibration = image_batches(calibration, meta)
    if torch.is_tensor(calibration):
        if calibration.dim() != 4:
            raise ValueError(f"a calibration tensor must be [N, C, H, W], got shape {tuple(calibration.shape)}")
        calibration = calibration.split(CALIBRATION_CHUNK)
    try:
        iterator = iter(calibration)
    except TypeError:
        raise TypeError(f"calibration must be an iterable of [N, C, H, W] float batches, got "
                        f"{type(calibration).__name__}") from None
    for i, batch in enumerate(iterator):
        if num_batches is not None and i >= num_batches:
            return
        if isinstance(batch, (tuple, list)) and batch:
            batch = batch[0]            # (images, labels) from a DataLoader
        if not torch.is_tensor(batch) or batch.dim() != 4:
            raise TypeError(f"calibration batch {i} must be a [N, C, H, W] tensor, got "
                            + (f"shape {tuple(batch.shape)}" if torch.is_tensor(batch) else type(batch).__name__))
        if batch.dtype == torch.uint8 and batch.shape[3] == 3 and stats is not None:
            # uint8 RGB pixels [N, H, W, 3]: normalised as the engine normalises them
            from .extension import preprocess
            batch = preprocess(batch.contiguous(), stats[0], stats[1], dtype=torch.float32, pad_channels_to=3)
        elif not batch.is_floating_point():
            raise TypeError(f"calibration batch {i} is {batch.dtype} {tuple(batch.shape)}: pass the float "
                            "(normalised) [N, C, H, W] images the model takes, or uint8 pixels [N, H, W, 3] (RGB)")
        yield batch


def quantize(model: nn.Module, calibration, *, dtype: str = "int8", method: str = "percentile",
             num_batches: Optional[int] = None, percentile: float = 99.99, progress: bool = True,
             min_cosine: Optional[float] = None, report_batches: int = 1, mean=None, std=None) -> QuantizedModel:
    """An 8-bit inference module of ``model`` (an fp32 module in eval mode; see the module docstring).

    ``calibration``: an iterable of float [N, C, H, W] batches as the model takes them, or of uint8
    RGB pixels [N, H, W, 3] (normalised with ``mean`` / ``std``) (or (images, labels) pairs, or one
    4-D tensor, split into batches of 64), or a directory of image files (``image_batches``: the
    model's export preprocessing); ``num_batches`` caps it. ``mean`` / ``std`` (0-1 scale, default
    the model's export preprocessing, else ImageNet's): the normalisation folded into the module's
    uint8 pixel stem (``pixel_plan``: what ``forward_uint8`` and ``fastres.Engine``'s uint8 input
    run) and applied to uint8 calibration batches.
    ``dtype``: "int8" or "fp8" (e4m3). ``method``: "percentile" (``percentile`` of |x|), "minmax" or
    "mse". ``progress``: a progress bar over the calibration batches. The first ``report_batches``
    batches (at most ``REPORT_IMAGES`` images: both plans keep every value of a report batch) also
    measure the ``QuantReport`` (``.report``); ``min_cosine``: raise
    ``QuantizationError`` (naming the worst steps) when the output's cosine to fp32 is below it.
    """
    from .capture import Unsupported, capture
    from .optimized import Optimized

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
        raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
    if min_cosine is not None and not -1 <= min_cosine <= 1:
        raise ValueError(f"min_cosine must be in [-1, 1], got {min_cosine}")
    if isinstance(model, Optimized):
        model = model.module
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastres.quantize takes an nn.Module, got {type(model).__name__}")
    if model.training:
        raise ValueError("fastres.quantize quantizes the eval forward: call model.eval() first")
    qdtype = DTYPES[dtype]
    stats = _normalisation(model, mean, std)
    try:
        plan = capture(model)
    except Unsupported as err:
        raise ValueError(f"fastres.quantize cannot capture this model: {err}") from None
    if plan.dtype != torch.float32:
        raise ValueError(f"fastres.quantize calibrates an fp32 model; this one computes in {plan.dtype} "
                         "(call .float() first)")
    fplan = float_plan(plan)
    backend = get_backend(backend_for(plan.device))
    hists: dict = {}
    kept = []

    def observe(name, v):
        if torch.is_tensor(v) and v.is_floating_point():
            hists.setdefault(name, Histogram()).add(v)
    from tqdm.auto import tqdm
    batches = _batches(calibration, num_batches, getattr(model, "meta", None), stats)
    seen = 0
    with torch.no_grad():
        for x in tqdm(batches, total=num_batches, desc=f"fastres.quantize ({dtype}, {method})", disable=not progress,
                      unit="batch"):
            x = x.to(plan.device, torch.float32)
            observe(fplan.input_name, x)
            fplan.run(x, _Recorder(backend, observe))
            if len(kept) < report_batches and sum(k.shape[0] for k in kept) < REPORT_IMAGES:
                kept.append(x[:REPORT_IMAGES - sum(k.shape[0] for k in kept)])
            seen += 1
    if not seen:
        raise ValueError("fastres.quantize: the calibration data holds no batch")
    scales = {name: choose_scale(h, method, qdtype, percentile) for name, h in hists.items()}
    qplan, value_scale = build_quantized_plan(fplan, scales, qdtype)
    report = measure(qplan, value_scale, fplan, kept, backend, dtype, method)
    qmodel = QuantizedModel(qplan, value_scale, report, dtype, method, pixel_plan=pixel_plan(fplan, qplan, *stats),
                            pixel_stats=stats)
    if min_cosine is not None and not report.output_cosine >= min_cosine:
        worst = ", ".join(f"{s.step} (alone {s.local_cosine:.4f}, end to end {s.cosine:.4f})"
                          if s.local_cosine is not None else f"{s.step} ({s.cosine:.4f})" for s in report.worst(3))
        raise QuantizationError(f"fastres.quantize: {dtype} output cosine {report.output_cosine:.4f} < min_cosine "
                                f"{min_cosine}; worst steps: {worst}", report)
    return qmodel


def shape_only_plan(model: nn.Module, dtype: str = "int8", pixels: bool = True) -> Plan:
    """The quantized plan of ``model`` with placeholder scales (every activation 1/qmax): its steps,
    shapes and kernel launches are those of a calibrated one, its numbers are not. For recording
    launches on the meta device (``fastres aot --dtype int8``, ``fastres inspect --dtype int8``).
    ``pixels``: the plan over uint8 pixels (``pixel_plan``, ImageNet's normalisation: what an 8-bit
    ``fastres.Engine`` runs on uint8 images) where the model has one."""
    from .capture import capture

    fplan = float_plan(capture(model, dtype=torch.float32))
    qdtype = DTYPES[dtype]
    names = [fplan.input_name] + [n for s in fplan.steps for n in s.outputs]
    qplan, _ = build_quantized_plan(fplan, dict.fromkeys(names, fp32(1.0 / QMAX[qdtype])), qdtype)
    return (pixels and pixel_plan(fplan, qplan, *_normalisation(model, None, None))) or qplan


class _CallableModule(types.ModuleType):
    """``fastres.quantize`` is both this module and its function: after ``import fastres.quantize``
    the package attribute is the module, so the module calls ``quantize`` too."""

    def __call__(self, *args, **kwargs):
        return quantize(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
