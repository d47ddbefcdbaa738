"""timm's ResNet family (pretrained=False) through fastres.optimize, each against its own eval
output: fp32 within 1e-5 on CPU (torch backend), with what fuses pinned for resnet50d (ResNet-D:
deep stem, avg_down), seresnet50 (SE), resnet26t, resnetv2_50 (pre-activation, timm's
BatchNormAct2d) and cspresnet50 (BatchNormAct2d with LeakyReLU); a sample of
timm.list_models("*resnet*") must at least compute what the model computes (fusing what it can,
the rest as PyTorch steps); resnet10t, resnetv2_18 and seresnet18 through the Triton kernels.
Skipped when timm is not installed (it is in the ``test`` extra)."""
import os
import warnings

import pytest
import torch

import fastres
import residual_zoo as zoo
from fastres.capture import FallbackWarning
from fastres.verify import image_batch
from kernel_testing import rel_err

timm = pytest.importorskip("timm", reason="timm is not installed (pip install timm, or the [test] extra)")

TOL = 1e-5



def kinds(plan) -> dict:
    return {k: sum(s.kind == k for s in plan.steps) for k in sorted({s.kind for s in plan.steps})}


def timm_model(name):
    torch.manual_seed(0)
    return zoo.randomize_(timm.create_model(name, pretrained=False, num_classes=10))


@pytest.mark.parametrize("name, expected", [
    # deep stem: 3 convs; 16 bottlenecks; 4 avg_down shortcuts (pool = PyTorch step, 1x1 conv + BN
    # as concat-K; the first stage's has no pool: stride 1); 6 3x3+1x1 pairs on chip
    ("resnet50d", {"conv": 39, "conv_pair": 6, "head": 1, "max_pool": 1, "torch": 3}),
    # SE in every bottleneck: 16 se_scale steps; the squeeze (x.mean((2, 3), keepdim=True)) is a
    # second output of each conv3's epilogue: nothing runs as PyTorch
    ("seresnet50", {"conv": 85, "head": 1, "max_pool": 1, "se_scale": 16}),
    ("resnet26t", {"conv": 21, "conv_pair": 3, "head": 1, "max_pool": 1, "torch": 3}),
    # pre-activation bottlenecks, every norm a BatchNormAct2d: 48 block convs + stem (the
    # projections as concat-K), the head's pool -> 1x1 conv -> flatten as one head step; PyTorch:
    # only the first block's norm1 (it reads the max pool)
    ("resnetv2_50", {"conv": 49, "head": 1, "max_pool": 1, "torch": 1}),
    # BatchNormAct2d with LeakyReLU: the BN folds, the 38 LeakyReLUs (and the CSP splits, concats
    # and the blocks' own LeakyReLU modules) run as PyTorch
    ("cspresnet50", {"conv": 55, "head": 1, "max_pool": 1, "torch": 71}),
])
def test_timm_resnets_fuse(name, expected):
    model = timm_model(name)
    fast = fastres.optimize(model)
    x = image_batch(2, 64)
    with torch.no_grad(), fastres.use_backend("torch"), warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        got = fast(x)
        assert rel_err(got, model(x)) <= TOL
    assert kinds(fast.plan()) == expected


SAMPLE = ["resnet10t", "resnet18d", "resnet26", "resnet34d", "seresnet18", "ecaresnet26t", "resnetblur18",
          "resnetaa34d", "skresnet18", "resnetv2_18", "legacy_seresnet18", "resnetrs50", "wide_resnet50_2",
          "nf_resnet26", "gcresnet33ts"]


@pytest.mark.parametrize("name", SAMPLE)
def test_timm_sample_computes_what_the_model_computes(name):
    assert name in timm.list_models("*resnet*")
    model = timm_model(name)
    fast = fastres.optimize(model)
    x = image_batch(1, 64)
    with torch.no_grad(), fastres.use_backend("torch"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        assert rel_err(fast(x), model(x)) <= TOL
    plan = fast.plan()
    fused = any(s.kind in ("conv", "conv_pair") for s in plan.steps)
    # NF-ResNets standardise their conv weights in the forward (ScaledStdConv2d): no conv folds,
    # the whole model runs as PyTorch steps; every other sample fuses its convolutions
    assert fused == (name != "nf_resnet26"), plan.notes[:5]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("name, launches, steps, pytorch_ops", [
    # 3-conv stem, max pool, 4 blocks x 2 convs (3 avg_down projections as concat-K), head; the
    # 3 avg_down pools are PyTorch
    ("resnet10t", 13, 16, {"avg_pool2d.default": 3}),
    # pre-activation, BatchNormAct2d folded: stem, max pool, 8 blocks x 2 convs, the head (pool ->
    # 1x1 conv -> flatten); PyTorch: the first norm1 (after the max pool)
    ("resnetv2_18", 19, 20, {"native_batch_norm.default": 1}),
    # SE in every block, the squeeze from the conv2 epilogues: everything is a kernel
    ("seresnet18", 46, 46, {}),
])
def test_timm_under_triton(name, launches, steps, pytorch_ops, device):
    from fastres.backend import get_backend
    from test_triton_models import _NOT_COMPUTE, count_launches

    model = timm_model(name).to(device)
    x = image_batch(2, 32).to(device)
    with torch.no_grad():
        expected = model(x)
        fast = fastres.optimize(model)
        plan = fast.plan().prepare(get_backend("triton"))
        with fastres.use_backend("triton"), count_launches() as (names, recorder):
            got = fast(x)
    assert rel_err(got.cpu(), expected.cpu()) <= 1e-3
    assert len(names) == launches and len(plan.steps) == steps
    for op, count in pytorch_ops.items():
        assert recorder.ops.count(op) == count, (op, sorted(set(recorder.ops)))
    if not pytorch_ops:
        assert not set(recorder.ops) - _NOT_COMPUTE - {"nchw_to_nhwc.default", "nchw_to_nhwc_padded.default"}


def test_resnetv2_batchnorm_act_folds():
    """timm's BatchNormAct2d (BN -> drop -> act in one module): after a conv, relu(bn(conv)) is the
    conv step's epilogue; after a pre-activation add, the second (affine + ReLU) output of the
    conv producing the sum; apply_act=False (the projection's norm) a plain folded BN."""
    model = timm_model("resnetv2_50")
    plan = fastres.optimize(model).plan()
    convs = [s for s in plan.steps if s.kind == "conv"]
    # every block: conv1 -> norm2 and conv2 -> norm3 (ReLU inside); conv3 + shortcut -> the next
    # norm1 (or the final norm) as the second output
    assert sum(s.attrs["relu"] for s in convs) == 32
    dual = [s for s in convs if s.extra_outputs]
    assert len(dual) == 16 and all(s.attrs["relu2"] and "out2: affine+relu" in s.ops for s in dual)
    assert [n for n in plan.notes if "BatchNormAct2d" in n] == ["stages.0.blocks.0.norm1: BatchNormAct2d runs as PyTorch"]


def test_cspresnet_leaky_relu_after_the_folded_norm():
    model = timm_model("cspresnet50")
    plan = fastres.optimize(model).plan()
    acts = [s for s in plan.steps if s.kind == "torch" and s.name.endswith(".bn.act")]
    assert len(acts) == 38 and {s.attrs["what"] for s in acts} == {"LeakyReLU"}
    assert not any("BatchNormAct2d" in n for n in plan.notes)


class _NormActs(torch.nn.Module):
    """BatchNormAct2d as a user might configure it: ReLU, apply_act=False before an add, an
    in-place SiLU, a Dropout (identity in eval) as its drop layer, and a DropBlock (kept whole)."""

    def __init__(self):
        from timm.layers import BatchNormAct2d, DropBlock2d
        super().__init__()
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(16, 16, 3, padding=1, bias=False) for _ in range(5))
        self.norms = torch.nn.ModuleList([
            BatchNormAct2d(16), BatchNormAct2d(16, apply_act=False),
            BatchNormAct2d(16, act_layer=torch.nn.SiLU, inplace=True),
            BatchNormAct2d(16, drop_layer=lambda: torch.nn.Dropout(0.5)),
            BatchNormAct2d(16, drop_layer=lambda: DropBlock2d(0.2, 3))])

    def forward(self, x):
        y = self.norms[0](self.convs[0](x))
        y = torch.relu(self.norms[1](self.convs[1](y)) + x)
        z = self.norms[2](self.convs[2](y))
        z = self.norms[3](self.convs[3](z)) + z
        return self.norms[4](self.convs[4](z))


def test_batchnorm_act_configurations():
    model = zoo.randomize_(_NormActs())
    fast = fastres.optimize(model)
    x = image_batch(2, 12).repeat(1, 6, 1, 1)[:, :16]
    with torch.no_grad(), fastres.use_backend("torch"):
        assert rel_err(fast(x), model(x)) <= TOL
        plan = fast.plan()
        assert [s.kind for s in plan.steps] == ["conv", "conv", "conv", "torch", "conv", "torch", "conv", "torch"]
        conv0, conv1, conv2, act, conv3, add, conv4, block = plan.steps
        assert conv0.attrs["relu"] and conv1.attrs["relu"] and "residual" in conv1.inputs
        assert act.attrs["what"] == "SiLU" and not conv2.attrs["relu"]
        assert conv3.attrs["relu"] and add.attrs["what"] == "add" and block.attrs["what"] == "BatchNormAct2d"
        # the in-place SiLU runs on a copy: the conv's output (plan memory) stays as written
        t = torch.randn(2, 16, 4, 4)
        before = t.clone()
        torch.testing.assert_close(act.attrs["call"]({conv2.output: t}), torch.nn.functional.silu(before))
        assert torch.equal(t, before)
        # an edit of the act after the capture is seen (the guard), and computed as the module does
        model.norms[0].act = torch.nn.GELU()
        assert rel_err(fast(x), model(x)) <= TOL and fast._fastres.builds == 2
        assert fast.plan().steps[1].attrs["what"] == "GELU"
