"""INT8 on CPU (issue #15): fastres's int8 path (oneDNN's int8 convolution, bit for bit the integer
reference) against the fastres fp32 CPU path, ONNX Runtime fp32 and ONNX Runtime's static INT8
(QDQ, per-channel weights) of the same model, calibrated on the same images, resnet50 and resnet18 at
batch 1 and 8, 224x224, in ONE run, implementations interleaved per cell (median of 5-15 calls).

    pytest bench/test_cpu_int8.py -s          (the same as: fastres bench --device cpu --arch resnet50 resnet18
                                               --batch 1 8 --compare int8,ort,ort-int8)

Images/s, and for each 8-bit implementation the top-1 agreement and logits cosine against torchvision
fp32 over 64 held-out images. Printed and written to bench-results/cpu-int8/ (bench.md, bench.json).
ONNX Runtime comes from the ``bench`` extra; the test skips, saying what to install, without it.
"""
import os

from fastres import benchmark as fb

from conftest import QUICK, run_cpu_table

IMPLS = ("fastres", "fastres-int8", "onnxruntime", "onnxruntime-int8")


def test_cpu_int8_table(tmp_path):
    results = run_cpu_table(IMPLS, "the INT8 table", **({} if QUICK else dict(archs=("resnet50", "resnet18"),
                                                                               batches=(1, 8))))
    out = str(tmp_path) if QUICK else os.path.join("bench-results", "cpu-int8")
    fb.write_report(results, out, png=False)
    print("\n" + fb.markdown(results))
    for m in results:
        assert m.skipped is None, f"{m.impl} did not run: {m.skipped}"
        if m.impl in fb.EIGHT_BIT_IMPLS:
            assert m.cosine >= 0.9, (m.impl, m.arch, m.batch, m.cosine)
