"""The stages of the top-k mask by radix select (fsam_kernels/radix_topk.py drives them): the
kernels, then their launchers.

A histogram pass per digit of the order-preserving keys (RADIX_* of fsam_kernels/_layout.py),
each followed by a one-program kernel that picks the digit holding the k-th largest key, all on
the device; a pass counting per chunk the keys equal to the k-th one (only when some but not all
of them are taken); the pass writing the packed mask and the per-chunk popcounts.  With a candidate
buffer the digit-1 pass appends the keys under the prefix to it (one atomic per program reserves
the program's run), and digit 2 and the tie count run over the buffer instead of the chunks when it
holds them: the chunk kernels then load nothing, the buffer kernels nothing otherwise."""
import torch
import triton
import triton.language as tl

from .._layout import (CANDIDATE_KEY_BITS, CHUNK_BYTES, RADIX_SHIFTS, RADIX_WIDTHS, STATE_CANDIDATES, STATE_K_LEFT,
                       STATE_PREFIX, STATE_TIES, total_chunks)
from . import tables
from .common import BLOCK, LAUNCH_OPTIONS, chunk_lanes, count_digits, member_ptr, only_if, order_key, tl_dtype

_PREFIX, _K_LEFT, _TIES = tl.constexpr(STATE_PREFIX), tl.constexpr(STATE_K_LEFT), tl.constexpr(STATE_TIES)
_CANDIDATES, _KEY_BITS = tl.constexpr(STATE_CANDIDATES), tl.constexpr(CANDIDATE_KEY_BITS)


@triton.jit
def _load_keys(s_addr, chunk_tensor, chunk_start, numel, keep, DT: tl.constexpr, ABSOLUTE: tl.constexpr,
               BLOCK: tl.constexpr):
    """(scores, keys, lanes) of this program's chunk; without `keep`, no lane (and nothing loaded)."""
    t, offs, lanes = chunk_lanes(chunk_tensor, chunk_start, numel, BLOCK)
    lanes = only_if(lanes, keep)
    x = tl.load(member_ptr(s_addr, t, DT) + offs, mask=lanes, other=0.0).to(tl.float32)
    return x, order_key(x, ABSOLUTE), lanes


@triton.jit
def _fits(count, capacity):
    return tl.where(count >= 0, count <= capacity, False)


@triton.jit
def _histogram_kernel(s_addr, chunk_tensor, chunk_start, chunk_index, numel, state, hist, candidates, capacity,
                      DT: tl.constexpr, ABSOLUTE: tl.constexpr, SHIFT: tl.constexpr, WIDTH: tl.constexpr,
                      FIRST: tl.constexpr, FILL: tl.constexpr, BUFFERED: tl.constexpr, BLOCK: tl.constexpr):
    """FILL: append the keys under the prefix to the candidate buffer if every process's fit it;
    BUFFERED: count nothing when the buffer holds the keys (_buffer_histogram_kernel does)."""
    keep = True
    if BUFFERED:
        keep = ~_fits(tl.load(state + _CANDIDATES), capacity)
    x, key, lanes = _load_keys(s_addr, chunk_tensor, chunk_start, numel, keep, DT, ABSOLUTE, BLOCK)
    BINS: tl.constexpr = 1 << WIDTH
    match = lanes
    if FIRST:  # digit 0 also counts the NaN scores, after the bins
        tl.atomic_add(hist + BINS, tl.sum(((x != x) & lanes).to(tl.int32), 0).to(tl.int64))
    else:
        match = lanes & ((key >> (SHIFT + WIDTH)) == tl.load(state + _PREFIX).to(tl.uint32))
    count_digits(hist, ((key >> SHIFT) & (BINS - 1)).to(tl.int32), match, BINS, BLOCK)
    if FILL:
        fits = _fits(tl.load(state + _TIES), capacity)
        take = only_if(match, fits)
        n = tl.sum(take.to(tl.int32), 0).to(tl.int64)
        base = tl.atomic_add(state + _CANDIDATES, n, mask=n > 0)  # this program's run of the buffer
        slot = base + tl.cumsum(take.to(tl.int64), 0) - 1
        entry = (tl.load(chunk_index + tl.program_id(0)) << _KEY_BITS) | key.to(tl.int64)
        # past the capacity (a state that lied about the keys under the prefix): counted, not written
        tl.store(candidates + slot, entry, mask=take & (slot >= 0) & (slot < capacity))
        tl.store(state + _CANDIDATES, capacity + 1, mask=tl.where(fits, False, tl.program_id(0) == 0))


@triton.jit
def _buffer_entries(candidates, state, capacity, BLOCK: tl.constexpr):
    """(key, chunk, filled lanes) of this program's block of the candidate buffer: none unless
    the digit-1 pass left every key under the prefix there."""
    count = tl.load(state + _CANDIDATES)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    lanes = only_if(offs < count, _fits(count, capacity))
    entry = tl.load(candidates + offs, mask=lanes, other=0)
    return (entry & 0xFFFFFFFF).to(tl.uint32), entry >> _KEY_BITS, lanes


@triton.jit
def _buffer_histogram_kernel(candidates, state, hist, capacity, SHIFT: tl.constexpr, WIDTH: tl.constexpr,
                             BLOCK: tl.constexpr):
    key, _, lanes = _buffer_entries(candidates, state, capacity, BLOCK)
    BINS: tl.constexpr = 1 << WIDTH
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
def _partial(state):
    """Whether some but not all keys equal to the k-th one are taken (else nobody needs the counts)."""
    return tl.load(state + _K_LEFT) != tl.load(state + _TIES)


@triton.jit
def _tie_count_kernel(s_addr, chunk_tensor, chunk_start, chunk_index, numel, state, ties, candidates, capacity,
                      DT: tl.constexpr, ABSOLUTE: tl.constexpr, BUFFERED: tl.constexpr, BLOCK: tl.constexpr):
    keep = _partial(state)
    if BUFFERED:  # _buffer_tie_count_kernel counts them
        keep = keep & ~_fits(tl.load(state + _CANDIDATES), capacity)
    _, key, lanes = _load_keys(s_addr, chunk_tensor, chunk_start, numel, keep, DT, ABSOLUTE, BLOCK)
    count = tl.sum((lanes & (key == tl.load(state + _PREFIX).to(tl.uint32))).to(tl.int32), 0)
    tl.store(ties + tl.load(chunk_index + tl.program_id(0)), count)


@triton.jit
def _buffer_tie_count_kernel(candidates, state, ties, capacity, chunks, BLOCK: tl.constexpr):
    key, chunk, lanes = _buffer_entries(candidates, state, capacity, BLOCK)
    tie = only_if(lanes, _partial(state)) & (key == tl.load(state + _PREFIX).to(tl.uint32))
    tl.atomic_add(ties + chunk, 1, mask=tie & (chunk >= 0) & (chunk < chunks))  # never past the chunks


@triton.jit
def _mask_kernel(s_addr, chunk_tensor, chunk_start, chunk_index, numel, state, ties, ties_before, bits, counts,
                 DT: tl.constexpr, ABSOLUTE: tl.constexpr, BLOCK: tl.constexpr):
    x, key, lanes = _load_keys(s_addr, chunk_tensor, chunk_start, numel, True, DT, ABSOLUTE, BLOCK)
    chunk = tl.load(chunk_index + tl.program_id(0))
    kth = tl.load(state + _PREFIX).to(tl.uint32)
    k_left = tl.load(state + _K_LEFT)
    all_ties = k_left == tl.load(state + _TIES)
    # ties go to the lowest flat indices: this chunk takes what the chunks before it left
    quota = tl.minimum(tl.maximum(k_left - tl.load(ties_before + chunk), 0), tl.load(ties + chunk)).to(tl.int32)
    tie = lanes & (key == kth)
    rank = tl.cumsum(tie.to(tl.int32), 0) - 1
    # k_left = 0: k = 0, the state was never narrowed and nothing is taken
    selected = only_if(lanes, k_left > 0) & ((key > kth) | tl.where(all_ties, tie, tie & (rank < quota)))
    packed = tl.reshape(selected.to(tl.int32), [BLOCK // 8, 8]) << tl.arange(0, 8)[None, :]
    tl.store(bits + chunk * (BLOCK // 8) + tl.arange(0, BLOCK // 8), tl.sum(packed, 1).to(tl.uint8))
    tl.store(counts + chunk, tl.sum(selected.to(tl.int32), 0))


def _each_group(scores, kernel, args, absolute, **meta):
    """Launch `kernel` once per dtype group of `scores`, one program per chunk."""
    device = scores[0].device
    for g in tables.groups(scores):
        kernel[(g.chunks,)](tables.addresses(scores, g.members, device), g.chunk_tensor, g.chunk_start, *args(g),
                            DT=tl_dtype(g.dtype), ABSOLUTE=bool(absolute), BLOCK=BLOCK, **meta, **LAUNCH_OPTIONS)


def _buffer_launch(kernel, candidates, *args, **meta):
    kernel[(triton.cdiv(candidates.numel(), BLOCK),)](candidates, *args, BLOCK=BLOCK, **meta, **LAUNCH_OPTIONS)


def radix_histogram_(scores, state, digit, absolute, hist, candidates=None):
    fill = digit == 1 and candidates is not None
    buffered = digit == 2 and candidates is not None
    capacity = 0 if candidates is None else candidates.numel()
    if fill:
        state[STATE_CANDIDATES] = 0
    _each_group(scores, _histogram_kernel,
                lambda g: (g.chunk_index, g.numel, state, hist, state if candidates is None else candidates, capacity),
                absolute, SHIFT=RADIX_SHIFTS[digit], WIDTH=RADIX_WIDTHS[digit], FIRST=digit == 0, FILL=fill,
                BUFFERED=buffered)
    if buffered and capacity:
        _buffer_launch(_buffer_histogram_kernel, candidates, state, hist, capacity, SHIFT=RADIX_SHIFTS[digit],
                       WIDTH=RADIX_WIDTHS[digit])


def radix_select_(state, hist, digit):
    _select_kernel[(1,)](state, hist, WIDTH=RADIX_WIDTHS[digit])


def radix_tie_counts(scores, state, absolute, candidates=None):
    nchunks = total_chunks(scores)
    ties = torch.zeros(nchunks, dtype=torch.int64, device=state.device)
    capacity = 0 if candidates is None else candidates.numel()
    _each_group(scores, _tie_count_kernel, lambda g: (g.chunk_index, g.numel, state, ties,
                                                      state if candidates is None else candidates, capacity),
                absolute, BUFFERED=candidates is not None)
    if capacity:  # after the chunk kernel, which wrote zeros where the buffer serves
        _buffer_launch(_buffer_tie_count_kernel, candidates, state, ties, capacity, nchunks)
    return ties


def radix_mask(scores, state, ties, ties_before, absolute):
    nchunks = total_chunks(scores)
    bits = torch.empty(nchunks * CHUNK_BYTES, dtype=torch.uint8, device=state.device)
    counts = torch.empty(nchunks, dtype=torch.int32, device=state.device)
    _each_group(scores, _mask_kernel, lambda g: (g.chunk_index, g.numel, state, ties, ties_before, bits, counts),
                absolute)
    return bits, counts
