// The layout and radix constants of every C++ kernel: the same facts as
// fsam_kernels/_layout.py (tests/test_layout_constants.py checks that they agree).
#pragma once

#include <cstdint>

namespace fsam {

// A tensor list is cut into chunks of kChunk elements, each chunk inside one tensor: the unit of
// parallel work, of the packed mask (kChunkBytes per chunk) and of the saved-value offsets.
constexpr int64_t kChunk = 4096;
constexpr int64_t kChunkBytes = kChunk / 8;

// Radix select over 32-bit keys: three digits, most significant first.
constexpr int kRadixPasses = 3;
constexpr int kRadixWidth[kRadixPasses] = {11, 11, 10};
constexpr int kRadixShift[kRadixPasses] = {21, 10, 0};

// The first pass's histogram as fisher_accumulate_ emits it: its bins, then a NaN count.
constexpr int kFirstShift = kRadixShift[0];
constexpr int64_t kFirstBins = int64_t{1} << kRadixWidth[0];
constexpr int64_t kFirstHistSize = kFirstBins + 1;

}  // namespace fsam
