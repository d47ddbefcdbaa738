"""The implicit-GEMM NHWC convolution against torch.nn.functional.conv2d.

Runs the real Triton kernel: on CUDA tensors when a GPU is present, otherwise under the Triton
interpreter (CPU tensors), which must be switched on before Python starts:

    TRITON_INTERPRET=1 pytest tests/test_conv2d_nhwc.py

How bf16 is covered: the triton 3.8 interpreter's bf16 ``tl.dot`` returns garbage and its
fp32 -> bf16 cast truncates, so under the interpreter the wrapper sets INTERPRETER_BF16: the two
bf16 dot tiles are upcast to fp32 and the store is rounded to nearest-even by hand. bf16 loads,
the fp32 epilogue and the bf16 store still run and are checked here (bf16 on the shapes that reach
every K mode, the shortcut, NaN). The bf16 tensor-core dot itself is checked by compiling the real
kernel (INTERPRETER_BF16 off) for sm_80/sm_90 in the AOT check, and by these same tests on a GPU.
"""
import math

import pytest
import torch
import torch.nn.functional as F
import triton
from kernel_testing import (CL, DEVICE, ON_CUDA, assert_fp32_close, assert_rounded_once, assert_within_twice_torch,
                            channels_last, resnet_conv_shapes, skip_if_compiled_without_gpu,
                            skip_without_gpu_or_interpreter)

skip_without_gpu_or_interpreter("the Triton conv kernel")

from fastres.kernels import conv2d_nhwc as conv_module  # noqa: E402
from fastres.kernels._launch import KernelCall, record_launches  # noqa: E402
from fastres.kernels.conv2d_nhwc import (  # noqa: E402
    CONV_CONFIGS, PackedConvWeight, conv2d_nhwc, conv2d_nhwc_packed, conv2d_nhwc_ref, conv_config,
    pack_conv_weight)

skip_if_compiled_without_gpu(conv_module._conv2d_nhwc_kernel)

# Tolerances are kernel_testing's (K = C_in/groups * KH * KW, + C_sc with a shortcut).

# ------------------------------------------------------------------------------------------------
# The conv shapes of the torchvision ResNets, read off the models themselves (kernel_testing)

RESNET_CONV_SHAPES = resnet_conv_shapes()
_EPILOGUES = [(bias, residual, relu) for bias in (True, False) for residual in (True, False) for relu in (True, False)]


def _shape_id(shape):
    c_in, c_out, k, s, p, d, g = shape
    return f"{c_in}-{c_out}-k{k}s{s}p{p}" + (f"d{d}" if d > 1 else "") + (f"g{g}" if g > 1 else "")


# ------------------------------------------------------------------------------------------------
# Helpers


def _make_problem(batch, c_in, c_out, h, w, k, stride, padding, dilation, groups, dtype, *, bias, residual,
                  seed=0):
    gen = torch.Generator().manual_seed(seed)
    fan_in = c_in // groups * k * k
    x = channels_last(torch.randn(batch, c_in, h, w, generator=gen).to(dtype)).to(DEVICE)
    weight = (torch.randn(c_out, c_in // groups, k, k, generator=gen) / math.sqrt(fan_in)).to(dtype).to(DEVICE)
    b = (0.5 * torch.randn(c_out, generator=gen)).to(DEVICE) if bias else None
    oh = (h + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    ow = (w + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    r = channels_last(torch.randn(batch, c_out, oh, ow, generator=gen).to(dtype)).to(DEVICE) if residual else None
    return x, weight, b, r


def _double(t):
    return t.double() if t is not None else None


def _assert_close_to_reference(out, torch_out, ref64, dtype, k_len, *, what=""):
    """fp32: elementwise against the fp64 reference. fp16/bf16: relative to torch's own error, and
    every element the exact result rounded once."""
    assert out.dtype == dtype and out.shape == ref64.shape
    assert out.is_contiguous(memory_format=CL), "output must be channels_last"
    finite = torch.isfinite(ref64)
    assert torch.equal(torch.isfinite(out.double()), finite), f"{what}: non-finite values differ"
    out64, ref64 = out.double()[finite], ref64[finite]
    if dtype == torch.float32:
        assert_fp32_close(out64, ref64, k_len, what=what)
    else:
        if torch_out is not None:
            assert_within_twice_torch(out64, torch_out.double()[finite], ref64, dtype, k_len, what=what)
        assert_rounded_once(out64, ref64, dtype, k_len, what=what)


def _check_conv(batch, c_in, c_out, h, w, k, stride, padding, dilation, groups, dtype, *, bias, residual, relu,
                seed=0):
    x, weight, b, r = _make_problem(batch, c_in, c_out, h, w, k, stride, padding, dilation, groups, dtype,
                                    bias=bias, residual=residual, seed=seed)
    conv = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    out = conv2d_nhwc(x, weight, b, residual=r, relu=relu, **conv)
    ref64 = conv2d_nhwc_ref(_double(x), _double(weight), _double(b), residual=_double(r), relu=relu, **conv)
    torch_out = None if dtype == torch.float32 else conv2d_nhwc_ref(x, weight, b, residual=r, relu=relu, **conv)
    _assert_close_to_reference(out, torch_out, ref64, dtype, c_in // groups * k * k,
                               what=f"conv {c_in}->{c_out} k{k} s{stride} p{padding} d{dilation} g{groups}")


# ------------------------------------------------------------------------------------------------
# Every ResNet conv shape


def test_shape_table_comes_from_torchvision():
    shapes = set(RESNET_CONV_SHAPES)
    assert (3, 64, 7, 2, 3, 1, 1) in shapes                 # the stem
    assert (128, 128, 3, 1, 1, 1, 32) in shapes             # resnext50_32x4d layer1: 4 channels per group
    assert (512, 512, 3, 1, 4, 4, 1) in shapes              # dilated resnet50 layer4
    assert (64, 64, 3, 1, 1, 1, 1) in shapes                # resnet18 BasicBlock
    assert (1024, 2048, 1, 2, 0, 1, 1) in shapes            # resnet50 layer4 downsample
    assert len(shapes) == 47, len(shapes)


_DTYPE_CASES = [(shape, dtype) for shape in RESNET_CONV_SHAPES for dtype in (torch.float32, torch.float16)]
# bf16 on the shapes that reach each K mode and epilogue: stem (FLAT_K), 1x1 (plain GEMM),
# 3x3 stride 2, grouped 4-per-group, dilated.
_BF16_SHAPES = [(3, 64, 7, 2, 3, 1, 1), (256, 64, 1, 1, 0, 1, 1), (128, 128, 3, 2, 1, 1, 1),
                (128, 128, 3, 1, 1, 1, 32), (256, 256, 3, 1, 2, 2, 1), (512, 1024, 1, 2, 0, 1, 1)]
_DTYPE_CASES += [(shape, torch.bfloat16) for shape in _BF16_SHAPES]


@pytest.mark.parametrize("shape,dtype", _DTYPE_CASES,
                         ids=[f"{_shape_id(s)}-{str(d)[6:]}" for s, d in _DTYPE_CASES])
def test_resnet_conv_shapes(shape, dtype):
    c_in, c_out, k, stride, padding, dilation, groups = shape
    # Epilogue combination cycles over the shapes (all 8 are covered many times, see also
    # test_epilogue_combinations); spatial sizes are tiny, H != W, not multiples of any tile.
    index = RESNET_CONV_SHAPES.index(shape) + (dtype == torch.float16)
    bias, residual, relu = _EPILOGUES[index % len(_EPILOGUES)]
    h, w = (13, 11) if c_in == 3 else (5, 6)
    _check_conv(2, c_in, c_out, h, w, k, stride, padding, dilation, groups, dtype, bias=bias, residual=residual,
                relu=relu, seed=index)


@pytest.mark.parametrize("bias,residual,relu", _EPILOGUES)
def test_epilogue_combinations(bias, residual, relu):
    _check_conv(2, 64, 64, 7, 5, 3, 1, 1, 1, 1, torch.float32, bias=bias, residual=residual, relu=relu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch,h,w", [(1, 224 // 16, 224 // 16), (3, 13, 7)])
def test_stem(dtype, batch, h, w):
    _check_conv(batch, 3, 64, h, w, 7, 2, 3, 1, 1, dtype, bias=True, residual=False, relu=True)


@pytest.mark.parametrize("batch,h,w,c_in,c_out,k,stride,padding,dilation,groups", [
    (1, 7, 7, 64, 64, 3, 1, 1, 1, 1),
    (3, 13, 13, 64, 128, 3, 2, 1, 1, 1),       # M = 147 per image: masked M tail
    (3, 13, 7, 256, 512, 1, 1, 0, 1, 1),      # 1x1 plain GEMM, 273 pixels > one interpreter tile
    (1, 7, 13, 128, 256, 1, 2, 0, 1, 1),      # 1x1 stride 2 (the unfused downsample)
    (3, 9, 7, 256, 256, 3, 1, 1, 1, 64),      # resnext101_64x4d layer1: 4 channels per group
    (1, 13, 7, 512, 512, 3, 2, 1, 1, 32),     # 16 channels per group, stride 2
    (1, 7, 9, 2048, 2048, 3, 1, 1, 1, 32),    # resnext101_32x8d layer4: 64 per group
    (1, 7, 9, 48, 40, 3, 1, 1, 1, 1),         # channels not multiples of 16/32/64
    (1, 7, 9, 5, 7, 3, 1, 2, 2, 1),           # odd channel count: the FLAT_K path beyond the stem
    (2, 5, 6, 40, 24, 1, 1, 0, 1, 1),         # 1x1 plain GEMM with a masked K tail (BLOCK_K 32)
    (1, 5, 7, 6, 9, 3, 1, 1, 1, 3),           # 2 channels per group: dense packed groups
    (1, 9, 9, 32, 32, 5, 2, 2, 1, 1),         # a 5x5 kernel
])
def test_odd_shapes(batch, h, w, c_in, c_out, k, stride, padding, dilation, groups):
    for dtype in (torch.float32, torch.float16):
        _check_conv(batch, c_in, c_out, h, w, k, stride, padding, dilation, groups, dtype, bias=True,
                    residual=True, relu=True)


def test_non_square_stride_padding_dilation():
    x, weight, b, _ = _make_problem(2, 32, 48, 9, 11, 3, 1, 0, 1, 1, torch.float32, bias=True, residual=False)
    conv = dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=1)
    out = conv2d_nhwc(x, weight, b, relu=True, **conv)
    ref64 = conv2d_nhwc_ref(_double(x), _double(weight), _double(b), relu=True, **conv)
    _assert_close_to_reference(out, None, ref64, torch.float32, 32 * 9)


@pytest.mark.parametrize("config_name", ["tc_wide", "tc_narrow", "tc_small_m"])
def test_gpu_tile_configs_under_the_interpreter(config_name, monkeypatch):
    """The GPU tiles (several M and N tiles, the GROUP_M swizzle, N tiles inside a packed group,
    masked N tails) are what a GPU runs; run them here too, not only the big interpreter tile."""
    config = CONV_CONFIGS[config_name]
    monkeypatch.setattr(conv_module, "conv_config",
                        lambda m, cout_g, n_groups, cin_g, flat_k, dtype, device_type, *target: type(config)(
                            config.BLOCK_M, min(config.BLOCK_N, max(16, triton.next_power_of_2(cout_g))),
                            min(config.BLOCK_K, 32 if flat_k else cin_g & -cin_g), config.GROUP_M,
                            config.num_warps, config.num_stages))
    cases = [  # (batch, C_in, C_out, H, W, k, stride, padding, dilation, groups)
        (3, 256, 320, 13, 11, 1, 1, 0, 1, 1),      # 429 pixels; C_out 320: masked last N tile
        (2, 64, 128, 11, 13, 3, 2, 1, 1, 1),
        (2, 256, 256, 9, 7, 3, 1, 1, 1, 2),         # 128 channels per group: N tiles inside a group
        (2, 3, 64, 13, 11, 7, 2, 3, 1, 1),
    ]
    for case in cases:
        _check_conv(*case, torch.float16, bias=True, residual=True, relu=True)
    _check_shortcut(*_shortcut_problem(2, 64, 256, 7, 9, 256, 2, torch.float16), 2, relu=True)
    # BasicBlock's 3x3 + projection: the shortcut steps inside the tap loop (padded taps masked)
    _check_shortcut(*_shortcut_problem(2, 64, 128, 7, 9, 128, 2, torch.float16, k=3), 2, relu=True)


# ------------------------------------------------------------------------------------------------
# Concat-K projection shortcut


def _shortcut_problem(batch, c_mid, c_out, h, w, c_sc, sc_stride, dtype, *, k=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = channels_last(torch.randn(batch, c_mid, h, w, generator=gen).to(dtype)).to(DEVICE)
    weight = (torch.randn(c_out, c_mid, k, k, generator=gen) / math.sqrt(c_mid * k * k)).to(dtype).to(DEVICE)
    sc_weight = (torch.randn(c_out, c_sc, 1, 1, generator=gen) / math.sqrt(c_sc)).to(dtype).to(DEVICE)
    # The shortcut input is the block input: sc_stride x the conv output size (odd sizes allowed).
    oh, ow = h, w  # k x k convs here keep the size (padding k // 2, stride 1)
    shortcut = torch.randn(batch, c_sc, oh * sc_stride - (sc_stride > 1), ow * sc_stride, generator=gen)
    shortcut = channels_last(shortcut.to(dtype)).to(DEVICE)
    bias = (0.5 * torch.randn(c_out, generator=gen)).to(DEVICE)
    return x, weight, sc_weight, bias, shortcut


def _check_shortcut(x, weight, sc_weight, bias, shortcut, sc_stride, *, relu, dilation=1):
    packed = pack_conv_weight(weight, shortcut_weight=sc_weight)
    assert packed.shortcut_in_channels == sc_weight.shape[1]
    assert packed.weight.shape == (weight[0].numel() + sc_weight.shape[1], weight.shape[0])
    k = weight.shape[2]
    padding = dilation * (k // 2)
    out = conv2d_nhwc_packed(x, packed, bias, padding=padding, dilation=dilation, relu=relu, shortcut=shortcut,
                             shortcut_stride=sc_stride)
    conv = dict(stride=1, padding=padding, dilation=dilation, groups=1, relu=relu, shortcut_stride=sc_stride)
    ref64 = conv2d_nhwc_ref(_double(x), _double(weight), _double(bias), shortcut=_double(shortcut),
                            shortcut_weight=_double(sc_weight), **conv)
    torch_out = None
    if x.dtype != torch.float32:
        torch_out = conv2d_nhwc_ref(x, weight, bias, shortcut=shortcut, shortcut_weight=sc_weight, **conv)
    _assert_close_to_reference(out, torch_out, ref64, x.dtype, x.shape[1] * k * k + shortcut.shape[1],
                               what="shortcut")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch,c_mid,c_out,h,w,c_sc,sc_stride,k,dilation", [
    (2, 64, 256, 6, 5, 64, 1, 1, 1),        # resnet50 layer1.0: conv3 + downsample, stride 1
    (3, 128, 512, 4, 5, 256, 2, 1, 1),      # resnet50 layer2.0: downsample 1x1/s2
    (1, 512, 2048, 3, 3, 1024, 2, 1, 1),    # resnet50 layer4.0
    (2, 256, 1024, 5, 4, 512, 1, 1, 1),     # dilated resnet50 layer3.0: stride replaced by dilation
    (2, 128, 128, 4, 5, 64, 2, 3, 1),       # resnet18 layer2.0: conv2 3x3 + downsample
    (1, 256, 256, 5, 5, 128, 1, 3, 2),      # a dilated 3x3 main conv with a stride-1 shortcut
    (2, 64, 96, 5, 6, 80, 2, 1, 1),         # shortcut channels not a multiple of BLOCK_K (64): masked 2nd step
])
def test_projection_shortcut(batch, c_mid, c_out, h, w, c_sc, sc_stride, k, dilation, dtype):
    problem = _shortcut_problem(batch, c_mid, c_out, h, w, c_sc, sc_stride, dtype, k=k)
    _check_shortcut(*problem, sc_stride, relu=True, dilation=dilation)


def test_shortcut_without_relu_bf16():
    _check_shortcut(*_shortcut_problem(2, 64, 256, 5, 4, 128, 2, torch.bfloat16), 2, relu=False)


# ------------------------------------------------------------------------------------------------
# NaN, out=, empty batch, recording


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_relu_propagates_nan(dtype):
    x, weight, b, r = _make_problem(1, 32, 32, 7, 7, 3, 1, 1, 1, 1, dtype, bias=True, residual=True)
    x[0, :, 2, 3] = float("nan")                 # poisons the 3x3 neighbourhood of (2, 3)
    r[0, 5, 6, 6] = float("nan")                 # poisons one output element through the residual
    x[0, 0, 6, 0] = float("inf")                 # +/-inf per output channel (sign of the weight), relu'd
    out = conv2d_nhwc(x, weight, b, padding=1, residual=r, relu=True)
    ref = conv2d_nhwc_ref(x.double(), weight.double(), b.double(), padding=1, residual=r.double(), relu=True)
    assert out.isnan().any() and torch.equal(out.isnan(), ref.isnan())
    assert torch.equal(out.isinf(), ref.isinf())
    assert out[0, :, 1:4, 2:5].isnan().all() and out[0, 5, 6, 6].isnan()


def test_out_parameter_is_written_and_returned():
    x, weight, b, r = _make_problem(2, 64, 128, 6, 7, 3, 2, 1, 1, 1, torch.float32, bias=True, residual=True)
    out = channels_last(torch.full((2, 128, 3, 4), float("nan"), device=DEVICE))
    result = conv2d_nhwc_packed(x, pack_conv_weight(weight), b, stride=2, padding=1, residual=r, relu=True, out=out)
    assert result is out
    ref64 = conv2d_nhwc_ref(x.double(), weight.double(), b.double(), stride=2, padding=1, residual=r.double(),
                            relu=True)
    _assert_close_to_reference(out, None, ref64, torch.float32, 64 * 9)


def test_out_must_not_alias_x():
    x = channels_last(torch.randn(1, 16, 5, 5, device=DEVICE))
    with pytest.raises(ValueError, match="alias"):
        conv2d_nhwc_packed(x, pack_conv_weight(torch.randn(16, 16, 1, 1, device=DEVICE)), out=x)


def test_out_may_be_the_residual_buffer():
    x, weight, b, r = _make_problem(1, 64, 64, 5, 5, 1, 1, 0, 1, 1, torch.float32, bias=True, residual=True)
    ref64 = conv2d_nhwc_ref(x.double(), weight.double(), b.double(), residual=r.double(), relu=True)
    conv2d_nhwc_packed(x, pack_conv_weight(weight), b, residual=r, relu=True, out=r)
    _assert_close_to_reference(r, None, ref64, torch.float32, 64)


@pytest.mark.parametrize("with_out", [False, True])
def test_empty_batch(with_out):
    x = channels_last(torch.empty(0, 64, 7, 5, device=DEVICE))
    weight = torch.randn(32, 64, 3, 3, device=DEVICE)
    if with_out:
        out = channels_last(torch.empty(0, 32, 4, 3, device=DEVICE))
        result = conv2d_nhwc_packed(x, pack_conv_weight(weight), stride=2, padding=1, out=out)
        assert result is out
    else:
        result = conv2d_nhwc(x, weight, stride=2, padding=1, relu=True)
    assert result.shape == (0, 32, 4, 3) and result.is_contiguous(memory_format=CL)


def test_launch_is_recorded_on_meta_tensors():
    x = channels_last(torch.empty(8, 256, 14, 14, device="meta", dtype=torch.float16))
    weight = torch.empty(512, 64, 1, 1, device="meta", dtype=torch.float16)
    sc_weight = torch.empty(512, 256, 1, 1, device="meta", dtype=torch.float16)
    y = channels_last(torch.empty(8, 64, 7, 7, device="meta", dtype=torch.float16))
    bias = torch.empty(512, device="meta")
    packed = pack_conv_weight(weight, shortcut_weight=sc_weight)
    preallocated = channels_last(torch.empty(8, 512, 7, 7, device="meta", dtype=torch.float16))
    with record_launches() as calls:
        out = conv2d_nhwc_packed(y, packed, bias, relu=True, shortcut=x, shortcut_stride=2)
        conv2d_nhwc_packed(y, packed, bias, relu=True, shortcut=x, shortcut_stride=2, out=preallocated)
    assert out.device.type == "meta" and out.shape == (8, 512, 7, 7)
    call, call_into_out = calls
    assert call_into_out.args["out_ptr"] is preallocated
    assert isinstance(call, KernelCall)
    params = list(conv_module._conv2d_nhwc_kernel.arg_names)
    assert set(call.args) | set(call.constexprs) == set(params) and not set(call.args) & set(call.constexprs)
    assert call.args["x_ptr"] is y and call.args["shortcut_ptr"] is x and call.args["out_ptr"] is out
    assert call.constexprs["HAS_SHORTCUT_GEMM"] and call.constexprs["residual_ptr"] is None
    assert call.constexprs["SC_STRIDE"] == 2 and call.args["SC_H"] == 14
    assert not call.constexprs["INTERPRETER_BF16"]           # meta records the GPU kernel
    cfg = conv_config(8 * 49, 512, 1, 64, False, torch.float16, "meta")
    assert call.constexprs["BLOCK_M"] == cfg.BLOCK_M and call.num_warps == cfg.num_warps
    assert call.grid == (triton.cdiv(8 * 49, cfg.BLOCK_M) * triton.cdiv(512, cfg.BLOCK_N),)
    assert call.info["K"] == 64 + 256 and call.info["flops"] == 2 * 8 * 49 * 512 * 320


def test_meta_tensors_outside_recording_are_refused():
    x = channels_last(torch.empty(1, 16, 5, 5, device="meta"))
    with pytest.raises(RuntimeError, match="record_launches"):
        conv2d_nhwc(x, torch.empty(16, 16, 3, 3, device="meta"), padding=1)


@pytest.mark.skipif(ON_CUDA, reason="checks the CPU-without-interpreter message")
def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch):
    compiled_kernel = triton.runtime.JITFunction(conv_module._conv2d_nhwc_kernel.fn)
    monkeypatch.setattr(conv_module, "_conv2d_nhwc_kernel", compiled_kernel)
    x = channels_last(torch.randn(1, 16, 5, 5))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        conv2d_nhwc(x, torch.randn(16, 16, 3, 3), padding=1)


# ------------------------------------------------------------------------------------------------
# Packing, configs, reference


def test_pack_grouped_weight_block_diagonal():
    weight = torch.randn(128, 4, 3, 3)                       # resnext50_32x4d layer1: 32 groups of 4
    packed = pack_conv_weight(weight, groups=32)
    assert isinstance(packed, PackedConvWeight)
    assert packed.tile_groups == 4 and packed.group_in_channels == 16 and packed.group_out_channels == 16
    assert packed.weight.shape == (9 * 16, 128) and packed.weight.is_contiguous()
    block = packed.weight.reshape(3, 3, 16, 128)[1, 2]      # tap (1, 2): [c in packed group, C_out]
    for co in (0, 5, 17, 127):
        group_in_packed = (co // 4) % 4
        expected = torch.zeros(16)
        expected[group_in_packed * 4:(group_in_packed + 1) * 4] = weight[co, :, 1, 2]
        assert torch.equal(block[:, co], expected)
    meta = pack_conv_weight(torch.empty(2048, 64, 3, 3, device="meta"), groups=32)
    assert meta.weight.device.type == "meta" and meta.tile_groups == 1 and meta.weight.shape == (9 * 64, 2048)


def test_config_rule_keeps_gpu_tiles_sane():
    """Every tile the rule gives a GPU uses tensor-core-sized dots and fits the packed group."""
    for m in (49, 3136, 802816):
        for cout_g, n_groups, cin_g, flat_k in [(64, 1, 3, True), (256, 1, 64, False), (2048, 1, 512, False),
                                                (16, 8, 16, False), (32, 32, 32, False), (64, 32, 64, False)]:
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                cfg = conv_config(m, cout_g, n_groups, cin_g, flat_k, dtype, "cuda")
                assert cfg.BLOCK_K >= 16 and cfg.BLOCK_N >= 16 and cfg.BLOCK_M >= 64
                assert cfg.num_warps % 4 == 0
                assert cfg.BLOCK_N <= max(16, cout_g)
                assert flat_k or cin_g % cfg.BLOCK_K == 0


def test_reference_keeps_channels_last_and_upcasts():
    x, weight, b, r = _make_problem(2, 16, 32, 6, 5, 3, 1, 1, 1, 1, torch.float16, bias=True, residual=True)
    x, weight, b, r = x.cpu(), weight.cpu(), b.cpu(), r.cpu()
    out = conv2d_nhwc_ref(x, weight, b, padding=1, residual=r, relu=True)
    assert out.dtype == torch.float16 and out.is_contiguous(memory_format=CL)
    upcast = conv2d_nhwc_ref(x, weight, b, padding=1, residual=r, relu=True, upcast=True)
    exact = conv2d_nhwc_ref(x.double(), weight.double(), b.double(), padding=1, residual=r.double(), relu=True)
    assert upcast.dtype == torch.float16 and upcast.is_contiguous(memory_format=CL)
    # one rounding at the end: within half an fp16 ulp of the exact result (plus fp32 noise)
    assert ((upcast.double() - exact).abs() <= 2.0**-11 * exact.abs() * 1.01 + 1e-7).all()


# ------------------------------------------------------------------------------------------------
# Bad input


def _good():
    x = channels_last(torch.randn(2, 8, 6, 6, device=DEVICE))
    return dict(x=x, weight=torch.randn(16, 8, 3, 3, device=DEVICE), bias=torch.randn(16, device=DEVICE),
                stride=1, padding=1, dilation=1, groups=1,
                residual=channels_last(torch.randn(2, 16, 6, 6, device=DEVICE)), relu=True)


def _bad(**changes):
    def make():
        kwargs = _good()
        for key, fn in changes.items():
            kwargs[key] = fn(kwargs)
        return kwargs
    return make


@pytest.mark.parametrize("make_kwargs,error,match", [
    (_bad(x=lambda k: k["x"][0]), ValueError, "4-D"),
    (_bad(weight=lambda k: k["weight"][0]), ValueError, "weight must be 4-D"),
    (_bad(x=lambda k: channels_last(torch.randn(2, 12, 6, 6, device=DEVICE))), ValueError, "channels per group"),
    (_bad(groups=lambda k: 3), ValueError, "groups=3 must divide"),
    (_bad(groups=lambda k: 0), ValueError, "groups must be a positive int"),
    (_bad(weight=lambda k: k["weight"].half()), TypeError, "weight dtype"),
    (_bad(x=lambda k: k["x"].double(), weight=lambda k: k["weight"].double()), TypeError, "float16, bfloat16"),
    (_bad(residual=lambda k: k["residual"].half()), TypeError, "residual dtype"),
    (_bad(bias=lambda k: torch.ones(16, dtype=torch.int32, device=DEVICE)), TypeError, "bias must be a float"),
    (_bad(bias=lambda k: torch.ones(15, device=DEVICE)), ValueError, "bias must have shape"),
    (_bad(weight=lambda k: k["weight"].to("meta")), ValueError, "weight is on meta"),
    (_bad(x=lambda k: k["x"].contiguous()), ValueError, r"contiguous\(memory_format=torch.channels_last\)"),
    (_bad(residual=lambda k: k["residual"].contiguous()), ValueError, "residual must be channels_last"),
    (_bad(residual=lambda k: k["residual"][:, :, :5]), ValueError, r"residual 5x6 .* the conv output is 6x6"),
    (_bad(padding=lambda k: 0, x=lambda k: channels_last(torch.randn(2, 8, 2, 6, device=DEVICE))),
     ValueError, "output size"),
    (_bad(stride=lambda k: 0), ValueError, "stride and dilation must be >= 1"),
    (_bad(padding=lambda k: (1, 2, 3)), ValueError, "padding must be an int or a pair"),
], ids=["x_rank", "weight_rank", "channels", "groups_divide", "groups_zero", "weight_dtype", "x_dtype",
        "residual_dtype", "bias_dtype", "bias_shape", "device", "x_nchw", "residual_nchw", "residual_shape",
        "output_size", "stride", "padding_pair"])
def test_bad_input_raises_clear_error(make_kwargs, error, match):
    kwargs = make_kwargs()
    x, weight = kwargs.pop("x"), kwargs.pop("weight")
    with pytest.raises(error, match=match):
        conv2d_nhwc(x, weight, **kwargs)


def _packed_good():
    x = channels_last(torch.randn(2, 8, 6, 6, device=DEVICE))
    packed = pack_conv_weight(torch.randn(16, 8, 1, 1, device=DEVICE),
                              shortcut_weight=torch.randn(16, 4, 1, 1, device=DEVICE))
    shortcut = channels_last(torch.randn(2, 4, 12, 12, device=DEVICE))
    return x, packed, dict(shortcut=shortcut, shortcut_stride=2)


@pytest.mark.parametrize("change,error,match", [
    (lambda x, p, kw: kw.pop("shortcut"), ValueError, "shortcut must be given exactly when"),
    (lambda x, p, kw: kw.update(shortcut_stride=1), ValueError, "with stride 1 gives 12x12"),
    (lambda x, p, kw: kw.update(shortcut=kw["shortcut"][:, :3]), ValueError, "C_sc=4"),
    (lambda x, p, kw: kw.update(shortcut=kw["shortcut"].contiguous()), ValueError, "shortcut must be channels_last"),
    (lambda x, p, kw: kw.update(shortcut=kw["shortcut"].half()), TypeError, "shortcut"),
    (lambda x, p, kw: kw.update(out=torch.empty(2, 16, 6, 6, device=DEVICE)), ValueError, "out must be channels_last"),
    (lambda x, p, kw: kw.update(out=channels_last(torch.empty(2, 16, 6, 5, device=DEVICE))), ValueError,
     "out must have shape"),
    (lambda x, p, kw: kw.update(out=channels_last(torch.empty(2, 16, 6, 6, device=DEVICE, dtype=torch.half))),
     TypeError, "out"),
    (lambda x, p, kw: kw.update(x=x.half()), TypeError, "packed weight dtype"),
    (lambda x, p, kw: kw.update(x=x[:, :4]), ValueError, "packed weight expects 8"),
    (lambda x, p, kw: kw.update(bias=torch.zeros(16, 1, device=DEVICE)), ValueError, "bias must be a float"),
], ids=["missing_shortcut", "shortcut_size", "shortcut_channels", "shortcut_nchw", "shortcut_dtype", "out_nchw",
        "out_shape", "out_dtype", "x_dtype", "x_channels", "bias_shape"])
def test_packed_bad_input_raises_clear_error(change, error, match):
    x, packed, kwargs = _packed_good()
    change(x, packed, kwargs)
    x = kwargs.pop("x", x)
    with pytest.raises(error, match=match):
        conv2d_nhwc_packed(x, packed, **kwargs)


def test_pack_bad_input_raises_clear_error():
    with pytest.raises(ValueError, match="groups=1"):
        pack_conv_weight(torch.randn(16, 4, 1, 1), groups=2, shortcut_weight=torch.randn(16, 4, 1, 1))
    with pytest.raises(ValueError, match=r"\[C_out=16, C_sc, 1, 1\]"):
        pack_conv_weight(torch.randn(16, 8, 1, 1), shortcut_weight=torch.randn(16, 4, 3, 3))
    with pytest.raises(ValueError, match="must match the conv weight"):
        pack_conv_weight(torch.randn(16, 8, 1, 1), shortcut_weight=torch.randn(16, 4, 1, 1).half())
    with pytest.raises(ValueError, match="groups=3 must divide"):
        pack_conv_weight(torch.randn(16, 8, 1, 1), groups=3)


# ------------------------------------------------------------------------------------------------
# The stem over its padded 4-channel input (ROW_K): exact against the padded-3 conv of the original


def _stem_padded(x, padding=3):
    """[N, 3, H, W] -> the zero-bordered [N, 4, H+6, W+6(+1)] channels_last input (plain PyTorch)."""
    from fastres.kernels.conv2d_nhwc import stem_input_padding
    top, bottom, left, right = stem_input_padding(x.shape[2], x.shape[3], padding)
    padded = torch.nn.functional.pad(x, (left, right, top, bottom))
    return channels_last(torch.cat([padded, padded.new_zeros(padded.shape[0], 1, *padded.shape[2:])], dim=1))


@pytest.mark.parametrize("batch,h,w", [(1, 224, 224), (2, 13, 13), (3, 7, 9), (1, 16, 11)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_stem_row_k_over_padded_input_matches_padded_conv(batch, h, w, dtype):
    from fastres.kernels.conv2d_nhwc import pad_stem_weight
    if h == 224 and dtype != torch.float16:
        pytest.skip("one 224x224 run (fp16) is enough for the real shape")
    x, weight, b, _ = _make_problem(batch, 3, 64, h, w, 7, 2, 3, 1, 1, dtype, bias=True, residual=False)
    xp = _stem_padded(x)
    packed = pack_conv_weight(pad_stem_weight(weight), row_k=True)
    assert packed.row_k == 32 and packed.weight.shape == (7 * 32, 64)
    with record_launches() as calls:
        conv2d_nhwc_packed(xp, packed, b, stride=2, relu=True)
    (call,) = calls
    assert call.constexprs["ROW_K"] and not call.constexprs["FLAT_K"] and call.constexprs["BLOCK_K"] == 32
    # even padded width: 16-byte runs (8 fp16 / 4 fp32 elements), and the last column's run fits its row
    assert call.constexprs["ROW_ALIGN"] == 16 // x.element_size() and not call.constexprs["ROW_K_MASK"]
    out = conv2d_nhwc_packed(xp, packed, b, stride=2, relu=True)
    conv = dict(stride=2, padding=3)
    ref64 = conv2d_nhwc_ref(_double(x), _double(weight), _double(b), relu=True, **conv)
    torch_out = None if dtype == torch.float32 else conv2d_nhwc_ref(x, weight, b, relu=True, **conv)
    _assert_close_to_reference(out, torch_out, ref64, dtype, 3 * 49, what=f"stem row-K {h}x{w}")


@pytest.mark.parametrize("h,w", [(13, 13), (9, 10)])
def test_row_k_masks_a_run_past_its_row(h, w):
    """Without the extra right column an odd width's last run would leave its row: masked then."""
    from fastres.kernels.conv2d_nhwc import pad_stem_weight
    x, weight, b, _ = _make_problem(2, 3, 64, h, w, 7, 2, 3, 1, 1, torch.float16, bias=True, residual=False)
    padded = torch.nn.functional.pad(x, (3, 3, 3, 3))
    xp = channels_last(torch.cat([padded, padded.new_zeros(2, 1, *padded.shape[2:])], dim=1))
    packed = pack_conv_weight(pad_stem_weight(weight), row_k=True)
    with record_launches() as calls:
        conv2d_nhwc_packed(xp, packed, b, stride=2)
    assert calls[0].constexprs["ROW_K_MASK"] == (w % 2 == 1)
    # fp16 row starts: 16 B (8 elements) with an even padded width, 8 B with an odd one
    assert calls[0].constexprs["ROW_ALIGN"] == (8 if (w + 6) % 2 == 0 else 4)
    out = conv2d_nhwc_packed(xp, packed, b, stride=2)
    ref64 = conv2d_nhwc_ref(_double(x), _double(weight), _double(b), stride=2, padding=3)
    torch_out = conv2d_nhwc_ref(x, weight, b, stride=2, padding=3)
    _assert_close_to_reference(out, torch_out, ref64, torch.float16, 147, what=f"row-K masked {h}x{w}")


def test_unpacked_api_picks_row_k_without_padding():
    x, weight, b, _ = _make_problem(2, 4, 32, 12, 12, 5, 1, 0, 1, 1, torch.float32, bias=True, residual=False)
    with record_launches() as calls:
        conv2d_nhwc(x, weight, b)
    assert calls[0].constexprs["ROW_K"] and calls[0].constexprs["BLOCK_K"] == 32   # 5 taps x 4 ch = 20 -> 32
    out = conv2d_nhwc(x, weight, b)
    ref64 = conv2d_nhwc_ref(_double(x), _double(weight), _double(b))
    _assert_close_to_reference(out, None, ref64, torch.float32, 100, what="row-K 5x5")


def test_row_k_packing_rules():
    from fastres.kernels.conv2d_nhwc import pad_stem_weight, stem_input_padding
    w = torch.randn(64, 3, 7, 7)
    w4 = pad_stem_weight(w)
    assert w4.shape == (64, 4, 7, 7) and torch.equal(w4[:, :3], w) and not w4[:, 3].any()
    packed = pack_conv_weight(w4, row_k=True)
    rows = packed.weight.reshape(7, 32, 64)
    assert torch.equal(rows[:, :28].reshape(7, 7, 4, 64), w4.permute(2, 3, 1, 0)) and not rows[:, 28:].any()
    assert stem_input_padding(224, 224) == (3, 3, 3, 3) and stem_input_padding(13, 13) == (3, 3, 3, 4)
    with pytest.raises(ValueError, match="row_k packing"):
        pack_conv_weight(torch.randn(64, 64, 3, 3), row_k=True)
    x = channels_last(torch.randn(1, 4, 20, 20)).to(DEVICE)
    with pytest.raises(ValueError, match="padding 0"):
        conv2d_nhwc_packed(x, pack_conv_weight(w4, row_k=True), stride=2, padding=3)


def test_concat_k_alignment_hint_follows_the_pointers():
    """dot_concat_k tells triton the row bases are 16-byte aligned only when they are."""
    packed = pack_conv_weight(torch.randn(64, 32, 1, 1), shortcut_weight=torch.randn(64, 16, 1, 1))
    x = channels_last(torch.randn(2, 32, 5, 5))
    bias = torch.randn(64)
    for storage_offset, expected in ((0, 16), (1, 1)):
        base = torch.randn(2 * 16 * 10 * 10 + storage_offset)
        shortcut = base[storage_offset:].view(2, 10, 10, 16).permute(0, 3, 1, 2)
        with record_launches() as calls:
            conv2d_nhwc_packed(x, packed, bias, shortcut=shortcut, shortcut_stride=2)
        assert calls[0].constexprs["CONCAT_ALIGN"] == expected
        out = conv2d_nhwc_packed(x, packed, bias, shortcut=shortcut, shortcut_stride=2)
        ref = conv2d_nhwc_ref(x.double(), _unpack_main(packed).double(), bias.double(),
                              shortcut=shortcut.double(), shortcut_weight=_unpack_sc(packed).double(), shortcut_stride=2)
        assert_fp32_close(out.double(), ref, 48, what="concat-K offset shortcut")


def _unpack_main(packed):
    return packed.weight[:32].t().reshape(64, 32, 1, 1)


def _unpack_sc(packed):
    return packed.weight[32:].t().reshape(64, 16, 1, 1)


# ------------------------------------------------------------------------------------------------
# Split-K (small M, large K: layer4 at small batch)


@pytest.mark.parametrize("case", [
    (1, 512, 512, 7, 7, 3, 1, 1, 3),        # layer4 3x3 at batch 1: 72 K steps of 64 / 3
    (2, 2048, 512, 7, 7, 1, 1, 0, 4),       # layer4 1x1 reduce: 2048 channels / 4
    (3, 64, 96, 5, 3, 3, 2, 1, 9),          # odd: stride 2, 9 splits of one tap each, masked N tail
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_split_k_matches_the_reference(case, dtype, monkeypatch):
    batch, c_in, c_out, h, w, k, stride, padding, split = case
    real_config = conv_module.conv_config

    def split_config(*args, **kwargs):
        cfg = real_config(*args, **kwargs)
        return type(cfg)(64, min(64, max(16, triton.next_power_of_2(args[1]))), min(64, args[3] & -args[3]),
                         cfg.GROUP_M, 4, 2, SPLIT_K=split)
    monkeypatch.setattr(conv_module, "conv_config", split_config)
    x, weight, b, r = _make_problem(batch, c_in, c_out, h, w, k, stride, padding, 1, 1, dtype, bias=True, residual=True)
    with record_launches() as calls:
        conv2d_nhwc(x, weight, b, stride=stride, padding=padding, residual=r, relu=True)
    assert calls[0].constexprs["SPLIT_K"] == split and calls[0].grid[1] == split
    out = conv2d_nhwc(x, weight, b, stride=stride, padding=padding, residual=r, relu=True)
    conv = dict(stride=stride, padding=padding)
    ref64 = conv2d_nhwc_ref(_double(x), _double(weight), _double(b), residual=_double(r), relu=True, **conv)
    torch_out = None if dtype == torch.float32 else conv2d_nhwc_ref(x, weight, b, residual=r, relu=True, **conv)
    # split-K sums the fp32 partials in another order: still one rounding at the end
    _assert_close_to_reference(out, torch_out, ref64, dtype, c_in * k * k, what=f"split-K {split}")


def test_wave_rule_splits_k_only_where_the_waves_are_short():
    from fastres.kernels._target import TARGETS
    h100, a100 = TARGETS[90], TARGETS[80]
    # layer4 3x3 512->512 at batch 1 (M = 49, 72 K steps): 8 tiles cannot fill 132 SMs -> split
    cfg = conv_config(49, 512, 1, 512, False, torch.float16, "cuda", h100, 72)
    assert cfg.SPLIT_K > 1 and 72 % cfg.SPLIT_K == 0 and 72 // cfg.SPLIT_K >= conv_module.MIN_STEPS_PER_SPLIT
    # not splittable (shortcut / groups): never split
    assert conv_config(49, 512, 1, 512, False, torch.float16, "cuda", h100, 0).SPLIT_K == 1
    # batch 256 layer4 1x1 -> 512 (M = 12544): 98 x 8 narrow tiles = 1.98 waves of 2 x 132: no split, narrow
    cfg = conv_config(12544, 512, 1, 2048, False, torch.float16, "cuda", h100, 32)
    assert cfg.SPLIT_K == 1 and (cfg.BLOCK_M, cfg.BLOCK_N) == (128, 64)
    # and its tc_wide alternative (98 x 4 = 392 programs = 1.48 waves) was rejected for its tail
    assert conv_module.wave_efficiency(392, conv_module.CONV_CTAS_PER_SM["tc_wide", 90], 132) < 0.8
    # 2048 output channels at batch 256: tc_wide fills 5.94 waves on H100
    assert conv_config(12544, 2048, 1, 512, False, torch.float16, "cuda", h100, 8).BLOCK_N == 128
    # sm_80 stages: tc_wide gets a third buffer
    assert conv_config(12544, 2048, 1, 512, False, torch.float16, "cuda", a100, 8).num_stages == 4
    assert conv_config(12544, 2048, 1, 512, False, torch.float16, "cuda", h100, 8).num_stages == 3


# ------------------------------------------------------------------------------------------------
# TMA descriptors (sm_90's 1x1 GEMMs with large K and >= 3 waves)


@pytest.mark.parametrize("case", [
    (2, 256, 64, 7, 7),         # layer1 conv1 (K = 256); 98 pixels: the last M tile's rows come zero-filled
    (1, 1024, 256, 13, 11),     # layer3 conv1 (K = 1024) at an odd spatial size
    (3, 512, 320, 5, 9),        # C_out 320: the last N tile's columns past C_out come zero-filled
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tma_descriptor_loads_match_the_reference(case, dtype, monkeypatch):
    """The TMA loop of the 1x1 plain GEMM (what sm_90 runs for compute-bound 1x1 convs) under the
    interpreter, which runs the descriptor loads and their out-of-bounds zero fill, with the
    GPU tiles (several M and N tiles, the GROUP_M swizzle), against F.conv2d in fp64."""
    batch, c_in, c_out, h, w = case
    real_config = conv_module.conv_config

    def tma_config(*args, **kwargs):
        cfg = real_config(*args, **kwargs)
        return type(cfg)(64, min(128, max(16, triton.next_power_of_2(args[1]))), 64, 4, 4, 2, TMA=True)
    monkeypatch.setattr(conv_module, "conv_config", tma_config)
    x, weight, b, r = _make_problem(batch, c_in, c_out, h, w, 1, 1, 0, 1, 1, dtype, bias=True, residual=True)
    with record_launches() as calls:
        conv2d_nhwc(x, weight, b, residual=r, relu=True)
    (call,) = calls
    assert call.constexprs["TMA"] and type(call.args["x_desc"]).__name__ == "TensorDescriptor"
    assert tuple(call.args["x_desc"].shape) == (batch * h * w, c_in)
    out = conv2d_nhwc(x, weight, b, residual=r, relu=True)
    ref64 = F.conv2d(_double(x), _double(weight), _double(b)).add_(_double(r)).relu_()
    torch_out = None if dtype == torch.float32 else conv2d_nhwc_ref(x, weight, b, residual=r, relu=True)
    _assert_close_to_reference(out, torch_out, ref64, dtype, c_in, what=f"TMA {case}")


def test_tma_rule_picks_compute_bound_1x1_gemms_on_sm90_only():
    from fastres.kernels._target import TARGETS
    h100, a100 = TARGETS[90], TARGETS[80]
    # layer1 conv1 at batch 256 (M = 802816, K = 256): thousands of programs -> TMA on H100, not on A100
    assert conv_config(802816, 64, 1, 256, False, torch.float16, "cuda", h100, 4, True).TMA
    assert not conv_config(802816, 64, 1, 256, False, torch.float16, "cuda", a100, 4, True).TMA
    # small K (layer1 conv3's K = 64), not a plain GEMM (3x3), fp32, batch 1: cp.async
    assert not conv_config(802816, 256, 1, 64, False, torch.float16, "cuda", h100, 1, True).TMA
    assert not conv_config(802816, 64, 1, 256, False, torch.float16, "cuda", h100, 36, False).TMA
    assert not conv_config(802816, 64, 1, 256, False, torch.float32, "cuda", h100, 4, True).TMA
    assert not conv_config(3136, 64, 1, 256, False, torch.float16, "cuda", h100, 4, True).TMA
    # layer4 1x1 2048 -> 512 at batch 256: 2.97 waves of its narrow tile, under TMA_MIN_WAVES
    assert not conv_config(12544, 512, 1, 2048, False, torch.float16, "cuda", h100, 32, True).TMA
    # the interpreter never picks it (its tests force it)
    assert not conv_config(802816, 64, 1, 256, False, torch.float16, "cpu", h100, 4, True).TMA


def test_tma_needs_aligned_operands():
    """A 1x1 conv whose input rows are not 16-byte aligned runs cp.async, even where the rule picks TMA."""
    dt = torch.float16
    packed = pack_conv_weight(torch.empty(64, 320, 1, 1, device="meta", dtype=dt))
    storage = torch.empty(256 * 56 * 56 * 320 + 4, device="meta", dtype=dt)
    x = storage[4:].view(256, 56, 56, 320).permute(0, 3, 1, 2)     # 8-byte offset: not 16-byte aligned
    assert x.is_contiguous(memory_format=CL)
    aligned = torch.empty(256, 320, 56, 56, device="meta", dtype=dt).contiguous(memory_format=CL)
    with record_launches() as calls:
        conv2d_nhwc_packed(x, packed, torch.empty(64, device="meta"), relu=True)
        conv2d_nhwc_packed(aligned, packed, torch.empty(64, device="meta"), relu=True)
    assert [c.constexprs["TMA"] for c in calls] == [False, True]


# ------------------------------------------------------------------------------------------------
# TMA behind a 3x3 (sm_90): spatial M tiles, one 4-D descriptor box per K step, zero fill = padding


@pytest.mark.parametrize("case", [
    # batch, C_in, C_out, H, W, (images, rows, columns) of a tile, BLOCK_N, BLOCK_K, dilation
    (3, 64, 64, 9, 13, (2, 4, 8), 64, 32, 1),      # resnet18 layer1 (2 channel blocks per tap); the third image,
                                                   # the bottom and right tiles half outside the output
    (1, 256, 256, 5, 6, (1, 8, 8), 128, 64, 1),    # resnet50 layer3 3x3 at 5x6: one tile, most rows masked
    (4, 128, 128, 7, 7, (4, 4, 4), 64, 64, 1),     # resnet18 layer2 at 7x7: 4 images a tile, every tile at a border
    (2, 64, 96, 6, 10, (1, 4, 16), 64, 64, 2),     # dilation 2 (padding 2): boxes 2 pixels outside; N tail
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_tma_spatial_tile_3x3_matches_the_reference(case, dtype, monkeypatch):
    """The TMA loop behind a stride-1 3x3 (what sm_90 runs for compute-bound ones: spatial M tiles,
    each K step one [images, rows, columns, BLOCK_K] descriptor box at (img0, oh0 + kh*d - p,
    ow0 + kw*d - p, c0) whose out-of-bounds zero fill, also at negative offsets, is the padding)
    under the interpreter, which runs the 4-D descriptor loads and their zero fill, with the bias,
    residual and ReLU epilogue, against F.conv2d in fp64. bf16: with the upcast dot (module docstring)."""
    batch, c_in, c_out, h, w, tile, block_n, block_k, dil = case
    if dtype == torch.bfloat16 and c_in > 64:
        pytest.skip("bf16 on the small shapes (the same loop)")
    block_m = math.prod(tile)
    monkeypatch.setattr(conv_module, "conv_config", lambda *args, **kwargs: conv_module.ConvConfig(
        block_m, block_n, block_k, 4, 4, 2, TMA=True, TILE=tile))
    x, weight, b, r = _make_problem(batch, c_in, c_out, h, w, 3, 1, dil, dil, 1, dtype, bias=True, residual=True)
    conv = dict(padding=dil, dilation=dil)
    with record_launches() as calls:
        conv2d_nhwc(x, weight, b, residual=r, relu=True, **conv)
    (call,) = calls
    assert call.constexprs["TMA"] and (call.constexprs["TILE_IMGS"], call.constexprs["TILE_H"],
                                       call.constexprs["TILE_W"]) == tile
    desc = call.args["x_desc"]
    assert tuple(desc.shape) == (batch, h, w, c_in) and list(desc.block_shape) == [*tile, block_k]
    m_tiles = math.ceil(batch / tile[0]) * math.ceil(h / tile[1]) * math.ceil(w / tile[2])
    assert call.grid == (m_tiles * math.ceil(c_out / block_n),)
    out = conv2d_nhwc(x, weight, b, residual=r, relu=True, **conv)
    ref64 = F.conv2d(_double(x), _double(weight), _double(b), padding=dil, dilation=dil).add_(_double(r)).relu_()
    torch_out = None if dtype == torch.float32 else conv2d_nhwc_ref(x, weight, b, residual=r, relu=True, **conv)
    _assert_close_to_reference(out, torch_out, ref64, dtype, c_in * 9, what=f"TMA 3x3 {case}")


def test_tma_spatial_tile_with_strided_residual_and_second_output(monkeypatch):
    """The epilogue terms that read the tile's (image, row, column) rather than its linear pixel: the
    CIFAR option-A residual (stride 2, channel offset) and the second affine output."""
    tile = (2, 2, 16)
    monkeypatch.setattr(conv_module, "conv_config", lambda *args, **kwargs: conv_module.ConvConfig(
        64, 64, 32, 4, 4, 2, TMA=True, TILE=tile))
    x, weight, b, _ = _make_problem(3, 32, 64, 5, 9, 3, 1, 1, 1, 1, torch.float32, bias=True, residual=False)
    gen = torch.Generator().manual_seed(1)
    res = channels_last(torch.randn(3, 32, 9, 17, generator=gen)).to(DEVICE)
    scale, shift = (torch.randn(64, generator=gen).to(DEVICE) for _ in range(2))
    packed = pack_conv_weight(weight)
    out, out2 = conv2d_nhwc_packed(x, packed, b, padding=1, residual=res, residual_stride=2,
                                   residual_channel_offset=16, relu=True, affine2=(scale, shift), affine2_relu=True)
    ref, ref2 = conv2d_nhwc_ref(_double(x), _double(weight), _double(b), padding=1, residual=_double(res),
                                residual_stride=2, residual_channel_offset=16, relu=True,
                                affine2=(_double(scale), _double(shift)), affine2_relu=True)
    _assert_close_to_reference(out, None, ref, torch.float32, 32 * 9, what="TMA 3x3 strided residual")
    _assert_close_to_reference(out2, None, ref2, torch.float32, 32 * 9, what="TMA 3x3 out2")


def test_spatial_tile_covers_the_output_with_the_fewest_idle_rows():
    from fastres.kernels.conv2d_nhwc import spatial_tile
    assert spatial_tile(128, 256, 56, 56) == ((2, 8, 8), 1.0)       # resnet18 layer1: 8x8 pixels of 2 images
    assert spatial_tile(128, 256, 28, 28) == ((8, 4, 4), 1.0)
    assert spatial_tile(128, 256, 14, 14) == ((32, 2, 2), 1.0)
    assert spatial_tile(128, 256, 7, 7) == ((128, 1, 1), 1.0)       # 7 is prime: one pixel of 128 images
    tile, fill = spatial_tile(128, 1, 14, 14)                        # one image of 14x14: 196 of 256 rows
    assert math.prod(tile) == 128 and fill == pytest.approx(196 / 256)


def test_tma_rule_picks_compute_bound_3x3_convs_whose_tiles_fit_on_sm90_only():
    from fastres.kernels._target import TARGETS
    h100, a100 = TARGETS[90], TARGETS[80]
    fp16 = torch.float16
    # resnet18/34 at batch 256: layer1 3x3 64->64 at 56x56 (6272 programs), layer2 128->128 at 28x28
    cfg = conv_config(802816, 64, 1, 64, False, fp16, "cuda", h100, 9, False, (256, 56, 56, 9))
    assert cfg.TMA and cfg.TILE == (2, 8, 8) and cfg.BLOCK_M == 128
    assert conv_config(200704, 128, 1, 128, False, fp16, "cuda", h100, 18, False, (256, 28, 28, 9)).TILE == (8, 4, 4)
    # the same on sm_80, in fp32, without a spatial description (stride 2 etc.): cp.async
    assert not conv_config(802816, 64, 1, 64, False, fp16, "cuda", a100, 9, False, (256, 56, 56, 9)).TMA
    assert not conv_config(802816, 64, 1, 64, False, torch.float32, "cuda", h100, 9, False, (256, 56, 56, 9)).TMA
    assert not conv_config(802816, 64, 1, 64, False, fp16, "cuda", h100, 9, False).TMA
    # resnet50 layer3 3x3 at batch 256: its tiles fit (32 images of 2x2) but make 2.97 waves, under TMA_MIN_WAVES
    assert not conv_config(50176, 256, 1, 256, False, fp16, "cuda", h100, 36, False, (256, 14, 14, 9)).TMA
    # many waves, but the best box leaves more than 5% of its rows idle (13x13 images, batch 100)
    assert conv_module.spatial_tile(128, 100, 13, 13)[1] < conv_module.TMA_MIN_TILE_FILL
    assert not conv_config(100 * 169, 64, 1, 64, False, fp16, "cuda", h100, 9, False, (100, 13, 13, 9)).TMA
    # K = 9 x 16 < TMA_MIN_K (the CIFAR ResNets' first stage)
    assert not conv_config(802816, 16, 1, 16, False, fp16, "cuda", h100, 9, False, (256, 56, 56, 9)).TMA


def test_tma_spatial_tile_is_recorded_only_where_it_can_run():
    """Stride 2, a projection shortcut, groups and unaligned input rows keep cp.async where the rule
    would otherwise pick a spatial tile; a stride-1 3x3 at batch 256 over 56x56 gets it."""
    meta = dict(device="meta", dtype=torch.float16)
    x = torch.empty(256, 64, 56, 56, **meta).contiguous(memory_format=CL)
    packed = pack_conv_weight(torch.empty(64, 64, 3, 3, **meta))
    storage = torch.empty(256 * 56 * 56 * 64 + 4, **meta)
    unaligned = storage[4:].view(256, 56, 56, 64).permute(0, 3, 1, 2)
    bias = torch.empty(64, device="meta")
    with record_launches() as calls:
        conv2d_nhwc_packed(x, packed, bias, padding=1, relu=True)
        conv2d_nhwc_packed(unaligned, packed, bias, padding=1, relu=True)
        conv2d_nhwc_packed(torch.empty(256, 64, 112, 112, **meta).contiguous(memory_format=CL), packed, bias,
                           stride=2, padding=1, relu=True)
        conv2d_nhwc_packed(x, pack_conv_weight(torch.empty(64, 2, 3, 3, **meta), groups=32), bias, padding=1)
    assert [c.constexprs["TMA"] for c in calls] == [True, False, False, False]
    assert [c.constexprs["TILE_IMGS"] for c in calls] == [2, 0, 0, 0]


def test_weight_descriptor_is_reused_only_while_the_weight_tensor_is_the_same():
    """TMA launches take the weight's TensorDescriptor from the packed weight's cache (built once per
    block shape), guarded by everything the descriptor encodes: device, pointer, shape, strides and
    dtype; x's is built per launch without a view, the same descriptor as from_tensor of x's NHWC view."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    packed = pack_conv_weight(torch.randn(64, 32, 3, 3))
    d = packed.tma_descriptor((64, 64))
    assert packed.tma_descriptor((64, 64)) is d and d.base is packed.weight and list(d.block_shape) == [64, 64]
    assert list(packed.tma_descriptor((32, 64)).block_shape) == [32, 64] and packed.tma_descriptor((64, 64)) is d
    pitched = torch.zeros(288, 128)
    for replace in (lambda w: w.clone(),                                    # another pointer
                    lambda w: w.to(torch.float16),                          # dtype
                    lambda w: w.reshape(-1)[:w.numel() // 2].view(-1, 64),  # same pointer, another shape
                    lambda w: pitched[:, :64],                              # rows 128 apart
                    lambda w: pitched.view(-1)[:288 * 64].view(288, 64)):   # same pointer and shape, rows 64 apart
        packed.weight = replace(packed.weight)
        new = packed.tma_descriptor((64, 64))
        assert new is not d and new.base is packed.weight
        assert (list(new.shape), list(new.strides)) == (list(packed.weight.shape), list(packed.weight.stride()))
        d = new

    x = channels_last(torch.randn(2, 64, 5, 7))
    ref = TensorDescriptor.from_tensor(x.permute(0, 2, 3, 1), [1, 4, 4, 32])
    cfg = conv_module.ConvConfig(16, 64, 32, 1, 4, 2, TMA=True, TILE=(1, 4, 4))
    descs = conv_module._tma_descriptors(x, pack_conv_weight(torch.randn(64, 64, 3, 3)), cfg)
    got = descs["x_desc"]
    assert (got.base.data_ptr(), list(got.shape), list(got.strides), list(got.block_shape)) == \
        (ref.base.data_ptr(), list(ref.shape), list(ref.strides), list(ref.block_shape))
    ref2d = TensorDescriptor.from_tensor(x.permute(0, 2, 3, 1).reshape(-1, 64), [16, 32])
    got2d = conv_module._tma_descriptors(x, pack_conv_weight(torch.randn(64, 64, 1, 1)),
                                         conv_module.ConvConfig(16, 64, 32, 1, 4, 2, TMA=True))["x_desc"]
    assert (list(got2d.shape), list(got2d.strides)) == (list(ref2d.shape), list(ref2d.strides))


def test_repeated_tma_launches_share_the_weight_descriptor():
    meta = dict(device="meta", dtype=torch.float16)
    x = torch.empty(256, 64, 56, 56, **meta).contiguous(memory_format=CL)
    packed = pack_conv_weight(torch.empty(64, 64, 3, 3, **meta))
    with record_launches() as calls:
        for _ in range(2):
            conv2d_nhwc_packed(x, packed, torch.empty(64, device="meta"), padding=1, relu=True)
    assert calls[0].constexprs["TMA"] and calls[0].args["w_desc"] is calls[1].args["w_desc"]
    assert calls[0].args["x_desc"] is not calls[1].args["x_desc"]
