"""A roofline model of a plan: the time floor of each kernel launch on a named GPU.

    floor = max(FLOPs / peak(dtype), bytes / HBM bandwidth)

per launch, from the plan's own FLOP and (modelled) traffic counts (``fastres.plan_report``), and
summed over the launches. These are *modelled* lower bounds, not measurements: no launch overhead,
no tail waves, perfect caching inside a launch, peak clocks. Use them to see which launches are
memory-bound and how far a measured time is from the floor, never as a speed claim.

GPU figures are the vendors' public datasheet numbers (dense, i.e. without 2:4 sparsity):

* H100 SXM5: 989.4 TFLOPS fp16/bf16 tensor, 1978.9 TOPS int8, 1978.9 TFLOPS fp8, 66.9 TFLOPS fp32 (non-tensor),
  3.35 TB/s HBM3, 132 SMs (NVIDIA H100 Tensor Core GPU datasheet).
* H200 SXM: the H100's SM array and clocks (same tensor peaks), 4.8 TB/s HBM3e, 132 SMs
  (NVIDIA H200 Tensor Core GPU datasheet).
* A100 SXM4 80GB: 312 TFLOPS fp16/bf16 tensor, 624 TOPS int8, 19.5 TFLOPS fp32, 2.039 TB/s HBM2e,
  108 SMs, no fp8 tensor cores (NVIDIA A100 Tensor Core GPU datasheet).

fp32 uses the non-tensor fp32 peak: fastres' fp32 kernels run IEEE fp32 FMAs, not tf32.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    name: str
    fp16_tflops: float        # dense tensor-core fp16/bf16, fp32 accumulate
    int8_tops: float          # dense tensor-core int8
    fp32_tflops: float        # non-tensor fp32 FMA
    hbm_tb_s: float           # HBM bandwidth, TB/s (10^12 bytes/s)
    sms: int
    fp8_tflops: float = 0.0   # dense tensor-core fp8 (e4m3), fp32 accumulate; 0: no fp8 tensor cores


    def peak_flops(self, dtype: str) -> float:
        """FLOP/s for operands of ``dtype`` ("fp16", "bf16", "fp32", "int8", "fp8")."""
        peaks = {"fp16": self.fp16_tflops, "bf16": self.fp16_tflops, "fp32": self.fp32_tflops,
                 "int8": self.int8_tops}
        if self.fp8_tflops:
            peaks["fp8"] = self.fp8_tflops
        if dtype not in peaks:
            raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(peaks)}")
        return peaks[dtype] * 1e12


GPUS = {
    "h100": Gpu("H100 SXM5", fp16_tflops=989.4, int8_tops=1978.9, fp32_tflops=66.9, hbm_tb_s=3.35, sms=132,
                fp8_tflops=1978.9),
    "h200": Gpu("H200 SXM", fp16_tflops=989.4, int8_tops=1978.9, fp32_tflops=66.9, hbm_tb_s=4.8, sms=132,
                fp8_tflops=1978.9),
    "a100": Gpu("A100 SXM4 80GB", fp16_tflops=312.0, int8_tops=624.0, fp32_tflops=19.5, hbm_tb_s=2.039, sms=108),
}


def gpu(name: str) -> Gpu:
    if name not in GPUS:
        raise ValueError(f"unknown gpu {name!r}; choose from {', '.join(GPUS)}")
    return GPUS[name]


def floor_seconds(flops: float, nbytes: float, gpu_name: str, dtype: str) -> float:
    """The roofline floor of one launch: max(compute time at peak, traffic time at full bandwidth)."""
    g = gpu(gpu_name)
    return max(flops / g.peak_flops(dtype), nbytes / (g.hbm_tb_s * 1e12))


def bound(flops: float, nbytes: float, gpu_name: str, dtype: str) -> str:
    """"compute" or "memory": which side of the roofline the launch sits on."""
    g = gpu(gpu_name)
    return "compute" if flops / g.peak_flops(dtype) >= nbytes / (g.hbm_tb_s * 1e12) else "memory"


def plan_floor(rows: list[dict], gpu_name: str, dtype: str, batch: int) -> dict:
    """Per-launch floors and totals for ``fastres.plan_report.plan_rows`` rows (modelled)."""
    launches = [dict(name=row["name"], floor_us=floor_seconds(row["flops"], row["bytes"], gpu_name, dtype) * 1e6,
                     bound=bound(row["flops"], row["bytes"], gpu_name, dtype)) for row in rows]
    total = sum(launch["floor_us"] for launch in launches) * 1e-6
    return {"gpu": gpu(gpu_name).name, "dtype": dtype, "modelled": True, "launches": launches,
            "total_seconds": total, "images_per_second_ceiling": batch / total if total else float("inf"),
            "memory_bound_launches": sum(launch["bound"] == "memory" for launch in launches)}
