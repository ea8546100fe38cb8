"""The top-k's stages and their Exchange hook: called between the stages as documented, and
enough for processes that each hold part of the list to build, together, the mask one process
builds over the whole list (simulated here by two threads with a barrier)."""
import threading

import pytest
import torch

from fsam_kernels import backends, radix_topk, reference
from fsam_kernels._layout import (CANDIDATE_KEY_BITS, RADIX_HIST_SIZES, RADIX_SHIFTS, RADIX_STATE_SIZE, STATE_CANDIDATES,
                                  STATE_K_LEFT, STATE_PREFIX, STATE_TIES, ChunkLayout)
from conftest import DTYPES, all_backends, interpreted, randn


class Recording(radix_topk.Exchange):
    def __init__(self):
        self.calls = []

    def histogram_(self, hist):
        self.calls.append(("histogram_", hist.numel()))

    def ties_before(self, ties):
        self.calls.append(("ties_before", ties.numel()))
        return super().ties_before(ties)


@pytest.mark.parametrize("backend,device", all_backends())
def test_exchange_is_called_between_the_stages(backend, device):
    scores = [s.to(device) for s in randn([(5000,), (7, 3)], torch.float32, "cpu", seed=3)]
    exchange = Recording()
    bits, counts = radix_topk.topk_mask(scores, 100, backend=backend, exchange=exchange)
    chunks = ChunkLayout(scores).total_chunks
    assert exchange.calls == [("histogram_", n) for n in RADIX_HIST_SIZES] + [("ties_before", chunks)]
    assert torch.equal(bits, radix_topk.topk_mask(scores, 100, backend=backend)[0]) and int(counts.sum()) == 100
    exchange.calls.clear()
    radix_topk.topk_mask(scores, 0, backend=backend, exchange=exchange)  # k = 0: one pass, for the NaN check
    assert exchange.calls == [("histogram_", RADIX_HIST_SIZES[0]), ("ties_before", chunks)]


class Ranks:
    """Two simulated processes: rank 0 holds the first tensors of the list, rank 1 the rest."""

    def __init__(self):
        self.barrier = threading.Barrier(2, timeout=60)
        self.slots = [None, None]

    def gather(self, rank, value):
        self.slots[rank] = value
        self.barrier.wait()
        both = list(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before both have read it
        return both

    def exchange(self, rank):
        ranks = self

        class RankExchange(radix_topk.Exchange):
            def histogram_(self, hist):
                hist.copy_(sum(ranks.gather(rank, hist.clone())))

            def ties_before(self, ties):
                totals = ranks.gather(rank, ties.sum())
                return super().ties_before(ties) + sum(totals[:rank])
        return RankExchange()


@pytest.mark.parametrize("backend,device", all_backends())
@pytest.mark.parametrize("ties", [False, True])
def test_split_list_builds_the_whole_lists_mask(backend, device, ties):
    if interpreted(backend, device):
        pytest.skip("the Triton interpreter cannot run in two threads at once (it patches triton.language)")
    shapes = [(4099,), (33, 65), (5000,), (7,)]
    scores = [s.to(device) for s in randn(shapes, torch.float32, "cpu", seed=11)]
    if ties:  # many equal scores on both sides of the split, the k-th among them
        scores = [torch.round(s * 2) / 2 for s in scores]
    n = sum(s.numel() for s in scores)
    for k in (1, n // 3, n - 1):
        whole_bits, _ = radix_topk.topk_mask(scores, k, backend=backend, absolute=True)
        whole = ChunkLayout(scores)
        expected = [whole.unpack(whole_bits, i) for i in range(len(scores))]
        parts, ranks, got = [scores[:2], scores[2:]], Ranks(), [None, None]

        def run(rank):
            bits, _ = radix_topk.topk_mask(parts[rank], k, backend=backend, absolute=True,
                                           exchange=ranks.exchange(rank))
            layout = ChunkLayout(parts[rank])
            got[rank] = [layout.unpack(bits, i) for i in range(len(parts[rank]))]
        threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got[0] is not None and got[1] is not None, "a simulated rank failed"
        for g, e in zip(got[0] + got[1], expected):
            assert torch.equal(g, e)


# ---- the candidate buffer: filled by the digit-1 pass, read by digit 2 and the tie counts

def stage_ops(backend):
    return {name: backends.op(name, backend) for name in ("radix_histogram_", "radix_select_", "radix_tie_counts")}


def after_digit(op, scores, k, digit, absolute=True):
    """The state once `digit` is chosen, without a buffer."""
    state = torch.zeros(RADIX_STATE_SIZE, dtype=torch.int64, device=scores[0].device)
    state[STATE_K_LEFT] = k
    for d in range(digit + 1):
        hist = torch.zeros(RADIX_HIST_SIZES[d], dtype=torch.int64, device=state.device)
        op["radix_histogram_"](scores, state, d, absolute, hist)
        op["radix_select_"](state, hist, d)
    return state


def keys_under_first_digit(scores, state, absolute=True):
    """The entries the buffer should hold, sorted: (chunk << 32) | key under the prefix."""
    keys = reference._keys([s.cpu() for s in scores], absolute)
    chunk = torch.arange(keys.shape[0])[:, None].expand_as(keys)
    under = (keys >= 0) & ((keys >> RADIX_SHIFTS[0]) == int(state[STATE_PREFIX]))
    return torch.sort((chunk[under] << CANDIDATE_KEY_BITS) | keys[under]).values


def tied_scores(device, seed):
    """Random scores with many equal values (so the k-th one is shared), odd sizes, each dtype."""
    scores = randn([(4099,), (33, 65), (7,)], torch.float32, "cpu", seed=seed)
    return [(torch.round(s * 4) / 4).to(dt).to(device) for s, dt in zip(scores, DTYPES)]


@pytest.mark.parametrize("backend,device", all_backends())
def test_digit_one_fills_the_buffer_when_the_keys_fit(backend, device):
    scores = tied_scores(device, seed=21)
    op = stage_ops(backend)
    for k in (1, 1000, 6000):
        state = after_digit(op, scores, k, 0)
        want = keys_under_first_digit(scores, state)
        n = want.numel()
        assert int(state[STATE_TIES]) == n
        for capacity, fits in ((n, True), (n + 37, True), (n - 1, False)):
            poison = torch.full((capacity + 16,), -7, dtype=torch.int64, device=device)
            candidates = poison[8: 8 + capacity]  # poison either side shows a write past the buffer
            s, hist = state.clone(), torch.zeros(RADIX_HIST_SIZES[1], dtype=torch.int64, device=device)
            op["radix_histogram_"](scores, s, 1, True, hist, candidates)
            plain = torch.zeros_like(hist)
            op["radix_histogram_"](scores, state.clone(), 1, True, plain)
            assert torch.equal(hist, plain)
            assert torch.equal(poison[:8].cpu(), torch.full((8,), -7)) and torch.equal(poison[-8:].cpu(), torch.full((8,), -7))
            if fits:
                assert int(s[STATE_CANDIDATES]) == n
                assert torch.equal(torch.sort(candidates[:n].cpu()).values, want)
                assert torch.equal(candidates[n:].cpu(), torch.full((capacity - n,), -7))
            else:  # marked unused, nothing written
                assert int(s[STATE_CANDIDATES]) == capacity + 1
                assert torch.equal(candidates.cpu(), torch.full((capacity,), -7))


@pytest.mark.parametrize("backend,device", all_backends())
def test_later_passes_read_the_buffer_instead_of_the_scores(backend, device):
    """Scores overwritten after the digit-1 pass: digit 2 and the tie counts still see the old
    ones when the buffer holds them, and the new ones when it overflowed."""
    scores = tied_scores(device, seed=22)
    other = [torch.roll(s, 1) * 0.5 for s in scores]
    op = stage_ops(backend)
    k = 2000
    start = after_digit(op, scores, k, 0)
    n = int(start[STATE_TIES])
    for capacity, source in ((n, scores), (n - 1, other)):
        state, candidates = start.clone(), torch.empty(capacity, dtype=torch.int64, device=device)
        hist = torch.zeros(RADIX_HIST_SIZES[1], dtype=torch.int64, device=device)
        op["radix_histogram_"](scores, state, 1, True, hist, candidates)
        op["radix_select_"](state, hist, 1)
        clobbered = [o.clone() for o in other]
        expect_state = state.clone()
        expect_hist = torch.zeros(RADIX_HIST_SIZES[2], dtype=torch.int64, device=device)
        op["radix_histogram_"](source, expect_state, 2, True, expect_hist)
        hist = torch.zeros(RADIX_HIST_SIZES[2], dtype=torch.int64, device=device)
        op["radix_histogram_"](clobbered, state, 2, True, hist, candidates)
        assert torch.equal(hist, expect_hist)
        op["radix_select_"](state, hist, 2)
        op["radix_select_"](expect_state, expect_hist, 2)
        assert int(state[STATE_K_LEFT]) != int(state[STATE_TIES]), "the k-th value is not partly taken"
        ties = op["radix_tie_counts"](clobbered, state, True, candidates)
        assert torch.equal(ties, op["radix_tie_counts"](source, expect_state, True))


@pytest.mark.parametrize("backend,device", all_backends())
def test_a_state_that_lies_cannot_make_a_pass_write_past_the_buffer(backend, device):
    scores = tied_scores(device, seed=23)
    op = stage_ops(backend)
    state = after_digit(op, scores, 3000, 0)
    n = int(state[STATE_TIES])
    state[STATE_TIES] = 5  # claims few keys under the prefix: the pass fills a 10-entry buffer
    poison = torch.full((26,), -7, dtype=torch.int64, device=device)
    candidates = poison[8:18]
    hist = torch.zeros(RADIX_HIST_SIZES[1], dtype=torch.int64, device=device)
    op["radix_histogram_"](scores, state, 1, True, hist, candidates)
    assert int(state[STATE_CANDIDATES]) == n > 10  # counted, so the later passes read the scores
    assert torch.equal(poison[:8].cpu(), torch.full((8,), -7)) and torch.equal(poison[18:].cpu(), torch.full((8,), -7))
    # and a buffer of entries naming chunks that do not exist only ever adds to real chunks
    state = after_digit(op, scores, 3000, 2)
    kth = int(state[STATE_PREFIX])
    chunks = ChunkLayout(scores).total_chunks
    bogus = torch.tensor([(c << CANDIDATE_KEY_BITS) | kth for c in (-1, chunks, chunks + 5, 1 << 30, 0, 0)],
                         dtype=torch.int64, device=device)
    state[STATE_CANDIDATES] = bogus.numel()
    state[STATE_K_LEFT] = int(state[STATE_TIES]) - 1  # some ties taken: the counts are needed
    ties = op["radix_tie_counts"](scores, state, True, bogus)
    assert ties.cpu().tolist() == [2] + [0] * (chunks - 1)


@pytest.mark.parametrize("backend,device", all_backends())
@pytest.mark.parametrize("capacity", [0, 1, 64, "all"])
def test_topk_mask_is_the_same_with_any_buffer(backend, device, capacity):
    scores = tied_scores(device, seed=24)
    n = sum(s.numel() for s in scores)
    for k in (1, n // 7, n // 2, n):
        cap = n if capacity == "all" else capacity
        bits, counts = radix_topk.topk_mask(scores, k, backend=backend, absolute=True, candidate_capacity=cap)
        want_bits, want_counts = radix_topk.topk_mask([s.cpu() for s in scores], k, backend="reference",
                                                      absolute=True, candidate_capacity=0)
        assert torch.equal(bits.cpu(), want_bits) and torch.equal(counts.cpu(), want_counts)
