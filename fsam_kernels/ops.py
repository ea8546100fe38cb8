"""The ops' Python entry points: check the arguments, pick the backend, run it.

Every function takes lists of tensors (one call covers the whole list) and `backend=None`
(the fastest for the tensors' device) or one of `available_backends()`.  The arguments are
checked here, before anything is written, and errors name the argument at fault.
"""
from collections.abc import Sequence
from typing import Optional

import torch

from . import backends, radix_topk
from ._layout import CHUNK_BYTES, FIRST_HIST_SIZE, ChunkLayout, total_chunks

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _tensor_list(name, tensors, *, optional=False):
    if isinstance(tensors, torch.Tensor):
        raise TypeError(f"{name} must be a list of tensors, got a single tensor")
    out = list(tensors)
    for i, t in enumerate(out):
        if t is None and optional:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a tensor{' or None' if optional else ''}, got {type(t).__name__}")
        if t.is_sparse:
            raise ValueError(f"{name}[{i}] is sparse; only dense tensors are supported")
    return out


def _device_of(**lists):
    device = None
    for name, tensors in lists.items():
        for i, t in enumerate(tensors):
            if t is None:
                continue
            if device is None:
                device = t.device
            elif t.device != device:
                raise ValueError(f"{name}[{i}] is on {t.device}, other tensors on {device}: one call takes one device")
    return device or torch.device("cpu")


def _check_floats(name, tensors, dtypes=FLOAT_DTYPES):
    for i, t in enumerate(tensors):
        if t is not None and t.dtype not in dtypes:
            raise TypeError(f"{name}[{i}] must be one of {[str(d) for d in dtypes]}, got {t.dtype}")


def _check_contiguous(name, tensors):
    for i, t in enumerate(tensors):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name}[{i}] must be contiguous (in-place ops write through it)")


def _check_grads(params, grads):
    if len(grads) != len(params):
        raise ValueError(f"grads has {len(grads)} entries, params has {len(params)}")
    for i, (p, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        if g.numel() != p.numel():
            raise ValueError(f"grads[{i}] has {g.numel()} elements, params[{i}] has {p.numel()}")
        if g.dtype != p.dtype:
            raise TypeError(f"grads[{i}] is {g.dtype} but params[{i}] is {p.dtype}")
    return [g if g is None else g.contiguous() for g in grads]


def _check_buffer(name, t, dtype, numel, device):
    if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.dim() != 1 or not t.is_contiguous():
        raise TypeError(f"{name} must be a contiguous 1-D {dtype} tensor")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"{name} has {t.numel()} entries, expected {numel}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, the tensors on {device}")


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
    grads = _tensor_list("grads", grads, optional=True)
    _check_floats("fisher", fisher, (torch.float32,))
    _check_floats("grads", grads)
    _check_contiguous("fisher", fisher)
    if len(grads) != len(fisher):
        raise ValueError(f"grads has {len(grads)} entries, fisher has {len(fisher)}")
    for i, (f, g) in enumerate(zip(fisher, grads)):
        if g is not None and g.numel() != f.numel():
            raise ValueError(f"grads[{i}] has {g.numel()} elements, fisher[{i}] has {f.numel()}")
    device = _device_of(fisher=fisher, grads=grads)
    if found_inf is not None and (found_inf.numel() != 1 or found_inf.device != device):
        raise ValueError(f"found_inf must be a one-element tensor on {device}")
    if first_hist is not None:
        _check_buffer("first_hist", first_hist, torch.int64, FIRST_HIST_SIZE, device)
    if not fisher:
        return
    grads = [g if g is None else g.contiguous() for g in grads]
    impl = backends.op("fisher_accumulate_", backends.resolve(backend, device))
    impl(fisher, grads, float(decay), float(alpha), found_inf, first_hist)


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
    scores = _tensor_list("scores", scores)
    _check_floats("scores", scores)
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
        _check_buffer("first_hist", first_hist, torch.int64, FIRST_HIST_SIZE, device)
        if absolute:
            raise ValueError("first_hist counts the signed scores; it cannot serve absolute=True")
    if total == 0:
        chunks = total_chunks(scores)
        return (torch.zeros(0, dtype=torch.uint8, device=device), torch.zeros(chunks, dtype=torch.int32, device=device))
    scores = [s.contiguous() for s in scores]
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
    grads = _check_grads(params, _tensor_list("grads", grads, optional=True))
    _check_floats("params", params)
    _check_contiguous("params", params)
    device = _device_of(params=params, grads=grads)
    if mask_bits is not None:
        _check_buffer("mask_bits", mask_bits, torch.uint8, total_chunks(params) * CHUNK_BYTES, device)
    if not params:
        return torch.zeros(2, dtype=torch.float32, device=device)
    impl = backends.op("grad_sumsq", backends.resolve(backend, device))
    return impl(params, grads, mask_bits, bool(adaptive), float(eta))


def _check_saving(params, mask_bits, save_offsets, saved, device):
    """The buffers of a save, and that `saved` holds every run save_offsets places in it for
    this mask: no backend then writes or reads outside it.  One sync on a GPU (the optimizers,
    which size `saved` by construction, call the backends directly and never sync here)."""
    chunks = total_chunks(params)
    if mask_bits is not None:
        _check_buffer("mask_bits", mask_bits, torch.uint8, chunks * CHUNK_BYTES, device)
    _check_buffer("save_offsets", save_offsets, torch.int64, chunks, device)
    _check_buffer("saved", saved, torch.uint8, None, device)
    layout = ChunkLayout(params)
    counts = layout.full_counts() if mask_bits is None else layout.chunk_counts(mask_bits)
    needed = int(layout.saved_bytes_needed(save_offsets, counts))
    if needed < 0:
        raise ValueError("save_offsets has a negative offset or one not aligned to its tensor's element size")
    if needed > saved.numel():
        raise ValueError(f"saved has {saved.numel()} bytes but save_offsets and the mask need {needed}: "
                         "size it with save_layout(params, chunk_counts)")


def perturb(params: Sequence[torch.Tensor], grads: Sequence[Optional[torch.Tensor]], scale: torch.Tensor, *,
            save_offsets: torch.Tensor, saved: torch.Tensor, mask_bits: Optional[torch.Tensor] = None,
            adaptive: bool = False, eta: float = 0.0, backend: Optional[str] = None) -> None:
    """In place: w <- w + scale * m * T^2 g for every masked entry (every entry without a mask),
    after saving its original value at save_offsets into `saved`.  `scale` is a one-element
    fp32 tensor on the device; 0 leaves the weights untouched (they are still saved)."""
    params = _tensor_list("params", params)
    grads = _check_grads(params, _tensor_list("grads", grads, optional=True))
    _check_floats("params", params)
    _check_contiguous("params", params)
    device = _device_of(params=params, grads=grads)
    _check_saving(params, mask_bits, save_offsets, saved, device)
    if not isinstance(scale, torch.Tensor) or scale.numel() != 1 or scale.dtype != torch.float32 or \
            scale.device != device:
        raise TypeError(f"scale must be a one-element float32 tensor on {device}")
    if not params:
        return
    impl = backends.op("perturb_", backends.resolve(backend, device))
    impl(params, grads, mask_bits, save_offsets, saved, scale.reshape(()), bool(adaptive), float(eta))


def restore(params: Sequence[torch.Tensor], *, save_offsets: torch.Tensor, saved: torch.Tensor,
            mask_bits: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> None:
    """In place: write back the originals that perturb saved (bit-exact)."""
    params = _tensor_list("params", params)
    _check_floats("params", params)
    _check_contiguous("params", params)
    device = _device_of(params=params)
    _check_saving(params, mask_bits, save_offsets, saved, device)
    if not params:
        return
    impl = backends.op("restore_", backends.resolve(backend, device))
    impl(params, mask_bits, save_offsets, saved)


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


def _check_pac(params, log_stds, bases, seed, step, max_noise):
    """The arguments every PAC noise op shares; returns (params, log_stds, bases, device)."""
    params = _tensor_list("params", params)
    log_stds = _tensor_list("log_stds", log_stds)
    _check_floats("params", params)
    _check_contiguous("params", params)
    _check_floats("log_stds", log_stds, (torch.float32,))
    if len(log_stds) != len(params):
        raise ValueError(f"log_stds has {len(log_stds)} entries, params has {len(params)}")
    for i, (p, s) in enumerate(zip(params, log_stds)):
        if s.numel() not in (1, p.numel()):
            raise ValueError(f"log_stds[{i}] has {s.numel()} elements; params[{i}] has {p.numel()} (or give 1)")
    device = _device_of(params=params, log_stds=log_stds)
    bases = counter_bases(params) if bases is None else list(bases)
    if len(bases) != len(params) or any(isinstance(b, bool) or not isinstance(b, int) or b < 0 for b in bases):
        raise ValueError(f"bases must hold one int >= 0 per tensor ({len(params)}), got {bases!r}")
    for name, value in (("seed", seed), ("step", step)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2 ** 63:
            raise ValueError(f"{name} must be an int in [0, 2**63), got {value!r}")
    if isinstance(max_noise, bool) or not isinstance(max_noise, (int, float)) or not max_noise > 0:
        raise ValueError(f"max_noise must be a number > 0 (inf: no clamp), got {max_noise!r}")
    return params, [s.contiguous() for s in log_stds], bases, device


def pac_noise_mask(params: Sequence[torch.Tensor], log_stds: Sequence[torch.Tensor], *, seed: int, step: int, max_noise: float = 2.0,
                   bases: Optional[Sequence[int]] = None,
                   backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PAC-tuning's noise n = exp(log_std) * clamp(eps, -max_noise, max_noise), eps the standard
    normal that Philox gives element `bases[i] + j` of tensor i for (seed, step): the packed
    mask (and per-chunk popcounts) of the entries where (w + n) - n is not w bit for bit, the
    only ones pac_perturb must save.  log_stds: fp32, one per element or one per tensor."""
    params, log_stds, bases, device = _check_pac(params, log_stds, bases, seed, step, max_noise)
    if not params:
        return torch.zeros(0, dtype=torch.uint8, device=device), torch.zeros(0, dtype=torch.int32, device=device)
    impl = backends.op("pac_noise_mask", backends.resolve(backend, device))
    return impl(params, log_stds, bases, seed, step, float(max_noise))


def _pac_shift(op, params, log_stds, seed, step, mask_bits, save_offsets, saved, max_noise, bases, backend):
    params, log_stds, bases, device = _check_pac(params, log_stds, bases, seed, step, max_noise)
    if mask_bits is None:
        raise ValueError("mask_bits is required: pac_noise_mask gives it")
    _check_saving(params, mask_bits, save_offsets, saved, device)
    if params:
        impl = backends.op(op, backends.resolve(backend, device))
        impl(params, log_stds, bases, seed, step, float(max_noise), mask_bits, save_offsets, saved)


def pac_perturb(params: Sequence[torch.Tensor], log_stds: Sequence[torch.Tensor], *, seed: int, step: int, mask_bits: torch.Tensor,
                save_offsets: torch.Tensor, saved: torch.Tensor, max_noise: float = 2.0,
                bases: Optional[Sequence[int]] = None, backend: Optional[str] = None) -> None:
    """In place: w <- w + n (pac_noise_mask's noise), saving the originals of the entries that
    `mask_bits` (from pac_noise_mask with the same arguments) marks."""
    _pac_shift("pac_perturb_", params, log_stds, seed, step, mask_bits, save_offsets, saved, max_noise, bases, backend)


def pac_restore(params: Sequence[torch.Tensor], log_stds: Sequence[torch.Tensor], *, seed: int, step: int, mask_bits: torch.Tensor,
                save_offsets: torch.Tensor, saved: torch.Tensor, max_noise: float = 2.0,
                bases: Optional[Sequence[int]] = None, backend: Optional[str] = None) -> None:
    """In place: w <- w - n, then the saved originals written back: bit-exactly the weights
    before pac_perturb with the same arguments (and backend)."""
    _pac_shift("pac_restore_", params, log_stds, seed, step, mask_bits, save_offsets, saved, max_noise, bases, backend)


def pac_bound_grads(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], log_stds: Sequence[torch.Tensor], log_std_grads: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor],
                    prior_log_stds: torch.Tensor, coef: float, *, seed: int = 0, step: int = 0,
                    max_noise: float = 2.0, bases: Optional[Sequence[int]] = None,
                    backend: Optional[str] = None) -> torch.Tensor:
    """PAC-tuning's stage-1 pass at the restored weights w, with the noise of (seed, step): per
    element, log_std_grads <- g eps e^p + (e^(2p - 2b) - 1) coef and g <- g + e^(-2b) (w - anchor)
    coef (b: tensor i's prior log-std prior_log_stds[i]); returns float64 [4, len(params)], per
    tensor the sums of e^(2p), (w - anchor)^2, g^2 (before the addition) and p.  With grads and
    log_std_grads both [], only the sums (the g^2 row 0).  log_stds: one per element here."""
    params, log_stds, bases, device = _check_pac(params, log_stds, bases, seed, step, max_noise)
    grads = _tensor_list("grads", grads)
    log_std_grads = _tensor_list("log_std_grads", log_std_grads)
    anchors = _tensor_list("anchors", anchors)
    if bool(grads) != bool(log_std_grads) or (grads and len(grads) != len(params)) or \
            (log_std_grads and len(log_std_grads) != len(params)):
        raise ValueError("grads and log_std_grads must both have one tensor per parameter, or both be empty")
    _check_contiguous("grads", grads)
    _check_contiguous("log_std_grads", log_std_grads)
    _check_floats("log_std_grads", log_std_grads, (torch.float32,))
    _device_of(params=params, grads=grads, log_std_grads=log_std_grads, anchors=anchors)
    for name, tensors, same_dtype in (("grads", grads, True), ("log_std_grads", log_std_grads, False),
                                      ("anchors", anchors, True), ("log_stds", log_stds, False)):
        if name == "anchors" and len(tensors) != len(params):
            raise ValueError(f"anchors has {len(tensors)} entries, params has {len(params)}")
        for i, (p, t) in enumerate(zip(params, tensors)):
            if t.numel() != p.numel():
                raise ValueError(f"{name}[{i}] has {t.numel()} elements, params[{i}] has {p.numel()}")
            if same_dtype and t.dtype != p.dtype:
                raise TypeError(f"{name}[{i}] is {t.dtype} but params[{i}] is {p.dtype}")
    anchors = [a.contiguous() for a in anchors]
    _check_buffer("prior_log_stds", prior_log_stds, torch.float32, len(params), device)
    if not params:
        return torch.zeros(4, 0, dtype=torch.float64, device=device)
    impl = backends.op("pac_bound_grads_", backends.resolve(backend, device))
    return impl(params, grads, log_stds, log_std_grads, anchors, prior_log_stds, bases, seed, step, float(max_noise),
                float(coef))


# The names of fsam_kernels 0.1 (they did the dense perturbation too, mask_bits=None).
masked_perturb, masked_restore = perturb, restore
