"""pytest-benchmark comparisons of fastres with torchvision eager, torch.compile, ONNX Runtime,
OpenVINO and TensorRT (see fastres/benchmark.py for what is measured and how).

    pytest bench/                          full: GPU resnet50, resnet18, resnet101 at batch 1, 8, 64, 256;
                                           CPU resnet18, resnet50, resnext50_32x4d at batch 1, 8, 32; 224x224
    pytest bench/test_cpu_vs_ort.py -s     the README's CPU table alone: one interleaved run (~10 min on 2 cores)
    FASTRES_BENCH_QUICK=1 pytest bench/    quick: resnet18, batch 1 and 4, 64x64, 3 rounds (CI runs it)
    FASTRES_BENCH_DEVICE=cpu|cuda          only one device (default: both; cuda skips without a GPU)
    FASTRES_BENCH_COMPETING=1              the CPU table with one busy process competing for the cores

ONNX Runtime and OpenVINO run when installed (the ``bench`` extra: pip install -e '.[bench]'); their
cases skip with that hint otherwise. Each (arch, device, batch) is one pytest-benchmark group; the
speedups over torchvision eager and the ratios to ONNX Runtime are printed at the end of the run, with
the machine, the threads and the load average.
"""
import os

import pytest

from fastres import benchmark

QUICK = os.environ.get("FASTRES_BENCH_QUICK", "0") not in ("", "0")
DEVICES = tuple(d for d in os.environ.get("FASTRES_BENCH_DEVICE", "cpu,cuda").split(",") if d)
SETTINGS_FOR = {device: benchmark.settings_for(QUICK, device=device) for device in ("cpu", "cuda")}
SETTINGS = SETTINGS_FOR["cuda"]     # (the image size and quick flag are the same for both)

_results: dict = {}


class Workloads:
    """One architecture's models at a time (the cases run arch by arch), freed when the next starts."""

    def __init__(self):
        self._current = None

    def get(self, arch: str, device: str) -> benchmark.Workload:
        w = self._current
        if w is None or (w.arch, w.device) != (arch, device):
            self._current = None
            self._current = benchmark.Workload(arch, SETTINGS.size, device, settings=SETTINGS_FOR[device])
        return self._current


def run_cpu_table(impls: tuple, what: str, **overrides) -> list:
    """One interleaved CPU run of ``impls`` (``benchmark.run_comparison``), or a skip saying what is
    not installed; ``overrides``: ``settings_for``'s fields."""
    if "cpu" not in DEVICES:
        pytest.skip("FASTRES_BENCH_DEVICE excludes cpu")
    missing = benchmark.missing_extras(impls)
    if missing:
        packages = ", ".join(p for ps in missing.values() for p in ps)
        pytest.skip(f"{what} compares with {', '.join(missing)}: {packages} not installed; "
                    f"{benchmark.BENCH_INSTALL_HINT}")
    settings = benchmark.settings_for(QUICK, device="cpu", impls=impls, **overrides)
    return benchmark.run_comparison(settings, "cpu", progress=False)


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
    benchmark.add_speedups(measured)
    tr = terminalreporter
    tr.section(f"fastres speedup over torchvision eager{' (quick mode)' if QUICK else ''}")
    for device in dict.fromkeys(m.device for m in measured):
        tr.write_line(benchmark.machine_line([m for m in measured if m.device == device])
                      + " (pytest-benchmark: implementations one after another, not interleaved)")
    tr.write_line(f"{'device':<6} {'dtype':<8} {'arch':<16} {'batch':>5} {'implementation':<20} "
                  f"{'images/s':>10} {'speedup':>8} {'x ORT':>6} {'max rel err':>11}")
    for m in measured:
        speedup = f"{m.speedup:.2f}x" if m.speedup else "-"
        vs_ort = f"{m.vs_reference:.2f}" if m.vs_reference else "-"
        tr.write_line(f"{m.device:<6} {m.dtype:<8} {m.arch:<16} {m.batch:>5} {m.impl:<20} "
                      f"{m.images_per_s:>10.1f} {speedup:>8} {vs_ort:>6} {m.max_rel_error:>11.1e}")
    tr.write_line("")
    for line in benchmark.ratio_table(measured).splitlines():
        tr.write_line(line)
