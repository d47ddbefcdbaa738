"""The fused bottleneck 3x3 -> 1x1 kernel against torch.nn.functional, and its AOT compile check.

Runs the real Triton kernel: on CUDA tensors when a GPU is present, otherwise under the Triton
interpreter (CPU tensors), which must be switched on before Python starts:

    TRITON_INTERPRET=1 pytest tests/test_conv3x3_conv1x1_nhwc.py

Two references: ``conv3x3_conv1x1_nhwc_ref`` (the kernel module's own, two conv2d_nhwc_ref calls)
and an independent torch.nn.functional composition in fp64 from the same rounded inputs, the mid
rounded to the compute dtype in between (as the unfused pair stores it).

How bf16 is covered: the triton 3.8 interpreter's bf16 ``tl.dot`` returns garbage and its fp32 ->
bf16 cast truncates, so under the interpreter the wrapper sets INTERPRETER_BF16: both GEMMs'
tiles are upcast to fp32 and both roundings (mid tile, output) are done to nearest-even by hand.
bf16 loads, the fp32 epilogues and the bf16 store still run and are checked here, the two
roundings sharply (test_mid_is_rounded_once / test_output_is_rounded_once). The bf16
tensor-core dots are checked by compiling the real kernel for sm_80/sm_90 (the AOT test) and by
these same tests on a GPU, where INTERPRETER_BF16 is off.
"""
import dataclasses
import io
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
import triton
from kernel_testing import (CL, DEVICE, ON_CUDA, ONE_ROUNDING_FP32_NOISE, assert_fp32_close, assert_rounded_once,
                            assert_within_twice_torch, channels_last, skip_if_compiled_without_gpu,
                            skip_without_gpu_or_interpreter, ulp)

skip_without_gpu_or_interpreter("the Triton kernel")

from fastres import aot  # noqa: E402
from fastres.kernels import conv3x3_conv1x1_nhwc as fused_module  # noqa: E402
from fastres.kernels._launch import KernelCall, record_launches  # noqa: E402
from fastres.kernels._target import TARGETS, use_target  # noqa: E402
from fastres.kernels.conv3x3_conv1x1_nhwc import (  # noqa: E402
    FUSED_CONFIGS, PackedConv3x3Conv1x1, conv3x3_conv1x1_nhwc_packed, conv3x3_conv1x1_nhwc_ref, fit_config,
    fused_config, fuses_conv3x3_conv1x1, pack_conv3x3_conv1x1)

skip_if_compiled_without_gpu(fused_module._conv3x3_conv1x1_nhwc_kernel)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Tolerances are kernel_testing's, K = 9*C_mid_in/groups + C_mid + C_sc; the 16-bit reference is
# the fp64 composition of the same rounded inputs. Against the module's own reference (upcast: the
# kernel's numerics, other summation order): one ulp of the output, plus this (relative to the
# output scale) for mid elements rounded apart.
OWN_REF_SLACK = 1e-3


# ------------------------------------------------------------------------------------------------
# The fused blocks of the torchvision ResNets, read off the models themselves

_MODELS = {
    "resnet50": dict(),
    "wide_resnet50_2": dict(),
    "resnet50_dilated": dict(replace_stride_with_dilation=[True, True, True]),
    "resnext50_32x4d": dict(),
    "resnext101_64x4d": dict(),
    "resnext101_32x8d": dict(),
}


def _model(name):
    builder = getattr(torchvision.models, name.removesuffix("_dilated"))
    with torch.device("meta"):
        return builder(**_MODELS[name])


def _block_kind(block):
    """(C_in, C_mid_in, C_mid, C_out, stride, dilation, groups, shortcut_stride or None) of a Bottleneck."""
    conv2, conv3, down = block.conv2, block.conv3, block.downsample
    return (block.conv1.in_channels, conv2.in_channels, conv2.out_channels, conv3.out_channels, conv2.stride[0],
            conv2.dilation[0], conv2.groups, down[0].stride[0] if down is not None else None)


def _fused_blocks():
    """{kind: "model.layerL.B"} of every bottleneck fuses_conv3x3_conv1x1 admits, first name per kind."""
    kinds = {}
    for name in _MODELS:
        model = _model(name)
        for li in range(1, 5):
            for bi, block in enumerate(getattr(model, f"layer{li}")):
                kind = _block_kind(block)
                _, c_mid_in, c_mid, c_out, _, _, groups, _ = kind
                if fuses_conv3x3_conv1x1(c_mid, c_mid_in, c_out, groups, torch.float16):
                    kinds.setdefault(kind, f"{name}.layer{li}.{bi}")
    return kinds


FUSED_BLOCKS = _fused_blocks()
# The brief's dilation-2 stride-1 block with a projection (no torchvision block has both).
_DILATED_PROJECTION = (256, 128, 128, 512, 1, 2, 1, 1)
BLOCK_CASES = sorted(FUSED_BLOCKS.items(), key=lambda item: item[1]) + [(_DILATED_PROJECTION, "dilated_projection")]


def test_fused_block_table_comes_from_torchvision():
    names = set(FUSED_BLOCKS.values())
    assert {"resnet50.layer1.0", "resnet50.layer1.1", "resnet50.layer2.0", "resnet50.layer2.1",
            "wide_resnet50_2.layer1.0", "wide_resnet50_2.layer1.1", "resnet50_dilated.layer2.0",
            "resnet50_dilated.layer2.1", "resnext50_32x4d.layer1.0", "resnext50_32x4d.layer1.1",
            "resnext101_64x4d.layer1.0", "resnext101_64x4d.layer1.1"} <= names, names
    kinds = set(FUSED_BLOCKS)
    assert (64, 64, 64, 256, 1, 1, 1, 1) in kinds             # resnet50 layer1.0: projection, stride 1
    assert (256, 128, 128, 512, 2, 1, 1, 2) in kinds          # resnet50 layer2.0: stride 2 both ways
    assert (512, 128, 128, 512, 1, 2, 1, None) in kinds       # dilated resnet50 layer2.1
    assert (256, 128, 128, 256, 1, 1, 32, None) in kinds      # resnext50 layer1: 4 channels per group
    assert not any(kind[2] > 128 and kind[6] == 1 for kind in kinds)   # no layer3: mid 256 stays unfused
    assert len(kinds) == 14, sorted(kinds)


# ------------------------------------------------------------------------------------------------
# Problems and references


def _make_block(kind, batch, h, w, dtype, *, seed=0):
    """Activations and folded-like weights of one bottleneck: dict of tensors and conv arguments."""
    c_in, c_mid_in, c_mid, c_out, stride, dilation, groups, sc_stride = kind
    gen = torch.Generator().manual_seed(seed)

    def act(*shape, relu=False):
        t = torch.randn(*shape, generator=gen)
        return channels_last((t.relu() if relu else t).to(dtype)).to(DEVICE)

    def weight(*shape, fan_in):
        return (torch.randn(*shape, generator=gen) * math.sqrt(2.0 / fan_in)).to(dtype).to(DEVICE)

    x = act(batch, c_in, h, w)
    p = dict(
        y1=act(batch, c_mid_in, h, w, relu=True),    # conv1's output: after a ReLU
        w_mid=weight(c_mid, c_mid_in // groups, 3, 3, fan_in=9 * c_mid_in // groups),
        b_mid=(0.5 * torch.randn(c_mid, generator=gen)).to(DEVICE),
        w_out=weight(c_out, c_mid, 1, 1, fan_in=c_mid),
        b_out=(0.5 * torch.randn(c_out, generator=gen)).to(DEVICE),
        stride=stride, padding=dilation, dilation=dilation, groups=groups,
        residual=None, shortcut=None, shortcut_weight=None, shortcut_stride=1,
    )
    if sc_stride is None:
        p["residual"] = x
    else:
        p.update(shortcut=x, shortcut_weight=weight(c_out, c_in, 1, 1, fan_in=c_in), shortcut_stride=sc_stride)
    return p


def _k_len(p):
    c_sc = p["shortcut_weight"].shape[1] if p["shortcut_weight"] is not None else 0
    return p["w_mid"][0].numel() + p["w_out"].shape[1] + c_sc


def _run_kernel(p, **kwargs):
    packed = pack_conv3x3_conv1x1(p["w_mid"], p["w_out"], groups=p["groups"], shortcut_weight=p["shortcut_weight"])
    return conv3x3_conv1x1_nhwc_packed(p["y1"], packed, p["b_mid"], p["b_out"], stride=p["stride"],
                                       padding=p["padding"], dilation=p["dilation"], residual=p["residual"],
                                       shortcut=p["shortcut"], shortcut_stride=p["shortcut_stride"], **kwargs)


def _functional(p, compute_dtype, mid_dtype):
    """The pair as torch.nn.functional ops in ``compute_dtype``, the mid rounded to ``mid_dtype``."""
    def c(t):
        return t.to(compute_dtype) if t is not None else None

    mid = F.conv2d(c(p["y1"]), c(p["w_mid"]), c(p["b_mid"]), stride=p["stride"], padding=p["padding"],
                   dilation=p["dilation"], groups=p["groups"]).relu()
    mid = mid.to(mid_dtype).to(compute_dtype)
    out = F.conv2d(mid, c(p["w_out"]), c(p["b_out"]))
    if p["shortcut"] is not None:
        out = out + F.conv2d(c(p["shortcut"]), c(p["shortcut_weight"]), stride=p["shortcut_stride"])
    if p["residual"] is not None:
        out = out + c(p["residual"])
    return out.relu()


def _own_reference(p, **kwargs):
    return conv3x3_conv1x1_nhwc_ref(p["y1"], p["w_mid"], p["b_mid"], p["w_out"], p["b_out"], stride=p["stride"],
                                    padding=p["padding"], dilation=p["dilation"], groups=p["groups"],
                                    residual=p["residual"], shortcut=p["shortcut"],
                                    shortcut_weight=p["shortcut_weight"], shortcut_stride=p["shortcut_stride"],
                                    **kwargs)


def _check_block(p, dtype, *, what):
    out = _run_kernel(p)
    ref64 = _functional(p, torch.float64, dtype)
    assert out.dtype == dtype and out.shape == ref64.shape, (out.dtype, out.shape, ref64.shape)
    assert out.is_contiguous(memory_format=CL), "output must be channels_last"
    assert torch.isfinite(ref64).all() and torch.isfinite(out).all(), what
    out64, k_len = out.double(), _k_len(p)
    scale = ref64.abs().max().item()
    if dtype == torch.float32:
        assert_fp32_close(out64, ref64, k_len, what=what)
    else:
        assert_within_twice_torch(out64, _functional(p, dtype, dtype).double(), ref64, dtype, k_len, what=what)
    own = _own_reference(p, upcast=True)
    assert own.dtype == dtype and own.is_contiguous(memory_format=CL)
    own64 = own.double()
    own_err = ((out64 - own64).abs() - ulp(own64, dtype) - OWN_REF_SLACK * scale).max().item()
    assert own_err <= 0, f"{what}: more than one ulp from conv3x3_conv1x1_nhwc_ref(upcast=True) (by {own_err:.3g})"
    return out


# ------------------------------------------------------------------------------------------------
# Every fused block of the torchvision ResNets

_SIZES = [(1, 7, 7), (3, 13, 7), (1, 13, 13), (3, 7, 9)]     # (batch, H, W): odd, H != W, batch 1 and 3
_BF16_BLOCKS = {"resnet50.layer1.0", "resnet50.layer2.0", "resnet50.layer2.1", "resnet50_dilated.layer2.1",
                "resnext50_32x4d.layer1.1", "dilated_projection"}


def _dtypes_of(name):
    if name.startswith("resnext101"):     # resnext50's code path with 16 packed groups: slow in the interpreter
        return (torch.float16,)
    return (torch.float32, torch.float16) + ((torch.bfloat16,) if name in _BF16_BLOCKS else ())


_CASES = [(kind, name, dtype, (1, 7, 7) if name.startswith("resnext101") else _SIZES[i % len(_SIZES)], i)
          for i, (kind, name) in enumerate(BLOCK_CASES) for dtype in _dtypes_of(name)]


@pytest.mark.parametrize("kind,name,dtype,size,seed", _CASES,
                         ids=[f"{name}-{str(dtype)[6:]}-{b}x{h}x{w}" for _, name, dtype, (b, h, w), _ in _CASES])
def test_fused_blocks(kind, name, dtype, size, seed):
    batch, h, w = size
    p = _make_block(kind, batch, h, w, dtype, seed=seed)
    _check_block(p, dtype, what=name)


_MASKED_CHUNKS = (80, 64, 64, 80, 1, 1, 1, 1)       # C_out 80: a masked chunk; C_sc 80: a masked shortcut K tail
_STRIDED_CHUNKS = (128, 64, 64, 320, 2, 1, 1, 2)    # C_out 320: several chunks, the last one masked
_GROUPED = (256, 128, 128, 256, 1, 1, 32, None)
_DENSE_MID_BLOCKS = (96, 64, 64, 96, 1, 2, 1, None)  # a grouped tile on groups=1: 4 mid blocks x 2 chunks
_GPU_TILE_CASES = [("tc", _MASKED_CHUNKS), ("tc", _STRIDED_CHUNKS), ("tc_small_m", _STRIDED_CHUNKS),
                   ("tc_grouped", _GROUPED), ("fp32", _MASKED_CHUNKS), ("fp32", _STRIDED_CHUNKS),
                   ("fp32_grouped", _GROUPED), ("fp32_grouped", _DENSE_MID_BLOCKS)]


@pytest.mark.parametrize("config_name,kind", _GPU_TILE_CASES,
                         ids=[f"{name}-{kind[3]}" for name, kind in _GPU_TILE_CASES])
def test_gpu_tiles_under_the_interpreter(config_name, kind, monkeypatch):
    """The GPU tiles (several M tiles with a masked tail, several output chunks with a masked last
    one, a masked shortcut K tail, mid blocks narrower than C_mid and so recomputed per chunk) run
    here too, not only the one big interpreter tile."""
    config = FUSED_CONFIGS[config_name]
    if kind is _DENSE_MID_BLOCKS:
        config = dataclasses.replace(config, BLOCK_N=64)
    monkeypatch.setattr(fused_module, "fused_config",
                        lambda m, group_in, group_mid, c_mid, c_out, c_sc, dtype, device_type, target=None:
                        fit_config(config, group_in, group_mid, c_out, c_sc))
    dtype = torch.float32 if config_name.startswith("fp32") else torch.float16
    p = _make_block(kind, 1, 7, 9, dtype, seed=3)        # 63 or 20 output pixels: a masked M tail
    _check_block(p, dtype, what=f"{config_name} {kind}")


# ------------------------------------------------------------------------------------------------
# Roundings, NaN


@pytest.mark.parametrize("dtype", DTYPES)
def test_mid_is_rounded_once(dtype):
    """With W_out = I and no bias the output is the rounded mid itself: it must be the exact mid
    rounded once to nearest (a truncating cast is off by up to a whole ulp). Then with the
    residual -round(exact mid) the output is what the rounding removed: zero when the kernel rounds
    the mid before the 1x1, up to half an ulp of the mid in half the elements when it does not."""
    kind = (64, 64, 64, 64, 1, 1, 1, None)
    p = _make_block(kind, 2, 7, 6, dtype, seed=5)
    p["w_out"] = torch.eye(64, dtype=dtype, device=DEVICE)[:, :, None, None]
    p["b_out"] = torch.zeros(64, device=DEVICE)
    p["residual"] = None
    out = _run_kernel(p).double()
    mid64 = F.conv2d(p["y1"].double(), p["w_mid"].double(), p["b_mid"].double(), padding=1).relu()
    assert_rounded_once(out, mid64, dtype, 9 * 64, what="mid")

    p["residual"] = channels_last(-mid64.to(dtype))
    left = _run_kernel(p).double()
    # at most a mid rounded the other way (fp32: summation order)
    assert (left <= ulp(mid64, dtype) + ONE_ROUNDING_FP32_NOISE * math.sqrt(9 * 64)).all()
    if dtype != torch.float32:
        assert left.count_nonzero() <= 0.01 * left.numel(), f"{left.count_nonzero()} of {left.numel()} nonzero"


@pytest.mark.parametrize("dtype", DTYPES)
def test_output_is_rounded_once(dtype):
    """With a 3x3 that copies its centre pixel and no mid bias the mid is exact (relu of y1); the
    output must then be the exact fp64 result rounded once to nearest."""
    kind = (64, 64, 64, 256, 1, 1, 1, 1)
    p = _make_block(kind, 2, 7, 6, dtype, seed=6)
    centre_tap = torch.zeros(64, 64, 3, 3)
    centre_tap[:, :, 1, 1] = torch.eye(64)
    p["w_mid"] = centre_tap.to(dtype).to(DEVICE)
    p["b_mid"] = torch.zeros(64, device=DEVICE)
    out = _run_kernel(p).double()
    exact = _functional(p, torch.float64, torch.float64)
    assert_rounded_once(out, exact, dtype, _k_len(p), what="output")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")   # numpy's matmul meeting NaN
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf_propagate(dtype):
    kind = (64, 64, 64, 256, 2, 1, 1, 2)
    p = _make_block(kind, 1, 9, 9, dtype, seed=7)
    p["y1"][0, :, 4, 4] = float("nan")        # 3x3/s2/p1: only output (2, 2) reads (4, 4); all its channels
    p["y1"][0, 3, 0, 8] = float("inf")        # +/-inf in the mid column of output (0, 4), then NaN or inf
    p["shortcut"][0, 7, 8, 0] = float("nan")  # the projection reads (8, 0) for output (4, 0)
    out = _run_kernel(p)
    ref = _functional(p, torch.float64, dtype)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    assert out[0, :, 2, 2].isnan().all() and out[0, :, 4, 0].isnan().all()
    assert not out[0, :, 1:4, 1].isnan().any() and not out[0, :, 3, 3].isnan().any()
    p = _make_block((256, 64, 64, 256, 1, 1, 1, None), 1, 5, 5, dtype, seed=8)
    p["residual"][0, 9, 2, 3] = float("nan")
    out = _run_kernel(p)
    assert out.isnan().sum() == 1 and out[0, 9, 2, 3].isnan()


# ------------------------------------------------------------------------------------------------
# out=, empty batch, recording on meta tensors


def test_out_is_written_and_returned():
    p = _make_block((256, 128, 128, 512, 2, 1, 1, 2), 2, 7, 6, torch.float32, seed=9)
    out = channels_last(torch.full((2, 512, 4, 3), float("nan"), device=DEVICE))
    assert _run_kernel(p, out=out) is out
    ref64 = _functional(p, torch.float64, torch.float32)
    assert torch.allclose(out.double(), ref64, rtol=1e-4, atol=1e-4)


def test_out_may_be_the_residual_buffer():
    p = _make_block((256, 64, 64, 256, 1, 1, 1, None), 1, 6, 7, torch.float32, seed=10)
    ref64 = _functional(p, torch.float64, torch.float32)
    residual = p["residual"]
    assert _run_kernel(p, out=residual) is residual
    assert torch.allclose(residual.double(), ref64, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("with_out", [False, True])
def test_empty_batch(with_out):
    p = _make_block((64, 64, 64, 256, 2, 1, 1, 2), 0, 7, 5, torch.float32)
    out = channels_last(torch.empty(0, 256, 4, 3, device=DEVICE)) if with_out else None
    result = _run_kernel(p, out=out)
    assert result.shape == (0, 256, 4, 3) and result.is_contiguous(memory_format=CL)
    assert result is out or not with_out


def _meta(*shape, dtype=torch.float32, channels_last=False):
    t = torch.empty(*shape, device="meta", dtype=dtype)
    return t.contiguous(memory_format=CL) if channels_last else t


def test_launch_is_recorded_on_meta_tensors():
    dt = torch.float16
    packed = pack_conv3x3_conv1x1(_meta(128, 128, 3, 3, dtype=dt), _meta(512, 128, 1, 1, dtype=dt),
                                  shortcut_weight=_meta(512, 256, 1, 1, dtype=dt))
    y1 = _meta(32, 128, 56, 56, dtype=dt, channels_last=True)
    x = _meta(32, 256, 56, 56, dtype=dt, channels_last=True)
    with record_launches() as calls:
        out = conv3x3_conv1x1_nhwc_packed(y1, packed, _meta(128), _meta(512), stride=2, padding=1, dilation=1,
                                          shortcut=x, shortcut_stride=2)
    assert out.device.type == "meta" and out.shape == (32, 512, 28, 28) and out.is_contiguous(memory_format=CL)
    (call,) = calls
    assert isinstance(call, KernelCall) and call.name == "conv3x3_conv1x1_nhwc[s2+sc256/s2]"
    params = list(fused_module._conv3x3_conv1x1_nhwc_kernel.arg_names)
    assert set(call.args) | set(call.constexprs) == set(params) and not set(call.args) & set(call.constexprs)
    assert call.args["y_ptr"] is y1 and call.args["shortcut_ptr"] is x and call.args["out_ptr"] is out
    assert call.constexprs["residual_ptr"] is None and call.constexprs["HAS_SHORTCUT_GEMM"]
    assert not call.constexprs["INTERPRETER_BF16"]           # meta records the GPU kernel
    m = 32 * 28 * 28
    cfg = fused_config(m, 128, 128, 128, 512, 256, dt, "meta")
    assert cfg == fit_config(FUSED_CONFIGS["tc"], 128, 128, 512, 256)
    assert call.constexprs["BLOCK_M"] == cfg.BLOCK_M and call.constexprs["MID_BLOCK"] == 128
    assert call.num_warps == cfg.num_warps and call.grid == (triton.cdiv(m, cfg.BLOCK_M),)
    assert call.info["K_mid"] == 9 * 128 and call.info["K"] == 128 + 256 and call.info["N"] == 512
    assert call.info["flops"] == 2 * m * (128 * 9 * 128 + 512 * (128 + 256))


def test_meta_tensors_outside_recording_are_refused():
    packed = pack_conv3x3_conv1x1(_meta(64, 64, 3, 3), _meta(256, 64, 1, 1))
    y1, residual = _meta(1, 64, 5, 5, channels_last=True), _meta(1, 256, 5, 5, channels_last=True)
    with pytest.raises(RuntimeError, match="record_launches"):
        conv3x3_conv1x1_nhwc_packed(y1, packed, _meta(64), _meta(256), stride=1, padding=1, dilation=1,
                                    residual=residual)


@pytest.mark.skipif(ON_CUDA, reason="checks the CPU-without-interpreter message")
def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch):
    compiled_kernel = triton.runtime.JITFunction(fused_module._conv3x3_conv1x1_nhwc_kernel.fn)
    monkeypatch.setattr(fused_module, "_conv3x3_conv1x1_nhwc_kernel", compiled_kernel)
    p = _make_block((256, 64, 64, 256, 1, 1, 1, None), 1, 5, 5, torch.float32)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _run_kernel(p)


# ------------------------------------------------------------------------------------------------
# The rule, the configurations, packing, the reference


@pytest.mark.parametrize("dtype", DTYPES)
def test_rule(dtype):
    fuses = fuses_conv3x3_conv1x1
    for c_mid, c_out in ((64, 256), (128, 512), (128, 256)):        # resnet50 layer1-2, wide layer1
        assert fuses(c_mid, c_mid, c_out, 1, dtype)
    assert fuses(128, 128, 256, 32, dtype) and fuses(256, 256, 256, 64, dtype) and fuses(256, 256, 256, 32, dtype)
    assert not fuses(256, 256, 1024, 1, dtype)          # resnet50 layer3: mid 256 does not fit (docstring)
    assert not fuses(256, 256, 512, 32, dtype)          # resnext50 layer2: C_out 512 spills
    assert not fuses(96, 96, 256, 1, dtype)             # mid not a power of two
    assert not fuses(64, 40, 256, 1, dtype)             # 3x3 input not a multiple of 16
    assert not fuses(64, 64, 256, 3, dtype)             # groups do not divide
    assert not fuses(64, 64, 256, 1, torch.float64)


def test_config_rule_keeps_gpu_tiles_sane():
    """For every fused block and batch: tensor-core-sized dots, the mid tile computed once (dense:
    MID_BLOCK = C_mid; grouped: one output chunk), K steps inside one tap."""
    for kind in FUSED_BLOCKS:
        _, c_mid_in, c_mid, c_out, _, _, groups, sc_stride = kind
        packed = pack_conv3x3_conv1x1(_meta(c_mid, c_mid_in // groups, 3, 3), _meta(c_out, c_mid, 1, 1),
                                      groups=groups)
        group_in, group_mid = packed.mid.group_in_channels, packed.mid.group_out_channels
        c_sc = kind[0] if sc_stride else 0
        for m in (28 * 28, 56 * 56, 32 * 56 * 56, 256 * 56 * 56):
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                cfg = fused_config(m, group_in, group_mid, c_mid, c_out, c_sc, dtype, "cuda")
                assert min(cfg.BLOCK_N, cfg.BLOCK_K, cfg.BLOCK_K_SC, cfg.MID_BLOCK, cfg.BLOCK_M) >= 16
                assert group_in % cfg.BLOCK_K == 0 and group_mid % cfg.MID_BLOCK == 0
                if group_mid == c_mid:
                    assert cfg.MID_BLOCK == c_mid
                else:
                    assert cfg.BLOCK_N >= c_out
                if dtype != torch.float32:
                    assert cfg.num_warps % 4 == 0 and cfg.BLOCK_M >= 32       # tensor-core tiles
    # batch 1: small M (fewer tc programs than SMs); sm_90 128 rows (two warpgroups), sm_80 64
    for sm, small, large in ((90, 64, 128), (80, 32, 64)):
        target = TARGETS[sm]
        assert fused_config(56 * 56, 64, 64, 64, 256, 64, torch.float16, "cuda", target).BLOCK_M == small
        assert fused_config(32 * 56 * 56, 64, 64, 64, 256, 64, torch.float16, "cuda", target).BLOCK_M == large


def test_pack_layouts():
    w_mid, w_out, w_sc = torch.randn(128, 4, 3, 3), torch.randn(256, 128, 1, 1), torch.randn(256, 64, 1, 1)
    packed = pack_conv3x3_conv1x1(w_mid, w_out, groups=32, shortcut_weight=w_sc)
    assert isinstance(packed, PackedConv3x3Conv1x1)
    assert packed.mid.weight.shape == (9 * 16, 128) and packed.mid.group_out_channels == 16
    assert packed.out.weight.shape == (128 + 64, 256)
    assert torch.equal(packed.out.weight[:128], w_out[:, :, 0, 0].t())
    assert torch.equal(packed.out.weight[128:], w_sc[:, :, 0, 0].t())
    assert (packed.in_channels, packed.mid_channels, packed.out_channels, packed.groups,
            packed.shortcut_in_channels) == (128, 128, 256, 32, 64)
    meta = pack_conv3x3_conv1x1(_meta(64, 64, 3, 3, dtype=torch.bfloat16), _meta(256, 64, 1, 1, dtype=torch.bfloat16))
    assert meta.device.type == "meta" and meta.dtype == torch.bfloat16 and meta.shortcut_in_channels == 0


def test_reference_rounds_the_mid():
    """The module's reference rounds the mid to the compute dtype: it equals the unfused pair."""
    p = _make_block((256, 64, 64, 256, 1, 1, 1, None), 1, 5, 6, torch.float16)
    p = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in p.items()}
    ref = _own_reference(p, upcast=True)
    mid = F.conv2d(p["y1"].float(), p["w_mid"].float(), p["b_mid"], padding=1).relu().half()
    pair = (F.conv2d(mid.float(), p["w_out"].float(), p["b_out"]) + p["residual"].float()).relu().half()
    assert ref.dtype == torch.float16 and ref.is_contiguous(memory_format=CL)
    assert torch.equal(ref, pair)


# ------------------------------------------------------------------------------------------------
# Bad input


def _good():
    p = _make_block((32, 32, 32, 64, 1, 1, 1, 2), 2, 6, 6, torch.float32)
    p["shortcut"] = channels_last(torch.randn(2, 32, 12, 12, device=DEVICE))
    return p


def _packed_call(p, **changes):
    kwargs = dict(stride=p["stride"], padding=p["padding"], dilation=p["dilation"], residual=p["residual"],
                  shortcut=p["shortcut"], shortcut_stride=p["shortcut_stride"])
    args = dict(y1=p["y1"], packed=pack_conv3x3_conv1x1(p["w_mid"], p["w_out"], shortcut_weight=p["shortcut_weight"]),
                bias_mid=p["b_mid"], bias_out=p["b_out"])
    for key, value in changes.items():
        (args if key in args else kwargs)[key] = value(args | kwargs)
    return lambda: conv3x3_conv1x1_nhwc_packed(args.pop("y1"), args.pop("packed"), args.pop("bias_mid"),
                                               args.pop("bias_out"), **kwargs)


_BAD_CALLS = {
    "y1_rank": (dict(y1=lambda a: a["y1"][0]), ValueError, "4-D"),
    "y1_channels": (dict(y1=lambda a: a["y1"][:, :16]), ValueError, "expects 32"),
    "y1_dtype": (dict(y1=lambda a: a["y1"].half()), TypeError, "packed weight dtype"),
    "y1_nchw": (dict(y1=lambda a: a["y1"].contiguous()), ValueError, "y1 must be channels_last"),
    "y1_device": (dict(y1=lambda a: a["y1"].to("meta")), ValueError, "y1 is on meta"),
    "bias_mid_shape": (dict(bias_mid=lambda a: a["bias_mid"][:5]), ValueError, r"bias_mid must be a float \[32\]"),
    "bias_out_dtype": (dict(bias_out=lambda a: a["bias_out"].int()), ValueError, "bias_out must be a float"),
    "bias_missing": (dict(bias_out=lambda a: None), ValueError, "bias_out must be a float"),
    "missing_shortcut": (dict(shortcut=lambda a: None), ValueError, "shortcut must be given exactly when"),
    "shortcut_size": (dict(shortcut_stride=lambda a: 1), ValueError, "with stride 1 gives 12x12"),
    "shortcut_rank": (dict(shortcut=lambda a: a["shortcut"][0]), ValueError, r"shortcut must be \[N=2, C_sc=32"),
    "shortcut_channels": (dict(shortcut=lambda a: channels_last(torch.randn(2, 8, 12, 12, device=DEVICE))),
                          ValueError, "C_sc=32"),
    "shortcut_nchw": (dict(shortcut=lambda a: a["shortcut"].contiguous()), ValueError, "shortcut must be channels"),
    "shortcut_dtype": (dict(shortcut=lambda a: a["shortcut"].half()), TypeError, "shortcut"),
    "residual_shape": (dict(residual=lambda a: channels_last(torch.randn(2, 64, 6, 5, device=DEVICE))),
                       ValueError, r"residual must have shape \(2, 64, 6, 6\)"),
    "out_nchw": (dict(out=lambda a: torch.empty(2, 64, 6, 6, device=DEVICE)), ValueError, "out must be channels"),
    "out_dtype": (dict(out=lambda a: channels_last(torch.empty(2, 64, 6, 6, device=DEVICE).half())),
                  TypeError, "out"),
    "output_size": (dict(padding=lambda a: 0, y1=lambda a: channels_last(torch.randn(2, 32, 2, 6, device=DEVICE))),
                    ValueError, "output size"),
    "stride_zero": (dict(stride=lambda a: 0), ValueError, "stride and dilation must be >= 1"),
    "padding_pair": (dict(padding=lambda a: (1, 2, 3)), ValueError, "padding must be an int or a pair"),
    "packed_type": (dict(packed=lambda a: a["packed"].mid), TypeError, "pack_conv3x3_conv1x1"),
}


@pytest.mark.parametrize("name", list(_BAD_CALLS))
def test_bad_input_raises_clear_error(name):
    changes, error, match = _BAD_CALLS[name]
    call = _packed_call(_good(), **changes)
    with pytest.raises(error, match=match):
        call()


def test_out_must_not_overlap_what_other_programs_read():
    p = _make_block((64, 32, 32, 64, 1, 1, 1, None), 2, 6, 6, torch.float32)
    storage = torch.randn(2 * 64 * 36 + 64, device=DEVICE)
    p["y1"] = torch.as_strided(storage, (2, 32, 6, 6), (32 * 36, 1, 6 * 32, 32))
    out = torch.as_strided(storage, (2, 64, 6, 6), (64 * 36, 1, 6 * 64, 64))
    assert p["y1"].is_contiguous(memory_format=CL) and out.is_contiguous(memory_format=CL)
    with pytest.raises(ValueError, match="out must not overlap y1"):
        _run_kernel(p, out=out)
    p = _make_block((64, 32, 32, 64, 1, 1, 1, None), 2, 6, 6, torch.float32)
    p["residual"] = torch.as_strided(storage, (2, 64, 6, 6), (64 * 36, 1, 6 * 64, 64), 64)   # one pixel on
    with pytest.raises(ValueError, match="out must be the residual buffer itself or not overlap it"):
        _run_kernel(p, out=out)


def test_pack_bad_input_raises_clear_error():
    w_mid, w_out = torch.randn(64, 64, 3, 3), torch.randn(256, 64, 1, 1)
    with pytest.raises(ValueError, match=r"w_mid must be a 3x3 conv weight"):
        pack_conv3x3_conv1x1(torch.randn(64, 64, 1, 1), w_out)
    with pytest.raises(ValueError, match=r"w_out must be a 1x1 conv weight \[C_out, C_mid=64, 1, 1\]"):
        pack_conv3x3_conv1x1(w_mid, torch.randn(256, 32, 1, 1))
    with pytest.raises(ValueError, match="must match w_mid"):
        pack_conv3x3_conv1x1(w_mid, w_out.half())
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        pack_conv3x3_conv1x1(w_mid.double(), w_out.double())
    with pytest.raises(ValueError, match="power of two"):
        pack_conv3x3_conv1x1(torch.randn(96, 96, 3, 3), torch.randn(256, 96, 1, 1))
    with pytest.raises(ValueError, match="multiple of 16"):
        pack_conv3x3_conv1x1(torch.randn(64, 40, 3, 3), w_out)
    with pytest.raises(ValueError, match=r"\[C_out=256, C_sc, 1, 1\]"):
        pack_conv3x3_conv1x1(w_mid, w_out, shortcut_weight=torch.randn(256, 64, 3, 3))
    with pytest.raises(ValueError, match="groups=3 must divide"):
        pack_conv3x3_conv1x1(w_mid, w_out, groups=3)


# ------------------------------------------------------------------------------------------------
# AOT: every configuration the plan can use compiles for sm_80 and sm_90 without spills

SMS = (80, 90)


def _aot_calls():
    """({label: calls}, {label: sm}) at 224x224, each recorded with the tiles its target GPU gets:
    resnet50 and wide_resnet50_2 at batch 1, 32, 256 in every dtype; the dilated resnet50 and the
    grouped blocks at batch 32 (their tiles are those of resnet50's blocks, or do not depend on the
    batch)."""
    by_label, targets = {}, {}
    for name, batches in (("resnet50", (1, 32, 256)), ("wide_resnet50_2", (1, 32, 256)), ("resnet50_dilated", (32,)),
                          ("resnext50_32x4d", (32,)), ("resnext101_64x4d", (32,)), ("resnext101_32x8d", (32,))):
        model = _model(name)
        blocks = {}
        for li in (1, 2):
            for block in getattr(model, f"layer{li}"):
                kind = _block_kind(block)
                if fuses_conv3x3_conv1x1(kind[2], kind[1], kind[3], kind[6], torch.float16):
                    blocks[kind] = 56 if li == 1 or kind[4] == 2 or "dilated" in name else 28    # input H = W
        for batch, dtype, sm in itertools.product(batches, DTYPES, SMS):
            with use_target(sm), record_launches() as calls:
                for kind, hw in blocks.items():
                    c_in, c_mid_in, c_mid, c_out, stride, dilation, groups, sc_stride = kind
                    packed = pack_conv3x3_conv1x1(
                        _meta(c_mid, c_mid_in // groups, 3, 3, dtype=dtype), _meta(c_out, c_mid, 1, 1, dtype=dtype),
                        groups=groups,
                        shortcut_weight=_meta(c_out, c_in, 1, 1, dtype=dtype) if sc_stride else None)
                    x = _meta(batch, c_in, hw, hw, dtype=dtype, channels_last=True)
                    y1 = _meta(batch, c_mid_in, hw, hw, dtype=dtype, channels_last=True)
                    conv3x3_conv1x1_nhwc_packed(y1, packed, _meta(c_mid), _meta(c_out), stride=stride,
                                                padding=dilation, dilation=dilation,
                                                residual=None if sc_stride else x,
                                                shortcut=x if sc_stride else None, shortcut_stride=sc_stride or 1)
            label = f"{name}-b{batch}-{str(dtype)[6:]}-sm{sm}"
            by_label[label], targets[label] = calls, sm
    return by_label, targets


def test_aot_fused_blocks_fit_sm80_and_sm90():
    calls, targets = _aot_calls()
    assert len(calls) == (3 * 3 * 2 + 4 * 3) * len(SMS) and all(calls.values())
    rows = aot.aot_report(calls, SMS, workers=2, targets=targets)
    out = io.StringIO()
    assert aot.print_report(rows, SMS, file=out) == 0, out.getvalue()
    print(out.getvalue())
    assert {row.dtypes.split(",")[0] for row in rows} == {"fp16", "bf16", "fp32"}
    for row in rows:
        assert row.resources
        for sm, resources in row.resources.items():
            assert not resources.error and resources.spill_bytes == 0 and resources.local_bytes == 0, (row.config, sm)
            assert 0 < resources.registers <= aot.MAX_REGISTERS
            assert resources.shared_bytes <= aot.SHARED_MEMORY_LIMIT[sm]
        if "fp32" not in row.dtypes.split(",")[0] and 90 in row.resources:
            assert row.resources[90].uses_wgmma, row.config
