"""The CPU backend (fastres.backend.CpuBackend): one oneDNN program per plan for the eval module
and the Engine, against torchvision and against the reference backend; its fallback where the
private oneDNN ops are missing; reordered weights living (and dying) with the plan; the layout LRU;
in-place accumulation never touching a value someone else holds; threads from worker threads."""
import re
import threading

import pytest
import torch
import torchvision
from torch import nn

import fastres
from fastres import backend
from fastres.engine import Engine
from fastres.models import ARCHITECTURES
from fastres.verify import image_batch, randomize_norm_stats_

from kernel_testing import rel_err

needs_onednn = pytest.mark.skipif(not backend.onednn_available(),
                                  reason=f"oneDNN ops unavailable: {backend.onednn_unavailable_reason()}")
TOL = 1e-5        # fp32: max |error| relative to the largest logit
INPUTS = [(1, 37, 45), (3, 32, 32)]    # batch 1 and 3, odd and even sizes


def twins(arch, num_classes=10, seed=0, share=False):
    """torchvision's model and fastres's with the same weights (``share``: the same tensors, which
    saves initialising a second copy of the large ones)."""
    torch.manual_seed(seed)
    tv = randomize_norm_stats_(getattr(torchvision.models, arch)(num_classes=num_classes), seed).eval()
    if share:
        with torch.device("meta"):
            model = getattr(fastres, arch)(num_classes=num_classes)
        model.load_state_dict(tv.state_dict(), assign=True)
    else:
        model = getattr(fastres, arch)(num_classes=num_classes)
        model.load_state_dict(tv.state_dict())
    return tv, model.eval()


def images(n, h, w, seed=0):
    return image_batch(n, max(h, w), seed)[:, :, :h, :w].contiguous()


def in_place_adds(source: str) -> int:
    """How many convs of a program's source write their sum into the residual: PyTorch's
    ``conv_add_(`` op or a kept primitive ``conv_sumN(`` (fastres._onednn)."""
    return len(re.findall(r"\bconv_add_\(|\bconv_sum\d+\(", source))


def out_of_place_add(source: str, target: str, x: str, residual: str) -> bool:
    """Whether ``target = x (*) w + residual`` runs into a new tensor in ``source`` (either form)."""
    return (f"{target} = conv_add({x}, {residual}," in source
            or re.search(rf"\b{target} = conv_add\d+\({x}, {residual}\)", source) is not None)


def programs(model):
    cache = model.plan().__dict__.get("_onednn_programs")
    return {} if cache is None else dict(cache._items)


def layouts(model_or_plan) -> list:
    """The (weight batch, C, H, W) the programs' weights are laid out for (keys without threads)."""
    plan = model_or_plan if isinstance(model_or_plan, fastres.ir.Plan) else model_or_plan.plan()
    cache = plan.__dict__.get("_onednn_programs")
    return [] if cache is None else [k[:4] for k in cache.keys()]


@needs_onednn
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_constructor_matches_torchvision_and_the_references(arch):
    tv, model = twins(arch, share=True)
    for n, h, w in INPUTS:
        x = images(n, h, w)
        with torch.inference_mode():
            expected = tv(x)
            got = model(x)
            with fastres.use_backend("reference"):
                reference = model(x)
        assert got.shape == expected.shape == (n, 10)
        assert rel_err(got, expected) <= TOL, (arch, n, h, w)
        assert rel_err(got, reference) <= TOL, (arch, n, h, w)
    plan = model.plan()
    (program, *_) = programs(model).values()
    convs = [s.name for s in plan.steps if s.kind in ("conv", "conv_pair")]
    assert program.onednn_steps == convs       # every conv of a torchvision ResNet runs on oneDNN
    if backend.onednn_primitives_available():  # as primitives kept by fastres._onednn, the head too
        # (unless this CPU's oneDNN matmul gives a row bits that depend on its batch: AVX2's GEMM)
        head = program.primitive_fallbacks.get("fc")
        assert head is None or "depend on the rows beside it" in head
        assert program.primitive_steps == convs + ["fc"] * (head is None)
        assert set(program.primitive_fallbacks) <= {"fc"}
        assert not re.search(r"\bconv(_add_?)?\(", program.source)   # no PyTorch conv op in it
    assert in_place_adds(program.source) > 0   # residuals accumulated in place


@needs_onednn
def test_engine_runs_the_module_program():
    tv, model = twins("resnet50")
    engine = Engine(tv, batch_sizes=(1, 8), image_size=32, input="float_nchw")
    assert engine.executor == "onednn" and engine.backend == "torch"
    x = images(3, 32, 32)
    with torch.inference_mode():
        expected = tv(x)
        module = model(x)
    got = engine(x)
    assert rel_err(got, expected) <= TOL and rel_err(got, module) <= 1e-6
    # the engine lays weights out for its buckets: (8, C, H, W) for 3 rows, like the module
    threads = torch.get_num_threads()
    assert list(engine.plan._onednn_programs.keys()) == [(8, 3, 32, 32, threads)]
    assert list(programs(model)) == [(8, 3, 32, 32, threads)]


def test_fallback_without_onednn(monkeypatch):
    """Where the private ops are missing (or FASTRES_ONEDNN=0), the references run, unchanged."""
    def broken(self):
        raise AttributeError("'_OpNamespace' 'mkldnn' object has no attribute '_convolution_pointwise'")
    monkeypatch.setattr(backend._OneDnnOps, "__init__", broken)
    monkeypatch.setattr(backend, "_onednn_state", None)
    assert not backend.onednn_available()
    assert "_convolution_pointwise" in backend.onednn_unavailable_reason()
    tv, model = twins("resnet18")
    x = images(3, 32, 32)
    with torch.inference_mode():
        got, expected = model(x), tv(x)
    assert rel_err(got, expected) <= TOL
    assert programs(model) == {}
    engine = Engine(tv, batch_sizes=(4,), image_size=32, input="float_nchw")
    assert engine.executor == "plan"
    assert rel_err(engine(x), expected) <= TOL


@needs_onednn
def test_reordered_weights_are_rebuilt_with_the_plan():
    """The guard rebuilds the plan on a weight edit; the programs (and their reordered weights)
    live on the plan, so the next forward reorders the new weights, never reuses stale ones."""
    tv, model = twins("resnet18")
    x = images(1, 32, 32)
    with torch.inference_mode():
        model(x)
    plan, old = model.plan(), programs(model)
    with torch.no_grad():
        for m in (tv, model):
            m.layer2[0].conv1.weight.mul_(-0.5)
            m.fc.bias.add_(1.0)
    with torch.inference_mode():
        got, expected = model(x), tv(x)
    assert rel_err(got, expected) <= TOL
    assert model.plan() is not plan
    new = programs(model)
    assert list(new) == list(old) and all(new[k] is not old[k] for k in new)


@needs_onednn
def test_weight_layouts_are_bucketed_and_bounded():
    tv, model = twins("resnet18")
    with torch.inference_mode():
        for n in (1, 2, 8):
            x = images(n, 32, 32)
            assert rel_err(model(x), tv(x)) <= TOL
        assert layouts(model) == [(1, 3, 32, 32), (8, 3, 32, 32)]
        for size in (33, 34, 35, 36, 37):
            x = images(2, size, size)
            assert rel_err(model(x), tv(x)) <= TOL
    assert len(programs(model)) == backend.PROGRAMS_PER_PLAN
    assert layouts(model)[-1] == (8, 3, 37, 37)      # least recently used ones went first
    assert (1, 3, 32, 32) not in layouts(model)
    # another thread count is another layout (oneDNN's blocking depends on it)
    threads = torch.get_num_threads()
    other = 1 if threads > 1 else 2
    x = images(2, 37, 37)
    with backend.intra_op_threads(other), torch.inference_mode():
        assert rel_err(model(x), tv(x)) <= TOL
    assert list(programs(model))[-2:] == [(8, 3, 37, 37, threads), (8, 3, 37, 37, other)]


class _SharedResidual(nn.Module):
    """The block input is added twice (the first add may not overwrite it); the plan input is a
    residual too (it belongs to the caller)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.convs = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1, bias=False) for _ in range(3))
        self.bns = nn.ModuleList(nn.BatchNorm2d(8) for _ in range(4))
        self.relu = nn.ReLU()
        self.flat = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        x = self.relu(self.flat(x) + x)                        # residual: the plan input
        y = self.relu(self.bns[0](self.stem(x)))
        z = self.relu(self.bns[1](self.convs[0](y)) + y)       # y is read again below
        w = self.relu(self.bns[2](self.convs[1](z)) + y)
        return self.relu(self.bns[3](self.convs[2](w)) + z)


@needs_onednn
def test_in_place_accumulation_never_writes_a_value_read_later():
    torch.manual_seed(0)
    model = randomize_norm_stats_(_SharedResidual()).eval()
    fast = fastres.optimize(model)
    x = images(2, 12, 12)
    before = x.clone()
    with torch.inference_mode():
        expected = model(x)
        got = fast(x)
    assert torch.equal(x, before)                  # the caller's tensor is never written
    assert rel_err(got, expected) <= TOL
    (program,) = programs(fast).values()
    # in place only where the residual dies: not into the input, not into y at its first add
    assert in_place_adds(program.source) == 2, program.source
    assert out_of_place_add(program.source, "v1", "c0", "c0"), program.source
    assert out_of_place_add(program.source, "v3", "v2", "v2"), program.source


@needs_onednn
def test_nan_and_inf_inputs_get_pytorch_answers():
    """oneDNN's fused ReLU maps NaN to 0; such inputs run the references (PyTorch's semantics)."""
    tv, model = twins("resnet18")
    x = images(3, 32, 32)
    x[1, :, 4, 4] = float("nan")
    x[2, 0, 7, 7] = float("inf")
    with torch.inference_mode():
        got, expected = model(x), tv(x)
    assert torch.isnan(got[1]).all() and torch.equal(torch.isnan(got), torch.isnan(expected))
    assert rel_err(got[0], expected[0]) <= TOL


@needs_onednn
def test_threads_follow_the_setting_from_any_thread(monkeypatch):
    """oneDNN reads the calling thread's OpenMP count: the module runs PyTorch's setting and the
    Engine its num_threads, also from a fresh worker thread, which is restored afterwards."""
    seen = []
    original = backend.OneDnnProgram.__call__

    def recording(self, x):
        seen.append(torch.get_num_threads())
        return original(self, x)
    monkeypatch.setattr(backend.OneDnnProgram, "__call__", recording)
    tv, model = twins("resnet18")
    x = images(1, 32, 32)
    default = torch.get_num_threads()
    other = 1 if default > 1 else 2
    engine = Engine(tv, batch_sizes=(1,), image_size=32, input="float_nchw", num_threads=other)
    assert engine.num_threads == other and f"num_threads={other}" in repr(engine)
    after = []

    def worker():
        engine(x)
        after.append(torch.get_num_threads())
        with torch.inference_mode():
            model(x)
    try:
        torch.set_num_threads(other)
        t = threading.Thread(target=worker)
        t.start()
        t.join()
    finally:
        torch.set_num_threads(default)
    assert seen == [other, other]
    assert after == [other]              # PyTorch's setting of the worker: restored
    t = threading.Thread(target=lambda: (engine(x), after.append(torch.get_num_threads())))
    t.start()
    t.join()
    assert seen[-1] == other and after[-1] == default
    with pytest.raises(ValueError, match="num_threads"):
        Engine(tv, batch_sizes=(1,), image_size=32, num_threads=0)


def test_reference_backend_is_selectable():
    assert backend.backend_for(torch.device("cpu")) == "torch"
    with fastres.use_backend("reference"):
        assert backend.backend_for(torch.device("cpu")) == "reference"
    assert isinstance(backend.get_backend("torch"), backend.CpuBackend)
    assert type(backend.get_backend("reference")) is backend.ReferenceBackend


def test_thread_governor_yields_cores_other_processes_keep_busy(monkeypatch):
    """Fed /proc/stat and process CPU times: another process busy on one of two CPUs -> one thread;
    only this process busy -> all of them; never above the configured count."""
    gov = backend.ThreadGovernor()
    gov.enabled = True
    gov._cpus = frozenset({0, 1})
    clock = [100.0]
    stat = [(0, 0)]          # (busy ticks, total ticks) over both CPUs
    mine = [0.0]             # this process's CPU seconds
    monkeypatch.setattr(gov, "_cpu_stat", lambda: stat[0])
    monkeypatch.setattr(backend.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(backend.os, "times", lambda: type("T", (), {"user": mine[0], "system": 0.0})())

    def window(machine_cores, our_cores, seconds=1.0):
        clock[0] += seconds
        busy, total = stat[0]
        stat[0] = (busy + int(machine_cores * 100 * seconds), total + int(2 * 100 * seconds))
        mine[0] += our_cores * seconds
        return gov.threads(2)

    assert gov.threads(2) == 2                      # first reading: nothing to compare yet
    assert window(2.0, 1.0) == 1                    # another process keeps a core busy
    assert gov.others == pytest.approx(1.0)
    assert window(2.0, 2.0) == 2                    # all of it is ours: quiet
    assert window(0.1, 0.0) == 2
    assert window(2.0, 0.0) == 1 and gov.threads(1) == 1   # both busy elsewhere: at least one
    assert window(1.2, 1.0) == 2                    # a little noise is not contention
    gov.enabled = False
    assert window(2.0, 0.0) == 2


def test_thread_governor_is_on_unless_the_environment_says_0(monkeypatch):
    monkeypatch.delenv("FASTRES_ADAPTIVE_THREADS", raising=False)
    assert backend.ThreadGovernor().enabled
    monkeypatch.setenv("FASTRES_ADAPTIVE_THREADS", "0")
    assert not backend.ThreadGovernor().enabled
    monkeypatch.setenv("FASTRES_ADAPTIVE_THREADS", "1")
    assert backend.ThreadGovernor().enabled


def _calls_of(program):
    """Count the calls of ``program``'s generated function (and let a test change its answer)."""
    calls, original = [], program._fn
    program.perturb = None

    def counted(x):
        calls.append(torch.get_num_threads())
        out = original(x)
        return out if program.perturb is None else out + program.perturb
    program._fn = counted
    return calls


@needs_onednn
@pytest.mark.parametrize("front", ["module", "engine"])
def test_fewer_threads_only_where_they_gave_the_same_bits(monkeypatch, front):
    """With the governor lowering 2 threads to 1: the first call of a shape runs the 2- and the
    1-thread program on a fixed random input, then the 2-thread one on the call's; later calls
    run only the 1-thread program where the bits were the same; where they differ (forced here),
    only the 2-thread one, said once."""
    tv, model = twins("resnet18")
    x = images(2, 40, 40)
    with backend.intra_op_threads(2), torch.inference_mode():
        engine = Engine(model, batch_sizes=(2,), image_size=40, input="float_nchw", num_threads=2,
                        adaptive_threads=True) if front == "engine" else None
        run = (lambda: engine(x)) if engine else (lambda: model(x))
        expected = run()                                # governor off (conftest): 2 threads
        backend.set_adaptive_threads(True)

        def lowered(configured, enabled=None):
            return 1 if (backend.GOVERNOR.enabled if enabled is None else enabled) else configured
        monkeypatch.setattr(backend.GOVERNOR, "threads", lowered)
        monkeypatch.setattr(fastres.extension, "_noticed", set())     # (said once per process)
        plan = engine.plan if engine else model.plan()
        cpu = backend.get_backend("torch")
        weight_batch = 2 if engine else backend.weight_batch_for(2)
        two = cpu.program(plan, x.shape, weight_batch, threads=2)
        one = cpu.program(plan, x.shape, weight_batch, threads=1)
        calls_two, calls_one = _calls_of(two), _calls_of(one)
        assert torch.equal(run(), expected)
        assert (calls_two, calls_one) == ([2, 2], [1])  # the check (probe), then the call
        check = (weight_batch, tuple(x.shape), torch.float32, 2, 1)
        agrees = plan._onednn_programs.agreement[check]
        probe = backend._probe_like(x)
        assert probe.shape == x.shape and not torch.equal(probe, x)
        # what it recorded is the truth on this machine (AVX2: the same bits with 1 and 2 threads)
        with backend.intra_op_threads(1):
            assert agrees == backend._same_bits(one._fn(probe), two._fn(probe))
        calls_one.clear(), calls_two.clear()
        assert torch.equal(run(), expected)
        assert (calls_two, calls_one) == (([], [1]) if agrees else ([2], []))
        # a 1-thread program whose bits differ: never used for that shape, said once
        del plan._onednn_programs.agreement[check]
        one.perturb = 1e-3
        calls_one.clear(), calls_two.clear()
        with pytest.warns(RuntimeWarning, match="differ in their last bits"):
            assert torch.equal(run(), expected)
        assert plan._onednn_programs.agreement[check] is False
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert torch.equal(run(), expected) and torch.equal(run(), expected)
        assert calls_one == [1] and calls_two == [2, 2, 2, 2]
        # another shape is checked on its own
        one.perturb = None
        y = images(1, 40, 40)
        backend.set_adaptive_threads(False)
        alone = engine(y) if engine else model(y)
        backend.set_adaptive_threads(True)
        assert torch.equal(engine(y) if engine else model(y), alone)
        assert (2 if engine else 1, tuple(y.shape), torch.float32, 2, 1) in plan._onednn_programs.agreement
    # measured on this machine: a copied or pickled plan (a Ray actor elsewhere) measures again
    import copy
    import pickle
    cache = plan._onednn_programs
    assert copy.deepcopy(cache).agreement == {} and pickle.loads(pickle.dumps(cache)).agreement == {}


def test_same_bits_compares_bits():
    zero, nan = torch.tensor([0.0]), torch.tensor([float("nan")])
    assert not backend._same_bits(zero, -zero) and backend._same_bits(nan, nan.clone())
    assert backend._same_bits((zero, {"a": nan}), (zero.clone(), {"a": nan.clone()}))
    assert not backend._same_bits(zero, zero.double()) and not backend._same_bits(zero, zero[:0])
    assert not backend._same_bits(torch.tensor([1.0]), torch.tensor([1.0 + 2 ** -23]))


def test_no_fewer_threads_without_a_per_thread_setting(monkeypatch):
    """Without PyTorch's OpenMP runtime found, a thread count could only be set process-wide:
    the governor then never lowers it."""
    monkeypatch.setattr(backend, "per_thread_counts", lambda: False)
    monkeypatch.setattr(backend.GOVERNOR, "threads", lambda configured, enabled=None: 1)
    backend.set_adaptive_threads(True)
    tv, model = twins("resnet18")
    x = images(1, 32, 32)
    with torch.inference_mode():
        model(x)
    assert model.plan()._onednn_programs.agreement == {}
    assert [k[-1] for k in model.plan()._onednn_programs.keys()] == [torch.get_num_threads()]


def test_the_thread_count_reaches_mkl_and_a_program_is_built_with_its_own(monkeypatch):
    """MKL (the Winograd GEMMs' bmm, the head's addmm) keeps its own count, which a thread's
    omp_set_num_threads does not change: intra_op_threads sets it for the thread too. A program
    for n threads lays its weights out with n threads, whoever asks for it."""
    import ctypes
    import os
    lib = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        mkl_threads = ctypes.CDLL(lib).MKL_Get_Max_Threads
    except (OSError, AttributeError):
        pytest.skip("this PyTorch links no MKL into libtorch_cpu")
    default = torch.get_num_threads()
    other = 1 if default > 1 else 2
    with backend.intra_op_threads(other):
        assert torch.get_num_threads() == other and mkl_threads() == other
    assert mkl_threads() == default
    built = []
    original = backend.OneDnnProgram.__init__

    def recording(self, plan, key, ops):
        built.append((key[-1], torch.get_num_threads(), mkl_threads()))
        original(self, plan, key, ops)
    monkeypatch.setattr(backend.OneDnnProgram, "__init__", recording)
    _, model = twins("resnet18")
    cpu = backend.get_backend("torch")
    cpu.program(model.plan(), (1, 3, 32, 32), threads=other)
    assert built == [(other, other, other)] and torch.get_num_threads() == default


def test_malloc_tuning_sets_glibc_thresholds_once_and_can_be_refused(monkeypatch):
    import ctypes
    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1
    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibc())
    monkeypatch.setattr(backend, "_malloc_tuned", False)
    backend.set_malloc_tuning(False)
    try:
        assert backend.tune_malloc() is False and calls == []
        backend.set_malloc_tuning(True)
        assert backend.tune_malloc() is True
        assert calls == [(-3, backend.MALLOC_THRESHOLD), (-1, backend.MALLOC_THRESHOLD)]
        assert backend.tune_malloc() is True and len(calls) == 2      # once
    finally:
        backend.set_malloc_tuning(backend._MALLOC_TUNING_DEFAULT)


def _watch_faults(monkeypatch, pages_per_call):
    """Every watched call faults in ``pages_per_call`` pages (the fake counter is read before and
    after each); returns the list tune_malloc's calls are recorded in."""
    faults, tuned = [0], []

    def fake_minor_faults():
        faults[0] += pages_per_call // 2
        return faults[0]
    monkeypatch.setattr(backend, "_minor_faults", fake_minor_faults)
    monkeypatch.setattr(backend, "_malloc_tuned", False)
    monkeypatch.setattr(backend, "_MALLOC_TUNING", True)
    monkeypatch.setattr(backend, "tune_malloc", lambda: tuned.append(len(tuned)) or True)
    monkeypatch.setattr(backend, "MALLOC_FAULT_BYTES", 500 * backend._PAGE_BYTES)
    monkeypatch.setattr(backend, "_WINOGRAD_MODE", "off")    # its timing has a fault trigger of its own
    return tuned


@needs_onednn
@pytest.mark.parametrize("pages_per_call, tuned_on_call", [(0, None), (2000, 3), (100, None)])
def test_malloc_tuning_follows_the_page_faults_of_warm_calls(monkeypatch, pages_per_call, tuned_on_call):
    """Two warm calls in a row (same thread, same shape as the call before) faulting in more than
    MALLOC_FAULT_BYTES turn tune_malloc on; the first call (it grows the heap) never counts. The
    answers are the same either way."""
    tv, model = twins("resnet18")
    x = images(1, 32, 32)
    tuned = _watch_faults(monkeypatch, pages_per_call)
    with torch.inference_mode():
        expected = tv(x)
        for call in range(1, 7):
            assert rel_err(model(x), expected) <= TOL
            (program,) = programs(model).values()
            if tuned_on_call is not None and call >= tuned_on_call:
                assert tuned == [0] and program.malloc_tuned and program._calls_watched == 0
            else:
                assert tuned == [] and not program.malloc_tuned


@needs_onednn
def test_malloc_tuning_ignores_calls_that_fault_legitimately(monkeypatch):
    """A batch that grows within one weight layout (2, 3, 2, 3 share batch 8's program) and a new
    thread per call fault in memory the first time each way: never warm, never tuned."""
    tv, model = twins("resnet18")
    tuned = _watch_faults(monkeypatch, 2000)
    with torch.inference_mode():
        for n in (2, 3, 2, 3, 2, 3):
            x = images(n, 32, 32)
            assert rel_err(model(x), tv(x)) <= TOL
        x = images(1, 32, 32)
        expected = tv(x)
    results = []

    def forward():
        with torch.inference_mode():
            results.append(rel_err(model(x), expected))
    for _ in range(4):
        worker = threading.Thread(target=forward)
        worker.start()
        worker.join()
    assert len(results) == 4 and max(results) <= TOL
    assert len(programs(model)) == 2       # batch 8's layout and batch 1's: the programs did run
    assert tuned == [] and not any(p.malloc_tuned for p in programs(model).values())


def test_thread_setting_reaches_pytorchs_openmp_with_another_runtime_loaded(monkeypatch):
    """scikit-learn ships its own libgomp; loaded first, its path sorts before torch's. The
    per-thread setting must still go to the runtime PyTorch (and oneDNN) reads."""
    import ctypes
    import glob
    import os
    sklearn = pytest.importorskip("sklearn")
    others = glob.glob(os.path.join(os.path.dirname(os.path.dirname(sklearn.__file__)),
                                    "scikit_learn.libs", "libgomp*.so*"))
    if not others:
        pytest.skip("this scikit-learn wheel ships no libgomp of its own")
    ctypes.CDLL(others[0])
    monkeypatch.setattr(backend, "_omp_looked_up", False)
    default = torch.get_num_threads()
    other = 1 if default > 1 else 2
    try:
        backend.set_thread_count(other)
        assert torch.get_num_threads() == other
    finally:
        backend.set_thread_count(default)
    assert torch.get_num_threads() == default
    with backend.intra_op_threads(other):
        assert torch.get_num_threads() == other


@needs_onednn
def test_an_images_logits_do_not_depend_on_its_batch_within_a_weight_layout(monkeypatch):
    """Within one weight-layout bucket (batches 2-8 share batch 8's layout) an image's logits are
    the same bits whatever batch it is in and whoever its neighbours are; across buckets (batch 1
    has its own layout, oneDNN blocks it differently) they may differ in the last bits, as
    torchvision's do between batch sizes."""
    monkeypatch.setattr(backend, "_WINOGRAD_MODE", "on")      # (wherever the rule allows it)
    tv, model = twins("resnet18")
    x = images(8, 32, 32)
    with torch.inference_mode():
        full = model(x)
        for sub in (2, 3, 4):
            assert backend.weight_batch_for(sub) == backend.weight_batch_for(8)
            assert torch.equal(model(x[:sub]), full[:sub])
        # (resnet18's layer1 runs as Winograd here: its 16 GEMMs' rows are tiles, one image's own)
        from fastres import winograd
        assert not winograd.available() or any(p.winograd_steps for p in programs(model).values())
        y = x.clone()
        y[1:] = images(7, 32, 32, seed=1)
        assert torch.equal(model(y)[0], full[0])
        assert rel_err(model(x[:1]), full[:1]) <= TOL
