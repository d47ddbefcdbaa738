"""The fastres command line: verify, export, inspect, aot."""
import json

import pytest
import torch
import torchvision

import fastres
from fastres.cli import main
from fastres.plan_report import inspect_arch, record_plan_launches


def test_verify_reports_each_architecture(capsys):
    with fastres.use_backend("torch"):
        assert main(["verify", "--arch", "resnet18,resnext50_32x4d", "--size", "32",
                     "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert set(lines) == {"resnet18", "resnext50_32x4d"}
    for line in lines.values():
        assert line.split()[-1] == "ok" and "100%" in line
        assert float(line.split()[2]) <= 1e-4


def test_export_command(tmp_path, capsys):
    torch.manual_seed(0)
    ckpt = tmp_path / "tv.pth"
    torch.save(torchvision.models.resnet18(num_classes=4).state_dict(), ckpt)
    out = tmp_path / "r18.safetensors"
    assert main(["export", str(out), "--arch", "resnet18", "--weights", str(ckpt),
                 "--dtype", "fp32"]) == 0
    assert "wrote" in capsys.readouterr().out
    model = fastres.load(out)
    assert model.fc.out_features == 4 and model.conv1.weight.dtype == torch.float32
    assert main(["export", str(out), "--arch", "resnet7"]) == 2


def test_inspect_json_schema_and_totals(capsys):
    assert main(["inspect", "--arch", "resnet18", "--batch", "8", "--size", "64", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"arch", "batch", "size", "dtype", "kernels", "totals", "reference"} <= set(report)
    assert report["arch"] == "resnet18" and report["batch"] == 8 and report["dtype"] == "fp16"
    for row in report["kernels"]:
        assert set(row) == {"name", "ops", "shape", "flops", "bytes"}
        assert set(row["shape"]) == {"M", "N", "K"}
    totals = report["totals"]
    assert totals["launches"] == len(report["kernels"])
    assert totals["launches"] == len(record_plan_launches("resnet18", 8, 64, "fp16"))
    assert report["reference"]["launches"] > totals["launches"]
    # FLOPs do not depend on fusion (up to BN/ReLU/add elementwise work)
    assert totals["flops_per_image"] == pytest.approx(report["reference"]["flops_per_image"], rel=0.02)
    main(["inspect", "--arch", "resnet18", "--batch", "8", "--size", "64"])
    assert "unfused PyTorch eval" in capsys.readouterr().out


def test_inspect_reference_counts_torchvision_eval():
    """The unfused reference is torchvision's eval forward as separate kernels (issue figures:
    ~174 launches and ~162 MB per image for resnet50 fp16 at 224x224, batch 256)."""
    ref = inspect_arch("resnet50", batch=256, size=224, dtype="fp16")["reference"]
    assert ref["launches"] == 174
    assert ref["bytes_per_image"] == pytest.approx(162e6, rel=0.01)


def test_aot_command(capsys):
    assert main(["aot", "--arch", "resnet18", "--batch", "1", "--sm", "80,90"]) == 0
    out = capsys.readouterr().out
    assert "conv2d_nhwc" in out and "avgpool_linear" in out and "FAIL" not in out


def test_aot_loop_stats_json(capsys):
    import json
    # same configurations as test_aot_command: compiled once per process (fastres.aot caches results)
    assert main(["aot", "--arch", "resnet18", "--batch", "1", "--sm", "80,90", "--loop-stats", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert not report["problems"]
    loops = report["loop_stats"]
    assert {e["sm"] for e in loops} == {80, 90}
    convs = [e for e in loops if e["kernel"].startswith("conv2d_nhwc") and e["k_loops"]]
    assert convs and all(e["k_loops"][0]["mma"].startswith("HGMMA" if e["sm"] == 90 else "HMMA") for e in convs)
    assert all(u["waves"] > 0 for e in loops for u in e["uses"])
