// The histogram of the first radix digit on the CPU, shared by the top-k's digit-0 pass
// (topk.cpp) and fisher_accumulate_, which counts it while the new scores are in cache.
#pragma once

#include <fsam/functors.h>

#include <cstdint>
#include <vector>

namespace fsam {

// One thread's counts, as kWays interleaved copies: neighbouring scores often share the first
// digit (the sign and exponent), and with one copy each increment would wait for the previous
// one's store.
class FirstDigitHistogram {
 public:
  static constexpr int64_t kWays = 4;

  FirstDigitHistogram() : counts_(kWays * kFirstBins, 0) {}

  // Counts n keys, of which `nan` come from NaN scores (kept in the histogram's last entry).
  void count(const uint32_t* keys, int64_t n, int64_t nan) {
    nan_ += nan;
    const RadixDigit<0> rd{0};
    int64_t* h = counts_.data();
    int64_t i = 0;
    for (; i + kWays <= n; i += kWays)
      for (int64_t w = 0; w < kWays; ++w) ++h[w * kFirstBins + rd.bin(keys[i + w])];
    for (; i < n; ++i) ++h[rd.bin(keys[i])];
  }

  // out += the counts (kFirstHistSize entries, the NaN count last).
  void add_to(int64_t* out) const {
    for (int64_t w = 0; w < kWays; ++w)
      for (int64_t b = 0; b < kFirstBins; ++b) out[b] += counts_[w * kFirstBins + b];
    out[kFirstBins] += nan_;
  }

 private:
  std::vector<int64_t> counts_;
  int64_t nan_ = 0;
};

}  // namespace fsam
