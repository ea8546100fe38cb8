"""The op schemas, defined once: importing this module defines torch.ops.fsam.* (the C++ and
CUDA files only register impls), and `define` gives the Triton backend the same ops under its
own namespace.

The top-k is four stages that fsam_kernels/radix_topk.py drives (radix_histogram_ and
radix_select_ once per digit, then radix_tie_counts and radix_mask), so that a sharded run can
reduce between them.  state: int64 [RADIX_STATE_SIZE], hist: int64 [RADIX_HIST_SIZES[digit]]
(fsam_kernels/_layout.py).  first_hist: digit 0's histogram, which fisher_accumulate_ adds
into while it writes the new Fisher values; the top-k then skips its first pass over them.
candidates: int64 [capacity], the candidate buffer.  The digit-1 histogram, when the keys under
the first digit chosen (state[STATE_TIES], from radix_select_) number at most `capacity`, writes
this process's into it as (chunk << CANDIDATE_KEY_BITS) | key and their count into
state[STATE_CANDIDATES]; otherwise it sets that to capacity + 1.  Digit 2 and radix_tie_counts
read candidates[:state[STATE_CANDIDATES]] instead of the scores when that count fits.

Component-wise clipping: tensor_sumsq gives each tensor's sum of squares (float64 [len(tensors)],
the summation order of grad_sumsq), clip_scale_ multiplies tensor i by
min(1, max_norm / (norms[i] + eps)) (norms: float32 [len(tensors)]).

PAC-tuning's noise (the generator: pac_normal in fsam_kernels/reference.py): n = exp(log_std) * clamp(eps,
-max_noise, max_noise), eps the standard normal of counter bases[i] + element for (seed, step);
log_stds[i] is fp32 with params[i]'s numel, or one value for the whole tensor.  pac_noise_mask
marks the entries whose (w + n) - n is not w; pac_perturb_ adds the noise, saving the originals
of the marked entries as perturb_ does; pac_restore_ subtracts it and writes them back.
pac_bound_grads_ (after restore): log_std_grads[i] <- g eps e^p + (e^(2p - 2b_i) - 1) coef and
g += e^(-2b_i) (w - anchor) coef (b = prior_log_stds, fp32 [T]), and returns float64 [4, T]: per
tensor the sums of e^(2p), (w - anchor)^2, g^2 (before the addition) and p; with empty grads and
log_std_grads only the sums (g^2: 0).

The saved runs of perturb_, restore_, pac_perturb_ and pac_restore_ depend on the offsets' and the
mask's values.  Without `status` they are checked before anything is written and a bad layout is
refused (ValueError; on a GPU this reads one flag: a host sync).  With `status`, an int32 [1]
tensor on the device, they are checked on the device without a sync: when status is non-zero on
entry, or the layout is bad (which sets it to 1), the op writes nothing.  A perturbation and its
restore given the same status are so both done or both skipped; the caller reads status when it
syncs anyway."""
import torch

SCHEMAS = {
    "fisher_accumulate_": "(Tensor(a!)[] fisher, Tensor?[] grads, float decay, float alpha, "
                          "Tensor? found_inf=None, Tensor(b!)? first_hist=None) -> ()",
    "radix_histogram_": "(Tensor[] scores, Tensor(a!) state, int digit, bool absolute, Tensor(b!) hist, "
                        "Tensor(c!)? candidates=None) -> ()",
    "radix_select_": "(Tensor(a!) state, Tensor hist, int digit) -> ()",
    "radix_tie_counts": "(Tensor[] scores, Tensor state, bool absolute, Tensor? candidates=None) -> Tensor",
    "radix_mask": "(Tensor[] scores, Tensor state, Tensor ties, Tensor ties_before, bool absolute) "
                  "-> (Tensor mask_bits, Tensor chunk_counts)",
    "grad_sumsq": "(Tensor[] params, Tensor?[] grads, Tensor? mask_bits, bool adaptive=False, float eta=0.0) -> Tensor",
    "perturb_": "(Tensor(a!)[] params, Tensor?[] grads, Tensor? mask_bits, Tensor save_offsets, "
                       "Tensor(b!) saved, Tensor scale, bool adaptive=False, float eta=0.0, Tensor(c!)? status=None) -> ()",
    "restore_": "(Tensor(a!)[] params, Tensor? mask_bits, Tensor save_offsets, Tensor saved, "
                "Tensor(c!)? status=None) -> ()",
    "tensor_sumsq": "(Tensor[] tensors) -> Tensor",
    "clip_scale_": "(Tensor(a!)[] tensors, Tensor norms, float max_norm, float eps) -> ()",
    "pac_noise_mask": "(Tensor[] params, Tensor[] log_stds, int[] bases, int seed, int step, float max_noise) "
                      "-> (Tensor mask_bits, Tensor chunk_counts)",
    "pac_perturb_": "(Tensor(a!)[] params, Tensor[] log_stds, int[] bases, int seed, int step, float max_noise, "
                    "Tensor mask_bits, Tensor save_offsets, Tensor(b!) saved, Tensor(c!)? status=None) -> ()",
    "pac_restore_": "(Tensor(a!)[] params, Tensor[] log_stds, int[] bases, int seed, int step, float max_noise, "
                    "Tensor mask_bits, Tensor save_offsets, Tensor saved, Tensor(c!)? status=None) -> ()",
    "pac_bound_grads_": "(Tensor[] params, Tensor(a!)[] grads, Tensor[] log_stds, Tensor(b!)[] log_std_grads, "
                        "Tensor[] anchors, Tensor prior_log_stds, int[] bases, int seed, int step, float max_noise, "
                        "float coef) -> Tensor",
}


def define(namespace):
    """Define every op of SCHEMAS under `namespace`; keep the returned library alive."""
    lib = torch.library.Library(namespace, "FRAGMENT")
    for name, schema in SCHEMAS.items():
        lib.define(name + schema)
    return lib


FSAM_LIBRARY = define("fsam")
