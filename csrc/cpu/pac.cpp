// PAC-tuning's noise ops on the CPU: the mask of the entries a restore by subtraction would not
// give back, the perturbation saving their originals (at the offsets of perturb_'s layout), the
// exact restore, and stage 1's fused pass (log-std gradients, the w-regulariser, per-tensor sums).
#include "chunks.h"
#include "philox.h"
#include "vec_math.h"

#include <fsam/functors.h>
#include <fsam/pac_checks.h>
#include <fsam/pac_noise.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>

namespace fsam {

// Elements generated per call of the noise loops (on the stack).
constexpr int64_t kNoiseBlock = 256;

// eps of a counter's Philox words x0, x1 (philox.h), clamped to max_noise (as bits): PacNoise::eps
// with vec_math's log and cos, so that the loops below vectorise.
FSAM_VEC_INLINE float eps_of(uint32_t x0, uint32_t x1, uint32_t max_bits) {
  const float radius = std::sqrt(vec_math::log_positive(box_muller_u1(x0)) * -2.0f);
  return vec_math::clamp_abs(radius * vec_math::cos_turns(box_muller_u2(x1)), max_bits);
}

// The Philox words of the counters first .. first + n - 1 (n <= kNoiseBlock).
struct NoiseWords {
  uint32_t x0[kNoiseBlock], x1[kNoiseBlock];
  NoiseWords(const PacNoise& noise, int64_t first, int64_t n) {
    philox_words(noise.seed, noise.step, static_cast<uint64_t>(first), n, x0, x1);
  }
};

// eps of the counters first .. first + n - 1 (n <= kNoiseBlock).  The mask, the perturbation, the
// restore and the stage-1 pass all draw their noise here: the same bits in each.
FSAM_CPU_CLONES void pac_eps_block(const PacNoise& noise, int64_t first, int64_t n, float* eps) {
  const NoiseWords w(noise, first, n);
  const uint32_t max_bits = vec_math::bits_of(noise.max_noise);
  const auto count = static_cast<int32_t>(n);
#pragma omp simd
  for (int32_t i = 0; i < count; ++i) eps[i] = eps_of(w.x0[i], w.x1[i], max_bits);
}

// The noise exp(log_std) eps of the same counters: log_std[i] for element i, or log_std[0] for
// all of them (a per-tensor log-std).
FSAM_CPU_CLONES void pac_noise_block(const PacNoise& noise, int64_t first, const float* log_std, bool per_tensor,
                                     int64_t n, float* out) {
  const NoiseWords w(noise, first, n);
  const uint32_t max_bits = vec_math::bits_of(noise.max_noise);
  const auto count = static_cast<int32_t>(n);
  if (per_tensor) {
    const float scale = vec_math::exp_clamped(log_std[0]);
#pragma omp simd
    for (int32_t i = 0; i < count; ++i) out[i] = scale * eps_of(w.x0[i], w.x1[i], max_bits);
  } else {
#pragma omp simd
    for (int32_t i = 0; i < count; ++i) out[i] = vec_math::exp_clamped(log_std[i]) * eps_of(w.x0[i], w.x1[i], max_bits);
  }
}

// Stage 1's exponentials of a block of log-stds: e^(2p) (for its sum), and for the gradients
// (exp_p not null) e^p and e^(2p - 2b).
FSAM_CPU_CLONES void pac_bound_exps(const float* log_std, float b, int64_t n, float* exp_2p, float* exp_p,
                                    float* exp_excess) {
  const auto count = static_cast<int32_t>(n);
  if (exp_p == nullptr) {  // the sums alone
#pragma omp simd
    for (int32_t i = 0; i < count; ++i) exp_2p[i] = vec_math::exp_clamped(log_std[i] * 2.0f);
    return;
  }
#pragma omp simd
  for (int32_t i = 0; i < count; ++i) {
    exp_2p[i] = vec_math::exp_clamped(log_std[i] * 2.0f);
    exp_p[i] = vec_math::exp_clamped(log_std[i]);
    exp_excess[i] = vec_math::exp_clamped(PacBoundTerms::excess_exponent(log_std[i], b));
  }
}

namespace {

constexpr auto kCPU = c10::DeviceType::CPU;

struct NoiseInputs {
  at::TensorList params;
  at::TensorList log_stds;
  std::vector<int64_t> bases;
  PacNoise noise;
  std::vector<Chunk> chunks;

  // Whether chunk c's tensor has one log-std (else one per element).
  bool per_tensor(const Chunk& c) const { return log_stds[c.tensor].numel() == 1; }
  // Chunk c's log-std of element i of its tensor: at i, or the tensor's one.
  const float* log_std(const Chunk& c) const {
    return log_stds[c.tensor].const_data_ptr<float>() + (per_tensor(c) ? 0 : c.begin);
  }
  int64_t counter(const Chunk& c, int64_t i) const { return bases[c.tensor] + c.begin + i; }

  // Calls f(start, n, noise) for the blocks of chunk c in order: the noise of its elements
  // start .. start + n - 1, generated a block at a time.
  template <typename F>
  void each_noise_block(const Chunk& c, const F& f) const {
    float block[kNoiseBlock];
    const float* s = log_std(c);
    const bool one = per_tensor(c);
    for (int64_t b = 0; b < c.end - c.begin; b += kNoiseBlock) {
      const int64_t n = std::min(kNoiseBlock, c.end - c.begin - b);
      pac_noise_block(noise, counter(c, b), one ? s : s + b, one, n, block);
      f(b, n, static_cast<const float*>(block));
    }
  }
};

NoiseInputs check_noise(const char* op, at::TensorList params, at::TensorList log_stds, at::IntArrayRef bases,
                        int64_t seed, int64_t step, double max_noise, bool per_element = false) {
  check_pac_noise(params, log_stds, bases, seed, step, max_noise, kCPU, op, per_element);
  return {params, log_stds, bases.vec(),
          PacNoise{static_cast<uint64_t>(seed), static_cast<uint64_t>(step), static_cast<float>(max_noise)},
          chunk_table(params)};
}

// pac_inexact; for a half weight with vec_math's conversions, the same bits without c10::Half's
// branches, which kept the loop below from vectorising (11.2 ns an element against 4.1).
template <typename T>
FSAM_VEC_INLINE bool inexact_of(T w, float n) {
  return pac_inexact(w, n);
}
template <>
FSAM_VEC_INLINE bool inexact_of(c10::Half w, float n) {
  const float perturbed = vec_math::half_to_float(vec_math::float_to_half(vec_math::half_to_float(w.x) + n));
  return vec_math::float_to_half(perturbed - n) != w.x;
}

// Writes bits 0 .. n - 1 of `bits` (n <= kNoiseBlock, in whole bytes, any bit past n 0): set where a
// restore by subtraction would not give w[i] back.  Returns how many are set.  The flags come out of
// a vectorised loop and are packed 8 at a time without a branch (about a fifth are set, at random).
template <typename T>
FSAM_CPU_CLONES int32_t inexact_bits(const T* w, const float* noise, int64_t n, uint8_t* bits) {
  alignas(8) uint8_t flags[kNoiseBlock] = {};
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) flags[i] = inexact_of(w[i], noise[i]);
  int32_t count = 0;
  for (int64_t i = 0; i < n; i += 8) {
    uint64_t eight;
    std::memcpy(&eight, flags + i, sizeof(eight));
    // byte l's 0/1 lands on bit 56 + l alone (no two products share a bit, so nothing carries)
    const auto byte = static_cast<uint8_t>((eight * 0x0102040810204080ull) >> 56);
    bits[i / 8] = byte;
    count += __builtin_popcount(byte);
  }
  return count;
}

std::tuple<at::Tensor, at::Tensor> pac_noise_mask_cpu(at::TensorList params, at::TensorList log_stds,
                                                      at::IntArrayRef bases, int64_t seed, int64_t step,
                                                      double max_noise) {
  const NoiseInputs in = check_noise("pac_noise_mask", params, log_stds, bases, seed, step, max_noise);
  const int64_t chunks = static_cast<int64_t>(in.chunks.size());
  auto bits = at::zeros({chunks * kChunkBytes}, at::TensorOptions().dtype(at::kByte));
  auto counts = at::empty({chunks}, at::TensorOptions().dtype(at::kInt));
  uint8_t* b = bits.data_ptr<uint8_t>();
  int32_t* n = counts.data_ptr<int32_t>();
  parallel_chunks(in.chunks, [&](const Chunk& c) {
    FSAM_DISPATCH_FLOATS(in.params[c.tensor].scalar_type(), "pac_noise_mask", [&] {
      const scalar_t* w = in.params[c.tensor].const_data_ptr<scalar_t>() + c.begin;
      uint8_t* out = b + c.index * kChunkBytes;
      int32_t count = 0;
      in.each_noise_block(c, [&](int64_t start, int64_t n, const float* noise) {
        count += inexact_bits(w + start, noise, n, out + start / 8);
      });
      n[c.index] = count;
    });
  });
  return {bits, counts};
}

// w + noise, or w - noise where kRestore, for n entries.
template <bool kRestore, typename T>
FSAM_CPU_CLONES void add_noise(T* w, const float* noise, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) w[i] = kRestore ? pac_sub(w[i], noise[i]) : pac_add(w[i], noise[i]);
}

// Perturbs (kRestore false) or restores the entries by their noise, the masked ones' originals
// saved to or taken back from their chunk's run of `saved`.
template <bool kRestore>
void pac_shift_cpu(at::TensorList params, at::TensorList log_stds, at::IntArrayRef bases, int64_t seed, int64_t step,
                   double max_noise, const at::Tensor& mask_bits, const at::Tensor& save_offsets,
                   const at::Tensor& saved, const std::optional<at::Tensor>& status) {
  constexpr const char* op = kRestore ? "pac_restore_" : "pac_perturb_";
  const NoiseInputs in = check_noise(op, params, log_stds, bases, seed, step, max_noise);
  check_pac_saving(params, log_stds, mask_bits, save_offsets, saved, status, kCPU, op);
  if (!host_runs_pass(op, params, mask_bits, save_offsets, saved, status)) return;
  const uint8_t* all_bits = mask_bits.const_data_ptr<uint8_t>();
  const int64_t* offsets = save_offsets.const_data_ptr<int64_t>();
  parallel_chunks(in.chunks, [&](const Chunk& c) {
    FSAM_DISPATCH_FLOATS(in.params[c.tensor].scalar_type(), op, [&] {
      scalar_t* w = in.params[c.tensor].data_ptr<scalar_t>() + c.begin;
      const uint8_t* bits = all_bits + c.index * kChunkBytes;
      const int64_t offset = offsets[c.index];
      int64_t j = 0;
      // The masked entries (about a fifth, at random) are saved before the noise and put back after
      // it, a set bit at a time, so that the loop over all of them is branch-free.
      if constexpr (!kRestore) {
        auto* dst = reinterpret_cast<scalar_t*>(saved.data_ptr<uint8_t>() + offset);
        for_each_set_bit(bits, c.end - c.begin, [&](int64_t i) { dst[j++] = w[i]; });
      }
      in.each_noise_block(c, [&](int64_t start, int64_t n, const float* noise) {
        add_noise<kRestore>(w + start, noise, n);
      });
      if constexpr (kRestore) {
        const auto* src = reinterpret_cast<const scalar_t*>(saved.const_data_ptr<uint8_t>() + offset);
        for_each_set_bit(bits, c.end - c.begin, [&](int64_t i) { w[i] = src[j++]; });
      }
    });
  });
}

at::Tensor pac_bound_grads_cpu(at::TensorList params, at::TensorList grads, at::TensorList log_stds,
                               at::TensorList log_std_grads, at::TensorList anchors, const at::Tensor& prior_log_stds,
                               at::IntArrayRef bases, int64_t seed, int64_t step, double max_noise, double coef) {
  const char* op = "pac_bound_grads_";
  const NoiseInputs in = check_noise(op, params, log_stds, bases, seed, step, max_noise, /*per_element=*/true);
  check_pac_bound(params, log_stds, grads, log_std_grads, anchors, prior_log_stds, kCPU, op);
  const int64_t count = static_cast<int64_t>(params.size());
  const bool with_grads = !grads.empty();
  const float* prior = prior_log_stds.const_data_ptr<float>();
  const PacBoundTerms terms{static_cast<float>(coef)};
  std::vector<std::array<double, kBoundSums>> partial(in.chunks.size());
  parallel_chunks(in.chunks, [&](const Chunk& c) {
    FSAM_DISPATCH_FLOATS(in.params[c.tensor].scalar_type(), "pac_bound_grads_", [&] {
      const scalar_t* w = in.params[c.tensor].const_data_ptr<scalar_t>() + c.begin;
      const scalar_t* w0 = anchors[c.tensor].const_data_ptr<scalar_t>() + c.begin;
      const float* s = in.log_std(c);
      const float b = prior[c.tensor];
      const float decay = expf(b * -2.0f);
      scalar_t* g = with_grads ? grads[c.tensor].data_ptr<scalar_t>() + c.begin : nullptr;
      float* sg = with_grads ? log_std_grads[c.tensor].data_ptr<float>() + c.begin : nullptr;
      std::array<double, kBoundSums> sum{};
      float eps[kNoiseBlock], exp_2p[kNoiseBlock], exp_p[kNoiseBlock], exp_excess[kNoiseBlock];
      for (int64_t start = 0; start < c.end - c.begin; start += kNoiseBlock) {
        const int64_t n = std::min(kNoiseBlock, c.end - c.begin - start);
        pac_bound_exps(s + start, b, n, exp_2p, with_grads ? exp_p : nullptr, exp_excess);
        if (with_grads) pac_eps_block(in.noise, in.counter(c, start), n, eps);  // the perturbation's eps
        for (int64_t j = 0; j < n; ++j) {
          const int64_t i = start + j;
          const float diff = static_cast<float>(w[i]) - static_cast<float>(w0[i]);
          sum[kSumExp2P] += static_cast<double>(exp_2p[j]);
          sum[kSumDiffSq] += static_cast<double>(diff) * diff;
          sum[kSumLogStd] += static_cast<double>(s[i]);
          if (!with_grads) continue;
          const float gf = static_cast<float>(g[i]);
          sum[kSumGradSq] += static_cast<double>(gf) * gf;
          sg[i] = terms.log_std_grad(gf, eps[j], exp_p[j], exp_excess[j]);
          g[i] = static_cast<scalar_t>(terms.regularised(gf, diff, decay));
        }
      }
      partial[c.index] = sum;
    });
  });
  // fp64 within a chunk, the chunks of a tensor added in order: grad_sumsq's summation order.
  auto out = at::zeros({kBoundSums, count}, at::TensorOptions().dtype(at::kDouble));
  double* sums = out.data_ptr<double>();
  for (const Chunk& c : in.chunks)
    for (int r = 0; r < kBoundSums; ++r) sums[r * count + c.tensor] += partial[c.index][r];
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fsam, CPU, m) {
  m.impl("pac_noise_mask", &pac_noise_mask_cpu);
  m.impl("pac_perturb_", &pac_shift_cpu</*kRestore=*/false>);
  m.impl("pac_restore_", &pac_shift_cpu</*kRestore=*/true>);
  m.impl("pac_bound_grads_", &pac_bound_grads_cpu);
}

}  // namespace fsam
