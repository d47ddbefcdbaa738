"""What a plan costs: one row per kernel launch (fused ops, GEMM shape, FLOPs, bytes), and the
same count for torchvision's unfused eval forward, so the saving of fusion is a number.

Traffic model (both sides counted the same way): every kernel reads each of its input
activations once and writes its output once (ideal caching inside a launch: 3x3 halos and
re-reads of tiles across programs are not counted), and reads its weights once per launch;
per-image figures divide by the batch, so weights are amortised over it. These are *modelled*
figures, not measurements.
"""
from __future__ import annotations

import torch
from torch import nn

from .plan import Plan


def plan_rows(plan: Plan, input_shape: tuple, itemsize: int) -> list[dict]:
    shapes = plan.value_shapes(input_shape)
    rows = []
    for step in plan.steps:
        cost = step.cost(shapes, itemsize)
        rows.append({"name": step.name, "ops": list(step.ops), "shape": cost["shape"],
                     "flops": cost["flops"], "bytes": cost["act_bytes"] + cost["weight_bytes"]})
    return rows


def reference_rows(model: nn.Module, input_shape: tuple, itemsize: int) -> list[dict]:
    """torchvision's eval forward as separate kernels: conv, BN, ReLU, add, maxpool, avgpool, linear."""
    rows = []
    n = input_shape[0]

    def numel(shape):
        out = 1
        for d in shape:
            out *= d
        return out

    def conv(name, module, shape):
        c_out = module.out_channels
        k, s, p, d = module.kernel_size[0], module.stride[0], module.padding[0], module.dilation[0]
        span = d * (k - 1) + 1
        out = (shape[0], c_out, (shape[2] + 2 * p - span) // s + 1, (shape[3] + 2 * p - span) // s + 1)
        kk = module.weight[0].numel()
        m = out[0] * out[2] * out[3]
        rows.append({"name": name, "ops": ["conv"], "shape": {"M": m, "N": c_out, "K": kk},
                     "flops": 2 * m * c_out * kk,
                     "bytes": (numel(shape) + numel(out) + module.weight.numel()) * itemsize})
        return out

    def elementwise(name, op, shape, inputs=1, params=0, flops_per=1):
        rows.append({"name": name, "ops": [op], "shape": {"M": numel(shape), "N": 1, "K": 1},
                     "flops": flops_per * numel(shape),
                     "bytes": ((inputs + 1) * numel(shape) + params) * itemsize})

    def bn(name, shape):
        elementwise(name, "batchnorm", shape, params=4 * shape[1], flops_per=2)

    shape = tuple(input_shape)
    shape = conv("conv1", model.conv1, shape)
    bn("bn1", shape)
    elementwise("relu", "relu", shape)
    out = (shape[0], shape[1], (shape[2] - 1) // 2 + 1, (shape[3] - 1) // 2 + 1)
    rows.append({"name": "maxpool", "ops": ["maxpool"], "shape": {"M": numel(out), "N": 1, "K": 9},
                 "flops": 9 * numel(out), "bytes": (numel(shape) + numel(out)) * itemsize})
    shape = out
    for li in range(1, 5):
        for bi, block in enumerate(getattr(model, f"layer{li}")):
            prefix = f"layer{li}.{bi}"
            n_convs = 3 if hasattr(block, "conv3") else 2
            x_shape, y = shape, shape
            for k in range(1, n_convs + 1):
                y = conv(f"{prefix}.conv{k}", getattr(block, f"conv{k}"), y)
                bn(f"{prefix}.bn{k}", y)
                if k < n_convs:
                    elementwise(f"{prefix}.relu{k}", "relu", y)
            if block.downsample is not None:
                sc = conv(f"{prefix}.downsample.0", block.downsample[0], x_shape)
                bn(f"{prefix}.downsample.1", sc)
            elementwise(f"{prefix}.add", "add", y, inputs=2)
            elementwise(f"{prefix}.relu", "relu", y)
            shape = y
    pooled = (shape[0], shape[1])
    rows.append({"name": "avgpool", "ops": ["avgpool"], "shape": {"M": n, "N": shape[1], "K": shape[2] * shape[3]},
                 "flops": numel(shape), "bytes": (numel(shape) + numel(pooled)) * itemsize})
    fc = model.fc
    classes = fc.out_features
    rows.append({"name": "fc", "ops": ["linear"], "shape": {"M": n, "N": classes, "K": shape[1]},
                 "flops": 2 * n * classes * shape[1],
                 "bytes": (numel(pooled) + n * classes + fc.weight.numel() + classes) * itemsize})
    return rows


def _totals(rows: list[dict], batch: int) -> dict:
    return {"launches": len(rows),
            "flops_per_image": sum(r["flops"] for r in rows) / batch,
            "bytes_per_image": sum(r["bytes"] for r in rows) / batch}


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def inspect_arch(arch: str = "resnet50", batch: int = 256, size: int = 224, dtype: str = "fp16",
                 gpu: str | None = None) -> dict:
    """The plan of ``arch`` for a batch of ``size`` x ``size`` images, as the JSON report; with
    ``gpu`` (h100, h200, a100) also the modelled roofline floor of every launch (fastres.roofline)."""
    from . import models

    if arch not in models.ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(models.ARCHITECTURES)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    with torch.device("meta"):   # shapes only: no weights are initialised or read
        model = getattr(models, arch)()
    model = model.to(DTYPES[dtype]).eval()
    itemsize = DTYPES[dtype].itemsize
    input_shape = (batch, 3, size, size)
    rows = plan_rows(model.plan(), input_shape, itemsize)
    reference = reference_rows(model, input_shape, itemsize)
    report = {"arch": arch, "batch": batch, "size": size, "dtype": dtype, "kernels": rows,
              "totals": _totals(rows, batch), "reference": _totals(reference, batch)}
    if gpu:
        from .roofline import plan_floor
        report["roofline"] = plan_floor(rows, gpu, dtype, batch)
    return report


def format_report(report: dict) -> str:
    lines = [f"fastres plan: {report['arch']}  batch {report['batch']}  {report['size']}x"
             f"{report['size']}  {report['dtype']}  (modelled traffic, see fastres/plan_report.py)",
             f"{'#':>3} {'kernel':<20} {'fused ops':<78} {'M':>9} {'N':>5} {'K':>8} "
             f"{'GFLOP':>8} {'MB':>8}"]
    for i, row in enumerate(report["kernels"]):
        s = row["shape"]
        k = f"{s['K_mid']}+{s['K']}" if "K_mid" in s else str(s["K"])
        lines.append(f"{i:>3} {row['name']:<20} {' + '.join(row['ops']):<78} {s['M']:>9} {s['N']:>5} "
                     f"{k:>8} {row['flops'] / 1e9:>8.2f} {row['bytes'] / 1e6:>8.2f}")
    t, r = report["totals"], report["reference"]
    lines += ["", f"{'per image':<22} {'launches':>9} {'GFLOP':>8} {'MB moved':>9}",
              f"{'fastres plan':<22} {t['launches']:>9} {t['flops_per_image'] / 1e9:>8.2f} "
              f"{t['bytes_per_image'] / 1e6:>9.2f}",
              f"{'torchvision eval':<22} {r['launches']:>9} {r['flops_per_image'] / 1e9:>8.2f} "
              f"{r['bytes_per_image'] / 1e6:>9.2f}",
              f"saving: {r['launches'] / t['launches']:.2f}x fewer launches, "
              f"{r['bytes_per_image'] / t['bytes_per_image']:.2f}x less traffic (modelled)"]
    if "roofline" in report:
        roof = report["roofline"]
        lines.append(f"roofline floor on {roof['gpu']} (modelled, not measured): {roof['total_seconds'] * 1e3:.3f} ms "
                     f"per batch, <= {roof['images_per_second_ceiling']:.0f} images/s; "
                     f"{roof['memory_bound_launches']} of {len(roof['launches'])} launches memory-bound")
    return "\n".join(lines)


def record_plan_launches(arch: str, batch: int, size: int = 224, dtype: str = "fp16", sm: int | None = None) -> list:
    """The KernelCalls a real Triton-path forward of ``arch`` launches, recorded on meta tensors,
    with tiles sized for the GPU of architecture ``sm`` (``kernels._target.TARGETS``; default H100)."""
    import contextlib

    from . import models
    from .kernels._launch import record_launches
    from .kernels._target import use_target

    torch_dtype = DTYPES[dtype]
    with torch.device("meta"):
        model = getattr(models, arch)()
    model = model.to(torch_dtype).eval()
    x = torch.empty(batch, 3, size, size, dtype=torch_dtype, device="meta",
                    memory_format=torch.channels_last)
    with record_launches() as calls, torch.no_grad(), (use_target(sm) if sm else contextlib.nullcontext()):
        model.plan().run(x, backend="triton")
    return calls
