"""Winograd F(2x2, 3x3) and F(4x4, 3x3) on CPU (fastres/winograd.py, csrc/winograd_cpu.cpp): the C++ op against
F.conv2d in float64 and against the algorithm's own float64 reference; the CPU backend's rule for
where it runs; whole models through it against torchvision, and with it turned off."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

import fastres
from fastres import backend, cpu_kernels, winograd
from fastres.kernels import _autotune

from kernel_testing import rel_err
from test_cpu_backend import TOL, images, programs, twins

needs_extension = pytest.mark.skipif(not winograd.available(), reason=winograd.unavailable_reason() or "built")
needs_onednn = pytest.mark.skipif(not backend.onednn_available(),
                                  reason=f"oneDNN ops unavailable: {backend.onednn_unavailable_reason()}")
CL = torch.channels_last


def case(n, c, o, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g).contiguous(memory_format=CL)
    weight = torch.randn(o, c, 3, 3, generator=g) / (3 * c ** 0.5)
    bias = torch.randn(o, generator=g)
    residual = torch.randn(n, o, h, w, generator=g).contiguous(memory_format=CL)
    return x, weight, bias, residual


def conv64(x, weight, bias, residual=None, relu=False):
    y = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    y = y + residual.double() if residual is not None else y
    return y.relu() if relu else y


# odd and even sizes, 1-pixel images, channel counts that are not multiples of the C++ channel
# block (64), batch 3
SHAPES = [(1, 8, 16, 5, 7), (3, 70, 33, 9, 4), (2, 64, 64, 14, 14), (1, 130, 96, 1, 1), (1, 3, 5, 2, 1),
          (2, 16, 130, 7, 7)]


SIDES = pytest.mark.parametrize("side", [2, 4])
# How much further from the exact result than a direct float32 conv each algorithm's convs may be
# (measured on SHAPES and resnet's layers: F(2x2) at most 7x on tiny images, under 1x on real ones;
# F(4x4), which multiplies by up to 5 and 8 in its transforms, 5-15x), and from its own float64
# reference (measured: F(2x2) under 5e-7, F(4x4) under 8e-6)
FURTHER_THAN_DIRECT = {2: (4, 1e-6), 4: (20, 1e-5)}
FROM_REFERENCE = {2: 2e-6, 4: 1.5e-5}


@SIDES
@pytest.mark.parametrize("shape", SHAPES)
def test_reference_is_the_convolution(shape, side):
    """The float64 reference (tiles by unfold, the three transforms as einsums) is F.conv2d."""
    x, weight, bias, residual = case(*shape)
    got = winograd.reference(x, weight, bias, residual, relu=True, side=side)
    want = conv64(x, weight, bias, residual, relu=True)
    assert got.shape == want.shape and rel_err(got, want) < 1e-12


@needs_extension
@SIDES
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("residual, relu", [(False, False), (False, True), (True, True), (True, False)])
def test_op_matches_the_convolution(shape, residual, relu, side):
    x, weight, bias, r = case(*shape)
    r = r if residual else None
    y = winograd.conv3x3(x, winograd.transform_weight(weight, side), bias, r, relu)
    assert y.dtype == torch.float32 and y.is_contiguous(memory_format=CL)
    want = conv64(x, weight, bias, r, relu)
    assert y.shape == want.shape
    # float32 roundings of the transforms and the GEMM: a bounded multiple of a direct float32 conv's
    direct = F.conv2d(x, weight, bias, padding=1)
    direct = (direct + r if r is not None else direct)
    direct = direct.relu() if relu else direct
    times, floor = FURTHER_THAN_DIRECT[side]
    assert rel_err(y.double(), want) < max(times * rel_err(direct.double(), want), floor)
    assert rel_err(y.double(), winograd.reference(x, weight, bias, r, relu, side)) < FROM_REFERENCE[side]
    if relu:
        assert (y >= 0).all()


@needs_extension
@SIDES
def test_op_is_deterministic_and_leaves_its_inputs_alone(side):
    x, weight, bias, residual = case(2, 64, 64, 14, 14)
    u = winograd.transform_weight(weight, side)
    copies = [t.clone() for t in (x, u, bias, residual)]
    first = winograd.conv3x3(x, u, bias, residual, True)
    assert torch.equal(winograd.conv3x3(x, u, bias, residual, True), first)
    for t, c in zip((x, u, bias, residual), copies):
        assert torch.equal(t, c)


@needs_extension
def test_bad_arguments_name_the_problem():
    x, weight, bias, residual = case(1, 8, 16, 6, 6)
    u = winograd.transform_weight(weight)
    with pytest.raises(RuntimeError, match="channels_last"):
        winograd.conv3x3(x.contiguous(), u, bias, None, False)
    with pytest.raises(RuntimeError, match="float32"):
        winograd.conv3x3(x.double(), u, bias, None, False)
    with pytest.raises(RuntimeError, match="transformed weight"):
        winograd.conv3x3(x, u[:, :4], bias, None, False)
    with pytest.raises(RuntimeError, match="transformed weight"):       # neither 16 nor 36 points
        winograd.conv3x3(x, torch.cat([u, u[:9]]).contiguous(), bias, None, False)
    with pytest.raises(RuntimeError, match="bias"):
        winograd.conv3x3(x, u, bias[:3], None, False)
    with pytest.raises(RuntimeError, match="residual of shape"):
        winograd.conv3x3(x, u, bias, residual[:, :, :3].contiguous(memory_format=CL), False)
    with pytest.raises(ValueError, match="3, 3"):
        winograd.transform_weight(torch.randn(4, 4, 1, 1))
    with pytest.raises(ValueError, match="2x2 or 4x4"):
        winograd.transform_weight(torch.randn(4, 4, 3, 3), side=6)


def test_rule_follows_the_measurements(monkeypatch):
    """Where it was measured faster (backend.py's table) and nowhere else, per output tile side:
    enough tiles and channels, workspaces that fit."""
    monkeypatch.setattr(winograd, "available", lambda: True)
    one = ((1, 1), (1, 1), (1, 1), 1)
    sides = backend.winograd_sides
    assert sides((256, 256, 3, 3), *one, (1, 256, 14, 14)) == (2,)       # F(2x2) 0.69x; F(4x4): 16 tiles
    assert sides((128, 128, 3, 3), *one, (8, 128, 28, 28)) == (2, 4)     # 0.70x
    assert sides((512, 512, 3, 3), *one, (8, 512, 7, 7)) == (2, 4)       # 0.71x; F(4x4): 32 tiles
    assert sides((64, 64, 3, 3), *one, (1, 64, 56, 56)) == (2, 4)        # 0.82x
    assert sides((512, 512, 3, 3), *one, (1, 512, 7, 7)) == ()           # 16 (4) tiles: 1.12x
    assert sides((64, 64, 3, 3), *one, (32, 64, 56, 56)) == ()           # 1.48x; 102 (58) MB
    assert sides((8, 8, 3, 3), *one, (8, 8, 12, 12)) == ()               # thin GEMMs
    assert sides((256, 256, 3, 3), *one, (32, 256, 14, 14)) == (2, 4)    # 0.64x, 26 (19) MB
    assert sides((128, 128, 3, 3), *one, (32, 128, 28, 28)) == (4,)      # 0.98x, 51 MB; F(4x4) 29 MB
    assert sides((512, 512, 3, 3), *one, (128, 512, 7, 7)) == ()         # 67 (38) MB workspaces
    assert sides((256, 256, 3, 3), (2, 2), (1, 1), (1, 1), 1, (1, 256, 28, 28)) == ()
    assert sides((256, 256, 3, 3), (1, 1), (2, 2), (2, 2), 1, (1, 256, 28, 28)) == ()
    assert sides((256, 8, 3, 3), (1, 1), (1, 1), (1, 1), 32, (1, 256, 28, 28)) == ()
    assert sides((256, 256, 1, 1), (1, 1), (0, 0), (1, 1), 1, (1, 256, 28, 28)) == ()
    monkeypatch.setattr(backend, "_WINOGRAD_MODE", "off")                 # FASTRES_WINOGRAD=0
    assert sides((256, 256, 3, 3), *one, (1, 256, 14, 14)) == ()


@pytest.fixture
def choice_cache(tmp_path, monkeypatch):
    path = tmp_path / "autotune.json"
    monkeypatch.setenv("FASTRES_AUTOTUNE_CACHE", str(path))
    monkeypatch.setattr(_autotune, "_caches", {})
    monkeypatch.setattr(backend, "_WINOGRAD_MODE", "auto")
    return path


F2, F4 = "winograd_f2x2", "winograd_f4x4"


def test_it_runs_where_it_measured_faster_by_the_margin(choice_cache, monkeypatch):
    """FASTRES_WINOGRAD=auto: each shape timed once (a win twice), the fastest Winograd only where
    both its timings are at or under WINOGRAD_MARGIN of the direct conv's time, the same choice for
    every thread count, read back from the file by a later process; FASTRES_WINOGRAD=1 times
    nothing and takes the largest side allowed."""
    timed = []
    speeds = {(1, 256, 14, 14): [{"direct": 2.0, F2: 1.56}, {"direct": 1.0, F2: 0.7}],
              (8, 256, 14, 14): [{"direct": 1.0, F2: 0.85, F4: 0.82}],    # near ties: the direct conv
              (1, 256, 28, 28): [{"direct": 1.0, F2: 1.5, F4: 1.2}],
              (1, 256, 7, 7): [{"direct": 1.0, F2: 0.7}, {"direct": 1.0, F2: 0.95}],        # noise
              (8, 128, 28, 28): [{"direct": 1.0, F2: 0.75, F4: 0.6}, {"direct": 1.0, F2: 0.7, F4: 0.62}],
              (1, 128, 28, 28): [{"direct": 1.0, F2: 0.7, F4: 0.5}, {"direct": 1.0, F2: 0.7, F4: 0.9}]}

    def fake_timing(ops, weight_shape, x_shape, threads, sides):
        timed.append((x_shape, threads))
        times = speeds[x_shape][sum(1 for x, _ in timed if x == x_shape) - 1]
        assert set(times) == {"direct", *(f"winograd_f{s}x{s}" for s in sides)}
        return times

    monkeypatch.setattr(backend, "_time_winograd", fake_timing)
    w = (256, 256, 3, 3)
    choice = backend.winograd_choice
    assert choice(None, w, (1, 256, 14, 14), 2, (2,)) == 2
    assert choice(None, w, (8, 256, 14, 14), 2, (2, 4)) == 0
    assert choice(None, w, (1, 256, 28, 28), 2, (2, 4)) == 0
    assert choice(None, w, (1, 256, 7, 7), 2, (2,)) == 0              # the win was not confirmed
    assert choice(None, (128, 128, 3, 3), (8, 128, 28, 28), 2, (2, 4)) == 4
    assert choice(None, (128, 128, 3, 3), (1, 128, 28, 28), 2, (2, 4)) == 2    # F(4x4)'s win was noise
    assert [x for x, _ in timed] == ([(1, 256, 14, 14)] * 2 + [(8, 256, 14, 14), (1, 256, 28, 28)]
                                     + [(1, 256, 7, 7)] * 2 + [(8, 128, 28, 28)] * 2 + [(1, 128, 28, 28)] * 2)
    assert {t for _, t in timed} == {2}
    assert choice(None, w, (1, 256, 14, 14), 2, (2,)) == 2 and choice(None, w, (1, 256, 14, 14), 1, (2,)) == 2
    assert choice(None, w, (1, 256, 7, 7), 1, (2,)) == 0 and len(timed) == 10
    stored = json.loads(choice_cache.read_text())
    assert list(stored) == [f"cpu: {backend.cpu_identity()}"]
    assert sorted(stored[f"cpu: {backend.cpu_identity()}"]["winograd_conv3x3"].values()) == [
        "direct", "direct", "direct", F2, F2, F4]
    assert choice(None, w, (1, 256, 14, 14), 2, ()) == 0 and len(timed) == 10    # nothing allowed: untimed

    monkeypatch.setattr(_autotune, "_caches", {})          # a new process
    monkeypatch.setattr(backend, "_time_winograd", lambda *a: pytest.fail("timed again"))
    assert choice(None, w, (1, 256, 14, 14), 2, (2,)) == 2
    assert choice(None, (128, 128, 3, 3), (8, 128, 28, 28), 1, (2, 4)) == 4
    assert choice(None, w, (1, 256, 28, 28), 2, (2, 4)) == 0
    monkeypatch.setattr(backend, "_WINOGRAD_MODE", "on")
    assert choice(None, w, (3, 256, 9, 9), 2, (2,)) == 2 and choice(None, w, (3, 256, 9, 9), 2, (2, 4)) == 4
    assert choice(None, w, (3, 256, 9, 9), 2, ()) == 0


def test_a_choice_among_fewer_sides_is_made_again(choice_cache, monkeypatch):
    """A choice cached from a timing of F(2x2) alone (as before F(4x4) existed, or where only it
    fitted) is not the answer for a timing that may also take F(4x4)."""
    monkeypatch.setattr(backend, "_time_winograd", lambda *a: {"direct": 1.0, F2: 0.7})
    assert backend.winograd_choice(None, (128, 128, 3, 3), (1, 128, 28, 28), 2, (2,)) == 2
    monkeypatch.setattr(backend, "_time_winograd", lambda *a: {"direct": 1.0, F2: 0.7, F4: 0.5})
    assert backend.winograd_choice(None, (128, 128, 3, 3), (1, 128, 28, 28), 2, (2, 4)) == 4


def test_a_failed_timing_runs_the_direct_conv_and_caches_nothing(choice_cache, monkeypatch):
    def out_of_memory(*args):
        raise RuntimeError("DefaultCPUAllocator: not enough memory")
    monkeypatch.setattr(backend, "_time_winograd", out_of_memory)
    assert backend.winograd_choice(None, (256, 256, 3, 3), (1, 256, 14, 14), 2, (2,)) == 0
    assert not choice_cache.exists()
    monkeypatch.setattr(backend, "_time_winograd", lambda *a: {"direct": 1.0, F2: 0.5})
    assert backend.winograd_choice(None, (256, 256, 3, 3), (1, 256, 14, 14), 1, (2,)) == 0   # one algorithm
    assert not choice_cache.exists()
    monkeypatch.setattr(backend, "_WINOGRAD_FAILED", set())                                # a new process
    assert backend.winograd_choice(None, (256, 256, 3, 3), (1, 256, 14, 14), 2, (2,)) == 2  # timed again


@needs_onednn
@needs_extension
def test_programs_follow_the_measured_choice(choice_cache, monkeypatch):
    """The real timing gives every candidate's time; a program runs the Winograd side exactly where
    the choice says, and answers torchvision's logits whichever it is."""
    times = backend._time_winograd(backend._OneDnnOps(), (64, 64, 3, 3), (1, 64, 32, 32), 1, (2, 4))
    assert set(times) == {"direct", F2, F4} and all(0 < t < 1 for t in times.values())
    for winner in ("direct", F2, F4):
        monkeypatch.setattr(_autotune, "_caches", {})
        choice_cache.unlink(missing_ok=True)

        def fake_timing(ops, weight_shape, x_shape, threads, sides, winner=winner):
            return {"direct": 1.0, **{f"winograd_f{s}x{s}": 0.5 if f"winograd_f{s}x{s}" == winner else 2.0
                                      for s in sides}}
        monkeypatch.setattr(backend, "_time_winograd", fake_timing)
        tv, model = twins("resnet18")
        x = images(1, 128, 128)        # layer1 at 32x32: 64 F(4x4) tiles, 256 F(2x2) ones
        with torch.inference_mode():
            got, expected = model(x), tv(x)
        (program,) = programs(model).values()
        want = {"direct": set(), F2: {2}, F4: {4}}[winner]
        assert set(program.winograd_steps.values()) == want, program.source
        assert rel_err(got, expected) <= TOL


@needs_onednn
@needs_extension
@pytest.mark.parametrize("pages_per_call, tuned", [(0, []), (2000, [0])])
def test_its_timing_runs_as_a_program_would_with_faulting_workspaces(monkeypatch, pages_per_call, tuned):
    """Winograd's workspaces page-faulting past MALLOC_FAULT_BYTES on every call would make a
    program running it turn tune_malloc on after two calls: its timing turns it on first, so it
    times both the way they would then run; without such faults malloc is left alone."""
    faults, calls = [0], []

    def fake_minor_faults():
        faults[0] += pages_per_call // 2
        return faults[0]
    monkeypatch.setattr(backend, "_minor_faults", fake_minor_faults)
    monkeypatch.setattr(backend, "tune_malloc", lambda: calls.append(len(calls)) or True)
    monkeypatch.setattr(backend, "MALLOC_FAULT_BYTES", 500 * backend._PAGE_BYTES)
    times = backend._time_winograd(backend._OneDnnOps(), (64, 64, 3, 3), (1, 64, 16, 16), 1, (2, 4))
    assert calls == tuned and all(0 < t < 1 for t in times.values())


def test_rule_without_the_extension(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_extension", None)
    monkeypatch.setattr(cpu_kernels, "_extension_error", "fastres._cpu is not built (test)")
    assert not winograd.available() and "not built" in winograd.unavailable_reason()
    assert backend.winograd_sides((256, 256, 3, 3), (1, 1), (1, 1), (1, 1), 1, (1, 256, 14, 14)) == ()
    with pytest.raises(RuntimeError, match="not built"):
        winograd.conv3x3(*case(1, 8, 8, 4, 4)[:3])


@needs_onednn
@needs_extension
@pytest.mark.parametrize("arch, size, pair", [("resnet18", 64, False), ("resnet50", 64, True)])
def test_models_run_it_and_agree_with_torchvision(monkeypatch, arch, size, pair):
    """Basic blocks (a 3x3 with residual and one with a projection shortcut) and bottlenecks (the
    3x3 of a fused 3x3 -> 1x1 pair), batch 1 and 3, wherever the rule allows it (FASTRES_WINOGRAD=1:
    whether it pays is this machine's; F(4x4) where its tiles are enough, F(2x2) in the smaller
    layers); the same model with Winograd turned off runs oneDNN's convolutions only, and both
    answer torchvision's logits."""
    monkeypatch.setattr(backend, "_WINOGRAD_MODE", "on")
    tv, model = twins(arch)
    sides = set()
    for n, h, w in [(1, size, size), (3, size - 3, size + 5)]:
        x = images(n, h, w)
        with torch.inference_mode():
            expected = tv(x)
            got = model(x)
        (program,) = [p for k, p in programs(model).items() if k[1:4] == (3, h, w)]
        assert program.winograd_steps, program.source
        assert ("+conv3" in " ".join(program.winograd_steps)) == pair
        sides |= set(program.winograd_steps.values())
        assert rel_err(got, expected) <= TOL
        monkeypatch.setattr(backend, "_WINOGRAD_MODE", "off")
        plain = backend.OneDnnProgram(model.plan(), program.key, backend._OneDnnOps())
        monkeypatch.setattr(backend, "_WINOGRAD_MODE", "on")
        assert not plain.winograd_steps and "winograd(" not in plain.source
        with torch.inference_mode():
            assert rel_err(plain(x), expected) <= TOL
            assert rel_err(plain(x), got) <= TOL
    assert sides == {2, 4}


@needs_onednn
@needs_extension
def test_the_deepest_resnet_with_f4x4_everywhere_stays_within_the_contract(monkeypatch):
    """F(4x4)'s convs are several times further from float64 than a direct conv's; over resnet152's
    3x3 convs at 224x224, batch 1, as Winograd wherever the rule allows (FASTRES_WINOGRAD=1:
    F(4x4) in layer1 and layer2, F(2x2) in layer3's 14x14, too few tiles for F(4x4)) the logits
    must still be within the fp32 contract of torchvision's float64 forward."""
    monkeypatch.setattr(backend, "_WINOGRAD_MODE", "on")
    tv, model = twins("resnet152", share=True)
    x = images(1, 224, 224)
    with torch.inference_mode():
        got = model(x)
        expected = copy.deepcopy(tv).double()(x.double())
    (program,) = programs(model).values()
    sides = list(program.winograd_steps.values())
    assert sides.count(4) == 10 and sides.count(2) == 35, program.winograd_steps     # (not the stride-2 ones)
    assert rel_err(got.double(), expected) <= TOL


@needs_onednn
@needs_extension
def test_engine_runs_it(monkeypatch):
    monkeypatch.setattr(backend, "_WINOGRAD_MODE", "on")
    tv, _ = twins("resnet18")
    engine = fastres.Engine(tv, batch_sizes=(1, 4), image_size=64, input="float_nchw", device="cpu")
    x = images(3, 64, 64)
    with torch.inference_mode():
        assert rel_err(engine(x), tv(x)) <= TOL
    cache = engine.plan.__dict__["_onednn_programs"]
    assert all(p.winograd_steps for p in cache._items.values())
