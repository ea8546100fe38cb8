"""The op schemas, as csrc/*.cpp defines them for torch.ops.fsam.  The Triton backend defines
the same ops under torch.ops.fsam_triton (tests check that the two stay equal).

first_hist: int64 [FIRST_HIST_SIZE], the histogram of the top 11 bits of the new Fisher
values' radix keys (bins 0..2047) and the count of NaN (last entry).  fisher_accumulate_ adds
into it when given; topk_mask then skips its first pass over the scores."""

FIRST_HIST_SIZE = 2048 + 1

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
