"""PAC-tuning's noise ops: the kernels, then their launchers.  The noise is the reference's
(fsam_kernels/reference.py, pac_normal): Philox4x32-10 through tl.philox, which draws the same
integers; Triton's log, cos, sqrt and exp round as the GPU's approximations do, so the noise
matches the other backends to a few ulps, and perturb and restore (the same code) match each
other exactly.  Saved originals follow fsam_kernels/_layout.py, as perturb_'s."""
import torch
import triton
import triton.language as tl

from .._layout import total_chunks
from . import saved_runs, tables
from .clip import tensor_sums
from .common import BLOCK, LAUNCH_OPTIONS, chunk_lanes, itemsize, mask_lanes, member_ptr, only_if, round_to, tl_dtype

# Philox and the transcendentals make these kernels compute-heavy: twice the warps of the others
# halve the elements (and registers) a thread holds.
PAC_LAUNCH = {**LAUNCH_OPTIONS, "num_warps": 16}

BOUND_SUMS = 4  # e^(2p), (w - anchor)^2, g^2, p


@triton.jit
def _eps(index, seed, step, max_noise):
    """The clamped standard normal of the int64 counters `index` (the reference's pac_normal)."""
    zero = index.to(tl.uint32) * 0
    step = step.to(tl.int64)
    x0, x1, _, _ = tl.philox(seed, index.to(tl.uint32), (index >> 32).to(tl.uint32),
                             zero + (step & 0xFFFFFFFF).to(tl.uint32), zero + (step >> 32).to(tl.uint32), 10)
    u1 = ((x0 >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # 2^-23
    u2 = (x1 >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2^-24
    e = tl.sqrt_rn(tl.log(u1) * -2.0) * tl.cos(u2 * 6.2831854820251465)
    return tl.minimum(tl.maximum(e, -max_noise), max_noise)


@triton.jit
def _noise(s_addr, s_stride, bases, t, offs, lanes, seed, step, max_noise):
    """(eps, n = e^log_std eps) of the lanes of member t."""
    s_ptr = tl.load(s_addr + t).to(tl.pointer_type(tl.float32))
    s = tl.load(s_ptr + offs * tl.load(s_stride + t), mask=lanes, other=0.0)
    eps = _eps(tl.load(bases + t) + offs, seed, step, max_noise)
    return eps, tl.exp(s) * eps


@triton.jit
def _bits(x, ITEMSIZE: tl.constexpr):
    if ITEMSIZE == 4:
        return x.to(tl.uint32, bitcast=True)
    else:
        return x.to(tl.uint16, bitcast=True)


@triton.jit(do_not_specialize=["seed", "step"])
def _pac_mask_kernel(p_addr, s_addr, s_stride, bases, chunk_tensor, chunk_start, chunk_index, numel, seed, step,
                     max_noise, bits, counts, DT: tl.constexpr, ITEMSIZE: tl.constexpr, BLOCK: tl.constexpr):
    t, offs, lanes = chunk_lanes(chunk_tensor, chunk_start, numel, BLOCK)
    chunk = tl.load(chunk_index + tl.program_id(0))
    w = tl.load(member_ptr(p_addr, t, DT) + offs, mask=lanes, other=0.0)
    _, n = _noise(s_addr, s_stride, bases, t, offs, lanes, seed, step, max_noise)
    back = round_to(round_to(w.to(tl.float32) + n, DT).to(tl.float32) - n, DT)
    inexact = lanes & (_bits(back, ITEMSIZE) != _bits(w, ITEMSIZE))
    packed = tl.reshape(inexact.to(tl.int32), [BLOCK // 8, 8]) << tl.arange(0, 8)[None, :]
    tl.store(bits + chunk * (BLOCK // 8) + tl.arange(0, BLOCK // 8), tl.sum(packed, 1).to(tl.uint8))
    tl.store(counts + chunk, tl.sum(inexact.to(tl.int32), 0))


@triton.jit
def _runs(bits, save_offsets, capacity, gate, chunk, lanes, ITEMSIZE: tl.constexpr, BLOCK: tl.constexpr):
    """(lanes of a chunk whose saved run lies inside the buffer while the gate is zero: none
    otherwise, so that its weights stay as they are and restore stays exact; the marked ones;
    their slots)."""
    lanes = only_if(lanes, tl.load(gate) == 0)
    marked = mask_lanes(bits, chunk, lanes, BLOCK)
    start = tl.load(save_offsets + chunk)
    count = tl.sum(marked.to(tl.int32), 0).to(tl.int64)
    fits = (start >= 0) & (start % ITEMSIZE == 0) & (start // ITEMSIZE + count <= capacity)
    lanes = tl.where(fits, lanes, False)
    slot = start // ITEMSIZE + (tl.cumsum(marked.to(tl.int32), 0) - 1).to(tl.int64)
    return lanes, lanes & marked, slot


@triton.jit
def _shift_lanes(p_addr, s_addr, s_stride, bases, chunk_tensor, chunk_start, chunk_index, numel, seed, step, max_noise,
                 bits, save_offsets, capacity, gate, DT: tl.constexpr, ITEMSIZE: tl.constexpr, BLOCK: tl.constexpr):
    """What perturb and restore share: (weight pointers, weights, noise, lanes, marked lanes, slots)."""
    t, offs, lanes = chunk_lanes(chunk_tensor, chunk_start, numel, BLOCK)
    chunk = tl.load(chunk_index + tl.program_id(0))
    lanes, marked, slot = _runs(bits, save_offsets, capacity, gate, chunk, lanes, ITEMSIZE, BLOCK)
    w_ptr = member_ptr(p_addr, t, DT) + offs
    w = tl.load(w_ptr, mask=lanes, other=0.0)
    _, n = _noise(s_addr, s_stride, bases, t, offs, lanes, seed, step, max_noise)
    return w_ptr, w, n, lanes, marked, slot


@triton.jit(do_not_specialize=["seed", "step", "capacity"])
def _pac_perturb_kernel(p_addr, s_addr, s_stride, bases, chunk_tensor, chunk_start, chunk_index, numel, seed, step,
                        max_noise, bits, save_offsets, saved, capacity, gate, DT: tl.constexpr,
                        ITEMSIZE: tl.constexpr, BLOCK: tl.constexpr):
    w_ptr, w, n, lanes, marked, slot = _shift_lanes(p_addr, s_addr, s_stride, bases, chunk_tensor, chunk_start,
                                                    chunk_index, numel, seed, step, max_noise, bits, save_offsets,
                                                    capacity, gate, DT, ITEMSIZE, BLOCK)
    tl.store(saved + slot, w, mask=marked)
    tl.store(w_ptr, round_to(w.to(tl.float32) + n, DT), mask=lanes)


@triton.jit(do_not_specialize=["seed", "step", "capacity"])
def _pac_restore_kernel(p_addr, s_addr, s_stride, bases, chunk_tensor, chunk_start, chunk_index, numel, seed, step,
                        max_noise, bits, save_offsets, saved, capacity, gate, DT: tl.constexpr,
                        ITEMSIZE: tl.constexpr, BLOCK: tl.constexpr):
    w_ptr, w, n, lanes, marked, slot = _shift_lanes(p_addr, s_addr, s_stride, bases, chunk_tensor, chunk_start,
                                                    chunk_index, numel, seed, step, max_noise, bits, save_offsets,
                                                    capacity, gate, DT, ITEMSIZE, BLOCK)
    back = round_to(w.to(tl.float32) - n, DT)
    tl.store(w_ptr, tl.where(marked, tl.load(saved + slot, mask=marked), back), mask=lanes)


@triton.jit(do_not_specialize=["seed", "step"])
def _pac_bound_kernel(p_addr, g_addr, s_addr, sg_addr, a_addr, positions, prior, bases, chunk_tensor,
                      chunk_start, chunk_index, numel, seed, step, max_noise, coef, partials, DT: tl.constexpr,
                      WITH_GRADS: tl.constexpr, SUMS: tl.constexpr, BLOCK: tl.constexpr):
    t, offs, lanes = chunk_lanes(chunk_tensor, chunk_start, numel, BLOCK)
    chunk = tl.load(chunk_index + tl.program_id(0))
    w = tl.load(member_ptr(p_addr, t, DT) + offs, mask=lanes, other=0.0).to(tl.float32)
    w0 = tl.load(member_ptr(a_addr, t, DT) + offs, mask=lanes, other=0.0).to(tl.float32)
    s = tl.load(member_ptr(s_addr, t, tl.float32) + offs, mask=lanes, other=0.0)
    b = tl.load(prior + tl.load(positions + t))
    diff = w - w0
    row = partials + SUMS * chunk
    tl.store(row, tl.sum(tl.where(lanes, tl.exp(s * 2.0), 0.0).to(tl.float64), 0))
    tl.store(row + 1, tl.sum(diff.to(tl.float64) * diff.to(tl.float64), 0))
    tl.store(row + 3, tl.sum(s.to(tl.float64), 0))
    if WITH_GRADS:
        g_ptr = member_ptr(g_addr, t, DT) + offs
        g = tl.load(g_ptr, mask=lanes, other=0.0).to(tl.float32)
        tl.store(row + 2, tl.sum(g.to(tl.float64) * g.to(tl.float64), 0))
        eps = _eps(tl.load(bases + t) + offs, seed, step, max_noise)
        kl = (tl.exp(s * 2.0 - b * 2.0) - 1.0) * coef
        tl.store(member_ptr(sg_addr, t, tl.float32) + offs, g * eps * tl.exp(s) + kl, mask=lanes)
        tl.store(g_ptr, round_to(g + tl.exp(b * -2.0) * diff * coef, DT), mask=lanes)
    else:
        tl.store(row + 2, 0.0)


def _noise_tables(params, log_stds, bases, group, device):
    """(log-std addresses, their strides: 0 for one value per tensor, the counter bases) of a group."""
    strides = [int(log_stds[m].numel() != 1) for m in group.members]
    return (tables.addresses(log_stds, group.members, device), tables.int64_table(tuple(strides), device),
            tables.int64_table(tuple(bases[m] for m in group.members), device))


def pac_noise_mask(params, log_stds, bases, seed, step, max_noise):
    device = params[0].device
    total = total_chunks(params)
    bits = torch.zeros(total * (BLOCK // 8), dtype=torch.uint8, device=device)
    counts = torch.zeros(total, dtype=torch.int32, device=device)
    for g in tables.groups(params):
        _pac_mask_kernel[(g.chunks,)](
            tables.addresses(params, g.members, device), *_noise_tables(params, log_stds, bases, g, device),
            g.chunk_tensor, g.chunk_start, g.chunk_index, g.numel, seed, step, float(max_noise), bits, counts,
            DT=tl_dtype(g.dtype), ITEMSIZE=itemsize(g.dtype), BLOCK=BLOCK, **PAC_LAUNCH)
    return bits, counts


def _shift(kernel, params, log_stds, bases, seed, step, max_noise, mask_bits, save_offsets, saved, status):
    device = params[0].device
    gate = saved_runs.gate(params, mask_bits, save_offsets, saved, status)
    for g in tables.groups(params):
        kernel[(g.chunks,)](
            tables.addresses(params, g.members, device), *_noise_tables(params, log_stds, bases, g, device),
            g.chunk_tensor, g.chunk_start, g.chunk_index, g.numel, seed, step, float(max_noise), mask_bits,
            save_offsets, *saved_runs.elements(saved, g.dtype), gate, DT=tl_dtype(g.dtype), ITEMSIZE=itemsize(g.dtype),
            BLOCK=BLOCK, **PAC_LAUNCH)


def pac_perturb_(params, log_stds, bases, seed, step, max_noise, mask_bits, save_offsets, saved, status=None):
    _shift(_pac_perturb_kernel, params, log_stds, bases, seed, step, max_noise, mask_bits, save_offsets, saved, status)


def pac_restore_(params, log_stds, bases, seed, step, max_noise, mask_bits, save_offsets, saved, status=None):
    _shift(_pac_restore_kernel, params, log_stds, bases, seed, step, max_noise, mask_bits, save_offsets, saved, status)


def pac_bound_grads_(params, grads, log_stds, log_std_grads, anchors, prior_log_stds, bases, seed, step, max_noise,
                     coef):
    device = params[0].device
    groups = tables.groups(params)
    partials = torch.zeros(sum(g.chunks for g in groups), BOUND_SUMS, dtype=torch.float64, device=device)
    with_grads = bool(grads)
    for g in groups:
        grad_addr = tables.addresses(grads if with_grads else params, g.members, device)
        sg_addr = tables.addresses(log_std_grads if with_grads else log_stds, g.members, device)
        _pac_bound_kernel[(g.chunks,)](
            tables.addresses(params, g.members, device), grad_addr, tables.addresses(log_stds, g.members, device),
            sg_addr, tables.addresses(anchors, g.members, device), g.positions, prior_log_stds,
            tables.int64_table(tuple(bases[m] for m in g.members), device), g.chunk_tensor, g.chunk_start,
            g.chunk_index, g.numel, seed, step, float(max_noise), float(coef), partials, DT=tl_dtype(g.dtype),
            WITH_GRADS=with_grads, SUMS=BOUND_SUMS, BLOCK=BLOCK, **PAC_LAUNCH)
    return tensor_sums(partials, params, BOUND_SUMS)
