"""matrec.checks.check_int: the one wording for a bad integer argument, everywhere."""
import numpy as np
import pytest

from matrec.checks import check_int, check_real, is_int, is_real


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


def test_check_real_accepts_finite_numbers_in_range_and_returns_a_float():
    assert check_real("x", 3) == 3.0 and type(check_real("x", np.float32(0.5), maximum=1)) is float
    assert check_real("x", 0, minimum=0) == 0.0 and check_real("x", None, allow_none=True) is None
    assert is_int(np.int64(3), 0) and not is_int(True) and not is_int(2.0) and not is_int(-1, 0)
    assert is_real(float("nan")) and not is_real(False) and not is_real("1")


@pytest.mark.parametrize("kwargs, error, message", [
    ({"value": -1, "minimum": 0}, ValueError, "x must be a finite number >= 0, got -1"),
    ({"value": 2, "minimum": 2, "open_min": True}, ValueError, "x must be a finite number > 2, got 2"),
    ({"value": 1, "minimum": 0, "maximum": 1, "open_max": True}, ValueError,
     r"x must be a finite number in \[0, 1\), got 1"),
    ({"value": float("nan"), "maximum": 5}, ValueError, "x must be a finite number <= 5, got nan"),
    ({"value": float("inf")}, ValueError, "x must be a finite number, got inf"),
    ({"value": True, "minimum": 0}, ValueError, "x must be a finite number >= 0, got True"),
    ({"value": 0, "minimum": 0, "open_min": True, "allow_none": True}, ValueError,
     "x must be a finite number > 0 or None, got 0"),
    ({"value": "a", "type_error": True}, TypeError, "x must be a number, got 'a'"),
    ({"value": "a"}, ValueError, "x must be a finite number, got 'a'"),
])
def test_check_real_names_the_argument_and_the_range(kwargs, error, message):
    with pytest.raises(error, match=f"^{message}$"):
        check_real("x", **kwargs)


def test_library_leftovers_name_their_argument():
    """Issue 26's library cases: each bad argument named, with the wording nn.RNN users know."""
    import math

    import pytest
    import torch

    from matrec import MORNN, build_model
    from matrec.checks import check_positive, check_type
    from matrec.nn.mornn import mornn_param_groups
    from matrec.nn.mru import MRU

    with pytest.raises(TypeError, match=r"^dropout must be a number, got 'x'$"):
        MRU(64, dropout="x")
    model = MORNN(3, 4, num_layers=2)
    with pytest.raises(TypeError, match=r"^hx must be a Tensor or None, got list$"):
        model(torch.zeros(5, 2, 3), [0.0] * 6)
    for bad in (float("nan"), math.inf, 0.0, "1e-3", True):
        with pytest.raises(ValueError, match=r"^lr must be a positive number"):
            mornn_param_groups(model, bad)
    with pytest.raises(ValueError, match=r"^orthogonal_lr must be a positive number, got nan"):
        mornn_param_groups(model, 1e-3, orthogonal_lr=float("nan"))
    with pytest.raises(ValueError, match=r"^n_layers must be an int >= 1, got 0$"):
        build_model("mru", vocab_size=5, output_size=5, n_layers=0)
    with pytest.raises(ValueError, match=r"^Unknown nonlinearity 'garbage'\. Select from 'tanh', 'relu', "
                                         r"'modrelu' or 'identity'"):
        MORNN(3, 4, nonlinearity="garbage")
    with pytest.raises(ValueError, match="Unknown nonlinearity 'garbage'"):   # nn.RNN says the same
        torch.nn.RNN(3, 4, nonlinearity="garbage")
    assert check_positive("x", 2) == 2.0 and check_type("t", None, torch.Tensor, "a Tensor", allow_none=True) is None
