// Top-k mask selection over a list of score tensors: radix select on the order-preserving
// keys of the float bits (3 histogram passes of 11/11/10 bits), then one pass writing the
// packed bit mask and the per-chunk popcounts.  No sort, no concatenated copy, no index tensor.
#include "common.h"

#include <algorithm>
#include <atomic>
#include <mutex>
#include <type_traits>

namespace fsam {
namespace {

struct Scores {
  std::vector<at::Tensor> tensors;
  std::vector<Chunk> chunks;
  bool absolute;

  // Calls f(key, value, offset inside the chunk) for every element of chunk c (the dtype and
  // `absolute` are resolved once per chunk, so the element loop has no branch on them).
  template <typename F>
  void visit(const Chunk& c, const F& f) const {
    const at::Tensor& t = tensors[c.tensor];
    FSAM_DISPATCH_FLOATS(t.scalar_type(), "topk_mask", [&] {
      const scalar_t* p = t.const_data_ptr<scalar_t>();
      auto loop = [&](auto abs) {
        for (int64_t i = c.begin; i < c.end; ++i) {
          const float x = static_cast<float>(p[i]);
          f(order_key(x, decltype(abs)::value), x, i - c.begin);
        }
      };
      absolute ? loop(std::true_type{}) : loop(std::false_type{});
    });
  }
};

// Histogram of the digit at `shift` over the keys whose bits above the digit equal `prefix`.
std::vector<int64_t> histogram(const Scores& s, int pass, uint32_t prefix, bool check_nan) {
  const int bins = 1 << kRadixWidth[pass];
  const int above = kRadixShift[pass] + kRadixWidth[pass];  // 32 on the first pass: every key matches
  std::vector<int64_t> total(bins, 0);
  std::mutex mu;
  std::atomic<bool> nan{false};
  const int shift = kRadixShift[pass];
  const uint32_t digit_mask = bins - 1;
  at::parallel_for(0, static_cast<int64_t>(s.chunks.size()), 1, [&](int64_t b, int64_t e) {
    std::vector<int64_t> local(bins, 0);
    bool local_nan = false;
    for (int64_t c = b; c < e; ++c) {
      if (above == 32) {
        s.visit(s.chunks[c], [&](uint32_t key, float x, int64_t) {
          local_nan |= check_nan && x != x;
          ++local[key >> shift];
        });
      } else {
        s.visit(s.chunks[c], [&](uint32_t key, float, int64_t) {
          local[(key >> shift) & digit_mask] += (key >> above) == prefix;
        });
      }
    }
    if (local_nan) nan = true;
    std::lock_guard<std::mutex> lock(mu);
    for (int i = 0; i < bins; ++i) total[i] += local[i];
  });
  TORCH_CHECK(!nan, "topk_mask: scores contain NaN; the ranking is undefined");
  return total;
}

// check_nan=False lets a caller that knows the scores are finite spare the GPU backends a sync;
// a pass over the scores here checks for NaN anyway, it costs nothing.
std::tuple<at::Tensor, at::Tensor> topk_mask_cpu(at::TensorList scores, int64_t k, bool absolute, bool check_nan,
                                                 const std::optional<at::Tensor>& first_hist) {
  Scores s{{}, {}, absolute};
  std::vector<int64_t> numels;
  int64_t n = 0;
  for (int64_t i = 0; i < static_cast<int64_t>(scores.size()); ++i) {
    check_cpu_contiguous(scores[i], "scores", i);
    check_float_dtype(scores[i], "scores", i);
    s.tensors.push_back(scores[i]);
    numels.push_back(scores[i].numel());
    n += scores[i].numel();
  }
  TORCH_CHECK(k >= 0 && k <= n, "topk_mask: k must be in [0, ", n, "] (the number of scores), got ", k);
  s.chunks = chunk_table(numels);
  const int64_t nchunks = static_cast<int64_t>(s.chunks.size());
  auto bits = at::empty({nchunks * kChunkBytes}, at::TensorOptions().dtype(at::kByte));
  auto counts = at::empty({nchunks}, at::TensorOptions().dtype(at::kInt));

  // Radix select: after the passes `prefix` is the key T of the k-th largest score and
  // `k_left` how many of the scores equal to T belong to the top k.
  uint32_t prefix = 0;
  int64_t k_left = k, ties = 0;
  for (int pass = 0; pass < kRadixPasses && (pass == 0 || k > 0); ++pass) {
    std::vector<int64_t> hist;
    if (pass == 0 && first_hist.has_value()) {  // counted by fisher_accumulate_: no pass over the scores
      check_first_hist(*first_hist, "topk_mask");
      TORCH_CHECK(!absolute, "topk_mask: first_hist counts signed keys; it cannot serve absolute=True");
      const int64_t* h = first_hist->const_data_ptr<int64_t>();
      TORCH_CHECK(!check_nan || h[kFirstBins] == 0, "topk_mask: scores contain NaN; the ranking is undefined");
      hist.assign(h, h + kFirstBins);
    } else {
      hist = histogram(s, pass, prefix, pass == 0);
    }
    if (k == 0) break;
    int64_t greater = 0;
    int digit = static_cast<int>(hist.size()) - 1;
    for (; digit > 0 && greater + hist[digit] < k_left; --digit) greater += hist[digit];
    k_left -= greater;
    ties = hist[digit];
    prefix = (prefix << kRadixWidth[pass]) | static_cast<uint32_t>(digit);
  }
  const uint32_t kth = prefix;

  // Ties at T go to the lowest flat indices: when only some of them are taken, count them per
  // chunk and give each chunk its share in flat order.
  const bool all_ties = k == 0 || k_left == ties;
  std::vector<int64_t> take(nchunks, 0);
  if (!all_ties) {
    parallel_chunks(s.chunks, [&](const Chunk& c) {
      int64_t t = 0;
      s.visit(c, [&](uint32_t key, float, int64_t) { t += key == kth; });
      take[c.index] = t;
    });
    int64_t before = 0;
    for (auto& t : take) {
      const int64_t here = t;
      t = std::clamp<int64_t>(k_left - before, 0, here);
      before += here;
    }
  }

  uint8_t* out = bits.data_ptr<uint8_t>();
  int32_t* cnt = counts.data_ptr<int32_t>();
  parallel_chunks(s.chunks, [&](const Chunk& c) {
    uint8_t* b = out + c.index * kChunkBytes;
    std::memset(b, 0, kChunkBytes);
    int32_t selected = 0;
    if (k > 0) {
      int64_t tie_quota = take[c.index];
      s.visit(c, [&](uint32_t key, float, int64_t j) {
        if (key > kth || (key == kth && (all_ties || tie_quota-- > 0))) {
          b[j >> 3] |= static_cast<uint8_t>(1u << (j & 7));
          ++selected;
        }
      });
    }
    cnt[c.index] = selected;
  });
  return {bits, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(fsam, CPU, m) { m.impl("topk_mask", &topk_mask_cpu); }

}  // namespace fsam
