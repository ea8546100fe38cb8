"""topk_mask: every backend (the reference's stages included) against a stable sort, bit for bit."""
import pytest
import torch

from fsam_kernels import ops
from fsam_kernels._layout import CHUNK, ChunkLayout
from conftest import BACKENDS, DTYPES, all_backends, interpreted, randn, seed_of, shapes


def sorted_topk(scores, k, absolute):
    """The definition: a stable descending sort keeps equal scores in flat order, so the lower
    flat index wins (-0 and +0 are equal)."""
    layout = ChunkLayout(scores)
    keys = torch.cat([s.reshape(-1).float() for s in scores])
    keys = (keys.abs() if absolute else keys) + 0.0  # -0 -> +0
    selected = torch.zeros(keys.numel(), dtype=torch.bool)
    selected[torch.sort(keys, descending=True, stable=True).indices[:k]] = True
    return layout.pack(selected.split(layout.numels))


def check_same(scores, k, absolute, backend, device):
    scores = [s.to(device) for s in scores]
    bits, counts = ops.topk_mask_packed(scores, k, absolute=absolute, backend=backend)
    ref_bits, ref_counts = ops.topk_mask_packed([s.cpu() for s in scores], k, absolute=absolute,
                                                backend="reference")
    want_bits, want_counts = sorted_topk([s.cpu() for s in scores], k, absolute)
    assert torch.equal(ref_counts, want_counts) and torch.equal(ref_bits, want_bits)
    assert torch.equal(counts.cpu(), ref_counts)
    assert torch.equal(bits.cpu(), ref_bits)
    assert int(counts.sum()) == k
    return bits


def ks(n):
    return sorted({0, 1, n // 10, n // 2, max(n - 1, 0), n})


@BACKENDS
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape_set", ["one_odd", "mixed", "many"])
@pytest.mark.parametrize("absolute", [True, False])
def test_random_scores(backend, device, dtype, shape_set, absolute):
    if interpreted(backend, device) and shape_set == "many" and (dtype != torch.float32 or not absolute):
        pytest.skip("the interpreter is slow: 200 tensors in fp32, absolute, one k (the rest run on the smaller sets)")
    scores = randn(shapes(shape_set), dtype, "cpu", seed=seed_of(dtype, shape_set, absolute))
    n = sum(s.numel() for s in scores)
    for k in (ks(n) if not interpreted(backend, device) or shape_set != "many" else [n // 10]):
        check_same(scores, k, absolute, backend, device)


@BACKENDS
@pytest.mark.parametrize("dtype", DTYPES)
def test_selection_is_the_k_largest(backend, device, dtype):
    """Independent of the reference: everything selected >= everything left out."""
    scores = randn(shapes("mixed"), dtype, device, seed=3)
    n = sum(s.numel() for s in scores)
    masks = ops.topk_mask(scores, n // 7, absolute=True, backend=backend)
    assert [m.shape for m in masks] == [s.shape for s in scores]
    picked = torch.cat([s[m].float().abs() for s, m in zip(scores, masks)])
    left = torch.cat([s[~m].float().abs() for s, m in zip(scores, masks)])
    assert picked.numel() == n // 7 and picked.min() >= left.max()


def tie_cases():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3 * CHUNK + 5, generator=g)
    zeros_mostly = x.clone()
    zeros_mostly[torch.rand(x.shape, generator=g) < 0.9] = 0.0
    one_ulp = torch.full((5000,), 1.5)
    one_ulp[::3] = torch.nextafter(torch.tensor(1.5), torch.tensor(2.0))
    signed_zeros = torch.zeros(2 * CHUNK + 1)
    signed_zeros[::2] = -0.0
    few_values = torch.randint(0, 4, (CHUNK * 2 + 17,), generator=g).float() - 1.5
    return {
        "all_equal": [torch.full((CHUNK + 1,), 0.25), torch.full((77,), 0.25)],
        "zeros_mostly": [zeros_mostly, torch.zeros(33)],
        "one_ulp": [one_ulp],
        "signed_zeros": [signed_zeros],
        "few_values": [few_values, few_values[:100].clone()],
    }


@BACKENDS
@pytest.mark.parametrize("case", sorted(tie_cases()))
@pytest.mark.parametrize("absolute", [True, False])
def test_ties_lower_flat_index_wins(backend, device, case, absolute):
    scores = tie_cases()[case]
    n = sum(s.numel() for s in scores)
    for k in ks(n) + [n // 3 + 1]:
        check_same(scores, k, absolute, backend, device)


@BACKENDS
def test_ties_at_kth_value_are_taken_in_flat_order(backend, device):
    """All scores equal: the first k entries in flat order are taken, across tensors."""
    scores = [torch.full((10,), 2.0, device=device), torch.full((CHUNK + 10,), 2.0, device=device)]
    masks = ops.topk_mask(scores, 15, backend=backend)
    assert masks[0].all() and masks[1][:5].all() and not masks[1][5:].any()


@BACKENDS
def test_negative_scores_rank_by_value(backend, device):
    scores = [torch.tensor([-3.0, -1.0, -2.0, -0.5, -4.0], device=device)]
    (m,) = ops.topk_mask(scores, 2, backend=backend)
    assert m.cpu().tolist() == [False, True, False, True, False]
    (m,) = ops.topk_mask(scores, 2, absolute=True, backend=backend)
    assert m.cpu().tolist() == [True, False, False, False, True]


@BACKENDS
def test_infinities(backend, device):
    scores = [torch.tensor([1.0, float("inf"), -float("inf"), 0.0, 5.0], device=device)]
    check_same(scores, 2, False, backend, device)
    check_same(scores, 2, True, backend, device)


@pytest.mark.parametrize("backend,device", all_backends())
def test_bad_input(backend, device):
    with torch.device(device):  # factories below make tensors there
        x = [torch.randn(10, device=device), torch.randn(5, device=device)]
        with pytest.raises(ValueError, match="k must be in"):
            ops.topk_mask(x, 16, backend=backend)
        with pytest.raises(ValueError, match="k must be in"):
            ops.topk_mask(x, -1, backend=backend)
        with pytest.raises(TypeError, match="k must be an int"):
            ops.topk_mask(x, 2.5, backend=backend)
        with pytest.raises(TypeError, match=r"scores\[0\]"):
            ops.topk_mask([torch.arange(4)], 1, backend=backend)
        with pytest.raises(TypeError, match="list of tensors"):
            ops.topk_mask(torch.randn(4), 1, backend=backend)
        nan = [torch.randn(10), torch.tensor([1.0, float("nan")])]
        with pytest.raises(RuntimeError, match="NaN"):
            ops.topk_mask(nan, 3, backend=backend)
        with pytest.raises(RuntimeError, match="NaN"):
            ops.topk_mask(nan, 0, backend=backend)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.topk_mask([torch.randn(3)], 1, backend="tpu")
