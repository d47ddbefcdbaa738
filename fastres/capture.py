"""Capture: a module's eval forward, traced, matched into fused steps, guarded, or not used at all.

    trace      torch.fx traces the module's forward (torch.nn layers, torchvision's
               FrozenBatchNorm2d and timm's BatchNormAct2d stay leaves); the plan is built from
               what the forward really does, not from a walk of torchvision's structure
    match      conv -> [BN] -> [ReLU]                          -> a ``conv`` step (BN folded in fp32)
               conv -> [BN] -> + (value | 1x1 conv [-> BN]) -> [ReLU]
                                                            -> a ``conv`` step with a residual, or a
                                                               projection shortcut as concatenated K
               ... + F.pad(x[:, :, ::s, ::s], (0,0,0,0,p,q))  -> the residual read at stride s into
                                                               channels [p, p + C) (CIFAR option A)
               ... -> BN [-> ReLU] beside other readers       -> a second output of that conv step:
                                                               relu?(y * scale + shift) (pre-activation)
               ... -> global average pool (mean over H, W)    -> a second output of that conv step:
                                                               its per-channel mean (the SE squeeze)
               x * sigmoid(gate) [+ r] [-> ReLU]              -> ``se_scale`` (squeeze-and-excitation)
               timm's BatchNormAct2d                          -> folded as a BN (with its ReLU); another
                                                               act runs as a PyTorch step after the conv
               3x3 conv step -> 1x1 conv step (bottleneck)   -> a ``conv_pair`` step (on chip)
               MaxPool2d(3, 2, 1)                             -> ``max_pool``
               global average pool -> flatten -> Linear       -> ``head`` (also .view(N, -1),
                                                               F.avg_pool2d(x, x.size(3)), and
                                                               pool -> 1x1 conv -> flatten)
               nn.Identity / Dropout (eval)                   -> nothing (the value passes through)
               anything else                                  -> a ``torch`` step: the same PyTorch
                                                                 call, so the plan always computes
                                                                 what the module computes
    guard      the plan is valid while nothing that changes its answer changed (``Guard``)
    fallback   where fastres cannot compute exactly what PyTorch would (hooks, parametrizations,
               autograd, autocast, a dtype the kernels lack, a forward fx cannot trace), the
               module's own forward runs, with a one-time warning that says why (``FastPath``)

A submodule left in training mode is never fused (a BatchNorm in train mode is not folded, a
Dropout in train mode is not skipped): it runs as a PyTorch step, as PyTorch would run it.
"""
from __future__ import annotations

import operator
import sys
import threading
import warnings
from collections import defaultdict
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from .backend import backend_for, get_backend
from .fold import NotFoldableError, _norm_tensors, fold_conv_bn
from .guard import Guard
from .ir import Plan, Ref, Step, bind_refs
from .kernels.conv2d_nhwc import pads_stem_input
from .kernels.conv3x3_conv1x1_nhwc import fuses_conv3x3_conv1x1

__all__ = ["capture", "feature_extractor", "Unsupported", "FastPath", "FallbackWarning", "SUPPORTED_DTYPES",
           "fallback_reason", "is_graph_capture"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FP16_MAX = torch.finfo(torch.float16).max


class Unsupported(NotFoldableError):
    """fastres cannot reproduce this module's forward exactly; the message says why."""


class FallbackWarning(UserWarning):
    """A forward ran the module's own PyTorch code instead of the fused plan (said once per reason)."""


def is_graph_capture() -> bool:
    """True while torch.jit.trace, torch.fx (fastres's own capture too) or dynamo (torch.compile,
    torch.export) records the forward: they get the module's PyTorch forward, whose graph follows
    later weight edits as the plain module does."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return True
    if not fx._symbolic_trace.is_fx_symbolic_tracing():
        return False
    # fx's flag is process-wide: while fastres traces in another thread, this one is not recorded
    return not _tracing_threads or threading.get_ident() in _tracing_threads


_tracing_threads: dict = {}     # thread id -> fastres fx traces it is running


class _OwnThreadTracer:
    """A tracer mixin: fx patches ``torch.nn.Module.__call__`` and ``__getattr__`` for the whole
    process while it traces, so module calls and parameter reads from other threads (a server
    running the model while a weight edit rebuilds its plan) would be recorded into this trace and
    break it; they run as usual instead."""

    def trace(self, root, *args, **kwargs):
        self._thread = me = threading.get_ident()
        _tracing_threads[me] = _tracing_threads.get(me, 0) + 1
        try:
            return super().trace(root, *args, **kwargs)
        finally:
            _tracing_threads[me] -= 1
            if not _tracing_threads[me]:
                del _tracing_threads[me]

    def call_module(self, m, forward, args, kwargs):
        if threading.get_ident() != self._thread:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if threading.get_ident() != self._thread:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)


# -- static reasons not to capture -------------------------------------------------------------
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _global_hook_dicts() -> list:
    m = torch.nn.modules.module
    names = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
             "_global_backward_pre_hooks", "_global_forward_hooks_always_called")
    return [getattr(m, n) for n in names if hasattr(m, n)]


def fallback_reason(module: nn.Module) -> Optional[str]:
    """Why ``module``'s eval forward cannot be captured at all, or None."""
    if any(len(d) for d in _global_hook_dicts()):
        return "global module hooks are registered (torch.nn.modules.module.register_module_*_hook)"
    from torch.nn.utils import parametrize
    for name, m in module.named_modules():
        label = name or type(module).__name__
        for attr in _HOOK_DICTS:
            if len(getattr(m, attr, ())):
                kind = attr.strip("_").replace("_", " ").removesuffix("s")
                return f"'{label}' has a {kind} (weight_norm, spectral_norm and pruning are hooks too)"
        if parametrize.is_parametrized(m):
            return f"'{label}' has a parametrization ({', '.join(m.parametrizations)})"
    dtype = compute_dtype(module)
    if dtype not in SUPPORTED_DTYPES:
        return f"the kernels do not run {dtype}"
    devices = {t.device for t in (*module.parameters(), *module.buffers())}
    if len(devices) > 1:
        return f"its parameters are on several devices ({', '.join(sorted(map(str, devices)))})"
    return None


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype the plan computes in: its first convolution's weight's (biases may stay fp32, as
    ``fastres.fold_bn`` keeps them), else its first floating parameter's, else float32."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            return m.weight.dtype
    for t in (*module.parameters(), *module.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


# -- tracing ----------------------------------------------------------------------------------
def _batchnorm_act_class():
    """timm's BatchNormAct2d (BN -> drop -> act in one module) when timm has loaded it, else None
    (a model holding one has; fastres never imports timm)."""
    return getattr(sys.modules.get("timm.layers.norm_act"), "BatchNormAct2d", None)


def _leaf_norm_types() -> list:
    from torchvision.ops.misc import FrozenBatchNorm2d
    return [t for t in (FrozenBatchNorm2d, _batchnorm_act_class()) if t is not None]


class _Tracer(_OwnThreadTracer, fx.Tracer):
    """torch.nn layers are leaves (fx's default), and so are torchvision's FrozenBatchNorm2d and
    timm's BatchNormAct2d, so the matcher sees a norm layer as one node it can fold (one that does
    not fold runs as one PyTorch step, its own forward)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        from torchvision.ops.misc import FrozenBatchNorm2d
        return (isinstance(m, FrozenBatchNorm2d) or type(m) is _batchnorm_act_class()
                or super().is_leaf_module(m, qualname))


def _trace(module: nn.Module, return_nodes=None) -> fx.Graph:
    try:
        if return_nodes is None:
            return _Tracer().trace(module)
        return _feature_graph(module, return_nodes).graph
    except ReturnNodeError:
        raise
    except Exception as err:  # noqa: BLE001 - any tracing failure means: run the module itself
        raise Unsupported(f"torch.fx cannot trace its forward ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''})") from err


class ReturnNodeError(ValueError):
    """A ``return_nodes`` query that names no node of the traced forward."""


def normalize_return_nodes(return_nodes) -> Optional[dict]:
    """torchvision's ``create_feature_extractor`` convention: a list of node names, or a dict
    {node name: output key}; None stays None."""
    if return_nodes is None:
        return None
    if isinstance(return_nodes, (list, tuple)):
        return {str(n): str(n) for n in return_nodes}
    if isinstance(return_nodes, dict):
        return {str(k): str(v) for k, v in return_nodes.items()}
    raise TypeError(f"return_nodes must be a list of node names or a dict {{node: key}}, "
                    f"got {type(return_nodes).__name__}")


def _feature_graph(module: nn.Module, return_nodes: dict) -> fx.GraphModule:
    """The forward traced and cut at ``return_nodes`` (a dict {node: key}), as torchvision's
    ``create_feature_extractor`` cuts it: a query names the last node whose module path starts
    with it (``"layer2"``: layer2's output), or a node itself (``"layer1.0.relu_1"``); the graph
    returns {key: value} in the order given, and what no output needs is dropped."""
    import re

    from torchvision.models.feature_extraction import NodePathTracer
    from torchvision.ops.misc import FrozenBatchNorm2d

    node_path_tracer = type("_NodePathTracer", (_OwnThreadTracer, NodePathTracer), {})
    tracer = node_path_tracer(leaf_modules=_leaf_norm_types())
    graph = tracer.trace(module)
    names = list(tracer.node_to_qualname.values())
    for query in return_nodes:
        if not any(re.match(rf"^{re.escape(query)}(\.|$)", n) for n in names):
            raise ReturnNodeError(f"return_nodes: no node {query!r} in the traced forward; available: "
                             f"{', '.join(names[:40])}{' ...' if len(names) > 40 else ''} "
                             "(torchvision.models.feature_extraction.get_graph_node_names lists them)")
    for n in [n for n in graph.nodes if n.op == "output"]:
        graph.erase_node(n)
    nodes = list(graph.nodes)
    pending, found = dict(return_nodes), {}
    for n in reversed(nodes):
        qualname = tracer.node_to_qualname.get(n)
        if qualname is None:
            continue
        for query in list(pending):
            if ".".join(qualname.split(".")[: query.count(".") + 1]) == query:
                found[pending.pop(query)] = n
                break
    with graph.inserting_after(nodes[-1]):
        graph.output({key: found[key] for key in return_nodes.values()})
    gm = fx.GraphModule(tracer.root, graph, type(module).__name__)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def feature_extractor(module: nn.Module, return_nodes) -> nn.Module:
    """``module``'s own PyTorch forward cut at ``return_nodes`` (sharing its submodules): what a
    plan with several outputs computes, and what runs when that plan cannot."""
    return _feature_graph(module, normalize_return_nodes(return_nodes))


# -- node predicates ----------------------------------------------------------------------------
def _is_module(node, modules, *types, exact=True) -> bool:
    if node.op != "call_module":
        return False
    m = modules[node.target]
    return type(m) in types if exact else isinstance(m, types)


def _foldable_conv(node, modules) -> bool:
    if not _is_module(node, modules, nn.Conv2d) or node.kwargs or len(node.args) != 1:
        return False
    conv = modules[node.target]
    return conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


def _foldable_norm(node, modules) -> bool:
    from torchvision.ops.misc import FrozenBatchNorm2d
    if node.op != "call_module" or node.kwargs or len(node.args) != 1:
        return False
    m = modules[node.target]
    if isinstance(m, FrozenBatchNorm2d):
        return True
    norm_act = type(m) is _batchnorm_act_class() and _norm_act(m) is not None
    return ((type(m) in (nn.BatchNorm2d, nn.SyncBatchNorm) or norm_act) and not m.training
            and m.running_mean is not None and m.running_var is not None)


def _norm_act(m):
    """What follows the BN in timm's BatchNormAct2d, whose eval forward is act(drop(F.batch_norm(
    x, running stats, weight, bias, False, momentum, eps))), when drop is a pass-through
    (nn.Identity, or a Dropout in eval): "relu" (nn.ReLU), "none" (nn.Identity: apply_act=False) or
    the act module (SiLU, LeakyReLU, ...: it runs as a PyTorch step after the folded BN); None for
    another drop layer (the whole module runs as its own PyTorch step)."""
    drop, act = getattr(m, "drop", None), getattr(m, "act", None)
    if not (type(drop) is nn.Identity or (type(drop) in (nn.Dropout, nn.Dropout2d) and not drop.training)):
        return None
    if not isinstance(act, nn.Module):
        return None
    return "relu" if type(act) is nn.ReLU else "none" if type(act) is nn.Identity else act


def _norm_then(node, modules):
    """What a foldable norm node applies after the BN: "none" (a BatchNorm), "relu", or an act
    module (timm's BatchNormAct2d, ``_norm_act``)."""
    m = modules[node.target]
    return _norm_act(m) if type(m) is _batchnorm_act_class() else "none"


def _is_relu(node, modules) -> bool:
    if node.op == "call_module":
        return type(modules[node.target]) is nn.ReLU
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu, torch.relu_, F.relu_) and len(node.args) == 1
    return node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1


def _is_add(node) -> bool:
    if node.kwargs or len(node.args) != 2:
        return False
    if node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add):
        return all(isinstance(a, fx.Node) for a in node.args)
    return (node.op == "call_method" and node.target in ("add", "add_")
            and all(isinstance(a, fx.Node) for a in node.args))


def _slice_step(sl) -> Optional[int]:
    """s of ``::s`` (``slice(None|0, None, s)``), or None for any other slice."""
    if not isinstance(sl, slice) or sl.start not in (None, 0) or sl.stop is not None:
        return None
    step = 1 if sl.step is None else sl.step
    return step if isinstance(step, int) and not isinstance(step, bool) and step >= 1 else None


def _subsample(node):
    """(source, s) when ``node`` is ``source[:, :, ::s, ::s]`` (or ``[..., ::s, ::s]``), else None."""
    if not (node.op == "call_function" and node.target is operator.getitem and len(node.args) == 2
            and isinstance(node.args[0], fx.Node) and isinstance(node.args[1], tuple)):
        return None
    index = node.args[1]
    if len(index) == 4 and all(_slice_step(i) == 1 for i in index[:2]):
        hw = index[2:]
    elif len(index) == 3 and index[0] is Ellipsis:
        hw = index[1:]
    else:
        return None
    steps = {_slice_step(i) for i in hw}
    return (node.args[0], steps.pop()) if len(steps) == 1 and None not in steps else None


def _channel_pad(node):
    """(source, front, back) when ``node`` is ``F.pad(source, (0, 0, 0, 0, front, back))`` with
    zeros (the CIFAR option-A shortcut's new channels), else None."""
    if node.op != "call_function" or node.target not in (F.pad, torch._C._nn.pad) or not node.args:
        return None
    args = list(node.args) + [None] * (4 - len(node.args))
    src, pad, mode, value = args[:4]
    mode = node.kwargs.get("mode", mode or "constant")
    value = node.kwargs.get("value", value or 0)
    if (set(node.kwargs) - {"mode", "value"} or not isinstance(src, fx.Node) or mode != "constant"
            or value != 0 or not isinstance(pad, (tuple, list)) or len(pad) != 6
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in pad)
            or tuple(pad[:4]) != (0, 0, 0, 0) or min(pad[4:]) < 0):
        return None
    return src, pad[4], pad[5]


def _is_sigmoid(node, modules) -> bool:
    if node.op == "call_module":
        return type(modules[node.target]) is nn.Sigmoid
    if node.op == "call_function":
        return node.target in (torch.sigmoid, F.sigmoid) and len(node.args) == 1 and not node.kwargs
    return node.op == "call_method" and node.target == "sigmoid" and len(node.args) == 1


def _is_mul(node) -> bool:
    if node.kwargs or len(node.args) != 2 or not all(isinstance(a, fx.Node) for a in node.args):
        return False
    if node.op == "call_function":
        return node.target in (operator.mul, operator.imul, torch.mul)
    return node.op == "call_method" and node.target in ("mul", "mul_")


def _is_passthrough(node, modules) -> bool:
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
        return False
    m = modules[node.target]
    return type(m) is nn.Identity or (type(m) in (nn.Dropout, nn.Dropout2d) and not m.training)


def _is_stem_pool(node, modules) -> bool:
    if not _is_module(node, modules, nn.MaxPool2d) or len(node.args) != 1:
        return False
    p = modules[node.target]
    pairs = {k: (v, v) if isinstance(v, int) else tuple(v) for k, v in
             (("k", p.kernel_size), ("s", p.stride), ("p", p.padding), ("d", p.dilation))}
    return (pairs == {"k": (3, 3), "s": (2, 2), "p": (1, 1), "d": (1, 1)}
            and not p.ceil_mode and not p.return_indices)


def _is_global_pool(node, modules) -> bool:
    if node.op == "call_module" and len(node.args) == 1:
        m = modules[node.target]
        return type(m) is nn.AdaptiveAvgPool2d and m.output_size in (1, (1, 1))
    return (node.op == "call_function" and node.target is F.adaptive_avg_pool2d
            and len(node.args) == 2 and node.args[1] in (1, (1, 1)))


def _squeeze_mean(node, modules):
    """True (keepdim) or "flat" when ``node`` averages its input over H and W into one value per
    (image, channel): ``AdaptiveAvgPool2d(1)``, ``F.adaptive_avg_pool2d(x, 1)``,
    ``x.mean((2, 3)[, keepdim=True])`` / ``torch.mean``; else None."""
    if _is_global_pool(node, modules):
        return True
    if not ((node.op == "call_method" and node.target == "mean")
            or (node.op == "call_function" and node.target is torch.mean)):
        return None
    args, kwargs = list(node.args), dict(node.kwargs)
    if "dim" in kwargs:
        args.insert(1, kwargs.pop("dim"))
    if len(args) == 3:
        kwargs["keepdim"] = args.pop()
    if len(args) != 2 or set(kwargs) - {"keepdim"} or not isinstance(args[1], (tuple, list)):
        return None
    keepdim = kwargs.get("keepdim", False)
    if sorted(d % 4 if isinstance(d, int) else d for d in args[1]) != [2, 3] or not isinstance(keepdim, bool):
        return None
    return True if keepdim else "flat"


def _is_flatten(node, modules) -> bool:
    if node.op == "call_function" and node.target is torch.flatten:
        return node.args[1:] == (1,) and not node.kwargs
    if node.op == "call_method" and node.target == "flatten":
        return node.args[1:] == (1,) and not node.kwargs
    if node.op == "call_module" and type(modules[node.target]) is nn.Flatten:
        m = modules[node.target]
        return m.start_dim == 1 and m.end_dim == -1
    return False


def _size_of(node, dim: int):
    """The tensor whose ``size(dim)`` (``x.size(dim)``, ``x.size()[dim]``, ``x.shape[dim]``) ``node`` is."""
    if node.op == "call_method" and node.target == "size" and node.args[1:] == (dim,) and not node.kwargs:
        return node.args[0]
    if (node.op == "call_function" and node.target is operator.getitem and node.args[1:] == (dim,)
            and isinstance(node.args[0], fx.Node)):
        inner = node.args[0]
        if inner.op == "call_method" and inner.target == "size" and len(inner.args) == 1:
            return inner.args[0]
        if inner.op == "call_function" and inner.target is getattr and inner.args[1:] == ("shape",):
            return inner.args[0]
    return None


def _avg_pool_over_width(node, resolve):
    """The nodes computing the window when ``node`` is ``F.avg_pool2d(x, x.size(3))`` (every
    other argument default), else None."""
    if not (node.op == "call_function" and node.target is F.avg_pool2d and len(node.args) == 2
            and not node.kwargs and isinstance(node.args[1], fx.Node)):
        return None
    window = node.args[1]
    src = _size_of(window, 3)
    if src is None or resolve(src) is not resolve(node.args[0]) or list(window.users) != [node]:
        return None
    if window.op == "call_function":
        if list(window.args[0].users) != [window]:
            return None
        return [window.args[0], window]
    return [window]


def _is_view_flatten(flat, pool, sizes, features: int, users) -> bool:
    """``pool.view(pool.size(0), -1)`` / ``.view(-1, features)`` (or ``reshape``), where the
    size node is read by this view only."""
    if flat.op != "call_method" or flat.target not in ("view", "reshape") or flat.kwargs:
        return False
    if len(flat.args) == 2 and isinstance(flat.args[1], (tuple, list)):
        dims = tuple(flat.args[1])
    else:
        dims = tuple(flat.args[1:])
    if len(dims) != 2:
        return False
    if dims == (-1, features):
        return not sizes
    return (len(sizes) == 1 and dims == (sizes[0], -1) and list(users[sizes[0]]) == [flat])


# -- matching -----------------------------------------------------------------------------------
class _Matcher:
    def __init__(self, root: nn.Module, graph: fx.Graph, dtype: torch.dtype):
        self.root, self.graph, self.dtype = root, graph, dtype
        self.modules = dict(root.named_modules())
        self.nodes = list(graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.alias: dict = {}
        for n in self.nodes:
            if _is_passthrough(n, self.modules):
                self.alias[n] = n.args[0]
        self.users = defaultdict(list)
        for n in self.nodes:
            if n in self.alias:
                continue
            for a in n.all_input_nodes:
                self.users[self.resolve(a)].append(n)
        self.claimed: set = set()
        self.steps: list = []           # (position, Step)
        self.notes: list = []
        self.strided_residuals: dict = {}   # add node -> (source, stride, front, back)
        self.heads: dict = {}               # pool node -> (head step, its last node)
        self.channel_scales: dict = {}      # mul node -> (se_scale step, its last node)

    def resolve(self, n):
        while n in self.alias:
            n = self.alias[n]
        return n

    def value(self, n) -> str:
        return self.resolve(n).name

    def single_user(self, n):
        users = self.users[self.resolve(n)]
        return users[0] if len(users) == 1 else None

    # conv -> [norm]
    def conv_unit(self, conv):
        user = self.single_user(conv)
        if user is not None and _foldable_norm(user, self.modules) and self.resolve(user.args[0]) is conv:
            return conv, user
        return conv, None

    def unit_end(self, unit):
        return unit[1] if unit[1] is not None else unit[0]

    def unit_at(self, node):
        """The conv unit whose last node is ``node`` (a conv or the norm after one), or None."""
        node = self.resolve(node)
        if _foldable_conv(node, self.modules):
            unit = self.conv_unit(node)
            return unit if unit[1] is None else None
        if _foldable_norm(node, self.modules) and _norm_then(node, self.modules) == "none":
            src = self.resolve(node.args[0])       # (act(bn(conv)) takes no residual before its act)
            if _foldable_conv(src, self.modules):
                unit = self.conv_unit(src)
                return unit if unit[1] is node else None
        return None

    def is_projection(self, unit) -> bool:
        conv = self.modules[unit[0].target]
        return (conv.kernel_size == (1, 1) and conv.padding == (0, 0) and conv.groups == 1
                and conv.dilation == (1, 1) and conv.stride[0] == conv.stride[1])

    def add_operands(self, add):
        """(main unit, shortcut unit or None, residual node or None) of an add fed by a conv unit."""
        p, q = (self.resolve(a) for a in add.args)
        if p is q:
            return None
        units = []
        for node in (p, q):
            unit = self.unit_at(node)
            ok = unit is not None and self.single_user(self.unit_end(unit)) is add
            units.append(unit if ok else None)
        up, uq = units
        if add.target in (operator.iadd, "add_"):
            # ``a += b`` writes into ``a``: fused, nothing is written, so ``a`` must be the conv
            # output the step replaces (a later reader of ``b`` must not see the sum either way)
            uq = None
            if up is None:
                return None
        if up and uq:
            if self.is_projection(uq):
                return up, uq, None
            if self.is_projection(up):
                return uq, up, None
            return up, None, q
        if up:
            return up, None, q
        if uq:
            return uq, None, p
        return None

    def strided_residual(self, node):
        """(source, stride, channel front pad, back pad, nodes) when ``node`` is the CIFAR
        option-A shortcut ``F.pad(x[:, :, ::s, ::s], (0, 0, 0, 0, front, back))`` (either part may
        be missing; the subsample only when the pad is its one reader), else None."""
        node = self.resolve(node)
        nodes, front, back, stride = [], 0, 0, 1
        pad = _channel_pad(node)
        if pad is not None:
            nodes.append(node)
            node, front, back = self.resolve(pad[0]), pad[1], pad[2]
        sub = _subsample(node)
        if sub is not None and (not nodes or self.single_user(node) is nodes[-1]):
            nodes.append(node)
            node, stride = self.resolve(sub[0]), sub[1]
        if not nodes:
            return None
        return node, stride, front, back, nodes

    def find_strided_residuals(self):
        """Claim the option-A shortcuts a conv epilogue will read (before the loop meets them:
        a forward may compute its shortcut first)."""
        for n in self.nodes:
            if not _is_add(n) or n in self.alias:
                continue
            operands = self.add_operands(n)
            if operands is None or operands[2] is None:
                continue
            found = self.strided_residual(operands[2])
            if found is not None and self.single_user(found[4][0]) is n:
                self.strided_residuals[n] = found
                self.claim(found[4])

    def affine_output(self, end):
        """(norm node, relu node or None, whether a ReLU applies) of an eval BatchNorm (-> ReLU)
        reading ``end`` among other readers: a pre-activation block's BN -> ReLU after the add (or
        timm's BatchNormAct2d there), or None."""
        users = self.users[self.resolve(end)]
        for user in users:
            if (_foldable_norm(user, self.modules) and self.resolve(user.args[0]) is self.resolve(end)
                    and user not in self.claimed):
                then = _norm_then(user, self.modules)
                if then != "none":
                    return (user, None, True) if then == "relu" else None
                relu = self.single_user(user)
                relu = relu if relu is not None and _is_relu(relu, self.modules) else None
                return user, relu, relu is not None
        return None

    def squeeze_of(self, end):
        """(pool node, keepdim or "flat") of an unclaimed global average pool reading ``end``
        (``_squeeze_mean``), or None."""
        for user in self.users[self.resolve(end)]:
            if user in self.claimed or not user.args or self.resolve(user.args[0]) is not self.resolve(end):
                continue
            keepdim = _squeeze_mean(user, self.modules)
            if keepdim is not None:
                return user, keepdim
        return None

    def norm_affine(self, node):
        """(scale, shift) in fp32 of an eval BatchNorm node: y = x * scale + shift."""
        norm = self.modules[node.target]
        c = norm.num_features if hasattr(norm, "num_features") else norm.weight.shape[0]
        device = next(iter((*norm.parameters(), *norm.buffers()))).device
        mean, var, gamma, beta, eps = (t.detach().float() if torch.is_tensor(t) else t
                                       for t in _norm_tensors(norm, c, device))
        scale = gamma * torch.rsqrt(var + eps)
        return scale.contiguous(), (beta - mean * scale).contiguous()

    def fold(self, unit, what: str):
        conv = self.modules[unit[0].target]
        norm = self.modules[unit[1].target] if unit[1] is not None else nn.Identity()
        weight, bias = fold_conv_bn(conv, norm)
        return _compute_weight(weight, self.dtype, what), bias

    def conv_step(self, unit):
        conv_node = unit[0]
        conv = self.modules[conv_node.target]
        fused = [n for n in unit if n is not None]
        weight, bias = self.fold(unit, conv_node.target)
        attrs = dict(stride=tuple(conv.stride), padding=tuple(conv.padding),
                     dilation=tuple(conv.dilation), groups=conv.groups, relu=False)
        tensors = {"weight": weight, "bias": bias}
        inputs = {"x": self.value(conv_node.args[0])}
        end = self.unit_end(unit)
        user = self.single_user(end)
        then = _norm_then(unit[1], self.modules) if unit[1] is not None else "none"
        if then != "none":
            # timm's BatchNormAct2d: act(bn(conv)), nothing more fuses; an act other than ReLU runs
            # as a PyTorch step on the conv step's output
            attrs["relu"], user = then == "relu", None
            if then != "relu":
                return self.conv_then_act(conv_node, unit[1], then, inputs, attrs, tensors, fused)
        if user is not None and _is_add(user):
            operands = self.add_operands(user)
            if operands is not None and operands[0] == unit:
                _, shortcut, residual = operands
                fused.append(user)
                if shortcut is not None:
                    sc_conv = self.modules[shortcut[0].target]
                    sc_weight, sc_bias = self.fold(shortcut, shortcut[0].target)
                    tensors["shortcut_weight"] = sc_weight
                    tensors["bias"] = bias + sc_bias
                    inputs["shortcut"] = self.value(shortcut[0].args[0])
                    attrs["shortcut_stride"] = sc_conv.stride[0]
                    fused += [n for n in shortcut if n is not None]
                elif user in self.strided_residuals:
                    source, stride, front, back, nodes = self.strided_residuals[user]
                    inputs["residual"] = self.value(source)
                    attrs.update(residual_stride=stride, residual_channel_offset=front,
                                 residual_pad=(front, back))
                    fused += nodes
                else:
                    inputs["residual"] = self.value(residual)
                end = user
                user = self.single_user(end)
        if user is not None and _is_relu(user, self.modules):
            attrs["relu"] = True
            fused.append(user)
            end = user
        extra = ()
        squeeze = self.squeeze_of(end)
        affine = self.affine_output(end) if squeeze is None else None
        if squeeze is not None:
            # the SE squeeze: a second output of the epilogue (the step stays at its place: the
            # mean's readers come after the pool node, which reads the stored value)
            pool, attrs["channel_mean"] = squeeze
            fused.append(pool)
            extra = (self.value(pool),)
        if affine is not None:
            norm, relu, relu2 = affine
            last = relu if relu is not None else norm
            others = [u for u in self.users[self.resolve(end)] if u is not norm]
            # every other reader of the sum comes after the affine: the step runs at its place
            if all(self.index[u] > self.index[last] for u in others):
                tensors["scale2"], tensors["shift2"] = self.norm_affine(norm)
                attrs["relu2"] = relu2
                fused += [norm] + ([relu] if relu is not None else [])
                extra = (self.value(last),)
        self.claim(fused)
        step = Step("conv", conv_node.target, inputs, self.value(end), attrs, tensors,
                    tuple(n.name for n in fused), extra_outputs=extra)
        if "scale2" in tensors:
            end = max(fused, key=self.index.__getitem__)
        return step, end

    def conv_then_act(self, conv_node, norm, act, inputs, attrs, tensors, fused):
        """The conv step (BN folded) writing ``<norm>.bn``, then ``act`` on it as a PyTorch step
        writing the norm's value; an in-place act runs on a copy (the conv's buffer is the plan's
        memory, which a later step may reuse while the act's result is still read)."""
        self.claim(fused)
        bn_value = f"{norm.name}.bn"      # (fx names have no dots: no clash)
        step = Step("conv", conv_node.target, inputs, bn_value, attrs, tensors, tuple(n.name for n in fused))

        def call(env_args, act=act, name=bn_value):
            x = env_args[name]
            return act(x.clone() if getattr(act, "inplace", False) else x)
        self.steps.append((self.index[norm], Step(
            "torch", f"{norm.target}.act", {bn_value: bn_value}, norm.name,
            {"call": call, "what": type(act).__name__, "target": act}, {}, (norm.name,))))
        return step, conv_node

    def claim(self, nodes):
        self.claimed.update(nodes)

    def head_step(self, pool):
        """global average pool -> flatten -> Linear as one ``head`` step, or None. The pool is
        ``AdaptiveAvgPool2d(1)`` / ``F.adaptive_avg_pool2d(x, 1)``, or ``F.avg_pool2d(x, x.size(3))``
        (global for square maps: the step runs that PyTorch call on others); the flatten is
        ``torch.flatten(., 1)``, ``nn.Flatten()``, ``.view(.size(0), -1)`` or ``.view(-1, C)``."""
        helpers = []
        if _is_global_pool(pool, self.modules):
            attrs = {}
        else:
            width = _avg_pool_over_width(pool, self.resolve)
            if width is None:
                return None
            attrs, helpers = {"pool": "width"}, width
        users = [u for u in self.users[self.resolve(pool)] if u not in helpers]
        sizes = [u for u in users if _size_of(u, 0) is not None]
        rest = [u for u in users if u not in sizes]
        if len(rest) != 1:
            return None
        flat = rest[0]
        if not attrs and not sizes and _is_module(flat, self.modules, nn.Conv2d):
            return self.conv_head_step(pool, flat)
        fc = self.single_user(flat)
        if fc is None or not _is_module(fc, self.modules, nn.Linear) or len(fc.args) != 1:
            return None
        linear = self.modules[fc.target]
        if not (_is_flatten(flat, self.modules) and not sizes) and not _is_view_flatten(
                flat, pool, sizes, linear.in_features, self.users):
            return None
        weight = linear.weight.detach()
        bias = (linear.bias.detach().float() if linear.bias is not None
                else torch.zeros(linear.out_features, device=weight.device))
        if not _is_flatten(flat, self.modules):
            attrs["flatten"] = "batch" if sizes else "features"
        nodes = [*helpers, pool, *sizes, flat, fc]
        self.claim(nodes)
        step = Step("head", fc.target, {"x": self.value(pool.args[0])}, fc.name, attrs,
                    {"weight": weight.to(self.dtype).contiguous(), "bias": bias},
                    tuple(n.name for n in nodes))
        return step, fc

    def conv_head_step(self, pool, fc):
        """global average pool -> 1x1 conv -> flatten (timm's ClassifierHead(use_conv=True), e.g.
        resnetv2's) as one ``head`` step, or None."""
        conv = self.modules[fc.target]
        flat = self.single_user(fc)
        if (not _foldable_conv(fc, self.modules) or conv.kernel_size != (1, 1) or conv.stride != (1, 1)
                or conv.padding != (0, 0) or conv.groups != 1 or flat is None or not _is_flatten(flat, self.modules)):
            return None
        weight = conv.weight.detach()[:, :, 0, 0]
        bias = (conv.bias.detach().float() if conv.bias is not None
                else torch.zeros(conv.out_channels, device=weight.device))
        nodes = [pool, fc, flat]
        self.claim(nodes)
        step = Step("head", fc.target, {"x": self.value(pool.args[0])}, flat.name, {},
                    {"weight": weight.to(self.dtype).contiguous(), "bias": bias}, tuple(n.name for n in nodes))
        return step, flat

    def find_channel_scales(self):
        """Squeeze-and-excitation: ``x * sigmoid(gate)`` [+ residual] [-> ReLU] as one ``se_scale``
        step (the sigmoid fused when the product is its only reader). The add is left to a conv
        epilogue when its other operand is a conv unit (a projection's output gets the scaled
        value as its residual), and taken here otherwise."""
        for n in self.nodes:
            if n in self.claimed or n in self.alias or not _is_mul(n):
                continue
            a, b = (self.resolve(v) for v in n.args)
            if _is_sigmoid(b, self.modules) and not _is_sigmoid(a, self.modules):
                x, gate = a, b
            elif _is_sigmoid(a, self.modules) and not _is_sigmoid(b, self.modules):
                x, gate = b, a
            else:
                continue
            nodes = [n]
            sigmoid = self.single_user(gate) is n and gate not in self.claimed
            if sigmoid:
                nodes.insert(0, gate)
                gate = self.resolve(gate.args[0])
            inputs = {"x": self.value(x), "gate": self.value(gate)}
            end, relu = n, False
            add = self.single_user(n)
            if add is not None and _is_add(add) and add not in self.strided_residuals:
                operands = self.add_operands(add)
                if operands is None:
                    other = [self.resolve(v) for v in add.args if self.resolve(v) is not n]
                    if len(other) == 1:
                        inputs["residual"] = self.value(other[0])
                        nodes.append(add)
                        end = add
                        user = self.single_user(add)
                        if user is not None and _is_relu(user, self.modules):
                            nodes.append(user)
                            end, relu = user, True
            self.claim(nodes)
            step = Step("se_scale", n.name, inputs, self.value(end), {"relu": relu, "sigmoid": sigmoid}, {},
                        tuple(m.name for m in nodes))
            self.channel_scales[n] = (step, end)

    def find_heads(self):
        for n in self.nodes:
            if n not in self.claimed and n not in self.alias:
                found = self.head_step(n)
                if found is not None:
                    self.heads[n] = found

    def torch_step(self, node) -> Step:
        refs = {}

        def to_ref(n):
            name = self.value(n)
            refs[name] = name
            return Ref(name)
        args = fx.node.map_arg(node.args, to_ref)
        kwargs = fx.node.map_arg(node.kwargs, to_ref)
        fn = _callable(self.root, node)
        what = _describe_node(node, self.modules)

        def call(env_args, fn=fn, args=args, kwargs=kwargs):
            return fn(*bind_refs(args, env_args), **bind_refs(kwargs, env_args))
        return Step("torch", node.target if node.op == "call_module" else node.name,
                    {name: name for name in refs}, node.name, {"call": call, "what": what, "target": fn}, {},
                    (node.name,))

    def run(self):
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise Unsupported(f"its forward takes {len(placeholders)} inputs (fastres runs one)")
        self.find_strided_residuals()
        self.find_heads()
        self.find_channel_scales()
        for n in self.nodes:
            if n in self.heads or n in self.channel_scales:
                step, end = self.heads.get(n) or self.channel_scales[n]
                self.steps.append((self.index[end], step))
                continue
            if n in self.claimed or n in self.alias or n.op in ("placeholder", "output"):
                continue
            step = end = None
            if _foldable_conv(n, self.modules):
                unit = self.conv_unit(n)
                user = self.single_user(self.unit_end(unit))
                operands = self.add_operands(user) if user is not None and _is_add(user) else None
                if operands is not None and operands[1] == unit:
                    # the projection shortcut of a later conv, which folds it (also when the
                    # forward computes the shortcut first)
                    self.claim([m for m in unit if m is not None])
                    continue
                step, end = self.conv_step(unit)
            elif _is_stem_pool(n, self.modules):
                step, end = Step("max_pool", n.target, {"x": self.value(n.args[0])}, n.name, {}, {},
                                 (n.name,)), n
                self.claim([n])
            if step is None:
                step, end = self.torch_step(n), n
                self.notes.append(f"{step.name}: {step.attrs['what']} runs as PyTorch")
            self.steps.append((self.index[end], step))
        self.steps.sort(key=lambda pair: pair[0])
        steps = _fuse_pairs([s for _, s in self.steps], self.dtype)
        output = next(n for n in self.nodes if n.op == "output")
        structure = fx.node.map_arg(output.args[0], lambda n: Ref(self.value(n)))
        return steps, structure, placeholders[0].name


def _callable(root, node) -> Callable:
    if node.op == "call_module":
        return root.get_submodule(node.target)
    if node.op == "call_function":
        return node.target
    if node.op == "call_method":
        name = node.target
        return lambda self, *args, **kwargs: getattr(self, name)(*args, **kwargs)
    if node.op == "get_attr":
        path = node.target
        return lambda: operator.attrgetter(path)(root)
    raise Unsupported(f"cannot run fx node {node.op} {node.target}")


def _describe_node(node, modules) -> str:
    if node.op == "call_module":
        return type(modules[node.target]).__name__
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "get_attr":
        return f"attribute {node.target}"
    return getattr(node.target, "__name__", str(node.target))


def _fuse_pairs(steps: list, dtype) -> list:
    """A 3x3 conv step whose only reader is a 1x1/s1 conv step (a bottleneck's conv2 -> conv3)
    becomes one ``conv_pair`` step where ``fuses_conv3x3_conv1x1`` says it fits."""
    readers = defaultdict(list)
    for s in steps:
        for name in s.reads:
            readers[name].append(s)
    out, skip = [], set()
    for i, mid in enumerate(steps):
        if id(mid) in skip:
            continue
        last = steps[i + 1] if i + 1 < len(steps) else None
        if (last is not None and mid.kind == "conv" and last.kind == "conv"
                and _pairable(mid, last, readers)):
            a, w = mid.attrs, mid.tensors["weight"]
            if fuses_conv3x3_conv1x1(c_mid=w.shape[0], c_in_mid=w.shape[1] * a["groups"],
                                     c_out=last.tensors["weight"].shape[0], groups=a["groups"],
                                     dtype=dtype):
                inputs = dict(last.inputs, x=mid.inputs["x"])
                attrs = {k: a[k] for k in ("stride", "padding", "dilation", "groups")}
                if "shortcut_stride" in last.attrs:
                    attrs["shortcut_stride"] = last.attrs["shortcut_stride"]
                tensors = {"mid_weight": w, "mid_bias": mid.tensors["bias"],
                           **{k: v for k, v in last.tensors.items()}}
                name = f"{mid.name}+{last.name.rsplit('.', 1)[-1]}"
                out.append(Step("conv_pair", name, inputs, last.output, attrs, tensors,
                                mid.fused + last.fused))
                skip.add(id(last))
                continue
        out.append(mid)
    return out


def _pairable(mid: Step, last: Step, readers) -> bool:
    a, b = mid.attrs, last.attrs
    w_mid, w_last = mid.tensors["weight"], last.tensors["weight"]
    return (tuple(w_mid.shape[2:]) == (3, 3) and a["relu"] and set(mid.inputs) == {"x"}
            and not mid.extra_outputs and not last.extra_outputs and "residual_stride" not in b
            and len(set(a["stride"])) == 1 and len(set(a["padding"])) == 1 and len(set(a["dilation"])) == 1
            and tuple(w_last.shape[2:]) == (1, 1) and b["stride"] == (1, 1) and b["padding"] == (0, 0)
            and b["groups"] == 1 and b["relu"] and last.inputs["x"] == mid.output
            and readers[mid.output] == [last]
            and mid.output not in (last.inputs.get("residual"), last.inputs.get("shortcut")))


def _compute_weight(weight: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    if dtype == torch.float16 and weight.device.type != "meta":
        peak = weight.abs().max().item() if weight.numel() else 0.0
        if not peak <= _FP16_MAX:   # also catches NaN
            raise Unsupported(
                f"the folded weight of {name} reaches {peak:.4g}, beyond float16's range "
                f"({_FP16_MAX:.0f}): a BatchNorm running_var near zero? (run it in float32 or bfloat16)")
    return weight.to(dtype).contiguous(memory_format=torch.channels_last)


def capture(module: nn.Module, *, dtype: Optional[torch.dtype] = None, return_nodes=None) -> Plan:
    """The plan of ``module``'s eval forward, or ``Unsupported`` with the reason it has none.

    ``return_nodes`` (``create_feature_extractor``'s convention, see ``feature_extractor``): the
    plan outputs those values as a dict instead of the forward's result.

    ``dtype``: the compute dtype of the fused steps (default: the module's); weights are folded
    in fp32 and cast once. PyTorch steps run the module's own layers in its own dtype, so a
    ``dtype`` other than the module's needs a plan without them (the engine's case).
    """
    reason = fallback_reason(module)
    if reason is not None:
        raise Unsupported(reason)
    param = next(iter((*module.parameters(), *module.buffers())), None)
    model_dtype = compute_dtype(module)
    device = param.device if param is not None else torch.device("cpu")
    dtype = dtype or model_dtype
    if dtype not in SUPPORTED_DTYPES:
        raise Unsupported(f"the kernels do not run {dtype}")
    graph = _trace(module, normalize_return_nodes(return_nodes))
    with torch.inference_mode(False), torch.no_grad():
        steps, output, input_name = _Matcher(module, graph, dtype).run()
    if dtype != model_dtype and any(s.kind == "torch" for s in steps):
        raise Unsupported(f"it has steps that run as PyTorch in {model_dtype}, and a plan in {dtype} "
                          "was asked for")
    in_channels = None
    for s in steps:
        if s.kind in ("conv", "conv_pair") and s.inputs["x"] == input_name:
            w = s.tensors["mid_weight" if s.kind == "conv_pair" else "weight"]
            in_channels = w.shape[1] * s.attrs["groups"]
            a = s.attrs
            # the stem can read a zero-bordered 4-channel copy of the input (16-byte loads)
            a["padded_input"] = (s.kind == "conv" and set(s.inputs) == {"x"} and not s.extra_outputs
                                 and len(set(a["stride"])) == 1 and len(set(a["padding"])) == 1
                                 and pads_stem_input(w, groups=a["groups"], dilation=a["dilation"][0]))
    plan = Plan(steps=steps, output=output, dtype=dtype, device=device, input_name=input_name,
                in_channels=in_channels)
    plan.notes = [f"{s.name}: {s.attrs['what']} runs as PyTorch" for s in steps if s.kind == "torch"]
    return plan


# -- the per-module cache ----------------------------------------------------------------------
def inference_weights_reason(module: nn.Module) -> Optional[str]:
    """Why the module's cached plan could go stale, or None: a parameter or buffer that is an
    inference tensor (the module was made, loaded or converted under ``torch.inference_mode``) has
    no version counter, so an in-place edit of it (allowed inside inference mode) would not reach
    the guard. Such a module runs its own forward."""
    for kind, tensors in (("parameter", module.named_parameters()), ("buffer", module.named_buffers())):
        for name, t in tensors:
            # what the guard watches: integer buffers (num_batches_tracked) never change an eval result
            if t.is_inference() and (kind == "parameter" or t.is_floating_point()):
                return (f"{kind} {name!r} is an inference tensor (the module was made, loaded or converted "
                        "under torch.inference_mode), whose in-place edits fastres cannot see; make or "
                        "load the model outside inference_mode for the fused plan")
    return None


class _State:
    __slots__ = ("guard", "plan", "reason")

    def __init__(self, guard, plan, reason):
        self.guard, self.plan, self.reason = guard, plan, reason


class FastPath:
    """The cached plan of one module (or the reason it runs PyTorch's forward) and its guard.

    ``__call__`` checks the guard (everything that changes the answer: module tree, attributes,
    hooks, parameter and buffer identity, storage and version; read before the weights are
    folded, so an update racing a build is seen by the next call), then the per-call conditions
    (autograd, autocast, the input's dtype and device), and runs the plan on the backend the
    input's device selects, or ``pytorch_forward`` with a one-time ``FallbackWarning``.
    Pickling or copying a module drops its cache.
    """

    def __init__(self, return_nodes=None):
        self.return_nodes = normalize_return_nodes(return_nodes)
        self._lock = threading.Lock()
        self._state: Optional[_State] = None
        self._warned: set = set()
        self.builds = 0

    def __reduce__(self):
        return (FastPath, (self.return_nodes,))

    def __deepcopy__(self, memo):
        return FastPath(self.return_nodes)

    def clear(self) -> None:
        with self._lock:
            self._state = None

    def state(self, module: nn.Module) -> _State:
        state = self._state
        if state is not None and state.guard.check():
            return state
        with self._lock:
            state = self._state
            if state is None or not state.guard.check():
                guard = Guard(module)            # read before any weight is read
                plan, reason = None, inference_weights_reason(module)
                if reason is None:
                    try:
                        plan = capture(module, return_nodes=self.return_nodes)
                    except Unsupported as err:
                        reason = str(err)
                state = self._state = _State(guard, plan, reason)
                self.builds += 1
        return state

    def plan(self, module: nn.Module) -> Plan:
        state = self.state(module)
        if state.plan is None:
            raise Unsupported(state.reason)
        return state.plan

    def notice(self, reason: str, stacklevel: int = 4) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(f"fastres: {reason}; running the module's own PyTorch forward",
                          FallbackWarning, stacklevel=stacklevel)

    def __call__(self, module: nn.Module, x, pytorch_forward: Callable,
                 check_input: Optional[Callable] = None):
        """``module``'s forward on ``x``: the plan, or ``pytorch_forward(x)`` with the reason said
        once. ``check_input(x, module)`` raises a clear error for an input the module cannot take;
        it runs only when the input does not fit the plan (the per-forward cost is the guard)."""
        if torch.is_grad_enabled() and torch.is_tensor(x) and _needs_grad(module, x):
            state = plan = None      # autograd: PyTorch's forward, no plan built for it
        else:
            state = self._state
            if state is None or not state.guard.check():
                state = self.state(module)
            plan = state.plan
        if (plan is not None and type(x) is torch.Tensor and x.dim() == 4 and x.numel()
                and x.dtype is plan.dtype and x.device == plan.device
                and (plan.in_channels is None or x.shape[1] == plan.in_channels)
                and not torch.is_autocast_enabled(x.device.type)
                and not (x.device.type == "cpu" and cpu_fp32_precision() != "ieee")):
            return _backend_for(x.device).execute(plan, x)
        if check_input is not None:
            check_input(x, module)
        reason = (_call_reason(module, x) or (state.reason if state is not None else None)
                  or _input_mismatch(plan, x))
        if reason is None:     # e.g. a tensor subclass: the plan runs it as any tensor
            return _backend_for(x.device).execute(plan, x)
        self.notice(reason)
        return pytorch_forward(x)


def _needs_grad(module: nn.Module, x) -> bool:
    return x.requires_grad or any(p.requires_grad for p in module.parameters())


def _backend_for(device):
    return get_backend(backend_for(device))


def _call_reason(module: nn.Module, x) -> Optional[str]:
    """Why this call must run PyTorch's forward whatever the plan, or None (cheap: no plan)."""
    if not torch.is_tensor(x):
        return f"the input is a {type(x).__name__}, not a tensor"
    if torch.is_grad_enabled() and _needs_grad(module, x):
        return ("autograd reaches the parameters or the input (grad mode on); serve under "
                "torch.inference_mode() or torch.no_grad() to run the fused plan")
    if torch.is_autocast_enabled(x.device.type):
        return "torch.autocast is active (PyTorch picks per-op dtypes the plan does not follow)"
    if x.device.type == "cpu" and (precision := cpu_fp32_precision()) != "ieee":
        return (f"torch.backends.mkldnn's float32 precision is {precision!r} (PyTorch then computes float32 "
                "convolutions and matmuls in lower precision, which the plan does not follow)")
    if x.dim() != 4:
        return "an input that is not 4-D [N, C, H, W]"
    if x.shape[0] == 0:
        return "an empty batch"
    return None


def _fp32_precision_getter():
    getter = getattr(torch._C, "_get_fp32_precision_getter", None)    # private: ~0.2 us a read
    if getter is not None:
        try:
            getter("mkldnn", "conv")
            return lambda op: getter("mkldnn", op)
        except (RuntimeError, TypeError):
            pass
    mkldnn = torch.backends.mkldnn
    if hasattr(getattr(mkldnn, "conv", None), "fp32_precision"):      # the public properties, slower
        return lambda op: getattr(mkldnn, op).fp32_precision
    return None     # a PyTorch without the setting: always full float32


_FP32_PRECISION = _fp32_precision_getter()


def cpu_fp32_precision() -> str:
    """The precision PyTorch's CPU float32 convolutions and matmuls run at
    (``torch.backends.mkldnn.conv.fp32_precision`` / ``.matmul``, after inheritance): "ieee"
    (full float32, also for "none") or the lower one set ("bf16", "tf32")."""
    if _FP32_PRECISION is None:
        return "ieee"
    for op in ("conv", "matmul"):
        precision = _FP32_PRECISION(op)
        if precision not in ("ieee", "none"):
            return precision
    return "ieee"


def _input_mismatch(plan: Optional[Plan], x) -> Optional[str]:
    if plan is not None and (x.dtype != plan.dtype or x.device != plan.device):
        return "an input whose dtype or device differs from the parameters'"
    return None
