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
