"""The saved layouts of a perturbation on every backend and device built (a GPU's too: no
hypothesis needed, so the GPU runs it): each data-dependent defect of the runs is refused without
`status` and skipped with it, writing nothing, and a valid layout writes what the reference
writes.  On a GPU this is the device-side check of the CUDA and Triton ops (csrc/cuda/saved_runs.cuh,
fsam_kernels/triton_kernels/saved_runs.py); here, its emulated and interpreted runs."""
import pytest
import torch

from fsam_kernels import backends, ops
from fsam_kernels._layout import CHUNK, ChunkLayout
from conftest import all_backends
from layouts import POISON, RUN_MUTATIONS, check_call

ENTRIES = ("raw", "public", "status")


def case(op, mutation):
    return [CHUNK + 7, 5], [torch.float32, torch.bfloat16], 0.3, op, mutation, 11


@pytest.mark.parametrize("backend,device", all_backends())
@pytest.mark.parametrize("op", ["perturb", "pac"])
@pytest.mark.parametrize("mutation", ["none", "gap", *RUN_MUTATIONS])
def test_a_bad_layout_is_refused_or_skipped(backend, device, op, mutation):
    results, reference = {}, {}
    for entry in ENTRIES:
        check_call(case(op, mutation), backend, device, entry, results)
    if op == "perturb" and results:  # accepted: the reference's bytes (PAC's noise: its own tests)
        check_call(case(op, mutation), "reference", "cpu", "raw", reference)
        for entry, snap in results.items():
            assert all(torch.equal(a, b) for a, b in zip(reference["reference", "raw"], snap)), entry


@pytest.mark.parametrize("backend,device", all_backends())
def test_a_set_status_stops_the_ops(backend, device):
    """A non-zero status on entry (an earlier call of the step was skipped) stops a valid call
    too: a perturbation and its restore are both done or both skipped, and the status stays."""
    g = torch.Generator().manual_seed(3)
    params = [torch.randn(CHUNK + 9, generator=g).to(device), torch.randn(17, generator=g).to(device, torch.half)]
    grads = [torch.randn(p.shape, generator=g).to(device, p.dtype) for p in params]
    bits, counts = ChunkLayout(params).pack([(torch.rand(p.numel(), generator=g) < 0.4).to(device) for p in params])
    before = [p.clone() for p in params]
    log_stds = [torch.full((1,), -3.0, device=device)] * 2
    for mask in (bits, None):
        offsets, saved = ops.save_layout(params, counts if mask is not None else None)
        saved.fill_(POISON)
        status = torch.ones(1, dtype=torch.int32, device=device)
        scale = torch.tensor(0.5, device=device)
        backends.op("perturb_", backend)(params, grads, mask, offsets, saved, scale, False, 0.0, status)
        backends.op("restore_", backend)(params, mask, offsets, saved, status)
        pac_bits, pac_counts = ops.pac_noise_mask(params, log_stds, seed=1, step=1, backend=backend)
        pac_offsets, pac_saved = ops.save_layout(params, pac_counts)
        backends.op("pac_perturb_", backend)(params, log_stds, ops.counter_bases(params), 1, 1, 2.0, pac_bits,
                                             pac_offsets, pac_saved, status)
        assert int(status) == 1
        assert all(torch.equal(a, b) for a, b in zip(params, before))
        assert bool((saved == POISON).all())


@pytest.mark.parametrize("backend,device", all_backends())
def test_a_bad_status_is_refused(backend, device):
    """status is written: of the wrong dtype or size, or over a tensor of the call, it is refused
    before anything is written."""
    params = [torch.randn(CHUNK + 9, device=device)]
    grads = [torch.randn_like(params[0])]
    offsets, saved = ops.save_layout(params)
    before, saved_before = params[0].clone(), saved.clone()
    op = backends.op("perturb_", backend)
    scale = torch.tensor(0.5, device=device)
    for status, error in ((torch.zeros(1, dtype=torch.int64, device=device), TypeError),
                          (torch.zeros(2, dtype=torch.int32, device=device), ValueError),
                          (saved[:4].view(torch.int32), ValueError),  # over saved
                          (params[0][:1].view(torch.int32), ValueError),  # over a weight
                          (offsets[:1].view(torch.int32)[:1], ValueError)):  # over an input
        with pytest.raises(error, match="status"):
            op(params, grads, None, offsets, saved, scale, False, 0.0, status)
        assert torch.equal(params[0], before) and torch.equal(saved, saved_before)
