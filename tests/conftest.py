"""Test harness configuration.

Without a GPU the Triton kernels run under the Triton interpreter on CPU tensors. The interpreter
is chosen when a kernel is decorated, so TRITON_INTERPRET must be in the environment before any
kernel module is imported: this conftest is imported first and sets it for the session.
"""
import os
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Measured choices (the CPU's Winograd-or-direct, GPU autotuning) go to a cache of this session's,
# not the user's ~/.cache: a test's programs must not depend on what an earlier run timed.
os.environ.setdefault("FASTRES_AUTOTUNE_CACHE",
                      os.path.join(tempfile.mkdtemp(prefix="fastres-tests-"), "autotune.json"))

import pytest  # noqa: E402


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session", autouse=True)
def single_threaded_blas():
    """Under the interpreter every tl.dot is a tiny numpy matmul; a multithreaded BLAS makes those
    several times slower on a busy 2-core machine. (Torch's own CPU kernels are not affected.)"""
    from threadpoolctl import threadpool_limits
    with threadpool_limits(limits=1, user_api="blas"):
        yield


@pytest.fixture(autouse=True)
def fixed_thread_count():
    """The thread governor off (its own tests turn it on): a test's programs, and so the counts
    it asserts, must not depend on how busy the machine running the suite is."""
    from fastres import backend
    enabled = backend.GOVERNOR.enabled
    backend.set_adaptive_threads(False)
    yield
    backend.set_adaptive_threads(enabled)
