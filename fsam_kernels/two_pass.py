"""The two-pass step of the sharpness-aware optimizers, composed of three parts kept apart:

- the protocol (here): first pass, perturbation, second pass, exact restore, base step, with the
  GradScaler, closure, state and LR-scheduler conventions;
- the parameter roles and saved buffers (`ParamRoles`, fsam_kernels/roles.py);
- what decides the perturbation (a `Perturbation`: SAM/ASAM's scale in sam.py, FSAM's Fisher
  mask in fsam.py).

The shape is davda54/sam's: `Optimizer(params, base_optimizer_class, rho=..., **base_kwargs)`,
`first_step`, `second_step`, `step(closure)`, with `param_groups` shared with the base optimizer
so LR schedulers work on either object.
"""
from collections.abc import Callable
import inspect
from typing import Any, Optional

import torch
from torch.optim.optimizer import ParamsT

from . import backends
from .ops import FLOAT_DTYPES
from .params import param_groups_with_names
from .roles import SUMSQ_ALL, ParamRoles
from .sharding import local, sharding_of
from .training import sharpness_passes


class Perturbation:
    """What decides e in w + e.  The protocol calls, per first_step: prepare() (may change the
    roles' mask; returns whether the norm must be recomputed), then scale() on the norm stats."""

    adaptive = False
    eta = 0.0

    def prepare(self, roles, grads, finite):
        return False

    def scale(self, stats, finite):
        raise NotImplementedError

    def state(self, roles):
        """What state_dict() keeps of the policy and of the roles' mask (tensors cloned)."""
        return {}

    def check_state(self, state, roles):
        """Raise if `state` does not fit this policy (before anything is loaded)."""

    def load_state(self, state, roles):
        pass

    def to_checkpoint(self, state, roles):
        """state() as torch.distributed.checkpoint saves it (see SharpnessAwareOptimizer.checkpoint_state)."""
        return state

    def from_checkpoint(self, state, roles):
        return state


def init_composed(optimizer, groups, names, base_optimizer, base_kwargs):
    """Optimizer.__init__ over `groups`, then the base optimizer built on the same param_groups
    (davda54/sam's shape) and the checks of every composed optimizer: one device, float dtypes,
    contiguous parameters, and FSDP2's sharding when the parameters are DTensors (the base
    optimizer takes them as they are; the kernels take their local shards).  Sets base_optimizer,
    _params, _locals, _sharding, _names and _device."""
    if not callable(base_optimizer):
        raise TypeError(f"base_optimizer must be an optimizer class, got {type(base_optimizer).__name__}")
    check_base_kwargs(type(optimizer), base_optimizer, base_kwargs)
    torch.optim.Optimizer.__init__(optimizer, groups, {})
    optimizer.base_optimizer = base_optimizer(optimizer.param_groups, **base_kwargs)
    optimizer.param_groups = optimizer.base_optimizer.param_groups
    optimizer.defaults.update(optimizer.base_optimizer.defaults)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    devices = {p.device for p in params}
    if len(devices) != 1:
        raise ValueError(f"all parameters must be on one device, got {sorted(map(str, devices))}")
    optimizer._device = devices.pop()
    optimizer._sharding = check_params(params, names, optimizer._device)
    optimizer._params, optimizer._names = params, names
    optimizer._locals = [local(p) for p in params]


def check_params(params, names, device, first=0):
    """The checks every parameter of a composed optimizer passes (params[first:] are checked: the
    others passed already); returns the list's Sharding."""
    for i, p in enumerate(params[first:], first):
        name = names[i] if names[i] is not None else f"#{i}"
        if p.device != device:
            raise ValueError(f"parameter {name} is on {p.device}; the others are on {device}")
        if p.dtype not in FLOAT_DTYPES:
            raise TypeError(f"parameter {name} is {p.dtype}; float32, bfloat16 and float16 are supported")
        if not p.is_contiguous():
            raise ValueError(f"parameter {name} is not contiguous; the kernels update it in place")
    return sharding_of(params, names)


def _keywords(fn):
    """(the keyword names fn takes, whether it takes any others through **kwargs); (None, True)
    when it cannot be inspected."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None, True
    names = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return names, any(p.kind is p.VAR_KEYWORD for p in parameters)


def check_base_kwargs(method, base_optimizer, base_kwargs):
    """A keyword neither the method nor the base optimizer takes is named as unknown to both (the
    base optimizer alone would blame itself for a misspelt method option)."""
    base_options, any_other = _keywords(base_optimizer)
    unknown = [] if any_other else [k for k in base_kwargs if k not in base_options]
    if unknown:
        own = [k for k in _keywords(method.__init__)[0] if k not in ("self", "params", "base_optimizer")]
        base_name = getattr(base_optimizer, "__name__", type(base_optimizer).__name__)
        raise TypeError(f"{method.__name__}: unknown keyword argument(s) {', '.join(map(repr, unknown))}: not an "
                        f"option of {method.__name__} ({', '.join(own)}) nor of {base_name} "
                        f"({', '.join(k for k in base_options if k != 'params')})")


def state_dict_with_hooks(optimizer, make):
    """make()'s state dict between torch.optim's state-dict pre- and post-hooks of `optimizer`
    (a post-hook may return a replacement), as Optimizer.state_dict runs them."""
    for hook in optimizer._optimizer_state_dict_pre_hooks.values():
        hook(optimizer)
    state = make()
    for hook in optimizer._optimizer_state_dict_post_hooks.values():
        result = hook(optimizer, state)
        state = state if result is None else result
    return state


def load_with_hooks(optimizer, state, load):
    """load(state) between torch.optim's load-state-dict pre-hooks (which may return a replacement)
    and post-hooks of `optimizer`, as Optimizer.load_state_dict runs them."""
    for hook in optimizer._optimizer_load_state_dict_pre_hooks.values():
        result = hook(optimizer, state)
        state = state if result is None else result
    load(state)
    for hook in optimizer._optimizer_load_state_dict_post_hooks.values():
        hook(optimizer)


def base_step(optimizer, base_optimizer, scaler=None, skip=None):
    """The base optimizer's step of a composed optimizer (through `scaler` when given; not at all
    when the 0-dim bool tensor `skip` is True, read with one sync), then what LR schedulers check
    for "optimizer.step() came first" on the optimizer they wrap, which need not be the step
    they patched: every composed optimizer ends its step here."""
    if scaler is None:
        base_optimizer.step()
    elif skip is None or not bool(skip):
        scaler.step(base_optimizer)
    optimizer._opt_called = True


class SharpnessAwareOptimizer(torch.optim.Optimizer):
    """The two-pass protocol over ParamRoles and a Perturbation (subclasses choose both in their
    constructor: `_compose`)."""

    training_passes = staticmethod(sharpness_passes)  # what a training loop runs before the base step

    def __init__(self, params: ParamsT, base_optimizer: type[torch.optim.Optimizer], *, backend: Optional[str],
                 base_kwargs: dict[str, Any]):
        init_composed(self, *param_groups_with_names(params), base_optimizer, base_kwargs)
        self.backend = backends.resolve(backend, self._device)
        self._first_finite = None  # first_step's finite flag while its second_step is pending
        self._skipped = torch.zeros((), dtype=torch.int64, device=self._device)
        self._step_count = 0
        self._in_step = False  # inside step(closure), whose wrapper runs the step hooks

    def _compose(self, role_of, perturbation):
        """Fix the roles (one per parameter, fsam_kernels/roles.py) and the perturbation policy
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
        unscaled in place first (`scaler.unscale_(self)`; the base optimizer's own unscale is
        left for the second pass), and an overflow counts in the scaler's next update().

        Returns a 0-dim bool device tensor: False when non-finite gradients skipped the
        perturbation (reading it syncs)."""
        if self.roles.perturbed:
            raise RuntimeError("first_step() called twice: call second_step() to restore the weights first")
        self._step_hooks(pre=True)
        if scaler is not None:
            scaler.unscale_(self)
        policy = self.perturbation
        grads = self.roles.gradients()
        stats = self.roles.sumsq(grads, policy.adaptive, policy.eta)
        finite = torch.isfinite(stats[SUMSQ_ALL])
        if policy.prepare(self.roles, grads, finite):
            stats = self.roles.sumsq(grads, policy.adaptive, policy.eta)
        self.roles.perturb(grads, policy.scale(stats, finite), policy.adaptive, policy.eta)
        self._skipped += ~finite
        self._first_finite = finite
        self._step_count += 1
        if zero_grad:
            self.zero_grad()
        return finite

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
        base_step(self, self.base_optimizer, scaler, skip=None if scaler is None else ~self._first_finite)
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
        try:
            self.first_step(zero_grad=True)
            try:
                with torch.enable_grad():
                    loss = closure()
            except BaseException:
                with torch.no_grad():
                    self.roles.restore()  # leave the model as it was, not perturbed
                raise
            self.second_step()
        finally:
            self._in_step = False
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    @property
    def skipped_perturbations(self) -> int:
        """How many steps skipped the perturbation for non-finite gradients (syncs)."""
        return int(self._skipped)

    # ---- state -----------------------------------------------------------------------------

    def _own_state(self):
        """What state_dict() keeps besides the base optimizer's."""
        if self.roles.perturbed:
            raise RuntimeError("state_dict() between first_step() and second_step(): the weights are perturbed")
        extra = {"step": self._step_count, "skipped": self._skipped.clone(), **self.perturbation.state(self.roles)}
        extra["layout"] = self.roles.signature(self._params)
        extra["type"] = type(self).__name__
        return extra

    def state_dict(self) -> dict[str, Any]:
        return state_dict_with_hooks(self, lambda: {"base": self.base_optimizer.state_dict(),
                                                    "sharpness": self._own_state()})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        load_with_hooks(self, state_dict, self._load)

    def _load(self, state_dict):
        if not isinstance(state_dict, dict) or set(state_dict) != {"base", "sharpness"}:
            raise ValueError("load_state_dict expects a dict made by SAM/FSAM.state_dict() (keys 'base', 'sharpness')")
        self._load_parts(state_dict["sharpness"], lambda: self.base_optimizer.load_state_dict(state_dict["base"]))

    def _load_parts(self, extra, load_base):
        """Check `extra` (the own state), then load_base() and load `extra`: nothing changes on an error."""
        if self.roles.perturbed:
            raise RuntimeError("load_state_dict() between first_step() and second_step()")
        if extra.get("type") != type(self).__name__:
            raise ValueError(f"this state comes from {extra.get('type')}, not {type(self).__name__}")
        if ParamRoles.current_names(extra.get("layout", [])) != self.roles.signature(self._params):
            raise ValueError("this state was saved for a different parameter layout (roles, shapes or dtypes differ)")
        self.perturbation.check_state(extra, self.roles)
        load_base()
        self.param_groups = self.base_optimizer.param_groups  # the base replaced its group dicts
        self._step_count = int(extra["step"])
        self._skipped = extra["skipped"].to(self._device, torch.int64).clone()
        self.perturbation.load_state(extra, self.roles)
        self._first_finite = None  # a loaded state starts a new step

    # ---- torch.distributed.checkpoint (fsam_kernels/checkpoint.py) --------------------------

    def checkpoint_state(self):
        """The own state in the form torch.distributed.checkpoint saves: tensors with one value
        per parameter element sharded like their parameters (DTensors under FSDP2)."""
        return self.perturbation.to_checkpoint(self._own_state(), self.roles)

    def checkpoint_template(self, step):
        """What dcp.load fills with a checkpoint saved at `step`."""
        return self.checkpoint_state()

    def load_checkpoint_state(self, state, load_base):
        self._load_parts(self.perturbation.from_checkpoint(state, self.roles), load_base)
