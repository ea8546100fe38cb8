// Philox4x32-10's words for a run of counters on the CPU, apart from the float math that turns
// them into noise (the rounds cost about five times the log, cos and sqrt).
#pragma once

#include <cstdint>

namespace fsam {

// x0[i], x1[i] = the first two words of philox4x32_10 (fsam/pac_noise.h) of counter
// (first + i low, first + i high, step low, step high) and key (seed low, seed high), i < n
// (n < 2^31); the noise uses no others.  Writes x0[0 .. n) and x1[0 .. n) only.
void philox_words(uint64_t seed, uint64_t step, uint64_t first, int64_t n, uint32_t* x0, uint32_t* x1);

}  // namespace fsam
