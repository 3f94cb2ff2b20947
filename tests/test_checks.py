"""configurable_fm.checks: the number predicates shared by every layer (numpy scalars accepted, bools refused)."""
import fractions
import math

import numpy as np
import pytest

from configurable_fm.checks import is_finite_real, is_int, is_real

NAN, INF = float("nan"), float("inf")

# value: (is_int, is_real, is_finite_real)
CASES = {
    "int": (3, (True, True, True)),
    "negative int": (-2, (True, True, True)),
    "np.int64": (np.int64(3), (True, True, True)),
    "np.uint8": (np.uint8(3), (True, True, True)),
    "float": (2.5, (False, True, True)),
    "integral float": (2.0, (False, True, True)),
    "np.float32": (np.float32(2.5), (False, True, True)),
    "np.float64": (np.float64(2.5), (False, True, True)),
    "bool True": (True, (False, False, False)),
    "bool False": (False, (False, False, False)),
    "np.bool_": (np.bool_(True), (False, False, False)),
    "str": ("3", (False, False, False)),
    "None": (None, (False, False, False)),
    "NaN": (NAN, (False, True, False)),
    "inf": (INF, (False, True, False)),
    "-inf": (-INF, (False, True, False)),
    "np.float32 NaN": (np.float32(NAN), (False, True, False)),
    "np.float64 inf": (np.float64(INF), (False, True, False)),
    "Fraction": (fractions.Fraction(1, 3), (False, True, True)),
    "complex": (1 + 0j, (False, False, False)),
    "np.complex128": (np.complex128(1), (False, False, False)),
    "0-d array": (np.array(3), (False, False, False)),
    "list": ([3], (False, False, False)),
}


@pytest.mark.parametrize("name", CASES)
def test_predicates(name):
    value, (want_int, want_real, want_finite) = CASES[name]
    assert is_int(value) is want_int
    assert is_real(value) is want_real
    assert is_finite_real(value) is want_finite


def test_an_int_too_large_for_a_float_is_real_but_not_finite():
    huge = 10 ** 400
    assert is_int(huge) and is_real(huge)
    assert not is_finite_real(huge)  # math.isfinite would raise OverflowError
    assert is_finite_real(10 ** 300) and math.isfinite(float(10 ** 300))
