"""The CPU table of the README (issue #13): the fastres eval module and Engine against ONNX Runtime,
OpenVINO, torch.compile and torchvision eager, fp32, resnet18 / resnet50 / resnext50_32x4d at batch
1, 8 and 32, in ONE run, implementations interleaved per cell (median of 5-15 calls each).

    pytest bench/test_cpu_vs_ort.py -s                         ~10 minutes on 2 cores (half of it torch.compile)
    FASTRES_BENCH_COMPETING=1 pytest bench/test_cpu_vs_ort.py -s    with one busy process on the same cores

(the same as ``fastres bench --device cpu``). The tables are printed and written to
bench-results/cpu/ (bench.md, bench.json). ONNX Runtime and OpenVINO come from the ``bench`` extra; the
test skips, saying what to install, without them.
"""
import os

import torch

from fastres import benchmark as fb

from conftest import QUICK, run_cpu_table

IMPLS = ("torchvision", "torchvision-compile", "fastres", "fastres-engine", "onnxruntime", "openvino")
COMPETING = int(os.environ.get("FASTRES_BENCH_COMPETING", "0") or 0)


def test_cpu_table(tmp_path):
    results = run_cpu_table(IMPLS, "the CPU table", competing=COMPETING)
    out = (str(tmp_path) if QUICK else
           os.path.join("bench-results", "cpu" + (f"-competing{COMPETING}" if COMPETING else "")))
    fb.write_report(results, out, png=fb.can_plot())
    print("\n" + fb.markdown(results))
    for m in results:
        if m.impl in fb.FASTRES_IMPLS:
            assert m.skipped is None, f"{m.impl} did not run: {m.skipped}"
            assert m.max_rel_error <= fb.TOLERANCE[torch.float32], (m.impl, m.arch, m.batch, m.max_rel_error)
