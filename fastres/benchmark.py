"""Throughput of fastres against what users run today, side by side (``fastres bench``, ``pytest bench/``).

Implementations, all fed the same input batch (normalised float, made once per batch size):

    torchvision           eager torchvision model; GPU: fp16, channels_last; CPU: fp32, NCHW (the baseline)
    torchvision-compile   the same under torch.compile (GPU: mode="max-autotune"; CPU: default inductor)
    fastres               the fastres eval module (fused plan) on the same input
    fastres-engine        fastres.Engine (float input; CUDA graphs on GPU, the oneDNN program on CPU)
    onnxruntime           ONNX Runtime, CPU execution provider, when installed (the ``bench`` extra)
    openvino              OpenVINO on CPU, f32 inference precision, latency hint, when installed
    torch-tensorrt        TensorRT through torch-tensorrt, GPU only, when installed
    fastres-int8          ``fastres.quantize(..., dtype="int8")`` of the model (default percentile
                          calibration), on CPU oneDNN's int8 convolution (bit for bit the integer reference)
    onnxruntime-int8      ONNX Runtime on the same model after its static INT8 quantization
                          (``quantize_static``: QDQ, per-channel int8 weights, uint8 activations,
                          MinMax calibration), CPU only

Both 8-bit implementations calibrate on the same ``CALIBRATION_IMAGES`` images (not the timed input);
their top-1 agreement and logits cosine against torchvision fp32 are over ``AGREEMENT_IMAGES`` other
images (``Workload.agreement``), the other implementations' over the timed batch.

Timing (``run_comparison``): per (architecture, batch), every implementation is built and warmed up
first (compilation, graph capture and the first call are excluded), then the implementations are
timed *interleaved*, one call each per round in a rotating order, so a machine whose load changes
during the run slows all of them alike; images/s is batch / median call time. On CPU each call is
preceded by a short pause (``pause_s``): OpenMP and ONNX Runtime worker threads spin-wait for
milliseconds after a call, and without the pause they steal the cores from whatever runs next
(measured: up to 1.8x slower). Every implementation uses the same number of intra-op threads
(``torch.get_num_threads()``), recorded with the CPU model and the load average at each cell's start
and end; ``competing`` busy processes can be started for the timing, to measure under contention.
Each implementation's logits are also compared with torchvision in fp32 on the same input
(``max_rel_error``), so a fast but wrong result shows.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch

from .backend import cpu_model

__all__ = ["Settings", "Skip", "Workload", "IMPLEMENTATIONS", "BASELINE", "settings_for",
           "measure", "run_comparison", "write_report", "ratio_table", "speed_line", "parse_compare",
           "missing_extras"]

IMPLEMENTATIONS = ("torchvision", "torchvision-compile", "fastres", "fastres-engine", "onnxruntime",
                   "openvino", "torch-tensorrt", "fastres-int8", "onnxruntime-int8")
BASELINE = "torchvision"
REFERENCE_RUNTIME = "onnxruntime"     # the CPU goal: fastres at least as fast as ONNX Runtime
FASTRES_IMPLS = ("fastres", "fastres-engine")
# names ``--compare`` takes besides the full ones
ALIASES = {"ort": "onnxruntime", "ov": "openvino", "compile": "torchvision-compile",
           "tv": "torchvision", "eager": "torchvision", "module": "fastres", "engine": "fastres-engine",
           "trt": "torch-tensorrt", "tensorrt": "torch-tensorrt", "int8": "fastres-int8",
           "ort-int8": "onnxruntime-int8"}
# the Python packages each optional implementation needs (the ``bench`` extra holds the CPU ones)
EXTRAS = {"onnxruntime": ("onnxruntime", "onnx"), "openvino": ("openvino", "onnx"),
          "torch-tensorrt": ("torch_tensorrt",), "onnxruntime-int8": ("onnxruntime", "onnx")}
# the 8-bit implementations: compared with fp32 by logits cosine and top-1 agreement, not TOLERANCE
EIGHT_BIT_IMPLS = ("fastres-int8", "onnxruntime-int8")
# what runs when no implementation is named: the 8-bit ones are opt-in (``--compare int8,ort-int8``)
DEFAULT_IMPLS = tuple(i for i in IMPLEMENTATIONS if i not in EIGHT_BIT_IMPLS)
CALIBRATION_IMAGES = 16
AGREEMENT_IMAGES = 64     # held-out images the 8-bit implementations' top-1 agreement and cosine are over
BENCH_INSTALL_HINT = "pip install -e '.[bench]' (or: pip install onnxruntime onnx openvino)"
# max |logit error| / max |logit| against torchvision fp32 that a fastres implementation may show
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}
# torch.compile's CUDA graphs (max-autotune) record on the second call and replay from the third
GPU_EXTRA_WARMUP = 2
CPU_PAUSE_S = 0.1


@dataclass(frozen=True)
class Settings:
    archs: tuple = ("resnet50", "resnet18", "resnet101")
    batches: tuple = (1, 8, 64, 256)
    size: int = 224
    quick: bool = False
    min_rounds: int = 3
    max_rounds: int = 50
    target_seconds: float = 2.0      # timed time per implementation and cell, beyond min_rounds
    compile_batches: Optional[tuple] = None   # batches torch.compile is measured at (None: all)
    gpu_compile_mode: Optional[str] = "max-autotune"
    impls: Optional[tuple] = None    # None: DEFAULT_IMPLS (the ones not installed skip)
    pause_s: Optional[float] = None  # before each timed call; None: CPU_PAUSE_S on CPU, 0 on GPU
    competing: int = 0               # busy processes started for the timing (contention)


# CPU: the architectures and batches of the CPU goal (issue #13), median of 5-15 interleaved rounds
CPU = Settings(archs=("resnet18", "resnet50", "resnext50_32x4d"), batches=(1, 8, 32), min_rounds=5,
               max_rounds=15, target_seconds=3.0, gpu_compile_mode=None)
QUICK = Settings(archs=("resnet18",), batches=(1, 4), size=64, quick=True, min_rounds=3,
                 max_rounds=3, target_seconds=0.0, compile_batches=(1,),
                 gpu_compile_mode=None, pause_s=0.0)   # max-autotune takes minutes: not for CI


def settings_for(quick: bool, *, archs=None, batches=None, size=None, device: str = "cuda",
                 impls=None, competing: int = 0, rounds: Optional[int] = None) -> Settings:
    """The full (GPU or CPU) or quick settings, with any of the fields overridden."""
    base = QUICK if quick else (CPU if device == "cpu" else Settings())
    changes = {}
    if archs:
        changes["archs"] = tuple(archs)
    if batches:
        changes["batches"] = tuple(batches)
        if base.compile_batches is not None:
            changes["compile_batches"] = (min(batches),)
    if size:
        changes["size"] = size
    if impls:
        changes["impls"] = tuple(impls)
    if competing:
        changes["competing"] = competing
    if rounds:
        changes.update(min_rounds=rounds, max_rounds=rounds)
    return replace(base, **changes)


def parse_compare(text: str) -> tuple:
    """``--compare ort,openvino,compile,torchvision`` -> the implementations to run: the fastres
    module and Engine always, plus those named (full names or ALIASES; ``all`` for every one)."""
    names = [n.strip().lower() for n in text.replace(" ", ",").split(",") if n.strip()]
    if "all" in names:
        return IMPLEMENTATIONS
    chosen = set(FASTRES_IMPLS)
    for name in names:
        impl = ALIASES.get(name, name)
        if impl not in IMPLEMENTATIONS:
            raise ValueError(f"unknown implementation {name!r}; choose from "
                             f"{', '.join(IMPLEMENTATIONS)} (or {', '.join(sorted(ALIASES))})")
        chosen.add(impl)
    return tuple(i for i in IMPLEMENTATIONS if i in chosen)


def missing_extras(impls) -> dict:
    """{implementation: the packages it needs that are not installed} for ``impls``."""
    missing = {}
    for impl in impls:
        absent = [p for p in EXTRAS.get(impl, ()) if importlib.util.find_spec(p) is None]
        if absent:
            missing[impl] = absent
    return missing


class Skip(Exception):
    """An implementation that cannot run here; the message says why."""


def compute_dtype(device: str) -> torch.dtype:
    return torch.float16 if device == "cuda" else torch.float32


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_model()} ({os.cpu_count()} CPUs)"


def load_average() -> Optional[float]:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def versions() -> dict:
    import torchvision

    from .version import __version__
    found = {"fastres": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__}
    for name in ("onnxruntime", "openvino", "torch_tensorrt"):
        if importlib.util.find_spec(name) is None:
            continue
        try:
            module = __import__(name)
            found[name] = getattr(module, "__version__", None) or module.get_version()
        except Exception:  # noqa: BLE001 - a broken optional package: its runner says why
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
        self.threads = torch.get_num_threads()
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
        if impl in ("onnxruntime", "openvino", "onnxruntime-int8") and self.device != "cpu":
            raise Skip(f"{impl} is compared on CPU only")
        if impl == "torch-tensorrt" and self.device != "cuda":
            raise Skip("TensorRT runs on GPU only")
        missing = missing_extras([impl]).get(impl)
        if missing:
            raise Skip(f"{impl} needs {', '.join(missing)}, not installed: "
                       + (BENCH_INSTALL_HINT if impl != "torch-tensorrt" else "pip install torch-tensorrt"))
        if impl == "torchvision":
            model = self._get(impl, self._eager)
            return self._torch_call(model, x)
        if impl == "torchvision-compile":
            compile_batches = self.settings.compile_batches
            if compile_batches is not None and batch not in compile_batches:
                raise Skip(f"quick mode compiles once, at batch {compile_batches[0]}")
            model = self._get(impl, self._compiled)
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
        if impl == "openvino":
            request = self._get(f"{impl}/{batch}", lambda: self._openvino_request(batch))
            array = x.numpy()

            def call():
                request.infer([array], share_inputs=True)
                return torch.from_numpy(request.get_output_tensor(0).data.copy())
            return call
        if impl == "torch-tensorrt":
            model = self._get(f"{impl}/{batch}", lambda: self._tensorrt_module(x))
            return self._torch_call(model, x)
        if impl == "fastres-int8":
            model = self._get(impl, self._fastres_int8)
            return self._torch_call(model, x)
        if impl == "onnxruntime-int8":
            session = self._get(impl, self._onnxruntime_int8_session)
            array = x.numpy()
            return lambda: torch.from_numpy(session.run(None, {"images": array})[0])
        raise ValueError(f"unknown implementation {impl!r}; choose from {', '.join(IMPLEMENTATIONS)}")

    def _compiled(self):
        """torch.compile of the eager model, static shapes (one compile per batch). Dynamo counts
        the compiles of torchvision's one ``forward`` across architectures against its recompile
        limit (8), past which it silently runs eager: its caches are reset per architecture."""
        torch._dynamo.reset()
        return torch.compile(self._eager(), dynamic=False,
                             mode=self.settings.gpu_compile_mode if self.device == "cuda" else None)

    def _torch_call(self, fn, x) -> Callable[[], torch.Tensor]:
        device = self.device

        def call():
            with torch.inference_mode():
                out = fn(x)
            _sync(device)
            return out
        return call

    def onnx_bytes(self) -> bytes:
        """The torchvision model exported to ONNX (batch axis dynamic), once per workload."""
        def export():
            buffer = io.BytesIO()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    torch.onnx.export(self.master, (self.input(1).cpu().float(),), buffer, dynamo=False,
                                      input_names=["images"], output_names=["logits"],
                                      dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
                except Exception as err:   # the exporter's own dependencies (onnx) missing or broken
                    raise Skip(f"torch.onnx.export failed: {type(err).__name__}: {err}") from None
            return buffer.getvalue()
        return self._get("onnx", export)

    def calibration(self) -> torch.Tensor:
        """The images both 8-bit implementations calibrate on (fp32, CPU; not the timed input)."""
        if "calibration" not in self._built:
            from .verify import image_batch
            self._built["calibration"] = image_batch(CALIBRATION_IMAGES, self.size, self.seed + 1)
        return self._built["calibration"]

    def agreement(self, impl: str) -> tuple:
        """(top-1 agreement, logits cosine) of ``impl`` against torchvision fp32 over
        ``AGREEMENT_IMAGES`` held-out images (batches of 8), once per workload."""
        def compute():
            from .verify import image_batch
            x = image_batch(AGREEMENT_IMAGES, self.size, self.seed + 2).to(self.device)
            model = self._get("reference", lambda: copy.deepcopy(self.master).to(self.device))
            with torch.inference_mode():
                ref = torch.cat([model(b).float() for b in x.split(8)])
                out = torch.cat([self._call_once(impl, b.to(self.dtype)).float().to(ref.device) for b in x.split(8)])
            cosine = torch.nn.functional.cosine_similarity(out.flatten().double(), ref.flatten().double(), dim=0)
            return float((out.argmax(-1) == ref.argmax(-1)).float().mean()), float(cosine)
        return self._get(f"agreement/{impl}", compute)

    def _call_once(self, impl: str, x: torch.Tensor) -> torch.Tensor:
        if impl == "onnxruntime-int8":
            return torch.from_numpy(self._get(impl, self._onnxruntime_int8_session).run(None, {"images": x.numpy()})[0])
        return self._get(impl, self._fastres_int8)(x)

    def _fastres_int8(self):
        from .quantize import quantize
        return quantize(copy.deepcopy(self.master), self.calibration(), dtype="int8", progress=False).to(self.device)

    def _onnxruntime_int8_session(self):
        """ONNX Runtime's static INT8 quantization of the exported model: QDQ format, per-channel
        int8 weights, uint8 activations (the fast U8S8 kernels on x86), MinMax calibration on
        ``calibration()``, after ORT's recommended pre-processing (shape inference, optimisation)."""
        from onnxruntime import quantization as q
        images = self.calibration().numpy()

        class Reader(q.CalibrationDataReader):
            def __init__(self):
                self.batches = iter([{"images": images[i:i + 1]} for i in range(len(images))])

            def get_next(self):
                return next(self.batches, None)

        with tempfile.TemporaryDirectory() as tmp:
            fp32, prepared, int8 = (os.path.join(tmp, f"{n}.onnx") for n in ("fp32", "prepared", "int8"))
            with open(fp32, "wb") as f:
                f.write(self.onnx_bytes())
            try:
                from onnxruntime.quantization.shape_inference import quant_pre_process
                quant_pre_process(fp32, prepared)
            except Exception:  # noqa: BLE001 - optional step: quantize the exported model as it is
                prepared = fp32
            q.quantize_static(prepared, int8, Reader(), quant_format=q.QuantFormat.QDQ, per_channel=True,
                              activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                              calibrate_method=q.CalibrationMethod.MinMax)
            with open(int8, "rb") as f:
                return self._onnxruntime_session(f.read())

    def _onnxruntime_session(self, model: Optional[bytes] = None):
        import onnxruntime
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        return onnxruntime.InferenceSession(model or self.onnx_bytes(), options, providers=["CPUExecutionProvider"])

    def _openvino_request(self, batch: int):
        import openvino
        core = self._get("openvino-core", openvino.Core)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, f"{self.arch}.onnx")
            with open(path, "wb") as f:
                f.write(self.onnx_bytes())
            model = core.read_model(path)
            model.reshape([batch, 3, self.size, self.size])
            compiled = core.compile_model(model, "CPU", {
                "INFERENCE_NUM_THREADS": self.threads, "NUM_STREAMS": 1,
                "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"})
        return compiled.create_infer_request()

    def _tensorrt_module(self, x):
        import torch_tensorrt
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
    cosine: Optional[float] = None                # of the logits to torchvision fp32's
    skipped: Optional[str] = None
    speedup: Optional[float] = None               # images/s over torchvision eager's
    vs_reference: Optional[float] = None          # images/s over ONNX Runtime's (CPU)
    threads: Optional[int] = None                 # intra-op threads of the run
    load: Optional[tuple] = None                  # 1-minute load average at the cell's start, end
    competing: int = 0                            # busy processes running during the timing
    threads_used: Optional[int] = None            # fastres on CPU: what the thread governor allowed

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
                "vs_onnxruntime": self.vs_reference, "threads": self.threads,
                "load": list(self.load) if self.load else None, "competing": self.competing,
                "threads_used": self.threads_used,
                "max_rel_error": self.max_rel_error, "top1_agreement": self.top1_agreement,
                "cosine": self.cosine,
                "skipped": self.skipped}


def rounds_for(seconds_per_call: float, settings: Settings) -> int:
    """Enough timed calls to fill ``target_seconds``, within [min_rounds, max_rounds]."""
    wanted = math.ceil(settings.target_seconds / max(seconds_per_call, 1e-6))
    return max(settings.min_rounds, min(settings.max_rounds, wanted))


def _measurement(workload_or_arch, impl: str, batch: int, settings: Settings, device: str) -> Measurement:
    arch = getattr(workload_or_arch, "arch", workload_or_arch)
    return Measurement(arch, impl, batch, settings.size, device,
                       str(compute_dtype(device)).removeprefix("torch."), device_name(device),
                       threads=torch.get_num_threads() if device == "cpu" else None,
                       competing=settings.competing)


def prepare(workload: Workload, impl: str, batch: int) -> tuple[Callable, Measurement]:
    """Build and warm up ``impl`` (excluded from timing), check its output; (runner, measurement).

    Raises Skip when the implementation cannot run here. After the warm-up call, one more call is
    timed to size the number of rounds (``rounds_for``).
    """
    m = _measurement(workload, impl, batch, workload.settings, workload.device)
    m.flops_per_image = workload.flops_per_image
    runner = workload.runner(impl, batch)
    out = runner().float()                       # warm-up: compilation, graph capture, first call
    for _ in range(GPU_EXTRA_WARMUP if workload.device == "cuda" else 0):
        runner()
    ref = workload.reference(batch)
    out = out.to(ref.device)
    m.max_rel_error = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
    m.top1_agreement = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
    m.cosine = float(torch.nn.functional.cosine_similarity(out.flatten().double(), ref.flatten().double(), dim=0))
    if impl in EIGHT_BIT_IMPLS:
        m.top1_agreement, m.cosine = workload.agreement(impl)
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


def measure_interleaved(runners: dict, rounds: int, pause_s: float = 0.0) -> dict:
    """{impl: [seconds per call]}: ``rounds`` rounds of one call per implementation, the order
    rotating from round to round, each call after ``pause_s`` of idle time."""
    names = list(runners)
    times = {name: [] for name in names}
    for r in range(rounds):
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            if pause_s:
                time.sleep(pause_s)
            start = time.perf_counter()
            runners[name]()
            times[name].append(time.perf_counter() - start)
    return times


@contextlib.contextmanager
def competing_load(n: int):
    """``n`` busy Python processes (one core each) while the block runs; yields their pids."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        if procs:
            time.sleep(0.5)      # scheduled and spinning before the timing starts
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def _pause(settings: Settings, device: str) -> float:
    if settings.pause_s is not None:
        return settings.pause_s
    return CPU_PAUSE_S if device == "cpu" else 0.0


def run_comparison(settings: Settings, device: str, *, progress: bool = True) -> list[Measurement]:
    """Every implementation at every batch of every arch in ``settings``, interleaved per
    (arch, batch) cell (see the module docstring), with a progress bar over the cells."""
    from tqdm import tqdm

    impls = settings.impls or DEFAULT_IMPLS
    results = []
    cells = [(arch, batch) for arch in settings.archs for batch in settings.batches]
    bar = tqdm(total=len(cells) * len(impls), unit="impl", disable=not progress, dynamic_ncols=True)
    workload = None
    try:
        with competing_load(settings.competing):
            for arch, batch in cells:
                if workload is None or workload.arch != arch:
                    workload = None   # free the previous architecture's models first
                    workload = Workload(arch, settings.size, device, settings=settings)
                load_start = load_average()
                runners, cell = {}, []
                for impl in impls:
                    bar.set_description(f"{arch} batch {batch} {impl} (build)")
                    try:
                        runners[impl], m = prepare(workload, impl, batch)
                    except Skip as skip:
                        m = _measurement(arch, impl, batch, settings, device)
                        m.skipped = str(skip)
                        bar.update()
                    cell.append(m)
                if runners:
                    bar.set_description(f"{arch} batch {batch} (timing {len(runners)} interleaved)")
                    slowest = max(m.times[0] for m in cell if m.impl in runners)
                    times = measure_interleaved(runners, rounds_for(slowest, settings),
                                                _pause(settings, device))
                    for m in cell:
                        if m.impl in times:
                            m.times = times[m.impl]
                    bar.update(len(runners))
                load = (load_start, load_average())
                for m in cell:
                    m.load = load
                    if device == "cpu" and m.impl in FASTRES_IMPLS and m.times:
                        m.threads_used = _governed_threads(m.threads)
                results += cell
    finally:
        bar.close()
    add_speedups(results)
    return results


def _governed_threads(threads: Optional[int]) -> Optional[int]:
    """The intra-op threads fastres's CPU calls use now (fewer than ``threads`` while other
    processes load the cores: ``fastres.backend.ThreadGovernor``)."""
    from .backend import GOVERNOR
    return GOVERNOR.threads(threads) if threads else threads


def add_speedups(results: list[Measurement]) -> None:
    """``speedup`` = images/s over torchvision eager's, ``vs_reference`` over ONNX Runtime's, in
    the same (arch, batch, device)."""
    for attr, impl in (("speedup", BASELINE), ("vs_reference", REFERENCE_RUNTIME)):
        base = {(m.arch, m.batch, m.device): m.images_per_s for m in results if m.impl == impl}
        for m in results:
            b = base.get((m.arch, m.batch, m.device))
            if b and m.images_per_s:
                setattr(m, attr, m.images_per_s / b)


# -- reports --------------------------------------------------------------------------------------
def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def machine_line(results: list[Measurement]) -> str:
    """Machine, threads, load and contention of a run, for the tables' headers."""
    if not results:
        return ""
    first = results[0]
    parts = [first.device_name, f"{first.device} {first.dtype}", f"images {first.size}x{first.size}"]
    if first.device == "cpu":
        parts.append(f"{first.threads} intra-op threads (every implementation)")
        loads = [v for m in results if m.load for v in m.load if v is not None]
        if loads:
            parts.append(f"load average {min(loads):.2f}-{max(loads):.2f}")
        parts.append(f"{first.competing} competing busy process(es)" if first.competing
                     else "no competing process started")
        from .backend import GOVERNOR
        parts.append("fastres thread governor " + ("on" if GOVERNOR.enabled
                                                   else "off (FASTRES_ADAPTIVE_THREADS=0)"))
    timed = [len(m.times) for m in results if m.times]
    if timed:
        parts.append(f"interleaved, median of {min(timed)}-{max(timed)} calls")
    return "; ".join(parts)


def markdown(results: list[Measurement]) -> str:
    info = versions()
    lines = ["# fastres throughput", ""]
    if results:
        lines.append(machine_line(results) + "; " + ", ".join(f"{k} {v}" for k, v in info.items()))
        lines.append("")
    lines += ["| arch | batch | implementation | images/s | ms p50 (p20-p80) | GFLOP/s "
              "| speedup vs torchvision | vs ONNX Runtime | max rel. error | logits cosine | top-1 agree | note |",
              "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for m in results:
        ms = f"{m.ms(0.5):.2f} ({m.ms(0.2):.2f}-{m.ms(0.8):.2f})" if m.times else ""
        lines.append(f"| {m.arch} | {m.batch} | {m.impl} | {_fmt(m.images_per_s, '.1f')} | {ms} | "
                     f"{_fmt(m.gflops_per_s, '.1f')} | "
                     f"{_fmt(m.speedup, '.2f') + ('x' if m.speedup else '')} | "
                     f"{_fmt(m.vs_reference, '.2f') + ('x' if m.vs_reference else '')} | "
                     f"{_fmt(m.max_rel_error, '.1e')} | {_fmt(m.cosine, '.5f')} | {_fmt(m.top1_agreement, '.0%')} | "
                     f"{'skipped: ' + m.skipped if m.skipped else ''}"
                     f"{_threads_note(m)} |")
    table = ratio_table(results)
    return "\n".join(lines) + "\n" + ("\n" + table if table else "")


def _threads_note(m: Measurement) -> str:
    if m.threads_used is not None and m.threads and m.threads_used < m.threads:
        return f"{m.threads_used} of {m.threads} threads (other processes busy)"
    return ""


def ratio_table(results: list[Measurement]) -> str:
    """Per architecture: images/s of each implementation at each batch, with the ratio to ONNX
    Runtime (else torchvision) in the same run, as in issue #13's table."""
    out = []
    for arch in dict.fromkeys(m.arch for m in results):
        rows = [m for m in results if m.arch == arch]
        batches = sorted({m.batch for m in rows})
        by = {(m.impl, m.batch): m for m in rows}
        has_ref = any(m.impl == REFERENCE_RUNTIME and m.images_per_s for m in rows)
        ref_name = "ORT" if has_ref else "torchvision"
        out += [f"**{arch}** images/s (x {ref_name} in the same run)", "",
                "| | " + " | ".join(f"batch {b}" for b in batches) + " |",
                "|---|" + "---|" * len(batches)]
        for impl in dict.fromkeys(m.impl for m in rows):
            cells = []
            for b in batches:
                m = by.get((impl, b))
                if m is None or not m.images_per_s:
                    cells.append("skipped" if m is not None and m.skipped else "")
                    continue
                ratio = m.vs_reference if has_ref else m.speedup
                note = "" if impl == (REFERENCE_RUNTIME if has_ref else BASELINE) or ratio is None \
                    else f" ({ratio:.2f}x)"
                cells.append(f"{m.images_per_s:.1f}{note}")
            if any(cells):
                out.append(f"| {impl} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


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
    """``bench.md`` (tables), ``bench.json`` (one row per implementation x batch), and ``bench.png``
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


# -- the one-line comparison ``make run`` ends with --------------------------------------------
SPEED_LINE_IMPLS = ("torchvision", "onnxruntime", "fastres", "fastres-engine")
_LINE_NAMES = {"torchvision": "torchvision", "onnxruntime": "ONNX Runtime", "fastres": "fastres module",
               "fastres-engine": "fastres Engine"}


def speed_line(device: Optional[str] = None, arch: str = "resnet50", batch: Optional[int] = None,
               rounds: int = 5) -> str:
    """One line: images/s of torchvision, ONNX Runtime (CPU, when installed), the fastres module
    and the Engine on this machine, interleaved, median of ``rounds`` (a few seconds on CPU)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    batch = batch or (1 if device == "cpu" else 2)
    settings = replace(CPU if device == "cpu" else Settings(), archs=(arch,), batches=(batch,),
                       min_rounds=rounds, max_rounds=rounds, gpu_compile_mode=None)
    workload = Workload(arch, 224, device, settings=settings)
    runners, notes = {}, []
    for impl in SPEED_LINE_IMPLS:
        if impl == "onnxruntime" and device != "cpu":
            continue
        try:
            runners[impl] = workload.runner(impl, batch)
            runners[impl]()                   # warm-up (`fastres verify` checked the answers)
        except Skip as skip:
            notes.append(f"{_LINE_NAMES[impl]} skipped: {skip}")
        except Exception as err:  # noqa: BLE001 - a comparison must not fail `make run`
            notes.append(f"{_LINE_NAMES[impl]} failed: {type(err).__name__}: {err}")
    load = load_average()
    times = measure_interleaved(runners, rounds, _pause(settings, device))
    speed = {impl: batch / statistics.median(t) for impl, t in times.items()}
    ref = speed.get("onnxruntime") or speed.get("torchvision")
    ref_name = "ORT" if "onnxruntime" in speed else "torchvision"
    parts = []
    for impl, value in speed.items():
        ratio = f" ({value / ref:.2f}x {ref_name})" if impl in FASTRES_IMPLS and ref else ""
        parts.append(f"{_LINE_NAMES[impl]} {value:.1f}{ratio}")
    threads = ""
    if device == "cpu":
        threads = f", {torch.get_num_threads()} threads"
        used = _governed_threads(torch.get_num_threads())
        if used is not None and used < torch.get_num_threads():
            threads += f" (fastres used {used}: other processes busy)"
    where = f"{device_name(device)}{threads}" + (f", load {load:.2f}" if load is not None else "")
    line = (f"speed, {arch} {str(workload.dtype).removeprefix('torch.')} 224x224 batch {batch} "
            f"({where}; images/s, interleaved median of {rounds}): " + " | ".join(parts))
    return line + "".join(f"\n  ({note})" for note in notes)
