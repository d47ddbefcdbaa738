// CUDA kernel of the NCHW <-> NHWC transpose (index math in transpose.h; CPU twin in transpose_cpu.cpp).
#include "cuda_check.h"
#include "transpose.h"

namespace fastres {

template <typename Bits>
__global__ void __launch_bounds__(kTile * kTileRowsPerStep) transpose_kernel(TransposeParams params) {
  __shared__ StagingTile<Bits> tile;
  const TileOrigin origin = tile_origin(params, blockIdx.x);
  transpose_load<Bits>(params, origin, tile, threadIdx.x, threadIdx.y);
  __syncthreads();
  transpose_store<Bits>(params, origin, tile, threadIdx.x, threadIdx.y);
}

void transpose_cuda(const TransposeParams& params, int element_size, void* stream) {
  const int64_t tiles = transpose_tiles(params);
  if (tiles == 0) return;
  FASTRES_CHECK(tiles < (int64_t{1} << 31), "transpose input is too large for one launch");
  const dim3 block(kTile, kTileRowsPerStep);
  auto launch = [&](auto kernel) {
    kernel<<<static_cast<unsigned>(tiles), block, 0, static_cast<cudaStream_t>(stream)>>>(params);
  };
  if (element_size == 2) {
    launch(transpose_kernel<uint16_t>);
  } else {
    launch(transpose_kernel<uint32_t>);
  }
  check_launch("transpose_kernel");
}

}  // namespace fastres
