"""Ahead-of-time compile checks (fastres.aot) for real GPUs, run without one.

The stem max pool and the avgpool+FC head are recorded on meta tensors at the 224x224 shapes of
batch 1, 32 and 256 and compiled for sm_80 and sm_90: zero spills, registers and shared memory
within the limits. Toy kernels defined here prove the checks are not vacuous: one must spill, one
must use wgmma on sm_90, one must fail to compile (and be reported, not crash the run).
Everything is compiled in one aot_report (one worker start; triton's cache makes a second run fast).
"""
import io

import pytest
import torch
import triton
import triton.language as tl

from fastres import aot
from fastres.kernels._launch import KernelCall, record_launches
from fastres.kernels.avgpool_linear import avgpool_linear_packed, pack_linear_weight
from fastres.kernels.max_pool2d_nhwc import max_pool2d_nhwc

SMS = (80, 90)
BATCHES = (1, 32, 256)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _register_hungry_kernel(x_ptr, out_ptr, ROWS: tl.constexpr, COLS: tl.constexpr):
    # 128x128 fp32 values on one warp, all live across two reductions: 512 per thread > 255.
    offs = tl.arange(0, ROWS)[:, None] * COLS + tl.arange(0, COLS)[None, :]
    x = tl.load(x_ptr + offs)
    tl.store(out_ptr + offs, x * tl.sum(x, axis=1)[:, None] + tl.sum(x, axis=0)[None, :])


@triton.jit
def _tile_matmul_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    # One 128x128x64 fp16 tile: on sm_90 triton lowers this tl.dot to wgmma.
    rm, rn, rk = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])
    b = tl.load(b_ptr + rk[:, None] * N + rn[None, :])
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], tl.dot(a, b))


@triton.jit
def _does_not_compile_kernel(x_ptr, N: tl.constexpr):
    tl.store(x_ptr + tl.arange(0, N), 1.0)  # N = 3: tl.arange needs a power of two


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, device="meta", dtype=dtype)


def _pool_and_head_calls():
    """{label: calls} of the stem pool and the heads (C=2048: resnet50/resnext50; C=512: resnet18/34)."""
    calls_by_label = {}
    for batch in BATCHES:
        for dtype in DTYPES:
            with record_launches() as calls:
                max_pool2d_nhwc(_meta(batch, 64, 112, 112, dtype=dtype).contiguous(memory_format=torch.channels_last))
                for channels in (2048, 512):
                    x = _meta(batch, channels, 7, 7, dtype=dtype).contiguous(memory_format=torch.channels_last)
                    packed = pack_linear_weight(_meta(1000, channels, dtype=dtype))
                    avgpool_linear_packed(x, packed, _meta(1000))
            calls_by_label[f"b{batch}-{str(dtype).removeprefix('torch.')}"] = calls
    return calls_by_label


def _toy_calls():
    hungry = _meta(128 * 128)
    a, b = _meta(128 * 64, dtype=torch.float16), _meta(64 * 128, dtype=torch.float16)
    return [
        KernelCall(kernel=_register_hungry_kernel, grid=(1,), args=dict(x_ptr=hungry, out_ptr=hungry),
                   constexprs=dict(ROWS=128, COLS=128), num_warps=1, name="toy_register_hungry"),
        KernelCall(kernel=_tile_matmul_kernel, grid=(1,), args=dict(a_ptr=a, b_ptr=b, c_ptr=_meta(128 * 128)),
                   constexprs=dict(M=128, N=128, K=64), num_warps=4, name="toy_tile_matmul"),
        KernelCall(kernel=_does_not_compile_kernel, grid=(1,), args=dict(x_ptr=hungry), constexprs=dict(N=3),
                   name="toy_does_not_compile"),
    ]


@pytest.fixture(scope="module")
def report():
    rows = aot.aot_report({**_pool_and_head_calls(), "toys": _toy_calls()}, SMS, workers=2)
    kernel_rows = [row for row in rows if not row.kernel.startswith("toy_")]
    toys = {row.kernel: row for row in rows if row.kernel.startswith("toy_")}
    return kernel_rows, toys


def test_pool_and_head_fit_sm80_and_sm90(report):
    rows, _ = report
    out = io.StringIO()
    assert aot.print_report(rows, SMS, file=out) == 0, out.getvalue()
    # Every distinct configuration compiled for both architectures, each dtype present.
    assert {row.kernel for row in rows} == {"max_pool2d_nhwc[3x3/s2]", "avgpool_linear"}
    assert {row.dtypes.split(",")[0] for row in rows} == {"fp16", "bf16", "fp32"}
    for row in rows:
        for sm in SMS:
            resources = row.resources[sm]
            assert not resources.error, resources.error
            assert resources.spill_bytes == 0 and resources.local_bytes == 0, (row.config, sm)
            assert 0 < resources.registers <= aot.MAX_REGISTERS
            assert resources.shared_bytes <= aot.SHARED_MEMORY_LIMIT[sm]


def test_spill_is_detected(report):
    _, toys = report
    row = toys["toy_register_hungry"]
    assert all(row.resources[sm].spill_bytes > 0 for sm in SMS)
    assert any("spills" in problem for problem in row.problems())
    out = io.StringIO()
    assert aot.print_report([row], SMS, file=out) == 1
    assert "FAIL" in out.getvalue()


def test_wgmma_is_detected(report):
    _, toys = report
    row = toys["toy_tile_matmul"]
    assert row.resources[90].uses_wgmma and not row.resources[80].uses_wgmma
    assert not row.problems()


def test_compile_error_is_reported(report):
    _, toys = report
    row = toys["toy_does_not_compile"]
    assert all("power of 2" in row.resources[sm].error for sm in SMS), row.resources
    assert "does not compile" in row.problems()[0]
    out = io.StringIO()
    assert aot.print_report([row], SMS, file=out) == 1


def test_limits_are_checked():
    fits = aot.KernelResources(sm=80, kernel_name="k", registers=128, shared_bytes=aot.SHARED_MEMORY_LIMIT[80])
    assert fits.problems() == []
    too_much_smem = aot.KernelResources(sm=80, kernel_name="k", registers=128, shared_bytes=200 * 1024)
    assert "shared memory" in too_much_smem.problems()[0]
    assert aot.KernelResources(sm=90, kernel_name="k", shared_bytes=200 * 1024).problems() == []
    assert "does not compile" in aot.KernelResources(sm=90, kernel_name="k", error="boom").problems()[0]


def test_specialisation_mirrors_the_launcher():
    """Triton 3.8 launch-time specialisation, reproduced for recorded meta tensors."""
    base = _meta(64, dtype=torch.float16)
    call = KernelCall(kernel=_register_hungry_kernel, grid=(1,), args=dict(x_ptr=base, out_ptr=base[3:]),
                      constexprs=dict(ROWS=16, COLS=16), num_warps=4)
    spec = aot.specialize(call, 90)
    assert dict(spec.signature) == {"x_ptr": "*fp16", "out_ptr": "*fp16", "ROWS": "constexpr", "COLS": "constexpr"}
    assert dict(spec.constexprs) == {(2,): 16, (3,): 16}
    attrs = dict(spec.attrs)
    assert attrs[(0,)] == (("tt.divisibility", 16),)      # fresh allocation: 16-byte aligned
    assert attrs[(1,)] == ()                                # 3 fp16 elements in: not aligned
    assert spec.config_key == aot.specialize(call, 80).config_key

    # Integers: == 1 becomes a constexpr, multiples of 16 get the divisibility attribute.
    with record_launches() as calls:
        max_pool2d_nhwc(_meta(1, 64, 112, 112).contiguous(memory_format=torch.channels_last))
    spec = aot.specialize(calls[0], 80)
    signature, constexprs, attrs = dict(spec.signature), dict(spec.constexprs), dict(spec.attrs)
    index = [name for name, _ in spec.signature].index
    assert signature["P"] == "i32" and attrs[(index("P"),)] == (("tt.divisibility", 16),)   # 56 * 56
    assert signature["OH"] == "i32" and attrs[(index("OH"),)] == ()                          # 56
    with record_launches() as calls:
        max_pool2d_nhwc(_meta(1, 64, 1, 1).contiguous(memory_format=torch.channels_last))
    spec = aot.specialize(calls[0], 80)
    assert dict(spec.signature)["OW"] == "constexpr" and dict(spec.constexprs)[(index("OW"),)] == 1
