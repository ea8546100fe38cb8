// The functions that -fsanitize=thread's instrumentation calls at every memory access and atomic
// of the emulated build (their signatures are GCC's built-in ones).  No sanitizer runtime is
// linked: these perform the atomics and hand the accesses to the race check (race_check.h), with
// the alignment the access needs: its size, unless the compiler could not promise it.
#include "race_check.h"

#define FSAM_SIM_PC __builtin_return_address(0)
using Kind = fsam::sim::Access;

namespace {

FSAM_SIM_UNCHECKED inline void check(const volatile void* p, size_t size, size_t align, Kind kind, const void* pc) {
  fsam::sim::on_access(p, size, align, kind, pc);
}

}  // namespace

extern "C" {
FSAM_SIM_UNCHECKED void __tsan_init() {}
FSAM_SIM_UNCHECKED void __tsan_func_entry(void*) {}
FSAM_SIM_UNCHECKED void __tsan_func_exit() {}
FSAM_SIM_UNCHECKED void __tsan_vptr_update(void*, void*) {}
FSAM_SIM_UNCHECKED void __tsan_vptr_read(void*) {}

#define FSAM_SIM_ACCESS(N)                                                                                          \
  FSAM_SIM_UNCHECKED void __tsan_read##N(void* p) { check(p, N, N, Kind::kRead, FSAM_SIM_PC); }                       \
  FSAM_SIM_UNCHECKED void __tsan_write##N(void* p) { check(p, N, N, Kind::kWrite, FSAM_SIM_PC); }                     \
  FSAM_SIM_UNCHECKED void __tsan_unaligned_read##N(void* p) { check(p, N, 1, Kind::kRead, FSAM_SIM_PC); }             \
  FSAM_SIM_UNCHECKED void __tsan_unaligned_write##N(void* p) { check(p, N, 1, Kind::kWrite, FSAM_SIM_PC); }           \
  FSAM_SIM_UNCHECKED void __tsan_volatile_read##N(void* p) { check(p, N, N, Kind::kRead, FSAM_SIM_PC); }              \
  FSAM_SIM_UNCHECKED void __tsan_volatile_write##N(void* p) { check(p, N, N, Kind::kWrite, FSAM_SIM_PC); }            \
  FSAM_SIM_UNCHECKED void __tsan_unaligned_volatile_read##N(void* p) { check(p, N, 1, Kind::kRead, FSAM_SIM_PC); }    \
  FSAM_SIM_UNCHECKED void __tsan_unaligned_volatile_write##N(void* p) { check(p, N, 1, Kind::kWrite, FSAM_SIM_PC); }
FSAM_SIM_ACCESS(1)
FSAM_SIM_ACCESS(2)
FSAM_SIM_ACCESS(4)
FSAM_SIM_ACCESS(8)
FSAM_SIM_ACCESS(16)
FSAM_SIM_UNCHECKED void __tsan_read_range(void* p, unsigned long n) { check(p, n, 1, Kind::kRead, FSAM_SIM_PC); }
FSAM_SIM_UNCHECKED void __tsan_write_range(void* p, unsigned long n) { check(p, n, 1, Kind::kWrite, FSAM_SIM_PC); }

// Atomics: performed (sequentially consistent, at least what was asked), and seen as atomic.
#define FSAM_SIM_ATOMIC(N, T)                                                                                       \
  FSAM_SIM_UNCHECKED T __tsan_atomic##N##_load(const volatile void* p, int) {                                      \
    check(p, N / 8, N / 8, Kind::kAtomic, FSAM_SIM_PC);                                                                    \
    return __atomic_load_n(static_cast<const volatile T*>(p), __ATOMIC_SEQ_CST);                                   \
  }                                                                                                                 \
  FSAM_SIM_UNCHECKED void __tsan_atomic##N##_store(volatile void* p, T v, int) {                                   \
    check(p, N / 8, N / 8, Kind::kAtomic, FSAM_SIM_PC);                                                                    \
    __atomic_store_n(static_cast<volatile T*>(p), v, __ATOMIC_SEQ_CST);                                            \
  }                                                                                                                 \
  FSAM_SIM_UNCHECKED T __tsan_atomic##N##_exchange(volatile void* p, T v, int) {                                   \
    check(p, N / 8, N / 8, Kind::kAtomic, FSAM_SIM_PC);                                                                    \
    return __atomic_exchange_n(static_cast<volatile T*>(p), v, __ATOMIC_SEQ_CST);                                  \
  }                                                                                                                 \
  FSAM_SIM_ATOMIC_RMW(N, T, fetch_add)                                                                             \
  FSAM_SIM_ATOMIC_RMW(N, T, fetch_sub)                                                                             \
  FSAM_SIM_ATOMIC_RMW(N, T, fetch_and)                                                                             \
  FSAM_SIM_ATOMIC_RMW(N, T, fetch_or)                                                                              \
  FSAM_SIM_ATOMIC_RMW(N, T, fetch_xor)                                                                             \
  FSAM_SIM_ATOMIC_RMW(N, T, fetch_nand)                                                                            \
  FSAM_SIM_ATOMIC_CAS(N, T, strong, false)                                                                         \
  FSAM_SIM_ATOMIC_CAS(N, T, weak, true)                                                                            \
  FSAM_SIM_UNCHECKED T __tsan_atomic##N##_compare_exchange_val(volatile void* p, T expected, T desired, int, int) { \
    check(p, N / 8, N / 8, Kind::kAtomic, FSAM_SIM_PC);                                                                    \
    __atomic_compare_exchange_n(static_cast<volatile T*>(p), &expected, desired, false, __ATOMIC_SEQ_CST,          \
                                __ATOMIC_SEQ_CST);                                                                  \
    return expected;                                                                                                \
  }
#define FSAM_SIM_ATOMIC_CAS(N, T, KIND, WEAK)                                                                      \
  FSAM_SIM_UNCHECKED int __tsan_atomic##N##_compare_exchange_##KIND(volatile void* p, void* expected, T desired, int, \
                                                                    int) {                                          \
    check(p, N / 8, N / 8, Kind::kAtomic, FSAM_SIM_PC);                                                                     \
    return __atomic_compare_exchange_n(static_cast<volatile T*>(p), static_cast<T*>(expected), desired, WEAK,       \
                                       __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                                          \
  }
#define FSAM_SIM_ATOMIC_RMW(N, T, OP)                                                   \
  FSAM_SIM_UNCHECKED T __tsan_atomic##N##_##OP(volatile void* p, T v, int) {           \
    check(p, N / 8, N / 8, Kind::kAtomic, FSAM_SIM_PC);                                        \
    return __atomic_##OP(static_cast<volatile T*>(p), v, __ATOMIC_SEQ_CST);            \
  }
FSAM_SIM_ATOMIC(8, unsigned char)
FSAM_SIM_ATOMIC(16, unsigned short)
FSAM_SIM_ATOMIC(32, unsigned int)
FSAM_SIM_ATOMIC(64, unsigned long long)
FSAM_SIM_UNCHECKED void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
FSAM_SIM_UNCHECKED void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
}
