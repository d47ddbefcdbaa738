"""The TMA-descriptor GEMM of the kernel lab (bench/tma_gemm_lab.py): exact math under the interpreter
(descriptor loads with out-of-bounds zero fill), and on sm_90 one UTMALDG per operand tile."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from bench.tma_gemm_lab import conv1x1_tma, tma_gemm_call  # noqa: E402
from fastres import aot  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("n,c,c_out,h,w", [(2, 64, 128, 7, 7), (1, 256, 64, 13, 11), (3, 128, 256, 5, 9)])
def test_tma_conv1x1_matches_conv2d(n, c, c_out, h, w):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=gen).to(DEVICE).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(c_out, c, 1, 1, generator=gen) / math.sqrt(c)).to(DEVICE)
    bias = torch.randn(c_out, generator=gen).to(DEVICE)
    # M = n*h*w is not a multiple of the 64-row tile: the last tile's rows come zero-filled
    out = conv1x1_tma(x, weight, bias, block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=2)
    ref = F.conv2d(x.double(), weight.double(), bias.double()).relu()
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert (out.double() - ref).abs().max().item() <= 1e-6 * math.sqrt(c) + 1e-4 * ref.abs().max().item()


def test_tma_loads_compile_to_utmaldg_on_sm90():
    meta = dict(device="meta", dtype=torch.float16)
    x2d, w = torch.empty(12544, 512, **meta), torch.empty(512, 2048, **meta)
    call = tma_gemm_call(x2d, w, torch.empty(2048, device="meta"), torch.empty(12544, 2048, **meta))
    (row,) = aot.aot_report({"lab": [call]}, (90,))
    res = row.resources[90]
    assert not res.error and res.spill_bytes == 0, res.error
    (loop,) = res.loops.k_loops
    assert "UTMALDG" in loop.global_loads and not any(k.startswith(("LDG.", "LDGSTS")) for k in loop.global_loads)
    assert loop.mma.startswith("HGMMA.64x128x16") and loop.wgmma_async
