// Python bindings of fastres._cpu (csrc/cpu_ops.h); use fastres.cpu_kernels and fastres.winograd.
#include "cpu_ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "fastres's CPU kernels (float32, NHWC); use fastres.cpu_kernels and fastres.winograd.";
  // All release the GIL while they run, as PyTorch's own ops do: other Python threads (an
  // Engine's callers, a data loader) keep running.
  using release_gil = pybind11::call_guard<pybind11::gil_scoped_release>;
  module.def("conv3x3", &fastres_cpu::conv3x3, "relu?(conv3x3(x) + bias (+ residual)), stride 1, padding 1",
             pybind11::arg("x"), pybind11::arg("u"), pybind11::arg("bias"), pybind11::arg("residual"),
             pybind11::arg("relu"), release_gil());
  module.def("max_pool3x3s2", &fastres_cpu::max_pool3x3s2, "max_pool2d(x, 3, stride=2, padding=1)",
             pybind11::arg("x"), release_gil());
  module.def("global_mean", &fastres_cpu::global_mean, "x.mean((2, 3)) as [N, C], summed in double",
             pybind11::arg("x"), release_gil());
}
