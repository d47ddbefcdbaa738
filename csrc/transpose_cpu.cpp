// CPU twin of transpose.cu: the same load and store phases, the block's threads visited in a loop.
#include "transpose.h"

namespace fastres {

template <typename Bits>
static void transpose_tiles_cpu(const TransposeParams& params) {
  StagingTile<Bits> tile;
  const int64_t tiles = transpose_tiles(params);
  for (int64_t t = 0; t < tiles; ++t) {
    const TileOrigin origin = tile_origin(params, t);
    for (int ty = 0; ty < kTileRowsPerStep; ++ty)
      for (int tx = 0; tx < kTile; ++tx) transpose_load<Bits>(params, origin, tile, tx, ty);
    for (int ty = 0; ty < kTileRowsPerStep; ++ty)
      for (int tx = 0; tx < kTile; ++tx) transpose_store<Bits>(params, origin, tile, tx, ty);
  }
}

void transpose_cpu(const TransposeParams& params, int element_size) {
  if (element_size == 2) {
    transpose_tiles_cpu<uint16_t>(params);
  } else {
    transpose_tiles_cpu<uint32_t>(params);
  }
}

}  // namespace fastres
