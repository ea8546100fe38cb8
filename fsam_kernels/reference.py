"""The `reference` backend: every op in plain eager PyTorch.

Readable first: this is the executable specification the compiled backends are tested
against, and the eager baseline of the benchmarks.  Signatures and results are those of the
torch.ops.fsam ops (fsam_kernels/_schemas.py); the element-wise arithmetic rounds in the same order.
"""
import torch

from ._layout import CHUNK, FIRST_BINS, FIRST_SHIFT, ChunkLayout


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


def topk_mask(scores, k, absolute=False, check_nan=True, first_hist=None):
    layout = ChunkLayout(scores)
    keys = torch.cat([s.reshape(-1).float() for s in scores]) if scores else torch.zeros(0)
    if absolute:
        keys = keys.abs()
    if torch.isnan(keys).any() or (check_nan and first_hist is not None and first_hist[FIRST_BINS] > 0):
        raise RuntimeError("topk_mask: scores contain NaN; the ranking is undefined")
    if not 0 <= k <= keys.numel():
        raise RuntimeError(f"topk_mask: k must be in [0, {keys.numel()}] (the number of scores), got {k}")
    # A stable descending sort keeps equal scores in flat order: the lower flat index wins.
    top = torch.sort(keys, descending=True, stable=True).indices[:k]
    selected = torch.zeros(keys.numel(), dtype=torch.bool, device=keys.device)
    selected[top] = True
    return layout.pack(selected.split(layout.numels))


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


def masked_perturb_(params, grads, mask_bits, save_offsets, saved, scale, adaptive=False, eta=0.0):
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


def masked_restore_(params, mask_bits, save_offsets, saved):
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
