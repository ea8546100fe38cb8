// The layout and radix constants of every C++ and CUDA kernel: the same facts as
// fsam_kernels/_layout.py (tests/ops/test_layout_constants.py checks that they agree).
#pragma once

#include <cstdint>

namespace fsam {

// A tensor list is cut into chunks of kChunk elements, each chunk inside one tensor: the unit of
// parallel work, of the packed mask (kChunkBytes per chunk) and of the saved-value offsets.
constexpr int64_t kChunk = 4096;
constexpr int64_t kChunkBytes = kChunk / 8;
constexpr int64_t num_chunks(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

// The saved buffer starts on a kSaveAlign-byte boundary, and so does each tensor's run in it.
constexpr int64_t kSaveAlign = 16;

// Radix select over 32-bit keys: three digits, most significant first.  The histogram of digit
// d has (1 << kRadixWidth[d]) bins and, last, a count of NaN scores (filled by digit 0 only).
constexpr int kRadixDigits = 3;
constexpr int kRadixWidth[kRadixDigits] = {11, 11, 10};
constexpr int kRadixShift[kRadixDigits] = {21, 10, 0};

// The radix state carried between the stages: the key prefix chosen so far, how many of the
// keys under it are still to take, how many keys share the last digit chosen, and how many
// candidates the digit-1 pass appended (more than the buffer holds: the buffer is not used).
constexpr int kStatePrefix = 0;
constexpr int kStateKLeft = 1;
constexpr int kStateTies = 2;
constexpr int kStateCandidates = 3;
constexpr int kRadixStateSize = 4;

// A candidate of the candidate buffer: (chunk << kCandidateKeyBits) | key.
constexpr int kCandidateKeyBits = 32;

// The first digit's histogram, which fisher_accumulate_ can emit while it writes the scores.
constexpr int kFirstShift = kRadixShift[0];
constexpr int64_t kFirstBins = int64_t{1} << kRadixWidth[0];
constexpr int64_t kFirstHistSize = kFirstBins + 1;

constexpr int64_t radix_bins(int digit) { return int64_t{1} << kRadixWidth[digit]; }
constexpr int64_t radix_hist_size(int digit) { return radix_bins(digit) + 1; }

}  // namespace fsam
