// Fisher accumulation F <- decay * F + alpha * g * g over a list of tensors: schema and CPU impl.
#include "common.h"

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

void fisher_accumulate_cpu(at::TensorList fisher, const c10::List<std::optional<at::Tensor>>& grads,
                           double decay, double alpha, const std::optional<at::Tensor>& found_inf) {
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
  if (found_inf.has_value() && found_inf->item<float>() != 0.0f) return;
  const float d = static_cast<float>(decay), a = static_cast<float>(alpha);
  parallel_chunks(chunk_table(numels), [&](const Chunk& c) {
    float* f = fisher[c.tensor].data_ptr<float>() + c.begin;
    const int64_t n = c.end - c.begin;
    const auto& gt = g[c.tensor];
    if (!gt.has_value()) return decay_only(f, n, d);
    FSAM_DISPATCH_FLOATS(gt->scalar_type(), "fisher_accumulate_", [&] {
      accumulate(f, gt->const_data_ptr<scalar_t>() + c.begin, n, d, a);
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fsam, m) {
  m.def(
      "fisher_accumulate_(Tensor(a!)[] fisher, Tensor?[] grads, float decay, float alpha, "
      "Tensor? found_inf=None) -> ()");
}

TORCH_LIBRARY_IMPL(fsam, CPU, m) { m.impl("fisher_accumulate_", &fisher_accumulate_cpu); }

}  // namespace fsam
