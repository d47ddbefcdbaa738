"""pytest-benchmark comparisons of fastres with torchvision eager, torch.compile, ONNX Runtime and
TensorRT (see fastres/benchmark.py for what is measured and how).

    pytest bench/                          full: resnet50, resnet18, resnet101 at batch 1, 8, 64, 256, 224x224
    FASTRES_BENCH_QUICK=1 pytest bench/    quick: resnet18, batch 1 and 4, 64x64, 3 rounds (CI runs it)
    FASTRES_BENCH_DEVICE=cpu|cuda          only one device (default: both; cuda skips without a GPU)

Each (arch, device, batch) is one pytest-benchmark group; the speedups over torchvision eager are
printed at the end of the run.
"""
import os

import pytest

from fastres import benchmark

QUICK = os.environ.get("FASTRES_BENCH_QUICK", "0") not in ("", "0")
SETTINGS = benchmark.settings_for(QUICK)
DEVICES = tuple(d for d in os.environ.get("FASTRES_BENCH_DEVICE", "cpu,cuda").split(",") if d)

_results: dict = {}


class Workloads:
    """One architecture's models at a time (the cases run arch by arch), freed when the next starts."""

    def __init__(self):
        self._current = None

    def get(self, arch: str, device: str) -> benchmark.Workload:
        w = self._current
        if w is None or (w.arch, w.device) != (arch, device):
            self._current = None
            self._current = benchmark.Workload(arch, SETTINGS.size, device, settings=SETTINGS)
        return self._current


@pytest.fixture(scope="session")
def workloads():
    return Workloads()


@pytest.fixture(scope="session")
def results():
    """Measurements of this run by (device, arch, batch, impl), for speedups and the summary."""
    return _results


def pytest_terminal_summary(terminalreporter):
    measured = [m for m in _results.values() if m.times]
    if not measured:
        return
    tr = terminalreporter
    tr.section(f"fastres speedup over torchvision eager{' (quick mode)' if QUICK else ''}")
    tr.write_line(f"{'device':<6} {'dtype':<8} {'arch':<10} {'batch':>5} {'implementation':<20} "
                  f"{'images/s':>10} {'speedup':>8} {'max rel err':>11}")
    for m in measured:
        speedup = f"{m.speedup:.2f}x" if m.speedup else "-"
        tr.write_line(f"{m.device:<6} {m.dtype:<8} {m.arch:<10} {m.batch:>5} {m.impl:<20} "
                      f"{m.images_per_s:>10.1f} {speedup:>8} {m.max_rel_error:>11.1e}")
