"""Command-line usage errors and missing optional dependencies: clear messages, argparse's exit
status 2, and no long run that dies at the end."""
import json
import sys

import pytest

from fastres import benchmark as fb
from fastres.cli import main


@pytest.mark.parametrize("argv, match", [
    (["inspect", "--batch", "0"], "argument --batch: must be a positive integer (>= 1), got 0"),
    (["inspect", "--batch", "-8"], "argument --batch: must be a positive integer (>= 1), got -8"),
    (["inspect", "--size", "0"], "argument --size: must be a positive integer (>= 1), got 0"),
    (["inspect", "--size", "big"], "argument --size: expected a positive integer, got 'big'"),
    (["verify", "--batch", "0"], "argument --batch: must be a positive integer"),
    (["bench", "--size", "-1"], "argument --size: must be a positive integer"),
])
def test_non_positive_sizes_are_usage_errors(capsys, argv, match):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert match in err and "usage: fastres" in err


def test_bench_rejects_zero_batch(capsys):
    assert main(["bench", "--device", "cpu", "--batch", "4,0"]) == 2
    assert "--batch sizes must be >= 1" in capsys.readouterr().err


def test_bench_without_matplotlib_warns_first_and_writes_tables(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # `import matplotlib` raises ImportError
    assert not fb.can_plot()
    seen_before_run = []

    def fake_comparison(settings, device, progress=True):
        seen_before_run.append(capsys.readouterr().err)
        return [fb.Measurement("resnet18", impl, 1, 64, device, "float32", times=[0.5, 0.25])
                for impl in ("torchvision", "fastres")]

    monkeypatch.setattr(fb, "run_comparison", fake_comparison)
    out_dir = tmp_path / "report"
    assert main(["bench", "--quick", "--device", "cpu", "--out", str(out_dir), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert len(seen_before_run) == 1
    assert "matplotlib is not installed, so bench.png will be skipped" in seen_before_run[0]
    assert "pip install matplotlib" in seen_before_run[0]
    assert sorted(p.name for p in out_dir.iterdir()) == ["bench.json", "bench.md"]
    rows = json.loads((out_dir / "bench.json").read_text())
    assert [r["impl"] for r in rows] == ["torchvision", "fastres"]
    expected = fb.Measurement("resnet18", "fastres", 1, 64, "cpu", "float32", times=[0.5, 0.25])
    assert rows[1]["images_per_s"] == pytest.approx(expected.images_per_s)
    assert "| resnet18 | 1 | fastres |" in (out_dir / "bench.md").read_text()
    assert "bench.png skipped" in out and "bench.png," not in out
    with pytest.raises(ImportError, match="pip install matplotlib"):
        fb.plot(rows, str(out_dir / "bench.png"))
