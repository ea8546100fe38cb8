"""The `reference` backend: every op in plain eager PyTorch.

Readable first: this is the executable specification the compiled backends are tested
against, and the eager baseline of the benchmarks.  Signatures and results are those of the
torch.ops.fsam ops (fsam_kernels/_schemas.py); the element-wise arithmetic rounds in the same order.
"""
import torch

from ._contract import host_runs_pass
from ._layout import (CANDIDATE_KEY_BITS, CHUNK, FIRST_BINS, FIRST_SHIFT, RADIX_SHIFTS, RADIX_WIDTHS,
                      STATE_CANDIDATES, STATE_K_LEFT, STATE_PREFIX, STATE_TIES, ChunkLayout)


def order_key(x):
    """The radix keys of fp32 values as int64 in [0, 2^32): ordered like the floats, -0 = +0."""
    u = x.float().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    u = torch.where(u == 0x80000000, 0, u)
    return torch.where(u >= 0x80000000, u ^ 0xFFFFFFFF, u | 0x80000000)


def fisher_accumulate_(fisher, grads, decay, alpha, found_inf=None, first_hist=None):
    for f, g in zip(fisher, grads):
        new = f * decay
        if g is not None:
            gf = g.float().reshape(f.shape)
            new = new + gf * gf * alpha
        if found_inf is not None:
            new = torch.where(found_inf != 0, f, new)
        f.copy_(new)
        if first_hist is not None:
            first_hist[:FIRST_BINS] += torch.bincount((order_key(f) >> FIRST_SHIFT).reshape(-1), minlength=FIRST_BINS)
            first_hist[FIRST_BINS] += torch.isnan(f).sum()


def _keys(scores, absolute):
    """The keys of a score list as [chunks, CHUNK] int64, each tensor's padded to whole chunks
    with -1 (below every key)."""
    rows = []
    for s in scores:
        x = s.reshape(-1).float()
        key = order_key(x.abs() if absolute else x)
        rows.append(torch.nn.functional.pad(key, (0, -key.numel() % CHUNK), value=-1).view(-1, CHUNK))
    return torch.cat(rows) if rows else torch.zeros(0, CHUNK, dtype=torch.int64)


def _count_digit(hist, keys, counted, digit):
    shift, width = RADIX_SHIFTS[digit], RADIX_WIDTHS[digit]
    # index_add_ rather than bincount of the selected keys: no host sync on a GPU
    hist[:-1].index_add_(0, (keys.clamp(min=0) >> shift) & ((1 << width) - 1), counted.to(torch.int64))


def _under_prefix(keys, state, digit):
    """Which keys lie under the prefix that the digits before `digit` chose (-1 padding never)."""
    above = RADIX_SHIFTS[digit] + RADIX_WIDTHS[digit]
    return (keys >= 0) & ((keys >> above) == state[STATE_PREFIX])


def _fits(count, candidates):
    return (count >= 0) & (count <= candidates.numel())


def _buffered(state, candidates):
    """(whether the candidate buffer holds every key under the prefix, its keys, chunks and
    which of its entries are filled)."""
    count = state[STATE_CANDIDATES]
    usable = _fits(count, candidates)
    filled = torch.arange(candidates.numel(), device=candidates.device) < count
    keys = torch.where(filled, candidates & ((1 << CANDIDATE_KEY_BITS) - 1), -1)
    return usable, keys, candidates >> CANDIDATE_KEY_BITS, filled


def _append_candidates(keys, state, candidates):
    """Write the keys under the first digit chosen into the buffer when they fit (see _schemas.py)."""
    capacity = candidates.numel()
    match = _under_prefix(keys, state, 1)
    chunk = torch.arange(keys.shape[0], device=keys.device)[:, None].expand_as(keys)
    match, chunk, keys = match.reshape(-1), chunk.reshape(-1), keys.reshape(-1)
    slot = torch.cumsum(match.to(torch.int64), 0) - 1
    fits = _fits(state[STATE_TIES], candidates)
    # entries that are not written go to a spare slot past the end
    spare = torch.cat([candidates, candidates.new_zeros(1)])
    spare.scatter_(0, torch.where(match & fits & (slot < capacity), slot, capacity),
                   (chunk << CANDIDATE_KEY_BITS) | keys.clamp(min=0))
    candidates.copy_(spare[:capacity])
    state[STATE_CANDIDATES] = torch.where(fits, match.sum(), capacity + 1)


def radix_histogram_(scores, state, digit, absolute, hist, candidates=None):
    keys = _keys(scores, absolute)
    if digit == 0:
        _count_digit(hist, keys.reshape(-1), keys.reshape(-1) >= 0, 0)
        hist[-1] += sum(torch.isnan(s).sum() for s in scores)
        return
    counted = _under_prefix(keys, state, digit).reshape(-1)
    if candidates is not None and digit == 2:
        usable, buffer_keys, _, _ = _buffered(state, candidates)
        from_buffer = torch.zeros_like(hist)
        _count_digit(from_buffer, buffer_keys, _under_prefix(buffer_keys, state, digit), digit)
        from_scores = torch.zeros_like(hist)
        _count_digit(from_scores, keys.reshape(-1), counted, digit)
        hist += torch.where(usable, from_buffer, from_scores)
        return
    _count_digit(hist, keys.reshape(-1), counted, digit)
    if candidates is not None:
        _append_candidates(keys, state, candidates)


def radix_select_(state, hist, digit):
    counts = hist[:-1]
    bins = torch.arange(counts.numel(), device=counts.device)
    enough = counts.flip(0).cumsum(0).flip(0) >= state[STATE_K_LEFT]  # keys whose digit is >= d suffice
    d = torch.where(enough, bins, 0).max()
    greater = torch.where(bins > d, counts, 0).sum()
    state[STATE_PREFIX] = (state[STATE_PREFIX] << RADIX_WIDTHS[digit]) | d
    state[STATE_K_LEFT] -= greater
    state[STATE_TIES] = counts[d]


def radix_tie_counts(scores, state, absolute, candidates=None):
    counts = (_keys(scores, absolute) == state[STATE_PREFIX]).sum(1)
    if candidates is not None:
        usable, keys, chunk, filled = _buffered(state, candidates)
        from_buffer = torch.zeros_like(counts)
        ok = filled & (chunk >= 0) & (chunk < counts.numel())  # never index past the chunks
        from_buffer.index_add_(0, torch.where(ok, chunk, 0), (ok & (keys == state[STATE_PREFIX])).to(torch.int64))
        counts = torch.where(usable, from_buffer, counts)
    # every tie taken: nobody needs the counts (zeros, as the compiled backends give)
    return torch.where(state[STATE_K_LEFT] == state[STATE_TIES], 0, counts)


def radix_mask(scores, state, ties, ties_before, absolute):
    keys = _keys(scores, absolute)
    kth, k_left = state[STATE_PREFIX], state[STATE_K_LEFT]
    tie = keys == kth
    # ties go to the lowest flat indices: each chunk takes what the chunks before it left
    quota = torch.clamp(k_left - ties_before, min=0).minimum(ties)
    taken = tie & ((k_left == state[STATE_TIES]) | (tie.cumsum(1) <= quota[:, None]))
    selected = ((keys > kth) | taken) & (keys >= 0) & (k_left > 0)
    layout = ChunkLayout(scores)
    return layout.pack([selected[first: first + c].reshape(-1)[:n].reshape(shape) for first, c, n, shape in
                        zip(layout.first_chunk, layout.chunks, layout.numels, layout.shapes)])


def _masks(layout, mask_bits):
    if mask_bits is None:
        return [None] * len(layout.numels)
    return [layout.unpack(mask_bits, i).reshape(-1) for i in range(len(layout.numels))]


def _direction(p, g, adaptive, eta):
    """T_w^2 g in fp32 (T_w = |w| + eta for ASAM, 1 for SAM)."""
    d = g.float().reshape(-1)
    if adaptive:
        t = p.float().reshape(-1).abs() + eta
        d = d * (t * t)
    return d


def _chunk_sums(x):
    """fp64 sums of each CHUNK-element chunk of a flat tensor."""
    pad = -x.numel() % CHUNK
    return torch.nn.functional.pad(x, (0, pad)).view(-1, CHUNK).sum(1)


def grad_sumsq(params, grads, mask_bits=None, adaptive=False, eta=0.0):
    """The summation order of every backend: (T g)^2 summed in fp64 within each chunk (the
    square of an fp32 value is exact in fp64), the chunk partials added in fp64 in chunk
    order, the result rounded to fp32 once."""
    layout = ChunkLayout(params)
    partials = []  # [all, masked] per chunk, in chunk order
    for p, g, m in zip(params, grads, _masks(layout, mask_bits)):
        if g is None or p.numel() == 0:
            continue
        v = g.float().reshape(-1)
        if adaptive:
            v = v * (p.float().reshape(-1).abs() + eta)
        sq = v.double() * v.double()
        partials.append(torch.stack([_chunk_sums(sq), _chunk_sums(sq if m is None else torch.where(m, sq, 0))], 1))
    if not partials:
        return torch.zeros(2, dtype=torch.float32, device=layout.device)
    return torch.cat(partials).cumsum(0)[-1].float()  # cumsum: one addition after another


def _saved_as(saved, dtype):
    """The saved buffer as elements of `dtype` (it starts SAVE_ALIGN-aligned: the contract)."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if saved.numel() < itemsize:  # (an empty buffer need not be aligned)
        return torch.empty(0, dtype=dtype, device=saved.device)
    return saved[: saved.numel() // itemsize * itemsize].view(dtype)


def _slots(layout, index, mask, save_offsets, itemsize):
    """Where tensor `index`'s saved values go in the saved buffer as its dtype, in element order:
    the j-th value chunk c saves, at save_offsets[c] / itemsize + j."""
    first, chunks, n = layout.first_chunk[index], layout.chunks[index], layout.numels[index]
    taken = torch.ones(n, dtype=torch.bool, device=save_offsets.device) if mask is None else mask
    counts = torch.nn.functional.pad(taken.to(torch.int64), (0, chunks * CHUNK - n)).view(chunks, CHUNK).sum(1)
    chunk_of = torch.repeat_interleave(torch.arange(chunks, device=counts.device), counts)
    before = torch.cumsum(counts, 0) - counts
    rank = torch.arange(chunk_of.numel(), device=counts.device) - before[chunk_of]
    return save_offsets[first: first + chunks][chunk_of] // itemsize + rank


def perturb_(params, grads, mask_bits, save_offsets, saved, scale, adaptive=False, eta=0.0, status=None):
    if not host_runs_pass(params, mask_bits, save_offsets, saved, status):
        return
    layout = ChunkLayout(params)
    scale = scale.reshape(())  # one element, of any shape
    for i, (p, g, m) in enumerate(zip(params, grads, _masks(layout, mask_bits))):
        if p.numel() == 0:
            continue
        w = p.view(-1)
        _saved_as(saved, p.dtype)[_slots(layout, i, m, save_offsets, p.element_size())] = \
            w[m] if m is not None else w
        if g is None:
            continue
        new = (w.float() + _direction(p, g, adaptive, eta) * scale).to(p.dtype)
        new = torch.where(scale != 0, new, w)  # scale 0: rho = 0 or a non-finite norm
        if m is None:
            w.copy_(new)
        else:
            w[m] = new[m]


def restore_(params, mask_bits, save_offsets, saved, status=None):
    if not host_runs_pass(params, mask_bits, save_offsets, saved, status):
        return
    layout = ChunkLayout(params)
    for i, (p, m) in enumerate(zip(params, _masks(layout, mask_bits))):
        if p.numel() == 0:
            continue
        w = p.view(-1)
        original = _saved_as(saved, p.dtype)[_slots(layout, i, m, save_offsets, p.element_size())]
        if m is None:
            w.copy_(original)
        else:
            w[m] = original


def tensor_sumsq(tensors):
    """Each tensor's sum of squares in grad_sumsq's order: fp64 within a chunk, chunks in order."""
    sums = [_chunk_sums(t.float().reshape(-1).double() ** 2).cumsum(0)[-1] if t.numel() else
            torch.zeros((), dtype=torch.float64, device=t.device) for t in tensors]
    return torch.stack(sums) if sums else torch.zeros(0, dtype=torch.float64)


def clip_scale_(tensors, norms, max_norm, eps):
    # in fp32 as the kernels: fp32(max_norm) / (norm + fp32(eps)), NaN kept by the clamp
    coefficient = torch.tensor(max_norm, dtype=torch.float32) / (norms.float() + torch.tensor(eps, dtype=torch.float32))
    coefficient = torch.clamp(coefficient, max=1.0)
    for t, c in zip(tensors, coefficient):
        t.copy_((t.float() * c).to(t.dtype))


# ---- PAC-tuning's noise ---------------------------------------------------------------------
# Philox4x32-10 (Salmon et al., SC 2011; the generator of Random123, cuRAND and Triton) with key
# (seed low, seed high) and counter (index low, index high, step low, step high): every element
# draws from its own counter, so the noise does not depend on chunking, threads or blocks.
PHILOX_ROUNDS = 10
_PHILOX_MUL = (0xD2511F53, 0xCD9E8D57)
_PHILOX_KEY_STEP = (0x9E3779B9, 0xBB67AE85)
_LOW32 = 0xFFFFFFFF
_TWO_PI = 6.2831854820251465  # 2 pi rounded to fp32


def _mulhilo(a, x):
    """(high, low) 32-bit halves of the constant a times x (int64 tensor of uint32 values), in
    16-bit pieces so that no int64 product overflows."""
    high_part, low_part = x * (a >> 16), x * (a & 0xFFFF)
    middle = low_part + ((high_part & 0xFFFF) << 16)
    return ((high_part >> 16) + (middle >> 32)) & _LOW32, middle & _LOW32


def philox(counter, key):
    """Philox4x32-10 of four int64 tensors (or ints) of uint32 values and a pair of ints."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(PHILOX_ROUNDS):
        high0, low0 = _mulhilo(_PHILOX_MUL[0], c0)
        high1, low1 = _mulhilo(_PHILOX_MUL[1], c2)
        c0, c1, c2, c3 = high1 ^ c1 ^ k0, low1, high0 ^ c3 ^ k1, low0
        k0, k1 = (k0 + _PHILOX_KEY_STEP[0]) & _LOW32, (k1 + _PHILOX_KEY_STEP[1]) & _LOW32
    return c0, c1, c2, c3


def pac_normal(index, seed, step):
    """fp32 standard normals of the int64 counters `index` for (seed, step): Box-Muller on the
    first two Philox outputs, u1 = (x0 >> 9 + 1/2) 2^-23 in (0, 1) and u2 = (x1 >> 8) 2^-24, both
    exact in fp32; only log, sqrt and cos round (and differ between math libraries)."""
    zero = torch.zeros_like(index)
    x0, x1, _, _ = philox((index & _LOW32, (index >> 32) & _LOW32, zero + (step & _LOW32), zero + (step >> 32)),
                          (seed & _LOW32, (seed >> 32) & _LOW32))
    u1 = ((x0 >> 9).float() + 0.5) * 2.0 ** -23
    u2 = (x1 >> 8).float() * 2.0 ** -24
    radius = torch.sqrt(torch.log(u1) * -2.0)
    return radius * torch.cos(u2 * _TWO_PI)


def pac_noise(numel, log_std, base, seed, step, max_noise, device):
    """(eps clamped to [-max_noise, max_noise], n = exp(log_std) eps) for one tensor, fp32 flat."""
    index = torch.arange(numel, dtype=torch.int64, device=device) + base
    eps = pac_normal(index, seed, step).clamp(-max_noise, max_noise)
    return eps, torch.exp(log_std.reshape(-1).float()) * eps


def _pac_tensors(params, log_stds, bases, seed, step, max_noise):
    """Per tensor: (flat weights, noise n)."""
    for p, s, base in zip(params, log_stds, bases):
        yield p.view(-1), pac_noise(p.numel(), s, base, seed, step, max_noise, p.device)[1]


def _inexact(w, n):
    """Where restoring w + n by subtracting n would not give w back, bit for bit."""
    perturbed = (w.float() + n).to(w.dtype)
    back = (perturbed.float() - n).to(w.dtype)
    bits = torch.int32 if w.element_size() == 4 else torch.int16
    return back.view(bits) != w.view(bits)


def pac_noise_mask(params, log_stds, bases, seed, step, max_noise):
    layout = ChunkLayout(params)
    return layout.pack([_inexact(w, n) for w, n in _pac_tensors(params, log_stds, bases, seed, step, max_noise)])


def pac_perturb_(params, log_stds, bases, seed, step, max_noise, mask_bits, save_offsets, saved, status=None):
    if not host_runs_pass(params, mask_bits, save_offsets, saved, status):
        return
    layout = ChunkLayout(params)
    for i, (w, n) in enumerate(_pac_tensors(params, log_stds, bases, seed, step, max_noise)):
        if w.numel() == 0:
            continue
        m = layout.unpack(mask_bits, i).reshape(-1)
        _saved_as(saved, w.dtype)[_slots(layout, i, m, save_offsets, w.element_size())] = w[m]
        w.copy_((w.float() + n).to(w.dtype))


def pac_restore_(params, log_stds, bases, seed, step, max_noise, mask_bits, save_offsets, saved, status=None):
    if not host_runs_pass(params, mask_bits, save_offsets, saved, status):
        return
    layout = ChunkLayout(params)
    for i, (w, n) in enumerate(_pac_tensors(params, log_stds, bases, seed, step, max_noise)):
        if w.numel() == 0:
            continue
        m = layout.unpack(mask_bits, i).reshape(-1)
        w.copy_((w.float() - n).to(w.dtype))
        w[m] = _saved_as(saved, w.dtype)[_slots(layout, i, m, save_offsets, w.element_size())]


def _ordered_sum(x):
    """A tensor's fp64 sum in grad_sumsq's order: within each chunk, then the chunks in order."""
    return _chunk_sums(x.double()).cumsum(0)[-1] if x.numel() else torch.zeros((), dtype=torch.float64,
                                                                               device=x.device)


def pac_bound_grads_(params, grads, log_stds, log_std_grads, anchors, prior_log_stds, bases, seed, step, max_noise,
                     coef):
    coef = torch.tensor(coef, dtype=torch.float32)
    sums = []
    for i, (p, s, anchor) in enumerate(zip(params, log_stds, anchors)):
        log_std = s.reshape(-1).float().expand(p.numel())
        b = prior_log_stds[i].float()
        diff = p.reshape(-1).float() - anchor.reshape(-1).float()
        g_sq = torch.zeros((), dtype=torch.float64, device=p.device)
        if grads:
            g = grads[i].view(-1)
            gf = g.float()
            eps = pac_noise(p.numel(), s, bases[i], seed, step, max_noise, p.device)[0]
            kl = (torch.exp(log_std * 2.0 - b * 2.0) - 1.0) * coef
            log_std_grads[i].view(-1).copy_(gf * eps * torch.exp(log_std) + kl)
            g_sq = _ordered_sum(gf.double() * gf.double())
            g.copy_((gf + torch.exp(b * -2.0) * diff * coef).to(g.dtype))
        sums.append(torch.stack([_ordered_sum(torch.exp(log_std * 2.0)), _ordered_sum(diff.double() * diff.double()),
                                 g_sq, _ordered_sum(log_std)]))
    return torch.stack(sums, 1) if sums else torch.zeros(4, 0, dtype=torch.float64)
