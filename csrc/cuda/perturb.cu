// Gradient norm, masked perturbation with compact saving of the originals, and restore: the CUDA
// impls.  Saved values as in csrc/cpu/perturb.cpp: chunk c writes the originals of its masked
// entries (every entry without a mask), in their dtype and element order, from byte
// save_offsets[c] of `saved`; a masked entry's slot is a warp prefix sum over the mask words.
#include "multi_tensor.cuh"
#include "saved_runs.cuh"
#include "sumsq.cuh"

#include <fsam/checks.h>
#include <fsam/dispatch.h>
#include <fsam/functors.h>

namespace fsam::cuda {
namespace {

using OptTensors = c10::List<std::optional<at::Tensor>>;

// The chunk partials of sumsq_kernel added over the whole list, rounded to fp32 once.
__global__ void __launch_bounds__(kBlock, kMinBlocksPerSm) sum_partials_kernel(const double* partials,
                                                                                int64_t chunks, float* out) {
  __shared__ double scratch[kWarps];
  const double all = ordered_sum(partials, 2, 0, chunks, scratch);
  const double masked = ordered_sum(partials + 1, 2, 0, chunks, scratch);
  if (threadIdx.x == 0) {
    out[0] = static_cast<float>(all);
    out[1] = static_cast<float>(masked);
  }
}

// Calls f(element, slot) for each entry a chunk saves: with kMasked its masked entries (warp w
// takes the chunk's mask words kWarpWords * w on, lane l element l of each, the slot a prefix sum
// of the words' popcounts), else all of them (f then gets packs: see for_each_pack).  Returns false,
// touching nothing, when the chunk's run would not lie inside `saved` (saved_runs.cuh checks the
// whole layout first; this is each block's own bound).
template <typename T, bool kMasked, typename F>
__device__ inline bool for_each_saved(const Chunk& ch, const uint8_t* bits, int64_t offset, int64_t capacity,
                                      int* scratch, const F& f) {
  if constexpr (kMasked) {
    const int word = chunk_word();
    const uint32_t mine =
        lane_id() < kWarpWords && 32 * word < ch.n  // a short chunk's words past its end are not read
          ? mask_word(bits + ch.index * kChunkBytes, word) & valid_bits(word, ch.n)
          : 0u;
    const Scan scan = block_scan(__popc(mine), scratch);
    if (!saved_run_fits(offset, scan.total, sizeof(T), capacity)) return false;
#pragma unroll
    for (int j = 0; j < kWarpWords; ++j) {
      const uint32_t m = __shfl_sync(0xffffffffu, mine, j);
      const int before = __shfl_sync(0xffffffffu, scan.before, j);
      if ((m >> lane_id()) & 1u)
        f(32 * (warp_id() * kWarpWords + j) + lane_id(), before + __popc(m & ((1u << lane_id()) - 1u)));
    }
    return true;
  } else {
    return saved_run_fits(offset, ch.n, sizeof(T), capacity);
  }
}

template <typename T, bool kAdaptive, bool kMasked>
__global__ void __launch_bounds__(kBlock, kMinBlocksPerSm) perturb_kernel(TensorTable table, const uint8_t* bits,
                                                                           const int64_t* save_offsets, uint8_t* saved,
                                                                           int64_t capacity, const float* scale_ptr,
                                                                           float eta, const int* gate) {
  constexpr int N = kPack<T>;
  __shared__ int scratch[kWarps];
  if (!may_write(gate)) return;
  const float scale = *scale_ptr;
  const Perturbation<kAdaptive> perturb{{eta}, scale};
  auto moved = [&](T x, T d) { return static_cast<T>(perturb(static_cast<float>(x), static_cast<float>(d))); };
  for (int64_t c = blockIdx.x; c < table.chunks; c += gridDim.x) {
    const Chunk ch = locate(table, c);
    T* w = chunk_data<T>(table, 0, ch);
    // no gradient, or scale 0 (rho = 0, a non-finite norm): the weights stay, the originals are saved
    const T* g = scale != 0.0f ? chunk_data<const T>(table, 1, ch) : nullptr;
    const int64_t offset = save_offsets[ch.index];
    T* dst = reinterpret_cast<T*>(saved + offset);
    const bool fits = for_each_saved<T, kMasked>(ch, bits, offset, capacity, scratch, [&](int e, int slot) {
      const T x = w[e];
      dst[slot] = x;
      if (g != nullptr) w[e] = moved(x, g[e]);
    });
    if (kMasked || !fits) continue;
    const bool vectorised = aligned(w, 16) && aligned(dst, 16) && (g == nullptr || aligned(g, 16));
    for_each_pack<N>(ch.n, vectorised, [&](int i, auto width) {
      constexpr int W = decltype(width)::value;
      T x[W];
      load<W>(w + i, x);
      store<W>(dst + i, x);
      if (g == nullptr) return;
      T d[W];
      load<W>(g + i, d);
#pragma unroll
      for (int j = 0; j < W; ++j) x[j] = moved(x[j], d[j]);
      store<W>(w + i, x);
    });
  }
}

template <typename T, bool kMasked>
__global__ void __launch_bounds__(kBlock, kMinBlocksPerSm) restore_kernel(TensorTable table, const uint8_t* bits,
                                                                           const int64_t* save_offsets,
                                                                           const uint8_t* saved, int64_t capacity,
                                                                           const int* gate) {
  constexpr int N = kPack<T>;
  __shared__ int scratch[kWarps];
  if (!may_write(gate)) return;
  for (int64_t c = blockIdx.x; c < table.chunks; c += gridDim.x) {
    const Chunk ch = locate(table, c);
    T* w = chunk_data<T>(table, 0, ch);
    const int64_t offset = save_offsets[ch.index];
    const T* src = reinterpret_cast<const T*>(saved + offset);
    const bool fits = for_each_saved<T, kMasked>(ch, bits, offset, capacity, scratch,
                                                 [&](int e, int slot) { w[e] = src[slot]; });
    if (kMasked || !fits) continue;
    for_each_pack<N>(ch.n, aligned(w, 16) && aligned(src, 16), [&](int i, auto width) {
      constexpr int W = decltype(width)::value;
      T x[W];
      load<W>(src + i, x);
      store<W>(w + i, x);
    });
  }
}

// The checked inputs of one call: a parameter list, its gradients, a mask.
struct Inputs {
  ListChunks list;
  std::vector<at::ScalarType> dtypes;
  std::array<std::vector<const void*>, kRoles> data;
  c10::Device device;
  const uint8_t* bits = nullptr;

  // The device is the parameters' (`fallback` for an empty list).
  Inputs(const char* op, at::TensorList params, const OptTensors& grads, const std::optional<at::Tensor>& mask_bits,
         const c10::Device& fallback)
      : list(params),
        dtypes(dtypes_of(params)),
        data{data_ptrs(params), data_ptrs(grads)},
        device(params.empty() ? fallback : params[0].device()) {
    check_float_list(params, device, op, "params");
    check_grads(params, grads, device, op, "params", /*same_dtype=*/true);
    if (mask_bits.has_value()) {
      check_buffer(*mask_bits, at::kByte, list.total * kChunkBytes, device, op, "mask_bits");
      bits = mask_bits->const_data_ptr<uint8_t>();
    }
  }

  // Calls f(scalar_t tag, table, grid) per dtype group, on the current stream of the device.
  template <typename F>
  void launch(const F& f) const {
    const DeviceGuard guard(device);
    for_each_group(list, dtypes, data, device, [&](at::ScalarType dtype, const TensorTable& t, unsigned grid) {
      FSAM_DISPATCH_FLOATS(dtype, "fsam_perturb", [&] { f(scalar_t{}, t, grid); });
    });
  }
};

at::Tensor grad_sumsq_cuda(at::TensorList params, const OptTensors& grads, const std::optional<at::Tensor>& mask_bits,
                           bool adaptive, double eta) {
  const Inputs in("grad_sumsq", params, grads, mask_bits,
                  mask_bits.has_value() ? mask_bits->device() : default_device());
  check_scalar(eta, 0.0, "grad_sumsq", "eta");
  const auto options = at::TensorOptions().dtype(at::kFloat).device(in.device);
  if (in.list.total == 0) return device_zeros({2}, options, "sums");
  auto out = device_empty({2}, options, "sums");
  auto partials = device_empty({2 * in.list.total}, options.dtype(at::kDouble), "partials");  // every chunk writes its two
  const float e = static_cast<float>(eta);
  in.launch([&](auto value, const TensorTable& t, unsigned grid) {
    with_bool(adaptive, [&](auto a) {
      launch<sumsq_kernel<decltype(value), decltype(a)::value>>(grid, current_stream(), t, in.bits,
                                                                partials.data_ptr<double>(), e);
    });
  });
  const DeviceGuard guard(in.device);
  launch<sum_partials_kernel>(1, current_stream(), partials.const_data_ptr<double>(), in.list.total,
                              out.data_ptr<float>());
  return out;
}

void perturb_cuda(at::TensorList params, const OptTensors& grads, const std::optional<at::Tensor>& mask_bits,
                  const at::Tensor& save_offsets, const at::Tensor& saved, const at::Tensor& scale, bool adaptive,
                  double eta, const std::optional<at::Tensor>& status) {
  const char* op = "perturb_";
  const Inputs in(op, params, grads, mask_bits, save_offsets.device());
  check_perturb_saving(op, params, grads, mask_bits, save_offsets, saved, scale, status, in.device);
  check_scalar(eta, 0.0, op, "eta");
  const int* gate = check_saved_runs_on_device(op, params, mask_bits, save_offsets, saved, status, in.device);
  const float e = static_cast<float>(eta);
  in.launch([&](auto value, const TensorTable& t, unsigned grid) {
    with_bool(adaptive, [&](auto a) {
      with_bool(in.bits != nullptr, [&](auto m) {
        launch<perturb_kernel<decltype(value), decltype(a)::value, decltype(m)::value>>(
            grid, current_stream(), t, in.bits, save_offsets.const_data_ptr<int64_t>(), saved.data_ptr<uint8_t>(),
            saved.numel(), scale.const_data_ptr<float>(), e, gate);
      });
    });
  });
}

void restore_cuda(at::TensorList params, const std::optional<at::Tensor>& mask_bits, const at::Tensor& save_offsets,
                  const at::Tensor& saved, const std::optional<at::Tensor>& status) {
  const char* op = "restore_";
  const OptTensors none(std::vector<std::optional<at::Tensor>>(params.size()));
  const Inputs in(op, params, none, mask_bits, save_offsets.device());
  check_perturb_saving(op, params, none, mask_bits, save_offsets, saved, std::nullopt, status, in.device);
  const int* gate = check_saved_runs_on_device(op, params, mask_bits, save_offsets, saved, status, in.device);
  in.launch([&](auto value, const TensorTable& t, unsigned grid) {
    with_bool(in.bits != nullptr, [&](auto m) {
      launch<restore_kernel<decltype(value), decltype(m)::value>>(grid, current_stream(), t, in.bits,
                                                                  save_offsets.const_data_ptr<int64_t>(),
                                                                  saved.const_data_ptr<uint8_t>(), saved.numel(), gate);
    });
  });
}

}  // namespace

FSAM_CUDA_LIBRARY_IMPL(m) {
  FSAM_IMPL(m, "grad_sumsq", grad_sumsq_cuda);
  FSAM_IMPL(m, "perturb_", perturb_cuda);
  FSAM_IMPL(m, "restore_", restore_cuda);
}

}  // namespace fsam::cuda
