"""Number formatting for the report and its tables."""
from __future__ import annotations

import math

import pandas as pd


def is_missing(x) -> bool:
    """True for None, NaN and pandas' NA: a value the results do not have."""
    try:
        return x is None or (isinstance(x, float) and math.isnan(x)) or bool(pd.isna(x))
    except (TypeError, ValueError):
        return False


def fmt(x, digits: int = 3) -> str:
    """``digits`` significant figures (no exponent for ordinary magnitudes); '–' for NaN."""
    if x is None or is_missing(x):
        return "–"
    x = float(x)
    if x == 0:
        return "0"
    mag = math.floor(math.log10(abs(x)))
    dec = min(max(0, digits - 1 - mag), 4)
    text = f"{x:.{dec}f}"
    return "0" if float(text) == 0 else text


def fmt_ci(m, lo, hi, digits: int = 3) -> str:
    if is_missing(lo) or is_missing(hi):
        return fmt(m, digits)
    return f"{fmt(m, digits)} [{fmt(lo, digits)}, {fmt(hi, digits)}]"


def fmt_int(x) -> str:
    """An integer setting (batch size, filters, workers) as text; 'default' when missing."""
    return "default" if is_missing(x) else str(int(x))


def fmt_pct(x, digits: int = 1) -> str:
    """A fraction as a percentage with ``digits`` decimals (``0.953`` -> ``95.3%``)."""
    return "–" if is_missing(x) else f"{100 * float(x):.{digits}f}%"


def fmt_sig(x, digits: int = 2) -> str:
    """``x`` rounded to ``digits`` significant digits, trailing zeros kept (``38.9`` -> ``39``,
    ``123`` -> ``120``, ``4.04`` -> ``4.0``, ``0.01234`` -> ``0.012``); '–' for NaN."""
    if x is None or is_missing(x) or not math.isfinite(float(x)):
        return "–"
    x = float(x)
    if x == 0:
        return "0"
    mag = math.floor(math.log10(abs(x)))
    rounded = round(x, digits - 1 - mag)
    mag = math.floor(math.log10(abs(rounded)))  # 9.96 -> 10: one digit more before the point
    return f"{rounded:.{max(0, digits - 1 - mag)}f}"


def fmt_prediction(mid, lo=None, hi=None, digits: int = 2) -> str:
    """A predicted value, as the report quotes every prediction: two significant digits,
    its band when it has one, and the word: ``"39 [12, 21] (prediction)"``."""
    band = ("" if lo is None or hi is None or is_missing(lo) or is_missing(hi)
            else f" [{fmt_sig(lo, digits)}, {fmt_sig(hi, digits)}]")
    return f"{fmt_sig(mid, digits)}{band} (prediction)"
