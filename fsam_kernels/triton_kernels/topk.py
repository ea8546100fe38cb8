"""Top-k mask selection by radix select: the kernels, then the launcher.

Three histogram passes over the order-preserving keys (11/11/10-bit digits), each followed by
a one-program kernel that picks the digit holding the k-th largest key, all on the device;
then, only when some but not all keys equal to the k-th one are taken, a pass counting them
per chunk; then the pass that writes the packed mask and the per-chunk popcounts.  Extra
memory: the histograms (3 x 2048 counts, RADIX_* of fsam_kernels/_layout.py), a state of 4 numbers and a count per chunk."""
import torch
import triton
import triton.language as tl

from .._layout import CHUNK_BYTES, FIRST_BINS, RADIX_MAX_BINS, RADIX_SHIFTS, RADIX_WIDTHS
from . import tables
from .common import BLOCK, LAUNCH_OPTIONS, chunk_lanes, count_digits, order_key, tl_dtype, typed

# state: [prefix of the k-th key, how many keys equal to it are still to take, how many
# keys share the prefix's digit, NaN seen]
PREFIX, K_LEFT, TIES, NAN = range(4)


@triton.jit
def _load_keys(s_addr, chunk_tensor, chunk_start, numel, DT: tl.constexpr, ABSOLUTE: tl.constexpr,
               BLOCK: tl.constexpr):
    t, offs, lanes = chunk_lanes(chunk_tensor, chunk_start, numel, BLOCK)
    x = tl.load(typed(s_addr, t, DT) + offs, mask=lanes, other=0.0).to(tl.float32)
    return x, order_key(x, ABSOLUTE), lanes


@triton.jit
def _histogram_kernel(s_addr, chunk_tensor, chunk_start, numel, state, hist,
                      DT: tl.constexpr, ABSOLUTE: tl.constexpr, SHIFT: tl.constexpr, WIDTH: tl.constexpr,
                      FIRST: tl.constexpr, CHECK_NAN: tl.constexpr, BLOCK: tl.constexpr):
    x, key, lanes = _load_keys(s_addr, chunk_tensor, chunk_start, numel, DT, ABSOLUTE, BLOCK)
    match = lanes
    if not FIRST:
        match = lanes & ((key >> (SHIFT + WIDTH)) == tl.load(state + 0).to(tl.uint32))
    if CHECK_NAN:
        tl.atomic_max(state + 3, tl.max(((x != x) & lanes).to(tl.int32), 0).to(tl.int64))
    BINS: tl.constexpr = 1 << WIDTH
    count_digits(hist, ((key >> SHIFT) & (BINS - 1)).to(tl.int32), match, BINS, BLOCK)


@triton.jit
def _select_kernel(state, hist, WIDTH: tl.constexpr):
    """Find the digit holding the k_left-th largest of the keys counted in `hist`."""
    BINS: tl.constexpr = 1 << WIDTH
    bins = tl.arange(0, BINS)
    h = tl.load(hist + bins)
    k_left = tl.load(state + 1)
    at_or_above = tl.sum(h, 0) - tl.cumsum(h, 0) + h  # keys whose digit is >= d
    digit = tl.max(tl.where(at_or_above >= k_left, bins, 0), 0)
    greater = tl.sum(tl.where(bins > digit, h, 0), 0)
    tl.store(state + 0, (tl.load(state + 0) << WIDTH) | digit.to(tl.int64))
    tl.store(state + 1, k_left - greater)
    tl.store(state + 2, tl.sum(tl.where(bins == digit, h, 0), 0))


@triton.jit
def _tie_count_kernel(s_addr, chunk_tensor, chunk_start, chunk_index, numel, state, ties,
                      DT: tl.constexpr, ABSOLUTE: tl.constexpr, BLOCK: tl.constexpr):
    partial = tl.load(state + 1) != tl.load(state + 2)  # else every tie is taken: no need to count
    t, offs, lanes = chunk_lanes(chunk_tensor, chunk_start, numel, BLOCK)
    lanes = lanes & partial
    x = tl.load(typed(s_addr, t, DT) + offs, mask=lanes, other=0.0).to(tl.float32)
    kth = tl.load(state + 0).to(tl.uint32)
    count = tl.sum((lanes & (order_key(x, ABSOLUTE) == kth)).to(tl.int32), 0)
    tl.store(ties + tl.load(chunk_index + tl.program_id(0)), count)


@triton.jit
def _mask_kernel(s_addr, chunk_tensor, chunk_start, chunk_index, numel, state, ties, ties_before, bits, counts,
                 DT: tl.constexpr, ABSOLUTE: tl.constexpr, BLOCK: tl.constexpr):
    x, key, lanes = _load_keys(s_addr, chunk_tensor, chunk_start, numel, DT, ABSOLUTE, BLOCK)
    chunk = tl.load(chunk_index + tl.program_id(0))
    kth = tl.load(state + 0).to(tl.uint32)
    k_left = tl.load(state + 1)
    all_ties = k_left == tl.load(state + 2)
    # ties go to the lowest flat indices: this chunk takes what the chunks before it left
    quota = tl.minimum(tl.maximum(k_left - tl.load(ties_before + chunk), 0), tl.load(ties + chunk)).to(tl.int32)
    tie = lanes & (key == kth)
    rank = tl.cumsum(tie.to(tl.int32), 0) - 1
    selected = lanes & ((key > kth) | (tie & (all_ties | (rank < quota))))
    packed = tl.reshape(selected.to(tl.int32), [BLOCK // 8, 8]) << tl.arange(0, 8)[None, :]
    tl.store(bits + chunk * (BLOCK // 8) + tl.arange(0, BLOCK // 8), tl.sum(packed, 1).to(tl.uint8))
    tl.store(counts + chunk, tl.sum(selected.to(tl.int32), 0))


def topk_mask(scores, k, absolute=False, check_nan=True, first_hist=None):
    device = scores[0].device
    groups = tables.groups(scores)
    nchunks = sum(g.chunks for g in groups)
    state = torch.zeros(4, dtype=torch.int64, device=device)
    state[K_LEFT] = k
    hist = torch.zeros(len(RADIX_WIDTHS), RADIX_MAX_BINS, dtype=torch.int64, device=device)
    bits = torch.empty(nchunks * CHUNK_BYTES, dtype=torch.uint8, device=device)
    counts = torch.empty(nchunks, dtype=torch.int32, device=device)
    ties = torch.zeros(nchunks, dtype=torch.int64, device=device)

    def each_group(kernel, args, **meta):
        for g in groups:
            kernel[(g.chunks,)](tables.addresses(scores, g.members, device), g.chunk_tensor, g.chunk_start, *args(g),
                                DT=tl_dtype(g.dtype), ABSOLUTE=bool(absolute), BLOCK=BLOCK, **meta, **LAUNCH_OPTIONS)

    for p, (shift, width) in enumerate(zip(RADIX_SHIFTS, RADIX_WIDTHS)):
        if p > 0 and k == 0:
            break
        if p == 0 and first_hist is not None:  # counted by fisher_accumulate_: no pass over the scores
            hist[0].copy_(first_hist[:FIRST_BINS])
            state[NAN] = first_hist[FIRST_BINS]
        else:
            each_group(_histogram_kernel, lambda g: (g.numel, state, hist[p]), SHIFT=shift, WIDTH=width,
                       FIRST=p == 0, CHECK_NAN=bool(check_nan) and p == 0)
        if k > 0:
            _select_kernel[(1,)](state, hist[p], WIDTH=width)
    if check_nan and bool(state[NAN]):  # the one host sync, when asked for
        raise RuntimeError("topk_mask: scores contain NaN; the ranking is undefined")
    if k == 0:
        return bits.zero_(), counts.zero_()
    each_group(_tie_count_kernel, lambda g: (g.chunk_index, g.numel, state, ties))
    ties_before = torch.cumsum(ties, 0) - ties
    each_group(_mask_kernel, lambda g: (g.chunk_index, g.numel, state, ties, ties_before, bits, counts))
    return bits, counts
