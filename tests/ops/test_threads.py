"""The CPU kernels give the same bits whatever the number of threads."""
import pytest
import torch

from fsam_kernels import ops
from fsam_kernels._layout import CHUNK
from conftest import compiled_backends, randn

pytestmark = pytest.mark.skipif("cpu" not in [b for b, _ in compiled_backends()], reason="cpu backend not built")


def run_all(threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        shp = [(CHUNK * 7 + 3,), (129, 257), (5,), (CHUNK * 3,)]
        params = randn(shp, torch.float32, "cpu", 1)
        grads = randn(shp, torch.float32, "cpu", 2)
        fisher = [g.abs() for g in randn(shp, torch.float32, "cpu", 3)]
        ops.fisher_accumulate(fisher, grads, decay=0.9, alpha=0.1, backend="cpu")
        bits, counts = ops.topk_mask_packed(fisher, sum(p.numel() for p in params) // 10, backend="cpu")
        stats = ops.grad_sumsq(params, grads, mask_bits=bits, adaptive=True, eta=0.01, backend="cpu")
        offsets, saved = ops.save_layout(params, counts)
        saved.fill_(0xAB)  # padding between tensors' runs stays as it was
        ops.perturb(params, grads, 0.05 / stats[0].sqrt(), mask_bits=bits, save_offsets=offsets, saved=saved,
                           adaptive=True, eta=0.01, backend="cpu")
        return fisher + [bits, counts, stats, saved] + params
    finally:
        torch.set_num_threads(previous)


def test_thread_count_independent():
    one, many = run_all(1), run_all(max(2, torch.get_num_threads()))
    for a, b in zip(one, many):
        assert torch.equal(a, b)
