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


def is_int(value, minimum: int | None = None) -> bool:
    """Whether ``value`` is an integer (bools are not), at least ``minimum`` when given: for checks
    that raise their own error (a spec path, a list of them)."""
    return (not isinstance(value, bool) and isinstance(value, numbers.Integral)
            and (minimum is None or value >= minimum))


def is_real(value) -> bool:
    """Whether ``value`` is a real number (bools are not; NaN and inf are)."""
    return not isinstance(value, bool) and isinstance(value, numbers.Real)


def check_real(argument: str, value, *, minimum: float | None = None, maximum: float | None = None,
               open_min: bool = False, open_max: bool = False, allow_none: bool = False,
               type_error: bool = False):
    """``value`` as a float if it is a finite real number within the bounds (``open_*``: the bound
    itself excluded), else a ValueError naming ``argument`` and the range (bools, NaN and inf are
    refused; None too unless ``allow_none``). With ``type_error`` a value that is no number at all is
    a TypeError instead."""
    if value is None and allow_none:
        return None
    if type_error and not is_real(value):
        raise TypeError(f"{argument} must be a number{' or None' if allow_none else ''}, got {value!r}")
    low = None if minimum is None else (">" if open_min else ">=", minimum)
    high = None if maximum is None else ("<" if open_max else "<=", maximum)
    if low and high:
        bound = f" in {'(' if open_min else '['}{minimum}, {maximum}{')' if open_max else ']'}"
    elif low or high:
        op, limit = low or high
        bound = f" {op} {limit}"
    else:
        bound = ""
    ok = is_real(value) and math.isfinite(value) and not (
        (low and (value <= minimum if open_min else value < minimum))
        or (high and (value >= maximum if open_max else value > maximum)))
    if not ok:
        raise ValueError(f"{argument} must be a finite number{bound}{' or None' if allow_none else ''}, "
                         f"got {value!r}")
    return float(value)


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
