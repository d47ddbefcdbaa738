"""Build script: the Python packages, with kernels/ installed as fastres.kernels.

The C++ extension (csrc/ -> fastres._C) is added here by the extension build.
"""
from setuptools import setup

setup(
    packages=["fastres", "fastres.kernels"],
    package_dir={"fastres": "fastres", "fastres.kernels": "kernels"},
)
