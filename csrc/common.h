// Shared by every CPU op family: the chunk layout of a tensor list, the float -> radix key
// transform, and the dtype checks.
#pragma once

#include "layout.h"

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace fsam {

// Chunks are the unit of parallel work (so results never depend on the thread count); tensor
// i's mask bits start at byte kChunkBytes * its first chunk, so no byte is shared by two tensors.
inline int64_t num_chunks(int64_t n) { return (n + kChunk - 1) / kChunk; }

struct Chunk {
  int64_t tensor;  // position in the list
  int64_t begin;   // first element inside that tensor
  int64_t end;     // one past the last
  int64_t index;   // position of the chunk in the whole list
};

inline std::vector<Chunk> chunk_table(const std::vector<int64_t>& numels) {
  std::vector<Chunk> chunks;
  int64_t index = 0;
  for (int64_t t = 0; t < static_cast<int64_t>(numels.size()); ++t) {
    for (int64_t b = 0; b < numels[t]; b += kChunk) {
      chunks.push_back({t, b, std::min(b + kChunk, numels[t]), index++});
    }
  }
  return chunks;
}

template <typename F>
void parallel_chunks(const std::vector<Chunk>& chunks, const F& f) {
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) f(chunks[c]);
  });
}

// Non-negative floats order like their bit patterns; flipping makes every float do so.
// -0 is folded onto +0 so that equal values stay equal keys (the tie rule needs it).
inline uint32_t order_key(float x, bool absolute) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  if (absolute) u &= 0x7fffffffu;
  if (u == 0x80000000u) u = 0;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

inline void check_first_hist(const at::Tensor& h, const char* op) {
  TORCH_CHECK(h.scalar_type() == at::kLong && h.is_contiguous() && h.device().is_cpu() && h.numel() == kFirstHistSize,
              op, ": first_hist must be a contiguous int64 CPU tensor of ", kFirstHistSize, " entries");
}

inline bool mask_bit(const uint8_t* bits, int64_t i) { return (bits[i >> 3] >> (i & 7)) & 1; }

inline void check_float_dtype(const at::Tensor& t, const char* what, int64_t i) {
  auto d = t.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kBFloat16 || d == at::kHalf, what, "[", i,
              "] must be float32, bfloat16 or float16, got ", d);
}

inline void check_cpu_contiguous(const at::Tensor& t, const char* what, int64_t i) {
  TORCH_CHECK(t.device().is_cpu(), what, "[", i, "] must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), what, "[", i, "] must be contiguous");
}

#define FSAM_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

}  // namespace fsam
