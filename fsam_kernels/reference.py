"""The `reference` backend: every op in plain eager PyTorch.

Readable first: this is the executable specification the compiled backends are tested
against, and the eager baseline of the benchmarks.  Signatures and results are those of the
torch.ops.fsam ops (fsam_kernels/_schemas.py); the element-wise arithmetic rounds in the same order.
"""
import torch

from ._layout import (CHUNK, FIRST_BINS, FIRST_SHIFT, RADIX_SHIFTS, RADIX_WIDTHS, STATE_K_LEFT, STATE_PREFIX,
                      STATE_TIES, ChunkLayout)


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


def radix_histogram_(scores, state, digit, absolute, hist):
    keys = _keys(scores, absolute).reshape(-1)
    shift, width = RADIX_SHIFTS[digit], RADIX_WIDTHS[digit]
    counted = keys >= 0  # not the padding
    if digit > 0:
        counted &= (keys >> (shift + width)) == state[STATE_PREFIX]
    # index_add_ rather than bincount of the selected keys: no host sync on a GPU
    hist[:-1].index_add_(0, (keys.clamp(min=0) >> shift) & ((1 << width) - 1), counted.to(torch.int64))
    if digit == 0:
        hist[-1] += sum(torch.isnan(s).sum() for s in scores)


def radix_select_(state, hist, digit):
    counts = hist[:-1]
    bins = torch.arange(counts.numel(), device=counts.device)
    enough = counts.flip(0).cumsum(0).flip(0) >= state[STATE_K_LEFT]  # keys whose digit is >= d suffice
    d = torch.where(enough, bins, 0).max()
    greater = torch.where(bins > d, counts, 0).sum()
    state[STATE_PREFIX] = (state[STATE_PREFIX] << RADIX_WIDTHS[digit]) | d
    state[STATE_K_LEFT] -= greater
    state[STATE_TIES] = counts[d]


def radix_tie_counts(scores, state, absolute):
    counts = (_keys(scores, absolute) == state[STATE_PREFIX]).sum(1)
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


def perturb_(params, grads, mask_bits, save_offsets, saved, scale, adaptive=False, eta=0.0):
    layout = ChunkLayout(params)
    for i, (p, g, m) in enumerate(zip(params, grads, _masks(layout, mask_bits))):
        if p.numel() == 0:
            continue
        w = p.view(-1)
        original = w[m] if m is not None else w.clone()
        start = int(save_offsets[layout.first_chunk[i]])
        saved[start: start + original.numel() * original.element_size()].copy_(original.view(torch.uint8))
        if g is None:
            continue
        new = (w.float() + _direction(p, g, adaptive, eta) * scale).to(p.dtype)
        new = torch.where(scale != 0, new, w)  # scale 0: rho = 0 or a non-finite norm
        if m is None:
            w.copy_(new)
        else:
            w[m] = new[m]


def restore_(params, mask_bits, save_offsets, saved):
    layout = ChunkLayout(params)
    for i, (p, m) in enumerate(zip(params, _masks(layout, mask_bits))):
        if p.numel() == 0:
            continue
        w = p.view(-1)
        count = int(m.sum()) if m is not None else w.numel()
        start = int(save_offsets[layout.first_chunk[i]])
        original = saved[start: start + count * p.element_size()].view(p.dtype)
        if m is None:
            w.copy_(original)
        else:
            w[m] = original
