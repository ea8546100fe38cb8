// Gradient norm, masked perturbation with compact saving of the originals, and restore: the CPU
// impls.
//
// Saved values: chunk c of the list writes the original values of its masked entries (in
// their own dtype, in element order) at byte save_offsets[c] of `saved`; without a mask every
// entry of the chunk is saved.  The offsets come from the popcounts (fsam_kernels/_layout.py).
#include "chunks.h"
#include "sumsq.h"

#include <fsam/checks.h>
#include <fsam/functors.h>

#include <array>

namespace fsam {
namespace {

constexpr auto kCPU = c10::DeviceType::CPU;
using OptTensors = c10::List<std::optional<at::Tensor>>;

struct Inputs {
  at::TensorList params;
  std::vector<std::optional<at::Tensor>> grads;
  std::vector<Chunk> chunks;
  const uint8_t* bits = nullptr;

  const uint8_t* chunk_bits(const Chunk& c) const { return bits ? bits + c.index * kChunkBytes : nullptr; }
};

Inputs check_inputs(const char* op, at::TensorList params, const OptTensors& grads,
                    const std::optional<at::Tensor>& mask_bits) {
  check_float_list(params, kCPU, op, "params");
  check_grads(params, grads, kCPU, op, "params", /*same_dtype=*/true);
  Inputs in{params, {grads.begin(), grads.end()}, chunk_table(params)};
  if (mask_bits.has_value()) {
    check_buffer(*mask_bits, at::kByte, static_cast<int64_t>(in.chunks.size()) * kChunkBytes, kCPU, op, "mask_bits");
    in.bits = mask_bits->const_data_ptr<uint8_t>();
  }
  return in;
}

at::Tensor grad_sumsq_cpu(at::TensorList params, const OptTensors& grads,
                         const std::optional<at::Tensor>& mask_bits, bool adaptive, double eta) {
  const Inputs in = check_inputs("grad_sumsq", params, grads, mask_bits);
  check_scalar(eta, 0.0, "grad_sumsq", "eta");
  std::vector<std::array<double, 2>> partial(in.chunks.size(), {0.0, 0.0});
  const float e = static_cast<float>(eta);
  parallel_chunks(in.chunks, [&](const Chunk& c) {
    const auto& g = in.grads[c.tensor];
    if (!g.has_value()) return;
    FSAM_DISPATCH_FLOATS(g->scalar_type(), "grad_sumsq", [&] {
      const scalar_t* w = in.params[c.tensor].const_data_ptr<scalar_t>() + c.begin;
      const scalar_t* gp = g->const_data_ptr<scalar_t>() + c.begin;
      const int64_t n = c.end - c.begin;
      partial[c.index] = adaptive ? chunk_sumsq<true>(w, gp, in.chunk_bits(c), n, e)
                                  : chunk_sumsq<false>(w, gp, in.chunk_bits(c), n, e);
    });
  });
  // This backend's fixed order: fp64 within a chunk, the chunk partials added in fp64 in chunk
  // order (so the result does not depend on the thread count), fp32 once.  CUDA and Triton add
  // in fixed orders of their own (docs/algorithm.md, "One summation order for the norm").
  double all = 0, masked = 0;
  for (const auto& p : partial) all += p[0], masked += p[1];
  auto out = at::empty({2}, at::TensorOptions().dtype(at::kFloat));
  out[0] = static_cast<float>(all);
  out[1] = static_cast<float>(masked);
  return out;
}

template <bool kAdaptive, typename scalar_t>
void perturb_chunk(scalar_t* w, const scalar_t* g, const uint8_t* bits, int64_t n, scalar_t* dst,
                   const Perturbation<kAdaptive>& perturb) {
  // g == nullptr: no gradient, or scale 0; the originals are saved all the same.
  auto one = [&](int64_t i) { w[i] = static_cast<scalar_t>(perturb(static_cast<float>(w[i]), static_cast<float>(g[i]))); };
  if (bits == nullptr) {
    std::memcpy(dst, w, n * sizeof(scalar_t));
    if (g)
      for (int64_t i = 0; i < n; ++i) one(i);
    return;
  }
  int64_t j = 0;
  for_each_set_bit(bits, n, [&](int64_t i) {
    dst[j++] = w[i];
    if (g) one(i);
  });
}

void perturb_cpu(at::TensorList params, const OptTensors& grads, const std::optional<at::Tensor>& mask_bits,
                        const at::Tensor& save_offsets, const at::Tensor& saved, const at::Tensor& scale,
                        bool adaptive, double eta, const std::optional<at::Tensor>& status) {
  const char* op = "perturb_";
  const Inputs in = check_inputs(op, params, grads, mask_bits);
  check_perturb_saving(op, params, grads, mask_bits, save_offsets, saved, scale, status, kCPU);
  check_scalar(eta, 0.0, op, "eta");
  if (!host_runs_pass(op, params, mask_bits, save_offsets, saved, status)) return;
  // scale == 0 (rho = 0, or a non-finite norm) leaves the weights untouched; restore stays exact.
  const float s = scale.item<float>();
  const float e = static_cast<float>(eta);
  const int64_t* offsets = save_offsets.const_data_ptr<int64_t>();
  uint8_t* store = saved.data_ptr<uint8_t>();
  parallel_chunks(in.chunks, [&](const Chunk& c) {
    const auto& g = in.grads[c.tensor];
    FSAM_DISPATCH_FLOATS(in.params[c.tensor].scalar_type(), "perturb_", [&] {
      scalar_t* w = in.params[c.tensor].data_ptr<scalar_t>() + c.begin;
      const scalar_t* gp = g.has_value() && s != 0.0f ? g->const_data_ptr<scalar_t>() + c.begin : nullptr;
      scalar_t* dst = reinterpret_cast<scalar_t*>(store + offsets[c.index]);
      const int64_t n = c.end - c.begin;
      if (adaptive) {
        perturb_chunk(w, gp, in.chunk_bits(c), n, dst, Perturbation<true>{{e}, s});
      } else {
        perturb_chunk(w, gp, in.chunk_bits(c), n, dst, Perturbation<false>{{e}, s});
      }
    });
  });
}

void restore_cpu(at::TensorList params, const std::optional<at::Tensor>& mask_bits,
                        const at::Tensor& save_offsets, const at::Tensor& saved,
                        const std::optional<at::Tensor>& status) {
  const char* op = "restore_";
  const OptTensors none(std::vector<std::optional<at::Tensor>>(params.size()));
  const Inputs in = check_inputs(op, params, none, mask_bits);
  check_perturb_saving(op, params, none, mask_bits, save_offsets, saved, std::nullopt, status, kCPU);
  if (!host_runs_pass(op, params, mask_bits, save_offsets, saved, status)) return;
  const int64_t* offsets = save_offsets.const_data_ptr<int64_t>();
  const uint8_t* store = saved.const_data_ptr<uint8_t>();
  parallel_chunks(in.chunks, [&](const Chunk& c) {
    FSAM_DISPATCH_FLOATS(in.params[c.tensor].scalar_type(), "restore_", [&] {
      scalar_t* w = in.params[c.tensor].data_ptr<scalar_t>() + c.begin;
      const scalar_t* src = reinterpret_cast<const scalar_t*>(store + offsets[c.index]);
      const int64_t n = c.end - c.begin;
      if (in.bits == nullptr) {
        std::memcpy(w, src, n * sizeof(scalar_t));
        return;
      }
      int64_t j = 0;
      for_each_set_bit(in.chunk_bits(c), n, [&](int64_t i) { w[i] = src[j++]; });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fsam, CPU, m) {
  m.impl("grad_sumsq", &grad_sumsq_cpu);
  m.impl("perturb_", &perturb_cpu);
  m.impl("restore_", &restore_cpu);
}

}  // namespace fsam
