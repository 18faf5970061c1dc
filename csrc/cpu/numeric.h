// Scalar numerics for the CPU kernels: bf16/fp16 storage types converted by bit
// manipulation (round to nearest even on the way back, NaN kept NaN), a dtype
// dispatcher, and an exp written so that the compiler vectorizes loops calling
// it (libm's expf is an opaque scalar call).
//
// Everything is branch-free selects on integers and floats: GCC and Clang turn
// loops over these into SSE2/NEON code without -march flags or -ffast-math, and
// into AVX2 + FMA code in the isa_avx2 build (cpu/isa.h).
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#include "common/dtype.h"
#include "cpu/isa.h"

namespace olmo2::cpu::OLMO2_CPU_ISA {

struct bf16 {
  uint16_t bits;
};
struct f16 {
  uint16_t bits;
};

inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// ---- bfloat16: the upper half of an fp32 ------------------------------------
inline float to_float(bf16 v) { return float_of(static_cast<uint32_t>(v.bits) << 16); }

inline uint16_t bf16_bits(float f) {
  const uint32_t u = bits_of(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;  // nearest, ties to even
  const bool is_nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return static_cast<uint16_t>(is_nan ? 0x7FC0u : rounded);
}

// ---- IEEE half ----------------------------------------------------------------
inline float to_float(f16 v) {
  const uint32_t h = v.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t em = h & 0x7FFFu;  // exponent and mantissa
  // Normal: shift into place and rebias the exponent (15 -> 127). Inf/NaN: the
  // exponent field saturates to 255 and the mantissa (NaN payload) is kept.
  const uint32_t normal = (em << 13) + 0x38000000u;
  const uint32_t inf_nan = (em << 13) + 0x70000000u;
  // Subnormal: em * 2^-24, exactly, via 0.5 + em * 2^-24 - 0.5.
  const uint32_t subnormal = bits_of(float_of(0x3F000000u + em) - 0.5f);
  const uint32_t mag = em >= 0x7C00u ? inf_nan : (em >= 0x0400u ? normal : subnormal);
  return float_of(sign | mag);
}

inline uint16_t f16_bits(float f) {
  const uint32_t u = bits_of(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7FFFFFFFu;
  // Normal half: rebias (127 -> 15) and round the 13 dropped bits to nearest even.
  const uint32_t normal = (a - 0x38000000u + 0xFFFu + ((a >> 13) & 1u)) >> 13;
  // Subnormal half (|f| < 2^-14): adding 0.5 rounds |f| to a multiple of 2^-24
  // (the ulp of [0.5, 1)) in the FPU's round-to-nearest-even; the low bits are
  // then the half's mantissa. Rounding up to 2^-14 gives 0x400, the smallest normal.
  const uint32_t subnormal = bits_of(float_of(a) + 0.5f) - 0x3F000000u;
  uint32_t mag = a >= 0x38800000u ? normal : subnormal;
  mag = a >= 0x477FF000u ? 0x7C00u : mag;  // 65520 and above round to inf
  mag = a > 0x7F800000u ? 0x7E00u : mag;   // NaN stays (quiet) NaN
  return static_cast<uint16_t>(sign | mag);
}

inline float to_float(float v) { return v; }

template <typename T>
inline T from_float(float f);
template <>
inline float from_float<float>(float f) { return f; }
template <>
inline bf16 from_float<bf16>(float f) { return bf16{bf16_bits(f)}; }
template <>
inline f16 from_float<f16>(float f) { return f16{f16_bits(f)}; }

// ---- dispatch -------------------------------------------------------------------
// Calls fn(T{}) with T the storage type of `code` (float, bf16 or f16).
template <typename Fn>
inline void dispatch_dtype(int code, const char* what, Fn&& fn) {
  switch (code) {
    case static_cast<int>(DType::F32): fn(float{}); return;
    case static_cast<int>(DType::BF16): fn(bf16{}); return;
    case static_cast<int>(DType::F16): fn(f16{}); return;
    default:
      throw std::invalid_argument(std::string(what) + ": unknown dtype code " + std::to_string(code) +
                                  " (expected 0 float32, 1 bfloat16, 2 float16)");
  }
}

// ---- exp --------------------------------------------------------------------------
// e^x = 2^n * e^r with n = round(x / ln2) and |r| <= ln2 / 2; e^r by its degree-7
// Taylor polynomial (truncation error below 5e-9 relative, so about 1 ulp in all).
// Written for vectorization (about 8 SSE2 instructions per element):
// * the clamps are single max/min instructions and keep NaN (the comparison is
//   false for NaN, so the unclamped operand passes through and poisons the result);
// * n is read from the mantissa of x*log2e + 1.5*2^23 (rounded to nearest by the
//   FPU), integer arithmetic on bits only, so no float->int conversion of NaN;
// * x >= 89 reaches n = 128 and overflows to inf by itself (true for x > ln(FLT_MAX));
// * x < -86.5 returns 0 (the true value is below 3e-38), exactly 0 for -inf.
inline float exp_f32(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;  // ln2 split so n * kLn2Hi is exact
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23
  constexpr uint32_t kRoundBits = 0x4B400000u;
  constexpr float kLo = -86.5f;
  constexpr float kHi = 89.0f;
  float xc = kLo > x ? kLo : x;
  xc = kHi < xc ? kHi : xc;
  const float biased = xc * kLog2e + kRound;  // the integer n sits in the low mantissa bits
  const float fn = biased - kRound;
  const float r = (xc - fn * kLn2Hi) - fn * kLn2Lo;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  // 2^(n-1) (n in [-125, 128]), times 2 below, so that n = 128 stays a valid exponent.
  const float scale = float_of((bits_of(biased) - kRoundBits + 126u) << 23);
  const float result = (p * scale) * 2.0f;
  return x < kLo ? 0.0f : result;
}

}  // namespace olmo2::cpu::OLMO2_CPU_ISA
