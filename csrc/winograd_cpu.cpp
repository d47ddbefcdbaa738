// fastres._cpu: 3x3 stride-1 convolutions on CPU as Winograd F(2x2, 3x3), float32, NHWC.
//
// Why: on CPUs where oneDNN's direct convolution runs at the FMA units' limit (AVX2 machines),
// the only way to a faster 3x3 is fewer multiplications. F(2x2, 3x3) computes each 2x2 output tile
// from a 4x4 input tile with 16 products per (input, output) channel pair instead of 36: 16
// independent GEMMs [tiles x C] @ [C x O] (at::bmm, PyTorch's BLAS), between an input transform
// (B^T d B) and an output transform (A^T m A) that also applies bias, residual and ReLU, in
// oneDNN's order: relu((acc + bias) + residual). The transforms are additions and subtractions
// only (no contraction into FMAs can change them), the weight transform (G g G^T) is made once per
// program, in float64, by fastres/winograd.py, whose float64 reference of the same algorithm is
// what the tests compare this file with; F.conv2d is the end-to-end reference.
//
// Layouts: x and the output are channels_last [N, C, H, W] tensors (memory [N, H, W, C]); the
// transformed input is V [16, T, C], the transformed weight U [16, C, O], the products M [16, T, O],
// T = N * ceil(H / 2) * ceil(W / 2) tiles, tile t = (n, i, j) covering output rows 2i, 2i+1 and
// columns 2j, 2j+1 and input rows 2i-1 .. 2i+2 (zero padding of 1 outside the image).
#include "cpu_ops.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace {

constexpr int64_t kChannelBlock = 64;  // channels transformed together (fits the stack: 16 x 64 floats)

struct Tiles {
  int64_t n, h, w, th, tw;
  int64_t count() const { return n * th * tw; }
};

// The per-tile work of both transforms, vectorised over a block of channels (the innermost loops);
// compiled for AVX-512, AVX2 and the baseline, picked at load time (the same additions either way).
#define FASTRES_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))

// V[k][t][c] = (B^T d B)[k] for the channels [c0, c0 + cb) of tile t, d its 4x4 input tile.
FASTRES_VECTOR_CLONES
void input_tile(const float* x, float* v, const Tiles& g, int64_t channels, int64_t t, int64_t c0, int64_t cb) {
  float d[16][kChannelBlock], s[16][kChannelBlock];
  const int64_t n = t / (g.th * g.tw), i = (t / g.tw) % g.th, j = t % g.tw;
  for (int a = 0; a < 4; ++a) {
    const int64_t r = 2 * i - 1 + a;
    for (int b = 0; b < 4; ++b) {
      const int64_t q = 2 * j - 1 + b;
      float* dst = d[4 * a + b];
      if (r < 0 || r >= g.h || q < 0 || q >= g.w) {
        std::fill(dst, dst + cb, 0.0f);
      } else {
        const float* src = x + ((n * g.h + r) * g.w + q) * channels + c0;
        std::copy(src, src + cb, dst);
      }
    }
  }
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

void input_transform(const float* x, float* v, const Tiles& g, int64_t channels) {
  at::parallel_for(0, g.count(), 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t c0 = 0; c0 < channels; c0 += kChannelBlock) {
        input_tile(x, v, g, channels, t, c0, std::min(kChannelBlock, channels - c0));
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

void output_transform(const float* m, const float* bias, const float* residual, float* y, const Tiles& g,
                      int64_t channels, bool relu) {
  at::parallel_for(0, g.count(), 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t c0 = 0; c0 < channels; c0 += kChannelBlock) {
        output_tile(m, bias, residual, y, g, channels, relu, t, c0, std::min(kChannelBlock, channels - c0));
      }
    }
  });
}

}  // namespace

namespace fastres_cpu {

// x [N, C, H, W] channels_last, u [16, C, O] (fastres.winograd.transform_weight), bias [O],
// residual [N, O, H, W] channels_last or None -> [N, O, H, W] channels_last.
at::Tensor conv3x3(const at::Tensor& x, const at::Tensor& u, const at::Tensor& bias,
                   const c10::optional<at::Tensor>& residual, bool relu) {
  check_nhwc(x, "conv3x3", "x");
  TORCH_CHECK(u.dim() == 3 && u.size(0) == 16 && u.size(1) == x.size(1) && u.scalar_type() == at::kFloat &&
                  u.is_contiguous() && u.device().is_cpu(),
              "fastres._cpu.conv3x3: the transformed weight must be a contiguous float32 [16, ", x.size(1),
              ", O] CPU tensor, got ", u.sizes());
  const int64_t out_channels = u.size(2);
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == out_channels && bias.scalar_type() == at::kFloat &&
                  bias.is_contiguous() && bias.device().is_cpu(),
              "fastres._cpu.conv3x3: bias must be a contiguous float32 [", out_channels, "] CPU tensor");
  const Tiles g{x.size(0), x.size(2), x.size(3), (x.size(2) + 1) / 2, (x.size(3) + 1) / 2};
  TORCH_CHECK(g.n > 0 && g.h > 0 && g.w > 0, "fastres._cpu.conv3x3: empty input ", x.sizes());
  if (residual.has_value()) {
    check_nhwc(*residual, "conv3x3", "residual");
    TORCH_CHECK(residual->sizes() == at::IntArrayRef({g.n, out_channels, g.h, g.w}),
                "fastres._cpu.conv3x3: residual of shape ", residual->sizes(), " for an output of [", g.n, ", ",
                out_channels, ", ", g.h, ", ", g.w, "]");
  }
  const int64_t tiles = g.count();
  auto options = x.options();
  at::Tensor v = at::empty({16, tiles, x.size(1)}, options);
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
