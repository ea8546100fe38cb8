// The host side of the CUDA kernels behind one seam, so that csrc/cuda keeps one text for two
// builds: under nvcc the CUDA runtime and c10/cuda; in the emulated build (FSAM_SIM, the
// cuda-sim backend: csrc/sim/) CPU tensors and the SIMT emulator.  Kernel launches, the stream,
// the device guard, the pinned table copies, the device attributes and the op registration key
// are the only things that differ.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <utility>

#ifndef FSAM_SIM
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace fsam::cuda {

constexpr int kBlock = 256;  // threads of every block of every kernel

#ifndef FSAM_SIM

constexpr auto kDeviceType = c10::DeviceType::CUDA;
using Stream = cudaStream_t;
using DeviceGuard = c10::cuda::CUDAGuard;

inline Stream current_stream() { return c10::cuda::getCurrentCUDAStream(); }
inline c10::Device default_device() { return c10::Device(kDeviceType, c10::cuda::current_device()); }

inline int sm_count(const c10::Device& device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device.index()));
  return sms;
}

// int64 host memory for a table the kernels read, and its copy on the device (no host sync: the
// caching host allocator keeps the pinned block until the copy has run).
inline at::Tensor host_longs(int64_t n) {
  return at::empty({n}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
}
inline at::Tensor to_device(const at::Tensor& host, const c10::Device& device) {
  return host.to(device, /*non_blocking=*/true);
}

inline void zero_async(void* p, size_t bytes, Stream stream) { C10_CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, stream)); }

// kernel<<<grid, kBlock, 0, stream>>>(args...), checked.
template <auto kKernel, typename... A>
void launch(unsigned grid, Stream stream, A&&... args) {
  kKernel<<<grid, kBlock, 0, stream>>>(std::forward<A>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define FSAM_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(fsam, CUDA, m)

#else  // the emulated build: CPU tensors, kernels run by csrc/sim/runtime.cpp when launched

constexpr auto kDeviceType = c10::DeviceType::CPU;
struct Stream {};  // launches run to completion in order
struct DeviceGuard {
  explicit DeviceGuard(const c10::Device&) {}
};

inline Stream current_stream() { return {}; }
inline c10::Device default_device() { return c10::Device(kDeviceType); }
inline int sm_count(const c10::Device&) { return sim::sm_count(); }
inline at::Tensor host_longs(int64_t n) { return at::empty({n}, at::TensorOptions().dtype(at::kLong)); }
inline at::Tensor to_device(const at::Tensor& host, const c10::Device&) { return host; }
inline void zero_async(void* p, size_t bytes, Stream) { std::memset(p, 0, bytes); }

template <auto kKernel, typename... A>
void launch(unsigned grid, Stream, A&&... args) {
  sim::launch(grid, kBlock, __PRETTY_FUNCTION__, [&] { kKernel(args...); });  // each thread its own copies
}

#define FSAM_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(fsam_sim, CPU, m)

#endif

}  // namespace fsam::cuda
