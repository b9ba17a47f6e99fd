"""Argument checks shared by the builders, the training loop and export."""

import numbers


def is_whole(value, least=None):
    """Whether `value` is an integer (Python or NumPy, not a bool), at least `least`."""
    return (isinstance(value, numbers.Integral) and not isinstance(value, bool)
            and (least is None or value >= least))
