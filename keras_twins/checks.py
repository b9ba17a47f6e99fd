"""Argument checks shared by the builders, the training loop and export."""

import numbers


def is_whole(value, least=None):
    """Whether `value` is an integer (Python or NumPy, not a bool), at least `least`."""
    return (isinstance(value, numbers.Integral) and not isinstance(value, bool)
            and (least is None or value >= least))


def require_positive_integers(**values):
    """Raises a one-line `ValueError` naming the first of `values` that is not an integer >= 1."""
    for name, value in values.items():
        if not is_whole(value, least=1):
            raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
