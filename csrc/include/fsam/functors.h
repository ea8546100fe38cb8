// The per-element math of every C++ backend, as functors compiled for the host and the device
// (the style of PyTorch's SharedReduceOps.h): the CPU kernels call exactly what the CUDA kernels
// call, so the CPU tests exercise it.  Each operation rounds to fp32 in the order of the
// reference backend; the host side builds with -ffp-contract=off and nvcc with --fmad=false,
// so that no multiply-add is fused.  Traversal (chunks, threads, blocks) lives elsewhere.
#pragma once

#include "layout.h"

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace fsam {

// The bits of a float (memcpy: defined behaviour on host and device, compiled to a move).
C10_HOST_DEVICE inline uint32_t float_bits(float x) {
  uint32_t u;
  memcpy(&u, &x, sizeof(u));
  return u;
}

// Keys that order like the floats (|x| with kAbsolute): non-negative floats order like their
// bit patterns, and flipping makes every float do so.  -0 is folded onto +0 so that equal values
// stay equal keys (the tie rule needs it).
template <bool kAbsolute>
struct OrderKey {
  C10_HOST_DEVICE uint32_t operator()(float x) const {
    uint32_t u = float_bits(x);
    if (kAbsolute) u &= 0x7fffffffu;
    if (u == 0x80000000u) u = 0;
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  }
};

// Bin of a key in the histogram of digit kDigit, and whether the key lies under the prefix chosen
// by the digits before it (the keys under another prefix count nowhere).  The digit is a template
// argument: its shifts are constants (and device code may read the layout arrays only so).
template <int kDigit>
struct RadixDigit {
  static constexpr int kShift = kRadixShift[kDigit];
  static constexpr int kAbove = kShift + kRadixWidth[kDigit];
  static constexpr uint32_t kBinsMask = (1u << kRadixWidth[kDigit]) - 1u;
  uint32_t prefix;  // the digits chosen before this one
  C10_HOST_DEVICE bool matches(uint32_t key) const { return kAbove == 32 || (key >> (kAbove & 31)) == prefix; }
  C10_HOST_DEVICE uint32_t bin(uint32_t key) const { return (key >> kShift) & kBinsMask; }
};

// Calls f(std::integral_constant<int, d>{}) for a digit d known only at run time.
template <typename F>
decltype(auto) with_digit(int64_t digit, const F& f) {
  static_assert(kRadixDigits == 3, "one case per digit");
  switch (digit) {
    case 0: return f(std::integral_constant<int, 0>{});
    case 1: return f(std::integral_constant<int, 1>{});
    default: return f(std::integral_constant<int, 2>{});
  }
}

// The radix select step: the digit holding the k_left-th largest of the keys counted in `hist`,
// how many counted keys lie above it, and how many share it.
struct DigitChoice {
  int64_t digit, greater, ties;
};
C10_HOST_DEVICE inline DigitChoice choose_digit(const int64_t* hist, int64_t bins, int64_t k_left) {
  int64_t greater = 0, digit = bins - 1;
  for (; digit > 0 && greater + hist[digit] < k_left; --digit) greater += hist[digit];
  return {digit, greater, hist[digit]};
}

// The candidate buffer (layout.h): an entry holds a key and its chunk.  The digit-1 pass fills it
// only when the keys under the first digit chosen (every process's) fit, and records how many it
// wrote; the later passes read it only when that count fits, so a stale or hostile state can make
// them read the scores, never past the buffer.
C10_HOST_DEVICE inline int64_t candidate(int64_t chunk, uint32_t key) { return (chunk << kCandidateKeyBits) | key; }
C10_HOST_DEVICE inline uint32_t candidate_key(int64_t entry) { return static_cast<uint32_t>(entry); }
C10_HOST_DEVICE inline int64_t candidate_chunk(int64_t entry) { return entry >> kCandidateKeyBits; }
C10_HOST_DEVICE inline bool candidates_fit(int64_t keys_under_prefix, int64_t capacity) {
  return keys_under_prefix >= 0 && keys_under_prefix <= capacity;
}

// How many of a chunk's keys equal to the k-th one it takes: ties go to the lowest flat
// indices, so the chunks before it (holding `before` of them) take theirs first.
C10_HOST_DEVICE inline int64_t tie_quota(int64_t k_left, int64_t before, int64_t here) {
  const int64_t left = k_left - before;
  return left < 0 ? 0 : (left < here ? left : here);
}

// Fisher accumulation F <- decay * F + alpha * g^2.
struct FisherUpdate {
  float decay, alpha;
  C10_HOST_DEVICE float operator()(float f, float g) const { return f * decay + (g * g) * alpha; }
  C10_HOST_DEVICE float operator()(float f) const { return f * decay; }  // no gradient
};

// T = |w| + eta for ASAM, 1 for SAM.
template <bool kAdaptive>
struct Preconditioner {
  float eta;
  C10_HOST_DEVICE float operator()(float w) const { return kAdaptive ? fabsf(w) + eta : 1.0f; }
};

// (T g)^2 in fp64: exact, since the square of an fp32 value fits a double.
template <bool kAdaptive>
struct SumsqTerm {
  Preconditioner<kAdaptive> t;
  C10_HOST_DEVICE double operator()(float w, float g) const {
    const double v = kAdaptive ? g * t(w) : g;
    return v * v;
  }
};

// Component-wise clipping's factor for a tensor of L2 norm `norm`: min(1, max_norm / (norm + eps)),
// as torch.nn.utils.clip_grad_norm_ forms it for one tensor.  A NaN norm gives NaN (as torch's
// clamp keeps it), an infinite one 0.
struct ClipCoefficient {
  float max_norm, eps;
  C10_HOST_DEVICE float operator()(float norm) const {
    const float c = max_norm / (norm + eps);
    return c > 1.0f ? 1.0f : c;
  }
};

// The perturbed weight w + scale * T^2 g, rounded to fp32 (then to the weight's dtype).
template <bool kAdaptive>
struct Perturbation {
  Preconditioner<kAdaptive> t;
  float scale;
  C10_HOST_DEVICE float operator()(float w, float g) const {
    float d = g;
    if (kAdaptive) {
      const float tw = t(w);
      d = d * (tw * tw);
    }
    return w + d * scale;
  }
};

// Whether a chunk's run of `entries` saved values, from byte `offset` of a `capacity`-byte buffer,
// lies inside it, aligned to its element size, its end computed without overflow: the GPU kernels'
// own bound (on the host, fsam/checks.h's check_saved_runs refuses the whole call first).
C10_HOST_DEVICE inline bool saved_run_fits(int64_t offset, int64_t entries, int64_t itemsize, int64_t capacity) {
  return offset >= 0 && offset % itemsize == 0 && offset <= capacity && entries * itemsize <= capacity - offset;
}

C10_HOST_DEVICE inline bool mask_bit(const uint8_t* bits, int64_t i) { return (bits[i >> 3] >> (i & 7)) & 1; }

}  // namespace fsam
