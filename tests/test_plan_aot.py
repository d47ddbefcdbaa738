"""Every kernel configuration the plan chooses compiles for real GPUs (sm_80, sm_90) with zero
register spills and shared memory within each architecture's limit — checked without a GPU by
compiling the KernelCalls a forward records on meta tensors (``fastres aot``)."""
import io

import pytest

from fastres import aot
from fastres.plan_report import record_plan_launches

ARCHS = ("resnet50", "resnext50_32x4d")
BATCHES = (1, 32, 256)


# fp16 at every batch; bf16 (whose tl.dot the interpreter cannot check) at the largest batch,
# whose tiles are the largest and so the likeliest to spill.
LABELS = [(arch, batch, "fp16") for arch in ARCHS for batch in BATCHES] + [
    (arch, BATCHES[-1], "bf16") for arch in ARCHS]


@pytest.fixture(scope="module")
def rows():
    calls = {f"{arch} b{batch} {dtype}": record_plan_launches(arch, batch, 224, dtype)
             for arch, batch, dtype in LABELS}
    return aot.aot_report(calls, sms=(80, 90))


def test_every_plan_configuration_compiles_without_spills(rows):
    out = io.StringIO()
    status = aot.print_report(rows, (80, 90), file=out)
    print(out.getvalue())
    problems = [(row.kernel, row.problems()) for row in rows if row.problems()]
    assert status == 0 and not problems, problems
    for row in rows:
        for sm in (80, 90):
            res = row.resources[sm]
            assert res.spill_bytes == 0 and res.registers <= 255
            assert res.shared_bytes <= aot.SHARED_MEMORY_LIMIT[sm]


def test_every_recorded_kernel_is_covered(rows):
    kernels = {row.kernel.split("[")[0] for row in rows}
    assert {"conv2d_nhwc", "max_pool2d_nhwc", "avgpool_linear"} <= kernels
    used_by = {label for row in rows for label, _ in row.uses}
    assert len(used_by) == len(LABELS)
