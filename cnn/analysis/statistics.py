"""Statistics of the study: bootstrap intervals of medians and of ratios of medians, Amdahl's
law and its least-squares fit, the Karp-Flatt serial fraction. Pure functions of arrays."""
from __future__ import annotations

import math

import numpy as np


def bootstrap_medians(values, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``n_boot`` medians of resamples (with replacement, same size) of ``values``."""
    v = np.asarray(values, dtype=float)
    idx = rng.integers(0, len(v), size=(n_boot, len(v)))
    return np.median(v[idx], axis=1)


def percentile_interval(samples, level: float = 0.95) -> tuple[float, float]:
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(np.asarray(samples, dtype=float), [a, 1.0 - a])
    return float(lo), float(hi)


def median_ci(values, n_boot: int = 2000, level: float = 0.95, rng=None) -> tuple[float, float, float]:
    """``(median, lo, hi)``: percentile-bootstrap CI of the median; NaN bounds for n < 2."""
    v = np.asarray(values, dtype=float)
    med = float(np.median(v))
    if len(v) < 2:
        return med, float("nan"), float("nan")
    rng = rng if rng is not None else np.random.default_rng(0)
    return (med, *percentile_interval(bootstrap_medians(v, n_boot, rng), level))


def speedup_ci(baseline_times, times, n_boot: int = 2000, level: float = 0.95, rng=None):
    """``(S, lo, hi, samples)`` with ``S = median(baseline_times) / median(times)``; the CI is the
    percentile interval of the ratio over ``n_boot`` independent resamples of the repeats of
    both sides (NaN when either side has fewer than 2 repeats; ``samples`` is then None)."""
    b = np.asarray(baseline_times, dtype=float)
    t = np.asarray(times, dtype=float)
    s = float(np.median(b) / np.median(t))
    if len(b) < 2 or len(t) < 2:
        return s, float("nan"), float("nan"), None
    rng = rng if rng is not None else np.random.default_rng(0)
    samples = bootstrap_medians(b, n_boot, rng) / bootstrap_medians(t, n_boot, rng)
    return (s, *percentile_interval(samples, level), samples)


def amdahl_speedup(f, p):
    """Amdahl's law: the speed-up on ``p`` workers of a program with serial fraction ``f``."""
    f = np.asarray(f, dtype=float)
    p = np.asarray(p, dtype=float)
    return 1.0 / (f + (1.0 - f) / p)


def karp_flatt(s, p):
    """The experimentally determined serial fraction ``e = (1/S - 1/p) / (1 - 1/p)`` (Karp &
    Flatt 1990); NaN for ``p <= 1``."""
    s = np.asarray(s, dtype=float)
    p = np.asarray(p, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        e = (1.0 / s - 1.0 / p) / (1.0 - 1.0 / p)
    e = np.where(p > 1, e, np.nan)
    return float(e) if e.ndim == 0 else e


_GRID = np.linspace(0.0, 1.0, 1001)


def _amdahl_sse(f, p, s):
    f = np.asarray(f, dtype=float)[..., None]
    return ((s - amdahl_speedup(f, p)) ** 2).sum(axis=-1)


def fit_amdahl(p, s) -> float:
    """Least-squares serial fraction: ``argmin_{f in [0, 1]} sum_i (S_i - 1/(f + (1-f)/p_i))^2``
    over the points with finite ``S`` and ``p >= 1`` (NaN without a point at ``p > 1``).

    Minimised on a grid of step 1e-3, then by golden-section search in the bracketing cell to
    1e-12, so a noise-free ``S(p)`` gives back its ``f`` to rounding error.
    """
    p = np.asarray(p, dtype=float)
    s = np.asarray(s, dtype=float)
    keep = np.isfinite(p) & np.isfinite(s) & (p >= 1) & (s > 0)
    p, s = p[keep], s[keep]
    if not np.any(p > 1):
        return float("nan")
    i = int(np.argmin(_amdahl_sse(_GRID, p, s)))
    lo, hi = _GRID[max(i - 1, 0)], _GRID[min(i + 1, len(_GRID) - 1)]
    g = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = hi - g * (hi - lo), lo + g * (hi - lo)
    fc, fd = _amdahl_sse(c, p, s), _amdahl_sse(d, p, s)
    while hi - lo > 1e-12:
        if fc < fd:
            hi, d, fd = d, c, fc
            c = hi - g * (hi - lo)
            fc = _amdahl_sse(c, p, s)
        else:
            lo, c, fc = c, d, fd
            d = lo + g * (hi - lo)
            fd = _amdahl_sse(d, p, s)
    f = (lo + hi) / 2.0
    return float(0.0 if f < 1e-9 else 1.0 if f > 1 - 1e-9 else f)


# ---- distribution-free intervals for a median (order statistics) ---------------------------
def order_statistic_coverage(n: int, k: int) -> float:
    """Coverage of ``[x_(k), x_(n+1-k)]`` (1-based order statistics of ``n`` samples) for the
    population median: ``1 - 2 P(Binomial(n, 1/2) <= k - 1)``, whatever the distribution."""
    if n < 1 or not 1 <= k <= (n + 1) // 2:
        return float("nan")
    tail = sum(math.comb(n, i) for i in range(k)) / 2.0 ** n
    return 1.0 - 2.0 * tail


def median_interval(values, level: float = 0.95) -> tuple[float, float, float, float]:
    """``(median, lo, hi, coverage)``: the distribution-free order-statistic interval for the
    median (as asv does): the narrowest ``[x_(k), x_(n+1-k)]`` whose coverage is at least
    ``level``; when ``n`` is too small for that, the range ``[min, max]`` with the coverage it
    has (94% for n = 5, 75% for n = 3). ``coverage`` is NaN for n < 2 (no interval)."""
    v = np.sort(np.asarray(values, dtype=float))
    v = v[np.isfinite(v)]
    n = len(v)
    if n == 0:
        return (float("nan"),) * 4
    med = float(np.median(v))
    if n < 2:
        return med, float("nan"), float("nan"), float("nan")
    k = 1
    for j in range(1, (n + 1) // 2 + 1):
        if order_statistic_coverage(n, j) >= level:
            k = j
        else:
            break
    return med, float(v[k - 1]), float(v[n - k]), order_statistic_coverage(n, k)


def paired_ratios(base: dict, other: dict) -> np.ndarray:
    """``base[s] / other[s]`` for every seed ``s`` in both (dicts seed -> time)."""
    seeds = sorted(set(base) & set(other))
    return np.array([base[s] / other[s] for s in seeds], dtype=float)
