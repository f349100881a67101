"""Value checks for config fields: each builder returns ``check(value) -> value`` that
normalises the value or raises ``TypeError``/``ValueError`` saying what was expected.

Why a module of their own: every policy's section (``Field(name, default, check, ...)``) and the
config's shared fields use the same checks, and a message a user sees should read the same
whichever field it is about.  Plain Python: imports nothing of the package.
"""

from __future__ import annotations

import math
from typing import Any, Callable


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def an_int(low: int | None = None, none: bool = False) -> Callable[[Any], Any]:
    """An int >= ``low`` (or None where ``none``): TypeError for another type, ValueError below ``low``."""
    def check(value: Any) -> Any:
        if value is None and none:
            return value
        bound = f" >= {low}" if low is not None else ""
        if not _is_int(value):
            raise TypeError(f"must be an int{bound}{' or None' if none else ''}, got {value!r}")
        if low is not None and value < low:
            raise ValueError(f"must be an int{bound}{' or None' if none else ''}, got {value!r}")
        return value
    return check


def a_number(low: float | None = None, high: float | None = None, low_open: bool = False,
             high_open: bool = True, none: bool = False, finite: bool = True) -> Callable[[Any], Any]:
    """A number in the interval (ends open or closed as asked; finite unless ``finite`` is
    False, then +inf passes where the interval allows it), or None where ``none``."""
    def check(value: Any) -> Any:
        if value is None and none:
            return value
        ok = _is_number(value) and not math.isnan(value) and (math.isfinite(value) or not finite)
        if ok and low is not None:
            ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value < high if high_open else value <= high
        if not ok:
            lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
            hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
            where = f" in {lo}, {hi}" if lo and hi else (f" {'>' if low_open else '>='} {low:g}" if lo else "")
            kind = "a finite number" if finite else "a number"
            raise ValueError(f"must be {kind}{where}{' or None' if none else ''}, got {value!r}")
        return value
    return check


def one_of(*choices: Any) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        # same type too: True is not the choice 1
        if not any(value == c and type(value) is type(c) for c in choices):
            raise ValueError(f"must be one of {choices}, got {value!r}")
        return value
    return check


def a_bool(none: bool = False) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if not isinstance(value, bool) and not (none and value is None):
            raise TypeError(f"must be a bool{' or None' if none else ''}, got {value!r}")
        return value
    return check


def a_dict(value: Any) -> Any:
    if not isinstance(value, dict):
        raise TypeError(f"must be a dict, got {value!r}")
    return dict(value)


def a_callable_or_none(value: Any) -> Any:
    if value is not None and not callable(value):
        raise TypeError("must be callable")
    return value


def step_list(value: Any) -> Any:
    """Non-negative step indices, stored as a tuple (None: the policy's default)."""
    if value is None:
        return value
    try:
        steps = tuple(value)
    except TypeError:
        steps = None
    if steps is None or any(not _is_int(s) or s < 0 for s in steps):
        raise ValueError(f"must be non-negative ints, got {value!r}")
    return steps
