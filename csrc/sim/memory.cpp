// The emulator's global memory (memory.h): op scopes and the storages given to them, the memcheck,
// the race check between blocks, and the traffic records that fsam_sim::sim_traffic_start/stop
// hand to fsam_kernels.traffic.
#include "memory.h"

#include "simt.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <dlfcn.h>
#include <link.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <sstream>

namespace fsam::sim {
namespace {

constexpr const char* kKindName[3] = {"read", "write", "atomic"};
constexpr uint32_t kSeveral = 0xffffffffu;  // in the race shadow: more than one block

// ---- op scopes: per host thread, innermost last

struct Scope {
  std::string op;
  int64_t call, elements, tensors;
  std::vector<Buffer> buffers;  // disjoint
};
thread_local std::vector<std::unique_ptr<Scope>> t_scopes;
std::atomic<int64_t> g_calls{0};

// ---- records

struct BufferRecord {
  std::string label;
  int64_t sectors_read, sectors_written;
};
struct Row {
  std::string op, kind, kernel;
  int64_t call = -1, grid = 0, block = 0, elements = 0, tensors = 0, transfer_bytes = 0;
  Traffic traffic;
  int64_t dram_read = 0, dram_written = 0;
  std::vector<BufferRecord> buffers;
};
std::atomic<bool> g_recording{false};
std::mutex g_rows_mutex;
std::vector<Row> g_rows;

void push(Row row) {
  const std::lock_guard<std::mutex> lock(g_rows_mutex);
  g_rows.push_back(std::move(row));
}

// ---- the module's own memory (code, constants, statics)

struct Segments {
  std::vector<std::pair<uintptr_t, uintptr_t>> ranges;
  uintptr_t base = 0;
};
FSAM_SIM_UNCHECKED int find_segments(dl_phdr_info* info, size_t, void* data) {
  auto* s = static_cast<Segments*>(data);
  const auto code = reinterpret_cast<uintptr_t>(&find_segments);
  std::vector<std::pair<uintptr_t, uintptr_t>> loads;
  bool ours = false;
  for (int k = 0; k < info->dlpi_phnum; ++k) {
    const auto& ph = info->dlpi_phdr[k];
    if (ph.p_type != PT_LOAD) continue;
    const uintptr_t lo = info->dlpi_addr + ph.p_vaddr;
    loads.emplace_back(lo, lo + ph.p_memsz);
    ours = ours || (lo <= code && code < lo + ph.p_memsz);
  }
  if (!ours) return 0;
  s->ranges = loads;
  s->base = info->dlpi_addr;
  return 1;
}
FSAM_SIM_UNCHECKED const Segments& segments() {
  static const Segments s = [] {
    Segments found;
    dl_iterate_phdr(&find_segments, &found);
    return found;
  }();
  return s;
}

FSAM_SIM_UNCHECKED std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (const char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    if (static_cast<unsigned char>(c) >= 0x20) out += c;
  }
  return out + "\"";
}

FSAM_SIM_UNCHECKED std::string json_triple(const int64_t (&v)[3]) {
  return "[" + std::to_string(v[0]) + "," + std::to_string(v[1]) + "," + std::to_string(v[2]) + "]";
}

FSAM_SIM_UNCHECKED std::string json_row(const Row& r) {
  const Traffic& t = r.traffic;
  std::string s = "{\"op\":" + json_string(r.op) + ",\"call\":" + std::to_string(r.call) +
                  ",\"kind\":" + json_string(r.kind) + ",\"kernel\":" + json_string(r.kernel) +
                  ",\"grid\":" + std::to_string(r.grid) + ",\"block\":" + std::to_string(r.block) +
                  ",\"elements\":" + std::to_string(r.elements) + ",\"tensors\":" + std::to_string(r.tensors) +
                  ",\"transfer_bytes\":" + std::to_string(r.transfer_bytes) + ",\"requests\":" +
                  json_triple(t.requests) + ",\"bytes\":" + json_triple(t.bytes) + ",\"sectors\":" +
                  json_triple(t.sectors) + ",\"ideal\":" + json_triple(t.ideal) +
                  ",\"atomics\":" + std::to_string(t.atomics) + ",\"shared_accesses\":" +
                  std::to_string(t.shared_accesses) + ",\"shared_bytes\":" + std::to_string(t.shared_bytes) +
                  ",\"dram_read\":" + std::to_string(r.dram_read) + ",\"dram_written\":" +
                  std::to_string(r.dram_written) + ",\"buffers\":[";
  for (size_t i = 0; i < r.buffers.size(); ++i) {
    const auto& b = r.buffers[i];
    s += (i ? "," : "") + std::string("[") + json_string(b.label) + "," + std::to_string(b.sectors_read) + "," +
         std::to_string(b.sectors_written) + "]";
  }
  return s + "]}";
}

void sim_traffic_start() {
  TORCH_CHECK(!g_recording.exchange(true), "cuda-sim: the traffic is already being recorded");
  const std::lock_guard<std::mutex> lock(g_rows_mutex);
  g_rows.clear();
}

// The rows recorded since sim_traffic_start, as a JSON list in a uint8 tensor.
at::Tensor sim_traffic_stop() {
  TORCH_CHECK(g_recording.exchange(false), "cuda-sim: the traffic is not being recorded");
  std::string text = "[";
  {
    const std::lock_guard<std::mutex> lock(g_rows_mutex);
    for (size_t i = 0; i < g_rows.size(); ++i) text += (i ? ",\n" : "") + json_row(g_rows[i]);
    g_rows.clear();
  }
  text += "]";
  auto out = at::empty({static_cast<int64_t>(text.size())}, at::TensorOptions().dtype(at::kByte));
  std::memcpy(out.data_ptr<uint8_t>(), text.data(), text.size());
  return out;
}

}  // namespace

// ---- op scopes

OpScope::OpScope(const char* op, int64_t elements, int64_t tensors) {
  t_scopes.push_back(std::make_unique<Scope>(Scope{op, g_calls.fetch_add(1), elements, tensors, {}}));
}
OpScope::~OpScope() { t_scopes.pop_back(); }

void give(const void* data, size_t bytes, const std::string& label) {
  if (t_scopes.empty() || data == nullptr || bytes == 0) return;
  auto& buffers = t_scopes.back()->buffers;
  const auto lo = reinterpret_cast<uintptr_t>(data), hi = lo + bytes;
  std::erase_if(buffers, [&](const Buffer& b) { return b.lo < hi && lo < b.hi; });
  buffers.push_back({lo, hi, label});
}

std::string argument_label(size_t index, int64_t item) {
  std::string name = "argument " + std::to_string(index);
  if (!t_scopes.empty()) {
    const auto op = c10::Dispatcher::singleton().findSchema({"fsam_sim::" + t_scopes.back()->op, ""});
    if (op.has_value() && index < op->schema().arguments().size()) name = op->schema().arguments()[index].name();
  }
  return item < 0 ? name : name + "[" + std::to_string(item) + "]";
}

void transfer(Transfer kind, size_t bytes) {
  if (!g_recording.load()) return;
  Row row;
  row.kind = kind == Transfer::kFill ? "fill" : kind == Transfer::kCopy ? "copy" : kind == Transfer::kSync ? "sync" : "aten";
  row.kernel = row.kind;
  if (!t_scopes.empty()) {
    const Scope& s = *t_scopes.back();
    row.op = s.op, row.call = s.call, row.elements = s.elements, row.tensors = s.tensors;
  }
  row.transfer_bytes = static_cast<int64_t>(bytes);
  push(std::move(row));
}

// ---- the module

// The segments as plain arrays, for the hot path.
struct ModuleRanges {
  static constexpr int kMax = 16;
  uintptr_t lo[kMax] = {}, hi[kMax] = {};
  int count = 0;
};
FSAM_SIM_UNCHECKED const ModuleRanges& module_ranges() {
  static const ModuleRanges r = [] {
    ModuleRanges found;
    for (const auto& [lo, hi] : segments().ranges) {
      TORCH_CHECK(found.count < ModuleRanges::kMax, "cuda-sim: more loaded segments than ", ModuleRanges::kMax);
      found.lo[found.count] = lo;
      found.hi[found.count++] = hi;
    }
    return found;
  }();
  return r;
}

FSAM_SIM_UNCHECKED bool in_module(uintptr_t addr) {
  const ModuleRanges& r = module_ranges();
  for (int k = 0; k < r.count; ++k)
    if (r.lo[k] <= addr && addr < r.hi[k]) return true;
  return false;
}

FSAM_SIM_UNCHECKED uintptr_t module_offset(const void* pc) {
  Dl_info info;
  return reinterpret_cast<uintptr_t>(pc) - (dladdr(pc, &info) != 0 ? reinterpret_cast<uintptr_t>(info.dli_fbase) : 0);
}

// ---- counters

FSAM_SIM_UNCHECKED void Traffic::add(const Traffic& o) {
  for (int k = 0; k < 3; ++k) {
    requests[k] += o.requests[k];
    bytes[k] += o.bytes[k];
    sectors[k] += o.sectors[k];
    ideal[k] += o.ideal[k];
  }
  atomics += o.atomics;
  shared_accesses += o.shared_accesses;
  shared_bytes += o.shared_bytes;
}

FSAM_SIM_UNCHECKED void BlockLog::reset(unsigned threads) {
  records.clear();
  sites.clear();
  instances.assign(threads, {});
  traffic = Traffic{};
}

FSAM_SIM_UNCHECKED uint32_t BlockLog::site(uintptr_t pc) {
  for (uint32_t i = 0; i < sites.size(); ++i)
    if (sites[i] == pc) return i;
  TORCH_CHECK(sites.size() < (1u << 16), "cuda-sim: more than 65536 global access sites in one kernel");
  sites.push_back(pc);
  return static_cast<uint32_t>(sites.size() - 1);
}

// ---- one launch

struct LaunchMemory::State {
  std::vector<std::atomic<uint64_t>> read, written;  // one bit per sector (when recording)
  std::atomic<std::atomic<uint64_t>*> shadow{nullptr};  // per byte: (reader << 32) | writer, block + 1
  ~State() { std::free(shadow.load()); }
};

FSAM_SIM_UNCHECKED LaunchMemory::LaunchMemory(std::string kernel, uintptr_t params_lo, uintptr_t params_hi,
                                              bool race_check, const MemoryMutation& mutation)
    : kernel_(std::move(kernel)),
      params_lo_(params_lo),
      params_hi_(params_hi),
      race_check_(race_check),
      recording_(g_recording.load()),
      mutation_(mutation) {
  if (!t_scopes.empty()) {
    buffers_ = t_scopes.back()->buffers;
    op_ = t_scopes.back()->op;
    call_ = t_scopes.back()->call;
    elements_ = t_scopes.back()->elements;
    tensors_ = t_scopes.back()->tensors;
  }
  std::sort(buffers_.begin(), buffers_.end(), [](const Buffer& a, const Buffer& b) { return a.lo < b.lo; });
  for (const Buffer& b : buffers_) {
    auto s = std::make_unique<State>();
    if (recording_) {
      const size_t words = ((b.hi - b.lo + kSector - 1) / kSector + 63) / 64;
      s->read = std::vector<std::atomic<uint64_t>>(words);
      s->written = std::vector<std::atomic<uint64_t>>(words);
    }
    states_.push_back(s.get());
    state_.push_back(std::move(s));
    lo_.push_back(b.lo);
    hi_.push_back(b.hi);
  }
  lo_data_ = lo_.data();
  hi_data_ = hi_.data();
  state_data_ = states_.data();
  count_ = static_cast<int>(buffers_.size());
}

LaunchMemory::~LaunchMemory() = default;

FSAM_SIM_UNCHECKED int LaunchMemory::find(uintptr_t addr) const {
  int lo = 0, hi = count_;  // the first buffer starting above addr, by hand (see access())
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (addr < lo_data_[mid]) hi = mid; else lo = mid + 1;
  }
  return lo > 0 && addr < hi_data_[lo - 1] ? lo - 1 : -1;
}

FSAM_SIM_UNCHECKED std::string LaunchMemory::outside(unsigned block, unsigned thread, uintptr_t addr, size_t size,
                                                     Access kind, uintptr_t pc) const {
  std::ostringstream s;
  s << "block " << block << " thread " << thread << ": an invalid global " << kKindName[static_cast<int>(kind)]
    << " of " << size << " bytes (code at _sim+0x" << std::hex << module_offset(reinterpret_cast<const void*>(pc))
    << std::dec << "): ";
  const Buffer* nearest = nullptr;
  uintptr_t distance = UINTPTR_MAX;
  for (const Buffer& b : buffers_) {
    const uintptr_t d = addr < b.lo ? b.lo - addr : addr + size > b.hi ? addr + size - b.hi : 0;
    if (d < distance) distance = d, nearest = &b;
  }
  if (nearest == nullptr) return s.str() + "the op gave its launches no storage";
  const uintptr_t bytes = nearest->hi - nearest->lo;
  if (addr < nearest->lo)
    s << distance << " bytes before the start of " << nearest->label;
  else if (addr >= nearest->hi)
    s << addr - nearest->hi << " bytes past the end of " << nearest->label;
  else
    s << "at offset " << addr - nearest->lo << " of " << nearest->label << ", " << distance << " bytes past its end";
  s << " (" << bytes << " bytes), the nearest storage given to the op";
  return s.str();
}

FSAM_SIM_UNCHECKED bool LaunchMemory::access(unsigned block, unsigned thread, uintptr_t addr, size_t size,
                                             Access kind, uintptr_t pc, BlockLog& log, std::string& error) {
  if ((params_lo_ <= addr && addr < params_hi_) || in_module(addr)) return true;
  const int i = find(addr);
  addr += static_cast<uintptr_t>(mutation_.shift);  // a mutated index stays in its array or is refused
  if (i < 0 || addr < lo_data_[i] || addr + size > hi_data_[i]) {
    error = outside(block, thread, addr, size, kind, pc);
    return false;
  }
  if (!race_check_ && !recording_) return true;
  const Buffer& b = buffers_[i];
  State& st = *state_data_[i];
  const uint64_t offset = addr - b.lo;
  const Access seen = kind == Access::kAtomic && mutation_.plain_atomics ? Access::kWrite : kind;
  if (race_check_ && seen != Access::kAtomic) {
    std::atomic<uint64_t>* shadow = st.shadow.load(std::memory_order_acquire);
    if (shadow == nullptr) {
      const std::lock_guard<std::mutex> lock(mutex_);
      shadow = st.shadow.load();
      if (shadow == nullptr) {
        shadow = static_cast<std::atomic<uint64_t>*>(std::calloc(b.hi - b.lo, sizeof(uint64_t)));
        TORCH_CHECK(shadow != nullptr, "cuda-sim: no memory for the race shadow of ", b.label);
        st.shadow.store(shadow, std::memory_order_release);
      }
    }
    const uint32_t me = block + 1;
    for (uint64_t j = offset; j < offset + size; ++j) {
      std::atomic<uint64_t>& e = shadow[j];
      uint64_t v = e.load(std::memory_order_relaxed);
      for (;;) {
        const uint32_t writer = static_cast<uint32_t>(v), reader = static_cast<uint32_t>(v >> 32);
        const uint32_t other = writer != 0 && writer != me ? writer : seen == Access::kWrite && reader != 0 && reader != me ? reader : 0;
        if (other != 0) {
          std::ostringstream s;
          s << "a data race on global memory: block " << block << " thread " << thread << " "
            << (seen == Access::kWrite ? "writes" : "reads") << " byte " << j << " of " << b.label << ", which "
            << (other == kSeveral ? std::string("several blocks") : "block " + std::to_string(other - 1))
            << (other == writer ? " wrote" : " read") << " in the same launch, neither atomically (code at _sim+0x"
            << std::hex << module_offset(reinterpret_cast<const void*>(pc)) << ")";
          error = s.str();
          return false;
        }
        uint64_t next = v;
        if (seen == Access::kRead) {
          const uint32_t r = reader == 0 || reader == me ? me : kSeveral;
          next = (uint64_t{r} << 32) | writer;
        } else {
          next = (uint64_t{reader} << 32) | me;
        }
        if (next == v || e.compare_exchange_weak(v, next, std::memory_order_relaxed)) break;
      }
    }
  }
  if (recording_) {
    const uint32_t s = log.site(pc);
    auto& runs = log.instances[thread];
    if (runs.size() <= s) runs.resize(s + 1, 0);
    const uint64_t instance = runs[s]++;
    log.records.push_back({(uint64_t{thread / 32} << 54) | (uint64_t{s} << 38) | instance, offset,
                           static_cast<uint32_t>(i), static_cast<uint16_t>(size), static_cast<uint8_t>(kind)});
    if (kind == Access::kAtomic) ++log.traffic.atomics;
    for (uint64_t sec = offset / kSector; sec <= (offset + size - 1) / kSector; ++sec) {
      const uint64_t bit = uint64_t{1} << (sec % 64);
      if (kind != Access::kWrite) st.read[sec / 64].fetch_or(bit, std::memory_order_relaxed);
      if (kind != Access::kRead) st.written[sec / 64].fetch_or(bit, std::memory_order_relaxed);
    }
  }
  return true;
}

FSAM_SIM_UNCHECKED void LaunchMemory::end_block(BlockLog& log) {
  if (!recording_) return;
  auto& recs = log.records;
  std::sort(recs.begin(), recs.end(), [](const BlockLog::Record& a, const BlockLog::Record& b) {
    return a.key != b.key ? a.key < b.key : a.buffer != b.buffer ? a.buffer < b.buffer : a.offset < b.offset;
  });
  std::vector<std::pair<uint32_t, uint64_t>> sectors;
  for (size_t first = 0; first < recs.size();) {
    size_t last = first;
    while (last < recs.size() && recs[last].key == recs[first].key) ++last;
    const int k = recs[first].kind;
    Traffic& t = log.traffic;
    ++t.requests[k];
    sectors.clear();
    uint64_t distinct = 0, end = 0;
    uint32_t buffer = UINT32_MAX;
    for (size_t j = first; j < last; ++j) {  // sorted by buffer, then offset: the union of the lanes' bytes
      const auto& r = recs[j];
      for (uint64_t sec = r.offset / kSector; sec <= (r.offset + r.size - 1) / kSector; ++sec)
        sectors.emplace_back(r.buffer, sec);
      if (r.buffer != buffer) buffer = r.buffer, end = 0;
      const uint64_t from = std::max(end, r.offset), to = r.offset + r.size;
      if (to > from) distinct += to - from;
      end = std::max(end, to);
    }
    std::sort(sectors.begin(), sectors.end());
    t.sectors[k] += std::unique(sectors.begin(), sectors.end()) - sectors.begin();
    t.bytes[k] += static_cast<int64_t>(distinct);
    t.ideal[k] += static_cast<int64_t>((distinct + kSector - 1) / kSector);
    first = last;
  }
  const std::lock_guard<std::mutex> lock(mutex_);
  traffic_.add(log.traffic);
}

FSAM_SIM_UNCHECKED void LaunchMemory::finish(unsigned grid, unsigned block) {
  if (!recording_) return;
  Row row;
  row.op = op_;
  row.call = call_;
  row.kind = "kernel";
  row.kernel = kernel_;
  row.grid = grid;
  row.block = block;
  row.elements = elements_;
  row.tensors = tensors_;
  row.traffic = traffic_;
  for (size_t i = 0; i < buffers_.size(); ++i) {
    int64_t r = 0, w = 0;
    for (const auto& x : state_[i]->read) r += __builtin_popcountll(x.load());
    for (const auto& x : state_[i]->written) w += __builtin_popcountll(x.load());
    row.dram_read += r;
    row.dram_written += w;
    if (r + w > 0) row.buffers.push_back({buffers_[i].label, r, w});
  }
  push(std::move(row));
}

TORCH_LIBRARY_FRAGMENT(fsam_sim, m) {
  m.def("sim_traffic_start() -> ()", &sim_traffic_start);
  m.def("sim_traffic_stop() -> Tensor", &sim_traffic_stop);
}

}  // namespace fsam::sim
