"""A quantized model (``fastres.quantize``'s result) and its file format (``fastres.export`` / ``load``).

``QuantizedModel`` runs an 8-bit plan (``fastres.ir_quant``'s step kinds); ``export_quantized`` writes
it as safetensors (tensors) + JSON (the steps, the activation scales, the report), and
``load_quantized`` rebuilds it from data only, validating every field. Here rather than in
``fastres.quantize`` so that ``fastres.checkpoint`` can read and write these files without importing
the calibration machinery (which imports the image pipeline, which imports ``checkpoint``).
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
from torch import nn

from .backend import backend_for, get_backend
from .ir import Plan, Ref, Step, ref_names

__all__ = ["QuantizedModel", "run_plan", "export_quantized", "load_quantized", "is_quantized_file", "FORMAT", "DTYPES"]

DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}


# -- the module ------------------------------------------------------------------------------------
def run_plan(plan: Plan, x: torch.Tensor, backend, buffers=None):
    """A quantized plan's output for ``x`` on ``backend``: how the module and ``fastres.Engine`` both
    run one (so an engine's logits are the module's; on CPU the backend's oneDNN program), ``buffers``
    the engine's preallocated ones (its static-buffer path runs the steps into them)."""
    if buffers is None:
        return backend.execute(plan, x)
    return plan.run(x, backend, buffers=buffers)


class QuantizedModel(nn.Module):
    """The inference module ``fastres.quantize`` returns: float NCHW images in (any float dtype; as
    the eval model takes them), the plan's outputs (logits in fp32) out. CUDA inputs run the Triton
    8-bit kernels; CPU inputs the CPU backend's program (int8 convs on oneDNN's int8 convolution, bit
    for bit the integer reference; ``fastres.use_backend("reference")`` runs the reference itself),
    or with ``fastres.use_backend("triton")`` under ``TRITON_INTERPRET=1`` the Triton kernels in the
    interpreter.

    ``report`` is the ``QuantReport`` of the calibration; ``scales`` the activation scale of every
    8-bit value; ``.to(device)`` moves the 8-bit weights (dtypes never change).

    ``pixel_plan`` (``fastres.quantize.pixel_plan``; None for a model whose stem cannot take them)
    is the same plan over uint8 RGB pixels, the normalisation ``pixel_stats`` = (mean, std) folded
    into its stem: ``forward_uint8(images)`` runs it, and so does ``fastres.Engine`` on uint8
    images (``meta["preprocess"]`` holds those statistics, the engine's default). Its stem is
    quantized from the float weights on its own, so its logits are close to, not equal to, those
    of ``forward`` on the normalised images (closer to fp32: pixels need no input rounding)."""

    def __init__(self, plan: Plan, scales: dict, report, dtype: str, method: str, *,
                 pixel_plan: Optional[Plan] = None, pixel_stats: Optional[tuple] = None):
        super().__init__()
        self.plan, self.scales, self.report, self.dtype, self.method = plan, scales, report, dtype, method
        self.report_text = str(report) if report is not None else ""    # what a loaded file keeps of it
        self.pixel_plan = pixel_plan
        self.pixel_stats = tuple(tuple(float(v) for v in t) for t in pixel_stats) if pixel_plan is not None else None
        self.meta = ({"preprocess": {"mean": list(self.pixel_stats[0]), "std": list(self.pixel_stats[1])}}
                     if self.pixel_stats is not None else {})

    def forward_uint8(self, images: torch.Tensor):
        """The plan's outputs (fp32 logits) for uint8 RGB images [N, H, W, 3] (contiguous), through
        ``pixel_plan``: the pixels go into the stem as int8 p - 128, normalised by the stem itself."""
        if self.pixel_plan is None:
            raise ValueError("this quantized model has no uint8 pixel stem (its input is not read by a 3-channel "
                             "ROW_K stem alone): normalise the images and call the model")
        if not torch.is_tensor(images) or images.dtype != torch.uint8 or images.dim() != 4 or images.shape[3] != 3:
            got = f"{images.dtype} {tuple(images.shape)}" if torch.is_tensor(images) else type(images).__name__
            raise TypeError(f"forward_uint8 takes uint8 RGB images [N, H, W, 3], got {got}")
        if not images.is_contiguous():
            raise ValueError(f"forward_uint8: images must be contiguous [N, H, W, 3], got strides {images.stride()}")
        if images.device != self.pixel_plan.device:
            raise ValueError(f"input on {images.device}, the quantized model on {self.pixel_plan.device}: "
                             "move one of them")
        self._drop_stale_caches()
        with torch.no_grad():
            return run_plan(self.pixel_plan, images.permute(0, 3, 1, 2), get_backend(backend_for(images.device)))

    def _plans(self) -> list:
        return [self.plan] + ([self.pixel_plan] if self.pixel_plan is not None else [])

    def _drop_stale_caches(self) -> None:
        """Packed weights (``step.packed``) and CPU programs (prepacked / reordered copies) are
        made from the steps' tensors once; if any tensor was modified in place or replaced since
        (its identity or version counter differs), both plans' caches go and are rebuilt from the
        current weights: never a stale weight. About 0.1 us per tensor per call."""
        signature = tuple((id(t), t._version) for plan in self._plans() for s in plan.steps
                          for t in s.tensors.values() if torch.is_tensor(t))
        seen = self.__dict__.get("_weights_signature")
        if seen is not None and seen != signature:
            for plan in self._plans():
                for s in plan.steps:
                    s.packed.clear()
                for cache in ("_onednn_programs", "_onednn_finite"):
                    plan.__dict__.pop(cache, None)
        self.__dict__["_weights_signature"] = signature

    def forward(self, x: torch.Tensor):
        if not torch.is_tensor(x) or x.dim() != 4 or not x.is_floating_point():
            raise TypeError("a quantized fastres model takes float [N, C, H, W] images, got "
                            + (f"{x.dtype} {tuple(x.shape)}" if torch.is_tensor(x) else type(x).__name__)
                            + (" (uint8 RGB pixels [N, H, W, 3]: model.forward_uint8(images))"
                               if torch.is_tensor(x) and x.dtype == torch.uint8 else ""))
        if self.plan.in_channels is not None and x.shape[1] != self.plan.in_channels:
            raise ValueError(f"the model takes {self.plan.in_channels} input channels, got {x.shape[1]}")
        if x.device != self.plan.device:
            raise ValueError(f"input on {x.device}, the quantized model on {self.plan.device}: move one of them")
        self._drop_stale_caches()
        with torch.no_grad():
            return run_plan(self.plan, x.float(), get_backend(backend_for(x.device)))

    def _apply(self, fn, recurse=True):
        device = None
        steps = {id(s): s for plan in self._plans() for s in plan.steps}     # (the plans share steps)
        for step in steps.values():
            for k, t in step.tensors.items():
                moved = fn(t)
                if moved.dtype != t.dtype:
                    raise TypeError("a quantized model keeps its dtypes (8-bit weights, fp32 scales): "
                                    "only .to(device) moves it")
                step.tensors[k] = moved
                device = moved.device
            step.packed.clear()
        if device is not None:
            for plan in self._plans():
                plan.device = device
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        kinds = {}
        for s in self.plan.steps:
            kinds[s.kind] = kinds.get(s.kind, 0) + 1
        return f"dtype={self.dtype}, method={self.method}, steps={kinds}"


# -- files: export / load ------------------------------------------------------------------------
FORMAT = "fastres-quantized-plan"
FORMAT_VERSION = 1
# the step kinds a file may hold, and the attributes each may carry (values: JSON numbers, bools,
# strings, lists of ints; dtypes as their names)
_FILE_ATTRS = {
    "quantize": {"dtype", "scale", "inv_scale", "stem_border", "pixels"},
    "dequantize": {"scale"},
    "qconv": {"stride", "padding", "dilation", "groups", "relu", "shortcut_stride", "residual_stride",
              "residual_channel_offset", "residual_pad", "row_k", "out_dtype", "out_inv_scale", "residual_scale",
              "input_offset_padding"},
    "qconv_pair": {"stride", "padding", "dilation", "groups", "relu", "shortcut_stride", "out_dtype", "out_inv_scale",
                   "residual_scale", "mid_inv_scale"},
    "qhead": {"pool", "flatten"},
    "max_pool": set(),
    "conv": {"stride", "padding", "dilation", "groups", "relu", "shortcut_stride", "residual_stride",
             "residual_channel_offset", "residual_pad", "padded_input", "relu2"},
    "head": {"pool", "flatten"},
    "se_scale": {"relu", "sigmoid"},
}
_FILE_TENSORS = {"weight", "bias", "shortcut_weight", "acc_scale", "scale2", "shift2", "mid_weight", "mid_bias",
                 "mid_acc_scale", "input_offset"}
_PAIRS = {"stride", "padding", "dilation", "residual_pad", "stem_border", "input_offset_padding"}
_FILE_DTYPES = {"int8": torch.int8, "float8_e4m3fn": torch.float8_e4m3fn, "float32": torch.float32,
                "float16": torch.float16, "bfloat16": torch.bfloat16}


def _attr_to_json(v):
    if isinstance(v, torch.dtype):
        return {"dtype": str(v).removeprefix("torch.")}
    if isinstance(v, tuple):
        return list(v)
    return v


def export_quantized(qmodel: QuantizedModel, path) -> str:
    """Write a ``QuantizedModel`` to a safetensors file: every step's 8-bit weights, fp32 biases and
    accumulator scales as tensors; the steps (kind, inputs, output, attributes with the activation
    scales) and the report as JSON metadata. No pickle: ``load_quantized`` rebuilds the plan from
    data only. A plan with PyTorch steps (calls into the model's own modules) cannot be written."""
    import json

    from safetensors.torch import save_file

    from .files import digest
    from .version import __version__

    plan = qmodel.plan
    custom = [f"{s.name} ({s.ops[0]})" for s in plan.steps if s.kind not in _FILE_ATTRS]
    if custom:
        raise ValueError(f"fastres.export: this quantized plan runs PyTorch calls of the model ({', '.join(custom[:5])})"
                         "; a file holds only fastres steps")
    tensors = {}
    plan_json = dict(steps=_steps_to_json(plan.steps, "", tensors), input=plan.input_name, in_channels=plan.in_channels,
                     output=_output_to_json(plan.output))
    if qmodel.pixel_plan is not None:     # its own entry steps; the rest are the plan's
        entry = qmodel.pixel_plan.steps[:_PIXEL_ENTRY]
        plan_json["pixel"] = dict(steps=_steps_to_json(entry, "pixel.", tensors), input=qmodel.pixel_plan.input_name,
                                  mean=list(qmodel.pixel_stats[0]), std=list(qmodel.pixel_stats[1]))
    metadata = {
        "format": FORMAT, "format_version": str(FORMAT_VERSION), "fastres_version": __version__,
        "dtype": qmodel.dtype, "method": qmodel.method,
        "plan": json.dumps(plan_json),
        "scales": json.dumps(qmodel.scales),
        "report": str(qmodel.report) if qmodel.report is not None else "",
        "sha256": digest(tensors),
    }
    path = os.fspath(path)
    save_file(tensors, path, metadata=metadata)
    return path


_PIXEL_ENTRY = 2       # the float plan's steps a pixel plan replaces: quantize, the stem


def _steps_to_json(steps, prefix: str, tensors: dict) -> list:
    """The steps as JSON objects; their tensors go into ``tensors`` as "{prefix}{i}.{name}"."""
    out = []
    for i, s in enumerate(steps):
        names = {}
        for k, t in s.tensors.items():
            names[k] = f"{prefix}{i}.{k}"
            tensors[names[k]] = t.detach().to("cpu").contiguous()
        out.append(dict(kind=s.kind, name=s.name, inputs=s.inputs, output=s.output,
                        extra_outputs=list(s.extra_outputs), tensors=names,
                        attrs={k: _attr_to_json(v) for k, v in s.attrs.items()}))
    return out


def _output_to_json(output):
    if isinstance(output, Ref):
        return {"ref": output.name}
    if isinstance(output, dict):
        return {"dict": {k: _output_to_json(v) for k, v in output.items()}}
    if isinstance(output, (list, tuple)):
        return {"list": [_output_to_json(v) for v in output]}
    raise ValueError(f"fastres.export: cannot write a plan output of type {type(output).__name__}")


def _output_from_json(data, bad):
    if isinstance(data, dict) and set(data) == {"ref"} and isinstance(data["ref"], str):
        return Ref(data["ref"])
    if isinstance(data, dict) and set(data) == {"dict"} and isinstance(data["dict"], dict):
        return {str(k): _output_from_json(v, bad) for k, v in data["dict"].items()}
    if isinstance(data, dict) and set(data) == {"list"} and isinstance(data["list"], list):
        return tuple(_output_from_json(v, bad) for v in data["list"])
    bad("plan", "has an output that is not a value reference")


def is_quantized_file(metadata: dict) -> bool:
    return metadata.get("format") == FORMAT


def load_quantized(path, device=None, *, read=None) -> QuantizedModel:
    """The ``QuantizedModel`` of an ``export_quantized`` file, every field validated (format,
    version, checksum, step kinds and attributes, tensor dtypes, value references) before use.
    ``read``: the file's (tensors, metadata) when the caller has read it already."""
    import json

    from .files import ExportFormatError, digest, read_safetensors

    tensors, metadata = read if read is not None else read_safetensors(path)
    path = os.fspath(path)

    def bad(key, why):
        raise ExportFormatError(f"{path}: {key} {why}")
    if not is_quantized_file(metadata):
        bad("format", f"is {metadata.get('format')!r}, not {FORMAT!r}")
    if metadata.get("format_version") != str(FORMAT_VERSION):
        bad("format_version", f"is {metadata.get('format_version')!r}; this fastres reads {FORMAT_VERSION}")
    if metadata.get("sha256") != digest(tensors):
        raise ExportFormatError(f"{path} is corrupt: its tensors do not match the recorded sha256")
    if metadata.get("dtype") not in DTYPES:
        bad("dtype", f"is {metadata.get('dtype')!r}; expected one of {', '.join(DTYPES)}")
    try:
        plan_data = json.loads(metadata.get("plan", ""))
        scales = json.loads(metadata.get("scales", ""))
    except (json.JSONDecodeError, RecursionError):
        bad("plan", "is not readable JSON")
    if not (isinstance(plan_data, dict) and isinstance(plan_data.get("steps"), list)
            and isinstance(plan_data.get("input"), str)):
        bad("plan", "must be a JSON object with a list of steps and the input's name")
    if not (isinstance(scales, dict) and all(isinstance(k, str) and isinstance(v, (int, float)) and v > 0
                                             for k, v in scales.items())):
        bad("scales", "must map value names to positive numbers")
    known = {plan_data["input"]}
    steps, used = [], set()
    for i, d in enumerate(plan_data["steps"]):
        steps.append(_step_from_json(d, i, tensors, known, used, bad))
    pixel = plan_data.get("pixel")
    pixel_steps = pixel_stats = None
    if pixel is not None:
        pixel_steps, pixel_stats = _pixel_entry_from_json(pixel, steps, tensors, used, bad)
    if used != set(tensors):
        bad("tensors", f"{sorted(set(tensors) - used)[:5]} belong to no step")
    output = _output_from_json(plan_data.get("output"), bad)
    for name in ref_names(output):
        if name not in known:
            bad("plan", f"outputs {name!r}, which no step writes")
    in_channels = plan_data.get("in_channels")
    if in_channels is not None and not (isinstance(in_channels, int) and in_channels > 0):
        bad("plan", "in_channels must be a positive int")
    plan = Plan(steps=steps, output=output, dtype=torch.float32, device=torch.device("cpu"),
                input_name=plan_data["input"], in_channels=in_channels)
    pixels = None
    if pixel_steps is not None:
        pixels = Plan(steps=pixel_steps + steps[_PIXEL_ENTRY:], output=output, dtype=torch.float32,
                      device=torch.device("cpu"), input_name=pixel["input"], in_channels=3, input_dtype=torch.uint8)
    qmodel = QuantizedModel(plan, scales, None, metadata["dtype"], str(metadata.get("method", "")),
                            pixel_plan=pixels, pixel_stats=pixel_stats)
    qmodel.report_text = metadata.get("report", "")
    return qmodel.to(device) if device is not None else qmodel


def _pixel_entry_from_json(pixel, steps, tensors, used, bad) -> tuple:
    """(entry steps, (mean, std)) of a file's pixel plan: a pixel quantize step and a stem that
    writes what the plan's stem writes, the plan's later steps reading nothing else of its entry."""
    where = "plan pixel entry"
    if not (isinstance(pixel, dict) and isinstance(pixel.get("steps"), list) and isinstance(pixel.get("input"), str)
            and len(pixel["steps"]) == _PIXEL_ENTRY and len(steps) > _PIXEL_ENTRY):
        bad(where, f"must hold the input's name and {_PIXEL_ENTRY} steps, in a plan of more")
    stats = []
    for key in ("mean", "std"):
        v = pixel.get(key)
        if not (isinstance(v, list) and len(v) == 3 and all(isinstance(e, (int, float)) and not isinstance(e, bool)
                                                            and math.isfinite(e) for e in v)):
            bad(where, f"{key} must be 3 finite numbers")
        stats.append(tuple(float(e) for e in v))
    if 0 in stats[1]:
        bad(where, "std must be nonzero")
    known = {pixel["input"]}
    entry = [_step_from_json(d, f"pixel {i}", tensors, known, used, bad) for i, d in enumerate(pixel["steps"])]
    quantize_pixels, stem = entry
    if not (quantize_pixels.kind == "quantize" and quantize_pixels.attrs.get("pixels") is True
            and quantize_pixels.attrs.get("stem_border") and quantize_pixels.attrs.get("dtype") == torch.int8
            and stem.kind == "qconv" and stem.inputs == {"x": quantize_pixels.output} and stem.attrs.get("row_k")
            and stem.output == steps[_PIXEL_ENTRY - 1].output and "input_offset" in stem.tensors):
        bad(where, "must be a pixel quantize step and a ROW_K stem with an input offset writing the plan stem's output")
    replaced = {s.output for s in steps[:_PIXEL_ENTRY]} | {pixel["input"]}
    if any(name in replaced - {stem.output} for s in steps[_PIXEL_ENTRY:] for name in s.reads):
        bad(where, "is read around: a later step reads a value it replaces")
    return entry, tuple(stats)


def _step_from_json(d, i, tensors, known, used, bad) -> Step:
    where = f"step {i}"
    if not isinstance(d, dict) or d.get("kind") not in _FILE_ATTRS:
        bad(where, f"has kind {d.get('kind') if isinstance(d, dict) else d!r}; a file holds {', '.join(_FILE_ATTRS)}")
    kind = d["kind"]
    inputs, output, extra = d.get("inputs"), d.get("output"), d.get("extra_outputs", [])
    if not (isinstance(inputs, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in inputs.items())
            and isinstance(output, str) and isinstance(extra, list) and all(isinstance(e, str) for e in extra)):
        bad(where, "must name its inputs {role: value}, its output and extra outputs as strings")
    for role, name in inputs.items():
        if name not in known:
            bad(where, f"reads {name!r} ({role}) before any step writes it")
    attrs = d.get("attrs", {})
    if not isinstance(attrs, dict) or set(attrs) - _FILE_ATTRS[kind]:
        bad(where, f"has unknown attributes {sorted(set(attrs) - _FILE_ATTRS[kind]) if isinstance(attrs, dict) else attrs}")
    parsed = {}
    for k, v in attrs.items():
        if isinstance(v, dict) and set(v) == {"dtype"} and v["dtype"] in _FILE_DTYPES:
            parsed[k] = _FILE_DTYPES[v["dtype"]]
        elif k in _PAIRS and v is not None:
            if not (isinstance(v, list) and len(v) == 2 and all(isinstance(e, int) and not isinstance(e, bool) and e >= 0
                                                               for e in v)):
                bad(where, f"attribute {k} must be two non-negative ints, got {v!r}")
            parsed[k] = tuple(v)
        elif v is None or isinstance(v, (bool, int, float, str)):
            if isinstance(v, float) and not math.isfinite(v):
                bad(where, f"attribute {k} is not finite")
            parsed[k] = v
        else:
            bad(where, f"attribute {k} has an unreadable value {v!r}")
    names = d.get("tensors", {})
    if not isinstance(names, dict) or set(names) - _FILE_TENSORS:
        bad(where, f"names unknown tensors {names!r}")
    step_tensors = {}
    for k, name in names.items():
        if name not in tensors:
            bad(where, f"needs tensor {name!r}, which the file does not hold")
        step_tensors[k] = tensors[name]
        used.add(name)
    _check_step_tensors(kind, step_tensors, parsed, lambda why: bad(where, why))
    known.update([output, *extra])
    return Step(kind, str(d.get("name", kind)), dict(inputs), output, parsed, step_tensors, extra_outputs=tuple(extra))


def _check_step_tensors(kind, t, attrs, bad):
    """The tensors a step kind needs, in their dtypes and shapes (the kernels check the rest)."""
    need = {"qconv": {"weight", "bias", "acc_scale"}, "qhead": {"weight", "bias"}, "conv": {"weight", "bias"},
            "head": {"weight", "bias"},
            "qconv_pair": {"weight", "bias", "acc_scale", "mid_weight", "mid_bias", "mid_acc_scale"}}.get(kind, set())
    if need - set(t):
        bad(f"lacks tensors {sorted(need - set(t))}")
    if kind == "qconv_pair":
        m = t["mid_weight"]
        if m.dtype != t["weight"].dtype or m.dim() != 4 or tuple(m.shape[2:]) != (3, 3):
            bad(f"mid_weight must be a 3x3 weight of the weight's dtype, got {m.dtype} {tuple(m.shape)}")
        for k in ("mid_bias", "mid_acc_scale"):
            if t[k].dtype != torch.float32 or tuple(t[k].shape) != (m.shape[0],):
                bad(f"{k} must be float32 [{m.shape[0]}]")
        if not isinstance(attrs.get("mid_inv_scale"), (int, float)):
            bad("lacks attribute mid_inv_scale")
    if kind in ("qconv", "qconv_pair"):
        w = t["weight"]
        if w.dtype not in (torch.int8, torch.float8_e4m3fn) or w.dim() != 4:
            bad(f"weight must be a 4-D int8 / float8_e4m3fn tensor, got {w.dtype} {tuple(w.shape)}")
        if "shortcut_weight" in t and t["shortcut_weight"].dtype != w.dtype:
            bad("shortcut weight dtype differs from the weight's")
        for k in ("bias", "acc_scale"):
            if t[k].dtype != torch.float32 or tuple(t[k].shape) != (w.shape[0],):
                bad(f"{k} must be float32 [{w.shape[0]}]")
        for k in ("stride", "padding", "dilation", "groups", "relu", "out_dtype"):
            if k not in attrs:
                bad(f"lacks attribute {k}")
        if attrs["out_dtype"] not in (w.dtype, torch.float32, torch.float16, torch.bfloat16) and not (
                "input_offset" in t and w.dtype == torch.int8 and attrs["out_dtype"] == torch.float8_e4m3fn):
            bad(f"writes {attrs['out_dtype']} from {w.dtype} operands")
        out_8bit = attrs["out_dtype"] in (torch.int8, torch.float8_e4m3fn)
        if out_8bit != isinstance(attrs.get("out_inv_scale"), (int, float)):
            bad("needs out_inv_scale exactly when its output is 8-bit")
        if ("input_offset" in t) != ("input_offset_padding" in attrs):
            bad("needs input_offset_padding exactly with an input_offset tensor")
        if "input_offset" in t:
            ph, pw = attrs["input_offset_padding"]
            off = t["input_offset"]
            if off.dtype != torch.float32 or tuple(off.shape) != ((ph + 1) ** 2 * (pw + 1) ** 2, w.shape[0]):
                bad(f"input_offset must be float32 [{(ph + 1) ** 2 * (pw + 1) ** 2}, {w.shape[0]}]")
    if kind == "quantize" and attrs.get("dtype") not in (torch.int8, torch.float8_e4m3fn):
        bad("quantizes to int8 or float8_e4m3fn only")
    for k in ("scale", "inv_scale", "out_inv_scale", "residual_scale", "mid_inv_scale"):
        if k in attrs and not (isinstance(attrs[k], (int, float)) and not isinstance(attrs[k], bool) and attrs[k] > 0):
            bad(f"attribute {k} must be a positive number")
