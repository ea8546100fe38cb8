// How the CUDA kernels traverse a tensor list: one launch per dtype group and kernel, whatever the
// number of tensors.  A group's table (per member: first chunk in the group, first chunk in the
// whole list, size, data pointers) goes to the device in one copy from pinned memory (no host
// sync); each block finds its chunk's member by binary search over the group's chunk offsets, so
// the host work grows with the tensors, not the chunks, and no tensor count limits a launch.  The
// chunks are those of fsam/layout.h; blocks stride over them (a resident grid, sized to the GPU).
// Also here: the block-level reductions and scans the kernels share, and the vectorised accesses.
#pragma once

#include "device.cuh"

#include <fsam/layout.h>

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace fsam::cuda {

constexpr int kWarp = 32;
constexpr int kWarps = kBlock / kWarp;
constexpr int kBlocksPerSm = 2048 / kBlock;  // the resident threads of an sm_80/sm_90 SM
// Every kernel's launch bound: at least this many blocks fit an SM, so at most 64 registers a
// thread (ptxas otherwise picks 32 for some kernels and spills).
constexpr int kMinBlocksPerSm = 4;
// A block counts at most 2^31 elements into its 32-bit shared histogram.
constexpr int64_t kMaxChunksPerBlock = (int64_t{1} << 31) / kChunk;
// The mask of a chunk as 32-bit words, a warp's share held one word per lane.
constexpr int kChunkWords = static_cast<int>(kChunk / 32);
constexpr int kWarpWords = kChunkWords / kWarps;
static_assert(kWarpWords <= kWarp && kChunkWords % kWarps == 0, "a warp's mask words fit its lanes");

constexpr int kRoles = 5;  // data pointers per member (e.g. params and grads; PAC-tuning has five)

struct TensorTable {  // what a kernel gets, by value
  const int64_t* group_first;   // [members + 1]: the member's first chunk in the group, then the total
  const int64_t* list_first;    // [members]: its first chunk in the whole list (the layout's chunk index)
  const int64_t* numel;         // [members]
  const int64_t* position;      // [members]: its position in the list (to index per-tensor arrays)
  const int64_t* addr[kRoles];  // [members]: data pointers, 0 where absent (a missing gradient)
  int64_t members, chunks;
};

struct Chunk {
  int64_t member, begin;  // the member, the chunk's first element inside it
  int n;                  // elements in the chunk
  int64_t index;          // the chunk's position in the whole list
};

__device__ inline Chunk locate(const TensorTable& t, int64_t c) {
  int64_t lo = 0, hi = t.members - 1;  // the last member starting at or before c (none is empty)
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (t.group_first[mid] <= c) lo = mid; else hi = mid - 1;
  }
  const int64_t local = c - t.group_first[lo], begin = local * kChunk;
  return {lo, begin, static_cast<int>(min(kChunk, t.numel[lo] - begin)), t.list_first[lo] + local};
}

// The chunk's data of role `role` (nullptr where the member has none).
template <typename T>
__device__ inline T* chunk_data(const TensorTable& t, int role, const Chunk& c) {
  const int64_t a = t.addr[role][c.member];
  return a ? reinterpret_cast<T*>(a) + c.begin : nullptr;
}

// ---- host side

// Positions of a list's chunks: tensor i's start at first[i] of the whole list.
struct ListChunks {
  std::vector<int64_t> numel, first;
  int64_t total = 0;
  explicit ListChunks(at::TensorList tensors) {
    for (const auto& t : tensors) {
      numel.push_back(t.numel());
      first.push_back(total);
      total += num_chunks(t.numel());
    }
  }
};

inline std::vector<at::ScalarType> dtypes_of(at::TensorList tensors) {
  std::vector<at::ScalarType> out;
  for (const auto& t : tensors) out.push_back(t.scalar_type());
  return out;
}

// A resident grid over items > 0 units of work, no block striding over more than max_per_block.
inline unsigned resident_grid(int64_t items, int64_t max_per_block, int sms) {
  return static_cast<unsigned>(std::max(std::min<int64_t>(items, int64_t{sms} * kBlocksPerSm),
                                        (items + max_per_block - 1) / max_per_block));
}

// Calls per_group(dtype, table, grid) once per dtype of `dtypes` (one per list position), with the
// table of that group's non-empty members and their pointers addr[role][position].
template <typename F>
void for_each_group(const ListChunks& list, const std::vector<at::ScalarType>& dtypes,
                    const std::array<std::vector<const void*>, kRoles>& addr, const c10::Device& device,
                    const F& per_group) {
  std::vector<at::ScalarType> seen;
  for (const auto d : dtypes)
    if (std::find(seen.begin(), seen.end(), d) == seen.end()) seen.push_back(d);
  const int sms = sm_count(device);
  for (const auto dtype : seen) {
    std::vector<int64_t> members;
    for (int64_t i = 0; i < static_cast<int64_t>(dtypes.size()); ++i)
      if (dtypes[i] == dtype && list.numel[i] > 0) members.push_back(i);
    if (members.empty()) continue;
    const int64_t m = static_cast<int64_t>(members.size());
    // [group_first (m + 1) | list_first (m) | numel (m) | position (m) | addr[0] (m) | ... | addr[kRoles - 1] (m)]
    auto host = host_longs((4 + kRoles) * m + 1);
    int64_t* h = host.data_ptr<int64_t>();
    h[0] = 0;
    for (int64_t j = 0; j < m; ++j) {
      const int64_t i = members[j];
      h[j + 1] = h[j] + num_chunks(list.numel[i]);
      h[m + 1 + j] = list.first[i];
      h[2 * m + 1 + j] = list.numel[i];
      h[3 * m + 1 + j] = i;
      for (int r = 0; r < kRoles; ++r)
        h[(4 + r) * m + 1 + j] = addr[r].empty() ? 0 : reinterpret_cast<int64_t>(addr[r][i]);
    }
    const int64_t chunks = h[m];
    const at::Tensor table = to_device(host, device);
    const int64_t* d = table.const_data_ptr<int64_t>();
    TensorTable t{d, d + m + 1, d + 2 * m + 1, d + 3 * m + 1, {}, m, chunks};
    for (int r = 0; r < kRoles; ++r) t.addr[r] = d + (4 + r) * m + 1;
    per_group(dtype, t, resident_grid(chunks, kMaxChunksPerBlock, sms));
  }
}

// Calls f(std::integral_constant<bool, value>{}): a runtime flag as a kernel's template argument.
template <typename F>
void with_bool(bool value, const F& f) {
  value ? f(std::true_type{}) : f(std::false_type{});
}

inline std::vector<const void*> data_ptrs(at::TensorList tensors) {
  std::vector<const void*> out;
  for (const auto& t : tensors) out.push_back(t.data_ptr());
  return out;
}

inline std::vector<const void*> data_ptrs(const c10::List<std::optional<at::Tensor>>& tensors) {
  std::vector<const void*> out;
  for (const std::optional<at::Tensor> t : tensors) out.push_back(t.has_value() ? t->data_ptr() : nullptr);
  return out;
}

// ---- device side: vectorised accesses

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};
template <typename T>
constexpr int kPack = 16 / sizeof(T);  // elements per 16-byte access

__host__ __device__ inline bool aligned(const void* p, int bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

template <int N, typename T>
__device__ inline void load(const T* p, T (&out)[N]) {
  const Pack<T, N> v = load_pack(reinterpret_cast<const Pack<T, N>*>(p));
#pragma unroll
  for (int j = 0; j < N; ++j) out[j] = v.v[j];
}

template <int N, typename T>
__device__ inline void store(T* p, const T (&in)[N]) {
  Pack<T, N> v;
#pragma unroll
  for (int j = 0; j < N; ++j) v.v[j] = in[j];
  store_pack(reinterpret_cast<Pack<T, N>*>(p), v);
}

// Calls f(i, std::integral_constant<int, W>) over a chunk's n elements, each thread a strided share:
// whole packs of W = N elements from i while `vectorised` (every pointer the caller uses aligned to
// its pack), then W = 1 for the rest.
template <int N, typename F>
__device__ inline void for_each_pack(int n, bool vectorised, const F& f) {
  const int packs = vectorised ? n / N : 0;
  for (int p = threadIdx.x; p < packs; p += kBlock) f(p * N, std::integral_constant<int, N>{});
  for (int i = packs * N + threadIdx.x; i < n; i += kBlock) f(i, std::integral_constant<int, 1>{});
}

// ---- device side: block-wide reductions and scans, each in one fixed order (deterministic)

__device__ inline int lane_id() { return threadIdx.x % kWarp; }
__device__ inline int warp_id() { return threadIdx.x / kWarp; }

// The sum over the block, in every thread; `scratch` holds kWarps values.
template <typename T>
__device__ inline T block_sum(T v, T* scratch) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_down_sync(0xffffffffu, v, o);
  if (lane_id() == 0) scratch[warp_id()] = v;
  __syncthreads();
  T total = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  __syncthreads();  // scratch may be reused
  return total;
}

template <typename T>
__device__ inline T warp_exclusive_scan(T v) {
  T x = v;
#pragma unroll
  for (int o = 1; o < kWarp; o *= 2) {
    const T y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane_id() >= o) x += y;
  }
  return x - v;
}

// Block-wide exclusive prefix sum in thread order, and the total; `scratch` holds kWarps values.
struct Scan {
  int before, total;
};
__device__ inline Scan block_scan(int v, int* scratch) {
  const int in_warp = warp_exclusive_scan(v);
  if (lane_id() == kWarp - 1) scratch[warp_id()] = in_warp + v;
  __syncthreads();
  Scan s{in_warp, 0};
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    s.before += w < warp_id() ? scratch[w] : 0;
    s.total += scratch[w];
  }
  __syncthreads();
  return s;
}

// The mask words of a chunk: lane j < kWarpWords of warp w holds word kWarpWords * w + j; it covers
// elements 32 * word + l, l < 32 (fsam/layout.h: bit l of byte b is element 8 b + l).
__device__ inline int chunk_word() { return warp_id() * kWarpWords + lane_id(); }

// The bits of a word that stand for elements below n (entries past a tensor's end never count).
__device__ inline uint32_t valid_bits(int word, int n) {
  const int left = n - 32 * word;
  return left >= 32 ? 0xffffffffu : left <= 0 ? 0u : (1u << left) - 1u;
}

// Word `word` of a chunk's packed mask, read bytewise (a mask_bits view need not be 4-byte aligned).
__device__ inline uint32_t mask_word(const uint8_t* chunk_bits, int word) {
  const uint8_t* b = chunk_bits + 4 * word;
  return b[0] | (uint32_t{b[1]} << 8) | (uint32_t{b[2]} << 16) | (uint32_t{b[3]} << 24);
}

}  // namespace fsam::cuda
