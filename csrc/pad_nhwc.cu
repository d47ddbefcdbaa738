// CUDA kernel of nchw_to_nhwc_padded (index math in pad_nhwc.h; CPU twin in pad_nhwc_cpu.cpp).
#include "cuda_check.h"
#include "pad_nhwc.h"

namespace fastres {

constexpr int kPadThreads = 256;

template <typename Bits>
__global__ void __launch_bounds__(kPadThreads) pad_nhwc_kernel(PadNhwcParams params) {
  const int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (q < params.pixels) pad_nhwc_pixel<Bits>(params, q);
}

void pad_nhwc_cuda(const PadNhwcParams& params, int element_size, void* stream) {
  if (params.pixels == 0) return;
  const int64_t blocks = (params.pixels + kPadThreads - 1) / kPadThreads;
  FASTRES_CHECK(blocks < (int64_t{1} << 31), "nchw_to_nhwc_padded input is too large for one launch");
  auto s = static_cast<cudaStream_t>(stream);
  if (element_size == 2) {
    pad_nhwc_kernel<uint16_t><<<static_cast<unsigned>(blocks), kPadThreads, 0, s>>>(params);
  } else {
    pad_nhwc_kernel<uint32_t><<<static_cast<unsigned>(blocks), kPadThreads, 0, s>>>(params);
  }
  check_launch("pad_nhwc_kernel");
}

}  // namespace fastres
