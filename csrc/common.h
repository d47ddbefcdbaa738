// Shared by the CUDA kernels (nvcc) and their C++ CPU twins (g++): one definition of every piece of
// index math and rounding, so a twin that passes on CPU checks the arithmetic the GPU runs.
// No torch headers here or in any kernel file: the extension binds raw pointers and sizes, and
// fastres/extension.py validates tensors before they reach C++.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define FASTRES_HD __host__ __device__ __forceinline__
#define FASTRES_UNROLL _Pragma("unroll")
#else
#define FASTRES_HD inline
#define FASTRES_UNROLL
#endif

// Thrown as ValueError by pybind11 (std::invalid_argument). The Python layer checks first and says
// more; this is the second line of defence for callers of the raw fastres._C functions.
#define FASTRES_CHECK(cond, message)                                                     \
  do {                                                                                   \
    if (!(cond)) throw std::invalid_argument(std::string("fastres._C: ") + (message)); \
  } while (0)

namespace fastres {

// 16 bytes moved by one vector load or store (LDG.128 / STG.128 on the GPU).
struct alignas(16) Vec16 {
  uint32_t w[4];
};

FASTRES_HD Vec16 load16(const void* p) {
#ifdef __CUDA_ARCH__
  return *static_cast<const Vec16*>(p);
#else
  Vec16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
#endif
}

FASTRES_HD void store16(void* p, const Vec16& v) {
#ifdef __CUDA_ARCH__
  *static_cast<Vec16*>(p) = v;
#else
  std::memcpy(p, &v, sizeof v);
#endif
}

FASTRES_HD bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Output pixel q of an [N, out_h, out_w] map that holds an [N, h, w] image inside a zero border
// (top rows, left columns): the image pixel it shows, and whether it is inside the image at all.
// Shared by the bordered layout ops (preprocess(border=...), nchw_to_nhwc_padded).
struct BorderedPixel {
  int64_t n, ih, iw;
  bool inside;
};

FASTRES_HD BorderedPixel bordered_pixel(int64_t q, int64_t out_h, int64_t out_w, int64_t top, int64_t left,
                                        int64_t h, int64_t w) {
  const int64_t ow = q % out_w;
  const int64_t rest = q / out_w;
  const int64_t ih = rest % out_h - top;
  const int64_t iw = ow - left;
  return {rest / out_h, ih, iw, ih >= 0 && ih < h && iw >= 0 && iw < w};
}

FASTRES_HD uint32_t float_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

FASTRES_HD float bits_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// float -> IEEE binary16 bits, round to nearest even (the rounding of torch's .half()). The device
// uses the hardware conversion; the host computes the same rounding in integer arithmetic.
FASTRES_HD uint16_t float_to_half_bits(float f) {
#ifdef __CUDA_ARCH__
  return __half_as_ushort(__float2half_rn(f));
#else
  uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  if (u >= 0x47800000u) {                      // |f| >= 65536, inf or nan: nothing finite left
    return static_cast<uint16_t>(sign | (u > 0x7f800000u ? 0x7e00u : 0x7c00u));
  }
  if (u < 0x38800000u) {                       // below 2^-14: the result is subnormal or zero.
    // Adding 0.5 puts the half's 10 subnormal mantissa bits at the bottom of a float whose
    // exponent is fixed, so the float addition itself does the round-to-nearest-even.
    const float magic = 0.5f;
    return static_cast<uint16_t>(sign | (float_bits(bits_float(u) + magic) - float_bits(magic)));
  }
  // Normal: rebias the exponent (127 -> 15) and round the 13 dropped mantissa bits to nearest
  // even; a carry out of the mantissa bumps the exponent, up to infinity for [65520, 65536).
  const uint32_t mantissa_odd = (u >> 13) & 1u;
  u += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu + mantissa_odd;
  return static_cast<uint16_t>(sign | (u >> 13));
#endif
}

// float -> bfloat16 bits, round to nearest even (torch's .bfloat16()).
FASTRES_HD uint16_t float_to_bfloat16_bits(float f) {
#ifdef __CUDA_ARCH__
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
  const uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet nan
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
#endif
}

FASTRES_HD float fused_multiply_add(float a, float b, float c) {
#ifdef __CUDA_ARCH__
  return __fmaf_rn(a, b, c);
#else
  return __builtin_fmaf(a, b, c);  // correctly rounded like the GPU's FFMA, never contracted apart
#endif
}

}  // namespace fastres
