"""The top-k mask of a score list by radix select, driven stage by stage from here.

For each digit of the 32-bit order-preserving keys (RADIX_WIDTHS of _layout.py, most
significant first): a histogram of that digit over the keys under the prefix chosen so far,
then the choice, on the device, of the digit holding the k-th largest key.  Then, only where
some but not all keys equal to the k-th are taken, a count of those per chunk; then the pass
writing the packed mask and the per-chunk popcounts.  The digit-1 pass also writes the keys under
the first digit chosen to a candidate buffer when they fit it, and digit 2 and the tie count read
those instead of the scores: three full reads of the scores (two when fisher_accumulate_ counted
digit 0), four when the candidates overflow the buffer, plus the tie count where some but not
all keys equal to the k-th one are taken and the buffer overflowed.  Between the stages an `Exchange` combines
what the processes of a sharded run hold (nothing, on one process); no stage waits for the host,
so a mask step costs no sync but the NaN check, when asked for.
"""
import torch

from . import backends
from ._layout import CANDIDATE_DIVISOR, FIRST_BINS, RADIX_HIST_SIZES, RADIX_STATE_SIZE, STATE_K_LEFT


class Exchange:
    """What the stages combine across processes.  This one is for a single process: the
    histograms are already global and the chunks before a chunk are the ones in this list."""

    def histogram_(self, hist):
        """Sum every process's counts into `hist`, in place."""

    def ties_before(self, ties):
        """Per chunk: how many keys equal to the k-th one come before it in the global flat order."""
        return torch.cumsum(ties, 0) - ties


LOCAL = Exchange()


def default_candidate_capacity(numel):
    return -(-numel // CANDIDATE_DIVISOR)


def topk_mask(scores, k, *, backend, absolute=False, check_nan=True, first_hist=None, exchange=LOCAL,
              candidate_capacity=None):
    """(mask_bits, chunk_counts) of the k largest scores (|scores| with absolute=True) of a
    non-empty list, ties to the lower flat index; `backend` is resolved and the arguments are
    checked (fsam_kernels.ops.topk_mask_packed does both).  first_hist: digit 0's histogram,
    already counted (by fisher_accumulate_); check_nan=False: the caller knows the scores are
    finite, which spares a sync; candidate_capacity: entries of the candidate buffer (8 bytes
    each; None: a 1/CANDIDATE_DIVISOR of the scores; 0: no buffer)."""
    op = {name: backends.op(name, backend)
          for name in ("radix_histogram_", "radix_select_", "radix_tie_counts", "radix_mask")}
    device = scores[0].device
    state = torch.zeros(RADIX_STATE_SIZE, dtype=torch.int64, device=device)
    state[STATE_K_LEFT] = k
    if candidate_capacity is None:
        candidate_capacity = default_candidate_capacity(sum(s.numel() for s in scores))
    candidates = torch.empty(candidate_capacity, dtype=torch.int64, device=device) if candidate_capacity else None
    for digit, size in enumerate(RADIX_HIST_SIZES):
        if digit > 0 and k == 0:
            break
        if digit == 0 and first_hist is not None:
            hist = first_hist.clone()
        else:
            hist = torch.zeros(size, dtype=torch.int64, device=device)
            op["radix_histogram_"](scores, state, digit, absolute, hist, candidates)
        exchange.histogram_(hist)
        if digit == 0 and check_nan and bool(hist[FIRST_BINS]):  # the one host sync, when asked for
            raise RuntimeError("topk_mask: scores contain NaN; the ranking is undefined")
        if k > 0:
            op["radix_select_"](state, hist, digit)
    ties = op["radix_tie_counts"](scores, state, absolute, candidates)
    return op["radix_mask"](scores, state, ties, exchange.ties_before(ties), absolute)
