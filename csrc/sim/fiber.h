// Fibers for the emulator's threads: a context is a stack pointer, and a switch saves and
// restores the callee-saved registers, MXCSR and the x87 control word (x86-64, hand-written: a
// switch costs nanoseconds, where swapcontext makes a system call); ucontext elsewhere.  A new
// fiber calls entry(arg) and must never return from it.  Only csrc/sim/runtime.cpp includes it.
#pragma once

#include <cstddef>
#include <cstdint>

#include "race_check.h"

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace fsam::sim {

#if defined(__x86_64__)
extern "C" void fsam_sim_switch(void** save_sp, void* load_sp);
extern "C" void fsam_sim_start();
// fsam_sim_switch saves rbp, rbx, r12-r15, MXCSR and the x87 control word on the stack, stores the
// stack pointer, loads the other and restores the same; a new fiber's stack holds fsam_sim_start
// as the return address, which calls r13(r12).
asm(R"(
  .text
  .p2align 4
  .globl fsam_sim_switch
  .hidden fsam_sim_switch
  .type fsam_sim_switch, @function
fsam_sim_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size fsam_sim_switch, .-fsam_sim_switch

  .p2align 4
  .globl fsam_sim_start
  .hidden fsam_sim_start
  .type fsam_sim_start, @function
fsam_sim_start:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size fsam_sim_start, .-fsam_sim_start
)");

struct Context {
  void* sp = nullptr;
};

FSAM_SIM_UNCHECKED inline void make_context(Context& c, char* stack, size_t bytes, void (*entry)(void*), void* arg) {
  uint32_t mxcsr = __builtin_ia32_stmxcsr();
  uint16_t fcw = 0;
  asm volatile("fnstcw %0" : "=m"(fcw));
  auto* top = reinterpret_cast<uint64_t*>((reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t{15}) - 16);
  uint64_t* sp = top - 8;  // 16-byte aligned: after the pops and ret, rsp is too
  sp[0] = mxcsr | (uint64_t{fcw} << 32);
  sp[1] = sp[2] = 0;                           // r15, r14
  sp[3] = reinterpret_cast<uint64_t>(entry);   // r13
  sp[4] = reinterpret_cast<uint64_t>(arg);     // r12
  sp[5] = sp[6] = 0;                           // rbx, rbp
  sp[7] = reinterpret_cast<uint64_t>(&fsam_sim_start);
  c.sp = sp;
}

FSAM_SIM_UNCHECKED inline void switch_context(Context& from, Context& to) { fsam_sim_switch(&from.sp, to.sp); }

#else

struct Context {
  ucontext_t uc;
};

FSAM_SIM_UNCHECKED inline void trampoline(unsigned hi, unsigned lo, unsigned ehi, unsigned elo) {
  auto* entry = reinterpret_cast<void (*)(void*)>((uint64_t{ehi} << 32) | elo);
  entry(reinterpret_cast<void*>((uint64_t{hi} << 32) | lo));
}

void make_context(Context& c, char* stack, size_t bytes, void (*entry)(void*), void* arg) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  const auto a = reinterpret_cast<uint64_t>(arg), e = reinterpret_cast<uint64_t>(entry);
  makecontext(&c.uc, reinterpret_cast<void (*)()>(&trampoline), 4, unsigned(a >> 32), unsigned(a), unsigned(e >> 32),
              unsigned(e));
}

FSAM_SIM_UNCHECKED inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }

#endif

}  // namespace fsam::sim
