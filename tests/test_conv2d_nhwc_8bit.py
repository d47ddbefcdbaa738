"""The 8-bit variant of the implicit-GEMM conv (QUANTIZED) against its integer reference.

Runs the real Triton kernel: on CUDA tensors when a GPU is present, otherwise under the Triton
interpreter (``TRITON_INTERPRET=1``), where int8 x int8 -> int32 and e4m3 x e4m3 -> fp32 ``tl.dot``
are exact products. ``conv2d_nhwc_8bit_ref`` accumulates exactly (float64) and runs the same fp32
epilogue operations in the same order, so:

* int8 outputs are bit-exact, on every ResNet conv shape (read off torchvision's models) and odd ones;
* fp8 (e4m3) outputs are within one e4m3 ulp (the kernel's fp32 accumulation is rounded, the
  reference's exact), and almost all of them equal;
* ties round half to even (a float -> int conversion truncates: the test shows that would differ),
  and both formats saturate;
* the fused 3x3 -> 1x1 (``conv3x3_conv1x1_nhwc`` with 8-bit operands, the mid tile requantized in
  registers) equals the two 8-bit reference convs in sequence (int8 bit for bit, e4m3 within one ulp)
  on resnet50's pair shapes at small spatial sizes and odd ones.
The AOT test compiles the 8-bit kernels for sm_80 (int8) and sm_90 (int8, e4m3): no spills, and the
main loops issue IMMA / IGMMA .S8 / QGMMA .E4M3.
"""
import math

import pytest
import torch
from kernel_testing import DEVICE, ON_CUDA, channels_last, skip_if_compiled_without_gpu, skip_without_gpu_or_interpreter

skip_without_gpu_or_interpreter("the Triton 8-bit conv kernel")

from test_conv2d_nhwc import RESNET_CONV_SHAPES, _shape_id  # noqa: E402

from fastres import aot  # noqa: E402
from fastres.kernels import conv2d_nhwc as conv_module  # noqa: E402
from fastres.kernels._launch import record_launches  # noqa: E402
from fastres.kernels.avgpool_linear import (avgpool_linear_8bit_packed, avgpool_linear_8bit_ref,  # noqa: E402
                                            pack_linear_weight)
from fastres.kernels.max_pool2d_nhwc import max_pool2d_nhwc, max_pool2d_nhwc_ref  # noqa: E402
from fastres.kernels.conv2d_nhwc import (QuantEpilogue, conv2d_nhwc_8bit_ref, conv2d_nhwc_packed,  # noqa: E402
                                         pack_conv_weight, pack_stem_weight, stem_input_padding)
from fastres.kernels import conv3x3_conv1x1_nhwc as fused_module  # noqa: E402
from fastres.kernels.conv3x3_conv1x1_nhwc import (FUSED_CONFIGS, conv3x3_conv1x1_nhwc_8bit_ref,  # noqa: E402
                                                  conv3x3_conv1x1_nhwc_packed, fit_config, fuses_conv3x3_conv1x1,
                                                  pack_conv3x3_conv1x1)

skip_if_compiled_without_gpu(conv_module._conv2d_nhwc_kernel)

INT8, E4M3 = torch.int8, torch.float8_e4m3fn


@pytest.fixture(autouse=True)
def _e4m3_needs_sm89(request):
    """On a GPU, e4m3 cases need fp8 tensor cores (sm_89+); the interpreter runs them anywhere."""
    callspec = getattr(request.node, "callspec", None)
    uses_e4m3 = "e4m3" in request.node.name or (callspec is not None and E4M3 in callspec.params.values())
    if ON_CUDA and uses_e4m3 and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("e4m3 tl.dot needs sm_89+")


def fp32(v: float) -> float:
    """The scalars a kernel takes are fp32 values."""
    return float(torch.tensor(v, dtype=torch.float32))


def _rand8(shape, dtype, gen, *, weight=False):
    """Random 8-bit values: int8 over the whole range (weights [-127, 127]); e4m3 from a normal
    distribution spread over many binades."""
    if dtype == INT8:
        return torch.randint(-127 if weight else -128, 128, shape, generator=gen, dtype=torch.int8)
    return (torch.randn(shape, generator=gen) * (1.0 if weight else 8.0)).to(E4M3)


def _problem(batch, c_in, c_out, h, w, k, stride, padding, dilation, groups, dtype, *, residual, shortcut=0,
             out_dtype=None, residual_shape=None, seed=0):
    """(x, weight, bias, quant, residual, shortcut, shortcut_weight) with the scales set so that the
    output spreads over the 8-bit range (a few percent saturate)."""
    gen = torch.Generator().manual_seed(seed)
    x = channels_last(_rand8((batch, c_in, h, w), dtype, gen))
    weight = _rand8((c_out, c_in // groups, k, k), dtype, gen, weight=True)
    k_len = c_in // groups * k * k + shortcut
    spread = (74.0 * 74.0 if dtype == INT8 else 8.0) * math.sqrt(k_len)    # ~ std of the accumulator
    acc_scale = ((0.5 + torch.rand(c_out, generator=gen)) / spread).float()
    bias = torch.randn(c_out, generator=gen)
    oh = (h + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    ow = (w + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    r = None
    if residual:
        r = channels_last(_rand8(residual_shape or (batch, c_out, oh, ow), dtype, gen))
    sc = sc_w = None
    if shortcut:
        sc = channels_last(_rand8((batch, shortcut, (oh - 1) * stride + 1, (ow - 1) * stride + 1), dtype, gen))
        sc_w = _rand8((c_out, shortcut, 1, 1), dtype, gen, weight=True)
    out_dtype = out_dtype or dtype
    quant = QuantEpilogue(acc_scale, out_dtype,
                          out_inv_scale=fp32(30.0 if dtype == INT8 else 60.0) if out_dtype == dtype else None,
                          residual_scale=fp32(0.02 if dtype == INT8 else 0.1) if residual else None)
    move = lambda t: t.to(DEVICE) if t is not None else None  # noqa: E731
    return (move(x), move(weight), move(bias), _on_device(quant), move(r), move(sc), move(sc_w))


def _on_device(quant):
    return QuantEpilogue(quant.acc_scale.to(DEVICE), quant.out_dtype, quant.out_inv_scale, quant.residual_scale)


def _e4m3_codes(t):
    """e4m3 values as ordered integers (adjacent values differ by 1; +0 and -0 are both 0)."""
    bits = t.view(torch.uint8).to(torch.int16)
    magnitude = bits & 0x7F
    return torch.where(bits >= 0x80, -magnitude, magnitude)


def _assert_matches(out, ref, *, what, allow_e4m3_ulp=True):
    assert out.dtype == ref.dtype and out.shape == ref.shape, what
    assert out.is_contiguous(memory_format=torch.channels_last), f"{what}: output must be channels_last"
    out, ref = out.cpu(), ref.cpu()
    if out.dtype == INT8:
        assert torch.equal(out, ref), (f"{what}: int8 output not bit-exact: {(out != ref).sum().item()} of "
                                       f"{out.numel()} differ, by up to {(out.int() - ref.int()).abs().max().item()}")
        assert out.unique().numel() > 64, f"{what}: the test's outputs do not spread over the int8 range"
    elif out.dtype == E4M3:
        diff = (_e4m3_codes(out) - _e4m3_codes(ref)).abs()
        assert diff.max() <= (1 if allow_e4m3_ulp else 0), f"{what}: e4m3 output more than one ulp off"
        assert (diff == 0).float().mean() >= 0.99, f"{what}: {(diff != 0).sum().item()} e4m3 values one ulp off"
    else:
        tol = 1e-6 * ref.abs().max().item()      # fp32 accumulator of e4m3 products; int32 -> fp32 is exact
        assert (out.double() - ref.double()).abs().max() <= tol, f"{what}: float output differs"


def _check(batch, c_in, c_out, h, w, k, stride, padding, dilation, groups, dtype, *, residual, relu, seed=0,
           out_dtype=None):
    x, weight, bias, quant, r, _, _ = _problem(batch, c_in, c_out, h, w, k, stride, padding, dilation, groups, dtype,
                                               residual=residual, out_dtype=out_dtype, seed=seed)
    conv = dict(stride=stride, padding=padding, dilation=dilation)
    out = conv2d_nhwc_packed(x, pack_conv_weight(weight, groups=groups), bias, residual=r, relu=relu, quant=quant,
                             **conv)
    ref = conv2d_nhwc_8bit_ref(x, weight, bias, quant, groups=groups, residual=r, relu=relu, **conv)
    _assert_matches(out, ref, what=f"{dtype} conv {c_in}->{c_out} k{k} s{stride} p{padding} d{dilation} g{groups}")


# ------------------------------------------------------------------------------------------------
# Every ResNet conv shape, int8 and (on the shapes reaching each K mode) e4m3

_E4M3_SHAPES = [(3, 64, 7, 2, 3, 1, 1), (256, 64, 1, 1, 0, 1, 1), (128, 128, 3, 2, 1, 1, 1),
                (128, 128, 3, 1, 1, 1, 32), (256, 256, 3, 1, 2, 2, 1), (512, 1024, 1, 2, 0, 1, 1)]
_CASES = [(s, INT8) for s in RESNET_CONV_SHAPES] + [(s, E4M3) for s in _E4M3_SHAPES]


@pytest.mark.parametrize("shape,dtype", _CASES, ids=[f"{_shape_id(s)}-{str(d)[6:]}" for s, d in _CASES])
def test_resnet_conv_shapes(shape, dtype):
    c_in, c_out, k, stride, padding, dilation, groups = shape
    index = RESNET_CONV_SHAPES.index(shape) if shape in RESNET_CONV_SHAPES else 0
    residual, relu = [(False, True), (True, True), (False, False), (True, False)][index % 4]
    h, w = (13, 11) if c_in == 3 else (5, 6)
    _check(2, c_in, c_out, h, w, k, stride, padding, dilation, groups, dtype, residual=residual, relu=relu, seed=index)


@pytest.mark.parametrize("dtype", [INT8, E4M3])
@pytest.mark.parametrize("batch,h,w,c_in,c_out,k,stride,padding,dilation,groups", [
    (1, 7, 7, 64, 64, 3, 1, 1, 1, 1),
    (3, 13, 13, 64, 128, 3, 2, 1, 1, 1),      # M = 147 per image: masked M tail
    (3, 13, 7, 256, 512, 1, 1, 0, 1, 1),      # 1x1 plain GEMM, H != W
    (1, 7, 13, 128, 256, 1, 2, 0, 1, 1),      # 1x1 stride 2 (an unfused downsample)
    (1, 13, 7, 512, 512, 3, 2, 1, 1, 32),     # 16 channels per group: FLAT_K for 8-bit (tl.dot K >= 32)
    (1, 7, 9, 256, 256, 3, 1, 1, 1, 8),       # 32 channels per group: tap-major
    (1, 7, 9, 48, 40, 3, 1, 1, 1, 1),         # channels not multiples of 32: FLAT_K
    (2, 5, 6, 40, 24, 1, 1, 0, 1, 1),         # 1x1 plain GEMM with a masked K tail
    (1, 9, 9, 32, 32, 5, 2, 2, 1, 1),         # a 5x5 kernel
])
def test_odd_shapes(dtype, batch, h, w, c_in, c_out, k, stride, padding, dilation, groups):
    _check(batch, c_in, c_out, h, w, k, stride, padding, dilation, groups, dtype, residual=True, relu=True)


@pytest.mark.parametrize("dtype", [INT8, E4M3])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_float_output(dtype, out_dtype):
    """The last step before a float consumer: the fp32 epilogue value, rounded once to out_dtype."""
    _check(2, 64, 64, 7, 5, 3, 1, 1, 1, 1, dtype, residual=True, relu=True, out_dtype=out_dtype)


@pytest.mark.parametrize("dtype", [INT8, E4M3])
@pytest.mark.parametrize("k,stride,c_in,c_sc", [(1, 1, 64, 64), (1, 1, 64, 256), (3, 2, 64, 64), (1, 2, 128, 64),
                                                (3, 1, 48, 40)])
def test_concat_k_shortcut(dtype, k, stride, c_in, c_sc):
    """The projection shortcut as concatenated K (one accumulator, one acc_scale): behind a 1x1
    (one K loop, ``dot_concat_k``) and behind a 3x3 (a second loop)."""
    c_out = 128
    x, weight, bias, quant, _, sc, sc_w = _problem(2, c_in, c_out, 7, 6, k, stride, k // 2, 1, 1, dtype,
                                                   residual=False, shortcut=c_sc)
    packed = pack_conv_weight(weight, shortcut_weight=sc_w)
    out = conv2d_nhwc_packed(x, packed, bias, stride=stride, padding=k // 2, relu=True, shortcut=sc,
                             shortcut_stride=stride, quant=quant)
    ref = conv2d_nhwc_8bit_ref(x, weight, bias, quant, stride=stride, padding=k // 2, relu=True, shortcut=sc,
                               shortcut_weight=sc_w, shortcut_stride=stride)
    _assert_matches(out, ref, what=f"{dtype} concat-K k{k} s{stride} + shortcut {c_sc}")


@pytest.mark.parametrize("dtype", [INT8, E4M3])
def test_strided_residual_into_channel_offset(dtype):
    """CIFAR option A: the residual read at stride 2 into channels [8, 24) of 32, dequantized by its scale."""
    x, weight, bias, quant, r, _, _ = _problem(2, 32, 32, 8, 8, 3, 2, 1, 1, 1, dtype, residual=True,
                                               residual_shape=(2, 16, 8, 8))
    packed = pack_conv_weight(weight)
    out = conv2d_nhwc_packed(x, packed, bias, stride=2, padding=1, relu=True, residual=r, residual_stride=2,
                             residual_channel_offset=8, quant=quant)
    ref = conv2d_nhwc_8bit_ref(x, weight, bias, quant, stride=2, padding=1, relu=True, residual=r, residual_stride=2,
                               residual_channel_offset=8)
    _assert_matches(out, ref, what="strided residual")


@pytest.mark.parametrize("dtype", [INT8, E4M3])
@pytest.mark.parametrize("batch,h,w", [(1, 16, 16), (3, 13, 7)])
def test_row_k_stem(dtype, batch, h, w):
    """The stem over its zero-bordered 4-channel input (ROW_K): equal to the padded 3-channel conv."""
    x, weight, bias, quant, _, _, _ = _problem(batch, 3, 64, h, w, 7, 2, 3, 1, 1, dtype, residual=False)
    top, bottom, left, right = stem_input_padding(h, w, 3, 2)
    bordered = torch.zeros(batch, h + top + bottom, w + left + right, 4, dtype=dtype, device=x.device)
    bordered[:, top:top + h, left:left + w, :3] = x.permute(0, 2, 3, 1)
    bordered = bordered.permute(0, 3, 1, 2)
    out = conv2d_nhwc_packed(bordered, pack_stem_weight(weight), bias, stride=2, padding=0, relu=True, quant=quant)
    ref = conv2d_nhwc_8bit_ref(x, weight, bias, quant, stride=2, padding=3, relu=True)
    _assert_matches(out, ref, what="ROW_K stem")


# ------------------------------------------------------------------------------------------------
# Rounding and saturation


def _epilogue_only(bias, dtype, *, out_inv_scale=1.0, acc=None):
    """A 1x1 conv whose output is q(acc + bias) with acc_scale 1: acc from x[..., 0] * w[:, 0] = x[..., 0]."""
    c_out = bias.numel()
    n_pix = 1 if acc is None else acc.numel()
    x = torch.zeros(1, 32, 1, n_pix, dtype=dtype)
    if acc is not None:
        x[0, 0, 0] = acc.to(dtype)
    weight = torch.zeros(c_out, 32, 1, 1, dtype=dtype)
    weight[:, 0] = torch.tensor(1, dtype=dtype) if dtype == INT8 else torch.tensor(1.0).to(dtype)
    quant = QuantEpilogue(torch.ones(c_out, device=DEVICE), dtype, out_inv_scale=fp32(out_inv_scale))
    x, weight, bias = channels_last(x).to(DEVICE), weight.to(DEVICE), bias.float().to(DEVICE)
    out = conv2d_nhwc_packed(x, pack_conv_weight(weight), bias, quant=quant)
    ref = conv2d_nhwc_8bit_ref(x, weight, bias, quant)
    return out.cpu(), ref.cpu()


def test_int8_ties_round_half_to_even():
    acc = torch.arange(-12, 13, dtype=torch.float32)            # exact integers
    bias = torch.tensor([0.5, -0.5] * 8)                         # every output an exact tie
    out, ref = _epilogue_only(bias, INT8, acc=acc)
    exact = acc.view(-1, 1) + bias.view(1, -1)                   # [pixels, channels]
    got = out[0, :, 0, :].t().float()
    assert torch.equal(got, torch.round(exact)), "ties must round half to even"
    assert torch.equal(out, ref)
    truncated, away = exact.trunc(), torch.sign(exact) * torch.floor(exact.abs() + 0.5)
    assert not torch.equal(got, truncated) and not torch.equal(got, away)   # the test can tell them apart


def test_int8_saturates():
    bias = torch.tensor([127.49, 127.5, 128.0, 1e6, -128.49, -128.5, -129.0, -1e6] * 2)
    out, ref = _epilogue_only(bias, INT8)
    assert out.flatten().tolist() == [127, 127, 127, 127, -128, -128, -128, -128] * 2
    assert torch.equal(out, ref)


def test_e4m3_rounding_and_saturation():
    """Nearest-even to e4m3 (ties, subnormals, saturation at +-448) of many values, as torch rounds."""
    ties = [1.0625, 1.1875, -1.0625, 1.5 * 2**-9, 2.5 * 2**-9, 0.5 * 2**-9, 2**-10, 464.0, 470.0, 1e5, -1e5,
            0.0, -2**-6 + 2**-12, 2**-6 - 2**-11]
    gen = torch.Generator().manual_seed(0)
    spread = torch.randn(1024 - len(ties), generator=gen) * torch.exp2(torch.randint(-12, 10, (1024 - len(ties),),
                                                                                     generator=gen).float())
    values = torch.cat([torch.tensor(ties), spread])
    out, ref = _epilogue_only(values, E4M3)
    expected = values.clamp(-448, 448).to(E4M3)
    assert torch.equal(out.flatten().view(torch.uint8), expected.view(torch.uint8)), \
        "e4m3 output must be the nearest-even value, saturated at 448"
    assert torch.equal(out.view(torch.uint8), ref.view(torch.uint8))


def test_reference_implements_the_documented_math():
    """The integer reference ~ the float conv of the dequantized operands, requantized."""
    x, weight, bias, quant, r, _, _ = _problem(2, 64, 64, 6, 6, 3, 1, 1, 1, 1, INT8, residual=True)
    ref = conv2d_nhwc_8bit_ref(x, weight, bias, quant, padding=1, relu=True, residual=r).cpu()
    s_w = quant.acc_scale.cpu().double()        # x scale 1: acc_scale is the weight scale
    y = torch.nn.functional.conv2d(x.cpu().double(), weight.cpu().double() * s_w.view(-1, 1, 1, 1), padding=1)
    y = (y + bias.cpu().double().view(1, -1, 1, 1) + r.cpu().double() * quant.residual_scale).relu()
    expected = (y * quant.out_inv_scale).clamp(-128, 127)
    assert (ref.double() - expected).abs().max() <= 0.5 + 1e-4


def test_launch_disables_fma_contraction_and_names_the_dtype():
    x, weight, bias, quant, r, _, _ = _problem(1, 64, 64, 4, 4, 3, 1, 1, 1, 1, INT8, residual=True)
    meta = lambda t: torch.empty_like(t, device="meta")  # noqa: E731
    with record_launches() as calls:
        conv2d_nhwc_packed(meta(x), pack_conv_weight(meta(weight)), meta(bias), padding=1, residual=meta(r),
                           quant=QuantEpilogue(meta(quant.acc_scale), INT8, 1.0, 1.0))
    (call,) = calls
    assert call.options == {"enable_fp_fusion": False}
    assert call.name.endswith("/int8]") and call.constexprs["QUANTIZED"] and call.constexprs["SPLIT_K"] == 1


def test_bad_quant_arguments_are_refused():
    x, weight, bias, quant, r, _, _ = _problem(1, 32, 32, 4, 4, 1, 1, 0, 1, 1, INT8, residual=True)
    packed = pack_conv_weight(weight)
    with pytest.raises(TypeError, match="needs quant=QuantEpilogue"):
        conv2d_nhwc_packed(x, packed, bias)
    with pytest.raises(ValueError, match="residual_scale must be given exactly"):
        conv2d_nhwc_packed(x, packed, bias, quant=quant)
    with pytest.raises(ValueError, match="out_inv_scale must be given exactly"):
        conv2d_nhwc_packed(x, packed, bias, residual=r, quant=QuantEpilogue(quant.acc_scale, INT8, None, 1.0))
    with pytest.raises(TypeError, match="out_dtype must be x's dtype"):      # (e4m3 from int8 is allowed)
        conv2d_nhwc_packed(x, packed, bias, residual=r, quant=QuantEpilogue(quant.acc_scale, torch.uint8, 1.0, 1.0))
    with pytest.raises(ValueError, match="quant.acc_scale must be a float"):
        conv2d_nhwc_packed(x, packed, bias, residual=r, quant=QuantEpilogue(quant.acc_scale[:3], INT8, 1.0, 1.0))


# ------------------------------------------------------------------------------------------------
# The stem pool and the head on 8-bit maps


@pytest.mark.parametrize("dtype", [INT8, E4M3])
@pytest.mark.parametrize("batch,c,h,w", [(2, 64, 16, 16), (1, 40, 13, 7)])
def test_max_pool_on_8bit_values(dtype, batch, c, h, w):
    """Bit-exact, negative values at the border included (the padding is -inf, not a loaded 0)."""
    gen = torch.Generator().manual_seed(0)
    x = channels_last(_rand8((batch, c, h, w), dtype, gen))
    x = channels_last((-x.float().abs()).to(dtype)).to(DEVICE)      # all <= 0: a 0 pad would win
    out = max_pool2d_nhwc(x)
    ref = max_pool2d_nhwc_ref(x)
    assert out.dtype == dtype and torch.equal(out.cpu().view(torch.uint8), ref.cpu().view(torch.uint8))


@pytest.mark.parametrize("dtype", [INT8, E4M3])
@pytest.mark.parametrize("batch,c,hw,classes", [(3, 512, 7, 10), (1, 2048, 4, 1000)])
def test_head_on_8bit_map(dtype, batch, c, hw, classes):
    """Average pool + Linear of an 8-bit map in fp32, the activation scale folded into the weight."""
    gen = torch.Generator().manual_seed(0)
    x = channels_last(_rand8((batch, c, hw, hw), dtype, gen)).to(DEVICE)
    weight = (torch.randn(classes, c, generator=gen) / math.sqrt(c) * 0.01).to(DEVICE)
    bias = torch.randn(classes, generator=gen).to(DEVICE)
    out = avgpool_linear_8bit_packed(x, pack_linear_weight(weight), bias)
    ref = avgpool_linear_8bit_ref(x, weight, bias)
    assert out.dtype == torch.float32 and out.shape == (batch, classes)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


# ------------------------------------------------------------------------------------------------
# The fused 3x3 -> 1x1 (fastres.quantize's qconv_pair) against the two reference convs in sequence


def _pair_problem(batch, c_in, c_mid, c_out, h, w, stride, dilation, dtype, *, residual, c_sc, seed=0):
    """(y1, weights, biases, quant_mid, quant, residual, shortcut, shortcut weight) of a fused pair,
    both requantizations spread over the 8-bit range."""
    gen = torch.Generator().manual_seed(seed)
    y1 = channels_last(_rand8((batch, c_in, h, w), dtype, gen))
    w_mid = _rand8((c_mid, c_in, 3, 3), dtype, gen, weight=True)
    w_out = _rand8((c_out, c_mid, 1, 1), dtype, gen, weight=True)
    spread = lambda k: (74.0 * 74.0 if dtype == INT8 else 8.0) * math.sqrt(k)  # noqa: E731
    out_inv_scale = fp32(30.0 if dtype == INT8 else 60.0)
    quant_mid = QuantEpilogue(((0.5 + torch.rand(c_mid, generator=gen)) / spread(9 * c_in)).float(), dtype,
                              out_inv_scale=out_inv_scale)
    oh = (h + 2 * dilation - 2 * dilation - 1) // stride + 1
    ow = (w + 2 * dilation - 2 * dilation - 1) // stride + 1
    r = channels_last(_rand8((batch, c_out, oh, ow), dtype, gen)) if residual else None
    sc = channels_last(_rand8((batch, c_sc, h, w), dtype, gen)) if c_sc else None
    sc_w = _rand8((c_out, c_sc, 1, 1), dtype, gen, weight=True) if c_sc else None
    quant = QuantEpilogue(((0.5 + torch.rand(c_out, generator=gen)) / spread(c_mid + c_sc)).float(), dtype,
                          out_inv_scale=out_inv_scale, residual_scale=fp32(0.02 if dtype == INT8 else 0.1)
                          if residual else None)
    b_mid, b_out = torch.randn(c_mid, generator=gen), torch.randn(c_out, generator=gen)
    move = lambda t: t.to(DEVICE) if t is not None else None  # noqa: E731
    return (move(y1), move(w_mid), move(w_out), move(b_mid), move(b_out), _on_device(quant_mid), _on_device(quant),
            move(r), move(sc), move(sc_w))


def _check_pair(batch, c_in, c_mid, c_out, h, w, stride, dilation, dtype, *, residual, c_sc, seed=0):
    y1, w_mid, w_out, b_mid, b_out, quant_mid, quant, r, sc, sc_w = _pair_problem(
        batch, c_in, c_mid, c_out, h, w, stride, dilation, dtype, residual=residual, c_sc=c_sc, seed=seed)
    conv = dict(stride=stride, padding=dilation, dilation=dilation)
    packed = pack_conv3x3_conv1x1(w_mid, w_out, shortcut_weight=sc_w)
    assert packed.mid.weight.stride() == (1, 9 * c_in) and packed.out.weight.stride() == (1, c_mid + c_sc)  # K-major
    out = conv3x3_conv1x1_nhwc_packed(y1, packed, b_mid, b_out, residual=r, shortcut=sc, shortcut_stride=stride,
                                      quant_mid=quant_mid, quant=quant, **conv)
    ref = conv3x3_conv1x1_nhwc_8bit_ref(y1, w_mid, b_mid, w_out, b_out, quant_mid, quant, groups=1, residual=r,
                                        shortcut=sc, shortcut_weight=sc_w, shortcut_stride=stride, **conv)
    _assert_matches(out, ref, what=f"{dtype} pair {c_in}->{c_mid}->{c_out} s{stride} d{dilation} sc{c_sc}")


# resnet50's fused blocks (layer1-2: 3x3 input, mid, output, stride, shortcut channels), then odd ones
_PAIR_CASES = [
    (2, 64, 64, 256, 8, 8, 1, 1, True, 0),        # layer1.1-2: same-shape residual
    (1, 64, 64, 256, 7, 9, 1, 1, False, 64),      # layer1.0: projection shortcut at stride 1, H != W
    (1, 128, 128, 512, 9, 9, 2, 1, False, 256),   # layer2.0: stride 2, shortcut 256 at stride 2
    (3, 128, 128, 512, 5, 6, 1, 1, True, 0),      # layer2.1-3, batch 3
    (1, 32, 32, 80, 13, 7, 1, 2, False, 80),      # the narrowest 8-bit mid, dilation 2, masked shortcut K tail
]


@pytest.mark.parametrize("dtype", [INT8, E4M3])
@pytest.mark.parametrize("batch,c_in,c_mid,c_out,h,w,stride,dilation,residual,c_sc", _PAIR_CASES)
def test_fused_pair(dtype, batch, c_in, c_mid, c_out, h, w, stride, dilation, residual, c_sc):
    _check_pair(batch, c_in, c_mid, c_out, h, w, stride, dilation, dtype, residual=residual, c_sc=c_sc)


@pytest.mark.parametrize("config_name", ["tc", "tc_small_m"])
def test_fused_pair_gpu_tiles(config_name, monkeypatch):
    """The GPU tiles under the interpreter: several M tiles with a masked tail, 64-column output
    chunks with a masked last one (C_out 320)."""
    config = FUSED_CONFIGS[config_name]
    monkeypatch.setattr(fused_module, "fused_config",
                        lambda m, group_in, group_mid, c_mid, c_out, c_sc, dtype, device_type, target=None:
                        fit_config(config, group_in, group_mid, c_out, c_sc, dtype))
    _check_pair(1, 64, 64, 320, 7, 9, 2, 1, INT8, residual=False, c_sc=128, seed=3)


def test_fused_pair_rule_and_bad_quant():
    """8-bit pairs fuse with one packed group and mid / input widths multiples of 32; the two
    requantizations go together and the mid stays 8-bit."""
    for dtype in (INT8, E4M3):
        assert fuses_conv3x3_conv1x1(64, 64, 256, 1, dtype) and fuses_conv3x3_conv1x1(128, 128, 512, 1, dtype)
        assert not fuses_conv3x3_conv1x1(16, 16, 64, 1, dtype)           # 16-channel mid: below an 8-bit dot's K
        assert not fuses_conv3x3_conv1x1(128, 128, 256, 32, dtype)       # resnext groups: 16-channel packed groups
        assert not fuses_conv3x3_conv1x1(256, 256, 1024, 1, dtype)
    y1, w_mid, w_out, b_mid, b_out, quant_mid, quant, r, _, _ = _pair_problem(1, 32, 32, 64, 5, 5, 1, 1, INT8,
                                                                              residual=True, c_sc=0)
    packed = pack_conv3x3_conv1x1(w_mid, w_out)
    conv = dict(stride=1, padding=1, dilation=1, residual=r)
    with pytest.raises(ValueError, match="go together"):
        conv3x3_conv1x1_nhwc_packed(y1, packed, b_mid, b_out, quant=quant, **conv)
    with pytest.raises(TypeError, match="mid tile stays 8-bit"):
        conv3x3_conv1x1_nhwc_packed(y1, packed, b_mid, b_out, quant_mid=QuantEpilogue(
            quant_mid.acc_scale, torch.float32), quant=quant, **conv)
    with pytest.raises(ValueError, match="acc_scale"):
        conv3x3_conv1x1_nhwc_packed(y1, packed, b_mid, b_out, quant_mid=QuantEpilogue(
            quant.acc_scale, INT8, 1.0), quant=quant, **conv)
    with pytest.raises(TypeError, match="needs quant"):
        conv3x3_conv1x1_nhwc_packed(y1, packed, b_mid, b_out, **conv)
    meta = lambda t: torch.empty_like(t, device="meta")  # noqa: E731
    with record_launches() as calls:
        conv3x3_conv1x1_nhwc_packed(meta(y1), pack_conv3x3_conv1x1(meta(w_mid), meta(w_out)), meta(b_mid), meta(b_out),
                                    stride=1, padding=1, dilation=1, residual=meta(r), quant=QuantEpilogue(meta(quant.acc_scale), INT8, 1.0, 1.0),
                                    quant_mid=QuantEpilogue(meta(quant_mid.acc_scale), INT8, 1.0))
    (call,) = calls
    assert call.options == {"enable_fp_fusion": False} and call.name.endswith("/int8]")


# ------------------------------------------------------------------------------------------------
# AOT: compiles for real GPUs with no spills, and the K loops run 8-bit tensor-core MMAs


def _meta_nhwc(shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta").contiguous(memory_format=torch.channels_last)


def _calls_8bit(dtype, batch=32):
    """A resnet50 block's worth of 8-bit launches: stem (ROW_K), 3x3, 1x1 + residual, concat-K."""
    calls = []
    for c_in, c_out, h, k, s, residual, c_sc, out_float in [(4, 64, 230, 7, 2, False, 0, False),
                                                           (64, 64, 56, 3, 1, False, 0, False),
                                                           (64, 256, 56, 1, 1, True, 0, False),
                                                           (128, 512, 28, 1, 1, False, 256, False),
                                                           (512, 512, 7, 3, 1, True, 0, True)]:
        stem = c_in == 4
        w = torch.empty(c_out, c_in, k, k, dtype=dtype, device="meta")
        sc_w = torch.empty(c_out, c_sc, 1, 1, dtype=dtype, device="meta") if c_sc else None
        packed = pack_conv_weight(w, row_k=True) if stem else pack_conv_weight(w, shortcut_weight=sc_w)
        pad = 0 if stem else k // 2
        oh = (h + 2 * pad - k) // s + 1
        quant = QuantEpilogue(torch.empty(c_out, device="meta"), torch.float32 if out_float else dtype,
                              None if out_float else 1.0, 1.0 if residual else None)
        with record_launches() as recorded:
            conv2d_nhwc_packed(_meta_nhwc((batch, c_in, h, h), dtype), packed, torch.empty(c_out, device="meta"),
                               stride=s, padding=pad, relu=True,
                               residual=_meta_nhwc((batch, c_out, oh, oh), dtype) if residual else None,
                               shortcut=_meta_nhwc((batch, c_sc, h, h), dtype) if c_sc else None, quant=quant)
        calls += recorded
    for c_in, c_mid, c_out, h, s, c_sc in [(64, 64, 256, 56, 1, 64), (128, 128, 512, 28, 1, 0)]:   # fused pairs
        packed = pack_conv3x3_conv1x1(torch.empty(c_mid, c_in, 3, 3, dtype=dtype, device="meta"),
                                      torch.empty(c_out, c_mid, 1, 1, dtype=dtype, device="meta"),
                                      shortcut_weight=torch.empty(c_out, c_sc, 1, 1, dtype=dtype, device="meta")
                                      if c_sc else None)
        quant_mid = QuantEpilogue(torch.empty(c_mid, device="meta"), dtype, 1.0)
        quant = QuantEpilogue(torch.empty(c_out, device="meta"), dtype, 1.0, None if c_sc else 1.0)
        with record_launches() as recorded:
            conv3x3_conv1x1_nhwc_packed(_meta_nhwc((batch, c_in, h, h), dtype), packed, torch.empty(c_mid, device="meta"),
                                        torch.empty(c_out, device="meta"), stride=s, padding=1, dilation=1,
                                        residual=None if c_sc else _meta_nhwc((batch, c_out, h, h), dtype),
                                        shortcut=_meta_nhwc((batch, c_sc, h, h), dtype) if c_sc else None,
                                        shortcut_stride=s, quant_mid=quant_mid, quant=quant)
        calls += recorded
    with record_launches() as recorded:
        max_pool2d_nhwc(_meta_nhwc((batch, 64, 112, 112), dtype))
        avgpool_linear_8bit_packed(_meta_nhwc((batch, 2048, 7, 7), dtype),
                                   pack_linear_weight(torch.empty(1000, 2048, device="meta")),
                                   torch.empty(1000, device="meta"))
    return calls + recorded


def test_aot_8bit_kernels_compile_without_spills_and_use_8bit_mma():
    """int8 for sm_80 and sm_90, e4m3 for sm_90 (no e4m3 MMA before sm_89); the pool and head too."""
    rows = aot.aot_report({"int8": _calls_8bit(INT8)}, (80, 90)) + aot.aot_report({"e4m3": _calls_8bit(E4M3)}, (90,))
    problems = [p for row in rows for p in row.problems()]
    assert not problems, problems
    assert sum(row.kernel.startswith("conv3x3_conv1x1_nhwc[") for row in rows) == 2 * 2
    for entry in aot.loop_report(rows, (80, 90)):
        if not entry["kernel"].startswith(("conv2d_nhwc", "conv3x3_conv1x1_nhwc")):
            continue
        main = max(entry["k_loops"], key=lambda lp: lp["mma_count"])
        want = {(80, "int8"): "IMMA.16832.S8.S8", (90, "int8"): "IGMMA.", (90, "e4m3"): "QGMMA."}
        key = (entry["sm"], "e4m3" if entry["kernel"].endswith("/e4m3]") else "int8")
        assert main["mma"].startswith(want[key]), (entry["kernel"], entry["sm"], main["mma"])
        assert ("E4M3" in main["mma"]) == (key[1] == "e4m3") and (".S8" in main["mma"]) == (key[1] == "int8")
