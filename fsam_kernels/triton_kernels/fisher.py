"""Fisher accumulation F <- decay F + alpha g^2 over a list: the kernel, then its launcher."""
import torch
import triton
import triton.language as tl

from .._layout import FIRST_BINS, FIRST_SHIFT
from . import tables
from .common import BLOCK, LAUNCH_OPTIONS, chunk_lanes, count_digits, member_ptr, only_if, order_key, tl_dtype

_FIRST_SHIFT = tl.constexpr(FIRST_SHIFT)
_FIRST_BINS = tl.constexpr(FIRST_BINS)


@triton.jit
def _fisher_kernel(f_addr, g_addr, chunk_tensor, chunk_start, numel, found_inf, first_hist, decay, alpha,
                   G_DT: tl.constexpr, HAS_FOUND_INF: tl.constexpr, HIST: tl.constexpr, BLOCK: tl.constexpr):
    t, offs, lanes = chunk_lanes(chunk_tensor, chunk_start, numel, BLOCK)
    if HAS_FOUND_INF:  # skipped: nothing read, nothing written
        lanes = only_if(lanes, tl.load(found_inf) == 0)
    f_ptr = member_ptr(f_addr, t, tl.float32)
    has_grad = tl.load(g_addr + t) != 0
    g = tl.load(member_ptr(g_addr, t, G_DT) + offs, mask=only_if(lanes, has_grad), other=0.0).to(tl.float32)
    f = tl.load(f_ptr + offs, mask=lanes, other=0.0)
    f = f * decay + (g * g) * alpha
    tl.store(f_ptr + offs, f, mask=lanes)
    if HIST:  # the top-k's first radix pass, while F is in registers (see _schemas.py)
        count_digits(first_hist, (order_key(f, False) >> _FIRST_SHIFT).to(tl.int32), lanes, _FIRST_BINS, BLOCK)
        tl.atomic_add(first_hist + _FIRST_BINS, tl.sum(((f != f) & lanes).to(tl.int32), 0).to(tl.int64))


def fisher_accumulate_(fisher, grads, decay, alpha, found_inf=None, first_hist=None):
    # Grouped by the gradients' dtype (F is always fp32); a missing gradient goes with fp32.
    keyed = [g if g is not None else f for f, g in zip(fisher, grads)]
    device = fisher[0].device
    if found_inf is not None:  # non-zero (NaN included) skips, whatever its dtype: on the device, no sync
        found_inf = found_inf.reshape(1).ne(0).to(torch.int32)
    for group in tables.groups(keyed):
        _fisher_kernel[(group.chunks,)](
            tables.addresses(fisher, group.members, device), tables.addresses(grads, group.members, device),
            group.chunk_tensor, group.chunk_start, group.numel,
            found_inf if found_inf is not None else group.numel,
            first_hist if first_hist is not None else group.numel, float(decay), float(alpha),
            G_DT=tl_dtype(group.dtype), HAS_FOUND_INF=found_inf is not None, HIST=first_hist is not None,
            BLOCK=BLOCK, **LAUNCH_OPTIONS)
