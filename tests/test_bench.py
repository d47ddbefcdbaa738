"""The benchmark suite cannot rot: `fastres bench --quick` writes its three reports, and the
pytest-benchmark suite runs in quick mode (FASTRES_BENCH_QUICK=1) in a subprocess, as CI would."""
import json
import os
import subprocess
import sys

import pytest
import torch

from fastres import benchmark as fb
from fastres import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_fastres_bench_quick_writes_reports(tmp_path, capsys):
    out = tmp_path / "report"
    assert cli.main(["bench", "--quick", "--device", "cpu", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| resnet18 | 1 | fastres-engine |" in printed and "bench.png" in printed

    rows = json.loads((out / "bench.json").read_text())
    quick = fb.settings_for(True)
    assert [(r["impl"], r["batch"]) for r in rows] == [
        (impl, batch) for batch in quick.batches for impl in fb.DEFAULT_IMPLS]
    for r in rows:
        assert {"impl", "batch", "images_per_s", "device", "dtype"} <= set(r)
        assert r["device"] == "cpu" and r["dtype"] == "float32"
        if r["impl"] in ("torchvision", "fastres", "fastres-engine"):
            assert r["images_per_s"] > 0 and r["skipped"] is None
            assert r["max_rel_error"] <= fb.TOLERANCE[torch.float32]
        if r["impl"] == "torch-tensorrt":
            assert r["images_per_s"] is None and "GPU only" in r["skipped"]
    assert rows[0]["speedup"] == pytest.approx(1.0)

    table = (out / "bench.md").read_text()
    assert "| arch | batch | implementation | images/s |" in table
    assert table.count("| resnet18 |") == len(rows)

    import matplotlib.image
    picture = matplotlib.image.imread(out / "bench.png")
    assert picture.ndim == 3 and picture.shape[0] > 100 and picture.shape[1] > 100
    assert picture.std() > 0   # not a blank canvas


def test_pytest_bench_quick_runs():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(FASTRES_BENCH_QUICK="1", FASTRES_BENCH_DEVICE="cpu,cuda")
    proc = subprocess.run([sys.executable, "-m", "pytest", "bench/", "-q", "-p", "no:cacheprovider",
                           "--benchmark-disable-gc", "-rs"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "fastres speedup over torchvision eager (quick mode)" in output
    assert "resnet18 cpu float32 64x64 batch 1" in output       # a pytest-benchmark group
    if not torch.cuda.is_available():
        assert "no CUDA device" in output                       # GPU cases skipped with a reason


def test_speedups_and_rounds():
    def m(impl, batch, seconds):
        return fb.Measurement("resnet50", impl, batch, 224, "cpu", "float32", times=[seconds] * 3)

    results = [m("torchvision", 8, 0.4), m("fastres-engine", 8, 0.2), m("fastres", 1, 0.1),
               fb.Measurement("resnet50", "onnxruntime", 8, 224, "cpu", "float32", skipped="not installed")]
    fb.add_speedups(results)
    assert results[0].speedup == pytest.approx(1.0) and results[1].speedup == pytest.approx(2.0)
    assert results[2].speedup is None and results[3].speedup is None   # no baseline / skipped
    assert results[1].images_per_s == pytest.approx(40.0)
    assert "skipped: not installed" in fb.markdown(results)
    settings = fb.Settings(min_rounds=3, max_rounds=10, target_seconds=2.0)
    assert fb.rounds_for(0.01, settings) == 10 and fb.rounds_for(5.0, settings) == 3
    assert fb.rounds_for(0.5, settings) == 4
