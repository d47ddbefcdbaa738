// Batched transpose of [batch, rows, cols] into [batch, cols, rows], moving elements as raw bits.
//
// With rows = C and cols = H*W it is nchw_to_nhwc; with rows = H*W and cols = C, nhwc_to_nchw.
// Each 32x32 tile goes through shared memory (a stack buffer in the CPU twin) so that both the read
// and the write walk memory along their contiguous dimension.
//
// Why CUDA C++ and not Triton: a layout change is pure data movement with no math to fuse, and a
// Triton tl.trans of a tile leaves the shared-memory layout and its bank conflicts to the compiler;
// the classic padded tile (one spare column) makes both phases conflict-free by construction.
#pragma once

#include "common.h"

namespace fastres {

constexpr int kTile = 32;
constexpr int kTileRowsPerStep = 8;  // thread block is kTile x kTileRowsPerStep, 4 elements per thread

struct TransposeParams {
  const void* src;
  void* dst;
  int64_t batch;
  int64_t rows;
  int64_t cols;
  int64_t row_tiles;
  int64_t col_tiles;
};

struct TileOrigin {
  int64_t batch;
  int64_t row;
  int64_t col;
};

// Tiles are numbered column tile fastest, so neighbouring blocks read neighbouring source memory.
FASTRES_HD TileOrigin tile_origin(const TransposeParams& p, int64_t tile) {
  const int64_t per_matrix = p.row_tiles * p.col_tiles;
  const int64_t b = tile / per_matrix;
  const int64_t t = tile - b * per_matrix;
  return {b, (t / p.col_tiles) * kTile, (t % p.col_tiles) * kTile};
}

// The staging tile carries one spare 4-byte word per row: in the store phase a warp reads one tile
// column, and the odd row stride in words (17 or 33) puts its 32 elements in distinct banks. (One
// spare 2-byte element would leave 2-byte tiles with a 2-way conflict.)
template <typename Bits>
using StagingTile = Bits[kTile][kTile + 4 / sizeof(Bits)];

// Load phase of thread (tx, ty): source rows ty, ty+8, ..., column tx of the tile.
template <typename Bits>
FASTRES_HD void transpose_load(const TransposeParams& p, const TileOrigin& o, StagingTile<Bits>& tile, int tx, int ty) {
  const Bits* src = static_cast<const Bits*>(p.src) + o.batch * p.rows * p.cols;
  const int64_t col = o.col + tx;
  FASTRES_UNROLL
  for (int i = ty; i < kTile; i += kTileRowsPerStep) {
    const int64_t row = o.row + i;
    if (row < p.rows && col < p.cols) tile[i][tx] = src[row * p.cols + col];
  }
}

// Store phase of thread (tx, ty): destination rows (= source columns) ty, ty+8, ..., column tx.
template <typename Bits>
FASTRES_HD void transpose_store(const TransposeParams& p, const TileOrigin& o, const StagingTile<Bits>& tile, int tx, int ty) {
  Bits* dst = static_cast<Bits*>(p.dst) + o.batch * p.rows * p.cols;
  const int64_t row = o.row + tx;
  FASTRES_UNROLL
  for (int j = ty; j < kTile; j += kTileRowsPerStep) {
    const int64_t col = o.col + j;
    if (row < p.rows && col < p.cols) dst[col * p.rows + row] = tile[tx][j];
  }
}

inline TransposeParams make_transpose_params(const void* src, void* dst, int64_t batch, int64_t rows, int64_t cols,
                                             int element_size) {
  FASTRES_CHECK(src != nullptr && dst != nullptr, "transpose got a null pointer");
  FASTRES_CHECK(batch >= 0 && rows >= 0 && cols >= 0, "transpose got a negative size");
  FASTRES_CHECK(element_size == 2 || element_size == 4,
                "transpose moves 2- or 4-byte elements, got element_size=" + std::to_string(element_size));
  FASTRES_CHECK(reinterpret_cast<uintptr_t>(src) % element_size == 0 && reinterpret_cast<uintptr_t>(dst) % element_size == 0,
                "transpose pointers are not aligned to the element size");
  return {src, dst, batch, rows, cols, (rows + kTile - 1) / kTile, (cols + kTile - 1) / kTile};
}

inline int64_t transpose_tiles(const TransposeParams& p) { return p.batch * p.row_tiles * p.col_tiles; }

// Entry points (transpose_cpu.cpp, transpose.cu).
void transpose_cpu(const TransposeParams& params, int element_size);
void transpose_cuda(const TransposeParams& params, int element_size, void* stream);

}  // namespace fastres
