"""images/s of every implementation, one pytest-benchmark group per (arch, device, batch)."""
import pytest
import torch

from fastres import benchmark as fb

from conftest import DEVICES, QUICK, SETTINGS

CASES = [(device, arch, batch, impl) for device in DEVICES for arch in SETTINGS.archs
         for batch in SETTINGS.batches for impl in fb.IMPLEMENTATIONS]


def check_speed_goal(m: fb.Measurement) -> None:
    """fastres-engine must beat torchvision eager by CPU_SPEED_GOAL on CPU (full runs only)."""
    goal = fb.CPU_SPEED_GOAL
    if QUICK or m.impl != "fastres-engine" or m.device != "cpu" or SETTINGS.size != 224 or (
            m.arch, m.batch) != (goal["arch"], goal["batch"]):
        return
    if m.speedup is None:
        pytest.fail("the CPU speed goal needs torchvision eager measured in the same run "
                    "(do not deselect it)")
    assert m.speedup >= goal["speedup"], (
        f"fastres-engine is {m.speedup:.2f}x torchvision eager on {m.arch} fp32 batch {m.batch} "
        f"(CPU), below the goal of {goal['speedup']}x")


@pytest.mark.parametrize("device,arch,batch,impl", CASES,
                         ids=[f"{d}-{a}-b{b}-{i}" for d, a, b, i in CASES])
def test_throughput(benchmark, workloads, results, device, arch, batch, impl):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device: the GPU comparison (fp16, channels_last) runs on a GPU machine")
    try:
        runner, m = fb.prepare(workloads.get(arch, device), impl, batch)   # built and warmed up
    except fb.Skip as skip:
        pytest.skip(str(skip))
    benchmark.group = f"{arch} {device} {m.dtype} {SETTINGS.size}x{SETTINGS.size} batch {batch}"
    rounds = fb.rounds_for(m.times[0], SETTINGS)
    benchmark.pedantic(runner, rounds=rounds, iterations=1, warmup_rounds=0)
    if benchmark.stats is not None and benchmark.stats.stats.data:
        m.times = list(benchmark.stats.stats.data)
    else:   # --benchmark-disable: time the rounds here
        m.times = fb.measure(runner, rounds)
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
    check_speed_goal(m)
