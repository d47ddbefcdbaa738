"""fastres._C: the C++ CPU twins against plain PyTorch, the torch.library registrations, bad input,
the fallback without the extension, and the CUDA build's per-kernel resource usage.

The CPU twins run the same __host__ __device__ index math and rounding as the CUDA kernels, so these
tests check the kernels' logic; the CUDA kernels themselves are checked for spills from the built
module. Tests that need the extension skip when it is not built, and so does the resource-usage test
when it was built without CUDA; set FASTRES_REQUIRE_CUDA_BUILD=1 (CI does) to make both failures.
"""
import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from fastres import extension
from fastres.extension import nchw_to_nhwc, nchw_to_nhwc_padded, nhwc_to_nchw, preprocess

MEAN = (0.485, 0.456, 0.406)   # torchvision's ImageNet weights
STD = (0.229, 0.224, 0.225)
REQUIRE_CUDA_BUILD = os.environ.get("FASTRES_REQUIRE_CUDA_BUILD") == "1"


def _missing(reason):
    if REQUIRE_CUDA_BUILD:
        pytest.fail(f"{reason} (FASTRES_REQUIRE_CUDA_BUILD=1)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def ext():
    module, reason = extension._import_extension()
    if module is None:
        _missing(f"fastres._C is not built: {reason}")
    return module


def _images(shape, seed=0):
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _batch(n, h, w, layout, seed=0):
    """(input in `layout`, the same pixels as contiguous NCHW)."""
    nhwc = _images((n, h, w, 3), seed)
    nchw = nhwc.permute(0, 3, 1, 2)
    inputs = {"NHWC": nhwc, "NCHW": nchw.contiguous(), "NCHW_channels_last": nchw}
    return inputs[layout], nchw.contiguous()


def _normalised(nchw):
    return TF.normalize(nchw.to(torch.float64) / 255, list(MEAN), list(STD))


# ------------------------------------------------------------------------------------------------
# preprocess
# ------------------------------------------------------------------------------------------------

# |out - exact| <= atol + rtol |exact|: rtol is the dtype's rounding (half an ulp), atol the fp32
# error of fma(x, 1/(255 std), -mean/std) where it cancels to ~0.
PREPROCESS_TOLERANCES = [
    (torch.float32, 1e-6, 1e-7),
    (torch.float16, 1e-6, 2.0**-11),
    (torch.bfloat16, 1e-6, 2.0**-8),
]
# H, W multiples of nothing, batches of 1, 3 and 64, 16-pixel groups with and without a tail, and one
# real ImageNet image (224 x 224 = 3136 whole groups, planes aligned for the vector path).
PREPROCESS_SHAPES = [(1, 1, 1), (1, 7, 13), (3, 13, 7), (3, 17, 31), (64, 5, 9), (1, 4, 4), (3, 8, 6), (1, 224, 224)]


@pytest.mark.parametrize("dtype,atol,rtol", PREPROCESS_TOLERANCES, ids=["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("layout", ["NHWC", "NCHW", "NCHW_channels_last"])
@pytest.mark.parametrize("n,h,w", PREPROCESS_SHAPES)
def test_preprocess_matches_torchvision_normalize(ext, n, h, w, layout, dtype, atol, rtol):
    images, nchw = _batch(n, h, w, layout)
    out = preprocess(images, MEAN, STD, dtype=dtype)

    assert out.shape == (n, 4, h, w) and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last)
    expected = _normalised(nchw)
    error = (out[:, :3].double() - expected).abs()
    assert bool((error <= atol + rtol * expected.abs()).all()), f"max error {error.max().item():.3g}"
    assert bool((out[:, 3] == 0).all())


@pytest.mark.parametrize("pad_channels_to,channels", [(1, 3), (2, 4), (3, 3), (4, 4), (5, 5), (8, 8)])
def test_preprocess_pads_channels_with_zeros(ext, pad_channels_to, channels):
    images, nchw = _batch(3, 9, 11, "NHWC")
    out = preprocess(images, MEAN, STD, dtype=torch.float32, pad_channels_to=pad_channels_to)
    assert out.shape == (3, channels, 9, 11)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out[:, :3].double(), _normalised(nchw), atol=1e-6, rtol=1e-7)
    assert bool((out[:, 3:] == 0).all())


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_preprocess_vector_and_scalar_paths_agree_bitwise(ext, layout, dtype):
    """Aligned input takes the 16-byte path, a 1-byte offset the scalar path; the bits must match."""
    n, h, w = 3, 8, 10   # 80-pixel planes: whole groups in both layouts
    images, _ = _batch(n, h, w, layout)
    storage = torch.empty(images.numel() + 16, dtype=torch.uint8)
    assert storage.data_ptr() % 16 == 0
    shifted = storage[1:1 + images.numel()].view(images.shape).copy_(images)
    code = {torch.float16: ext.OUT_FLOAT16, torch.bfloat16: ext.OUT_BFLOAT16, torch.float32: ext.OUT_FLOAT32}[dtype]
    outputs = []
    for source, vectorized in ((images, True), (shifted, False)):
        out = torch.empty(n, h, w, 4, dtype=dtype)
        took_vector_path = ext.preprocess_cpu(source.data_ptr(), out.data_ptr(), n, h, w, layout == "NCHW",
                                              list(MEAN), list(STD), 4, code)
        assert took_vector_path == vectorized
        outputs.append(out)
    assert torch.equal(outputs[0].view(torch.int16 if dtype != torch.float32 else torch.int32),
                       outputs[1].view(torch.int16 if dtype != torch.float32 else torch.int32))
    # and the public op handles the unaligned view the same way
    assert torch.equal(preprocess(shifted, MEAN, STD, dtype=dtype).permute(0, 2, 3, 1), outputs[1])


# (mean, std) making out = x * scale + shift hit the rounding corner cases of the float -> 16-bit
# conversion for every x in 0..255: scale = 1 / (255 std), shift = -mean / std.
ROUNDING_CASES = {
    "imagenet": (MEAN, STD),
    "half_ties": ((-1024.5 / 255,) * 3, (1 / 255,) * 3),         # x + 1024.5: all halfway between fp16s
    "bfloat16_ties": ((-257 / 255,) * 3, (1 / 255,) * 3),         # x + 257: odd sums halfway between bf16s
    "half_subnormal": ((0.0,) * 3, (2.0**25 / 255,) * 3),         # x * 2^-25: fp16 subnormals and their ties
    "half_overflow": ((0.0,) * 3, (1 / (255 * 300),) * 3),        # x * 300: past 65504 -> inf
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("case", sorted(ROUNDING_CASES))
def test_preprocess_rounds_like_torch(ext, case, dtype):
    """The 16-bit outputs are torch's round-to-nearest-even of the fp32 output, bit for bit."""
    mean, std = ROUNDING_CASES[case]
    images = torch.arange(256, dtype=torch.uint8).repeat_interleave(3).view(1, 16, 16, 3)
    out32 = preprocess(images, mean, std, dtype=torch.float32)
    out16 = preprocess(images, mean, std, dtype=dtype)
    assert torch.equal(out16.view(torch.int16), out32.to(dtype).view(torch.int16))


def test_preprocess_accepts_tensor_mean_std(ext):
    images, nchw = _batch(1, 5, 7, "NHWC")
    out = preprocess(images, torch.tensor(MEAN), torch.tensor(STD), dtype=torch.float32)
    torch.testing.assert_close(out[:, :3].double(), _normalised(nchw), atol=1e-6, rtol=1e-7)


def test_preprocess_empty_batch(ext):
    out = preprocess(torch.empty(0, 5, 7, 3, dtype=torch.uint8), MEAN, STD)
    assert out.shape == (0, 4, 5, 7)


@pytest.mark.parametrize("images,kwargs,error,match", [
    (torch.zeros(1, 4, 4, 3), {}, TypeError, "images must be uint8 pixels"),
    (torch.zeros(4, 4, 3, dtype=torch.uint8), {}, ValueError, r"unsqueeze\(0\)"),
    (torch.zeros(1, 4, 4, 4, dtype=torch.uint8), {}, ValueError, r"must be RGB, \[N, H, W, 3\] or \[N, 3, H, W\]"),
    (torch.zeros(1, 4, 8, 3, dtype=torch.uint8)[:, :, ::2], {}, ValueError, "NHWC images .* must be contiguous"),
    (torch.zeros(1, 3, 4, 8, dtype=torch.uint8).transpose(2, 3), {}, ValueError,
     "NCHW images .* must be contiguous or channels_last"),
    (torch.zeros(1, 4, 4, 3, dtype=torch.uint8), {"mean": (0.5, 0.5)}, ValueError, "mean must be 3 finite"),
    (torch.zeros(1, 4, 4, 3, dtype=torch.uint8), {"mean": (0.5, float("nan"), 0.5)}, ValueError,
     "mean must be 3 finite"),
    (torch.zeros(1, 4, 4, 3, dtype=torch.uint8), {"std": (0.5, 0.0, 0.5)}, ValueError, "std must be nonzero"),
    (torch.zeros(1, 4, 4, 3, dtype=torch.uint8), {"dtype": torch.int8}, TypeError, "dtype must be one of"),
    (torch.zeros(1, 4, 4, 3, dtype=torch.uint8), {"dtype": torch.float64}, TypeError, "dtype must be one of"),
    (torch.zeros(1, 4, 4, 3, dtype=torch.uint8), {"pad_channels_to": 0}, ValueError, "pad_channels_to must be"),
    ("not a tensor", {}, TypeError, "images must be a torch.Tensor"),
], ids=["float", "rank3", "4channels", "strided_nhwc", "strided_nchw", "mean_len", "mean_nan", "std_zero",
        "int8_out", "float64_out", "pad0", "not_tensor"])
def test_preprocess_rejects_bad_input(images, kwargs, error, match):
    args = {"mean": MEAN, "std": STD, **kwargs}
    mean, std = args.pop("mean"), args.pop("std")
    with pytest.raises(error, match=match):
        preprocess(images, mean, std, **args)


def test_raw_bindings_check_their_arguments(ext):
    images, out = torch.zeros(1, 2, 2, 3, dtype=torch.uint8), torch.empty(1, 2, 2, 4, dtype=torch.float16)
    with pytest.raises(ValueError, match="at least 3 output channels"):
        ext.preprocess_cpu(images.data_ptr(), out.data_ptr(), 1, 2, 2, False, list(MEAN), list(STD), 2, 0)
    with pytest.raises(ValueError, match="unknown output dtype"):
        ext.preprocess_cpu(images.data_ptr(), out.data_ptr(), 1, 2, 2, False, list(MEAN), list(STD), 4, 7)
    with pytest.raises(ValueError, match="3 mean and 3 std"):
        ext.preprocess_cpu(images.data_ptr(), out.data_ptr(), 1, 2, 2, False, [0.5], list(STD), 4, 0)
    with pytest.raises(ValueError, match="2- or 4-byte elements"):
        ext.transpose_cpu(out.data_ptr(), out.data_ptr(), 1, 2, 2, 8)
    with pytest.raises(ValueError, match="null pointer"):
        ext.transpose_cpu(0, out.data_ptr(), 1, 2, 2, 2)


# The stem's padded input: a zero border (the conv's padding) and a zero 4th channel, at odd sizes too.
BORDERS = [(3, 3, 3, 3), (3, 3, 3, 4), (0, 0, 0, 0), (1, 0, 2, 5)]


@pytest.mark.parametrize("border", BORDERS, ids=lambda b: "-".join(map(str, b)))
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("n,h,w", [(1, 224, 224), (3, 13, 7), (2, 1, 1)])
def test_preprocess_border_writes_the_padded_stem_input(ext, n, h, w, layout, border):
    images, nchw = _batch(n, h, w, layout)
    top, bottom, left, right = border
    out = preprocess(images, MEAN, STD, dtype=torch.float16, pad_channels_to=4, border=border)
    assert out.shape == (n, 4, h + top + bottom, w + left + right)
    assert out.is_contiguous(memory_format=torch.channels_last)
    # inside: bitwise the unbordered preprocess (the same fma, the same rounding); outside and channel 3: 0
    inner = preprocess(images, MEAN, STD, dtype=torch.float16, pad_channels_to=4)
    assert torch.equal(out[:, :, top:top + h, left:left + w], inner)
    expected = torch.nn.functional.pad(_normalised(nchw), (left, right, top, bottom))
    error = (out[:, :3].double() - expected).abs()
    assert bool((error <= 1e-6 + 2.0**-11 * expected.abs()).all())
    mask = torch.ones_like(out, dtype=torch.bool)
    mask[:, :3, top:top + h, left:left + w] = False
    assert not out[mask].any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape,channels,border", [((2, 3, 224, 224), 4, (3, 3, 3, 3)), ((3, 3, 13, 7), 4, (3, 3, 3, 4)),
                                                   ((1, 1, 1, 1), 8, (0, 2, 1, 0)), ((2, 5, 4, 6), 5, (0, 0, 0, 0))])
def test_nchw_to_nhwc_padded(ext, shape, channels, border, memory_format, dtype):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype).contiguous(memory_format=memory_format)
    y = nchw_to_nhwc_padded(x, channels, border)
    top, bottom, left, right = border
    n, c, h, w = shape
    assert y.shape == (n, channels, h + top + bottom, w + left + right) and y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last)
    expected = torch.nn.functional.pad(torch.cat([x, x.new_zeros(n, channels - c, h, w)], dim=1),
                                       (left, right, top, bottom))
    assert torch.equal(y, expected)
    assert torch.equal(y, extension.nchw_to_nhwc_padded_ref(x, channels, border))


def test_nchw_to_nhwc_padded_feeds_the_row_k_stem(ext):
    """The op's layout is what the ROW_K stem reads: equal to the padded conv (plain PyTorch, CPU)."""
    from fastres.kernels.conv2d_nhwc import pad_stem_weight, stem_input_padding
    x = torch.randn(2, 3, 13, 7, dtype=torch.float64)
    w = torch.randn(8, 3, 7, 7, dtype=torch.float64)
    xp = nchw_to_nhwc_padded(x.float(), 4, stem_input_padding(13, 7)).double()
    got = torch.nn.functional.conv2d(xp, pad_stem_weight(w), stride=2)
    torch.testing.assert_close(got, torch.nn.functional.conv2d(x, w, stride=2, padding=3), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("call,error,match", [
    (lambda: nchw_to_nhwc_padded(torch.zeros(1, 5, 2, 2), 4), ValueError, "channels must be an int >= the input's 5"),
    (lambda: nchw_to_nhwc_padded(torch.zeros(1, 3, 2, 2), 4, (1, 2, 3)), ValueError, "border must be 4"),
    (lambda: nchw_to_nhwc_padded(torch.zeros(1, 3, 2, 2), 4, (1, -2, 3, 0)), ValueError, "border must be 4"),
    (lambda: nchw_to_nhwc_padded(torch.zeros(1, 3, 2, 2, dtype=torch.float64)), TypeError, "dtype must be one of"),
    (lambda: preprocess(torch.zeros(1, 2, 2, 3, dtype=torch.uint8), MEAN, STD, border=(1, 1)), ValueError,
     "border must be 4"),
], ids=["channels", "border_len", "border_negative", "float64", "preprocess_border"])
def test_padded_ops_reject_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ------------------------------------------------------------------------------------------------
# NCHW <-> NHWC
# ------------------------------------------------------------------------------------------------

# Odd shapes (partial 32x32 tiles on both sides), C = 1 and 3, and real ResNet activations.
LAYOUT_SHAPES = [(1, 1, 1, 1), (1, 3, 7, 13), (3, 33, 13, 7), (64, 5, 3, 9), (3, 64, 56, 56), (2, 2048, 7, 7)]
LAYOUT_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.mark.parametrize("dtype", LAYOUT_DTYPES, ids=["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("shape", LAYOUT_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_nchw_nhwc_round_trip(ext, shape, dtype):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    y = nchw_to_nhwc(x)
    assert y.shape == x.shape and y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, x)
    assert torch.equal(y.permute(0, 2, 3, 1).contiguous().flatten(), x.permute(0, 2, 3, 1).flatten())
    z = nhwc_to_nchw(y)
    assert z.is_contiguous() and torch.equal(z, x)


@pytest.mark.parametrize("op,x,error,match", [
    (nchw_to_nhwc, torch.zeros(2, 3, 4, 5).to(memory_format=torch.channels_last), ValueError,
     r"must be contiguous \(NCHW\)"),
    (nchw_to_nhwc, torch.zeros(2, 3, 4, 10)[..., ::2], ValueError, r"must be contiguous \(NCHW\)"),
    (nhwc_to_nchw, torch.zeros(2, 3, 4, 5), ValueError, r"must be channels_last \(NHWC\)"),
    (nchw_to_nhwc, torch.zeros(2, 3, 4, 5, dtype=torch.float64), TypeError, "dtype must be one of"),
    (nhwc_to_nchw, torch.zeros(2, 3, 4, 5, dtype=torch.int32), TypeError, "dtype must be one of"),
    (nchw_to_nhwc, torch.zeros(3, 4, 5), ValueError, r"expected a 4-d \[N, C, H, W\] tensor"),
    (nhwc_to_nchw, [1.0], TypeError, "input must be a torch.Tensor"),
], ids=["channels_last_in", "strided_in", "contiguous_in", "float64", "int32", "rank3", "not_tensor"])
def test_layout_ops_reject_bad_input(op, x, error, match):
    with pytest.raises(error, match=match):
        op(x)


# ------------------------------------------------------------------------------------------------
# torch.library: fake implementations, torch.compile, torch.export
# ------------------------------------------------------------------------------------------------

def test_opcheck(ext):
    images = _images((2, 5, 7, 3))
    torch.library.opcheck(torch.ops.fastres.preprocess.default, (images, list(MEAN), list(STD)),
                          {"dtype": torch.float16, "pad_channels_to": 4})
    torch.library.opcheck(torch.ops.fastres.preprocess.default, (images, list(MEAN), list(STD)),
                          {"dtype": torch.float16, "pad_channels_to": 4, "border": [3, 3, 3, 4]})
    torch.library.opcheck(torch.ops.fastres.nchw_to_nhwc_padded.default, (torch.randn(2, 3, 5, 7), 4, [3, 3, 3, 4]))
    x = torch.randn(2, 3, 5, 7)
    torch.library.opcheck(torch.ops.fastres.nchw_to_nhwc.default, (x,))
    torch.library.opcheck(torch.ops.fastres.nhwc_to_nchw.default, (x.to(memory_format=torch.channels_last),))


def test_meta_tensors_need_no_extension(monkeypatch):
    monkeypatch.setattr(extension, "_import_extension", lambda: (None, "simulated"))
    out = preprocess(torch.empty(2, 9, 11, 3, dtype=torch.uint8, device="meta"), MEAN, STD, pad_channels_to=8)
    assert out.device.type == "meta" and out.shape == (2, 8, 9, 11)
    assert out.is_contiguous(memory_format=torch.channels_last)
    y = nchw_to_nhwc(torch.empty(2, 3, 4, 5, device="meta"))
    assert y.is_contiguous(memory_format=torch.channels_last)


class _Stem(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 3, padding=1).to(memory_format=torch.channels_last)

    def forward(self, images):
        x = preprocess(images, MEAN, STD, dtype=torch.float32)
        return nhwc_to_nchw(self.conv(x).contiguous(memory_format=torch.channels_last))


def test_torch_compile_traces_ops(ext):
    model = _Stem().eval()
    images = _images((2, 9, 11, 3))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(images), model(images))


def test_torch_export_keeps_ops(ext):
    model = _Stem().eval()
    images = _images((2, 9, 11, 3))
    exported = torch.export.export(model, (images,))
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert {"fastres.preprocess.default", "fastres.nhwc_to_nchw.default"} <= targets
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(images), model(images))


# ------------------------------------------------------------------------------------------------
# Without the extension
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def no_extension(monkeypatch):
    monkeypatch.setattr(extension, "_import_extension", lambda: (None, "No module named 'fastres._C'"))
    monkeypatch.setattr(extension, "_noticed", set())


def test_missing_extension_falls_back_with_one_notice(no_extension):
    images, nchw = _batch(3, 7, 13, "NHWC")
    with pytest.warns(RuntimeWarning, match=r"fastres._C is not built .* preprocess runs as plain PyTorch"):
        out = preprocess(images, MEAN, STD, dtype=torch.float32)
    torch.testing.assert_close(out[:, :3].double(), _normalised(nchw), atol=1e-6, rtol=1e-7)
    assert out.is_contiguous(memory_format=torch.channels_last) and bool((out[:, 3] == 0).all())

    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # the notice is given once per process
        preprocess(images, MEAN, STD)
    with pytest.warns(RuntimeWarning, match="nchw_to_nhwc runs as plain PyTorch"):
        x = torch.randn(2, 3, 4, 5)
        assert torch.equal(nchw_to_nhwc(x), x)


def test_missing_extension_load_and_status(no_extension):
    with pytest.raises(ImportError, match=r"fastres._C is not built .* pip install --no-build-isolation -e \."):
        extension.load_extension()
    assert extension.extension_status().startswith("fastres._C: not built")


def test_cpu_only_build_falls_back_for_cuda_tensors(monkeypatch):
    class CpuOnlyBuild:
        cuda_built = False

    monkeypatch.setattr(extension, "_import_extension", lambda: (CpuOnlyBuild, None))
    monkeypatch.setattr(extension, "_noticed", set())
    assert extension._extension_for(torch.device("cpu"), "preprocess") is CpuOnlyBuild
    with pytest.warns(RuntimeWarning, match="built without CUDA; preprocess on CUDA tensors runs as plain PyTorch"):
        assert extension._extension_for(torch.device("cuda", 0), "preprocess") is None
    assert "CPU twins only" in extension.extension_status()


def test_import_is_lazy():
    """Importing fastres (and its extension module) neither loads fastres._C nor initialises CUDA."""
    code = ("import sys, torch, fastres, fastres.extension, fastres.normalize; "
            "assert 'fastres._C' not in sys.modules, 'fastres._C imported eagerly'; "
            "assert not torch.cuda.is_initialized(), 'CUDA initialised at import'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ------------------------------------------------------------------------------------------------
# CUDA build: registers, shared memory and spills of every kernel, per architecture
# ------------------------------------------------------------------------------------------------

# preprocess: 3 dtypes x pads {3, 4, other} x 2 layouts, and bordered 3 dtypes x 2 layouts; transpose and
# nchw_to_nhwc_padded: 2- and 4-byte
KERNELS_PER_ARCH = 3 * 3 * 2 + 3 * 2 + 2 + 2


def _cuobjdump():
    candidates = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump")]
    triton = importlib.util.find_spec("triton")
    if triton is not None and triton.submodule_search_locations:
        candidates.append(os.path.join(triton.submodule_search_locations[0], "backends", "nvidia", "bin", "cuobjdump"))
    candidates.append(shutil.which("cuobjdump"))
    return next((c for c in candidates if c and os.path.exists(c)), None)


def _demangle(names):
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        return names
    return subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=True).stdout.split("\n")


def test_cuda_kernels_have_no_spills(ext):
    if not ext.cuda_built:
        _missing("fastres._C was built without CUDA (FASTRES_CUDA_BUILD=0, or no nvcc at build time)")
    cuobjdump = _cuobjdump()
    if cuobjdump is None:
        _missing("cuobjdump not found (CUDA_HOME/bin or the triton wheel)")
    dump = subprocess.run([cuobjdump, "--dump-resource-usage", ext.__file__], capture_output=True, text=True,
                          check=True).stdout

    usage = {}   # arch -> {kernel: {"REG": .., "STACK": .., "SHARED": .., "LOCAL": ..}}
    arch = kernel = None
    for line in dump.splitlines():
        if m := re.match(r"\s*arch = sm_(\d+)", line):
            arch = int(m.group(1))
            usage.setdefault(arch, {})
        elif m := re.match(r"\s*Function (\S+):", line):
            kernel = m.group(1)
        elif kernel and (fields := dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line))):
            usage[arch][kernel] = {k: int(v) for k, v in fields.items()}
            kernel = None

    assert sorted(usage) == sorted(ext.cuda_archs), f"cubins for {sorted(usage)}, built for {ext.cuda_archs}"
    print()
    for arch, kernels in sorted(usage.items()):
        assert len(kernels) == KERNELS_PER_ARCH, f"sm_{arch}: {len(kernels)} kernels, expected {KERNELS_PER_ARCH}"
        for name, readable in zip(sorted(kernels), _demangle(sorted(kernels))):
            u = kernels[name]
            print(f"sm_{arch} REG {u['REG']:3d} SHARED {u['SHARED']:5d} STACK {u['STACK']} LOCAL {u['LOCAL']}  {readable}")
        spilling = {name: u for name, u in kernels.items() if u["STACK"] or u["LOCAL"]}
        assert not spilling, f"sm_{arch} kernels with stack/local memory (spills): {spilling}"
