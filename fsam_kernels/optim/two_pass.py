"""The two-pass step of the sharpness-aware optimizers: first pass, perturbation, second pass,
exact restore, base step, with the GradScaler, closure, state and LR-scheduler conventions.  Kept
apart from it: the base optimizer, param groups, hooks and transactional state of every composed
optimizer (`ComposedOptimizer`, composed.py), the parameter roles and saved buffers
(`ParamRoles`, perturbation.py), and what decides the perturbation (a `Perturbation`: SAM/ASAM's
scale in sam.py, FSAM's Fisher mask in fsam.py).

The shape is davda54/sam's: `first_step`, `second_step`, `step(closure)`.
"""
from collections.abc import Callable
from typing import Any, Optional

import torch
from torch.optim.optimizer import ParamsT

from .. import backends
from .._checks import check_not_skipped
from ..sharding import local
from .composed import ComposedOptimizer, check_params
from .micro_batches import sharpness_passes
from .param_groups import param_groups_with_names
from .perturbation import SUMSQ_ALL, ParamRoles


def unscaled_already(scaler, optimizer):
    """Whether scaler.unscale_(optimizer) ran since the scaler's last update() (GradScaler.step's
    own test, on its per-optimizer record)."""
    from torch.amp.grad_scaler import OptState
    return scaler.is_enabled() and scaler._per_optimizer_states[id(optimizer)]["stage"] is OptState.UNSCALED


class SharpnessAwareOptimizer(ComposedOptimizer):
    """The two-pass protocol over ParamRoles and a Perturbation (subclasses choose both in their
    constructor: `_compose`)."""

    training_passes = staticmethod(sharpness_passes)  # what a training loop runs before the base step

    def __init__(self, params: ParamsT, base_optimizer: type[torch.optim.Optimizer], *, backend: Optional[str],
                 base_kwargs: dict[str, Any]):
        super().__init__(*param_groups_with_names(params), base_optimizer, base_kwargs)
        self.backend = backends.resolve(backend, self._device)
        self._first_finite = None  # first_step's finite flag while its second_step is pending
        self._skipped = torch.zeros((), dtype=torch.int64, device=self._device)
        self._step_count = 0
        self._in_step = False  # inside step(closure), whose wrapper runs the step hooks
        self._step_snapshot = None  # step(closure)'s snapshot, which its first_step shares

    def _compose(self, role_of, perturbation):
        """Fix the roles (one per parameter, fsam_kernels/optim/perturbation.py) and the perturbation policy
        (again after add_param_group): the dense role costs a full copy, so no provisional split."""
        self.roles = ParamRoles(self._params, role_of, self.backend, self._device, self._sharding)
        self.perturbation = perturbation

    def _plan_roles(self):
        """The roles (and what else the policy needs) of self._params, without changing anything:
        raises if they cannot be given (subclasses)."""
        raise NotImplementedError

    def _apply_roles(self, plan):
        """Take _plan_roles()'s plan after add_param_group (subclasses)."""
        raise NotImplementedError

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch.optim's add_param_group: the base optimizer gets the group (its defaults filled in,
        a parameter already there refused), and the new parameters take their roles at once (for
        FSAM: they join the pool and k grows, and the next step builds a new mask)."""
        if not hasattr(self, "roles"):  # Optimizer.__init__ adding the constructor's groups
            return super().add_param_group(param_group)
        if self.roles.perturbed:
            raise RuntimeError("add_param_group() between first_step() and second_step()")
        (group,), names = param_groups_with_names([param_group])
        params, names = self._params + list(group["params"]), self._names + names
        sharding = check_params(params, names, self._device, first=len(self._params))
        before = self._params, self._names, self._sharding, self._locals
        self._params, self._names, self._sharding = params, names, sharding
        self._locals = [local(p) for p in params]
        try:
            plan = self._plan_roles()
            self.base_optimizer.add_param_group(group)  # param_groups is the base's list: it grows there
        except BaseException:
            self._params, self._names, self._sharding, self._locals = before  # a refused group changes nothing
            raise
        self._apply_roles(plan)

    @property
    def rho(self) -> float:
        return self.perturbation.rho

    @property
    def adaptive(self) -> bool:
        return self.perturbation.adaptive

    # ---- the step -------------------------------------------------------------------------

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, scaler: Optional[torch.amp.GradScaler] = None) -> torch.Tensor:
        """Perturb the weights to w + e, keeping what restores them.

        scaler: the torch.amp.GradScaler that scaled the first backward: the gradients are
        unscaled in place first (`scaler.unscale_(self)`, unless it ran since the scaler's last
        update(): by the caller, or by a first_step that raised after it, as GradScaler.step
        does; the base optimizer's own unscale is left for the second pass), and an overflow
        counts in the scaler's next update().

        Returns a 0-dim bool device tensor: False when non-finite gradients skipped the
        perturbation (reading it syncs)."""
        if self.roles.perturbed:
            raise RuntimeError("first_step() called twice: call second_step() to restore the weights first")
        self._step_hooks(pre=True)
        if scaler is not None and not unscaled_already(scaler, self):
            scaler.unscale_(self)
        before = self._step_snapshot if self._in_step else self._snapshot()  # step()'s: the same, taken once
        try:
            policy = self.perturbation
            grads = self.roles.gradients()
            stats = self.roles.sumsq(grads, policy.adaptive, policy.eta)
            finite = torch.isfinite(stats[SUMSQ_ALL])
            if policy.prepare(self.roles, grads, finite):
                stats = self.roles.sumsq(grads, policy.adaptive, policy.eta)
            self.roles.perturb(grads, policy.scale(stats, finite), policy.adaptive, policy.eta)
        except BaseException:
            self._rollback(before)
            raise
        self._skipped = self._skipped + ~finite
        self._first_finite = finite
        self._step_count += 1
        if zero_grad:
            self.zero_grad()
        return finite

    def _snapshot(self):
        """What a step changes besides the weights (which the roles restore), by reference."""
        return self._step_count, self._skipped, self._first_finite, self.roles.mask_state(), \
            self.perturbation.snapshot()

    @torch.no_grad()
    def _rollback(self, snapshot):
        """After an exception inside a step: the weights and the state as they were before it."""
        if self.roles.perturbed:
            self.roles.restore()
        self._step_count, self._skipped, self._first_finite, mask, policy = snapshot
        self.roles.set_mask_state(mask)
        self.perturbation.rollback(policy)

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the exact weights of before first_step() without the base step, for loops
        where the base step comes later or may be skipped (the Trainer's GradScaler, clipping of
        the second-pass gradient); second_step() then takes only the base step."""
        if not self.roles.perturbed:
            raise RuntimeError("restore() called without first_step(), or twice")
        self.roles.restore()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, scaler: Optional[torch.amp.GradScaler] = None) -> None:
        """Restore the exact weights of before first_step (unless restore() already did), then
        run the base optimizer with the gradients now in .grad (those at the perturbed point).

        scaler: the GradScaler that scaled the second backward: the base step goes through
        `scaler.step(self.base_optimizer)`, and is skipped, like GradScaler skips it, when either
        pass overflowed.  Call scaler.update() afterwards as usual."""
        if self._first_finite is None:
            raise RuntimeError("second_step() called without first_step()")
        if self.roles.perturbed:
            self.roles.restore()
        self._base_step(scaler, skip=None if scaler is None else ~self._first_finite)
        self._first_finite = None
        if zero_grad:
            self.zero_grad()
        self._step_hooks(pre=False)

    def _step_hooks(self, pre):
        """torch.optim's step pre-hooks (global, then this optimizer's) or post-hooks, once per
        optimizer step: step(closure) runs them through torch's wrapper; first_step() and
        second_step() called by hand run the pre-hooks at the first and the post-hooks at the
        second.  Hooks get (optimizer, (), {})."""
        if self._in_step:
            return
        from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks
        if pre:
            for hook in [*_global_optimizer_pre_hooks.values(), *self._optimizer_step_pre_hooks.values()]:
                if hook(self, (), {}) is not None:
                    raise RuntimeError("a step pre-hook that returns new arguments needs step(closure): "
                                       "first_step() takes none")
        else:
            for hook in [*self._optimizer_step_post_hooks.values(), *_global_optimizer_post_hooks.values()]:
                hook(self, (), {})

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """davda54/sam's step: the gradients of a first forward/backward must be in .grad;
        `closure` runs the second forward/backward (at the perturbed weights).  Returns its loss."""
        if closure is None:
            raise ValueError("SAM-type optimizers need a closure that does a full forward and backward: "
                             "step(closure), or call first_step() and second_step() yourself")
        if all(p.grad is None for p in self._params):
            raise RuntimeError("no gradients: run the first forward/backward before step(closure)")
        self._in_step = True
        before = self._step_snapshot = self._snapshot()
        try:
            self.first_step(zero_grad=True)
            try:
                with torch.enable_grad():
                    loss = closure()
            except BaseException:
                self._rollback(before)  # the weights and the optimizer as before the step
                raise
            self.second_step()
        finally:
            self._in_step, self._step_snapshot = False, None
        return loss

    @property
    def skipped_perturbations(self) -> int:
        """How many steps skipped the perturbation for non-finite gradients (syncs)."""
        return int(self._skipped)

    # ---- state -----------------------------------------------------------------------------

    STATE_KEY = "sharpness"
    MADE_BY = "SAM/FSAM"
    LAYOUT_PARTS = "roles, shapes or dtypes"

    def _check_between_steps(self, call):
        if self.roles.perturbed:
            raise RuntimeError(f"{call} between first_step() and second_step()"
                               + (": the weights are perturbed" if call == "state_dict()" else ""))

    def _own_state(self):
        check_not_skipped(int(self.roles.status))  # (SAM has no mask step to read it at)
        extra = {"step": self._step_count, "skipped": self._skipped.clone(), **self.perturbation.state(self.roles)}
        extra["layout"] = self.roles.signature(self._params)
        extra["type"] = type(self).__name__
        return extra

    def _layout_matches(self, layout):
        return ParamRoles.current_names(layout) == self.roles.signature(self._params)

    def _check_own_state(self, own):
        self.perturbation.check_state(own, self.roles)

    def _load_own_state(self, own):
        before = self._step_count, self._skipped, self.roles.mask_state(), self.perturbation.snapshot()
        try:
            self.perturbation.load_state(own, self.roles)
        except BaseException:
            self._step_count, self._skipped, mask, policy = before
            self.roles.set_mask_state(mask)
            self.perturbation.rollback(policy)
            raise
        self._step_count = own["step"]
        self._skipped = own["skipped"].to(self._device, torch.int64).clone()
        self._first_finite = None  # a loaded state starts a new step

    # ---- torch.distributed.checkpoint (fsam_kernels/optim/checkpoint.py) ---------------------

    def checkpoint_state(self):
        return self.perturbation.to_checkpoint(super().checkpoint_state(), self.roles)

    def load_checkpoint_state(self, state, load_base):
        super().load_checkpoint_state(self.perturbation.from_checkpoint(state, self.roles), load_base)
