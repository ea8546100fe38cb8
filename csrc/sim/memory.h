// Global memory as the emulator's launches see it: the storages an op gave its launches (anything
// else a kernel touches is an invalid access, as compute-sanitizer's memcheck reports it), the race
// check between the blocks of a launch, and the traffic a GPU would see, counted as Nsight Compute
// counts it.  runtime.cpp hands it every access of a kernel thread outside shared memory and its own
// stack; memory.cpp holds the rest (the op scopes, the records, the torch ops that read them).
#pragma once

#include "race_check.h"

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace fsam::sim {

constexpr uint64_t kSector = 32;  // bytes: the unit of DRAM and L2 traffic

// A storage given to the running op: [lo, hi) on the host, at offset 0 of a GPU allocation (the
// allocator aligns each to 256 bytes, so sectors are placed by the offset from lo).
struct Buffer {
  uintptr_t lo, hi;
  std::string label;
};

// Warp-level counters, per access kind (read, write, atomic), in Nsight Compute's terms: requests
// (one per access instruction per warp), the bytes its active lanes asked for (their union: lanes
// asking for the same byte ask for it once), the sectors each request touched (summed over requests,
// the l1tex__t_sectors metrics), and the fewest sectors those bytes could have needed (the ideal).
struct Traffic {
  int64_t requests[3] = {}, bytes[3] = {}, sectors[3] = {}, ideal[3] = {};
  int64_t atomics = 0;                                // lane-level global atomic operations
  int64_t shared_accesses = 0, shared_bytes = 0;      // __shared__, lane-level (counted apart)
  void add(const Traffic& o);
};

// How a mutation (FSAM_SIM_MUTATE) changes what the checks see of one kernel's global accesses:
// each shifted by `shift` bytes (an index off by one, a dropped bound), atomics seen as plain stores.
struct MemoryMutation {
  int64_t shift = 0;
  bool plain_atomics = false;
};

// One block's global accesses, grouped into warp requests when the block ends.
struct BlockLog {
  struct Record {
    uint64_t key;  // warp, call site, dynamic instance: one request
    uint64_t offset;
    uint32_t buffer;
    uint16_t size;
    uint8_t kind;
  };
  std::vector<Record> records;
  std::vector<uintptr_t> sites;                  // call sites (return addresses) seen in this block
  std::vector<std::vector<uint32_t>> instances;  // per thread, per site: how often it ran
  Traffic traffic;
  void reset(unsigned threads);
  uint32_t site(uintptr_t pc);
};

// The global memory of one launch: what it may touch, and (when recording or checking races) what
// each access did.  One launch at a time; its blocks run on several workers at once.
class LaunchMemory {
 public:
  LaunchMemory(std::string kernel, uintptr_t params_lo, uintptr_t params_hi, bool race_check,
               const MemoryMutation& mutation);
  ~LaunchMemory();

  // A kernel thread's access outside shared memory and its own stack: true if fine, else false with
  // the error in `error` (an access outside every storage given to the op, or a race with another
  // block).  The hot path of the emulator: no allocation, no library call (the library's templates
  // are instrumented, and each of their accesses would come back here).
  bool access(unsigned block, unsigned thread, uintptr_t addr, size_t size, Access kind, uintptr_t pc,
              BlockLog& log, std::string& error);
  void end_block(BlockLog& log);
  // Records the launch (grid, block, what it covered) if recording is on.
  void finish(unsigned grid, unsigned block);

  bool recording() const { return recording_; }

 private:
  struct State;  // per buffer: sectors touched, the race shadow
  std::string kernel_, op_;
  int64_t call_ = -1, elements_ = 0, tensors_ = 0;
  uintptr_t params_lo_, params_hi_;
  bool race_check_, recording_;
  MemoryMutation mutation_;
  std::vector<Buffer> buffers_;  // sorted by lo, disjoint
  std::vector<std::unique_ptr<State>> state_;
  // The same, as plain arrays for the hot path.
  std::vector<uintptr_t> lo_, hi_;
  std::vector<State*> states_;
  const uintptr_t* lo_data_ = nullptr;
  const uintptr_t* hi_data_ = nullptr;
  State* const* state_data_ = nullptr;
  int count_ = 0;
  std::mutex mutex_;
  Traffic traffic_;
  int find(uintptr_t addr) const;
  std::string outside(unsigned block, unsigned thread, uintptr_t addr, size_t size, Access kind, uintptr_t pc) const;
};

// Whether [addr, addr + size) lies in the loaded object of the emulator (its code, constants and
// statics: what a kernel may read besides its buffers, as a GPU's constant memory).
bool in_module(uintptr_t addr);

// The module offset of a code address (for addr2line -e fsam_kernels/_sim*.so).
uintptr_t module_offset(const void* pc);

}  // namespace fsam::sim
