// Argument checks of every C++ backend, with the device as a parameter: each raises (before any
// write) with the op and the argument at fault, TypeError for a wrong dtype and ValueError for
// anything else, as fsam_kernels/_contract.py does for the Python backends (docs/errors.md: the
// contract).  They guard the ops when they are called directly through torch.ops.
#pragma once

#include "checked_layouts.h"
#include "layout.h"

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/util/StringUtil.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <cstdint>
#include <optional>
#include <vector>

namespace fsam {

// The set bits of nbytes (a multiple of 8) bytes of a packed mask.
inline int64_t popcount(const uint8_t* bits, int64_t nbytes) {
  int64_t n = 0;
  for (int64_t i = 0; i < nbytes; i += 8) {
    uint64_t word;
    std::memcpy(&word, bits + i, sizeof(word));
    n += __builtin_popcountll(word);
  }
  return n;
}

// `device` is exact: a CUDA call's tensors must all be on its one device (a CPU tensor's device is
// always `cpu`, so the CPU backend passes kCPU).
inline void check_on(const at::Tensor& t, const c10::Device& device, const char* op, const char* name, int64_t i) {
  TORCH_CHECK_VALUE(t.device() == device, op, ": ", name, "[", i, "] is on ", t.device(), ", the call runs on ", device);
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, "[", i, "] must be contiguous");
}

inline void check_float_dtype(const at::Tensor& t, const char* op, const char* name, int64_t i) {
  const auto d = t.scalar_type();
  TORCH_CHECK_TYPE(d == at::kFloat || d == at::kBFloat16 || d == at::kHalf, op, ": ", name, "[", i,
              "] must be float32, bfloat16 or float16, got ", d);
}

// A list of float tensors on the device, contiguous; all float32 with `fp32_only` (Fisher values).
inline void check_float_list(at::TensorList tensors, const c10::Device& device, const char* op, const char* name,
                             bool fp32_only = false) {
  for (int64_t i = 0; i < static_cast<int64_t>(tensors.size()); ++i) {
    check_on(tensors[i], device, op, name, i);
    check_float_dtype(tensors[i], op, name, i);
    TORCH_CHECK_TYPE(!fp32_only || tensors[i].scalar_type() == at::kFloat, op, ": ", name, "[", i, "] must be float32");
  }
}

// A gradient list beside a parameter (or Fisher) list: the same length, each gradient on the device,
// contiguous, of the same size and (same_dtype) of the same dtype.
inline void check_grads(at::TensorList params, const c10::List<std::optional<at::Tensor>>& grads,
                        const c10::Device& device, const char* op, const char* params_name, bool same_dtype) {
  TORCH_CHECK_VALUE(grads.size() == params.size(), op, ": grads has ", grads.size(), " tensors, ", params_name, " has ",
              params.size());
  for (int64_t i = 0; i < static_cast<int64_t>(params.size()); ++i) {
    const std::optional<at::Tensor> g = grads[i];
    if (!g.has_value()) continue;
    check_on(*g, device, op, "grads", i);
    check_float_dtype(*g, op, "grads", i);
    TORCH_CHECK_TYPE(!same_dtype || g->scalar_type() == params[i].scalar_type(), op, ": grads[", i, "] is ",
                g->scalar_type(), " but ", params_name, "[", i, "] is ", params[i].scalar_type());
    TORCH_CHECK_VALUE(g->numel() == params[i].numel(), op, ": grads[", i, "] has ", g->numel(), " elements, ",
                params_name, "[", i, "] has ", params[i].numel());
  }
}

// A one-dimensional buffer: dtype, device, contiguity and (numel >= 0) its exact size.
inline void check_buffer(const at::Tensor& t, at::ScalarType dtype, int64_t numel, const c10::Device& device,
                         const char* op, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": ", name, " must be a ", dtype, " tensor, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.is_contiguous() && t.device() == device, op, ": ", name,
                    " must be a contiguous 1-D tensor on ", device, ", got ", t.dim(), "-D on ", t.device());
  TORCH_CHECK_VALUE(numel < 0 || t.numel() == numel, op, ": ", name, " has ", t.numel(), " entries, expected ", numel);
}

inline void check_digit(int64_t digit, const char* op) {
  TORCH_CHECK_VALUE(digit >= 0 && digit < kRadixDigits, op, ": digit must be in [0, ", kRadixDigits, "), got ", digit);
}

// A scalar argument >= `low`, not NaN, and finite unless `infinite_ok`.
inline void check_scalar(double value, double low, const char* op, const char* name, bool infinite_ok = false) {
  TORCH_CHECK_VALUE(value >= low && (infinite_ok || std::isfinite(value)), op, ": ", name, " must be ",
                    infinite_ok ? "" : "finite and ", ">= ", low, ", got ", value);
}

// A one-element tensor of a real dtype on the device whose non-zero value means "skip" (found_inf).
inline void check_flag(const at::Tensor& t, const c10::Device& device, const char* op, const char* name) {
  TORCH_CHECK_TYPE(!t.is_complex(), op, ": ", name, " must be real, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.numel() == 1 && t.device() == device, op, ": ", name, " must be a one-element tensor on ",
                    device, ", got ", t.numel(), " elements on ", t.device());
}

// The byte ranges an op writes and reads (each tensor checked contiguous first): no written range
// may overlap any other, so that no output aliases an input and no memory is written twice.
// O(n log n) in the number of tensors, no element is read.
class Ranges {
 public:
  void add(const at::Tensor& t, const char* name, int64_t i, bool written) {
    if (t.numel() == 0) return;
    const auto begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
    ranges_.push_back({begin, begin + static_cast<uintptr_t>(t.numel() * t.element_size()), name, i, written});
  }
  void add(const std::optional<at::Tensor>& t, const char* name, bool written) {
    if (t.has_value()) add(*t, name, -1, written);
  }
  void add(at::TensorList ts, const char* name, bool written) {
    for (int64_t i = 0; i < static_cast<int64_t>(ts.size()); ++i) add(ts[i], name, i, written);
  }
  void add(const c10::List<std::optional<at::Tensor>>& ts, const char* name, bool written) {
    for (int64_t i = 0; i < static_cast<int64_t>(ts.size()); ++i) {
      const std::optional<at::Tensor> t = ts[i];
      if (t.has_value()) add(*t, name, i, written);
    }
  }

  // A written range that starts before the furthest end seen (of a written range: whatever this
  // one is; of any range: when this one is written) overlaps it.
  void check(const char* op) {
    std::sort(ranges_.begin(), ranges_.end(), [](const Range& a, const Range& b) { return a.begin < b.begin; });
    const Range* any = nullptr;
    const Range* written = nullptr;
    for (const Range& r : ranges_) {
      const Range* hit = written != nullptr && r.begin < written->end ? written
                         : r.written && any != nullptr && r.begin < any->end ? any
                                                                              : nullptr;
      TORCH_CHECK_VALUE(hit == nullptr, op, ": ", label(*hit), " and ", label(r),
                        " share memory; an op's outputs may not overlap each other or its inputs");
      if (any == nullptr || r.end > any->end) any = &r;
      if (r.written && (written == nullptr || r.end > written->end)) written = &r;
    }
  }

 private:
  struct Range {
    uintptr_t begin, end;
    const char* name;
    int64_t index;  // in its list; -1 for a single tensor
    bool written;
  };
  static std::string label(const Range& r) {
    return r.index < 0 ? std::string(r.name) : std::string(r.name) + "[" + std::to_string(r.index) + "]";
  }
  std::vector<Range> ranges_;
};

// clip_scale_'s scalars, and its tensors written apart from each other and from the norms.
inline void check_clip(at::TensorList tensors, const at::Tensor& norms, double max_norm, double eps, const char* op) {
  check_scalar(max_norm, 0.0, op, "max_norm", /*infinite_ok=*/true);
  check_scalar(eps, 0.0, op, "eps");
  Ranges ranges;
  ranges.add(tensors, "tensors", true);
  ranges.add(norms, "norms", -1, false);
  ranges.check(op);
}

// fisher_accumulate_'s scalars and flag, and its writes (fisher, first_hist) apart from everything.
inline void check_fisher(at::TensorList fisher, const c10::List<std::optional<at::Tensor>>& grads, double decay,
                         double alpha, const std::optional<at::Tensor>& found_inf,
                         const std::optional<at::Tensor>& first_hist, const c10::Device& device, const char* op) {
  check_scalar(decay, 0.0, op, "decay");
  check_scalar(alpha, 0.0, op, "alpha");
  if (found_inf.has_value()) check_flag(*found_inf, device, op, "found_inf");
  if (first_hist.has_value()) check_buffer(*first_hist, at::kLong, kFirstHistSize, device, op, "first_hist");
  Ranges ranges;
  ranges.add(fisher, "fisher", true);
  ranges.add(first_hist, "first_hist", true);
  ranges.add(grads, "grads", false);
  ranges.add(found_inf, "found_inf", false);
  ranges.check(op);
}

// The radix stages' writes (state, hist, candidates: whichever the op writes) apart from each other
// and from what they read (the scores; radix_select_'s hist).
inline void check_radix_writes(at::TensorList scores, const at::Tensor& state, const at::Tensor& hist,
                               bool hist_written, const std::optional<at::Tensor>& candidates, const char* op) {
  Ranges ranges;
  ranges.add(scores, "scores", false);
  ranges.add(state, "state", -1, true);
  ranges.add(hist, "hist", -1, hist_written);
  ranges.add(candidates, "candidates", true);
  ranges.check(op);
}

// The saved runs of a perturbation, read on the host: chunk c of `tensors` saves `entries(c)`
// values of its tensor's dtype from byte save_offsets[c] (a CPU tensor) of `saved`; each run starts
// aligned, at or after the previous run's end (chunk order, no overlap), and ends inside `saved`,
// every end computed without overflow.  `bits`: the packed mask on the host (nullptr: every entry
// is saved; a chunk counts all its bits, as the device check does).  O(chunks).  Returns what is
// wrong, or "" when nothing is.
inline std::string saved_runs_error(at::TensorList tensors, const uint8_t* bits, const at::Tensor& save_offsets,
                                    int64_t capacity) {
  const int64_t* offsets = save_offsets.const_data_ptr<int64_t>();
  int64_t chunk = 0;
  int64_t end = 0;
  for (int64_t t = 0; t < static_cast<int64_t>(tensors.size()); ++t) {
    const int64_t numel = tensors[t].numel();
    const int64_t itemsize = tensors[t].element_size();
    for (int64_t begin = 0; begin < numel; begin += kChunk, ++chunk) {
      const int64_t n = std::min(kChunk, numel - begin);
      const int64_t entries = bits == nullptr ? n : popcount(bits + chunk * kChunkBytes, kChunkBytes);
      const int64_t offset = offsets[chunk];
      if (offset < end || offset % itemsize != 0) {
        return c10::str("save_offsets[", chunk, "] = ", offset, " must be a multiple of ", itemsize,
                        " at or after the end of the previous run (", end, "): runs lie in chunk order without overlap");
      }
      if (offset > capacity || entries * itemsize > capacity - offset) {
        return c10::str("saved has ", capacity, " bytes but the run of chunk ", chunk, " (", entries,
                        " values from byte ", offset, ") ends past it: size it with save_layout(params, chunk_counts)");
      }
      end = offset + entries * itemsize;
    }
  }
  return "";
}

// saved_runs_error for tensors anywhere (device ones copied to the host: only for a message).
inline void check_saved_runs(const char* op, at::TensorList tensors, const std::optional<at::Tensor>& mask_bits,
                             const at::Tensor& save_offsets, const at::Tensor& saved) {
  const std::optional<at::Tensor> bits = mask_bits.has_value() ? std::optional(mask_bits->cpu()) : std::nullopt;
  const std::string error = saved_runs_error(tensors, bits.has_value() ? bits->const_data_ptr<uint8_t>() : nullptr,
                                             save_offsets.cpu(), saved.numel());
  TORCH_CHECK_VALUE(error.empty(), op, ": ", error);
}

// Whether a call on CPU tensors writes, its saved runs read on the host (unless checked_layouts()
// holds them): without `status` a bad layout is refused; with it (int32 [1]) the call writes nothing
// when status is non-zero already or the layout is bad, which then sets it to 1 (what the CUDA
// kernels do without a host sync).
inline bool host_runs_pass(const char* op, at::TensorList tensors, const std::optional<at::Tensor>& mask_bits,
                           const at::Tensor& save_offsets, const at::Tensor& saved,
                           const std::optional<at::Tensor>& status) {
  CheckedLayouts& known = checked_layouts();
  const bool checked = known.contains(tensors, mask_bits, save_offsets, saved, status);
  if (!status.has_value()) {
    if (!checked) check_saved_runs(op, tensors, mask_bits, save_offsets, saved);
  } else {
    int32_t* flag = status->data_ptr<int32_t>();
    const uint8_t* bits = mask_bits.has_value() ? mask_bits->const_data_ptr<uint8_t>() : nullptr;
    if (*flag == 0 && !checked && !saved_runs_error(tensors, bits, save_offsets, saved.numel()).empty()) *flag = 1;
    if (*flag != 0) return false;
  }
  if (!checked) known.add(tensors, mask_bits, save_offsets, saved, status);
  return true;
}

// The buffers of a perturbation or a restore of `params` (checked already) and of every op that
// shares its layout (perturb_, restore_, pac_perturb_, pac_restore_): mask_bits (optional),
// save_offsets, saved (starting kSaveAlign-aligned) and status (optional, int32 [1]); params,
// saved and status written apart from everything, `reads` holding the op's other inputs.  The
// runs themselves depend on the offsets' and the mask's values: host_runs_pass checks them for
// CPU tensors, the CUDA impls on the device (csrc/cuda/saved_runs.cuh).
inline void check_saving(const char* op, at::TensorList params, const std::optional<at::Tensor>& mask_bits,
                         const at::Tensor& save_offsets, const at::Tensor& saved,
                         const std::optional<at::Tensor>& status, const c10::Device& device, Ranges reads) {
  int64_t chunks = 0;
  for (const at::Tensor& p : params) chunks += num_chunks(p.numel());
  if (mask_bits.has_value()) check_buffer(*mask_bits, at::kByte, chunks * kChunkBytes, device, op, "mask_bits");
  check_buffer(save_offsets, at::kLong, chunks, device, op, "save_offsets");
  check_buffer(saved, at::kByte, -1, device, op, "saved");
  if (status.has_value()) check_buffer(*status, at::kInt, 1, device, op, "status");
  TORCH_CHECK_VALUE(saved.numel() == 0 || reinterpret_cast<uintptr_t>(saved.const_data_ptr()) % kSaveAlign == 0, op,
                    ": saved must start on a ", kSaveAlign, "-byte boundary");
  reads.add(params, "params", true);
  reads.add(saved, "saved", -1, true);
  reads.add(status, "status", true);
  reads.add(mask_bits, "mask_bits", false);
  reads.add(save_offsets, "save_offsets", -1, false);
  reads.check(op);
}

// perturb_'s and restore_'s buffers (check_saving), the gradients and perturb_'s scale read beside them.
inline void check_perturb_saving(const char* op, at::TensorList params, const c10::List<std::optional<at::Tensor>>& grads,
                                 const std::optional<at::Tensor>& mask_bits, const at::Tensor& save_offsets,
                                 const at::Tensor& saved, const std::optional<at::Tensor>& scale,
                                 const std::optional<at::Tensor>& status, const c10::Device& device) {
  Ranges reads;
  reads.add(grads, "grads", false);
  if (scale.has_value()) {
    check_buffer(scale->reshape({-1}), at::kFloat, 1, device, op, "scale");
    reads.add(*scale, "scale", -1, false);
  }
  check_saving(op, params, mask_bits, save_offsets, saved, status, device, reads);
}

}  // namespace fsam
