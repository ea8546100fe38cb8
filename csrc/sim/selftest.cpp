// Kernels that each break one rule of the CUDA programming model, and two that keep the rules
// where an emulator could wrongly object, run by fsam_sim::sim_selftest(kernel, grid) for
// tests/sim: the emulator must refuse each broken one with its own message and run the others.
#include "device.cuh"

#include <ATen/ops/full.h>

#include <string>

namespace fsam::sim::selftest {
namespace {

using fsam::cuda::kBlock;

__global__ void divergent_shuffle(int* out) {  // half the warp at one shuffle, half at another
  const int lane = static_cast<int>(threadIdx.x % 32);
  out[blockIdx.x * kBlock + threadIdx.x] = lane < 16 ? __shfl_sync(0xffffffffu, lane, 0) : __shfl_sync(0xffffffffu, lane, 0);
}

__global__ void partial_mask(int* out) {  // every lane arrives, the mask names half of them
  out[blockIdx.x * kBlock + threadIdx.x] = __shfl_sync(0x0000ffffu, static_cast<int>(threadIdx.x), 0);
}

__global__ void returned_lane(int* out) {  // the mask names a lane that has returned
  if (threadIdx.x % 32 == 31) return;
  out[blockIdx.x * kBlock + threadIdx.x] = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x), 0);
}

__global__ void divergent_barrier(int* out) {  // two __syncthreads calls, half the block at each
  if (threadIdx.x < kBlock / 2) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[blockIdx.x * kBlock + threadIdx.x] = 1;
}

__global__ void missing_barrier(int* out) {  // reads another thread's write of the same interval
  __shared__ int s[kBlock];
  s[threadIdx.x] = 1;
  __syncthreads();
  s[threadIdx.x] = static_cast<int>(threadIdx.x);
  out[blockIdx.x * kBlock + threadIdx.x] = s[kBlock - 1 - threadIdx.x];
}

__global__ void shuffle_is_no_fence(int* out) {  // a warp op synchronises lanes, orders no memory
  __shared__ int s[kBlock / 32];
  if (threadIdx.x % 32 == 0) s[threadIdx.x / 32] = 7;
  const int one = __shfl_sync(0xffffffffu, 1, 0);
  out[blockIdx.x * kBlock + threadIdx.x] = s[threadIdx.x / 32] + one;
}

struct alignas(16) Four {
  int v[4];
};

__global__ void misaligned_vector_load(int* out) {  // a 16-byte load from an address 4 bytes past one
  if (threadIdx.x == 0) *reinterpret_cast<Four*>(out + blockIdx.x * kBlock + 8) = *reinterpret_cast<const Four*>(out + 1);
}

__global__ void uninitialised_read(int* out) {  // shared memory starts undefined in every block
  __shared__ int s[kBlock];
  if (threadIdx.x < kBlock / 2) s[threadIdx.x] = 1;
  __syncthreads();
  out[blockIdx.x * kBlock + threadIdx.x] = s[kBlock - 1 - threadIdx.x];
}

__global__ void shared_atomics(int* out) {  // kept: a zeroed counter, atomics, a barrier, reads
  __shared__ int count;
  if (threadIdx.x == 0) count = 0;
  __syncthreads();
  atomicAdd(&count, static_cast<int>(blockIdx.x) + 1);
  __syncthreads();
  out[blockIdx.x * kBlock + threadIdx.x] = count;
}

__global__ void warp_ops(int* out) {  // kept: a ballot and the three shuffles
  const int lane = static_cast<int>(threadIdx.x % 32);
  const unsigned odd = __ballot_sync(0xffffffffu, lane % 2 == 1);
  const int down = __shfl_down_sync(0xffffffffu, lane, 3), up = __shfl_up_sync(0xffffffffu, lane, 5);
  const int from = __shfl_sync(0xffffffffu, lane * 10, 31 - lane);
  out[blockIdx.x * kBlock + threadIdx.x] = static_cast<int>(odd == 0xaaaaaaaau) + 2 * down + 100 * up + 10000 * from;
}

// Global memory (memory.cpp): out holds one int per thread of the grid.  An index one past the end,
// a neighbour read without its bound, a plain update where an atomic belongs (each block counts
// itself into out[0]).
__global__ void off_by_one(int* out) { out[blockIdx.x * kBlock + threadIdx.x + 1] = 1; }

__global__ void dropped_bound(int* out) {  // `if (i + 1 < n)` dropped
  const unsigned i = blockIdx.x * kBlock + threadIdx.x;
  const int next = out[i + 1];
  if (next == 12345) out[i] = next;  // never: out is -1
}

__global__ void plain_count(int* out) {
  if (threadIdx.x == 0) out[0] += 1;
}

__global__ void atomic_count(int* out) {  // kept: the same count, atomically
  if (threadIdx.x == 0) atomicAdd(&out[0], 1);
  else out[blockIdx.x * kBlock + threadIdx.x] = static_cast<int>(blockIdx.x);
}

at::Tensor sim_selftest(const std::string& kernel, int64_t grid) {
  TORCH_CHECK(grid >= 0 && grid <= 1024, "sim_selftest: grid must be in [0, 1024], got ", grid);
  const OpScope scope("sim_selftest", 0, 0);
  auto out = at::full({std::max<int64_t>(grid, 1) * kBlock}, -1, at::TensorOptions().dtype(at::kInt));
  cuda::give(out, "out");
  int* p = out.data_ptr<int>();
  const auto g = static_cast<unsigned>(grid);
  using cuda::launch;
  if (kernel == "divergent_shuffle") launch<divergent_shuffle>(g, {}, p);
  else if (kernel == "partial_mask") launch<partial_mask>(g, {}, p);
  else if (kernel == "returned_lane") launch<returned_lane>(g, {}, p);
  else if (kernel == "divergent_barrier") launch<divergent_barrier>(g, {}, p);
  else if (kernel == "missing_barrier") launch<missing_barrier>(g, {}, p);
  else if (kernel == "shuffle_is_no_fence") launch<shuffle_is_no_fence>(g, {}, p);
  else if (kernel == "misaligned_vector_load") launch<misaligned_vector_load>(g, {}, p);
  else if (kernel == "uninitialised_read") launch<uninitialised_read>(g, {}, p);
  else if (kernel == "shared_atomics") launch<shared_atomics>(g, {}, p);
  else if (kernel == "warp_ops") launch<warp_ops>(g, {}, p);
  else if (kernel == "off_by_one") launch<off_by_one>(g, {}, p);
  else if (kernel == "dropped_bound") launch<dropped_bound>(g, {}, p);
  else if (kernel == "plain_count") launch<plain_count>(g, {}, p);
  else if (kernel == "atomic_count") launch<atomic_count>(g, {}, p);
  else TORCH_CHECK(false, "sim_selftest: no kernel named '", kernel, "'");
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fsam_sim, m) { m.def("sim_selftest(str kernel, int grid) -> Tensor", &sim_selftest); }

}  // namespace fsam::sim::selftest
