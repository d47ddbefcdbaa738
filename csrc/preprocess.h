// preprocess: decoded uint8 RGB images -> normalised NHWC activations for the stem.
//
//   out[n, h, w, c] = (x[n, h, w, c] / 255 - mean[c]) / std[c]   for c < 3
//                   = 0                                            for 3 <= c < c_pad
//
// With a border (top, bottom, left, right) the output is [N, H + top + bottom, W + left + right, c_pad]
// and pixels outside the image are 0 in every channel (0 in normalised space: the zero padding of
// the stem conv, written once, so the stem runs with padding 0; see kernels/conv2d_nhwc.py ROW_K).
// That layout is written one output pixel per thread (preprocess_padded_pixel), not in groups.
//
// computed as fma(x, scale[c], shift[c]) in fp32 with scale = 1 / (255 std), shift = -mean / std
// (rounded once from fp64), then rounded to the output dtype. The input is either interleaved
// (NHWC, or NCHW in channels_last memory: the same bytes) or planar (contiguous NCHW).
//
// Why CUDA C++ and not Triton: the interleaved input is 3 bytes per pixel, so the natural vector
// unit is 16 pixels = 48 bytes = three 16-byte loads, unpacked by byte shifts and repacked into
// 16-byte stores of 2, 4 or 8-byte pixels. That byte-level register shuffling is direct here and
// awkward to express in Triton's block model (which would gather 3-byte strides instead).
#pragma once

#include "common.h"

namespace fastres {

enum class OutDtype : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

// Pixels per thread (and per CPU loop step): the smallest run whose interleaved RGB bytes split into
// whole 16-byte loads (16 * 3 = 48). Any pad width then also makes whole 16-byte output stores.
constexpr int kPixelsPerGroup = 16;

struct PreprocessParams {
  const uint8_t* images;  // [pixels, 3] interleaved, or [N, 3, plane] planar
  void* out;              // [pixels, c_pad] in the output dtype
  int64_t pixels;         // N * H * W
  int64_t plane;          // H * W
  float scale[3];
  float shift[3];
  int c_pad;
  bool vectorized;        // 16-byte path allowed: both pointers aligned, planes a multiple of 16 pixels
  bool padded;            // a zero border: one output pixel per group (preprocess_padded_pixel)
  int64_t n, h, w;        // batch and image size
  int64_t out_h, out_w;   // output size (h, w without a border)
  int64_t top, left;      // border above and left of the image
};

template <OutDtype D>
struct OutTraits;
template <>
struct OutTraits<OutDtype::kFloat16> {
  using Bits = uint16_t;
  static FASTRES_HD Bits convert(float v) { return float_to_half_bits(v); }
};
template <>
struct OutTraits<OutDtype::kBFloat16> {
  using Bits = uint16_t;
  static FASTRES_HD Bits convert(float v) { return float_to_bfloat16_bits(v); }
};
template <>
struct OutTraits<OutDtype::kFloat32> {
  using Bits = uint32_t;
  static FASTRES_HD Bits convert(float v) { return float_bits(v); }
};

// Byte offset of pixel p (flattened over N, H, W), channel c < 3.
template <bool PLANAR>
FASTRES_HD int64_t input_offset(int64_t p, int c, int64_t plane) {
  if (PLANAR) {
    const int64_t n = p / plane;
    return (n * 3 + c) * plane + (p - n * plane);
  }
  return p * 3 + c;
}

// Byte k of a run of 16-byte vectors held in registers (k is a compile-time constant after unrolling).
FASTRES_HD uint32_t byte_of(const Vec16* v, int k) { return (v[k / 16].w[(k % 16) / 4] >> (8 * (k % 4))) & 0xffu; }

template <typename Bits>
FASTRES_HD void put_element(Vec16& v, int e, Bits bits) {
  if (sizeof(Bits) == 4) {
    v.w[e] = bits;
  } else {
    v.w[e / 2] |= static_cast<uint32_t>(bits) << (16 * (e % 2));
  }
}

// Output pixel q of the bordered layout: the image pixel it shows, or zeros.
template <OutDtype D, bool PLANAR>
FASTRES_HD void preprocess_padded_pixel(const PreprocessParams& params, int64_t q) {
  using Traits = OutTraits<D>;
  using Bits = typename Traits::Bits;
  Bits* out = static_cast<Bits*>(params.out) + q * params.c_pad;
  const BorderedPixel px = bordered_pixel(q, params.out_h, params.out_w, params.top, params.left,
                                          params.h, params.w);
  const bool inside = px.inside;
  const int64_t p = inside ? (px.n * params.h + px.ih) * params.w + px.iw : 0;
  FASTRES_UNROLL
  for (int c = 0; c < 3; ++c) {
    const float x = inside ? static_cast<float>(params.images[input_offset<PLANAR>(p, c, params.plane)]) : 0.0f;
    out[c] = inside ? Traits::convert(fused_multiply_add(x, params.scale[c], params.shift[c])) : Bits(0);
  }
  for (int c = 3; c < params.c_pad; ++c) out[c] = 0;
}

// One group of kPixelsPerGroup pixels: a GPU thread's work, and one step of the CPU twin's loop.
// C_PAD is the output channel count when it is 3 or 4 (vector path compiled in), or 0 for any other
// width (read from params.c_pad, scalar path only: a runtime width would index the register array
// dynamically and push it to local memory).
template <OutDtype D, int C_PAD, bool PLANAR>
FASTRES_HD void preprocess_group(const PreprocessParams& params, int64_t group) {
  using Traits = OutTraits<D>;
  using Bits = typename Traits::Bits;
  Bits* out = static_cast<Bits*>(params.out);
  const int64_t first = group * kPixelsPerGroup;

  if constexpr (C_PAD != 0) {
    if (params.vectorized && first + kPixelsPerGroup <= params.pixels) {
      // Interleaved: 48 consecutive bytes. Planar: 16 bytes from each channel plane (the group never
      // straddles two images because vectorized requires plane % 16 == 0).
      Vec16 in[3];
      FASTRES_UNROLL
      for (int i = 0; i < 3; ++i) {
        in[i] = PLANAR ? load16(params.images + input_offset<true>(first, i, params.plane))
                       : load16(params.images + first * 3 + 16 * i);
      }
      constexpr int kPerVector = 16 / static_cast<int>(sizeof(Bits));
      constexpr int kVectors = kPixelsPerGroup * C_PAD / kPerVector;
      FASTRES_UNROLL
      for (int k = 0; k < kVectors; ++k) {
        Vec16 v = {{0u, 0u, 0u, 0u}};
        FASTRES_UNROLL
        for (int e = 0; e < kPerVector; ++e) {
          const int pixel = (k * kPerVector + e) / C_PAD;
          const int c = (k * kPerVector + e) % C_PAD;
          if (c < 3) {
            const uint32_t x = PLANAR ? byte_of(in, 16 * c + pixel) : byte_of(in, 3 * pixel + c);
            const float y = fused_multiply_add(static_cast<float>(x), params.scale[c], params.shift[c]);
            put_element<Bits>(v, e, Traits::convert(y));
          }
        }
        store16(out + first * C_PAD + k * kPerVector, v);
      }
      return;
    }
  }

  // Scalar path: the tail group, unaligned pointers, planes that are not whole groups, other widths.
  const int c_pad = C_PAD != 0 ? C_PAD : params.c_pad;
  const int64_t end = first + kPixelsPerGroup < params.pixels ? first + kPixelsPerGroup : params.pixels;
  for (int64_t p = first; p < end; ++p) {
    FASTRES_UNROLL
    for (int c = 0; c < 3; ++c) {
      const float x = static_cast<float>(params.images[input_offset<PLANAR>(p, c, params.plane)]);
      out[p * c_pad + c] = Traits::convert(fused_multiply_add(x, params.scale[c], params.shift[c]));
    }
    for (int c = 3; c < c_pad; ++c) out[p * c_pad + c] = 0;
  }
}

inline int64_t preprocess_groups(const PreprocessParams& params) {
  if (params.padded) return params.n * params.out_h * params.out_w;
  return (params.pixels + kPixelsPerGroup - 1) / kPixelsPerGroup;
}

// Checks the raw arguments and derives the kernel parameters; shared by the CPU and CUDA entry points.
inline PreprocessParams make_preprocess_params(const uint8_t* images, void* out, int64_t n, int64_t h, int64_t w,
                                               bool planar, const double* mean, const double* std_dev, int c_pad,
                                               int out_dtype, int64_t top = 0, int64_t bottom = 0, int64_t left = 0,
                                               int64_t right = 0) {
  FASTRES_CHECK(images != nullptr && out != nullptr, "preprocess got a null pointer");
  FASTRES_CHECK(n >= 0 && h >= 0 && w >= 0, "preprocess got a negative size");
  FASTRES_CHECK(c_pad >= 3, "preprocess needs at least 3 output channels, got c_pad=" + std::to_string(c_pad));
  FASTRES_CHECK(out_dtype >= 0 && out_dtype <= 2, "preprocess got an unknown output dtype code " + std::to_string(out_dtype));
  const int out_size = out_dtype == static_cast<int>(OutDtype::kFloat32) ? 4 : 2;
  FASTRES_CHECK(reinterpret_cast<uintptr_t>(out) % out_size == 0, "preprocess output is not aligned to its element size");
  PreprocessParams params;
  params.images = images;
  params.out = out;
  params.pixels = n * h * w;
  params.plane = h * w;
  for (int c = 0; c < 3; ++c) {
    FASTRES_CHECK(std_dev[c] != 0.0, "preprocess got std[" + std::to_string(c) + "] = 0");
    params.scale[c] = static_cast<float>(1.0 / (255.0 * std_dev[c]));
    params.shift[c] = static_cast<float>(-mean[c] / std_dev[c]);
  }
  params.c_pad = c_pad;
  params.vectorized = aligned16(images) && aligned16(out) && (!planar || params.plane % kPixelsPerGroup == 0);
  FASTRES_CHECK(top >= 0 && bottom >= 0 && left >= 0 && right >= 0, "preprocess got a negative border");
  params.padded = top || bottom || left || right;
  params.n = n;
  params.h = h;
  params.w = w;
  params.out_h = h + top + bottom;
  params.out_w = w + left + right;
  params.top = top;
  params.left = left;
  return params;
}

// Calls fn(dtype tag, planar tag) for the bordered layout (one output pixel per group).
template <typename Fn>
void dispatch_preprocess_padded(OutDtype dtype, bool planar, Fn&& fn) {
  auto with_layout = [&](auto dtype_tag) {
    if (planar) {
      fn(dtype_tag, std::true_type{});
    } else {
      fn(dtype_tag, std::false_type{});
    }
  };
  switch (dtype) {
    case OutDtype::kFloat16: with_layout(std::integral_constant<OutDtype, OutDtype::kFloat16>{}); break;
    case OutDtype::kBFloat16: with_layout(std::integral_constant<OutDtype, OutDtype::kBFloat16>{}); break;
    case OutDtype::kFloat32: with_layout(std::integral_constant<OutDtype, OutDtype::kFloat32>{}); break;
  }
}

// Calls fn(dtype tag, pad tag, planar tag) with the compile-time instantiation for these arguments.
template <typename Fn>
void dispatch_preprocess(OutDtype dtype, int c_pad, bool planar, Fn&& fn) {
  auto with_pad = [&](auto dtype_tag) {
    auto with_layout = [&](auto pad_tag) {
      if (planar) {
        fn(dtype_tag, pad_tag, std::true_type{});
      } else {
        fn(dtype_tag, pad_tag, std::false_type{});
      }
    };
    if (c_pad == 3) {
      with_layout(std::integral_constant<int, 3>{});
    } else if (c_pad == 4) {
      with_layout(std::integral_constant<int, 4>{});
    } else {
      with_layout(std::integral_constant<int, 0>{});
    }
  };
  switch (dtype) {
    case OutDtype::kFloat16: with_pad(std::integral_constant<OutDtype, OutDtype::kFloat16>{}); break;
    case OutDtype::kBFloat16: with_pad(std::integral_constant<OutDtype, OutDtype::kBFloat16>{}); break;
    case OutDtype::kFloat32: with_pad(std::integral_constant<OutDtype, OutDtype::kFloat32>{}); break;
  }
}

// Entry points (preprocess_cpu.cpp, preprocess.cu).
void preprocess_cpu(const PreprocessParams& params, OutDtype dtype, bool planar);
void preprocess_cuda(const PreprocessParams& params, OutDtype dtype, bool planar, void* stream);

}  // namespace fastres
