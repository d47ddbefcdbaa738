"""Whole models through the Triton path (the code a CUDA forward runs), against torchvision.

Without a GPU the kernels run under the Triton interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1). Every launch goes through ``triton.runtime.interpreter.GridExecutor.__call__``:
wrapping it counts the kernels a forward really launches, and a TorchDispatchMode records every
PyTorch op dispatched *outside* those launches — so a fallback to PyTorch compute cannot hide.

bf16 is not run here: ``tl.dot`` on bf16 operands is wrong under the interpreter (triton 3.8). bf16
is covered per kernel (the wrappers' INTERPRETER_BF16 path checks bf16 loads, epilogues and stores
with the dot upcast) and by compiling the real bf16 kernels for sm_80/sm_90 (tests/test_plan_aot.py).
"""
import contextlib
import os

import pytest
import torch
import torchvision
from torch.utils._python_dispatch import TorchDispatchMode

import fastres
from fastres.backend import get_backend
from fastres.verify import image_batch, randomize_norm_stats_

from digits import trained_digits_model
from kernel_testing import rel_err

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="needs a GPU or TRITON_INTERPRET=1 (set by tests/conftest.py on CPU machines)")

# PyTorch ops a Triton-path forward may dispatch outside kernels: allocation, views, metadata.
_NOT_COMPUTE = {
    "empty.memory_format", "empty_strided.default", "empty.default", "as_strided.default",
    "view.default", "_unsafe_view.default", "detach.default", "alias.default", "t.default",
    "permute.default", "expand.default", "select.int", "slice.Tensor", "unsqueeze.default",
    "squeeze.dim", "reshape.default", "contiguous.default", "is_same_size.default",
    "_to_copy.default", "lift_fresh.default", "set_.source_Storage_storage_offset",
    # the zeroed fp32 workspace and arrival counters of a split-K launch (GPU tiles only): memsets
    "zeros.default", "zero_.default", "fill_.Scalar",
}


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.inside_kernel = 0
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.inside_kernel:
            self.ops.append(str(func.overloadpacket.__name__) + "." + func._overloadname)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_launches():
    """Yields (launch names, recorder of PyTorch ops dispatched outside the launches)."""
    from triton.runtime import interpreter
    original = interpreter.GridExecutor.__call__
    recorder = _Recorder()
    launches: list[str] = []

    def counting(self, *args, **kwargs):
        launches.append(self.fn.__name__)
        recorder.inside_kernel += 1
        try:
            return original(self, *args, **kwargs)
        finally:
            recorder.inside_kernel -= 1

    interpreter.GridExecutor.__call__ = counting
    try:
        with recorder:
            yield launches, recorder
    finally:
        interpreter.GridExecutor.__call__ = original


def twins(arch, **kwargs):
    torch.manual_seed(0)
    reference = randomize_norm_stats_(getattr(torchvision.models, arch)(**kwargs)).eval()
    return reference, fastres.from_torchvision(reference)



@pytest.mark.parametrize("arch, kwargs, size", [
    ("resnet18", {}, 64),
    ("resnet50", {}, 64),
    ("resnext50_32x4d", {"replace_stride_with_dilation": [False, False, True]}, 40),
])
def test_whole_model_fp32_matches_torchvision(arch, kwargs, size, device):
    reference, model = twins(arch, **kwargs)
    reference.to(device), model.to(device)
    x = image_batch(2, size).to(device)
    with torch.no_grad():
        expected = reference(x)
        plan = model.plan().prepare(get_backend("triton"))   # fold and pack: plan-time work, not per forward
        with fastres.use_backend("triton"), count_launches() as (launches, recorder):
            got = model(x)   # NCHW input: the extension's padded stem input, then the plan's kernels
    assert rel_err(got, expected) <= 1e-3
    assert model.plan() is plan
    assert len(launches) == len(plan.steps)
    # one layout op: NCHW -> the zero-bordered 4-channel NHWC input of the ROW_K stem
    assert recorder.ops.count("nchw_to_nhwc_padded.default") == 1 and "nchw_to_nhwc.default" not in recorder.ops
    outside = set(recorder.ops) - _NOT_COMPUTE - {"nchw_to_nhwc_padded.default"}
    assert not outside, f"PyTorch compute outside the Triton kernels: {sorted(outside)}"


def test_trained_model_fp16_same_top1(device):
    """Real weights and inputs (sklearn digits): fp16 through the kernels, same top-1 as fp32."""
    model, x_test, y_test, _ = trained_digits_model()
    x = x_test[:48]
    with torch.no_grad():
        expected = model._forward_impl(x)       # torchvision's unfused fp32 eval forward
    half = fastres.fold_bn(model, dtype=torch.float16).to(device)
    with torch.no_grad(), fastres.use_backend("triton"):
        got = half(x.to(device, torch.float16)).float().cpu()
    assert torch.equal(got.argmax(1), expected.argmax(1))
    assert rel_err(got, expected) <= 2e-2


def test_fp16_resnet50_error_is_bounded(device):
    """Random weights: fp16 Triton path vs torchvision fp32, and torch's own fp16 error beside it."""
    reference, model = twins("resnet50")
    x = image_batch(2, 32)
    with torch.no_grad():
        expected = reference(x)
        torch_fp16 = fastres.fold_bn(reference, dtype=torch.float16)
        with fastres.use_backend("torch"):
            err_torch = rel_err(torch_fp16(x.half()), expected)   # fp32-accumulating reference
        model = model.half().to(device)
        with fastres.use_backend("triton"):
            err_fastres = rel_err(model(x.half().to(device)).cpu(), expected)
    assert err_fastres <= 2 * err_torch + 1e-3
