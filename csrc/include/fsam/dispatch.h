// The element types of every op's tensors (fsam/checks.h's check_float_dtype admits exactly these),
// one dispatch for the C++ and CUDA backends: no double instantiation that no input can reach.
#pragma once

#include <ATen/Dispatch.h>

#define FSAM_DISPATCH_FLOATS(TYPE, NAME, ...)                 \
  AT_DISPATCH_SWITCH(TYPE, NAME,                              \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))
