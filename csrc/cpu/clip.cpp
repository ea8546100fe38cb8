// Component-wise gradient-norm clipping (Yang & Ma, 2022): the per-tensor sums of squares in
// the norm's summation order (sumsq.h), and the scaling of each tensor by its clip factor.  The CPU impls.
#include "chunks.h"
#include "sumsq.h"

#include <fsam/checks.h>
#include <fsam/functors.h>

namespace fsam {
namespace {

constexpr auto kCPU = c10::DeviceType::CPU;

// Per tensor, the fp64 sum of its squares: fp64 within a chunk, the chunks added in order.
at::Tensor tensor_sumsq_cpu(at::TensorList tensors) {
  check_float_list(tensors, kCPU, "tensor_sumsq", "tensors");
  const std::vector<Chunk> chunks = chunk_table(tensors);
  std::vector<double> partial(chunks.size(), 0.0);
  parallel_chunks(chunks, [&](const Chunk& c) {
    FSAM_DISPATCH_FLOATS(tensors[c.tensor].scalar_type(), "tensor_sumsq", [&] {
      const scalar_t* x = tensors[c.tensor].const_data_ptr<scalar_t>() + c.begin;
      partial[c.index] = chunk_sumsq<false, scalar_t>(nullptr, x, nullptr, c.end - c.begin, 0.0f)[0];
    });
  });
  auto out = at::zeros({static_cast<int64_t>(tensors.size())}, at::TensorOptions().dtype(at::kDouble));
  double* sums = out.data_ptr<double>();
  for (const Chunk& c : chunks) sums[c.tensor] += partial[c.index];
  return out;
}

// tensors[i] *= ClipCoefficient(norms[i]), in fp32, rounded to the tensor's dtype.
void clip_scale_cpu(at::TensorList tensors, const at::Tensor& norms, double max_norm, double eps) {
  const char* op = "clip_scale_";
  check_float_list(tensors, kCPU, op, "tensors");
  check_buffer(norms, at::kFloat, static_cast<int64_t>(tensors.size()), kCPU, op, "norms");
  check_clip(tensors, norms, max_norm, eps, op);
  const ClipCoefficient coefficient{static_cast<float>(max_norm), static_cast<float>(eps)};
  const float* n = norms.const_data_ptr<float>();
  parallel_chunks(chunk_table(tensors), [&](const Chunk& c) {
    const float f = coefficient(n[c.tensor]);
    if (f == 1.0f) return;  // x * 1 is x, bit for bit: an unclipped tensor is neither read nor written
    FSAM_DISPATCH_FLOATS(tensors[c.tensor].scalar_type(), "clip_scale_", [&] {
      scalar_t* x = tensors[c.tensor].data_ptr<scalar_t>();
      for (int64_t i = c.begin; i < c.end; ++i) x[i] = static_cast<scalar_t>(static_cast<float>(x[i]) * f);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fsam, CPU, m) {
  m.impl("tensor_sumsq", &tensor_sumsq_cpu);
  m.impl("clip_scale_", &clip_scale_cpu);
}

}  // namespace fsam
