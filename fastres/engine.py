"""Batched inference: a frozen plan, fixed batch buckets, CUDA graphs, uint8 images in, logits out.

    engine = fastres.Engine("resnet50.safetensors", batch_sizes=(1, 8, 32))   # or a model
    logits = engine(images)                 # uint8 [N, 224, 224, 3], any N >= 1
    top = engine.classify(images, topk=5)   # top.indices, top.probs, top.labels

What an engine serves
    The model's BN-folded plan as it is when the engine is built, in the engine's dtype and on its
    device: the weights are copied, so training or editing the model afterwards does not reach a
    built engine (build a new one to serve new weights).

Buckets
    ``batch_sizes`` are the batch shapes the engine runs. A call with N rows returns exactly N rows
    of logits: full chunks of the largest bucket, and the rest padded up to the smallest bucket that
    holds it (rows are independent, so padding rows never change real ones). The CPU torch path
    needs no fixed shapes and does not pad (below).

Execution, chosen once at build time
    * CUDA (``executor == "cuda-graphs"``): per bucket a static input, activation buffers allocated
      once (values whose lifetimes do not overlap share memory), one warm-up forward (compiles the
      Triton kernels and packs their weights) and one captured CUDA graph that runs preprocessing
      and the whole plan; a call copies its rows in, replays, and clones the logits out. All
      buckets' graphs share one graph memory pool, which is safe because replays are serialised.
      ``cuda_graphs=False`` gives the same path without graphs (``"static-buffers"``).
    * CPU, Triton backend under ``TRITON_INTERPRET=1`` (tests): the same static-buffer path, no graphs.
    * CPU, torch backend: no graphs, no padding (a call runs its rows in chunks of at most the
      largest bucket). float32 runs the plan as the CPU backend's oneDNN program (``"onednn"``,
      ``fastres.backend.CpuBackend``: the same program the eval module runs, fused convolutions
      with bias + residual + ReLU as post-ops, on weights reordered for the chunk's bucket once, on
      the bucket's first call); other dtypes, or a PyTorch without the oneDNN ops, run the plan's
      references (``"plan"``).

Threads (CPU)
    ``num_threads`` (default: ``torch.get_num_threads()`` where the engine is built) is the
    intra-op thread count every call runs with, from whichever thread it is called: oneDNN reads
    the calling thread's OpenMP setting, which in a fresh worker thread is the OpenMP default, not
    ``torch.set_num_threads``'s value. The call sets it for its own thread and restores it. With
    ``adaptive_threads`` on (None, the default: the process's ``FASTRES_ADAPTIVE_THREADS``, on
    unless it is 0) a call uses fewer while other processes keep the cores busy
    (``fastres.backend.ThreadGovernor``: OpenMP ops wait at every barrier for a descheduled thread,
    so two threads sharing two cores with a busy process run several times slower than one), for
    input shapes where fewer threads were checked to give the same bits as ``num_threads``
    on a fixed random input (``CpuBackend.execute``; another summation order would show in its
    bits), so the logits do not depend on the machine's load.

Input normalisation ("whichever the plan picks")
    An 8-bit engine (a ``fastres.quantize`` model) feeds uint8 images straight into the model's
    pixel stem (``QuantizedModel.pixel_plan``): int8 p - 128 in the stem's bordered layout, the
    normalisation folded into the stem's weights, its border corrected exactly in the accumulator,
    when the engine's mean/std are those the stem folds (the model's ``meta``, the default);
    otherwise, and for a model without one, as below into its float input.
    uint8 images are normalised by the extension's ``preprocess`` into the 3-channel channels_last
    tensor the stem takes (``pad_channels_to=3``: the stem weight has 3 input channels and the
    Triton conv handles the 3-channel K itself, so a zero 4th channel would only add bytes). Folding
    the normalisation into the stem (``fastres.normalize``) is not used on any path: the Triton conv
    cannot pad raw pixels with per-channel values yet, and on CPU the folded stem needs a padded
    float copy of the image, the same memory traffic as ``preprocess``, while rounding differently.

Thread safety
    The static-buffer paths hold one lock for a whole call (copy in, replay, copy out) and issue
    all work on one engine stream, which waits for the caller's current stream first and which the
    caller's stream waits for afterwards: calls from many threads are serialised on the GPU in lock
    order and return what one thread would get (the lock also serialises Triton-interpreter runs,
    which are not thread-safe). The CPU torch paths share only read-only weights and allocate
    their activations per call, so they run concurrently without a lock; only a bucket's first
    oneDNN weight reorder takes the backend's.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import threading
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch import nn

from . import backend as _backend
from .capture import capture
from .ir import Plan
from .quantized import DTYPES as QUANTIZED_DTYPES
from .quantized import QuantizedModel
from .quantized import run_plan as run_quantized

__all__ = ["Engine", "Classification", "IMAGENET_MEAN", "IMAGENET_STD", "INPUT_MODES"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_MODES = ("uint8_nhwc", "float_nchw")
DEFAULT_BATCH_SIZES = (1, 8, 32, 128, 256)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# 8-bit engines serve a fastres.quantize model: its name for each 8-bit dtype
_EIGHT_BIT = {"int8": "int8", "fp8": "fp8", torch.int8: "int8", torch.float8_e4m3fn: "fp8"}
_WARMUP_FORWARDS = 2   # the first compiles the Triton kernels; the second runs them as captured


class Classification(NamedTuple):
    """Top-k of ``Engine.classify``: ``indices`` [N, k] int64, ``probs`` [N, k] float32 (softmax
    of the logits), ``labels`` [N][k] class names when the model carries them, else None."""
    indices: torch.Tensor
    probs: torch.Tensor
    labels: Optional[list]


# -- freezing the model -----------------------------------------------------------------------
def _frozen_model(model: nn.Module, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """An inference-only, BN-folded copy of ``model`` in ``dtype`` on ``device`` that nothing else
    references (so later edits of ``model`` cannot reach the engine's plan)."""
    from .fold import conv_norm_pairs
    from .models import ResNet, fold_bn, from_torchvision

    if not isinstance(model, nn.Module):
        raise TypeError(f"fastres.Engine takes a ResNet module or the path of a fastres export, "
                        f"got {type(model).__name__}")
    source = model if isinstance(model, ResNet) else from_torchvision(model)
    if not getattr(source, "inference_only", False):
        return fold_bn(source, dtype=dtype).to(device)
    # already folded (fastres.load): cast weights like fold_bn does, biases stay fp32
    frozen = copy.deepcopy(source)
    with torch.no_grad():
        for conv_name, _ in conv_norm_pairs(frozen):
            conv = frozen.get_submodule(conv_name)
            conv.weight = nn.Parameter(conv.weight.to(dtype), requires_grad=False)
        for p in frozen.fc.parameters():
            p.data = p.data.to(dtype)
    return frozen.to(device)


def _frozen_quantized(qmodel, device: torch.device):
    """A copy of a ``fastres.quantize`` module on ``device`` that nothing else references: its
    8-bit weights, scales and plan (packed weights are dropped with the move and made again)."""
    return copy.deepcopy(qmodel).to(device)


def _eight_bit_name(dtype) -> Optional[str]:
    """"int8" / "fp8" for an 8-bit engine dtype, None for anything else."""
    try:
        return _EIGHT_BIT.get(dtype)
    except TypeError:       # unhashable
        return None


# -- buckets ----------------------------------------------------------------------------------
@dataclass(eq=False)
class _Bucket:
    """One batch shape of the static-buffer path: its input, its forward, maybe its CUDA graph."""
    size: int
    static_input: torch.Tensor
    forward: Callable[[], torch.Tensor]       # reads static_input, returns [size, classes] logits
    graph: Optional["torch.cuda.CUDAGraph"] = None
    graph_output: Optional[torch.Tensor] = None

    def run(self) -> torch.Tensor:
        if self.graph is None:
            return self.forward()
        self.graph.replay()
        return self.graph_output


def _on_device(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


# -- the engine -------------------------------------------------------------------------------
class Engine:
    """Batched inference over a frozen, BN-folded ResNet plan (see the module docstring).

    ``model_or_exported_path``: a fastres or torchvision ResNet, a ``fastres.quantize`` module, or
    the path of a ``fastres.export`` file (of either). ``batch_sizes``: the buckets.
    ``image_size``: the square input side, default the model's preprocessing crop, else 224.
    ``dtype``: compute dtype, default float16 on CUDA and float32 on CPU for a float model;
    ``"int8"`` / ``"fp8"`` (or ``torch.int8`` / ``torch.float8_e4m3fn``) serve a quantized model,
    the default for one. An 8-bit engine takes a model ``fastres.quantize`` made (or its export):
    ``Engine(float_model, dtype="int8")`` raises, because choosing 8-bit scales needs calibration
    images only the caller has (``qmodel = fastres.quantize(model.eval(), images, dtype="int8")``,
    then ``Engine(qmodel)``), and a quantized model is served only in its own dtype. An 8-bit
    engine returns fp32 logits and runs the quantized model's own plan: its logits equal the
    module's on the same input (on CUDA the Triton 8-bit kernels, on CPU the module's CPU path).
    ``device``: default the model's device (CUDA when available for an exported path).
    ``input``: ``"uint8_nhwc"`` (uint8 ``[N, H, W, 3]`` RGB pixels, normalised with
    ``mean``/``std``) or ``"float_nchw"`` (normalised float ``[N, 3, H, W]``, contiguous or
    channels_last, as the model itself takes). ``mean``/``std`` (0-1 scale) default to the model's
    preprocessing metadata, else ImageNet's. ``cuda_graphs``: capture one graph per bucket on CUDA.
    ``num_threads``: intra-op threads of every CPU call (default ``torch.get_num_threads()``);
    ``adaptive_threads``: fewer of them while other processes keep the cores busy (None: the
    process's ``FASTRES_ADAPTIVE_THREADS`` setting, on by default).

    The backend (Triton on CUDA, torch on CPU, or what ``fastres.use_backend``/``FASTRES_BACKEND``
    force) is chosen when the engine is built and stays fixed.
    """

    def __init__(self, model_or_exported_path, *, batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
                 image_size: Optional[int] = None, dtype: Optional[torch.dtype] = None,
                 device=None, input: str = "uint8_nhwc", mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None, cuda_graphs: bool = True,
                 num_threads: Optional[int] = None, adaptive_threads: Optional[bool] = None):
        model = model_or_exported_path
        if isinstance(model, (str, os.PathLike)):
            from .checkpoint import load
            model = load(model)
            default_device = "cuda" if torch.cuda.is_available() else "cpu"
        elif isinstance(model, QuantizedModel):
            default_device = model.plan.device
        elif isinstance(model, nn.Module):
            param = next(model.parameters(), None)
            default_device = param.device if param is not None else "cpu"
        else:
            raise TypeError(f"fastres.Engine takes a ResNet module or the path of a fastres export, "
                            f"got {type(model).__name__}")
        self.device = torch.device(device if device is not None else default_device)
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"fastres.Engine: device {self.device} requested but no CUDA device is available")
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
        elif self.device.type != "cpu":
            raise ValueError(f"fastres.Engine: runs on CPU or CUDA, not {self.device}")
        self.quantized = self._check_dtype(model, dtype)
        self.pixel_stem = False
        if self.quantized:
            dtype = QUANTIZED_DTYPES[self.quantized]
        elif dtype is None:
            dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.dtype = dtype
        # what the plan's input and the normalised images are in (an 8-bit plan takes fp32)
        self._input_dtype = torch.float32 if self.quantized else dtype
        if input not in INPUT_MODES:
            raise ValueError(f"fastres.Engine: input must be one of {INPUT_MODES}, got {input!r}")
        self.input = input
        self.batch_sizes = self._check_batch_sizes(batch_sizes)
        if num_threads is None:
            num_threads = torch.get_num_threads()
        if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
            raise ValueError(f"fastres.Engine: num_threads must be a positive int, got {num_threads!r}")
        self.num_threads = num_threads
        self.adaptive_threads = None if adaptive_threads is None else bool(adaptive_threads)

        meta = dict(getattr(model, "meta", None) or {})
        preprocess = meta.get("preprocess") or {}
        self.categories = list(meta["categories"]) if meta.get("categories") else None
        self.preprocess_meta = dict(preprocess) if preprocess else None
        if image_size is None:
            image_size = preprocess.get("crop") or 224
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"fastres.Engine: image_size must be a positive int, got {image_size!r}")
        self.image_size = image_size
        self.mean = self._check_stats(mean if mean is not None else preprocess.get("mean") or IMAGENET_MEAN, "mean")
        self.std = self._check_stats(std if std is not None else preprocess.get("std") or IMAGENET_STD, "std")
        if any(s == 0 for s in self.std):
            raise ValueError(f"fastres.Engine: std must be nonzero, got {list(self.std)}")

        with torch.no_grad():
            if self.quantized:
                frozen = _frozen_quantized(model, self.device)
                self.arch = f"quantized {self.quantized}"
                self.plan = frozen.plan
                # uint8 images straight into the model's pixel stem, which folds its normalisation
                self.pixel_stem = (self.input == "uint8_nhwc" and frozen.pixel_plan is not None
                                   and frozen.pixel_stats == (self.mean, self.std))
                if self.pixel_stem:
                    self.plan, self._input_dtype = frozen.pixel_plan, torch.uint8
            else:
                frozen = _frozen_model(model, dtype, self.device)
                self.arch = getattr(frozen, "arch", "resnet")
                self.plan = capture(frozen)
        self.num_classes = self.plan.classes(self._input_shape(1))
        if self.categories is not None and len(self.categories) != self.num_classes:
            raise ValueError(f"fastres.Engine: {len(self.categories)} categories for a model with "
                             f"{self.num_classes} classes")
        if self.input == "uint8_nhwc" and (self.plan.in_channels or 3) != 3:
            raise ValueError(f"fastres.Engine: uint8 RGB input needs a 3-channel stem, this model's "
                             f"has {self.plan.in_channels}; use input='float_nchw'")
        self.backend = _backend.backend_for(self.device)
        self._backend_impl = _backend.get_backend(self.backend)

        if self.pixel_stem:      # the plan's input: the images' NHWC bytes as [N, 3, H, W]
            self._normaliser = lambda images: images.permute(0, 3, 1, 2)
        else:
            self._normaliser = (self._make_normaliser() if self.input == "uint8_nhwc"
                                else lambda images: images)
        self._lock = threading.Lock()
        self._buckets: dict[int, _Bucket] = {}
        self._stream = None
        if self.device.type == "cpu" and self.backend in ("torch", "reference"):
            onednn = (self.backend == "torch" and dtype == torch.float32
                      and _backend.onednn_available())
            self.executor = "onednn" if onednn else "plan"
        else:
            use_graphs = bool(cuda_graphs) and self.device.type == "cuda"
            self.executor = "cuda-graphs" if use_graphs else "static-buffers"
            self._build_buckets(use_graphs)

    # -- argument checks ----------------------------------------------------------------------
    @staticmethod
    def _check_dtype(model, dtype) -> Optional[str]:
        """"int8" / "fp8" for an 8-bit engine (a quantized model, in its own dtype), None for a
        float one (a float model in one of ``_DTYPES``); anything else is refused."""
        eight_bit = _eight_bit_name(dtype)
        if isinstance(model, QuantizedModel):
            if dtype is None or eight_bit == model.dtype:
                return model.dtype
            raise TypeError(f"fastres.Engine: this model is quantized ({model.dtype}): build the engine with "
                            f"dtype={model.dtype!r} (or no dtype), or pass the float model for dtype={dtype}")
        if eight_bit is not None:
            raise TypeError(f"fastres.Engine: dtype={dtype!r} serves a quantized model, and quantizing needs "
                            f"calibration images: qmodel = fastres.quantize(model.eval(), calibration, "
                            f"dtype={eight_bit!r}), then fastres.Engine(qmodel) (or fastres.export it and pass "
                            "the file)")
        if dtype is not None and dtype not in _DTYPES:
            raise TypeError(f"fastres.Engine: dtype must be one of {_DTYPES}, 'int8' or 'fp8', got {dtype!r}")
        return None

    @staticmethod
    def _check_batch_sizes(batch_sizes) -> tuple[int, ...]:
        try:
            sizes = sorted(set(int(b) for b in batch_sizes))
        except (TypeError, ValueError):
            raise TypeError(f"fastres.Engine: batch_sizes must be a sequence of ints, got {batch_sizes!r}") from None
        if not sizes or sizes[0] < 1 or any(isinstance(b, bool) for b in batch_sizes):
            raise ValueError(f"fastres.Engine: batch_sizes must be positive ints, got {batch_sizes!r}")
        return tuple(sizes)

    @staticmethod
    def _check_stats(values, name: str) -> tuple[float, ...]:
        values = values.tolist() if torch.is_tensor(values) else values
        try:
            floats = tuple(float(v) for v in values)
        except (TypeError, ValueError):
            raise TypeError(f"fastres.Engine: {name} must be 3 numbers, got {values!r}") from None
        if len(floats) != 3 or not all(math.isfinite(v) for v in floats):
            raise ValueError(f"fastres.Engine: {name} must be 3 finite per-channel values (0-1 "
                             f"scale), got {list(floats)}")
        return floats

    def _input_shape(self, batch: int) -> tuple:
        return (batch, self.plan.in_channels or 3, self.image_size, self.image_size)

    # -- the static-buffer path ---------------------------------------------------------------
    def _build_buckets(self, use_graphs: bool) -> None:
        pool = None
        if self.device.type == "cuda":
            # one stream for all of the engine's GPU work: calls are ordered on it (thread safety)
            self._stream = torch.cuda.Stream(self.device)
        if use_graphs:
            pool = torch.cuda.graph_pool_handle()
        with _on_device(self.device):
            for size in self.batch_sizes:
                try:
                    self._buckets[size] = self._build_bucket(size, use_graphs, pool)
                except torch.OutOfMemoryError as err:
                    raise torch.OutOfMemoryError(self._oom_message(size)) from err

    def bucket_bytes(self, size: int) -> int:
        """Bytes of the static input and activation buffers the bucket ``size`` allocates."""
        shape = self._input_shape(size)
        _, slot_sizes = self.plan.memory_layout(shape)
        item = self._input_dtype.itemsize
        total = sum(slot_sizes)
        if self.pixel_stem:     # uint8 images + the stem's int8 bordered copy of them (in the graph pool)
            total += math.prod(shape) + math.prod(self.plan.value_shapes(shape)[self.plan.steps[0].output])
        elif self.input == "uint8_nhwc":   # uint8 images + their normalised copy (in the graph pool)
            total += size * self.image_size ** 2 * 3 * (1 + item)
        else:
            total += math.prod(self._input_shape(size)) * item
        return total

    def _oom_message(self, size: int) -> str:
        free = ""
        if self.device.type == "cuda":
            try:
                free_bytes, total_bytes = torch.cuda.mem_get_info(self.device)
                free = f"; {_mib(free_bytes)} of {_mib(total_bytes)} free on {self.device} now"
            except RuntimeError:
                pass
        built = ", ".join(str(b) for b in self._buckets) or "none"
        return (f"fastres.Engine: out of memory building batch bucket {size} "
                f"({self.arch} {str(self.dtype).removeprefix('torch.')} {self.image_size}x"
                f"{self.image_size}): it needs {_mib(self.bucket_bytes(size))} for its input and "
                f"activation buffers, plus the kernels' workspace{free}. Buckets built before it: "
                f"{built}. Use smaller batch_sizes or a smaller image_size.")

    def _build_bucket(self, size: int, use_graphs: bool, pool) -> _Bucket:
        shape = self._input_shape(size)
        if self.input == "uint8_nhwc":
            static = torch.zeros((size, self.image_size, self.image_size, 3), dtype=torch.uint8,
                                 device=self.device)
        else:
            static = torch.zeros(shape, dtype=self._input_dtype, device=self.device).contiguous(
                memory_format=torch.channels_last)
        buffers = self.plan.allocate(shape)
        plan, backend, normalise = self.plan, self._backend_impl, self._normaliser

        run = run_quantized if self.quantized else Plan.run

        def forward() -> torch.Tensor:
            return run(plan, normalise(static), backend, buffers=buffers)

        bucket = _Bucket(size, static, forward)
        if self._stream is not None:
            # compile the Triton kernels and pack their weights now, not in the first call
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                for _ in range(_WARMUP_FORWARDS):
                    forward()
            self._stream.synchronize()
        if use_graphs:
            graph = torch.cuda.CUDAGraph()
            # thread_local: other threads of the process may use CUDA while this one captures
            with torch.cuda.graph(graph, pool=pool, stream=self._stream,
                                  capture_error_mode="thread_local"):
                bucket.graph_output = forward()
            bucket.graph = graph
        return bucket

    def _make_normaliser(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """uint8 [N, H, W, 3] -> normalised [N, 3, H, W] channels_last in the engine dtype."""
        from .extension import _import_extension, preprocess

        mean, std, dtype = self.mean, self.std, self._input_dtype
        module, _ = _import_extension()
        if module is not None and (self.device.type != "cuda" or module.cuda_built):
            stem = self.plan.steps[0]
            if (self.backend == "triton" and stem.attrs.get("padded_input")
                    and stem.inputs.get("x") == self.plan.input_name
                    and all(self.plan.input_name not in s.reads for s in self.plan.steps[1:])):
                # the Triton stem reads a zero-bordered 4-channel input: preprocess writes it directly
                from .kernels.conv2d_nhwc import STEM_CHANNELS, stem_input_padding
                padding, stride = stem.attrs["padding"][0], stem.attrs["stride"][0]
                return lambda images: preprocess(
                    images, mean, std, dtype=dtype, pad_channels_to=STEM_CHANNELS,
                    border=stem_input_padding(images.shape[1], images.shape[2], padding, stride))
            return lambda images: preprocess(images, mean, std, dtype=dtype, pad_channels_to=3)
        # Without the compiled op, the same fp32 fma with constants made here: preprocess's own
        # fallback builds them per call, a host-to-device copy a CUDA graph cannot capture.
        scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=self.device)
        shift = torch.tensor([-m / s for m, s in zip(mean, std)], device=self.device)
        return lambda images: torch.addcmul(shift, images.float(), scale).to(dtype).permute(0, 3, 1, 2)

    def _run_bucket(self, bucket: _Bucket, rows: torch.Tensor) -> torch.Tensor:
        n = rows.shape[0]
        with self._lock:
            if self._stream is None:   # CPU tensors (Triton interpreter): the call is synchronous
                bucket.static_input[:n].copy_(rows)
                return bucket.run()[:n].clone()
            with torch.cuda.device(self.device):
                caller = torch.cuda.current_stream(self.device)
                self._stream.wait_stream(caller)
                with torch.cuda.stream(self._stream):
                    bucket.static_input[:n].copy_(rows)
                    if rows.device.type == "cuda":
                        rows.record_stream(self._stream)
                    logits = bucket.run()[:n].clone()
                caller.wait_stream(self._stream)
                logits.record_stream(caller)
            return logits

    # -- calls --------------------------------------------------------------------------------
    def __call__(self, images) -> torch.Tensor:
        """Logits ``[N, num_classes]`` (engine dtype, fp32 for an 8-bit engine; engine device) for a
        batch of N >= 1 images."""
        images = self._check_images(images)
        with torch.no_grad():
            if self._buckets:
                return self._run_static(images)
            chunks = images.split(self.batch_sizes[-1])
            outs = [self._run_cpu(chunk) for chunk in chunks]
            return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _run_cpu(self, images: torch.Tensor) -> torch.Tensor:
        # the engine's thread count for this call (the governor may use fewer, in execute)
        with _backend.intra_op_threads(self.num_threads):
            x = self._normaliser(images) if self.input == "uint8_nhwc" else images.to(self._input_dtype)
            if self.executor == "onednn":
                return self._backend_impl.execute(self.plan, x, weight_batch=self._bucket_for(x.shape[0]),
                                                  capacity=2 * len(self.batch_sizes),
                                                  adaptive=self.adaptive_threads)
            # (a quantized plan too: the module's own path, run_quantized without buffers)
            return self._backend_impl.execute(self.plan, x, adaptive=self.adaptive_threads)

    def _bucket_for(self, rows: int) -> int:
        return next(b for b in self.batch_sizes if b >= rows)

    def _run_static(self, images: torch.Tensor) -> torch.Tensor:
        largest = self.batch_sizes[-1]
        outs = []
        for start in range(0, images.shape[0], largest):
            rows = images[start:start + largest]
            outs.append(self._run_bucket(self._buckets[self._bucket_for(rows.shape[0])], rows))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def classify(self, images, topk: int = 5) -> Classification:
        """Top-``topk`` classes per image (``topk`` is capped at the number of classes)."""
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise ValueError(f"fastres.Engine.classify: topk must be a positive int, got {topk!r}")
        probs = self(images).float().softmax(dim=-1)
        top_probs, top_indices = probs.topk(min(topk, probs.shape[-1]), dim=-1)
        labels = None
        if self.categories is not None:
            labels = [[self.categories[i] for i in row] for row in top_indices.tolist()]
        return Classification(top_indices, top_probs, labels)

    # -- input checks -------------------------------------------------------------------------
    def _check_images(self, images) -> torch.Tensor:
        if not torch.is_tensor(images):
            if type(images).__module__ == "numpy":
                images = torch.from_numpy(images)
            else:
                raise TypeError(f"fastres.Engine: images must be a torch.Tensor, got {type(images).__name__}")
        s = self.image_size
        if images.device.type != "cpu" and images.device != self.device:
            raise ValueError(f"fastres.Engine: images are on {images.device}, the engine on "
                             f"{self.device} (CPU tensors are copied over; other devices are not)")
        if self.input == "uint8_nhwc":
            expected = f"uint8 RGB images [N, {s}, {s}, 3]"
            if images.dtype != torch.uint8:
                raise TypeError(f"fastres.Engine: expected {expected}, got dtype {images.dtype} "
                                "(for normalised float [N, 3, H, W] input build the engine with "
                                "input='float_nchw')")
            if images.dim() != 4:
                hint = " (add a batch dimension with images.unsqueeze(0))" if images.dim() == 3 else ""
                raise ValueError(f"fastres.Engine: expected {expected}, got shape {tuple(images.shape)}{hint}")
            if images.shape[3] != 3:
                hint = (" (that looks like [N, 3, H, W]: pass images.permute(0, 2, 3, 1).contiguous())"
                        if images.shape[1] == 3 else "")
                raise ValueError(f"fastres.Engine: expected {expected} with 3 channels last, got shape "
                                 f"{tuple(images.shape)}{hint}")
            height, width = images.shape[1], images.shape[2]
        else:
            c = self.plan.in_channels or 3
            expected = f"float images [N, {c}, {s}, {s}]"
            if not images.is_floating_point():
                hint = (" (for uint8 pixels build the engine with input='uint8_nhwc')"
                        if images.dtype == torch.uint8 else "")
                raise TypeError(f"fastres.Engine: expected {expected}, got dtype {images.dtype}{hint}")
            if images.dim() != 4:
                hint = " (add a batch dimension with images.unsqueeze(0))" if images.dim() == 3 else ""
                raise ValueError(f"fastres.Engine: expected {expected}, got shape {tuple(images.shape)}{hint}")
            if images.shape[1] != c:
                raise ValueError(f"fastres.Engine: expected {expected} with {c} channels, got shape "
                                 f"{tuple(images.shape)}")
            height, width = images.shape[2], images.shape[3]
        if (height, width) != (s, s):
            raise ValueError(f"fastres.Engine: images are {height}x{width}, this engine runs "
                             f"{s}x{s} (resize and crop them first, or build it with "
                             f"image_size={height if height == width else '...'})")
        if images.shape[0] == 0:
            raise ValueError("fastres.Engine: empty batch (0 images); pass at least one image")
        if self.input == "uint8_nhwc" and not images.is_contiguous():
            raise ValueError(f"fastres.Engine: uint8 images must be contiguous [N, H, W, 3], got strides "
                             f"{images.stride()}; call images.contiguous()")
        if self.input == "float_nchw" and not (
                images.is_contiguous() or images.is_contiguous(memory_format=torch.channels_last)):
            raise ValueError(f"fastres.Engine: float images must be contiguous NCHW or channels_last, "
                             f"got strides {images.stride()}; call images.contiguous()")
        return images

    def __repr__(self) -> str:
        return (f"Engine({self.arch}, {self.num_classes} classes, {self.device} "
                f"{str(self.dtype).removeprefix('torch.')}, input={self.input} "
                f"{self.image_size}x{self.image_size}, batch_sizes={self.batch_sizes}, "
                f"backend={self.backend}, executor={self.executor}"
                + (", pixel stem" if self.pixel_stem else "")
                + (f", num_threads={self.num_threads})" if self.device.type == "cpu" else ")"))
