"""Fused residual blocks through the plan: projection shortcuts as concatenated K and back-to-back
3x3->1x1 kernels, block by block against torchvision's unfused modules, and the pinned totals.

The Triton path runs under the interpreter on CPU (conftest); fp16 uses fp32-accumulating kernels
and is bounded against torchvision fp32 with a documented tolerance (FP16_BLOCK_RTOL).
"""
import os

import pytest
import torch
import torchvision

import fastres
from fastres.backend import get_backend
from fastres.plan_report import inspect_arch, launch_rows
from fastres.verify import image_batch, randomize_norm_stats_

requires_kernels = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="needs a GPU or TRITON_INTERPRET=1 (set by tests/conftest.py on CPU machines)")

# fp16 activations between blocks are rounded to 11 bits; after a few stacked blocks of random
# weights the relative error vs fp32 stays well below this.
FP16_BLOCK_RTOL = 2e-2

CASES = [
    ("resnet18", {}),
    ("resnet50", {}),
    ("resnet50", {"replace_stride_with_dilation": [False, True, True]}),
    ("resnext50_32x4d", {}),
    ("wide_resnet50_2", {}),
]


def torchvision_block_outputs(model, x):
    """Every residual block's output from torchvision's own (unfused) eval forward."""
    outputs = {}
    with torch.no_grad():
        y = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        for li in range(1, 5):
            for bi, block in enumerate(getattr(model, f"layer{li}")):
                y = block(y)
                outputs[f"layer{li}.{bi}"] = y
    return outputs


# fp32 on every case; fp16 on the bottleneck kinds (fused pair dense, dilated and grouped)
BLOCK_CASES = [(arch, kwargs, torch.float32) for arch, kwargs in CASES] + [
    (arch, kwargs, torch.float16) for arch, kwargs in CASES[1:4]]


@requires_kernels
@pytest.mark.parametrize("arch, kwargs, dtype", BLOCK_CASES)
def test_every_block_matches_torchvision(arch, kwargs, dtype, device):
    torch.manual_seed(0)
    reference = randomize_norm_stats_(getattr(torchvision.models, arch)(**kwargs)).eval()
    model = fastres.from_torchvision(reference).to(device=device, dtype=dtype)
    x = image_batch(2, 32)
    expected = torchvision_block_outputs(reference, x)
    plan = model.plan()
    buffers = plan.allocate(tuple(x.shape), share_memory=False)   # every step's output kept
    with torch.no_grad():
        plan.run(x.to(device, dtype), get_backend("triton"), buffers=buffers)
    kinds = set()
    for name, want in expected.items():
        step = [s for s in plan.steps if s.name.startswith(name + ".")][-1]   # the block's last
        got = buffers[step.output].float().cpu()
        err = float((got - want).abs().max() / want.abs().max())
        assert err <= (1e-4 if dtype == torch.float32 else FP16_BLOCK_RTOL), (name, err)
        kinds.add((step.kind, "projection" if "shortcut" in step.inputs else "identity"))
    # every block kind this architecture has was exercised
    if arch == "resnet18":
        assert kinds == {("conv", "projection"), ("conv", "identity")}
    else:
        assert {("conv_pair", "projection"), ("conv_pair", "identity")} <= kinds


def test_fusion_rule_in_the_plan():
    """Which blocks fuse (kernels/conv3x3_conv1x1_nhwc.py: fuses_conv3x3_conv1x1)."""
    def fused_layers(arch, **kwargs):
        with torch.device("meta"):
            model = getattr(fastres, arch)(**kwargs)
        plan = model.half().eval().plan()
        return sorted({s.name.split(".")[0] for s in plan.steps if s.kind == "conv_pair"})

    assert fused_layers("resnet50") == ["layer1", "layer2"]
    assert fused_layers("resnet101") == ["layer1", "layer2"]
    assert fused_layers("wide_resnet50_2") == ["layer1"]
    assert fused_layers("resnext50_32x4d") == ["layer1"]
    assert fused_layers("resnet50", replace_stride_with_dilation=[True, True, True]) == ["layer1", "layer2"]
    assert fused_layers("resnet18") == []
    # no downsample step anywhere: every projection is a concatenated-K operand
    with torch.device("meta"):
        plan = fastres.resnet50().half().eval().plan()
    assert not any("downsample" in s.name for s in plan.steps)
    assert sum(1 for s in plan.steps if "shortcut" in s.inputs) == 4


def test_resnet50_launches_and_traffic_are_pinned():
    """The fused resnet50 plan (fp16, 224x224, batch 256): at most 44 launches and 47.5 MB of
    modelled activation+weight traffic per image (torchvision's unfused eval: 174 and ~162 MB)."""
    report = inspect_arch("resnet50", batch=256, size=224, dtype="fp16")
    totals = report["totals"]
    assert totals["launches"] == 44
    assert totals["bytes_per_image"] <= 47.5e6
    assert totals["bytes_per_image"] == pytest.approx(44.86e6, rel=0.005)
    assert report["reference"]["launches"] == 174
    pairs = [row for row in report["kernels"] if row["name"].endswith("conv2+conv3")]
    assert len(pairs) == 7
    first = pairs[0]["shape"]   # layer1.0: 3x3 64->64 on chip, then 1x1 64->256 + projection 64
    assert first == {"M": 256 * 56 * 56, "N": 256, "K": 64 + 64, "N_mid": 64, "K_mid": 9 * 64}


@requires_kernels
def test_inspect_launch_count_is_what_a_forward_launches(device):
    from test_triton_models import count_launches
    torch.manual_seed(0)
    model = fastres.resnet50().eval().to(device)
    x = image_batch(1, 32).to(device).contiguous(memory_format=torch.channels_last)
    plan = model.plan().prepare(get_backend("triton"))
    with torch.no_grad(), fastres.use_backend("triton"), count_launches() as (launches, recorder):
        model(x)
    assert len(launches) == len(launch_rows(plan, tuple(x.shape))) == 44
    assert launches.count("_conv3x3_conv1x1_nhwc_kernel") == 7
