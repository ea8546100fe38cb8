// Gradient norm, masked perturbation with compact saving of the originals, and restore:
// schemas and CPU impls.
//
// Saved values: chunk c of the list writes the original values of its masked entries (in
// their own dtype, in element order) at byte save_offsets[c] of `saved`; without a mask every
// entry of the chunk is saved.  The offsets come from the popcounts (fsam_kernels/_layout.py).
#include "common.h"

#include <array>
#include <atomic>
#include <cmath>

namespace fsam {
namespace {

using OptTensors = c10::List<std::optional<at::Tensor>>;

struct Inputs {
  std::vector<at::Tensor> params;
  std::vector<std::optional<at::Tensor>> grads;
  std::vector<Chunk> chunks;
  const uint8_t* bits = nullptr;
};

Inputs check_inputs(const char* op, at::TensorList params, const OptTensors& grads,
                    const std::optional<at::Tensor>& mask_bits) {
  TORCH_CHECK(grads.size() == params.size(), op, ": grads has ", grads.size(),
              " tensors, params has ", params.size());
  Inputs in;
  std::vector<int64_t> numels;
  for (int64_t i = 0; i < static_cast<int64_t>(params.size()); ++i) {
    check_cpu_contiguous(params[i], "params", i);
    check_float_dtype(params[i], "params", i);
    std::optional<at::Tensor> g = grads[i];
    if (g.has_value()) {
      check_cpu_contiguous(*g, "grads", i);
      TORCH_CHECK(g->scalar_type() == params[i].scalar_type(), op, ": grads[", i, "] is ",
                  g->scalar_type(), " but params[", i, "] is ", params[i].scalar_type());
      TORCH_CHECK(g->numel() == params[i].numel(), op, ": grads[", i, "] has ", g->numel(),
                  " elements, params[", i, "] has ", params[i].numel());
    }
    in.params.push_back(params[i]);
    in.grads.push_back(g);
    numels.push_back(params[i].numel());
  }
  in.chunks = chunk_table(numels);
  if (mask_bits.has_value()) {
    TORCH_CHECK(mask_bits->scalar_type() == at::kByte && mask_bits->is_contiguous() &&
                    mask_bits->device().is_cpu(),
                op, ": mask_bits must be a contiguous uint8 CPU tensor");
    TORCH_CHECK(mask_bits->numel() == static_cast<int64_t>(in.chunks.size()) * kChunkBytes, op,
                ": mask_bits has ", mask_bits->numel(), " bytes, the tensors need ",
                in.chunks.size() * kChunkBytes);
    in.bits = mask_bits->const_data_ptr<uint8_t>();
  }
  return in;
}

void check_saved(const char* op, const Inputs& in, const at::Tensor& save_offsets, const at::Tensor& saved) {
  TORCH_CHECK(save_offsets.scalar_type() == at::kLong && save_offsets.is_contiguous() &&
                  save_offsets.device().is_cpu() &&
                  save_offsets.numel() == static_cast<int64_t>(in.chunks.size()),
              op, ": save_offsets must be a contiguous int64 CPU tensor with one entry per chunk (",
              in.chunks.size(), ")");
  TORCH_CHECK(saved.scalar_type() == at::kByte && saved.is_contiguous() && saved.device().is_cpu(), op,
              ": saved must be a contiguous uint8 CPU tensor");
}

// Number of entries chunk c saves.
int64_t chunk_entries(const Inputs& in, const Chunk& c) {
  if (in.bits == nullptr) return c.end - c.begin;
  int64_t n = 0;
  for (int64_t i = 0; i < kChunkBytes; i += 8) {
    uint64_t word;
    std::memcpy(&word, in.bits + c.index * kChunkBytes + i, sizeof(word));
    n += __builtin_popcountll(word);
  }
  return n;
}

// Whether chunk c's saved values fit in a buffer of `capacity` bytes at their offset.
bool saved_fits(const Inputs& in, const Chunk& c, const int64_t* offsets, int64_t capacity, int64_t itemsize) {
  return offsets[c.index] >= 0 && offsets[c.index] + chunk_entries(in, c) * itemsize <= capacity;
}

// kByteLanes[b][l] = bit l of b, as a float: the mask byte spread over 8 lanes.
const auto kByteLanes = [] {
  std::array<std::array<float, 8>, 256> t{};
  for (int b = 0; b < 256; ++b)
    for (int l = 0; l < 8; ++l) t[b][l] = static_cast<float>((b >> l) & 1);
  return t;
}();

// (T g)^2 summed in fp32 per chunk, with T = |w| + eta for ASAM and 1 for SAM, in 8 lanes (one
// mask byte per step) so that the loop vectorises.  Returns {all, masked}.
template <bool adaptive, typename scalar_t>
std::array<double, 2> chunk_sumsq(const scalar_t* w, const scalar_t* g, const uint8_t* bits, int64_t n, float eta) {
  constexpr int L = 8;
  double all[L] = {0}, masked[L] = {0};
  auto term = [&](int64_t i) {
    float v = static_cast<float>(g[i]);
    if (adaptive) v *= std::abs(static_cast<float>(w[i])) + eta;
    const double d = v;
    return d * d;  // exact: the square of an fp32 value fits a double
  };
  const int64_t full = n / L * L;
  for (int64_t i = 0; i < full; i += L) {
    const float* keep = kByteLanes[bits ? bits[i / L] : 0xff].data();
    for (int l = 0; l < L; ++l) {
      const double sq = term(i + l);
      all[l] += sq;
      masked[l] += sq * keep[l];  // 0 * sq = 0 for finite sq; a non-finite sq shows in `all`
    }
  }
  for (int64_t i = full; i < n; ++i) {
    const double sq = term(i);
    all[i - full] += sq;
    if (!bits || mask_bit(bits, i)) masked[i - full] += sq;
  }
  double a = 0, m = 0;
  for (int l = 0; l < L; ++l) a += all[l], m += masked[l];
  return {a, m};
}

// Calls f(i) for every set bit i < n of a chunk's mask, 64 bits at a time: the work follows
// the number of masked entries, and empty words cost one test.
template <typename F>
inline void for_each_set_bit(const uint8_t* bits, int64_t n, const F& f) {
  for (int64_t base = 0; base < n; base += 64) {
    uint64_t word;
    std::memcpy(&word, bits + base / 8, sizeof(word));  // chunk masks are whole 512-byte blocks
    while (word) {
      const int64_t i = base + __builtin_ctzll(word);
      word &= word - 1;
      if (i < n) f(i);
    }
  }
}

at::Tensor grad_sumsq_cpu(at::TensorList params, const OptTensors& grads,
                         const std::optional<at::Tensor>& mask_bits, bool adaptive, double eta) {
  Inputs in = check_inputs("grad_sumsq", params, grads, mask_bits);
  std::vector<std::array<double, 2>> partial(in.chunks.size(), {0.0, 0.0});
  parallel_chunks(in.chunks, [&](const Chunk& c) {
    const auto& g = in.grads[c.tensor];
    if (!g.has_value()) return;
    const uint8_t* bits = in.bits ? in.bits + c.index * kChunkBytes : nullptr;
    FSAM_DISPATCH_FLOATS(g->scalar_type(), "grad_sumsq", [&] {
      const scalar_t* w = in.params[c.tensor].const_data_ptr<scalar_t>() + c.begin;
      const scalar_t* gp = g->const_data_ptr<scalar_t>() + c.begin;
      const float e = static_cast<float>(eta);
      partial[c.index] = adaptive ? chunk_sumsq<true>(w, gp, bits, c.end - c.begin, e)
                                  : chunk_sumsq<false>(w, gp, bits, c.end - c.begin, e);
    });
  });
  // The one summation order of every backend: fp64 within a chunk, the chunk partials added in
  // fp64 in chunk order (so the result does not depend on the thread count), fp32 once.
  double all = 0, masked = 0;
  for (const auto& p : partial) all += p[0], masked += p[1];
  auto out = at::empty({2}, at::TensorOptions().dtype(at::kFloat));
  out[0] = static_cast<float>(all);
  out[1] = static_cast<float>(masked);
  return out;
}

template <typename scalar_t>
inline scalar_t perturbed(scalar_t w, scalar_t g, float scale, bool adaptive, float eta) {
  const float wf = static_cast<float>(w);
  float d = static_cast<float>(g);
  if (adaptive) {
    const float t = std::abs(wf) + eta;
    d = d * (t * t);
  }
  return static_cast<scalar_t>(wf + d * scale);
}

void masked_perturb_cpu(at::TensorList params, const OptTensors& grads, const std::optional<at::Tensor>& mask_bits,
                        const at::Tensor& save_offsets, const at::Tensor& saved, const at::Tensor& scale,
                        bool adaptive, double eta) {
  Inputs in = check_inputs("masked_perturb_", params, grads, mask_bits);
  check_saved("masked_perturb_", in, save_offsets, saved);
  TORCH_CHECK(scale.numel() == 1 && scale.scalar_type() == at::kFloat, "masked_perturb_: scale must be one float32 value");
  // scale == 0 (rho = 0, or a non-finite norm) leaves the weights untouched; the originals are
  // saved all the same, so restore is always exact.
  const float s = scale.item<float>();
  const int64_t* offsets = save_offsets.const_data_ptr<int64_t>();
  uint8_t* store = saved.data_ptr<uint8_t>();
  const int64_t capacity = saved.numel();
  std::atomic<bool> overflow{false};
  parallel_chunks(in.chunks, [&](const Chunk& c) {
    const auto& g = in.grads[c.tensor];
    FSAM_DISPATCH_FLOATS(in.params[c.tensor].scalar_type(), "masked_perturb_", [&] {
      const int64_t n = c.end - c.begin;
      if (!saved_fits(in, c, offsets, capacity, sizeof(scalar_t))) {
        overflow = true;
        return;
      }
      scalar_t* w = in.params[c.tensor].data_ptr<scalar_t>() + c.begin;
      const scalar_t* gp = g.has_value() ? g->const_data_ptr<scalar_t>() + c.begin : nullptr;
      scalar_t* dst = reinterpret_cast<scalar_t*>(store + offsets[c.index]);
      const bool add = gp != nullptr && s != 0.0f;
      const float e = static_cast<float>(eta);
      if (in.bits == nullptr) {
        std::memcpy(dst, w, n * sizeof(scalar_t));
        if (add)
          for (int64_t i = 0; i < n; ++i) w[i] = perturbed(w[i], gp[i], s, adaptive, e);
        return;
      }
      int64_t j = 0;
      for_each_set_bit(in.bits + c.index * kChunkBytes, n, [&](int64_t i) {
        dst[j++] = w[i];
        if (add) w[i] = perturbed(w[i], gp[i], s, adaptive, e);
      });
    });
  });
  TORCH_CHECK(!overflow, "masked_perturb_: save_offsets/saved do not fit the mask (saved has ", capacity, " bytes)");
}

void masked_restore_cpu(at::TensorList params, const std::optional<at::Tensor>& mask_bits,
                        const at::Tensor& save_offsets, const at::Tensor& saved) {
  OptTensors no_grads;
  for (size_t i = 0; i < params.size(); ++i) no_grads.push_back(std::nullopt);
  Inputs in = check_inputs("masked_restore_", params, no_grads, mask_bits);
  check_saved("masked_restore_", in, save_offsets, saved);
  const int64_t* offsets = save_offsets.const_data_ptr<int64_t>();
  const uint8_t* store = saved.const_data_ptr<uint8_t>();
  const int64_t capacity = saved.numel();
  std::atomic<bool> overflow{false};
  parallel_chunks(in.chunks, [&](const Chunk& c) {
    FSAM_DISPATCH_FLOATS(in.params[c.tensor].scalar_type(), "masked_restore_", [&] {
      const int64_t n = c.end - c.begin;
      if (!saved_fits(in, c, offsets, capacity, sizeof(scalar_t))) {
        overflow = true;
        return;
      }
      scalar_t* w = in.params[c.tensor].data_ptr<scalar_t>() + c.begin;
      const scalar_t* src = reinterpret_cast<const scalar_t*>(store + offsets[c.index]);
      if (in.bits == nullptr) {
        std::memcpy(w, src, n * sizeof(scalar_t));
        return;
      }
      int64_t j = 0;
      for_each_set_bit(in.bits + c.index * kChunkBytes, n, [&](int64_t i) { w[i] = src[j++]; });
    });
  });
  TORCH_CHECK(!overflow, "masked_restore_: save_offsets/saved do not fit the mask (saved has ", capacity, " bytes)");
}

}  // namespace

TORCH_LIBRARY_IMPL(fsam, CPU, m) {
  m.impl("grad_sumsq", &grad_sumsq_cpu);
  m.impl("masked_perturb_", &masked_perturb_cpu);
  m.impl("masked_restore_", &masked_restore_cpu);
}

}  // namespace fsam
