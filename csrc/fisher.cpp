// Fisher accumulation F <- decay * F + alpha * g * g over a list of tensors: schema and CPU impl.
#include "common.h"

#include <mutex>

namespace fsam {
namespace {

// Each operation rounds to fp32 in the order of the reference (no FMA: -ffp-contract=off).
template <typename g_t>
void accumulate(float* f, const g_t* g, int64_t n, float decay, float alpha) {
  for (int64_t i = 0; i < n; ++i) {
    float gi = static_cast<float>(g[i]);
    f[i] = f[i] * decay + (gi * gi) * alpha;
  }
}

void decay_only(float* f, int64_t n, float decay) {
  for (int64_t i = 0; i < n; ++i) f[i] = f[i] * decay;
}

// The first radix pass over the new F, done while it is in cache (see _schemas.py).
void add_first_hist(const float* f, int64_t n, int64_t* hist) {
  for (int64_t i = 0; i < n; ++i) {
    if (f[i] != f[i]) ++hist[kFirstBins];
    ++hist[order_key(f[i], false) >> kFirstShift];
  }
}

void fisher_accumulate_cpu(at::TensorList fisher, const c10::List<std::optional<at::Tensor>>& grads,
                           double decay, double alpha, const std::optional<at::Tensor>& found_inf,
                           const std::optional<at::Tensor>& first_hist) {
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == static_cast<int64_t>(fisher.size()),
              "fisher_accumulate_: grads has ", grads.size(), " tensors, fisher has ", fisher.size());
  std::vector<int64_t> numels;
  std::vector<std::optional<at::Tensor>> g(grads.begin(), grads.end());
  for (int64_t i = 0; i < static_cast<int64_t>(fisher.size()); ++i) {
    check_cpu_contiguous(fisher[i], "fisher", i);
    TORCH_CHECK(fisher[i].scalar_type() == at::kFloat, "fisher[", i, "] must be float32");
    if (g[i].has_value()) {
      check_cpu_contiguous(*g[i], "grads", i);
      check_float_dtype(*g[i], "grads", i);
      TORCH_CHECK(g[i]->numel() == fisher[i].numel(), "grads[", i, "] has ", g[i]->numel(),
                  " elements, fisher[", i, "] has ", fisher[i].numel());
    }
    numels.push_back(fisher[i].numel());
  }
  if (first_hist.has_value()) check_first_hist(*first_hist, "fisher_accumulate_");
  if (found_inf.has_value() && found_inf->item<float>() != 0.0f) return;
  const float d = static_cast<float>(decay), a = static_cast<float>(alpha);
  const auto chunks = chunk_table(numels);
  std::mutex mu;
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t b, int64_t e) {
    std::vector<int64_t> hist(first_hist.has_value() ? kFirstHistSize : 0, 0);
    for (int64_t i = b; i < e; ++i) {
      const Chunk& c = chunks[i];
      float* f = fisher[c.tensor].data_ptr<float>() + c.begin;
      const int64_t n = c.end - c.begin;
      const auto& gt = g[c.tensor];
      if (!gt.has_value()) {
        decay_only(f, n, d);
      } else {
        FSAM_DISPATCH_FLOATS(gt->scalar_type(), "fisher_accumulate_", [&] {
          accumulate(f, gt->const_data_ptr<scalar_t>() + c.begin, n, d, a);
        });
      }
      if (!hist.empty()) add_first_hist(f, n, hist.data());
    }
    if (hist.empty()) return;
    std::lock_guard<std::mutex> lock(mu);
    int64_t* out = first_hist->data_ptr<int64_t>();
    for (int64_t j = 0; j < kFirstHistSize; ++j) out[j] += hist[j];
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fsam, CPU, m) { m.impl("fisher_accumulate_", &fisher_accumulate_cpu); }

}  // namespace fsam
