"""What the drop-in module adds to every forward before any kernel runs: the plan guard and the
dispatch (input checks, fallback conditions, backend choice), for resnet50 on CPU.

The goal (issue: "never diverges"): under 20 us per forward. Measured as the median of many calls,
interleaved with the Python guard for comparison; the plan's own work is replaced by a no-op so
only the overhead is timed. Machine, threads and load are printed with the figures.
"""
import os
import statistics
import time

import pytest
import torch

import fastres
from fastres.guard import native_guard_available

from conftest import QUICK

GOAL_US = 20.0


def _median_us(fn, calls: int, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(samples)


@pytest.fixture(scope="module")
def served():
    with torch.device("meta"):
        model = fastres.resnet50()
    model = model.to_empty(device="cpu").eval()
    x = torch.randn(1, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    state = model._fastres.state(model)
    state.plan.run = lambda x, backend, buffers=None: x     # time the overhead alone
    return model, x, state


def test_per_forward_overhead(served):
    if not native_guard_available():
        pytest.skip("fastres._guard is not built: the Python guard is far slower than the goal")
    model, x, state = served
    with torch.inference_mode():
        model(x)
        rows = {}
        for _ in range(3):    # interleaved
            rows.setdefault("guard (C++)", []).append(_median_us(state.guard.check, 2000, 5))
            rows.setdefault("guard (Python)", []).append(_median_us(state.guard.check_python, 20, 5))
            rows.setdefault("whole dispatch", []).append(_median_us(lambda: model(x), 2000, 5))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nper-forward overhead, resnet50 ({len(list(model.modules()))} modules, "
          f"{sum(1 for _ in model.parameters())} parameters), torch threads {torch.get_num_threads()}, "
          f"load average {load:.2f}:")
    for name, values in rows.items():
        print(f"  {name:<16} {min(values):9.1f} us (best of 3 medians)")
    if not QUICK:     # the quick run (CI, a loaded machine) reports; the full run holds the goal
        assert min(rows["whole dispatch"]) < GOAL_US, f"per-forward overhead above {GOAL_US} us"
