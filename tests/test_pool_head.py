"""The stem max pool and the avgpool+FC head kernels against torch.nn.functional.

Runs the real Triton kernels: on CUDA tensors when a GPU is present, otherwise under the Triton
interpreter (CPU tensors), which must be switched on before Python starts (tests/conftest.py does
it when there is no GPU).

Configurations: on CPU tensors the wrappers pick interpreter tiles (few, large programs); the GPU
tiles of each configuration rule are run here too, passed explicitly, on shapes small enough for
the interpreter.

How bf16 is covered in the head: the triton 3.8 interpreter's ``tl.dot`` on bf16 operands returns
garbage, so on CPU tensors the wrapper sets UPCAST_DOT_OPERANDS and the dot runs on fp32 operands;
bf16 loads, the pooling, the fp32 epilogue and the bf16 store still run and are checked here. The
bf16 tensor-core dot itself is compiled for sm_80/sm_90 in tests/test_aot.py and checked by these
same tests on a GPU, where UPCAST_DOT_OPERANDS is off (test_recorded_bf16_head_keeps_the_bf16_dot).
"""
import pytest
import torch
from kernel_testing import CL, DEVICE, skip_if_compiled_without_gpu, skip_without_gpu_or_interpreter

skip_without_gpu_or_interpreter("the Triton pool/head kernels")

from fastres.kernels import avgpool_linear as head_module  # noqa: E402
from fastres.kernels._launch import record_launches  # noqa: E402
from fastres.kernels.avgpool_linear import (  # noqa: E402
    avgpool_linear, avgpool_linear_config, avgpool_linear_packed, avgpool_linear_ref, pack_linear_weight)
from fastres.kernels.max_pool2d_nhwc import (  # noqa: E402
    max_pool2d_config, max_pool2d_nhwc, max_pool2d_nhwc_ref)

skip_if_compiled_without_gpu(head_module._avgpool_linear_kernel)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Head tolerances (dtype, atol, rtol) against the fp32 reference (avgpool_linear_ref(upcast=True)).
# 16-bit: the mean is rounded once to the dtype (as PyTorch's half head does) and the output once:
# about one unit in the last place of the output, i.e. 2**-10 (fp16) and 2**-7 (bf16) relative.
HEAD_TOL = {
    torch.float32: (torch.float32, 1e-5, 1e-5),
    torch.float16: (torch.float16, 1e-3, 2e-3),
    torch.bfloat16: (torch.bfloat16, 8e-3, 1.6e-2),
}


def _nhwc(*shape, dtype=torch.float32, generator=None, offset=0.0):
    x = torch.randn(*shape, generator=generator) + offset
    return x.to(dtype).to(DEVICE).contiguous(memory_format=CL)


def _assert_bit_exact(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


# ------------------------------------------------------------------------------------------------
# max_pool2d_nhwc: 3x3/s2/p1, bit-exact

# (N, C, H, W): the ResNet stem pool input (C=64) at small image sizes (stem output of a 2x2, 14x26,
# 26x14, 32x32 and 4x4 image), 1x1, and odd channel counts (3; 200 = two channel blocks, masked).
POOL_SHAPES = [(1, 64, 1, 1), (3, 64, 13, 7), (1, 64, 7, 13), (3, 64, 16, 16), (1, 64, 2, 2),
               (3, 3, 5, 6), (1, 200, 9, 9)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", POOL_SHAPES, ids=str)
def test_max_pool_matches_torch(shape, dtype):
    x = _nhwc(*shape, dtype=dtype, generator=torch.Generator().manual_seed(0))
    out = max_pool2d_nhwc(x)
    assert out.is_contiguous(memory_format=CL)
    _assert_bit_exact(out, max_pool2d_nhwc_ref(x))


@pytest.mark.parametrize("shape", [(3, 64, 13, 7), (1, 200, 9, 9)], ids=str)
def test_max_pool_gpu_tiles(shape):
    x = _nhwc(*shape, dtype=torch.float16, generator=torch.Generator().manual_seed(1))
    out = max_pool2d_nhwc(x, config=max_pool2d_config(shape[1], "cuda"))
    _assert_bit_exact(out, max_pool2d_nhwc_ref(x))


def test_max_pool_padding_is_minus_infinity():
    # All inputs negative: a padding read as 0 would win every border window.
    x = _nhwc(2, 64, 9, 6, offset=-10.0, generator=torch.Generator().manual_seed(2))
    out = max_pool2d_nhwc(x)
    assert (out < 0).all()
    _assert_bit_exact(out, max_pool2d_nhwc_ref(x))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_max_pool_nan_and_inf(dtype):
    x = _nhwc(2, 64, 9, 7, dtype=dtype, generator=torch.Generator().manual_seed(3))
    x[0, 5, 0, 0] = float("nan")          # corner: in the padded first window
    x[0, 9, 4, 3] = float("nan")          # interior: shared by overlapping windows
    x[1, 63, 8, 6] = float("nan")         # last channel, last pixel
    x[1, 0, 2, 2] = float("inf")
    x[1, 1] = float("-inf")               # a whole channel of -inf stays -inf
    out = max_pool2d_nhwc(x)
    ref = max_pool2d_nhwc_ref(x)
    assert out.isnan().sum() == ref.isnan().sum() > 0
    _assert_bit_exact(out, ref)


def test_max_pool_out_and_empty_batch():
    x = _nhwc(3, 64, 13, 7, generator=torch.Generator().manual_seed(4))
    out = torch.full((3, 64, 7, 4), 7.0, device=DEVICE).contiguous(memory_format=CL)
    assert max_pool2d_nhwc(x, out=out) is out
    _assert_bit_exact(out, max_pool2d_nhwc_ref(x))
    empty = max_pool2d_nhwc(_nhwc(0, 64, 13, 7))
    assert empty.shape == (0, 64, 7, 4)


def test_max_pool_bad_input():
    good = _nhwc(1, 64, 8, 8)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        max_pool2d_nhwc(good[0])
    with pytest.raises(ValueError, match="channels_last"):
        max_pool2d_nhwc(good.contiguous())
    with pytest.raises(TypeError, match="dtype"):
        max_pool2d_nhwc(good.to(torch.int32))
    with pytest.raises(ValueError, match="shape"):
        max_pool2d_nhwc(good, out=torch.empty(1, 64, 3, 3, device=DEVICE).contiguous(memory_format=CL))
    with pytest.raises(ValueError, match="float16"):
        max_pool2d_nhwc(good, out=torch.empty(1, 64, 4, 4, device=DEVICE, dtype=torch.float16)
                        .contiguous(memory_format=CL))
    with pytest.raises(ValueError, match="channels_last"):
        max_pool2d_nhwc(good, out=torch.empty(1, 64, 4, 4, device=DEVICE))


def test_max_pool_records_on_meta():
    x = torch.empty(256, 64, 112, 112, device="meta").contiguous(memory_format=CL)
    with record_launches() as calls:
        out = max_pool2d_nhwc(x)
    assert out.shape == (256, 64, 56, 56) and out.device.type == "meta"
    (call,) = calls
    assert call.args["P"] == 256 * 56 * 56 and call.constexprs["BLOCK_C"] == 64
    with pytest.raises(RuntimeError, match="record_launches"):
        max_pool2d_nhwc(x)


# ------------------------------------------------------------------------------------------------
# avgpool_linear: mean over H*W, then x @ W.T + b

# (N, C, H, W, classes): resnet50/resnext/wide heads (C=2048) and resnet18/34 (C=512) at 224x224
# (7x7), small inputs (2x2, 1x1), a non-square map (7x5), 1000 and 10 classes.
HEAD_SHAPES = [(1, 2048, 7, 7, 1000), (3, 2048, 1, 1, 1000), (3, 512, 7, 7, 1000), (1, 512, 2, 2, 10),
               (3, 2048, 7, 5, 10)]


def _head_inputs(N, C, H, W, classes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = _nhwc(N, C, H, W, dtype=dtype, generator=g)
    weight = (torch.randn(classes, C, generator=g) / C ** 0.5).to(dtype).to(DEVICE)
    bias = torch.randn(classes, generator=g).to(DEVICE)
    return x, weight, bias


def _check_head(out, x, weight, bias, dtype):
    _, atol, rtol = HEAD_TOL[dtype]
    ref = avgpool_linear_ref(x, weight, bias, upcast=True)
    assert out.dtype == dtype and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", HEAD_SHAPES, ids=str)
def test_head_matches_reference(shape, dtype):
    x, weight, bias = _head_inputs(*shape, dtype)
    _check_head(avgpool_linear(x, weight, bias), x, weight, bias, dtype)


# The GPU rule's tiles, each on a shape the interpreter runs quickly (fewer channels than a real
# head: the tiles do not depend on C): 32-wide class tiles at batch 1 (32 programs), the batch-256
# tile (256 classes, 8 warps) on 3 rows, a 16-wide tile for 10 classes, more than one row block.
@pytest.mark.parametrize("shape,rule_batch", [((3, 128, 2, 2, 1000), 1), ((3, 128, 7, 5, 1000), 256),
                                              ((1, 512, 7, 7, 10), 1), ((20, 64, 1, 1, 10), 20)], ids=str)
def test_head_gpu_tiles(shape, rule_batch):
    N, C, H, W, classes = shape
    x, weight, bias = _head_inputs(*shape, torch.float16, seed=1)
    config = avgpool_linear_config(rule_batch, C, H * W, classes, torch.float16, "cuda")
    out = avgpool_linear_packed(x, pack_linear_weight(weight), bias, config=config)
    _check_head(out, x, weight, bias, torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_head_without_bias(dtype):
    x, weight, _ = _head_inputs(3, 512, 7, 7, 10, dtype, seed=2)
    _check_head(avgpool_linear(x, weight), x, weight, None, dtype)


def test_head_nan_propagates():
    x, weight, bias = _head_inputs(3, 512, 7, 7, 10, torch.float16, seed=3)
    x[1, 17, 3, 4] = float("nan")
    out = avgpool_linear(x, weight, bias)
    assert out[1].isnan().all()
    assert not out[[0, 2]].isnan().any()


def test_head_out_and_empty_batch():
    x, weight, bias = _head_inputs(3, 512, 2, 2, 10, torch.float32, seed=4)
    out = torch.full((3, 10), 7.0, device=DEVICE)
    assert avgpool_linear(x, weight, bias, out=out) is out
    _check_head(out, x, weight, bias, torch.float32)
    empty = avgpool_linear(_nhwc(0, 512, 7, 7), weight, bias)
    assert empty.shape == (0, 10)


def test_pack_linear_weight_pads_rows_to_16():
    weight = torch.randn(10, 512)
    packed = pack_linear_weight(weight)
    assert packed.shape == (512, 10) and packed.stride() == (16, 1)
    assert torch.equal(packed, weight.t())


def test_head_bad_input():
    x, weight, bias = _head_inputs(2, 512, 7, 7, 10, torch.float16)
    packed = pack_linear_weight(weight)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        avgpool_linear(x[0], weight, bias)
    with pytest.raises(ValueError, match="channels_last"):
        avgpool_linear(x.contiguous(), weight, bias)
    with pytest.raises(ValueError, match="512 channels but the weight expects 256"):
        avgpool_linear(x, weight[:, :256], bias)
    with pytest.raises(TypeError, match="does not match x dtype"):
        avgpool_linear(x, weight.float(), bias)
    with pytest.raises(TypeError, match="dtype"):
        avgpool_linear(x.to(torch.int32), weight, bias)
    with pytest.raises(ValueError, match="bias must have shape"):
        avgpool_linear(x, weight, bias[:5])
    with pytest.raises(TypeError, match="bias must be float32"):
        avgpool_linear_packed(x, packed, bias.half())
    with pytest.raises(ValueError, match="out must have shape"):
        avgpool_linear(x, weight, bias, out=torch.empty(2, 11, device=DEVICE, dtype=torch.float16))
    with pytest.raises(ValueError, match="out must be"):
        avgpool_linear(x, weight, bias, out=torch.empty(2, 10, device=DEVICE))
    with pytest.raises(ValueError, match="on meta"):
        avgpool_linear_packed(x, packed.to("meta"), bias)
    with pytest.raises(ValueError, match="weight must be"):
        avgpool_linear(x, weight[0], bias)


def test_recorded_bf16_head_keeps_the_bf16_dot():
    """Meta (recorded, compiled for GPUs) runs the bf16 dot; CPU (interpreter) runs it in fp32."""
    def record(device):
        x = torch.empty(32, 2048, 7, 7, device=device, dtype=torch.bfloat16).contiguous(memory_format=CL)
        weight = torch.empty(1000, 2048, device=device, dtype=torch.bfloat16)
        with record_launches() as calls:
            avgpool_linear(x, weight, torch.empty(1000, device=device))
        return calls[0]

    meta = record("meta")
    assert meta.constexprs["UPCAST_DOT_OPERANDS"] is False
    gpu_tiles = avgpool_linear_config(32, 2048, 49, 1000, torch.bfloat16, "cuda")
    assert all(meta.constexprs[k] == v for k, v in gpu_tiles.items() if k.startswith("BLOCK"))
    if DEVICE == "cpu":
        assert record("cpu").constexprs["UPCAST_DOT_OPERANDS"] is True
