"""FSAM and SAM end to end on a tiny BERT: every backend against the reference, the
algorithm against an independent computation, exact restore and resume, bad input."""
import io
import math
import warnings

import pytest
import torch

from fsam_kernels import FSAM, SAM, backends
from conftest import compiled_backends
from models import assert_bits_equal, loss_of, snapshot, tiny_bert, train

COMPILED = [b for b, _ in compiled_backends()]
ALL = ["reference"] + COMPILED


def make(cls, backend, seed=0, dtype=torch.float32, base=torch.optim.AdamW, **kw):
    """A tiny BERT on the backend's device and an optimizer over it."""
    model = tiny_bert(seed, dtype).to(backends.device_of(backend) or "cpu")
    base_kw = {"lr": 1e-3} if base is not torch.optim.SGD else {"lr": kw.pop("lr", 0.0)}
    return model, cls(model.named_parameters(), base, backend=backend, **kw, **base_kw)


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("fisher", ["batch", "ema"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_fsam_backend_matches_reference(backend, fisher, adaptive):
    kw = dict(sparsity=0.9, mask_interval=2, fisher=fisher, adaptive=adaptive, eta=0.01, rho=0.05)
    m_fast, o_fast = make(FSAM, backend, **kw)
    m_ref, o_ref = make(FSAM, "reference", **kw)
    m_ref.to(next(m_fast.parameters()).device)
    for step in range(5):
        for m in (m_fast, m_ref):
            loss_of(m, step).backward()
        o_fast.first_step(zero_grad=True)
        o_ref.first_step(zero_grad=True)
        if step == 0:  # same weights, same gradients: the same mask, bit for bit
            assert torch.equal(o_fast.mask_bits.cpu(), o_ref.mask_bits.cpu())
        for m in (m_fast, m_ref):
            loss_of(m, step).backward()
        o_fast.second_step(zero_grad=True)
        o_ref.second_step(zero_grad=True)
    agree = (o_fast.mask_bits.cpu() == o_ref.mask_bits.cpu()).float().mean()
    assert agree > 0.99
    for (n, a), b in zip(m_fast.named_parameters(), m_ref.parameters()):
        torch.testing.assert_close(a.cpu(), b.cpu(), rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("fisher,sparsity", [("batch", 0.2), ("ema", 0.5)])
def test_fsam_runs_are_bit_identical_across_backends(backend, fisher, sparsity):
    """Every backend computes the norm in one summation order, so whole FSAM runs (masks,
    perturbations, AdamW on the same gradients) stay bit-identical to the reference's on the
    same device.  (With the norm's partials added in fp32 by one backend and in fp64 by the
    other, these two runs parted at steps 8 and 6.)"""
    kw = dict(sparsity=sparsity, mask_interval=4, fisher=fisher, rho=0.05)
    m_fast, o_fast = make(FSAM, backend, **kw)
    m_ref, o_ref = make(FSAM, "reference", **kw)
    m_ref.to(next(m_fast.parameters()).device)
    for step in range(12):
        for m, o in ((m_fast, o_fast), (m_ref, o_ref)):
            loss_of(m, step).backward()
            o.first_step(zero_grad=True)
            loss_of(m, step).backward()
            o.second_step(zero_grad=True)
        assert torch.equal(o_fast.mask_bits, o_ref.mask_bits), step
    assert_bits_equal(snapshot(m_fast), snapshot(m_ref))


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("adaptive", [False, True])
def test_sparsity_zero_is_sam(backend, adaptive):
    m1, fsam = make(FSAM, backend, sparsity=0.0, mask_interval=3, adaptive=adaptive)
    m2, sam = make(SAM, backend, adaptive=adaptive)
    train(m1, fsam, 4)
    train(m2, sam, 4)
    assert_bits_equal(snapshot(m1), snapshot(m2))


def independent_perturbation(model, rho, eps, k, pool_names):
    """w + e computed from .grad with float64 and a sort, not with the package."""
    named = dict(model.named_parameters())
    grads = {n: p.grad.detach().double().cpu() for n, p in named.items() if p.grad is not None}
    norm = math.sqrt(sum(float((g * g).sum()) for g in grads.values()))
    keys = torch.cat([grads[n].abs().reshape(-1) if n in grads else torch.zeros(named[n].numel(), dtype=torch.float64)
                      for n in pool_names])
    top = torch.sort(keys.float(), descending=True, stable=True).indices[:k]
    flat_mask = torch.zeros(keys.numel(), dtype=torch.bool)
    flat_mask[top] = True
    masks = dict(zip(pool_names, [m.reshape(named[n].shape) for n, m in
                                  zip(pool_names, flat_mask.split([named[n].numel() for n in pool_names]))]))
    expected = {}
    for n, p in named.items():
        m = masks.get(n, torch.ones(p.shape, dtype=torch.bool))
        e = rho * grads[n] / (norm + eps) if n in grads else torch.zeros(p.shape, dtype=torch.float64)
        expected[n] = (p.detach().double().cpu() + e * m).float()
    return expected, masks


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("preset", [None, "fsam4plm"])
def test_first_step_perturbs_the_global_top_k(backend, preset):
    model, opt = make(FSAM, backend, sparsity=0.9, rho=0.5, pool=preset)
    loss_of(model, 0).backward()
    model.classifier.bias.grad = None  # a parameter without gradient: untouched, not in the norm
    pool_names = [n for n, _ in model.named_parameters() if preset is None or ("bias" not in n and "embed" not in n)]
    n_pool = sum(dict(model.named_parameters())[n].numel() for n in pool_names)
    k = math.floor(0.1 * n_pool + 1e-9)
    assert opt.k == k
    before = snapshot(model)
    expected, masks = independent_perturbation(model, 0.5, 1e-12, k, pool_names)
    opt.first_step()
    assert opt.mask_density() == k / n_pool
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach().cpu(), expected[n], rtol=1e-6, atol=1e-7, msg=n)
        if n in masks:
            assert torch.equal(opt.mask_of(p).cpu(), masks[n]), n
            unmasked = ~masks[n]
            assert torch.equal(p.detach().cpu()[unmasked], before[n][unmasked]), n
        else:
            assert opt.mask_of(p) is None
    assert torch.equal(model.classifier.bias.detach().cpu(), before["classifier.bias"])


@pytest.mark.parametrize("backend", ALL)
def test_renormalize_gives_norm_rho(backend):
    model, opt = make(FSAM, backend, sparsity=0.5, rho=0.3, renormalize=True)
    loss_of(model, 0).backward()
    grads = {n: p.grad.double().cpu() for n, p in model.named_parameters()}
    before = snapshot(model)
    opt.first_step()
    masks = {n: opt.mask_of(p).cpu() for n, p in model.named_parameters()}
    masked_sq = sum(float((grads[n][masks[n]] ** 2).sum()) for n in grads)
    e_norm = math.sqrt(sum(float(((grads[n] * 0.3 / math.sqrt(masked_sq))[masks[n]] ** 2).sum()) for n in grads))
    assert abs(e_norm - 0.3) < 1e-9
    for n, p in model.named_parameters():  # and that is the step taken
        want = before[n].double() + torch.where(masks[n], grads[n] * 0.3 / math.sqrt(masked_sq), 0.0)
        torch.testing.assert_close(p.detach().cpu(), want.float(), rtol=1e-6, atol=1e-7)
    opt.second_step()


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls", [FSAM, SAM])
def test_restore_is_bit_exact(backend, dtype, cls):
    model, opt = make(cls, backend, dtype=dtype, base=torch.optim.SGD, rho=0.5)
    before = snapshot(model)
    loss_of(model, 0).backward()
    opt.first_step(zero_grad=True)
    moved = sum(int((p.detach() != before[n]).sum()) for n, p in model.named_parameters())
    assert moved > 0
    loss_of(model, 0).backward()
    opt.second_step(zero_grad=True)  # SGD with lr 0: only the restore acts
    assert_bits_equal(snapshot(model), before)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("fisher", ["batch", "ema"])
def test_resume_reproduces_an_uninterrupted_run(backend, fisher):
    kw = dict(sparsity=0.8, mask_interval=2, fisher=fisher)
    m_full, o_full = make(FSAM, backend, **kw)
    train(m_full, o_full, 6)

    m_half, o_half = make(FSAM, backend, **kw)
    train(m_half, o_half, 3)
    buf = io.BytesIO()
    torch.save({"model": m_half.state_dict(), "opt": o_half.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # plain tensors and containers: loads without pickle
    m_new, o_new = make(FSAM, backend, seed=123, **kw)
    m_new.load_state_dict(saved["model"])
    o_new.load_state_dict(saved["opt"])
    train(m_new, o_new, 3, start=3)
    assert_bits_equal(snapshot(m_new), snapshot(m_full))
    assert torch.equal(o_new.mask_bits.cpu(), o_full.mask_bits.cpu())


@pytest.mark.parametrize("backend", ALL)
def test_mask_interval_and_ema_fisher(backend):
    model, opt = make(FSAM, backend, fisher="ema", fisher_decay=0.9, mask_interval=3, sparsity=0.5)
    expected = [torch.zeros_like(p, dtype=torch.float32) for p in model.parameters()]  # on the device
    masks = []
    for step in range(4):
        loss_of(model, step).backward()
        for f, p in zip(expected, model.parameters()):
            f.mul_(0.9).add_(p.grad.float() ** 2 * 0.1)
        opt.first_step(zero_grad=True)
        masks.append(opt.mask_bits)
        loss_of(model, step).backward()
        opt.second_step(zero_grad=True)
        for f, e in zip(opt.perturbation.estimate, expected):
            torch.testing.assert_close(f, e, rtol=1e-6, atol=0)
    assert masks[0] is masks[1] is masks[2] and masks[3] is not masks[2]  # rebuilt at steps 0 and 3


@pytest.mark.parametrize("backend", ALL)
def test_fisher_from_samples(backend):
    model, opt = make(FSAM, backend, fisher="samples", sparsity=0.9)
    total = [torch.zeros_like(p) for p in model.parameters()]
    for j in range(3):
        opt.zero_grad()
        loss_of(model, 50 + j).backward()
        for t, p in zip(total, model.parameters()):
            t.add_(p.grad ** 2)
        opt.accumulate_fisher()
    opt.update_mask()
    keys = torch.cat([t.reshape(-1) for t in total]).cpu()
    top = torch.sort(keys, descending=True, stable=True).indices[:opt.k]
    picked = torch.cat([opt.mask_of(p).reshape(-1) for p in model.parameters()]).nonzero().squeeze(1).cpu()
    # summed in another order: allow the boundary entry to differ
    assert len(set(picked.tolist()) ^ set(top.tolist())) <= 2
    assert all(float(f.abs().sum()) == 0 for f in opt.perturbation.estimate)  # F starts afresh
    with pytest.raises(RuntimeError, match="accumulate_fisher"):
        opt.update_mask()


@pytest.mark.parametrize("backend", ALL)
def test_outside_pool_none_is_not_perturbed(backend):
    model, opt = make(FSAM, backend, pool="fsam4plm", outside_pool="none", rho=0.5)
    before = snapshot(model)
    loss_of(model, 0).backward()
    opt.first_step()
    for n, p in model.named_parameters():
        if "bias" in n or "embed" in n:
            assert torch.equal(p.detach().cpu(), before[n]), n
            assert opt.mask_of(p) is None
    opt.second_step()


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("where", ["mask_step", "other_step"])
def test_non_finite_gradients_skip_the_perturbation(backend, where):
    model, opt = make(FSAM, backend, base=torch.optim.SGD, mask_interval=100, rho=0.5)
    if where == "other_step":
        train(model, opt, 1)
    mask = opt.mask_bits
    loss_of(model, 1).backward()
    model.bert.encoder.layer[0].attention.self.query.weight.grad[0, 0] = float("inf")
    before = snapshot(model)
    opt.first_step(zero_grad=True)
    assert_bits_equal(snapshot(model), before)
    assert opt.skipped_perturbations == 1
    assert opt.mask_bits is mask  # not rebuilt (None at step 0: postponed)
    loss_of(model, 1).backward()
    opt.second_step(zero_grad=True)
    train(model, opt, 1, start=2)
    assert opt.mask_bits is not None and (where == "other_step") == (opt.mask_bits is mask)
    assert opt.skipped_perturbations == 1


@pytest.mark.parametrize("backend", ALL)
def test_step_with_closure_equals_two_steps(backend):
    m1, o1 = make(FSAM, backend, mask_interval=2)
    m2, o2 = make(FSAM, backend, mask_interval=2)
    train(m1, o1, 3)
    for s in range(3):
        loss_of(m2, s).backward()
        loss = o2.step(lambda: loss_of(m2, s).backward() or loss_of(m2, s))
        assert torch.is_tensor(loss)
        o2.zero_grad()
    assert_bits_equal(snapshot(m1), snapshot(m2))


def test_lr_scheduler_drives_the_base_optimizer():
    model, opt = make(FSAM, "reference")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    train(model, opt, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()"
        sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)
    assert opt.param_groups is opt.base_optimizer.param_groups


def test_memory_is_a_bit_per_parameter_plus_the_masked_values():
    model, opt = make(FSAM, "reference", sparsity=0.9)
    train(model, opt, 1)
    n = sum(p.numel() for p in model.parameters())
    assert opt.mask_bits.numel() <= n / 8 + 512 * len(list(model.parameters()))
    assert opt.roles.masked_saved.numel() <= 4 * opt.k + 16 * len(list(model.parameters()))
    assert opt.roles.dense_saved.numel() == 0
    _, sam = make(SAM, "reference")
    assert sam.roles.dense_saved.numel() >= 4 * n


GOOD = dict(rho=0.05)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"sparsity": 1.0}, ValueError, "sparsity"),
    ({"sparsity": -0.1}, ValueError, "sparsity"),
    ({"rho": -1.0}, ValueError, "rho"),
    ({"mask_interval": 0}, ValueError, "mask_interval"),
    ({"mask_interval": 2.5}, ValueError, "mask_interval"),
    ({"fisher": "kfac"}, ValueError, "fisher"),
    ({"fisher_decay": 1.0}, ValueError, "fisher_decay"),
    ({"backend": "tpu"}, ValueError, "backend"),
    ({"pool": "everything"}, ValueError, "pool"),
    ({"pool": 3}, TypeError, "pool"),
    ({"pool": lambda n, p: False}, ValueError, "pool selects no trainable parameter"),
    ({"outside_pool": "sparse"}, ValueError, "outside_pool"),
    ({"norm_eps": -1.0}, ValueError, "norm_eps"),
])
def test_bad_constructor_arguments(kwargs, error, match):
    model = tiny_bert()
    with pytest.raises(error, match=match):
        FSAM(model.named_parameters(), torch.optim.AdamW, **{**GOOD, **kwargs})


def test_unknown_keyword_is_unknown_to_both():
    """A misspelt method option is not blamed on the base optimizer: both lists are given."""
    from fsam_kernels import PACTuning
    model = tiny_bert()
    with pytest.raises(TypeError, match=r"FSAM: unknown keyword argument\(s\) 'sparsty': not an option of FSAM "
                                        r"\(rho, sparsity, .*\) nor of AdamW \(lr, betas, "):
        FSAM(model.parameters(), torch.optim.AdamW, sparsty=0.5)
    with pytest.raises(TypeError, match=r"SAM: unknown keyword argument\(s\) 'rhoo', 'x'"):
        SAM(model.parameters(), torch.optim.SGD, rhoo=0.1, lr=0.1, x=1)
    with pytest.raises(TypeError, match=r"PACTuning: .*'seeed'.*\(num_examples, stage1_steps, gamma, seed, "):
        PACTuning(model.parameters(), torch.optim.AdamW, num_examples=10, stage1_steps=1, seeed=3)

    class Lenient(torch.optim.SGD):  # takes anything: its own error stands
        def __init__(self, params, **kwargs):
            super().__init__(params, **kwargs)
    with pytest.raises(TypeError, match="unexpected keyword argument 'sparsty'"):
        FSAM(model.parameters(), Lenient, sparsty=0.5, lr=0.1)


@pytest.mark.parametrize("cls", [FSAM, SAM])
def test_step_hooks_fire_once_per_step_whichever_form(cls):
    """step(closure), first_step() + second_step(), and the Trainer's first_step() + restore() +
    second_step(): torch.optim's step pre- and post-hooks (per optimizer and global) once each."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
    model, opt = make(cls, "reference", base=torch.optim.SGD, lr=0.1)
    calls = []
    handles = [opt.register_step_pre_hook(lambda o, a, k: calls.append(("pre", o))),
               opt.register_step_post_hook(lambda o, a, k: calls.append(("post", o))),
               register_optimizer_step_pre_hook(lambda o, a, k: calls.append(("global pre", o)) if o is opt else None),
               register_optimizer_step_post_hook(lambda o, a, k: calls.append(("global post", o)) if o is opt else None)]
    once = [("global pre", opt), ("pre", opt), ("post", opt), ("global post", opt)]
    try:
        loss_of(model, 0).backward()
        opt.step(lambda: loss_of(model, 0).backward())
        assert calls == once
        for restore_first in (False, True):
            calls.clear()
            loss_of(model, 1).backward()
            opt.first_step(zero_grad=True)
            assert calls == once[:2]
            loss_of(model, 1).backward()
            if restore_first:
                opt.restore()
            opt.second_step(zero_grad=True)
            assert calls == once
    finally:
        for h in handles:
            h.remove()


def test_state_dict_hooks_fire():
    """torch.optim's state-dict hooks: a post-hook's replacement is returned, a load pre-hook's is
    loaded (FSAM and PACTuning)."""
    from fsam_kernels import PACTuning
    for opt in (make(FSAM, "reference")[1],
                PACTuning(tiny_bert().parameters(), torch.optim.AdamW, num_examples=10, stage1_steps=1,
                          backend="reference", lr=1e-3)):
        seen = []
        opt.register_state_dict_pre_hook(lambda o: seen.append("pre"))
        opt.register_state_dict_post_hook(lambda o, sd: {**sd, "tag": 1})
        state = opt.state_dict()
        assert seen == ["pre"] and state["tag"] == 1
        opt.register_load_state_dict_pre_hook(lambda o, sd: {k: v for k, v in sd.items() if k != "tag"})
        opt.register_load_state_dict_post_hook(lambda o: seen.append("loaded"))
        opt.load_state_dict(state)
        assert seen == ["pre", "loaded"]


def test_bad_params():
    model = tiny_bert()
    with pytest.raises(TypeError, match="optimizer class"):
        FSAM(model.parameters(), "adamw")
    with pytest.raises(ValueError, match="empty"):
        FSAM([], torch.optim.AdamW)
    with pytest.raises(ValueError, match="named_parameters"):
        FSAM(model.parameters(), torch.optim.AdamW, pool="fsam4plm")
    with pytest.raises(TypeError, match="float32"):
        SAM([torch.zeros(3, dtype=torch.float64, requires_grad=True)], torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="not available"):
        FSAM(model.parameters(), torch.optim.AdamW, backend="cuda" if torch.cuda.is_available() is False else "x")


@pytest.mark.parametrize("backend", ALL)
def test_frozen_parameters_are_in_no_pool_and_no_count(backend):
    """A frozen embedding and a trainable head (as users fine-tune): FSAM's k and pool are the
    head's, the mask sits on the head only, the embedding is never perturbed and not copied; SAM
    keeps no copy of it either."""
    device = backends.device_of(backend) or "cpu"
    torch.manual_seed(0)
    emb, head = torch.nn.Embedding(1000, 16).to(device), torch.nn.Linear(16, 4).to(device)
    emb.weight.requires_grad_(False)
    params = list(emb.named_parameters()) + list(head.named_parameters())
    frozen = emb.weight.detach().clone()
    for p in head.parameters():
        p.grad = torch.randn_like(p)
    n_head = sum(p.numel() for p in head.parameters())
    opt = FSAM(params, torch.optim.SGD, sparsity=0.9, backend=backend, lr=0.1)
    assert opt.k == math.floor(0.1 * n_head)
    before = [p.detach().clone() for p in head.parameters()]
    opt.first_step()
    assert opt.mask_density() == opt.k / n_head and opt.mask_of(emb.weight) is None
    assert sum(int(opt.mask_of(p).sum()) for p in head.parameters()) == opt.k
    moved = sum(int((p != b).sum()) for p, b in zip(head.parameters(), before))
    assert 0 < moved <= opt.k and torch.equal(emb.weight, frozen)
    assert opt.roles.dense_saved.numel() == 0  # no copy of the frozen table
    opt.second_step()
    sam = SAM(params, torch.optim.SGD, backend=backend, lr=0.1)
    sam.first_step()
    assert torch.equal(emb.weight, frozen) and sam.roles.dense_saved.numel() <= 8 * n_head
    sam.second_step()
    with pytest.raises(ValueError, match="no trainable parameter"):
        FSAM(emb.parameters(), torch.optim.SGD, backend=backend, lr=0.1)


@pytest.mark.parametrize("backend", ALL)
def test_misuse_raises_before_any_change(backend):
    model, opt = make(FSAM, backend, base=torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    with pytest.raises(RuntimeError, match="no gradients"):
        opt.step(lambda: None)
    with pytest.raises(RuntimeError, match="without first_step"):
        opt.second_step()
    loss_of(model, 0).backward()
    before = snapshot(model)
    model.bert.pooler.dense.weight.grad = model.bert.pooler.dense.weight.grad.to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.first_step()
    assert_bits_equal(snapshot(model), before)
    assert not opt.roles.perturbed and opt.mask_bits is None
    w = model.bert.pooler.dense.weight
    grad = w.grad.to_dense()
    w.grad = None
    try:
        if hasattr(w, "grad_dtype"):  # torch >= 2.14 refuses such a gradient unless told not to
            w.grad_dtype = None
        w.grad = grad.half()
    except RuntimeError:  # older torch refuses it outright: nothing can reach the optimizer
        pass
    else:
        with pytest.raises(RuntimeError, match="gradient is torch.float16"):
            opt.first_step()
        assert_bits_equal(snapshot(model), before)
    w.grad = grad.t().contiguous().t()  # same values, transposed strides
    opt.first_step()
    with pytest.raises(RuntimeError, match="twice"):
        opt.first_step()
    with pytest.raises(RuntimeError, match="perturbed"):
        opt.state_dict()
    with pytest.raises(RuntimeError, match="add_param_group.. between first_step"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))]})
    opt.second_step()
    with pytest.raises(RuntimeError, match="fisher='samples'"):
        opt.accumulate_fisher()


@pytest.mark.parametrize("backend", ALL)
def test_add_param_group(backend):
    """New parameters join at once: FSAM's pool and k grow, the next step builds the mask over
    both groups, the EMA Fisher of the old parameters is kept; SAM perturbs them densely; a refused
    group (a parameter already there, an unnamed one for a name-based pool) changes nothing."""
    device = backends.device_of(backend) or "cpu"
    torch.manual_seed(0)
    body, head = torch.nn.Linear(12, 8).to(device), torch.nn.Linear(8, 3).to(device)
    opt = FSAM(head.named_parameters(), torch.optim.SGD, sparsity=0.75, fisher="ema", mask_interval=100,
               backend=backend, lr=0.1, momentum=0.9)
    x = torch.randn(5, 12, device=device)

    def backward():
        opt.zero_grad()
        head(body(x)).square().sum().backward()
    backward()
    opt.first_step()
    opt.second_step()
    ema = [f.clone() for f in opt.perturbation.estimate]
    roles, k = opt.roles, opt.k
    with pytest.raises(ValueError, match="is parameter weight again"):
        opt.add_param_group({"params": [head.weight]})
    assert opt.roles is roles and opt.k == k and len(opt.param_groups) == 1 and len(opt._params) == 2
    opt.add_param_group({"params": list(body.named_parameters()), "lr": 0.01})
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.01] and opt.param_groups[1]["momentum"] == 0.9
    n = sum(p.numel() for p in [*head.parameters(), *body.parameters()])
    assert opt.k == n // 4 and opt.mask_bits is None  # the next step builds the mask over both
    assert all(torch.equal(a, b) for a, b in zip(opt.perturbation.estimate, ema))
    assert all(not f.any() for f in opt.perturbation.estimate[2:])
    backward()
    opt.first_step()
    assert sum(int(opt.mask_of(p).sum()) for p in [*head.parameters(), *body.parameters()]) == opt.k
    opt.second_step()
    restored = FSAM([{"params": list(head.named_parameters())}, {"params": list(body.named_parameters()), "lr": 0.01}],
                    torch.optim.SGD, sparsity=0.75, fisher="ema", mask_interval=100, backend=backend, lr=0.1,
                    momentum=0.9)
    restored.load_state_dict(opt.state_dict())  # the same layout as an optimizer built over both groups
    assert torch.equal(restored.mask_bits, opt.mask_bits)
    named = FSAM(head.named_parameters(), torch.optim.SGD, pool="fsam4plm", backend=backend, lr=0.1)
    with pytest.raises(ValueError, match="named_parameters"):
        named.add_param_group({"params": list(body.parameters())})
    assert len(named.param_groups) == 1 and len(named._params) == 2
    sam = SAM(head.parameters(), torch.optim.SGD, backend=backend, lr=0.1)
    sam.add_param_group({"params": list(body.parameters())})
    backward()
    before = [p.detach().clone() for p in body.parameters()]
    sam.first_step()
    assert all(not torch.equal(p, b) for p, b in zip(body.parameters(), before))
    sam.second_step()


def test_pac_tuning_refuses_add_param_group():
    from fsam_kernels import PACTuning
    opt = PACTuning(tiny_bert().parameters(), torch.optim.AdamW, num_examples=10, stage1_steps=1,
                    backend="reference", lr=1e-3)
    with pytest.raises(RuntimeError, match="add_param_group.. after construction is not supported"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))]})


def test_load_state_dict_checks_the_layout():
    model, opt = make(FSAM, "reference")
    train(model, opt, 1)
    state = opt.state_dict()
    other = tiny_bert()
    other.classifier = torch.nn.Linear(32, 5)
    wrong = FSAM(other.named_parameters(), torch.optim.AdamW, lr=1e-3)
    with pytest.raises(ValueError, match="layout"):
        wrong.load_state_dict(state)
    preset = FSAM(tiny_bert().named_parameters(), torch.optim.AdamW, lr=1e-3, pool="fsam4plm")
    with pytest.raises(ValueError, match="layout"):
        preset.load_state_dict(state)
    sam = SAM(tiny_bert().parameters(), torch.optim.AdamW, lr=1e-3)
    with pytest.raises(ValueError, match="FSAM"):
        sam.load_state_dict(state)
    ema = FSAM(tiny_bert().named_parameters(), torch.optim.AdamW, lr=1e-3, fisher="ema")
    with pytest.raises(ValueError, match="Fisher"):
        ema.load_state_dict(state)
    with pytest.raises(ValueError, match="state_dict"):
        opt.load_state_dict({"state": {}, "param_groups": []})


def test_param_groups_and_plain_tensors():
    model = tiny_bert()
    groups = [{"params": list(model.bert.parameters()), "lr": 1e-4},
              {"params": list(model.classifier.parameters()), "lr": 1e-2}]
    opt = FSAM(groups, torch.optim.AdamW, lr=1e-3, sparsity=0.5)
    train(model, opt, 2)
    assert [g["lr"] for g in opt.param_groups] == [1e-4, 1e-2]
    n = sum(p.numel() for p in model.parameters())
    assert opt.mask_density() == (n // 2) / n


GPU = [b for b, d in compiled_backends() if d == "cuda"]


@pytest.mark.skipif(not GPU, reason="needs a GPU backend")
@pytest.mark.parametrize("backend", GPU)
@pytest.mark.parametrize("cls", [FSAM, SAM])
def test_no_host_sync_outside_mask_steps(backend, cls):
    model, opt = make(cls, backend, mask_interval=100)
    train(model, opt, 1)  # the mask step (may sync once)
    for step in (opt.first_step, opt.second_step):  # the model's own forward/backward are not ours to check
        loss_of(model, 1).backward()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step(zero_grad=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
