// The CUDA device vocabulary as host C++: forced into every translation unit of the emulated build
// (fsam_kernels._sim, the cuda-sim backend), so that the sources of csrc/cuda compile unchanged
// with the host compiler and run on the CPU.  runtime.cpp runs each block's threads as fibers on
// one OS worker and implements what is declared here; a worker runs one block at a time, so
// __shared__ arrays are the worker's thread_local statics.
#pragma once

#include <cstdint>
#include <cstring>
#include <source_location>
#include <string>
#include <type_traits>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local

namespace fsam::sim {

struct Index {
  unsigned x, y, z;
};

// The running thread's coordinates (one-dimensional grids and blocks: y = z = 0, or 1 for sizes).
const Index& thread_index();
const Index& block_index();
const Index& block_dim();
const Index& grid_dim();

// A block-wide barrier over the threads that have not returned; `at` names the call.
void sync_threads(std::source_location at);

enum class WarpOp { kShfl, kShflUp, kShflDown, kBallot };
// Deposits this lane's 8 bytes, waits until every lane named by `mask` has arrived at the same
// call (anything else is an error), and returns what this lane receives.
uint64_t warp_op(WarpOp op, unsigned mask, uint64_t value, int arg, int width, std::source_location at);

// ---- global memory as the launches see it (memory.cpp): the storages each may touch, counted

// An op's call: the storages given to it are the global memory its launches may touch (anything
// else is an invalid access), and its launches and transfers are recorded under its name, with the
// elements and tensors of its (first) tensor list.
class OpScope {
 public:
  OpScope(const char* op, int64_t elements, int64_t tensors);
  ~OpScope();
  OpScope(const OpScope&) = delete;
  OpScope& operator=(const OpScope&) = delete;
};

// Gives the running op's launches the storage [data, data + bytes) under `label` (an argument's
// name with its list position, or what the op allocated: "table", "partials").  A storage given
// again replaces what it overlaps (memory freed and reused within the op).
void give(const void* data, size_t bytes, const std::string& label);
// The label of argument `index` of the running op (its schema's name), with `item` for a list entry.
std::string argument_label(size_t index, int64_t item);

// Device work of an op that is not one of its kernels: a fill (cudaMemsetAsync, at::zeros), a copy
// of a host table to the device, a read of a device value by the host (a sync), an ATen kernel the
// op launched.  Counted when recording.
enum class Transfer { kFill, kCopy, kSync, kAten };
void transfer(Transfer kind, size_t bytes);

// Runs body(params) in every thread of `grid` blocks of `block` threads; returns when all have
// finished and raises if the emulator saw an error (divergence, a data race on shared or global
// memory, an access outside the storages given to the op).  `signature`: the launching function's
// __PRETTY_FUNCTION__, which names the kernel; params: the kernel's arguments (read by every thread,
// as the hardware's parameter space), params_bytes long.
void launch(unsigned grid, unsigned block, const char* signature, const void* params, size_t params_bytes,
            void (*body)(const void*));

int sm_count();  // the emulated device's SMs (FSAM_SIM_SMS)

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "a shuffled value is at most 8 bytes");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}

template <typename T>
T from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

template <typename T>
T shuffle(WarpOp op, std::source_location at, unsigned mask, T v, int arg, int width = 32) {
  return from_bits<T>(warp_op(op, mask, to_bits(v), arg, width, at));
}

}  // namespace fsam::sim

#define threadIdx (::fsam::sim::thread_index())
#define blockIdx (::fsam::sim::block_index())
#define blockDim (::fsam::sim::block_dim())
#define gridDim (::fsam::sim::grid_dim())
#define warpSize 32

#define FSAM_SIM_HERE std::source_location::current()
#define __syncthreads() ::fsam::sim::sync_threads(FSAM_SIM_HERE)
#define __shfl_sync(...) ::fsam::sim::shuffle(::fsam::sim::WarpOp::kShfl, FSAM_SIM_HERE, __VA_ARGS__)
#define __shfl_up_sync(...) ::fsam::sim::shuffle(::fsam::sim::WarpOp::kShflUp, FSAM_SIM_HERE, __VA_ARGS__)
#define __shfl_down_sync(...) ::fsam::sim::shuffle(::fsam::sim::WarpOp::kShflDown, FSAM_SIM_HERE, __VA_ARGS__)
#define __ballot_sync(mask, predicate) \
  static_cast<unsigned>(               \
      ::fsam::sim::warp_op(::fsam::sim::WarpOp::kBallot, mask, (predicate) ? 1u : 0u, 0, 32, FSAM_SIM_HERE))

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(unsigned x) { return x == 0 ? 32 : __builtin_clz(x); }  // CUDA defines clz(0)
inline int __clzll(unsigned long long x) { return x == 0 ? 64 : __builtin_clzll(x); }

// Device atomics (relaxed, as CUDA's): on shared memory they are what the race check lets several
// threads do to one word in one barrier interval.
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
inline int atomicOr(int* p, int v) { return __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }

// CUDA's device min for arithmetic types (the kernels use no other).
template <typename T, typename = std::enable_if_t<std::is_arithmetic_v<T>>>
T min(T a, T b) {
  return b < a ? b : a;
}
