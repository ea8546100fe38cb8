"""The base of every optimizer composed around a base optimizer (SAM, FSAM, PACTuning and what
follows them): davda54/sam's shape, `Optimizer(params, base_optimizer_class, ..., **base_kwargs)`
with `param_groups` shared with the base optimizer so that LR schedulers work on either object;
the checks of the parameters; torch.optim's hooks around state_dict/load_state_dict; loads that
take all of a state or change nothing; torch.distributed.checkpoint's entry points
(fsam_kernels/optim/checkpoint.py).

A subclass holds only what is its own: its step, and its own state through `_own_state`,
`_check_between_steps`, `_layout_matches`, `_check_own_state` and `_load_own_state`.
"""
from typing import Any

import torch

from .._contract import FLOAT_DTYPES, check_disjoint
from .._checks import check_int
from ..sharding import local, sharding_of
from .state_checks import check_counter, check_groups_like, check_optimizer_state, keywords_of, non_finite, \
    stateful


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


def check_base_kwargs(method, base_optimizer, base_kwargs):
    """A keyword neither the method nor the base optimizer takes is named as unknown to both (the
    base optimizer alone would blame itself for a misspelt method option); a NaN or infinite
    value is refused (torch.optim lets some through, and the first step then turns the model to
    NaN)."""
    for key, value in base_kwargs.items():
        if non_finite(value):
            raise ValueError(f"{method.__name__}: {key}={value!r} is not finite")
    base_options, any_other = keywords_of(base_optimizer)
    unknown = [] if any_other else [k for k in base_kwargs if k not in base_options]
    if unknown:
        own = [k for k in keywords_of(method.__init__)[0] if k not in ("self", "params", "base_optimizer")]
        base_name = getattr(base_optimizer, "__name__", type(base_optimizer).__name__)
        raise TypeError(f"{method.__name__}: unknown keyword argument(s) {', '.join(map(repr, unknown))}: not an "
                        f"option of {method.__name__} ({', '.join(own)}) nor of {base_name} "
                        f"({', '.join(k for k in base_options if k != 'params')})")


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


class ComposedOptimizer(torch.optim.Optimizer):
    """An optimizer around a base optimizer built on the same param_groups.  Sets base_optimizer,
    _params, _locals (what the kernels write: the local shards of FSDP2's DTensors), _sharding,
    _names and _device.  Its state_dict() is {"base": the base optimizer's, STATE_KEY: its own}."""

    STATE_KEY = "own"  # the state_dict() entry of the own state (subclasses name theirs)
    MADE_BY = "this optimizer"  # who makes such states, for the error that refuses another dict
    LAYOUT_PARTS = "shapes or dtypes"  # what the saved layout describes, for the error that refuses it

    def __init__(self, groups, names, base_optimizer, base_kwargs):
        if not callable(base_optimizer):
            raise TypeError(f"base_optimizer must be an optimizer class, got {type(base_optimizer).__name__}")
        check_base_kwargs(type(self), base_optimizer, base_kwargs)
        torch.optim.Optimizer.__init__(self, groups, {})
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        params = [p for g in self.param_groups for p in g["params"]]
        devices = {p.device for p in params}
        if len(devices) != 1:
            raise ValueError(f"all parameters must be on one device, got {sorted(map(str, devices))}")
        self._device = devices.pop()
        self._sharding = check_params(params, names, self._device)
        self._params, self._names = params, names
        self._locals = [local(p) for p in params]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def _base_step(self, scaler=None, skip=None):
        """The base optimizer's step (through `scaler` when given; not at all when the 0-dim bool
        tensor `skip` is True, read with one sync), then what LR schedulers check for
        "optimizer.step() came first" on the optimizer they wrap, which need not be the step they
        patched: every composed optimizer ends its step here."""
        if scaler is None:
            self.base_optimizer.step()
        elif skip is None or not bool(skip):
            scaler.step(self.base_optimizer)
        self._opt_called = True

    # ---- what a subclass gives ---------------------------------------------------------------

    def _check_between_steps(self, call):
        """Raise if `call` ("state_dict()" or "load_state_dict()") comes in the middle of a step."""

    def _own_state(self):
        """What state_dict() keeps besides the base optimizer's: a dict with at least "type",
        "layout", "step" and "skipped" (a 0-dim integer tensor)."""
        raise NotImplementedError

    def _layout_matches(self, layout):
        """Whether a saved "layout" is this optimizer's."""
        raise NotImplementedError

    def _check_own_state(self, own):
        """Raise if the rest of the own state does not fit (before anything is loaded)."""

    def _load_own_state(self, own):
        """Take the checked own state, after the base optimizer's: all of it, or (raising) none."""
        raise NotImplementedError

    def _inner_optimizers(self, own):
        """The optimizers whose state a load replaces, put back if it raises."""
        return [self.base_optimizer]

    # ---- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """{"base": the base optimizer's state, STATE_KEY: the own state}, between torch.optim's
        state-dict pre- and post-hooks (a post-hook may return a replacement)."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        self._check_between_steps("state_dict()")
        base = self.base_optimizer.state_dict()
        state = {"base": base, self.STATE_KEY: {**self._own_state(), "base_stateful": stateful(base)}}
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, state)
            state = state if result is None else result
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict() (checked whole first: all of it loads, or nothing changes), between
        torch.optim's load-state-dict pre-hooks (which may return a replacement) and post-hooks."""
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            state_dict = state_dict if result is None else result
        self._load(state_dict)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _load(self, state_dict):
        if not isinstance(state_dict, dict) or set(state_dict) != {"base", self.STATE_KEY}:
            raise ValueError(f"load_state_dict expects a dict made by {self.MADE_BY}.state_dict() (keys 'base', "
                             f"'{self.STATE_KEY}')")
        own, base = state_dict[self.STATE_KEY], state_dict["base"]

        def check_base():
            check_optimizer_state("the base optimizer's state", base, self._params, own.get("base_stateful"))
            check_groups_like("the base optimizer's state", base["param_groups"], self.base_optimizer)
        self._load_parts(own, lambda: self.base_optimizer.load_state_dict(base), check_base)

    def _load_parts(self, own, load_base, check_base=lambda: None):
        """Check `own` and, by check_base(), the base optimizer's state, then load_base() and load
        `own`: all of it, or nothing changes."""
        self._check_between_steps("load_state_dict()")
        if not isinstance(own, dict) or own.get("type") != type(self).__name__:
            raise ValueError(f"this state comes from {own.get('type') if isinstance(own, dict) else own!r}, "
                             f"not {type(self).__name__}")
        if not isinstance(own.get("layout"), list) or not self._layout_matches(own["layout"]):
            raise ValueError(f"this state was saved for a different parameter layout ({self.LAYOUT_PARTS} differ)")
        check_int("the saved step", own.get("step"), 0)
        check_counter("the saved skipped count", own.get("skipped"))
        check_base()
        self._check_own_state(own)

        def load():
            load_base()
            self.param_groups = self.base_optimizer.param_groups  # the base replaced its group dicts
            self._load_own_state(own)

        load_or_nothing(self._inner_optimizers(own), load)
        self.param_groups = self.base_optimizer.param_groups

    # ---- torch.distributed.checkpoint (fsam_kernels/optim/checkpoint.py) ---------------------

    def checkpoint_state(self):
        """The own state in the form torch.distributed.checkpoint saves: tensors with one value
        per parameter element sharded like their parameters (DTensors under FSDP2)."""
        self._check_between_steps("state_dict()")
        return self._own_state()

    def checkpoint_template(self, step):
        """What dcp.load fills with a checkpoint saved at `step`."""
        return self.checkpoint_state()

    def load_checkpoint_state(self, state, load_base):
        """Load what checkpoint_state() saved (DCP has filled checkpoint_template()), with
        load_base() loading the model and the base optimizer: all of it, or nothing changes."""
        self._load_parts(state, load_base)
