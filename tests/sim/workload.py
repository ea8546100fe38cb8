"""One call of every op family on fixed inputs, for comparing the emulated CUDA kernels under
different schedules, SM counts and mutations: odd sizes around the chunk, an empty tensor, a
misaligned view (the vector loads' tails), bf16 next to fp32, tied scores, and the top-k with the
candidate buffer, without it and on its overflow."""
import torch

from fsam_kernels import clip_grad_norm_componentwise_, ops
from fsam_kernels._layout import CHUNK

SHAPES = [(CHUNK + 3,), (3,), (33, 65), (0,), (2 * CHUNK - 1,), (700,)]


def inputs(seed=1234):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g) for s in SHAPES] + [torch.randn(1001, generator=g)[1:]]
    grads = [torch.randn(p.shape, generator=g) for p in params]
    fisher = [torch.rand(p.shape, generator=g) for p in params]
    tied = [torch.randint(0, 5, p.shape, generator=g).float() for p in params]
    log_stds = [torch.full(p.shape, -2.0) + torch.rand(p.shape, generator=g) for p in params]
    return params, grads, fisher, tied, log_stds


def cat(tensors):
    return torch.cat([t.reshape(-1).float() for t in tensors])


def run_all(backend):
    """{name: tensor} of every output of every op family on `backend` (CPU tensors)."""
    params, grads, fisher, tied, log_stds = inputs()
    n = sum(p.numel() for p in params)
    out = {}

    hist = ops.new_first_hist("cpu")
    ops.fisher_accumulate(fisher, grads, decay=0.9, alpha=0.1, first_hist=hist, backend=backend)
    out["fisher"], out["first_hist"] = cat(fisher), hist
    for cap in (None, 0, 7):  # the default buffer, none, one that overflows
        out[f"topk_{cap}"] = ops.topk_mask_packed(fisher, n // 10, first_hist=hist, candidate_capacity=cap,
                                                  backend=backend)
    for k in (1, n // 3, n):
        out[f"topk_ties_{k}"] = ops.topk_mask_packed(tied, k, absolute=True, backend=backend)
    bits, counts = out["topk_None"]

    for adaptive in (False, True):
        out[f"sumsq_{adaptive}"] = ops.grad_sumsq(params, grads, mask_bits=bits, adaptive=adaptive, eta=0.01,
                                                  backend=backend)
    half = [p.bfloat16() for p in params]
    half_grads = [g.bfloat16() for g in grads]
    for mask, dtype_params, dtype_grads in ((bits, params, grads), (None, half, half_grads)):
        ws = [w.clone() for w in dtype_params]
        offsets, saved = ops.save_layout(ws, None if mask is None else counts)
        saved.fill_(0xAB)
        ops.perturb(ws, dtype_grads, torch.tensor(0.3), save_offsets=offsets, saved=saved, mask_bits=mask,
                    adaptive=mask is None, eta=0.01, backend=backend)
        name = "masked" if mask is not None else "dense_bf16"
        out[f"perturbed_{name}"], out[f"saved_{name}"] = cat(ws), saved.clone()
        ops.restore(ws, save_offsets=offsets, saved=saved, mask_bits=mask, backend=backend)
        out[f"restored_{name}"] = cat(ws)

    clipped = [torch.nn.Parameter(p.clone()) for p in params]
    for c, g in zip(clipped, grads):
        c.grad = g.clone()
    out["clip_norms"] = clip_grad_norm_componentwise_(clipped, 0.5, backend=backend)
    out["clipped"] = cat([c.grad for c in clipped])

    noise = dict(seed=7, step=3, max_noise=2.0, backend=backend)
    for name, ws in (("fp32", [p.clone() for p in params]), ("bf16", [p.bfloat16() for p in params])):
        pac_bits, pac_counts = ops.pac_noise_mask(ws, log_stds, **noise)
        offsets, saved = ops.save_layout(ws, pac_counts)
        ops.pac_perturb(ws, log_stds, mask_bits=pac_bits, save_offsets=offsets, saved=saved, **noise)
        out[f"pac_mask_{name}"], out[f"pac_perturbed_{name}"] = pac_bits, cat(ws)
        ops.pac_restore(ws, log_stds, mask_bits=pac_bits, save_offsets=offsets, saved=saved, **noise)
        out[f"pac_restored_{name}"] = cat(ws)
    pac_grads, log_std_grads = [g.clone() for g in grads], [torch.empty(p.shape) for p in params]
    out["pac_sums"] = ops.pac_bound_grads(params, pac_grads, log_stds, log_std_grads, [p * 0.9 for p in params],
                                          torch.full((len(params),), -1.5), 1e-3, **noise)
    out["pac_grads"], out["pac_log_std_grads"] = cat(pac_grads), cat(log_std_grads)
    return out


def flat(results):
    """{name: tensor} with tuples split, for comparing two runs."""
    out = {}
    for name, value in results.items():
        for i, t in enumerate(value if isinstance(value, tuple) else (value,)):
            out[f"{name}[{i}]"] = t
    return out


def differences(a, b):
    """The names of the outputs of two run_all results that are not the same bits."""
    a, b = flat(a), flat(b)
    return [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8))]
