"""What the kernels are measured against (docs/algorithm.md, "What is measured against what"):
the published code's eager way, and the best of plain PyTorch.  Each is written as its authors' code does it, not improved."""
import torch


# ---- kernel families: each function takes lists and does one family's work ----------------

def fisher_eager(F, G, decay, alpha):
    """Per-parameter loop, as the published code accumulates squared gradients."""
    for f, g in zip(F, G):
        f.mul_(decay).addcmul_(g, g, value=alpha)


def fisher_foreach(F, G, decay, alpha):
    torch._foreach_mul_(F, decay)
    torch._foreach_addcmul_(F, G, G, value=alpha)


def topk_published(S, k):
    """torch.cat + torch.topk + scatter into a float mask as large as the model (official FSAM)."""
    scores = torch.cat([s.reshape(-1).abs() for s in S])
    idx = torch.topk(scores, k, sorted=False).indices
    flat = torch.zeros_like(scores)
    flat[idx] = 1.0
    return [m.view_as(s) for m, s in zip(flat.split([s.numel() for s in S]), S)]


def topk_kthvalue(S, k):
    """The cheapest plain-PyTorch route: k-th value threshold on the concatenation, then a
    comparison per tensor (ties at the threshold are all taken: not exact k)."""
    scores = torch.cat([s.reshape(-1).abs() for s in S])
    threshold = torch.kthvalue(scores, scores.numel() - k + 1).values
    return [s.abs() >= threshold for s in S]


def clip_published(P, max_norm):
    """Component-wise clipping as the official code does it (yangalan123/FineTuningStability): one
    torch.nn.utils.clip_grad_norm_ call per parameter tensor."""
    for p in P:
        torch.nn.utils.clip_grad_norm_([p], max_norm)


def clip_foreach(G, max_norm):
    """The best of plain PyTorch: every norm in one _foreach_norm, the factors as a tensor, one
    _foreach_mul_ (no host sync)."""
    norms = torch.stack(torch._foreach_norm(G))
    factors = torch.clamp(max_norm / (norms + 1e-6), max=1.0)
    torch._foreach_mul_(G, list(factors.unbind()))


def perturb_published(P, G, masks, rho):
    """davda54/sam's norm, official FSAM's masked e_w, kept for second_step."""
    norm = torch.norm(torch.stack([g.norm(p=2) for g in G]), p=2)
    scale = rho / (norm + 1e-12)
    saved = []
    for p, g, m in zip(P, G, masks):
        e_w = g * scale * m
        p.add_(e_w)
        saved.append(e_w)
    return saved


def restore_published(P, saved):
    for p, e_w in zip(P, saved):
        p.sub_(e_w)


def pac_noise_published(P, S):
    """PAC-tuning's official noise injection: clamped normals and their scaled copies stored (2 N
    floats), then w += exp(p) eps."""
    noises, scaled = [], []
    for p, s in zip(P, S):
        eps = torch.clip(torch.randn(p.shape, device=p.device), min=-2, max=2)
        noises.append(eps)
        scaled.append(torch.exp(s) * eps)
        p.add_(scaled[-1])
    return noises, scaled


def pac_restore_published(P, scaled):
    """Its removal: a deep copy of the scaled noise, then w -= it (not exact)."""
    import copy
    for p, n in zip(P, copy.deepcopy(scaled)):
        p.sub_(n)


def pac_round_trip_foreach(P, S, old):
    """The same with foreach ops and an exact restore from a full copy of the weights."""
    torch._foreach_copy_(old, P)
    eps = [torch.randn(p.shape, device=p.device) for p in P]
    torch._foreach_clamp_min_(eps, -2.0)
    torch._foreach_clamp_max_(eps, 2.0)
    torch._foreach_mul_(eps, torch._foreach_exp(S))
    torch._foreach_add_(P, eps)
    torch._foreach_copy_(P, old)


def perturb_foreach(P, G, masks, rho, old):
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(G)))
    scale = rho / (norm + 1e-12)
    torch._foreach_copy_(old, P)
    e = torch._foreach_mul(G, scale)
    torch._foreach_mul_(e, masks)
    torch._foreach_add_(P, e)


def restore_foreach(P, old):
    torch._foreach_copy_(P, old)


# ---- whole optimizers of the published code, for the step benchmark --------------------------

class PublishedSAM(torch.optim.Optimizer):
    """davda54/sam's SAM: a full copy `old_p` of every parameter between the two passes."""

    def __init__(self, params, base_optimizer, rho=0.05, **kwargs):
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    def _params(self):
        return [p for g in self.param_groups for p in g["params"] if p.grad is not None]

    @torch.no_grad()
    def first_step(self):
        grad_norm = torch.norm(torch.stack([p.grad.norm(p=2) for g in self.param_groups for p in g["params"]
                                            if p.grad is not None]), p=2)
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                p.add_(p.grad * scale.to(p))

    @torch.no_grad()
    def second_step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data = self.state[p]["old_p"]
        self.base_optimizer.step()


class _PublishedMasked(PublishedSAM):
    """What the published sparse-SAM codes share: a dense float mask rebuilt every
    `mask_interval` steps, and the norm-and-scale of their first step."""

    def __init__(self, params, base_optimizer, rho=0.05, sparsity=0.9, mask_interval=100, **kwargs):
        super().__init__(params, base_optimizer, rho=rho, **kwargs)
        self.sparsity, self.mask_interval, self.steps = sparsity, mask_interval, 0

    def _scale(self, params):
        if self.steps % self.mask_interval == 0:
            self.build_mask()
        self.steps += 1
        grad_norm = torch.norm(torch.stack([p.grad.norm(p=2) for p in params]), p=2)
        return self.param_groups[0]["rho"] / (grad_norm + 1e-7)


class PublishedFSAM(_PublishedMasked):
    """The official FSAM code's step: F = g*g of the batch, torch.cat + torch.topk, a dense float
    mask per parameter, e_w stored per parameter (its zero_grad defect left out)."""

    @torch.no_grad()
    def build_mask(self):
        params = self._params()
        fisher = torch.cat([(p.grad * p.grad).reshape(-1) for p in params])
        k = int((1 - self.sparsity) * fisher.numel())
        idx = torch.topk(fisher, k).indices
        flat = torch.zeros_like(fisher)
        flat[idx] = 1.0
        for p, m in zip(params, flat.split([p.numel() for p in params])):
            self.state[p]["mask"] = m.view_as(p).clone()

    @torch.no_grad()
    def first_step(self):
        params = self._params()
        scale = self._scale(params)
        for p in params:
            e_w = p.grad * scale * self.state[p]["mask"]
            p.add_(e_w)
            self.state[p]["e_w"] = e_w

    @torch.no_grad()
    def second_step(self):
        for p in self._params():
            p.sub_(self.state[p]["e_w"])
        self.base_optimizer.step()


class PublishedSSAMF(_PublishedMasked):
    """SSAM-F's step (Mi et al., 2022): Fisher summed over N_F per-sample gradients into a dict,
    torch.cat + sort for the threshold, a dense float mask, and `old_p` copies."""

    def __init__(self, params, base_optimizer, num_samples=4, **kwargs):
        super().__init__(params, base_optimizer, **kwargs)
        self.num_samples = num_samples

    @torch.no_grad()
    def build_mask(self):
        # The per-sample backward passes are the user's cost; here the same gradient stands in.
        params = self._params()
        fisher = {p: torch.zeros_like(p) for p in params}
        for _ in range(self.num_samples):
            for p in params:
                fisher[p] += torch.square(p.grad)
        flat = torch.cat([torch.flatten(f) for f in fisher.values()])
        keep = int(len(flat) * (1 - self.sparsity))
        _, idx = torch.sort(flat, descending=True)
        threshold = flat[idx[keep - 1]] if keep > 0 else float("inf")
        for p in params:
            self.state[p]["mask"] = (fisher[p] >= threshold).float()

    @torch.no_grad()
    def first_step(self):
        params = self._params()
        scale = self._scale(params)
        for p in params:
            self.state[p]["old_p"] = p.data.clone()
            p.add_(p.grad * scale * self.state[p]["mask"])

    @torch.no_grad()
    def second_step(self):
        for p in self._params():
            p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
