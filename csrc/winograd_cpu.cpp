// fastres._cpu: 3x3 stride-1 convolutions on CPU as Winograd F(2x2, 3x3) or F(4x4, 3x3), float32,
// NHWC.
//
// Why: on CPUs where oneDNN's direct convolution runs at the FMA units' limit (AVX2 machines),
// the only way to a faster 3x3 is fewer multiplications. F(2x2, 3x3) computes each 2x2 output tile
// from a 4x4 input tile with 16 products per (input, output) channel pair instead of 36, F(4x4, 3x3)
// each 4x4 tile from a 6x6 one with 36 instead of 144: 16 (36) independent GEMMs [tiles x C] @
// [C x O] (at::bmm, PyTorch's BLAS), between an input transform (B^T d B) and an output transform
// (A^T m A) that also applies bias, residual and ReLU, in oneDNN's order: relu((acc + bias) +
// residual). F(2x2)'s transforms are additions and subtractions only; F(4x4)'s also multiply by
// 2, 4, 5 and 8 (not contracted into FMAs: setup.py's -ffp-contract=off). The weight transform
// (G g G^T) is made once per program, in float64, by fastres/winograd.py, whose float64 reference
// of the same algorithm is what the tests compare this file with; F.conv2d is the end-to-end
// reference. The transformed weight's first dimension (16 or 36) says which algorithm runs.
//
// Layouts: x and the output are channels_last [N, C, H, W] tensors (memory [N, H, W, C]); the
// transformed input is V [P, T, C], the transformed weight U [P, C, O], the products M [P, T, O],
// P = (side + 2)^2 points, T = N * ceil(H / side) * ceil(W / side) tiles, tile t = (n, i, j)
// covering output rows side*i .. side*i + side - 1 (and the same columns) and input rows side*i - 1
// .. side*i + side (zero padding of 1 outside the image).
#include "cpu_ops.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace {

constexpr int64_t kChannelBlock = 64;  // channels transformed together (fits the stack: 2 x 36 x 64 floats)

struct Tiles {
  int64_t n, h, w, th, tw;  // th x tw tiles of side x side outputs per image
  int64_t side;             // 2: F(2x2, 3x3); 4: F(4x4, 3x3)
  int64_t count() const { return n * th * tw; }
};

// The per-tile work of both transforms, vectorised over a block of channels (the innermost loops);
// compiled for AVX-512, AVX2 and the baseline, picked at load time (the same operations either way).
#define FASTRES_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))

// d[points * a + b] = x[n, side*i - 1 + a, side*j - 1 + b, c0 .. c0 + cb) for the (side + 2)^2
// input pixels of tile t (zero outside the image): the gather both input transforms start with.
inline __attribute__((always_inline)) void gather_tile(const float* x, float (*d)[kChannelBlock], const Tiles& g,
                                                       int64_t channels, int64_t t, int64_t c0, int64_t cb) {
  const int64_t n = t / (g.th * g.tw), i = (t / g.tw) % g.th, j = t % g.tw, points = g.side + 2;
  for (int64_t a = 0; a < points; ++a) {
    const int64_t r = g.side * i - 1 + a;
    for (int64_t b = 0; b < points; ++b) {
      const int64_t q = g.side * j - 1 + b;
      float* dst = d[points * a + b];
      if (r < 0 || r >= g.h || q < 0 || q >= g.w) {
        std::fill(dst, dst + cb, 0.0f);
      } else {
        const float* src = x + ((n * g.h + r) * g.w + q) * channels + c0;
        std::copy(src, src + cb, dst);
      }
    }
  }
}

// V[k][t][c] = (B^T d B)[k] for the channels [c0, c0 + cb) of tile t, d its 4x4 input tile.
FASTRES_VECTOR_CLONES
void input_tile(const float* x, float* v, const Tiles& g, int64_t channels, int64_t t, int64_t c0, int64_t cb) {
  float d[16][kChannelBlock], s[16][kChannelBlock];
  gather_tile(x, d, g, channels, t, c0, cb);
  for (int b = 0; b < 4; ++b) {  // B^T d: along the rows of the tile
    for (int64_t c = 0; c < cb; ++c) {
      const float d0 = d[b][c], d1 = d[4 + b][c], d2 = d[8 + b][c], d3 = d[12 + b][c];
      s[b][c] = d0 - d2;
      s[4 + b][c] = d1 + d2;
      s[8 + b][c] = d2 - d1;
      s[12 + b][c] = d1 - d3;
    }
  }
  const int64_t tiles = g.count();
  for (int a = 0; a < 4; ++a) {  // (B^T d) B: along the columns, into V
    float* v0 = v + ((4 * a) * tiles + t) * channels + c0;
    float* v1 = v0 + tiles * channels;
    float* v2 = v1 + tiles * channels;
    float* v3 = v2 + tiles * channels;
    for (int64_t c = 0; c < cb; ++c) {
      const float e0 = s[4 * a][c], e1 = s[4 * a + 1][c], e2 = s[4 * a + 2][c], e3 = s[4 * a + 3][c];
      v0[c] = e0 - e2;
      v1[c] = e1 + e2;
      v2[c] = e2 - e1;
      v3[c] = e1 - e3;
    }
  }
}

// F(4x4, 3x3): V[k][t][c] = (B^T d B)[k], d the 6x6 input tile (input rows 4i-1 .. 4i+4). B^T's
// rows (Lavin & Gray, points 0, +-1, +-2): multiplications by 2 and 4 are exact, by 5 rounds once.
// setup.py builds this file with -ffp-contract=off, so no clone (AVX-512, AVX2, baseline) fuses
// them into FMAs and every clone gives the same bits.
inline __attribute__((always_inline)) void b_t6(const float* const* d, float* const* r, int64_t cb) {
  for (int64_t c = 0; c < cb; ++c) {
    const float d0 = d[0][c], d1 = d[1][c], d2 = d[2][c], d3 = d[3][c], d4 = d[4][c], d5 = d[5][c];
    r[0][c] = (4.0f * d0 - 5.0f * d2) + d4;
    r[1][c] = (d4 + d3) - 4.0f * (d1 + d2);
    r[2][c] = (d4 - d3) + 4.0f * (d1 - d2);
    r[3][c] = (d4 - d2) + 2.0f * (d3 - d1);
    r[4][c] = (d4 - d2) - 2.0f * (d3 - d1);
    r[5][c] = (4.0f * d1 - 5.0f * d3) + d5;
  }
}

FASTRES_VECTOR_CLONES
void input_tile_f4(const float* x, float* v, const Tiles& g, int64_t channels, int64_t t, int64_t c0, int64_t cb) {
  float d[36][kChannelBlock], s[36][kChannelBlock];
  gather_tile(x, d, g, channels, t, c0, cb);
  for (int b = 0; b < 6; ++b) {  // B^T d: along the rows of the tile (column b)
    const float* col[6] = {d[b], d[6 + b], d[12 + b], d[18 + b], d[24 + b], d[30 + b]};
    float* out[6] = {s[b], s[6 + b], s[12 + b], s[18 + b], s[24 + b], s[30 + b]};
    b_t6(col, out, cb);
  }
  const int64_t tiles = g.count();
  for (int a = 0; a < 6; ++a) {  // (B^T d) B: along the columns, into V
    const float* row[6] = {s[6 * a], s[6 * a + 1], s[6 * a + 2], s[6 * a + 3], s[6 * a + 4], s[6 * a + 5]};
    float* out[6];
    for (int b = 0; b < 6; ++b) out[b] = v + ((6 * a + b) * tiles + t) * channels + c0;
    b_t6(row, out, cb);
  }
}

void input_transform(const float* x, float* v, const Tiles& g, int64_t channels) {
  const auto tile = g.side == 2 ? input_tile : input_tile_f4;
  at::parallel_for(0, g.count(), 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t c0 = 0; c0 < channels; c0 += kChannelBlock) {
        tile(x, v, g, channels, t, c0, std::min(kChannelBlock, channels - c0));
      }
    }
  });
}

// y[n, 2i+u, 2j+v, o] = relu?(((A^T m A)[u][v] + bias[o]) + residual), m = M[:, t, o], for the
// channels [c0, c0 + cb) of tile t.
FASTRES_VECTOR_CLONES
void output_tile(const float* m, const float* bias, const float* residual, float* y, const Tiles& g, int64_t channels,
                 bool relu, int64_t t, int64_t c0, int64_t cb) {
  float s[8][kChannelBlock];
  const int64_t n = t / (g.th * g.tw), i = (t / g.tw) % g.th, j = t % g.tw;
  const int64_t plane = g.count() * channels;  // distance between M[k] and M[k + 1]
  const float* src = m + t * channels + c0;
  for (int b = 0; b < 4; ++b) {  // A^T m: along the rows
    const float* m0 = src + b * plane;
    const float* m1 = src + (4 + b) * plane;
    const float* m2 = src + (8 + b) * plane;
    const float* m3 = src + (12 + b) * plane;
    for (int64_t c = 0; c < cb; ++c) {
      s[b][c] = m0[c] + m1[c] + m2[c];
      s[4 + b][c] = m1[c] - m2[c] - m3[c];
    }
  }
  for (int u = 0; u < 2; ++u) {  // (A^T m) A: along the columns, then the epilogue
    const int64_t r = 2 * i + u;
    if (r >= g.h) continue;
    for (int w = 0; w < 2; ++w) {
      const int64_t q = 2 * j + w;
      if (q >= g.w) continue;
      const int64_t at = ((n * g.h + r) * g.w + q) * channels + c0;
      const float* e0 = s[4 * u];            // column w = 0: e0 + e1 + e2; w = 1: e1 - e2 - e3
      const float* e1 = s[4 * u + 1];
      const float* e2 = s[4 * u + 2];
      const float* e3 = s[4 * u + 3];
      const float* b = bias + c0;
      float* dst = y + at;
      for (int64_t c = 0; c < cb; ++c) {
        const float acc = w == 0 ? (e0[c] + e1[c]) + e2[c] : (e1[c] - e2[c]) - e3[c];
        float value = acc + b[c];
        if (residual != nullptr) value = value + residual[at + c];
        dst[c] = relu ? std::max(value, 0.0f) : value;
      }
    }
  }
}

// F(4x4, 3x3)'s output: y = A^T m A (A^T's rows 1 1 1 1 1 0 / 0 1 -1 2 -2 0 / 0 1 1 4 4 0 /
// 0 1 -1 8 -8 1), then bias, residual and ReLU as in output_tile.
inline __attribute__((always_inline)) void a_t6(const float* const* m, float* const* r, int64_t cb) {
  for (int64_t c = 0; c < cb; ++c) {
    const float m0 = m[0][c], m1 = m[1][c], m2 = m[2][c], m3 = m[3][c], m4 = m[4][c], m5 = m[5][c];
    const float p12 = m1 + m2, d12 = m1 - m2, p34 = m3 + m4, d34 = m3 - m4;
    r[0][c] = (m0 + p12) + p34;
    r[1][c] = d12 + 2.0f * d34;
    r[2][c] = p12 + 4.0f * p34;
    r[3][c] = (d12 + 8.0f * d34) + m5;
  }
}

FASTRES_VECTOR_CLONES
void output_tile_f4(const float* m, const float* bias, const float* residual, float* y, const Tiles& g,
                    int64_t channels, bool relu, int64_t t, int64_t c0, int64_t cb) {
  float s[24][kChannelBlock], e[4][kChannelBlock];
  const int64_t n = t / (g.th * g.tw), i = (t / g.tw) % g.th, j = t % g.tw;
  const int64_t plane = g.count() * channels;  // distance between M[k] and M[k + 1]
  const float* src = m + t * channels + c0;
  for (int b = 0; b < 6; ++b) {  // A^T m: along the rows (column b), s[6u + b]
    const float* col[6];
    for (int a = 0; a < 6; ++a) col[a] = src + (6 * a + b) * plane;
    float* out[4] = {s[b], s[6 + b], s[12 + b], s[18 + b]};
    a_t6(col, out, cb);
  }
  for (int u = 0; u < 4; ++u) {  // (A^T m) A: along the columns, then the epilogue
    const int64_t r = 4 * i + u;
    if (r >= g.h) continue;
    const float* row[6] = {s[6 * u], s[6 * u + 1], s[6 * u + 2], s[6 * u + 3], s[6 * u + 4], s[6 * u + 5]};
    float* out[4] = {e[0], e[1], e[2], e[3]};
    a_t6(row, out, cb);
    for (int w = 0; w < 4; ++w) {
      const int64_t q = 4 * j + w;
      if (q >= g.w) continue;
      const int64_t at = ((n * g.h + r) * g.w + q) * channels + c0;
      const float* b = bias + c0;
      float* dst = y + at;
      for (int64_t c = 0; c < cb; ++c) {
        float value = e[w][c] + b[c];
        if (residual != nullptr) value = value + residual[at + c];
        dst[c] = relu ? std::max(value, 0.0f) : value;
      }
    }
  }
}

void output_transform(const float* m, const float* bias, const float* residual, float* y, const Tiles& g,
                      int64_t channels, bool relu) {
  const auto tile = g.side == 2 ? output_tile : output_tile_f4;
  at::parallel_for(0, g.count(), 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t c0 = 0; c0 < channels; c0 += kChannelBlock) {
        tile(m, bias, residual, y, g, channels, relu, t, c0, std::min(kChannelBlock, channels - c0));
      }
    }
  });
}

}  // namespace

namespace fastres_cpu {

// x [N, C, H, W] channels_last, u [16 or 36, C, O] (fastres.winograd.transform_weight), bias [O],
// residual [N, O, H, W] channels_last or None -> [N, O, H, W] channels_last.
at::Tensor conv3x3(const at::Tensor& x, const at::Tensor& u, const at::Tensor& bias,
                   const c10::optional<at::Tensor>& residual, bool relu) {
  check_nhwc(x, "conv3x3", "x");
  TORCH_CHECK(u.dim() == 3 && (u.size(0) == 16 || u.size(0) == 36) && u.size(1) == x.size(1) &&
                  u.scalar_type() == at::kFloat && u.is_contiguous() && u.device().is_cpu(),
              "fastres._cpu.conv3x3: the transformed weight must be a contiguous float32 [16 or 36, ", x.size(1),
              ", O] CPU tensor, got ", u.sizes());
  const int64_t side = u.size(0) == 16 ? 2 : 4;  // F(2x2, 3x3) or F(4x4, 3x3)
  const int64_t out_channels = u.size(2);
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == out_channels && bias.scalar_type() == at::kFloat &&
                  bias.is_contiguous() && bias.device().is_cpu(),
              "fastres._cpu.conv3x3: bias must be a contiguous float32 [", out_channels, "] CPU tensor");
  const Tiles g{x.size(0), x.size(2), x.size(3), (x.size(2) + side - 1) / side, (x.size(3) + side - 1) / side, side};
  TORCH_CHECK(g.n > 0 && g.h > 0 && g.w > 0, "fastres._cpu.conv3x3: empty input ", x.sizes());
  if (residual.has_value()) {
    check_nhwc(*residual, "conv3x3", "residual");
    TORCH_CHECK(residual->sizes() == at::IntArrayRef({g.n, out_channels, g.h, g.w}),
                "fastres._cpu.conv3x3: residual of shape ", residual->sizes(), " for an output of [", g.n, ", ",
                out_channels, ", ", g.h, ", ", g.w, "]");
  }
  const int64_t tiles = g.count();
  auto options = x.options();
  at::Tensor v = at::empty({u.size(0), tiles, x.size(1)}, options);
  input_transform(x.data_ptr<float>(), v.data_ptr<float>(), g, x.size(1));
  at::Tensor m = at::bmm(v, u);
  v.reset();
  at::Tensor y = at::empty({g.n, out_channels, g.h, g.w}, options.memory_format(at::MemoryFormat::ChannelsLast));
  output_transform(m.data_ptr<float>(), bias.data_ptr<float>(),
                   residual.has_value() ? residual->data_ptr<float>() : nullptr, y.data_ptr<float>(), g, out_channels,
                   relu);
  return y;
}

}  // namespace fastres_cpu
