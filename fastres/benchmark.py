"""Throughput of fastres against what users run today, side by side (``pytest bench/``, ``fastres bench``).

Implementations, all fed the same input batch (normalised float, made once per batch size):

    torchvision           eager torchvision model; GPU: fp16, channels_last; CPU: fp32, NCHW (the baseline)
    torchvision-compile   the same under torch.compile (GPU: mode="max-autotune")
    fastres               the fastres eval module (fused plan) on the same input
    fastres-engine        fastres.Engine (float input; CUDA graphs on GPU, oneDNN on CPU)
    onnxruntime           ONNX Runtime, CPU only, when installed
    torch-tensorrt        TensorRT through torch-tensorrt, GPU only, when installed

Timing: each implementation is warmed up first (compilation, CUDA graph capture and the first
call are excluded), then timed call by call; on GPU the timed callable ends with
``torch.cuda.synchronize()``. images/s is batch / median call time. Each implementation's logits
are also compared with torchvision in fp32 on the same input (``max_rel_error``), so a fast but
wrong result shows.
"""
from __future__ import annotations

import copy
import io
import json
import math
import os
import platform
import statistics
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch

__all__ = ["Settings", "Skip", "Workload", "IMPLEMENTATIONS", "BASELINE", "settings_for",
           "measure", "run_comparison", "write_report"]

IMPLEMENTATIONS = ("torchvision", "torchvision-compile", "fastres", "fastres-engine", "onnxruntime",
                   "torch-tensorrt")
BASELINE = "torchvision"
FASTRES_IMPLS = ("fastres", "fastres-engine")
# max |logit error| / max |logit| against torchvision fp32 that a fastres implementation may show
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}
# torch.compile's CUDA graphs (max-autotune) record on the second call and replay from the third
GPU_EXTRA_WARMUP = 2
# the CPU speed goal: fastres-engine over torchvision eager, resnet50 fp32 batch 8
CPU_SPEED_GOAL = {"arch": "resnet50", "batch": 8, "speedup": 1.8}


@dataclass(frozen=True)
class Settings:
    archs: tuple = ("resnet50", "resnet18", "resnet101")
    batches: tuple = (1, 8, 64, 256)
    size: int = 224
    quick: bool = False
    min_rounds: int = 3
    max_rounds: int = 50
    target_seconds: float = 2.0      # timed time per implementation and batch, beyond min_rounds
    compile_batches: Optional[tuple] = None   # batches torch.compile is measured at (None: all)
    gpu_compile_mode: Optional[str] = "max-autotune"


QUICK = Settings(archs=("resnet18",), batches=(1, 4), size=64, quick=True, min_rounds=3,
                 max_rounds=3, target_seconds=0.0, compile_batches=(1,),
                 gpu_compile_mode=None)   # max-autotune takes minutes: not for CI


def settings_for(quick: bool, *, archs=None, batches=None, size=None) -> Settings:
    """The full or quick settings, with any of archs/batches/size overridden."""
    base = QUICK if quick else Settings()
    changes = {}
    if archs:
        changes["archs"] = tuple(archs)
    if batches:
        changes["batches"] = tuple(batches)
        if base.compile_batches is not None:
            changes["compile_batches"] = (min(batches),)
    if size:
        changes["size"] = size
    return replace(base, **changes)


class Skip(Exception):
    """An implementation that cannot run here; the message says why."""


def compute_dtype(device: str) -> torch.dtype:
    return torch.float16 if device == "cuda" else torch.float32


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} CPUs)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} CPUs)"


def versions() -> dict:
    import torchvision

    from .version import __version__
    found = {"fastres": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__}
    for name in ("onnxruntime", "torch_tensorrt"):
        try:
            found[name] = __import__(name).__version__
        except ImportError:
            pass
    return found


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# -- one architecture on one device --------------------------------------------------------------
class Workload:
    """The models of one architecture on one device, built once and shared by every batch size."""

    def __init__(self, arch: str, size: int, device: str, *, settings: Settings = Settings(), seed: int = 0):
        import torchvision

        from .verify import randomize_norm_stats_

        if device == "cuda" and not torch.cuda.is_available():
            raise Skip("no CUDA device")
        self.arch, self.size, self.device, self.settings = arch, size, device, settings
        self.dtype = compute_dtype(device)
        torch.manual_seed(seed)
        # fp32 CPU master copy with trained-looking BatchNorm statistics, so folding does work
        self.master = randomize_norm_stats_(getattr(torchvision.models, arch)(), seed).eval()
        self.memory_format = torch.channels_last if device == "cuda" else torch.contiguous_format
        self.seed = seed
        self._built: dict[str, object] = {}
        self._inputs: dict[int, torch.Tensor] = {}
        self._references: dict[int, torch.Tensor] = {}

    # the same input for every implementation
    def input(self, batch: int) -> torch.Tensor:
        if batch not in self._inputs:
            from .verify import image_batch
            x = image_batch(batch, self.size, self.seed).to(self.device, self.dtype)
            self._inputs[batch] = x.contiguous(memory_format=self.memory_format)
        return self._inputs[batch]

    def reference(self, batch: int) -> torch.Tensor:
        """torchvision fp32 logits on the same input: what every implementation is checked against."""
        if batch not in self._references:
            model = self._get("reference", lambda: copy.deepcopy(self.master).to(self.device))
            with torch.inference_mode():
                self._references[batch] = model(self.input(batch).float()).float()
        return self._references[batch]

    @property
    def flops_per_image(self) -> float:
        """Model FLOPs of one image (2 per multiply-add), counted by torch on meta tensors."""
        if "flops" not in self._built:
            from torch.utils.flop_counter import FlopCounterMode
            model = copy.deepcopy(self.master).to("meta")
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                model(torch.empty(1, 3, self.size, self.size, device="meta"))
            self._built["flops"] = float(counter.get_total_flops())
        return self._built["flops"]

    def _get(self, key: str, build: Callable):
        if key not in self._built:
            try:
                self._built[key] = build()
            except Skip as skip:
                self._built[key] = skip
        built = self._built[key]
        if isinstance(built, Skip):
            raise built
        return built

    def _eager(self):
        model = copy.deepcopy(self.master).to(self.device, self.dtype)
        return model.to(memory_format=self.memory_format)

    def runner(self, impl: str, batch: int) -> Callable[[], torch.Tensor]:
        """A no-argument callable running ``impl`` on this batch (synchronised on GPU); raises Skip."""
        x = self.input(batch)
        if impl == "torchvision":
            model = self._get(impl, self._eager)
            return self._torch_call(model, x)
        if impl == "torchvision-compile":
            compile_batches = self.settings.compile_batches
            if compile_batches is not None and batch not in compile_batches:
                raise Skip(f"quick mode compiles once, at batch {compile_batches[0]}")
            model = self._get(impl, lambda: torch.compile(
                self._eager(), mode=self.settings.gpu_compile_mode if self.device == "cuda" else None,
                dynamic=False))
            return self._torch_call(model, x)
        if impl == "fastres":
            import fastres
            model = self._get(impl, lambda: fastres.from_torchvision(self._eager()).eval())
            return self._torch_call(model, x)
        if impl == "fastres-engine":
            from .engine import Engine
            engine = self._get(impl, lambda: Engine(
                self.master, batch_sizes=self.settings.batches, image_size=self.size, dtype=self.dtype,
                device=self.device, input="float_nchw"))
            return self._torch_call(engine, x)
        if impl == "onnxruntime":
            session = self._get(impl, self._onnxruntime_session)
            array = x.numpy()
            return lambda: torch.from_numpy(session.run(None, {"images": array})[0])
        if impl == "torch-tensorrt":
            model = self._get(f"{impl}/{batch}", lambda: self._tensorrt_module(x))
            return self._torch_call(model, x)
        raise ValueError(f"unknown implementation {impl!r}; choose from {', '.join(IMPLEMENTATIONS)}")

    def _torch_call(self, fn, x) -> Callable[[], torch.Tensor]:
        device = self.device

        def call():
            with torch.inference_mode():
                out = fn(x)
            _sync(device)
            return out
        return call

    def _onnxruntime_session(self):
        if self.device != "cpu":
            raise Skip("ONNX Runtime is compared on CPU only")
        try:
            import onnxruntime
        except ImportError:
            raise Skip("onnxruntime is not installed (pip install onnxruntime onnx)") from None
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(self.master, (self.input(1),), buffer, dynamo=False,
                                  input_names=["images"], output_names=["logits"],
                                  dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
            except Exception as err:   # the exporter's own dependencies (onnx) missing or broken
                raise Skip(f"torch.onnx.export failed: {type(err).__name__}: {err}") from None
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        return onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])

    def _tensorrt_module(self, x):
        if self.device != "cuda":
            raise Skip("TensorRT runs on GPU only")
        try:
            import torch_tensorrt
        except ImportError:
            raise Skip("torch-tensorrt is not installed") from None
        try:
            return torch_tensorrt.compile(self._eager(), ir="dynamo", inputs=[x],
                                          enabled_precisions={self.dtype})
        except Exception as err:
            raise Skip(f"torch-tensorrt failed to compile {self.arch}: {type(err).__name__}: {err}") from None


# -- timing ---------------------------------------------------------------------------------------
@dataclass
class Measurement:
    arch: str
    impl: str
    batch: int
    size: int
    device: str
    dtype: str
    device_name: str = ""
    flops_per_image: Optional[float] = None
    times: list = field(default_factory=list)     # seconds per call
    max_rel_error: Optional[float] = None
    top1_agreement: Optional[float] = None
    skipped: Optional[str] = None
    speedup: Optional[float] = None

    @property
    def images_per_s(self) -> Optional[float]:
        return self.batch / statistics.median(self.times) if self.times else None

    @property
    def gflops_per_s(self) -> Optional[float]:
        if self.images_per_s is None or self.flops_per_image is None:
            return None
        return self.images_per_s * self.flops_per_image / 1e9

    def ms(self, q: float) -> Optional[float]:
        if not self.times:
            return None
        ordered = sorted(self.times)
        return 1e3 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def row(self) -> dict:
        return {"arch": self.arch, "impl": self.impl, "batch": self.batch, "size": self.size,
                "images_per_s": self.images_per_s, "gflops_per_s": self.gflops_per_s,
                "device": self.device, "dtype": self.dtype,
                "device_name": self.device_name, "ms_p50": self.ms(0.5), "ms_p20": self.ms(0.2),
                "ms_p80": self.ms(0.8), "rounds": len(self.times), "speedup": self.speedup,
                "max_rel_error": self.max_rel_error, "top1_agreement": self.top1_agreement,
                "skipped": self.skipped}


def rounds_for(seconds_per_call: float, settings: Settings) -> int:
    """Enough timed calls to fill ``target_seconds``, within [min_rounds, max_rounds]."""
    wanted = math.ceil(settings.target_seconds / max(seconds_per_call, 1e-6))
    return max(settings.min_rounds, min(settings.max_rounds, wanted))


def prepare(workload: Workload, impl: str, batch: int) -> tuple[Callable, Measurement]:
    """Build and warm up ``impl`` (excluded from timing), check its output; (runner, measurement).

    Raises Skip when the implementation cannot run here. After the warm-up call, one more call is
    timed to size the number of rounds (``rounds_for``).
    """
    m = Measurement(workload.arch, impl, batch, workload.size, workload.device,
                    str(workload.dtype).removeprefix("torch."), device_name(workload.device),
                    flops_per_image=workload.flops_per_image)
    runner = workload.runner(impl, batch)
    out = runner().float()                       # warm-up: compilation, graph capture, first call
    for _ in range(GPU_EXTRA_WARMUP if workload.device == "cuda" else 0):
        runner()
    ref = workload.reference(batch)
    out = out.to(ref.device)
    m.max_rel_error = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
    m.top1_agreement = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
    start = time.perf_counter()
    runner()
    m.times = [time.perf_counter() - start]      # a first measurement; callers add the rounds
    return runner, m


def measure(runner: Callable, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        runner()
        times.append(time.perf_counter() - start)
    return times


def run_comparison(settings: Settings, device: str, *, progress: bool = True) -> list[Measurement]:
    """Every implementation at every batch of every arch in ``settings``, with a progress bar."""
    from tqdm import tqdm

    results = []
    steps = [(arch, batch, impl) for arch in settings.archs for batch in settings.batches
             for impl in IMPLEMENTATIONS]
    bar = tqdm(total=len(steps), unit="run", disable=not progress, dynamic_ncols=True)
    workload = None
    try:
        for arch, batch, impl in steps:
            bar.set_description(f"{arch} batch {batch} {impl}")
            if workload is None or workload.arch != arch:
                workload = None   # free the previous architecture's models first
                workload = Workload(arch, settings.size, device, settings=settings)
            try:
                runner, m = prepare(workload, impl, batch)
                m.times = measure(runner, rounds_for(m.times[0], settings))
            except Skip as skip:
                m = Measurement(arch, impl, batch, settings.size, device,
                                str(compute_dtype(device)).removeprefix("torch."), device_name(device),
                                skipped=str(skip))
            results.append(m)
            bar.update()
    finally:
        bar.close()
    add_speedups(results)
    return results


def add_speedups(results: list[Measurement]) -> None:
    """``speedup`` = images/s over torchvision eager's in the same (arch, batch, device)."""
    base = {(m.arch, m.batch, m.device): m.images_per_s for m in results if m.impl == BASELINE}
    for m in results:
        b = base.get((m.arch, m.batch, m.device))
        if b and m.images_per_s:
            m.speedup = m.images_per_s / b


# -- reports --------------------------------------------------------------------------------------
def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def markdown(results: list[Measurement]) -> str:
    info = versions()
    lines = ["# fastres throughput", ""]
    if results:
        first = results[0]
        lines.append(f"{first.device_name}; {first.device} {first.dtype}; images {first.size}x{first.size}; "
                     + ", ".join(f"{k} {v}" for k, v in info.items()))
        lines.append("")
    lines += ["| arch | batch | implementation | images/s | ms p50 (p20-p80) | GFLOP/s "
              "| speedup vs torchvision | max rel. error | top-1 agree | note |",
              "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for m in results:
        ms = f"{m.ms(0.5):.2f} ({m.ms(0.2):.2f}-{m.ms(0.8):.2f})" if m.times else ""
        lines.append(f"| {m.arch} | {m.batch} | {m.impl} | {_fmt(m.images_per_s, '.1f')} | {ms} | "
                     f"{_fmt(m.gflops_per_s, '.1f')} | "
                     f"{_fmt(m.speedup, '.2f') + ('x' if m.speedup else '')} | "
                     f"{_fmt(m.max_rel_error, '.1e')} | {_fmt(m.top1_agreement, '.0%')} | "
                     f"{'skipped: ' + m.skipped if m.skipped else ''} |")
    return "\n".join(lines) + "\n"


def plot(results: list[Measurement], path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise ImportError(f"the benchmark plot needs matplotlib: {PLOT_INSTALL_HINT}") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = list(dict.fromkeys(m.arch for m in results))
    fig, axes = plt.subplots(1, len(archs), figsize=(6 * len(archs), 4.5), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        for impl in IMPLEMENTATIONS:
            points = [(m.batch, m.images_per_s) for m in results
                      if m.arch == arch and m.impl == impl and m.images_per_s]
            if points:
                ax.plot(*zip(*points), marker="o", label=impl)
        first = next(m for m in results if m.arch == arch)
        ax.set(title=f"{arch} {first.device} {first.dtype} {first.size}x{first.size}",
               xlabel="batch", ylabel="images/s", xscale="log")
        ax.set_xticks(sorted({m.batch for m in results}))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


PLOT_INSTALL_HINT = "pip install matplotlib (or pip install -e '.[bench]')"


def can_plot() -> bool:
    """Whether matplotlib (needed only for bench.png) can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_report(results: list[Measurement], out_dir: str, *, png: bool = True) -> dict[str, str]:
    """``bench.md`` (table), ``bench.json`` (one row per implementation x batch), and ``bench.png``
    unless ``png`` is False (no matplotlib): the returned paths are the files written."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {ext: os.path.join(out_dir, f"bench.{ext}") for ext in ("md", "json", "png")}
    with open(paths["md"], "w") as f:
        f.write(markdown(results))
    with open(paths["json"], "w") as f:
        json.dump([m.row() for m in results], f, indent=1)
    if png:
        plot(results, paths["png"])
    else:
        del paths["png"]
    return paths
