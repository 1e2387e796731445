"""matrec.checks.check_int: the one wording for a bad integer argument, everywhere."""
import numpy as np
import pytest

from matrec.checks import check_int


def test_check_int_accepts_integers_in_range_and_returns_a_python_int():
    assert check_int("n", 3) == 3 and check_int("n", 0, 0) == 0
    value = check_int("n", np.int64(5), maximum=9)
    assert value == 5 and type(value) is int
    assert check_int("n", None, allow_none=True) is None


@pytest.mark.parametrize("kwargs, error, message", [
    ({"value": 0}, ValueError, "n must be an int >= 1, got 0"),
    ({"value": True}, ValueError, "n must be an int >= 1, got True"),
    ({"value": 2.0}, ValueError, "n must be an int >= 1, got 2.0"),
    ({"value": None}, ValueError, "n must be an int >= 1, got None"),
    ({"value": 0, "allow_none": True}, ValueError, "n must be an int >= 1 or None, got 0"),
    ({"value": 10, "maximum": 9}, ValueError, r"n must be an int in \[1, 9\], got 10"),
    ({"value": 2.5, "type_error": True}, TypeError, "n must be an int, got 2.5"),
    ({"value": 0, "type_error": True}, ValueError, "n must be an int >= 1, got 0"),
])
def test_check_int_names_the_argument_and_the_expectation(kwargs, error, message):
    with pytest.raises(error, match=f"^{message}$"):
        check_int("n", **kwargs)
