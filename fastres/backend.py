"""Which kernels execute a plan: backend objects whose ``execute(plan, x)`` runs it.

The choice is made per call from the tensors' device, so one op never resolves two ways behind the
user's back:

* CUDA tensors -> ``triton`` (our kernels); CPU tensors -> ``torch`` (``CpuBackend``: float32 runs
  as one oneDNN program per plan, a quantized plan's int8 convs as oneDNN int8 convolutions inside
  it, other dtypes the references in kernels/); ``meta`` tensors ->
  ``triton`` (recording launches for ``fastres aot`` / ``fastres inspect``).
* ``FASTRES_BACKEND=triton|torch|reference`` (read when fastres is imported) or
  ``fastres.set_backend(...)`` / ``with fastres.use_backend(...)`` force one. ``reference`` runs
  every step as the plain-PyTorch reference beside its kernel (``F.conv2d`` in channels_last): the
  fallback the CPU backend uses where oneDNN is missing, and what the tests compare it with.
  Forcing ``triton`` on CPU tensors needs ``TRITON_INTERPRET=1`` in the environment before fastres
  is imported: that is how the exact GPU code path runs in tests.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import threading
import time

import torch

from . import cpu_kernels, winograd
from .extension import _notice_once

BACKENDS = ("auto", "torch", "reference", "triton")

_state = threading.local()
_global_choice: str | None = None


def _validate(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown fastres backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def set_backend(name: str | None) -> None:
    """Force a backend for every thread (``None`` or ``"auto"`` restores the default rule)."""
    global _global_choice
    _global_choice = None if name is None else _validate(name)


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend inside a ``with`` block, for the current thread."""
    previous = getattr(_state, "choice", None)
    _state.choice = _validate(name)
    try:
        yield
    finally:
        _state.choice = previous


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# FASTRES_BACKEND is read once, at import: this runs on every forward, and an os.environ lookup
# costs about a microsecond.
_ENV_CHOICE = _validate(os.environ.get("FASTRES_BACKEND") or "auto")


def requested_backend() -> str:
    choice = getattr(_state, "choice", None) or _global_choice
    return choice if choice is not None else _ENV_CHOICE


def backend_for(device: torch.device) -> str:
    """Name of the backend that runs a plan on tensors of ``device``."""
    choice = requested_backend()
    if device.type == "meta":
        return "triton"
    if choice == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if choice == "triton" and device.type != "cuda" and not interpreter_enabled():
        raise RuntimeError(
            f"the triton backend runs {device.type} tensors only under the Triton interpreter: set "
            "TRITON_INTERPRET=1 in the environment before importing fastres, or use CUDA tensors")
    return choice


# -- implementations --------------------------------------------------------------------------
class ReferenceBackend:
    """Runs each step as the plain-PyTorch reference beside its kernel (channels_last).

    On CPU, half-precision steps compute in fp32 and round once, like the kernels' epilogues.
    """
    name = "reference"

    def execute(self, plan, x, weight_batch=None, capacity=None, adaptive=None):
        """``plan`` on ``x`` (the keywords are ``CpuBackend``'s layout and thread hints: one call
        for every backend; the step references have no layouts to keep)."""
        return plan.run(x, self)

    def prepare(self, step, op):
        return None

    def to_nhwc(self, x):
        return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x

    def layout(self, step, role, x):
        """``x`` (read by ``step`` as ``role``, written by no kernel) in the layout the step takes."""
        return self.to_nhwc(x)

    def run(self, step, op, args, out):
        x = args.get("x")
        upcast = (x is not None and x.device.type == "cpu"
                  and x.dtype in (torch.float16, torch.bfloat16))
        return op.reference(step, args, out, upcast)


class TritonBackend:
    """Runs each kernel step as one Triton kernel launch; weights are packed once per plan.
    PyTorch steps run as PyTorch runs them."""
    name = "triton"

    def execute(self, plan, x, weight_batch=None, capacity=None, adaptive=None):
        return plan.run(x, self)

    def to_nhwc(self, x):
        """NHWC activations for the kernels: channels_last input is used as is; NCHW input goes
        through the extension's tiled transpose (a CUDA kernel, or its C++ twin on CPU)."""
        if x.dim() != 4 or x.is_contiguous(memory_format=torch.channels_last):
            return x     # (a 2-D operand, e.g. an SE gate, has no layout to change)
        if x.is_contiguous() and x.device.type != "meta":
            from .extension import nchw_to_nhwc
            return nchw_to_nhwc(x)
        return x.contiguous(memory_format=torch.channels_last)

    def layout(self, step, role, x):
        """The stem reads the plan input as it comes: its launch writes the zero-bordered 4-channel
        copy it runs on (kernels.conv2d_nhwc ROW_K) instead of a plain NHWC transpose."""
        if role == "x" and step.attrs.get("padded_input"):
            return x
        return self.to_nhwc(x)

    def prepare(self, step, op):
        """Pack ``step``'s weights for its kernel, once per plan (``step.packed["triton"]``)."""
        packed = step.packed.get(self.name)
        if packed is None and op.pack is not None:
            packed = step.packed[self.name] = op.pack(step)
        return packed

    def run(self, step, op, args, out):
        if op.launch is None:
            return op.reference(step, args, out, False)
        return op.launch(step, args, self.prepare(step, op), out)


# -- CPU: intra-op threads ----------------------------------------------------------------------
def _find_openmp():
    """``omp_set_num_threads`` of the OpenMP runtime PyTorch uses (it sets the calling thread's
    count only), or None. Several runtimes can be loaded (scikit-learn and others ship their own
    libgomp): the one whose setting ``torch.get_num_threads()`` then reports is PyTorch's."""
    import ctypes
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if ".so" in line.rsplit("/", 1)[-1]}
    except OSError:
        return None
    torch_dir = os.path.dirname(torch.__file__)
    runtimes = ("libgomp", "libiomp5", "libomp")
    candidates = sorted((p for p in paths if any(n in os.path.basename(p) for n in runtimes)),
                        key=lambda p: (not p.startswith(torch_dir), p))
    current = torch.get_num_threads()
    for path in candidates:
        try:
            setter = ctypes.CDLL(path).omp_set_num_threads
        except (OSError, AttributeError):
            continue
        setter.argtypes = [ctypes.c_int]
        setter(current + 1)
        ours = torch.get_num_threads() == current + 1
        setter(current)
        if ours:
            return setter
    return None


def _find_mkl_local():
    """MKL's ``MKL_Set_Num_Threads_Local`` (the calling thread's MKL thread count) in the library
    PyTorch links MKL into, or None.

    MKL (PyTorch's BLAS: the Winograd GEMMs' bmm, the head's addmm) keeps its own thread count,
    which a thread's ``omp_set_num_threads`` does not change: without this a call told to use
    one thread still ran its GEMMs on two (resnet50 batch 1 "with one thread" took 243 ms against
    224 with two; with MKL's count set too, 319 ms: one thread)."""
    import ctypes
    # PyTorch's wheels link MKL into libtorch_cpu; other builds load it globally (None: the process)
    for path in (os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"), None):
        try:
            # the C entry (by value); the lower-case name is the Fortran one (by pointer) there
            setter = ctypes.CDLL(path).MKL_Set_Num_Threads_Local
        except (OSError, AttributeError):
            continue
        setter.argtypes = [ctypes.c_int]
        setter.restype = ctypes.c_int
        return setter
    return None


_omp_set_num_threads = None
_mkl_set_num_threads_local = None
_omp_looked_up = False


def set_thread_count(n: int) -> None:
    """Set the calling thread's intra-op thread count to ``n`` without touching other threads.

    oneDNN (OpenMP) reads the *calling thread's* OpenMP setting: a thread PyTorch has not
    initialised runs with the OpenMP default (all cores, or OMP_NUM_THREADS) whatever
    ``torch.set_num_threads`` said in the main thread. ``omp_set_num_threads`` is per thread;
    ``torch.set_num_threads`` would also change the process-wide default (the fallback where the
    OpenMP runtime cannot be found). MKL's own count is set for the thread as well
    (``_find_mkl_local``).
    """
    if per_thread_counts():
        _omp_set_num_threads(int(n))
        if _mkl_set_num_threads_local is not None:
            _mkl_set_num_threads_local(int(n))
    else:
        torch.set_num_threads(int(n))


def per_thread_counts() -> bool:
    """Whether a thread's intra-op count can be set without changing other threads' (PyTorch's
    OpenMP runtime found); without it ``set_thread_count`` changes the process's count, so the
    thread governor does not lower it."""
    global _omp_set_num_threads, _mkl_set_num_threads_local, _omp_looked_up
    if not _omp_looked_up:
        _omp_set_num_threads, _mkl_set_num_threads_local = _find_openmp(), _find_mkl_local()
        _omp_looked_up = True
    return _omp_set_num_threads is not None


@contextlib.contextmanager
def intra_op_threads(n: "int | None"):
    """Run the block with ``n`` intra-op threads in the calling thread (None: PyTorch's setting
    for this thread, ``torch.get_num_threads()``), restoring the thread's count afterwards."""
    current = torch.get_num_threads()     # also PyTorch's once-per-thread initialisation
    if n is None or n == current:
        yield
        return
    set_thread_count(n)
    try:
        yield
    finally:
        set_thread_count(current)


class ThreadGovernor:
    """How many of the configured intra-op threads a CPU call uses: all of them, unless other
    processes keep busy the CPUs this process may run on.

    Why: oneDNN and PyTorch split each op statically over their OpenMP threads and wait at a
    barrier for the slowest. When another process shares the cores, one of the threads is often
    descheduled, and every op (about 50 per resnet50 forward) waits for the scheduler to run it
    again (measured on 2 cores: batch-1 resnet50 from 21 to ~1 image/s with two threads, while one
    thread kept ~4). So every ``WINDOW_S`` seconds (on the next call) it reads how much CPU time
    the machine spent on those CPUs (/proc/stat, per CPU of the affinity mask) and how much of it
    was this process's (``os.times``); the busy cores of *other* processes are subtracted from the
    CPUs of the affinity mask, and calls use at most the cores left (at least one, at most the
    configured count; so never more threads than those CPUs). Quiet: the configured count. On
    unless ``FASTRES_ADAPTIVE_THREADS=0`` or ``set_adaptive_threads(False)``; Linux only.

    Fewer threads must not change an answer: oneDNN picks its blocking for the thread count, and
    a different blocking could sum in another order. So ``CpuBackend.execute`` runs a program with
    fewer threads only for input shapes where it checked, on the first such call, that it gives
    the configured count's bits on a fixed random input (``_Lru.agreement``, beside the
    programs); where it does not, those calls keep the configured count (said once).
    """
    WINDOW_S = 0.5

    def __init__(self):
        self.enabled = os.environ.get("FASTRES_ADAPTIVE_THREADS", "1") not in ("", "0")
        self._lock = threading.Lock()
        self._next = 0.0
        self._last = None        # (monotonic, machine busy ticks, total ticks, process cpu seconds)
        self.cap = 1 << 30       # threads the free cores allow (the last window's reading)
        self.others = 0.0        # cores other processes kept busy in the last window
        try:
            self._cpus = frozenset(os.sched_getaffinity(0))
            self._cpu_stat()
        except (AttributeError, OSError, ValueError):
            self._cpus = None    # no /proc/stat or affinity: no adaptation

    def _cpu_stat(self) -> tuple:
        busy = total = 0
        with open("/proc/stat") as f:
            for line in f:
                if not line.startswith("cpu") or line.startswith("cpu "):
                    if not line.startswith("cpu"):
                        break
                    continue
                fields = line.split()
                if int(fields[0][3:]) not in self._cpus:
                    continue
                ticks = [int(v) for v in fields[1:9]]   # user nice system idle iowait irq softirq steal
                total += sum(ticks)
                busy += sum(ticks) - ticks[3] - ticks[4]
        return busy, total

    def threads(self, configured: int, enabled: "bool | None" = None) -> int:
        """The thread count for a call configured for ``configured`` (``enabled``: this call's
        choice, None for the process's setting)."""
        if configured <= 1 or not (self.enabled if enabled is None else enabled) or self._cpus is None:
            return configured
        now = time.monotonic()
        if now >= self._next and self._lock.acquire(blocking=False):
            try:
                self._sample(now)
            finally:
                self._lock.release()
        return max(1, min(configured, self.cap))

    def _sample(self, now: float) -> None:
        self._next = now + self.WINDOW_S
        try:
            busy, total = self._cpu_stat()
        except (OSError, ValueError):
            self._cpus = None
            return
        cpu = os.times()
        mine = cpu.user + cpu.system
        last, self._last = self._last, (now, busy, total, mine)
        if last is None or total <= last[2]:
            return
        n = len(self._cpus)
        machine = n * (busy - last[1]) / (total - last[2])        # busy cores, all processes
        ours = (mine - last[3]) / max(now - last[0], 1e-6)         # this process's cores
        self.others = max(0.0, machine - ours)
        self.cap = max(1, math.floor(n - self.others + 0.25))


GOVERNOR = ThreadGovernor()


# -- CPU: memory ----------------------------------------------------------------------------------
_MALLOC_TUNING_DEFAULT = os.environ.get("FASTRES_MALLOC_TUNING", "1") not in ("", "0")
_MALLOC_TUNING = _MALLOC_TUNING_DEFAULT
_malloc_tuned = False
MALLOC_THRESHOLD = 1 << 30
MALLOC_FAULT_BYTES = 4 << 20      # two warm forwards faulting in more than this keep freed memory from then on
MALLOC_WATCHED_CALLS = 16         # a program's first calls, page faults counted (see OneDnnProgram)


try:
    import resource as _resource
    _PAGE_BYTES = _resource.getpagesize()
except ImportError:                   # not Unix: no fault counts, malloc left alone
    _resource, _PAGE_BYTES = None, 4096


def _minor_faults() -> int:
    """This process's minor page faults so far (-1 off Unix)."""
    return _resource.getrusage(_resource.RUSAGE_SELF).ru_minflt if _resource is not None else -1


def tune_malloc() -> bool:
    """Keep freed activation memory in the process instead of returning it to the kernel.

    glibc unmaps a freed block above its mmap threshold (dynamic, at most 32 MiB) and trims the
    heap's top past its trim threshold, so a forward whose activations take that path page-faults
    them in again on every call: measured ~100k faults (~400 MB) per resnet50 batch-32 forward on
    the AVX2 machine, 1.50 -> 1.26-1.37 s per batch once they are reused, and on the AVX-512 one
    12-16k faults per resnet50 or resnext50 batch-8 forward (none at batch 1, 2 and 4). This sets
    glibc's mmap and trim thresholds to 1 GiB (``mallopt``), process-wide, once: the heap then keeps
    up to that much freed memory for reuse (resident memory stays near its peak). Called by a CPU
    program two of whose warm calls in a row (same thread, same input shape as the call before)
    page-faulted more than ``MALLOC_FAULT_BYTES`` each (``OneDnnProgram._call_counting_faults``);
    ``FASTRES_MALLOC_TUNING=0`` (read at import) or ``set_malloc_tuning(False)`` before that leaves
    malloc alone. Returns whether it is in effect (False off glibc)."""
    global _malloc_tuned
    if _malloc_tuned or not _MALLOC_TUNING:
        return _malloc_tuned
    try:
        import ctypes
        mallopt = ctypes.CDLL(None).mallopt
        m_trim_threshold, m_mmap_threshold = -1, -3      # glibc's malloc.h
        _malloc_tuned = (mallopt(m_mmap_threshold, MALLOC_THRESHOLD) == 1
                         and mallopt(m_trim_threshold, MALLOC_THRESHOLD) == 1)
    except (OSError, AttributeError):     # not glibc
        _malloc_tuned = False
    return _malloc_tuned


def set_malloc_tuning(enabled: bool) -> None:
    """Allow or forbid ``tune_malloc`` (it cannot be undone once it ran)."""
    global _MALLOC_TUNING
    _MALLOC_TUNING = bool(enabled)


def set_adaptive_threads(enabled: bool) -> None:
    """Turn ``ThreadGovernor`` on or off for every CPU call of the process."""
    GOVERNOR.enabled = bool(enabled)


# -- CPU: oneDNN ---------------------------------------------------------------------------------
_ONEDNN_ENV = os.environ.get("FASTRES_ONEDNN", "1") not in ("", "0")
_onednn_state: "bool | None" = None
_onednn_reason = ""


def onednn_available() -> bool:
    """Whether the private oneDNN ops the CPU backend uses exist and compute what ``F.conv2d``
    does (checked once, on a tiny conv + bias + residual + ReLU; ``FASTRES_ONEDNN=0`` turns them
    off). Where they do not, the CPU backend runs the references (``onednn_unavailable_reason``)."""
    global _onednn_state, _onednn_reason
    if _onednn_state is None:
        _onednn_state, _onednn_reason = _check_onednn()
    return _onednn_state


def onednn_unavailable_reason() -> str:
    onednn_available()
    return _onednn_reason


def _check_onednn() -> tuple:
    if not _ONEDNN_ENV:
        return False, "FASTRES_ONEDNN=0"
    try:
        if not torch.backends.mkldnn.is_available():
            return False, "PyTorch was built without oneDNN (torch.backends.mkldnn)"
        import torch.nn.functional as F
        ops = _OneDnnOps()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 8, 5, 5, generator=g).contiguous(memory_format=torch.channels_last)
        w = torch.randn(16, 4, 3, 3, generator=g)
        b = torch.randn(16, generator=g)
        r = torch.randn(2, 16, 3, 3, generator=g).contiguous(memory_format=torch.channels_last)
        geometry = ([1, 1], [2, 2], [1, 1], 2)
        packed = ops.reorder(w, *geometry, list(x.shape))
        with torch.no_grad():
            expected = F.conv2d(x, w, b, stride=2, padding=1, groups=2)
            got = (ops.conv(x, packed, b, *geometry, "relu", [], ""),
                   ops.conv(x, packed, None, *geometry, "none", [], ""),
                   ops.conv_add(x, r, packed, b, *geometry, "add", None, "relu", [], ""),
                   ops.conv_add(x, r, packed, b, *geometry, "add", None, None, [], ""),
                   ops.conv_add_(r.clone(), x, packed, b, *geometry, "add", None, "relu", [], ""))
            wanted = (expected.relu(), expected - b.view(1, -1, 1, 1), (expected + r).relu(),
                      expected + r, (expected + r).relu())
        for y, e in zip(got, wanted):
            if y.shape != e.shape or not torch.allclose(y, e, rtol=1e-4, atol=1e-4):
                return False, "torch.ops.mkldnn._convolution_pointwise disagrees with F.conv2d here"
        if ops.linear is not None:
            v, m = torch.randn(3, 16, generator=g), torch.randn(5, 16, generator=g)
            c = torch.randn(5, generator=g)
            try:
                ok = torch.allclose(ops.linear(v, m, c, "none", [], ""), F.linear(v, m, c),
                                    rtol=1e-4, atol=1e-4)
            except Exception:  # noqa: BLE001 - the head then uses addmm
                ok = False
            if not ok:
                ops.linear = None
                _OneDnnOps.linear_usable = False
    except Exception as err:  # noqa: BLE001 - private ops: any failure means "use the references"
        return False, f"the oneDNN ops are not usable ({type(err).__name__}: {err})"
    return True, ""


# -- CPU: oneDNN int8 ------------------------------------------------------------------------------
_onednn_int8_state: "bool | None" = None
_onednn_int8_reason = ""


def onednn_int8_available() -> bool:
    """Whether oneDNN's int8 convolution (``torch.ops.onednn.qconv2d_pointwise``, the op behind
    PyTorch's x86 PT2E quantization) exists here and computes our 8-bit steps bit for bit: checked
    once, on small convs of the shapes the 8-bit plan uses (1x1, 3x3 strided, grouped, the 7x7 stem
    on signed input, a residual, saturation, ties) against ``conv2d_nhwc_8bit_ref``. Where it does
    not, the qconv steps run that reference (``onednn_int8_unavailable_reason``)."""
    global _onednn_int8_state, _onednn_int8_reason
    if _onednn_int8_state is None:
        _onednn_int8_state, _onednn_int8_reason = (_check_onednn_int8() if onednn_available()
                                                   else (False, onednn_unavailable_reason()))
    return _onednn_int8_state


def onednn_int8_unavailable_reason() -> str:
    onednn_int8_available()
    return _onednn_int8_reason


def _check_onednn_int8() -> tuple:
    from .kernels.conv2d_nhwc import QuantEpilogue, conv2d_nhwc_8bit_ref
    try:
        ops = _OneDnnOps()
        if ops.qconv is None:
            return False, "torch.ops.onednn.qconv2d_pointwise is missing from this PyTorch"
        g = torch.Generator().manual_seed(0)

        def rand_int8(*shape, low=-128):
            return torch.randint(low, 128, shape, generator=g, dtype=torch.int8)

        def check(name, x, w, *, stride=1, padding=0, groups=1, relu=True, residual=None, out=torch.int8,
                  acc_scale=None, bias=None, inv_scale=None, nonneg=False):
            o = w.shape[0]
            acc_scale = acc_scale if acc_scale is not None else torch.rand(o, generator=g) * 1e-3 + 1e-5
            bias = bias if bias is not None else torch.randn(o, generator=g)
            quant = QuantEpilogue(acc_scale=acc_scale, out_dtype=out,
                                  out_inv_scale=(inv_scale or 3.5) if out == torch.int8 else None,
                                  residual_scale=0.03125 if residual is not None else None)
            x = x.contiguous(memory_format=CL)
            residual = residual.contiguous(memory_format=CL) if residual is not None else None
            conv = _Int8Conv(ops, w, None, quant, bias, (stride, stride), (padding, padding), (1, 1), groups,
                             relu, x.shape, nonneg, shortcut_stride=1)
            got = conv(x, None, residual)
            want = conv2d_nhwc_8bit_ref(x, w, bias, quant, stride=stride, padding=padding, groups=groups,
                                        residual=residual, relu=relu)
            if got.dtype != want.dtype or got.shape != want.shape or not torch.equal(got, want):
                raise _Mismatch(name)

        w = rand_int8(24, 16, 1, 1, low=-127)
        check("1x1 on post-ReLU input", rand_int8(2, 16, 5, 6, low=0), w, nonneg=True)
        check("1x1, no ReLU, fp32 out", rand_int8(2, 16, 5, 6, low=0), w, relu=False, out=torch.float32,
              nonneg=True)
        check("3x3 stride 2, signed input", rand_int8(1, 16, 9, 7), rand_int8(32, 16, 3, 3, low=-127),
              stride=2, padding=1)
        check("grouped 3x3", rand_int8(1, 32, 6, 6, low=0), rand_int8(32, 4, 3, 3, low=-127), padding=1,
              groups=8, nonneg=True)
        check("3x3 + residual", rand_int8(1, 16, 6, 5, low=0), rand_int8(16, 16, 3, 3, low=-127), padding=1,
              residual=rand_int8(1, 16, 6, 5), nonneg=True)
        check("7x7 stem on signed input", rand_int8(1, 4, 21, 21), rand_int8(16, 4, 7, 7, low=-127), stride=2)
        # the largest products (a non-VNNI int8 kernel would saturate pairs of them in int16) and
        # ties: acc * 0.5 is a half integer for odd acc, rounded half to even
        full = torch.full((1, 8, 4, 4), -128, dtype=torch.int8)
        w_full = torch.full((8, 8, 1, 1), 127, dtype=torch.int8)
        w_full[::2] *= -1
        check("saturation", full, w_full, acc_scale=torch.full((8,), 1e-3), inv_scale=1.0)
        small = rand_int8(1, 8, 5, 5, low=0) % 4
        check("ties", small, rand_int8(8, 8, 1, 1, low=-3) % 3, acc_scale=torch.full((8,), 0.5),
              bias=torch.zeros(8), inv_scale=1.0, relu=False, nonneg=True)
    except _Mismatch as err:
        return False, f"oneDNN's int8 convolution differs from the integer reference here ({err})"
    except Exception as err:  # noqa: BLE001 - private ops: any failure means "use the reference"
        return False, f"oneDNN's int8 convolution is not usable ({type(err).__name__}: {err})"
    return True, ""


# -- CPU: oneDNN primitives kept by fastres._onednn ------------------------------------------------
_SWITCH = {"1": True, "on": True, "true": True, "yes": True, "0": False, "off": False, "false": False, "no": False,
           "": False}
_PRIMITIVES_ENV = _SWITCH.get(os.environ.get("FASTRES_ONEDNN_PRIMITIVES", "1").strip().lower())
if _PRIMITIVES_ENV is None:
    _notice_once(f"fastres: FASTRES_ONEDNN_PRIMITIVES={os.environ['FASTRES_ONEDNN_PRIMITIVES']!r} is not 1 (on) or "
                 "0 (off): using 1")
    _PRIMITIVES_ENV = True
_primitives_state: "bool | None" = None
_primitives_reason = ""
ONEDNN_PACKAGES = "onednn-cpu-gomp==2023.2.0 onednn-devel-cpu-gomp==2023.2.0"


def onednn_primitives_available() -> bool:
    """Whether the CPU backend's convolutions run as oneDNN primitives it keeps
    (``fastres._onednn``, csrc/onednn_conv.cpp: no per-call primitive descriptor, a few
    microseconds per call where PyTorch's ops spend tens to a hundred): the extension is built
    (against oneDNN's GNU-OpenMP wheels), loaded no OpenMP runtime beside PyTorch's, and
    computes what ``F.conv2d`` does (checked once on small convs: bias, ReLU, both residual
    forms, groups, stride, dilation, another batch). Where not (``onednn_primitives_reason``),
    the convolutions call PyTorch's oneDNN ops (``_OneDnnOps.conv``): the same kernels, more host
    time per call. ``FASTRES_ONEDNN_PRIMITIVES=0`` turns them off."""
    global _primitives_state, _primitives_reason
    if _primitives_state is None:
        _primitives_state, _primitives_reason = _check_onednn_primitives()
    return _primitives_state


def onednn_primitives_reason() -> str:
    onednn_primitives_available()
    return _primitives_reason


def _openmp_runtimes() -> set:
    try:
        with open("/proc/self/maps") as maps:
            return {line.split()[-1] for line in maps
                    if any(n in line.rsplit("/", 1)[-1] for n in ("libgomp", "libiomp5", "libomp"))}
    except OSError:
        return set()


def _check_onednn_primitives() -> tuple:
    if not _PRIMITIVES_ENV:
        return False, "FASTRES_ONEDNN_PRIMITIVES=0"
    before = _openmp_runtimes()
    try:
        from . import _onednn
    except ImportError as err:
        import platform
        if platform.system() != "Linux" or platform.machine() != "x86_64":
            return False, (f"fastres._onednn is not built ({err}); oneDNN's GNU-OpenMP wheels it builds against "
                           f"are for x86-64 Linux only, not {platform.system()} {platform.machine()}")
        return False, (f"fastres._onednn is not built ({err}): pip install {ONEDNN_PACKAGES}, then "
                       "pip install --no-build-isolation -e . (make does both)")
    extra = _openmp_runtimes() - before
    if extra:
        # two OpenMP thread pools on the same cores would each spin while the other works
        return False, f"fastres._onednn loaded a second OpenMP runtime ({', '.join(sorted(extra))})"
    try:
        import torch.nn.functional as F
        g = torch.Generator().manual_seed(0)

        def nhwc(*shape):
            return torch.randn(*shape, generator=g).contiguous(memory_format=CL)
        x, w, b = nhwc(2, 8, 7, 6), torch.randn(16, 4, 3, 3, generator=g), torch.randn(16, generator=g)
        geometry = ([2, 1], [1, 1], [1, 2], 2)          # stride, padding, dilation, groups
        with torch.no_grad():
            expected = F.conv2d(x, w, b, stride=(2, 1), padding=1, dilation=(1, 2), groups=2)
            r = nhwc(*expected.shape)
            checks = [(_onednn.Conv(list(x.shape), w, b, *geometry, "none", True)(x), expected.relu()),
                      (_onednn.Conv(list(x.shape), w, None, *geometry, "none", False)(x), expected - b.view(1, -1, 1, 1)),
                      (_onednn.Conv(list(x.shape), w, b, *geometry, "add", False)(x, r), expected + r),
                      (_onednn.Conv(list(x.shape), w, b, *geometry, "sum", True)(x, r.clone()), (expected + r).relu())]
            one = _onednn.Conv([1, 8, 7, 6], w, b, *geometry, "add", True)    # made for batch 1, run on 2
            checks.append((one(x, r), (expected + r).relu()))
        for got, want in checks:
            if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
                return False, "fastres._onednn's convolution disagrees with F.conv2d here"
    except Exception as err:  # noqa: BLE001 - any failure means "call PyTorch's ops"
        return False, f"fastres._onednn is not usable ({type(err).__name__}: {err})"
    return True, ""


_kept_linear_state: "bool | None" = None


def kept_linear_usable() -> bool:
    """Whether ``fastres._onednn.Linear`` (the head's matmul kept as a oneDNN primitive) exists in
    the built extension and computes what ``F.linear`` does, with and without a bias, on the rows it
    was made for and on others (checked once). Where not, the head calls PyTorch's linear; the
    convolutions keep their primitives either way."""
    global _kept_linear_state
    if not onednn_primitives_available():
        return False
    if _kept_linear_state is None:
        _kept_linear_state = False
        try:
            import torch.nn.functional as F
            from . import _onednn
            g = torch.Generator().manual_seed(0)
            rows, m, c = torch.randn(3, 40, generator=g), torch.randn(24, 40, generator=g), torch.randn(24, generator=g)
            with torch.no_grad():
                checks = [(_onednn.Linear(3, m, c)(rows), F.linear(rows, m, c)),
                          (_onednn.Linear(1, m, None)(rows), F.linear(rows, m))]   # made for 1 row, run on 3
            _kept_linear_state = all(got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-4)
                                     for got, want in checks)
        except Exception:  # noqa: BLE001 - an older build without Linear, or a broken one: PyTorch's linear
            _kept_linear_state = False
    return _kept_linear_state


def _rows_independent(linear, rows: int, features: int) -> bool:
    """Whether ``linear`` (a kept matmul made for ``rows`` rows) gives a row the same bits whatever
    the other rows, their number and the row's place among them: an image's logits must not depend
    on its batch within a weight layout (README). oneDNN's matmul is made per row count, and its
    AVX2 GEMM (``gemm:jit``) sums in an order that depends on it; its AVX-512 brgemm does not.
    Checked on every count from 1 to ``rows`` + 3 and on 2 * ``rows`` + 1 (a program for the
    largest bucket runs larger batches), and on batches shifted by 1 and 3 rows. The counts it runs
    stay kept as shapes of their own until ``linear.forget_other_shapes()``."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * rows + 1, features, generator=g)
    with torch.no_grad():
        full = linear(x[:rows].contiguous())
        for n in [*range(1, rows + 4), 2 * rows + 1]:
            k = min(n, rows)
            if not torch.equal(linear(x[:n].contiguous())[:k], full[:k]):
                return False
        for shift in (1, 3):
            if shift < rows and not torch.equal(linear(x[shift:rows + shift].contiguous())[:rows - shift],
                                                full[shift:]):
                return False
    return True


class _Mismatch(Exception):
    pass


def qconv_runs_int8(step, shapes: "dict | None") -> str:
    """Why the qconv ``step`` cannot run as one oneDNN int8 convolution ("" when it can).

    oneDNN accumulates u8 x s8 products in int32 (exact, as the reference) and scales them by
    ``acc_scale`` (``_Int8Conv``; checked bit for bit by ``onednn_int8_available``). Not taken:
    e4m3 operands (oneDNN's fp8 convolution accumulates in fp32, rounding, where the reference is
    exact), a residual read at a stride or into a channel offset (CIFAR option A), the pixel stem's
    per-window accumulator correction, a projection shortcut that does not fit the main conv's
    centre tap."""
    a, w = step.attrs, step.tensors["weight"]
    if w.dtype != torch.int8:
        return f"{w.dtype} operands"
    if step.extra_outputs or "residual_stride" in a or "residual_channel_offset" in a or "residual_pad" in a:
        return "a strided or channel-offset residual"
    if "input_offset" in step.tensors:
        return "a pixel stem's border correction (input_offset)"
    if a["out_dtype"] not in (torch.int8, torch.float32, torch.float16, torch.bfloat16):
        return f"{a['out_dtype']} output"
    if a["out_dtype"] == torch.int8 and not a["out_inv_scale"] > 0:
        return "a non-positive output scale"
    if shapes is None or step.name not in shapes:
        return "no 4-D shapes recorded"
    if "shortcut" in step.inputs:
        kh, kw = w.shape[2:]
        s = a["shortcut_stride"]
        sc_h, sc_w = shapes[step.name]["shortcut"][2:]
        if not (tuple(a["stride"]) == (1, 1) and tuple(a["dilation"]) == (1, 1) and a["groups"] == 1
                and kh % 2 == 1 and kw % 2 == 1 and tuple(a["padding"]) == (kh // 2, kw // 2)
                and shapes[step.name]["out"][2:] == (-(-sc_h // s), -(-sc_w // s))):
            return "a shortcut that does not fit the conv's centre tap"
    return ""


class _Int8Conv:
    """One qconv step as one ``onednn::qconv2d_pointwise`` call (weights prepacked once) and the
    reference's epilogue in PyTorch.

    Our activations are symmetric int8; oneDNN takes unsigned ones with a zero point: an input
    known to be >= 0 (a ReLU output, or a max pool of one) is reinterpreted as uint8 (zero point 0,
    no copy), any other is shifted by 128 (``x ^ 0x80`` on its bytes, zero point 128). oneDNN
    accumulates in int32 (exact) and, with x_scale 1 and the weight scales ``acc_scale``, writes the
    fp32 ``acc * acc_scale[c]``: one conversion and one multiply, the reference's roundings. The rest
    of the epilogue (+ bias, + residual * residual_scale, ReLU, * out_inv_scale, round half to even,
    saturate) runs as PyTorch ops, one fp32 rounding each: oneDNN's own bias, ``sum`` post-op and
    requantization fuse a multiply-add (measured: 1 value in 18k of a 1x1 stride-2 conv rounded to
    the other side of a tie; its int8 ``sum`` 1 in 3.6M), so their answer is not the reference's.

    A projection shortcut (concat-K: one accumulator) becomes extra input channels: its strided
    input concatenated to x, its 1x1 weight placed at the centre tap of the main conv's kernel
    (zeros elsewhere), so the int32 sum is the reference's.
    """

    def __init__(self, ops, weight, shortcut_weight, quant, bias, stride, padding, dilation, groups, relu,
                 x_shape, nonneg: bool, shortcut_stride: int):
        self.ops, self.relu, self.quant = ops, relu, quant
        self.geometry = (list(stride), list(padding), list(dilation), groups)
        self.shortcut_stride = shortcut_stride
        self.zero_point = 0 if nonneg else 128
        w = weight.detach()
        x_shape = list(x_shape)
        if shortcut_weight is not None:
            kh, kw = w.shape[2:]
            o, c_sc = shortcut_weight.shape[:2]
            centre = torch.zeros(o, c_sc, kh, kw, dtype=torch.int8)
            centre[:, :, kh // 2, kw // 2] = shortcut_weight.detach()[:, :, 0, 0]
            w = torch.cat([w, centre], 1)
            x_shape[1] += c_sc
        self.scales = quant.acc_scale.float().contiguous()
        self.zero_points = torch.zeros(w.shape[0], dtype=torch.int64)
        self.bias = bias.float().view(1, -1, 1, 1) if bias is not None else None
        self.weight = ops.qprepack(w.contiguous(), self.scales, 1.0, self.zero_point, *self.geometry[:3],
                                   groups, x_shape)
        self.int8_out = quant.out_dtype == torch.int8
        self.inv_scale = (torch.tensor(quant.out_inv_scale, dtype=torch.float32) if self.int8_out else None)
        self.residual_scale = (torch.tensor(quant.residual_scale, dtype=torch.float32)
                               if quant.residual_scale is not None else None)

    @classmethod
    def from_step(cls, ops, step, x_shape, nonneg: bool) -> "_Int8Conv":
        """The conv of qconv ``step`` (``qconv_runs_int8(step)`` is "") for inputs of ``x_shape``;
        ``nonneg``: its inputs (x and the shortcut's) are known to be >= 0."""
        from .ir_quant import qconv_epilogue
        a, t = step.attrs, step.tensors
        return cls(ops, t["weight"], t.get("shortcut_weight"), qconv_epilogue(step), t.get("bias"), a["stride"],
                   a["padding"], a["dilation"], a["groups"], a["relu"], x_shape, nonneg, a.get("shortcut_stride", 1))

    def _unsigned(self, x):
        u = x.view(torch.uint8)
        return u if self.zero_point == 0 else torch.bitwise_xor(u, 128)

    def __call__(self, x, shortcut=None, residual=None):
        q = _nhwc(self._unsigned(x))
        if shortcut is not None:
            s = self.shortcut_stride
            q = torch.cat([q, _nhwc(self._unsigned(shortcut))[:, :, ::s, ::s]], 1).contiguous(memory_format=CL)
        y = self.ops.qconv(q, 1.0, self.zero_point, self.weight, self.scales, self.zero_points, None,
                           *self.geometry, 1.0, 0, torch.float32, "none", [], "")     # fp32 acc * acc_scale
        if self.bias is not None:
            y.add_(self.bias)
        if residual is not None:
            y.add_(residual.float().mul_(self.residual_scale))    # (torch.mul(int8, fp32) is 30x slower)
        if self.int8_out:     # relu(y) * s then clamp == clamp(y * s, 0, 127): s > 0
            return y.mul_(self.inv_scale).clamp_(0.0 if self.relu else -128.0, 127.0).round_().to(torch.int8)
        if self.relu:
            y.relu_()
        return y if self.quant.out_dtype == torch.float32 else y.to(self.quant.out_dtype)


class _OneDnnOps:
    """The private ops, resolved once (``OpOverload``s: the cheapest Python call into them)."""
    linear_usable = True      # mkldnn::_linear_pointwise passed the smoke test

    def __init__(self):
        mkldnn = torch.ops.mkldnn
        self.conv = mkldnn._convolution_pointwise.default
        self.conv_add = mkldnn._convolution_pointwise.binary      # conv + bias + other [-> relu]
        self.conv_add_ = mkldnn._convolution_pointwise_.binary    # the same, written into other
        self._reorder = torch._C._nn.mkldnn_reorder_conv2d_weight
        # the head's linear (dense weight); optional: addmm where it is missing
        self.linear = (getattr(getattr(mkldnn, "_linear_pointwise", None), "default", None)
                       if self.linear_usable else None)
        # oneDNN's int8 convolution (optional: the qconv steps run their reference where it is missing)
        onednn = getattr(torch.ops, "onednn", None)
        qconv = getattr(onednn, "qconv2d_pointwise", None) if onednn is not None else None
        self.qconv = getattr(qconv, "default", None)
        self.qprepack = getattr(getattr(onednn, "qconv_prepack", None), "default", None)
        # convolutions and the head's matrix product as primitives kept by fastres._onednn
        # (None: the ops above, per call)
        self.kept_conv = self.kept_linear = None
        if onednn_primitives_available():
            from . import _onednn
            self.kept_conv = _onednn.Conv
            if kept_linear_usable():
                self.kept_linear = _onednn.Linear

    def reorder(self, weight, padding, stride, dilation, groups, input_shape):
        """``weight`` in the blocked layout oneDNN's convolution picks for ``input_shape``."""
        return self._reorder(weight.detach().float().contiguous().to_mkldnn(), list(padding),
                             list(stride), list(dilation), groups, list(input_shape))


CL = torch.channels_last
# The batch a module's weights are laid out for: oneDNN picks the weight layout from the whole
# problem (batch included), and running on weights laid out for another batch makes each conv
# reorder them on every call; buckets bound how many layouts a module with varying batches keeps.
MODULE_WEIGHT_BATCHES = (1, 8, 32, 128)
PROGRAMS_PER_PLAN = 4    # LRU bound of weight layouts (one reordered copy of the weights each)


def weight_batch_for(n: int) -> int:
    return next((b for b in MODULE_WEIGHT_BATCHES if b >= n), MODULE_WEIGHT_BATCHES[-1])


class CpuBackend(ReferenceBackend):
    """The CPU backend of the drop-in module and the Engine: a plan in float32 runs as one
    generated oneDNN program; other dtypes, other devices, or a PyTorch without the oneDNN ops
    run the references (``ReferenceBackend``), step by step.

    The program (``OneDnnProgram``), made once per plan and weight layout:

    * every conv is one oneDNN convolution, bias + residual + ReLU as post-ops: a primitive made
      once and kept by ``fastres._onednn`` (csrc/onednn_conv.cpp, ``onednn_primitives_available``;
      ``program.primitive_steps``), or where that extension is missing PyTorch's
      ``mkldnn::_convolution_pointwise``, which builds the primitive descriptor anew on every call
      (resnet50 batch 1 on the AVX-512 Xeon: 34.4 ms a forward through it, 31.1 with kept
      primitives, bench/README.md). A projection shortcut is its own 1x1 conv whose output the
      block's last conv accumulates into (in place: oneDNN's sum post-op); a fused 3x3+1x1 pair runs
      as its two convs. The identity residual is accumulated into in place too when the block's
      add is its last reader (no output allocation, one stream less).
    * a 3x3 stride-1 conv (or the 3x3 of a pair) runs as Winograd F(2x2, 3x3) or F(4x4, 3x3)
      where ``winograd_sides`` allows it and ``winograd_choice`` measured it faster on this
      machine (``fastres.winograd``: C++ transforms with bias, residual and ReLU, PyTorch's bmm;
      ``program.winograd_steps`` names them with their output tile's side): where oneDNN's direct
      conv runs at the FMA units' limit (AVX2) fewer multiplications are the way past it; where it
      runs near it with wider units (a Zen 5) the direct conv stays.
    * weights are reordered once, into the blocked layout oneDNN picks for the input shape and
      thread count (a kept primitive's own, or ``mkldnn_reorder_conv2d_weight``); activations stay dense channels_last,
      which oneDNN's brgconv kernels read and write directly (bench/README.md: no activation
      reorder runs in a forward, and convolutions on oneDNN's own blocked tensors measured slower
      per layer and take no fused post-ops from PyTorch).
    * the head is a contiguous mean over the pixels + a oneDNN matmul kept by fastres._onednn, its
      weights laid out once, where it is usable and a row's bits do not depend on its batch
      (``_rows_independent``: not oneDNN's AVX2 GEMM); else PyTorch's linear (``addmm`` where
      that is missing too); the stem's max pool over a float32 conv output is ``fastres.cpu_kernels``'
      (``F.max_pool2d``'s bits, 2x faster); SE scaling, strided (CIFAR) residuals, second outputs
      and PyTorch steps run their references.
    * a quantized plan's int8 ``qconv`` steps run oneDNN's int8 convolution (``_Int8Conv``: bit for
      bit ``conv2d_nhwc_8bit_ref``, smoke-tested at first use by ``onednn_int8_available``); the
      ones it cannot run exactly (``qconv_runs_int8``: e4m3, option-A residuals) and the other 8-bit
      kinds run their references (``program.int8_fallbacks`` says why, per step).
    * the steps are generated as one straight-line Python function (``program.source``) with the
      weights and geometry bound as constants, values freed after their last reader: a step costs
      one op call, no dictionary of values, no per-step dispatch.

    Programs live on the plan (``plan._onednn_programs``), keyed by (weight batch, C, H, W,
    threads) and bounded by an LRU of ``PROGRAMS_PER_PLAN`` (each holds one reordered copy of the
    weights): the module's guard, which rebuilds the plan on any weight or structure change, drops
    them with the plan, so a program can never run stale weights. The module lays weights out for
    the bucket of ``MODULE_WEIGHT_BATCHES`` holding its batch; the Engine for its own buckets.

    Threads: a call runs the calling thread's PyTorch setting (``torch.get_num_threads()``, which
    also initialises a fresh thread to ``torch.set_num_threads``'s value: without it oneDNN in a
    new worker thread would run the OpenMP default), or the Engine's ``num_threads``; fewer while
    other processes keep the cores busy (``ThreadGovernor``).

    Where the time goes, measured against ONNX Runtime's own profile: bench/README.md.
    """
    name = "torch"

    def __init__(self):
        self._lock = threading.Lock()
        self._ops = None

    def uses_onednn(self, plan, x) -> bool:
        # float32 plans on float32 input, or a quantized plan over uint8 pixels (its input dtype)
        return (x.device.type == "cpu" and plan.dtype is torch.float32
                and x.dtype is (plan.input_dtype or torch.float32) and onednn_available())

    def execute(self, plan, x, weight_batch: "int | None" = None, capacity: "int | None" = None,
                adaptive: "bool | None" = None):
        """``plan`` on ``x``. ``weight_batch``: the batch the weights are laid out for (default:
        the bucket of ``MODULE_WEIGHT_BATCHES`` holding ``x``'s batch); ``capacity``: at least
        this many layouts kept for the plan; ``adaptive``: fewer threads than the calling thread's
        setting where other processes keep the cores busy (``ThreadGovernor``; None: the
        process's setting, ``FASTRES_ADAPTIVE_THREADS``), for input shapes where fewer threads
        were checked to give the same bits (the first such call runs both programs once on a
        fixed random input; the references, for other dtypes and non-finite inputs, always run
        the calling thread's setting)."""
        if x.device.type != "cpu":
            return plan.run(x, self)
        configured = torch.get_num_threads()   # also PyTorch's per-thread init (oneDNN reads it)
        if not self.uses_onednn(plan, x) or not all_finite(x):
            return plan.run(x, self)
        n = GOVERNOR.threads(configured, adaptive) if per_thread_counts() else configured
        if n != configured:
            agreement = self._programs(plan).agreement
            check = (weight_batch or weight_batch_for(x.shape[0]), tuple(x.shape), x.dtype, configured, n)
            agrees = agreement.get(check)
            if agrees:
                fewer = self.program(plan, x.shape, weight_batch, capacity, threads=n)
                if fewer is not None:
                    with intra_op_threads(n):
                        return fewer(x)
            elif agrees is None:
                agrees = self._same_bits_with(plan, x, weight_batch, capacity, configured, n)
                agreement[check] = agrees
                if not agrees:
                    _notice_once(f"fastres: with {n} instead of {configured} intra-op threads oneDNN's "
                              f"results for inputs of shape {tuple(x.shape)} differ in their last bits "
                              f"on this machine; those calls keep {configured} threads while other "
                              f"processes load the cores")
        program = self.program(plan, x.shape, weight_batch, capacity, threads=configured)
        return plan.run(x, self) if program is None else program(x)

    def _same_bits_with(self, plan, x, weight_batch, capacity, configured: int, n: int) -> bool:
        """Whether the program for ``n`` threads gives the bits of the one for ``configured`` on a
        fixed random input of ``x``'s shape and dtype (not ``x``: a constant image could agree
        where the summation orders differ)."""
        program = self.program(plan, x.shape, weight_batch, capacity, threads=configured)
        fewer = self.program(plan, x.shape, weight_batch, capacity, threads=n)
        if program is None or fewer is None:
            return False
        probe = _probe_like(x)
        expected = program(probe)
        with intra_op_threads(n):
            return _same_bits(fewer(probe), expected)

    @staticmethod
    def _programs(plan) -> "_Lru":
        """The plan's program cache (made empty on first use)."""
        cache = plan.__dict__.get("_onednn_programs")
        return cache if cache is not None else plan.__dict__.setdefault("_onednn_programs",
                                                                          _Lru(PROGRAMS_PER_PLAN))

    def program(self, plan, shape, weight_batch: "int | None" = None, capacity: "int | None" = None,
                threads: "int | None" = None) -> "OneDnnProgram | None":
        """The program for inputs of ``shape`` run with ``threads`` intra-op threads (default:
        ``torch.get_num_threads()``), made on first use, then cached on the plan; None when the
        plan's weights are not all finite (the references run it).

        The thread count is part of the key: oneDNN picks the weight layout for the problem *and*
        the thread count (measured: 6 of resnet50's convs change their blocking between 1 and 2
        threads), and a conv given weights in another layout reorders them on every call."""
        key = (weight_batch or weight_batch_for(shape[0]), *shape[1:], threads or torch.get_num_threads())
        cache = plan.__dict__.get("_onednn_programs")
        if cache is not None:
            program = cache.get(key)
            if program is not None:
                if capacity is not None and capacity > cache.capacity:
                    cache.capacity = capacity
                return program
        with self._lock:
            cache = self._programs(plan)
            cache.capacity = max(cache.capacity, capacity or 0)
            program = cache.get(key)
            if program is None:
                if self._ops is None:
                    self._ops = _OneDnnOps()
                if not _finite_tensors(plan):
                    return None     # NaN/inf weights: PyTorch's NaN semantics, step by step
                # built with its own thread count: the weights are laid out for it
                with torch.no_grad(), intra_op_threads(key[-1]):
                    program = OneDnnProgram(plan, key, self._ops)
                cache.put(key, program)
        return program


class _Lru:
    """A small thread-safe LRU of programs by layout key, and ``agreement``: (weight batch,
    input shape, dtype, configured threads, fewer threads) -> whether the fewer threads' program
    gave the configured one's bits (``CpuBackend.execute``); measured on this machine, so it goes
    wherever the programs go (a weight edit, a copy, a pickle)."""

    def __init__(self, capacity: int):
        from collections import OrderedDict
        self.capacity = capacity
        self._items = OrderedDict()
        self._lock = threading.Lock()
        self.agreement: dict = {}

    def get(self, key):
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key, value) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > max(1, self.capacity):
                self._items.popitem(last=False)

    def keys(self) -> list:
        with self._lock:
            return list(self._items)

    def __len__(self) -> int:
        return len(self._items)

    # The programs are derived from the plan's weights (reordered or prepacked copies, some opaque
    # mkldnn tensors that cannot be copied): a copied plan starts with an empty cache and builds
    # its own, from its own weights.
    def __deepcopy__(self, memo):
        return _Lru(self.capacity)

    def __reduce__(self):
        return (_Lru, (self.capacity,))


def all_finite(x: torch.Tensor) -> bool:
    """No NaN or inf in ``x`` (one reduction over it: ~10 us for a 224x224 image).

    oneDNN's fused ReLU is max(x, 0), which turns NaN into 0 where PyTorch's relu keeps it: an
    input with NaN or inf runs the references instead, so it gets PyTorch's answer (NaN logits)."""
    return math.isfinite(x.sum().item())


def _probe_like(x: torch.Tensor) -> torch.Tensor:
    """A fixed random tensor of ``x``'s shape, dtype and memory format (normal floats; integers
    over the dtype's range)."""
    g = torch.Generator().manual_seed(0)
    if x.is_floating_point():
        probe = torch.randn(x.shape, generator=g).to(x.dtype)
    else:
        info = torch.iinfo(x.dtype)
        probe = torch.randint(info.min, info.max + 1, x.shape, generator=g, dtype=torch.int64).to(x.dtype)
    cl = x.dim() == 4 and x.is_contiguous(memory_format=CL) and not x.is_contiguous()
    return probe.contiguous(memory_format=CL) if cl else probe


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _same_bits(a, b) -> bool:
    """Whether two program outputs (a tensor, or a tuple/list/dict of them) are the same bits
    (as integers: -0.0 is not 0.0, and a NaN equals the same NaN)."""
    if torch.is_tensor(a):
        if not (torch.is_tensor(b) and a.shape == b.shape and a.dtype == b.dtype):
            return False
        if a.is_floating_point():
            a, b = (t.contiguous().view(_INT_OF_SIZE[t.element_size()]) for t in (a, b))
        return torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_bits(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return (isinstance(b, (tuple, list)) and len(a) == len(b)
                and all(_same_bits(u, v) for u, v in zip(a, b)))
    return a == b


def _finite_tensors(plan) -> bool:
    """Whether every folded weight and bias of the plan's fused steps is finite (cached on it)."""
    finite = plan.__dict__.get("_onednn_finite")
    if finite is None:
        finite = plan.__dict__["_onednn_finite"] = all(
            bool(torch.isfinite(t if t.element_size() > 1 else t.float()).all())   # (no isfinite for fp8)
            for step in plan.steps if step.kind != "torch"
            for t in step.tensors.values() if torch.is_tensor(t) and t.is_floating_point())
    return finite


# Winograd F(2x2, 3x3) and F(4x4, 3x3) for 3x3 stride-1 convs (fastres/winograd.py): 16 (36) GEMMs
# of [tiles x C] @ [C x O] in place of 36 (144) multiplications per channel pair and tile. Whether
# that beats oneDNN's direct conv depends on the machine (bench/README.md): F(2x2) on AVX2 (Zen 1,
# 2 threads) took 0.61-0.72x the direct conv's time for 128 and 256 channels at 28x28 and 14x14,
# 0.82x for 64 channels at 56x56 at batch 1; on an AVX-512 Xeon 0.66-0.75x in layer3 (F(4x4)
# there 0.57-0.68x at 56x56 and 28x28); on a Zen 4 0.82-1.25x (no forward faster);
# on a Zen 5, whose direct conv runs near the FMA units' limit, 1.5-2x (slower) everywhere. So the
# shape rule below only says where it may pay (it never does with few tiles: 512 channels at 7x7,
# batch 1, 16 tiles, 1.12x; or where the transformed input outgrows the caches with few channels:
# 64 at 56x56, batch 32, 1.48x), and ``winograd_choice`` times the direct conv and each allowed
# tile size on this machine. F(4x4, 3x3) multiplies by up to 5 and 8 in its transforms, so its
# convs are a few times further from the exact result than F(2x2, 3x3)'s (tests/test_winograd.py
# bounds both; whole resnet18 and resnet50 logits stayed ~1e-6 from float64 either way).
#
# FASTRES_WINOGRAD (read at import): "auto" (the default) where the rule allows it and it measured
# faster here; "1" (on, true, yes) with the largest tile size wherever the rule allows one; "0"
# (off, false, no) never.
_WINOGRAD_MODES = {"auto": "auto", "1": "on", "on": "on", "true": "on", "yes": "on",
                   "0": "off", "off": "off", "false": "off", "no": "off", "": "off"}
_WINOGRAD_MODE = _WINOGRAD_MODES.get(os.environ.get("FASTRES_WINOGRAD", "auto").strip().lower())
if _WINOGRAD_MODE is None:
    _notice_once(f"fastres: FASTRES_WINOGRAD={os.environ['FASTRES_WINOGRAD']!r} is not auto, 1 (on) or "
                 "0 (off): using auto")
    _WINOGRAD_MODE = "auto"
WINOGRAD_MIN_TILES = 32
WINOGRAD_MIN_CHANNELS = 64          # the narrowest measured; thinner GEMMs are left to the direct conv
WINOGRAD_NARROW_BYTES = 4 << 20     # the transformed input's size allowed with fewer than 128 channels
# and with any: the transformed input and the products are workspaces of (side + 2)^2 x tiles x
# channels floats each (F(2x2): 128 channels at 28x28, batch 32: 51 MB, no faster than the direct conv)
WINOGRAD_MAX_BYTES = 32 << 20
# Winograd is taken only at or under this fraction of the direct conv's time, timed alone: a near
# tie keeps the direct conv (PyTorch's own algorithm, and no flip of the choice on timing noise).
# Alone it looks better than inside a forward (its workspaces evict its neighbours' data): on the
# Zen 4 the layers it took at 0.88-0.95x alone made resnet18 and resnet50 no faster, while on AVX2
# and the AVX-512 Xeon the layers at 0.61-0.75x alone made whole forwards faster.
WINOGRAD_MARGIN = 0.8
WINOGRAD_TIMING_ROUNDS = 7          # interleaved rounds per shape (at least 3), fewer past the budget
WINOGRAD_TIMING_BUDGET_S = 0.3
_WINOGRAD_FAILED: set = set()     # shapes whose timing failed in this process: the direct conv


WINOGRAD_SIDES = (2, 4)            # the output tile sides fastres._cpu.conv3x3 computes


def winograd_sides(weight_shape, stride, padding, dilation, groups, x_shape) -> tuple:
    """The output tile sides (2: F(2x2, 3x3), 4: F(4x4, 3x3)) a float32 conv of ``weight_shape``
    on inputs of ``x_shape`` may run as Winograd with: a 3x3 stride-1 conv with enough tiles and
    channels and workspaces that fit, per side (``FASTRES_WINOGRAD=0`` allows none; so does a
    missing ``fastres._cpu``). Which one runs, if any, is ``winograd_choice``'s measurement."""
    o, c, kh, kw = weight_shape
    if not (_WINOGRAD_MODE != "off" and (kh, kw) == (3, 3) and tuple(stride) == (1, 1)
            and tuple(padding) == (1, 1) and tuple(dilation) == (1, 1) and groups == 1
            and min(c, o) >= WINOGRAD_MIN_CHANNELS and winograd.available()):
        return ()
    n, _, h, w = x_shape
    sides = []
    for side in WINOGRAD_SIDES:
        tiles, points = n * -(-h // side) * -(-w // side), (side + 2) ** 2
        if (tiles >= WINOGRAD_MIN_TILES and points * tiles * max(c, o) * 4 <= WINOGRAD_MAX_BYTES
                and (min(c, o) >= 128 or points * tiles * c * 4 <= WINOGRAD_NARROW_BYTES)):
            sides.append(side)
    return tuple(sides)


@functools.lru_cache(maxsize=None)
def cpu_model() -> str:
    """This machine's CPU model name (``/proc/cpuinfo``; else what ``platform`` says)."""
    import platform
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=None)
def cpu_identity() -> str:
    """What the choice cache keys a CPU by: its model name, family, model and stepping, and its
    widest vector ISA (a virtual machine may show the same name for different chips)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break                      # the first CPU's block
                name, _, value = line.partition(":")
                fields[name.strip()] = value.strip()
    except OSError:
        pass
    flags = set((fields.get("flags") or fields.get("Features", "")).split())     # (x86; Arm)
    isa = next((f for f in ("avx512f", "avx2", "avx", "sve", "asimd") if f in flags), "")
    chip = " ".join(f"{k} {fields[k]}" for k in ("cpu family", "model", "stepping") if k in fields)
    return ", ".join(part for part in (cpu_model(), chip, isa) if part)


def _winograd_candidate(side: int) -> str:
    return f"winograd_f{side}x{side}"


def winograd_choice(ops: "_OneDnnOps", weight_shape, x_shape, threads: int, sides) -> int:
    """The Winograd output tile side (of ``sides``, ``winograd_sides``'s) that beats oneDNN's direct
    conv (bias + ReLU fused in all) by ``WINOGRAD_MARGIN`` for a 3x3 conv of ``weight_shape`` on
    inputs of ``x_shape`` on this machine, the fastest such, or 0 for the direct conv: timed with
    ``threads`` threads, interleaved, on random data, a win confirmed by a second timing (each
    candidate's less favourable ratio of the two), then kept in the choice cache
    (``fastres.kernels._autotune``: per ``cpu_identity``, on disk, so a later process makes the
    same choice and gives the same bits). The choice does not depend on the thread count, so a
    program built with fewer threads (the thread governor's) runs the same algorithm.
    ``FASTRES_WINOGRAD=1`` skips the timing (the largest side allowed: fewest multiplications)."""
    sides = tuple(sides)
    if not sides:
        return 0
    if _WINOGRAD_MODE == "on":
        return max(sides)
    from .kernels import _autotune

    def measure(_candidates):
        def ratios(times):
            return {name: t / times["direct"] for name, t in times.items()}
        first = ratios(_time_winograd(ops, weight_shape, x_shape, threads, sides))
        if min(first.values()) > WINOGRAD_MARGIN:
            return first
        # a win measured once may be noise on a shared machine: each candidate's less favourable of two
        again = ratios(_time_winograd(ops, weight_shape, x_shape, threads, sides))
        return {name: max(first[name], again[name]) for name in first}

    # the direct conv's path is part of the key (a kept primitive costs less per call than an op),
    # and so are the sides timed (a choice made among others is made again)
    direct_path = "onednn-primitive" if onednn_primitives_available() else "torch-op"
    key = (tuple(weight_shape), tuple(x_shape), torch.__version__, direct_path, sides)
    if key in _WINOGRAD_FAILED:
        return 0
    candidates = {"direct": 0, **{_winograd_candidate(side): side for side in sides}}
    try:
        return _autotune.choose("winograd_conv3x3", key, candidates, run=None, device=f"cpu: {cpu_identity()}",
                                prefer="direct", margin=WINOGRAD_MARGIN, measure=measure)
    except (RuntimeError, MemoryError) as e:
        # a timing that fails (out of memory) must not fail the forward: the direct conv runs, for
        # every later program of this process too (one algorithm per shape), not saved to disk
        _WINOGRAD_FAILED.add(key)
        _notice_once(f"fastres: timing Winograd for a {tuple(weight_shape)} conv on {tuple(x_shape)} failed "
                     f"({type(e).__name__}: {e}); the direct convolution runs")
        return 0


def _time_winograd(ops: "_OneDnnOps", weight_shape, x_shape, threads: int, sides) -> dict:
    """Seconds per call (median of interleaved rounds, after one warm call each) of the direct
    conv (``"direct"``) and of Winograd with each of ``sides`` (``"winograd_f2x2"``, ...), as the
    program would run them (with ``tune_malloc`` on where a Winograd call page-faults past
    ``MALLOC_FAULT_BYTES``, as a program's calls would turn it on)."""
    import statistics
    g = torch.Generator().manual_seed(0)
    x = torch.randn(x_shape, generator=g).contiguous(memory_format=CL)
    weight = torch.randn(weight_shape, generator=g) / (3 * weight_shape[1] ** 0.5)
    bias = torch.randn(weight_shape[0], generator=g)
    with torch.no_grad(), intra_op_threads(threads):
        if ops.kept_conv is not None:     # the direct conv as the program runs it
            kept = ops.kept_conv(list(x_shape), weight, bias, [1, 1], [1, 1], [1, 1], 1, "none", True)
            direct = lambda: kept(x)    # noqa: E731
        else:
            w = ops.reorder(weight, (1, 1), (1, 1), (1, 1), 1, x_shape)
            direct = lambda: ops.conv(x, w, bias, [1, 1], [1, 1], [1, 1], 1, "relu", [], "")    # noqa: E731
        conv3x3 = winograd.extension().conv3x3
        calls = {"direct": direct}
        for side in sides:
            u = winograd.transform_weight(weight, side)
            calls[_winograd_candidate(side)] = lambda u=u: conv3x3(x, u, bias, None, True)
        times = {name: [] for name in calls}
        for call in calls.values():
            call()
        for name, call in calls.items():
            if name == "direct":
                continue
            before = _minor_faults()
            call()
            if (_minor_faults() - before) * _PAGE_BYTES > MALLOC_FAULT_BYTES:
                # Its workspaces come back from the kernel on every call (glibc unmaps or trims
                # them): a program running it would fault as much per call and so turn tune_malloc
                # on after two (OneDnnProgram._call_counting_faults). Time all as they would run then.
                tune_malloc()
                break
        start = time.perf_counter()
        for i in range(WINOGRAD_TIMING_ROUNDS):
            for name, call in calls.items():
                t = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - t)
            if i >= 2 and time.perf_counter() - start > WINOGRAD_TIMING_BUDGET_S:
                break
    return {name: statistics.median(ts) for name, ts in times.items()}


def _conv_variant_supported(step) -> bool:
    """Conv variants oneDNN's primitive runs: not a strided/zero-padded (CIFAR) residual, not a
    second (pre-activation) output."""
    return not step.extra_outputs and "residual_stride" not in step.attrs and "residual_pad" not in step.attrs


class OneDnnProgram:
    """One plan as a generated straight-line function over oneDNN ops (see ``CpuBackend``).

    ``key`` = (weight batch, C, H, W, threads): the input shape and thread count the weights are
    reordered for (any batch, image size and thread count still runs: a conv given weights in
    another layout than it wants reorders them itself, on every call). ``source`` is the
    generated code, ``onednn_steps`` the names of the steps that run as oneDNN (or Winograd)
    convolutions, ``winograd_steps`` those whose 3x3 runs as Winograd (name -> output tile side),
    ``cpu_kernel_steps`` the others run by ``fastres.cpu_kernels`` (the stem's max pool; the rest
    run their references), ``profile(x)`` the time of each step.
    """

    def __init__(self, plan, key: tuple, ops: _OneDnnOps):
        from .ir import KERNEL_KINDS, Ref, bind_refs
        from .ir_quant import split_qconv_pair
        self.key = key
        if any(step.kind == "qconv_pair" for step in plan.steps):
            # the fused 8-bit pair is a GPU kernel: here its two qconvs (exactly what it computes)
            plan = dataclasses.replace(plan, steps=[s for step in plan.steps for s in split_qconv_pair(step)])
        shapes = _step_shapes(plan, tuple(key[:4]))
        self.malloc_tuned = False         # whether this program's page faults turned on tune_malloc
        self._calls_watched = 0 if _malloc_tuned else MALLOC_WATCHED_CALLS
        self._last_watched = None         # (thread, input shape) of the last watched call
        self._faulting_calls = 0          # warm calls in a row that faulted past MALLOC_FAULT_BYTES
        steps = plan.steps
        outputs = set(plan.output_names)
        last_read, readers = {}, {}
        for i, step in enumerate(steps):
            for name in step.reads:
                last_read[name] = i
                readers.setdefault(name, []).append(step)
        var = {plan.input_name: "v0"}
        fresh = set()            # values our own ops (oneDNN, cpu_kernels) allocated: safe to accumulate into
        consts = {"CL": CL, "conv": ops.conv, "conv_add": ops.conv_add, "conv_add_": ops.conv_add_,
                  "nhwc": _nhwc}
        lines = []
        self.onednn_steps = []
        self.winograd_steps = {}   # conv steps (or the 3x3 of a pair) run as Winograd -> its tile side
        self.cpu_kernel_steps = []  # other steps run by our own C++ kernels (fastres.cpu_kernels)
        self.primitive_steps = []   # steps (convs, the head) run as primitives kept by fastres._onednn
        self.primitive_fallbacks = {}  # step name -> why it (or one of its convs) calls PyTorch's op
        if not onednn_primitives_available() and onednn_primitives_reason() != "FASTRES_ONEDNN_PRIMITIVES=0":
            _notice_once(f"fastres: {onednn_primitives_reason()}; the CPU backend's convolutions call "
                         "PyTorch's oneDNN ops instead (the same kernels, more host time per call)")
        self.nbytes = 0          # of the reordered weights

        def const(value, hint):
            name = f"{hint}{len(consts)}"
            consts[name] = value
            return name

        def weight(tensor, *geometry):
            self.nbytes += tensor.numel() * 4
            return const(ops.reorder(tensor, *geometry), "w")

        def winograd_weight(tensor, side):
            u = winograd.transform_weight(tensor, side)
            self.nbytes += u.numel() * 4
            consts.setdefault("winograd", winograd.extension().conv3x3)   # (called directly: one C++ call)
            return const(u, "u")

        relaid = {}              # value -> the name of its channels_last copy (made once)

        def read(name, relayout=True):
            """The expression reading value ``name``: channels_last for a kernel-kind step when a
            step other than ours wrote it (the plan's layout rule: 4-D values), converted once."""
            if not relayout or name in fresh:
                return var[name]
            if name not in relaid:
                relaid[name] = "c" + var[name][1:]
                lines.append(f"{relaid[name]} = nhwc({var[name]})")
            return relaid[name]

        def accumulable(name, i, step) -> bool:
            """Whether step ``i`` may write its sum into value ``name`` (its residual): one of our
            convs allocated it, only our convs read it (nothing holds a view of it), this step
            reads it last and once, and it is neither the plan's input nor an output."""
            return (name in fresh and last_read.get(name) == i and name not in outputs
                    and name != plan.input_name and list(step.inputs.values()).count(name) == 1
                    and all(r.kind in ("conv", "conv_pair") and _conv_variant_supported(r)
                            for r in readers[name]))

        def geometry(padding, stride, dilation, groups):
            return f"{list(padding)}, {list(stride)}, {list(dilation)}, {groups}"

        def conv_line(step, target, x, w, bias, conv_geometry, x_shape, relu, residual=None, inplace=False):
            """The line computing ``target = relu?(conv(x, w) + bias (+ residual))``: a primitive
            kept by fastres._onednn where it is usable, else PyTorch's oneDNN op on weights laid
            out for ``x_shape``. ``inplace``: the sum is written into ``residual`` (ours to reuse)."""
            padding, stride, dilation, groups = conv_geometry
            if ops.kept_conv is not None:
                try:
                    kept = ops.kept_conv(list(x_shape), w.detach().float().contiguous(), bias, list(stride),
                                         list(padding), list(dilation), groups,
                                         "none" if residual is None else "sum" if inplace else "add", bool(relu))
                except RuntimeError as err:      # oneDNN refused this one: PyTorch's op runs it
                    self.primitive_fallbacks[step.name] = str(err)
                    kept = None
                if kept is not None and kept.impl.startswith("ref"):
                    # oneDNN's reference loops (no JIT kernel for this geometry here): thousands of
                    # times slower than a kernel; PyTorch's newer oneDNN may have one
                    self.primitive_fallbacks[step.name] = f"oneDNN offers only {kept.impl} for it"
                elif kept is not None:
                    self.nbytes += kept.weight_bytes
                    if step.name not in self.primitive_steps:
                        self.primitive_steps.append(step.name)
                    # named for what it computes: conv, conv_add (a new tensor), conv_sum (into the residual)
                    hint = "conv" if residual is None else "conv_sum" if inplace else "conv_add"
                    return f"{target} = {const(kept, hint)}({x}{'' if residual is None else ', ' + residual})"
            w = weight(w, *conv_geometry, x_shape)
            b = "None" if bias is None else const(bias, "b")
            geo = geometry(*conv_geometry)
            if residual is None:
                return f"{target} = conv({x}, {w}, {b}, {geo}, {'relu' if relu else 'none'!r}, [], '')"
            unary = "'relu'" if relu else "None"   # (after a binary post-op: relu or None, not 'none')
            if inplace:
                return f"{target} = conv_add_({residual}, {x}, {w}, {b}, {geo}, 'add', None, {unary}, [], '')"
            return f"{target} = conv_add({x}, {residual}, {w}, {b}, {geo}, 'add', None, {unary}, [], '')"

        nonneg = set()           # 8-bit values known to be >= 0 (ReLU outputs): oneDNN reads them as uint8
        int8 = onednn_int8_available()
        self.int8_fallbacks = {}  # qconv step name -> why it runs its reference
        self._step_starts = []   # (index of the step's first line, step name, step kind)
        for i, step in enumerate(steps):
            self._step_starts.append((len(lines), step.name, step.kind))
            out = var.setdefault(step.output, f"v{len(var)}")
            for extra in step.extra_outputs:
                var.setdefault(extra, f"v{len(var)}")
            a, t = step.attrs, step.tensors
            if step.kind in ("conv", "conv_pair") and _conv_variant_supported(step) and step.name in shapes:
                x_shape = shapes[step.name]["x"]
                x = read(step.inputs["x"])
                other, inplace = None, False
                if "shortcut" in step.inputs:
                    s = a["shortcut_stride"]
                    lines.append(conv_line(step, "s", read(step.inputs["shortcut"]), t["shortcut_weight"], None,
                                           ((0, 0), (s, s), (1, 1), 1), shapes[step.name]["shortcut"], False))
                    other, inplace = "s", True      # a temporary of ours
                elif "residual" in step.inputs:
                    r = step.inputs["residual"]
                    other, inplace = read(r), accumulable(r, i, step)
                conv_geometry = (a["padding"], a["stride"], a["dilation"], a["groups"])
                first = t["weight"] if step.kind == "conv" else t["mid_weight"]
                use_winograd = winograd_choice(ops, first.shape, x_shape, key[-1], winograd_sides(
                    first.shape, a["stride"], a["padding"], a["dilation"], a["groups"], x_shape))
                if use_winograd:
                    self.winograd_steps[step.name] = use_winograd
                if step.kind == "conv" and use_winograd:     # bias, residual and ReLU in its output transform
                    bias = const(t["bias"].float().contiguous(), "b")
                    lines.append(f"{out} = winograd({x}, {winograd_weight(first, use_winograd)}, {bias}, {other}, "
                                 f"{bool(a['relu'])})")
                else:
                    if step.kind == "conv":
                        last_in, last_weight, last_shape = x, first, x_shape
                        last_geometry, relu = conv_geometry, a["relu"]
                    else:
                        b_mid = t["mid_bias"].float().contiguous()
                        if use_winograd:
                            lines.append(f"m = winograd({x}, {winograd_weight(first, use_winograd)}, "
                                         f"{const(b_mid, 'b')}, None, True)")
                        else:
                            lines.append(conv_line(step, "m", x, first, b_mid, conv_geometry, x_shape, True))
                        last_in, last_weight = "m", t["weight"]
                        last_shape = (x_shape[0], first.shape[0], *shapes[step.name]["out"][2:])
                        last_geometry, relu = ((0, 0), (1, 1), (1, 1), 1), True
                    lines.append(conv_line(step, out, last_in, last_weight, t["bias"].float().contiguous(),
                                           last_geometry, last_shape, relu, other, inplace))
                temporaries = (["m"] if step.kind == "conv_pair" else []) + (["s"] if other == "s" else [])
                if temporaries:
                    lines.append("del " + ", ".join(temporaries))
                fresh.add(step.output)
                self.onednn_steps.append(step.name)
            elif step.kind == "qconv" and int8 and not (why := qconv_runs_int8(step, shapes)):
                sc = step.inputs.get("shortcut")
                conv = _Int8Conv.from_step(ops, step, shapes[step.name]["x"],
                                           step.inputs["x"] in nonneg and (sc is None or sc in nonneg))
                fn = const(conv, "qconv")
                self.nbytes += conv.weight.numel() * conv.weight.element_size()
                args = [read(step.inputs["x"]), read(sc) if sc else "None",
                        read(step.inputs["residual"]) if "residual" in step.inputs else "None"]
                lines.append(f"{out} = {fn}({', '.join(args)})")
                if a["relu"] and a["out_dtype"] == torch.int8:
                    nonneg.add(step.output)
                self.onednn_steps.append(step.name)
            elif step.kind == "max_pool" and step.inputs["x"] in fresh and cpu_kernels.available():
                # a float32 conv output (8-bit values run the reference); bit for bit F.max_pool2d
                lines.append(f"{out} = max_pool({read(step.inputs['x'])})")
                consts["max_pool"] = cpu_kernels.extension().max_pool3x3s2
                fresh.add(step.output)
                self.cpu_kernel_steps.append(step.name)
            elif step.kind == "head" and a.get("pool") != "width":
                x = read(step.inputs["x"])
                # our own loop where it is built: PyTorch's mean is slow as the first op after the
                # last block's convolutions (csrc/pool_cpu.cpp)
                consts["pool"] = cpu_kernels.extension().global_mean if cpu_kernels.available() else _global_pool
                weight, bias = t["weight"].float().contiguous(), t["bias"].float().contiguous()
                head = None
                if ops.kept_linear is not None and step.name in shapes:
                    # weights laid out once (PyTorch's linear lays them out per call, addmm
                    # reads them dense): bench/README.md "The head as a kept matmul"
                    rows = shapes[step.name]["x"][0]
                    try:
                        head = ops.kept_linear(rows, weight, bias)
                        independent = _rows_independent(head, rows, weight.shape[1])
                        head.forget_other_shapes()     # the check's row counts, not the program's
                        if not independent:
                            self.primitive_fallbacks[step.name] = (f"oneDNN's {head.impl} matmul: a row's bits "
                                                                   "depend on the rows beside it")
                            head = None
                    except RuntimeError as err:      # oneDNN refused it: PyTorch's op runs it
                        self.primitive_fallbacks[step.name] = str(err)
                        head = None
                if head is not None:
                    self.nbytes += head.weight_bytes
                    if step.name not in self.primitive_steps:
                        self.primitive_steps.append(step.name)
                    lines.append(f"{out} = {const(head, 'linear')}(pool({x}))")
                elif ops.linear is not None:
                    # PyTorch's linear, not addmm: addmm measured faster on the AVX-512 Xeon, but
                    # its sums were seen to depend on the batch within a bucket (bench/README.md)
                    lines.append(f"{out} = linear(pool({x}), {const(weight, 'w')}, {const(bias, 'b')}, 'none', [], '')")
                    consts["linear"] = ops.linear
                else:
                    lines.append(f"{out} = addmm({const(bias, 'b')}, pool({x}), {const(weight.t().contiguous(), 'w')})")
                    consts["addmm"] = torch.addmm
            else:
                if step.kind == "qconv":
                    self.int8_fallbacks[step.name] = why if int8 else onednn_int8_unavailable_reason()
                elif step.kind == "max_pool" and step.inputs["x"] in nonneg:
                    nonneg.add(step.output)          # a maximum of values >= 0
                fn = const(_reference_call(step), "step")
                relayout = step.kind in KERNEL_KINDS
                args = ", ".join(f"{role!r}: {read(name, relayout)}"
                                 for role, name in step.inputs.items())
                targets = ", ".join(var[n] for n in step.outputs)
                lines.append(f"{targets}{',' if step.extra_outputs else ''} = {fn}({{{args}}})")
            dead = [var[n] for n, j in last_read.items()
                    if j == i and n not in outputs and n != plan.input_name]
            dead += [relaid.pop(n) for n, j in last_read.items() if j == i and n in relaid]
            if dead:
                lines.append("del " + ", ".join(sorted(set(dead))))
        out_names = plan.output_names
        if isinstance(plan.output, Ref):
            ret = var[plan.output.name]
        else:
            consts["bind_refs"], consts["structure"] = bind_refs, plan.output
            ret = "bind_refs(structure, {" + ", ".join(f"{n!r}: {var[n]}" for n in out_names) + "})"
        self.source = ("def program(v0):\n" + "".join(f"    {line}\n" for line in lines)
                       + f"    return {ret}\n")
        self._lines, self._ret, self._consts = lines, ret, consts
        namespace = dict(consts)
        exec(compile(self.source, f"<fastres onednn program {key}>", "exec"), namespace)
        self._fn = namespace["program"]

    def __call__(self, x):
        if self._calls_watched > 0:
            return self._call_counting_faults(x)
        return self._fn(x)

    def _call_counting_faults(self, x):
        """One of the first ``MALLOC_WATCHED_CALLS`` calls, the process's page faults counted
        (oneDNN's worker threads touch the outputs too). A call counts when it is warm: the same
        thread ran the same input shape in the previous watched call, so glibc's arena of that
        thread has already grown to this forward (a thread's first call, a new thread's arena, a
        larger batch sharing the weight layout all fault legitimately). Two warm calls in a row
        faulting in more than ``MALLOC_FAULT_BYTES`` each mean glibc hands this program's freed
        activations back to the kernel every time, and ``tune_malloc`` keeps them from then on
        (two, so that one burst of another thread's allocations does not trigger it)."""
        self._calls_watched -= 1
        key = (threading.get_ident(), tuple(x.shape))
        warm, self._last_watched = self._last_watched == key, key
        before = _minor_faults()
        out = self._fn(x)
        if warm and before >= 0:
            faulted = (_minor_faults() - before) * _PAGE_BYTES > MALLOC_FAULT_BYTES
            self._faulting_calls = self._faulting_calls + 1 if faulted else 0
            if self._faulting_calls >= 2 and not _malloc_tuned:
                self.malloc_tuned = tune_malloc()
                if self.malloc_tuned:
                    self._calls_watched = 0
        return out

    def profile(self, x, rounds: int = 5) -> list:
        """[(step name, kind, median seconds)] of ``rounds`` runs on ``x``: the same program with a
        clock read around each step (its op calls, frees and the Python between them)."""
        import statistics
        import time
        starts = [k for k, _, _ in self._step_starts] + [len(self._lines)]
        body = []
        for i in range(len(self._step_starts)):
            body.append(f"t = clock()")
            body += self._lines[starts[i]:starts[i + 1]]
            body.append(f"T[{i}].append(clock() - t)")
        source = ("def program(v0, T):\n" + "".join(f"    {line}\n" for line in body)
                  + f"    return {self._ret}\n")
        namespace = dict(self._consts, clock=time.perf_counter)
        exec(compile(source, "<fastres onednn program, profiled>", "exec"), namespace)
        times = [[] for _ in self._step_starts]
        for _ in range(rounds):
            namespace["program"](x, times)
        return [(name, kind, statistics.median(t)) for (_, name, kind), t in zip(self._step_starts, times)]

    def __repr__(self) -> str:
        return f"OneDnnProgram(key={self.key}, {len(self.onednn_steps)} oneDNN steps)"


def _nhwc(v):
    return v.contiguous(memory_format=CL) if torch.is_tensor(v) and v.dim() == 4 else v


def _step_shapes(plan, input_shape: tuple) -> dict:
    """{conv or head step name: {role: shape of what it reads, "out": its output's}} for those
    steps reading 4-D values, from one run of the references on fake tensors (any step, also a
    PyTorch step returning a dict or a list, runs as it would)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from .ir import residual_broadcasts
    shapes = {}

    class Recorder(ReferenceBackend):
        def run(self, step, op, args, out):
            y = super().run(step, op, args, out)
            # a conv whose output is added by broadcasting (ir.residual_broadcasts) has no
            # oneDNN form: its binary post-op needs the residual in the conv output's shape
            if (step.kind in ("conv", "conv_pair", "qconv", "head") and torch.is_tensor(y)
                    and all(torch.is_tensor(v) and v.dim() == 4 for v in args.values())
                    and not (step.kind == "conv" and residual_broadcasts(step, args))):
                shapes[step.name] = {**{role: tuple(v.shape) for role, v in args.items()},
                                     "out": tuple(y.shape)}
            return y
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(input_shape, dtype=plan.input_dtype or plan.dtype, device=plan.device).contiguous(memory_format=CL)
        plan.run(x, Recorder())
    return shapes


def _global_pool(x):
    """The mean over the pixels: on channels_last memory a contiguous reduction (``x.mean((2, 3))``
    on it strides over the channels)."""
    n, c, h, w = x.shape
    if x.is_contiguous(memory_format=CL):
        return x.permute(0, 2, 3, 1).reshape(n, h * w, c).mean(1)
    return x.mean((2, 3))


def _reference_call(step):
    from .ir import OPS
    op = OPS[step.kind]

    def call(args, step=step, reference=op.reference):
        return reference(step, args, None, False)
    return call


TorchBackend = CpuBackend
_IMPLS = {"torch": CpuBackend(), "reference": ReferenceBackend(), "triton": TritonBackend()}


def get_backend(name: str):
    """The shared backend object of ``name`` ("torch", "reference" or "triton")."""
    return _IMPLS[name]
