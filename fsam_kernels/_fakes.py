"""Fake (meta) impls of the ops, shared by torch.ops.fsam and torch.ops.fsam_triton: shapes
depend only on the inputs' shapes, so torch.compile can trace through the ops."""
import torch

from ._layout import CHUNK_BYTES, total_chunks


def register_fakes(namespace):
    @torch.library.register_fake(f"{namespace}::fisher_accumulate_")
    def _(fisher, grads, decay, alpha, found_inf=None, first_hist=None):
        return None

    @torch.library.register_fake(f"{namespace}::radix_histogram_")
    def _(scores, state, digit, absolute, hist, candidates=None):
        return None

    @torch.library.register_fake(f"{namespace}::radix_select_")
    def _(state, hist, digit):
        return None

    @torch.library.register_fake(f"{namespace}::radix_tie_counts")
    def _(scores, state, absolute, candidates=None):
        return torch.empty(total_chunks(scores), dtype=torch.int64, device=state.device)

    @torch.library.register_fake(f"{namespace}::radix_mask")
    def _(scores, state, ties, ties_before, absolute):
        return (torch.empty(total_chunks(scores) * CHUNK_BYTES, dtype=torch.uint8, device=state.device),
                torch.empty(total_chunks(scores), dtype=torch.int32, device=state.device))

    @torch.library.register_fake(f"{namespace}::grad_sumsq")
    def _(params, grads, mask_bits=None, adaptive=False, eta=0.0):
        return torch.empty(2, dtype=torch.float32, device=params[0].device)

    @torch.library.register_fake(f"{namespace}::perturb_")
    def _(params, grads, mask_bits, save_offsets, saved, scale, adaptive=False, eta=0.0, status=None):
        return None

    @torch.library.register_fake(f"{namespace}::restore_")
    def _(params, mask_bits, save_offsets, saved, status=None):
        return None

    @torch.library.register_fake(f"{namespace}::tensor_sumsq")
    def _(tensors):
        return torch.empty(len(tensors), dtype=torch.float64, device=tensors[0].device if tensors else "cpu")

    @torch.library.register_fake(f"{namespace}::clip_scale_")
    def _(tensors, norms, max_norm, eps):
        return None

    @torch.library.register_fake(f"{namespace}::pac_noise_mask")
    def _(params, log_stds, bases, seed, step, max_noise):
        device = params[0].device if params else "cpu"
        return (torch.empty(total_chunks(params) * CHUNK_BYTES, dtype=torch.uint8, device=device),
                torch.empty(total_chunks(params), dtype=torch.int32, device=device))

    @torch.library.register_fake(f"{namespace}::pac_perturb_")
    def _(params, log_stds, bases, seed, step, max_noise, mask_bits, save_offsets, saved, status=None):
        return None

    @torch.library.register_fake(f"{namespace}::pac_restore_")
    def _(params, log_stds, bases, seed, step, max_noise, mask_bits, save_offsets, saved, status=None):
        return None

    @torch.library.register_fake(f"{namespace}::pac_bound_grads_")
    def _(params, grads, log_stds, log_std_grads, anchors, prior_log_stds, bases, seed, step, max_noise, coef):
        return torch.empty(4, len(params), dtype=torch.float64, device=prior_log_stds.device)
