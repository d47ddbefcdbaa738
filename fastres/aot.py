"""Ahead-of-time compile checks: build every kernel configuration for real GPUs, without a GPU.

A forward run on ``device="meta"`` tensors inside ``fastres.kernels._launch.record_launches()``
yields the ``KernelCall`` list of a plan. For each call and each target architecture this module

1. specialises the call exactly as triton's launcher would (``specialize``): the signature types,
   the constexprs, the 16-divisibility attributes and the integers equal to 1 that triton turns
   into constants are all computed by triton's own launch-time binder (``native_specialize_impl``)
   over the recorded arguments. A meta tensor's ``data_ptr()`` is ``storage_offset * itemsize``, so
   a freshly allocated tensor gets the 16-byte alignment attribute, as a CUDA allocation (256-byte
   aligned) does, and an offset view gets what its offset gives it.
2. compiles it with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", sm, 32))``, results
   cached by triton under its cache directory (``~/.triton/cache`` or ``TRITON_CACHE_DIR``), so a
   second run only re-reads them;
3. reads the resources of the cubin: registers and stack bytes (spills) from
   ``cuobjdump --dump-resource-usage``, shared memory from the kernel metadata (triton's shared
   memory is dynamic; this is the number its launcher checks against the device), and whether
   the PTX issues ``wgmma`` (Hopper warpgroup MMA).

A configuration fails when it spills, needs more than 255 registers, exceeds the architecture's
shared-memory limit per block, or does not compile; ``run_aot`` prints the table and returns the
exit code the ``fastres aot`` command uses.

Compiles run in parallel in forked processes. Under ``TRITON_INTERPRET=1`` (where ``@triton.jit``
returns interpreter objects that cannot be compiled) they run in a fresh Python started without
it, which imports each kernel's module by name, or from its file when the name is not importable
there (test modules, scripts).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import multiprocessing
import os
import pickle
import re
import subprocess
import sys
import tempfile
from typing import Iterable, Mapping, Sequence

# Max dynamic shared memory per block (the opt-in limit triton's launcher checks), in bytes.
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
MAX_REGISTERS = 255
DEFAULT_SMS = (80, 90)


@dataclasses.dataclass(frozen=True)
class CompileSpec:
    """Everything ``triton.compile`` needs for one kernel configuration, as plain picklable data.

    ``signature``/``constexprs``/``attrs`` are in ``ASTSource``'s format, as tuples of items:
    signature ``(("x_ptr", "*fp16"), ("N", "i32"), ("BLOCK", "constexpr"), ...)`` in parameter
    order; constexprs ``(((index,), value), ...)`` keyed by the parameter's index path; attrs
    ``(((index,), (("tt.divisibility", 16),)), ...)`` (tuples here, lists again for ``ASTSource``).
    """
    kernel_module: str
    kernel_file: str
    kernel_name: str
    signature: tuple
    constexprs: tuple
    attrs: tuple
    num_warps: int
    num_stages: int
    options: tuple          # the full parsed triton options (arch-dependent) as (name, value) items
    sm: int

    @property
    def config_key(self) -> tuple:
        """Identity of a configuration across architectures (what deduplication compares)."""
        return (self.kernel_module, self.kernel_name, self.signature, self.constexprs, self.attrs,
                self.num_warps, self.num_stages)


@dataclasses.dataclass
class KernelResources:
    """What one configuration costs on one architecture (or why it did not compile)."""
    sm: int
    kernel_name: str
    registers: int = 0
    spill_bytes: int = 0            # cuobjdump STACK: per-thread stack frame, i.e. register spills
    local_bytes: int = 0            # cuobjdump LOCAL: local memory outside the stack frame
    shared_bytes: int = 0           # dynamic shared memory (kernel.metadata.shared)
    uses_wgmma: bool = False
    loops: object = None            # fastres.sass.KernelStats of the cubin (static loop report)
    stages: int = 0                 # shared-memory pipeline stages (fastres.sass.shared_stages)
    hash: str = ""                  # triton's compile hash
    cache_dir: str = ""             # where triton keeps this kernel's IR (ttgir, ptx) and cubin
    error: str = ""                 # compile failure, empty when it compiled

    def problems(self) -> list[str]:
        if self.error:
            return [f"sm_{self.sm}: does not compile: {self.error}"]
        found = []
        if self.spill_bytes or self.local_bytes:
            found.append(f"sm_{self.sm}: spills ({self.spill_bytes} B stack, {self.local_bytes} B local)")
        if self.registers > MAX_REGISTERS:
            found.append(f"sm_{self.sm}: {self.registers} registers > {MAX_REGISTERS}")
        limit = SHARED_MEMORY_LIMIT[self.sm]
        if self.shared_bytes > limit:
            found.append(f"sm_{self.sm}: {self.shared_bytes} B shared memory > {limit} B limit")
        return found


@dataclasses.dataclass
class AotRow:
    """One distinct configuration, the calls that use it, and its resources per architecture."""
    kernel: str                                     # the call's name, e.g. "avgpool_linear"
    dtypes: str                                     # pointer element types, e.g. "fp16,fp32"
    config: str                                     # constexprs, warps, stages
    num_warps: int = 4
    k_steps: int = 0                                # K steps of the call (KernelCall.info["k_steps"]) if known
    uses: list = dataclasses.field(default_factory=list)        # (label, shape) of each call
    programs: list = dataclasses.field(default_factory=list)    # grid size (CTAs) of each call
    resources: dict = dataclasses.field(default_factory=dict)   # sm -> KernelResources

    def problems(self) -> list[str]:
        return [p for sm in sorted(self.resources) for p in self.resources[sm].problems()]


# ---------------------------------------------------------------------------------------------
# Specialisation (in the calling process; works with or without the interpreter)

def _jit_function(kernel):
    """The ``JITFunction`` of a launched kernel, also when it was decorated under the interpreter."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    if isinstance(kernel, JITFunction):
        return kernel
    if isinstance(kernel, InterpretedFunction):
        # Same arguments as triton.jit would have passed (do_not_specialize and friends).
        return JITFunction(kernel.fn, **kernel.kwargs)
    raise TypeError(f"aot: KernelCall.kernel must be a @triton.jit function, got {type(kernel).__name__}")


@functools.lru_cache(maxsize=None)
def _launcher_parts(kernel, sm: int):
    """(JITFunction, backend, binder) as the launcher builds them per device; built once per kernel."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    fn = _jit_function(kernel)
    backend = make_backend(GPUTarget("cuda", sm, 32))
    return fn, backend, create_function_from_signature(fn.signature, fn.params, backend)


def specialize(call, sm: int) -> CompileSpec:
    """The ``CompileSpec`` triton's launcher would build for ``call`` on a GPU of architecture ``sm``.

    Uses triton's own binder (``triton.runtime.jit.create_function_from_signature``) and
    ``JITFunction._pack_args``, i.e. exactly the launch-time specialisation of triton 3.8.
    """
    from triton import knobs

    if sm not in SHARED_MEMORY_LIMIT:
        raise ValueError(f"aot: unsupported architecture sm_{sm}; known: {sorted(SHARED_MEMORY_LIMIT)}")
    fn, backend, binder = _launcher_parts(call.kernel, sm)
    launch_options = dict(num_warps=call.num_warps, num_stages=call.num_stages,
                          debug=bool(fn.debug or knobs.runtime.debug),
                          instrumentation_mode=knobs.compilation.instrumentation_mode, **call.options)
    try:
        bound_args, specialization, extra = binder(**call.args, **call.constexprs, **launch_options)
    except TypeError as e:
        raise TypeError(f"aot: arguments of {call.name or fn.__name__} do not match "
                        f"{fn.__name__}{fn.signature}: {e}") from None
    options, signature, constexprs, attrs = fn._pack_args(backend, launch_options, bound_args,
                                                          specialization, extra)
    raw = fn.fn
    return CompileSpec(
        kernel_module=raw.__module__,
        kernel_file=os.path.abspath(raw.__code__.co_filename),
        kernel_name=raw.__qualname__,
        signature=tuple(signature.items()),
        # Kept in triton's order, so the compile cache key should be the one a GPU launch of the
        # same call computes (AOT then warms the runtime cache; not verified on a GPU here).
        constexprs=tuple(constexprs.items()),
        attrs=tuple((path, tuple(map(tuple, specs))) for path, specs in attrs.items()),
        num_warps=call.num_warps,
        num_stages=call.num_stages,
        options=tuple(sorted(options.__dict__.items())),
        sm=sm,
    )


# ---------------------------------------------------------------------------------------------
# Compilation (forked workers; a fresh Python without TRITON_INTERPRET under the interpreter)

def _load_module_from_file(name: str, path: str):
    loader_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module
    loader_spec.loader.exec_module(module)
    return module


def _import_kernel(spec: CompileSpec):
    from triton.runtime.jit import JITFunction
    if spec.kernel_module == "__main__":
        # The caller's script: load its file under another name so its main guard stays closed.
        name = "__fastres_aot_main__"
        module = sys.modules.get(name) or _load_module_from_file(name, spec.kernel_file)
    else:
        module = sys.modules.get(spec.kernel_module)
        if module is None:
            try:
                module = importlib.import_module(spec.kernel_module)
            except ImportError:  # e.g. a test module pytest imported from a path not on sys.path
                module = _load_module_from_file(spec.kernel_module, spec.kernel_file)
    fn = getattr(module, spec.kernel_name, None)
    if not isinstance(fn, JITFunction):
        raise TypeError(f"{spec.kernel_module}.{spec.kernel_name} is not a module-level @triton.jit "
                        f"function in this process (got {type(fn).__name__}; is TRITON_INTERPRET set?)")
    return fn


_RESOURCE_LINE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def cubin_resources(cubin: bytes) -> dict:
    """``{"registers", "stack", "static_shared", "local"}`` of the one kernel in ``cubin``."""
    from triton import knobs
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", path],
                              check=True, capture_output=True, text=True).stdout
    found = _RESOURCE_LINE.findall(text)
    if len(found) != 1:
        raise RuntimeError(f"aot: expected one kernel in cuobjdump output, got:\n{text}")
    registers, stack, static_shared, local = map(int, found[0])
    return dict(registers=registers, stack=stack, static_shared=static_shared, local=local)


def compile_spec(spec: CompileSpec) -> KernelResources:
    """Compile one configuration (cached by triton) and measure it, loop report included. Needs no GPU."""
    import triton

    from . import sass
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    try:
        fn = _import_kernel(spec)
        attrs = {path: [list(attr) for attr in specs] for path, specs in spec.attrs}  # triton's lists
        source = ASTSource(fn, dict(spec.signature), dict(spec.constexprs), attrs)
        kernel = triton.compile(source, target=GPUTarget("cuda", spec.sm, 32), options=dict(spec.options))
        usage = cubin_resources(kernel.asm["cubin"])
        loops = sass.kernel_stats(sass.disassemble(kernel.asm["cubin"]))
    except Exception as e:  # reported as a failed configuration, not a crash of the whole run
        last_line = (str(e).strip().splitlines() or [""])[-1]  # triton puts the source excerpt first
        return KernelResources(sm=spec.sm, kernel_name=spec.kernel_name, error=f"{type(e).__name__}: {last_line}")
    return KernelResources(
        sm=spec.sm, kernel_name=spec.kernel_name,
        registers=usage["registers"], spill_bytes=usage["stack"], local_bytes=usage["local"],
        shared_bytes=kernel.metadata.shared,
        uses_wgmma="wgmma.mma_async" in kernel.asm["ptx"],
        loops=loops, stages=sass.shared_stages(kernel.asm["ttgir"]),
        hash=kernel.hash,
        cache_dir=os.path.dirname(next(iter(kernel.metadata_group.values()))),
    )


_WORKER_BOOTSTRAP = (
    "import pickle, sys; sys.path[:] = pickle.load(sys.stdin.buffer); "
    "import fastres.aot; fastres.aot._serve(sys.stdin.buffer, sys.argv[1])"
)


def _serve(stream, result_path: str) -> None:
    """Worker process: compile the pickled ``(specs, workers)`` on ``stream``, pickle the results."""
    specs, workers = pickle.load(stream)
    results = _compile_here(specs, workers)
    with open(result_path, "wb") as f:
        pickle.dump(results, f)


def _compile_here(specs: list, workers: int) -> list:
    if workers <= 1 or len(specs) <= 1:
        return [compile_spec(s) for s in specs]
    # fork: the children inherit the imported kernels and triton instead of importing them again,
    # which (importing fastres pulls in torchvision) costs more than a cached compile.
    with multiprocessing.get_context("fork").Pool(min(workers, len(specs))) as pool:
        return pool.map(compile_spec, specs, chunksize=1)


_compiled: dict[bytes, KernelResources] = {}    # in-process cache: pickled spec -> its result


def compile_specs(specs: Sequence[CompileSpec], *, workers: int = 2) -> list[KernelResources]:
    """``compile_spec`` over ``specs`` in ``workers`` parallel processes (forked); results are
    cached in this process, so a second report over the same configurations compiles nothing.

    Under the interpreter (``@triton.jit`` then builds interpreter objects) the compiles run in a
    fresh Python (``sys.executable`` with this ``sys.path``) started without ``TRITON_INTERPRET``,
    which forks its own workers; the caller needs no ``__main__`` guard either way.
    """
    specs = list(specs)
    keys = [pickle.dumps(s) for s in specs]
    todo = {k: s for k, s in zip(keys, specs) if k not in _compiled}
    if todo:
        for key, result in zip(todo, _compile_uncached(list(todo.values()), workers)):
            _compiled[key] = result
    return [_compiled[k] for k in keys]


def _compile_uncached(specs: list, workers: int) -> list[KernelResources]:
    from triton import knobs
    if not knobs.runtime.interpret:
        return _compile_here(specs, workers)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        result_path = os.path.join(tmp, "results.pickle")
        proc = subprocess.run([sys.executable, "-c", _WORKER_BOOTSTRAP, result_path], env=env,
                              input=pickle.dumps(sys.path) + pickle.dumps((specs, workers)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            log = proc.stdout.decode(errors="replace")
            raise RuntimeError(f"aot: compile worker failed (exit {proc.returncode}):\n{log[-4000:]}")
        with open(result_path, "rb") as f:
            return pickle.load(f)


def compile_call(call, sm: int) -> KernelResources:
    """Compile one recorded ``KernelCall`` for ``sm`` and return its resources."""
    return compile_specs([specialize(call, sm)])[0]


# ---------------------------------------------------------------------------------------------
# Reports

def _programs(grid) -> int:
    total = 1
    for g in grid:
        total *= g
    return total


def _shape_of(call) -> str:
    return " ".join(f"{k}={v}" for k, v in call.info.items() if k not in ("flops", "bytes", "k_steps"))


def _dtypes_of(spec: CompileSpec) -> str:
    seen = dict.fromkeys(t[1:] for _, t in spec.signature if t.startswith("*"))
    return ",".join(seen)


def _config_of(call) -> str:
    def short(v):
        return {True: "T", False: "F"}.get(v, v) if isinstance(v, bool) else v
    items = [f"{k}={short(v)}" for k, v in call.constexprs.items()]
    return " ".join(items + [f"w{call.num_warps}", f"s{call.num_stages}"])


def aot_report(calls: Iterable | Mapping[str, Iterable], sms: Sequence[int] = DEFAULT_SMS, *,
               workers: int = 2, targets: Mapping[str, int] | None = None) -> list[AotRow]:
    """Compile every distinct configuration among ``calls`` for every ``sms`` architecture.

    ``calls`` is a list of ``KernelCall`` or ``{label: [KernelCall, ...]}`` (e.g. one label per
    architecture and batch). ``targets`` maps a label to the one architecture its calls were
    sized for (recorded under ``kernels._target.use_target``): those calls compile for it only.
    Calls whose specialisations agree (same kernel, signature, constexprs, alignment attributes,
    warps, stages) share one row.
    """
    labelled = calls.items() if isinstance(calls, Mapping) else [("", calls)]
    rows: dict[tuple, AotRow] = {}
    specs: dict[tuple, CompileSpec] = {}
    for label, group in labelled:
        label_sms = [targets[label]] if targets and label in targets else list(sms)
        for call in group:
            call_specs = [specialize(call, sm) for sm in label_sms]
            key = call_specs[0].config_key
            row = rows.get(key)
            if row is None:
                row = rows[key] = AotRow(kernel=call.name or call_specs[0].kernel_name,
                                         dtypes=_dtypes_of(call_specs[0]), config=_config_of(call),
                                         num_warps=call.num_warps, k_steps=call.info.get("k_steps", 0))
            for spec in call_specs:
                specs.setdefault((key, spec.sm), spec)
            row.uses.append((label, _shape_of(call)))
            row.programs.append(_programs(call.grid))
    results = compile_specs(list(specs.values()), workers=workers)
    for (key, sm), result in zip(specs, results):
        rows[key].resources[sm] = result
    return list(rows.values())


def format_table(rows: Sequence[AotRow], sms: Sequence[int] = DEFAULT_SMS) -> str:
    """A plain-text table: kernel, dtypes, shape, config, then registers, shared KiB and spill bytes
    per architecture, wgmma for sm_90+, the labels using the configuration and ok/FAIL.

    A shape column ending in "(+n)" stands for n more calls with the same configuration.
    """
    header = ["kernel", "dtypes", "shape", "config"]
    for sm in sms:
        header += [f"sm{sm} regs", f"sm{sm} smem KiB", f"sm{sm} spill B"] + (["wgmma"] if sm >= 90 else [])
    header += ["used by", "status"]
    lines = [header]
    for row in rows:
        label, shape = row.uses[0]
        labels = sorted({lab for lab, _ in row.uses if lab})
        line = [row.kernel, row.dtypes, shape + (f" (+{len(row.uses) - 1})" if len(row.uses) > 1 else ""),
                row.config]
        for sm in sms:
            r = row.resources.get(sm)
            if r is None or r.error:     # not compiled for this architecture (another target's tile), or failed
                line += ["-", "-", "-"] + (["-"] if sm >= 90 else [])
                continue
            line += [str(r.registers), f"{r.shared_bytes / 1024:.1f}", str(r.spill_bytes + r.local_bytes)]
            if sm >= 90:
                line.append("yes" if r.uses_wgmma else "no")
        line += [",".join(labels) or "-", "FAIL" if row.problems() else "ok"]
        lines.append(line)
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    text = ["  ".join(str(cell).ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def print_report(rows: Sequence[AotRow], sms: Sequence[int] = DEFAULT_SMS, *, file=None) -> int:
    """Print the table and every problem; return the exit code (0 when every configuration fits)."""
    file = file if file is not None else sys.stdout
    print(format_table(rows, sms), file=file)
    problems = [f"{row.kernel} [{row.dtypes}; {row.config}]: {p}" for row in rows for p in row.problems()]
    for problem in problems:
        print(f"FAIL {problem}", file=file)
    print(f"{len(rows)} configurations x {len(sms)} architectures: "
          f"{'all fit' if not problems else f'{len(problems)} problems'}", file=file)
    return 1 if problems else 0


def run_aot(calls_by_label: Mapping[str, Iterable], sms: Sequence[int] = DEFAULT_SMS, *,
            workers: int = 2, file=None, loop_stats: bool = False, json_output: bool = False,
            targets: Mapping[str, int] | None = None) -> int:
    """``fastres aot``'s body: compile everything, print the report (and with ``loop_stats`` the
    static loop report; ``json_output``: one JSON object instead of tables), return the exit code."""
    import json
    file = file if file is not None else sys.stdout
    rows = aot_report(calls_by_label, sms, workers=workers, targets=targets)
    if json_output:
        problems = [f"{row.kernel} [{row.dtypes}; {row.config}]: {p}" for row in rows for p in row.problems()]
        payload = dict(configurations=[dict(kernel=row.kernel, dtypes=row.dtypes, config=row.config,
                                            uses=[dict(label=lab, shape=shape) for lab, shape in row.uses],
                                            resources={sm: dict(registers=r.registers, spill_bytes=r.spill_bytes,
                                                                local_bytes=r.local_bytes,
                                                                shared_bytes=r.shared_bytes,
                                                                uses_wgmma=r.uses_wgmma, error=r.error)
                                                       for sm, r in row.resources.items()})
                                       for row in rows],
                       problems=problems)
        if loop_stats:
            payload["loop_stats"] = loop_report(rows, sms)
        print(json.dumps(payload, indent=1), file=file)
        return 1 if problems else 0
    status = print_report(rows, sms, file=file)
    if loop_stats:
        print("", file=file)
        print(format_loop_table(loop_report(rows, sms)), file=file)
    return status


# ---------------------------------------------------------------------------------------------
# Static loop report (--loop-stats)

def loop_report(rows: Sequence[AotRow], sms: Sequence[int] = DEFAULT_SMS) -> list[dict]:
    """Per configuration and architecture, the static loop report (see ``fastres.sass``) as JSON data:
    main K loop instructions per step, MMA instruction and shape, global load widths in the loop,
    store widths of the kernel, wgmma async depth, shared-memory stages, registers, shared memory,
    CTAs per SM, and per use the waves on the GPU sized by ``fastres.sass.GPU_SMS`` (H100 for
    sm_90, A100 for sm_80). Static analysis: nothing here is measured on a GPU."""
    from . import sass
    out = []
    for row in rows:
        for sm in sms:
            r = row.resources.get(sm)
            if r is None:
                continue
            entry = dict(kernel=row.kernel, dtypes=row.dtypes, config=row.config, sm=sm, error=r.error)
            if not r.error:
                ctas = sass.ctas_per_sm(sm, r.registers, r.shared_bytes, row.num_warps)
                gpu_sms = sass.GPU_SMS.get(sm)
                entry.update(
                    registers=r.registers, shared_bytes=r.shared_bytes, spill_bytes=r.spill_bytes + r.local_bytes,
                    stages=r.stages, ctas_per_sm=ctas, gpu_sms=gpu_sms,
                    k_loops=[dataclasses.asdict(loop) | dict(sub_word_loads=loop.sub_word_loads,
                                                             narrow_loads=loop.narrow_loads,
                                                             wgmma_async=loop.wgmma_async)
                             for loop in _per_step(r.loops.k_loops, row.k_steps)],
                    global_stores=r.loops.global_stores,
                    uses=[dict(label=label, shape=shape, programs=programs,
                               waves=round(sass.waves(programs, ctas, gpu_sms), 3) if gpu_sms else None)
                          for (label, shape), programs in zip(row.uses, row.programs)])
            out.append(entry)
    return out


def _per_step(loops, k_steps: int) -> list:
    """An unrolled mma.sync region (no per-step commit in the SASS) divided by the call's K steps."""
    return [loop.per_step(k_steps) if loop.region and not loop.unrolled and k_steps > 1 else loop for loop in loops]


def format_loop_table(report: Sequence[dict]) -> str:
    """The loop report as text, one line per configuration and architecture."""
    header = ["kernel", "dtypes", "sm", "K loops", "instr/step", "MMA", "wgmma", "loop loads", "stores",
              "stages", "regs", "smem KiB", "CTA/SM", "waves"]
    lines = [header]
    for e in report:
        if e["error"]:
            lines.append([e["kernel"], e["dtypes"], str(e["sm"])] + ["-"] * (len(header) - 3))
            continue
        loops = e["k_loops"]
        main = max(loops, key=lambda lp: lp["mma_count"]) if loops else None
        waves = sorted(u["waves"] for u in e["uses"] if u["waves"] is not None)
        lines.append([
            e["kernel"], e["dtypes"], str(e["sm"]), str(len(loops)),
            "+".join(f"{lp['instructions']}{'*' if lp['region'] else ''}" for lp in loops) or "-",
            f"{main['mma_count']}x{main['mma']}" if main else "-",
            ("-" if not main or not main["wgmma"] else
             f"async({main['wgmma_in_flight']})" if main["wgmma_async"] else "sync"),
            " ".join(f"{k}x{v}" for k, v in sorted(main["global_loads"].items())) if main else "-",
            " ".join(f"{k}x{v}" for k, v in sorted(e["global_stores"].items())) or "-",
            str(e["stages"]), str(e["registers"]), f"{e['shared_bytes'] / 1024:.1f}", str(e["ctas_per_sm"]),
            (f"{waves[0]:.2f}" if waves[0] == waves[-1] else f"{waves[0]:.2f}..{waves[-1]:.2f}") if waves else "-",
        ])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    from . import sass
    gpus = ", ".join(f"sm_{sm}: {n} SMs" for sm, n in sorted(sass.GPU_SMS.items()))
    return "\n".join(text + [f"static analysis of the SASS (not measured); waves on {gpus} "
                             "(H100 SXM for sm_90, A100 for sm_80); * = a K loop ptxas unrolled, "
                             "averaged per step"])
