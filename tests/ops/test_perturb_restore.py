"""grad_sumsq, perturb and restore: compiled backends against the reference."""
import pytest
import torch

from fsam_kernels import ops
from conftest import BACKENDS, DTYPES, all_backends, randn, seed_of, shapes

POISON = 0xAB


def bits_of(t):
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype])


def setup(shape_set, dtype, device, masked, seed, missing_grad=True):
    shp = shapes(shape_set)
    params = randn(shp, dtype, device, seed)
    grads = randn(shp, dtype, device, seed + 1)
    if missing_grad and len(grads) > 1:
        grads[1] = None
    bits = counts = None
    if masked:
        n = sum(p.numel() for p in params)
        bits, counts = ops.topk_mask_packed(randn(shp, torch.float32, device, seed + 2), n // 10, absolute=True,
                                            backend="reference" if device == "cpu" else None)
    offsets, saved = ops.save_layout(params, counts)
    saved.fill_(POISON)
    return params, grads, bits, offsets, saved


def to_cpu(xs):
    return [x if x is None else x.cpu().clone() for x in xs]


@BACKENDS
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape_set", ["one_odd", "mixed", "many"])
@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("adaptive", [False, True])
def test_perturb_then_restore(backend, device, dtype, shape_set, masked, adaptive):
    seed = seed_of(dtype, shape_set, masked, adaptive)
    params, grads, bits, offsets, saved = setup(shape_set, dtype, device, masked, seed)
    original = to_cpu(params)
    ref_params, ref_grads = to_cpu(params), to_cpu(grads)
    ref_saved = saved.cpu().clone()
    scale = torch.tensor(0.37, device=device)
    eta = 0.01 if adaptive else 0.0
    ref_bits = None if bits is None else bits.cpu()

    ops.perturb(params, grads, scale, mask_bits=bits, save_offsets=offsets, saved=saved,
                       adaptive=adaptive, eta=eta, backend=backend)
    ops.perturb(ref_params, ref_grads, scale.cpu(), mask_bits=ref_bits, save_offsets=offsets.cpu(),
                       saved=ref_saved, adaptive=adaptive, eta=eta, backend="reference")
    assert torch.equal(saved.cpu(), ref_saved)
    changed = 0
    for p, r, o in zip(params, ref_params, original):
        assert torch.equal(bits_of(p.cpu()), bits_of(r))
        changed += int((bits_of(r) != bits_of(o)).sum())
    assert changed > 0

    ops.restore(params, mask_bits=bits, save_offsets=offsets, saved=saved, backend=backend)
    for p, o in zip(params, original):
        assert torch.equal(bits_of(p.cpu()), bits_of(o))


@BACKENDS
def test_perturbation_is_the_formula(backend, device):
    """w + scale * m * (|w| + eta)^2 * g on masked entries only, the rest untouched."""
    params, grads, bits, offsets, saved = setup("mixed", torch.float32, device, True, 11, missing_grad=False)
    original = to_cpu(params)
    ops.perturb(params, grads, torch.tensor(0.5, device=device), mask_bits=bits, save_offsets=offsets,
                       saved=saved, adaptive=True, eta=0.1, backend=backend)
    from fsam_kernels._layout import ChunkLayout
    layout = ChunkLayout(params)
    for i, (p, g, o) in enumerate(zip(params, grads, original)):
        m = layout.unpack(bits.cpu(), i)
        want = torch.where(m, o + 0.5 * (o.abs() + 0.1) ** 2 * g.cpu(), o)
        torch.testing.assert_close(p.cpu(), want, rtol=1e-6, atol=1e-7)


@BACKENDS
def test_zero_scale_leaves_weights_untouched(backend, device):
    params, grads, bits, offsets, saved = setup("mixed", torch.float32, device, True, 5)
    grads[0] = torch.full_like(params[0], float("nan"))
    original = to_cpu(params)
    ops.perturb(params, grads, torch.tensor(0.0, device=device), mask_bits=bits, save_offsets=offsets,
                       saved=saved, backend=backend)
    for p, o in zip(params, original):
        assert torch.equal(bits_of(p.cpu()), bits_of(o))
    ops.restore(params, mask_bits=bits, save_offsets=offsets, saved=saved, backend=backend)
    for p, o in zip(params, original):
        assert torch.equal(bits_of(p.cpu()), bits_of(o))


@BACKENDS
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape_set", ["mixed", "many"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_grad_sumsq(backend, device, dtype, shape_set, adaptive):
    params, grads, bits, _, _ = setup(shape_set, dtype, device, True, seed_of(dtype, shape_set, adaptive))
    eta = 0.05
    got = ops.grad_sumsq(params, grads, mask_bits=bits, adaptive=adaptive, eta=eta, backend=backend)
    ref = ops.grad_sumsq(to_cpu(params), to_cpu(grads), mask_bits=bits.cpu(), adaptive=adaptive, eta=eta,
                         backend="reference")
    torch.testing.assert_close(got.cpu(), ref, rtol=2e-5, atol=0)
    # the reference against float64
    from fsam_kernels._layout import ChunkLayout
    layout = ChunkLayout(params)
    total = masked = 0.0
    for i, (p, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        v = g.cpu().double() * ((p.cpu().double().abs() + eta) if adaptive else 1)
        total += float((v * v).sum())
        masked += float((v * v)[layout.unpack(bits.cpu(), i)].sum())
    torch.testing.assert_close(ref.double(), torch.tensor([total, masked], dtype=torch.float64), rtol=1e-5, atol=0)
    dense = ops.grad_sumsq(params, grads, adaptive=adaptive, eta=eta, backend=backend)
    assert dense[0] == dense[1] == got[0]


@BACKENDS
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_grad_sumsq_flags_non_finite(backend, device, bad):
    params, grads, bits, _, _ = setup("mixed", torch.float32, device, True, 9)
    grads[2].view(-1)[7] = bad
    got = ops.grad_sumsq(params, grads, mask_bits=bits, backend=backend)
    assert not torch.isfinite(got[0])


@pytest.mark.parametrize("backend,device", all_backends())
def test_bad_input(backend, device):
    with torch.device(device):  # factories below make tensors there
        params, grads, bits, offsets, saved = setup("mixed", torch.float32, device, True, 1)
        scale = torch.tensor(0.1, device=device)
        snapshot = to_cpu(params)
        with pytest.raises(TypeError, match=r"grads\[0\] is Half but params\[0\] is Float"):
            ops.perturb(params, [grads[0].half()] + grads[1:], scale, mask_bits=bits, save_offsets=offsets,
                               saved=saved, backend=backend)
        with pytest.raises(ValueError, match="save_offsets has"):
            ops.perturb(params, grads, scale, mask_bits=bits, save_offsets=offsets[1:], saved=saved,
                               backend=backend)
        with pytest.raises(ValueError, match="mask_bits has"):
            ops.perturb(params, grads, scale, mask_bits=bits[8:], save_offsets=offsets, saved=saved,
                               backend=backend)
        with pytest.raises(TypeError, match="scale must be"):
            ops.perturb(params, grads, 0.1, mask_bits=bits, save_offsets=offsets, saved=saved, backend=backend)
        with pytest.raises(ValueError, match=r"grads\[0\] has"):
            ops.grad_sumsq(params, [torch.randn(2)] + grads[1:], backend=backend)
        with pytest.raises(TypeError, match=r"params\[0\] must be float32, bfloat16 or float16, got Double"):
            ops.grad_sumsq([params[0].double()], [grads[0].double()], backend=backend)
        with pytest.raises(ValueError, match=r"params\[0\] must be contiguous"):
            ops.restore([torch.randn(4, 3).t()], save_offsets=torch.zeros(1, dtype=torch.int64),
                               saved=torch.zeros(64, dtype=torch.uint8), backend=backend)
        for p, o in zip(params, snapshot):
            assert torch.equal(p, o)


@BACKENDS
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True])
def test_norm_scale_and_perturbation_are_bit_identical(backend, device, dtype, adaptive):
    """One summation order in every backend (fp64 within chunks, chunk partials in fp64 in chunk
    order, fp32 once): the norms, the scales and the perturbed weights equal the reference's
    bit for bit, each backend perturbing with its own norm."""
    seed = seed_of("bit-identical", dtype, adaptive)
    params, grads, bits, offsets, saved = setup("mixed", dtype, device, True, seed)
    ref_params, ref_grads = to_cpu(params), to_cpu(grads)
    results = []
    for b, ps, gs, dev in ((backend, params, grads, device), ("reference", ref_params, ref_grads, "cpu")):
        m = bits.to(dev)
        sums = ops.grad_sumsq(ps, gs, mask_bits=m, adaptive=adaptive, eta=0.01, backend=b)
        scale = (0.05 / (sums[0].sqrt() + 1e-12)).reshape(1)
        ops.perturb(ps, gs, scale, mask_bits=m, save_offsets=offsets.to(dev), saved=saved.to(dev).clone(),
                           adaptive=adaptive, eta=0.01, backend=b)
        results.append((sums.cpu(), scale.cpu(), [bits_of(p.cpu()) for p in ps]))
    (sums, scale, moved), (ref_sums, ref_scale, ref_moved) = results
    assert torch.equal(sums.view(torch.int32), ref_sums.view(torch.int32))
    assert torch.equal(scale.view(torch.int32), ref_scale.view(torch.int32))
    assert all(torch.equal(a, b) for a, b in zip(moved, ref_moved))


@pytest.mark.parametrize("backend,device", all_backends())
@pytest.mark.parametrize("masked", [True, False])
def test_undersized_saved_raises_before_any_write(backend, device, masked):
    """Every buffer written through save_offsets is checked for size first, on every backend:
    a `saved` too small for the mask (or an offset pointing outside it) is an error, and
    neither the weights nor the buffer change."""
    params, grads, bits, offsets, saved = setup("mixed", torch.float32, device, masked, 5, missing_grad=False)
    scale = torch.tensor(0.3, device=device)
    snapshot = to_cpu(params)
    short = saved[:-24].clone()
    far = offsets.clone()
    far[-1] += 64
    for buf, offs in ((short, offsets), (saved, far)):
        before = buf.clone()
        with pytest.raises(ValueError, match="saved has .* bytes but the run of chunk .* ends past it"):
            ops.perturb(params, grads, scale, mask_bits=bits, save_offsets=offs, saved=buf, backend=backend)
        with pytest.raises(ValueError, match="saved has .* bytes but the run of chunk .* ends past it"):
            ops.restore(params, mask_bits=bits, save_offsets=offs, saved=buf, backend=backend)
        assert torch.equal(buf, before)
    bad = offsets.clone()
    bad[0] = -4
    with pytest.raises(ValueError, match=r"save_offsets\[0\] = -4 must be a multiple of 4 at or after"):
        ops.perturb(params, grads, scale, mask_bits=bits, save_offsets=bad, saved=saved, backend=backend)
    for p, o in zip(params, snapshot):
        assert torch.equal(p.cpu(), o)


@BACKENDS
def test_kernels_never_write_past_saved(backend, device):
    """Called directly, past the public checks, a backend given too small a `saved` writes
    nothing outside it: on CPU tensors the raw op refuses before writing anything; on a GPU
    (whose raw ops do not read the offsets on the host) the kernels skip what would not fit."""
    from fsam_kernels import backends
    params, grads, bits, offsets, saved = setup("mixed", torch.float32, device, True, 9, missing_grad=False)
    guarded = torch.full((saved.numel() + 256,), POISON, dtype=torch.uint8, device=device)
    short = guarded[:saved.numel() - 64]  # a view: what lies past its end must stay untouched
    try:
        backends.op("perturb_", backend)(params, grads, bits, offsets, short, torch.tensor(0.3, device=device),
                                         False, 0.0)
        assert device != "cpu", "a CPU backend accepted a saved buffer too small for the mask"
    except ValueError as e:
        assert "saved" in str(e)
        assert bool((guarded == POISON).all())  # refused: nothing written at all
    assert bool((guarded[saved.numel() - 64:] == POISON).all())


def test_triton_kernels_skip_a_run_that_does_not_fit():
    """The Triton kernels' own bound (what a GPU raw call relies on): past the contract, a chunk
    whose saved run would leave `saved` is skipped whole (weights untouched, nothing saved), the
    others are perturbed, and the restore is exact; as the CUDA kernels do."""
    from fsam_kernels import backends
    if "triton" not in backends.available_backends():
        pytest.skip("Triton is not available")
    from fsam_kernels.triton_kernels import perturb as kernels
    params, grads, bits, offsets, saved = setup("one_odd", torch.float32, "cpu", False, 11, missing_grad=False)
    original = [p.clone() for p in params]
    guarded = torch.full((saved.numel() + 256,), POISON, dtype=torch.uint8)
    short = guarded[:int(offsets[-1]) + 4]  # the last chunk's run (3 values) no longer fits
    kernels.perturb_(params, grads, bits, offsets, short, torch.tensor(0.3), False, 0.0)
    p, o = params[0], original[0]
    assert torch.equal(p[4096:], o[4096:])  # the last chunk: untouched
    assert not torch.equal(p[:4096], o[:4096])  # the first: perturbed
    assert bool((guarded[int(offsets[-1]):] == POISON).all())
    kernels.restore_(params, bits, offsets, short)
    assert torch.equal(params[0], original[0])
