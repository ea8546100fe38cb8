// The fp64 sums of squares in the CUDA kernels' fixed summation order, shared by the norm of the perturbation
// (perturb.cu) and the per-tensor norms of component-wise clipping (clip.cu): per chunk a block sum
// of the fp64 terms, then the chunk partials added in a fixed order.
#pragma once

#include "multi_tensor.cuh"

#include <fsam/functors.h>

namespace fsam::cuda {

// Per chunk, the fp64 sums of (T g)^2 over every entry and over the masked ones (no mask: every
// entry), reduced within the block in a fixed order.
template <typename T, bool kAdaptive>
__global__ void __launch_bounds__(kBlock, kMinBlocksPerSm) sumsq_kernel(TensorTable table, const uint8_t* bits,
                                                                         double* partials, float eta) {
  constexpr int N = kPack<T>;
  static_assert(8 % N == 0 || N % 8 == 0, "a pack's mask bits lie in one byte");
  __shared__ double scratch[kWarps];
  const SumsqTerm<kAdaptive> term{{eta}};
  for (int64_t c = blockIdx.x; c < table.chunks; c += gridDim.x) {
    const Chunk ch = locate(table, c);
    const T* w = chunk_data<const T>(table, 0, ch);
    const T* g = chunk_data<const T>(table, 1, ch);
    const uint8_t* b = bits != nullptr ? bits + ch.index * kChunkBytes : nullptr;
    double all = 0, masked = 0;
    if (g != nullptr) {
      const bool vectorised = aligned(g, 16) && (!kAdaptive || aligned(w, 16));
      for_each_pack<N>(ch.n, vectorised, [&](int i, auto width) {
        constexpr int W = decltype(width)::value;
        T gv[W], wv[W];
        load<W>(g + i, gv);
        if constexpr (kAdaptive) load<W>(w + i, wv);  // SAM's term does not depend on w: not read
        const uint32_t keep = b != nullptr ? b[i / 8] >> (i % 8) : 0xffu;
#pragma unroll
        for (int j = 0; j < W; ++j) {
          const double sq = term(kAdaptive ? static_cast<float>(wv[j]) : 0.0f, static_cast<float>(gv[j]));
          all += sq;
          if ((keep >> j) & 1u) masked += sq;
        }
      });
    }
    all = block_sum(all, scratch);
    masked = block_sum(masked, scratch);
    if (threadIdx.x == 0) {
      partials[2 * ch.index] = all;
      partials[2 * ch.index + 1] = masked;
    }
  }
}

// The sum of x[stride * c] over c in [begin, end), in fp64 and one fixed order: thread t adds the
// t-th run of consecutive entries in order, then the block adds the runs in a fixed order.  No
// float atomics: the same bits every run.  Every thread gets the sum.
__device__ inline double ordered_sum(const double* x, int stride, int64_t begin, int64_t end, double* scratch) {
  const int64_t per = (end - begin + kBlock - 1) / kBlock;
  const int64_t b = begin + threadIdx.x * per, e = b + per < end ? b + per : end;
  double s = 0;
  for (int64_t c = b; c < e; ++c) s += x[stride * c];
  return block_sum(s, scratch);
}

}  // namespace fsam::cuda
