"""The Triton kernels as PyTorch operators: ``torch.ops.fastres.conv2d_nhwc`` and friends.

Each kernel entry point is a ``torch.library.triton_op``:

    fastres::conv2d_nhwc(x, weight, bias, stride, padding, dilation, groups, residual, relu,
                         shortcut, shortcut_weight, shortcut_stride)
        out = relu?(conv2d(x, weight) [+ conv1x1_s(shortcut, shortcut_weight)] + bias [+ residual])
    fastres::conv3x3_conv1x1_nhwc(y1, w_mid, b_mid, w_out, b_out, stride, padding, dilation, groups,
                                  residual, shortcut, shortcut_weight, shortcut_stride)
        out = relu(conv1x1(relu(conv3x3(y1) + b_mid), w_out) [+ conv1x1_s(shortcut, shortcut_weight)]
                   + b_out [+ residual])
    fastres::max_pool2d_nhwc(x)                  out = max_pool2d(x, 3, stride=2, padding=1)
    fastres::avgpool_linear(x, weight, bias)     out = mean_hw(x) @ weight.T + bias

* CUDA tensors run the Triton kernel (launched through ``torch.library.wrap_triton``, so
  ``torch.compile`` / inductor see the kernel itself); CPU tensors run the kernel's PyTorch
  reference (``*_ref`` beside it in ``fastres.kernels``) with the kernel's numerics (fp32
  accumulation, one rounding to x's dtype). The Triton wrapper (the op's body) is also its
  fake/meta implementation: shapes, dtypes and channels_last strides come from the same code that
  allocates the real output.
* Operands are PyTorch-layout tensors: activations ``[N, C, H, W]`` (any memory format; copied to
  channels_last when not already), conv weights ``[C_out, C_in/groups, KH, KW]``, an nn.Linear
  weight ``[classes, C]``; biases any float dtype, used in fp32. Conv and pool outputs are
  channels_last, the head's ``[N, classes]`` is contiguous; every output is a new tensor in x's
  dtype (float16, bfloat16 or float32) and no input is written, so the ops are functional.
  Why not the packed weights the kernels read: the packing (K order, block-diagonal packed groups,
  padded head rows) is a detail of one backend's tiles; an exported program should say
  ``conv2d_nhwc(x, W, ...)`` with the weight torchvision has, and the CPU reference needs that
  layout anyway. Under ``torch.compile`` the packing is a few aten ops on constant weights that
  inductor's freezing folds away; eager models keep using the packed entry points of
  ``fastres.kernels`` through the plan, which packs once per plan.

The ops launch the configuration of each kernel's tile rule (the launch is recorded, then issued
through wrap_triton, so ``FASTRES_AUTOTUNE`` timing is not consulted here). No autograd formula is
registered: these are inference ops.

Nothing here runs at import of ``fastres``; ``import fastres.library`` registers the ops (once).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.library import triton_op, wrap_triton

from .kernels._common import FLOAT_DTYPES
from .kernels._launch import is_recording, record_launches
from .kernels.avgpool_linear import _avgpool_linear_kernel, avgpool_linear_packed, avgpool_linear_ref, \
    pack_linear_weight
from .kernels.conv2d_nhwc import _conv2d_nhwc_kernel, conv2d_nhwc_packed, conv2d_nhwc_ref, pack_conv_weight
from .kernels.conv3x3_conv1x1_nhwc import _conv3x3_conv1x1_nhwc_kernel, conv3x3_conv1x1_nhwc_packed, \
    conv3x3_conv1x1_nhwc_ref, pack_conv3x3_conv1x1
from .kernels.max_pool2d_nhwc import _max_pool2d_nhwc_kernel, max_pool2d_nhwc_ref
from .kernels.max_pool2d_nhwc import max_pool2d_nhwc as _max_pool2d_nhwc_launch

__all__ = ["conv2d_nhwc", "conv3x3_conv1x1_nhwc", "max_pool2d_nhwc", "avgpool_linear", "OPS"]

_CL = torch.channels_last


# -- shared argument checks (the same on every device, so CPU and CUDA refuse the same calls) ------
def _nhwc(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.contiguous(memory_format=_CL)


def _check_float(op: str, x: torch.Tensor, **others) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"fastres::{op}: x dtype must be float16, bfloat16 or float32, got {x.dtype}")
    for name, t in others.items():
        if t is None:
            continue
        if name.startswith(("b", "bias")):   # biases: any float dtype, used in fp32
            if not t.is_floating_point():
                raise TypeError(f"fastres::{op}: {name} must be a float tensor, got {t.dtype}")
        elif t.dtype != x.dtype:
            raise TypeError(f"fastres::{op}: {name} dtype {t.dtype} != x dtype {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"fastres::{op}: {name} is on {t.device}, x on {x.device}")


def _check_conv_shapes(op: str, x, weight, groups: int, what: str = "weight") -> None:
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"fastres::{op}: x and {what} must be 4-D, got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if groups < 1 or x.shape[1] % groups or weight.shape[0] % groups or x.shape[1] // groups != weight.shape[1]:
        raise ValueError(f"fastres::{op}: x has {x.shape[1]} channels, {what} {tuple(weight.shape)} with "
                         f"groups={groups} expects {weight.shape[1] * groups}")


def _check_shortcut(op: str, shortcut, shortcut_weight) -> None:
    if (shortcut is None) != (shortcut_weight is None):
        raise ValueError(f"fastres::{op}: shortcut and shortcut_weight go together (one of them is None)")


def _launch(kernel, wrapped, call) -> None:
    """Launch a recorded ``KernelCall`` of ``kernel`` through its ``wrap_triton`` wrapper (traced as a
    kernel HOP by make_fx / torch.compile / export, a plain launch in eager).

    On fake or meta tensors there is nothing to compute: the output (allocated by the wrapper) is
    the result. wrap_triton traces that case itself; an interpreted kernel (TRITON_INTERPRET=1) it
    returns unwrapped, so that launch is skipped here."""
    if call.kernel is not kernel:
        raise AssertionError(f"recorded {call.name}, expected a launch of {kernel}")
    if wrapped is kernel and any(_is_fake(a) for a in call.args.values()):
        return
    wrapped[call.grid](**call.args, **call.constexprs, num_warps=call.num_warps, num_stages=call.num_stages,
                       **call.options)


def _is_fake(t) -> bool:
    from torch._subclasses.fake_tensor import is_fake
    return isinstance(t, torch.Tensor) and (t.device.type == "meta" or is_fake(t))


def _recorded(wrapper, *args, **kwargs):
    """(output, the KernelCalls to launch) of a fastres.kernels launch wrapper run in recording mode:
    it checks the operands and allocates the output exactly as for a real launch, but does not
    launch. Inside an outer ``record_launches()`` (fastres aot/inspect) the calls go to that
    recording instead and nothing is left to launch."""
    outer = is_recording()
    with record_launches() as calls:
        out = wrapper(*args, **kwargs)
    if outer:
        for call in calls:
            call.launch()      # appends to the outer recording
        return out, []
    return out, calls


# -- conv2d_nhwc ---------------------------------------------------------------------------------
_GEOMETRY = "int[2] stride=[1, 1], int[2] padding={pad}, int[2] dilation=[1, 1], int groups=1"


@triton_op("fastres::conv2d_nhwc", mutates_args=(), schema=(
    f"(Tensor x, Tensor weight, Tensor? bias=None, {_GEOMETRY.format(pad='[0, 0]')}, Tensor? residual=None, "
    "bool relu=False, Tensor? shortcut=None, Tensor? shortcut_weight=None, int shortcut_stride=1) -> Tensor"))
def conv2d_nhwc(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                stride: list[int] = (1, 1), padding: list[int] = (0, 0), dilation: list[int] = (1, 1),
                groups: int = 1, residual: Optional[torch.Tensor] = None, relu: bool = False,
                shortcut: Optional[torch.Tensor] = None, shortcut_weight: Optional[torch.Tensor] = None,
                shortcut_stride: int = 1) -> torch.Tensor:
    """``relu?(conv2d(x, weight, stride, padding, dilation, groups) [+ conv1x1_s(shortcut,
    shortcut_weight)] + bias [+ residual])``, output channels_last in x's dtype."""
    if x.device.type == "cpu":
        return _conv2d_nhwc_cpu(x, weight, bias, stride, padding, dilation, groups, residual, relu,
                                shortcut, shortcut_weight, shortcut_stride)
    return _conv2d_nhwc_triton(x, weight, bias, stride, padding, dilation, groups, residual, relu,
                               shortcut, shortcut_weight, shortcut_stride)


def _conv2d_nhwc_triton(x, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
                        residual=None, relu=False, shortcut=None, shortcut_weight=None, shortcut_stride=1):
    """The op on the Triton kernel (CUDA; CPU tensors under TRITON_INTERPRET=1, as the tests run it)."""
    _check_conv_args(x, weight, bias, groups, residual, shortcut, shortcut_weight)
    packed = pack_conv_weight(weight, groups=groups, shortcut_weight=shortcut_weight)
    out, calls = _recorded(conv2d_nhwc_packed, _nhwc(x), packed,
                           bias.contiguous() if bias is not None else None,
                           stride=tuple(stride), padding=tuple(padding), dilation=tuple(dilation),
                           residual=_nhwc(residual), relu=relu, shortcut=_nhwc(shortcut),
                           shortcut_stride=shortcut_stride)
    for call in calls:
        _launch(_conv2d_nhwc_kernel, wrap_triton(_conv2d_nhwc_kernel), call)
    return out


def _check_conv_args(x, weight, bias, groups, residual, shortcut, shortcut_weight) -> None:
    _check_float("conv2d_nhwc", x, weight=weight, bias=bias, residual=residual, shortcut=shortcut,
                 shortcut_weight=shortcut_weight)
    _check_conv_shapes("conv2d_nhwc", x, weight, groups)
    _check_shortcut("conv2d_nhwc", shortcut, shortcut_weight)


@conv2d_nhwc.register_kernel("cpu")
def _conv2d_nhwc_cpu(x, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
                     residual=None, relu=False, shortcut=None, shortcut_weight=None, shortcut_stride=1):
    _check_conv_args(x, weight, bias, groups, residual, shortcut, shortcut_weight)
    out = conv2d_nhwc_ref(_nhwc(x), weight, bias, stride=tuple(stride), padding=tuple(padding),
                          dilation=tuple(dilation), groups=groups, residual=residual, relu=relu,
                          shortcut=shortcut, shortcut_weight=shortcut_weight, shortcut_stride=shortcut_stride,
                          upcast=True)
    return out.contiguous(memory_format=_CL)


# -- conv3x3_conv1x1_nhwc --------------------------------------------------------------------------
@triton_op("fastres::conv3x3_conv1x1_nhwc", mutates_args=(), schema=(
    f"(Tensor y1, Tensor w_mid, Tensor b_mid, Tensor w_out, Tensor b_out, {_GEOMETRY.format(pad='[1, 1]')}, "
    "Tensor? residual=None, Tensor? shortcut=None, Tensor? shortcut_weight=None, int shortcut_stride=1) -> Tensor"))
def conv3x3_conv1x1_nhwc(y1: torch.Tensor, w_mid: torch.Tensor, b_mid: torch.Tensor, w_out: torch.Tensor,
                         b_out: torch.Tensor, stride: list[int] = (1, 1), padding: list[int] = (1, 1),
                         dilation: list[int] = (1, 1), groups: int = 1,
                         residual: Optional[torch.Tensor] = None, shortcut: Optional[torch.Tensor] = None,
                         shortcut_weight: Optional[torch.Tensor] = None,
                         shortcut_stride: int = 1) -> torch.Tensor:
    """A bottleneck's 3x3 (``w_mid``, ReLU) and last 1x1 (``w_out``, optional projection shortcut and
    residual, ReLU) in one kernel; output channels_last in y1's dtype."""
    if y1.device.type == "cpu":
        return _conv3x3_conv1x1_nhwc_cpu(y1, w_mid, b_mid, w_out, b_out, stride, padding, dilation, groups,
                                         residual, shortcut, shortcut_weight, shortcut_stride)
    return _conv3x3_conv1x1_nhwc_triton(y1, w_mid, b_mid, w_out, b_out, stride, padding, dilation, groups,
                                        residual, shortcut, shortcut_weight, shortcut_stride)


def _conv3x3_conv1x1_nhwc_triton(y1, w_mid, b_mid, w_out, b_out, stride=(1, 1), padding=(1, 1),
                                 dilation=(1, 1), groups=1, residual=None, shortcut=None, shortcut_weight=None,
                                 shortcut_stride=1):
    _check_pair_args(y1, w_mid, b_mid, w_out, b_out, groups, residual, shortcut, shortcut_weight)
    packed = pack_conv3x3_conv1x1(w_mid, w_out, groups=groups, shortcut_weight=shortcut_weight)
    out, calls = _recorded(conv3x3_conv1x1_nhwc_packed, _nhwc(y1), packed, b_mid.contiguous(),
                           b_out.contiguous(), stride=tuple(stride), padding=tuple(padding),
                           dilation=tuple(dilation), residual=_nhwc(residual), shortcut=_nhwc(shortcut),
                           shortcut_stride=shortcut_stride)
    for call in calls:
        _launch(_conv3x3_conv1x1_nhwc_kernel, wrap_triton(_conv3x3_conv1x1_nhwc_kernel), call)
    return out


def _check_pair_args(y1, w_mid, b_mid, w_out, b_out, groups, residual, shortcut, shortcut_weight) -> None:
    op = "conv3x3_conv1x1_nhwc"
    _check_float(op, y1, w_mid=w_mid, b_mid=b_mid, w_out=w_out, b_out=b_out, residual=residual,
                 shortcut=shortcut, shortcut_weight=shortcut_weight)
    _check_conv_shapes(op, y1, w_mid, groups, "w_mid")
    if tuple(w_mid.shape[2:]) != (3, 3) or w_out.dim() != 4 or tuple(w_out.shape[2:]) != (1, 1) \
            or w_out.shape[1] != w_mid.shape[0]:
        raise ValueError(f"fastres::{op}: w_mid must be [C_mid, C_in/groups, 3, 3] and w_out "
                         f"[C_out, C_mid, 1, 1], got {tuple(w_mid.shape)} and {tuple(w_out.shape)}")
    _check_shortcut(op, shortcut, shortcut_weight)


@conv3x3_conv1x1_nhwc.register_kernel("cpu")
def _conv3x3_conv1x1_nhwc_cpu(y1, w_mid, b_mid, w_out, b_out, stride=(1, 1), padding=(1, 1),
                              dilation=(1, 1), groups=1, residual=None, shortcut=None, shortcut_weight=None,
                              shortcut_stride=1):
    _check_pair_args(y1, w_mid, b_mid, w_out, b_out, groups, residual, shortcut, shortcut_weight)
    out = conv3x3_conv1x1_nhwc_ref(_nhwc(y1), w_mid, b_mid, w_out, b_out, stride=tuple(stride),
                                   padding=tuple(padding), dilation=tuple(dilation), groups=groups,
                                   residual=residual, shortcut=shortcut, shortcut_weight=shortcut_weight,
                                   shortcut_stride=shortcut_stride, upcast=True)
    return out.contiguous(memory_format=_CL)


# -- max_pool2d_nhwc -------------------------------------------------------------------------------
@triton_op("fastres::max_pool2d_nhwc", mutates_args=(), schema="(Tensor x) -> Tensor")
def max_pool2d_nhwc(x: torch.Tensor) -> torch.Tensor:
    """3x3/s2/p1 max pooling (the ResNet stem's); output channels_last."""
    if x.device.type == "cpu":
        return _max_pool2d_nhwc_cpu(x)
    return _max_pool2d_nhwc_triton(x)


def _max_pool2d_nhwc_triton(x):
    _check_float("max_pool2d_nhwc", x)
    out, calls = _recorded(_max_pool2d_nhwc_launch, _nhwc(x))
    for call in calls:
        _launch(_max_pool2d_nhwc_kernel, wrap_triton(_max_pool2d_nhwc_kernel), call)
    return out


@max_pool2d_nhwc.register_kernel("cpu")
def _max_pool2d_nhwc_cpu(x):
    _check_float("max_pool2d_nhwc", x)
    if x.dim() != 4:
        raise ValueError(f"fastres::max_pool2d_nhwc: x must be 4-D [N, C, H, W], got {tuple(x.shape)}")
    return max_pool2d_nhwc_ref(_nhwc(x)).contiguous(memory_format=_CL)


# -- avgpool_linear ----------------------------------------------------------------------------------
@triton_op("fastres::avgpool_linear", mutates_args=(), schema="(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor")
def avgpool_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``mean_hw(x) @ weight.T + bias`` (global average pool fused with an nn.Linear); [N, classes]."""
    if x.device.type == "cpu":
        return _avgpool_linear_cpu(x, weight, bias)
    return _avgpool_linear_triton(x, weight, bias)


def _avgpool_linear_triton(x, weight, bias=None):
    _check_head_args(x, weight, bias)
    out, calls = _recorded(avgpool_linear_packed, _nhwc(x), pack_linear_weight(weight),
                           bias.float().contiguous() if bias is not None else None)
    for call in calls:
        _launch(_avgpool_linear_kernel, wrap_triton(_avgpool_linear_kernel), call)
    return out


def _check_head_args(x, weight, bias) -> None:
    _check_float("avgpool_linear", x, weight=weight, bias=bias)
    if x.dim() != 4 or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"fastres::avgpool_linear: x [N, C, H, W] and weight [classes, C] do not fit: "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"fastres::avgpool_linear: bias must have shape ({weight.shape[0]},), got "
                         f"{tuple(bias.shape)}")


@avgpool_linear.register_kernel("cpu")
def _avgpool_linear_cpu(x, weight, bias=None):
    _check_head_args(x, weight, bias)
    return avgpool_linear_ref(x, weight, bias, upcast=True).contiguous()


TRITON_IMPLS = {"conv2d_nhwc": _conv2d_nhwc_triton, "conv3x3_conv1x1_nhwc": _conv3x3_conv1x1_nhwc_triton,
                "max_pool2d_nhwc": _max_pool2d_nhwc_triton, "avgpool_linear": _avgpool_linear_triton}
OPS = {"conv2d_nhwc": conv2d_nhwc, "conv3x3_conv1x1_nhwc": conv3x3_conv1x1_nhwc,
       "max_pool2d_nhwc": max_pool2d_nhwc, "avgpool_linear": avgpool_linear}
