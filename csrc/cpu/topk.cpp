// Top-k mask selection by radix select on the order-preserving keys, as stages that
// fsam_kernels/radix_topk.py drives (and may reduce across processes between): the histogram of
// one digit, the choice of that digit, the per-chunk count of keys equal to the k-th one, and the
// pass writing the packed bit mask and per-chunk popcounts.  No sort, no concatenated copy, no
// index tensor.  The CPU impls.
#include "chunks.h"
#include "first_digit.h"
#include "vec_math.h"

#include <fsam/checks.h>
#include <fsam/functors.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <type_traits>

namespace fsam {
namespace {

constexpr auto kCPU = c10::DeviceType::CPU;

struct Scores {
  at::TensorList tensors;
  std::vector<Chunk> chunks;
  bool absolute;

  Scores(at::TensorList scores, bool abs, const char* op) : tensors(scores), absolute(abs) {
    check_float_list(scores, kCPU, op, "scores");
    chunks = chunk_table(scores);
  }

  int64_t num_chunks() const { return static_cast<int64_t>(chunks.size()); }

  // Calls f(key, value) for every element of chunk c, in order (the dtype and `absolute` are
  // resolved once per chunk, so the element loop has no branch on them).
  template <typename F>
  void visit(const Chunk& c, const F& f) const {
    const at::Tensor& t = tensors[c.tensor];
    FSAM_DISPATCH_FLOATS(t.scalar_type(), "radix_topk", [&] {
      const scalar_t* p = t.const_data_ptr<scalar_t>();
      auto loop = [&](auto abs) {
        const OrderKey<decltype(abs)::value> key;
        for (int64_t i = c.begin; i < c.end; ++i) {
          const float x = static_cast<float>(p[i]);
          f(key(x), x);
        }
      };
      absolute ? loop(std::true_type{}) : loop(std::false_type{});
    });
  }

  // Writes chunk c's keys to `keys` (kChunk entries) and returns how many NaN scores it holds.
  // The histogram of digit 0, the tie count and the mask pass work on these: their own loops then
  // read 32-bit keys out of L1, which lets the mask pass vectorise.
  int64_t keys(const Chunk& c, uint32_t* keys) const {
    int64_t i = 0, nan = 0;
    visit(c, [&](uint32_t key, float x) {
      keys[i++] = key;
      nan += x != x;
    });
    return nan;
  }

  // Writes the keys of chunk c under the digit's prefix to `keys`, in order, and returns how many
  // there are: digits 1 and 2 count only those (a few percent of the scores, usually), and the
  // digit-1 pass stores them as candidates.  Branch-free: whether a key is under the prefix is
  // unpredictable.
  template <int kDigit>
  int64_t keys_under(const Chunk& c, const RadixDigit<kDigit>& rd, uint32_t* keys) const {
    int64_t kept = 0;
    visit(c, [&](uint32_t key, float) {
      keys[kept] = key;
      kept += rd.matches(key);
    });
    return kept;
  }
};

int64_t count_equal(const uint32_t* keys, int64_t n, uint32_t kth) {
  int64_t equal = 0;
  for (int64_t i = 0; i < n; ++i) equal += keys[i] == kth;
  return equal;
}

// Writes a chunk's mask bits (64 at a time, as the bytes of a little-endian word) and returns how
// many are set: the keys above the k-th one, and of those equal to it all (all_ties) or the first
// `quota`.  The bytes past the chunk's keys are zeroed.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "mask bit i is bit i % 8 of byte i / 8");
FSAM_CPU_CLONES int32_t mask_words(const uint32_t* keys, int64_t n, uint32_t kth, bool all_ties, int64_t quota,
                                   uint8_t* bits) {
  int32_t selected = 0;
  int64_t w = 0;
  for (; w < n; w += 64) {
    const int64_t m = std::min<int64_t>(64, n - w);
    uint64_t above = 0, equal = 0;
    for (int64_t q = 0; q < m; ++q) {
      above |= static_cast<uint64_t>(keys[w + q] > kth) << q;
      equal |= static_cast<uint64_t>(keys[w + q] == kth) << q;
    }
    uint64_t take = above;
    if (all_ties) {
      take |= equal;
    } else {
      for (; equal && quota > 0; --quota) {  // the lowest first
        const uint64_t lowest = equal & (~equal + 1);
        take |= lowest;
        equal ^= lowest;
      }
    }
    std::memcpy(bits + w / 8, &take, sizeof(take));
    selected += __builtin_popcountll(take);
  }
  std::memset(bits + w / 8, 0, kChunkBytes - w / 8);
  return selected;
}

void check_state(const at::Tensor& state, const char* op) {
  check_buffer(state, at::kLong, kRadixStateSize, kCPU, op, "state");
}

// The candidate buffer, when one is passed (see fsam_kernels/_schemas.py).
struct Candidates {
  int64_t* data = nullptr;
  int64_t capacity = 0;

  Candidates(const std::optional<at::Tensor>& t, const char* op) {
    if (!t.has_value()) return;
    check_buffer(*t, at::kLong, -1, kCPU, op, "candidates");
    data = t->data_ptr<int64_t>();
    capacity = t->numel();
  }
  explicit operator bool() const { return data != nullptr; }
  // Whether the digit-1 pass left every key under the prefix in the buffer.
  bool usable(const int64_t* state) const { return data && candidates_fit(state[kStateCandidates], capacity); }
};

// out += the counts of digit 0 over every key (kFirstHistSize entries, the NaN scores last).
void first_digit_histogram(const Scores& s, int64_t* out) {
  std::mutex mu;
  at::parallel_for(0, s.num_chunks(), 1, [&](int64_t b, int64_t e) {
    FirstDigitHistogram hist;
    std::vector<uint32_t> keys(kChunk);
    for (int64_t c = b; c < e; ++c) {
      const int64_t nan = s.keys(s.chunks[c], keys.data());
      hist.count(keys.data(), s.chunks[c].end - s.chunks[c].begin, nan);
    }
    std::lock_guard<std::mutex> lock(mu);
    hist.add_to(out);
  });
}

// hist += the counts of digit `digit` over the keys under the state's prefix (every key for digit
// 0, which also counts the NaN scores in the last entry).  Digit 1 also fills the candidate buffer
// when the keys under the prefix fit it; digit 2 reads the buffer instead of the scores if it was.
void radix_histogram_cpu(at::TensorList scores, const at::Tensor& state, int64_t digit, bool absolute,
                         const at::Tensor& hist, const std::optional<at::Tensor>& candidates) {
  const char* op = "radix_histogram_";
  const Scores s(scores, absolute, op);
  check_state(state, op);
  check_digit(digit, op);
  const Candidates cand(candidates, op);
  const int64_t size = radix_hist_size(digit);
  check_buffer(hist, at::kLong, size, kCPU, op, "hist");
  check_radix_writes(scores, state, hist, /*hist_written=*/true, candidates, op);
  int64_t* out = hist.data_ptr<int64_t>();
  if (digit == 0) return first_digit_histogram(s, out);
  int64_t* st = state.data_ptr<int64_t>();
  const auto prefix = static_cast<uint32_t>(st[kStatePrefix]);
  const bool fill = digit == 1 && cand && candidates_fit(st[kStateTies], cand.capacity);
  const bool from_buffer = digit == 2 && cand.usable(st);
  if (digit == 1 && cand && !fill) st[kStateCandidates] = cand.capacity + 1;
  std::mutex mu;
  std::atomic<int64_t> stored{0};  // candidates appended (or, past the capacity, counted)
  with_digit(digit, [&](auto d) {
    const RadixDigit<decltype(d)::value> rd{prefix};
    const int64_t items = from_buffer ? st[kStateCandidates] : s.num_chunks();
    at::parallel_for(0, items, from_buffer ? kChunk : 1, [&](int64_t b, int64_t e) {
      std::vector<int64_t> local(size, 0);
      std::vector<uint32_t> keys(from_buffer ? 0 : kChunk);
      for (int64_t c = b; c < e; ++c) {
        if (from_buffer) {
          const uint32_t key = candidate_key(cand.data[c]);
          local[rd.bin(key)] += rd.matches(key);
          continue;
        }
        const Chunk& chunk = s.chunks[c];
        const int64_t kept = s.keys_under(chunk, rd, keys.data());
        for (int64_t i = 0; i < kept; ++i) ++local[rd.bin(keys[i])];
        if (fill) {  // past the capacity (a state that lied): counted, not written
          const int64_t at = stored.fetch_add(kept, std::memory_order_relaxed);
          const int64_t room = std::clamp<int64_t>(cand.capacity - at, 0, kept);
          for (int64_t i = 0; i < room; ++i) cand.data[at + i] = candidate(chunk.index, keys[i]);
        }
      }
      std::lock_guard<std::mutex> lock(mu);
      for (int64_t i = 0; i < size; ++i) out[i] += local[i];
    });
  });
  if (fill) st[kStateCandidates] = stored.load();
}

void radix_select_cpu(const at::Tensor& state, const at::Tensor& hist, int64_t digit) {
  const char* op = "radix_select_";
  check_state(state, op);
  check_digit(digit, op);
  check_buffer(hist, at::kLong, radix_hist_size(digit), kCPU, op, "hist");
  check_radix_writes({}, state, hist, /*hist_written=*/false, std::nullopt, op);
  int64_t* st = state.data_ptr<int64_t>();
  const DigitChoice choice = choose_digit(hist.const_data_ptr<int64_t>(), radix_bins(digit), st[kStateKLeft]);
  st[kStatePrefix] = (st[kStatePrefix] << kRadixWidth[digit]) | choice.digit;
  st[kStateKLeft] -= choice.greater;
  st[kStateTies] = choice.ties;
}

// Per chunk, how many keys equal the k-th one; all zero when every such key is taken (then
// nothing needs them).
at::Tensor radix_tie_counts_cpu(at::TensorList scores, const at::Tensor& state, bool absolute,
                                const std::optional<at::Tensor>& candidates) {
  const char* op = "radix_tie_counts";
  const Scores s(scores, absolute, op);
  check_state(state, op);
  const Candidates cand(candidates, op);
  const int64_t* st = state.const_data_ptr<int64_t>();
  auto ties = at::zeros({s.num_chunks()}, at::TensorOptions().dtype(at::kLong));
  if (st[kStateKLeft] == st[kStateTies]) return ties;
  const uint32_t kth = static_cast<uint32_t>(st[kStatePrefix]);
  int64_t* out = ties.data_ptr<int64_t>();
  if (cand.usable(st)) {
    for (int64_t i = 0; i < st[kStateCandidates]; ++i) {
      const int64_t c = candidate_chunk(cand.data[i]);
      if (candidate_key(cand.data[i]) == kth && c >= 0 && c < s.num_chunks()) ++out[c];  // never past the chunks
    }
    return ties;
  }
  parallel_chunks(s.chunks, [&](const Chunk& c) {
    uint32_t keys[kChunk];
    s.keys(c, keys);
    out[c.index] = count_equal(keys, c.end - c.begin, kth);
  });
  return ties;
}

std::tuple<at::Tensor, at::Tensor> radix_mask_cpu(at::TensorList scores, const at::Tensor& state,
                                                  const at::Tensor& ties, const at::Tensor& ties_before,
                                                  bool absolute) {
  const char* op = "radix_mask";
  const Scores s(scores, absolute, op);
  check_state(state, op);
  check_buffer(ties, at::kLong, s.num_chunks(), kCPU, op, "ties");
  check_buffer(ties_before, at::kLong, s.num_chunks(), kCPU, op, "ties_before");
  const int64_t* st = state.const_data_ptr<int64_t>();
  const uint32_t kth = static_cast<uint32_t>(st[kStatePrefix]);
  const int64_t k_left = st[kStateKLeft];
  const bool all_ties = k_left == st[kStateTies];
  auto bits = at::empty({s.num_chunks() * kChunkBytes}, at::TensorOptions().dtype(at::kByte));
  auto counts = at::empty({s.num_chunks()}, at::TensorOptions().dtype(at::kInt));
  uint8_t* out = bits.data_ptr<uint8_t>();
  int32_t* cnt = counts.data_ptr<int32_t>();
  const int64_t* here = ties.const_data_ptr<int64_t>();
  const int64_t* before = ties_before.const_data_ptr<int64_t>();
  parallel_chunks(s.chunks, [&](const Chunk& c) {
    uint8_t* b = out + c.index * kChunkBytes;
    if (k_left <= 0) {  // k = 0: the state was never narrowed, nothing is taken
      std::memset(b, 0, kChunkBytes);
      cnt[c.index] = 0;
      return;
    }
    uint32_t keys[kChunk];
    s.keys(c, keys);
    const int64_t quota = all_ties ? 0 : tie_quota(k_left, before[c.index], here[c.index]);
    cnt[c.index] = mask_words(keys, c.end - c.begin, kth, all_ties, quota, b);
  });
  return {bits, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(fsam, CPU, m) {
  m.impl("radix_histogram_", &radix_histogram_cpu);
  m.impl("radix_select_", &radix_select_cpu);
  m.impl("radix_tie_counts", &radix_tie_counts_cpu);
  m.impl("radix_mask", &radix_mask_cpu);
}

}  // namespace fsam
