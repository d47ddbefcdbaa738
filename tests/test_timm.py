"""timm's ResNet family (pretrained=False) through fastres.optimize, each against its own eval
output: fp32 within 1e-5 on CPU (torch backend), with what fuses pinned for resnet50d (ResNet-D:
deep stem, avg_down), seresnet50 (SE) and resnet26t; a sample of timm.list_models("*resnet*")
must at least compute what the model computes (fusing what it can, the rest as PyTorch steps).
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
    # SE in every bottleneck: 16 se_scale steps; the squeeze (x.mean((2, 3))) is a PyTorch step
    ("seresnet50", {"conv": 85, "head": 1, "max_pool": 1, "se_scale": 16, "torch": 16}),
    ("resnet26t", {"conv": 21, "conv_pair": 3, "head": 1, "max_pool": 1, "torch": 3}),
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
          "nf_resnet26"]


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
def test_timm_resnet10t_under_triton(device):
    from fastres.backend import get_backend
    from test_triton_models import count_launches

    model = timm_model("resnet10t").to(device)
    x = image_batch(2, 32).to(device)
    with torch.no_grad():
        expected = model(x)
        fast = fastres.optimize(model)
        plan = fast.plan().prepare(get_backend("triton"))
        with fastres.use_backend("triton"), count_launches() as (launches, recorder):
            got = fast(x)
    assert rel_err(got.cpu(), expected.cpu()) <= 1e-3
    # 3-conv stem, max pool, 4 blocks x 2 convs (3 avg_down projections as concat-K), head
    assert len(launches) == 13 and len(plan.steps) == 16
    assert recorder.ops.count("avg_pool2d.default") == 3
