"""Component-wise gradient-norm clipping: every backend against torch.nn.utils.clip_grad_norm_
applied to one tensor at a time, the backends' scaling bit for bit against the reference's, the
non-finite cases as torch has them, and the argument checks."""
import pytest
import torch

import fsam_kernels
from fsam_kernels import backends, clip_grad_norm_componentwise_
from conftest import DTYPES, all_backends, interpreted, randn, seed_of, shapes


def params_with_grads(shape_set, dtype, device, seed):
    """Parameters of `shape_set` with fresh random gradients of varied sizes (every third has none)."""
    params = [torch.nn.Parameter(p) for p in randn(shapes(shape_set), dtype, device, seed)]
    for i, (p, g) in enumerate(zip(params, randn(shapes(shape_set), dtype, device, seed + 1))):
        p.grad = None if i % 3 == 2 else g * (0.1 + i % 5)
    return params


def torch_per_tensor(params, max_norm):
    """The definition: torch's clip_grad_norm_ on each tensor alone (on float64 copies), returning
    the norms and the clipped gradients."""
    norms, clipped = [], []
    for p in params:
        if p.grad is None:
            continue
        q = torch.nn.Parameter(p.detach().double().cpu())
        q.grad = p.grad.detach().double().cpu()
        norms.append(torch.nn.utils.clip_grad_norm_([q], max_norm))
        clipped.append(q.grad)
    return torch.stack(norms), clipped


@pytest.mark.parametrize("backend,device", all_backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape_set", ["mixed", "many"])
def test_matches_torch_per_tensor(backend, device, dtype, shape_set):
    if interpreted(backend, device) and shape_set == "many" and dtype != torch.float32:
        pytest.skip("the interpreter is slow: 200 tensors in fp32 only")
    params = params_with_grads(shape_set, dtype, device, seed_of(dtype, shape_set))
    before = [None if p.grad is None else p.grad.clone() for p in params]
    want_norms, want = torch_per_tensor(params, 1.0)
    max_norm = float(want_norms.median())  # some tensors clipped, some not
    want_norms, want = torch_per_tensor(params, max_norm)
    norms = clip_grad_norm_componentwise_(params, max_norm, backend=backend)
    assert norms.dtype == torch.float32 and norms.device == torch.device(device)
    torch.testing.assert_close(norms.double().cpu(), want_norms, rtol=1e-6, atol=0)
    got = [p.grad for p in params if p.grad is not None]
    kept = [b for b in before if b is not None]
    for g, w, b, n in zip(got, want, kept, norms.cpu()):
        assert g.dtype == dtype and g.device == torch.device(device)
        # the scaling in fp32, rounded once to the gradient's dtype (exact: the factor is our norm's)
        factor = torch.clamp(torch.tensor(max_norm, dtype=torch.float32) / (n + torch.tensor(1e-6)), max=1.0)
        assert torch.equal(g.cpu(), (b.cpu().float() * factor).to(dtype))
        if factor == 1:
            assert torch.equal(g, b), "a gradient under the threshold changed"
        tol = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
        torch.testing.assert_close(g.double().cpu(), w, rtol=tol, atol=tol * float(w.abs().amax()) if w.numel() else 0.0)


@pytest.mark.parametrize("backend,device", all_backends())
@pytest.mark.parametrize("dtype", DTYPES)
def test_ops_agree_with_the_reference(backend, device, dtype):
    """tensor_sumsq to fp64 rounding; clip_scale_, given the same norms, bit for bit."""
    tensors = randn(shapes("mixed"), dtype, device, seed_of("ops", dtype))
    sums = backends.op("tensor_sumsq", backend)(tensors)
    ref = backends.op("tensor_sumsq", "reference")([t.cpu() for t in tensors])
    assert sums.dtype == torch.float64 and sums.shape == (len(tensors),)
    torch.testing.assert_close(sums.cpu(), ref, rtol=1e-12, atol=0)
    exact = torch.stack([t.cpu().double().pow(2).sum() for t in tensors])
    torch.testing.assert_close(ref, exact, rtol=1e-12, atol=0)
    norms = ref.sqrt().float().to(device)
    scaled = [t.clone() for t in tensors]
    backends.op("clip_scale_", backend)(scaled, norms, 0.7, 1e-6)
    want = [t.cpu().clone() for t in tensors]
    backends.op("clip_scale_", "reference")(want, norms.cpu(), 0.7, 1e-6)
    for s, w in zip(scaled, want):
        assert torch.equal(s.cpu(), w)


@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply")  # inf * 0, as torch's
@pytest.mark.parametrize("backend,device", all_backends())
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_norms_clip_as_torch_does(backend, device, bad):
    params = params_with_grads("mixed", torch.float32, device, 5)
    params[1].grad.view(-1)[3] = bad
    before = [None if p.grad is None else p.grad.clone() for p in params]
    with pytest.raises(RuntimeError, match="non-finite norm"):
        clip_grad_norm_componentwise_(params, 0.5, error_if_nonfinite=True, backend=backend)
    for p, b in zip(params, before):  # error_if_nonfinite raised before changing a gradient
        assert p.grad is None if b is None else torch.equal(p.grad.view(torch.int32), b.view(torch.int32))
    want_norms, want = torch_per_tensor(params, 0.5)
    norms = clip_grad_norm_componentwise_(params, 0.5, backend=backend)
    assert torch.equal(torch.isfinite(norms.cpu()), torch.isfinite(want_norms))
    got = [p.grad.double().cpu() for p in params if p.grad is not None]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2e-6, atol=1e-30, equal_nan=True)


@pytest.mark.parametrize("backend,device", all_backends())
def test_one_op_call_per_pass_whatever_the_tensor_count(backend, device, monkeypatch):
    calls = []
    real = backends.op

    def counting(name, b):
        calls.append(name)
        return real(name, b)
    monkeypatch.setattr(backends, "op", counting)
    params = params_with_grads("many", torch.float32, device, 8)
    clip_grad_norm_componentwise_(params, 0.1, backend=backend)
    assert calls == ["tensor_sumsq", "clip_scale_"]


def test_arguments_are_checked_before_anything_changes():
    p = torch.nn.Parameter(torch.randn(10))
    p.grad = torch.randn(10)
    g = p.grad.clone()
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="max_norm"):
            clip_grad_norm_componentwise_([p], bad)
    for bad in (True, "1", None):
        with pytest.raises(TypeError, match="max_norm"):
            clip_grad_norm_componentwise_([p], bad)
    with pytest.raises(ValueError, match="eps"):
        clip_grad_norm_componentwise_([p], 1.0, eps=-1e-6)
    q = torch.nn.Parameter(torch.randn(4, 6))
    q.grad = torch.randn(6, 4).t()
    with pytest.raises(ValueError, match=r"parameters\[1\].grad is not contiguous"):
        clip_grad_norm_componentwise_([p, q], 1e-3)
    q.grad = torch.randn(4, 6).to_sparse()
    with pytest.raises(ValueError, match=r"parameters\[1\].grad is sparse"):
        clip_grad_norm_componentwise_([p, q], 1e-3)
    d = torch.nn.Parameter(torch.randn(4, 6).double())
    d.grad = torch.randn(4, 6).double()
    with pytest.raises(TypeError, match=r"parameters\[1\].grad is torch.float64"):
        clip_grad_norm_componentwise_([p, d], 1e-3)
    with pytest.raises(TypeError, match=r"parameters\[0\] must be a tensor"):
        clip_grad_norm_componentwise_([3.0], 1e-3)
    assert torch.equal(p.grad, g)


def test_single_tensor_no_gradients_and_the_public_name():
    assert fsam_kernels.clip_grad_norm_componentwise_ is clip_grad_norm_componentwise_
    p = torch.nn.Parameter(torch.randn(100))
    assert clip_grad_norm_componentwise_([p], 1.0).numel() == 0  # no gradient: nothing to clip
    p.grad = torch.full((100,), 3.0)
    norm = clip_grad_norm_componentwise_(p, 1.5)
    assert norm.shape == (1,) and float(norm) == pytest.approx(30.0)
    torch.testing.assert_close(p.grad, torch.full((100,), 3.0 * 1.5 / (30.0 + 1e-6)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("backend", [b for b in ("cuda", "triton") if b in fsam_kernels.available_backends()])
def test_no_host_sync_on_a_gpu(backend):
    params = params_with_grads("many", torch.float32, "cuda", 3)
    clip_grad_norm_componentwise_(params, 0.1, backend=backend)  # tables built, kernels compiled
    torch.cuda.set_sync_debug_mode("error")
    try:
        clip_grad_norm_componentwise_(params, 0.1, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")
