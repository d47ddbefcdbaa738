// The CPU backend's pools over channels_last float32: the stem's max pool and the head's mean.
//
// The stem's max pool, F.max_pool2d(x, 3, stride=2, padding=1). Why: PyTorch's channels_last max
// pool took 3.5 ms of a resnet50 batch-8 forward on the AVX-512 machine (ORT's 1.65 ms; 2.2 ms
// alone, this one 1.0). Here each output pixel is the running
// maximum of its (up to) 9 input pixels, a channel vector at a time (the innermost loop, contiguous
// in NHWC), rows of the output split across ATen's threads.
//
// Bit for bit PyTorch's: the window is visited in PyTorch's order (rows, then columns), starting
// from -inf, and a value replaces the maximum when it is greater or NaN (so NaN propagates and, of
// equal values such as 0.0 and -0.0, the first is kept), exactly as aten's CPU kernel does.
#include "cpu_ops.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace {

// One output pixel: y[c] = max over the window of x[.., c]; compiled for AVX-512, AVX2 and the
// baseline, picked at load time (comparisons and selects only: every clone gives the same bits).
__attribute__((target_clones("avx512f", "avx2", "default")))
void pool_pixel(const float* x, float* y, int64_t h, int64_t w, int64_t channels, int64_t oh, int64_t ow) {
  std::fill(y, y + channels, -std::numeric_limits<float>::infinity());
  const int64_t r0 = std::max<int64_t>(2 * oh - 1, 0), r1 = std::min<int64_t>(2 * oh + 2, h);
  const int64_t q0 = std::max<int64_t>(2 * ow - 1, 0), q1 = std::min<int64_t>(2 * ow + 2, w);
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t q = q0; q < q1; ++q) {
      const float* src = x + (r * w + q) * channels;
      for (int64_t c = 0; c < channels; ++c) {
        const float v = src[c];
        y[c] = (v > y[c] || v != v) ? v : y[c];
      }
    }
  }
}

// One image's mean over its pixels, y[c] = (sum over p of x[p, c]) / pixels: the pixels in order,
// summed in double a block of channels at a time (contiguous in NHWC), then divided and rounded
// once. One fixed order whatever the batch or the thread count, so an image's features do not
// depend on the images beside it.
__attribute__((target_clones("avx512f", "avx2", "default")))
void mean_image(const float* x, float* y, int64_t pixels, int64_t channels) {
  constexpr int64_t kBlock = 256;
  double acc[kBlock];
  for (int64_t c0 = 0; c0 < channels; c0 += kBlock) {
    const int64_t cb = std::min(kBlock, channels - c0);
    std::fill(acc, acc + cb, 0.0);
    for (int64_t p = 0; p < pixels; ++p) {
      const float* src = x + p * channels + c0;
      for (int64_t c = 0; c < cb; ++c) acc[c] += static_cast<double>(src[c]);
    }
    for (int64_t c = 0; c < cb; ++c) y[c0 + c] = static_cast<float>(acc[c] / static_cast<double>(pixels));
  }
}

}  // namespace

namespace fastres_cpu {

at::Tensor max_pool3x3s2(const at::Tensor& x) {
  check_nhwc(x, "max_pool3x3s2", "x");
  const int64_t n = x.size(0), channels = x.size(1), h = x.size(2), w = x.size(3);
  TORCH_CHECK(channels > 0 && h > 0 && w > 0, "fastres._cpu.max_pool3x3s2: empty image ", x.sizes());
  const int64_t out_h = (h - 1) / 2 + 1, out_w = (w - 1) / 2 + 1;
  at::Tensor y = at::empty({n, channels, out_h, out_w}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (y.numel() == 0) {
    return y;
  }
  const float* src = x.data_ptr<float>();
  float* dst = y.data_ptr<float>();
  at::parallel_for(0, n * out_h, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t image = row / out_h, oh = row % out_h;
      const float* image_src = src + image * h * w * channels;
      for (int64_t ow = 0; ow < out_w; ++ow) {
        pool_pixel(image_src, dst + (row * out_w + ow) * channels, h, w, channels, oh, ow);
      }
    }
  });
  return y;
}

// The head's pool. Why our own: inside a forward, after the last block's convolutions have streamed
// their weights through the caches, PyTorch's mean over the same 100 KB took 0.27 ms of a resnet50
// batch-1 forward on the AVX-512 Xeon (11 us alone, warm): the first PyTorch ops after a run of
// kept oneDNN primitives were that slow (a 64x64 sum 0.1 ms), so a short loop of our own (bench/README.md).
at::Tensor global_mean(const at::Tensor& x) {
  check_nhwc(x, "global_mean", "x");
  const int64_t n = x.size(0), channels = x.size(1), pixels = x.size(2) * x.size(3);
  TORCH_CHECK(n > 0 && channels > 0 && pixels > 0, "fastres._cpu.global_mean: empty input ", x.sizes());
  at::Tensor y = at::empty({n, channels}, x.options().memory_format(at::MemoryFormat::Contiguous));
  const float* src = x.data_ptr<float>();
  float* dst = y.data_ptr<float>();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t image = begin; image < end; ++image) {
      mean_image(src + image * pixels * channels, dst + image * channels, pixels, channels);
    }
  });
  return y;
}

}  // namespace fastres_cpu
