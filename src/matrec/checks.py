"""Argument checks shared by every layer, op and task: one wording for every bad argument."""
from __future__ import annotations

import math
import numbers


def check_int(argument: str, value, minimum: int = 1, *, maximum: int | None = None,
              allow_none: bool = False, type_error: bool = False):
    """``value`` as an int if it is an integer in [``minimum``, ``maximum``] (bools rejected; None
    too, unless ``allow_none``), else a ValueError naming ``argument``. With ``type_error`` a value
    that is no integer at all is a TypeError instead (torch.nn's convention; TrainConfig follows it)."""
    if value is None and allow_none:
        return None
    bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    none = " or None" if allow_none else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if type_error:
            raise TypeError(f"{argument} must be an int{none}, got {value!r}")
        raise ValueError(f"{argument} must be an int {bound}{none}, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{argument} must be an int {bound}{none}, got {value!r}")
    return int(value)


def check_number(argument: str, value) -> float:
    """``value`` as a float if it is a real number (bools rejected), else a TypeError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{argument} must be a number, got {value!r}")
    return float(value)


def check_divides(divisor_arg: str, divisor: int, dividend_arg: str, dividend: int) -> None:
    """A ValueError naming both arguments unless ``divisor`` divides ``dividend``."""
    if dividend % divisor:
        raise ValueError(f"{divisor_arg} must divide {dividend_arg}, got {dividend_arg}={dividend}, "
                         f"{divisor_arg}={divisor}")


def check_positive(argument: str, value) -> float:
    """``value`` as a float if it is a finite real number > 0 (bools rejected; NaN and inf too),
    else a ValueError naming ``argument``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{argument} must be a positive number, got {value!r}")
    return float(value)


def check_type(argument: str, value, kind, expected: str, *, allow_none: bool = False):
    """``value`` if it is an instance of ``kind`` (or None with ``allow_none``), else a TypeError
    naming ``argument`` and what was ``expected`` (e.g. "a Tensor")."""
    if (value is None and allow_none) or isinstance(value, kind):
        return value
    raise TypeError(f"{argument} must be {expected}{' or None' if allow_none else ''}, got "
                    f"{type(value).__name__}")
