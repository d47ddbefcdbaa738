"""make gpu-check DRY_RUN=1: prints the plan, checks the imports, runs nothing (what CI runs)."""
import io
import subprocess

import torch

from fastres import gpu_check


def test_dry_run_prints_the_plan_and_runs_nothing(monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise AssertionError(f"dry run started a process: {args}")
    monkeypatch.setattr(subprocess, "run", refuse)
    out = io.StringIO()
    assert gpu_check.dry_run(str(tmp_path / "gpu-report"), 480, file=out) == 0
    text = out.getvalue()
    for name in ("kernel-tests", "model-tests", "engine-graphs", "autotune", "bench"):
        assert name in text
    assert "all required modules import" in text and "MISSING" not in text
    assert "FASTRES_AUTOTUNE=1" in text and "cudnn.benchmark" in text and "--dtype bf16" in text
    assert not (tmp_path / "gpu-report").exists()


def test_plan_fits_the_budget_and_covers_the_bench():
    steps = gpu_check.plan("gpu-report", 480)
    assert abs(sum(step.share for step in steps) - 1.0) < 1e-9       # timeouts add up to the budget
    bench = next(step for step in steps if step.name == "bench")
    assert gpu_check.BENCH_BATCHES == (1, 8, 64, 256) and "--step" in bench.command
    autotune = next(step for step in steps if step.name == "autotune")
    assert autotune.env["FASTRES_AUTOTUNE_CACHE"].startswith("gpu-report")


def test_missing_module_fails_the_dry_run(monkeypatch):
    monkeypatch.setattr(gpu_check, "REQUIRED_MODULES", ("fastres", "no_such_module_for_gpu_check"))
    out = io.StringIO()
    assert gpu_check.dry_run("gpu-report", 480, file=out) == 1
    assert "MISSING no_such_module_for_gpu_check" in out.getvalue()


def test_without_a_gpu_it_says_so(capsys):
    if torch.cuda.is_available():
        return
    assert gpu_check.main(["--out", "unused"]) == 2
    assert "DRY_RUN=1" in capsys.readouterr().err


def test_make_target_dry_run():
    makefile = open("Makefile").read()
    assert "gpu-check:" in makefile and "--dry-run" in makefile


def test_bench_step_labels_cudnn_and_skips_compile_over_budget(monkeypatch, tmp_path):
    """The bench step's bookkeeping with the measurements faked (no GPU): every batch gets torchvision,
    fastres, the Engine, a cudnn.benchmark row timed with the flag on, and torch.compile skipped
    with a reason when the budget is short."""
    from fastres import benchmark as b
    flags = []

    class FakeWorkload:
        def __init__(self, *args, **kwargs):
            pass

    def fake_prepare(workload, impl, batch):
        flags.append((impl, torch.backends.cudnn.benchmark))
        m = b.Measurement("resnet50", impl, batch, 224, "cuda", "float16", "fake GPU")
        m.times = [0.01]
        return (lambda: None), m

    monkeypatch.setattr(b, "Workload", FakeWorkload)
    monkeypatch.setattr(b, "prepare", fake_prepare)
    monkeypatch.setattr(b, "measure", lambda runner, rounds: [0.01 * (1 + (rounds % 2))] * 3)
    monkeypatch.setattr(b, "device_name", lambda device: "fake GPU")
    monkeypatch.setattr(b, "plot", lambda results, path: open(path, "wb").close())
    assert gpu_check._bench_step(str(tmp_path), seconds=0.0) == 0
    rows = __import__("json").load(open(tmp_path / "bench.json"))
    impls = {(r["batch"], r["impl"]) for r in rows}
    for batch in gpu_check.BENCH_BATCHES:
        for impl in ("torchvision", "fastres", "fastres-engine", "torchvision-cudnn-benchmark", "torchvision-compile"):
            assert (batch, impl) in impls
    assert all(r["skipped"] and "budget" in r["skipped"] for r in rows if r["impl"] == "torchvision-compile")
    assert ("torchvision", True) in flags and ("torchvision", False) in flags and ("fastres", False) in flags
    assert not torch.backends.cudnn.benchmark      # restored
