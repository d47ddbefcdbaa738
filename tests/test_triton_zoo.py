"""Hand-written residual CNNs (tests/residual_zoo.py) through the Triton kernels — the code a
CUDA forward runs; under the interpreter on CPU — against their own PyTorch eval forward, at small
resolution: fp32 within 1e-3, the launch count pinned, no PyTorch compute outside the kernels
where everything fuses; fp16 top-1 equal on models trained on sklearn's digits."""
import os

import pytest
import torch

import fastres
import residual_zoo as zoo
from digits import train_on_digits
from fastres.backend import get_backend
from fastres.verify import image_batch
from test_triton_models import _NOT_COMPUTE, count_launches
from kernel_testing import rel_err

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="needs a GPU or TRITON_INTERPRET=1 (set by tests/conftest.py on CPU machines)")



def run_triton(model, x, device):
    """(output, launch names, PyTorch ops dispatched outside launches, plan) of the Triton path."""
    fast = fastres.optimize(model.to(device))
    x = x.to(device)
    with torch.no_grad():
        plan = fast.plan().prepare(get_backend("triton"))
        with fastres.use_backend("triton"), count_launches() as (launches, recorder):
            got = fast(x)
    assert fast.plan() is plan
    return got, launches, recorder.ops, plan


@pytest.mark.parametrize("name, make, size, launches", [
    # stem conv + max pool + 16 convs (3 projections as concat-K) + head
    ("tutorial", lambda: zoo.TutorialResNet(width=16), 32, 19),
    # CIFAR ResNet-20, option A: 19 convs (2 of them read the shortcut at stride 2) + head
    ("cifar20_A", lambda: zoo.CifarResNet(20, "A", width=16), 16, 20),
    ("cifar20_B", lambda: zoo.CifarResNet(20, "B", width=16), 16, 20),
    # pre-activation ResNet-18 at width 16: 17 convs (9 with the dual affine output) + head
    ("preact18", lambda: zoo.PreActResNet(width=16), 16, 18),
    # WRN-16-2 (WRN-28-10's structure at reduced depth and width): 13 convs + head
    ("wrn16_2", lambda: zoo.WideResNet(16, 2), 16, 14),
])
def test_fuses_completely_under_triton(name, make, size, launches, device):
    torch.manual_seed(0)
    model = zoo.randomize_(make())
    x = image_batch(2, size)
    with torch.no_grad():
        expected = model(x)
    got, names, ops, plan = run_triton(model, x, device)
    assert rel_err(got.cpu(), expected) <= 1e-3
    assert len(names) == launches == len(plan.steps)
    outside = set(ops) - _NOT_COMPUTE - {"nchw_to_nhwc.default", "nchw_to_nhwc_padded.default"}
    assert not outside, f"PyTorch compute outside the Triton kernels: {sorted(outside)}"


def test_resnet_d_under_triton(device):
    """The avg_down pools run as PyTorch steps (3 of them), everything else as 13 kernels."""
    torch.manual_seed(0)
    model = zoo.randomize_(zoo.ResNetD())
    x = image_batch(2, 32)
    with torch.no_grad():
        expected = model(x)
    got, names, ops, plan = run_triton(model, x, device)
    assert rel_err(got.cpu(), expected) <= 1e-3
    assert len(names) == 13 and len(plan.steps) == 16
    assert "avg_pool2d.default" in ops


def test_other_layers_under_triton(device):
    torch.manual_seed(0)
    model = zoo.randomize_(zoo.OddResNet())
    x = image_batch(2, 16)
    with torch.no_grad():
        expected = model(x)
    got, names, ops, plan = run_triton(model, x, device)
    assert rel_err(got.cpu(), expected) <= 1e-3
    assert len(names) == 3                        # the three convs; the rest is PyTorch
    assert {"silu.default", "gelu.default", "native_group_norm.default"} <= set(ops)


@pytest.mark.parametrize("name, make", [
    ("cifar8_A", lambda: zoo.CifarResNet(8, "A", width=16)),
    ("preact", lambda: zoo.PreActResNet(layers=(1, 1, 1), width=16)),
])
def test_digits_trained_fp16_same_top1(name, make, device):
    """Real weights and inputs: fp16 through the kernels, same top-1 as the model's fp32 eval."""
    torch.manual_seed(0)
    model, x_test, y_test = train_on_digits(make(), steps=120)
    x = x_test[:24]                     # fp16 dots are slow numpy under the interpreter
    with torch.no_grad():
        expected = model(x)
    assert (expected.argmax(1) == y_test[:24]).float().mean() > 0.8   # it learned the digits
    half = model.half()
    got, names, _, plan = run_triton(half, x.half(), device)
    assert torch.equal(got.cpu().float().argmax(1), expected.argmax(1))
    assert rel_err(got.cpu(), expected) <= 2e-2
    assert len(names) == len(plan.steps)


def test_squeeze_and_excitation_under_triton(device):
    """15 convs (6 of them the excitation 1x1s; the 3 SE producers also write the squeeze, the
    per-channel mean, from their epilogue), 3 SE scale kernels, the head: 19 launches and 19 steps,
    no PyTorch compute outside them."""
    torch.manual_seed(0)
    model = zoo.randomize_(zoo.SEResNet())
    x = image_batch(2, 16)
    with torch.no_grad():
        expected = model(x)
    got, names, ops, plan = run_triton(model, x, device)
    assert rel_err(got.cpu(), expected) <= 1e-3
    assert len(names) == 19 == len(plan.steps) and names.count("_se_scale_nhwc_kernel") == 3
    assert sum(bool(s.attrs.get("channel_mean")) for s in plan.steps) == 3
    assert not set(ops) - _NOT_COMPUTE - {"nchw_to_nhwc.default", "nchw_to_nhwc_padded.default"}
    # into the Engine's preallocated, lifetime-shared buffers (the means are [N, C, 1, 1] values)
    x = x.to(device).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        buffers = plan.allocate(tuple(x.shape))
        assert tuple(buffers["blocks_0_se_pool"].shape) == (2, 16, 1, 1)
        assert torch.equal(plan.run(x, get_backend("triton"), buffers).cpu(), got.cpu())


def test_broadcasting_add_under_triton(device):
    """A conv output added by broadcasting ([N, C, 1, 1] over the map): the conv kernel, then
    PyTorch's add and ReLU; the squeeze it reads comes from the first conv's epilogue."""
    from test_residual_zoo import _GlobalContextAdd
    torch.manual_seed(0)
    model = _GlobalContextAdd().eval()
    x = torch.randn(2, 3, 9, 7)
    with torch.no_grad():
        expected = model(x)
    got, names, ops, plan = run_triton(model, x, device)
    assert rel_err(got.cpu(), expected) <= 1e-3
    assert len(names) == 2 and plan.steps[0].attrs["channel_mean"] is True
    assert {"add.Tensor", "relu_.default"} <= set(ops)
