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
import math
from typing import Any, Optional

import torch
from torch.optim.optimizer import ParamsT

from . import backends
from ._checks import check_int, check_not_skipped
from ._contract import FLOAT_DTYPES, check_disjoint
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

    def snapshot(self):
        """What prepare() changes, for rollback() after an exception in the step (cheap: no copy
        of a tensor as large as the model)."""
        return None

    def rollback(self, snapshot):
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
    others passed already), and that no parameter comes twice or shares memory with another (a
    perturbation saves and restores each once); returns the list's Sharding."""
    def name(i):
        return names[i] if names[i] is not None else f"#{i}"

    position = {}
    for i, p in enumerate(params):
        if id(p) in position:
            raise ValueError(f"parameter {name(i)} is parameter {name(position[id(p)])} again: an optimizer takes "
                             "each parameter once")
        position[id(p)] = i
    for i, p in enumerate(params[first:], first):
        if p.device != device:
            raise ValueError(f"parameter {name(i)} is on {p.device}; the others are on {device}")
        if p.dtype not in FLOAT_DTYPES:
            raise TypeError(f"parameter {name(i)} is {p.dtype}; float32, bfloat16 and float16 are supported")
        if not p.is_contiguous():
            raise ValueError(f"parameter {name(i)} is not contiguous; the kernels update it in place")
    check_disjoint([(f"parameter {name(i)}", local(p)) for i, p in enumerate(params)])
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


def _non_finite(value):
    """Whether a hyperparameter (a number, a one-element tensor or a tuple of them) is NaN or infinite."""
    if isinstance(value, (tuple, list)):
        return any(_non_finite(v) for v in value)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
        return not bool(torch.isfinite(value))
    return isinstance(value, float) and not math.isfinite(value)


def check_base_kwargs(method, base_optimizer, base_kwargs):
    """A keyword neither the method nor the base optimizer takes is named as unknown to both (the
    base optimizer alone would blame itself for a misspelt method option); a NaN or infinite
    value is refused (torch.optim lets some through, and the first step then turns the model to
    NaN)."""
    for key, value in base_kwargs.items():
        if _non_finite(value):
            raise ValueError(f"{method.__name__}: {key}={value!r} is not finite")
    base_options, any_other = _keywords(base_optimizer)
    unknown = [] if any_other else [k for k in base_kwargs if k not in base_options]
    if unknown:
        own = [k for k in _keywords(method.__init__)[0] if k not in ("self", "params", "base_optimizer")]
        base_name = getattr(base_optimizer, "__name__", type(base_optimizer).__name__)
        raise TypeError(f"{method.__name__}: unknown keyword argument(s) {', '.join(map(repr, unknown))}: not an "
                        f"option of {method.__name__} ({', '.join(own)}) nor of {base_name} "
                        f"({', '.join(k for k in base_options if k != 'params')})")


def unscaled_already(scaler, optimizer):
    """Whether scaler.unscale_(optimizer) ran since the scaler's last update() (GradScaler.step's
    own test, on its per-optimizer record)."""
    from torch.amp.grad_scaler import OptState
    return scaler.is_enabled() and scaler._per_optimizer_states[id(optimizer)]["stage"] is OptState.UNSCALED


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


# The per-parameter state of torch.optim's optimizers that is shaped like its parameter.
_PARAM_SHAPED = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "sum", "square_avg", "grad_avg",
                 "acc_delta", "exp_inf", "ax", "prev", "step_size")
_SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq", "sum", "square_avg", "acc_delta", "exp_inf")


def check_counter(name, value):
    """A saved counter: a 0-dim integer tensor >= 0."""
    if not isinstance(value, torch.Tensor) or value.dim() != 0 or value.is_floating_point() or value.is_complex() \
            or value.dtype == torch.bool or int(value) < 0:
        raise ValueError(f"{name} must be a 0-dim integer tensor >= 0, got {value!r}")


def stateful(state):
    """The positions (in its groups' order) of the parameters a torch.optim state dict keeps state of."""
    ids = [i for g in state["param_groups"] for i in g["params"]]
    return [j for j, i in enumerate(ids) if state["state"].get(i)]


def _kind(value):
    """What a hyperparameter is, for comparing a saved one with the current (None and a bool are
    both an optional flag)."""
    if isinstance(value, bool) or value is None:
        return "flag"
    if isinstance(value, (int, float)) or isinstance(value, torch.Tensor) and value.numel() == 1:
        return "number"
    if isinstance(value, (tuple, list)):
        return tuple(_kind(v) for v in value)
    return type(value).__name__


def check_groups_like(name, groups, optimizer):
    """Saved param groups that `optimizer` can take: every option it has (more may come, such as
    an LR scheduler's initial_lr), each of the same kind, and values its constructor accepts
    (torch.optim's checks of lr, betas, eps, ...)."""
    current = optimizer.param_groups
    if len(groups) != len(current):
        raise ValueError(f"{name} has {len(groups)} param groups, this optimizer {len(current)}")
    options, _ = _keywords(type(optimizer))
    for i, (saved, now) in enumerate(zip(groups, current)):
        if not set(now) <= set(saved):
            raise ValueError(f"{name}: param group {i} lacks {sorted(set(now) - set(saved))}")
        for key in now:
            if key != "params" and _kind(saved[key]) != _kind(now[key]):
                raise ValueError(f"{name}: param group {i}'s {key}={saved[key]!r} is not like {now[key]!r}")
        try:
            type(optimizer)([torch.zeros(1, device=now["params"][0].device, requires_grad=True)],
                            **{k: v for k, v in saved.items() if k in options and k != "params"})
        except (ValueError, TypeError, RuntimeError) as e:
            raise ValueError(f"{name}: param group {i}: {e}") from None


def check_optimizer_state(name, state, params, stateful_at=None):
    """A torch.optim state dict for `params` (in the order its groups list them), checked before
    anything loads: its groups cover the parameters once, their hyperparameters are finite, and
    each parameter's state is finite, with the same entries as every other's, tensors shaped like
    the parameter where torch.optim's optimizers keep such (exp_avg, momentum_buffer, ...), second
    moments >= 0 and a step >= 0; with `stateful_at` (what stateful() gave when it was saved), the
    parameters with state are those."""
    if not isinstance(state, dict) or set(state) != {"state", "param_groups"} or \
            not isinstance(state["param_groups"], list) or not isinstance(state["state"], dict):
        raise ValueError(f"{name} must be a torch.optim state dict (keys 'state', 'param_groups')")
    ids = []
    for i, group in enumerate(state["param_groups"]):
        if not isinstance(group, dict) or not isinstance(group.get("params"), list):
            raise ValueError(f"{name}: param group {i} must be a dict with a 'params' list")
        ids += group["params"]
        for key, value in group.items():
            if key != "params" and _non_finite(value):
                raise ValueError(f"{name}: param group {i}'s {key}={value!r} is not finite")
    if len(ids) != len(params) or len(set(ids)) != len(ids):
        raise ValueError(f"{name} lists {len(ids)} parameters ({len(set(ids))} distinct); this optimizer has "
                         f"{len(params)}")
    position = {saved_id: j for j, saved_id in enumerate(ids)}
    keys = None
    for saved_id, entries in state["state"].items():
        if saved_id not in position or not isinstance(entries, dict):
            raise ValueError(f"{name}: state of parameter {saved_id!r}, which no param group lists")
        if keys is not None and set(entries) != keys:
            raise ValueError(f"{name}: parameter {saved_id} keeps {sorted(entries)}, another {sorted(keys)}")
        keys = set(entries)
        p = params[position[saved_id]]
        for key, value in entries.items():
            where = f"{name}: parameter {saved_id}'s {key}"
            if not isinstance(value, (torch.Tensor, int, float)) or isinstance(value, bool) or \
                    key in _PARAM_SHAPED and not isinstance(value, torch.Tensor):
                raise ValueError(f"{where} is a {type(value).__name__}")
            if isinstance(value, torch.Tensor):
                if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
                    raise ValueError(f"{where} is not finite")
                if key in _PARAM_SHAPED and (tuple(value.shape) != tuple(p.shape) or not value.is_floating_point()):
                    raise ValueError(f"{where} is {value.dtype} {tuple(value.shape)}, its parameter "
                                     f"{p.dtype} {tuple(p.shape)}")
                if key in _SECOND_MOMENTS and not bool((value >= 0).all()):
                    raise ValueError(f"{where} has negative entries")
                if key == "step" and (value.numel() != 1 or float(value) < 0):
                    raise ValueError(f"{where} must be one number >= 0")
            elif key == "step" and (isinstance(value, bool) or not isinstance(value, (int, float)) or
                                    _non_finite(float(value)) or value < 0):
                raise ValueError(f"{where} must be a number >= 0, got {value!r}")
    if stateful_at is not None and stateful(state) != stateful_at:
        raise ValueError(f"{name} keeps state of the parameters at {stateful(state)}; it was saved with state of "
                         f"those at {stateful_at}")


def load_or_nothing(optimizers, load):
    """load(), and on any exception the state dicts of `optimizers` put back as they were before
    it (torch.optim's loads replace the state objects, so the old ones are kept by reference)."""
    before = [o.state_dict() for o in optimizers]
    try:
        load()
    except BaseException:
        for o, state in zip(optimizers, before):
            o.load_state_dict(state)
        raise


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
        self._step_snapshot = None  # step(closure)'s snapshot, which its first_step shares

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
        check_not_skipped(int(self.roles.status))  # (SAM has no mask step to read it at)
        extra = {"step": self._step_count, "skipped": self._skipped.clone(), **self.perturbation.state(self.roles)}
        extra["layout"] = self.roles.signature(self._params)
        extra["type"] = type(self).__name__
        return extra

    def state_dict(self) -> dict[str, Any]:
        def make():
            base = self.base_optimizer.state_dict()
            return {"base": base, "sharpness": {**self._own_state(), "base_stateful": stateful(base)}}
        return state_dict_with_hooks(self, make)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        load_with_hooks(self, state_dict, self._load)

    def _load(self, state_dict):
        if not isinstance(state_dict, dict) or set(state_dict) != {"base", "sharpness"}:
            raise ValueError("load_state_dict expects a dict made by SAM/FSAM.state_dict() (keys 'base', 'sharpness')")
        own, base = state_dict["sharpness"], state_dict["base"]

        def check_base():
            check_optimizer_state("the base optimizer's state", base, self._params, own.get("base_stateful"))
            check_groups_like("the base optimizer's state", base["param_groups"], self.base_optimizer)
        self._load_parts(own, lambda: self.base_optimizer.load_state_dict(base), check_base)

    def _load_parts(self, extra, load_base, check_base=lambda: None):
        """Check `extra` (the own state) and, by check_base(), the base optimizer's, then
        load_base() and load `extra`: all of it, or nothing changes."""
        if self.roles.perturbed:
            raise RuntimeError("load_state_dict() between first_step() and second_step()")
        if not isinstance(extra, dict) or extra.get("type") != type(self).__name__:
            raise ValueError(f"this state comes from {extra.get('type') if isinstance(extra, dict) else extra!r}, "
                             f"not {type(self).__name__}")
        layout = extra.get("layout")
        if not isinstance(layout, list) or \
                ParamRoles.current_names(layout) != self.roles.signature(self._params):
            raise ValueError("this state was saved for a different parameter layout (roles, shapes or dtypes differ)")
        check_int("the saved step", extra.get("step"), 0)
        check_counter("the saved skipped count", extra.get("skipped"))
        check_base()
        self.perturbation.check_state(extra, self.roles)
        before = self._step_count, self._skipped, self.roles.mask_state(), self.perturbation.snapshot()

        def load():
            load_base()
            self.param_groups = self.base_optimizer.param_groups  # the base replaced its group dicts
            try:
                self.perturbation.load_state(extra, self.roles)
            except BaseException:
                self._step_count, self._skipped, mask, policy = before
                self.roles.set_mask_state(mask)
                self.perturbation.rollback(policy)
                raise
            self._step_count = extra["step"]
            self._skipped = extra["skipped"].to(self._device, torch.int64).clone()
            self._first_finite = None  # a loaded state starts a new step

        load_or_nothing([self.base_optimizer], load)
        self.param_groups = self.base_optimizer.param_groups

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
