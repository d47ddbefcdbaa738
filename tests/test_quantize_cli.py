"""The 8-bit commands: fastres quantize / verify --dtype int8 / inspect --dtype int8 / aot --dtype int8|fp8."""
import json

import pytest
import torch

import fastres
from fastres.cli import main
from fastres.quantize import QuantizedModel


@pytest.fixture(scope="module")
def export_and_images(tmp_path_factory):
    """A resnet18 export (non-default BN statistics, 48x48 preprocessing) and a directory of PNGs."""
    from torchvision.io import write_png

    from fastres.verify import randomize_norm_stats_
    tmp = tmp_path_factory.mktemp("q")
    torch.manual_seed(0)
    model = randomize_norm_stats_(fastres.resnet18(num_classes=10)).eval()
    path = fastres.export(model, tmp / "r18.safetensors", dtype=torch.float32,
                          preprocess={"resize": 56, "crop": 48, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]})
    images = tmp / "calib"
    (images / "sub").mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    for i in range(5):
        coarse = torch.rand(3, 4, 4, generator=gen)
        image = torch.nn.functional.interpolate(coarse[None], size=(60, 70), mode="bilinear")[0]
        write_png((image * 255).to(torch.uint8), str(images / ("sub" if i % 2 else "") / f"{i}.png"))
    (images / "broken.png").write_bytes(b"not a png")
    return path, images


def test_quantize_command_writes_a_loadable_model(export_and_images, tmp_path, capsys):
    path, images = export_and_images
    out = tmp_path / "q.safetensors"
    with pytest.warns(UserWarning, match="skipped .*broken.png"):
        assert main(["quantize", "--calib", str(images), "--out", str(out), "--weights", str(path), "--arch",
                     "resnet18", "--no-progress", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "output cosine" in text and "layer4.1.conv2" in text and "wrote" in text
    qmodel = fastres.load(out)
    assert isinstance(qmodel, QuantizedModel) and qmodel.dtype == "int8"
    model = fastres.load(path).float()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(qmodel(x).flatten(), model(x).flatten(), dim=0).item()
    assert cosine > 0.98


def test_quantize_command_refuses_below_min_cosine(export_and_images, tmp_path, capsys):
    path, images = export_and_images
    out = tmp_path / "q.safetensors"
    with pytest.warns(UserWarning):
        assert main(["quantize", "--calib", str(images), "--out", str(out), "--weights", str(path), "--arch",
                     "resnet18", "--no-progress", "--dtype", "fp8", "--min-cosine", "1.0", "--device", "cpu"]) == 1
    assert "worst steps" in capsys.readouterr().err and not out.exists()
    assert main(["quantize", "--calib", str(tmp_path / "none"), "--out", str(out), "--weights", str(path),
                 "--arch", "resnet18", "--no-progress", "--device", "cpu"]) == 2
    assert "no image files" in capsys.readouterr().err


def test_verify_int8(capsys):
    assert main(["verify", "--dtype", "int8", "--arch", "resnet18", "--size", "48", "--device", "cpu",
                 "--calib-batch", "4"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.split()[0] == "resnet18" and line.split()[-1] == "ok" and float(line.split()[2]) >= 0.99


def test_inspect_int8_bytes_per_image(capsys):
    assert main(["inspect", "--dtype", "int8", "--arch", "resnet50", "--batch", "256", "--json", "--gpu", "h100"]) == 0
    report = json.loads(capsys.readouterr().out)
    fp16 = fastres.plan_report.inspect_arch("resnet50", batch=256, dtype="fp16")
    assert report["dtype"] == "int8" and report["roofline"]["dtype"] == "int8"
    assert report["totals"]["bytes_per_image"] < 0.6 * fp16["totals"]["bytes_per_image"]
    assert report["totals"]["bytes_per_image"] <= 25e6       # issue goal: <= 25 MB (uint8 pixels into the stem)
    names = [" + ".join(row["ops"]) for row in report["kernels"]]
    # the pixel plan (what an engine runs on uint8 images): 45 launches, 7 of them fused 3x3 -> 1x1 pairs
    assert names[0].startswith("uint8 pixels - 128") and sum("requantize -> int8" in n for n in names) == 45 - 3


def test_aot_fp8_needs_sm89(capsys):
    assert main(["aot", "--dtype", "fp8", "--arch", "resnet18", "--batch", "1", "--sm", "80"]) == 2
    assert "sm_89" in capsys.readouterr().err


def test_aot_int8_resnet18(capsys):
    """sm_90 only here (test_conv2d_nhwc_8bit compiles the 8-bit kernels for sm_80 too)."""
    assert main(["aot", "--dtype", "int8", "--arch", "resnet18", "--batch", "1", "--sm", "90", "--loop-stats",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert not report["problems"]
    convs = [e for e in report["loop_stats"] if e["kernel"].startswith("conv2d_nhwc") and e["k_loops"]]
    assert convs and all(e["kernel"].endswith("/int8]") for e in convs)
    for e in convs:
        main_loop = max(e["k_loops"], key=lambda lp: lp["mma_count"])
        assert main_loop["mma"].startswith("IGMMA.") and ".S8" in main_loop["mma"], (e["kernel"], main_loop["mma"])
