"""Scalar argument checks shared by the optimizers, clipping and the ops' contract: each raises
before any state changes, naming the argument (TypeError for a wrong type, ValueError for a value
out of its domain)."""
import math


def check_number(name, value, low, *, low_open=False, finite=True):
    """`value` is a real number >= low (> low with low_open), not a bool, not NaN, and (finite)
    not infinite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if value != value or value < low or (low_open and value == low) or (finite and math.isinf(value)):
        raise ValueError(f"{name} must be {'finite and ' if finite else ''}{'>' if low_open else '>='} {low}, "
                         f"got {value}")


def check_int(name, value, low, high=None):
    """`value` is an int >= low (and < high), not a bool."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value >= high):
        raise ValueError(f"{name} must be >= {low}{'' if high is None else f' and < {high}'}, got {value}")


def check_not_skipped(skipped):
    """After a sync: raise if an op given the optimizer's `status` skipped its perturbation or
    restore, whose saved layout the device refused (fsam_kernels/_schemas.py).  The optimizers
    build their layouts themselves, so only a change to their buffers from outside can do this;
    the weights were left as they were."""
    if skipped:
        raise RuntimeError("a perturbation was skipped: the device refused its saved layout (the optimizer's "
                           "save_offsets, mask or saved buffer were changed from outside); the weights were left "
                           "unperturbed since")
