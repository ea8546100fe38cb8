"""The split step (restore() then second_step()), and the GradScaler path of the optimizers and
of `fsam_kernels.optim.micro_batches.sharpness_step`: unscaled first pass, overflow skips."""
import pytest
import torch

from fsam_kernels import FSAM, SAM
from fsam_kernels.optim.micro_batches import sharpness_step
from conftest import compiled_backends
from models import assert_bits_equal, batch, loss_of, overflow_backward, snapshot, tiny_bert, train

KW = dict(rho=0.05, sparsity=0.8, mask_interval=2, lr=1e-3)


def make(cls=FSAM, seed=0, backend="reference", **kw):
    model = tiny_bert(seed)
    kw = {**KW, **kw} if cls is FSAM else {"rho": KW["rho"], "lr": KW["lr"], **kw}
    return model, cls(model.named_parameters(), torch.optim.AdamW, backend=backend, **kw)


def scaler(init_scale=2.0**12):
    return torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=1000)


@pytest.mark.parametrize("cls", [FSAM, SAM])
def test_restore_then_second_step_is_second_step(cls):
    m1, o1 = make(cls)
    m2, o2 = make(cls)
    train(m1, o1, 3)
    for s in range(3):
        loss_of(m2, s).backward()
        o2.first_step(zero_grad=True)
        loss_of(m2, s).backward()
        perturbed = snapshot(m2)
        o2.restore()
        assert any(not torch.equal(perturbed[n], p) for n, p in m2.named_parameters())
        o2.second_step(zero_grad=True)
    assert_bits_equal(snapshot(m1), snapshot(m2))


def test_restore_misuse():
    model, opt = make()
    with pytest.raises(RuntimeError, match="without first_step"):
        opt.restore()
    loss_of(model, 0).backward()
    opt.first_step()
    opt.restore()
    with pytest.raises(RuntimeError, match="twice"):
        opt.restore()
    opt.state_dict()  # restored: the weights are the real ones again
    opt.second_step()
    with pytest.raises(RuntimeError, match="without first_step"):
        opt.second_step()


def test_first_step_reports_finiteness():
    model, opt = make()
    loss_of(model, 0).backward()
    assert bool(opt.first_step(zero_grad=True))
    loss_of(model, 0).backward()
    opt.second_step(zero_grad=True)
    loss_of(model, 1).backward()
    model.classifier.weight.grad[0, 0] = float("nan")
    before = snapshot(model)
    assert not bool(opt.first_step())
    assert_bits_equal(snapshot(model), before)


@pytest.mark.parametrize("cls", [FSAM, SAM])
def test_grad_scaler_matches_unscaled(cls):
    """Power-of-two scales are exact: the scaled run takes the unscaled run's steps."""
    m1, o1 = make(cls)
    m2, o2 = make(cls)
    sc = scaler()
    train(m1, o1, 3)
    for s in range(3):
        sc.scale(loss_of(m2, s)).backward()
        o2.first_step(zero_grad=True, scaler=sc)
        sc.scale(loss_of(m2, s)).backward()
        o2.second_step(zero_grad=True, scaler=sc)
        sc.update()
    for (n, a), b in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=n)
    if cls is FSAM:
        assert torch.equal(o1.mask_bits, o2.mask_bits)


@pytest.mark.parametrize("cls", [FSAM, SAM])
def test_first_pass_overflow_skips_perturbation_and_step(cls):
    model, opt = make(cls)
    sc = scaler()
    overflow_backward(model, at_call=2)  # backward 0, 1: step 0; backward 2: step 1's first pass
    loss_fn = lambda b: model(**b).loss
    sharpness_step(opt, [batch(0)], loss_fn, scaler=sc)
    before, scale = snapshot(model), sc.get_scale()
    sharpness_step(opt, [batch(1)], loss_fn, scaler=sc, max_grad_norm=1.0)
    assert_bits_equal(snapshot(model), before)  # no perturbation left behind, no base step
    assert sc.get_scale() == scale / 2
    assert opt.skipped_perturbations == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if cls is FSAM:  # the due mask step (step 2 with mask_interval=2 counts 1 and 2) is not lost
        assert opt.perturbation.steps_since_mask == 2
    sharpness_step(opt, [batch(2)], loss_fn, scaler=sc)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert opt.skipped_perturbations == 1 and sc.get_scale() == scale / 2


def test_second_pass_overflow_skips_only_the_step():
    model, opt = make()
    sc = scaler()
    overflow_backward(model, at_call=1)
    before = snapshot(model)
    sharpness_step(opt, [batch(0)], lambda b: model(**b).loss, scaler=sc)
    assert_bits_equal(snapshot(model), before)
    assert opt.skipped_perturbations == 0 and sc.get_scale() == 2.0**11
    assert opt.mask_bits is not None  # the first pass was fine: its mask stands


def clip_by_hand(params, max_norm, mode):
    """torch's clip_grad_norm_ on the whole gradient, or on each tensor alone; whether it clipped."""
    groups = [list(params)] if mode == "global" else [[p] for p in params if p.grad is not None]
    norms = [torch.nn.utils.clip_grad_norm_(g, max_norm) for g in groups]  # every group, no short cut
    return any(bool(n > max_norm) for n in norms)


@pytest.mark.parametrize("mode", ["global", "componentwise"])
def test_sharpness_step_accumulation_and_clipping(mode):
    """Two micro-batches: one perturbation from their mean gradient, the second pass averaged at
    it, the second-pass gradient clipped once; against the optimizer's own API by hand."""
    m1, o1 = make()
    m2, o2 = make()
    parts = [{k: v[i::2] for k, v in batch(0).items()} for i in range(2)]
    sharpness_step(o1, parts, lambda b: m1(**b).loss, max_grad_norm=0.1, clip=mode)
    for b in parts:
        (m2(**b).loss / 2).backward()
    o2.first_step(zero_grad=True)
    for b in parts:
        (m2(**b).loss / 2).backward()
    assert clip_by_hand(m2.parameters(), 0.1, mode)  # the clip did something
    o2.second_step(zero_grad=True)
    if mode == "global":
        assert_bits_equal(snapshot(m1), snapshot(m2))
    else:  # the fused per-tensor norms round apart from torch's
        for (n, a), b in zip(m1.named_parameters(), m2.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=n)
    with pytest.raises(ValueError, match="max_grad_norm"):
        sharpness_step(o1, parts, lambda b: m1(**b).loss, max_grad_norm=0)
    with pytest.raises(ValueError, match="clip must be one of"):
        sharpness_step(o1, parts, lambda b: m1(**b).loss, max_grad_norm=0.1, clip="per-layer")
    with pytest.raises(ValueError, match="empty"):
        sharpness_step(o1, [], lambda b: m1(**b).loss)


@pytest.mark.parametrize("mode", ["global", "componentwise"])
def test_sharpness_step_scaler_with_clipping_matches_unscaled(mode):
    """Both unscales in one iteration (the optimizer's for the first pass, the base's for the
    clip of the second) and the clip see the true gradient."""
    m1, o1 = make()
    m2, o2 = make()
    sc = scaler()
    for s in range(3):
        sharpness_step(o1, [batch(s)], lambda b: m1(**b).loss, max_grad_norm=0.1, clip=mode)
        sharpness_step(o2, [batch(s)], lambda b: m2(**b).loss, max_grad_norm=0.1, clip=mode, scaler=sc)
    for (n, a), b in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=n)
    assert sc.get_scale() == 2.0**12


@pytest.mark.parametrize("backend", [b for b, d in compiled_backends() if d == "cpu"])
@pytest.mark.parametrize("cls", [FSAM, SAM])
def test_sharpness_step_takes_the_references_steps(backend, cls):
    """Two micro-batches, a GradScaler and component-wise clipping: every CPU-tensor backend
    (the emulated CUDA kernels too) takes the reference's steps bit for bit."""
    runs = []
    for b in ("reference", backend):
        model, opt = make(cls, backend=b)
        sc = scaler()
        for s in range(3):
            sharpness_step(opt, [batch(2 * s), batch(2 * s + 1)], lambda bt: model(**bt).loss, scaler=sc,
                           max_grad_norm=0.5, clip="componentwise")
        runs.append(snapshot(model))
    assert_bits_equal(runs[1], runs[0])


@pytest.mark.parametrize("cls", [FSAM, SAM])
def test_a_first_step_retried_after_an_error_unscales_once(cls, monkeypatch):
    """A first_step(scaler=...) that raises after unscaling (here: its perturbation) is rolled
    back; retried, it does not unscale again (GradScaler.step's rule): the run is the unbroken one."""
    m1, o1 = make(cls)
    m2, o2 = make(cls)
    sc1, sc2 = scaler(), scaler()
    for s in range(3):
        for m, o, sc, fail in ((m1, o1, sc1, False), (m2, o2, sc2, s == 1)):
            sc.scale(loss_of(m, s)).backward()
            if fail:
                with monkeypatch.context() as patch:
                    patch.setattr(o.roles, "perturb", lambda *a, **k: (_ for _ in ()).throw(MemoryError("boom")))
                    with pytest.raises(MemoryError):
                        o.first_step(zero_grad=False, scaler=sc)
            o.first_step(zero_grad=True, scaler=sc)
            sc.scale(loss_of(m, s)).backward()
            o.second_step(zero_grad=True, scaler=sc)
            sc.update()
    assert_bits_equal(snapshot(m1), snapshot(m2))
