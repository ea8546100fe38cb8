// The fp64 sum of squares of a chunk in the CPU's summation order, shared by the norm of the
// perturbation (perturb.cpp) and the per-tensor norms of component-wise clipping (clip.cpp).
#pragma once

#include "vec_math.h"

#include <fsam/functors.h>

#include <array>
#include <cstdint>

namespace fsam {

// kByteLanes[b][l] = bit l of b, as a float: the mask byte spread over 8 lanes.
inline const auto kByteLanes = [] {
  std::array<std::array<float, 8>, 256> t{};
  for (int b = 0; b < 256; ++b)
    for (int l = 0; l < 8; ++l) t[b][l] = static_cast<float>((b >> l) & 1);
  return t;
}();

// The CPU's summation order within a chunk: the fp64 terms added in element order (8 lanes, one mask
// byte per step, so that the loop vectorises: each lane stays one sum in element order, so every
// vector width gives the same bits; the lanes are then added in order).  Returns {all, masked}.
template <bool kAdaptive, typename scalar_t>
FSAM_CPU_CLONES std::array<double, 2> chunk_sumsq(const scalar_t* w, const scalar_t* g, const uint8_t* bits, int64_t n, float eta) {
  constexpr int L = 8;
  const SumsqTerm<kAdaptive> term{{eta}};
  double all[L] = {0}, masked[L] = {0};
  const int64_t full = n / L * L;
  // SAM's term does not depend on w: do not load it
  auto weight = [&](int64_t i) { return kAdaptive ? static_cast<float>(w[i]) : 0.0f; };
  if (bits == nullptr) {  // no mask: one sum (the masked one is the same)
    for (int64_t i = 0; i < full; i += L)
      for (int l = 0; l < L; ++l) all[l] += term(weight(i + l), static_cast<float>(g[i + l]));
    for (int64_t i = full; i < n; ++i) all[i - full] += term(weight(i), static_cast<float>(g[i]));
    double a = 0;
    for (int l = 0; l < L; ++l) a += all[l];
    return {a, a};
  }
  for (int64_t i = 0; i < full; i += L) {
    const float* keep = kByteLanes[bits[i / L]].data();
    for (int l = 0; l < L; ++l) {
      const double sq = term(weight(i + l), static_cast<float>(g[i + l]));
      all[l] += sq;
      masked[l] += sq * keep[l];  // 0 * sq = 0 for finite sq; a non-finite sq shows in `all`
    }
  }
  for (int64_t i = full; i < n; ++i) {
    const double sq = term(weight(i), static_cast<float>(g[i]));
    all[i - full] += sq;
    if (mask_bit(bits, i)) masked[i - full] += sq;
  }
  double a = 0, m = 0;
  for (int l = 0; l < L; ++l) a += all[l], m += masked[l];
  return {a, m};
}

}  // namespace fsam
