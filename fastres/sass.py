"""Static analysis of compiled kernels: the main K loop of a cubin, read from its SASS.

``fastres aot --loop-stats`` uses this to say, without a GPU, whether a kernel's main loop looks
like a good GEMM's: how many SASS instructions one K step costs, which tensor-core instruction
(and shape) it issues, how wide its global loads are, whether Hopper's wgmma runs asynchronously
(and how many groups it keeps in flight), how many shared-memory stages the pipeline has, and
what occupancy and how many waves a launch gets. Every figure is *static*: read off the code, not
measured; the occupancy and wave counts are the CUDA occupancy rules applied to the kernel's
registers and shared memory.

The SASS comes from ``nvdisasm -c`` (shipped in the triton wheel). A loop is a backward branch:
``BRA`` to a label at a lower address; a K loop is an innermost loop that issues MMA
instructions (HGMMA/HMMA/IMMA...). Triton does not unroll its K loops, so one trip of the loop
body is one BLOCK_K step.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import re
import subprocess
import tempfile

# Tensor-core instructions: Hopper warpgroup MMA (fp16/bf16, fp8, int8) and warp-level mma.sync.
MMA_OPCODES = ("HGMMA", "QGMMA", "IGMMA", "HMMA", "IMMA")
# Global memory loads and stores (LDGSTS = cp.async global -> shared; UTMALDG = TMA tile load).
GLOBAL_LOADS = ("LDG", "LDGSTS", "UTMALDG")
GLOBAL_STORES = ("STG", "UTMASTG")
PREDICATE_OPCODES = ("ISETP", "PLOP3", "FSETP", "P2R", "R2P", "PSETP")

# Per SM: register file, max resident warps and CTAs, shared memory (bytes, including the 1 KiB
# the driver reserves per CTA) - the CUDA occupancy calculator's figures for these architectures.
SM_LIMITS = {
    80: dict(registers=65536, warps=64, ctas=32, shared=167936),
    86: dict(registers=65536, warps=48, ctas=16, shared=102400),
    89: dict(registers=65536, warps=48, ctas=24, shared=102400),
    90: dict(registers=65536, warps=64, ctas=32, shared=233472),
}
SHARED_RESERVED_PER_CTA = 1024
REGISTER_ALLOCATION_UNIT = 256     # registers are allocated per warp in units of 256
# SM counts of the GPUs a launch is sized for (H100 SXM5, A100 SXM4), keyed by architecture.
GPU_SMS = {90: 132, 80: 108}

_LINE = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(@!?U?P[T0-9])?\s*([A-Z][A-Za-z0-9_.]*)\s*(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")
_WGMMA_WAIT = re.compile(r"gsb0,\s*0x([0-9a-f]+)")


@dataclasses.dataclass(frozen=True)
class Instruction:
    address: int
    predicate: str      # "" or "@P0", "@!P1", ...
    opcode: str         # with modifiers, e.g. "LDGSTS.E.BYPASS.128"
    operands: str

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]


def parse(text: str) -> tuple[list[Instruction], dict[str, int]]:
    """Instructions of ``nvdisasm -c`` output, and each label's instruction index."""
    instructions: list[Instruction] = []
    labels: dict[str, int] = {}
    for line in text.splitlines():
        label = _LABEL.match(line)
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        m = _LINE.match(line)
        if m:
            instructions.append(Instruction(int(m.group(1), 16), m.group(2) or "", m.group(3), m.group(4)))
    return instructions, labels


def loops(instructions: list[Instruction], labels: dict[str, int]) -> list[tuple[int, int]]:
    """(first, last) instruction indices of every loop: a BRA to a label at or before it.

    Self-branches (``BRA`` to itself: the trap loop at a kernel's end) are not loops.
    """
    found = []
    for i, ins in enumerate(instructions):
        if ins.base != "BRA":
            continue
        target = _TARGET.search(ins.operands)
        if target and target.group(1) in labels and labels[target.group(1)] < i:
            found.append((labels[target.group(1)], i))
    return found


def access_bytes(ins: Instruction) -> int:
    """Bytes per thread of a global load/store: .128 -> 16, .64 -> 8, .U16/.S16 -> 2, .U8/.S8 -> 1, else 4.

    A TMA instruction (UTMALDG/UTMASTG) moves a whole tile; it reports 0 here.
    """
    if ins.base in ("UTMALDG", "UTMASTG"):
        return 0
    mods = ins.opcode.split(".")[1:]
    for mod in reversed(mods):
        if mod in ("128", "64"):
            return int(mod) // 8
        if mod in ("U16", "S16"):
            return 2
        if mod in ("U8", "S8"):
            return 1
    return 4


def _access_name(ins: Instruction) -> str:
    nbytes = access_bytes(ins)
    return f"{ins.base}.{nbytes * 8}" if nbytes else ins.base


def _mma_name(ins: Instruction) -> str:
    """The MMA instruction with its shape and types, e.g. "HGMMA.64x128x16.F32" or "HMMA.16816.F32"."""
    return ins.opcode


@dataclasses.dataclass
class LoopStats:
    """One K loop: its instructions per K step and what they are."""
    instructions: int                       # SASS instructions per trip (= per BLOCK_K step)
    mma: str                                # most frequent MMA opcode, e.g. "HGMMA.64x64x16.F32"
    mma_count: int                          # MMA instructions per step
    global_loads: dict                      # {"LDGSTS.128": 2, "LDG.16": 32, "UTMALDG": 1}
    shared_stores: int                      # STS* per step (register-staged operands)
    predicate_ops: int                      # ISETP/PLOP3/FSETP... per step
    wgmma: bool                             # issues warpgroup MMA (sm_90)
    wgmma_in_flight: int | None             # N of the step's last `WARPGROUP.DEPBAR.LE gsb0, N`; 0 = synchronous
    unrolled: int = 0                       # K steps of a fully unrolled K loop this averages over, else 0
    region: bool = False                    # an unrolled straight-line region, not a loop

    def per_step(self, steps: int) -> "LoopStats":
        """This region's counts divided by ``steps`` (an unrolled region whose step count the SASS
        does not show: mma.sync code has no per-step commit)."""
        if steps <= 1:
            return self
        div = lambda n: round(n / steps)  # noqa: E731
        return dataclasses.replace(
            self, instructions=div(self.instructions), mma_count=div(self.mma_count),
            global_loads={k: div(v) for k, v in self.global_loads.items()}, shared_stores=div(self.shared_stores),
            predicate_ops=div(self.predicate_ops), unrolled=steps)

    @property
    def sub_word_loads(self) -> int:
        """Global loads narrower than 4 bytes per thread (scalar 1- or 2-byte gathers)."""
        return sum(n for name, n in self.global_loads.items() if name.endswith((".8", ".16")))

    @property
    def narrow_loads(self) -> int:
        """Global loads narrower than 16 bytes per thread (TMA counts as wide)."""
        return sum(n for name, n in self.global_loads.items() if name.split(".")[-1] in ("8", "16", "32", "64"))

    @property
    def wgmma_async(self) -> bool:
        return self.wgmma and bool(self.wgmma_in_flight)

    def summary(self) -> str:
        loads = " ".join(f"{k}x{v}" for k, v in sorted(self.global_loads.items()))
        mode = ""
        if self.wgmma:
            mode = f" async({self.wgmma_in_flight})" if self.wgmma_async else " sync"
        unrolled = f" (unrolled, {self.unrolled} steps)" if self.unrolled else ""
        return f"{self.instructions} instr/step{unrolled}, {self.mma_count}x {self.mma}{mode}, loads {loads or '-'}"


@dataclasses.dataclass
class KernelStats:
    """The static loop report of one compiled kernel."""
    k_loops: list                           # LoopStats of every innermost MMA loop, in program order
    global_stores: dict                     # whole kernel: {"STG.128": 8}
    instructions: int                       # whole kernel

    @property
    def main(self) -> LoopStats | None:
        """The loop with the most MMA instructions per step (the first such one on ties)."""
        return max(self.k_loops, key=lambda loop: loop.mma_count) if self.k_loops else None


def _count(names) -> dict:
    return dict(collections.Counter(names))


def loop_stats(instructions: list[Instruction], first: int, last: int) -> LoopStats:
    body = instructions[first:last + 1]
    mmas = [ins for ins in body if ins.base in MMA_OPCODES]
    waits = [int(m.group(1), 16) for ins in body if ins.opcode.startswith("WARPGROUP.DEPBAR")
             for m in [_WGMMA_WAIT.search(ins.operands)] if m]
    wgmma = any(ins.base.endswith("GMMA") for ins in mmas)
    return LoopStats(
        instructions=len(body),
        mma=collections.Counter(_mma_name(ins) for ins in mmas).most_common(1)[0][0] if mmas else "",
        mma_count=len(mmas),
        global_loads=_count(_access_name(ins) for ins in body if ins.base in GLOBAL_LOADS),
        shared_stores=sum(ins.base == "STS" for ins in body),
        predicate_ops=sum(ins.base in PREDICATE_OPCODES for ins in body),
        wgmma=wgmma,
        # no wait inside the loop with wgmma issued there: the wait is outside, i.e. all in flight
        wgmma_in_flight=(waits[-1] if waits else None) if wgmma else None,
    )


def unrolled_stats(instructions: list[Instruction]) -> LoopStats | None:
    """A K loop that ptxas unrolled completely (a short constant trip count), averaged per step.

    wgmma code commits one group per K step (the step's last HGMMA carries ``gsb0``): the steps are
    the spans between consecutive commits. Where some commits are waited on with groups left in
    flight (``WARPGROUP.DEPBAR.LE gsb0, N``, N >= 1), the K loop is the first run of those, up to
    the commit whose wait drains it: wgmma issued after it (a fused kernel's straight-line
    epilogue GEMMs, each waited on at once) is no K step. mma.sync code shows no step boundary: the
    region from the first to the last MMA is returned with ``unrolled = 0`` (totals), for ``per_step``.
    """
    mma = [i for i, ins in enumerate(instructions) if ins.base in MMA_OPCODES]
    if not mma:
        return None
    commits = [i for i in mma if "gsb0" in instructions[i].operands]
    waits = []
    for k, c in enumerate(commits):
        end = commits[k + 1] if k + 1 < len(commits) else len(instructions)
        found = [int(m.group(1), 16) for ins in instructions[c:end] if ins.opcode.startswith("WARPGROUP.DEPBAR")
                 for m in [_WGMMA_WAIT.search(ins.operands)] if m]
        waits.append(found[0] if found else None)
    asynchronous = [k for k, n in enumerate(waits) if n]
    if asynchronous:
        # the run of async commits, and the one that drains it: the same accumulator and A operand kind
        first = last = asynchronous[0]
        step = _mma_operands(instructions[commits[first]])
        while last + 1 < len(commits) and waits[last] and _mma_operands(instructions[commits[last + 1]]) == step:
            last += 1
        commits = commits[first:last + 1]
    if len(commits) >= 2:
        stats = dataclasses.replace(loop_stats(instructions, commits[0] + 1, commits[-1]), region=True)
        return stats.per_step(len(commits) - 1) if len(commits) > 2 else dataclasses.replace(stats, unrolled=1)
    return dataclasses.replace(loop_stats(instructions, mma[0], mma[-1]), region=True)


def _mma_operands(ins: Instruction) -> tuple:
    """(accumulator register, whether A comes from shared memory) of an HGMMA: what its K steps share."""
    parts = [p.strip() for p in ins.operands.split(",")]
    return parts[0], len(parts) > 1 and parts[1].startswith("gdesc")


def kernel_stats(text: str) -> KernelStats:
    """The static loop report of one kernel from its ``nvdisasm -c`` text: its innermost MMA loops,
    or, when ptxas unrolled the K loop away, the unrolled region (``unrolled_stats``)."""
    instructions, labels = parse(text)
    found = loops(instructions, labels)
    innermost = [(a, b) for a, b in found
                 if not any((a, b) != (c, d) and a <= c and d <= b for c, d in found)]
    k_loops = [loop_stats(instructions, a, b) for a, b in sorted(innermost)
               if any(ins.base in MMA_OPCODES for ins in instructions[a:b + 1])]
    if not k_loops:
        k_loops = [stats for stats in [unrolled_stats(instructions)] if stats is not None]
    return KernelStats(k_loops=k_loops,
                       global_stores=_count(_access_name(i) for i in instructions if i.base in GLOBAL_STORES),
                       instructions=len(instructions))


def disassemble(cubin: bytes) -> str:
    """``nvdisasm -c`` of a cubin (the nvdisasm of the triton wheel)."""
    from triton import knobs
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([knobs.nvidia.nvdisasm.path, "-c", path], check=True, capture_output=True,
                              text=True).stdout


_STAGED_ALLOC = re.compile(r"ttg\.local_alloc\s*:\s*\(\)\s*->\s*!ttg\.memdesc<(\d+)x\d+x\d+x")


def shared_stages(ttgir: str) -> int:
    """Pipeline depth: the leading dimension of the multi-buffered operand tiles triton's pipeliner
    allocates in shared memory (``ttg.local_alloc : () -> memdesc<S x rows x cols>``), 1 if none."""
    return max((int(s) for s in _STAGED_ALLOC.findall(ttgir)), default=1)


def ctas_per_sm(sm: int, registers: int, shared_bytes: int, num_warps: int) -> int:
    """Resident CTAs per SM by the occupancy rules (registers, shared memory, warps, CTA slots)."""
    limits = SM_LIMITS[sm]
    per_warp = -(-max(registers, 1) * 32 // REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
    by_registers = limits["registers"] // (per_warp * num_warps)
    by_shared = limits["shared"] // (shared_bytes + SHARED_RESERVED_PER_CTA)
    return max(0, min(limits["ctas"], limits["warps"] // num_warps, by_registers, by_shared))


def waves(programs: int, ctas: int, sms: int) -> float:
    """How many full-GPU waves ``programs`` CTAs take at ``ctas`` resident per SM on ``sms`` SMs."""
    return programs / (max(ctas, 1) * sms)


def last_wave_idle(w: float) -> float:
    """Fraction of the GPU idle during the last wave (0 when the waves are whole)."""
    frac = w - int(w)
    return 0.0 if frac < 1e-9 else 1.0 - frac
