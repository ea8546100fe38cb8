"""torch.library.opcheck on every fsam op (schema, fake impl, autograd registration, AOT
dispatch), and the ops under torch.compile."""
import pytest
import torch

from fsam_kernels import backends, ops
from fsam_kernels._layout import RADIX_HIST_SIZES, RADIX_STATE_SIZE, STATE_K_LEFT, total_chunks
from conftest import compiled_backends

# (namespace of the ops, device) for every compiled backend; `reference` is plain eager code.
NAMESPACES = [(backends.NAMESPACES[b], d) for b, d in compiled_backends()]
CASES = pytest.mark.parametrize("namespace,device", NAMESPACES or [pytest.param(
    None, None, marks=pytest.mark.skip(reason="no compiled backend built"))])


def inputs(device):
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g).to(device) for s in [(5000,), (3, 7), (64,)]]
    grads = [torch.randn(p.shape, generator=g).to(device) for p in params]
    bits, counts = ops.topk_mask_packed(grads, 500, absolute=True, backend="reference" if device == "cpu" else None)
    offsets, saved = ops.save_layout(params, counts)
    return params, grads, bits, offsets, saved


def namespace_ops(namespace):
    backends.op("grad_sumsq", {v: k for k, v in backends.NAMESPACES.items()}[namespace])  # defines the namespace
    return getattr(torch.ops, namespace)


@CASES
def test_opcheck_all_ops(namespace, device):
    fsam = namespace_ops(namespace)
    params, grads, bits, offsets, saved = inputs(device)
    scale = torch.tensor(0.1, device=device)
    fisher = [torch.rand(p.shape, device=device) for p in params]
    for capacity in (None, 4000):  # without and with a candidate buffer that holds the candidates
        candidates = None if capacity is None else torch.zeros(capacity, dtype=torch.int64, device=device)
        state = torch.zeros(RADIX_STATE_SIZE, dtype=torch.int64, device=device)
        state[STATE_K_LEFT] = 500  # what radix_topk starts from for k = 500
        for digit, size in enumerate(RADIX_HIST_SIZES):
            hist = torch.zeros(size, dtype=torch.int64, device=device)
            torch.library.opcheck(fsam.radix_histogram_.default, (grads, state, digit, True, hist, candidates))
            torch.library.opcheck(fsam.radix_select_.default, (state, hist, digit))
        torch.library.opcheck(fsam.radix_tie_counts.default, (grads, state, True, candidates))
    ties = torch.zeros(total_chunks(grads), dtype=torch.int64, device=device)
    torch.library.opcheck(fsam.radix_mask.default, (grads, state, ties, ties, True))
    torch.library.opcheck(fsam.fisher_accumulate_.default, (fisher, [grads[0], None, grads[2]], 0.9, 0.1))
    torch.library.opcheck(fsam.fisher_accumulate_.default, (fisher, grads, 0.9, 0.1, torch.tensor(0.0, device=device)))
    hist = ops.new_first_hist(device)
    torch.library.opcheck(fsam.fisher_accumulate_.default, (fisher, grads, 0.9, 0.1, None, hist))
    torch.library.opcheck(fsam.grad_sumsq.default, (params, grads, bits, True, 0.01))
    torch.library.opcheck(fsam.grad_sumsq.default, (params, [None, grads[1], None], None))
    torch.library.opcheck(fsam.perturb_.default, (params, grads, bits, offsets, saved, scale, False, 0.0))
    torch.library.opcheck(fsam.restore_.default, (params, bits, offsets, saved))
    torch.library.opcheck(fsam.tensor_sumsq.default, (grads,))
    norms = fsam.tensor_sumsq(grads).sqrt().float()
    torch.library.opcheck(fsam.clip_scale_.default, ([g.clone() for g in grads], norms, 0.5, 1e-6))


@CASES
def test_ops_under_torch_compile(namespace, device):
    fsam = namespace_ops(namespace)
    params, grads, bits, offsets, saved = inputs(device)
    original = [p.clone() for p in params]

    def sam_round_trip(params, grads, bits, offsets, saved):
        stats = fsam.grad_sumsq(params, grads, bits, False, 0.0)
        scale = 0.05 / (stats[0].sqrt() + 1e-12)
        fsam.perturb_(params, grads, bits, offsets, saved, scale, False, 0.0)
        moved = torch.stack([p.sum() for p in params])
        fsam.restore_(params, bits, offsets, saved)
        return stats, moved

    compiled = torch.compile(sam_round_trip, backend="aot_eager", fullgraph=True)
    stats, moved = compiled(params, grads, bits, offsets, saved)
    expected = ops.grad_sumsq(original, grads, mask_bits=bits, backend="reference")
    torch.testing.assert_close(stats, expected)
    assert not torch.equal(moved, torch.stack([p.sum() for p in original]))
    for p, o in zip(params, original):
        assert torch.equal(p, o)


def test_both_namespaces_have_every_schema():
    from fsam_kernels._schemas import SCHEMAS
    from fsam_kernels.triton_kernels import library  # noqa: F401
    for name, schema in SCHEMAS.items():
        parsed = torch._C.parse_schema(f"fsam::{name}{schema}")
        assert str(getattr(torch.ops.fsam, name).default._schema) == str(parsed)
        assert str(getattr(torch.ops.fsam_triton, name).default._schema) == str(parsed).replace("fsam::", "fsam_triton::")


@CASES
def test_opcheck_pac_ops(namespace, device):
    """PAC-tuning's ops."""
    fsam = namespace_ops(namespace)
    params, grads, _, _, _ = inputs(device)
    g = torch.Generator().manual_seed(1)
    log_stds = [(torch.randn(p.numel(), generator=g) - 4.0).to(device) for p in params]
    bases = ops.counter_bases(params)
    noise = (log_stds, bases, 3, 5, 2.0)
    torch.library.opcheck(fsam.pac_noise_mask.default, (params, *noise))
    bits, counts = fsam.pac_noise_mask(params, *noise)
    offsets, saved = ops.save_layout(params, counts)
    torch.library.opcheck(fsam.pac_perturb_.default, (params, *noise, bits, offsets, saved))
    torch.library.opcheck(fsam.pac_restore_.default, (params, *noise, bits, offsets, saved))
    anchors = [p.clone() for p in params]
    prior = torch.full((len(params),), -4.0, device=device)
    torch.library.opcheck(fsam.pac_bound_grads_.default,
                          (params, grads, log_stds, [torch.empty(p.numel(), device=device) for p in params], anchors,
                           prior, bases,
                           3, 5, 2.0, 1e-3))
