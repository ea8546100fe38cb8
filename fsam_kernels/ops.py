"""The ops' Python entry points: normalise the arguments, pick the backend, run it.

Every function takes lists of tensors (one call covers the whole list) and `backend=None`
(the fastest for the tensors' device) or one of `available_backends()`.  The argument contract
(fsam_kernels/_contract.py, csrc/include/fsam/checks.h) is checked once, before anything is
written, by the backend's raw op, which every caller goes through: in C++ for the compiled
backends, in Python for `reference` and `triton`; errors name the argument at fault
(docs/errors.md).  Here only what the raw op cannot see: the lists themselves, the scalars it
would convert, k and NaN scores; an empty list, which runs no backend, is checked here whole.
Checking it twice cost a step more host time than the kernels' launches (benchmarks/host.py).
"""
from collections.abc import Sequence
from typing import Optional

import torch

from . import _contract, backends, radix_topk
from ._checks import check_number
from ._layout import FIRST_HIST_SIZE, ChunkLayout, total_chunks

FLOAT_DTYPES = _contract.FLOAT_DTYPES
_tensor_list = _contract.tensor_list
_device_of = _contract.device_of


def _number(name, value, low=0.0):
    check_number(name, value, low)
    return float(value)


def new_first_hist(device: torch.device | str) -> torch.Tensor:
    """A zeroed first_hist for fisher_accumulate to fill and topk_mask_packed to use."""
    return torch.zeros(FIRST_HIST_SIZE, dtype=torch.int64, device=device)


def fisher_accumulate(fisher: Sequence[torch.Tensor], grads: Sequence[Optional[torch.Tensor]], *, decay: float = 1.0,
                      alpha: float = 1.0, found_inf: Optional[torch.Tensor] = None,
                      first_hist: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> None:
    """In place: fisher[i] <- decay * fisher[i] + alpha * grads[i]**2 (fp32), for every i.

    A None gradient counts as zero.  With `found_inf` (a one-element tensor on the device),
    nothing changes when it is non-zero, without a host sync.  With `first_hist` (from
    new_first_hist) the pass also counts the first radix digit of the new values, which
    topk_mask_packed(fisher, k, first_hist=...) then need not read them for.
    """
    fisher = _tensor_list("fisher", fisher)
    grads = [g if g is None else g.contiguous() for g in _tensor_list("grads", grads, optional=True)]
    args = (fisher, grads, _number("decay", decay), _number("alpha", alpha), found_inf, first_hist)
    if not fisher:
        return _contract.check("fisher_accumulate_", *args)
    backends.op("fisher_accumulate_", backends.resolve(backend, fisher[0].device))(*args)


def topk_mask_packed(scores: Sequence[torch.Tensor], k: int, *, absolute: bool = False,
                     first_hist: Optional[torch.Tensor] = None, backend: Optional[str] = None,
                     exchange: radix_topk.Exchange = radix_topk.LOCAL,
                     candidate_capacity: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest scores over the whole list (|scores| with absolute=True) as a packed bit
    mask and per-chunk popcounts (layout in fsam_kernels/_layout.py), by radix select
    (fsam_kernels/radix_topk.py).

    Exactly k entries are selected; among equal scores the lower flat index wins (flat index:
    list order, then row-major).  NaN scores raise.  `first_hist`: what fisher_accumulate
    counted while writing these scores (saves a pass; not with absolute=True).  `exchange`:
    what combines the stages across processes (radix_topk.Exchange; none by default).
    `candidate_capacity`: entries (8 bytes each) of the buffer that spares the later passes
    reading every score when the candidates fit (None: _layout.CANDIDATE_DIVISOR-th of the scores; 0: none).
    """
    scores = [s.contiguous() for s in _tensor_list("scores", scores)]
    _contract.check_floats("scores", scores)
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    total = sum(s.numel() for s in scores)
    if not 0 <= k <= total:
        raise ValueError(f"k must be in [0, {total}] (the number of scores), got {k}")
    device = _device_of(scores=scores)
    if candidate_capacity is not None and (isinstance(candidate_capacity, bool) or not isinstance(
            candidate_capacity, int) or candidate_capacity < 0):
        raise ValueError(f"candidate_capacity must be None or an int >= 0, got {candidate_capacity!r}")
    if first_hist is not None:
        _contract.check_buffer("first_hist", first_hist, torch.int64, FIRST_HIST_SIZE, device)
        if absolute:
            raise ValueError("first_hist counts the signed scores; it cannot serve absolute=True")
    if total == 0:
        chunks = total_chunks(scores)
        return (torch.zeros(0, dtype=torch.uint8, device=device), torch.zeros(chunks, dtype=torch.int32, device=device))
    return radix_topk.topk_mask(scores, k, backend=backends.resolve(backend, device), absolute=bool(absolute),
                                first_hist=first_hist, exchange=exchange, candidate_capacity=candidate_capacity)


def topk_mask(scores: Sequence[torch.Tensor], k: int, *, absolute: bool = False,
              backend: Optional[str] = None) -> list[torch.Tensor]:
    """Like topk_mask_packed, unpacked: one bool tensor shaped like each score tensor."""
    scores = _tensor_list("scores", scores)
    bits, _ = topk_mask_packed(scores, k, absolute=absolute, backend=backend)
    layout = ChunkLayout(scores)
    return [layout.unpack(bits, i) for i in range(len(scores))]


def grad_sumsq(params: Sequence[torch.Tensor], grads: Sequence[Optional[torch.Tensor]], *,
               mask_bits: Optional[torch.Tensor] = None, adaptive: bool = False, eta: float = 0.0,
               backend: Optional[str] = None) -> torch.Tensor:
    """fp32 tensor [sum of (T g)^2, the same over the masked entries] with T = |w| + eta when
    adaptive (ASAM) else 1; without a mask both are the full sum.  A non-finite first entry
    means a non-finite gradient (or an overflow).  None gradients are skipped."""
    params = _tensor_list("params", params)
    grads = _contiguous(_tensor_list("grads", grads, optional=True))
    args = (params, grads, mask_bits, bool(adaptive), _number("eta", eta))
    if not params:
        _contract.check("grad_sumsq", *args)
        return torch.zeros(2, dtype=torch.float32, device=_device_of(params=params, grads=grads))
    return backends.op("grad_sumsq", backends.resolve(backend, params[0].device))(*args)


def _contiguous(grads):
    return [g if g is None else g.contiguous() for g in grads]


def perturb(params: Sequence[torch.Tensor], grads: Sequence[Optional[torch.Tensor]], scale: torch.Tensor, *,
            save_offsets: torch.Tensor, saved: torch.Tensor, mask_bits: Optional[torch.Tensor] = None,
            adaptive: bool = False, eta: float = 0.0, status: Optional[torch.Tensor] = None,
            backend: Optional[str] = None) -> None:
    """In place: w <- w + scale * m * T^2 g for every masked entry (every entry without a mask),
    after saving its original value at save_offsets into `saved`.  `scale` is a one-element
    fp32 tensor on the device; 0 leaves the weights untouched (they are still saved).
    status: None, the saved layout is checked first and a bad one refused (ValueError; on a GPU
    one host sync); or an int32 [1] tensor on the device, the layout checked there without a
    sync: nothing is written when status is non-zero or the layout is bad (which sets it to 1)."""
    params = _tensor_list("params", params)
    grads = _contiguous(_tensor_list("grads", grads, optional=True))
    if isinstance(scale, torch.Tensor):
        scale = scale.reshape(())
    elif params:  # refused in the contract's words: the schema's own error would not name it
        _contract.check_scale(scale, params[0].device)
    args = (params, grads, mask_bits, save_offsets, saved, scale, bool(adaptive), _number("eta", eta), status)
    if not params:
        return _contract.check("perturb_", *args)
    backends.op("perturb_", backends.resolve(backend, params[0].device))(*args)


def restore(params: Sequence[torch.Tensor], *, save_offsets: torch.Tensor, saved: torch.Tensor,
            mask_bits: Optional[torch.Tensor] = None, status: Optional[torch.Tensor] = None,
            backend: Optional[str] = None) -> None:
    """In place: write back the originals that perturb saved (bit-exact).  status: as perturb's
    (given the same one, a skipped perturb's restore is skipped too)."""
    params = _tensor_list("params", params)
    args = (params, mask_bits, save_offsets, saved, status)
    if not params:
        return _contract.check("restore_", *args)
    backends.op("restore_", backends.resolve(backend, params[0].device))(*args)


def save_layout(params: Sequence[torch.Tensor],
                chunk_counts: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(save_offsets, saved) for `params`: for the mask whose popcounts are `chunk_counts`,
    or for every entry when None.  Syncs once to size the buffer."""
    params = _tensor_list("params", params)
    layout = ChunkLayout(params)
    counts = layout.full_counts() if chunk_counts is None else chunk_counts
    offsets, total = layout.save_offsets(counts)
    return offsets, torch.empty(int(total), dtype=torch.uint8, device=layout.device)


def counter_bases(params: Sequence[torch.Tensor]) -> list[int]:
    """PAC noise counters: each element's flat index over the whole list (list order, then
    row-major), the default `bases` of the pac_* ops."""
    bases, total = [], 0
    for p in params:
        bases.append(total)
        total += p.numel()
    return bases


def pac_noise_mask(params: Sequence[torch.Tensor], log_stds: Sequence[torch.Tensor], *, seed: int, step: int, max_noise: float = 2.0,
                   bases: Optional[Sequence[int]] = None,
                   backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PAC-tuning's noise n = exp(log_std) * clamp(eps, -max_noise, max_noise), eps the standard
    normal that Philox gives element `bases[i] + j` of tensor i for (seed, step): the packed
    mask (and per-chunk popcounts) of the entries where (w + n) - n is not w bit for bit, the
    only ones pac_perturb must save.  log_stds: fp32, one per element or one per tensor."""
    bases = counter_bases(params) if bases is None else list(bases)
    args = (_tensor_list("params", params), [s.contiguous() for s in _tensor_list("log_stds", log_stds)], bases,
            seed, step, max_noise)
    if not args[0]:
        _contract.check("pac_noise_mask", *args)
        device = _device_of(params=args[0], log_stds=args[1])
        return torch.zeros(0, dtype=torch.uint8, device=device), torch.zeros(0, dtype=torch.int32, device=device)
    _contract.pac_scalars(bases, seed, step, max_noise, len(args[0]))
    args = args[:-1] + (float(max_noise),)
    return backends.op("pac_noise_mask", backends.resolve(backend, args[0][0].device))(*args)


def _pac_shift(op, params, log_stds, seed, step, mask_bits, save_offsets, saved, max_noise, bases, status, backend):
    params = _tensor_list("params", params)
    bases = counter_bases(params) if bases is None else list(bases)
    args = (params, [s.contiguous() for s in _tensor_list("log_stds", log_stds)], bases, seed, step, max_noise,
            mask_bits, save_offsets, saved, status)
    if not params:
        return _contract.check(op, *args)
    _contract.pac_scalars(bases, seed, step, max_noise, len(params))
    args = args[:5] + (float(max_noise),) + args[6:]
    backends.op(op, backends.resolve(backend, params[0].device))(*args)


def pac_perturb(params: Sequence[torch.Tensor], log_stds: Sequence[torch.Tensor], *, seed: int, step: int, mask_bits: torch.Tensor,
                save_offsets: torch.Tensor, saved: torch.Tensor, max_noise: float = 2.0,
                bases: Optional[Sequence[int]] = None, status: Optional[torch.Tensor] = None,
                backend: Optional[str] = None) -> None:
    """In place: w <- w + n (pac_noise_mask's noise), saving the originals of the entries that
    `mask_bits` (from pac_noise_mask with the same arguments) marks.  status: as perturb's."""
    _pac_shift("pac_perturb_", params, log_stds, seed, step, mask_bits, save_offsets, saved, max_noise, bases, status,
               backend)


def pac_restore(params: Sequence[torch.Tensor], log_stds: Sequence[torch.Tensor], *, seed: int, step: int, mask_bits: torch.Tensor,
                save_offsets: torch.Tensor, saved: torch.Tensor, max_noise: float = 2.0,
                bases: Optional[Sequence[int]] = None, status: Optional[torch.Tensor] = None,
                backend: Optional[str] = None) -> None:
    """In place: w <- w - n, then the saved originals written back: bit-exactly the weights
    before pac_perturb with the same arguments (and backend).  status: as perturb's."""
    _pac_shift("pac_restore_", params, log_stds, seed, step, mask_bits, save_offsets, saved, max_noise, bases, status,
               backend)


def pac_bound_grads(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], log_stds: Sequence[torch.Tensor], log_std_grads: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor],
                    prior_log_stds: torch.Tensor, coef: float, *, seed: int = 0, step: int = 0,
                    max_noise: float = 2.0, bases: Optional[Sequence[int]] = None,
                    backend: Optional[str] = None) -> torch.Tensor:
    """PAC-tuning's stage-1 pass at the restored weights w, with the noise of (seed, step): per
    element, log_std_grads <- g eps e^p + (e^(2p - 2b) - 1) coef and g <- g + e^(-2b) (w - anchor)
    coef (b: tensor i's prior log-std prior_log_stds[i]); returns float64 [4, len(params)], per
    tensor the sums of e^(2p), (w - anchor)^2, g^2 (before the addition) and p.  With grads and
    log_std_grads both [], only the sums (the g^2 row 0).  log_stds: one per element here."""
    params = _tensor_list("params", params)
    bases = counter_bases(params) if bases is None else list(bases)
    args = (params, grads, [s.contiguous() for s in _tensor_list("log_stds", log_stds)], log_std_grads,
            [a.contiguous() for a in _tensor_list("anchors", anchors)], prior_log_stds, bases, seed, step, max_noise,
            coef)
    if not params:
        _contract.check("pac_bound_grads_", *args)
        return torch.zeros(4, 0, dtype=torch.float64, device=_device_of(params=params))
    _contract.pac_scalars(bases, seed, step, max_noise, len(params))
    args = args[:9] + (float(max_noise), float(coef))
    return backends.op("pac_bound_grads_", backends.resolve(backend, params[0].device))(*args)


# The names of fsam_kernels 0.1 (they did the dense perturbation too, mask_bits=None).
masked_perturb, masked_restore = perturb, restore
