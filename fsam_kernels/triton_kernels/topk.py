"""The stages of the top-k mask by radix select (fsam_kernels/radix_topk.py drives them): the
kernels, then their launchers.

A histogram pass per digit of the order-preserving keys (RADIX_* of fsam_kernels/_layout.py),
each followed by a one-program kernel that picks the digit holding the k-th largest key, all on
the device; a pass counting per chunk the keys equal to the k-th one (only when some but not all
of them are taken); the pass writing the packed mask and the per-chunk popcounts."""
import torch
import triton
import triton.language as tl

from .._layout import (CHUNK_BYTES, RADIX_SHIFTS, RADIX_WIDTHS, STATE_K_LEFT, STATE_PREFIX, STATE_TIES,
                       total_chunks)
from . import tables
from .common import BLOCK, LAUNCH_OPTIONS, chunk_lanes, count_digits, member_ptr, order_key, tl_dtype

_PREFIX, _K_LEFT, _TIES = tl.constexpr(STATE_PREFIX), tl.constexpr(STATE_K_LEFT), tl.constexpr(STATE_TIES)


@triton.jit
def _load_keys(s_addr, chunk_tensor, chunk_start, numel, DT: tl.constexpr, ABSOLUTE: tl.constexpr,
               BLOCK: tl.constexpr):
    t, offs, lanes = chunk_lanes(chunk_tensor, chunk_start, numel, BLOCK)
    x = tl.load(member_ptr(s_addr, t, DT) + offs, mask=lanes, other=0.0).to(tl.float32)
    return x, order_key(x, ABSOLUTE), lanes


@triton.jit
def _histogram_kernel(s_addr, chunk_tensor, chunk_start, numel, state, hist,
                      DT: tl.constexpr, ABSOLUTE: tl.constexpr, SHIFT: tl.constexpr, WIDTH: tl.constexpr,
                      FIRST: tl.constexpr, BLOCK: tl.constexpr):
    x, key, lanes = _load_keys(s_addr, chunk_tensor, chunk_start, numel, DT, ABSOLUTE, BLOCK)
    BINS: tl.constexpr = 1 << WIDTH
    match = lanes
    if FIRST:  # digit 0 also counts the NaN scores, after the bins
        tl.atomic_add(hist + BINS, tl.sum(((x != x) & lanes).to(tl.int32), 0).to(tl.int64))
    else:
        match = lanes & ((key >> (SHIFT + WIDTH)) == tl.load(state + _PREFIX).to(tl.uint32))
    count_digits(hist, ((key >> SHIFT) & (BINS - 1)).to(tl.int32), match, BINS, BLOCK)


@triton.jit
def _select_kernel(state, hist, WIDTH: tl.constexpr):
    """Find the digit holding the k_left-th largest of the keys counted in `hist`."""
    BINS: tl.constexpr = 1 << WIDTH
    bins = tl.arange(0, BINS)
    h = tl.load(hist + bins)
    k_left = tl.load(state + _K_LEFT)
    at_or_above = tl.sum(h, 0) - tl.cumsum(h, 0) + h  # keys whose digit is >= d
    digit = tl.max(tl.where(at_or_above >= k_left, bins, 0), 0)
    greater = tl.sum(tl.where(bins > digit, h, 0), 0)
    tl.store(state + _PREFIX, (tl.load(state + _PREFIX) << WIDTH) | digit.to(tl.int64))
    tl.store(state + _K_LEFT, k_left - greater)
    tl.store(state + _TIES, tl.sum(tl.where(bins == digit, h, 0), 0))


@triton.jit
def _tie_count_kernel(s_addr, chunk_tensor, chunk_start, chunk_index, numel, state, ties,
                      DT: tl.constexpr, ABSOLUTE: tl.constexpr, BLOCK: tl.constexpr):
    partial = tl.load(state + _K_LEFT) != tl.load(state + _TIES)  # else every tie is taken: no need to count
    t, offs, lanes = chunk_lanes(chunk_tensor, chunk_start, numel, BLOCK)
    lanes = lanes & partial
    x = tl.load(member_ptr(s_addr, t, DT) + offs, mask=lanes, other=0.0).to(tl.float32)
    kth = tl.load(state + _PREFIX).to(tl.uint32)
    count = tl.sum((lanes & (order_key(x, ABSOLUTE) == kth)).to(tl.int32), 0)
    tl.store(ties + tl.load(chunk_index + tl.program_id(0)), count)


@triton.jit
def _mask_kernel(s_addr, chunk_tensor, chunk_start, chunk_index, numel, state, ties, ties_before, bits, counts,
                 DT: tl.constexpr, ABSOLUTE: tl.constexpr, BLOCK: tl.constexpr):
    x, key, lanes = _load_keys(s_addr, chunk_tensor, chunk_start, numel, DT, ABSOLUTE, BLOCK)
    chunk = tl.load(chunk_index + tl.program_id(0))
    kth = tl.load(state + _PREFIX).to(tl.uint32)
    k_left = tl.load(state + _K_LEFT)
    all_ties = k_left == tl.load(state + _TIES)
    # ties go to the lowest flat indices: this chunk takes what the chunks before it left
    quota = tl.minimum(tl.maximum(k_left - tl.load(ties_before + chunk), 0), tl.load(ties + chunk)).to(tl.int32)
    tie = lanes & (key == kth)
    rank = tl.cumsum(tie.to(tl.int32), 0) - 1
    # k_left = 0: k = 0, the state was never narrowed and nothing is taken
    selected = lanes & (k_left > 0) & ((key > kth) | (tie & (all_ties | (rank < quota))))
    packed = tl.reshape(selected.to(tl.int32), [BLOCK // 8, 8]) << tl.arange(0, 8)[None, :]
    tl.store(bits + chunk * (BLOCK // 8) + tl.arange(0, BLOCK // 8), tl.sum(packed, 1).to(tl.uint8))
    tl.store(counts + chunk, tl.sum(selected.to(tl.int32), 0))


def _each_group(scores, kernel, args, absolute, **meta):
    """Launch `kernel` once per dtype group of `scores`, one program per chunk."""
    device = scores[0].device
    for g in tables.groups(scores):
        kernel[(g.chunks,)](tables.addresses(scores, g.members, device), g.chunk_tensor, g.chunk_start, *args(g),
                            DT=tl_dtype(g.dtype), ABSOLUTE=bool(absolute), BLOCK=BLOCK, **meta, **LAUNCH_OPTIONS)


def radix_histogram_(scores, state, digit, absolute, hist):
    _each_group(scores, _histogram_kernel, lambda g: (g.numel, state, hist), absolute,
                SHIFT=RADIX_SHIFTS[digit], WIDTH=RADIX_WIDTHS[digit], FIRST=digit == 0)


def radix_select_(state, hist, digit):
    _select_kernel[(1,)](state, hist, WIDTH=RADIX_WIDTHS[digit])


def radix_tie_counts(scores, state, absolute):
    ties = torch.zeros(total_chunks(scores), dtype=torch.int64, device=state.device)
    _each_group(scores, _tie_count_kernel, lambda g: (g.chunk_index, g.numel, state, ties), absolute)
    return ties


def radix_mask(scores, state, ties, ties_before, absolute):
    nchunks = total_chunks(scores)
    bits = torch.empty(nchunks * CHUNK_BYTES, dtype=torch.uint8, device=state.device)
    counts = torch.empty(nchunks, dtype=torch.int32, device=state.device)
    _each_group(scores, _mask_kernel, lambda g: (g.chunk_index, g.numel, state, ties, ties_before, bits, counts),
                absolute)
    return bits, counts
