"""PACTuning: determinism, exact restore, resume, the fused stage-1 gradients against autograd in
float64, the stage switch, and its errors."""
import copy
import math

import pytest
import torch

from fsam_kernels import backends, reference
from fsam_kernels.optim.pac import KTable, PACTuning, estimate_k
from conftest import all_backends

# every backend that runs here, on its device (Triton on CPU tensors under the interpreter)
BACKENDS = pytest.mark.parametrize("backend,device", all_backends())
K_TABLE = KTable([math.exp(-6), math.exp(-4), math.exp(-2)], [0.01, 0.03, 0.2])


class Net(torch.nn.Module):
    def __init__(self, seed=0, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(11, 6)
        self.hidden = torch.nn.Linear(18, 33)
        self.head = torch.nn.Linear(33, 3)
        self.to(dtype)

    def forward(self, x):
        return self.head(torch.tanh(self.hidden(self.embed(x).flatten(1))))


def data(seed=1, n=24, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 11, (n, 3), generator=g).to(device), torch.randint(0, 3, (n,), generator=g).to(device)


def make(model, backend="reference", stage1_steps=3, **kw):
    kw.setdefault("lr", 1e-2)
    return PACTuning(model.named_parameters(), torch.optim.AdamW, num_examples=24, stage1_steps=stage1_steps,
                     backend=backend, k_table=K_TABLE, **kw)


def train(model, opt, steps, x, y):
    losses = []
    for _ in range(steps):
        def closure():
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            loss.backward()
            return loss
        losses.append(float(opt.step(closure).detach()))
        opt.zero_grad()
    return losses


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


@BACKENDS
def test_same_seed_same_run_and_stage_switch(backend, device):
    x, y = data(device=device)
    runs = []
    for _ in range(2):
        model = Net().to(device)
        opt = make(model, backend)
        assert opt.stage == 1 and not model.embed.weight.requires_grad  # embeddings frozen by default
        losses = train(model, opt, 5, x, y)
        assert opt.stage == 2 and opt.anchors is None and opt.noise_optimizer is None
        runs.append((losses, weights(model), [s.clone() for s in opt.log_stds]))
    assert runs[0][0] == runs[1][0]
    for a, b in zip(runs[0][1] + runs[0][2], runs[1][1] + runs[1][2]):
        assert torch.equal(a, b)
    other = Net().to(device)
    train(other, make(other, backend, seed=1), 5, x, y)
    assert not all(torch.equal(a, b) for a, b in zip(weights(other), runs[0][1]))


@BACKENDS
def test_log_stds_freeze_in_stage2(backend, device):
    x, y = data(device=device)
    model = Net().to(device)
    opt = make(model, backend, stage1_steps=2)
    start = [s.clone() for s in opt.log_stds]
    train(model, opt, 2, x, y)
    learned = [s.clone() for s in opt.log_stds]
    assert not all(torch.equal(a, b) for a, b in zip(start, learned))
    before = weights(model)
    train(model, opt, 2, x, y)
    assert all(torch.equal(a, b) for a, b in zip(learned, opt.log_stds))
    assert not all(torch.equal(a, b) for a, b in zip(before, weights(model)))  # stage 2 still trains w


@BACKENDS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_restore_is_bit_exact(backend, device, dtype):
    x, y = data(device=device)
    model = Net(dtype=dtype).to(device)
    opt = make(model, backend)
    for _ in range(4):
        before = weights(model)
        opt.perturb()
        assert not all(torch.equal(a, b) for a, b in zip(before, weights(model)))
        assert opt.held_bytes() > 0
        torch.nn.functional.cross_entropy(model(x).float(), y).backward()
        opt.restore()
        for a, b in zip(before, weights(model)):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        opt.step()
        opt.zero_grad()


@BACKENDS
def test_resume_equals_uninterrupted(backend, device):
    x, y = data(device=device)
    model = Net().to(device)
    opt = make(model, backend, stage1_steps=4)
    whole = train(model, opt, 6, x, y)
    for cut in (2, 5):  # in stage 1, in stage 2
        model = Net().to(device)
        opt = make(model, backend, stage1_steps=4)
        first = train(model, opt, cut, x, y)
        saved_model = copy.deepcopy(model.state_dict())
        saved_opt = copy.deepcopy(opt.state_dict())
        model = Net(seed=5).to(device)  # other weights: the checkpoint must restore everything
        model.load_state_dict(saved_model)
        opt = make(model, backend, stage1_steps=4)
        opt.load_state_dict(saved_opt)
        assert first + train(model, opt, 6 - cut, x, y) == whole


def test_stage1_gradients_against_autograd():
    """The fused gradients of p, b and w equal autograd of loss(w + e^p eps) + bound in float64."""
    torch.set_default_dtype(torch.float64)
    try:
        _check_against_autograd()
    finally:
        torch.set_default_dtype(torch.float32)


def _check_against_autograd():
    x, y = data()
    model = Net().float()
    opt = make(model, "reference", noise_lr=0.0, lr=0.0)
    with torch.no_grad():  # move w off the anchors so that the regulariser is not zero
        for p in opt._params:
            p.add_(0.01 * torch.randn(p.shape))
    params, names = opt._params, opt._names
    w = [p.detach().double().requires_grad_() for p in params]
    s = [t.double().requires_grad_() for t in opt.log_stds]
    b = torch.cat(opt.prior_log_stds).double().requires_grad_()
    bases = [0] + list(torch.tensor([p.numel() for p in params]).cumsum(0)[:-1].tolist())
    eps = [reference.pac_noise(p.numel(), t, base, opt.seed, 0, 2.0, "cpu")[0].double().reshape(p.shape)
           for p, t, base in zip(params, opt.log_stds, bases)]
    noisy = {n: wi + torch.exp(si) * e for n, wi, si, e in zip(names, w, s, eps)}
    frozen = {n: p.double() for n, p in model.named_parameters() if n not in noisy}
    loss = torch.nn.functional.cross_entropy(torch.func.functional_call(model.double(), {**noisy, **frozen}, (x,)), y)
    model.float()
    t = torch.tensor([p.numel() for p in params], dtype=torch.float64)
    anchors = [a.double() for a in opt.anchors]
    sq = torch.stack([(torch.exp(2 * si)).sum() for si in s])
    dd = torch.stack([((wi - a) ** 2).sum() for wi, a in zip(w, anchors)])
    kl = 0.5 * ((torch.exp(-2 * b) * (sq + dd)).sum() - 2 * sum(si.sum() for si in s) + (2 * b * t).sum() - t.sum())
    xk = torch.exp(b.mean())
    grid, values = K_TABLE.grid, K_TABLE.values
    at = float(xk.detach())
    i = max(j for j in range(len(grid) - 1) if grid[j] <= at or j == 0)
    assert grid[0] <= at  # on a segment, where K has a slope
    k = values[i] + (values[i + 1] - values[i]) / (grid[i + 1] - grid[i]) * (xk - grid[i])
    assert abs(float(k.detach()) - float(K_TABLE(xk.detach())[0])) < 1e-12
    n_gamma = 24 * 10.0
    bound = 1.5 * k * k * 10.0 + (kl + 10 + 3 * len(params)) / n_gamma
    loss_grads = torch.autograd.grad(loss, w + s, retain_graph=True)
    bound_grads = torch.autograd.grad(bound, w + s + [b])
    # the optimizer's step 0 at fp32, with the same eps
    opt.perturb()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.restore()
    assert abs(float(opt._bound) - float(bound.detach())) < 1e-6 * float(bound.detach())
    for i, p in enumerate(params):
        want_w = loss_grads[i] + bound_grads[i]
        assert torch.allclose(p.grad.double(), want_w, rtol=1e-4, atol=1e-7), names[i]
        want_s = loss_grads[len(w) + i] + bound_grads[len(w) + i]
        assert torch.allclose(opt.log_stds[i].grad.double(), want_s, rtol=1e-4, atol=1e-7), names[i]
    got_b = torch.cat([g.grad for g in opt.prior_log_stds]).double()
    assert torch.allclose(got_b, bound_grads[-1], rtol=1e-5, atol=1e-9)
    # the KL against a direct float64 computation, through bound()
    assert abs(float(opt.bound()) - float(bound.detach())) < 1e-6 * float(bound.detach())
    opt.step()


def test_k_table_and_estimate():
    table = KTable([0.1, 0.2, 0.4], [1.0, 2.0, 2.5])
    for xv, want, slope in ((0.05, 1.0, 0.0), (0.15, 1.5, 10.0), (0.3, 2.25, 2.5), (0.6, 3.0, 2.5)):
        k, d = table(torch.tensor(xv, dtype=torch.float64))
        assert abs(float(k) - want) < 1e-12 and abs(float(d) - slope) < 1e-12
    model = Net()
    x, y = data()

    def losses(m, batch):
        return torch.nn.functional.cross_entropy(m(batch[0]), batch[1], reduction="none")

    before = weights(model)
    est = estimate_k(model, losses, [(x[:12], y[:12]), (x[12:], y[12:])], samples=3, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, weights(model)))  # restored exactly
    assert len(est.values) == 8 and all(b >= a for a, b in zip(est.values, est.values[1:]))
    assert est.values[-1] > 0
    with pytest.raises(ValueError, match="prior_grid is empty"):
        estimate_k(model, losses, [(x, y)], prior_grid=[], progress=False)


def test_errors():
    model = Net()
    with pytest.raises(ValueError, match="num_examples must be >= 1"):
        PACTuning(model.parameters(), torch.optim.SGD, num_examples=0, stage1_steps=1, lr=0.1)
    with pytest.raises(ValueError, match="gamma must be finite and > 0"):
        PACTuning(model.parameters(), torch.optim.SGD, num_examples=1, stage1_steps=1, gamma=0.0, lr=0.1)
    with pytest.raises(TypeError, match="float64"):
        PACTuning(Net(dtype=torch.float64).parameters(), torch.optim.SGD, num_examples=1, stage1_steps=1, lr=0.1)
    opt = make(model)
    with pytest.raises(RuntimeError, match="step\\(\\) without perturb"):
        opt.step()
    opt.perturb()
    with pytest.raises(RuntimeError, match="perturb\\(\\) called twice"):
        opt.perturb()
    no_k = PACTuning(Net().parameters(), torch.optim.SGD, num_examples=1, stage1_steps=1, lr=0.1)
    with pytest.raises(RuntimeError, match="K table"):
        no_k.perturb()


@BACKENDS
def test_non_finite_gradients_skip_the_update(backend, device):
    x, y = data(device=device)
    for stage1_steps in (5, 0):
        model = Net().to(device)
        opt = make(model, backend, stage1_steps=stage1_steps)
        train(model, opt, 1, x, y)
        before = weights(model)
        stds = [s.clone() for s in opt.log_stds]
        opt.perturb()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        model.hidden.weight.grad[0, 0] = float("inf")
        opt.step()
        assert opt.skipped_steps == 1
        assert all(torch.equal(a, b) for a, b in zip(before, weights(model)))
        assert all(torch.equal(a, b) for a, b in zip(stds, opt.log_stds))


def test_cpu_run_close_to_reference():
    if "cpu" not in backends.available_backends():
        pytest.skip("the C++ extension is not built")
    x, y = data()
    results = []
    for backend in ("reference", "cpu"):
        model = Net()
        results.append((train(model, make(model, backend), 4, x, y), weights(model)))
    assert all(abs(a - b) < 1e-4 for a, b in zip(results[0][0], results[1][0]))
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.allclose(a, b, atol=1e-4)
