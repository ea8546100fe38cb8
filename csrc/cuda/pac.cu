// PAC-tuning's noise ops: the CUDA impls of csrc/cpu/pac.cpp, the per-element math of
// fsam/pac_noise.h.  Roles of the table: 0 params, 1 log-stds, and for the stage-1 pass 2 grads,
// 3 log-std gradients, 4 anchors.  Per list position, `aux` holds the counter bases then the
// log-std strides (0: one value per tensor).  Lane l of a warp's word j is element 32 j + l of the
// chunk, so accesses are coalesced and a word's mask bits come from one ballot.
#include "multi_tensor.cuh"
#include "saved_runs.cuh"
#include "sumsq.cuh"

#include <fsam/dispatch.h>
#include <fsam/functors.h>
#include <fsam/pac_checks.h>
#include <fsam/pac_noise.h>

namespace fsam::cuda {
namespace {

enum PacRole { kRoleParams, kRoleLogStds, kRoleGrads, kRoleLogStdGrads, kRoleAnchors };

struct NoiseArgs {
  PacNoise noise;
  const int64_t* aux;  // [2 * tensors]: counter bases, then log-std strides
  int64_t tensors;

  // The noise of element e of chunk ch (its log-std read from role kRoleLogStds).
  __device__ float operator()(const TensorTable& t, const Chunk& ch, int e) const {
    const int64_t pos = t.position[ch.member];
    const float* s = reinterpret_cast<const float*>(t.addr[kRoleLogStds][ch.member]);
    return noise(aux[pos] + ch.begin + e, s[(ch.begin + e) * aux[tensors + pos]]);
  }
};

// Calls f(e, marked, slot) for every element e < n of a chunk: warp w takes its mask words, lane l
// element l of each; marked entries get consecutive slots in element order.  Returns false,
// touching nothing, when the chunk's run of marked entries would not lie inside `saved`.
template <typename T, typename F>
__device__ inline bool for_each_element(const Chunk& ch, const uint8_t* bits, int64_t offset, int64_t capacity,
                                        int* scratch, const F& f) {
  const int word = chunk_word();
  const uint32_t mine =
      lane_id() < kWarpWords && 32 * word < ch.n  // a short chunk's words past its end are not read
          ? mask_word(bits + ch.index * kChunkBytes, word) & valid_bits(word, ch.n)
          : 0u;
  const Scan scan = block_scan(__popc(mine), scratch);
  if (!saved_run_fits(offset, scan.total, sizeof(T), capacity)) return false;
#pragma unroll 4
  for (int j = 0; j < kWarpWords; ++j) {
    const uint32_t m = __shfl_sync(0xffffffffu, mine, j);
    const int before = __shfl_sync(0xffffffffu, scan.before, j);
    const int e = 32 * (warp_id() * kWarpWords + j) + lane_id();
    if (e < ch.n) f(e, (m >> lane_id()) & 1u, before + __popc(m & ((1u << lane_id()) - 1u)));
  }
  return true;
}

template <typename T>
__global__ void __launch_bounds__(kBlock, kMinBlocksPerSm) pac_mask_kernel(TensorTable table, NoiseArgs args,
                                                                            uint8_t* bits, int32_t* counts) {
  __shared__ int scratch[kWarps];
  for (int64_t c = blockIdx.x; c < table.chunks; c += gridDim.x) {
    const Chunk ch = locate(table, c);
    const T* w = chunk_data<const T>(table, kRoleParams, ch);
    int marked = 0;
#pragma unroll 4
    for (int j = 0; j < kWarpWords; ++j) {
      const int word = warp_id() * kWarpWords + j, e = 32 * word + lane_id();
      const bool inexact = e < ch.n && pac_inexact(w[e], args(table, ch, e));
      const uint32_t m = __ballot_sync(0xffffffffu, inexact);
      if (lane_id() < 4) bits[ch.index * kChunkBytes + 4 * word + lane_id()] = static_cast<uint8_t>(m >> (8 * lane_id()));
      marked += inexact;
    }
    const int total = block_sum(marked, scratch);
    if (threadIdx.x == 0) counts[ch.index] = total;
  }
}

template <typename T>
__global__ void __launch_bounds__(kBlock, kMinBlocksPerSm) pac_perturb_kernel(TensorTable table, NoiseArgs args,
                                                                               const uint8_t* bits,
                                                                               const int64_t* save_offsets,
                                                                               uint8_t* saved, int64_t capacity,
                                                                               const int* gate) {
  __shared__ int scratch[kWarps];
  if (!may_write(gate)) return;
  for (int64_t c = blockIdx.x; c < table.chunks; c += gridDim.x) {
    const Chunk ch = locate(table, c);
    T* w = chunk_data<T>(table, kRoleParams, ch);
    const int64_t offset = save_offsets[ch.index];
    T* dst = reinterpret_cast<T*>(saved + offset);
    for_each_element<T>(ch, bits, offset, capacity, scratch, [&](int e, bool marked, int slot) {
      const T x = w[e];
      if (marked) dst[slot] = x;
      w[e] = pac_add(x, args(table, ch, e));
    });
  }
}

template <typename T>
__global__ void __launch_bounds__(kBlock, kMinBlocksPerSm) pac_restore_kernel(TensorTable table, NoiseArgs args,
                                                                               const uint8_t* bits,
                                                                               const int64_t* save_offsets,
                                                                               const uint8_t* saved, int64_t capacity,
                                                                               const int* gate) {
  __shared__ int scratch[kWarps];
  if (!may_write(gate)) return;
  for (int64_t c = blockIdx.x; c < table.chunks; c += gridDim.x) {
    const Chunk ch = locate(table, c);
    T* w = chunk_data<T>(table, kRoleParams, ch);
    const int64_t offset = save_offsets[ch.index];
    const T* src = reinterpret_cast<const T*>(saved + offset);
    for_each_element<T>(ch, bits, offset, capacity, scratch, [&](int e, bool marked, int slot) {
      w[e] = marked ? src[slot] : pac_sub(w[e], args(table, ch, e));
    });
  }
}

// Per chunk the fp64 sums of e^(2p), (w - w0)^2, g^2 and p (rows of kBoundSums); with kWithGrads also
// the log-std gradients and the regulariser added to the gradient.
template <typename T, bool kWithGrads>
__global__ void __launch_bounds__(kBlock, kMinBlocksPerSm) pac_bound_kernel(TensorTable table, NoiseArgs args,
                                                                             const float* prior, PacBoundTerms terms,
                                                                             double* partials) {
  __shared__ double scratch[kWarps];
  for (int64_t c = blockIdx.x; c < table.chunks; c += gridDim.x) {
    const Chunk ch = locate(table, c);
    const T* w = chunk_data<const T>(table, kRoleParams, ch);
    const T* w0 = chunk_data<const T>(table, kRoleAnchors, ch);
    const float* s = chunk_data<const float>(table, kRoleLogStds, ch);
    const int64_t pos = table.position[ch.member];
    const float b = prior[pos];
    const float decay = expf(b * -2.0f);
    T* g = kWithGrads ? chunk_data<T>(table, kRoleGrads, ch) : nullptr;
    float* sg = kWithGrads ? chunk_data<float>(table, kRoleLogStdGrads, ch) : nullptr;
    double sum[kBoundSums] = {0, 0, 0, 0};
    for (int e = threadIdx.x; e < ch.n; e += kBlock) {
      const float diff = static_cast<float>(w[e]) - static_cast<float>(w0[e]);
      sum[kSumExp2P] += static_cast<double>(expf(s[e] * 2.0f));
      sum[kSumDiffSq] += static_cast<double>(diff) * diff;
      sum[kSumLogStd] += static_cast<double>(s[e]);
      if constexpr (kWithGrads) {
        const float gf = static_cast<float>(g[e]);
        sum[kSumGradSq] += static_cast<double>(gf) * gf;
        sg[e] = terms.log_std_grad(gf, args.noise.eps(args.aux[pos] + ch.begin + e), expf(s[e]),
                                   expf(PacBoundTerms::excess_exponent(s[e], b)));
        g[e] = static_cast<T>(terms.regularised(gf, diff, decay));
      }
    }
#pragma unroll
    for (int r = 0; r < kBoundSums; ++r) {
      const double total = block_sum(sum[r], scratch);
      if (threadIdx.x == 0) partials[kBoundSums * ch.index + r] = total;
    }
  }
}

// sums[r * tensors + t] = row r of tensor t's chunk partials (chunks first[t] to first[t + 1]).
__global__ void __launch_bounds__(kBlock, kMinBlocksPerSm) pac_sums_kernel(const double* partials,
                                                                            const int64_t* first, int64_t tensors,
                                                                            double* sums) {
  __shared__ double scratch[kWarps];
  for (int64_t t = blockIdx.x; t < tensors; t += gridDim.x) {
#pragma unroll
    for (int r = 0; r < kBoundSums; ++r) {
      const double s = ordered_sum(partials + r, kBoundSums, first[t], first[t + 1], scratch);
      if (threadIdx.x == 0) sums[r * tensors + t] = s;
    }
  }
}

// A call's list, its noise and the device arrays of its per-tensor values (one pinned copy).
struct PacCall {
  ListChunks list;
  c10::Device device;
  NoiseArgs args;
  at::Tensor aux;  // [bases | log-std strides | first chunks (tensors + 1)]

  PacCall(at::TensorList params, at::TensorList log_stds, at::IntArrayRef bases, int64_t seed, int64_t step,
          double max_noise, const c10::Device& device)
      : list(params), device(device) {
    const int64_t n = static_cast<int64_t>(params.size());
    auto host = host_longs(3 * n + 1);
    int64_t* h = host.data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i) {
      h[i] = bases[i];
      h[n + i] = log_stds[i].numel() == 1 ? 0 : 1;
      h[2 * n + i] = list.first[i];
    }
    h[3 * n] = list.total;
    aux = to_device(host, device);
    args = {PacNoise{static_cast<uint64_t>(seed), static_cast<uint64_t>(step), static_cast<float>(max_noise)},
            aux.const_data_ptr<int64_t>(), n};
  }

  // Calls f(scalar_t tag, table, grid, stream) per dtype group.
  template <typename F>
  void launch(at::TensorList params, std::array<std::vector<const void*>, kRoles> data, const F& f) const {
    const DeviceGuard guard(device);
    const Stream stream = current_stream();
    for_each_group(list, dtypes_of(params), data, device, [&](at::ScalarType dtype, const TensorTable& t,
                                                               unsigned grid) {
      FSAM_DISPATCH_FLOATS(dtype, "fsam_pac", [&] { f(scalar_t{}, t, grid, stream); });
    });
  }
};

c10::Device device_of(at::TensorList params, const at::Tensor& fallback) {
  return params.empty() ? fallback.device() : params[0].device();
}

std::tuple<at::Tensor, at::Tensor> pac_noise_mask_cuda(at::TensorList params, at::TensorList log_stds,
                                                       at::IntArrayRef bases, int64_t seed, int64_t step,
                                                       double max_noise) {
  const char* op = "pac_noise_mask";
  const c10::Device device = params.empty() ? default_device() : params[0].device();
  check_pac_noise(params, log_stds, bases, seed, step, max_noise, device, op);
  const PacCall call(params, log_stds, bases, seed, step, max_noise, device);
  const auto options = at::TensorOptions().device(device);
  auto bits = device_empty({call.list.total * kChunkBytes}, options.dtype(at::kByte), "mask_bits");  // every chunk writes its own
  auto counts = device_empty({call.list.total}, options.dtype(at::kInt), "chunk_counts");
  call.launch(params, {data_ptrs(params), data_ptrs(log_stds)}, [&](auto value, const TensorTable& t, unsigned grid,
                                                                      Stream stream) {
    launch<pac_mask_kernel<decltype(value)>>(grid, stream, t, call.args, bits.data_ptr<uint8_t>(),
                                             counts.data_ptr<int32_t>());
  });
  return {bits, counts};
}

template <bool kPerturb>
void pac_shift_cuda(at::TensorList params, at::TensorList log_stds, at::IntArrayRef bases, int64_t seed, int64_t step,
                    double max_noise, const at::Tensor& mask_bits, const at::Tensor& save_offsets,
                    const at::Tensor& saved, const std::optional<at::Tensor>& status) {
  const char* op = kPerturb ? "pac_perturb_" : "pac_restore_";
  const c10::Device device = device_of(params, save_offsets);
  check_pac_noise(params, log_stds, bases, seed, step, max_noise, device, op);
  const PacCall call(params, log_stds, bases, seed, step, max_noise, device);
  check_pac_saving(params, log_stds, mask_bits, save_offsets, saved, status, device, op);
  const int* gate = check_saved_runs_on_device(op, params, mask_bits, save_offsets, saved, status, device);
  call.launch(params, {data_ptrs(params), data_ptrs(log_stds)}, [&](auto value, const TensorTable& t, unsigned grid,
                                                                      Stream stream) {
    using T = decltype(value);
    if constexpr (kPerturb) {
      launch<pac_perturb_kernel<T>>(grid, stream, t, call.args, mask_bits.const_data_ptr<uint8_t>(),
                                    save_offsets.const_data_ptr<int64_t>(), saved.data_ptr<uint8_t>(),
                                    saved.numel(), gate);
    } else {
      launch<pac_restore_kernel<T>>(grid, stream, t, call.args, mask_bits.const_data_ptr<uint8_t>(),
                                    save_offsets.const_data_ptr<int64_t>(), saved.const_data_ptr<uint8_t>(),
                                    saved.numel(), gate);
    }
  });
}

at::Tensor pac_bound_grads_cuda(at::TensorList params, at::TensorList grads, at::TensorList log_stds,
                                at::TensorList log_std_grads, at::TensorList anchors,
                                const at::Tensor& prior_log_stds, at::IntArrayRef bases, int64_t seed, int64_t step,
                                double max_noise, double coef) {
  const char* op = "pac_bound_grads_";
  const c10::Device device = device_of(params, prior_log_stds);
  check_pac_noise(params, log_stds, bases, seed, step, max_noise, device, op, /*per_element=*/true);
  check_pac_bound(params, log_stds, grads, log_std_grads, anchors, prior_log_stds, device, op);
  const PacCall call(params, log_stds, bases, seed, step, max_noise, device);
  const int64_t n = static_cast<int64_t>(params.size());
  const auto options = at::TensorOptions().dtype(at::kDouble).device(device);
  if (call.list.total == 0) return device_zeros({kBoundSums, n}, options, "sums");
  auto partials = device_empty({kBoundSums * call.list.total}, options, "partials");  // every chunk writes its rows
  const bool with_grads = !grads.empty();
  const std::vector<const void*> none;
  call.launch(params, {data_ptrs(params), data_ptrs(log_stds), with_grads ? data_ptrs(grads) : none,
                       with_grads ? data_ptrs(log_std_grads) : none, data_ptrs(anchors)},
              [&](auto value, const TensorTable& t, unsigned grid, Stream stream) {
                with_bool(with_grads, [&](auto g) {
                  launch<pac_bound_kernel<decltype(value), decltype(g)::value>>(
                      grid, stream, t, call.args, prior_log_stds.const_data_ptr<float>(),
                      PacBoundTerms{static_cast<float>(coef)}, partials.data_ptr<double>());
                });
              });
  auto sums = device_empty({kBoundSums, n}, options, "sums");
  const DeviceGuard guard(device);
  launch<pac_sums_kernel>(resident_grid(n, n, sm_count(device)), current_stream(), partials.const_data_ptr<double>(),
                          call.args.aux + 2 * n, n, sums.data_ptr<double>());
  return sums;
}

}  // namespace

FSAM_CUDA_LIBRARY_IMPL(m) {
  FSAM_IMPL(m, "pac_noise_mask", pac_noise_mask_cuda);
  FSAM_IMPL(m, "pac_perturb_", pac_shift_cuda<true>);
  FSAM_IMPL(m, "pac_restore_", pac_shift_cuda<false>);
  FSAM_IMPL(m, "pac_bound_grads_", pac_bound_grads_cuda);
}

}  // namespace fsam::cuda
