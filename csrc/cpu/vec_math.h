// fp32 log, cos and exp for the CPU's noise loops, written so that GCC vectorises the loops that
// call them (glibc's logf/cosf/expf are calls, one element at a time: they made PAC-tuning's
// noise ops 8x slower than eager PyTorch).  No branches, only compares the vectoriser turns
// into selects, and bit tricks for the rest; IEEE operations in a fixed order, so the vector
// and scalar code (and every target_clones version) give the same bits.  Within 1.5e-7 relative
// of the exact values on the ranges used (tests/ops/test_pac_noise.py compares with the
// reference backend); the polynomials are Cephes' (S. Moshier) for logf, sinf, cosf and expf.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

// A function whose loops GCC vectorises, compiled once per x86 vector width (the one the CPU
// has is picked at load time); FSAM_CPU_X86 where that and x86 target attributes are there.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FSAM_CPU_X86 1
#define FSAM_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FSAM_CPU_X86 0
#define FSAM_CPU_CLONES
#endif

// Always inlined: the loops calling these are cloned per vector width, and GCC inlines nothing
// into a clone on its own (a call would stop the vectorising).
#if defined(__GNUC__)
#define FSAM_VEC_INLINE inline __attribute__((always_inline))
#else
#define FSAM_VEC_INLINE inline
#endif

namespace fsam {
namespace vec_math {

FSAM_VEC_INLINE uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}
FSAM_VEC_INLINE float float_of(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

// x clamped to [-c, c] (c = float_of(c_bits) >= 0, x not NaN) on the bits: non-negative floats
// order as their bits do, and an integer min vectorises where a float compare-and-select may not.
FSAM_VEC_INLINE float clamp_abs(float x, uint32_t c_bits) {
  const uint32_t u = bits_of(x);
  return float_of(std::min(u & 0x7FFFFFFFu, c_bits) | (u & 0x80000000u));
}

// The nearest integer (ties to even) for |x| < 2^22: adding and removing 1.5 2^23.
FSAM_VEC_INLINE float round_small(float x) { return (x + 12582912.0f) - 12582912.0f; }

// log x for a normal x > 0: x = 2^k (1 + f) with 1 + f in [sqrt(1/2), sqrt(2)) read off the bits.
FSAM_VEC_INLINE float log_positive(float x) {
  constexpr uint32_t kSqrtHalf = 0x3F3504F3u;  // the bits of sqrt(1/2)
  const uint32_t shifted = bits_of(x) - kSqrtHalf;
  const float k = static_cast<float>(static_cast<int32_t>(shifted) >> 23);
  const float f = float_of((shifted & 0x007FFFFFu) + kSqrtHalf) - 1.0f;
  const float z = f * f;
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  float y = f * z * p;
  y = y + k * -2.12194440e-4f;
  y = y - 0.5f * z;
  return (f + y) + k * 0.693359375f;
}

// cos(2 pi t) for t in [0, 1]: q the nearest quarter turn, a = 2 pi (t - q/4) in [-pi/4, pi/4],
// and cos(2 pi t) = cos a, -sin a, -cos a, sin a for q = 0, 1, 2, 3 (mod 4), chosen on the bits.
FSAM_VEC_INLINE float cos_turns(float t) {
  const float q = round_small(t * 4.0f);
  const float a = (t - q * 0.25f) * 6.2831854820251465f;
  const float z = a * a;
  float c = 2.443315711809948e-5f;
  c = c * z - 1.388731625493765e-3f;
  c = c * z + 4.166664568298827e-2f;
  c = c * z * z - 0.5f * z + 1.0f;
  float s = -1.9515295891e-4f;
  s = s * z + 8.3321608736e-3f;
  s = s * z - 1.6666654611e-1f;
  s = s * z * a + a;
  const uint32_t quadrant = static_cast<uint32_t>(static_cast<int32_t>(q));
  const uint32_t odd = 0u - (quadrant & 1u);         // all ones where q is odd: the sine
  const uint32_t sign = ((quadrant + 1u) & 2u) << 30;  // q = 1, 2 (mod 4): negated
  return float_of(((bits_of(c) & ~odd) | (bits_of(s) & odd)) ^ sign);
}

// exp x, x clamped to [-87, 88] first (exp(-87) = 1.6e-38 stands for anything smaller: no
// subnormals, no overflow): x = n ln2 + r with |r| <= ln2 / 2.
FSAM_VEC_INLINE float exp_clamped(float x) {
  x = std::max(-87.0f, std::min(x, 88.0f));
  const float n = round_small(x * 1.44269504088896341f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const float z = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * z + r + 1.0f;
  return p * float_of(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
}

// IEEE half <-> float as c10::Half's software conversions compute them (M. Maratyszcza's FP16
// algorithm: exact, round to nearest even), with selects where those branch, so that a loop over
// them vectorises.  Checked against c10 for every half and every float.
FSAM_VEC_INLINE float half_to_float(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t two_w = w + w;
  const float normal = float_of((two_w >> 4) + (UINT32_C(0xE0) << 23)) * 0x1.0p-112f;
  const float subnormal = float_of((two_w >> 17) | (UINT32_C(126) << 23)) - 0.5f;
  const uint32_t is_subnormal = 0u - static_cast<uint32_t>(two_w < (UINT32_C(1) << 27));
  return float_of((w & UINT32_C(0x80000000)) | (bits_of(subnormal) & is_subnormal) |
                  (bits_of(normal) & ~is_subnormal));
}
FSAM_VEC_INLINE uint16_t float_to_half(float f) {
  const uint32_t w = bits_of(f);
  const uint32_t shl1_w = w + w;
  const float base = (float_of(w & UINT32_C(0x7FFFFFFF)) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t bias = std::max(shl1_w & UINT32_C(0xFF000000), UINT32_C(0x71000000));
  const uint32_t rounded = bits_of(float_of((bias >> 1) + UINT32_C(0x07800000)) + base);
  const uint32_t nonsign = ((rounded >> 13) & UINT32_C(0x7C00)) + (rounded & UINT32_C(0x0FFF));
  const uint32_t is_nan = 0u - static_cast<uint32_t>(shl1_w > UINT32_C(0xFF000000));
  return static_cast<uint16_t>((w >> 16 & UINT32_C(0x8000)) | (UINT32_C(0x7E00) & is_nan) | (nonsign & ~is_nan));
}

}  // namespace vec_math
}  // namespace fsam
