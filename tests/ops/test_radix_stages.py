"""The top-k's stages and their Exchange hook: called between the stages as documented, and
enough for processes that each hold part of the list to build, together, the mask one process
builds over the whole list (simulated here by two threads with a barrier)."""
import threading

import pytest
import torch

from fsam_kernels import radix_topk
from fsam_kernels._layout import RADIX_HIST_SIZES, ChunkLayout
from conftest import all_backends, interpreted, randn


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
