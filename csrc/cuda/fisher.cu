// Fisher accumulation F <- decay * F + alpha * g * g over a list of tensors, optionally counting
// the first radix digit of the new F on the way (a block-private histogram in shared memory,
// flushed once per block, its non-zero bins only): the CUDA impl.
#include "multi_tensor.cuh"

#include <fsam/checks.h>
#include <fsam/dispatch.h>
#include <fsam/functors.h>

namespace fsam::cuda {
namespace {

// Gradients of type G (or none: F decays alone); F is fp32, accessed in 16-byte packs.
template <typename G, bool kHist>
__global__ void __launch_bounds__(kBlock, kMinBlocksPerSm) fisher_kernel(TensorTable table, FisherUpdate update,
                                                         const float* found_inf,
                                                         unsigned long long* first_hist) {
  constexpr int N = kPack<float>;
  __shared__ uint32_t hist[kHist ? kFirstHistSize : 1];
  if (found_inf != nullptr && *found_inf != 0.0f) return;  // an overflowed step: nothing read or written
  if constexpr (kHist) {
    for (int i = threadIdx.x; i < kFirstHistSize; i += kBlock) hist[i] = 0;
    __syncthreads();
  }
  const OrderKey<false> key;
  uint32_t nan = 0;
  for (int64_t c = blockIdx.x; c < table.chunks; c += gridDim.x) {
    const Chunk ch = locate(table, c);
    float* f = chunk_data<float>(table, 0, ch);
    const G* g = chunk_data<const G>(table, 1, ch);
    const bool vectorised = aligned(f, N * sizeof(float)) && (g == nullptr || aligned(g, N * sizeof(G)));
    for_each_pack<N>(ch.n, vectorised, [&](int i, auto width) {
      constexpr int W = decltype(width)::value;
      float fv[W];
      load<W>(f + i, fv);
      if (g != nullptr) {
        G gv[W];
        load<W>(g + i, gv);
#pragma unroll
        for (int j = 0; j < W; ++j) fv[j] = update(fv[j], static_cast<float>(gv[j]));
      } else {
#pragma unroll
        for (int j = 0; j < W; ++j) fv[j] = update(fv[j]);
      }
      store<W>(f + i, fv);
      if constexpr (kHist) {  // the top-k's first radix pass, while F is in registers
#pragma unroll
        for (int j = 0; j < W; ++j) {
          nan += fv[j] != fv[j];
          atomicAdd(&hist[key(fv[j]) >> kFirstShift], 1u);
        }
      }
    });
  }
  if constexpr (kHist) {
    if (nan != 0) atomicAdd(&hist[kFirstBins], nan);
    __syncthreads();
    for (int i = threadIdx.x; i < kFirstHistSize; i += kBlock)
      if (hist[i] != 0) atomicAdd(&first_hist[i], static_cast<unsigned long long>(hist[i]));
  }
}

void fisher_accumulate_cuda(at::TensorList fisher, const c10::List<std::optional<at::Tensor>>& grads,
                            double decay, double alpha, const std::optional<at::Tensor>& found_inf,
                            const std::optional<at::Tensor>& first_hist) {
  const char* op = "fisher_accumulate_";
  const c10::Device device = fisher.empty() ? default_device() : fisher[0].device();
  check_float_list(fisher, device, op, "fisher", /*fp32_only=*/true);
  check_grads(fisher, grads, device, op, "fisher", /*same_dtype=*/false);
  check_fisher(fisher, grads, decay, alpha, found_inf, first_hist, device, op);
  if (fisher.empty()) return;
  std::vector<at::ScalarType> dtypes;  // the gradients': F decays alone with the fp32 group
  for (const std::optional<at::Tensor> g : grads) dtypes.push_back(g.has_value() ? g->scalar_type() : at::kFloat);
  at::Tensor inf;
  // on the device, no sync: non-zero (NaN included) skips; float32 (GradScaler's) as it is, another
  // dtype through two ATen kernels (a huge int stays non-zero)
  if (found_inf.has_value())
    inf = found_inf->scalar_type() == at::kFloat ? *found_inf
                                                 : aten_result(found_inf->ne(0).to(at::kFloat), "found_inf", 2);
  const DeviceGuard guard(device);
  const Stream stream = current_stream();
  const FisherUpdate update{static_cast<float>(decay), static_cast<float>(alpha)};
  const float* inf_ptr = inf.defined() ? inf.const_data_ptr<float>() : nullptr;
  auto* hist = first_hist.has_value() ? reinterpret_cast<unsigned long long*>(first_hist->data_ptr<int64_t>())
                                      : nullptr;
  for_each_group(ListChunks(fisher), dtypes, {data_ptrs(fisher), data_ptrs(grads)}, device,
                 [&](at::ScalarType dtype, const TensorTable& t, unsigned grid) {
                   FSAM_DISPATCH_FLOATS(dtype, "fisher_accumulate_", [&] {
                     if (hist != nullptr) {
                       launch<fisher_kernel<scalar_t, true>>(grid, stream, t, update, inf_ptr, hist);
                     } else {
                       launch<fisher_kernel<scalar_t, false>>(grid, stream, t, update, inf_ptr, hist);
                     }
                   });
                 });
}

}  // namespace

FSAM_CUDA_LIBRARY_IMPL(m) { FSAM_IMPL(m, "fisher_accumulate_", fisher_accumulate_cuda); }

}  // namespace fsam::cuda
