"""The new kernel variants compile for sm_80 and sm_90 with zero spills (fastres.aot): the conv
epilogue reading the CIFAR option-A shortcut (strided, channel offset), the dual-output affine
epilogue of pre-activation blocks, the channel-mean epilogue of SE producers (the squeeze) and the
SE scale kernel, recorded from the plans of a CIFAR ResNet-56, a pre-activation ResNet-18 and an
SE-ResNet at batch 1 and 128 (fp16, bf16, fp32), and (with timm installed) the squeezing 1x1
producers of timm's seresnet50 at 224x224 (256/512/1024/2048 channels at 56/28/14/7; fp16, fp32),
with the tiles each architecture's rule picks."""
import io

import pytest

import residual_zoo as zoo
from fastres import aot
from fastres.plan_report import record_model_launches

SMS = (80, 90)
VARIANT_TAGS = ("+res", "+affine2", "+mean", "se_scale")


def _variant_calls():
    calls = {}
    for name, make, size in (("cifar56", zoo.cifar_resnet56, 32), ("preact18", zoo.preact_resnet18, 32),
                             ("seresnet", lambda: zoo.SEResNet(layers=(1, 1, 1), width=64), 32)):
        for dtype in ("fp16", "bf16", "fp32"):
            for batch in (1, 128):
                recorded = record_model_launches(make, (batch, 3, size, size), dtype)
                calls[f"{name} b{batch} {dtype}"] = [c for c in recorded if any(t in c.name for t in VARIANT_TAGS)]
    try:
        import timm
    except ImportError:
        return calls
    for sm in SMS:
        for dtype in ("fp16", "fp32"):      # (bf16's +mean tiles: the SE-ResNet's above)
            for batch in (1, 128):
                recorded = record_model_launches(lambda: timm.create_model("seresnet50", pretrained=False),
                                                 (batch, 3, 224, 224), dtype, sm=sm)
                calls[f"seresnet50 b{batch} {dtype} sm{sm}"] = [c for c in recorded if "+mean" in c.name]
    return calls


@pytest.fixture(scope="module")
def rows():
    return aot.aot_report(_variant_calls(), SMS, workers=2)


def test_variants_fit_sm80_and_sm90(rows):
    out = io.StringIO()
    assert aot.print_report(rows, SMS, file=out) == 0, out.getvalue()
    names = {row.kernel for row in rows}
    assert {"conv2d_nhwc[3x3/s1+res16@8/s2]", "conv2d_nhwc[3x3/s1+res32@16/s2]"} <= names
    assert any("+affine2" in n for n in names) and any(n.startswith("se_scale_nhwc") for n in names)
    assert any(n.endswith("+mean]") for n in names)
    assert {row.dtypes.split(",")[0] for row in rows} == {"fp16", "bf16", "fp32"}
    for row in rows:
        for sm in SMS:
            r = row.resources[sm]
            assert not r.error and r.spill_bytes == 0 and r.local_bytes == 0, (row.kernel, row.config, sm)
            assert r.shared_bytes <= aot.SHARED_MEMORY_LIMIT[sm]


def test_tensor_core_variants_use_wgmma_on_sm90(rows):
    for row in rows:
        if row.kernel.startswith("conv2d_nhwc") and not row.dtypes.startswith("fp32"):
            assert row.resources[90].uses_wgmma, (row.kernel, row.config)
