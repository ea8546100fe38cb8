// The SIMT emulator behind simt.h: a launch runs its blocks on OS workers, one block at a time
// per worker, each block's threads as fibers that run until they wait (a barrier, a warp op) or
// return.  The scheduler decides the order (FSAM_SIM_ORDER: in-order, reversed or random per
// pass, seeded by FSAM_SIM_SEED) and when a warp whose lanes have all arrived at a warp op goes
// on (FSAM_SIM_RELEASE: eager, at once, before the other threads of the pass; or pass, at the end
// of the pass).  A barrier releases when every thread that has not returned waits at it.
//
// Races on shared memory are seen directly: this build is compiled with -fsanitize=thread, whose
// instrumentation calls the functions of tsan_callbacks.cpp (no sanitizer runtime is linked) at
// every access.  Accesses by a fiber to this module's thread-local block (where __shared__ arrays
// live) go through a shadow of 4-byte words: two threads touching a word in one barrier interval,
// one of them writing, not both atomically, is a data race; so is reading a word no thread of the
// block has written.
#include "fiber.h"
#include "memory.h"

#include <c10/util/Exception.h>

#include <dlfcn.h>
#include <link.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace fsam::sim {
namespace {

constexpr int kWarp = 32;
constexpr unsigned kMaxThreads = 1024;
constexpr size_t kStackBytes = size_t{64} << 10;  // per fiber, below a guard page

// ---- settings, read from the environment at each launch

enum class Order { kInOrder, kReversed, kRandom };

struct Site {
  std::string file;  // a suffix of the source's path
  int line;
  FSAM_SIM_UNCHECKED bool matches(const std::source_location& at) const {
    const size_t n = std::strlen(at.file_name());
    return static_cast<int>(at.line()) == line && n >= file.size() &&
           file.compare(0, file.size(), at.file_name() + n - file.size()) == 0;
  }
};

FSAM_SIM_UNCHECKED bool same_call(const std::source_location& a, const std::source_location& b) {
  return a.line() == b.line() && a.column() == b.column() && std::strcmp(a.file_name(), b.file_name()) == 0;
}

FSAM_SIM_UNCHECKED std::string str(const std::source_location& at) {
  const char* slash = std::strrchr(at.file_name(), '/');
  return std::string(slash != nullptr ? slash + 1 : at.file_name()) + ":" + std::to_string(at.line()) + ":" +
         std::to_string(at.column());
}

FSAM_SIM_UNCHECKED std::string hex(unsigned x) {
  std::ostringstream s;
  s << "0x" << std::hex << x;
  return s.str();
}

struct Config {
  int sms = 2;
  Order order = Order::kRandom;
  bool eager = true;
  uint64_t seed = 0;
  unsigned workers = 2;
  bool race_check = true;
  // Mutations, to prove the checks can fail: barriers skipped, shuffles reading one lane further,
  // a kernel's global accesses seen shifted by some bytes or its atomics as plain stores.
  std::vector<Site> skipped_barriers, shifted_shuffles;
  std::vector<std::pair<std::string, int64_t>> shifted_kernels;
  std::vector<std::string> plain_atomic_kernels;

  FSAM_SIM_UNCHECKED MemoryMutation memory_mutation(const std::string& kernel) const {
    MemoryMutation m;
    for (const auto& [name, bytes] : shifted_kernels)
      if (name == kernel) m.shift += bytes;
    for (const auto& name : plain_atomic_kernels) m.plain_atomics = m.plain_atomics || name == kernel;
    return m;
  }
};

FSAM_SIM_UNCHECKED const char* env(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? v : nullptr;
}

FSAM_SIM_UNCHECKED int64_t env_int(const char* name, int64_t fallback, int64_t lo, int64_t hi) {
  const char* v = env(name);
  if (v == nullptr) return fallback;
  char* end = nullptr;
  const long long x = std::strtoll(v, &end, 10);
  TORCH_CHECK(*end == '\0' && x >= lo && x <= hi, "cuda-sim: ", name, " must be an integer in [", lo, ", ", hi,
              "], got '", v, "'");
  return x;
}

// FSAM_SIM_MUTATE: comma-separated barrier@FILE:LINE, shuffle@FILE:LINE, shift@KERNEL:BYTES (the
// kernel's global accesses seen BYTES further) and plain@KERNEL (its atomics seen as plain stores);
// KERNEL is a kernel's name without its namespace and template arguments.
FSAM_SIM_UNCHECKED void parse_mutations(Config& c) {
  const char* v = env("FSAM_SIM_MUTATE");
  if (v == nullptr) return;
  std::stringstream all(v);
  std::string item;
  while (std::getline(all, item, ',')) {
    const size_t at = item.find('@'), colon = item.rfind(':');
    const std::string kind = item.substr(0, at);
    if (at != std::string::npos && kind == "plain" && at + 1 < item.size()) {
      c.plain_atomic_kernels.push_back(item.substr(at + 1));
      continue;
    }
    char* end = nullptr;
    const long n = colon == std::string::npos ? 0 : std::strtol(item.c_str() + colon + 1, &end, 10);
    const bool sited = kind == "barrier" || kind == "shuffle";
    TORCH_CHECK(at != std::string::npos && colon != std::string::npos && colon > at + 1 && *end == '\0' &&
                    (sited ? n > 0 : kind == "shift" && n != 0),
                "cuda-sim: FSAM_SIM_MUTATE entries are barrier@FILE:LINE, shuffle@FILE:LINE, shift@KERNEL:BYTES or "
                "plain@KERNEL, got '", item, "'");
    const std::string where = item.substr(at + 1, colon - at - 1);
    if (!sited) {
      c.shifted_kernels.emplace_back(where, n);
      continue;
    }
    const Site site{where, static_cast<int>(n)};
    (kind == "barrier" ? c.skipped_barriers : c.shifted_shuffles).push_back(site);
  }
}

FSAM_SIM_UNCHECKED Config read_config() {
  Config c;
  c.sms = static_cast<int>(env_int("FSAM_SIM_SMS", c.sms, 1, 4096));
  c.seed = static_cast<uint64_t>(env_int("FSAM_SIM_SEED", 0, 0, INT64_MAX));
  c.workers = static_cast<unsigned>(env_int("FSAM_SIM_WORKERS", c.workers, 1, 256));
  c.race_check = env_int("FSAM_SIM_RACECHECK", 1, 0, 1) == 1;
  if (const char* o = env("FSAM_SIM_ORDER")) {
    const std::string s(o);
    TORCH_CHECK(s == "in-order" || s == "reversed" || s == "random",
                "cuda-sim: FSAM_SIM_ORDER must be in-order, reversed or random, got '", s, "'");
    c.order = s == "in-order" ? Order::kInOrder : s == "reversed" ? Order::kReversed : Order::kRandom;
  }
  if (const char* r = env("FSAM_SIM_RELEASE")) {
    const std::string s(r);
    TORCH_CHECK(s == "eager" || s == "pass", "cuda-sim: FSAM_SIM_RELEASE must be eager or pass, got '", s, "'");
    c.eager = s == "eager";
  }
  parse_mutations(c);
  return c;
}

// ---- a worker: one block at a time

enum class State : uint8_t { kRunnable, kBarrier, kWarp, kExited };

struct Thread {
  Context context;
  Index index;
  State state;
  std::source_location at;  // the barrier or warp op it waits at
  WarpOp op;
  unsigned mask;
  int arg, width;
  uint64_t value, result;
};

// The shadow of one 4-byte word of shared memory.
struct Shadow {
  uint32_t block;     // the block (generation) the rest describes; another: never written
  uint32_t interval;  // the barrier interval of the accesses below
  int16_t writer;     // -1 none, -2 several threads (atomically)
  int16_t reader;     // -1 none, -2 several threads
  bool written, atomic_write;
};

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::kShfl: return "__shfl_sync";
    case WarpOp::kShflUp: return "__shfl_up_sync";
    case WarpOp::kShflDown: return "__shfl_down_sync";
    case WarpOp::kBallot: return "__ballot_sync";
  }
  return "?";
}

struct Worker;
// One thread_local for both (the worker the thread runs and whether the running fiber is in the
// emulator's own code): each emulated access reads both, and a module's dynamic TLS costs a lookup
// per variable.
struct ThreadState {
  Worker* worker = nullptr;
  bool emulating = false;
};
thread_local ThreadState t_state;

// While it lives, the running fiber is in the emulator's own code (a barrier, a warp op, an access
// being checked): its accesses, through library code the instrumentation reaches, are not the kernel's.
struct Emulating {
  bool saved;
  FSAM_SIM_UNCHECKED Emulating() : saved(t_state.emulating) { t_state.emulating = true; }
  FSAM_SIM_UNCHECKED ~Emulating() { t_state.emulating = saved; }
};

// The blocks of a launch, handed out in order to its workers.
struct Blocks {
  unsigned grid;
  std::atomic<unsigned> next{0};
  std::atomic<bool> stop{false};
};
std::atomic<int> g_launches{0};  // the race check does nothing while no launch runs

struct Running {  // a launch in progress, for the race check
  FSAM_SIM_UNCHECKED Running() { g_launches.fetch_add(1); }
  FSAM_SIM_UNCHECKED ~Running() { g_launches.fetch_sub(1); }
};

FSAM_SIM_UNCHECKED void fiber_main(void* worker);

// The calling thread's thread-local block [lo, hi) of the loaded object holding `code`.
struct TlsBlock {
  uintptr_t code, lo, hi;
};
FSAM_SIM_UNCHECKED int find_tls_block(dl_phdr_info* info, size_t, void* data) {
  auto* found = static_cast<TlsBlock*>(data);
  bool ours = false;
  for (int k = 0; k < info->dlpi_phnum; ++k) {
    const auto& ph = info->dlpi_phdr[k];
    const uintptr_t lo = info->dlpi_addr + ph.p_vaddr;
    ours = ours || (ph.p_type == PT_LOAD && lo <= found->code && found->code < lo + ph.p_memsz);
  }
  if (!ours) return 0;
  for (int k = 0; k < info->dlpi_phnum; ++k) {
    if (info->dlpi_phdr[k].p_type == PT_TLS && info->dlpi_tls_data != nullptr) {
      found->lo = reinterpret_cast<uintptr_t>(info->dlpi_tls_data);
      found->hi = found->lo + info->dlpi_phdr[k].p_memsz;
    }
  }
  return 1;
}

struct Worker {
  Config config;
  void (*body)(const void*) = nullptr;
  const void* params = nullptr;
  LaunchMemory* memory = nullptr;
  BlockLog log;
  std::string memory_error;  // filled only when an access is refused
  unsigned threads = 0;
  Index block_index{}, block_dim{}, grid_dim{};
  Thread thread[kMaxThreads];
  Context home;
  Thread* current = nullptr;  // the running fiber; null in the scheduler
  std::string error;
  std::mt19937_64 rng;
  int order[kMaxThreads];       // this pass's order of the block's threads
  int lane_order[kMaxThreads];  // the same order, warp by warp: warp w's lanes at [32 w, 32 w + 32)
  char* stacks = nullptr;
  size_t stack_stride = 0;
  // the race check
  uintptr_t shared_lo = 0, shared_hi = 0, own_lo = 0, own_hi = 0;
  std::vector<Shadow> shadow;
  uint32_t generation = 0, interval = 0;

  FSAM_SIM_UNCHECKED Worker() {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    stack_stride = kStackBytes + page;
    void* m = mmap(nullptr, stack_stride * kMaxThreads, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    TORCH_CHECK(m != MAP_FAILED, "cuda-sim: cannot map the fibers' stacks");
    stacks = static_cast<char*>(m);
    for (unsigned i = 0; i < kMaxThreads; ++i) mprotect(stacks + i * stack_stride, page, PROT_NONE);  // guard
  }
  FSAM_SIM_UNCHECKED ~Worker() { munmap(stacks, stack_stride * kMaxThreads); }

  FSAM_SIM_UNCHECKED void fail(const std::string& what) {
    if (error.empty()) error = what;
  }

  FSAM_SIM_UNCHECKED std::string where(const Thread& t) const {
    return "block " + std::to_string(block_index.x) + " thread " + std::to_string(t.index.x);
  }

  // Where thread t waits, e.g. "__shfl_sync at perturb.cu:45:29 (mask 0xffffffff)".
  FSAM_SIM_UNCHECKED static std::string waiting(const Thread& t) {
    if (t.state == State::kBarrier) return "__syncthreads at " + str(t.at);
    if (t.state == State::kWarp) return std::string(op_name(t.op)) + " at " + str(t.at) + " (mask " + hex(t.mask) + ")";
    return t.state == State::kExited ? "returned" : "running";
  }

  // The module's thread-local block in this OS thread: where its __shared__ arrays are.
  FSAM_SIM_UNCHECKED void find_shared_memory() {
    t_state.worker = this;  // allocates the block
    const auto own = reinterpret_cast<uintptr_t>(&t_state.worker);
    own_lo = own, own_hi = own + sizeof(t_state.worker);
    TlsBlock found{reinterpret_cast<uintptr_t>(&fiber_main), 0, 0};
    dl_iterate_phdr(&find_tls_block, &found);
    TORCH_CHECK(found.hi > found.lo, "cuda-sim: cannot find the thread-local block of its module");
    shared_lo = found.lo & ~uintptr_t{3};
    shared_hi = found.hi;
    const size_t words = (shared_hi - shared_lo + 3) / 4;  // the same each time: stale entries have
    if (shadow.size() != words) shadow.assign(words, Shadow{});  // an older block generation
  }

  // ---- scheduling

  FSAM_SIM_UNCHECKED void resume(Thread& t) {
    current = &t;
    switch_context(home, t.context);
    current = nullptr;
  }

  // Called by the running fiber: back to the scheduler.
  FSAM_SIM_UNCHECKED void yield() {
    Thread& t = *current;
    current = nullptr;
    switch_context(t.context, home);
  }

  // Called by the running fiber when it broke a rule: the block fails, and a failed block's
  // fibers are never resumed.
  [[noreturn]] FSAM_SIM_UNCHECKED void abandon(const std::string& what) {
    fail(what);
    current->state = State::kExited;
    yield();
    __builtin_unreachable();
  }

  FSAM_SIM_UNCHECKED void make_order(unsigned n) {
    for (unsigned i = 0; i < n; ++i) order[i] = static_cast<int>(i);
    if (config.order == Order::kReversed) std::reverse(order, order + n);
    if (config.order == Order::kRandom) std::shuffle(order, order + n, rng);
    unsigned filled[kMaxThreads / kWarp] = {};
    for (unsigned k = 0; k < n; ++k) {
      const unsigned w = static_cast<unsigned>(order[k]) / kWarp;
      lane_order[w * kWarp + filled[w]++] = order[k];
    }
  }

  // Whether every lane that the first waiting lane's mask names waits at a warp op; a lane it
  // names that has returned is an error.
  FSAM_SIM_UNCHECKED bool warp_complete(unsigned w) {
    const Thread* first = nullptr;
    for (unsigned l = 0; l < kWarp && first == nullptr; ++l)
      if (thread[w * kWarp + l].state == State::kWarp) first = &thread[w * kWarp + l];
    if (first == nullptr) return false;
    for (unsigned l = 0; l < kWarp; ++l) {
      if (!((first->mask >> l) & 1u)) continue;
      const Thread& t = thread[w * kWarp + l];
      if (t.state == State::kExited) {
        fail(where(*first) + ": " + waiting(*first) + " names lane " + std::to_string(l) + ", which has returned");
        return false;
      }
      if (t.state != State::kWarp) return false;
    }
    return true;
  }

  // Every lane of warp w at its op: the same op, call and mask, naming exactly them.
  FSAM_SIM_UNCHECKED void resolve(unsigned w) {
    Thread* lane = &thread[w * kWarp];
    const Thread* first = nullptr;
    unsigned arrived = 0;
    for (unsigned l = 0; l < kWarp; ++l) {
      if (lane[l].state != State::kWarp) continue;
      arrived |= 1u << l;
      if (first == nullptr) first = &lane[l];
      const Thread& t = lane[l];
      if (t.op != first->op || t.mask != first->mask || !same_call(t.at, first->at)) {
        fail(where(t) + " is at " + waiting(t) + ", " + where(*first) + " at " + waiting(*first) +
             ": a divergent warp op");
        return;
      }
      if (t.width != kWarp) {
        fail(where(t) + ": " + waiting(t) + " with width " + std::to_string(t.width) + " (only 32 is emulated)");
        return;
      }
    }
    if (arrived != first->mask) {
      fail(where(*first) + ": " + waiting(*first) + " but lanes " + hex(arrived) + " are there");
      return;
    }
    bool shifted = false;
    for (const Site& s : config.shifted_shuffles) shifted = shifted || s.matches(first->at);
    uint64_t ballot = 0;
    for (unsigned l = 0; l < kWarp; ++l) ballot |= (lane[l].state == State::kWarp && lane[l].value != 0 ? 1ull : 0ull) << l;
    for (unsigned l = 0; l < kWarp; ++l) {
      Thread& t = lane[l];
      if (t.state != State::kWarp) continue;
      const int arg = t.arg + (shifted ? 1 : 0);
      int src = static_cast<int>(l);
      switch (t.op) {
        case WarpOp::kShfl: src = ((arg % kWarp) + kWarp) % kWarp; break;
        case WarpOp::kShflUp: src = static_cast<int>(l) - arg >= 0 ? static_cast<int>(l) - arg : static_cast<int>(l); break;
        case WarpOp::kShflDown: src = static_cast<int>(l) + arg < kWarp ? static_cast<int>(l) + arg : static_cast<int>(l); break;
        case WarpOp::kBallot: break;
      }
      if (!((arrived >> src) & 1u)) {
        fail(where(t) + ": " + waiting(t) + " reads lane " + std::to_string(src) + ", outside the mask");
        return;
      }
      t.result = t.op == WarpOp::kBallot ? ballot : lane[src].value;
    }
    for (unsigned l = 0; l < kWarp; ++l)
      if (lane[l].state == State::kWarp) lane[l].state = State::kRunnable;
  }

  // Runs thread i until it waits; with eager release, a warp it completes goes on at once.
  FSAM_SIM_UNCHECKED void run(unsigned i) {
    resume(thread[i]);
    if (!config.eager) return;
    const unsigned w = i / kWarp;
    while (error.empty() && warp_complete(w)) {
      resolve(w);
      for (unsigned l = 0; l < kWarp && error.empty(); ++l) {
        Thread& t = thread[lane_order[w * kWarp + l]];
        if (t.state == State::kRunnable) resume(t);
      }
    }
  }

  // Every thread that has not returned waits at one barrier: release it.
  FSAM_SIM_UNCHECKED bool release_barrier() {
    const Thread* first = nullptr;
    for (unsigned i = 0; i < threads; ++i) {
      const Thread& t = thread[i];
      if (t.state == State::kExited) continue;
      if (t.state != State::kBarrier) return false;
      if (first == nullptr) first = &t;
      if (!same_call(t.at, first->at)) {
        fail(where(t) + " waits at " + waiting(t) + ", " + where(*first) + " at " + waiting(*first) +
             ": a divergent barrier");
        return false;
      }
    }
    if (first == nullptr) return false;
    for (unsigned i = 0; i < threads; ++i)
      if (thread[i].state == State::kBarrier) thread[i].state = State::kRunnable;
    ++interval;
    return true;
  }

  FSAM_SIM_UNCHECKED std::string stuck() const {
    std::string s = "block " + std::to_string(block_index.x) + " cannot go on (a barrier or warp op that not every "
                    "thread it waits for reaches):";
    for (unsigned i = 0; i < threads && s.size() < 800; ++i)
      if (thread[i].state != State::kExited) s += " thread " + std::to_string(i) + " " + waiting(thread[i]) + ";";
    return s;
  }

  FSAM_SIM_UNCHECKED void run_block(unsigned b) {
    block_index = {b, 0, 0};
    rng.seed(config.seed * 0x9E3779B97F4A7C15ull + b);
    ++generation;
    interval = 0;
    log.reset(threads);
    for (unsigned i = 0; i < threads; ++i) {
      Thread& t = thread[i];
      t.index = {i, 0, 0};
      t.state = State::kRunnable;
      make_context(t.context, stacks + i * stack_stride, stack_stride, &fiber_main, this);
    }
    while (error.empty()) {
      make_order(threads);
      for (unsigned k = 0; k < threads && error.empty(); ++k)
        if (thread[order[k]].state == State::kRunnable) run(static_cast<unsigned>(order[k]));
      bool runnable = false, live = false;
      for (unsigned w = 0; w < threads / kWarp && error.empty(); ++w)
        if (warp_complete(w)) resolve(w);
      for (unsigned i = 0; i < threads; ++i) {
        runnable = runnable || thread[i].state == State::kRunnable;
        live = live || thread[i].state != State::kExited;
      }
      if (!error.empty()) return;
      if (!live) return memory->end_block(log);
      if (runnable || release_barrier()) continue;
      fail(stuck());
    }
  }

  // Runs blocks of the launch until none is left or one failed, on the calling OS thread.
  FSAM_SIM_UNCHECKED void work(Blocks& blocks) {
    try {
      find_shared_memory();
    } catch (const std::exception& e) {
      fail(e.what());
    }
    for (unsigned b; error.empty() && !blocks.stop && (b = blocks.next.fetch_add(1)) < blocks.grid;) run_block(b);
    if (!error.empty()) blocks.stop = true;
    t_state.worker = nullptr;
  }

  // ---- the race check: only a barrier orders the shared-memory accesses of two threads (a warp
  // op synchronises its lanes but is no memory fence)

  // The running thread stops at its first racy access, before the host runs it.
  [[noreturn]] FSAM_SIM_UNCHECKED void race(const char* what, const Thread& t, int other, uintptr_t addr,
                                            const void* pc) {
    std::ostringstream s;
    s << "a data race on shared memory: " << where(t) << " " << what
      << (other == -2 ? " several threads" : " thread " + std::to_string(other))
      << " in one barrier interval (shared offset " << (addr - shared_lo) << ", code at _sim+0x" << std::hex
      << module_offset(pc) << ")";
    abandon(s.str());
  }

  FSAM_SIM_UNCHECKED void access(uintptr_t addr, size_t size, Access kind, const void* pc) {
    const Thread& t = *current;
    const int tid = static_cast<int>(t.index.x);
    const auto other = [tid](int who) { return who == -2 || (who >= 0 && who != tid); };
    const size_t last = std::min((addr + size - 1 - shared_lo) / 4, shadow.size() - 1);
    for (size_t g = (addr - shared_lo) / 4; g <= last; ++g) {
      Shadow& e = shadow[g];
      if (e.block != generation) e = Shadow{generation, interval, -1, -1, false, false};
      if (e.interval != interval) e = Shadow{generation, interval, -1, -1, e.written, false};
      if (kind != Access::kWrite && !e.written) {
        abandon(where(t) + " reads shared memory that no thread of the block has written (offset " +
                std::to_string(addr - shared_lo) + ")");
      } else if (kind == Access::kAtomic) {
        if (!e.atomic_write && other(e.writer)) race("updates atomically what was written by", t, e.writer, addr, pc);
        if (other(e.reader)) race("updates atomically what was read by", t, e.reader, addr, pc);
        e.writer = e.writer == -1 || e.writer == tid ? static_cast<int16_t>(tid) : int16_t{-2};
        e.atomic_write = true;
      } else if (kind == Access::kRead) {
        if (other(e.writer)) race("reads what was written by", t, e.writer, addr, pc);
        e.reader = e.reader == -1 || e.reader == tid ? static_cast<int16_t>(tid) : int16_t{-2};
      } else {
        if (other(e.writer)) race("writes what was written by", t, e.writer, addr, pc);
        if (other(e.reader)) race("writes what was read by", t, e.reader, addr, pc);
        e.writer = static_cast<int16_t>(tid);
        e.atomic_write = false;
        e.written = true;
      }
    }
  }
};

FSAM_SIM_UNCHECKED void fiber_main(void* worker) {
  auto* w = static_cast<Worker*>(worker);
  try {
    t_state.emulating = false;  // a fiber abandoned in the emulator's code may have left it set
    w->body(w->params);
    t_state.emulating = true;
  } catch (const std::exception& e) {
    t_state.emulating = true;
    w->fail(w->where(*w->current) + ": the kernel threw: " + e.what());
  }
  w->current->state = State::kExited;
  w->yield();
  __builtin_unreachable();  // a returned thread is never resumed
}

FSAM_SIM_UNCHECKED Worker& worker() {
  Worker* w = t_state.worker;
  TORCH_CHECK(w != nullptr && w->current != nullptr, "cuda-sim: a device function was called outside a kernel");
  return *w;
}

// The workers of the launches, kept with their stacks; one launch at a time.
std::mutex g_launch_mutex;
std::vector<std::unique_ptr<Worker>> g_workers;

}  // namespace

FSAM_SIM_UNCHECKED void on_access(const volatile void* p, size_t size, size_t align, Access kind, const void* pc) {
  ThreadState& ts = t_state;  // one TLS lookup
  if (g_launches.load(std::memory_order_relaxed) == 0 || ts.emulating) return;
  Worker* w = ts.worker;
  if (w == nullptr || w->current == nullptr) return;
  ts.emulating = true;  // as Emulating does, without looking the state up again
  struct Restore {
    ThreadState& ts;
    FSAM_SIM_UNCHECKED ~Restore() { ts.emulating = false; }
  } restore{ts};
  const auto a = reinterpret_cast<uintptr_t>(p);
  if (a % align != 0) {
    std::ostringstream s;
    s << w->where(*w->current) << ": a " << size << "-byte access at 0x" << std::hex << a << ", not a multiple of "
      << std::dec << align << " (a GPU faults), code at _sim+0x" << std::hex << module_offset(pc);
    w->abandon(s.str());  // nor may the host run it (an aligned vector load faults here too)
  }
  if (a >= w->shared_lo && a < w->shared_hi) {
    if (a < w->own_hi && a + size > w->own_lo) return;  // the emulator's own thread-local
    if (w->memory->recording()) ++w->log.traffic.shared_accesses, w->log.traffic.shared_bytes += size;
    if (w->config.race_check) w->access(a, size, kind, pc);
    return;
  }
  if (a >= reinterpret_cast<uintptr_t>(w->stacks) && a < reinterpret_cast<uintptr_t>(w->stacks) + w->stack_stride * kMaxThreads)
    return;  // a thread's own stack: its locals
  if (a >= reinterpret_cast<uintptr_t>(w) && a < reinterpret_cast<uintptr_t>(w + 1))
    return;  // threadIdx, blockIdx, blockDim, gridDim: the worker's (the hardware's special registers)
  if (!w->memory->access(w->block_index.x, w->current->index.x, a, size, kind, reinterpret_cast<uintptr_t>(pc),
                         w->log, w->memory_error))
    w->abandon(w->memory_error);
}

FSAM_SIM_UNCHECKED const Index& thread_index() { return worker().current->index; }
FSAM_SIM_UNCHECKED const Index& block_index() { return worker().block_index; }
FSAM_SIM_UNCHECKED const Index& block_dim() { return worker().block_dim; }
FSAM_SIM_UNCHECKED const Index& grid_dim() { return worker().grid_dim; }

FSAM_SIM_UNCHECKED void sync_threads(std::source_location at) {
  const Emulating emulating;
  Worker& w = worker();
  for (const Site& s : w.config.skipped_barriers)
    if (s.matches(at)) return;
  Thread& t = *w.current;
  t.state = State::kBarrier;
  t.at = at;
  w.yield();
}

FSAM_SIM_UNCHECKED uint64_t warp_op(WarpOp op, unsigned mask, uint64_t value, int arg, int width,
                                    std::source_location at) {
  const Emulating emulating;
  Worker& w = worker();
  Thread& t = *w.current;
  if (!((mask >> (t.index.x % kWarp)) & 1u))  // CUDA: every calling lane is in the mask
    w.abandon(w.where(t) + ": " + op_name(op) + " at " + str(at) + " with mask " + hex(mask) +
              ", which does not name the calling lane");
  t.state = State::kWarp;
  t.op = op;
  t.mask = mask;
  t.value = value;
  t.arg = arg;
  t.width = width;
  t.at = at;
  w.yield();
  return t.result;
}

FSAM_SIM_UNCHECKED int sm_count() { return read_config().sms; }

// A kernel's name without its namespace and template arguments.
FSAM_SIM_UNCHECKED std::string base_name(const std::string& kernel) {
  std::string s = kernel.substr(0, kernel.find('<'));
  const size_t colons = s.rfind("::");
  return colons == std::string::npos ? s : s.substr(colons + 2);
}

// The kernel's name in the launch helper's signature ("... [with auto kKernel = NAME; ...]").
FSAM_SIM_UNCHECKED std::string kernel_name(const char* signature) {
  const std::string s(signature), key = "kKernel = ";
  const size_t at = s.find(key);
  if (at == std::string::npos) return s;
  return s.substr(at + key.size(), s.find_first_of(";]", at) - at - key.size());
}

FSAM_SIM_UNCHECKED void launch(unsigned grid, unsigned block, const char* signature, const void* params,
                               size_t params_bytes, void (*body)(const void*)) {
  const std::string kernel = kernel_name(signature);
  // What a GPU refuses at launch.
  TORCH_CHECK(grid >= 1 && grid <= 0x7fffffffu, "cuda-sim: ", kernel, " launched with ", grid,
              " blocks (a grid has 1 to 2^31 - 1)");
  TORCH_CHECK(block >= 1 && block <= kMaxThreads && block % kWarp == 0, "cuda-sim: ", kernel, " launched with ", block,
              " threads a block (whole warps up to ", kMaxThreads, " are emulated)");
  const Config config = read_config();
  const auto lo = reinterpret_cast<uintptr_t>(params);
  LaunchMemory memory(kernel, lo, lo + params_bytes, config.race_check, config.memory_mutation(base_name(kernel)));
  const std::lock_guard<std::mutex> lock(g_launch_mutex);
  const unsigned n = std::min(config.workers, grid);
  while (g_workers.size() < n) g_workers.push_back(std::make_unique<Worker>());
  Blocks blocks{grid};
  for (unsigned i = 0; i < n; ++i) {
    Worker& w = *g_workers[i];
    w.config = config;
    w.body = body;
    w.params = params;
    w.memory = &memory;
    w.threads = block;
    w.block_dim = {block, 1, 1};
    w.grid_dim = {grid, 1, 1};
    w.error.clear();
  }
  {
    const Running running;
    std::vector<std::thread> others;
    for (unsigned i = 1; i < n; ++i) others.emplace_back(&Worker::work, g_workers[i].get(), std::ref(blocks));
    g_workers[0]->work(blocks);
    for (auto& t : others) t.join();
  }
  for (unsigned i = 0; i < n; ++i)
    TORCH_CHECK(g_workers[i]->error.empty(), "cuda-sim: ", kernel, ": ", g_workers[i]->error);
  memory.finish(grid, block);
}

}  // namespace fsam::sim
