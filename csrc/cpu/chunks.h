// How the CPU kernels traverse a tensor list: its chunks (the layout's unit of parallel work, so
// results never depend on the thread count) spread over ATen's thread pool.
#pragma once

#include <fsam/checks.h>
#include <fsam/dispatch.h>
#include <fsam/layout.h>

#include <ATen/Parallel.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace fsam {

struct Chunk {
  int64_t tensor;  // position in the list
  int64_t begin;   // first element inside that tensor
  int64_t end;     // one past the last
  int64_t index;   // position of the chunk in the whole list
};

// Tensor i's mask bits start at byte kChunkBytes * its first chunk: no byte is shared by two tensors.
inline std::vector<Chunk> chunk_table(at::TensorList tensors) {
  std::vector<Chunk> chunks;
  int64_t index = 0;
  for (int64_t t = 0; t < static_cast<int64_t>(tensors.size()); ++t) {
    const int64_t n = tensors[t].numel();
    for (int64_t b = 0; b < n; b += kChunk) chunks.push_back({t, b, std::min(b + kChunk, n), index++});
  }
  return chunks;
}

template <typename F>
void parallel_chunks(const std::vector<Chunk>& chunks, const F& f) {
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) f(chunks[c]);
  });
}

// Calls f(i) for every set bit i < n of a chunk's mask, 64 bits at a time: the work follows the
// number of masked entries, and empty words cost one test.
template <typename F>
inline void for_each_set_bit(const uint8_t* bits, int64_t n, const F& f) {
  for (int64_t base = 0; base < n; base += 64) {
    uint64_t word;
    std::memcpy(&word, bits + base / 8, sizeof(word));  // chunk masks are whole kChunkBytes blocks
    while (word) {
      const int64_t i = base + __builtin_ctzll(word);
      word &= word - 1;
      if (i < n) f(i);
    }
  }
}

}  // namespace fsam
