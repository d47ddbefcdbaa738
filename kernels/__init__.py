"""Triton kernels of fastres, one kernel per module.

Each module holds the ``@triton.jit`` kernel, its launch wrapper, its configuration rule and a
plain-PyTorch reference of the same math (``*_ref``) that tests and the CPU path use.
Importing this package never touches a GPU.
"""
