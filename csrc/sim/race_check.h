// The race check's entry point, between the instrumentation's callbacks (tsan_callbacks.cpp) and
// the emulator (runtime.cpp), which keeps the shadow of the running block's shared memory.
#pragma once

#include <cstddef>

// The emulator's own code is not checked for races (and the race check's callbacks must not call
// themselves): csrc/sim is compiled with -fsanitize=thread like the kernels.
#define FSAM_SIM_UNCHECKED __attribute__((no_sanitize("thread")))

namespace fsam::sim {

enum class Access { kRead, kWrite, kAtomic };

// An access of `size` bytes at p by code at `pc`, which the compiler emitted for an address that is
// a multiple of `align` (a GPU faults on any other).  Ignored unless a fiber runs; checked for races
// where p is in its worker's shared memory.
FSAM_SIM_UNCHECKED void on_access(const volatile void* p, size_t size, size_t align, Access kind, const void* pc);

}  // namespace fsam::sim
