// CUDA kernel of preprocess (math and layout in preprocess.h; CPU twin in preprocess_cpu.cpp).
#include "cuda_check.h"
#include "preprocess.h"

namespace fastres {

// 128 threads x 16 pixels: 2048 pixels per block, enough blocks to fill the GPU from one 224x224 image.
constexpr int kPreprocessThreads = 128;

template <OutDtype D, int C_PAD, bool PLANAR>
__global__ void __launch_bounds__(kPreprocessThreads) preprocess_kernel(PreprocessParams params, int64_t groups) {
  const int64_t group = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (group < groups) preprocess_group<D, C_PAD, PLANAR>(params, group);
}

template <OutDtype D, bool PLANAR>
__global__ void __launch_bounds__(kPreprocessThreads) preprocess_padded_kernel(PreprocessParams params, int64_t pixels) {
  const int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (q < pixels) preprocess_padded_pixel<D, PLANAR>(params, q);
}

void preprocess_cuda(const PreprocessParams& params, OutDtype dtype, bool planar, void* stream) {
  const int64_t groups = preprocess_groups(params);
  if (groups == 0) return;
  const int64_t blocks = (groups + kPreprocessThreads - 1) / kPreprocessThreads;
  FASTRES_CHECK(blocks < (int64_t{1} << 31), "preprocess input is too large for one launch");
  if (params.padded) {
    dispatch_preprocess_padded(dtype, planar, [&](auto dtype_tag, auto planar_tag) {
      preprocess_padded_kernel<decltype(dtype_tag)::value, decltype(planar_tag)::value>
          <<<static_cast<unsigned>(blocks), kPreprocessThreads, 0, static_cast<cudaStream_t>(stream)>>>(params, groups);
    });
    check_launch("preprocess_padded_kernel");
    return;
  }
  dispatch_preprocess(dtype, params.c_pad, planar, [&](auto dtype_tag, auto pad_tag, auto planar_tag) {
    preprocess_kernel<decltype(dtype_tag)::value, decltype(pad_tag)::value, decltype(planar_tag)::value>
        <<<static_cast<unsigned>(blocks), kPreprocessThreads, 0, static_cast<cudaStream_t>(stream)>>>(params, groups);
  });
  check_launch("preprocess_kernel");
}

}  // namespace fastres
