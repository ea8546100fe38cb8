// Component-wise gradient-norm clipping (Yang & Ma, 2022): the per-tensor sums of squares (the
// chunk partials of the norm, sumsq.cuh, then one block per tensor adding its chunks in a fixed
// order) and the scaling of each tensor by its clip factor.  The CUDA impls; no host sync.
#include "multi_tensor.cuh"
#include "sumsq.cuh"

#include <fsam/checks.h>
#include <fsam/dispatch.h>
#include <fsam/functors.h>

namespace fsam::cuda {
namespace {

// sums[t] = the chunk partials of tensor t (chunks first[t] to first[t + 1]), in fp64.
__global__ void __launch_bounds__(kBlock, kMinBlocksPerSm) tensor_sums_kernel(const double* partials,
                                                                               const int64_t* first, int64_t tensors,
                                                                               double* sums) {
  __shared__ double scratch[kWarps];
  for (int64_t t = blockIdx.x; t < tensors; t += gridDim.x) {
    const double s = ordered_sum(partials, 2, first[t], first[t + 1], scratch);
    if (threadIdx.x == 0) sums[t] = s;
  }
}

// Each chunk times its tensor's clip factor; role 1 of the table points at the tensor's norm.
template <typename T>
__global__ void __launch_bounds__(kBlock, kMinBlocksPerSm) clip_scale_kernel(TensorTable table,
                                                                              ClipCoefficient coefficient) {
  constexpr int N = kPack<T>;
  for (int64_t c = blockIdx.x; c < table.chunks; c += gridDim.x) {
    const Chunk ch = locate(table, c);
    const float f = coefficient(*reinterpret_cast<const float*>(table.addr[1][ch.member]));
    if (f == 1.0f) continue;  // x * 1 is x, bit for bit: an unclipped tensor is neither read nor written
    T* x = chunk_data<T>(table, 0, ch);
    for_each_pack<N>(ch.n, aligned(x, 16), [&](int i, auto width) {
      constexpr int W = decltype(width)::value;
      T v[W];
      load<W>(x + i, v);
#pragma unroll
      for (int j = 0; j < W; ++j) v[j] = static_cast<T>(static_cast<float>(v[j]) * f);
      store<W>(x + i, v);
    });
  }
}

// The device of a list (the current one for an empty list: no kernel runs then).
c10::Device device_of(at::TensorList tensors) {
  return tensors.empty() ? default_device() : tensors[0].device();
}

at::Tensor tensor_sumsq_cuda(at::TensorList tensors) {
  const char* op = "tensor_sumsq";
  const c10::Device device = device_of(tensors);
  check_float_list(tensors, device, op, "tensors");
  const ListChunks list(tensors);
  const int64_t n = static_cast<int64_t>(tensors.size());
  const auto options = at::TensorOptions().dtype(at::kDouble).device(device);
  if (list.total == 0) return device_zeros({n}, options, "sums");
  const DeviceGuard guard(device);
  const Stream stream = current_stream();
  auto partials = device_empty({2 * list.total}, options, "partials");  // every chunk writes its two
  const std::vector<const void*> data = data_ptrs(tensors);
  for_each_group(list, dtypes_of(tensors), {data, data}, device, [&](at::ScalarType dtype, const TensorTable& t,
                                                                      unsigned grid) {
    FSAM_DISPATCH_FLOATS(dtype, "tensor_sumsq", [&] {
      launch<sumsq_kernel<scalar_t, false>>(grid, stream, t, nullptr, partials.data_ptr<double>(), 0.0f);
    });
  });
  // each tensor's first chunk, then the total: one pinned, non-blocking copy
  auto first = host_longs(n + 1);
  std::copy(list.first.begin(), list.first.end(), first.data_ptr<int64_t>());
  first.data_ptr<int64_t>()[n] = list.total;
  const at::Tensor first_d = to_device(first, device);
  auto sums = device_empty({n}, options, "sums");
  launch<tensor_sums_kernel>(resident_grid(n, n, sm_count(device)), stream, partials.const_data_ptr<double>(),
                             first_d.const_data_ptr<int64_t>(), n, sums.data_ptr<double>());
  return sums;
}

void clip_scale_cuda(at::TensorList tensors, const at::Tensor& norms, double max_norm, double eps) {
  const char* op = "clip_scale_";
  const c10::Device device = tensors.empty() ? norms.device() : tensors[0].device();
  check_float_list(tensors, device, op, "tensors");
  check_buffer(norms, at::kFloat, static_cast<int64_t>(tensors.size()), device, op, "norms");
  check_clip(tensors, norms, max_norm, eps, op);
  const ListChunks list(tensors);
  std::vector<const void*> norm_of(tensors.size());  // role 1: each tensor's norm
  for (size_t i = 0; i < tensors.size(); ++i) norm_of[i] = norms.const_data_ptr<float>() + i;
  const DeviceGuard guard(device);
  const Stream stream = current_stream();
  const ClipCoefficient coefficient{static_cast<float>(max_norm), static_cast<float>(eps)};
  for_each_group(list, dtypes_of(tensors), {data_ptrs(tensors), norm_of}, device,
                 [&](at::ScalarType dtype, const TensorTable& t, unsigned grid) {
                   FSAM_DISPATCH_FLOATS(dtype, "clip_scale_", [&] {
                     launch<clip_scale_kernel<scalar_t>>(grid, stream, t, coefficient);
                   });
                 });
}

}  // namespace

FSAM_CUDA_LIBRARY_IMPL(m) {
  FSAM_IMPL(m, "tensor_sumsq", tensor_sumsq_cuda);
  FSAM_IMPL(m, "clip_scale_", clip_scale_cuda);
}

}  // namespace fsam::cuda
