"""fastres models against their torchvision twins (CPU, torch backend of the plan)."""
import copy
import os

import warnings

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

import fastres
from fastres.verify import image_batch, randomize_norm_stats_
from kernel_testing import rel_err

ARCHS = list(fastres.ARCHITECTURES)


def twins(arch, seed=0, **kwargs):
    """(torchvision model, fastres model) with identical, non-default weights and BN stats."""
    torch.manual_seed(seed)
    reference = randomize_norm_stats_(getattr(torchvision.models, arch)(**kwargs), seed)
    with torch.device("meta"):   # skip a second random init: every tensor is assigned below
        model = getattr(fastres, arch)(**kwargs)
    model.load_state_dict({k: v.clone() for k, v in reference.state_dict().items()}, assign=True)
    return reference, model



@pytest.fixture(autouse=True)
def torch_backend():
    with fastres.use_backend("torch"):
        yield


@pytest.mark.parametrize("arch", ARCHS)
def test_constructor_matches_torchvision(arch):
    reference, model = twins(arch)
    assert list(model.state_dict()) == list(reference.state_dict())
    assert all(a.shape == b.shape for a, b in zip(model.state_dict().values(),
                                                   reference.state_dict().values()))
    x = image_batch(2, 32, seed=1)
    # eval: the fused plan vs torchvision's eval forward
    reference.eval(), model.eval()
    with torch.no_grad():
        expected, got = reference(x), model(x)
    assert rel_err(got, expected) <= 1e-5
    assert model._fastres.builds == 1
    # train: exactly torchvision (outputs, gradients, BN statistics)
    reference.train(), model.train()
    xr, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_r, out_m = reference(xr), model(xm)
    assert torch.equal(out_r, out_m)
    out_r.square().mean().backward()
    out_m.square().mean().backward()
    assert torch.equal(xr.grad, xm.grad)
    for (name, pr), (_, pm) in zip(reference.named_parameters(), model.named_parameters()):
        assert torch.equal(pr.grad, pm.grad), name
    for (name, br), (_, bm) in zip(reference.named_buffers(), model.named_buffers()):
        assert torch.equal(br, bm), name


@pytest.mark.parametrize("arch, kwargs", [
    ("resnet18", {"num_classes": 10}),
    ("resnet50", {"num_classes": 7, "zero_init_residual": True}),
    ("resnet34", {"zero_init_residual": True}),
    ("resnet50", {"replace_stride_with_dilation": [False, True, True]}),
    ("resnet50", {"replace_stride_with_dilation": [True, True, True], "num_classes": 3}),
    ("resnet50", {"groups": 4, "width_per_group": 16}),
    ("resnet50", {"width_per_group": 32}),
    ("resnet18", {"norm_layer": FrozenBatchNorm2d}),
])
def test_non_default_arguments(arch, kwargs):
    if kwargs.get("zero_init_residual"):
        fresh = getattr(fastres, arch)(**kwargs)
        last = "bn3" if arch == "resnet50" else "bn2"
        assert torch.count_nonzero(getattr(fresh.layer1[0], last).weight) == 0
    reference, model = twins(arch, **kwargs)
    x = image_batch(3, 40, seed=2)
    reference.eval(), model.eval()
    with torch.no_grad():
        expected, got = reference(x), model(x)
    assert got.shape == expected.shape
    assert rel_err(got, expected) <= 1e-5


def test_config_is_recorded():
    model = fastres.resnext50_32x4d(num_classes=5, replace_stride_with_dilation=[False, False, True])
    assert model.arch == "resnext50_32x4d"
    assert model.config == {"block": "Bottleneck", "layers": [3, 4, 6, 3], "num_classes": 5,
                            "groups": 32, "width_per_group": 4,
                            "replace_stride_with_dilation": [False, False, True]}
    with pytest.raises(ValueError, match="fixes groups=32"):
        fastres.resnext50_32x4d(groups=8)


def test_weights_argument_goes_through_torchvision():
    with pytest.raises(ValueError, match="IMAGENET1K_V2"):
        fastres.resnet50(weights="NOT_A_WEIGHT")
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        fastres.resnet50(weights="/nonexistent/model.pth")
    # an enum of another architecture is rejected as torchvision rejects it
    with pytest.raises(TypeError):
        fastres.resnet18(weights=torchvision.models.ResNet50_Weights.IMAGENET1K_V1)


def test_weights_from_local_checkpoint(tmp_path):
    reference, _ = twins("resnet18", num_classes=12)
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": reference.state_dict()}, path)
    model = fastres.resnet18(weights=str(path)).eval()
    assert model.fc.out_features == 12
    x = image_batch(2, 32)
    with torch.no_grad():
        assert rel_err(model(x), reference.eval()(x)) <= 1e-5
    from safetensors.torch import save_file
    save_file(reference.state_dict(), tmp_path / "ckpt.safetensors")
    model2 = fastres.resnet18(weights=tmp_path / "ckpt.safetensors").eval()
    with torch.no_grad():
        assert torch.equal(model2(x), model(x))


def test_from_torchvision_with_replaced_fc_and_frozen_bn():
    torch.manual_seed(3)
    tv = randomize_norm_stats_(torchvision.models.resnet18())
    tv.fc = nn.Sequential(nn.Dropout(0.2), nn.Linear(512, 4))
    tv.bn1.eps = 1e-3
    tv.eval()
    model = fastres.from_torchvision(tv)
    assert isinstance(model, fastres.ResNet) and not model.training
    assert model.bn1.eps == 1e-3
    x = image_batch(2, 48)
    with torch.no_grad():
        assert rel_err(model(x), tv(x)) <= 1e-5
    # the source is untouched and the copy is independent
    with torch.no_grad():
        model.fc[1].weight.zero_()
    assert torch.count_nonzero(tv.fc[1].weight) > 0

    frozen = torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d, num_classes=6)
    frozen.load_state_dict(randomize_norm_stats_(torchvision.models.resnet50(num_classes=6)).state_dict())
    model = fastres.from_torchvision(frozen.eval())
    assert isinstance(model.bn1, FrozenBatchNorm2d)
    with torch.no_grad():
        assert rel_err(model(x), frozen(x)) <= 1e-5


def test_from_torchvision_dilated_and_wide():
    for arch, kwargs in [("wide_resnet50_2", {}),
                         ("resnext50_32x4d", {"replace_stride_with_dilation": [False, True, True]})]:
        tv = randomize_norm_stats_(getattr(torchvision.models, arch)(**kwargs)).eval()
        model = fastres.from_torchvision(tv)
        assert model.arch == arch
        assert model.config["replace_stride_with_dilation"] == kwargs.get(
            "replace_stride_with_dilation", [False, False, False])
        x = image_batch(1, 32)
        with torch.no_grad():
            assert rel_err(model(x), tv(x)) <= 1e-5


def test_unfoldable_norm_runs_as_pytorch_steps_of_the_plan():
    """GroupNorm cannot fold into a conv: each conv is a fused step without the norm, and each
    GroupNorm (and the ReLU/add after it) a PyTorch step of the plan; the answer is torchvision's."""
    def group_norm(c):
        return nn.GroupNorm(8, c)
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(norm_layer=group_norm).eval()
    model = fastres.resnet18(norm_layer=group_norm).eval()
    model.load_state_dict(tv.state_dict())
    for m in model.modules():
        if isinstance(m, nn.GroupNorm):
            nn.init.uniform_(m.weight, 0.5, 1.5), nn.init.uniform_(m.bias, -0.2, 0.2)
    tv.load_state_dict(model.state_dict())
    x = image_batch(2, 32)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")          # no fallback: the plan runs
        got = model(x)
    assert rel_err(got, tv(x)) <= 1e-5
    plan = model.plan()
    kinds = [s.kind for s in plan.steps]
    assert kinds.count("torch") >= 20 and kinds.count("conv") == 20
    assert sum("GroupNorm" in s.ops[0] for s in plan.steps if s.kind == "torch") == 20


def test_eval_with_autograd_stays_exact():
    """Frozen-BN fine-tuning: eval mode but gradients needed -> torchvision's forward, exact grads."""
    reference, model = twins("resnet18")
    reference.eval(), model.eval()
    x = image_batch(2, 32)
    with pytest.warns(UserWarning, match="inference_mode"):
        out = model(x)
    out.sum().backward()
    reference(x).sum().backward()
    assert torch.equal(model.fc.weight.grad, reference.fc.weight.grad)
    assert model._fastres.builds == 0


# -- plan invalidation --------------------------------------------------------------------------
@pytest.fixture
def eval_twins():
    reference, model = twins("resnet18", num_classes=10)
    return reference.eval(), model.eval()


def _check(reference, model, x, builds):
    with torch.no_grad():
        expected, got = reference(x), model(x)
    assert rel_err(got, expected) <= 1e-5
    assert model._fastres.builds == builds


def test_plan_is_cached(eval_twins):
    reference, model = eval_twins
    x = image_batch(2, 32)
    _check(reference, model, x, 1)
    _check(reference, model, x, 1)


def test_plan_rebuilt_after_load_state_dict(eval_twins):
    reference, model = eval_twins
    x = image_batch(2, 32)
    _check(reference, model, x, 1)
    other, _ = twins("resnet18", seed=5, num_classes=10)
    reference.load_state_dict(other.state_dict())
    model.load_state_dict(other.state_dict())
    _check(reference, model, x, 2)


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.Adam])
def test_plan_rebuilt_after_optimizer_step(eval_twins, optimizer):
    reference, model = eval_twins
    x = image_batch(2, 32)
    _check(reference, model, x, 1)
    for m in (reference, model):
        opt = optimizer(m.parameters(), lr=0.1)
        m.train()
        m(x).logsumexp(1).mean().backward()
        opt.step()
        m.eval()
    _check(reference, model, x, 2)


def test_plan_rebuilt_after_train_mode_updates_bn_stats(eval_twins):
    reference, model = eval_twins
    x = image_batch(4, 32)
    _check(reference, model, x, 1)
    with torch.no_grad():
        for m in (reference, model):
            m.train()(x * 2 + 1)
            m.eval()
    _check(reference, model, x, 2)


def test_plan_rebuilt_after_assignment_and_inplace_edit(eval_twins):
    reference, model = eval_twins
    x = image_batch(2, 32)
    _check(reference, model, x, 1)
    new = torch.randn_like(model.fc.weight)
    reference.fc.weight = nn.Parameter(new.clone())
    model.fc.weight = nn.Parameter(new.clone())
    _check(reference, model, x, 2)
    with torch.no_grad():
        reference.layer2[0].bn1.running_var.mul_(3)
        model.layer2[0].bn1.running_var.mul_(3)
    _check(reference, model, x, 3)
    reference.layer1[1].bn2.eps = model.layer1[1].bn2.eps = 0.5
    _check(reference, model, x, 4)


def test_plan_rebuilt_after_dtype_and_device_moves(eval_twins):
    reference, model = eval_twins
    x = image_batch(2, 32)
    _check(reference, model, x, 1)
    model.double()
    reference.double()
    _check(reference, model, x.double(), 2)
    model.to("cpu", torch.float32)
    reference.float()
    _check(reference, model, x, 3)
    model.half()
    with torch.no_grad():
        got = model(x.half()).float()
        expected = reference(x)
    assert got.dtype == torch.float32 and model._fastres.builds == 4
    assert rel_err(got, expected) <= 2e-2
    model.bfloat16()
    with torch.no_grad():
        assert model(x.bfloat16()).dtype == torch.bfloat16
    assert model._fastres.builds == 5


# -- bad input ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_model():
    return fastres.resnet18(num_classes=10).eval()


@pytest.mark.parametrize("x, error, match", [
    (torch.randn(3, 32, 32), ValueError, "4-D input"),
    (torch.randn(1, 2, 3, 32, 32), ValueError, "4-D input"),
    (torch.randn(2, 1, 32, 32), ValueError, "3 input channels, got 1"),
    (torch.randn(2, 32, 32, 3), ValueError, "3 input channels, got 32"),
    (torch.randn(2, 3, 0, 32), ValueError, "too small"),
    (torch.randn(2, 3, 32, 32, dtype=torch.float64), TypeError, "dtype torch.float64"),
    (torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8), TypeError, "dtype torch.uint8"),
    (torch.randn(2, 3, 32, 32, device="meta"), ValueError, "on meta"),
    ([[1.0]], TypeError, "torch.Tensor"),
])
def test_bad_input_gets_clear_error(small_model, x, error, match):
    with torch.no_grad(), pytest.raises(error, match=match):
        small_model(x)


def test_empty_batch_and_nan(small_model):
    reference = torchvision.models.resnet18(num_classes=10).eval()
    reference.load_state_dict(small_model.state_dict())
    with torch.no_grad():
        empty = small_model(torch.randn(0, 3, 32, 32))
        assert empty.shape == reference(torch.randn(0, 3, 32, 32)).shape == (0, 10)
        x = image_batch(2, 32)
        x[1, :, 5, 5] = float("nan")
        out = small_model(x)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[0]).all()


def test_tiny_and_odd_inputs_match(small_model):
    reference = torchvision.models.resnet18(num_classes=10).eval()
    reference.load_state_dict(small_model.state_dict())
    for h, w in [(1, 1), (7, 13), (33, 17)]:
        x = torch.randn(3, 3, h, w)
        with torch.no_grad():
            assert rel_err(small_model(x), reference(x)) <= 1e-5


def test_channels_last_input(small_model):
    x = image_batch(2, 32)
    with torch.no_grad():
        assert torch.equal(small_model(x), small_model(x.contiguous(memory_format=torch.channels_last)))


def test_mismatched_state_dict_keys():
    model = fastres.resnet18()
    with pytest.raises(RuntimeError, match="Unexpected key.*layer1.0.conv3.weight"):
        model.load_state_dict(torchvision.models.resnet50().state_dict())
    partial = model.state_dict()
    del partial["fc.bias"]
    with pytest.raises(RuntimeError, match='Missing key.*"fc.bias"'):
        model.load_state_dict(partial)
    sd = {"module." + k: v for k, v in model.state_dict().items()}
    with pytest.raises(KeyError, match="module."):
        model.load_state_dict(sd)
    with pytest.raises(KeyError, match="BN-folded"):
        model.load_state_dict(fastres.fold_bn(model).state_dict())


def test_backend_switch(monkeypatch):
    from fastres.backend import backend_for
    cpu = torch.device("cpu")
    with fastres.use_backend("auto"):
        assert backend_for(cpu) == "torch"
        assert backend_for(torch.device("meta")) == "triton"
    with pytest.raises(ValueError, match="unknown fastres backend"):
        with fastres.use_backend("cudnn"):
            pass
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with fastres.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backend_for(cpu)
