"""The static loop report of every kernel the resnet50 plan launches (fastres aot --loop-stats).

Pins what the compiled K loops look like on sm_80 and sm_90 (static analysis of the SASS, see
fastres/sass.py), against a plain Triton GEMM with the same tiles (bench/gemm_reference.py):

* no scalar (1- or 2-byte) global load in any K loop;
* on sm_90 every K loop of a 16-bit kernel issues asynchronous wgmma (one group in flight);
* the 8-bit convolutions (resnet50's int8 and fp8 plans) stream both operands with 16-byte
  cp.async (their weights packed K-major); sm_90 fp8 wgmma is asynchronous, int8's synchronous
  (triton 3.8's wgmma pipeliner keeps only fp32 accumulators in flight); their K steps are
  within 1.5x of a plain Triton 8-bit GEMM's with the same tiles;
* the stem's K step costs at most 2x the plain GEMM's instructions, and <= 100 on sm_90;
* the fused 3x3 -> 1x1's 3x3 loop is a plain GEMM's (128 rows, 16-byte cp.async, within 2x);
* the sm_90 TMA loops (1x1 GEMMs; 3x3 over spatial tiles, resnet18) load with UTMALDG; concat-K
  behind a 1x1 or a 3x3 is one K loop.

The plan configurations are the ones tests/test_plan_aot.py compiles (same labels): fastres.aot
caches compiled results in-process, so in one pytest run they are compiled once.
"""
import pytest
import torch
from test_plan_aot import plan_calls

from bench.gemm_reference import gemm_reference_call
from fastres import aot
from fastres.kernels.conv2d_nhwc import CONV_CONFIGS, CONV_CTAS_PER_SM

SMS = (80, 90)
LABELS = [("resnet50", 1, "fp16"), ("resnet50", 256, "fp16"), ("resnet50", 256, "bf16")]   # in test_plan_aot's
# Kernels with an sm_90 K loop still synchronous (wgmma waited on in the same step, or mma.sync):
# none. A kernel listed here is exempt, and the test below fails once it becomes async, so an
# exception cannot outlive its defect.
KNOWN_SYNC_WGMMA = set()
# The same for the 8-bit plans, by operand type: triton 3.8 refuses to keep a wgmma with an int32
# accumulator in flight ("Can't make dot async because the accumulator is not fp32", its
# triton-wgmma-pipeline debug log), so int8 loops wait on every step whatever the layout.
KNOWN_SYNC_8BIT = {"int8"}
LABELS_8BIT = [("resnet50", 256, "int8")]
LABELS_FP8 = [("resnet50", 256, "fp8")]          # fp8 tensor cores: sm_89+


@pytest.fixture(scope="module")
def plan_rows():
    calls, targets = plan_calls(LABELS)
    return aot.aot_report(calls, SMS, targets=targets)


@pytest.fixture(scope="module")
def plan_rows_8bit():
    calls, targets = plan_calls(LABELS_8BIT)
    fp8_calls, fp8_targets = plan_calls(LABELS_FP8, sms=(90,))
    return aot.aot_report({**calls, **fp8_calls}, SMS, targets={**targets, **fp8_targets})


@pytest.fixture(scope="module")
def stem_and_reference(plan_rows):
    (stem,) = [row for row in plan_rows if row.kernel.startswith("conv2d_nhwc[7x7") and row.dtypes.startswith("fp16")
               and any("b256" in label and "sm90" in label for label, _ in row.uses)]
    cfg = dict(item.split("=") for item in stem.config.split() if "=" in item)
    warps, stages = (int(item[1:]) for item in stem.config.split()[-2:])
    reference = gemm_reference_call(256 * 112 * 112, 64, 7 * 32, block_m=int(cfg["BLOCK_M"]),
                                    block_n=int(cfg["BLOCK_N"]), block_k=int(cfg["BLOCK_K"]), num_warps=warps,
                                    num_stages=stages)
    (ref_row,) = aot.aot_report({"reference": [reference]}, SMS)
    if set(stem.resources) != set(SMS):     # the sm_80 plan picked another stem tile: compile this one there too
        (stem,) = aot.aot_report({"stem": [c for c in _stem_calls()]}, SMS)
    return stem, ref_row


def _stem_calls():
    calls, _ = plan_calls([("resnet50", 256, "fp16")], sms=(90,))
    return [c for c in next(iter(calls.values())) if c.name.startswith("conv2d_nhwc[7x7")]


def _loops(row, sm):
    """The K loops of a configuration (an unrolled one averaged per step); a single K step is no loop."""
    if sm not in row.resources:
        return []
    loops = aot._per_step(row.resources[sm].loops.k_loops, row.k_steps)
    return [loop for loop in loops if not (loop.region and row.k_steps == 1)]


def test_no_scalar_global_loads_in_any_k_loop(plan_rows):
    checked = 0
    for row in plan_rows:
        for sm in SMS:
            for loop in _loops(row, sm):
                assert loop.sub_word_loads == 0, (row.kernel, row.config, sm, loop.global_loads)
                checked += 1
    assert checked >= 2 * 10


def test_sm90_k_loops_of_16_bit_kernels_use_async_wgmma(plan_rows):
    still_sync = set()
    for row in plan_rows:
        # the convolutions; the head (avgpool_linear) is a GEMV of M = batch rows, below wgmma's 64
        if not row.dtypes.startswith(("fp16", "bf16")) or not row.kernel.startswith("conv"):
            continue
        for loop in _loops(row, 90):
            if not loop.mma_count:
                continue
            family = row.kernel.split("[")[0]
            if family in KNOWN_SYNC_WGMMA:
                if not loop.wgmma_async:
                    still_sync.add(family)
                continue
            assert loop.wgmma, (row.kernel, loop.mma)
            assert loop.wgmma_async and loop.wgmma_in_flight == 1, (row.kernel, row.config, loop.summary())
    assert still_sync == KNOWN_SYNC_WGMMA, f"now async: {KNOWN_SYNC_WGMMA - still_sync}; drop them from the list"


def test_stem_loop_is_a_gemm_loop(stem_and_reference):
    stem, reference = stem_and_reference
    assert stem.kernel == "conv2d_nhwc[7x7/s2/rowk]"
    for sm in SMS:
        (loop,) = _loops(stem, sm)
        (ref,) = _loops(reference, sm)
        assert loop.mma == ref.mma and loop.mma_count == ref.mma_count, (loop.summary(), ref.summary())
        assert set(loop.global_loads) <= {"LDGSTS.128", "LDG.64"}, loop.global_loads
        assert loop.global_loads.get("LDGSTS.128", 0) == ref.global_loads["LDGSTS.128"]
        assert loop.instructions <= 2 * ref.instructions, (sm, loop.summary(), ref.summary())
    on90 = _loops(stem, 90)[0]
    assert on90.instructions <= 100 and on90.wgmma_async and on90.wgmma_in_flight == 1
    assert stem.resources[90].spill_bytes == 0 and stem.resources[80].spill_bytes == 0


def test_concat_k_shortcut_is_one_k_loop(plan_rows):
    """The bottleneck's last 1x1 with its projection shortcut: one K loop (one pipeline fill), 16-byte
    cp.async for both operands, async wgmma on sm_90."""
    rows = [row for row in plan_rows if row.kernel.startswith("conv2d_nhwc[1x1/s1+sc")]
    assert len(rows) >= 4
    for row in rows:
        for sm in row.resources:
            loops = _loops(row, sm)
            assert len(loops) == 1, (row.kernel, sm, [loop.summary() for loop in loops])
            assert set(loops[0].global_loads) == {"LDGSTS.128"}, loops[0].global_loads
        if 90 in row.resources:
            assert _loops(row, 90)[0].wgmma_async


def test_conv_ctas_per_sm_table_matches_the_compiled_kernels(plan_rows):
    """The wave rule's CONV_CTAS_PER_SM is what the compiled 16-bit conv kernels get (the most common
    value over the kernels using each tile), so the rule counts waves with real occupancies."""
    import collections

    from fastres import sass
    seen = collections.defaultdict(collections.Counter)
    for row in plan_rows:
        if not row.kernel.startswith("conv2d_nhwc") or not row.dtypes.startswith(("fp16", "bf16")):
            continue
        cfg = dict(item.split("=") for item in row.config.split() if "=" in item)
        name = next((n for n in ("tc_wide", "tc_narrow", "tc_small_m")
                     if int(cfg["BLOCK_M"]) == CONV_CONFIGS[n].BLOCK_M and row.num_warps == CONV_CONFIGS[n].num_warps
                     and int(cfg["BLOCK_N"]) <= CONV_CONFIGS[n].BLOCK_N), None)
        if name is None or int(cfg["BLOCK_N"]) != CONV_CONFIGS[name].BLOCK_N or cfg.get("ROW_K") == "T":
            continue
        for sm, r in row.resources.items():
            ctas = sass.ctas_per_sm(sm, r.registers, r.shared_bytes, row.num_warps)
            seen[name, sm][ctas] += 1
    typical = {key: counts.most_common(1)[0][0] for key, counts in seen.items()}
    assert {key: CONV_CTAS_PER_SM[key] for key in seen} == typical, dict(seen)
    assert len(seen) >= 4, seen


def test_fused_3x3_1x1_loops_are_gemm_loops(plan_rows):
    """The fused bottleneck 3x3 -> 1x1 on sm_90 at batch 256: 128-row tiles whose 3x3 K loop is a
    plain GEMM's (16-byte cp.async only, async wgmma with one group in flight, within 2x of the
    plain GEMM's instructions per step with the same tiles); at least 2 CTAs/SM where no
    256-channel shortcut tile is held."""
    from fastres import sass
    rows = [row for row in plan_rows if row.kernel.startswith("conv3x3_conv1x1_nhwc") and 90 in row.resources
            and any("b256" in label for label, _ in row.uses)]
    assert len(rows) >= 4, [row.kernel for row in rows]
    for row in rows:
        cfg = dict(item.split("=") for item in row.config.split() if "=" in item)
        assert cfg["BLOCK_M"] == "128" and row.num_warps == 8, row.config
        (loop,) = _loops(row, 90)
        reference = gemm_reference_call(256 * 56 * 56, int(cfg["MID_BLOCK"]), 9 * int(cfg["C_MID_IN"]), block_m=128,
                                        block_n=int(cfg["MID_BLOCK"]), block_k=int(cfg["BLOCK_K"]), num_warps=8,
                                        num_stages=3, dtype=getattr(torch, row.dtypes.split(",")[0].replace("bf", "bfloat")
                                                                    .replace("fp", "float")))
        (ref_row,) = aot.aot_report({"reference": [reference]}, (90,))
        (ref,) = _loops(ref_row, 90)
        assert loop.mma == ref.mma and loop.wgmma_async and loop.wgmma_in_flight == 1, (loop.summary(), ref.summary())
        assert set(loop.global_loads) == {"LDGSTS.128"} and not loop.shared_stores, loop.summary()
        assert loop.instructions <= 2 * ref.instructions, (row.kernel, loop.summary(), ref.summary())
        r = row.resources[90]
        if int(cfg["C_SC"]) < 256:
            assert sass.ctas_per_sm(90, r.registers, r.shared_bytes, row.num_warps) >= 2, (row.kernel, r.registers)
        print(row.kernel, loop.summary(), "| reference:", ref.summary())


def test_sm90_tma_loops_load_tiles_with_utmaldg(plan_rows):
    """The compute-bound 1x1 GEMMs the rule gives TMA descriptors on sm_90 (batch 256): their K loop
    loads each operand tile with one UTMALDG (no per-thread loads), async wgmma, 0 spills; sm_80
    plans never use it."""
    rows = [row for row in plan_rows if "TMA=T" in row.config.split()]
    assert len(rows) >= 4, [row.kernel for row in rows]
    for row in rows:
        assert set(row.resources) == {90}, (row.kernel, set(row.resources))
        (loop,) = _loops(row, 90)
        assert loop.global_loads == {"UTMALDG": 2}, loop.summary()
        assert loop.wgmma_async and loop.wgmma_in_flight == 1, loop.summary()
        assert row.resources[90].spill_bytes == 0


@pytest.fixture(scope="module")
def resnet18_rows():
    calls, targets = plan_calls([("resnet18", 256, "fp16")])
    return aot.aot_report(calls, SMS, targets=targets)


def test_concat_k_behind_a_3x3_is_one_k_loop(resnet18_rows):
    """BasicBlock's second 3x3 with its projection shortcut (resnet18 layer2-4 .0): the shortcut
    steps join the tap-major loop (one pipeline fill), 16-byte cp.async, async wgmma on sm_90."""
    rows = [row for row in resnet18_rows if row.kernel.startswith("conv2d_nhwc[3x3/s1+sc")]
    assert len(rows) >= 3 * len(SMS) // 2, [row.kernel for row in rows]
    for row in rows:
        for sm in row.resources:
            loops = _loops(row, sm)
            assert len(loops) == 1, (row.kernel, sm, [loop.summary() for loop in loops])
            assert set(loops[0].global_loads) == {"LDGSTS.128"}, loops[0].global_loads
            assert row.resources[sm].spill_bytes == 0
        if 90 in row.resources:
            assert _loops(row, 90)[0].wgmma_async


def test_sm90_3x3_tma_loops_load_boxes_with_utmaldg(resnet18_rows):
    """The stride-1 3x3 convs the rule gives spatial M tiles on sm_90 (resnet18 layer1-2 at batch 256):
    each K step loads one 4-D box of the input and one weight tile with UTMALDG (no per-thread loads,
    no padding predicates), async wgmma with one group in flight, 0 spills (as every configuration of
    the resnet18 plan on both architectures), and fewer instructions and predicate ops per
    step than the cp.async tap-major loop of the same tiles (its epilogue without the residual: the K
    loop does not depend on it); sm_80 keeps cp.async."""
    import dataclasses

    from fastres.kernels import conv2d_nhwc as conv_module
    from fastres.kernels._target import use_target
    assert not [(row.kernel, row.problems()) for row in resnet18_rows if row.problems()]   # 0 spills, sm_80 and sm_90
    rows = [row for row in resnet18_rows if "TMA=T" in row.config.split()]
    assert {row.config.split("TILE_IMGS=")[1].split()[0] for row in rows} == {"2", "8"}, [r.config for r in rows]
    meta = dict(device="meta", dtype=torch.float16)
    for row in rows:
        assert set(row.resources) == {90} and row.resources[90].spill_bytes == 0, (row.kernel, set(row.resources))
        (loop,) = _loops(row, 90)
        assert loop.global_loads == {"UTMALDG": 2}, loop.summary()
        assert loop.wgmma_async and loop.wgmma_in_flight == 1, loop.summary()
        cfg = dict(item.split("=") for item in row.config.split() if "=" in item)
        c, hw = int(cfg["C_IN"]), {64: 56, 128: 28}[int(cfg["C_IN"])]
        x = torch.empty(256, c, hw, hw, **meta).contiguous(memory_format=torch.channels_last)
        out, packed = torch.empty_like(x), conv_module.pack_conv_weight(torch.empty(c, c, 3, 3, **meta))
        with use_target(90):
            tma = conv_module.conv_config(256 * hw * hw, c, 1, c, False, torch.float16, "cuda",
                                          spatial=(256, hw, hw, 9))
            assert tma.TILE and tma.BLOCK_M == int(cfg["BLOCK_M"]) and tma.BLOCK_N == int(cfg["BLOCK_N"])
            twin = conv_module._build_call(x, packed, out, bias=torch.empty(c, device="meta"), stride=(1, 1),
                                           padding=(1, 1), dilation=(1, 1), residual=None, relu=True, shortcut=None,
                                           shortcut_stride=1, config=dataclasses.replace(tma, TMA=False, TILE=()))
        (twin_row,) = aot.aot_report({"cp.async": [twin]}, (90,))
        (cp_async,) = _loops(twin_row, 90)
        assert set(cp_async.global_loads) == {"LDGSTS.128"}
        assert loop.instructions < cp_async.instructions, (loop.summary(), cp_async.summary())
        assert loop.predicate_ops < cp_async.predicate_ops, (loop.summary(), cp_async.summary())
        print(row.kernel, row.config.split("TMA=")[1], loop.summary(), "| cp.async:", cp_async.summary())


def _8bit_conv_loops(rows):
    """(row, sm, operand type, main K loop) of every 8-bit convolution with a K loop."""
    found = []
    for row in rows:
        if not row.kernel.startswith("conv2d_nhwc") or not row.kernel.endswith(("/int8]", "/e4m3]")):
            continue
        for sm in row.resources:
            loops = [loop for loop in _loops(row, sm) if loop.mma_count]
            if loops:
                found.append((row, sm, "e4m3" if row.kernel.endswith("/e4m3]") else "int8",
                              max(loops, key=lambda loop: loop.mma_count)))
    return found


def test_8bit_k_loops_stream_both_operands_with_cp_async(plan_rows_8bit):
    """K-major 8-bit weights: no operand of an 8-bit K loop passes through registers (an N-major B
    was an LDG + shared-memory store per step, outside the pipeline); sm_90 issues wgmma, async for
    e4m3 with one group in flight, and int8 stays in KNOWN_SYNC_8BIT until triton keeps int32
    accumulators in flight (the test then fails: drop it from the list and pin it async)."""
    loops = _8bit_conv_loops(plan_rows_8bit)
    assert {(sm, kind) for _, sm, kind, _ in loops} == {(80, "int8"), (90, "int8"), (90, "e4m3")}
    still_sync = set()
    for row, sm, kind, loop in loops:
        what = (row.kernel, row.config, sm, loop.summary())
        assert row.resources[sm].spill_bytes == 0, what
        assert all(name.startswith("LDGSTS.") for name in loop.global_loads), what
        if "rowk" not in row.kernel:        # the stem's 28-byte rows are 8-byte aligned
            assert set(loop.global_loads) == {"LDGSTS.128"}, what
        assert not loop.shared_stores, what
        if sm != 90:
            continue
        assert loop.wgmma, what
        if kind in KNOWN_SYNC_8BIT:
            still_sync |= {kind} if not loop.wgmma_async else set()
        else:
            assert loop.wgmma_async and loop.wgmma_in_flight == 1, what
    assert still_sync == KNOWN_SYNC_8BIT, f"now async: {KNOWN_SYNC_8BIT - still_sync}; drop them from the list"


@pytest.mark.parametrize("kind", ["int8", "e4m3"])
def test_8bit_3x3_k_step_is_a_plain_gemm_step(plan_rows_8bit, kind):
    """The unfused tap-major 3x3 of layer3-4 (8-bit, sm_90) against a plain Triton 8-bit GEMM with
    the same tiles and a K-major B: the same wgmma, at most 2x its instructions per K step (as the
    fused 3x3 is pinned; the padding tests of the tap-major loop cost ~40 instructions)."""
    dtype = torch.int8 if kind == "int8" else torch.float8_e4m3fn
    checked = 0
    for row, sm, k, loop in _8bit_conv_loops(plan_rows_8bit):
        if sm != 90 or k != kind or not row.kernel.startswith("conv2d_nhwc[3x3/s1/"):
            continue
        cfg = dict(item.split("=") for item in row.config.split() if "=" in item)
        warps, stages = (int(item[1:]) for item in row.config.split()[-2:])
        reference = gemm_reference_call(256 * 56 * 56, int(cfg["BLOCK_N"]), 9 * int(cfg["C_IN"]), dtype=dtype,
                                        block_m=int(cfg["BLOCK_M"]), block_n=int(cfg["BLOCK_N"]),
                                        block_k=int(cfg["BLOCK_K"]), num_warps=warps, num_stages=stages,
                                        b_k_major=True)
        (ref_row,) = aot.aot_report({"reference": [reference]}, (90,))
        (ref,) = _loops(ref_row, 90)
        assert loop.mma == ref.mma and loop.wgmma_async == ref.wgmma_async, (loop.summary(), ref.summary())
        assert loop.instructions <= 2 * ref.instructions, (row.kernel, row.config, loop.summary(), ref.summary())
        print(row.kernel, row.config, loop.summary(), "| reference:", ref.summary())
        checked += 1
    assert checked >= 1
