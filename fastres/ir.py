"""The step IR and the op table: what a plan is, and how each kind of step runs.

A plan is a list of ``Step``s over named values. A step is data: its ``kind`` (a row of ``OPS``),
the values it reads by role (``inputs``: ``{"x": ..., "residual": ..., "shortcut": ...}``), the
value it writes, static attributes (stride, padding, relu, ...) and its folded tensors (weights in
the compute dtype and PyTorch layout, fp32 biases). ``OPS`` maps each kind to

    pack        weights -> the layout its Triton kernel takes (once per plan, cached on the step)
    launch      one Triton kernel launch (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``)
    reference   the plain-PyTorch reference beside the kernel (channels_last)
    out_shape   the output shape from the input shapes (memory planning without running anything);
                with extra outputs, one shape per output
    describe    the fused ops, for ``fastres inspect``
    out_dtype   the output dtype from the step and its input dtypes (None: x's dtype, as every float
                kind and ``max_pool`` keep it; an 8-bit plan's kinds convert)

and what a launch costs is what its recorded ``KernelCall`` says (``kernels._launch``), so
``inspect`` reports the launches a forward really makes. A ``torch`` step is any PyTorch call the
capture did not fuse (``fastres.capture``): it runs as PyTorch runs it, on every backend.

Backends (``fastres.backend``) are objects passed to ``Plan.run``; the plan knows nothing about
tiles, and the kernels know nothing about ResNet.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from .kernels import avgpool_linear as _avgpool_linear
from .kernels import conv2d_nhwc as _conv
from .kernels import conv3x3_conv1x1_nhwc as _pair
from .kernels import max_pool2d_nhwc as _max_pool
from .kernels import se_scale_nhwc as _se
from .kernels._common import conv_output_size
from . import ir_quant as _q8

__all__ = ["Step", "Ref", "OpKind", "OPS", "Plan", "KERNEL_KINDS"]


@dataclass(frozen=True)
class Ref:
    """A value of the plan named inside a ``torch`` step's arguments."""
    name: str


@dataclass(eq=False)
class Step:
    kind: str
    name: str                       # the module path(s) it came from, for reports
    inputs: dict                    # role -> value name
    output: str
    attrs: dict = field(default_factory=dict)
    tensors: dict = field(default_factory=dict)
    fused: tuple = ()               # the traced nodes this step computes
    packed: dict = field(default_factory=dict)   # backend name -> packed weights
    extra_outputs: tuple = ()       # more values it writes (their shapes: the kind's out_shape)

    @property
    def reads(self) -> list[str]:
        return list(self.inputs.values())

    @property
    def outputs(self) -> tuple:
        """Every value it writes; with extra outputs, launch/reference take and return tuples."""
        return (self.output, *self.extra_outputs)

    @property
    def ops(self) -> list[str]:
        return OPS[self.kind].describe(self)

    def __repr__(self) -> str:
        ins = ", ".join(f"{k}={v}" for k, v in self.inputs.items())
        return f"Step({self.kind} {self.name}: {ins} -> {', '.join(self.outputs)})"


# -- conv: y = relu?(conv(x) [+ conv1x1_s(shortcut)] + bias [+ residual]) [, relu?(y*scale2 + shift2)]
# a residual with attrs residual_stride / residual_channel_offset is sampled at that stride into
# those channels (CIFAR option A); tensors scale2/shift2: a second output (pre-activation BN);
# attrs channel_mean (True: keepdim [N, C, 1, 1], "flat": [N, C]): a second output y.mean((2, 3)),
# the squeeze of an SE block
def _conv_residual_kwargs(step, args) -> dict:
    a, t = step.attrs, step.tensors
    if "residual_pad" in a and args.get("residual") is not None:
        c_r, (front, back) = args["residual"].shape[1], a["residual_pad"]
        if c_r + front + back != t["weight"].shape[0]:
            raise RuntimeError(f"{step.name}: the padded shortcut has {front} + {c_r} + {back} channels, "
                               f"the conv output {t['weight'].shape[0]} (the module's add would fail too)")
    kw = dict(residual_stride=a.get("residual_stride", 1),
              residual_channel_offset=a.get("residual_channel_offset", 0))
    if "scale2" in t:
        kw.update(affine2=(t["scale2"], t["shift2"]), affine2_relu=a.get("relu2", False))
    if a.get("channel_mean"):
        kw.update(channel_mean=True)
    return kw


def _conv_flat_mean(step, outputs):
    """(y, mean) with the mean as [N, C] where the module's mean drops the pooled dims."""
    if step.attrs.get("channel_mean") != "flat":
        return outputs
    return outputs[0], outputs[1].flatten(1)


def _broadcasts(step, residual_shape, conv_shape) -> bool:
    """A residual neither of the conv output's shape nor a strided one: an add that broadcasts
    (timm's global-context block adds a [N, C, 1, 1] conv output to a feature map)."""
    return "residual_stride" not in step.attrs and tuple(residual_shape) != tuple(conv_shape)


def _with_broadcast_add(step, args, out, run):
    """``run`` the conv without its residual and ReLU, then PyTorch's broadcasting add (and ReLU)."""
    if step.extra_outputs:
        raise RuntimeError(f"{step.name}: a conv output added by broadcasting has no second output")
    inner = dataclasses.replace(step, inputs={k: v for k, v in step.inputs.items() if k != "residual"},
                                attrs=dict(step.attrs, relu=False))
    y = run(inner, {k: v for k, v in args.items() if k != "residual"}) + args["residual"]
    return _into(out, y.relu_() if step.attrs["relu"] else y)


def residual_broadcasts(step, args) -> bool:
    r = args.get("residual")
    return r is not None and _broadcasts(step, r.shape, _conv_out_shape(
        dataclasses.replace(step, extra_outputs=()), {"x": tuple(args["x"].shape)}))


def _conv_pack(step):
    t = step.tensors
    if step.attrs.get("padded_input"):
        return _conv.pack_stem_weight(t["weight"])
    return _conv.pack_conv_weight(t["weight"], groups=step.attrs["groups"],
                                  shortcut_weight=t.get("shortcut_weight"))


def _padded_stem_input(x, step):
    """[N, C<=4, H, W] -> the zero-bordered [N, 4, H', W'] channels_last input of the ROW_K stem
    (exact: the border is zero where the conv's zero padding was)."""
    from .extension import nchw_to_nhwc_padded, nchw_to_nhwc_padded_ref
    a = step.attrs
    border = _conv.stem_input_padding(x.shape[2], x.shape[3], a["padding"][0], a["stride"][0])
    fake = x.device.type == "meta" or isinstance(x, torch._subclasses.FakeTensor)
    pad = nchw_to_nhwc_padded_ref if fake else nchw_to_nhwc_padded
    return pad(x, _conv.STEM_CHANNELS, border)


def _conv_launch(step, args, packed, out):
    a = step.attrs
    if packed.row_k:     # the stem over a zero-bordered 4-channel input, padding 0
        x = args["x"]
        if x.shape[1] != packed.in_channels:   # not already in that layout (preprocess(border=...))
            x = _padded_stem_input(x, step)
        return _conv.conv2d_nhwc_packed(x, packed, step.tensors["bias"], stride=a["stride"], padding=0,
                                        relu=a["relu"], out=out)
    if residual_broadcasts(step, args):
        return _with_broadcast_add(step, args, out, lambda s, a: _conv_launch(s, a, packed, None))
    main, extra = out if isinstance(out, tuple) else (out, None)
    if a.get("channel_mean"):      # an [N, C] mean's buffer is the same N*C values
        extra = dict(mean_out=extra.view(extra.shape[0], -1, 1, 1) if extra is not None else None)
    else:
        extra = dict(out2=extra)
    y = _conv.conv2d_nhwc_packed(
        args["x"], packed, step.tensors["bias"], stride=a["stride"], padding=a["padding"],
        dilation=a["dilation"], residual=args.get("residual"), relu=a["relu"],
        shortcut=args.get("shortcut"), shortcut_stride=a.get("shortcut_stride", 1), out=main,
        **extra, **_conv_residual_kwargs(step, args))
    return _conv_flat_mean(step, y) if a.get("channel_mean") else y


def _conv_reference(step, args, out, upcast):
    a, t = step.attrs, step.tensors
    if residual_broadcasts(step, args):
        return _with_broadcast_add(step, args, out, lambda s, a: _conv_reference(s, a, None, upcast))
    y = _conv.conv2d_nhwc_ref(
        args["x"], t["weight"], t["bias"], stride=a["stride"], padding=a["padding"],
        dilation=a["dilation"], groups=a["groups"], residual=args.get("residual"), relu=a["relu"],
        shortcut=args.get("shortcut"), shortcut_weight=t.get("shortcut_weight"),
        shortcut_stride=a.get("shortcut_stride", 1), upcast=upcast, **_conv_residual_kwargs(step, args))
    return _into(out, _conv_flat_mean(step, y) if a.get("channel_mean") else y)


def _conv_out_shape(step, shapes):
    n, _, h, w = shapes["x"]
    weight, a = step.tensors["weight"], step.attrs
    kh, kw = weight.shape[2:]
    y = (n, weight.shape[0],
         conv_output_size(h, kh, a["stride"][0], a["padding"][0], a["dilation"][0]),
         conv_output_size(w, kw, a["stride"][1], a["padding"][1], a["dilation"][1]))
    if "residual" in shapes and _broadcasts(step, shapes["residual"], y):
        return tuple(torch.broadcast_shapes(y, shapes["residual"]))
    if not step.extra_outputs:
        return y
    if a.get("channel_mean"):
        return y, (n, weight.shape[0]) if a["channel_mean"] == "flat" else (n, weight.shape[0], 1, 1)
    return y, y


def _conv_describe(step):
    a, weight = step.attrs, step.tensors["weight"]
    kh, kw = weight.shape[2:]
    s, d = a["stride"], a["dilation"]
    ops = [f"conv{kh}x{kw}/s{s[0]}" + (f"/d{d[0]}" if d[0] > 1 else "")
           + (f"/g{a['groups']}" if a["groups"] > 1 else "")]
    if "shortcut" in step.inputs:
        ops.append(f"projection1x1/s{a['shortcut_stride']}")
    ops.append("bias")
    if "residual" in step.inputs:
        s, c0 = a.get("residual_stride", 1), a.get("residual_channel_offset", 0)
        ops.append("residual" if (s, c0) == (1, 0) and "residual_pad" not in a else
                   f"residual/s{s}@c{c0}(zero-pad)")
    if a["relu"]:
        ops.append("relu")
    if "scale2" in step.tensors:
        ops.append("out2: affine" + ("+relu" if a.get("relu2") else ""))
    if a.get("channel_mean"):
        ops.append("out2: mean_hw")
    return ops


# -- conv_pair: a bottleneck's 3x3 and 1x1 in one kernel, the 3x3 output stays on chip ---------
def _pair_pack(step):
    t = step.tensors
    return _pair.pack_conv3x3_conv1x1(t["mid_weight"], t["weight"], groups=step.attrs["groups"],
                                      shortcut_weight=t.get("shortcut_weight"))


def _pair_launch(step, args, packed, out):
    a, t = step.attrs, step.tensors
    return _pair.conv3x3_conv1x1_nhwc_packed(
        args["x"], packed, t["mid_bias"], t["bias"], stride=a["stride"], padding=a["padding"],
        dilation=a["dilation"], residual=args.get("residual"), shortcut=args.get("shortcut"),
        shortcut_stride=a.get("shortcut_stride", 1), out=out)


def _pair_reference(step, args, out, upcast):
    a, t = step.attrs, step.tensors
    y = _pair.conv3x3_conv1x1_nhwc_ref(
        args["x"], t["mid_weight"], t["mid_bias"], t["weight"], t["bias"], stride=a["stride"],
        padding=a["padding"], dilation=a["dilation"], groups=a["groups"],
        residual=args.get("residual"), shortcut=args.get("shortcut"),
        shortcut_weight=t.get("shortcut_weight"), shortcut_stride=a.get("shortcut_stride", 1),
        upcast=upcast)
    return _into(out, y)


def _pair_out_shape(step, shapes):
    n, _, h, w = shapes["x"]
    a = step.attrs
    return (n, step.tensors["weight"].shape[0],
            conv_output_size(h, 3, a["stride"][0], a["padding"][0], a["dilation"][0]),
            conv_output_size(w, 3, a["stride"][1], a["padding"][1], a["dilation"][1]))


def _pair_describe(step):
    a = step.attrs
    mid = (f"conv3x3/s{a['stride'][0]}" + (f"/d{a['dilation'][0]}" if a["dilation"][0] > 1 else "")
           + (f"/g{a['groups']}" if a["groups"] > 1 else ""))
    ops = [mid, "bias", "relu", "(on chip)", "conv1x1/s1"]
    if "shortcut" in step.inputs:
        ops.append(f"projection1x1/s{a['shortcut_stride']}")
    ops.append("bias")
    if "residual" in step.inputs:
        ops.append("residual")
    return ops + ["relu"]


# -- max_pool: max_pool2d(x, 3, stride=2, padding=1) -----------------------------------------
def _pool_launch(step, args, packed, out):
    return _max_pool.max_pool2d_nhwc(args["x"], out=out)


def _pool_reference(step, args, out, upcast):
    return _into(out, _max_pool.max_pool2d_nhwc_ref(args["x"]))


def _pool_out_shape(step, shapes):
    n, c, h, w = shapes["x"]
    return (n, c, (h - 1) // 2 + 1, (w - 1) // 2 + 1)


# -- head: mean_hw(x) @ weight.T + bias -----------------------------------------------------
def _head_pack(step):
    return _avgpool_linear.pack_linear_weight(step.tensors["weight"])


# attrs pool="width": the module pools with F.avg_pool2d(x, x.size(3)), global only on square maps;
# others run that PyTorch call (then flatten: "batch" -> .view(N, -1), "features" -> .view(-1, C))
def _head_is_global(step, x) -> bool:
    return step.attrs.get("pool") != "width" or x.shape[2] == x.shape[3]


def _head_launch(step, args, packed, out):
    if not _head_is_global(step, args["x"]):
        return _head_reference(step, args, out, False)
    return _avgpool_linear.avgpool_linear_packed(args["x"], packed, step.tensors["bias"], out=out)


def _head_reference(step, args, out, upcast):
    t, x = step.tensors, args["x"]
    if _head_is_global(step, x):
        return _into(out, _avgpool_linear.avgpool_linear_ref(x, t["weight"], t["bias"], upcast=upcast))
    pooled = torch.nn.functional.avg_pool2d(x, x.shape[3])
    flat = pooled.reshape(-1, x.shape[1]) if step.attrs.get("flatten") == "features" else pooled.flatten(1)
    return _into(out, torch.nn.functional.linear(flat, t["weight"], t["bias"].to(x.dtype)))


def _head_out_shape(step, shapes):
    n, c, h, w = shapes["x"]
    rows = n * (h // w) if step.attrs.get("pool") == "width" and step.attrs.get("flatten") == "features" else n
    return (rows, step.tensors["weight"].shape[0])


# -- se_scale: relu?(x * sigmoid?(gate) [+ residual]), gate [N, C, 1, 1] (squeeze-and-excitation)
def _se_args(step, args):
    return dict(residual=args.get("residual"), relu=step.attrs["relu"], sigmoid=step.attrs["sigmoid"])


def _se_fits(args) -> bool:
    """The kernel takes one gate value per (image, channel); any other broadcast runs PyTorch."""
    x, gate = args["x"], args["gate"]
    return x.dim() == 4 and tuple(gate.shape) == (x.shape[0], x.shape[1], 1, 1)


def _se_launch(step, args, packed, out):
    if not _se_fits(args):
        return _se_reference(step, args, out, False)
    return _se.se_scale_nhwc(args["x"], args["gate"], out=out, **_se_args(step, args))


def _se_reference(step, args, out, upcast):
    return _into(out, _se.se_scale_nhwc_ref(args["x"], args["gate"], upcast=upcast, **_se_args(step, args)))


def _se_describe(step):
    ops = ["x*" + ("sigmoid(gate)" if step.attrs["sigmoid"] else "gate")]
    if "residual" in step.inputs:
        ops.append("residual")
    if step.attrs["relu"]:
        ops.append("relu")
    return ops


# -- torch: any PyTorch call the capture did not fuse ---------------------------------------
def _torch_reference(step, args, out, upcast):
    y = step.attrs["call"](args)
    return _into(out, y) if out is not None else y


def _torch_describe(step):
    return [step.attrs["what"]]


def _into(out, y):
    if isinstance(out, tuple):
        return tuple(_into(o, v) for o, v in zip(out, y))
    return out.copy_(y) if out is not None else y


@dataclass(frozen=True)
class OpKind:
    pack: Optional[Callable]
    launch: Optional[Callable]          # None: the reference runs on every backend
    reference: Callable
    out_shape: Optional[Callable]       # None: shapes come from running the step on fake tensors
    describe: Callable
    out_dtype: Optional[Callable] = None   # (step, {role: dtype}) -> dtype; None: x's dtype


OPS: dict[str, OpKind] = {
    "conv": OpKind(_conv_pack, _conv_launch, _conv_reference, _conv_out_shape, _conv_describe),
    "conv_pair": OpKind(_pair_pack, _pair_launch, _pair_reference, _pair_out_shape, _pair_describe),
    "max_pool": OpKind(None, _pool_launch, _pool_reference, _pool_out_shape,
                       lambda step: ["maxpool3x3/s2"]),
    "head": OpKind(_head_pack, _head_launch, _head_reference, _head_out_shape,
                   lambda step: ["avgpool", "linear", "bias"]),
    "se_scale": OpKind(None, _se_launch, _se_reference, lambda step, shapes: shapes["x"], _se_describe),
    "torch": OpKind(None, None, _torch_reference, None, _torch_describe),
    # 8-bit steps of a quantized plan (fastres.quantize; their functions in fastres.ir_quant)
    "quantize": OpKind(None, None, _q8.quantize_reference, _q8.quantize_out_shape, _q8.quantize_describe,
                       lambda step, dtypes: step.attrs["dtype"]),
    "dequantize": OpKind(None, None, _q8.dequantize_reference, lambda step, shapes: shapes["x"],
                         lambda step: ["dequantize"], lambda step, dtypes: torch.float32),
    "qconv": OpKind(_q8.qconv_pack, _q8.qconv_launch, _q8.qconv_reference, _conv_out_shape,
                    lambda step: _conv_describe(step) + _q8.qconv_describe_suffix(step),
                    lambda step, dtypes: step.attrs["out_dtype"]),
    "qconv_pair": OpKind(_q8.qconv_pair_pack, _q8.qconv_pair_launch, _q8.qconv_pair_reference, _pair_out_shape,
                         lambda step: list(_pair_describe(step)) + _q8.qconv_describe_suffix(step),
                         lambda step, dtypes: step.attrs["out_dtype"]),
    "qhead": OpKind(_q8.qhead_pack, _q8.qhead_launch, _q8.qhead_reference, _head_out_shape,
                    lambda step: ["avgpool", "linear", "bias", "(fp32 from 8-bit)"],
                    lambda step, dtypes: torch.float32),
}
KERNEL_KINDS = frozenset(k for k, op in OPS.items() if op.launch is not None)


# -- the plan ---------------------------------------------------------------------------------
@dataclass(eq=False)
class Plan:
    """Steps over named values; ``output`` is the traced output structure with ``Ref``s in it."""
    steps: list
    output: Any
    dtype: torch.dtype
    device: torch.device
    input_name: str = "input"
    in_channels: Optional[int] = None     # what the first kernel reading the input expects
    input_dtype: Optional[torch.dtype] = None   # None: ``dtype`` (uint8: pixels, an 8-bit plan's)
    notes: list = field(default_factory=list)   # why steps run as PyTorch, for reports

    def __post_init__(self):
        self._last_read: dict[str, int] = {}
        for i, step in enumerate(self.steps):
            for name in step.reads:
                self._last_read[name] = i
        kept = set(ref_names(self.output))
        self._release = [[n for n, i in self._last_read.items()
                          if i == k and n != self.input_name and n not in kept]
                         for k in range(len(self.steps))]
        # values a kernel reads that a kernel did not write: made channels_last before the launch
        produced_by_kernel = {name for s in self.steps if s.kind in KERNEL_KINDS for name in s.outputs}
        self._relayout = [tuple(role for role, name in s.inputs.items() if name not in produced_by_kernel)
                          if s.kind in KERNEL_KINDS else () for s in self.steps]
        self._ops = [OPS[s.kind] for s in self.steps]

    @property
    def output_names(self) -> list[str]:
        return ref_names(self.output)

    def classes(self, input_shape: tuple) -> int:
        """Columns of the plan's single [N, classes] output for inputs of ``input_shape``
        (0 when the output is something else)."""
        if not isinstance(self.output, Ref):
            return 0
        try:
            shape = self.value_shapes(input_shape)[self.output.name]
        except Exception:   # noqa: BLE001 - an output the fake run cannot size
            return 0
        return shape[1] if shape is not None and len(shape) == 2 else 0

    def run(self, x: torch.Tensor, backend, buffers: Optional[dict] = None):
        """The output for input ``x`` on ``backend`` (an object from ``fastres.backend``).

        ``buffers`` (from ``allocate``) makes every kernel step write into a preallocated output,
        so a forward allocates nothing but what PyTorch steps allocate (what the engine captures
        in a CUDA graph).
        """
        env = {self.input_name: x}
        for step, op, relayout, release in zip(self.steps, self._ops, self._relayout, self._release):
            args = {role: env[name] for role, name in step.inputs.items()}
            for role in relayout:
                args[role] = backend.layout(step, role, args[role])
            if step.extra_outputs:
                out = tuple(buffers.get(n) for n in step.outputs) if buffers else None
                env.update(zip(step.outputs, backend.run(step, op, args, out)))
            else:
                out = buffers.get(step.output) if buffers else None
                env[step.output] = backend.run(step, op, args, out)
            if buffers is None:
                for name in release:
                    del env[name]
        return bind_refs(self.output, env)

    def prepare(self, backend) -> "Plan":
        """Pack every step's weights for ``backend`` now (otherwise on first use)."""
        with torch.no_grad():
            for step, op in zip(self.steps, self._ops):
                backend.prepare(step, op)
        return self

    def value_shapes(self, input_shape: tuple) -> dict[str, tuple]:
        """Shape of every value a forward on ``input_shape`` produces, by name. Kernel steps are
        sized by their formula; PyTorch steps run on fake tensors."""
        shapes = {self.input_name: tuple(input_shape)}
        fake = None
        for step, op in zip(self.steps, self._ops):
            ins = {role: shapes[name] for role, name in step.inputs.items()}
            if op.out_shape is not None:
                shape = op.out_shape(step, ins)
                for name, s in zip(step.outputs, shape if step.extra_outputs else (shape,)):
                    shapes[name] = tuple(s)
                continue
            if fake is None:
                from torch._subclasses.fake_tensor import FakeTensorMode
                fake = FakeTensorMode(allow_non_fake_inputs=True)
            with fake:
                args = {role: torch.empty(ins[role], dtype=self.dtype, device=self.device)
                        for role in ins}
                y = op.reference(step, args, None, False)
            shapes[step.output] = tuple(y.shape) if torch.is_tensor(y) else None
        return shapes

    def value_dtypes(self) -> dict[str, torch.dtype]:
        """Dtype of every value a forward produces, by name: the input's ``input_dtype`` (default
        the plan's dtype), then each step's ``out_dtype`` rule (float kinds keep x's dtype; the
        8-bit kinds of a quantized plan convert: int8 activations, fp32 logits, ...). PyTorch
        steps are taken to compute in the plan's dtype."""
        dtypes = {self.input_name: self.input_dtype or self.dtype}
        for step, op in zip(self.steps, self._ops):
            ins = {role: dtypes[name] for role, name in step.inputs.items()}
            if step.kind == "torch":
                dtype = self.dtype
            elif op.out_dtype is not None:
                dtype = op.out_dtype(step, ins)
            else:
                dtype = ins.get("x", self.dtype)
            for name in step.outputs:
                dtypes[name] = dtype
        return dtypes

    def memory_layout(self, input_shape: tuple) -> tuple[dict, list]:
        """Assign every value a kernel step writes to a memory slot; values whose lifetimes (from
        the step that writes them to the last step that reads them) do not overlap share a slot.

        Returns ({value: (slot, shape, dtype)}, [slot bytes]). Slots are bytes, so values of
        different dtypes (an 8-bit plan's int8 activations and fp32 logits) share them like values
        of one dtype do. A step's inputs are alive while it runs, so its output never shares memory
        with them (the kernels refuse aliasing); outputs of the plan stay alive to the end. PyTorch
        steps allocate their own outputs.
        """
        shapes, dtypes = self.value_shapes(input_shape), self.value_dtypes()
        kept = set(self.output_names)
        slot_sizes: list[int] = []
        slot_busy_until: list[int] = []
        layout = {}
        for i, step in enumerate(self.steps):
            if step.kind not in KERNEL_KINDS:
                continue
            for name in step.outputs:
                self._place(name, i, shapes[name], dtypes[name], kept, layout, slot_sizes, slot_busy_until)
        return layout, slot_sizes

    def _place(self, name, i, shape, dtype, kept, layout, slot_sizes, slot_busy_until):
        """A slot for value ``name`` written by step ``i`` (see ``memory_layout``)."""
        nbytes = _slot_bytes(shape, dtype)
        free = [s for s in range(len(slot_sizes)) if slot_busy_until[s] < i]
        fitting = [s for s in free if slot_sizes[s] >= nbytes]
        if fitting:
            slot = min(fitting, key=lambda s: slot_sizes[s])
        elif free:
            slot = max(free, key=lambda s: slot_sizes[s])
            slot_sizes[slot] = nbytes
        else:
            slot = len(slot_sizes)
            slot_sizes.append(nbytes)
            slot_busy_until.append(0)
        end = len(self.steps) if name in kept else self._last_read.get(name, len(self.steps))
        slot_busy_until[slot] = end
        layout[name] = (slot, shape, dtype)

    def allocate(self, input_shape: tuple, *, share_memory: bool = True) -> dict[str, torch.Tensor]:
        """Preallocated outputs for ``run``, each in its value's dtype (``value_dtypes``):
        channels_last activations, contiguous 2-D outputs.

        ``share_memory`` lays values out by ``memory_layout`` (a few activations' worth, what the
        engine keeps per batch bucket); without it every value keeps its own buffer, so all
        intermediates can be inspected after the forward.
        """
        if share_memory:
            layout, slot_sizes = self.memory_layout(input_shape)
        else:
            shapes, dtypes = self.value_shapes(input_shape), self.value_dtypes()
            named = [n for s in self.steps if s.kind in KERNEL_KINDS for n in s.outputs]
            layout = {name: (i, shapes[name], dtypes[name]) for i, name in enumerate(named)}
            slot_sizes = [_slot_bytes(shape, dtype) for _, shape, dtype in layout.values()]
        slots = [torch.empty(n, dtype=torch.uint8, device=self.device) for n in slot_sizes]
        buffers = {}
        for name, (slot, shape, dtype) in layout.items():
            flat = slots[slot][:math.prod(shape) * dtype.itemsize].view(dtype)
            if len(shape) == 4:
                n, c, h, w = shape
                buffers[name] = flat.view(n, h, w, c).permute(0, 3, 1, 2)   # channels_last
            else:
                buffers[name] = flat.view(shape)
        return buffers

    def __len__(self) -> int:
        return len(self.steps)

    def __repr__(self) -> str:
        kinds = {}
        for s in self.steps:
            kinds[s.kind] = kinds.get(s.kind, 0) + 1
        return f"Plan({len(self.steps)} steps {kinds}, {self.dtype}, {self.device})"


def _slot_bytes(shape, dtype) -> int:
    """Bytes of a memory slot holding a value: rounded up to 16, so any dtype's view of a slot
    starts and ends aligned."""
    return -(-math.prod(shape) * dtype.itemsize // 16) * 16


def ref_names(structure) -> list[str]:
    """The value names of every ``Ref`` in ``structure`` (nested tuples, lists, dicts, slices: what
    ``bind_refs`` binds), in order."""
    out: list[str] = []

    def visit(v):
        if isinstance(v, Ref):
            out.append(v.name)
        elif isinstance(v, (list, tuple)):
            for item in v:
                visit(item)
        elif isinstance(v, dict):
            for item in v.values():
                visit(item)
        elif isinstance(v, slice):
            for item in (v.start, v.stop, v.step):
                visit(item)
    visit(structure)
    return out


def bind_refs(structure, env: dict):
    """``structure`` (nested tuples, lists, dicts, slices) with every ``Ref`` replaced by its value."""
    if isinstance(structure, Ref):
        return env[structure.name]
    if isinstance(structure, tuple):
        return tuple(bind_refs(v, env) for v in structure)
    if isinstance(structure, list):
        return [bind_refs(v, env) for v in structure]
    if isinstance(structure, dict):
        return {k: bind_refs(v, env) for k, v in structure.items()}
    if isinstance(structure, slice):
        return slice(bind_refs(structure.start, env), bind_refs(structure.stop, env),
                     bind_refs(structure.step, env))
    return structure
