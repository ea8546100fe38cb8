"""fisher_accumulate: compiled backends against the reference, bit for bit."""
import pytest
import torch

from fsam_kernels import backends, ops
from fsam_kernels._layout import RADIX_STATE_SIZE
from conftest import BACKENDS, DTYPES, all_backends, randn, seed_of, shapes


@BACKENDS
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape_set", ["one_odd", "mixed", "many"])
@pytest.mark.parametrize("decay,alpha", [(1.0, 1.0), (0.95, 0.05), (0.0, 0.3)])
def test_matches_reference(backend, device, dtype, shape_set, decay, alpha):
    shp = shapes(shape_set)
    seed = seed_of(dtype, shape_set, decay)
    fisher = [f.abs() for f in randn(shp, torch.float32, device, seed)]
    grads = randn(shp, dtype, device, seed + 1)
    grads[len(grads) // 2] = None  # a parameter without a gradient: F only decays
    expected = [f.cpu().clone() for f in fisher]
    hist, ref_hist = ops.new_first_hist(device), ops.new_first_hist("cpu")
    ops.fisher_accumulate(expected, [g if g is None else g.cpu() for g in grads], decay=decay, alpha=alpha,
                          first_hist=ref_hist, backend="reference")
    ops.fisher_accumulate(fisher, grads, decay=decay, alpha=alpha, first_hist=hist, backend=backend)
    for f, e in zip(fisher, expected):
        assert torch.equal(f.cpu(), e)
    assert torch.equal(hist.cpu(), ref_hist)
    assert int(ref_hist.sum()) == sum(f.numel() for f in fisher) and int(ref_hist[-1]) == 0
    # and the reference is the formula
    f0 = [f.abs() for f in randn(shp, torch.float32, "cpu", seed)]
    for f, e, g in zip(f0, expected, grads):
        want = f * decay if g is None else f * decay + g.cpu().float() ** 2 * alpha
        torch.testing.assert_close(e, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend,device", all_backends())
def test_found_inf_leaves_fisher_unchanged(backend, device):
    with torch.device(device):  # factories below make tensors there
        fisher = [torch.rand(100) + 0.5]
        before = fisher[0].clone()
        grads = [torch.randn(100)]
        grads[0][3] = float("inf")
        ops.fisher_accumulate(fisher, grads, decay=0.9, alpha=0.1, found_inf=torch.tensor(1.0), backend=backend)
        assert torch.equal(fisher[0], before)
        ops.fisher_accumulate(fisher, [torch.ones(100)], decay=0.5, alpha=1.0, found_inf=torch.tensor(0.0),
                              backend=backend)
        torch.testing.assert_close(fisher[0], before * 0.5 + 1.0)


@pytest.mark.parametrize("backend,device", all_backends())
def test_bad_input(backend, device):
    with torch.device(device):  # factories below make tensors there
        with pytest.raises(TypeError, match=r"fisher\[0\] must be"):
            ops.fisher_accumulate([torch.zeros(3, dtype=torch.float16)], [torch.randn(3)], backend=backend)
        with pytest.raises(ValueError, match=r"grads\[0\] has 4 elements"):
            ops.fisher_accumulate([torch.zeros(3)], [torch.randn(4)], backend=backend)
        with pytest.raises(ValueError, match="grads has 2 tensors"):
            ops.fisher_accumulate([torch.zeros(3)], [torch.randn(3), torch.randn(3)], backend=backend)
        with pytest.raises(ValueError, match=r"fisher\[0\] must be contiguous"):
            ops.fisher_accumulate([torch.zeros(3, 4).t()], [torch.randn(12)], backend=backend)


@pytest.mark.parametrize("backend,device", all_backends())
def test_first_hist_is_the_first_radix_pass(backend, device):
    """topk_mask with the histogram counted by fisher_accumulate = topk_mask without it."""
    shp = shapes("mixed")
    fisher = [f.abs() for f in randn(shp, torch.float32, device, 31)]
    grads = randn(shp, torch.float32, device, 32)
    hist = ops.new_first_hist(device)
    ops.fisher_accumulate(fisher, grads, decay=0.9, alpha=0.1, first_hist=hist, backend=backend)
    n = sum(f.numel() for f in fisher)
    for k in (0, 1, n // 10, n):
        with_hist = ops.topk_mask_packed(fisher, k, first_hist=hist, backend=backend)
        without = ops.topk_mask_packed(fisher, k, backend=backend)
        assert all(torch.equal(a, b) for a, b in zip(with_hist, without))
    hist[-1] = 1  # a NaN was counted
    with pytest.raises(RuntimeError, match="NaN"):
        ops.topk_mask_packed(fisher, 3, first_hist=hist, backend=backend)
    with pytest.raises(ValueError, match="absolute"):
        ops.topk_mask_packed(fisher, 3, absolute=True, first_hist=hist, backend=backend)


@pytest.mark.parametrize("backend,device", all_backends())
def test_first_hist_counts_nan_scores(backend, device):
    """NaN gradients make NaN scores: first_hist counts them in its last entry (as the top-k's own
    digit-0 pass does), across tensors and chunks, and the top-k then refuses the scores."""
    shp = shapes("mixed")
    fisher = [f.abs() for f in randn(shp, torch.float32, device, 41)]
    grads = randn(shp, torch.float32, device, 42)
    nans = 0
    for g in grads[::2]:
        flat = g.view(-1)
        flat[torch.arange(0, flat.numel(), 97, device=device)] = float("nan")
        nans += len(range(0, flat.numel(), 97))
    hist = ops.new_first_hist(device)
    ops.fisher_accumulate(fisher, grads, decay=0.9, alpha=0.1, first_hist=hist, backend=backend)
    own = ops.new_first_hist(device)
    state = torch.zeros(RADIX_STATE_SIZE, dtype=torch.int64, device=device)
    backends.op("radix_histogram_", backend)(fisher, state, 0, False, own)
    assert int(hist[-1]) == nans > 0
    assert torch.equal(hist.cpu(), own.cpu())
    with pytest.raises(RuntimeError, match="NaN"):
        ops.topk_mask_packed(fisher, 3, first_hist=hist, backend=backend)
