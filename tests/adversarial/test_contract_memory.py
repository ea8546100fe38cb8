"""The checks cost O(tensors + chunks) memory (docs/errors.md): checking a perturbation's saved
runs over a large masked list allocates a bounded scratch, not bytes per element (the former
check held about 2 bytes per element)."""
import torch
from torch.profiler import ProfilerActivity, profile

from fsam_kernels import _contract, ops
from fsam_kernels._layout import ChunkLayout


def peak_bytes_of_check(numel):
    params = [torch.randn(numel), torch.randn(1000)]
    grads = [torch.randn_like(p) for p in params]
    layout = ChunkLayout(params)
    bits, counts = layout.pack([torch.rand(p.numel()) < 0.1 for p in params])
    offsets, saved = ops.save_layout(params, counts)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _contract.check("perturb_", params, grads, bits, offsets, saved, torch.tensor(0.1), False, 0.0)
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak, layout.total_chunks


def test_the_saved_runs_check_does_not_grow_with_the_elements():
    small, chunks_small = peak_bytes_of_check(1 << 20)
    large, chunks_large = peak_bytes_of_check(1 << 23)  # 8x the elements: 32 MiB of weights
    assert large < (3 << 20) + 64 * chunks_large, large  # the 1 MiB popcount block, twice, and per-chunk tables
    assert large - small < 64 * (chunks_large - chunks_small) + (1 << 20), (small, large)
    assert large < (1 << 23) * 2 // 4  # a quarter of the former 2 bytes per element, at most


def test_a_public_op_reads_the_saved_runs_once(monkeypatch):
    """The public op leaves the saved runs to the backend's raw op, which reads them anyway: one
    pass over the mask (on a GPU, one sync), not two; and a layout read once is not read again
    until one of its tensors changes."""
    reads = []
    real = _contract.saved_runs_error
    monkeypatch.setattr(_contract, "saved_runs_error", lambda *a: reads.append(1) or real(*a))
    params = [torch.randn(5000), torch.randn(7)]
    offsets, saved = ops.save_layout(params)
    ops.perturb(params, [torch.randn_like(p) for p in params], torch.tensor(0.1), save_offsets=offsets, saved=saved,
                backend="reference")
    ops.restore(params, save_offsets=offsets, saved=saved, backend="reference")
    assert len(reads) == 1  # the perturb's; the restore finds the same layout checked
    offsets.add_(0)  # an in-place change (of nothing): read again
    ops.restore(params, save_offsets=offsets, saved=saved, backend="reference")
    assert len(reads) == 2
