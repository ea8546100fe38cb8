"""The op schemas, defined once: importing this module defines torch.ops.fsam.* (the C++ and
CUDA files only register impls), and `define` gives the Triton backend the same ops under its
own namespace.

first_hist: int64 [FIRST_HIST_SIZE] (fsam_kernels/_layout.py), the histogram of the first
radix digit of the new Fisher values' keys and, last, the count of NaN.  fisher_accumulate_
adds into it when given; topk_mask then skips its first pass over the scores."""
import torch

SCHEMAS = {
    "fisher_accumulate_": "(Tensor(a!)[] fisher, Tensor?[] grads, float decay, float alpha, "
                          "Tensor? found_inf=None, Tensor(b!)? first_hist=None) -> ()",
    "topk_mask": "(Tensor[] scores, int k, bool absolute=False, bool check_nan=True, Tensor? first_hist=None) "
                 "-> (Tensor bits, Tensor chunk_counts)",
    "grad_sumsq": "(Tensor[] params, Tensor?[] grads, Tensor? mask_bits, bool adaptive=False, float eta=0.0) -> Tensor",
    "masked_perturb_": "(Tensor(a!)[] params, Tensor?[] grads, Tensor? mask_bits, Tensor save_offsets, "
                       "Tensor(b!) saved, Tensor scale, bool adaptive=False, float eta=0.0) -> ()",
    "masked_restore_": "(Tensor(a!)[] params, Tensor? mask_bits, Tensor save_offsets, Tensor saved) -> ()",
}


def define(namespace):
    """Define every op of SCHEMAS under `namespace`; keep the returned library alive."""
    lib = torch.library.Library(namespace, "FRAGMENT")
    for name, schema in SCHEMAS.items():
        lib.define(name + schema)
    return lib


FSAM_LIBRARY = define("fsam")
