"""SAM / ASAM on the fused kernels, and the machinery FSAM shares with it.

The shape is davda54/sam's: `SAM(params, base_optimizer_class, rho=..., **base_kwargs)`,
`first_step`, `second_step`, `step(closure)`, with `param_groups` shared with the base
optimizer so LR schedulers work on either object.
"""
import torch

from . import backends
from ._checks import check_number
from ._layout import ChunkLayout
from .ops import FLOAT_DTYPES, save_layout
from .params import param_groups_with_names


class SharpnessAwareOptimizer(torch.optim.Optimizer):
    """The two-pass step shared by SAM and FSAM.

    Parameters fall in three roles: the pool (perturbed where a packed mask says, FSAM only),
    the dense ones (perturbed everywhere) and the rest (counted in the norm, never perturbed).
    Between first_step and second_step only the original values of the perturbed entries are
    kept; second_step writes them back bit-exactly and runs the base optimizer.
    """

    def __init__(self, params, base_optimizer, *, rho, adaptive, eta, norm_eps, backend, base_kwargs):
        check_number("rho", rho, 0.0)
        check_number("eta", eta, 0.0)
        check_number("norm_eps", norm_eps, 0.0)
        if not callable(base_optimizer):
            raise TypeError(f"base_optimizer must be an optimizer class, got {type(base_optimizer).__name__}")
        groups, names = param_groups_with_names(params)
        super().__init__(groups, {})
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self.rho, self.adaptive, self.eta, self.norm_eps = float(rho), bool(adaptive), float(eta), float(norm_eps)
        self.renormalize = False
        self._params = [p for g in self.param_groups for p in g["params"]]
        self._names = names
        devices = {p.device for p in self._params}
        if len(devices) != 1:
            raise ValueError(f"all parameters must be on one device, got {sorted(map(str, devices))}")
        self._device = devices.pop()
        for i, p in enumerate(self._params):
            if p.dtype not in FLOAT_DTYPES:
                raise TypeError(f"parameter {self._name(i)} is {p.dtype}; float32, bfloat16 and float16 are supported")
            if not p.is_contiguous():
                raise ValueError(f"parameter {self._name(i)} is not contiguous; the kernels update it in place")
        self.backend = backends.resolve(backend, self._device)
        self._op = {name: backends.op(name, self.backend)
                    for name in ("grad_sumsq", "masked_perturb_", "masked_restore_", "topk_mask", "fisher_accumulate_")}
        self._perturbed = False
        self._first_finite = None  # first_step's finite flag while its second_step is pending
        # The pool's packed mask and the saved originals of its entries (FSAM builds them).
        self._mask_bits = self._pool_offsets = self._pool_saved = None
        self._skipped = torch.zeros((), dtype=torch.int64, device=self._device)
        self._step_count = 0

    def add_param_group(self, param_group):
        if hasattr(self, "_roles"):  # after construction: the roles, the mask layout and the base are fixed
            raise RuntimeError("add_param_group() after construction is not supported: build a new optimizer "
                               "over all the parameters")
        super().add_param_group(param_group)

    def _name(self, i):
        return self._names[i] if self._names[i] is not None else f"#{i}"

    def _set_roles(self, pool, dense, rest):
        """Split the parameters (by flat index) into pool, dense and rest: each subclass does it once
        in its constructor (the dense ones cost a full copy, so no provisional split)."""
        self._pool = [self._params[i] for i in pool]
        self._dense = [self._params[i] for i in dense]
        self._rest = [self._params[i] for i in rest]
        self._roles = {i: role for role, idx in (("pool", pool), ("dense", dense), ("rest", rest)) for i in idx}
        self._pool_layout = ChunkLayout(self._pool)
        # Dense perturbation keeps the original of every entry (what SAM costs).
        self._dense_offsets, self._dense_saved = save_layout(self._dense)

    # ---- the step -------------------------------------------------------------------------

    def _grads(self, tensors):
        """The gradients of `tensors`, checked before anything is written (every backend reads
        them as contiguous arrays of the parameter's dtype)."""
        grads = [p.grad for p in tensors]
        for i, (p, g) in enumerate(zip(tensors, grads)):
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError("sparse gradients are not supported by SAM/FSAM")
            if g.dtype != p.dtype or g.shape != p.shape:
                raise RuntimeError(f"a gradient is {g.dtype} {tuple(g.shape)} but its parameter is "
                                   f"{p.dtype} {tuple(p.shape)}")
            if not g.is_contiguous():
                grads[i] = g.contiguous()
        return grads

    def _sumsq(self, pool_grads, dense_grads, rest_grads):
        """Device tensor [sum of (T g)^2 over every gradient, the same over what is perturbed]."""
        op = self._op["grad_sumsq"]
        stats = torch.zeros(2, dtype=torch.float32, device=self._device)
        if self._pool and self._mask_bits is not None:
            stats += op(self._pool, pool_grads, self._mask_bits, self.adaptive, self.eta)
        elif self._pool:
            stats[0] += op(self._pool, pool_grads, None, self.adaptive, self.eta)[0]
        if self._dense:
            stats += op(self._dense, dense_grads, None, self.adaptive, self.eta)
        if self._rest:
            stats[0] += op(self._rest, rest_grads, None, self.adaptive, self.eta)[0]
        return stats

    def _before_perturb(self, pool_grads, dense_grads, rest_grads, stats, finite):
        """FSAM hooks its Fisher and mask work here; returns the (possibly updated) stats."""
        return stats

    @torch.no_grad()
    def first_step(self, zero_grad=False, scaler=None):
        """Perturb the weights to w + e (e = scale * m * T^2 g), keeping what restores them.

        scaler: the torch.amp.GradScaler that scaled the first backward: the gradients are
        unscaled in place first (`scaler.unscale_(self)`; the base optimizer's own unscale is
        left for the second pass), and an overflow counts in the scaler's next update().

        Returns a 0-dim bool device tensor: False when non-finite gradients skipped the
        perturbation (reading it syncs)."""
        if self._perturbed:
            raise RuntimeError("first_step() called twice: call second_step() to restore the weights first")
        if scaler is not None:
            scaler.unscale_(self)
        pool_grads, dense_grads, rest_grads = self._grads(self._pool), self._grads(self._dense), self._grads(self._rest)
        stats = self._sumsq(pool_grads, dense_grads, rest_grads)
        finite = torch.isfinite(stats[0])
        stats = self._before_perturb(pool_grads, dense_grads, rest_grads, stats, finite)
        norm = stats[1 if self.renormalize else 0].sqrt() + self.norm_eps
        scale = torch.where(finite & (norm > 0), self.rho / norm, torch.zeros_like(norm))
        op = self._op["masked_perturb_"]
        if self._mask_bits is not None:  # no mask yet (a postponed first mask step): the pool stays
            op(self._pool, pool_grads, self._mask_bits, self._pool_offsets, self._pool_saved, scale,
               self.adaptive, self.eta)
        if self._dense:
            op(self._dense, dense_grads, None, self._dense_offsets, self._dense_saved, scale, self.adaptive, self.eta)
        self._skipped += ~finite
        self._perturbed = True
        self._first_finite = finite
        self._step_count += 1
        if zero_grad:
            self.zero_grad()
        return finite

    @torch.no_grad()
    def restore(self):
        """Put back the exact weights of before first_step() without the base step, for loops
        where the base step comes later or may be skipped (the Trainer's GradScaler, clipping of
        the second-pass gradient); second_step() then takes only the base step."""
        if not self._perturbed:
            raise RuntimeError("restore() called without first_step(), or twice")
        self._restore()

    @torch.no_grad()
    def second_step(self, zero_grad=False, scaler=None):
        """Restore the exact weights of before first_step (unless restore() already did), then
        run the base optimizer with the gradients now in .grad (those at the perturbed point).

        scaler: the GradScaler that scaled the second backward: the base step goes through
        `scaler.step(self.base_optimizer)`, and is skipped, like GradScaler skips it, when either
        pass overflowed.  Call scaler.update() afterwards as usual."""
        if self._first_finite is None:
            raise RuntimeError("second_step() called without first_step()")
        if self._perturbed:
            self._restore()
        if scaler is None:
            self.base_optimizer.step()
        elif bool(self._first_finite):  # one sync, as GradScaler.step's own
            scaler.step(self.base_optimizer)
        self._first_finite = None
        self._opt_called = True  # what LR schedulers check for "optimizer.step() came first"
        if zero_grad:
            self.zero_grad()

    def _restore(self):
        op = self._op["masked_restore_"]
        # The mask cannot change while perturbed (update_mask refuses): it is the one first_step used.
        if self._mask_bits is not None:
            op(self._pool, self._mask_bits, self._pool_offsets, self._pool_saved)
        if self._dense:
            op(self._dense, None, self._dense_offsets, self._dense_saved)
        self._perturbed = False

    def step(self, closure=None):
        """davda54/sam's step: the gradients of a first forward/backward must be in .grad;
        `closure` runs the second forward/backward (at the perturbed weights).  Returns its loss."""
        if closure is None:
            raise ValueError("SAM-type optimizers need a closure that does a full forward and backward: "
                             "step(closure), or call first_step() and second_step() yourself")
        if all(p.grad is None for p in self._params):
            raise RuntimeError("no gradients: run the first forward/backward before step(closure)")
        self.first_step(zero_grad=True)
        try:
            with torch.enable_grad():
                loss = closure()
        except BaseException:
            with torch.no_grad():
                self._restore()  # leave the model as it was, not perturbed
            raise
        self.second_step()
        return loss

    def zero_grad(self, set_to_none=True):
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    @property
    def skipped_perturbations(self):
        """How many steps skipped the perturbation for non-finite gradients (syncs)."""
        return int(self._skipped)

    # ---- state -----------------------------------------------------------------------------

    def _layout_signature(self):
        return [(self._roles[i], tuple(p.shape), str(p.dtype)) for i, p in enumerate(self._params)]

    def _extra_state(self):
        return {"step": self._step_count, "skipped": self._skipped.clone()}

    def _check_extra_state(self, extra):
        pass

    def _load_extra_state(self, extra):
        self._step_count = int(extra["step"])
        self._skipped = extra["skipped"].to(self._device, torch.int64).clone()

    def state_dict(self):
        if self._perturbed:
            raise RuntimeError("state_dict() between first_step() and second_step(): the weights are perturbed")
        extra = self._extra_state()
        extra["layout"] = self._layout_signature()
        extra["type"] = type(self).__name__
        return {"base": self.base_optimizer.state_dict(), "sharpness": extra}

    def load_state_dict(self, state_dict):
        if not isinstance(state_dict, dict) or set(state_dict) != {"base", "sharpness"}:
            raise ValueError("load_state_dict expects a dict made by SAM/FSAM.state_dict() (keys 'base', 'sharpness')")
        if self._perturbed:
            raise RuntimeError("load_state_dict() between first_step() and second_step()")
        extra = state_dict["sharpness"]
        if extra.get("type") != type(self).__name__:
            raise ValueError(f"this state comes from {extra.get('type')}, not {type(self).__name__}")
        if extra.get("layout") != self._layout_signature():
            raise ValueError("this state was saved for a different parameter layout (roles, shapes or dtypes differ)")
        self._check_extra_state(extra)
        self.base_optimizer.load_state_dict(state_dict["base"])
        self.param_groups = self.base_optimizer.param_groups  # the base replaced its group dicts
        self._load_extra_state(extra)
        self._first_finite = None  # a loaded state starts a new step


class SAM(SharpnessAwareOptimizer):
    """SAM (Foret et al., 2021), or ASAM (Kwon et al., 2021) with adaptive=True: every
    parameter with a gradient is perturbed by rho * T^2 g / ||T g||."""

    def __init__(self, params, base_optimizer, *, rho=0.05, adaptive=False, eta=0.0, norm_eps=1e-12,
                 backend="auto", **base_kwargs):
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, eta=eta, norm_eps=norm_eps,
                         backend=backend, base_kwargs=base_kwargs)
        self._set_roles(pool=[], dense=list(range(len(self._params))), rest=[])
