"""Type predicates for the numbers that configs and arguments carry, shared by every layer.

    if not is_int(rank) or rank < 1:
        raise ConfigError(f"rank must be a positive int; got {rank!r}")

Two traps make a bare `isinstance(x, int)` the wrong test, so the package asks these functions instead:
`bool` is a subclass of `int` (`isinstance(True, int)` holds, and `True` would pass as a rank of 1), and values
read from configs, YAML, ml-collections or numpy arrays are often numpy scalars (`np.int64`, `np.float32`), which
are not `int` or `float` instances. Each predicate accepts the Python and the numpy kinds alike and refuses
`bool` and `np.bool_`. They only answer yes or no: the caller raises its own error naming the key.

This module imports only the standard library and numpy (it sits in the bottom layer, beside errors.py).
"""
from __future__ import annotations

import math
import numbers

import numpy as np


def is_int(x) -> bool:
    """True for a Python int or a numpy integer scalar (np.int64, np.uint8, ...); False for bool and np.bool_,
    floats (even integral ones such as 2.0), strings, arrays and None."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def is_real(x) -> bool:
    """True for a real number: a Python or numpy int or float, or any other `numbers.Real` (fractions.Fraction);
    NaN and infinities count. False for bool and np.bool_, complex numbers, strings, arrays and None."""
    return isinstance(x, (int, float, np.integer, np.floating, numbers.Real)) and not isinstance(x, (bool, np.bool_))


def is_finite_real(x) -> bool:
    """`is_real(x)` and neither NaN nor an infinity. An int too large for a float (beyond about 1.8e308) counts as
    not finite: it cannot be used as a float."""
    if not is_real(x):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # an int too large to convert to a float
        return False
