"""Test harness configuration.

Without a GPU the Triton kernels run under the Triton interpreter on CPU tensors. The interpreter
is chosen when a kernel is decorated, so TRITON_INTERPRET must be in the environment before any
kernel module is imported: this conftest is imported first and sets it for the session.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"
