"""Argument checks shared by the optimizers and clipping: each raises before any state changes, naming the
argument."""


def check_number(name, value, low, *, low_open=False):
    """`value` is a real number >= low (> low with low_open), not a bool, not NaN."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if value != value or value < low or (low_open and value == low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")


def check_int(name, value, low):
    """`value` is an int >= low, not a bool."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
