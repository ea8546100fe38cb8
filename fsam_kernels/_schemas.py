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
min(1, max_norm / (norms[i] + eps)) (norms: float32 [len(tensors)])."""
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
                       "Tensor(b!) saved, Tensor scale, bool adaptive=False, float eta=0.0) -> ()",
    "restore_": "(Tensor(a!)[] params, Tensor? mask_bits, Tensor save_offsets, Tensor saved) -> ()",
    "tensor_sumsq": "(Tensor[] tensors) -> Tensor",
    "clip_scale_": "(Tensor(a!)[] tensors, Tensor norms, float max_norm, float eps) -> ()",
}


def define(namespace):
    """Define every op of SCHEMAS under `namespace`; keep the returned library alive."""
    lib = torch.library.Library(namespace, "FRAGMENT")
    for name, schema in SCHEMAS.items():
        lib.define(name + schema)
    return lib


FSAM_LIBRARY = define("fsam")
