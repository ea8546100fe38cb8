// Argument checks of every C++ backend, with the device as a parameter: each raises (before any
// write) with the op and the argument at fault.  fsam_kernels/ops.py checks the same contracts in
// Python first; these guard the ops when they are called directly through torch.ops.fsam.
#pragma once

#include "layout.h"

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>

#include <optional>

namespace fsam {

// `device` is exact: a CUDA call's tensors must all be on its one device (a CPU tensor's device is
// always `cpu`, so the CPU backend passes kCPU).
inline void check_on(const at::Tensor& t, const c10::Device& device, const char* op, const char* name, int64_t i) {
  TORCH_CHECK(t.device() == device, op, ": ", name, "[", i, "] is on ", t.device(), ", the call runs on ", device);
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, "[", i, "] must be contiguous");
}

inline void check_float_dtype(const at::Tensor& t, const char* op, const char* name, int64_t i) {
  const auto d = t.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kBFloat16 || d == at::kHalf, op, ": ", name, "[", i,
              "] must be float32, bfloat16 or float16, got ", d);
}

// A list of float tensors on the device, contiguous; all float32 with `fp32_only` (Fisher values).
inline void check_float_list(at::TensorList tensors, const c10::Device& device, const char* op, const char* name,
                             bool fp32_only = false) {
  for (int64_t i = 0; i < static_cast<int64_t>(tensors.size()); ++i) {
    check_on(tensors[i], device, op, name, i);
    check_float_dtype(tensors[i], op, name, i);
    TORCH_CHECK(!fp32_only || tensors[i].scalar_type() == at::kFloat, op, ": ", name, "[", i, "] must be float32");
  }
}

// A gradient list beside a parameter (or Fisher) list: the same length, each gradient on the device,
// contiguous, of the same size and (same_dtype) of the same dtype.
inline void check_grads(at::TensorList params, const c10::List<std::optional<at::Tensor>>& grads,
                        const c10::Device& device, const char* op, const char* params_name, bool same_dtype) {
  TORCH_CHECK(grads.size() == params.size(), op, ": grads has ", grads.size(), " tensors, ", params_name, " has ",
              params.size());
  for (int64_t i = 0; i < static_cast<int64_t>(params.size()); ++i) {
    const std::optional<at::Tensor> g = grads[i];
    if (!g.has_value()) continue;
    check_on(*g, device, op, "grads", i);
    check_float_dtype(*g, op, "grads", i);
    TORCH_CHECK(!same_dtype || g->scalar_type() == params[i].scalar_type(), op, ": grads[", i, "] is ",
                g->scalar_type(), " but ", params_name, "[", i, "] is ", params[i].scalar_type());
    TORCH_CHECK(g->numel() == params[i].numel(), op, ": grads[", i, "] has ", g->numel(), " elements, ",
                params_name, "[", i, "] has ", params[i].numel());
  }
}

// A one-dimensional buffer: dtype, device, contiguity and (numel >= 0) its exact size.
inline void check_buffer(const at::Tensor& t, at::ScalarType dtype, int64_t numel, const c10::Device& device,
                         const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype && t.is_contiguous() && t.device() == device, op, ": ", name,
              " must be a contiguous ", dtype, " tensor on ", device, ", got ", t.scalar_type(), " on ", t.device());
  TORCH_CHECK(numel < 0 || t.numel() == numel, op, ": ", name, " has ", t.numel(), " entries, expected ", numel);
}

inline void check_digit(int64_t digit, const char* op) {
  TORCH_CHECK(digit >= 0 && digit < kRadixDigits, op, ": digit must be in [0, ", kRadixDigits, "), got ", digit);
}

}  // namespace fsam
