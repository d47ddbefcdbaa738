"""``make gpu-check``: everything worth running the day a CUDA GPU is at hand, in one command.

Within a time budget (default 8 minutes) it writes ``gpu-report/`` (``report.md``, ``report.json``,
``bench.png``, ``autotune.json`` and one log per step):

1. kernel tests on CUDA tensors (the per-kernel pytest modules; on a GPU they run the compiled
   kernels, not the interpreter);
2. whole-model tests on CUDA tensors and ``fastres verify`` in fp16, bf16 and fp32 against
   torchvision;
3. the Engine with CUDA graphs at every bucket, against the eval model;
4. ``FASTRES_AUTOTUNE=1`` once (resnet50, batch 64), its cache of choices saved into the report;
5. ``fastres bench``-style images/s of resnet50 at batch 1, 8, 64, 256: fastres and the Engine
   against torchvision eager fp16 channels_last, the same with ``torch.backends.cudnn.benchmark``,
   and torchvision + ``torch.compile`` when the remaining budget allows it (else skipped, with the
   reason in the table); then prints the images/s table and the speedups.

Every step runs as a subprocess with its share of the budget as a timeout, so one hung step cannot
eat the others'. ``--dry-run`` (``make gpu-check DRY_RUN=1``, what CI runs) prints the plan and
checks that everything the steps need imports, without a GPU and without running anything.
Numbers in the report are measured on the GPU it ran on; nothing here models or estimates speed.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

BENCH_BATCHES = (1, 8, 64, 256)
ENGINE_BUCKETS = (1, 8, 32, 128, 256)
DEFAULT_BUDGET_S = 480
# Modules each step imports (checked by --dry-run).
REQUIRED_MODULES = ("torch", "torchvision", "triton", "pytest", "matplotlib", "tqdm", "fastres", "fastres.kernels",
                    "fastres.kernels.conv2d_nhwc", "fastres.kernels.conv3x3_conv1x1_nhwc",
                    "fastres.kernels.max_pool2d_nhwc", "fastres.kernels.avgpool_linear", "fastres.engine",
                    "fastres.benchmark", "fastres.verify", "fastres.extension")


@dataclass
class Step:
    name: str
    what: str
    command: list          # argv of the subprocess
    share: float           # fraction of the budget (its timeout)
    env: dict = field(default_factory=dict)


@dataclass
class StepResult:
    name: str
    status: str            # "passed", "failed", "timeout"
    seconds: float
    returncode: int | None
    log: str


def plan(out_dir: str, budget_s: float = DEFAULT_BUDGET_S) -> list[Step]:
    py = sys.executable
    kernel_tests = ["tests/test_conv2d_nhwc.py", "tests/test_conv3x3_conv1x1_nhwc.py", "tests/test_pool_head.py",
                    "tests/test_extension.py", "tests/test_conv2d_nhwc_8bit.py"]
    model_tests = ["tests/test_triton_models.py", "tests/test_fused_blocks.py", "tests/test_engine.py"]
    verify = " && ".join(f"{py} -m fastres.cli verify --device cuda --dtype {dtype} --arch resnet50,resnet18"
                         for dtype in ("fp16", "bf16", "fp32", "int8"))
    return [
        Step("kernel-tests", "per-kernel tests on CUDA tensors (compiled kernels)",
             [py, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *kernel_tests], 0.25),
        Step("model-tests", "whole-model and engine tests on CUDA tensors; fastres verify fp16/bf16/fp32",
             ["bash", "-c", f"{py} -m pytest -q -x -p no:cacheprovider {' '.join(model_tests)} && {verify}"], 0.2),
        Step("engine-graphs", f"Engine with CUDA graphs at buckets {ENGINE_BUCKETS} against the eval model",
             [py, "-m", "fastres.gpu_check", "--step", "engine", "--out", out_dir], 0.1),
        Step("autotune", "FASTRES_AUTOTUNE=1 once (resnet50, batch 64), cache saved in the report",
             [py, "-m", "fastres.gpu_check", "--step", "autotune", "--out", out_dir], 0.15,
             env={"FASTRES_AUTOTUNE": "1", "FASTRES_AUTOTUNE_CACHE": os.path.join(out_dir, "autotune.json")}),
        Step("bench", f"resnet50 images/s at batch {BENCH_BATCHES}: fastres, Engine, torchvision eager fp16 "
                      "channels_last (+ cudnn.benchmark), torch.compile if the budget allows",
             [py, "-m", "fastres.gpu_check", "--step", "bench", "--out", out_dir,
              "--bench-seconds", str(int(0.3 * budget_s))], 0.3),
    ]


def check_imports() -> list[str]:
    """The required modules that do not import here (empty when all do)."""
    missing = []
    for name in REQUIRED_MODULES:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - report every failure, not only ImportError
            missing.append(f"{name}: {type(e).__name__}: {e}")
    return missing


def dry_run(out_dir: str, budget_s: float, file=None) -> int:
    file = file or sys.stdout
    print(f"fastres gpu-check (dry run): would write {out_dir}/ within {budget_s:.0f} s", file=file)
    for i, step in enumerate(plan(out_dir, budget_s), 1):
        env = " ".join(f"{k}={v}" for k, v in step.env.items())
        print(f"{i}. {step.name} (timeout {step.share * budget_s:.0f} s): {step.what}\n   "
              f"{(env + ' ') if env else ''}{' '.join(step.command)}", file=file)
    missing = check_imports()
    for line in missing:
        print(f"MISSING {line}", file=file)
    print("imports: " + ("all required modules import" if not missing else f"{len(missing)} missing"), file=file)
    return 1 if missing else 0


def run_steps(out_dir: str, budget_s: float) -> list[StepResult]:
    os.makedirs(os.path.join(out_dir, "logs"), exist_ok=True)
    results = []
    for step in plan(out_dir, budget_s):
        log = os.path.join(out_dir, "logs", f"{step.name}.log")
        start = time.monotonic()
        env = {**os.environ, **step.env}
        env.pop("TRITON_INTERPRET", None)
        with open(log, "w") as f:
            try:
                proc = subprocess.run(step.command, stdout=f, stderr=subprocess.STDOUT, env=env,
                                      timeout=step.share * budget_s)
                status, code = ("passed" if proc.returncode == 0 else "failed"), proc.returncode
            except subprocess.TimeoutExpired:
                status, code = "timeout", None
        results.append(StepResult(step.name, status, time.monotonic() - start, code, log))
        print(f"{step.name}: {status} in {results[-1].seconds:.0f} s (log {log})", flush=True)
    return results


# -- in-process steps (run as subprocesses by run_steps) ----------------------------------------------

def _engine_step(out_dir: str) -> int:
    import torch

    import fastres
    model = fastres.resnet50().cuda().half().eval()
    engine = fastres.Engine(model, batch_sizes=ENGINE_BUCKETS, input="float_nchw", cuda_graphs=True)
    rows = []
    ok = True
    for batch in ENGINE_BUCKETS:
        x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.float16)
        with torch.inference_mode():
            expected = model(x).float()
            got = engine(x).float()
        err = float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12))
        rows.append({"batch": batch, "max_rel_error": err, "ok": err <= 2e-2})
        ok &= err <= 2e-2
        print(f"engine bucket {batch}: max rel error vs eval model {err:.2e}", flush=True)
    with open(os.path.join(out_dir, "engine.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return 0 if ok else 1


def _autotune_step(out_dir: str) -> int:
    import torch

    import fastres
    model = fastres.resnet50().cuda().half().eval()
    x = torch.randn(64, 3, 224, 224, device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        model(x)
    torch.cuda.synchronize()
    path = os.environ["FASTRES_AUTOTUNE_CACHE"]
    print(f"autotune cache: {path} ({os.path.getsize(path)} bytes)" if os.path.exists(path) else "no cache written")
    return 0 if os.path.exists(path) else 1


def _bench_step(out_dir: str, seconds: float) -> int:
    import dataclasses

    import torch

    from . import benchmark as b
    deadline = time.monotonic() + seconds
    settings = dataclasses.replace(b.settings_for(False, archs=["resnet50"], batches=list(BENCH_BATCHES)),
                                   target_seconds=1.0, max_rounds=30)
    workload = b.Workload("resnet50", settings.size, "cuda", settings=settings)
    results = []
    plain = ("torchvision", "fastres", "fastres-engine")
    for batch in BENCH_BATCHES:
        for impl in plain + ("torchvision-cudnn-benchmark", "torchvision-compile"):
            name = "torchvision" if impl == "torchvision-cudnn-benchmark" else impl
            left = deadline - time.monotonic()
            try:
                if impl == "torchvision-compile" and left < 0.4 * seconds:
                    raise b.Skip(f"over the gpu-check budget ({left:.0f} s left; torch.compile takes minutes)")
                torch.backends.cudnn.benchmark = impl == "torchvision-cudnn-benchmark"
                runner, m = b.prepare(workload, name, batch)
                m.times = b.measure(runner, b.rounds_for(m.times[0], settings))
            except b.Skip as skip:
                m = b.Measurement("resnet50", name, batch, settings.size, "cuda", "float16",
                                  b.device_name("cuda"), skipped=str(skip))
            finally:
                torch.backends.cudnn.benchmark = False
            results.append(dataclasses.replace(m, impl=impl))
    b.add_speedups(results)
    paths = b.write_report(results, out_dir)
    print(b.markdown(results))
    print("wrote " + ", ".join(paths.values()))
    return 0


def write_report(out_dir: str, results: list[StepResult], budget_s: float) -> str:
    import torch
    bench_md = os.path.join(out_dir, "bench.md")
    summary = {"gpu": torch.cuda.get_device_name(0), "budget_s": budget_s,
               "steps": [asdict(r) for r in results]}
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(summary, f, indent=1)
    lines = [f"# fastres gpu-check on {summary['gpu']}", "", "| step | status | seconds |", "| --- | --- | --- |"]
    lines += [f"| {r.name} | {r.status} | {r.seconds:.0f} |" for r in results]
    if os.path.exists(bench_md):
        lines += ["", "## resnet50 images/s (measured here)", "", open(bench_md).read()]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastres.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu-report")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for all steps")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and check the imports")
    parser.add_argument("--step", choices=["engine", "autotune", "bench"], help=argparse.SUPPRESS)
    parser.add_argument("--bench-seconds", type=float, default=150, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dry_run:
        return dry_run(args.out, args.budget)
    import torch
    if not torch.cuda.is_available():
        print("fastres gpu-check needs a CUDA GPU (none is visible); `make gpu-check DRY_RUN=1` checks the plan",
              file=sys.stderr)
        return 2
    if args.step:
        return {"engine": lambda: _engine_step(args.out), "autotune": lambda: _autotune_step(args.out),
                "bench": lambda: _bench_step(args.out, args.bench_seconds)}[args.step]()
    results = run_steps(args.out, args.budget)
    print(f"wrote {write_report(args.out, results, args.budget)}")
    bench_md = os.path.join(args.out, "bench.md")
    if os.path.exists(bench_md):
        print(open(bench_md).read())
    return 0 if all(r.status == "passed" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
