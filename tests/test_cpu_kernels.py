"""fastres.cpu_kernels (csrc/pool_cpu.cpp): the CPU backend's max pool against F.max_pool2d, bit
for bit, its head's mean against a float64 mean, and their places in the CPU program."""
import pytest
import torch
import torch.nn.functional as F
import torchvision

import fastres
from fastres import backend, cpu_kernels

from kernel_testing import rel_err

needs_extension = pytest.mark.skipif(not cpu_kernels.available(),
                                     reason=cpu_kernels.unavailable_reason() or "built")
CL = torch.channels_last


def nhwc(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).contiguous(memory_format=CL)


def same_bits(a, b):
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


@needs_extension
@pytest.mark.parametrize("shape", [(1, 64, 112, 112), (3, 64, 56, 56), (2, 5, 7, 9), (1, 17, 1, 1),
                                   (2, 3, 2, 3), (1, 130, 13, 4), (4, 1, 6, 5)])
def test_max_pool_is_pytorchs_bit_for_bit(shape):
    x = nhwc(*shape)
    got = cpu_kernels.max_pool3x3s2(x)
    expected = F.max_pool2d(x, 3, stride=2, padding=1)
    assert same_bits(got.contiguous(), expected.contiguous())
    assert got.is_contiguous(memory_format=CL)


@needs_extension
def test_max_pool_nan_inf_and_signed_zeros_as_pytorch():
    x = nhwc(2, 19, 9, 8, seed=1)
    x[0, 3, 2, 2] = float("nan")
    x[1, 5, :, :] = float("-inf")
    x[1, 6, :, :] = 0.0
    x[1, 6, ::2, ::3] = -0.0            # equal values: the first of the window is kept
    x[0, 7, 4, 4] = float("inf")
    x[1, 8, :3, :3] = float("nan")
    got = cpu_kernels.max_pool3x3s2(x)
    expected = F.max_pool2d(x, 3, stride=2, padding=1)
    assert same_bits(got.contiguous(), expected.contiguous())
    assert got.isnan().sum() == expected.isnan().sum() > 0


@needs_extension
def test_max_pool_bad_input_is_named():
    with pytest.raises(RuntimeError, match="channels_last"):
        cpu_kernels.max_pool3x3s2(torch.randn(1, 4, 5, 5))
    with pytest.raises(RuntimeError, match="float32"):
        cpu_kernels.max_pool3x3s2(nhwc(1, 4, 5, 5).double())
    with pytest.raises(RuntimeError, match="4-D"):
        cpu_kernels.max_pool3x3s2(torch.randn(4, 5, 5))
    for empty in ((1, 4, 0, 5), (1, 0, 5, 5)):      # F.max_pool2d refuses both too
        with pytest.raises(RuntimeError, match="empty image"):
            cpu_kernels.max_pool3x3s2(torch.empty(*empty).contiguous(memory_format=CL))


@needs_extension
def test_max_pool_lets_other_python_threads_run():
    """It releases the GIL while it runs (as F.max_pool2d does): while one long pool runs in a
    worker thread, the main thread's Python loop never stops for as long as the pool takes (holding
    the GIL, it would stop for all of it)."""
    import threading
    import time
    x = nhwc(64, 64, 112, 112)
    done, took = threading.Event(), []

    def pool():
        t = time.perf_counter()
        cpu_kernels.max_pool3x3s2(x)
        took.append(time.perf_counter() - t)
        done.set()
    cpu_kernels.max_pool3x3s2(x)              # warm (pages of the output, the clone's dispatch)
    stamps = [time.perf_counter()]
    worker = threading.Thread(target=pool)
    worker.start()                            # it takes the GIL from this loop to start the pool
    while not done.is_set():
        stamps.append(time.perf_counter())
    worker.join()
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    if took[0] < 0.02:                 # the switch interval is 5 ms: too fast a machine to tell
        pytest.skip(f"the pool took {took[0] * 1e3:.1f} ms, too short to tell a held GIL from the switch interval")
    assert max(gaps) < 0.5 * took[0], (max(gaps), took[0])


@needs_extension
@pytest.mark.parametrize("shape", [(1, 2048, 7, 7), (3, 5, 1, 1), (2, 300, 3, 5), (4, 1, 6, 5), (2, 512, 16, 16)])
def test_global_mean_is_the_mean(shape):
    """The mean over the pixels, summed in double: the float64 mean rounded once (within a
    rounding where the two double sums' orders differ), within float32 roundings of PyTorch's."""
    x = nhwc(*shape)
    got = cpu_kernels.global_mean(x)
    exact = x.double().mean((2, 3))
    assert got.shape == exact.shape and got.dtype == torch.float32 and got.is_contiguous()
    assert ((got.double() - exact).abs() <= exact.abs() * 2 ** -23 + 1e-30).all()
    assert rel_err(got, x.mean((2, 3))) < 1e-6


@needs_extension
def test_global_mean_of_an_image_does_not_depend_on_its_batch():
    x = nhwc(5, 300, 7, 7, seed=2)
    whole = cpu_kernels.global_mean(x)
    for i in range(5):
        assert same_bits(cpu_kernels.global_mean(x[i:i + 1].contiguous(memory_format=CL)), whole[i:i + 1])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert same_bits(cpu_kernels.global_mean(x), whole)
    finally:
        torch.set_num_threads(threads)


@needs_extension
def test_global_mean_nan_and_inf_as_pytorch():
    x = nhwc(2, 6, 3, 3, seed=3)
    x[0, 0, 1, 1] = float("nan")
    x[0, 1, 0, 2] = float("inf")
    x[1, 2, 0, 0], x[1, 2, 2, 2] = float("inf"), float("-inf")
    x[1, 3, 1, 0] = float("-inf")
    got, expected = cpu_kernels.global_mean(x), x.mean((2, 3))
    assert torch.equal(got.isnan(), expected.isnan()) and torch.equal(got.isinf(), expected.isinf())
    finite = expected.isfinite()
    assert torch.equal(got[~finite].nan_to_num(), expected[~finite].nan_to_num())
    assert rel_err(got[finite], expected[finite]) < 1e-6


@needs_extension
def test_global_mean_bad_input_is_named():
    with pytest.raises(RuntimeError, match="channels_last"):
        cpu_kernels.global_mean(torch.randn(2, 4, 5, 5))
    with pytest.raises(RuntimeError, match="float32"):
        cpu_kernels.global_mean(nhwc(1, 4, 5, 5).double())
    with pytest.raises(RuntimeError, match="4-D"):
        cpu_kernels.global_mean(torch.randn(4, 5, 5))
    for empty in ((1, 4, 0, 5), (1, 0, 5, 5), (0, 4, 5, 5)):
        with pytest.raises(RuntimeError, match="empty input"):
            cpu_kernels.global_mean(torch.empty(*empty).contiguous(memory_format=CL))


def test_without_the_extension_it_says_so_and_the_program_pools_with_pytorch(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_extension", None)
    monkeypatch.setattr(cpu_kernels, "_extension_error", "fastres._cpu is not built (test)")
    assert not cpu_kernels.available() and "not built" in cpu_kernels.unavailable_reason()
    with pytest.raises(RuntimeError, match="not built"):
        cpu_kernels.max_pool3x3s2(nhwc(1, 4, 5, 5))
    if backend.onednn_available():
        tv, model = _twins()
        x = torch.randn(2, 3, 45, 37)
        with torch.inference_mode():
            assert rel_err(model(x), tv(x)) <= 1e-5
        (program,) = model.plan().__dict__["_onednn_programs"]._items.values()
        assert program.cpu_kernel_steps == [] and "max_pool(" not in program.source
        assert program._consts["pool"] is backend._global_pool


def _twins():
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=10).eval()
    model = fastres.resnet18(num_classes=10)
    model.load_state_dict(tv.state_dict())
    return tv, model.eval()


@needs_extension
@pytest.mark.skipif(not backend.onednn_available(), reason="oneDNN ops unavailable")
def test_the_program_runs_the_stem_pool_with_it():
    tv, model = _twins()
    for x in (torch.randn(1, 3, 64, 64), torch.randn(3, 3, 45, 37)):
        with torch.inference_mode():
            assert rel_err(model(x), tv(x)) <= 1e-5
            with fastres.use_backend("reference"):
                reference = model(x)
            assert rel_err(model(x), reference) <= 1e-5
    for program in model.plan().__dict__["_onednn_programs"]._items.values():
        assert program.cpu_kernel_steps == ["maxpool"] and "max_pool(" in program.source
        assert program._consts["pool"] is cpu_kernels.extension().global_mean     # the head's pool
