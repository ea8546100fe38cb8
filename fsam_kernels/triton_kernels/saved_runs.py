"""A perturbation's saved runs checked on the device, for the ops given `status` (perturb_,
restore_, pac_perturb_, pac_restore_): no host sync.  A kernel gives each chunk's run end (-1
where the run would not lie inside `saved`), torch ops their order, and a bad layout sets status,
on which every write of the op's kernels is gated: all or nothing.  The rule is the contract's
(fsam_kernels/_contract.py, saved_runs_error); the CUDA impls do the same in
csrc/cuda/saved_runs.cuh."""
import functools

import torch
import triton
import triton.language as tl

from .._contract import CHECKED_LAYOUTS
from . import tables
from .common import BLOCK, LAUNCH_OPTIONS, chunk_lanes, itemsize, mask_lanes


@triton.jit(do_not_specialize=["capacity"])
def _run_ends_kernel(chunk_tensor, chunk_start, chunk_index, numel, bits, save_offsets, capacity, ends,
                     ITEMSIZE: tl.constexpr, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    _, _, lanes = chunk_lanes(chunk_tensor, chunk_start, numel, BLOCK)
    chunk = tl.load(chunk_index + tl.program_id(0))
    if MASKED:
        lanes = mask_lanes(bits, chunk, tl.arange(0, BLOCK) < BLOCK, BLOCK)  # every bit counts, as on the host
    nbytes = tl.sum(lanes.to(tl.int32), 0).to(tl.int64) * ITEMSIZE
    start = tl.load(save_offsets + chunk)
    fits = (start >= 0) & (start % ITEMSIZE == 0) & (start <= capacity) & (nbytes <= capacity - start)
    tl.store(ends + chunk, tl.where(fits, start + nbytes, -1))


@functools.lru_cache(maxsize=None)
def _open(device):
    return torch.zeros(1, dtype=torch.int32, device=device)  # read only


def gate(params, mask_bits, save_offsets, saved, status):
    """The int32 [1] tensor the op's kernels read (they write nothing where it is non-zero):
    without `status` a zero (the contract checked the runs on the host); with it, status, once the
    runs are checked into it (unless CHECKED_LAYOUTS holds them: then no launch)."""
    if status is None:
        return _open(save_offsets.device)
    if CHECKED_LAYOUTS.contains(params, mask_bits, save_offsets, saved, status):
        return status
    ends = torch.empty_like(save_offsets)
    for g in tables.groups(params):
        _run_ends_kernel[(g.chunks,)](
            g.chunk_tensor, g.chunk_start, g.chunk_index, g.numel, save_offsets if mask_bits is None else mask_bits,
            save_offsets, saved.numel(), ends, ITEMSIZE=itemsize(g.dtype),
            MASKED=mask_bits is not None, BLOCK=BLOCK, **LAUNCH_OPTIONS)
    bad = (ends < 0).any() | (save_offsets[1:] < ends[:-1]).any()
    status.copy_(status.ne(0) | bad)
    CHECKED_LAYOUTS.add(params, mask_bits, save_offsets, saved, status)  # a bad layout has set status
    return status


def elements(saved, dtype):
    """(the saved byte buffer as whole elements of `dtype`, their count): a byte tail shorter
    than an element, which no valid run reaches, is left out (and an empty buffer, which need not
    be aligned, holds none)."""
    count = saved.numel() // itemsize(dtype)
    if not count:
        return torch.empty(0, dtype=dtype, device=saved.device), 0
    return saved[: count * itemsize(dtype)].view(dtype), count
