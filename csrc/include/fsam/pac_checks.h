// The argument checks of PAC-tuning's ops, shared by the CPU and CUDA impls (fsam/checks.h's
// style: the device is a parameter, each check raises before any write, naming op and argument).
#pragma once

#include "checks.h"

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

namespace fsam {

// params, log_stds (fp32; one per element, or one per tensor unless `per_element`), the counter
// bases, seed, step and the clamp.
inline void check_pac_noise(at::TensorList params, at::TensorList log_stds, at::IntArrayRef bases, int64_t seed,
                            int64_t step, double max_noise, const c10::Device& device, const char* op,
                            bool per_element = false) {
  check_float_list(params, device, op, "params");
  check_float_list(log_stds, device, op, "log_stds", /*fp32_only=*/true);
  TORCH_CHECK_VALUE(log_stds.size() == params.size(), op, ": log_stds has ", log_stds.size(), " tensors, params has ",
              params.size());
  TORCH_CHECK_VALUE(bases.size() == params.size(), op, ": bases has ", bases.size(), " entries, params has ",
              params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t n = log_stds[i].numel();
    TORCH_CHECK_VALUE(n == params[i].numel() || (n == 1 && !per_element), op, ": log_stds[", i, "] has ", n,
                " elements, params[", i, "] has ", params[i].numel());
    TORCH_CHECK_VALUE(bases[i] >= 0, op, ": bases[", i, "] is negative");
  }
  TORCH_CHECK_VALUE(seed >= 0 && step >= 0, op, ": seed and step must be >= 0");
  TORCH_CHECK_VALUE(max_noise > 0, op, ": max_noise must be > 0");
}

// The buffers of a perturbation or restore of `params` (check_saving), log_stds read beside them.
inline void check_pac_saving(at::TensorList params, at::TensorList log_stds, const at::Tensor& mask_bits,
                             const at::Tensor& save_offsets, const at::Tensor& saved,
                             const std::optional<at::Tensor>& status, const c10::Device& device, const char* op) {
  Ranges reads;
  reads.add(log_stds, "log_stds", false);
  check_saving(op, params, mask_bits, save_offsets, saved, status, device, reads);
}

// The stage-1 pass's lists: grads and log_std_grads both one per parameter or both empty, anchors
// like the parameters, prior_log_stds fp32 [len(params)].
inline void check_pac_bound(at::TensorList params, at::TensorList log_stds, at::TensorList grads, at::TensorList log_std_grads,
                            at::TensorList anchors, const at::Tensor& prior_log_stds, const c10::Device& device,
                            const char* op) {
  const size_t count = params.size();
  TORCH_CHECK_VALUE(grads.size() == log_std_grads.size() && (grads.empty() || grads.size() == count), op,
              ": grads and log_std_grads must both have one tensor per parameter, or both be empty");
  TORCH_CHECK_VALUE(anchors.size() == count, op, ": anchors has ", anchors.size(), " tensors, params has ", count);
  check_float_list(grads, device, op, "grads");
  check_float_list(log_std_grads, device, op, "log_std_grads", /*fp32_only=*/true);
  check_float_list(anchors, device, op, "anchors");
  for (size_t i = 0; i < count; ++i) {
    TORCH_CHECK_VALUE(anchors[i].numel() == params[i].numel() && anchors[i].scalar_type() == params[i].scalar_type(), op,
                ": anchors[", i, "] must match params[", i, "] in size and dtype");
    if (grads.empty()) continue;
    TORCH_CHECK_VALUE(grads[i].numel() == params[i].numel() && grads[i].scalar_type() == params[i].scalar_type(), op,
                ": grads[", i, "] must match params[", i, "] in size and dtype");
    TORCH_CHECK_VALUE(log_std_grads[i].numel() == params[i].numel(), op, ": log_std_grads[", i, "] has ",
                log_std_grads[i].numel(), " elements, params[", i, "] has ", params[i].numel());
  }
  check_buffer(prior_log_stds, at::kFloat, static_cast<int64_t>(count), device, op, "prior_log_stds");
  Ranges ranges;
  ranges.add(grads, "grads", true);
  ranges.add(log_std_grads, "log_std_grads", true);
  ranges.add(params, "params", false);
  ranges.add(anchors, "anchors", false);
  ranges.add(log_stds, "log_stds", false);
  ranges.add(prior_log_stds, "prior_log_stds", -1, false);
  ranges.check(op);
}

}  // namespace fsam
