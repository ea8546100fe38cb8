"""SAM / ASAM on the fused kernels: the perturbation rho * T^2 g / ||T g||, and the SAM optimizer
(the two-pass protocol of two_pass.py over densely perturbed parameters)."""
from typing import Any, Optional

import torch
from torch.optim.optimizer import ParamsT

from .._checks import check_number
from .perturbation import SUMSQ_ALL, SUMSQ_PERTURBED, Perturbation
from .two_pass import SharpnessAwareOptimizer

__all__ = ["SAM", "SharpnessScale", "SharpnessAwareOptimizer"]


class SharpnessScale(Perturbation):
    """e = rho * T^2 g / (||T g|| + norm_eps), T = |w| + eta with adaptive=True (ASAM) else 1; the
    norm over every gradient, or over the perturbed entries only with renormalize=True.  Non-finite
    gradients give e = 0 (the step is counted as skipped)."""

    def __init__(self, *, rho, adaptive, eta, norm_eps, renormalize=False):
        check_number("rho", rho, 0.0)
        check_number("eta", eta, 0.0)
        check_number("norm_eps", norm_eps, 0.0)
        self.rho, self.adaptive, self.eta, self.norm_eps = float(rho), bool(adaptive), float(eta), float(norm_eps)
        self.renormalize = bool(renormalize)

    def scale(self, stats, finite):
        norm = stats[SUMSQ_PERTURBED if self.renormalize else SUMSQ_ALL].sqrt() + self.norm_eps
        return torch.where(finite & (norm > 0), self.rho / norm, torch.zeros_like(norm))


class SAM(SharpnessAwareOptimizer):
    """SAM (Foret et al., 2021), or ASAM (Kwon et al., 2021) with adaptive=True: every
    parameter with a gradient is perturbed by rho * T^2 g / ||T g||.  Parameters frozen at
    construction (requires_grad=False) are never perturbed, and no copy of them is kept."""

    def __init__(self, params: ParamsT, base_optimizer: type[torch.optim.Optimizer], *, rho: float = 0.05,
                 adaptive: bool = False, eta: float = 0.0, norm_eps: float = 1e-12, backend: Optional[str] = "auto",
                 **base_kwargs: Any):
        scale = SharpnessScale(rho=rho, adaptive=adaptive, eta=eta, norm_eps=norm_eps)
        super().__init__(params, base_optimizer, backend=backend, base_kwargs=base_kwargs)
        self._compose(self._plan_roles(), scale)

    def _plan_roles(self):
        return ["dense" if p.requires_grad else "norm_only" for p in self._params]

    def _apply_roles(self, plan):
        self._compose(plan, self.perturbation)
