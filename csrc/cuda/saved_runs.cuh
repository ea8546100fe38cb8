// A perturbation's saved runs checked on the device, before its kernels run (perturb_, restore_,
// pac_perturb_, pac_restore_).  The runs depend on the values of the offsets and of the mask,
// which live on the device: reading them on the host would cost the optimizers a sync every step.
// So a check kernel computes each chunk's run end (or -1 where the run does not fit `saved`), a
// second one the order of the runs, and a bad layout sets a device flag that every write of the
// op's kernels is gated on: all or nothing.  The same rule as fsam/checks.h's saved_runs_error.
#pragma once

#include "multi_tensor.cuh"

#include <fsam/checks.h>
#include <fsam/dispatch.h>
#include <fsam/functors.h>

#include <ATen/ops/zeros.h>

#include <optional>

namespace fsam::cuda {

// ends[c] = the end of chunk c's run (save_offsets[c] + its values' bytes), or -1 where the run
// would not lie inside `saved` (`capacity` bytes).  A masked chunk counts all its bits, as the host.
template <typename T, bool kMasked>
__global__ void __launch_bounds__(kBlock, kMinBlocksPerSm) run_ends_kernel(TensorTable table, const uint8_t* bits,
                                                                            const int64_t* save_offsets,
                                                                            int64_t capacity, int64_t* ends) {
  __shared__ int scratch[kWarps];
  for (int64_t c = blockIdx.x; c < table.chunks; c += gridDim.x) {
    const Chunk ch = locate(table, c);
    int entries = ch.n;
    if constexpr (kMasked) {
      const uint32_t mine = lane_id() < kWarpWords ? mask_word(bits + ch.index * kChunkBytes, chunk_word()) : 0u;
      entries = block_sum(__popc(mine), scratch);
    }
    const int64_t offset = save_offsets[ch.index];
    if (threadIdx.x == 0) {
      ends[ch.index] =
          saved_run_fits(offset, entries, sizeof(T), capacity) ? offset + entries * int64_t{sizeof(T)} : -1;
    }
  }
}

// *status |= some run does not fit, or starts before the previous one's end.  (A template, as the
// kernels of a header included by several sources: one definition across them.)
template <typename = void>
__global__ void __launch_bounds__(kBlock, kMinBlocksPerSm) run_order_kernel(const int64_t* save_offsets,
                                                                             const int64_t* ends, int64_t chunks,
                                                                             int* status) {
  for (int64_t c = blockIdx.x * int64_t{kBlock} + threadIdx.x; c < chunks; c += int64_t{gridDim.x} * kBlock) {
    if (ends[c] < 0 || (c > 0 && save_offsets[c] < ends[c - 1])) atomicOr(status, 1);
  }
}

// Checks the saved runs of `params` (checked by check_saving) on the device, unless they are
// checked_layouts()'s, and returns the gate the op's kernels read (they write nothing where it is
// non-zero).  With `status`, without a host sync: the gate is status, which a bad layout sets to 1
// and which, non-zero already, stops the op alike.  Without, synchronously: a bad layout is refused
// (with the host check's message).
inline const int* check_saved_runs_on_device(const char* op, at::TensorList params,
                                             const std::optional<at::Tensor>& mask_bits,
                                             const at::Tensor& save_offsets, const at::Tensor& saved,
                                             const std::optional<at::Tensor>& status, const c10::Device& device) {
  CheckedLayouts& known = checked_layouts();
  if (known.contains(params, mask_bits, save_offsets, saved, status))
    return status.has_value() ? status->const_data_ptr<int>() : nullptr;
  const at::Tensor gate =
      status.has_value() ? *status : device_zeros({1}, at::TensorOptions().dtype(at::kInt).device(device), "gate");
  const ListChunks list(params);
  if (list.total > 0) {
    const DeviceGuard guard(device);
    const uint8_t* bits = mask_bits.has_value() ? mask_bits->const_data_ptr<uint8_t>() : nullptr;
    const int64_t* offsets = save_offsets.const_data_ptr<int64_t>();
    const at::Tensor ends = device_empty({list.total}, save_offsets.options(), "run_ends");
    for_each_group(list, dtypes_of(params), {data_ptrs(params)}, device,
                   [&](at::ScalarType dtype, const TensorTable& t, unsigned grid) {
                     FSAM_DISPATCH_FLOATS(dtype, "check_saved_runs", [&] {
                       with_bool(bits != nullptr, [&](auto m) {
                         launch<run_ends_kernel<scalar_t, decltype(m)::value>>(grid, current_stream(), t, bits, offsets,
                                                                               saved.numel(), ends.data_ptr<int64_t>());
                       });
                     });
                   });
    const int64_t blocks = (list.total + kBlock - 1) / kBlock;
    launch<run_order_kernel<>>(resident_grid(blocks, blocks, sm_count(device)), current_stream(), offsets,
                             ends.const_data_ptr<int64_t>(), list.total, gate.data_ptr<int>());
  }
  if (!status.has_value() && device_read<int>(gate) != 0) {  // the one sync of a call without status
    check_saved_runs(op, params, mask_bits, save_offsets, saved);
    TORCH_CHECK(false, op, ": the device refused the saved runs and the host accepted them");
  }
  known.add(params, mask_bits, save_offsets, saved, status);  // with status: a bad layout has set it
  return status.has_value() ? gate.const_data_ptr<int>() : nullptr;
}

// Whether a block of a gated kernel may write: the gate is null (checked synchronously) or zero.
__device__ inline bool may_write(const int* gate) { return gate == nullptr || *gate == 0; }

}  // namespace fsam::cuda
