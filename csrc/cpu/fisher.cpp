// Fisher accumulation F <- decay * F + alpha * g * g over a list of tensors: the CPU impl.
#include "chunks.h"
#include "first_digit.h"

#include <fsam/checks.h>
#include <fsam/functors.h>

#include <mutex>
#include <optional>

namespace fsam {
namespace {

constexpr auto kCPU = c10::DeviceType::CPU;

void fisher_accumulate_cpu(at::TensorList fisher, const c10::List<std::optional<at::Tensor>>& grads,
                           double decay, double alpha, const std::optional<at::Tensor>& found_inf,
                           const std::optional<at::Tensor>& first_hist) {
  const char* op = "fisher_accumulate_";
  check_float_list(fisher, kCPU, op, "fisher", /*fp32_only=*/true);
  check_grads(fisher, grads, kCPU, op, "fisher", /*same_dtype=*/false);
  check_fisher(fisher, grads, decay, alpha, found_inf, first_hist, kCPU, op);
  if (found_inf.has_value() && found_inf->item<double>() != 0.0) return;
  const FisherUpdate update{static_cast<float>(decay), static_cast<float>(alpha)};
  const OrderKey<false> key;
  const auto chunks = chunk_table(fisher);
  const std::vector<std::optional<at::Tensor>> gs(grads.begin(), grads.end());
  std::mutex mu;
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t b, int64_t e) {
    std::optional<FirstDigitHistogram> hist;
    std::vector<uint32_t> keys;
    if (first_hist.has_value()) hist.emplace(), keys.resize(kChunk);
    for (int64_t i = b; i < e; ++i) {
      const Chunk& c = chunks[i];
      float* f = fisher[c.tensor].data_ptr<float>() + c.begin;
      const int64_t n = c.end - c.begin;
      const std::optional<at::Tensor>& g = gs[c.tensor];
      if (!g.has_value()) {
        for (int64_t j = 0; j < n; ++j) f[j] = update(f[j]);
      } else {
        FSAM_DISPATCH_FLOATS(g->scalar_type(), "fisher_accumulate_", [&] {
          const scalar_t* gp = g->const_data_ptr<scalar_t>() + c.begin;
          for (int64_t j = 0; j < n; ++j) f[j] = update(f[j], static_cast<float>(gp[j]));
        });
      }
      // The top-k's first radix pass over the new F, while it is in cache.
      if (!hist) continue;
      int64_t nan = 0;  // in a register: one counter in memory would serialise the loop
      for (int64_t j = 0; j < n; ++j) {
        keys[j] = key(f[j]);
        nan += f[j] != f[j];
      }
      hist->count(keys.data(), n, nan);
    }
    if (!hist) return;
    std::lock_guard<std::mutex> lock(mu);
    hist->add_to(first_hist->data_ptr<int64_t>());
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fsam, CPU, m) { m.impl("fisher_accumulate_", &fisher_accumulate_cpu); }

}  // namespace fsam
