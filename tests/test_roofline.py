"""fastres.roofline: the modelled floor per launch, against hand-computed datasheet arithmetic."""
import json

import pytest

from fastres import roofline
from fastres.cli import main


def test_floor_is_the_larger_of_compute_and_traffic():
    # an 8192^3 fp16 GEMM on H100: 2 * 8192^3 FLOP / 989.4e12 FLOP/s = 1.1113 ms (compute-bound)
    flops, nbytes = 2 * 8192**3, 3 * 8192 * 8192 * 2
    assert roofline.floor_seconds(flops, nbytes, "h100", "fp16") == pytest.approx(2 * 8192**3 / 989.4e12)
    assert roofline.bound(flops, nbytes, "h100", "fp16") == "compute"
    # a copy of 1 GB on A100: 1e9 / 2.039e12 s = 0.4904 ms (memory-bound)
    assert roofline.floor_seconds(1e6, 1e9, "a100", "fp16") == pytest.approx(1e9 / 2.039e12)
    assert roofline.bound(1e6, 1e9, "a100", "fp16") == "memory"
    # H200: same compute as H100, more bandwidth; fp32 runs on the FMA units; int8 twice fp16
    assert roofline.floor_seconds(1e6, 1e9, "h200", "fp16") < roofline.floor_seconds(1e6, 1e9, "h100", "fp16")
    assert roofline.floor_seconds(1e15, 0, "h100", "fp32") == pytest.approx(1e15 / 66.9e12)
    assert roofline.floor_seconds(1e15, 0, "a100", "int8") == pytest.approx(1e15 / 624e12)
    with pytest.raises(ValueError, match="unknown gpu"):
        roofline.floor_seconds(1, 1, "v100", "fp16")


def test_inspect_gpu_reports_the_modelled_floor(capsys):
    assert main(["inspect", "--arch", "resnet50", "--batch", "256", "--gpu", "h100", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    roof = report["roofline"]
    assert roof["modelled"] and roof["gpu"] == "H100 SXM5" and len(roof["launches"]) == len(report["kernels"])
    # the total is the sum of the per-launch floors, each from the row's own FLOPs and bytes
    expected = sum(max(k["flops"] / 989.4e12, k["bytes"] / 3.35e12) for k in report["kernels"])
    assert roof["total_seconds"] == pytest.approx(expected)
    assert roof["images_per_second_ceiling"] == pytest.approx(256 / expected)
    assert 0 < roof["memory_bound_launches"] < len(roof["launches"])
    assert main(["inspect", "--gpu", "a100"]) == 0
    assert "modelled, not measured" in capsys.readouterr().out
