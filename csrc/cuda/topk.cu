// Top-k mask selection by radix select on the order-preserving keys, as the stages that
// fsam_kernels/radix_topk.py drives (see csrc/cpu/topk.cpp): per digit a histogram pass (block-
// private histograms in shared memory, each flushed once) and a one-block kernel choosing the digit
// on the device; the per-chunk count of keys equal to the k-th one; the pass writing the packed mask
// and per-chunk popcounts (ties ranked by warp ballots and prefix sums).  With a candidate buffer, the
// digit-1 pass appends the keys under the prefix (a block scan places each chunk's run, one atomic
// reserves it), and digit 2 and the tie count read the buffer instead of the scores when it holds
// them: the chunk kernels then return at once.  No host sync anywhere.
#include "multi_tensor.cuh"

#include <fsam/checks.h>
#include <fsam/dispatch.h>
#include <fsam/functors.h>

namespace fsam::cuda {
namespace {

// Calls f(key, x) for each of this thread's share of a chunk's scores.
template <typename T, bool kAbsolute, typename F>
__device__ inline void for_each_key(const T* s, int n, const F& f) {
  constexpr int N = kPack<T>;
  const OrderKey<kAbsolute> key;
  for_each_pack<N>(n, aligned(s, N * sizeof(T)), [&](int i, auto width) {
    constexpr int W = decltype(width)::value;
    T v[W];
    load<W>(s + i, v);
#pragma unroll
    for (int j = 0; j < W; ++j) {
      const float x = static_cast<float>(v[j]);
      f(key(x), x);
    }
  });
}

// The candidate buffer (data null: none).
struct Candidates {
  int64_t* data;
  int64_t capacity;
  // Whether the digit-1 pass left every key under the prefix in it.
  __device__ bool usable(const int64_t* state) const {
    return data != nullptr && candidates_fit(state[kStateCandidates], capacity);
  }
};

// The per-block histogram in shared memory: cleared, then flushed once (non-zero bins only).
template <int kSize>
__device__ inline void clear_bins(uint32_t* local) {
  for (int i = threadIdx.x; i < kSize; i += kBlock) local[i] = 0;
  __syncthreads();
}
template <int kSize>
__device__ inline void flush_bins(const uint32_t* local, unsigned long long* hist) {
  __syncthreads();
  for (int i = threadIdx.x; i < kSize; i += kBlock)
    if (local[i] != 0) atomicAdd(&hist[i], static_cast<unsigned long long>(local[i]));
}

// Digit 1 with a buffer: fill it if the keys under the prefix (every process's) fit, else mark it
// unused; digit 2: count nothing if the buffer holds the keys (buffer_histogram_kernel does).
template <typename T, bool kAbsolute, int kDigit>
__global__ void __launch_bounds__(kBlock, kMinBlocksPerSm) histogram_kernel(TensorTable table, int64_t* state,
                                                            unsigned long long* hist, Candidates cand) {
  constexpr int kBins = static_cast<int>(radix_bins(kDigit));
  __shared__ uint32_t local[kBins + 1];
  __shared__ int scratch[kWarps];
  __shared__ int64_t run;  // where this block's candidates of a chunk start
  if (kDigit == 2 && cand.usable(state)) return;  // the same for the whole block
  const bool fill = kDigit == 1 && cand.data != nullptr && candidates_fit(state[kStateTies], cand.capacity);
  if (kDigit == 1 && cand.data != nullptr && !fill && blockIdx.x == 0 && threadIdx.x == 0)
    state[kStateCandidates] = cand.capacity + 1;
  clear_bins<kBins + 1>(local);
  const RadixDigit<kDigit> rd{static_cast<uint32_t>(state[kStatePrefix])};
  uint32_t nan = 0;
  for (int64_t c = blockIdx.x; c < table.chunks; c += gridDim.x) {
    const Chunk ch = locate(table, c);
    const T* s = chunk_data<const T>(table, 0, ch);
    int found = 0;
    for_each_key<T, kAbsolute>(s, ch.n, [&](uint32_t key, float x) {
      if constexpr (kDigit == 0) {  // every key counts; NaN scores also in the last entry
        nan += x != x;
        atomicAdd(&local[rd.bin(key)], 1u);
      } else if (rd.matches(key)) {
        atomicAdd(&local[rd.bin(key)], 1u);
        ++found;
      }
    });
    if (!fill) continue;  // the same for the whole block
    const Scan place = block_scan(found, scratch);
    if (place.total == 0) continue;
    if (threadIdx.x == 0)
      run = static_cast<int64_t>(atomicAdd(reinterpret_cast<unsigned long long*>(state + kStateCandidates),
                                           static_cast<unsigned long long>(place.total)));
    __syncthreads();
    int64_t slot = run + place.before;
    // the chunk again (from cache), each thread its keys in the order it counted them; past the
    // capacity (a state that lied about the keys under the prefix) they are counted, not written
    for_each_key<T, kAbsolute>(s, ch.n, [&](uint32_t key, float) {
      if (!rd.matches(key)) return;
      if (slot >= 0 && slot < cand.capacity) cand.data[slot] = candidate(ch.index, key);
      ++slot;
    });
    __syncthreads();  // `run` is read before the next chunk's
  }
  if (nan != 0) atomicAdd(&local[kBins], nan);
  flush_bins<kBins + 1>(local, hist);
}

// Over the candidate buffer, when it holds the keys under the prefix: what histogram_kernel counts.
template <int kDigit>
__global__ void __launch_bounds__(kBlock, kMinBlocksPerSm) buffer_histogram_kernel(const int64_t* state,
                                                                   unsigned long long* hist, Candidates cand) {
  constexpr int kBins = static_cast<int>(radix_bins(kDigit));
  __shared__ uint32_t local[kBins];
  if (!cand.usable(state)) return;
  clear_bins<kBins>(local);
  const RadixDigit<kDigit> rd{static_cast<uint32_t>(state[kStatePrefix])};
  const int64_t count = state[kStateCandidates];
  for (int64_t i = blockIdx.x * int64_t{kBlock} + threadIdx.x; i < count; i += int64_t{gridDim.x} * kBlock) {
    const uint32_t key = candidate_key(cand.data[i]);
    if (rd.matches(key)) atomicAdd(&local[rd.bin(key)], 1u);
  }
  flush_bins<kBins>(local, hist);
}

// One block: thread t holds bins [t * kPer, (t + 1) * kPer); the one whose bins hold the k_left-th
// largest key runs choose_digit over them, which gives what the sequential choice over all bins does.
template <int kDigit>
__global__ void __launch_bounds__(kBlock, kMinBlocksPerSm) select_kernel(int64_t* state, const int64_t* hist) {
  constexpr int kWidth = kRadixWidth[kDigit];
  constexpr int kPer = static_cast<int>(radix_bins(kDigit)) / kBlock;
  static_assert(kPer * kBlock == radix_bins(kDigit), "the bins split evenly over the threads");
  __shared__ int64_t scratch[kWarps];
  const int64_t* mine = hist + threadIdx.x * kPer;
  int64_t total = 0;
#pragma unroll
  for (int i = 0; i < kPer; ++i) total += mine[i];
  // above: the keys counted by the threads after this one (higher bins), in a fixed order
  int64_t above = total;
#pragma unroll
  for (int o = 1; o < kWarp; o *= 2) {
    const int64_t y = __shfl_down_sync(0xffffffffu, above, o);
    if (lane_id() + o < kWarp) above += y;
  }
  if (lane_id() == 0) scratch[warp_id()] = above;
  __syncthreads();
  above -= total;
  for (int w = warp_id() + 1; w < kWarps; ++w) above += scratch[w];
  const int64_t k_left = state[kStateKLeft];
  const int64_t prefix = state[kStatePrefix];
  __syncthreads();  // every thread has read the state before one writes it
  const bool first = threadIdx.x == 0, last = threadIdx.x == kBlock - 1;
  // exactly one thread: the k_left-th key lies in its bins (k_left <= 0: the top bin, as the
  // sequential choice stops there; k_left past every key: bin 0, where it runs out)
  if ((above < k_left || last) && (k_left <= above + total || first)) {
    const DigitChoice choice = choose_digit(mine, kPer, k_left - above);
    state[kStatePrefix] = (prefix << kWidth) | (threadIdx.x * kPer + choice.digit);
    state[kStateKLeft] = k_left - above - choice.greater;
    state[kStateTies] = choice.ties;
  }
}

// Whether some but not all keys equal to the k-th one are taken (else nobody needs their counts).
__device__ inline bool partial_ties(const int64_t* state) { return state[kStateKLeft] != state[kStateTies]; }

// Per chunk, how many keys equal the k-th one; 0 when every such key is taken, and 0 where the
// candidate buffer holds the keys (buffer_tie_count_kernel then adds the counts).
template <typename T, bool kAbsolute>
__global__ void __launch_bounds__(kBlock, kMinBlocksPerSm) tie_count_kernel(TensorTable table, const int64_t* state,
                                                            int64_t* ties, Candidates cand) {
  __shared__ int scratch[kWarps];
  const bool here = partial_ties(state) && !cand.usable(state);
  const auto kth = static_cast<uint32_t>(state[kStatePrefix]);
  for (int64_t c = blockIdx.x; c < table.chunks; c += gridDim.x) {
    const Chunk ch = locate(table, c);
    int count = 0;
    if (here) for_each_key<T, kAbsolute>(chunk_data<const T>(table, 0, ch), ch.n, [&](uint32_t key, float) {
      count += key == kth;
    });
    count = block_sum(count, scratch);
    if (threadIdx.x == 0) ties[ch.index] = count;
  }
}

__global__ void __launch_bounds__(kBlock, kMinBlocksPerSm) buffer_tie_count_kernel(const int64_t* state, int64_t* ties,
                                                                   int64_t chunks, Candidates cand) {
  if (!partial_ties(state) || !cand.usable(state)) return;
  const auto kth = static_cast<uint32_t>(state[kStatePrefix]);
  const int64_t count = state[kStateCandidates];
  for (int64_t i = blockIdx.x * int64_t{kBlock} + threadIdx.x; i < count; i += int64_t{gridDim.x} * kBlock) {
    const int64_t c = candidate_chunk(cand.data[i]);
    if (candidate_key(cand.data[i]) == kth && c >= 0 && c < chunks)  // never past the chunks
      atomicAdd(reinterpret_cast<unsigned long long*>(ties + c), 1ull);
  }
}

// The packed mask and popcount of each chunk.  Warp w reads the chunk's mask words kWarpWords * w
// on, lane l element l of each: ballots make the words of keys above and equal to the k-th, and the
// ties before a word (a block-wide prefix sum) say how many of its own it may take.
template <typename T, bool kAbsolute>
__global__ void __launch_bounds__(kBlock, kMinBlocksPerSm) mask_kernel(TensorTable table, const int64_t* state, const int64_t* ties,
                                                       const int64_t* ties_before, uint8_t* bits, int32_t* counts) {
  __shared__ int scratch[kWarps];
  const OrderKey<kAbsolute> key_of;
  const auto kth = static_cast<uint32_t>(state[kStatePrefix]);
  const int64_t k_left = state[kStateKLeft];
  const bool all_ties = k_left == state[kStateTies];
  for (int64_t c = blockIdx.x; c < table.chunks; c += gridDim.x) {
    const Chunk ch = locate(table, c);
    const T* s = chunk_data<const T>(table, 0, ch);
    uint32_t above = 0, tie = 0;  // lane j < kWarpWords: word kWarpWords * warp + j
#pragma unroll
    for (int j = 0; j < kWarpWords; ++j) {
      const int e = 32 * (warp_id() * kWarpWords + j) + lane_id();
      const uint32_t key = e < ch.n ? key_of(static_cast<float>(s[e])) : 0u;  // key 0: below every score
      const uint32_t a = __ballot_sync(0xffffffffu, e < ch.n && key > kth);
      const uint32_t t = __ballot_sync(0xffffffffu, e < ch.n && key == kth);
      if (lane_id() == j) above = a, tie = t;
    }
    const Scan before = block_scan(__popc(tie), scratch);  // ties in the chunk's words before this one
    uint32_t word = 0;
    if (k_left > 0) {  // k = 0: the state was never narrowed, nothing is taken
      uint32_t taken = tie;
      if (!all_ties) {  // ties go to the lowest flat indices: the chunks before, then the words before
        const int64_t quota = tie_quota(k_left, ties_before[ch.index], ties[ch.index]) - before.before;
        for (int64_t q = __popc(tie); q > quota && taken != 0; --q) taken &= ~(1u << (31 - __clz(taken)));
      }
      word = above | taken;
    }
    if (lane_id() < kWarpWords) {
      uint8_t* out = bits + ch.index * kChunkBytes + 4 * chunk_word();
#pragma unroll
      for (int b = 0; b < 4; ++b) out[b] = static_cast<uint8_t>(word >> (8 * b));
    }
    const int selected = block_sum(lane_id() < kWarpWords ? __popc(word) : 0, scratch);
    if (threadIdx.x == 0) counts[ch.index] = selected;
  }
}

struct Scores {
  ListChunks list;
  std::vector<at::ScalarType> dtypes;
  std::vector<const void*> data;
  c10::Device device;

  // The device is the scores' (the state's for an empty list); the state is checked here too.
  Scores(at::TensorList scores, const at::Tensor& state, const char* op)
      : list(scores),
        dtypes(dtypes_of(scores)),
        data(data_ptrs(scores)),
        device(scores.empty() ? state.device() : scores[0].device()) {
    check_buffer(state, at::kLong, kRadixStateSize, device, op, "state");
    check_float_list(scores, device, op, "scores");
  }

  // Calls f(scalar_t tag, absolute tag, table, grid) per dtype group.
  template <typename F>
  void launch(bool absolute, const F& f) const {
    for_each_group(list, dtypes, {data, {}}, device, [&](at::ScalarType dtype, const TensorTable& t, unsigned grid) {
      FSAM_DISPATCH_FLOATS(dtype, "radix_topk", [&] {
        if (absolute) {
          f(scalar_t{}, std::true_type{}, t, grid);
        } else {
          f(scalar_t{}, std::false_type{}, t, grid);
        }
      });
    });
  }
};

Candidates candidates_of(const std::optional<at::Tensor>& t, const c10::Device& device, const char* op) {
  if (!t.has_value()) return {nullptr, 0};
  check_buffer(*t, at::kLong, -1, device, op, "candidates");
  return {t->data_ptr<int64_t>(), t->numel()};
}

// A resident grid over the candidate buffer, one entry a thread.
unsigned buffer_grid(const Candidates& cand, const c10::Device& device) {
  return resident_grid((cand.capacity + kBlock - 1) / kBlock, kMaxChunksPerBlock, sm_count(device));
}

void radix_histogram_cuda(at::TensorList scores, const at::Tensor& state, int64_t digit, bool absolute,
                          const at::Tensor& hist, const std::optional<at::Tensor>& candidates) {
  const char* op = "radix_histogram_";
  check_digit(digit, op);
  const Scores s(scores, state, op);
  check_buffer(hist, at::kLong, radix_hist_size(digit), s.device, op, "hist");
  const Candidates cand = candidates_of(candidates, s.device, op);
  check_radix_writes(scores, state, hist, /*hist_written=*/true, candidates, op);
  const DeviceGuard guard(s.device);
  const Stream stream = current_stream();
  auto* out = reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>());
  int64_t* st = state.data_ptr<int64_t>();
  if (digit == 1 && cand.data != nullptr)  // the count the digit-1 kernels append from
    zero_async(st + kStateCandidates, sizeof(int64_t), stream);
  with_digit(digit, [&](auto d) {
    s.launch(absolute, [&](auto value, auto abs, const TensorTable& t, unsigned grid) {
      launch<histogram_kernel<decltype(value), decltype(abs)::value, decltype(d)::value>>(grid, stream, t, st, out,
                                                                                         cand);
    });
  });
  if (digit == 2 && cand.capacity > 0) {
    launch<buffer_histogram_kernel<2>>(buffer_grid(cand, s.device), stream, st, out, cand);
  }
}

void radix_select_cuda(const at::Tensor& state, const at::Tensor& hist, int64_t digit) {
  const char* op = "radix_select_";
  check_digit(digit, op);
  check_buffer(state, at::kLong, kRadixStateSize, state.device(), op, "state");
  check_buffer(hist, at::kLong, radix_hist_size(digit), state.device(), op, "hist");
  check_radix_writes({}, state, hist, /*hist_written=*/false, std::nullopt, op);
  const DeviceGuard guard(state.device());
  with_digit(digit, [&](auto d) {
    launch<select_kernel<decltype(d)::value>>(1, current_stream(), state.data_ptr<int64_t>(),
                                              hist.const_data_ptr<int64_t>());
  });
}

at::Tensor radix_tie_counts_cuda(at::TensorList scores, const at::Tensor& state, bool absolute,
                                 const std::optional<at::Tensor>& candidates) {
  const char* op = "radix_tie_counts";
  const Scores s(scores, state, op);
  const Candidates cand = candidates_of(candidates, s.device, op);
  auto ties = device_empty({s.list.total}, state.options(), "ties");  // every chunk is written
  const DeviceGuard guard(s.device);
  const Stream stream = current_stream();
  s.launch(absolute, [&](auto value, auto abs, const TensorTable& t, unsigned grid) {
    launch<tie_count_kernel<decltype(value), decltype(abs)::value>>(grid, stream, t, state.const_data_ptr<int64_t>(),
                                                                    ties.data_ptr<int64_t>(), cand);
  });
  if (cand.capacity > 0 && s.list.total > 0) {  // after the chunk kernels, which wrote zeros where it serves
    launch<buffer_tie_count_kernel>(buffer_grid(cand, s.device), stream, state.const_data_ptr<int64_t>(),
                                    ties.data_ptr<int64_t>(), s.list.total, cand);
  }
  return ties;
}

std::tuple<at::Tensor, at::Tensor> radix_mask_cuda(at::TensorList scores, const at::Tensor& state,
                                                   const at::Tensor& ties, const at::Tensor& ties_before,
                                                   bool absolute) {
  const char* op = "radix_mask";
  const Scores s(scores, state, op);
  check_buffer(ties, at::kLong, s.list.total, s.device, op, "ties");
  check_buffer(ties_before, at::kLong, s.list.total, s.device, op, "ties_before");
  auto bits = device_empty({s.list.total * kChunkBytes}, state.options().dtype(at::kByte), "mask_bits");  // every byte is written
  auto counts = device_empty({s.list.total}, state.options().dtype(at::kInt), "chunk_counts");
  const DeviceGuard guard(s.device);
  const Stream stream = current_stream();
  s.launch(absolute, [&](auto value, auto abs, const TensorTable& t, unsigned grid) {
    launch<mask_kernel<decltype(value), decltype(abs)::value>>(
        grid, stream, t, state.const_data_ptr<int64_t>(), ties.const_data_ptr<int64_t>(),
        ties_before.const_data_ptr<int64_t>(), bits.data_ptr<uint8_t>(), counts.data_ptr<int32_t>());
  });
  return {bits, counts};
}

}  // namespace

FSAM_CUDA_LIBRARY_IMPL(m) {
  FSAM_IMPL(m, "radix_histogram_", radix_histogram_cuda);
  FSAM_IMPL(m, "radix_select_", radix_select_cuda);
  FSAM_IMPL(m, "radix_tie_counts", radix_tie_counts_cuda);
  FSAM_IMPL(m, "radix_mask", radix_mask_cuda);
}

}  // namespace fsam::cuda
