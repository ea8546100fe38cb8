// The host side of the CUDA kernels behind one seam, so that csrc/cuda keeps one text for two
// builds: under nvcc the CUDA runtime and c10/cuda; in the emulated build (FSAM_SIM, the
// cuda-sim backend: csrc/sim/) CPU tensors and the SIMT emulator.  Kernel launches, the stream,
// the device guard, the pinned table copies, the device attributes, the op registration key and
// the device memory of an op are the only things that differ.  Every tensor an op's kernels touch
// is an argument of the op or comes from device_empty, device_zeros, to_device or aten_result: the
// emulator gives exactly those to the op's launches (its memcheck) and counts their traffic.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <list>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

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
inline at::Tensor copy_to_device(const at::Tensor& host, const c10::Device& device) {
  return host.to(device, /*non_blocking=*/true);
}
inline void give(const at::Tensor&, const std::string&) {}  // the emulator's memcheck: nothing here

inline void zero_async(void* p, size_t bytes, Stream stream) { C10_CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, stream)); }

// The op's device memory: scratch and outputs (`label` names it in the emulator's reports).
inline at::Tensor device_empty(at::IntArrayRef sizes, const at::TensorOptions& options, const char*) {
  return at::empty(sizes, options);
}
inline at::Tensor device_zeros(at::IntArrayRef sizes, const at::TensorOptions& options, const char*) {
  return at::zeros(sizes, options);
}
// A device value read by the host: a sync.
template <typename T>
T device_read(const at::Tensor& t) {
  return t.item<T>();
}
// What `kernels` ATen kernels the op launched gave (a conversion).
inline at::Tensor aten_result(at::Tensor t, const char*, int) { return t; }

// kernel<<<grid, kBlock, 0, stream>>>(args...), checked.
template <auto kKernel, typename... A>
void launch(unsigned grid, Stream stream, A&&... args) {
  kKernel<<<grid, kBlock, 0, stream>>>(std::forward<A>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// A pack of elements (multi_tensor.cuh's Pack) loaded and stored whole: one vector access.
template <typename P>
__device__ inline P load_pack(const P* p) {
  return *p;
}
template <typename P>
__device__ inline void store_pack(P* p, const P& v) {
  *p = v;
}

#define FSAM_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(fsam, CUDA, m)
#define FSAM_IMPL(m, name, fn) m.impl(name, &fn)

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
inline at::Tensor copy_to_device(const at::Tensor& host, const c10::Device&) {
  sim::transfer(sim::Transfer::kCopy, host.nbytes());
  return host;
}

// The storage of t, given to the running op's launches under `label`.
inline void give(const at::Tensor& t, const std::string& label) {
  if (t.defined() && t.has_storage()) sim::give(t.storage().data(), t.storage().nbytes(), label);
}

inline void zero_async(void* p, size_t bytes, Stream) {
  sim::transfer(sim::Transfer::kFill, bytes);
  std::memset(p, 0, bytes);
}
inline at::Tensor device_empty(at::IntArrayRef sizes, const at::TensorOptions& options, const char* label) {
  at::Tensor t = at::empty(sizes, options);
  give(t, label);
  return t;
}
inline at::Tensor device_zeros(at::IntArrayRef sizes, const at::TensorOptions& options, const char* label) {
  at::Tensor t = at::zeros(sizes, options);
  give(t, label);
  sim::transfer(sim::Transfer::kFill, t.nbytes());
  return t;
}
template <typename T>
T device_read(const at::Tensor& t) {
  sim::transfer(sim::Transfer::kSync, t.nbytes());
  return t.item<T>();
}
inline at::Tensor aten_result(at::Tensor t, const char* label, int kernels) {
  give(t, label);
  for (int k = 0; k < kernels; ++k) sim::transfer(sim::Transfer::kAten, t.nbytes());
  return t;
}

// A pack as one access of its size, as nvcc's vector load and store (LDG.128): the host compiler
// would split a struct copy into element accesses, which the traffic records would count as such.
template <typename P>
using PackWord = std::conditional_t<sizeof(P) == 16, unsigned __int128,
                                    std::conditional_t<sizeof(P) == 8, uint64_t,
                                                       std::conditional_t<sizeof(P) == 4, uint32_t, uint16_t>>>;
template <typename P>
inline P load_pack(const P* p) {
  static_assert(sizeof(P) == sizeof(PackWord<P>), "a pack of 2, 4, 8 or 16 bytes");
  const PackWord<P> w = *reinterpret_cast<const volatile PackWord<P>*>(p);
  P v;
  std::memcpy(&v, &w, sizeof(P));
  return v;
}
template <typename P>
inline void store_pack(P* p, const P& v) {
  PackWord<P> w;
  std::memcpy(&w, &v, sizeof(P));
  *reinterpret_cast<volatile PackWord<P>*>(p) = w;
}

template <auto kKernel, typename Params>
void run_kernel(const void* params) {
  std::apply(kKernel, *static_cast<const Params*>(params));  // each thread its own copies
}

template <auto kKernel, typename... A>
void launch(unsigned grid, Stream, A&&... args) {
  const std::tuple<std::decay_t<A>...> params(std::forward<A>(args)...);
  sim::launch(grid, kBlock, __PRETTY_FUNCTION__, &params, sizeof(params), &run_kernel<kKernel, decltype(params)>);
}

// An op's arguments given to its launches, named by its schema.
inline void give_argument(size_t i, const at::Tensor& t) { give(t, sim::argument_label(i, -1)); }
inline void give_argument(size_t i, const std::optional<at::Tensor>& t) {
  if (t.has_value()) give(*t, sim::argument_label(i, -1));
}
inline void give_argument(size_t i, at::TensorList ts) {
  for (size_t j = 0; j < ts.size(); ++j) give(ts[j], sim::argument_label(i, static_cast<int64_t>(j)));
}
inline void give_argument(size_t i, const c10::List<std::optional<at::Tensor>>& ts) {
  for (size_t j = 0; j < ts.size(); ++j) {
    const std::optional<at::Tensor> t = ts[j];
    if (t.has_value()) give(*t, sim::argument_label(i, static_cast<int64_t>(j)));
  }
}
template <typename T>
void give_argument(size_t, const T&) {}

// The elements and tensors of an op's first tensor list (elements < 0 until one is seen).
inline void count_list(int64_t& elements, int64_t& tensors, at::TensorList ts) {
  if (elements >= 0) return;
  elements = 0;
  tensors = static_cast<int64_t>(ts.size());
  for (const auto& t : ts) elements += t.numel();
}
template <typename T>
void count_list(int64_t&, int64_t&, const T&) {}

// impl behind an op scope that gives it its arguments (FSAM_IMPL registers it).
template <auto kImpl>
struct Given;
template <typename R, typename... A, R (*kImpl)(A...)>
struct Given<kImpl> {
  static inline const char* op = nullptr;
  static R call(A... a) {
    int64_t elements = -1, tensors = 0;
    (count_list(elements, tensors, a), ...);
    const sim::OpScope scope(op, std::max<int64_t>(elements, 0), tensors);
    size_t i = 0;
    (give_argument(i++, a), ...);
    return kImpl(std::forward<A>(a)...);
  }
};
template <auto kImpl>
auto given(const char* op) {
  Given<kImpl>::op = op;
  return &Given<kImpl>::call;
}

#define FSAM_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(fsam_sim, CPU, m)
#define FSAM_IMPL(m, name, fn) m.impl(name, ::fsam::cuda::given<&fn>(name))

#endif

// The int64 table `host` on the device.  The tables seen last are kept there, so that a launch
// repeating one (the same tensors at the next step) costs no copy; a new one is copied without a
// host sync.  Kept for the life of the process (never destroyed: CUDA may be gone at exit).
inline at::Tensor to_device(const at::Tensor& host, const c10::Device& device) {
  struct Entry {
    c10::Device device;
    std::vector<int64_t> values;
    at::Tensor on_device;
  };
  constexpr size_t kKept = 64;
  static auto* mutex = new std::mutex;
  static auto* kept = new std::list<Entry>;  // the most recently used first
  const int64_t* v = host.const_data_ptr<int64_t>();
  const auto n = static_cast<size_t>(host.numel());
  at::Tensor found;
  {
    const std::lock_guard<std::mutex> lock(*mutex);
    for (auto it = kept->begin(); it != kept->end(); ++it) {
      if (it->device == device && it->values.size() == n && std::equal(v, v + n, it->values.begin())) {
        kept->splice(kept->begin(), *kept, it);
        found = it->on_device;
        break;
      }
    }
    if (!found.defined()) {
      found = copy_to_device(host, device);
      kept->push_front({device, std::vector<int64_t>(v, v + n), found});
      if (kept->size() > kKept) kept->pop_back();
    }
  }
  give(found, "table");
  return found;
}

}  // namespace fsam::cuda
