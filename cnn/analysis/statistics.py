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


# ---- the paired test of a speed-up, and its correction for many comparisons ------------------
def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz's method, as in
    Numerical Recipes 6.4), converged to 1e-15."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function ``I_x(a, b)`` (``a, b > 0``, ``0 <= x <= 1``)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                     + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """``P(|T| >= |t|)`` for Student's t with ``df`` degrees of freedom: ``I_{df/(df+t^2)}
    (df/2, 1/2)``."""
    if not math.isfinite(t):
        return 0.0 if not math.isnan(t) else float("nan")
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def paired_log_test(base: dict, other: dict) -> dict:
    """The paired test of a speed-up: Student's t-test of the per-seed log ratios
    ``log(base[s] / other[s])`` (seeds in both dicts, seed -> seconds) against 0, two-sided.

    Why a t-test on logs: a speed-up is a ratio, so its logarithm makes a slower and a faster
    run symmetric (``log 2 = -log 1/2``) and turns the multiplicative noise of run times into
    additive noise; and with 5 seeds the exact Wilcoxon signed-rank test cannot give a
    two-sided p below ``2/2^5 = 0.0625``, so after any correction for many comparisons it
    could never find a difference. The t-test assumes the log ratios are roughly normal.

    Returns ``{"n", "mean_log", "t", "df", "p"}``: ``p`` is NaN with fewer than 2 pairs; all
    pairs equal (no spread) give ``p = 0`` when their ratio is not 1, else 1."""
    seeds = sorted(set(base) & set(other))
    r = np.log([base[s] / other[s] for s in seeds]) if seeds else np.array([])
    n = len(r)
    if n < 2:
        return {"n": n, "mean_log": float(r.mean()) if n else float("nan"),
                "t": float("nan"), "df": float("nan"), "p": float("nan")}
    mean, sd = float(r.mean()), float(r.std(ddof=1))
    if sd == 0.0:
        t = math.copysign(math.inf, mean) if mean != 0.0 else 0.0
        return {"n": n, "mean_log": mean, "t": t, "df": n - 1.0,
                "p": 0.0 if mean != 0.0 else 1.0}
    t = mean / (sd / math.sqrt(n))
    return {"n": n, "mean_log": mean, "t": t, "df": n - 1.0, "p": t_two_sided_p(t, n - 1.0)}


def holm(pvalues) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (Holm 1979): sorted ascending, the ``i``-th of the
    ``m`` tested gets ``max_{j <= i} min(1, (m - j + 1) p_(j))``; rejecting where the adjusted
    value is below ``alpha`` holds the family-wise error rate at ``alpha`` for any
    dependence between the tests. NaN entries are not tests: they stay NaN and do not count
    in ``m``."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(np.isfinite(p))
    m = len(idx)
    if m == 0:
        return out
    order = idx[np.argsort(p[idx], kind="stable")]
    running = 0.0
    for j, i in enumerate(order):
        running = max(running, min(1.0, (m - j) * p[i]))
        out[i] = running
    return out


#: the family-wise error rate of the pays/loses verdicts
ALPHA = 0.05


def verdict(mean_log: float, p_adjusted: float, alpha: float = ALPHA) -> str:
    """``pays`` (faster than the base) or ``loses`` where the corrected p is below ``alpha``,
    by the sign of the mean log ratio; ``inconclusive`` otherwise (also without a test)."""
    if not (math.isfinite(p_adjusted) and p_adjusted < alpha) or mean_log == 0:
        return "inconclusive"
    return "pays" if mean_log > 0 else "loses"


# ---- what an interval is, said once ------------------------------------------------------------
#: interval kind -> its method, in the words every table and caption of the report uses
INTERVAL_METHODS = {
    "median": "distribution-free order-statistic interval of the median over {n} seeds",
    "ratio": "distribution-free order-statistic interval of the median of {n} per-seed "
             "ratios",
    "fit": "order-statistic interval of {n} per-seed fits",
    "band": "the fit's spread: the smallest to the largest measured/fitted ratio over its {n} "
            "points (a range of the measurements, no probability stated)",
}


def interval_text(kind: str, n, coverage=None) -> str:
    """The method and the coverage of an interval, e.g. ``"distribution-free order-statistic
    interval of the median over 5 seeds, coverage 94%"`` (``coverage`` a fraction; None
    where the kind states none)."""
    if kind not in INTERVAL_METHODS:
        raise ValueError(f"interval kind must be one of {sorted(INTERVAL_METHODS)}. "
                         f"Received {kind!r}")
    n = "?" if n is None or (isinstance(n, float) and math.isnan(n)) else int(n)
    text = INTERVAL_METHODS[kind].format(n=n)
    if coverage is not None and math.isfinite(float(coverage)):
        text += f", coverage {100 * float(coverage):.0f}%"
    return text
