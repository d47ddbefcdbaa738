"""Which kernels execute a plan: backend objects passed to ``Plan.run``.

The choice is made per call from the tensors' device, so one op never resolves two ways behind the
user's back:

* CUDA tensors -> ``triton`` (our kernels); CPU tensors -> ``torch`` (the references in kernels/,
  channels_last, which is what makes the CPU path fast); ``meta`` tensors -> ``triton`` (recording
  launches for ``fastres aot`` / ``fastres inspect``).
* ``FASTRES_BACKEND=triton|torch`` (read when fastres is imported) or ``fastres.set_backend(...)`` /
  ``with fastres.use_backend(...)`` force one. Forcing ``triton`` on CPU tensors needs ``TRITON_INTERPRET=1`` in the environment
  before fastres is imported: that is how the exact GPU code path runs in tests.
"""
from __future__ import annotations

import contextlib
import os
import threading

import torch

BACKENDS = ("auto", "torch", "triton")

_state = threading.local()
_global_choice: str | None = None


def _validate(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown fastres backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def set_backend(name: str | None) -> None:
    """Force a backend for every thread (``None`` or ``"auto"`` restores the default rule)."""
    global _global_choice
    _global_choice = None if name is None else _validate(name)


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend inside a ``with`` block, for the current thread."""
    previous = getattr(_state, "choice", None)
    _state.choice = _validate(name)
    try:
        yield
    finally:
        _state.choice = previous


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# FASTRES_BACKEND is read once, at import: this runs on every forward, and an os.environ lookup
# costs about a microsecond.
_ENV_CHOICE = _validate(os.environ.get("FASTRES_BACKEND") or "auto")


def requested_backend() -> str:
    choice = getattr(_state, "choice", None) or _global_choice
    return choice if choice is not None else _ENV_CHOICE


def backend_for(device: torch.device) -> str:
    """Name of the backend that runs a plan on tensors of ``device``."""
    choice = requested_backend()
    if device.type == "meta":
        return "triton"
    if choice == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if choice == "triton" and device.type != "cuda" and not interpreter_enabled():
        raise RuntimeError(
            f"the triton backend runs {device.type} tensors only under the Triton interpreter: set "
            "TRITON_INTERPRET=1 in the environment before importing fastres, or use CUDA tensors")
    return choice


# -- implementations --------------------------------------------------------------------------
class ReferenceBackend:
    """Runs each step as the plain-PyTorch reference beside its kernel (channels_last).

    On CPU, half-precision steps compute in fp32 and round once, like the kernels' epilogues.
    """
    name = "torch"

    def prepare(self, step, op):
        return None

    def to_nhwc(self, x):
        return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x

    def layout(self, step, role, x):
        """``x`` (read by ``step`` as ``role``, written by no kernel) in the layout the step takes."""
        return self.to_nhwc(x)

    def run(self, step, op, args, out):
        x = args.get("x")
        upcast = (x is not None and x.device.type == "cpu"
                  and x.dtype in (torch.float16, torch.bfloat16))
        return op.reference(step, args, out, upcast)


TorchBackend = ReferenceBackend


class TritonBackend:
    """Runs each kernel step as one Triton kernel launch; weights are packed once per plan.
    PyTorch steps run as PyTorch runs them."""
    name = "triton"

    def to_nhwc(self, x):
        """NHWC activations for the kernels: channels_last input is used as is; NCHW input goes
        through the extension's tiled transpose (a CUDA kernel, or its C++ twin on CPU)."""
        if x.dim() != 4 or x.is_contiguous(memory_format=torch.channels_last):
            return x     # (a 2-D operand, e.g. an SE gate, has no layout to change)
        if x.is_contiguous() and x.device.type != "meta":
            from .extension import nchw_to_nhwc
            return nchw_to_nhwc(x)
        return x.contiguous(memory_format=torch.channels_last)

    def layout(self, step, role, x):
        """The stem reads the plan input as it comes: its launch writes the zero-bordered 4-channel
        copy it runs on (kernels.conv2d_nhwc ROW_K) instead of a plain NHWC transpose."""
        if role == "x" and step.attrs.get("padded_input"):
            return x
        return self.to_nhwc(x)

    def prepare(self, step, op):
        """Pack ``step``'s weights for its kernel, once per plan (``step.packed["triton"]``)."""
        packed = step.packed.get(self.name)
        if packed is None and op.pack is not None:
            packed = step.packed[self.name] = op.pack(step)
        return packed

    def run(self, step, op, args, out):
        if op.launch is None:
            return op.reference(step, args, out, False)
        return op.launch(step, args, self.prepare(step, op), out)


def onednn_available() -> bool:
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
            and hasattr(torch._C._nn, "mkldnn_reorder_conv2d_weight"))


class OneDnnBackend(ReferenceBackend):
    """fp32 on CPU through oneDNN's fused convolution primitive (what the Engine uses on CPU).

    Each conv is one ``mkldnn::_convolution_pointwise`` call: conv + bias + ReLU, or with the
    residual (or the projection shortcut's output) added inside the primitive before the ReLU; a
    fused 3x3+1x1 pair runs as its two convs. Weights are reordered once, here, into oneDNN's
    blocked layout for ``hint_shape`` (``F.conv2d`` reorders per call). The layout oneDNN picks
    depends on the batch, so an instance is made per batch bucket; the hint does not restrict the
    input: any batch and image size still runs. Other steps run their references.
    """
    name = "onednn"

    def __init__(self, plan, hint_shape: tuple):
        shapes = plan.value_shapes(hint_shape)
        self.weights = {}
        for step in plan.steps:
            if step.kind not in ("conv", "conv_pair"):
                continue
            a, t = step.attrs, step.tensors
            x_shape = shapes[step.inputs["x"]]
            shortcut = None
            if "shortcut" in step.inputs:
                shortcut = self._reorder(t["shortcut_weight"], (0, 0), (a["shortcut_stride"],) * 2,
                                         (1, 1), 1, shapes[step.inputs["shortcut"]])
            if step.kind == "conv":
                self.weights[step.name] = (self._reorder(t["weight"], a["padding"], a["stride"],
                                                         a["dilation"], a["groups"], x_shape), shortcut)
            else:
                mid = self._reorder(t["mid_weight"], a["padding"], a["stride"], a["dilation"],
                                    a["groups"], x_shape)
                mid_shape = (x_shape[0], t["mid_weight"].shape[0], *shapes[step.output][2:])
                last = self._reorder(t["weight"], (0, 0), (1, 1), (1, 1), 1, mid_shape)
                self.weights[step.name] = (mid, last, shortcut)

    @staticmethod
    def _reorder(weight, padding, stride, dilation, groups, input_shape):
        return torch._C._nn.mkldnn_reorder_conv2d_weight(
            weight.contiguous().to_mkldnn(), list(padding), list(stride), list(dilation), groups,
            list(input_shape))

    @staticmethod
    def _conv(x, weight, bias, padding, stride, dilation, groups, relu, other):
        pointwise = torch.ops.mkldnn._convolution_pointwise
        geometry = (list(padding), list(stride), list(dilation), groups)
        unary = "relu" if relu else "none"
        if other is None:
            return pointwise(x, weight, bias, *geometry, unary, [], "")
        return pointwise.binary(x, other, weight, bias, *geometry, "add", None, unary, [], "")

    def run(self, step, op, args, out):
        if (step.kind not in ("conv", "conv_pair") or args["x"].dtype != torch.float32
                or step.extra_outputs or "residual_stride" in step.attrs):
            return super().run(step, op, args, out)   # variants oneDNN's primitive lacks
        a, t = step.attrs, step.tensors
        weights = self.weights[step.name]
        other = args.get("residual")
        if "shortcut" in step.inputs:
            s = a["shortcut_stride"]
            other = torch.ops.mkldnn._convolution_pointwise(
                args["shortcut"], weights[-1], None, [0, 0], [s, s], [1, 1], 1, "none", [], "")
        x = args["x"]
        if step.kind == "conv":
            y = self._conv(x, weights[0], t["bias"], a["padding"], a["stride"], a["dilation"],
                           a["groups"], a["relu"], other)
        else:
            mid = self._conv(x, weights[0], t["mid_bias"], a["padding"], a["stride"], a["dilation"],
                             a["groups"], True, None)
            y = self._conv(mid, weights[1], t["bias"], (0, 0), (1, 1), (1, 1), 1, True, other)
        return out.copy_(y) if out is not None else y


_IMPLS = {"torch": ReferenceBackend(), "triton": TritonBackend()}


def get_backend(name: str):
    """The shared backend object of ``name`` ("torch" or "triton")."""
    return _IMPLS[name]
