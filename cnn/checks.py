"""Argument checks, written once: every layer, optimizer, schedule, callback, strategy and CLI
option refuses a bad value through these, so every message has one form: the owner, the name,
what is expected, and the value received (``Adam: beta_1 must be in [0, 1). Received
beta_1=1.5``).

Python's ``bool`` is an ``int`` subclass, but ``epochs=True`` is surely a mistake: no check
here accepts a bool where a number is asked for. NumPy scalars (``np.int64(3)``,
``np.float32(0.1)``) are accepted wherever Python numbers are.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np


def _prefix(owner: str | None) -> str:
    return f"{owner}: " if owner else ""


def is_integer(value: Any) -> bool:
    """True for Python and NumPy integers, False for bools and everything else."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real(value: Any) -> bool:
    """True for Python and NumPy integers and floats, False for bools and everything else."""
    return (isinstance(value, (int, float, np.integer, np.floating))
            and not isinstance(value, (bool, np.bool_)))


def _integer_kind(low: int) -> str:
    return {1: "a positive integer", 0: "a non-negative integer"}.get(low, f"an integer >= {low}")


def check_int(owner: str | None, name: str, value: Any, *, low: int = 1,
              high: int | None = None) -> int:
    """``value`` as a Python int in ``[low, high]``, else a ``ValueError`` naming ``name`` and
    the value (``Conv2D: filters must be a positive integer. Received filters=0``)."""
    if not is_integer(value) or value < low:
        raise ValueError(f"{_prefix(owner)}{name} must be {_integer_kind(low)}. "
                         f"Received {name}={value!r}")
    if high is not None and value > high:
        raise ValueError(f"{_prefix(owner)}{name} must be at most {high}. "
                         f"Received {name}={value!r}")
    return int(value)


def _finite(owner: str | None, name: str, value: Any) -> float:
    """``value`` as a finite Python float, or a ``ValueError`` naming ``name``."""
    if not is_real(value):
        raise ValueError(f"{_prefix(owner)}{name} must be a number. Received {name}={value!r}")
    try:
        v = float(value)
    except OverflowError:  # an int too large for a float
        v = math.inf
    if not math.isfinite(v):
        raise ValueError(f"{_prefix(owner)}{name} must be a finite number. "
                         f"Received {name}={value!r}")
    return v


def interval_text(low: float | None, high: float | None, low_open: bool = False,
                  high_open: bool = False) -> str:
    """``[0, 1)``-style text for the interval (an absent bound is open and infinite)."""
    lo = "-inf" if low is None else f"{low:g}"
    hi = "inf" if high is None else f"{high:g}"
    return (f"{'(' if low_open or low is None else '['}{lo}, "
            f"{hi}{')' if high_open or high is None else ']'}")


def check_number(owner: str | None, name: str, value: Any, *, low: float | None = None,
                 high: float | None = None, low_open: bool = False,
                 high_open: bool = False) -> float:
    """``value`` as a finite float within the bounds, else a ``ValueError`` naming ``name``,
    the bounds and the value received (``Adam: beta_1 must be in [0, 1). Received
    beta_1=1.5``)."""
    v = _finite(owner, name, value)
    bad = ((low is not None and (v <= low if low_open else v < low))
           or (high is not None and (v >= high if high_open else v > high)))
    if bad:
        raise ValueError(f"{_prefix(owner)}{name} must be in "
                         f"{interval_text(low, high, low_open, high_open)}. "
                         f"Received {name}={value!r}")
    return v


def check_positive(owner: str | None, name: str, value: Any) -> float:
    """A finite number > 0 (see :func:`check_number`)."""
    return check_number(owner, name, value, low=0.0, low_open=True)


def check_bool(owner: str | None, name: str, value: Any) -> bool:
    """``True`` or ``False`` (NumPy bools too), nothing else: ``shuffle=1`` is refused."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{_prefix(owner)}{name} must be True or False. "
                         f"Received {name}={value!r}")
    return bool(value)


def check_choice(owner: str | None, name: str, value: Any, choices: Iterable) -> Any:
    """``value`` when it is one of ``choices``, else a ``ValueError`` listing them."""
    options = list(choices)
    try:
        ok = value in options
    except TypeError:  # an unhashable or incomparable value
        ok = False
    if not ok:
        raise ValueError(f"{_prefix(owner)}{name} must be one of {options}. "
                         f"Received {name}={value!r}")
    return value
