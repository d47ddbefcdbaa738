// nchw_to_nhwc_padded: a float image batch [N, C, H, W] (any strides: NCHW or channels_last) ->
// [N, H + top + bottom, W + left + right, C_pad] NHWC with a zero border and zero channels c >= C.
//
//   out[n, oh, ow, c] = x[n, c, oh - top, ow - left]   inside the image and c < C
//                     = 0                              otherwise
//
// It is the input layout of the stem conv run with padding 0 over 4 channels (kernels/conv2d_nhwc.py,
// ROW_K): the zero border is the conv's zero padding, written once. Elements move as raw bits (2- or
// 4-byte), no rounding. One output pixel per GPU thread and per step of the CPU twin's loop.
#pragma once

#include "common.h"

namespace fastres {

struct PadNhwcParams {
  const void* src;
  void* dst;
  int64_t n, c, h, w;          // source sizes
  int64_t sn, sc, sh, sw;      // source strides, in elements
  int64_t out_h, out_w;
  int64_t top, left;
  int c_pad;
  int64_t pixels;              // n * out_h * out_w
};

template <typename Bits>
FASTRES_HD void pad_nhwc_pixel(const PadNhwcParams& p, int64_t q) {
  const BorderedPixel px = bordered_pixel(q, p.out_h, p.out_w, p.top, p.left, p.h, p.w);
  const bool inside = px.inside;
  const Bits* src = static_cast<const Bits*>(p.src);
  const int64_t base = inside ? px.n * p.sn + px.ih * p.sh + px.iw * p.sw : 0;   // only read when inside
  Bits* dst = static_cast<Bits*>(p.dst) + q * p.c_pad;
  for (int c = 0; c < p.c_pad; ++c) dst[c] = (inside && c < p.c) ? src[base + c * p.sc] : Bits(0);
}

inline PadNhwcParams make_pad_nhwc_params(const void* src, void* dst, int64_t n, int64_t c, int64_t h, int64_t w,
                                          int64_t sn, int64_t sc, int64_t sh, int64_t sw, int64_t top, int64_t bottom,
                                          int64_t left, int64_t right, int c_pad, int element_size) {
  FASTRES_CHECK(src != nullptr && dst != nullptr, "nchw_to_nhwc_padded got a null pointer");
  FASTRES_CHECK(n >= 0 && c >= 0 && h >= 0 && w >= 0, "nchw_to_nhwc_padded got a negative size");
  FASTRES_CHECK(top >= 0 && bottom >= 0 && left >= 0 && right >= 0, "nchw_to_nhwc_padded got a negative padding");
  FASTRES_CHECK(c_pad >= c, "nchw_to_nhwc_padded needs c_pad >= C, got c_pad=" + std::to_string(c_pad));
  FASTRES_CHECK(element_size == 2 || element_size == 4,
                "nchw_to_nhwc_padded moves 2- or 4-byte elements, got element_size=" + std::to_string(element_size));
  FASTRES_CHECK(reinterpret_cast<uintptr_t>(src) % element_size == 0 && reinterpret_cast<uintptr_t>(dst) % element_size == 0,
                "nchw_to_nhwc_padded pointers are not aligned to the element size");
  PadNhwcParams p;
  p.src = src;
  p.dst = dst;
  p.n = n;
  p.c = c;
  p.h = h;
  p.w = w;
  p.sn = sn;
  p.sc = sc;
  p.sh = sh;
  p.sw = sw;
  p.out_h = h + top + bottom;
  p.out_w = w + left + right;
  p.top = top;
  p.left = left;
  p.c_pad = c_pad;
  p.pixels = n * p.out_h * p.out_w;
  return p;
}

// Entry points (pad_nhwc_cpu.cpp, pad_nhwc.cu).
void pad_nhwc_cpu(const PadNhwcParams& params, int element_size);
void pad_nhwc_cuda(const PadNhwcParams& params, int element_size, void* stream);

}  // namespace fastres
