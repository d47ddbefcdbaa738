"""The CPU comparison's bookkeeping without timing anything real: --compare parsing, the bench extra
checked before any work, interleaving, the ratio table, the competing load, the speed line."""
import json
import os
import time

import pytest

from fastres import benchmark as fb
from fastres.cli import main


def test_parse_compare():
    assert fb.parse_compare("ort,openvino,compile,torchvision") == (
        "torchvision", "torchvision-compile", "fastres", "fastres-engine", "onnxruntime", "openvino")
    assert fb.parse_compare("ort") == ("fastres", "fastres-engine", "onnxruntime")
    assert fb.parse_compare("all") == fb.IMPLEMENTATIONS
    with pytest.raises(ValueError, match="unknown implementation 'tflite'"):
        fb.parse_compare("ort,tflite")


def test_compare_refuses_a_missing_extra_before_any_work(monkeypatch, capsys):
    def never(*args, **kwargs):
        raise AssertionError("the comparison must not start")
    monkeypatch.setattr(fb, "run_comparison", never)
    monkeypatch.setattr(fb, "missing_extras", lambda impls: {"openvino": ["openvino"]}
                        if "openvino" in impls else {})
    assert main(["bench", "--device", "cpu", "--compare", "ort,openvino"]) == 2
    err = capsys.readouterr().err
    assert "--compare openvino needs openvino, not installed" in err and "pip install" in err
    assert main(["bench", "--device", "cpu", "--compare", "nope"]) == 2
    assert "unknown implementation 'nope'" in capsys.readouterr().err


def test_default_comparison_names_what_it_skips(monkeypatch, capsys, tmp_path):
    seen = []

    def fake(settings, device, progress=True):
        seen.append((settings.archs, settings.batches, settings.impls, settings.competing, device))
        return [fb.Measurement("resnet18", impl, 1, 224, device, "float32", times=[0.1, 0.2])
                for impl in ("torchvision", "fastres", "fastres-engine", "onnxruntime")]
    monkeypatch.setattr(fb, "run_comparison", fake)
    monkeypatch.setattr(fb, "missing_extras", lambda impls: {"openvino": ["openvino"]})
    assert main(["bench", "--device", "cpu", "--arch", "resnet18", "resnet50", "--batch", "1", "8,32",
                 "--competing", "1", "--out", str(tmp_path), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "openvino will be skipped (openvino not installed; pip install" in captured.err
    assert seen == [(("resnet18", "resnet50"), (1, 8, 32), None, 1, "cpu")]
    assert "**resnet18** images/s (x ORT in the same run)" in captured.out
    rows = json.loads((tmp_path / "bench.json").read_text())
    assert {r["impl"] for r in rows} == {"torchvision", "fastres", "fastres-engine", "onnxruntime"}


def test_cpu_defaults_are_the_goal_table():
    s = fb.settings_for(False, device="cpu")
    assert s.archs == ("resnet18", "resnet50", "resnext50_32x4d") and s.batches == (1, 8, 32)
    assert s.min_rounds >= 5
    assert fb.settings_for(False, device="cuda").batches == (1, 8, 64, 256)
    assert fb.settings_for(False, device="cpu", rounds=3).max_rounds == 3


def test_interleaving_rotates_and_pauses():
    order = []
    runners = {name: (lambda name=name: order.append(name)) for name in "abc"}
    start = time.perf_counter()
    times = fb.measure_interleaved(runners, 3, pause_s=0.01)
    assert time.perf_counter() - start >= 9 * 0.01
    assert order == list("abc" "bca" "cab")
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}


def test_ratio_table_and_machine_line():
    def m(impl, batch, seconds):
        return fb.Measurement("resnet50", impl, batch, 224, "cpu", "float32", "AMD EPYC (2 CPUs)",
                              times=[seconds] * 3, threads=2, load=(0.5, 0.75), competing=1)
    results = [m("torchvision", 1, 0.1), m("onnxruntime", 1, 0.05), m("fastres", 1, 0.04),
               m("onnxruntime", 8, 0.4), m("fastres", 8, 0.5)]
    fb.add_speedups(results)
    assert results[2].vs_reference == pytest.approx(1.25) and results[4].vs_reference == pytest.approx(0.8)
    table = fb.ratio_table(results)
    assert "| | batch 1 | batch 8 |" in table
    assert "| fastres | 25.0 (1.25x) | 16.0 (0.80x) |" in table
    assert "| onnxruntime | 20.0 | 20.0 |" in table
    line = fb.machine_line(results)
    assert "2 intra-op threads" in line and "load average 0.50-0.75" in line and "1 competing" in line
    assert "vs ONNX Runtime" in fb.markdown(results)


def test_competing_load_starts_and_stops_busy_processes():
    with fb.competing_load(2) as pids:
        assert len(pids) == 2
        for pid in pids:
            os.kill(pid, 0)                        # running
    for pid in pids:                               # killed and reaped
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with fb.competing_load(0) as pids:
        assert pids == []


def test_speed_line_names_what_is_missing(monkeypatch):
    class FakeWorkload:
        dtype = __import__("torch").float32

        def __init__(self, *args, **kwargs):
            pass

        def runner(self, impl, batch):
            if impl == "onnxruntime":
                raise fb.Skip("onnxruntime needs onnxruntime, onnx, not installed: pip install ...")
            return lambda: time.sleep({"torchvision": 0.004, "fastres": 0.002}.get(impl, 0.001))
    monkeypatch.setattr(fb, "Workload", FakeWorkload)
    monkeypatch.setattr(fb, "device_name", lambda device: "fake CPU")
    line = fb.speed_line("cpu", rounds=3)
    assert line.startswith("speed, resnet50 float32 224x224 batch 1 (fake CPU, ")
    assert "torchvision " in line and "fastres module " in line and "fastres Engine " in line
    assert "x torchvision)" in line and "ONNX Runtime skipped" in line
