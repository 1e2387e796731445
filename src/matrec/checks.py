"""Argument checks shared by every layer, op and task: one wording for every bad argument."""
from __future__ import annotations


def check_int(argument: str, value, minimum: int = 1, *, allow_none: bool = False):
    """``value`` if it is an int >= ``minimum`` (bools rejected; None too, unless ``allow_none``),
    else a ValueError naming ``argument``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{argument} must be an int >= {minimum}{' or None' if allow_none else ''}, "
                         f"got {value!r}")
    return value


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
