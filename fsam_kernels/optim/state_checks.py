"""What a saved torch.optim state must be before a composed optimizer loads it: the checks that
make a load all-or-nothing (every part checked before any part is loaded)."""
import inspect
import math

import torch


def keywords_of(fn):
    """(the keyword names fn takes, whether it takes any others through **kwargs); (None, True)
    when it cannot be inspected."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None, True
    names = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return names, any(p.kind is p.VAR_KEYWORD for p in parameters)


def non_finite(value):
    """Whether a hyperparameter (a number, a one-element tensor or a tuple of them) is NaN or infinite."""
    if isinstance(value, (tuple, list)):
        return any(non_finite(v) for v in value)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
        return not bool(torch.isfinite(value))
    return isinstance(value, float) and not math.isfinite(value)


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
    options, _ = keywords_of(type(optimizer))
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
            if key != "params" and non_finite(value):
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
                                    non_finite(float(value)) or value < 0):
                raise ValueError(f"{where} must be a number >= 0, got {value!r}")
    if stateful_at is not None and stateful(state) != stateful_at:
        raise ValueError(f"{name} keeps state of the parameters at {stateful(state)}; it was saved with state of "
                         f"those at {stateful_at}")
