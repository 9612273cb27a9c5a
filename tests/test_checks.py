"""cnn.checks: the argument checks every layer, optimizer, schedule, callback, strategy and CLI
option goes through, and the argparse types built on the same tests."""
from __future__ import annotations

import argparse
import math

import numpy as np
import pytest

from cnn.checks import (check_bool, check_choice, check_int, check_known, check_number,
                        check_pair, check_positive, int_arg, is_integer, is_real, number_arg)


@pytest.mark.parametrize("value, integer, real", [
    (3, True, True), (np.int64(3), True, True), (np.uint8(3), True, True),
    (2.0, False, True), (np.float32(0.5), False, True),
    (True, False, False), (np.bool_(True), False, False),
    ("3", False, False), (None, False, False), ([3], False, False),
])
def test_integer_and_real_refuse_bools(value, integer, real):
    assert is_integer(value) is integer
    assert is_real(value) is real


def test_check_int_bounds_and_messages():
    assert check_int("Conv2D", "filters", np.int64(8)) == 8
    assert type(check_int("Conv2D", "filters", np.int64(8))) is int
    with pytest.raises(ValueError, match=r"^Conv2D: filters must be a positive integer\. "
                                         r"Received filters=0$"):
        check_int("Conv2D", "filters", 0)
    with pytest.raises(ValueError, match=r"^patience must be a non-negative integer\. "
                                         r"Received patience=-1$"):
        check_int(None, "patience", -1, low=0)
    with pytest.raises(ValueError, match=r"must be an integer >= 2\. Received n=True"):
        check_int(None, "n", True, low=2)
    with pytest.raises(ValueError, match=r"threads must be at most 4\. Received threads=5"):
        check_int(None, "threads", 5, high=4)
    assert check_int(None, "seed", -7, low=None) == -7
    with pytest.raises(ValueError, match=r"seed must be an integer\. Received seed=1\.5"):
        check_int(None, "seed", 1.5, low=None)


def test_optional_accepts_none_and_says_so():
    assert check_int(None, "limit", None, optional=True) is None
    assert check_number(None, "target", None, optional=True) is None
    with pytest.raises(ValueError, match=r"limit must be a positive integer or None\. "
                                         r"Received limit=0"):
        check_int(None, "limit", 0, optional=True)
    with pytest.raises(ValueError, match=r"limit must be a positive integer\. Received limit=None"):
        check_int(None, "limit", None)


def test_check_pair():
    assert check_pair("Conv2D", "kernel_size", 3) == (3, 3)
    assert check_pair("Conv2D", "kernel_size", [3, np.int32(5)]) == (3, 5)
    with pytest.raises(ValueError, match=r"Conv2D: kernel_size must be an int or a pair\. "
                                         r"Received kernel_size=\(3, 3, 3\)"):
        check_pair("Conv2D", "kernel_size", (3, 3, 3))
    with pytest.raises(ValueError, match=r"kernel_size must be a positive integer\. "
                                         r"Received kernel_size=0"):
        check_pair("Conv2D", "kernel_size", (3, 0))


@pytest.mark.parametrize("value, kwargs, expected", [
    (1.5, dict(low=0.0, high=1.0, high_open=True), r"must be in \[0, 1\)\. Received x=1\.5"),
    (1.0, dict(low=0.0, high=1.0, high_open=True), r"must be in \[0, 1\)\. Received x=1\.0"),
    (0.0, dict(low=0.0, low_open=True), r"must be in \(0, inf\)\. Received x=0\.0"),
    (math.nan, {}, r"must be a finite number\. Received x=nan"),
    (10**400, {}, r"must be a finite number\. Received x=1000"),
    ("half", {}, r"must be a number\. Received x='half'"),
    (False, {}, r"must be a number\. Received x=False"),
])
def test_check_number_refuses(value, kwargs, expected):
    with pytest.raises(ValueError, match=expected):
        check_number("Owner", "x", value, **kwargs)


def test_check_number_accepts_numpy_scalars_as_floats():
    v = check_number(None, "rate", np.float32(0.25), low=0.0, high=1.0)
    assert v == 0.25 and type(v) is float
    assert check_positive(None, "lr", 3) == 3.0


def test_check_bool_and_choice():
    assert check_bool(None, "shuffle", np.bool_(False)) is False
    with pytest.raises(ValueError, match=r"shuffle must be True or False\. Received shuffle=1"):
        check_bool(None, "shuffle", 1)
    assert check_choice(None, "padding", "same", ("valid", "same")) == "same"
    with pytest.raises(ValueError, match=r"padding must be one of \['valid', 'same'\]\. "
                                         r"Received padding=\['same'\]"):
        check_choice(None, "padding", ["same"], ("valid", "same"))  # unhashable: refused


def test_check_known_reads_as_a_look_up():
    names = ["sequential", "threads"]
    assert check_known("grid axis 'path'", "path", "threads", names) == "threads"
    for bad in ("gpu", None, ["threads"]):
        with pytest.raises(ValueError, match=r"^grid axis 'path': unknown path .*; choose one of "
                                             r"\['sequential', 'threads'\]$"):
            check_known("grid axis 'path'", "path", bad, names)


def _parse(kind, text):
    p = argparse.ArgumentParser()
    p.add_argument("--x", type=kind)
    return p.parse_args(["--x", text]).x


@pytest.mark.parametrize("kind, text, value", [
    (int_arg(), "3", 3), (int_arg(low=0), "0", 0), (int_arg(low=None), "-4", -4),
    (number_arg(low=0.0, low_open=True), "1e-3", 1e-3),
    (number_arg(low=0.0, high=1.0, high_open=True), "0", 0.0),
])
def test_argparse_types_accept(kind, text, value):
    assert _parse(kind, text) == value


@pytest.mark.parametrize("kind, text, expected", [
    (int_arg(), "0", "must be a positive integer. Received '0'"),
    (int_arg(), "1.5", "must be a positive integer. Received '1.5'"),
    (int_arg(low=0), "many", "must be a non-negative integer. Received 'many'"),
    (int_arg(high=8), "9", "must be at most 8. Received '9'"),
    (number_arg(low=0.0, low_open=True), "0", "must be in (0, inf). Received '0'"),
    (number_arg(low=0.0, low_open=True), "inf", "must be a finite number. Received 'inf'"),
    (number_arg(), "nan", "must be a finite number. Received 'nan'"),
    (number_arg(), "fast", "must be a number. Received 'fast'"),
    (number_arg(low=0.0, high=1.0, high_open=True), "1", "must be in [0, 1). Received '1'"),
])
def test_argparse_types_refuse_naming_the_option(kind, text, expected, capsys):
    with pytest.raises(SystemExit):
        _parse(kind, text)
    assert f"argument --x: {expected}" in capsys.readouterr().err
