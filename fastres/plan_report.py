"""What a plan costs: one row per launch a forward makes, and the same count for the module's
unfused PyTorch eval forward, so the saving of fusion is a number.

Rows come from running the plan on fake tensors (no data, no GPU): every kernel launch is recorded
with the cost its ``KernelCall`` states (``kernels/``), and every PyTorch step is one launch costed
by ``torch_call_cost``. The unfused reference traces the module the same way (``fastres.capture``'s
tracer) and costs each PyTorch call with the same ``torch_call_cost``, so both sides follow one
traffic model: a launch reads each of its inputs and parameters once and writes its output once
(3x3 halos and re-reads of tiles across programs are not counted); per-image figures divide by the
batch, so weights are amortised over it. These are *modelled* figures, not measurements.
"""
from __future__ import annotations

import math
import operator
from typing import Optional

import torch
from torch import fx, nn

from .backend import TritonBackend
from .ir import Plan

__all__ = ["launch_rows", "reference_rows", "inspect_arch", "inspect_model", "format_report",
           "record_plan_launches", "record_model_launches", "torch_call_cost", "DTYPES"]

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
QUANTIZED = ("int8", "fp8")     # fastres.quantize plans: fp32 model, 8-bit steps (placeholder scales)

# Calls that only reinterpret or describe a tensor: no launch, no traffic.
_VIEWS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, getattr, operator.getitem}
_VIEW_METHODS = {"view", "reshape", "flatten", "size", "squeeze", "unsqueeze", "permute", "dim",
                 "contiguous_format", "expand", "__getitem__"}


class _RecordingBackend(TritonBackend):
    """Records the kernel launches of a forward on fake tensors; packs without caching."""
    name = "triton:recording"

    def prepare(self, step, op):
        return op.pack(step) if op.pack is not None else None


def _fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode
    return FakeTensorMode(allow_non_fake_inputs=True)


def _numel(t) -> int:
    return t.numel() if torch.is_tensor(t) else 0


def torch_call_cost(target, args: list, out) -> dict:
    """(flops, bytes) of one PyTorch call as a separate kernel: reads its tensor inputs and the
    floating parameters/buffers of a module once, writes its output once."""
    tensors = [a for a in args if torch.is_tensor(a)]
    itemsize = out.element_size() if torch.is_tensor(out) else 0
    params = 0
    flops = _numel(out)
    if isinstance(target, nn.Module):
        params = sum(t.numel() for t in (*target.parameters(recurse=False), *target.buffers(recurse=False))
                     if t.is_floating_point())
        if isinstance(target, nn.modules.conv._ConvNd):
            flops = 2 * _numel(out) * target.weight[0].numel()
        elif isinstance(target, nn.Linear):
            flops = 2 * _numel(out) * target.in_features
        elif isinstance(target, (nn.modules.batchnorm._BatchNorm,)) or type(target).__name__ == "FrozenBatchNorm2d":
            flops = 2 * _numel(out)
        elif isinstance(target, nn.MaxPool2d):
            k = target.kernel_size if isinstance(target.kernel_size, int) else math.prod(target.kernel_size)
            flops = (k * k if isinstance(target.kernel_size, int) else k) * _numel(out)
        elif isinstance(target, nn.AdaptiveAvgPool2d):
            flops = sum(_numel(t) for t in tensors)
    bytes_ = (sum(_numel(t) for t in tensors) + _numel(out) + params) * itemsize
    return {"flops": flops, "bytes": bytes_}


def _is_view(node: fx.Node, modules) -> bool:
    if node.op == "call_function":
        return node.target in _VIEWS
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    if node.op == "call_module":
        return isinstance(modules[node.target], (nn.Flatten, nn.Identity, nn.Unflatten))
    return node.op in ("get_attr", "placeholder", "output")


def _shape_of(info: dict) -> dict:
    if "C_mid" in info:        # the fused pair: the 1x1 GEMM and the on-chip 3x3 GEMM feeding it
        return {"M": info["M"], "N": info["N"], "K": info["K"], "N_mid": info["C_mid"], "K_mid": info["K_mid"]}
    if "M" in info:
        return {"M": info["M"], "N": info["N"], "K": info["K"]}
    if "classes" in info:      # avgpool + linear
        return {"M": info["N"], "N": info["classes"], "K": info["C"]}
    return {"M": info["N"] * info["OH"] * info["OW"], "N": info["C"], "K": 9}   # max pool


def launch_rows(plan: Plan, input_shape: tuple) -> list[dict]:
    """One row per launch a forward of ``plan`` on ``input_shape`` makes."""
    from .kernels._launch import record_launches

    backend = _RecordingBackend()
    rows = []
    with _fake_mode() as mode, torch.no_grad(), record_launches() as calls:
        x = torch.empty(input_shape, dtype=plan.input_dtype or plan.dtype, device=plan.device).contiguous(
            memory_format=torch.channels_last)
        env = {plan.input_name: mode.from_tensor(x) if not isinstance(x, torch._subclasses.FakeTensor) else x}
        for step, op, relayout in zip(plan.steps, plan._ops, plan._relayout):
            args = {role: env[name] for role, name in step.inputs.items()}
            for role in relayout:
                args[role] = backend.layout(step, role, args[role])
            before = len(calls)
            out = backend.run(step, op, args, None)
            env.update(zip(step.outputs, out) if step.extra_outputs else [(step.output, out)])
            if len(calls) > before:
                for call in calls[before:]:
                    info = call.info
                    rows.append({"name": step.name, "ops": list(step.ops), "shape": _shape_of(info),
                                 "flops": info["flops"], "bytes": info["bytes"]})
            elif step.kind == "torch":
                cost = torch_call_cost(step.attrs["target"], list(args.values()), out)
                rows.append({"name": step.name, "ops": list(step.ops),
                             "shape": {"M": _numel(out), "N": 1, "K": 1}, **cost})
            elif step.kind in ("quantize", "dequantize"):    # an elementwise pass (PyTorch ops)
                moved = sum(_numel(t) * t.element_size() for t in (*args.values(), out))
                rows.append({"name": step.name, "ops": list(step.ops),
                             "shape": {"M": _numel(out), "N": 1, "K": 1}, "flops": _numel(out), "bytes": moved})
    return rows


def reference_rows(module: nn.Module, input_shape: tuple, dtype: torch.dtype) -> list[dict]:
    """The module's eval forward as separate PyTorch kernels (conv, BN, ReLU, add, pool, linear)."""
    from .capture import _Tracer

    graph = _Tracer().trace(module)
    modules = dict(module.named_modules())
    rows = []
    env = {}
    with _fake_mode(), torch.no_grad():
        for node in graph.nodes:
            if node.op == "placeholder":
                env[node.name] = torch.empty(input_shape, dtype=dtype, device=_device_of(module))
                continue
            if node.op == "output":
                continue
            args = fx.node.map_arg(node.args, lambda n: env[n.name])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n.name])
            if node.op == "call_module":
                target = modules[node.target]
                out = target(*args, **kwargs)
            elif node.op == "call_function":
                target = node.target
                out = target(*args, **kwargs)
            elif node.op == "call_method":
                target = node.target
                out = getattr(args[0], target)(*args[1:], **kwargs)
            else:   # get_attr
                target = None
                out = _get_attr(module, node.target)
            env[node.name] = out
            if _is_view(node, modules):
                continue
            flat = [a for a in (*args, *kwargs.values()) if torch.is_tensor(a)]
            rows.append({"name": node.target if isinstance(node.target, str) else node.name,
                         "ops": [type(target).__name__ if isinstance(target, nn.Module) else str(getattr(target, "__name__", target))],
                         "shape": {"M": _numel(out), "N": 1, "K": 1}, **torch_call_cost(target, flat, out)})
    return rows


def _get_attr(module, path: str):
    for part in path.split("."):
        module = getattr(module, part)
    return module


def _device_of(module: nn.Module) -> torch.device:
    t = next(iter((*module.parameters(), *module.buffers())), None)
    return t.device if t is not None else torch.device("cpu")


def _totals(rows: list[dict], batch: int) -> dict:
    return {"launches": len(rows),
            "flops_per_image": sum(r["flops"] for r in rows) / batch,
            "bytes_per_image": sum(r["bytes"] for r in rows) / batch}


def inspect_model(model: nn.Module, input_shape: tuple, *, title: str = "model",
                  dtype: Optional[str] = None) -> dict:
    """The plan of ``model`` (eval) for inputs of ``input_shape``, as the JSON report: a row per
    launch, the steps that run as PyTorch and why, totals beside the unfused forward's."""
    from .capture import feature_extractor
    from .optimized import Optimized

    return_nodes = None
    if isinstance(model, Optimized):        # what the optimized module runs: its module's plan
        model, return_nodes = model.module, model.return_nodes
    plan = _plan_of(model, dtype, return_nodes)
    batch = input_shape[0]
    rows = launch_rows(plan, input_shape)
    unfused = model if return_nodes is None else feature_extractor(model, return_nodes)
    reference = reference_rows(unfused, input_shape, plan.dtype)
    name = dtype or {v: k for k, v in DTYPES.items()}.get(plan.dtype, str(plan.dtype))
    return {"arch": title, "batch": batch, "size": input_shape[-1], "dtype": name, "kernels": rows,
            "pytorch_steps": list(plan.notes), "totals": _totals(rows, batch),
            "reference": _totals(reference, batch)}


def _meta_model(arch: str, dtype: str) -> nn.Module:
    from . import models

    if arch not in models.ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(models.ARCHITECTURES)}")
    _check_dtype(dtype)
    with torch.device("meta"):   # shapes only: no weights are initialised or read
        model = getattr(models, arch)()
    return model.to(model_dtype(dtype)).eval()


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES and dtype not in QUANTIZED:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join([*DTYPES, *QUANTIZED])}")


def model_dtype(dtype: str) -> torch.dtype:
    """The float dtype of the model behind a plan of ``dtype`` (an 8-bit plan's model is fp32)."""
    return torch.float32 if dtype in QUANTIZED else DTYPES[dtype]


def _plan_of(model: nn.Module, dtype: Optional[str], return_nodes=None) -> Plan:
    """The plan a forward of ``model`` runs; for int8 / fp8 the quantized plan's shapes and launches
    (``fastres.quantize.shape_only_plan``: placeholder scales)."""
    from .capture import capture

    if dtype not in QUANTIZED:
        return capture(model, return_nodes=return_nodes)
    from .quantize import shape_only_plan
    if return_nodes is not None:
        raise ValueError("an 8-bit plan of a feature extractor (return_nodes) is not supported")
    return shape_only_plan(model, dtype)


def _check_positive(batch: int, size: int) -> None:
    for what, v in (("batch", batch), ("size", size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{what} must be a positive integer, got {v!r}")


def inspect_arch(arch: str = "resnet50", batch: int = 256, size: int = 224, dtype: str = "fp16",
                 gpu: Optional[str] = None) -> dict:
    """The plan of ``arch`` for a batch of ``size`` x ``size`` images, as the JSON report; with
    ``gpu`` (h100, h200, a100) also the modelled roofline floor of every launch (fastres.roofline)."""
    _check_positive(batch, size)
    model = _meta_model(arch, dtype)
    report = inspect_model(model, (batch, 3, size, size), title=arch, dtype=dtype)
    if gpu:
        from .roofline import plan_floor
        report["roofline"] = plan_floor(report["kernels"], gpu, dtype, batch)
    return report


def format_report(report: dict) -> str:
    lines = [f"fastres plan: {report['arch']}  batch {report['batch']}  {report['size']}x"
             f"{report['size']}  {report['dtype']}  (modelled traffic, see fastres/plan_report.py)",
             f"{'#':>3} {'kernel':<24} {'fused ops':<78} {'M':>9} {'N':>5} {'K':>8} "
             f"{'GFLOP':>8} {'MB':>8}"]
    for i, row in enumerate(report["kernels"]):
        s = row["shape"]
        k = f"{s['K_mid']}+{s['K']}" if "K_mid" in s else str(s["K"])
        lines.append(f"{i:>3} {row['name']:<24} {' + '.join(row['ops']):<78} {s['M']:>9} {s['N']:>5} "
                     f"{k:>8} {row['flops'] / 1e9:>8.2f} {row['bytes'] / 1e6:>8.2f}")
    t, r = report["totals"], report["reference"]
    lines += ["", f"{'per image':<22} {'launches':>9} {'GFLOP':>8} {'MB moved':>9}",
              f"{'fastres plan':<22} {t['launches']:>9} {t['flops_per_image'] / 1e9:>8.2f} "
              f"{t['bytes_per_image'] / 1e6:>9.2f}",
              f"{'unfused PyTorch eval':<22} {r['launches']:>9} {r['flops_per_image'] / 1e9:>8.2f} "
              f"{r['bytes_per_image'] / 1e6:>9.2f}",
              f"saving: {r['launches'] / t['launches']:.2f}x fewer launches, "
              f"{r['bytes_per_image'] / t['bytes_per_image']:.2f}x less traffic (modelled)"]
    if "roofline" in report:
        roof = report["roofline"]
        lines.append(f"roofline floor on {roof['gpu']} (modelled, not measured): {roof['total_seconds'] * 1e3:.3f} ms "
                     f"per batch, <= {roof['images_per_second_ceiling']:.0f} images/s; "
                     f"{roof['memory_bound_launches']} of {len(roof['launches'])} launches memory-bound")
    notes = report.get("pytorch_steps") or []
    if notes:
        lines += ["", f"{len(notes)} step(s) run as PyTorch (counted as launches above):"]
        lines += [f"  {n}" for n in notes]
    return "\n".join(lines)


def record_plan_launches(arch: str, batch: int, size: int = 224, dtype: str = "fp16",
                         sm: Optional[int] = None) -> list:
    """The KernelCalls a real Triton-path forward of ``arch`` launches, recorded on meta tensors
    (with ``sm``: tiles chosen for that GPU architecture, ``kernels._target``)."""
    _check_positive(batch, size)
    return _record(_meta_model(arch, dtype), (batch, 3, size, size), dtype, sm)


def record_model_launches(make_model, input_shape: tuple, dtype: str = "fp16",
                          sm: Optional[int] = None) -> list:
    """The KernelCalls a Triton-path forward of the model ``make_model()`` builds launches on
    inputs of ``input_shape`` (N, C, H, W): built on the meta device (shapes only), recorded
    (with ``sm``: tiles chosen for that GPU architecture)."""
    _check_dtype(dtype)
    with torch.device("meta"):
        model = make_model()
    return _record(model.to(model_dtype(dtype)).eval(), input_shape, dtype, sm)


def _record(model: nn.Module, input_shape: tuple, dtype: str, sm: Optional[int]) -> list:
    import contextlib

    from .kernels._launch import record_launches

    plan = _plan_of(model, dtype)
    x = torch.empty(input_shape, dtype=plan.input_dtype or model_dtype(dtype), device="meta",
                    memory_format=torch.channels_last)
    target = contextlib.nullcontext()
    if sm:
        from .kernels._target import use_target
        target = use_target(sm)
    with record_launches() as calls, torch.no_grad(), target:
        plan.run(x, TritonBackend())
    return calls
