// PAC-tuning's noise and per-element math, for the host and the device (fsam_kernels/reference.py
// is the specification; every operation rounds to fp32 in its order).  The noise of element
// `index` at (seed, step) is Philox4x32-10 (Salmon et al., SC 2011: the generator of Random123,
// cuRAND and Triton) of key (seed low, seed high) and counter (index low, index high, step low,
// step high), turned into a standard normal by Box-Muller: it depends on nothing but those three
// numbers, so not on chunks, threads or blocks, and is regenerated instead of stored.  The integer
// stream is identical in every backend; log, cos and exp come from each backend's math library
// (CUDA computes the cosine as cospi; the CPU backend has its own vectorisable ones,
// csrc/cpu/vec_math.h), so the noise of two backends can differ in the last bits.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <cstring>

// The Philox and uniform helpers are always inlined in host code: the CPU's noise loops are
// cloned per vector width (csrc/cpu/philox.cpp and pac.cpp), and GCC inlines nothing into a clone on its own.
#if !defined(__CUDACC__) && defined(__GNUC__)
#define FSAM_NOISE_INLINE inline __attribute__((always_inline))
#else
#define FSAM_NOISE_INLINE C10_HOST_DEVICE inline
#endif

namespace fsam {

constexpr int kPhiloxRounds = 10;
// Philox4x32's round multipliers and key increments (Weyl constants).
constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;
constexpr float kTwoPi = 6.2831854820251465f;  // 2 pi rounded to fp32

struct PhiloxOut {
  uint32_t x[4];
};

FSAM_NOISE_INLINE void mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

FSAM_NOISE_INLINE PhiloxOut philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                               uint32_t k1) {
  for (int r = 0; r < kPhiloxRounds; ++r) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo(kPhiloxM0, c0, hi0, lo0);
    mulhilo(kPhiloxM1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0, c1 = lo1, c2 = n2, c3 = lo0;
    k0 += kPhiloxW0, k1 += kPhiloxW1;
  }
  return {{c0, c1, c2, c3}};
}

// Box-Muller's uniforms, exact in fp32: u1 = (x0 >> 9 + 1/2) 2^-23 in (0, 1) and u2 = (x1 >> 8) 2^-24
// in [0, 1).  (Through int32, which holds them: CPUs convert signed integers in vectors.)
FSAM_NOISE_INLINE float box_muller_u1(uint32_t x0) {
  return (static_cast<float>(static_cast<int32_t>(x0 >> 9)) + 0.5f) * 0x1p-23f;
}
FSAM_NOISE_INLINE float box_muller_u2(uint32_t x1) { return static_cast<float>(static_cast<int32_t>(x1 >> 8)) * 0x1p-24f; }

C10_HOST_DEVICE inline float pac_normal(uint64_t index, uint64_t seed, uint64_t step) {
  const PhiloxOut r = philox4x32_10(static_cast<uint32_t>(index), static_cast<uint32_t>(index >> 32),
                                    static_cast<uint32_t>(step), static_cast<uint32_t>(step >> 32),
                                    static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const float u1 = box_muller_u1(r.x[0]);
  const float u2 = box_muller_u2(r.x[1]);
  const float radius = sqrtf(logf(u1) * -2.0f);
#ifdef __CUDA_ARCH__
  // cos(pi 2 u2): cosf's reduction of large arguments needs a stack frame, cospif's does not
  return radius * cospif(u2 * 2.0f);
#else
  return radius * cosf(u2 * kTwoPi);
#endif
}

// eps clamped to [-max_noise, max_noise], and the noise exp(log_std) * eps.
struct PacNoise {
  uint64_t seed, step;
  float max_noise;
  C10_HOST_DEVICE float eps(int64_t index) const {
    const float e = pac_normal(static_cast<uint64_t>(index), seed, step);
    return e < -max_noise ? -max_noise : (e > max_noise ? max_noise : e);
  }
  C10_HOST_DEVICE float operator()(int64_t index, float log_std) const { return expf(log_std) * eps(index); }
};

template <typename T>
C10_HOST_DEVICE inline uint32_t value_bits(T v) {
  uint32_t u = 0;
  memcpy(&u, &v, sizeof(T));
  return u;
}

// w + n and (w + n) - n in the weight's dtype; an entry is inexact when the latter is not w bit
// for bit, and only those need their originals saved.
template <typename T>
C10_HOST_DEVICE inline T pac_add(T w, float n) { return static_cast<T>(static_cast<float>(w) + n); }
template <typename T>
C10_HOST_DEVICE inline T pac_sub(T w, float n) { return static_cast<T>(static_cast<float>(w) - n); }
template <typename T>
C10_HOST_DEVICE inline bool pac_inexact(T w, float n) { return value_bits(pac_sub(pac_add(w, n), n)) != value_bits(w); }

// Rows of the per-tensor sums pac_bound_grads_ returns.
enum BoundSum { kSumExp2P, kSumDiffSq, kSumGradSq, kSumLogStd, kBoundSums };

// Stage 1 of the bound, per element: the gradient of the log-std p, g eps e^p + (e^(2p - 2b) - 1)
// coef, and the loss gradient plus the w-regulariser's, g + e^(-2b) (w - w0) coef.  The caller
// takes the exponentials (exp_p = e^p, exp_excess = e^excess_exponent(p, b)) with its own exp.
struct PacBoundTerms {
  float coef;
  C10_HOST_DEVICE static float excess_exponent(float log_std, float b) { return log_std * 2.0f - b * 2.0f; }
  C10_HOST_DEVICE float log_std_grad(float g, float eps, float exp_p, float exp_excess) const {
    return g * eps * exp_p + (exp_excess - 1.0f) * coef;
  }
  C10_HOST_DEVICE float regularised(float g, float diff, float decay) const { return g + decay * diff * coef; }
};

}  // namespace fsam
