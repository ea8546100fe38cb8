"""Loads the compiled ops (fsam_kernels._C) and registers their fake impls for torch.compile.

Without the extension the package still imports and runs on the `reference` backend; it
warns once.
"""
import warnings

import torch

try:
    from . import _C  # noqa: F401  (its TORCH_LIBRARY blocks define torch.ops.fsam)
    LOAD_ERROR = None
except ImportError as exc:  # not built, or built against another torch
    LOAD_ERROR = exc

LOADED = LOAD_ERROR is None
_warned = False


def warn_if_missing():
    global _warned
    if not LOADED and not _warned:
        _warned = True
        warnings.warn(f"fsam_kernels._C is not available ({LOAD_ERROR}); only the 'reference' backend "
                      "runs. Build it with `pip install --no-build-isolation -e .`", RuntimeWarning,
                      stacklevel=3)


def has_cuda_kernels():
    """Whether the extension was built with its CUDA impls."""
    return LOADED and torch._C._dispatch_has_kernel_for_dispatch_key("fsam::topk_mask", "CUDA")


if LOADED:
    from ._layout import CHUNK_BYTES, num_chunks

    @torch.library.register_fake("fsam::fisher_accumulate_")
    def _(fisher, grads, decay, alpha, found_inf=None):
        return None

    @torch.library.register_fake("fsam::topk_mask")
    def _(scores, k, absolute=False):
        chunks = sum(num_chunks(s.numel()) for s in scores)
        device = scores[0].device
        return (torch.empty(chunks * CHUNK_BYTES, dtype=torch.uint8, device=device),
                torch.empty(chunks, dtype=torch.int32, device=device))

    @torch.library.register_fake("fsam::grad_sumsq")
    def _(params, grads, mask_bits=None, adaptive=False, eta=0.0):
        return torch.empty(2, dtype=torch.float32, device=params[0].device)

    @torch.library.register_fake("fsam::masked_perturb_")
    def _(params, grads, mask_bits, save_offsets, saved, scale, adaptive=False, eta=0.0):
        return None

    @torch.library.register_fake("fsam::masked_restore_")
    def _(params, mask_bits, save_offsets, saved):
        return None
