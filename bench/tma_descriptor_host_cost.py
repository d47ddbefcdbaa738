"""Host (CPU) cost of the TMA descriptors of one conv launch, per launch (not a GPU measurement).

A TMA launch of ``conv2d_nhwc`` passes two host-side ``TensorDescriptor`` objects; triton's
launcher then encodes each into a CUtensorMap (driver work this script cannot run without a GPU,
and a CUDA graph replay skips both). Compared: the descriptors as first shipped (a view of x, then
``from_tensor`` for x and for the weight, every launch) against now (x's described directly, the
weight's cached on the packed weight), and the whole ``_build_call`` of a TMA launch, on meta tensors.

    python bench/tma_descriptor_host_cost.py
"""
import timeit

import torch
from triton.tools.tensor_descriptor import TensorDescriptor

from fastres.kernels.conv2d_nhwc import ConvConfig, _build_call, _tma_descriptors, pack_conv_weight


def _us(fn, number=20000):
    return min(timeit.repeat(fn, number=number, repeat=7)) / number * 1e6


def main():
    x = torch.empty(256, 256, 56, 56, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    packed = pack_conv_weight(torch.empty(64, 256, 1, 1, dtype=torch.float16))
    cfg = ConvConfig(128, 64, 64, 8, 4, 4, TMA=True)

    def as_first_shipped():
        x2d = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
        return (TensorDescriptor.from_tensor(x2d, [cfg.BLOCK_M, cfg.BLOCK_K]),
                TensorDescriptor.from_tensor(packed.weight, [cfg.BLOCK_K, cfg.BLOCK_N]))

    meta = dict(device="meta", dtype=torch.float16)
    xm = torch.empty(256, 256, 56, 56, **meta).contiguous(memory_format=torch.channels_last)
    pm = pack_conv_weight(torch.empty(64, 256, 1, 1, **meta))
    out = torch.empty(256, 64, 56, 56, **meta).contiguous(memory_format=torch.channels_last)
    build = dict(bias=torch.empty(64, device="meta"), stride=(1, 1), padding=(0, 0), dilation=(1, 1), residual=None,
                 relu=True, shortcut=None, shortcut_stride=1)
    assert _build_call(xm, pm, out, **build).constexprs["TMA"]
    print("CPU host cost per TMA launch (us, best of 7):")
    print(f"  descriptors as first shipped (view + 2x from_tensor): {_us(as_first_shipped):6.2f}")
    print(f"  descriptors now (x direct, weight cached):            {_us(lambda: _tma_descriptors(x, packed, cfg)):6.2f}")
    print(f"  whole _build_call of the launch (meta tensors):       {_us(lambda: _build_call(xm, pm, out, **build), 2000):6.2f}")


if __name__ == "__main__":
    main()
