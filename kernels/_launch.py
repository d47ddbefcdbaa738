"""A kernel launch described as data.

Every launch wrapper in this package builds a ``KernelCall`` and calls ``.launch()``. Keeping the
launch as data lets the same code path (1) launch on a GPU or under ``TRITON_INTERPRET=1``,
(2) be recorded instead of launched — on ``device="meta"`` tensors — so ``fastres aot`` and
``fastres inspect`` see exactly the kernels, signatures and configurations a real forward uses.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field

import torch

_recording = threading.local()


@dataclass
class KernelCall:
    kernel: object                      # a triton JITFunction
    grid: tuple
    args: dict                          # runtime arguments by parameter name
    constexprs: dict                    # tl.constexpr parameters by name
    num_warps: int = 4
    num_stages: int = 2
    name: str = ""                      # human-readable, e.g. "conv2d_nhwc[3x3/s1]"
    info: dict = field(default_factory=dict)  # problem description for reports (M, N, K, flops, bytes)
    options: dict = field(default_factory=dict)  # other triton compile options, e.g. enable_fp_fusion=False

    def launch(self):
        calls = getattr(_recording, "calls", None)
        if calls is not None:
            calls.append(self)
            return
        self._check_runnable()
        self.kernel[self.grid](**self.args, **self.constexprs,
                               num_warps=self.num_warps, num_stages=self.num_stages, **self.options)

    def _check_runnable(self):
        """A clear error instead of a failure inside triton for tensors it cannot run on."""
        devices = {a.device.type for a in self.args.values() if isinstance(a, torch.Tensor)}
        what = self.name or getattr(self.kernel, "__name__", "kernel")
        if "meta" in devices:
            raise RuntimeError(f"{what} on meta tensors only records its launch: call it inside "
                               "fastres.kernels._launch.record_launches()")
        if "cpu" in devices and not _is_interpreted(self.kernel):
            raise RuntimeError(f"{what} on CPU tensors runs the Triton kernel under the interpreter: set "
                               "TRITON_INTERPRET=1 before importing fastres, or use the *_ref function")


@contextlib.contextmanager
def record_launches():
    """Within this context ``KernelCall.launch`` appends to the yielded list instead of launching.

    Use it with ``device="meta"`` tensors to enumerate the kernels of a forward without running it.
    """
    previous = getattr(_recording, "calls", None)
    calls: list[KernelCall] = []
    _recording.calls = calls
    try:
        yield calls
    finally:
        _recording.calls = previous


def _is_interpreted(kernel) -> bool:
    import triton
    return not isinstance(kernel, triton.runtime.JITFunction)  # under TRITON_INTERPRET, jit wraps otherwise


def is_recording() -> bool:
    return getattr(_recording, "calls", None) is not None
