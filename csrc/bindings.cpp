// Python bindings of fastres._C: plain pybind11 over raw pointers and sizes.
//
// No torch headers and no libtorch link, so this file compiles in seconds and the module keeps
// working across torch versions. fastres/extension.py owns the tensor-level checks (dtype, rank,
// device, memory format) and passes data_ptr()s; the checks here guard the raw arguments.
// CUDA entry points take the caller's stream as an integer (torch.cuda.current_stream().cuda_stream)
// and launch on the current device, which the caller selects.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <vector>

#include "pad_nhwc.h"
#include "preprocess.h"
#include "transpose.h"

namespace py = pybind11;

namespace {

using fastres::OutDtype;

fastres::PreprocessParams preprocess_params(uintptr_t images, uintptr_t out, int64_t n, int64_t h, int64_t w,
                                            bool planar, const std::vector<double>& mean,
                                            const std::vector<double>& std_dev, int c_pad, int out_dtype,
                                            const std::vector<int64_t>& border) {
  FASTRES_CHECK(mean.size() == 3 && std_dev.size() == 3, "preprocess needs 3 mean and 3 std values");
  FASTRES_CHECK(border.size() == 4, "preprocess needs a border of 4 values (top, bottom, left, right)");
  return fastres::make_preprocess_params(reinterpret_cast<const uint8_t*>(images), reinterpret_cast<void*>(out), n, h,
                                         w, planar, mean.data(), std_dev.data(), c_pad, out_dtype, border[0], border[1],
                                         border[2], border[3]);
}

fastres::PadNhwcParams pad_nhwc_params(uintptr_t src, uintptr_t dst, const std::vector<int64_t>& sizes,
                                       const std::vector<int64_t>& strides, const std::vector<int64_t>& border,
                                       int c_pad, int element_size) {
  FASTRES_CHECK(sizes.size() == 4 && strides.size() == 4 && border.size() == 4,
                "nchw_to_nhwc_padded needs 4 sizes, 4 strides and 4 border values");
  return fastres::make_pad_nhwc_params(reinterpret_cast<const void*>(src), reinterpret_cast<void*>(dst), sizes[0],
                                       sizes[1], sizes[2], sizes[3], strides[0], strides[1], strides[2], strides[3],
                                       border[0], border[1], border[2], border[3], c_pad, element_size);
}

fastres::TransposeParams transpose_params(uintptr_t src, uintptr_t dst, int64_t batch, int64_t rows, int64_t cols,
                                          int element_size) {
  return fastres::make_transpose_params(reinterpret_cast<const void*>(src), reinterpret_cast<void*>(dst), batch, rows,
                                        cols, element_size);
}

void require_cuda() {
#ifndef FASTRES_WITH_CUDA
  throw std::runtime_error(
      "fastres._C was built without CUDA (FASTRES_CUDA_BUILD=0, or no nvcc at build time): "
      "rebuild with CUDA_HOME set to use CUDA tensors");
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastres CUDA/C++ ops over raw pointers; use fastres.ops (or fastres.extension), which validates tensors.";

#ifdef FASTRES_WITH_CUDA
  m.attr("cuda_built") = true;
  m.attr("cuda_archs") = std::vector<int>{FASTRES_CUDA_ARCHS};
#else
  m.attr("cuda_built") = false;
  m.attr("cuda_archs") = std::vector<int>{};
#endif
  m.attr("pixels_per_group") = fastres::kPixelsPerGroup;
  m.attr("OUT_FLOAT16") = static_cast<int>(OutDtype::kFloat16);
  m.attr("OUT_BFLOAT16") = static_cast<int>(OutDtype::kBFloat16);
  m.attr("OUT_FLOAT32") = static_cast<int>(OutDtype::kFloat32);

  m.def(
      "preprocess_cpu",
      [](uintptr_t images, uintptr_t out, int64_t n, int64_t h, int64_t w, bool planar, const std::vector<double>& mean,
         const std::vector<double>& std_dev, int c_pad, int out_dtype, const std::vector<int64_t>& border) {
        const auto params = preprocess_params(images, out, n, h, w, planar, mean, std_dev, c_pad, out_dtype, border);
        py::gil_scoped_release no_gil;
        fastres::preprocess_cpu(params, static_cast<OutDtype>(out_dtype), planar);
        return params.vectorized;
      },
      "uint8 [N,H,W,3] (or planar [N,3,H,W]) -> [N,H+top+bottom,W+left+right,c_pad] with a zero border; returns "
      "whether the 16-byte path was allowed.",
      py::arg("images"), py::arg("out"), py::arg("n"), py::arg("h"), py::arg("w"), py::arg("planar"), py::arg("mean"),
      py::arg("std"), py::arg("c_pad"), py::arg("out_dtype"), py::arg("border") = std::vector<int64_t>{0, 0, 0, 0});

  m.def(
      "preprocess_cuda",
      [](uintptr_t images, uintptr_t out, int64_t n, int64_t h, int64_t w, bool planar, const std::vector<double>& mean,
         const std::vector<double>& std_dev, int c_pad, int out_dtype, const std::vector<int64_t>& border,
         uintptr_t stream) {
        require_cuda();
        const auto params = preprocess_params(images, out, n, h, w, planar, mean, std_dev, c_pad, out_dtype, border);
#ifdef FASTRES_WITH_CUDA
        fastres::preprocess_cuda(params, static_cast<OutDtype>(out_dtype), planar, reinterpret_cast<void*>(stream));
#else
        (void)stream;
#endif
        return params.vectorized;
      },
      "CUDA twin of preprocess_cpu, launched on `stream` of the current device.", py::arg("images"), py::arg("out"),
      py::arg("n"), py::arg("h"), py::arg("w"), py::arg("planar"), py::arg("mean"), py::arg("std"), py::arg("c_pad"),
      py::arg("out_dtype"), py::arg("border"), py::arg("stream"));

  m.def(
      "pad_nhwc_cpu",
      [](uintptr_t src, uintptr_t dst, const std::vector<int64_t>& sizes, const std::vector<int64_t>& strides,
         const std::vector<int64_t>& border, int c_pad, int element_size) {
        const auto params = pad_nhwc_params(src, dst, sizes, strides, border, c_pad, element_size);
        py::gil_scoped_release no_gil;
        fastres::pad_nhwc_cpu(params, element_size);
      },
      "[N,C,H,W] at `strides` (elements) -> [N,H+top+bottom,W+left+right,c_pad] with zeros, 2- or 4-byte elements.",
      py::arg("src"), py::arg("dst"), py::arg("sizes"), py::arg("strides"), py::arg("border"), py::arg("c_pad"),
      py::arg("element_size"));

  m.def(
      "pad_nhwc_cuda",
      [](uintptr_t src, uintptr_t dst, const std::vector<int64_t>& sizes, const std::vector<int64_t>& strides,
         const std::vector<int64_t>& border, int c_pad, int element_size, uintptr_t stream) {
        require_cuda();
        const auto params = pad_nhwc_params(src, dst, sizes, strides, border, c_pad, element_size);
#ifdef FASTRES_WITH_CUDA
        fastres::pad_nhwc_cuda(params, element_size, reinterpret_cast<void*>(stream));
#else
        (void)params;
        (void)stream;
#endif
      },
      "CUDA twin of pad_nhwc_cpu, launched on `stream` of the current device.", py::arg("src"), py::arg("dst"),
      py::arg("sizes"), py::arg("strides"), py::arg("border"), py::arg("c_pad"), py::arg("element_size"),
      py::arg("stream"));

  m.def(
      "transpose_cpu",
      [](uintptr_t src, uintptr_t dst, int64_t batch, int64_t rows, int64_t cols, int element_size) {
        const auto params = transpose_params(src, dst, batch, rows, cols, element_size);
        py::gil_scoped_release no_gil;
        fastres::transpose_cpu(params, element_size);
      },
      "[batch, rows, cols] -> [batch, cols, rows] for 2- or 4-byte elements.", py::arg("src"), py::arg("dst"),
      py::arg("batch"), py::arg("rows"), py::arg("cols"), py::arg("element_size"));

  m.def(
      "transpose_cuda",
      [](uintptr_t src, uintptr_t dst, int64_t batch, int64_t rows, int64_t cols, int element_size, uintptr_t stream) {
        require_cuda();
        const auto params = transpose_params(src, dst, batch, rows, cols, element_size);
#ifdef FASTRES_WITH_CUDA
        fastres::transpose_cuda(params, element_size, reinterpret_cast<void*>(stream));
#else
        (void)params;
        (void)stream;
#endif
      },
      "CUDA twin of transpose_cpu, launched on `stream` of the current device.", py::arg("src"), py::arg("dst"),
      py::arg("batch"), py::arg("rows"), py::arg("cols"), py::arg("element_size"), py::arg("stream"));
}
