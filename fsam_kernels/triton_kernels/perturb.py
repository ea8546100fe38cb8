"""Gradient norm, masked perturbation with compact saving, and restore: the kernels, then their
launchers.  Saved values follow fsam_kernels/_layout.py: chunk c's originals, in their own
dtype and element order, from byte save_offsets[c] of `saved`."""
import torch
import triton
import triton.language as tl

from . import saved_runs, tables
from .common import BLOCK, LAUNCH_OPTIONS, chunk_lanes, itemsize, mask_lanes, member_ptr, only_if, round_to, tl_dtype


@triton.jit
def _sumsq_kernel(p_addr, g_addr, chunk_tensor, chunk_start, chunk_index, numel, bits, partials, eta,
                  DT: tl.constexpr, MASKED: tl.constexpr, ADAPTIVE: tl.constexpr, BLOCK: tl.constexpr):
    t, offs, lanes = chunk_lanes(chunk_tensor, chunk_start, numel, BLOCK)
    chunk = tl.load(chunk_index + tl.program_id(0))
    lanes = only_if(lanes, tl.load(g_addr + t) != 0)
    v = tl.load(member_ptr(g_addr, t, DT) + offs, mask=lanes, other=0.0).to(tl.float32)
    if ADAPTIVE:
        w = tl.load(member_ptr(p_addr, t, DT) + offs, mask=lanes, other=0.0).to(tl.float32)
        v = v * (tl.abs(w) + eta)
    v = v.to(tl.float64)
    sq = v * v  # exact in fp64; the chunk's sum in fp64 (the summation order of every backend)
    tl.store(partials + 2 * chunk, tl.sum(sq, 0))
    if MASKED:
        sq = tl.where(mask_lanes(bits, chunk, lanes, BLOCK), sq, 0.0)
    tl.store(partials + 2 * chunk + 1, tl.sum(sq, 0))


@triton.jit
def _saved_slots(bits, save_offsets, capacity, gate, chunk, lanes, MASKED: tl.constexpr, ITEMSIZE: tl.constexpr,
                 BLOCK: tl.constexpr):
    """(lanes saved, their slot in the saved buffer in elements).  No lane while the gate is
    non-zero (saved_runs.gate).  A chunk whose run would not lie inside `saved` (`capacity`
    elements) keeps no lane either, so that its weights stay as they are and restore stays exact:
    each program's own bound (the CUDA kernels skip such a chunk alike)."""
    lanes = only_if(lanes, tl.load(gate) == 0)
    if MASKED:
        lanes = mask_lanes(bits, chunk, lanes, BLOCK)
    start = tl.load(save_offsets + chunk)
    count = tl.sum(lanes.to(tl.int32), 0).to(tl.int64)
    fits = (start >= 0) & (start % ITEMSIZE == 0) & (start // ITEMSIZE + count <= capacity)
    lanes = only_if(lanes, fits)
    rank = tl.cumsum(lanes.to(tl.int32), 0) - 1  # within a chunk: fits int32
    return lanes, start // ITEMSIZE + rank.to(tl.int64)


@triton.jit(do_not_specialize=["capacity"])  # one compiled variant whatever the size
def _perturb_kernel(p_addr, g_addr, chunk_tensor, chunk_start, chunk_index, numel, bits, save_offsets, saved,
                    capacity, scale_ptr, eta, gate, DT: tl.constexpr, ITEMSIZE: tl.constexpr, MASKED: tl.constexpr,
                    ADAPTIVE: tl.constexpr, BLOCK: tl.constexpr):
    t, offs, lanes = chunk_lanes(chunk_tensor, chunk_start, numel, BLOCK)
    chunk = tl.load(chunk_index + tl.program_id(0))
    lanes, slot = _saved_slots(bits, save_offsets, capacity, gate, chunk, lanes, MASKED, ITEMSIZE, BLOCK)
    w_ptr = member_ptr(p_addr, t, DT)
    w = tl.load(w_ptr + offs, mask=lanes, other=0.0)
    tl.store(saved + slot, w, mask=lanes)  # the originals, even when nothing moves: restore is exact
    scale = tl.load(scale_ptr)
    move = only_if(only_if(lanes, tl.load(g_addr + t) != 0), scale != 0.0)
    d = tl.load(member_ptr(g_addr, t, DT) + offs, mask=move, other=0.0).to(tl.float32)
    wf = w.to(tl.float32)
    if ADAPTIVE:
        tw = tl.abs(wf) + eta
        d = d * (tw * tw)
    tl.store(w_ptr + offs, round_to(wf + d * scale, DT), mask=move)


@triton.jit(do_not_specialize=["capacity"])  # one compiled variant whatever the size
def _restore_kernel(p_addr, chunk_tensor, chunk_start, chunk_index, numel, bits, save_offsets, saved, capacity, gate,
                    DT: tl.constexpr, ITEMSIZE: tl.constexpr, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    t, offs, lanes = chunk_lanes(chunk_tensor, chunk_start, numel, BLOCK)
    chunk = tl.load(chunk_index + tl.program_id(0))
    lanes, slot = _saved_slots(bits, save_offsets, capacity, gate, chunk, lanes, MASKED, ITEMSIZE, BLOCK)
    tl.store(member_ptr(p_addr, t, DT) + offs, tl.load(saved + slot, mask=lanes), mask=lanes)


def _dummy(device):
    return torch.empty(1, dtype=torch.uint8, device=device)


def grad_sumsq(params, grads, mask_bits=None, adaptive=False, eta=0.0):
    device = params[0].device
    groups = tables.groups(params)
    partials = torch.zeros(sum(g.chunks for g in groups), 2, dtype=torch.float64, device=device)
    for g in groups:
        _sumsq_kernel[(g.chunks,)](
            tables.addresses(params, g.members, device), tables.addresses(grads, g.members, device), g.chunk_tensor,
            g.chunk_start, g.chunk_index, g.numel, mask_bits if mask_bits is not None else _dummy(device), partials,
            float(eta), DT=tl_dtype(g.dtype), MASKED=mask_bits is not None, ADAPTIVE=bool(adaptive), BLOCK=BLOCK,
            **LAUNCH_OPTIONS)
    return partials.sum(0).to(torch.float32)  # chunk partials added in fp64, rounded to fp32 once


def perturb_(params, grads, mask_bits, save_offsets, saved, scale, adaptive=False, eta=0.0, status=None):
    device = params[0].device
    gate = saved_runs.gate(params, mask_bits, save_offsets, saved, status)
    for g in tables.groups(params):
        _perturb_kernel[(g.chunks,)](
            tables.addresses(params, g.members, device), tables.addresses(grads, g.members, device), g.chunk_tensor,
            g.chunk_start, g.chunk_index, g.numel, mask_bits if mask_bits is not None else _dummy(device),
            save_offsets, *saved_runs.elements(saved, g.dtype), scale, float(eta), gate, DT=tl_dtype(g.dtype),
            ITEMSIZE=itemsize(g.dtype), MASKED=mask_bits is not None, ADAPTIVE=bool(adaptive), BLOCK=BLOCK, **LAUNCH_OPTIONS)


def restore_(params, mask_bits, save_offsets, saved, status=None):
    device = params[0].device
    gate = saved_runs.gate(params, mask_bits, save_offsets, saved, status)
    for g in tables.groups(params):
        _restore_kernel[(g.chunks,)](
            tables.addresses(params, g.members, device), g.chunk_tensor, g.chunk_start, g.chunk_index, g.numel,
            mask_bits if mask_bits is not None else _dummy(device), save_offsets, *saved_runs.elements(saved, g.dtype),
            gate, DT=tl_dtype(g.dtype), ITEMSIZE=itemsize(g.dtype), MASKED=mask_bits is not None, BLOCK=BLOCK,
            **LAUNCH_OPTIONS)
