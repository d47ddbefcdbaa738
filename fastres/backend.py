"""Which kernels execute a plan: the Triton kernels, or their plain-PyTorch references.

The choice is made per call from the tensors' device, so one op never resolves two ways behind the
user's back:

* CUDA tensors -> ``triton`` (our kernels); CPU tensors -> ``torch`` (the references in kernels/,
  channels_last, which is what makes the CPU path fast); ``meta`` tensors -> ``triton`` (recording
  launches for ``fastres aot`` / ``fastres inspect``).
* ``FASTRES_BACKEND=triton|torch`` or ``fastres.set_backend(...)`` / ``with fastres.use_backend(...)``
  force one. Forcing ``triton`` on CPU tensors needs ``TRITON_INTERPRET=1`` in the environment
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


def requested_backend() -> str:
    choice = getattr(_state, "choice", None) or _global_choice or os.environ.get("FASTRES_BACKEND") or "auto"
    return _validate(choice)


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
class TorchBackend:
    """Runs each plan step as the plain-PyTorch reference beside its kernel (channels_last).

    On CPU, half-precision steps compute in fp32 and round once, like the kernels' epilogues.
    """
    name = "torch"

    def prepare(self, step):
        return None

    def to_nhwc(self, x):
        return x.contiguous(memory_format=torch.channels_last)

    def plan_input(self, plan, x):
        """The value "input" of a plan run: ``x`` in the layout this backend's first steps read."""
        return self.to_nhwc(x)

    @staticmethod
    def _upcast(x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16)

    def conv(self, step, x, *, residual=None, shortcut=None, out=None):
        from .kernels.conv2d_nhwc import conv2d_nhwc_ref
        sc = step.shortcut
        y = conv2d_nhwc_ref(x, step.weight, step.bias, stride=step.stride, padding=step.padding,
                            dilation=step.dilation, groups=step.groups, residual=residual,
                            relu=step.relu, shortcut=shortcut,
                            shortcut_weight=sc.weight if sc else None,
                            shortcut_stride=sc.stride if sc else 1, upcast=self._upcast(x))
        return out.copy_(y) if out is not None else y

    def conv_pair(self, step, x, *, residual=None, shortcut=None, out=None):
        from .kernels.conv3x3_conv1x1_nhwc import conv3x3_conv1x1_nhwc_ref
        mid, last = step.mid, step.last
        sc = last.shortcut
        y = conv3x3_conv1x1_nhwc_ref(x, mid.weight, mid.bias, last.weight, last.bias, stride=mid.stride,
                                     padding=mid.padding, dilation=mid.dilation, groups=mid.groups,
                                     residual=residual, shortcut=shortcut,
                                     shortcut_weight=sc.weight if sc else None,
                                     shortcut_stride=sc.stride if sc else 1, upcast=self._upcast(x))
        return out.copy_(y) if out is not None else y

    def max_pool(self, step, x, *, out=None):
        from .kernels.max_pool2d_nhwc import max_pool2d_nhwc_ref
        y = max_pool2d_nhwc_ref(x)
        return out.copy_(y) if out is not None else y

    def head(self, step, x, *, out=None):
        from .kernels.avgpool_linear import avgpool_linear_ref
        y = avgpool_linear_ref(x, step.weight, step.bias, upcast=self._upcast(x))
        return out.copy_(y) if out is not None else y

    def avgpool(self, x):
        return x.mean(dim=(2, 3))


def onednn_available() -> bool:
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
            and hasattr(torch._C._nn, "mkldnn_reorder_conv2d_weight"))


class OneDnnBackend(TorchBackend):
    """fp32 on CPU through oneDNN's fused convolution primitive (what the Engine uses on CPU).

    Each conv is one ``mkldnn::_convolution_pointwise`` call: conv + bias + ReLU, or with the
    residual (or the projection shortcut's output) added inside the primitive before the ReLU; a
    fused 3x3+1x1 pair runs as its two convs. Weights are reordered once, here, into oneDNN's
    blocked layout for ``hint_shape`` (``F.conv2d`` reorders per call). The layout oneDNN picks
    depends on the batch, so an instance is made per batch bucket; the hint does not restrict the
    input: any batch and image size still runs. Pooling and the head are the torch references.
    """
    name = "onednn"

    def __init__(self, plan, hint_shape: tuple):
        from .plan import ConvPairStep, ConvStep
        shapes = plan.value_shapes(hint_shape)
        self.weights = {}
        for step in plan.steps:
            convs = ([step.mid, step.last] if isinstance(step, ConvPairStep)
                     else [step] if isinstance(step, ConvStep) else [])
            for conv in convs:
                shapes.setdefault(conv.dst, conv.out_shape(shapes))   # a pair's inner value
                weight = self._reorder(conv.weight, conv.padding, conv.stride, conv.dilation,
                                       conv.groups, shapes[conv.src])
                shortcut = None
                if conv.shortcut is not None:
                    shortcut = self._reorder(conv.shortcut.weight, 0, conv.shortcut.stride, 1, 1,
                                             shapes[conv.shortcut.src])
                self.weights[conv.name] = (weight, shortcut)

    @staticmethod
    def _reorder(weight, padding, stride, dilation, groups, input_shape):
        return torch._C._nn.mkldnn_reorder_conv2d_weight(
            weight.contiguous().to_mkldnn(), [padding] * 2, [stride] * 2, [dilation] * 2, groups,
            list(input_shape))

    def conv(self, step, x, *, residual=None, shortcut=None, out=None):
        pointwise = torch.ops.mkldnn._convolution_pointwise
        weight, shortcut_weight = self.weights[step.name]
        geometry = ([step.padding] * 2, [step.stride] * 2, [step.dilation] * 2, step.groups)
        unary = "relu" if step.relu else "none"
        other = residual
        if step.shortcut is not None:
            sc = step.shortcut
            other = pointwise(shortcut, shortcut_weight, None, [0, 0], [sc.stride] * 2, [1, 1], 1,
                              "none", [], "")
        if other is None:
            y = pointwise(x, weight, step.bias, *geometry, unary, [], "")
        else:
            y = pointwise.binary(x, other, weight, step.bias, *geometry, "add", None, unary, [], "")
        return out.copy_(y) if out is not None else y

    def conv_pair(self, step, x, *, residual=None, shortcut=None, out=None):
        mid = self.conv(step.mid, x)
        return self.conv(step.last, mid, residual=residual, shortcut=shortcut, out=out)


class TritonBackend:
    """Runs each plan step as one Triton kernel launch; weights are packed once per plan."""
    name = "triton"

    def to_nhwc(self, x):
        """NHWC activations for the kernels: channels_last input is used as is; NCHW input goes
        through the extension's tiled transpose (a CUDA kernel, or its C++ twin on CPU)."""
        if x.is_contiguous(memory_format=torch.channels_last):
            return x
        if x.is_contiguous() and x.device.type != "meta":
            from .extension import nchw_to_nhwc
            return nchw_to_nhwc(x)
        return x.contiguous(memory_format=torch.channels_last)

    def prepare(self, step):
        """Pack ``step``'s weights for its kernel, once per plan (``step.packed["triton"]``)."""
        packed = step.packed.get(self.name)
        if packed is None:
            packed = step.packed[self.name] = (self._pack_stem(step) if self._is_padded_stem(step)
                                               else step.pack_for_triton())
        return packed

    # The stem (a conv reading the plan input, <= 4 channels, see kernels.conv2d_nhwc.pads_stem_input)
    # runs with padding 0 over a zero-bordered 4-channel copy of the input (ROW_K: 16-byte loads);
    # plan_input writes that copy in place of the plain NHWC transpose, and an input already in that
    # layout (4 channels for a 3-channel plan, e.g. from preprocess(border=...)) is used as is.
    @staticmethod
    def _is_padded_stem(step) -> bool:
        from .kernels.conv2d_nhwc import pads_stem_input
        return (getattr(step, "src", None) == "input" and hasattr(step, "groups") and step.shortcut is None
                and pads_stem_input(step.weight, groups=step.groups, dilation=step.dilation))

    @staticmethod
    def _pack_stem(step):
        from .kernels.conv2d_nhwc import pack_stem_weight
        return pack_stem_weight(step.weight)

    def plan_input(self, plan, x):
        from .kernels.conv2d_nhwc import STEM_CHANNELS
        readers = [s for s in plan.steps if "input" in s.reads]
        if not readers or not all(self._is_padded_stem(s) for s in readers):
            return self.to_nhwc(x)
        if x.shape[1] == STEM_CHANNELS != plan.in_channels:
            return self.to_nhwc(x)     # already the padded stem input
        if any((s.padding, s.stride) != (readers[0].padding, readers[0].stride) for s in readers):
            return self.to_nhwc(x)
        return self._padded_stem_input(x, readers[0])

    @staticmethod
    def _padded_stem_input(x, step):
        """[N, C<=4, H, W] -> the zero-bordered [N, 4, H', W'] channels_last input of the ROW_K stem."""
        from .extension import nchw_to_nhwc_padded, nchw_to_nhwc_padded_ref
        from .kernels.conv2d_nhwc import STEM_CHANNELS, stem_input_padding
        border = stem_input_padding(x.shape[2], x.shape[3], step.padding, step.stride)
        pad = nchw_to_nhwc_padded_ref if x.device.type == "meta" else nchw_to_nhwc_padded
        return pad(x, STEM_CHANNELS, border)

    def conv(self, step, x, *, residual=None, shortcut=None, out=None):
        from .kernels import conv2d_nhwc as k
        packed = self.prepare(step)
        if packed.row_k:
            if x.shape[1] != packed.in_channels:   # a 3-channel input reached the stem: pad it here
                x = self._padded_stem_input(x, step)
            return k.conv2d_nhwc_packed(x, packed, step.bias, stride=step.stride, padding=0, relu=step.relu,
                                        residual=residual, out=out)
        return k.conv2d_nhwc_packed(x, packed, step.bias, stride=step.stride, padding=step.padding,
                                    dilation=step.dilation, residual=residual, relu=step.relu,
                                    shortcut=shortcut,
                                    shortcut_stride=step.shortcut.stride if step.shortcut else 1,
                                    out=out)

    def conv_pair(self, step, x, *, residual=None, shortcut=None, out=None):
        from .kernels.conv3x3_conv1x1_nhwc import conv3x3_conv1x1_nhwc_packed
        mid, last = step.mid, step.last
        return conv3x3_conv1x1_nhwc_packed(
            x, self.prepare(step), mid.bias, last.bias, stride=mid.stride, padding=mid.padding,
            dilation=mid.dilation, residual=residual, shortcut=shortcut,
            shortcut_stride=last.shortcut.stride if last.shortcut else 1, out=out)

    def max_pool(self, step, x, *, out=None):
        from .kernels.max_pool2d_nhwc import max_pool2d_nhwc
        return max_pool2d_nhwc(x, out=out)

    def head(self, step, x, *, out=None):
        from .kernels import avgpool_linear as k
        return k.avgpool_linear_packed(x, self.prepare(step), step.bias, out=out)

    def avgpool(self, x):
        return x.mean(dim=(2, 3))


_IMPLS = {"torch": TorchBackend(), "triton": TritonBackend()}


def get_backend(name: str):
    return _IMPLS[name]
