"""The inference plan: a ResNet as a short list of fused kernel steps over NHWC activations.

A plan is data: each step names the values it reads and the value it writes, and holds its
folded weights (compute dtype, PyTorch layout) and fp32 bias. Executing a step calls exactly one
kernel of the chosen backend (``fastres.backend``): a Triton kernel from kernels/, or the plain
PyTorch reference beside it. The plan knows nothing about tiles; kernels know nothing about ResNet.

    Stem        conv7x7/s2 + bias + ReLU
    MaxPool     3x3/s2/p1
    Block*      Basic:      conv3x3+ReLU -> conv3x3 + shortcut + ReLU
                Bottleneck: conv1x1+ReLU -> conv3x3+ReLU -> conv1x1 + shortcut + ReLU
                (a projection shortcut is a second operand of the last GEMM: concatenated K;
                where the mid width allows, the 3x3 and last 1x1 are one kernel: ConvPairStep)
    Head        global average pool + FC

Plans are cached on the model and guarded by the identity and version counter of every parameter
and buffer (``ParameterGuard``): any in-place update (optimizer step, ``load_state_dict``), any
replacement (``.to()``, ``.half()``, assignment) makes the next eval forward build a new plan.
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from . import backend as _backend
from .fold import NotFoldableError, fold_conv_bn
from .kernels.conv3x3_conv1x1_nhwc import fuses_conv3x3_conv1x1

backend_for = _backend.backend_for

_FP16_MAX = torch.finfo(torch.float16).max


# -- steps ------------------------------------------------------------------------------------
@dataclass(eq=False)
class Shortcut:
    """A projection shortcut (1x1 conv, stride ``stride``) fused into the block's last GEMM."""
    src: str
    weight: torch.Tensor
    stride: int


@dataclass(eq=False)
class ConvStep:
    """``dst = relu?(conv(src) [+ conv1x1(shortcut.src)] + bias [+ residual])`` in one kernel."""
    name: str
    src: str
    dst: str
    weight: torch.Tensor
    bias: torch.Tensor
    stride: int
    padding: int
    dilation: int
    groups: int
    relu: bool
    residual: Optional[str] = None
    shortcut: Optional[Shortcut] = None
    packed: dict = field(default_factory=dict)   # backend-specific packed weights, built once

    @property
    def reads(self) -> list[str]:
        names = [self.src]
        if self.residual:
            names.append(self.residual)
        if self.shortcut:
            names.append(self.shortcut.src)
        return names

    @property
    def ops(self) -> list[str]:
        kh, kw = self.weight.shape[2:]
        ops = [f"conv{kh}x{kw}/s{self.stride}" + (f"/d{self.dilation}" if self.dilation > 1 else "")
               + (f"/g{self.groups}" if self.groups > 1 else "")]
        if self.shortcut:
            ops.append(f"projection1x1/s{self.shortcut.stride}")
        ops.append("bias")
        if self.residual:
            ops.append("residual")
        if self.relu:
            ops.append("relu")
        return ops

    def pack_for_triton(self):
        from .kernels.conv2d_nhwc import pack_conv_weight
        return pack_conv_weight(self.weight, groups=self.groups,
                                shortcut_weight=self.shortcut.weight if self.shortcut else None)

    def out_shape(self, shapes: dict) -> tuple:
        n, _, h, w = shapes[self.src]
        k = self.weight.shape[2]
        span = self.dilation * (k - 1) + 1
        return (n, self.weight.shape[0], (h + 2 * self.padding - span) // self.stride + 1,
                (w + 2 * self.padding - span) // self.stride + 1)

    def cost(self, shapes: dict, itemsize: int) -> dict:
        """Modelled work of this launch: FLOPs, activation bytes read+written, weight bytes."""
        n, c_out, oh, ow = shapes[self.dst]
        m = n * oh * ow
        k = self.weight[0].numel()
        flops = 2 * m * c_out * k
        act = (_numel(shapes[self.src]) + m * c_out) * itemsize
        weights = self.weight.numel() * itemsize + 4 * c_out
        if self.residual:
            act += m * c_out * itemsize
        if self.shortcut:
            c_sc = self.shortcut.weight.shape[1]
            flops += 2 * m * c_out * c_sc
            act += m * c_sc * itemsize          # only the strided pixels are read
            weights += self.shortcut.weight.numel() * itemsize
        return {"flops": flops, "act_bytes": act, "weight_bytes": weights,
                "shape": {"M": m, "N": c_out, "K": k + (self.shortcut.weight.shape[1] if self.shortcut else 0)}}

    def run(self, backend, env: dict, out=None):
        return backend.conv(self, env[self.src],
                            residual=env[self.residual] if self.residual else None,
                            shortcut=env[self.shortcut.src] if self.shortcut else None, out=out)


@dataclass(eq=False)
class ConvPairStep:
    """A bottleneck's 3x3 and last 1x1 in one kernel; the 3x3 output never touches memory.

    ``dst = relu(conv1x1(relu(conv3x3(src) + b_mid)) [+ projection] + bias [+ residual])``: ``mid``
    is the 3x3 step and ``last`` the 1x1 step (with the block's shortcut) it replaces. Which
    blocks fuse is ``kernels.conv3x3_conv1x1_nhwc.fuses_conv3x3_conv1x1``.
    """
    name: str
    mid: ConvStep
    last: ConvStep
    packed: dict = field(default_factory=dict)

    src = property(lambda self: self.mid.src)
    dst = property(lambda self: self.last.dst)

    @property
    def reads(self) -> list[str]:
        return [self.mid.src] + self.last.reads[1:]

    @property
    def ops(self) -> list[str]:
        return self.mid.ops + ["(on chip)"] + self.last.ops

    def pack_for_triton(self):
        from .kernels.conv3x3_conv1x1_nhwc import pack_conv3x3_conv1x1
        sc = self.last.shortcut
        return pack_conv3x3_conv1x1(self.mid.weight, self.last.weight, groups=self.mid.groups,
                                    shortcut_weight=sc.weight if sc else None)

    def out_shape(self, shapes: dict) -> tuple:
        mid = self.mid.out_shape(shapes)
        return (mid[0], self.last.weight.shape[0], mid[2], mid[3])

    def cost(self, shapes: dict, itemsize: int) -> dict:
        mid_shape = self.mid.out_shape(shapes)
        inner = dict(shapes, **{self.mid.dst: mid_shape})
        a = self.mid.cost(inner, itemsize)
        b = self.last.cost(dict(inner, **{self.last.dst: self.out_shape(shapes)}), itemsize)
        mid_bytes = 2 * _numel(mid_shape) * itemsize   # written by the 3x3, read by the 1x1: not here
        return {"flops": a["flops"] + b["flops"],
                "act_bytes": a["act_bytes"] + b["act_bytes"] - mid_bytes,
                "weight_bytes": a["weight_bytes"] + b["weight_bytes"],
                # the 1x1 GEMM (M, N, K) and the on-chip 3x3 GEMM feeding it (N_mid, K_mid)
                "shape": {"M": b["shape"]["M"], "N": b["shape"]["N"], "K": b["shape"]["K"],
                          "N_mid": a["shape"]["N"], "K_mid": a["shape"]["K"]}}

    def run(self, backend, env: dict, out=None):
        return backend.conv_pair(self, env[self.mid.src],
                                 residual=env[self.last.residual] if self.last.residual else None,
                                 shortcut=env[self.last.shortcut.src] if self.last.shortcut else None,
                                 out=out)


@dataclass(eq=False)
class MaxPoolStep:
    """``dst = max_pool2d(src, 3, stride=2, padding=1)``."""
    name: str
    src: str
    dst: str
    packed: dict = field(default_factory=dict)

    reads = property(lambda self: [self.src])
    ops = property(lambda self: ["maxpool3x3/s2"])

    def pack_for_triton(self):
        return ()   # no weights

    def out_shape(self, shapes: dict) -> tuple:
        n, c, h, w = shapes[self.src]
        return (n, c, (h - 1) // 2 + 1, (w - 1) // 2 + 1)

    def cost(self, shapes: dict, itemsize: int) -> dict:
        n, c, oh, ow = shapes[self.dst]
        return {"flops": 9 * n * c * oh * ow,
                "act_bytes": (_numel(shapes[self.src]) + n * c * oh * ow) * itemsize,
                "weight_bytes": 0, "shape": {"M": n * oh * ow, "N": c, "K": 9}}

    def run(self, backend, env: dict, out=None):
        return backend.max_pool(self, env[self.src], out=out)


@dataclass(eq=False)
class HeadStep:
    """``dst = mean_hw(src) @ weight.T + bias``; a custom ``fc`` module runs after the pooling."""
    name: str
    src: str
    dst: str
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    module: Optional[nn.Module] = None
    packed: dict = field(default_factory=dict)

    reads = property(lambda self: [self.src])

    @property
    def ops(self) -> list[str]:
        return ["avgpool", "linear", "bias"] if self.module is None else ["avgpool", "custom fc"]

    def pack_for_triton(self):
        from .kernels.avgpool_linear import pack_linear_weight
        return pack_linear_weight(self.weight) if self.weight is not None else ()

    def out_shape(self, shapes: dict) -> tuple:
        return (shapes[self.src][0], self.weight.shape[0] if self.weight is not None else -1)

    def cost(self, shapes: dict, itemsize: int) -> dict:
        n, c, h, w = shapes[self.src]
        classes = self.weight.shape[0] if self.weight is not None else 0
        return {"flops": n * c * h * w + 2 * n * c * classes,
                "act_bytes": (n * c * h * w + n * classes) * itemsize,
                "weight_bytes": classes * c * itemsize + 4 * classes,
                "shape": {"M": n, "N": classes, "K": c}}

    def run(self, backend, env: dict, out=None):
        if self.module is not None:
            return self.module(backend.avgpool(env[self.src]))
        return backend.head(self, env[self.src], out=out)


def _numel(shape) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


# -- the plan ---------------------------------------------------------------------------------
@dataclass(eq=False)
class Plan:
    steps: list
    output: str
    dtype: torch.dtype
    device: torch.device
    num_classes: int
    in_channels: int = 3
    _release: list = field(default_factory=list, repr=False)

    def __post_init__(self):
        # drop each intermediate after its last reader so CPU memory stays at a few activations
        self._last_read: dict[str, int] = {}
        for i, step in enumerate(self.steps):
            for name in step.reads:
                self._last_read[name] = i
        self._release = [[n for n, i in self._last_read.items() if i == k and n != "input"]
                         for k in range(len(self.steps))]

    def run(self, x: torch.Tensor, backend=None, buffers: Optional[dict] = None) -> torch.Tensor:
        """Logits for an input batch ``x`` [N, C, H, W] (NCHW or channels_last memory).

        ``backend``: a name (default: chosen from ``x.device``) or a backend instance such as a
        per-bucket ``fastres.backend.OneDnnBackend``.
        ``buffers`` (from ``allocate``) makes every step write into a preallocated output, so a
        forward allocates nothing (what the engine captures in a CUDA graph).
        """
        impl = (backend if backend is not None and not isinstance(backend, str)
                else _backend.get_backend(backend or backend_for(x.device)))
        if x.shape[0] == 0:
            return torch.empty(0, self.num_classes, dtype=self.dtype, device=x.device)
        env = {"input": impl.plan_input(self, x)}
        for step, release in zip(self.steps, self._release):
            env[step.dst] = step.run(impl, env, out=buffers.get(step.dst) if buffers else None)
            if buffers is None:
                for name in release:
                    del env[name]
        return env[self.output]

    def prepare(self, backend: str) -> "Plan":
        """Pack every step's weights for ``backend`` now (otherwise on first use)."""
        impl = _backend.get_backend(backend)
        with torch.no_grad():
            for step in self.steps:
                impl.prepare(step)
        return self

    def value_shapes(self, input_shape: tuple) -> dict[str, tuple]:
        """Shape of every value a forward on ``input_shape`` produces, by name."""
        shapes = {"input": tuple(input_shape)}
        for step in self.steps:
            shapes[step.dst] = step.out_shape(shapes)
        return shapes

    def memory_layout(self, input_shape: tuple) -> tuple[dict, list]:
        """Assign every value a forward writes to a memory slot; values whose lifetimes (from the
        step that writes them to the last step that reads them) do not overlap share a slot.

        Returns ({value: (slot, shape)}, [slot numel]). A step's inputs are alive while it runs,
        so its output never shares memory with them (the kernels refuse aliasing); the output
        stays alive to the end.
        """
        shapes = self.value_shapes(input_shape)
        slot_sizes: list[int] = []
        slot_busy_until: list[int] = []
        layout = {}
        for i, step in enumerate(self.steps):
            shape = shapes[step.dst]
            if -1 in shape:      # a custom fc module allocates its own output
                continue
            numel = _numel(shape)
            free = [s for s in range(len(slot_sizes)) if slot_busy_until[s] < i]
            fitting = [s for s in free if slot_sizes[s] >= numel]
            if fitting:
                slot = min(fitting, key=lambda s: slot_sizes[s])
            elif free:
                slot = max(free, key=lambda s: slot_sizes[s])
                slot_sizes[slot] = numel
            else:
                slot = len(slot_sizes)
                slot_sizes.append(numel)
                slot_busy_until.append(0)
            slot_busy_until[slot] = self._last_read.get(step.dst, len(self.steps))
            layout[step.dst] = (slot, shape)
        return layout, slot_sizes

    def allocate(self, input_shape: tuple, *, share_memory: bool = True) -> dict[str, torch.Tensor]:
        """Preallocated outputs for ``run``: channels_last activations, contiguous logits.

        ``share_memory`` lays values out by ``memory_layout`` (a few activations' worth, what the
        engine keeps per batch bucket); without it every value keeps its own buffer, so all
        intermediates can be inspected after the forward.
        """
        if share_memory:
            layout, slot_sizes = self.memory_layout(input_shape)
        else:
            shapes = self.value_shapes(input_shape)
            named = [(s.dst, shapes[s.dst]) for s in self.steps if -1 not in shapes[s.dst]]
            layout = {name: (i, shape) for i, (name, shape) in enumerate(named)}
            slot_sizes = [_numel(shape) for _, shape in named]
        slots = [torch.empty(n, dtype=self.dtype, device=self.device) for n in slot_sizes]
        buffers = {}
        for name, (slot, shape) in layout.items():
            flat = slots[slot][:_numel(shape)]
            if len(shape) == 4:
                n, c, h, w = shape
                buffers[name] = flat.view(n, h, w, c).permute(0, 3, 1, 2)   # channels_last
            else:
                buffers[name] = flat.view(shape)
        return buffers

    def __len__(self) -> int:
        return len(self.steps)


# -- building ---------------------------------------------------------------------------------
def _conv_step(model, name: str, norm: str, src: str, dst: str, dtype, relu: bool, **extra) -> ConvStep:
    conv = model.get_submodule(name)
    weight, bias = fold_conv_bn(conv, model.get_submodule(norm))
    _check_conv(conv, name)
    return ConvStep(name=name, src=src, dst=dst, weight=_compute_weight(weight, dtype, name),
                    bias=bias, stride=conv.stride[0], padding=conv.padding[0],
                    dilation=conv.dilation[0], groups=conv.groups, relu=relu, **extra)


def _check_conv(conv: nn.Module, name: str) -> None:
    if type(conv) is not nn.Conv2d:
        raise NotFoldableError(f"{name} is a {type(conv).__name__}, not an nn.Conv2d")
    if (len(set(conv.stride)) != 1 or len(set(conv.dilation)) != 1 or isinstance(conv.padding, str)
            or len(set(conv.padding)) != 1 or conv.padding_mode != "zeros"):
        raise NotFoldableError(f"{name} has a non-square stride/padding/dilation or padding_mode")


def _compute_weight(weight: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    if dtype == torch.float16 and weight.device.type != "meta":
        peak = weight.abs().max().item()
        if not peak <= _FP16_MAX:   # also catches NaN
            raise ValueError(
                f"folded weight of {name} reaches {peak:.4g}, beyond float16's range ({_FP16_MAX:.0f}): "
                "a BatchNorm running_var near zero? run this model in float32 or bfloat16")
    return weight.to(dtype).contiguous(memory_format=torch.channels_last)


def _check_structure(model) -> None:
    from torchvision.models import resnet as tv
    if not isinstance(model.relu, nn.ReLU):
        raise NotFoldableError(f"model.relu is {type(model.relu).__name__}, not nn.ReLU")
    pool = model.maxpool
    if not (isinstance(pool, nn.MaxPool2d) and pool.kernel_size in (3, (3, 3))
            and pool.stride in (2, (2, 2)) and pool.padding in (1, (1, 1))
            and pool.dilation in (1, (1, 1)) and not pool.ceil_mode):
        raise NotFoldableError("model.maxpool is not MaxPool2d(3, stride=2, padding=1)")
    if not (isinstance(model.avgpool, nn.AdaptiveAvgPool2d)
            and model.avgpool.output_size in (1, (1, 1))):
        raise NotFoldableError("model.avgpool is not AdaptiveAvgPool2d((1, 1))")
    for li in range(1, 5):
        for block in getattr(model, f"layer{li}"):
            if not isinstance(block, (tv.BasicBlock, tv.Bottleneck)):
                raise NotFoldableError(f"layer{li} holds a {type(block).__name__} block")
            if type(block).forward not in (tv.BasicBlock.forward, tv.Bottleneck.forward):
                raise NotFoldableError(f"{type(block).__name__} overrides forward")


def build_plan(model) -> Plan:
    """Fold and lay out a torchvision-structured ResNet as a plan in its parameters' dtype."""
    _check_structure(model)
    dtype, device = model.conv1.weight.dtype, model.conv1.weight.device
    steps: list = [
        _conv_step(model, "conv1", "bn1", "input", "conv1", dtype, relu=True),
        MaxPoolStep("maxpool", "conv1", "maxpool"),
    ]
    current = "maxpool"
    for li in range(1, 5):
        for bi, block in enumerate(getattr(model, f"layer{li}")):
            prefix = f"layer{li}.{bi}"
            n_convs = 3 if hasattr(block, "conv3") else 2
            src = current
            for k in range(1, n_convs):
                name = f"{prefix}.conv{k}"
                steps.append(_conv_step(model, name, f"{prefix}.bn{k}", src, name, dtype, relu=True))
                src = name
            last = f"{prefix}.conv{n_convs}"
            step = _conv_step(model, last, f"{prefix}.bn{n_convs}", src, prefix, dtype, relu=True)
            if block.downsample is None:
                step.residual = current
            else:
                down = block.downsample
                if not (isinstance(down, nn.Sequential) and len(down) == 2):
                    raise NotFoldableError(f"{prefix}.downsample is not Sequential(conv1x1, norm)")
                proj = _conv_step(model, f"{prefix}.downsample.0", f"{prefix}.downsample.1",
                                  current, "", dtype, relu=False)
                if proj.weight.shape[2:] != (1, 1) or proj.padding or proj.groups != 1:
                    raise NotFoldableError(f"{prefix}.downsample.0 is not a 1x1 projection")
                step.bias = step.bias + proj.bias
                step.shortcut = Shortcut(src=current, weight=proj.weight, stride=proj.stride)
            if n_convs == 3 and fuses_conv3x3_conv1x1(
                    c_mid=steps[-1].weight.shape[0], c_in_mid=steps[-1].weight.shape[1] * steps[-1].groups,
                    c_out=step.weight.shape[0], groups=steps[-1].groups, dtype=dtype):
                step = ConvPairStep(name=f"{prefix}.conv2+conv3", mid=steps.pop(), last=step)
            steps.append(step)
            current = prefix
    fc = model.fc
    if isinstance(fc, nn.Linear):
        head = HeadStep("fc", current, "fc", weight=fc.weight.detach().to(dtype).contiguous(),
                        bias=(fc.bias.detach().float() if fc.bias is not None
                              else torch.zeros(fc.out_features, device=device)))
        num_classes = fc.out_features
    else:
        head = HeadStep("fc", current, "fc", weight=None, bias=None, module=fc)
        num_classes = getattr(model, "config", {}).get("num_classes") or 0
    steps.append(head)
    return Plan(steps=steps, output="fc", dtype=dtype, device=device, num_classes=num_classes,
                in_channels=model.conv1.in_channels)


# -- cache and guard --------------------------------------------------------------------------
class ParameterGuard:
    """Snapshot of every parameter's and buffer's identity and version counter.

    In-place updates bump ``_version`` (optimizer steps, ``load_state_dict``, ``copy_`` under
    no_grad); ``.to()``, ``.half()`` and assignment replace the tensor (weak reference goes stale).
    Writes through ``.data`` bypass version counters — call ``model.plan_cache_clear()`` after them.
    """

    def __init__(self, model: nn.Module):
        self._entries = [(weakref.ref(t), t._version) for t in _tensors(model)]
        self._eps = _norm_eps(model)

    def matches(self, model: nn.Module) -> bool:
        tensors = _tensors(model)
        if len(tensors) != len(self._entries):
            return False
        for t, (ref, version) in zip(tensors, self._entries):
            if ref() is not t or t._version != version:
                return False
        return _norm_eps(model) == self._eps


def _tensors(model: nn.Module) -> list:
    return [*model.parameters(), *model.buffers()]


def _norm_eps(model: nn.Module) -> tuple:
    return tuple(m.eps for m in model.modules() if hasattr(m, "running_var") and hasattr(m, "eps"))


class PlanCache:
    """One cached plan per model, rebuilt when its ``ParameterGuard`` no longer matches."""

    def __init__(self):
        self._lock = threading.Lock()
        self._plan: Optional[Plan] = None
        self._guard: Optional[ParameterGuard] = None
        self.builds = 0   # how many plans were built (tests read it)

    def get(self, model: nn.Module) -> Plan:
        with self._lock:
            if self._plan is None or not self._guard.matches(model):
                with torch.no_grad():
                    plan = build_plan(model)
                self._plan, self._guard = plan, ParameterGuard(model)
                self.builds += 1
            return self._plan

    def clear(self) -> None:
        with self._lock:
            self._plan = self._guard = None


# -- input checks -----------------------------------------------------------------------------
def check_input(x, model) -> None:
    """Clear errors for inputs the network cannot take (instead of a failure deep in a kernel)."""
    if not torch.is_tensor(x):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"expected a 4-D input [N, C, H, W], got shape {tuple(x.shape)}")
    weight = model.conv1.weight
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"expected {weight.shape[1]} input channels, got {x.shape[1]} "
                         f"(input shape {tuple(x.shape)}; images go in as [N, C, H, W])")
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"input of spatial size {x.shape[2]}x{x.shape[3]} is too small: "
                         "the network needs at least 1x1 pixels")
    if x.dtype != weight.dtype:
        raise TypeError(f"input dtype {x.dtype} does not match the model's {weight.dtype}: "
                        f"cast the input (x.to({weight.dtype})) or the model")
    if x.device != weight.device:
        raise ValueError(f"input is on {x.device} but the model is on {weight.device}")
