// The Philox words of the CPU's noise.  GCC vectorises the scalar rounds (fsam/pac_noise.h), but
// widens each 32 x 32 -> 64-bit product to 64-bit lanes and shuffles the halves back: the rounds
// written with even/odd-lane multiplies take about a third of the time with AVX-512 (16 counters
// at a time) and half with AVX2 (8).  All give the same words; ATEN_CPU_CAPABILITY picks the
// widest of them it allows, as it does for ATen's kernels (tests/ops/test_pac_noise.py compares
// them).
#include "philox.h"

#include "vec_math.h"

#include <ATen/Version.h>
#include <fsam/pac_noise.h>

#include <string>

#if FSAM_CPU_X86
#include <immintrin.h>
#endif

namespace fsam {
namespace {

// (first + i) as the counter's two low words: the carry of the low word goes into the high one.
FSAM_CPU_CLONES void philox_words_scalar(uint64_t seed, uint64_t step, uint64_t first, int64_t n, uint32_t* x0,
                                         uint32_t* x1) {
  const auto low = static_cast<uint32_t>(first), high = static_cast<uint32_t>(first >> 32);
  const auto s0 = static_cast<uint32_t>(step), s1 = static_cast<uint32_t>(step >> 32);
  const auto k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const auto count = static_cast<int32_t>(n);
#pragma omp simd
  for (int32_t i = 0; i < count; ++i) {
    const uint32_t c0 = low + static_cast<uint32_t>(i);
    const PhiloxOut r = philox4x32_10(c0, high + (c0 < low), s0, s1, k0, k1);
    x0[i] = r.x[0];
    x1[i] = r.x[1];
  }
}

#if FSAM_CPU_X86
// GCC 12 reports its own AVX-512 headers' _mm512_undefined_epi32() as maybe uninitialised.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// The 32-bit halves of m a, lane by lane: the even lanes' products, then the odd lanes' (shifted
// down into the even slots), merged back.
__attribute__((target("avx512f"), always_inline)) inline void mulhilo16(__m512i m, __m512i a, __m512i& hi,
                                                                       __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, m), odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  constexpr __mmask16 kEven = 0x5555;
  hi = _mm512_mask_blend_epi32(kEven, odd, _mm512_srli_epi64(even, 32));
  lo = _mm512_mask_blend_epi32(kEven, _mm512_slli_epi64(odd, 32), even);
}

__attribute__((target("avx512f"))) void philox_words_avx512(uint64_t seed, uint64_t step, uint64_t first, int64_t n,
                                                            uint32_t* x0, uint32_t* x1) {
  constexpr int32_t kLanes = 16;
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i low = _mm512_set1_epi32(static_cast<int32_t>(first));
  const __m512i high = _mm512_set1_epi32(static_cast<int32_t>(first >> 32));
  const __m512i m0 = _mm512_set1_epi32(static_cast<int32_t>(kPhiloxM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int32_t>(kPhiloxM1));
  const auto count = static_cast<int32_t>(n);
  for (int32_t i = 0; i < count; i += kLanes) {
    __m512i c0 = _mm512_add_epi32(_mm512_add_epi32(low, _mm512_set1_epi32(i)), lane);
    __m512i c1 = _mm512_mask_add_epi32(high, _mm512_cmplt_epu32_mask(c0, low), high, _mm512_set1_epi32(1));
    __m512i c2 = _mm512_set1_epi32(static_cast<int32_t>(step));
    __m512i c3 = _mm512_set1_epi32(static_cast<int32_t>(step >> 32));
    auto k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int r = 0; r < kPhiloxRounds; ++r) {
      __m512i hi0, lo0, hi1, lo1;
      mulhilo16(m0, c0, hi0, lo0);
      mulhilo16(m1, c2, hi1, lo1);
      constexpr int kXor3 = 0x96;  // a ^ b ^ c as a ternary-logic table
      c0 = _mm512_ternarylogic_epi32(hi1, c1, _mm512_set1_epi32(static_cast<int32_t>(k0)), kXor3);
      c2 = _mm512_ternarylogic_epi32(hi0, c3, _mm512_set1_epi32(static_cast<int32_t>(k1)), kXor3);
      c1 = lo1, c3 = lo0;
      k0 += kPhiloxW0, k1 += kPhiloxW1;
    }
    const int32_t left = count - i;
    const auto store = static_cast<__mmask16>(left >= kLanes ? 0xFFFF : (1u << left) - 1);
    _mm512_mask_storeu_epi32(x0 + i, store, c0);
    _mm512_mask_storeu_epi32(x1 + i, store, c1);
  }
}

// mulhilo16 on 8 lanes.
__attribute__((target("avx2"), always_inline)) inline void mulhilo8(__m256i m, __m256i a, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m), odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  constexpr int kEven = 0x55;
  hi = _mm256_blend_epi32(odd, _mm256_srli_epi64(even, 32), kEven);
  lo = _mm256_blend_epi32(_mm256_slli_epi64(odd, 32), even, kEven);
}

// philox_words_avx512's rounds 8 counters at a time.  AVX2 has no unsigned compare: the carry
// compares with the sign bits flipped, and is -1 where set.
__attribute__((target("avx2"))) void philox_words_avx2(uint64_t seed, uint64_t step, uint64_t first, int64_t n,
                                                       uint32_t* x0, uint32_t* x1) {
  constexpr int32_t kLanes = 8;
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i sign = _mm256_set1_epi32(INT32_MIN);
  const __m256i low = _mm256_set1_epi32(static_cast<int32_t>(first));
  const __m256i high = _mm256_set1_epi32(static_cast<int32_t>(first >> 32));
  const __m256i low_flipped = _mm256_xor_si256(low, sign);
  const __m256i m0 = _mm256_set1_epi32(static_cast<int32_t>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int32_t>(kPhiloxM1));
  const auto count = static_cast<int32_t>(n);
  for (int32_t i = 0; i < count; i += kLanes) {
    __m256i c0 = _mm256_add_epi32(_mm256_add_epi32(low, _mm256_set1_epi32(i)), lane);
    __m256i c1 = _mm256_sub_epi32(high, _mm256_cmpgt_epi32(low_flipped, _mm256_xor_si256(c0, sign)));
    __m256i c2 = _mm256_set1_epi32(static_cast<int32_t>(step));
    __m256i c3 = _mm256_set1_epi32(static_cast<int32_t>(step >> 32));
    auto k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int r = 0; r < kPhiloxRounds; ++r) {
      __m256i hi0, lo0, hi1, lo1;
      mulhilo8(m0, c0, hi0, lo0);
      mulhilo8(m1, c2, hi1, lo1);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int32_t>(k0)));
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int32_t>(k1)));
      c1 = lo1, c3 = lo0;
      k0 += kPhiloxW0, k1 += kPhiloxW1;
    }
    const __m256i store = _mm256_cmpgt_epi32(_mm256_set1_epi32(count - i), lane);  // the lanes below n
    _mm256_maskstore_epi32(reinterpret_cast<int*>(x0 + i), store, c0);
    _mm256_maskstore_epi32(reinterpret_cast<int*>(x1 + i), store, c1);
  }
}

#pragma GCC diagnostic pop

using PhiloxWords = void (*)(uint64_t, uint64_t, uint64_t, int64_t, uint32_t*, uint32_t*);

// The widest rounds both the CPU and ATEN_CPU_CAPABILITY allow (read once).
PhiloxWords widest_rounds() {
  const std::string capability = at::get_cpu_capability();
  if (capability == "AVX512" && __builtin_cpu_supports("avx512f")) return philox_words_avx512;
  if ((capability == "AVX512" || capability == "AVX2") && __builtin_cpu_supports("avx2")) return philox_words_avx2;
  return philox_words_scalar;
}
#endif

}  // namespace

void philox_words(uint64_t seed, uint64_t step, uint64_t first, int64_t n, uint32_t* x0, uint32_t* x1) {
#if FSAM_CPU_X86
  static const PhiloxWords rounds = widest_rounds();
  rounds(seed, step, first, n, x0, x1);
#else
  philox_words_scalar(seed, step, first, n, x0, x1);
#endif
}

}  // namespace fsam
