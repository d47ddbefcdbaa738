"""Where a CPU forward spends its time: fastres's oneDNN program step by step against ONNX Runtime's
own profile (``SessionOptions.enable_profiling``) of the same model, block by block.

    python bench/profile_cpu.py                         resnet50, batch 1 and 8
    python bench/profile_cpu.py --arch resnet18 resnext50_32x4d --batch 1 8 32 --steps

Per block (stem, layer1.0, ..., head) it prints fastres's time (the program's steps, measured with a
clock read around each step: op calls, frees and the Python between them), the reference backend's
(F.conv2d per step), and ORT's kernel time of the nodes of that block (its fused Conv[+Add][+Relu]
nodes in NCHWc layout, plus its layout reorders), medians of --rounds runs, each implementation run
after a pause so spinning worker threads of the previous one are idle. It also prints the whole
forward's time of each (``model(x)`` for fastres: guard, dispatch and program), so the Python
overhead between steps is the difference. The findings are summarised in bench/README.md.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import tempfile
import time

import torch
import torchvision

import fastres
from fastres import backend
from fastres import benchmark as fb
from fastres.verify import image_batch, randomize_norm_stats_


def block_of(name: str) -> str:
    """fastres step names ("layer1.0.conv2+conv3", "conv1", "fc") and ORT node names
    ("/layer1/layer1.0/relu_1/Relu_output_0_nchwc_kernel_time") -> "layer1.0" / "stem" / "head"."""
    m = re.search(r"(layer\d+)[./](?:layer\d+\.)?(\d+)", name)
    if m:
        return f"{m.group(1)}.{m.group(2)}"
    if any(k in name for k in ("avgpool", "fc", "Gemm", "Flatten", "ReorderOutput")):
        return "head"
    return "stem"


def reference_steps(plan, x, rounds: int) -> dict:
    """{step name: median seconds} of the reference backend, step by step."""
    times = collections.defaultdict(list)
    inner = backend.get_backend("reference")

    class Timed:
        def layout(self, step, role, v):
            return inner.layout(step, role, v)

        def run(self, step, op, args, out):
            t = time.perf_counter()
            y = inner.run(step, op, args, out)
            times[step.name].append(time.perf_counter() - t)
            return y
    for _ in range(rounds):
        plan.run(x, Timed())
    return {k: statistics.median(v) for k, v in times.items()}


def ort_profile(workload, batch: int, rounds: int) -> tuple:
    """ORT's per-node kernel times ({node: median seconds}, {node: op}) and its median run time."""
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = workload.threads
    options.inter_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "ort")
    session = onnxruntime.InferenceSession(workload.onnx_bytes(), options,
                                           providers=["CPUExecutionProvider"])
    x = workload.input(batch).numpy()
    for _ in range(2):
        session.run(None, {"images": x})
    runs = []
    for _ in range(rounds):
        time.sleep(fb.CPU_PAUSE_S)
        t = time.perf_counter()
        session.run(None, {"images": x})
        runs.append(time.perf_counter() - t)
    events = json.load(open(session.end_profiling()))
    per, ops = collections.defaultdict(list), {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per[e["name"]].append(e["dur"] * 1e-6)
            ops[e["name"]] = e.get("args", {}).get("op_name", "?")
    return ({k: statistics.median(v[-rounds:]) for k, v in per.items()}, ops, statistics.median(runs))


def wall(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        time.sleep(fb.CPU_PAUSE_S)
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def profile(arch: str, batch: int, rounds: int, show_steps: bool) -> None:
    settings = fb.settings_for(False, device="cpu", archs=[arch], batches=[batch])
    workload = fb.Workload(arch, 224, "cpu", settings=settings)
    tv = workload.master
    model = fastres.from_torchvision(tv).eval()
    x = workload.input(batch)
    with torch.inference_mode():
        model(x)
        plan = model.plan()
        program = backend.get_backend("torch").program(plan, x.shape)
        program.profile(x, 1)
        steps = program.profile(x, rounds)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        reference = reference_steps(plan, x_cl, rounds)
        module_s = wall(lambda: model(x), rounds)
        tv_s = wall(lambda: tv(x), rounds)
    try:
        ort, ort_ops, ort_s = ort_profile(workload, batch, rounds)
    except ImportError:
        ort, ort_ops, ort_s = {}, {}, None
        print(f"(onnxruntime not installed: {fb.BENCH_INSTALL_HINT})")
    load = fb.load_average()
    print(f"\n## {arch}, batch {batch}, {torch.get_num_threads()} threads, {fb.device_name('cpu')}, "
          f"load {load:.2f}")
    print(f"whole forward: fastres module {module_s * 1e3:.1f} ms (program steps "
          f"{sum(t for _, _, t in steps) * 1e3:.1f} ms), torchvision {tv_s * 1e3:.1f} ms"
          + (f", ORT run {ort_s * 1e3:.1f} ms (kernels {sum(ort.values()) * 1e3:.1f} ms)" if ort_s else ""))
    blocks = collections.OrderedDict()
    for name, kind, t in steps:
        blocks.setdefault(block_of(name), [0.0, 0.0, 0.0])[0] += t
        blocks[block_of(name)][1] += reference.get(name, 0.0)
    reorders = 0.0
    for name, t in ort.items():
        if ort_ops.get(name) in ("ReorderInput",):
            reorders += t
        blocks.setdefault(block_of(name), [0.0, 0.0, 0.0])[2] += t
    print(f"{'block':<12} {'fastres ms':>10} {'reference':>10} {'ORT ms':>8} {'fastres/ORT':>11}")
    for block, (f, r, o) in blocks.items():
        ratio = f"{f / o:.2f}" if o else "-"
        print(f"{block:<12} {f * 1e3:10.2f} {r * 1e3:10.2f} {o * 1e3:8.2f} {ratio:>11}")
    kinds = collections.Counter()
    for name, kind, t in steps:
        kinds[kind] += t
    ort_kinds = collections.Counter()
    for name, t in ort.items():
        ort_kinds[ort_ops.get(name, "?")] += t
    print("fastres by step kind (ms): " + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in kinds.most_common()))
    if ort:
        print("ORT by op (ms): " + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in ort_kinds.most_common()))
    if show_steps:
        for name, kind, t in steps:
            print(f"  {name:<32} {kind:<10} {t * 1e3:8.3f} ms  (reference {reference.get(name, 0) * 1e3:8.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["resnet50"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", action="store_true", help="also every step of the program")
    args = parser.parse_args()
    for arch in args.arch:
        for batch in args.batch:
            profile(arch, batch, args.rounds, args.steps)


if __name__ == "__main__":
    main()
