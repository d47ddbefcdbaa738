"""fastres._onednn (csrc/onednn_conv.cpp): the CPU backend's convolutions and its head's matrix
product as oneDNN primitives it keeps, against F.conv2d / F.linear and against PyTorch's own oneDNN
ops (the fallback, which the same programs run where the extension is missing or turned off); its
errors on bad input; its calls from several threads and with other batches than it was made for."""
import threading

import pytest
import torch
import torch.nn.functional as F
import torchvision

import fastres
from fastres import backend
from fastres.engine import Engine
from fastres.verify import image_batch, randomize_norm_stats_

from kernel_testing import rel_err

needs_primitives = pytest.mark.skipif(not backend.onednn_primitives_available(),
                                      reason=f"kept oneDNN primitives unavailable: {backend.onednn_primitives_reason()}")
CL = torch.channels_last
TOL = 1e-5


def nhwc(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).contiguous(memory_format=CL)


# (input N, C, H, W), (O, C/g, KH, KW), stride, padding, dilation, groups
GEOMETRIES = [
    ((1, 64, 14, 14), (256, 64, 1, 1), (1, 1), (0, 0), (1, 1), 1),       # a bottleneck 1x1
    ((2, 32, 15, 13), (64, 32, 1, 1), (2, 2), (0, 0), (1, 1), 1),        # projection shortcut
    ((1, 16, 11, 9), (24, 16, 3, 3), (1, 1), (1, 1), (1, 1), 1),
    ((3, 16, 12, 12), (16, 16, 3, 3), (2, 2), (1, 1), (1, 1), 1),
    ((1, 64, 9, 9), (64, 2, 3, 3), (1, 1), (1, 1), (1, 1), 32),          # resnext's grouped 3x3
    ((2, 8, 13, 13), (8, 8, 3, 3), (1, 1), (2, 2), (2, 2), 1),           # dilated
    ((1, 3, 45, 37), (16, 3, 7, 7), (2, 2), (3, 3), (1, 1), 1),          # the stem
]


@needs_primitives
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"{g[1]}s{g[2][0]}g{g[5]}")
@pytest.mark.parametrize("residual", ["none", "add", "sum"])
@pytest.mark.parametrize("relu", [False, True])
def test_kept_conv_matches_f_conv2d(geometry, residual, relu):
    shape, w_shape, stride, padding, dilation, groups = geometry
    g = torch.Generator().manual_seed(1)
    w = torch.randn(w_shape, generator=g) / (w_shape[1] * w_shape[2] * w_shape[3]) ** 0.5
    b = torch.randn(w_shape[0], generator=g)
    conv = backend._OneDnnOps().kept_conv(list(shape), w, b, list(stride), list(padding), list(dilation), groups,
                                         residual, relu)
    for n in (shape[0], shape[0] + 2, 1):      # the batch it was made for, and others
        x = nhwc(n, *shape[1:], seed=n)
        expected = F.conv2d(x, w, b, stride, padding, dilation, groups)
        r = nhwc(*expected.shape, seed=10 + n) if residual != "none" else None
        if r is not None:
            expected = expected + r
        if relu:
            expected = expected.relu()
        r_before = r.clone() if r is not None else None
        got = conv(x, r) if r is not None else conv(x)
        assert got.shape == expected.shape and got.is_contiguous(memory_format=CL)
        assert rel_err(got, expected) <= TOL, (n, residual, relu)
        if residual == "sum":          # written into the residual, which is returned
            assert got.data_ptr() == r.data_ptr()
        elif r is not None:
            assert torch.equal(r, r_before)


@needs_primitives
def test_kept_conv_has_the_bits_of_pytorchs_op():
    """The same oneDNN kernels (brgconv) as the fallback, PyTorch's mkldnn op, though another
    oneDNN build: within 1e-6 of it (the same bits on the machines tried, not asserted)."""
    ops = backend._OneDnnOps()
    for shape, w_shape, stride, padding, dilation, groups in GEOMETRIES:
        g = torch.Generator().manual_seed(2)
        w, b = torch.randn(w_shape, generator=g), torch.randn(w_shape[0], generator=g)
        x = nhwc(*shape)
        conv = ops.kept_conv(list(shape), w, b, list(stride), list(padding), list(dilation), groups, "none", True)
        packed = ops.reorder(w, padding, stride, dilation, groups, shape)
        theirs = ops.conv(x, packed, b, list(padding), list(stride), list(dilation), groups, "relu", [], "")
        assert rel_err(conv(x), theirs) <= 1e-6, w_shape


@needs_primitives
def test_bad_input_is_refused_with_a_clear_error():
    Conv = backend._OneDnnOps().kept_conv
    w, b = torch.randn(8, 4, 3, 3), torch.randn(8)
    conv = Conv([2, 4, 10, 10], w, b, [1, 1], [1, 1], [1, 1], 1, "add", True)
    x, r = nhwc(2, 4, 10, 10), nhwc(2, 8, 10, 10)
    with pytest.raises(RuntimeError, match="has 5 channels, not 4"):
        conv(nhwc(2, 5, 10, 10), r)
    with pytest.raises(RuntimeError, match="dense channels_last"):
        conv(x.contiguous(), r)
    with pytest.raises(RuntimeError, match="float32"):
        conv(x.double(), r)
    with pytest.raises(RuntimeError, match="adds a residual; none was given"):
        conv(x)
    with pytest.raises(RuntimeError, match=r"residual must be a dense channels_last float32 CPU tensor of the output's sizes \[2, 8, 10, 10\], got Float sizes \[2, 4, 10, 10\]"):
        conv(x, r[:, :4].contiguous(memory_format=CL))
    with pytest.raises(RuntimeError, match=r"weight \[8, 4, 3, 3\] does not fit 5 input channels in 1 groups"):
        Conv([1, 5, 8, 8], w, b, [1, 1], [1, 1], [1, 1], 1, "none", False)
    with pytest.raises(RuntimeError, match="residual must be 'none', 'sum' or 'add'"):
        Conv([1, 4, 8, 8], w, b, [1, 1], [1, 1], [1, 1], 1, "mul", False)
    with pytest.raises(RuntimeError, match="smaller than the .dilated. kernel 3x3"):
        Conv([1, 4, 2, 2], w, b, [1, 1], [0, 0], [1, 1], 1, "none", False)


@needs_primitives
@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("with_bias", [True, False])
def test_kept_linear_matches_f_linear(rows, with_bias):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(1000, 512, generator=g) / 512 ** 0.5
    b = torch.randn(1000, generator=g) if with_bias else None
    linear = backend._OneDnnOps().kept_linear(rows, w, b)
    for n in (rows, 1, 3, 32, rows):          # the rows it was made for, and others
        x = torch.randn(n, 512, generator=g)
        got = linear(x)
        assert got.shape == (n, 1000) and got.is_contiguous()
        assert rel_err(got, F.linear(x, w, b)) <= TOL, n
    assert linear.shapes_kept == len({rows, 1, 3, 32})
    assert linear.weight_bytes >= w.numel() * 4
    linear.forget_other_shapes()
    assert linear.shapes_kept == 1 and rel_err(linear(x[:1]), F.linear(x[:1], w, b)) <= TOL


@needs_primitives
@pytest.mark.skipif(not hasattr(torch, "_neg_view"), reason="this PyTorch has no negated views")
def test_negated_views_are_read_as_their_values():
    """A negated view's memory holds the values before negation: weights and biases are resolved,
    an input is refused (PyTorch resolves them in its own ops)."""
    ops = backend._OneDnnOps()
    w, b = torch.randn(10, 6), torch.randn(10)
    x = torch.randn(3, 6)
    linear = ops.kept_linear(3, torch._neg_view(w), torch._neg_view(b))
    assert rel_err(linear(x), F.linear(x, -w, -b)) <= TOL
    with pytest.raises(RuntimeError, match="not a negated or conjugated view"):
        linear(torch._neg_view(x))
    cw, cb = torch.randn(8, 4, 3, 3), torch.randn(8)
    conv = ops.kept_conv([1, 4, 6, 6], torch._neg_view(cw), torch._neg_view(cb), [1, 1], [1, 1], [1, 1], 1, "none",
                         False)
    xc = nhwc(1, 4, 6, 6)
    assert rel_err(conv(xc), F.conv2d(xc, -cw, -cb, padding=1)) <= TOL


@needs_primitives
def test_kept_linear_refuses_bad_input_with_a_clear_error():
    Linear = backend._OneDnnOps().kept_linear
    w, b = torch.randn(10, 6), torch.randn(10)
    linear = Linear(2, w, b)
    with pytest.raises(RuntimeError, match=r"input \[2, 5\] has 5 features, not 6"):
        linear(torch.randn(2, 5))
    with pytest.raises(RuntimeError, match="input must be contiguous"):
        linear(torch.randn(6, 2).t())
    with pytest.raises(RuntimeError, match="input must be a 2-D float32 CPU tensor, got Double"):
        linear(torch.randn(2, 6, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="input must be a 2-D float32"):
        linear(torch.randn(2, 6, 1))
    with pytest.raises(RuntimeError, match=r"empty input \[0, 6\]"):
        linear(torch.randn(0, 6))
    with pytest.raises(RuntimeError, match="rows must be positive, got 0"):
        Linear(0, w, b)
    with pytest.raises(RuntimeError, match="weight must be a non-empty 2-D float32 CPU tensor"):
        Linear(1, w.half(), b)
    with pytest.raises(RuntimeError, match="bias must be a float32 CPU tensor of 10 entries, got Float \\[3\\]"):
        Linear(1, w, torch.randn(3))


def calls_from_four_threads(layer, inputs: dict, expected: dict) -> list:
    """Calls ``layer`` on every input five times from each of four threads at once (each thread in
    another order): the batches whose answers were off."""
    failures = []

    def work(order):
        for _ in range(5):
            for n in order:
                if rel_err(layer(inputs[n]), expected[n]) > TOL:
                    failures.append(n)
    threads = [threading.Thread(target=work, args=(list(inputs)[i:] + list(inputs)[:i],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failures


@needs_primitives
def test_calls_from_several_threads_and_batches_agree_with_one_thread():
    """One kept conv called at once from four threads with batches it was not made for (its
    primitives for them made under a lock, each call with a scratchpad of its own)."""
    w, b = torch.randn(64, 32, 3, 3) / 17, torch.randn(64)
    conv = backend._OneDnnOps().kept_conv([8, 32, 14, 14], w, b, [1, 1], [1, 1], [1, 1], 1, "none", True)
    inputs = {n: nhwc(n, 32, 14, 14, seed=n) for n in (1, 2, 3, 5, 8)}
    expected = {n: F.conv2d(x, w, b, padding=1).relu() for n, x in inputs.items()}
    assert calls_from_four_threads(conv, inputs, expected) == []
    assert conv.weight_bytes >= w.numel() * 4


@needs_primitives
def test_the_kept_linear_from_several_threads_and_batches_agrees():
    """As the conv: its primitives for other rows made under a lock, a scratchpad per call."""
    w, b = torch.randn(100, 64) / 8, torch.randn(100)
    linear = backend._OneDnnOps().kept_linear(8, w, b)
    inputs = {n: torch.randn(n, 64, generator=torch.Generator().manual_seed(n)) for n in (1, 2, 3, 5, 8)}
    expected = {n: F.linear(x, w, b) for n, x in inputs.items()}
    assert calls_from_four_threads(linear, inputs, expected) == [] and linear.shapes_kept == 5


def twins(arch):
    torch.manual_seed(0)
    tv = randomize_norm_stats_(getattr(torchvision.models, arch)(num_classes=10), 0).eval()
    model = getattr(fastres, arch)(num_classes=10)
    model.load_state_dict(tv.state_dict())
    return tv, model.eval()


@needs_primitives
@pytest.mark.parametrize("arch", ["resnet18", "resnext50_32x4d"])
def test_programs_with_kept_primitives_and_with_pytorchs_ops_agree(arch, monkeypatch):
    """The fallback (FASTRES_ONEDNN_PRIMITIVES=0, or the extension missing) runs the same program
    through PyTorch's ops: both match torchvision, and each other to the last bits we can expect."""
    tv, model = twins(arch)
    x = image_batch(3, 33, 0)
    with torch.inference_mode():
        expected = tv(x)
        kept = model(x)
        (program,) = model.plan()._onednn_programs._items.values()
        assert without_head(program.primitive_steps) and head_fallback_is_the_rows_check(program)
        assert ("fc" in program.primitive_steps) == ("linear(pool(" not in program.source)
        # a program just built keeps its head's primitive for its own row count only, not the
        # rows check's others
        fresh = backend.OneDnnProgram(model.plan(), program.key, backend._OneDnnOps())
        kept_heads = [v for v in fresh._consts.values() if type(v).__name__ == "Linear"]
        assert [head.shapes_kept for head in kept_heads] == [1] * ("fc" in fresh.primitive_steps)
        ops = backend._OneDnnOps()
        ops.kept_conv = ops.kept_linear = None
        plain = backend.OneDnnProgram(model.plan(), program.key, ops)
        assert plain.primitive_steps == [] and plain.onednn_steps == program.onednn_steps
        assert "conv_add_(" in plain.source and "conv_sum" not in plain.source
        assert "= linear(pool(" in plain.source      # PyTorch's linear on the dense weight
        via_ops = plain(x.contiguous(memory_format=CL))
    assert rel_err(kept, expected) <= TOL and rel_err(via_ops, expected) <= TOL
    assert rel_err(kept, via_ops) <= 1e-6


@pytest.mark.skipif(not backend.onednn_available(), reason=f"oneDNN ops unavailable: {backend.onednn_unavailable_reason()}")
def test_without_the_extension_pytorchs_ops_run_and_fastres_says_so(monkeypatch):
    monkeypatch.setattr(backend, "_primitives_state", None)
    monkeypatch.setattr(backend, "_check_onednn_primitives", lambda: (
        False, "fastres._onednn is not built (No module named 'fastres._onednn'): pip install "
               f"{backend.ONEDNN_PACKAGES}, then pip install --no-build-isolation -e . (make does both)"))
    monkeypatch.setattr(fastres.extension, "_noticed", set())
    monkeypatch.setattr(backend.get_backend("torch"), "_ops", None)    # made anew, without them
    assert not backend.onednn_primitives_available()
    tv, model = twins("resnet18")
    x = image_batch(2, 32, 0)
    with torch.inference_mode(), pytest.warns(RuntimeWarning, match="onednn-cpu-gomp==2023.2.0") as noticed:
        got, expected = model(x), tv(x)
        model(image_batch(1, 40, 1))     # another program: no second notice
    assert rel_err(got, expected) <= TOL
    assert sum("onednn-cpu-gomp" in str(w.message) for w in noticed) == 1
    (program, _) = model.plan()._onednn_programs._items.values()
    assert program.primitive_steps == [] and "conv_add_(" in program.source


def test_the_switch_turns_them_off(monkeypatch):
    monkeypatch.setattr(backend, "_primitives_state", None)
    monkeypatch.setattr(backend, "_PRIMITIVES_ENV", False)
    assert not backend.onednn_primitives_available()
    assert backend.onednn_primitives_reason() == "FASTRES_ONEDNN_PRIMITIVES=0"
    ops = backend._OneDnnOps()
    assert ops.kept_conv is None and ops.kept_linear is None


@needs_primitives
def test_the_engine_runs_kept_primitives_with_its_buckets():
    tv, _ = twins("resnet18")
    engine = Engine(tv, batch_sizes=(1, 4), image_size=32, input="float_nchw")
    x = image_batch(3, 32, 0)
    with torch.inference_mode():
        expected = tv(x)
    assert rel_err(engine(x), expected) <= TOL
    (program,) = engine.plan._onednn_programs._items.values()
    assert program.key[0] == 4 and program.primitive_steps


def without_head(names) -> list:
    """The step names but the head's (``fc``: whether it is kept depends on the CPU, see below)."""
    return [n for n in names if n != "fc"]


def head_fallback_is_the_rows_check(program) -> bool:
    """No step calls PyTorch's op but, on a CPU whose oneDNN matmul sums depend on the batch
    (its AVX2 GEMM), the head."""
    fallbacks = dict(program.primitive_fallbacks)
    head = fallbacks.pop("fc", None)
    return fallbacks == {} and (head is None or "depend on the rows beside it" in head)


def program_and_patched(model, x, ops):
    """The module's program for ``x``, and the same plan's program built with ``ops``."""
    model(x)
    (program,) = model.plan()._onednn_programs._items.values()
    return program, backend.OneDnnProgram(model.plan(), program.key, ops)


@needs_primitives
def test_a_conv_oneDNN_has_only_reference_loops_for_calls_pytorchs_op():
    """Where oneDNN offers no JIT kernel (its ``ref:any`` loops, measured 2500x slower than the
    JIT stem on NCHW input) the program calls PyTorch's op for that conv instead."""
    tv, model = twins("resnet18")
    real = backend._OneDnnOps().kept_conv

    class OnlyReference:
        def __init__(self, input_shape, *args):
            self.conv = real(input_shape, *args)
            self.impl = "ref:any" if input_shape[1] == 3 else self.conv.impl     # the stem's
            self.weight_bytes = self.conv.weight_bytes

        def __call__(self, *args):
            return self.conv(*args)
    ops = backend._OneDnnOps()
    ops.kept_conv = OnlyReference
    x = image_batch(2, 32, 0)
    with torch.inference_mode():
        program, patched = program_and_patched(model, x, ops)
        assert without_head(patched.primitive_fallbacks) == ["conv1"] and "ref:any" in patched.primitive_fallbacks["conv1"]
        assert "conv1" not in patched.primitive_steps and len(patched.primitive_steps) == len(program.primitive_steps) - 1
        assert "v1 = conv(c0, " in patched.source
        assert rel_err(patched(x.contiguous(memory_format=CL)), tv(x)) <= TOL


@needs_primitives
def test_a_head_oneDNN_refuses_calls_pytorchs_linear():
    tv, model = twins("resnet18")
    ops = backend._OneDnnOps()

    def refuse(*args):
        raise RuntimeError("fastres._onednn.Linear: oneDNN refused this matrix product: (test)")
    ops.kept_linear = refuse
    x = image_batch(2, 32, 0)
    with torch.inference_mode():
        program, patched = program_and_patched(model, x, ops)
        assert patched.primitive_fallbacks == {"fc": "fastres._onednn.Linear: oneDNN refused this matrix product: (test)"}
        assert patched.primitive_steps == without_head(program.primitive_steps) and "= linear(pool(" in patched.source
        assert rel_err(patched(x.contiguous(memory_format=CL)), tv(x)) <= TOL
        if "fc" in program.primitive_steps:       # the kept head's laid-out weights are counted
            assert patched.nbytes < program.nbytes


@needs_primitives
def test_a_kept_head_whose_rows_depend_on_the_batch_calls_pytorchs_linear(monkeypatch):
    """The bits a row gets must not depend on the rows beside it (an image's logits within a weight
    layout, README); a kept matmul that fails the check is not used."""
    tv, model = twins("resnet18")
    x = image_batch(2, 32, 0)
    monkeypatch.setattr(backend, "_rows_independent", lambda *args: False)
    with torch.inference_mode():
        program, patched = program_and_patched(model, x, backend._OneDnnOps())
        assert "depend on the rows beside it" in patched.primitive_fallbacks["fc"]
        assert "fc" not in patched.primitive_steps and "= linear(pool(" in patched.source
        assert rel_err(patched(x.contiguous(memory_format=CL)), tv(x)) <= TOL


def test_the_rows_check_tells_a_batch_dependent_matmul_from_one_that_is_not():
    w, b = torch.randn(24, 40), torch.randn(24)
    one_row_at_a_time = lambda x: torch.cat([F.linear(r[None], w, b) for r in x])    # noqa: E731
    # a sum whose last bits move with the number of rows, as an M-blocked GEMM's may
    by_count = lambda x: F.linear(x, w, b) + (x.shape[0] % 3) * 1e-6                  # noqa: E731
    # ... or only for some counts in the middle of a bucket
    mid_bucket = lambda x: F.linear(x, w, b) + (x.shape[0] == 5) * 1e-6               # noqa: E731
    # ... or with the row's place among them
    by_place = lambda x: F.linear(x, w, b) + torch.arange(x.shape[0])[:, None] * 1e-6  # noqa: E731
    assert backend._rows_independent(one_row_at_a_time, 8, 40)
    assert not backend._rows_independent(by_count, 8, 40)
    assert not backend._rows_independent(mid_bucket, 8, 40)
    assert not backend._rows_independent(by_place, 8, 40)


@needs_primitives
def test_a_kept_matmul_that_passes_the_rows_check_gives_every_batch_the_same_rows():
    """Sufficiency on what the check does not run: random rows at other places, batches of the
    next bucket's sizes."""
    if not backend.kept_linear_usable():
        pytest.skip("fastres._onednn.Linear is not usable here")
    w, b = torch.randn(1000, 512) / 23, torch.randn(1000)
    Linear = backend._OneDnnOps().kept_linear
    if not backend._rows_independent(Linear(8, w, b), 8, 512):
        pytest.skip("this CPU's oneDNN matmul depends on the batch: the head runs PyTorch's linear")
    linear = Linear(8, w, b)
    x = torch.randn(40, 512, generator=torch.Generator().manual_seed(5))
    alone = torch.cat([linear(x[i:i + 1].contiguous()) for i in range(40)])    # each row by itself
    for start, n in ((0, 2), (2, 5), (5, 7), (1, 12), (7, 33)):
        assert torch.equal(linear(x[start:start + n].contiguous()), alone[start:start + n]), (start, n)


@needs_primitives
@pytest.mark.skipif(not torch.backends.cpu.get_cpu_capability().startswith("AVX512"),
                    reason="needs an AVX-512 CPU to cap oneDNN at AVX2 (ONEDNN_MAX_CPU_ISA)")
def test_with_oneDNN_capped_at_AVX2_logits_still_do_not_depend_on_the_batch():
    """On AVX2 oneDNN's matmul is its jit GEMM, whose sums depend on the row count; the head must
    then give up the kept matmul, and an image's logits stay the same bits in any batch of its
    weight layout (the test beside it, in a process whose oneDNN is capped at AVX2)."""
    import os
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    tests = [os.path.join(here, "test_cpu_backend.py::test_an_images_logits_do_not_depend_on_its_batch_within_a_weight_layout"),
             os.path.join(here, "test_cpu_backend.py::test_every_constructor_matches_torchvision_and_the_references"),
             os.path.join(here, "test_onednn_primitives.py")]
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k",
                           "not capped_at_AVX2 and (resnet18 or not every_constructor)", *tests],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and " passed" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]
    # the cap took: oneDNN's matmul is its AVX2 GEMM there, and the head gave it up
    probe = ("import torch, fastres\n"
             "m = fastres.resnet18(num_classes=10).eval()\n"
             "with torch.inference_mode(): m(torch.randn(3, 3, 32, 32))\n"
             "(p,) = m.plan()._onednn_programs._items.values()\n"
             "print(p.primitive_fallbacks.get('fc'))\n")
    seen = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=600)
    assert "gemm:jit" in seen.stdout and "depend on the rows beside it" in seen.stdout, seen.stdout + seen.stderr[-2000:]


@needs_primitives
def test_an_extension_without_the_kept_linear_keeps_its_convs(monkeypatch):
    """A fastres._onednn built before Linear existed (an editable install not rebuilt): the convs
    stay kept primitives, the head calls PyTorch's linear."""
    from fastres import _onednn
    monkeypatch.setattr(backend, "_kept_linear_state", None)
    monkeypatch.delattr(_onednn, "Linear")
    assert not backend.kept_linear_usable()
    ops = backend._OneDnnOps()
    assert ops.kept_conv is not None and ops.kept_linear is None
    tv, model = twins("resnet18")
    x = image_batch(2, 32, 0)
    with torch.inference_mode():
        program, patched = program_and_patched(model, x, ops)
        assert patched.primitive_steps == without_head(program.primitive_steps) and "= linear(pool(" in patched.source
        assert rel_err(patched(x.contiguous(memory_format=CL)), tv(x)) <= TOL


@needs_primitives
def test_an_image_size_that_depends_on_the_batch_runs():
    """A conv's input H/W may differ from the one its program was laid out for (here the batch is
    folded into the width): the kept conv makes a primitive for that shape, as PyTorch's op would."""
    class Fold(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 16, 3, padding=1)

        def forward(self, x):
            y = torch.relu(self.c1(x))
            y = torch.cat(y.unbind(0), dim=-1).unsqueeze(0)
            return torch.relu(self.c2(y) + y)
    torch.manual_seed(0)
    model = Fold().eval()
    fast = fastres.optimize(model)
    with torch.no_grad():
        for n in (8, 2, 3, 5):
            x = torch.randn(n, 3, 10, 10)
            assert rel_err(fast(x), model(x)) <= TOL, n


@needs_primitives
def test_bad_geometry_and_aliasing_are_refused():
    Conv = backend._OneDnnOps().kept_conv
    w = torch.randn(8, 4, 3, 3)
    with pytest.raises(RuntimeError, match="stride and dilation must be >= 1"):
        Conv([1, 4, 5, 5], w, None, [0, 1], [1, 1], [1, 1], 1, "none", False)
    with pytest.raises(RuntimeError, match="bias must be a float32 CPU tensor"):
        Conv([1, 4, 5, 5], w, torch.randn(8, device="meta"), [1, 1], [1, 1], [1, 1], 1, "none", False)
    same = Conv([2, 4, 9, 9], torch.randn(4, 4, 3, 3), None, [1, 1], [1, 1], [1, 1], 1, "sum", False)
    x = nhwc(2, 4, 9, 9)
    with pytest.raises(RuntimeError, match="shares memory with the input"):
        same(x, x)


@needs_primitives
def test_other_shapes_are_kept_least_recently_used():
    conv = backend._OneDnnOps().kept_conv([1, 8, 6, 6], torch.randn(8, 8, 1, 1), None, [1, 1], [0, 0], [1, 1], 1,
                                           "none", False)
    for n in range(2, 30):
        conv(nhwc(n, 8, 6, 6))
    assert conv.shapes_kept == 17


def test_reduced_cpu_float32_precision_runs_pytorchs_forward(monkeypatch):
    """torch.backends.mkldnn's fp32_precision = 'bf16': PyTorch computes in bf16, the plan does
    not, so the module runs its own PyTorch forward (said once) and gives PyTorch's answer."""
    from fastres import capture
    tv, model = twins("resnet18")
    x = image_batch(2, 32, 0)
    monkeypatch.setattr(capture, "cpu_fp32_precision", lambda: "bf16")
    with torch.inference_mode(), pytest.warns(fastres.capture.FallbackWarning, match="'bf16'"):
        got = model(x)
        assert torch.equal(got, tv(x))


def test_the_fp32_precision_reads_pytorchs_setting():
    from fastres import capture
    before = torch.backends.mkldnn.matmul.fp32_precision
    try:
        assert capture.cpu_fp32_precision() == "ieee"
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        assert capture.cpu_fp32_precision() == "bf16"
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = before
    assert capture.cpu_fp32_precision() == "ieee"
