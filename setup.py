"""Build script: the Python packages (kernels/ installed as fastres.kernels) and the extension fastres._C.

fastres._C is plain pybind11 over raw pointers (no torch headers, no libtorch link), compiled from
csrc/ by torch's BuildExtension, which runs nvcc and ninja; fastres._guard (csrc/guard.cpp, the
plan guard's check) and fastres._cpu (csrc/cpu_ops.h: the CPU backend's Winograd 3x3
convolutions and max pool) are small CppExtensions against PyTorch's headers; fastres._onednn
(csrc/onednn_conv.cpp: the CPU backend's convolutions as kept oneDNN primitives) builds where
oneDNN's GNU-OpenMP packages are installed (``pip install onednn-cpu-gomp==2023.2.0
onednn-devel-cpu-gomp==2023.2.0``, which ``make`` does first on x86-64 Linux). Build with torch
importable: ``pip install --no-build-isolation -e .``. Environment:

  FASTRES_CUDA_BUILD    auto (default): CUDA kernels when nvcc is found (CUDA_HOME, PATH or
                        /usr/local/cuda); 1: require them; 0: CPU twins only.
  TORCH_CUDA_ARCH_LIST  GPUs to compile for, default "8.0;9.0" ("9.0+PTX" also embeds PTX).
  MAX_JOBS              ninja's parallel compile jobs.
  FASTRES_ONEDNN_ROOT   where oneDNN's include/ and lib/ are (default: this Python's prefix).

Without torch at build time the package installs without the extension (fastres then says so).
"""
import os
import re
import sys

from setuptools import Extension, setup

CPU_SOURCES = ["csrc/bindings.cpp", "csrc/preprocess_cpu.cpp", "csrc/transpose_cpu.cpp", "csrc/pad_nhwc_cpu.cpp"]
CUDA_SOURCES = ["csrc/preprocess.cu", "csrc/transpose.cu", "csrc/pad_nhwc.cu"]


def cuda_archs():
    """TORCH_CUDA_ARCH_LIST ("8.0;9.0a+PTX") as [("80", False), ("90a", True)]: (arch, embed PTX)."""
    archs = []
    for item in os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0").replace(" ", ";").split(";"):
        if item and not re.fullmatch(r"\d+\.\d+a?(\+PTX)?", item):
            sys.exit(f"TORCH_CUDA_ARCH_LIST: expected entries like 8.0, 9.0a or 9.0+PTX, got {item!r}")
        if item:
            archs.append((item.removesuffix("+PTX").replace(".", ""), item.endswith("+PTX")))
    return archs


def cuda_home():
    """The CUDA toolkit to build with, or None for a CPU-only build (FASTRES_CUDA_BUILD decides)."""
    mode = os.environ.get("FASTRES_CUDA_BUILD", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"FASTRES_CUDA_BUILD must be auto, 0 or 1, not {mode!r}")
    if mode == "0":
        return None
    from torch.utils.cpp_extension import CUDA_HOME  # CUDA_HOME/CUDA_PATH, nvcc on PATH, /usr/local/cuda

    if CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return CUDA_HOME
    if mode == "1":
        sys.exit("FASTRES_CUDA_BUILD=1 but nvcc was not found: set CUDA_HOME to the CUDA toolkit")
    print("fastres: nvcc not found, building fastres._C without CUDA (CPU twins only)")
    return None


def onednn_root():
    """The prefix holding oneDNN's headers and libdnnl.so.3 (the onednn-*-cpu-gomp wheels put them
    under the environment's include/ and lib/), or None: fastres._onednn is then not built and the
    CPU backend calls PyTorch's oneDNN ops instead (slower per call; fastres says so)."""
    root = os.environ.get("FASTRES_ONEDNN_ROOT") or sys.prefix
    found = (os.path.exists(os.path.join(root, "include", "oneapi", "dnnl", "dnnl.hpp"))
             and os.path.exists(os.path.join(root, "lib", "libdnnl.so.3")))
    hint = "pip install onednn-cpu-gomp==2023.2.0 onednn-devel-cpu-gomp==2023.2.0 adds it"
    if not found:
        print(f"fastres: oneDNN not found under {root} (include/oneapi/dnnl, lib/libdnnl.so.3); building without "
              f"fastres._onednn. {hint}")
        return None
    # only an OpenMP build runs on PyTorch's threads (a TBB or sequential one would fight or idle them)
    with open(os.path.join(root, "include", "oneapi", "dnnl", "dnnl_config.h")) as config:
        openmp = re.search(r"#define\s+DNNL_CPU_THREADING_RUNTIME\s+DNNL_RUNTIME_OMP\b", config.read())
    if not openmp:
        print(f"fastres: the oneDNN under {root} is not an OpenMP build; building without fastres._onednn. {hint}")
        return None
    return root


def extension_build():
    """(ext_modules, cmdclass) for fastres._C, or nothing when torch is not importable."""
    try:
        import pybind11
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as error:
        print(f"fastres: building without the C++ extension fastres._C ({error}); "
              "install torch and pybind11, then pip install --no-build-isolation -e .")
        return [], {}
    cxx = ["-O3", "-std=c++17", "-Wall", "-g0"]
    sources, libraries, library_dirs = list(CPU_SOURCES), [], []
    nvcc = ["-O3", "-std=c++17", "-Xptxas=-warn-spills"]
    home = cuda_home()
    if home is not None:
        archs = cuda_archs()
        cxx += ["-DFASTRES_WITH_CUDA", "-DFASTRES_CUDA_ARCHS=" + ",".join(a.rstrip("a") for a, _ in archs)]
        for arch, ptx in archs:
            nvcc.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
            if ptx:
                nvcc.append(f"-gencode=arch=compute_{arch},code=compute_{arch}")
        sources += CUDA_SOURCES
        # The static CUDA runtime: the module loads (CPU twins included) on machines without CUDA
        # libraries, and never competes with torch's libcudart for a version.
        libraries += ["cudart_static", "rt", "dl", "pthread"]
        library_dirs.append(os.path.join(home, "lib64"))
    extension = Extension(
        "fastres._C", sources, include_dirs=[pybind11.get_include()], libraries=libraries,
        library_dirs=library_dirs, extra_compile_args={"cxx": cxx, "nvcc": nvcc}, language="c++")
    # The plan guard reads tensors' version counters from their TensorImpl: PyTorch's headers.
    guard = CppExtension("fastres._guard", ["csrc/guard.cpp"],
                         extra_compile_args={"cxx": ["-O2", "-std=c++20", "-g0"]})
    # The CPU backend's kernels (Winograd 3x3 convolutions, the stem's max pool, the head's mean):
    # ATen's parallel_for (OpenMP; torch's own libgomp, loaded first). No FMA contraction: GCC contracts
    # a * b + c by default in C++, and the AVX-512 clone of a Winograd transform would then round
    # differently from the AVX2 and baseline clones.
    cpu = CppExtension("fastres._cpu", ["csrc/cpu_bindings.cpp", "csrc/winograd_cpu.cpp", "csrc/pool_cpu.cpp"],
                       extra_compile_args={"cxx": ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off", "-g0"]},
                       extra_link_args=["-fopenmp"])
    extensions = [extension, guard, cpu]
    root = onednn_root()
    if root is not None:
        lib = os.path.join(root, "lib")
        extensions.append(CppExtension(
            "fastres._onednn", ["csrc/onednn_conv.cpp"], include_dirs=[os.path.join(root, "include")],
            extra_compile_args={"cxx": ["-O2", "-std=c++20", "-g0"]},
            # libdnnl.so.3 by its path (the name alone could find another oneDNN first)
            extra_link_args=[f"-L{lib}", "-l:libdnnl.so.3", f"-Wl,-rpath,{lib}"]))
    return extensions, {"build_ext": BuildExtension}


ext_modules, cmdclass = extension_build()
setup(
    packages=["fastres", "fastres.kernels"],
    package_dir={"fastres": "fastres", "fastres.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
