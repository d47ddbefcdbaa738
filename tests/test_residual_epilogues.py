"""The conv kernel's residual-block epilogue variants against torch.nn.functional, in fp64:

* strided residual with a channel offset: the CIFAR "option A" shortcut
  ``F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, p, p))`` read in the epilogue, never materialised;
* a second, per-channel affine output: ``out2 = relu?(y * scale + shift)``, a pre-activation
  block's BatchNorm -> ReLU after its add (the sum y is the first output);
* a per-(image, channel) mean of the stored output, ``y.mean((2, 3), keepdim=True)``: the squeeze
  of a squeeze-and-excitation block, written by the producer's epilogue (tiles spanning images).

Real CIFAR / pre-activation layer shapes plus odd ones (H != W, odd sizes, batch 1 and 3, a
channel count that is not a tile multiple). Tolerances are kernel_testing's.
"""
import math

import pytest
import torch
import torch.nn.functional as F
import triton
from kernel_testing import (CL, DEVICE, assert_fp32_close, assert_rounded_once, assert_within_twice_torch,
                            channels_last, skip_if_compiled_without_gpu, skip_without_gpu_or_interpreter, ulp)

skip_without_gpu_or_interpreter("the Triton conv kernel")

from fastres.kernels import conv2d_nhwc as conv_module  # noqa: E402
from fastres.kernels._launch import record_launches  # noqa: E402
from fastres.kernels.conv2d_nhwc import (  # noqa: E402
    CONV_CONFIGS, conv2d_nhwc_packed, conv2d_nhwc_ref, pack_conv_weight)

skip_if_compiled_without_gpu(conv_module._conv2d_nhwc_kernel)


def _problem(batch, c_in, c_out, h, w, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = channels_last(torch.randn(batch, c_in, h, w, generator=g).to(dtype)).to(DEVICE)
    weight = (torch.randn(c_out, c_in, 3, 3, generator=g) / math.sqrt(9 * c_in)).to(dtype).to(DEVICE)
    bias = (0.5 * torch.randn(c_out, generator=g)).to(DEVICE)
    return x, weight, bias, g


def _check(out, torch_out, ref64, dtype, k_len, what):
    assert out.dtype == dtype and out.shape == ref64.shape and out.is_contiguous(memory_format=CL)
    if dtype == torch.float32:
        assert_fp32_close(out.double(), ref64, k_len, what=what)
    else:
        assert_within_twice_torch(out.double(), torch_out.double(), ref64, dtype, k_len, what=what)
        assert_rounded_once(out.double(), ref64, dtype, k_len, what=what)


# (batch, C_in of the block = residual channels, C_out, residual H, W, conv input H, W, conv stride)
OPTION_A = [
    (2, 16, 32, 32, 32, 16, 16, 1),     # CIFAR stage 2, first block's conv2 (input 16x16 after conv1/s2)
    (2, 32, 64, 16, 16, 8, 8, 1),       # CIFAR stage 3
    (1, 16, 32, 15, 9, 8, 5, 1),        # odd, H != W: ceil(15/2) = 8, ceil(9/2) = 5
    (3, 24, 48, 13, 13, 7, 7, 1),       # channels not a multiple of the tile, 13 -> 7
    (2, 16, 32, 16, 16, 16, 16, 2),     # the residual sampled at the conv's own stride
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", OPTION_A, ids=lambda c: "x".join(map(str, c)))
def test_option_a_residual(case, dtype):
    batch, c_r, c_out, h_r, w_r, h, w, stride = case
    if dtype != torch.float32 and case != OPTION_A[0] and case != OPTION_A[2]:
        pytest.skip("16-bit on two shapes is enough under the interpreter")
    x, weight, bias, g = _problem(batch, c_out, c_out, h, w, dtype)
    residual = channels_last(torch.randn(batch, c_r, h_r, w_r, generator=g).to(dtype)).to(DEVICE)
    pad = (c_out - c_r) // 2
    packed = pack_conv_weight(weight)
    out = conv2d_nhwc_packed(x, packed, bias, stride=stride, padding=1, residual=residual, relu=True,
                             residual_stride=2, residual_channel_offset=pad)
    # independent fp64 reference: the model's own expression
    shortcut = F.pad(residual.double()[:, :, ::2, ::2], (0, 0, 0, 0, pad, c_out - c_r - pad))
    ref64 = F.relu(F.conv2d(x.double(), weight.double(), bias.double(), stride=stride, padding=1) + shortcut)
    torch_out = conv2d_nhwc_ref(x, weight, bias, stride=stride, padding=1, residual=residual, relu=True,
                                residual_stride=2, residual_channel_offset=pad)
    _check(out, torch_out, ref64, dtype, 9 * c_out, f"option A {case}")
    # the padded channels hold exactly relu(conv + bias): nothing leaked into them
    if dtype == torch.float32:
        plain = conv2d_nhwc_packed(x, packed, bias, stride=stride, padding=1, relu=True)
        assert torch.equal(out[:, :pad], plain[:, :pad]) and torch.equal(out[:, pad + c_r:], plain[:, pad + c_r:])


def test_option_a_residual_at_channel_offset_zero_without_relu():
    x, weight, bias, g = _problem(2, 16, 40, 6, 6, torch.float32)
    residual = channels_last(torch.randn(2, 8, 11, 12, generator=g)).to(DEVICE)
    out = conv2d_nhwc_packed(x, pack_conv_weight(weight), bias, padding=1, residual=residual,
                             residual_stride=2, residual_channel_offset=0)
    ref64 = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    ref64[:, :8] += residual.double()[:, :, ::2, ::2]
    assert_fp32_close(out.double(), ref64, 9 * 16, what="offset 0")


# (batch, C_in, C_out, H, W, stride, with residual, ReLU on out2)
PREACT = [
    (2, 64, 64, 8, 8, 1, True, True),       # PreActResNet-18 stage 1 conv2 + identity -> bn1/relu of the next block
    (2, 128, 128, 4, 4, 1, True, True),     # stage 2
    (1, 160, 160, 8, 8, 1, True, True),     # WRN-28-10 stage 1 width
    (3, 24, 40, 7, 5, 1, False, False),     # odd: no residual, no ReLU, channels not a tile multiple
    (2, 32, 48, 9, 9, 2, True, True),       # stride 2
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", PREACT, ids=lambda c: "x".join(map(str, c)))
def test_dual_output_affine(case, dtype):
    batch, c_in, c_out, h, w, stride, with_residual, out2_relu = case
    if dtype != torch.float32 and case not in (PREACT[0], PREACT[3]):
        pytest.skip("16-bit on two shapes is enough under the interpreter")
    x, weight, bias, g = _problem(batch, c_in, c_out, h, w, dtype)
    oh, ow = (h - 1) // stride + 1, (w - 1) // stride + 1
    residual = (channels_last(torch.randn(batch, c_out, oh, ow, generator=g).to(dtype)).to(DEVICE)
                if with_residual else None)
    scale = torch.empty(c_out).uniform_(0.3, 1.5, generator=g).to(DEVICE)
    shift = torch.empty(c_out).uniform_(-0.5, 0.5, generator=g).to(DEVICE)
    out, out2 = conv2d_nhwc_packed(x, pack_conv_weight(weight), bias, stride=stride, padding=1,
                                   residual=residual, affine2=(scale, shift), affine2_relu=out2_relu)
    y64 = F.conv2d(x.double(), weight.double(), bias.double(), stride=stride, padding=1)
    if residual is not None:
        y64 = y64 + residual.double()
    y2_64 = y64 * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)
    y2_64 = F.relu(y2_64) if out2_relu else y2_64
    kw = dict(stride=stride, padding=1, residual=residual, affine2=(scale, shift), affine2_relu=out2_relu)
    torch_out, torch_out2 = conv2d_nhwc_ref(x, weight, bias, **kw)
    _check(out, torch_out, y64, dtype, 9 * c_in, f"sum {case}")
    _check(out2, torch_out2, y2_64, dtype, 9 * c_in, f"affine output {case}")


def test_dual_output_into_preallocated_buffers_and_with_projection():
    x, weight, bias, g = _problem(2, 32, 64, 8, 8, torch.float32)
    sc = channels_last(torch.randn(2, 16, 16, 16, generator=g)).to(DEVICE)
    sc_weight = torch.randn(64, 16, 1, 1, generator=g) / 4
    scale, shift = torch.rand(64, generator=g) + 0.5, torch.randn(64, generator=g)
    packed = pack_conv_weight(weight, shortcut_weight=sc_weight)
    out = torch.empty(2, 64, 8, 8).to(memory_format=CL)
    out2 = torch.empty(2, 64, 8, 8).to(memory_format=CL)
    got = conv2d_nhwc_packed(x, packed, bias, padding=1, shortcut=sc, shortcut_stride=2,
                             affine2=(scale, shift), affine2_relu=True, out=out, out2=out2)
    assert got[0] is out and got[1] is out2
    y64 = (F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
           + F.conv2d(sc.double(), sc_weight.double(), stride=2))
    assert_fp32_close(out.double(), y64, 9 * 32 + 16, what="sum")
    assert_fp32_close(out2.double(), F.relu(y64 * scale.double().view(1, -1, 1, 1)
                                            + shift.double().view(1, -1, 1, 1)), 9 * 32 + 16, what="out2")


def test_launch_names_and_modelled_traffic():
    meta = dict(device="meta")
    x = torch.empty(2, 32, 16, 16, **meta).to(memory_format=CL)
    packed = pack_conv_weight(torch.empty(64, 32, 3, 3, **meta))
    residual = torch.empty(2, 32, 32, 32, **meta).to(memory_format=CL)
    with record_launches() as calls:
        conv2d_nhwc_packed(x, packed, torch.empty(64, **meta), padding=1, residual=residual,
                           residual_stride=2, residual_channel_offset=16, relu=True)
        conv2d_nhwc_packed(x, packed, torch.empty(64, **meta), padding=1,
                           affine2=(torch.empty(64, **meta), torch.empty(64, **meta)))
    strided, dual = calls
    assert strided.name == "conv2d_nhwc[3x3/s1+res32@16/s2]" and dual.name == "conv2d_nhwc[3x3/s1+affine2]"
    m = 2 * 16 * 16
    weights, bias = 64 * 9 * 32, 64 * 4
    assert strided.info["bytes"] == (x.numel() + m * 64 + m * 32 + weights) * 4 + bias   # only sampled residual pixels
    assert dual.info["bytes"] == (x.numel() + 2 * m * 64 + weights) * 4 + bias
    assert strided.constexprs["RES_STRIDE"] == 2 and strided.constexprs["RES_C_OFFSET"] == 16


@pytest.mark.parametrize("kwargs,match", [
    (dict(residual_stride=2, residual_channel_offset=40, res_shape=(2, 32, 16, 16)), "exceed the 64 output"),
    (dict(residual_stride=2, residual_channel_offset=0, res_shape=(2, 32, 10, 16)), "gives 5x8"),
    (dict(residual_stride=0, residual_channel_offset=0, res_shape=(2, 64, 8, 8)), "residual_stride"),
    (dict(residual_stride=1, residual_channel_offset=0, res_shape=(2, 64, 9, 8)), "gives 9x8"),
])
def test_bad_residual_raises_clear_error(kwargs, match):
    x, weight, bias, _ = _problem(2, 16, 64, 8, 8, torch.float32)
    residual = channels_last(torch.randn(kwargs.pop("res_shape"))).to(DEVICE)
    with pytest.raises(ValueError, match=match):
        conv2d_nhwc_packed(x, pack_conv_weight(weight), bias, padding=1, residual=residual, **kwargs)


# ------------------------------------------------------------------------------------------------
# The SE squeeze: out.mean((2, 3)) from the producer's epilogue

# (batch, C_in, C_out, H, W, kernel, residual + ReLU, groups)
SQUEEZE = [
    (2, 64, 256, 56, 56, 1, False, 1),      # SE-ResNet-50 stage 1 conv3 (its output is the SE input)
    (2, 128, 512, 28, 28, 1, False, 1),     # stage 2
    (2, 256, 1024, 14, 14, 1, False, 1),    # stage 3
    (2, 512, 2048, 7, 7, 1, False, 1),      # stage 4: 49 pixels, a tile holds several images
    (12, 32, 48, 7, 7, 3, True, 1),         # 588 rows: 3 tiles, each across 5-6 images; residual, ReLU
    (3, 32, 40, 13, 11, 3, False, 1),       # 143 pixels per image, not a tile multiple; masked channels
    (20, 16, 32, 1, 1, 1, False, 1),        # one pixel per image: a tile of 20 images
    (2, 64, 128, 9, 7, 3, False, 2),        # grouped: column tiles inside packed groups
]


def _squeeze_problem(case, dtype):
    batch, c_in, c_out, h, w, k, with_residual, groups = case
    g = torch.Generator().manual_seed(1)
    x = channels_last(torch.randn(batch, c_in, h, w, generator=g).to(dtype)).to(DEVICE)
    weight = (torch.randn(c_out, c_in // groups, k, k, generator=g) / math.sqrt(k * k * c_in / groups)).to(dtype)
    bias = 0.5 * torch.randn(c_out, generator=g)
    residual = (channels_last(torch.randn(batch, c_out, h, w, generator=g).to(dtype)).to(DEVICE)
                if with_residual else None)
    kw = dict(padding=k // 2, residual=residual, relu=with_residual)
    return x, weight.to(DEVICE), bias.to(DEVICE), kw


def _check_squeeze(out, mean, x, weight, bias, kw, dtype, groups, what):
    n, c = out.shape[:2]
    assert mean.shape == (n, c, 1, 1) and mean.dtype == dtype and mean.is_contiguous(memory_format=CL)
    k_len = weight[0].numel()
    ref64 = conv2d_nhwc_ref(x.double(), weight.double(), bias.double(), groups=groups,
                            **dict(kw, residual=kw["residual"].double() if kw["residual"] is not None else None))
    mean64 = out.double().mean((2, 3), keepdim=True)      # the exact mean of what the kernel stored
    if dtype == torch.float32:
        assert_fp32_close(out.double(), ref64, k_len, what=f"{what} out")
        assert_fp32_close(mean.double(), mean64, out.shape[2] * out.shape[3], what=f"{what} mean")
    else:
        torch_out = conv2d_nhwc_ref(x, weight, bias, groups=groups, **kw)
        assert_within_twice_torch(out.double(), torch_out.double(), ref64, dtype, k_len, what=f"{what} out")
        # summed in fp32, rounded once, as PyTorch's own mean of the 16-bit tensor (one ulp apart at most)
        assert_rounded_once(mean.double(), mean64, dtype, out.shape[2] * out.shape[3], what=f"{what} mean")
        torch_mean = out.mean((2, 3), keepdim=True).double()
        assert ((mean.double() - torch_mean).abs() <= ulp(mean64, dtype)).all(), what


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", SQUEEZE, ids=lambda c: "x".join(map(str, c)))
def test_channel_mean(case, dtype):
    if dtype != torch.float32 and case not in (SQUEEZE[3], SQUEEZE[4]):
        pytest.skip("16-bit on two shapes is enough under the interpreter")
    x, weight, bias, kw = _squeeze_problem(case, dtype)
    groups = case[-1]
    packed = pack_conv_weight(weight, groups=groups)
    out, mean = conv2d_nhwc_packed(x, packed, bias, channel_mean=True, **kw)
    _check_squeeze(out, mean, x, weight, bias, kw, dtype, groups, f"mean {case}")
    # a fixed summation order: the same bits again
    out_again, mean_again = conv2d_nhwc_packed(x, packed, bias, channel_mean=True, **kw)
    assert torch.equal(mean, mean_again) and torch.equal(out, out_again)
    # the reference beside the kernel computes the same thing
    ref, ref_mean = conv2d_nhwc_ref(x, weight, bias, groups=groups, channel_mean=True, upcast=True, **kw)
    torch.testing.assert_close(ref_mean, ref.mean((2, 3), keepdim=True), rtol=0, atol=0)


@pytest.mark.parametrize("config_name", ["tc_wide", "tc_narrow", "tc_small_m"])
def test_channel_mean_on_gpu_tiles(config_name, monkeypatch):
    """The GPU tiles (64 / 128 rows, column tiles narrower than C_out: one arrival counter per
    image and column tile), under the interpreter."""
    config = CONV_CONFIGS[config_name]
    monkeypatch.setattr(conv_module, "conv_config",
                        lambda m, cout_g, n_groups, cin_g, flat_k, dtype, device_type, *rest: type(config)(
                            config.BLOCK_M, min(config.BLOCK_N, max(16, triton.next_power_of_2(cout_g))),
                            min(config.BLOCK_K, cin_g & -cin_g), config.GROUP_M, config.num_warps,
                            config.num_stages))
    for case in (SQUEEZE[4], SQUEEZE[5], (3, 64, 320, 7, 7, 1, False, 1), (2, 64, 128, 9, 7, 3, False, 2)):
        x, weight, bias, kw = _squeeze_problem(case, torch.float32)
        with record_launches() as calls:
            conv2d_nhwc_packed(x, pack_conv_weight(weight, groups=case[-1]), bias, channel_mean=True, **kw)
        assert calls[0].constexprs["BLOCK_M"] == config.BLOCK_M
        out, mean = conv2d_nhwc_packed(x, pack_conv_weight(weight, groups=case[-1]), bias, channel_mean=True, **kw)
        _check_squeeze(out, mean, x, weight, bias, kw, torch.float32, case[-1], f"{config_name} {case}")


def test_channel_mean_into_preallocated_buffer_launch_record_and_errors():
    x, weight, bias, kw = _squeeze_problem(SQUEEZE[5], torch.float32)
    packed = pack_conv_weight(weight)
    mean_out = torch.empty(3, 40, 1, 1).to(memory_format=CL)
    out, mean = conv2d_nhwc_packed(x, packed, bias, channel_mean=True, mean_out=mean_out, **kw)
    assert mean is mean_out
    torch.testing.assert_close(mean, out.mean((2, 3), keepdim=True))
    with pytest.raises(ValueError, match="cannot be combined"):
        conv2d_nhwc_packed(x, packed, bias, channel_mean=True, affine2=(torch.ones(40), torch.zeros(40)), **kw)
    with pytest.raises(ValueError, match="mean_out must have shape"):
        conv2d_nhwc_packed(x, packed, bias, channel_mean=True, mean_out=torch.empty(3, 40), **kw)
    with pytest.raises(ValueError, match="channel_mean is False"):
        conv2d_nhwc_packed(x, packed, bias, mean_out=mean_out, **kw)
    # on a GPU target: "+mean" in the name, its bytes modelled, and never split-K (which the same
    # layer-4 shape at batch 1 would get without it)
    meta = dict(device="meta", dtype=torch.float16)
    x4 = torch.empty(1, 512, 7, 7, **meta).to(memory_format=CL)
    packed4 = pack_conv_weight(torch.empty(2048, 512, 1, 1, **meta))
    with record_launches() as calls:
        conv2d_nhwc_packed(x4, packed4, torch.empty(2048, device="meta"))
        conv2d_nhwc_packed(x4, packed4, torch.empty(2048, device="meta"), channel_mean=True)
    plain, squeezed = calls
    assert plain.constexprs["SPLIT_K"] > 1 and squeezed.constexprs["SPLIT_K"] == 1
    assert squeezed.name == "conv2d_nhwc[1x1/s1+mean]" and squeezed.constexprs["HAS_MEAN"]
    assert squeezed.info["bytes"] == (x4.numel() + 49 * 2048 + 2048 * 512 + 2048) * 2 + 2048 * 4
