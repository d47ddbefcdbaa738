"""Every kernel configuration the plan chooses compiles for real GPUs (sm_80, sm_90) with zero
register spills and shared memory within each architecture's limit — checked without a GPU by
compiling the KernelCalls a forward records on meta tensors (``fastres aot``). Each architecture
compiles the tiles the rule picks for its own GPU (A100: 108 SMs, H100: 132; kernels/_target.py)."""
import io

import pytest

from fastres import aot
from fastres.plan_report import record_plan_launches

SMS = (80, 90)
# fp16: resnet50 at every batch the wave rule is pinned for, resnext50 at 1, 32, 256; bf16 (whose
# tl.dot the interpreter cannot check) at the largest batch, whose tiles are the largest.
LABELS = ([("resnet50", batch, "fp16") for batch in (1, 8, 32, 64, 128, 256)]
          + [("resnext50_32x4d", batch, "fp16") for batch in (1, 32, 256)]
          + [(arch, 256, "bf16") for arch in ("resnet50", "resnext50_32x4d")])


def plan_calls(labels, sms=SMS):
    """({label: calls}, {label: sm}): each label recorded with the tiles its target GPU gets."""
    calls, targets = {}, {}
    for sm in sms:
        for arch, batch, dtype in labels:
            label = f"{arch} b{batch} {dtype} sm{sm}"
            calls[label] = record_plan_launches(arch, batch, 224, dtype, sm=sm)
            targets[label] = sm
    return calls, targets


@pytest.fixture(scope="module")
def rows():
    calls, targets = plan_calls(LABELS)
    return aot.aot_report(calls, sms=SMS, targets=targets)


def test_every_plan_configuration_compiles_without_spills(rows):
    out = io.StringIO()
    status = aot.print_report(rows, SMS, file=out)
    print(out.getvalue())
    problems = [(row.kernel, row.problems()) for row in rows if row.problems()]
    assert status == 0 and not problems, problems
    for row in rows:
        assert row.resources
        for sm, res in row.resources.items():
            assert res.spill_bytes == 0 and res.registers <= 255
            assert res.shared_bytes <= aot.SHARED_MEMORY_LIMIT[sm]


def test_every_recorded_kernel_is_covered(rows):
    kernels = {row.kernel.split("[")[0] for row in rows}
    assert {"conv2d_nhwc", "max_pool2d_nhwc", "avgpool_linear"} <= kernels
    used_by = {label for row in rows for label, _ in row.uses}
    assert len(used_by) == len(LABELS) * len(SMS)
    # every configuration compiled exactly for the targets whose plans use it
    for row in rows:
        assert set(row.resources) == {int(label.rsplit("sm", 1)[1]) for label, _ in row.uses}
