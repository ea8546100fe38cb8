"""Fake (meta) impls of the ops, shared by torch.ops.fsam and torch.ops.fsam_triton: shapes
depend only on the inputs' shapes, so torch.compile can trace through the ops."""
import torch

from ._layout import CHUNK_BYTES, num_chunks


def register_fakes(namespace):
    @torch.library.register_fake(f"{namespace}::fisher_accumulate_")
    def _(fisher, grads, decay, alpha, found_inf=None, first_hist=None):
        return None

    @torch.library.register_fake(f"{namespace}::topk_mask")
    def _(scores, k, absolute=False, check_nan=True, first_hist=None):
        chunks = sum(num_chunks(s.numel()) for s in scores)
        device = scores[0].device
        return (torch.empty(chunks * CHUNK_BYTES, dtype=torch.uint8, device=device),
                torch.empty(chunks, dtype=torch.int32, device=device))

    @torch.library.register_fake(f"{namespace}::grad_sumsq")
    def _(params, grads, mask_bits=None, adaptive=False, eta=0.0):
        return torch.empty(2, dtype=torch.float32, device=params[0].device)

    @torch.library.register_fake(f"{namespace}::masked_perturb_")
    def _(params, grads, mask_bits, save_offsets, saved, scale, adaptive=False, eta=0.0):
        return None

    @torch.library.register_fake(f"{namespace}::masked_restore_")
    def _(params, mask_bits, save_offsets, saved):
        return None
