"""fastres.sass: the static loop report, on hand-written SASS and on real compiled kernels.

The real kernels are the plain Triton GEMM of bench/gemm_reference.py (the yardstick of the loop
report) compiled for sm_80 and sm_90, and a toy with a scalar 2-byte gather; the expected
instructions are what those architectures' tensor cores and copy engines issue (HGMMA 64xNx16
for wgmma, HMMA.16816 for mma.sync m16n8k16, LDGSTS .128 for 16-byte cp.async).
"""
import pytest
import torch
import triton
import triton.language as tl

from bench.gemm_reference import gemm_reference_call
from fastres import aot, sass
from fastres.kernels._launch import KernelCall

SASS_TEXT = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   ISETP.GE.AND P0, PT, R2, 0x4, PT ;
        /*0020*/               @P0 LDG.E.U16 R4, desc[UR4][R2.64] ;
        /*0030*/                   LDGSTS.E.BYPASS.LTC128B.128 [R5], desc[UR4][R6.64], P1 ;
        /*0040*/                   LDG.E.64 R8, desc[UR4][R2.64] ;
        /*0050*/                   WARPGROUP.ARRIVE ;
        /*0060*/                   HGMMA.64x128x16.F32 R24, gdesc[UR12].tnspB, R24, gsb0 ;
        /*0070*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*0080*/              @!P2 BRA `(.L_x_0) ;
        /*0090*/                   STG.E.128 desc[UR4][R2.64], R8 ;
.L_x_1:
        /*00a0*/                   BRA `(.L_x_1);
"""


def test_parse_hand_written_sass():
    instructions, labels = sass.parse(SASS_TEXT)
    assert [i.opcode for i in instructions][:3] == ["MOV", "ISETP.GE.AND", "LDG.E.U16"]
    assert instructions[2].predicate == "@P0" and instructions[8].predicate == "@!P2"
    assert labels == {".L_x_0": 1, ".L_x_1": 10}
    assert sass.loops(instructions, labels) == [(1, 8)]          # the trap self-branch is not a loop
    stats = sass.kernel_stats(SASS_TEXT)
    (loop,) = stats.k_loops
    assert loop.instructions == 8 and loop.mma == "HGMMA.64x128x16.F32" and loop.mma_count == 1
    assert loop.global_loads == {"LDG.16": 1, "LDGSTS.128": 1, "LDG.64": 1}
    assert loop.sub_word_loads == 1 and loop.narrow_loads == 2
    assert loop.wgmma and loop.wgmma_in_flight == 1 and loop.wgmma_async
    assert loop.predicate_ops == 1
    assert stats.global_stores == {"STG.128": 1}


def test_access_widths():
    def width(op):
        return sass.access_bytes(sass.Instruction(0, "", op, ""))
    assert [width(op) for op in ("LDG.E", "LDG.E.U8", "LDG.E.S16", "LDG.E.64", "LDG.E.128.CONSTANT",
                                 "LDGSTS.E.BYPASS.128", "LDGSTS.E.64", "STG.E.U16", "UTMALDG.4D")] == \
        [4, 1, 2, 8, 16, 16, 8, 2, 0]


def test_occupancy_and_waves():
    # 4 warps x 168 registers -> 168*32 = 5376 -> 5376 per warp -> 65536 // 21504 = 3 CTAs by registers
    assert sass.ctas_per_sm(90, 168, 24576, 4) == 3
    # shared memory bound: 96 KiB + 1 KiB reserved per CTA in 228 KiB -> 2
    assert sass.ctas_per_sm(90, 64, 96 * 1024, 4) == 2
    assert sass.ctas_per_sm(80, 64, 96 * 1024, 4) == 1        # 164 KiB on sm_80
    assert sass.ctas_per_sm(90, 32, 0, 1) == 32                # CTA slots
    assert sass.ctas_per_sm(90, 32, 0, 16) == 4                # 64 warps
    assert sass.waves(264, 1, 132) == 2.0 and sass.last_wave_idle(2.0) == 0.0
    assert sass.waves(196, 1, 132) == pytest.approx(1.4848, abs=1e-4)
    assert sass.last_wave_idle(1.25) == pytest.approx(0.75)


@triton.jit
def _scalar_gather_kernel(x_ptr, idx_ptr, w_ptr, out_ptr, K, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_N: tl.constexpr):
    # A tl.dot over rows gathered by an index table: the A loads are 2-byte gathers, as the old stem's.
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    rn = tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        idx = tl.load(idx_ptr + rm[:, None] * K + k + rk[None, :])
        a = tl.load(x_ptr + idx)
        b = tl.load(w_ptr + (k + rk)[:, None] * BLOCK_N + rn[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(out_ptr + rm[:, None] * BLOCK_N + rn[None, :], acc)


@pytest.fixture(scope="module")
def compiled():
    meta = dict(device="meta")
    gather = KernelCall(
        kernel=_scalar_gather_kernel, grid=(1,),
        args=dict(x_ptr=torch.empty(4096, dtype=torch.float16, **meta), idx_ptr=torch.empty(4096, dtype=torch.int32,
                                                                                              **meta),
                  w_ptr=torch.empty(4096, dtype=torch.float16, **meta), out_ptr=torch.empty(4096, **meta), K=256),
        constexprs=dict(BLOCK_M=64, BLOCK_K=32, BLOCK_N=64), num_warps=4, num_stages=3, name="toy_gather")
    calls = {"gemm": [gemm_reference_call(4096, 64, 256, block_m=128, block_n=64, block_k=32),
                      gemm_reference_call(4096, 128, 512, block_m=128, block_n=128, block_k=64, num_warps=8,
                                          num_stages=3)],
             "gather": [gather]}
    rows = aot.aot_report(calls, (80, 90))
    return {row.kernel: row for row in rows}


def test_reference_gemm_loop(compiled):
    row = compiled["gemm_reference[128x64x32]"]
    on90, on80 = row.resources[90].loops.main, row.resources[80].loops.main
    # sm_90: one warpgroup, 128 rows = 2 x m64, 32 = 2 x k16 -> 4 HGMMA 64x64x16 per step, async, 1 in flight
    assert on90.mma == "HGMMA.64x64x16.F32" and on90.mma_count == 4
    assert on90.wgmma_async and on90.wgmma_in_flight == 1
    # sm_80: 4 warps, warp tile 64x32: (64/16) * (32/8) * (32/16) = 32 HMMA m16n8k16 per step
    assert on80.mma == "HMMA.16816.F32" and on80.mma_count == 32 and not on80.wgmma
    for loop in (on90, on80):
        # A tile 128x32 fp16 = 8 KiB, B 32x64 = 4 KiB: 12 KiB / (128 threads x 16 B) = 6 cp.async per thread
        assert loop.global_loads == {"LDGSTS.128": 6}, loop.global_loads
        assert loop.sub_word_loads == 0 and loop.narrow_loads == 0
        assert 40 <= loop.instructions <= 200
    # num_stages=4: four shared-memory buffers per operand on sm_90, three on sm_80 (triton's sm_80
    # pipeliner keeps num_stages - 1 tiles in flight), what the ttgir allocates
    assert row.resources[90].stages == 4 and row.resources[80].stages == 3
    assert row.resources[90].loops.global_stores                 # the epilogue stores something
    wide = compiled["gemm_reference[128x128x64]"].resources[90].loops.main
    # 8 warps = 2 warpgroups, each 64 rows x 128: 4 x k16 per step
    assert wide.mma == "HGMMA.64x128x16.F32" and wide.mma_count == 4 and wide.wgmma_async


def test_scalar_gather_is_seen(compiled):
    loop = compiled["toy_gather"].resources[90].loops.main
    assert loop.sub_word_loads > 0 and any(name == "LDG.16" for name in loop.global_loads)


def test_loop_report_rows(compiled):
    report = aot.loop_report([compiled["gemm_reference[128x64x32]"]], (80, 90))
    assert [e["sm"] for e in report] == [80, 90]
    on90 = report[1]
    assert on90["gpu_sms"] == 132 and report[0]["gpu_sms"] == 108
    # grid: 4096/128 = 32 programs on 132 SMs x CTAs per SM
    (use,) = on90["uses"]
    assert use["programs"] == 32
    assert use["waves"] == pytest.approx(32 / (132 * on90["ctas_per_sm"]), abs=1e-3)
    assert on90["k_loops"][0]["wgmma_async"] and on90["k_loops"][0]["mma"] == "HGMMA.64x64x16.F32"
    text = aot.format_loop_table(report)
    assert "HGMMA.64x64x16.F32" in text and "async(1)" in text and "static analysis" in text
