"""Component-wise gradient-norm clipping: the kernels, then their launchers.  The per-tensor sums
of squares are the chunk partials of the norm (perturb._sumsq_kernel) added per tensor in chunk
order; the scaling multiplies each tensor by its clip factor in fp32."""
import torch
import triton
import triton.language as tl

from .._layout import num_chunks
from . import tables
from .common import BLOCK, LAUNCH_OPTIONS, chunk_lanes, member_ptr, only_if, round_to, tl_dtype
from .perturb import _sumsq_kernel

SEGMENT_BLOCK = 1024  # chunk partials a program adds at once


@triton.jit
def _tensor_sums_kernel(partials, first, sums, count, STRIDE: tl.constexpr, BLOCK: tl.constexpr,
                        ITERS: tl.constexpr):
    """sums[col * count + t] = column col (program axis 1) of tensor t's fp64 chunk partials (rows
    of STRIDE values), in a fixed order.  ITERS blocks cover the longest tensor: a loop bound that
    is a runtime value (loaded or an argument) fails in Triton 3.6's interpreter under NumPy 2.5."""
    t = tl.program_id(0)
    col = tl.program_id(1)
    lo, hi = tl.load(first + t), tl.load(first + t + 1)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for i in range(ITERS):
        c = lo + i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(partials + STRIDE * c + col, mask=c < hi, other=0.0)
    tl.store(sums + col * count + t, tl.sum(acc, 0))


def tensor_sums(partials, tensors, columns):
    """float64 [columns, len(tensors)]: the first `columns` columns of the chunk partials summed
    per tensor in a fixed order (deterministic, unlike an atomic or index_add reduction)."""
    sums = torch.empty(columns, len(tensors), dtype=torch.float64, device=partials.device)
    span = max((num_chunks(t.numel()) for t in tensors), default=0)
    # a power of two: a few compiled variants whatever the lists (one per doubling of the longest)
    iters = triton.next_power_of_2(max(1, -(-span // SEGMENT_BLOCK)))
    _tensor_sums_kernel[(len(tensors), columns)](partials, tables.first_chunks(tensors), sums, len(tensors),
                                                 STRIDE=partials.shape[1], BLOCK=SEGMENT_BLOCK, ITERS=iters)
    return sums


@triton.jit
def _clip_scale_kernel(x_addr, chunk_tensor, chunk_start, numel, positions, norms, max_norm, eps,
                       DT: tl.constexpr, BLOCK: tl.constexpr):
    t, offs, lanes = chunk_lanes(chunk_tensor, chunk_start, numel, BLOCK)
    norm = tl.load(norms + tl.load(positions + t))
    c = tl.math.div_rn(max_norm, norm + eps)  # rounded as the other backends divide
    c = tl.where(c > 1.0, 1.0, c)  # a NaN norm stays NaN, as torch's clamp keeps it
    lanes = only_if(lanes, c != 1.0)  # x * 1 is x, bit for bit: an unclipped tensor is neither read nor written
    ptr = member_ptr(x_addr, t, DT) + offs
    x = tl.load(ptr, mask=lanes, other=0.0).to(tl.float32)
    tl.store(ptr, round_to(x * c, DT), mask=lanes)


def tensor_sumsq(tensors):
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    device = tensors[0].device
    groups = tables.groups(tensors)
    partials = torch.zeros(sum(g.chunks for g in groups), 2, dtype=torch.float64, device=device)
    for g in groups:
        addr = tables.addresses(tensors, g.members, device)
        _sumsq_kernel[(g.chunks,)](addr, addr, g.chunk_tensor, g.chunk_start, g.chunk_index, g.numel, partials,
                                   partials, 0.0, DT=tl_dtype(g.dtype), MASKED=False, ADAPTIVE=False, BLOCK=BLOCK,
                                   **LAUNCH_OPTIONS)
    return tensor_sums(partials, tensors, 1)[0]


def clip_scale_(tensors, norms, max_norm, eps):
    if not tensors:
        return
    device = tensors[0].device
    for g in tables.groups(tensors):
        _clip_scale_kernel[(g.chunks,)](tables.addresses(tensors, g.members, device), g.chunk_tensor, g.chunk_start,
                                        g.numel, g.positions, norms, float(max_norm), float(eps),
                                        DT=tl_dtype(g.dtype), BLOCK=BLOCK, **LAUNCH_OPTIONS)
