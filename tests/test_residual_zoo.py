"""Residual CNNs fastres did not write (tests/residual_zoo.py), through fastres.optimize, against
each model's own PyTorch eval forward: fp32 within 1e-5 relative on CPU (torch backend of the
plan), with what fused and what ran as PyTorch pinned step by step."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastres
import residual_zoo as zoo
from fastres.capture import FallbackWarning
from fastres.verify import image_batch
from kernel_testing import rel_err

TOL = 1e-5



@pytest.fixture(autouse=True)
def torch_backend():
    with fastres.use_backend("torch"), torch.no_grad():
        yield


def kinds(plan) -> dict:
    out = {}
    for s in plan.steps:
        out[s.kind] = out.get(s.kind, 0) + 1
    return out


def check(model, size=32, batch=2):
    """optimize(model)(x) == model(x) with the plan (no fallback); returns the plan."""
    torch.manual_seed(0)
    model = zoo.randomize_(model)
    fast = fastres.optimize(model)
    x = image_batch(batch, size)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        got = fast(x)
    assert rel_err(got, model(x)) <= TOL
    return fast.plan()


def test_tutorial_resnet_fuses_completely():
    plan = check(zoo.TutorialResNet())
    # stem conv, 16 block convs (3 projections folded as concat-K), max pool, pool+view+fc head
    assert kinds(plan) == {"conv": 17, "max_pool": 1, "head": 1}
    assert sum("shortcut" in s.inputs for s in plan.steps) == 3
    assert sum("residual" in s.inputs for s in plan.steps) == 5


def test_tutorial_resnet_with_a_relu_per_block_and_shortcut_first():
    model = zoo.TutorialResNet(layers=(1, 1, 1, 1))
    for block in model.blocks:
        block.relu = torch.nn.ReLU()            # per block instead of shared
    plan = check(model)
    assert kinds(plan) == {"conv": 9, "max_pool": 1, "head": 1}


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110])
def test_cifar_resnet_option_a(depth):
    plan = check(zoo.CifarResNet(depth, "A"), size=32 if depth <= 56 else 16, batch=2 if depth <= 56 else 1)
    n_convs = 1 + 2 * (depth - 2) // 6 * 3
    assert kinds(plan) == {"conv": n_convs, "head": 1}
    strided = [s for s in plan.steps if s.attrs.get("residual_stride") == 2]
    # the two downsampling blocks read the shortcut at stride 2 into channels [c/4, 3c/4)
    assert [(s.tensors["weight"].shape[0], s.attrs["residual_channel_offset"]) for s in strided] == [(32, 8), (64, 16)]
    assert all("residual/s2@c" in " ".join(s.ops) for s in strided)


@pytest.mark.parametrize("depth", [20, 56])
def test_cifar_resnet_projection(depth):
    plan = check(zoo.CifarResNet(depth, "B"))
    assert kinds(plan) == {"conv": 1 + 2 * (depth - 2) // 6 * 3, "head": 1}
    assert sum("shortcut" in s.inputs for s in plan.steps) == 2


def test_option_a_on_odd_input_sizes():
    """15x15 and 17x13 inputs: ceil(H/2) samples of the shortcut, like x[:, :, ::2, ::2]."""
    model = zoo.randomize_(zoo.CifarResNet(8, "A"))
    fast = fastres.optimize(model)
    for shape in ((1, 3, 15, 15), (3, 3, 17, 13)):
        x = torch.randn(shape)
        assert rel_err(fast(x), model(x)) <= TOL


def test_preact_resnet18_dual_output_epilogue():
    plan = check(zoo.PreActResNet(width=16))
    assert kinds(plan) == {"conv": 17, "head": 1}
    dual = [s for s in plan.steps if s.extra_outputs]
    # stem and every block's last conv also write BN -> ReLU of their result (next block / head)
    assert len(dual) == 9 and all(s.attrs["relu2"] for s in dual)
    assert all("out2: affine+relu" in s.ops for s in dual)
    # the raw sums still flow to the identity shortcuts
    assert sum("residual" in s.inputs for s in plan.steps) == 5


def test_wide_resnet_structure_small():
    plan = check(zoo.WideResNet(depth=16, widen=2, dropout=0.3), size=16)
    # 1 + 6 blocks x 2 convs; 3 projections (16->32, 32->64, 64->128) as concat-K; dropout vanishes
    assert kinds(plan) == {"conv": 13, "head": 1}
    assert sum("shortcut" in s.inputs for s in plan.steps) == 3


def test_wide_resnet_28_10():
    """The real WRN-28-10 (36.5M parameters), one 16x16 image."""
    plan = check(zoo.WideResNet(depth=28, widen=10), size=16, batch=1)
    assert kinds(plan) == {"conv": 25, "head": 1}
    assert [s.tensors["weight"].shape[0] for s in plan.steps if s.kind == "conv"][-1] == 640


def test_resnet_d_deep_stem_and_avg_down():
    plan = check(zoo.ResNetD())
    # deep stem (3 convs), 4 blocks x 2 convs; the 3 avg_down shortcuts: the pools are PyTorch
    # steps, their 1x1 conv + BN is the concat-K second operand of the block's last conv
    assert kinds(plan) == {"conv": 11, "max_pool": 1, "torch": 3, "head": 1}
    assert [s.attrs["shortcut_stride"] for s in plan.steps if "shortcut" in s.inputs] == [1, 1, 1]
    assert all("AvgPool2d" in n for n in plan.notes)


def test_other_layers_run_as_pytorch_steps():
    """SiLU, GELU, LeakyReLU, GroupNorm, MaxPool2d(2), adaptive max pool and cat: PyTorch steps
    inside the plan, each named with why; the convs still fuse."""
    plan = check(zoo.OddResNet())
    assert kinds(plan) == {"conv": 3, "torch": 11}
    whats = [s.attrs["what"] for s in plan.steps if s.kind == "torch"]
    assert whats == ["LeakyReLU", "MaxPool2d", "silu", "GroupNorm", "add", "gelu", "adaptive_max_pool2d",
                     "adaptive_avg_pool2d", "cat", "Tensor.flatten", "Linear"]
    assert len(plan.notes) == 11 and plan.notes[0] == "stem.2: LeakyReLU runs as PyTorch"


def test_capture_follows_edits_of_a_hand_written_model():
    model = zoo.randomize_(zoo.CifarResNet(8, "A"))
    fast = fastres.optimize(model)
    x = image_batch(2, 16)
    fast(x)
    model.layer2[0].shortcut = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 1, 2, bias=False),
                                                   torch.nn.BatchNorm2d(32)).eval()
    assert rel_err(fast(x), model(x)) <= TOL and fast._fastres.builds == 2
    assert sum("shortcut" in s.inputs for s in fast.plan().steps) == 1


def test_squeeze_and_excitation():
    plan = check(zoo.SEResNet())
    # 9 convs + 3 x 2 excitation 1x1 convs (on [N, C, 1, 1]); per block one se_scale step:
    # x * sigmoid(gate) with the identity add and ReLU fused where the add is not a conv's
    # (block 0); the downsampling blocks' projections take the scaled value as their residual
    # the squeeze (AdaptiveAvgPool2d(1)) is a second output of each block's conv2 epilogue
    assert kinds(plan) == {"conv": 15, "se_scale": 3, "head": 1}
    scales = [s for s in plan.steps if s.kind == "se_scale"]
    assert [("residual" in s.inputs, s.attrs["relu"], s.attrs["sigmoid"]) for s in scales] == [
        (True, True, True), (False, False, True), (False, False, True)]
    assert [s.ops for s in scales][0] == ["x*sigmoid(gate)", "residual", "relu"]
    squeezed = [s for s in plan.steps if s.attrs.get("channel_mean")]
    assert [s.name for s in squeezed] == [f"blocks.{i}.conv2" for i in range(3)]
    assert all(s.ops[-1] == "out2: mean_hw" and s.extra_outputs == (f"blocks_{i}_se_pool",)
               for i, s in enumerate(squeezed))
    assert plan.notes == []


class _Squeezes(torch.nn.Module):
    """The squeeze written four ways: x.mean((2, 3), keepdim=True) (timm's SEModule), torch.mean
    over (-2, -1) without keepdim (an [N, C] mean), F.adaptive_avg_pool2d(x, (1, 1)), and a mean
    whose conv output also feeds a later add (the mean is read before the add runs)."""

    def __init__(self):
        super().__init__()
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(8, 8, 3, padding=1) for _ in range(4))
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x):
        a = self.convs[0](x)
        a = a * torch.sigmoid(a.mean((2, 3), keepdim=True))
        b = self.convs[1](a)
        b = b * torch.sigmoid(self.fc(torch.mean(b, dim=(-2, -1)))).view(-1, 8, 1, 1)
        c = self.convs[2](b)
        c = c * torch.sigmoid(torch.nn.functional.adaptive_avg_pool2d(c, (1, 1)))
        d = self.convs[3](c)
        return d + d.mean((2, 3), keepdim=True) * c


def check_on(model, x):
    """optimize(model)(x) == model(x) on ``x``; returns the plan."""
    fast = fastres.optimize(model.eval())
    assert rel_err(fast(x), model(x)) <= TOL
    return fast.plan()


def test_squeeze_written_other_ways():
    plan = check_on(_Squeezes(), torch.randn(3, 8, 9, 7))
    assert [s.attrs.get("channel_mean") for s in plan.steps if s.kind == "conv"] == [True, "flat", True, True]
    assert not any(s.attrs.get("what") in ("mean", "Tensor.mean", "adaptive_avg_pool2d") for s in plan.steps)


def test_squeeze_and_excitation_with_linear_layers():
    plan = check(zoo.SEResNet(linear=True))
    # the excitation pool -> flatten -> Linear is a head kernel (global pool fused with the FC)
    assert kinds(plan) == {"conv": 9, "head": 4, "torch": 17}


class _SigmoidGates(torch.nn.Module):
    """x * sigmoid(.) where the gate is not [N, C, 1, 1]: SiLU written out, a spatial attention
    map [N, 1, H, W], a [W]-shaped gate broadcast over the last dim."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.att = torch.nn.Conv2d(8, 1, 1)
        self.w = torch.nn.Parameter(torch.randn(16))

    def forward(self, x):
        y = self.conv(x)
        y = y * torch.sigmoid(y)
        y = y * torch.sigmoid(self.att(y)) + y
        return y * self.w.sigmoid()


def test_sigmoid_gates_of_other_shapes_broadcast_as_pytorch_does():
    model = _SigmoidGates().eval()
    x = torch.randn(2, 3, 16, 16)
    fast = fastres.optimize(model)
    assert rel_err(fast(x), model(x)) <= TOL
    assert kinds(fast.plan())["se_scale"] == 3


class _GlobalContextAdd(torch.nn.Module):
    """relu(y + conv1x1(y.mean((2, 3)))): the add broadcasts a [N, C, 1, 1] conv output over the
    map (timm's global-context block), so it runs as PyTorch's add after the conv kernel."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = self.conv(x)
        return F.relu(y + self.fc(y.mean((2, 3), keepdim=True)))


def test_broadcasting_add_of_a_conv_output():
    plan = check_on(_GlobalContextAdd(), torch.randn(2, 3, 9, 7))
    assert [s.kind for s in plan.steps] == ["conv", "conv"] and "residual" in plan.steps[1].inputs
    assert plan.value_shapes((2, 3, 9, 7))[plan.steps[1].output] == (2, 8, 9, 7)


def test_head_written_as_pool_conv1x1_flatten():
    """timm's ClassifierHead(use_conv=True): global pool -> 1x1 conv -> flatten is the head kernel
    (the pool is not taken as a squeeze of the conv before it)."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Conv2d(16, 10, 1), torch.nn.Flatten())
    plan = check_on(model, torch.randn(2, 3, 9, 9))
    assert kinds(plan) == {"conv": 1, "head": 1} and not plan.steps[0].extra_outputs
