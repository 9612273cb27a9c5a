"""Argument checks, written once: every layer, optimizer, schedule, callback, strategy and CLI
option refuses a bad value through these, so every message has one form: the owner, the name,
what is expected, and the value received (``Adam: beta_1 must be in [0, 1). Received
beta_1=1.5``).

Python's ``bool`` is an ``int`` subclass, but ``epochs=True`` is surely a mistake: no check
here accepts a bool where a number is asked for. NumPy scalars (``np.int64(3)``,
``np.float32(0.1)``) are accepted wherever Python numbers are.

A value picked by name from a registry (a path, a preset, a data set) is refused in the form
of a look-up instead (:func:`check_known`: ``unknown path 'gpu'; choose one of [...]``).

Each check is a test that says what was expected (``_int_problem``, ``_number_problem``: None
when the value is fine) and one message built from it, so the ``check_*`` functions (for
Python values) and the ``*_arg`` factories (``argparse`` types for command-line text, whose
message argparse prefixes with the option: ``argument --epochs: must be a positive integer.
Received '0'``) refuse the same values with the same words.
"""
from __future__ import annotations

import argparse
import math
from typing import Any, Callable, Iterable

import numpy as np


def _prefix(owner: str | None) -> str:
    return f"{owner}: " if owner else ""


def _refuse(owner: str | None, name: str, expected: str, value: Any) -> ValueError:
    """The one message form: ``owner: name must be expected. Received name=value``."""
    return ValueError(f"{_prefix(owner)}{name} must be {expected}. Received {name}={value!r}")


def is_integer(value: Any) -> bool:
    """True for Python and NumPy integers, False for bools and everything else."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real(value: Any) -> bool:
    """True for Python and NumPy integers and floats, False for bools and everything else."""
    return (isinstance(value, (int, float, np.integer, np.floating))
            and not isinstance(value, (bool, np.bool_)))


def _integer_kind(low: int | None) -> str:
    if low is None:
        return "an integer"
    return {1: "a positive integer", 0: "a non-negative integer"}.get(low, f"an integer >= {low}")


def _int_problem(value: Any, low: int | None, high: int | None) -> str | None:
    """What ``value`` should have been, or None when it is an integer in ``[low, high]``."""
    if not is_integer(value) or (low is not None and value < low):
        return _integer_kind(low)
    if high is not None and value > high:
        return f"at most {high}"
    return None


def _or_none(expected: str, optional: bool) -> str:
    return f"{expected} or None" if optional else expected


def check_int(owner: str | None, name: str, value: Any, *, low: int | None = 1,
              high: int | None = None, optional: bool = False) -> int | None:
    """``value`` as a Python int in ``[low, high]`` (``low=None``: no lower bound), else a
    ``ValueError`` naming ``name`` and the value (``Conv2D: filters must be a positive integer.
    Received filters=0``). ``optional``: None is accepted (and returned) too."""
    if value is None and optional:
        return None
    problem = _int_problem(value, low, high)
    if problem is not None:
        raise _refuse(owner, name, _or_none(problem, optional), value)
    return int(value)


def check_pair(owner: str | None, name: str, value: Any, *, low: int = 1) -> tuple[int, int]:
    """An integer, or a list/tuple of two, as a pair ``(a, b)`` of ints ``>= low`` (Keras's
    ``kernel_size=3`` or ``(3, 5)``)."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise _refuse(owner, name, "an int or a pair", value)
        return (check_int(owner, name, value[0], low=low),
                check_int(owner, name, value[1], low=low))
    v = check_int(owner, name, value, low=low)
    return v, v


def interval_text(low: float | None, high: float | None, low_open: bool = False,
                  high_open: bool = False) -> str:
    """``[0, 1)``-style text for the interval (an absent bound is open and infinite)."""
    lo = "-inf" if low is None else f"{low:g}"
    hi = "inf" if high is None else f"{high:g}"
    return (f"{'(' if low_open or low is None else '['}{lo}, "
            f"{hi}{')' if high_open or high is None else ']'}")


def _as_float(value: Any) -> float:
    try:
        return float(value)
    except OverflowError:  # an int too large for a float
        return math.inf


def _number_problem(value: Any, low: float | None, high: float | None, low_open: bool,
                    high_open: bool) -> str | None:
    """What ``value`` should have been, or None when it is a finite number within bounds."""
    if not is_real(value):
        return "a number"
    v = _as_float(value)
    if not math.isfinite(v):
        return "a finite number"
    if ((low is not None and (v <= low if low_open else v < low))
            or (high is not None and (v >= high if high_open else v > high))):
        return f"in {interval_text(low, high, low_open, high_open)}"
    return None


def check_number(owner: str | None, name: str, value: Any, *, low: float | None = None,
                 high: float | None = None, low_open: bool = False, high_open: bool = False,
                 optional: bool = False) -> float | None:
    """``value`` as a finite float within the bounds, else a ``ValueError`` naming ``name``,
    the bounds and the value received (``Adam: beta_1 must be in [0, 1). Received
    beta_1=1.5``). ``optional``: None is accepted (and returned) too."""
    if value is None and optional:
        return None
    problem = _number_problem(value, low, high, low_open, high_open)
    if problem is not None:
        raise _refuse(owner, name, _or_none(problem, optional), value)
    return float(value)


def check_positive(owner: str | None, name: str, value: Any) -> float:
    """A finite number > 0 (see :func:`check_number`)."""
    return check_number(owner, name, value, low=0.0, low_open=True)


def check_bool(owner: str | None, name: str, value: Any) -> bool:
    """``True`` or ``False`` (NumPy bools too), nothing else: ``shuffle=1`` is refused."""
    if not isinstance(value, (bool, np.bool_)):
        raise _refuse(owner, name, "True or False", value)
    return bool(value)


def check_choice(owner: str | None, name: str, value: Any, choices: Iterable) -> Any:
    """``value`` when it is one of ``choices``, else a ``ValueError`` listing them."""
    options = list(choices)
    try:
        ok = value in options
    except TypeError:  # an unhashable or incomparable value
        ok = False
    if not ok:
        raise _refuse(owner, name, f"one of {options}", value)
    return value


def check_known(owner: str | None, what: str, value: Any, names: Iterable[str]) -> str:
    """``value`` when it is one of the registered ``names`` (of paths, presets, data sets),
    else a ``ValueError`` in the form of a look-up (``grid axis 'path': unknown path 'gpu';
    choose one of ['sequential', ...]``)."""
    options = list(names)
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{_prefix(owner)}unknown {what} {value!r}; choose one of {options}")
    return value


# ---- argparse types: the same checks on command-line text ---------------------------------------
def _arg_type(parse: Callable[[str], Any], problem: Callable[[Any], str | None],
              expected: str) -> Callable[[str], Any]:
    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            value, why = None, expected
        else:
            why = problem(value)
        if why is not None:
            raise argparse.ArgumentTypeError(f"must be {why}. Received {text!r}")
        return value
    convert.__name__ = expected  # argparse names the type in some of its own messages
    return convert


def int_arg(low: int | None = 1, high: int | None = None) -> Callable[[str], int]:
    """An ``argparse`` type: the text as an int in ``[low, high]`` (see :func:`check_int`)."""
    return _arg_type(int, lambda v: _int_problem(v, low, high), _integer_kind(low))


def number_arg(low: float | None = None, high: float | None = None, low_open: bool = False,
               high_open: bool = False) -> Callable[[str], float]:
    """An ``argparse`` type: the text as a finite float within the bounds (see
    :func:`check_number`)."""
    return _arg_type(float, lambda v: _number_problem(v, low, high, low_open, high_open),
                     "a number")
