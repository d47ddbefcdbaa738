"""images/s of every implementation, one pytest-benchmark group per (arch, device, batch)."""
import os

import pytest
import torch

from fastres import benchmark as fb

from conftest import DEVICES, QUICK, SETTINGS_FOR

CASES = [(device, arch, batch, impl) for device in DEVICES for arch in SETTINGS_FOR[device].archs
         for batch in SETTINGS_FOR[device].batches for impl in fb.DEFAULT_IMPLS]
STRICT = os.environ.get("FASTRES_BENCH_STRICT", "0") not in ("", "0")


def check_speed_goal(m: fb.Measurement, results: dict) -> None:
    """The CPU goal (issue #13): the fastres module and Engine at least as fast as ONNX Runtime.
    Printed on every full run; asserted only with FASTRES_BENCH_STRICT=1 (this suite times the
    implementations one after another, so a load change between them moves the ratio: the
    interleaved bench/test_cpu_vs_ort.py is the measurement of record)."""
    if QUICK or m.impl not in fb.FASTRES_IMPLS or m.device != "cpu":
        return
    ort = results.get((m.device, m.arch, m.batch, fb.REFERENCE_RUNTIME))
    if ort is None or not ort.images_per_s:
        return
    ratio = m.images_per_s / ort.images_per_s
    print(f"{m.impl} is {ratio:.2f}x ONNX Runtime on {m.arch} fp32 batch {m.batch} (CPU goal: >= 1.0)")
    if STRICT:
        assert ratio >= 1.0, f"{m.impl} is {ratio:.2f}x ONNX Runtime on {m.arch} batch {m.batch}"


@pytest.mark.parametrize("device,arch,batch,impl", CASES,
                         ids=[f"{d}-{a}-b{b}-{i}" for d, a, b, i in CASES])
def test_throughput(benchmark, workloads, results, device, arch, batch, impl):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device: the GPU comparison (fp16, channels_last) runs on a GPU machine")
    settings = SETTINGS_FOR[device]
    try:
        runner, m = fb.prepare(workloads.get(arch, device), impl, batch)   # built and warmed up
    except fb.Skip as skip:
        pytest.skip(str(skip))
    benchmark.group = f"{arch} {device} {m.dtype} {settings.size}x{settings.size} batch {batch}"
    rounds = fb.rounds_for(m.times[0], settings)
    load_start = fb.load_average()
    benchmark.pedantic(runner, rounds=rounds, iterations=1, warmup_rounds=0)
    if benchmark.stats is not None and benchmark.stats.stats.data:
        m.times = list(benchmark.stats.stats.data)
    else:   # --benchmark-disable: time the rounds here
        m.times = fb.measure(runner, rounds)
    m.load = (load_start, fb.load_average())
    base = results.get((device, arch, batch, fb.BASELINE))
    if base is not None and base.images_per_s:
        m.speedup = m.images_per_s / base.images_per_s
    results[(device, arch, batch, impl)] = m
    benchmark.extra_info.update({k: v for k, v in m.row().items() if v is not None})
    benchmark.extra_info["versions"] = fb.versions()
    print(f"\n{arch} {device} {m.dtype} batch {batch}: {impl} {m.images_per_s:.1f} images/s"
          + (f", {m.speedup:.2f}x torchvision eager" if m.speedup else ""))
    if impl in fb.FASTRES_IMPLS:
        tolerance = fb.TOLERANCE[getattr(torch, m.dtype)]
        assert m.max_rel_error <= tolerance, (
            f"{impl} logits differ from torchvision fp32 by {m.max_rel_error:.2e} (relative), "
            f"above {tolerance:.0e}")
    check_speed_goal(m, results)
