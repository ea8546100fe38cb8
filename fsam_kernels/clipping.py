"""Component-wise gradient-norm clipping (Yang & Ma, EMNLP 2022) on the fused kernels.

A component is one parameter tensor: each gradient g_j is scaled by min(1, c / (||g_j|| + eps)),
the formula of torch.nn.utils.clip_grad_norm_ applied to one tensor at a time.  Two fused
multi-tensor passes (the per-tensor sums of squares, then the scaling), no host sync and no
per-parameter Python loop.  Where it runs in a training step (after unscaling, once per
accumulation window, after the DDP all-reduce, on the gradient the base optimizer uses) is up to
the caller: fsam_kernels.optim.micro_batches.sharpness_step and the Trainer integration do it there.
"""
from collections.abc import Iterable
from typing import Optional, Union

import torch

from . import backends
from ._checks import check_number
from .ops import FLOAT_DTYPES
from .sharding import check_placed_like, local, sharding_of

CLIP_MODES = ("global", "componentwise")


def _gradients(parameters):
    """(the local gradients of the parameters that have one, their device, their Sharding)."""
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    grads, device, with_grad = [], None, []
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"parameters[{i}] must be a tensor, got {type(p).__name__}")
        g = p.grad
        if g is None:
            continue
        if g.is_sparse:
            raise ValueError(f"parameters[{i}].grad is sparse; only dense gradients are supported")
        if g.dtype not in FLOAT_DTYPES:
            raise TypeError(f"parameters[{i}].grad is {g.dtype}; float32, bfloat16 and float16 are supported")
        if not g.is_contiguous():
            raise ValueError(f"parameters[{i}].grad is not contiguous; it is scaled in place")
        check_placed_like(g, p, f"parameters[{i}].grad")
        if device is None:
            device = g.device
        elif g.device != device:
            raise ValueError(f"parameters[{i}].grad is on {g.device}, other gradients on {device}: "
                             "clip each device's parameters in their own call")
        grads.append(local(g))
        with_grad.append(p)
    return grads, device, sharding_of(with_grad)


@torch.no_grad()
def clip_grad_norm_componentwise_(parameters: Union[torch.Tensor, Iterable[torch.Tensor]], max_norm: float, *,
                                  eps: float = 1e-6, error_if_nonfinite: bool = False,
                                  backend: Optional[str] = None) -> torch.Tensor:
    """Clip every gradient to L2 norm `max_norm` on its own, in place: g <- g * min(1, max_norm /
    (||g|| + eps)) for each parameter with a gradient (as torch.nn.utils.clip_grad_norm_([p],
    max_norm) per tensor, to rounding of the norm).

    Returns the norms before clipping, one fp32 entry per parameter that has a gradient, in order,
    on the gradients' device.  A non-finite norm clips its tensor as torch's formula does (to 0 for
    an infinite norm, to NaN for a NaN one); error_if_nonfinite=True raises instead, before any
    gradient changes (that check reads the norms back: one sync).

    FSDP2's DTensor parameters: each norm is the whole tensor's (the shards' sums of squares
    all-reduced), every process gets all the norms and scales its own shards."""
    check_number("max_norm", max_norm, 0.0, finite=False)
    check_number("eps", eps, 0.0)
    grads, device, sharding = _gradients(parameters)
    if not grads:
        return torch.zeros(0, dtype=torch.float32)
    backend = backends.resolve(backend, device)
    norms = sharding.all_reduce_(backends.op("tensor_sumsq", backend)(grads)).sqrt().float()
    if error_if_nonfinite and not bool(torch.isfinite(norms).all()):
        bad = torch.nonzero(~torch.isfinite(norms)).flatten().tolist()
        raise RuntimeError(f"clip_grad_norm_componentwise_: the gradients at positions {bad} (among those with a "
                           "gradient) have a non-finite norm; pass error_if_nonfinite=False to clip them anyway")
    backends.op("clip_scale_", backend)(grads, norms, float(max_norm), float(eps))
    return norms


def clip_gradients_(parameters, max_norm, mode, *, backend=None):
    """The clipping of a training step: "global" (torch.nn.utils.clip_grad_norm_) or
    "componentwise".  Returns the norm of the whole gradient before clipping (a 0-dim tensor)."""
    if mode == "global":
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    if mode == "componentwise":
        return clip_grad_norm_componentwise_(parameters, max_norm, backend=backend).norm()
    raise ValueError(f"clip mode must be one of {CLIP_MODES}, got {mode!r}")
