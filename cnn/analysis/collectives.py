"""What an allreduce costs: the textbook cost of each algorithm MPICH has, the algorithm MPICH
picks for a message, and the fit of measured times to that algorithm's cost.

**The algorithms** (Thakur, Rabenseifner & Gropp, "Optimization of Collective Communication
Operations in MPICH", IJHPCA 2005, section 4.4), for ``n`` bytes on ``p`` ranks, ``alpha`` the
latency of one message, ``beta`` the time per byte a rank sends, ``gamma`` the time per byte
reduced, ``lg = log2 p`` for a power of two:

- recursive doubling: ``lg alpha + n lg beta + n lg gamma``: ``lg`` rounds, each exchanging
  all ``n`` bytes;
- Rabenseifner's reduce-scatter (recursive halving) + allgather (recursive doubling):
  ``2 lg alpha + 2 (p - 1) / p n beta + (p - 1) / p n gamma``: twice as many rounds, but
  each rank sends only ``2 (p - 1) / p n`` bytes, the least any allreduce can;
- ring (reduce-scatter and allgather around a ring): ``2 (p - 1) alpha + 2 (p - 1) / p n
  beta + (p - 1) / p n gamma``.

For ``p`` not a power of two, ``p' = 2^floor(lg p)`` ranks run the algorithm and the other
``p - p'`` first send their data to a partner and get the result back: one round and ``n``
bytes more on each side, before and after (MPICH's recursive doubling and Rabenseifner; the
ring needs no such step).

**MPICH's choice** (:func:`mpich_algorithm`): MPICH 4 and 5 select a blocking
``MPI_Allreduce`` on an intra-communicator from the table in their source,
``maint/tuning/coll/mpir/generic.json`` (``MPIR_CVAR_ALLREDUCE_INTRA_ALGORITHM=auto``): up to 8
bytes, a user-defined operation, or fewer elements than ``p'``: recursive doubling; every
other message: Rabenseifner. ``MPIR_CVAR_ALLREDUCE_SHORT_MSG_SIZE`` (2048 bytes) no longer
decides the blocking call there; it still does for ``MPI_Iallreduce`` (the same table's
``iallreduce`` entry: up to 2048 bytes recursive doubling, else Rabenseifner). Across hosts
(one rank per host) the ch4 device hands the whole allreduce to that choice. The bytes each
rank sends per call, which the emulated cluster's link counters show, tell the two apart for
``p >= 4`` (:func:`cost_terms`: ``n lg p`` against ``2 (p - 1) / p n``).

**The fit** (:func:`fit_allreduce`): ``t(n, p) = alpha rounds(n, p) + beta sent(n, p)`` over
every measured ``(n, p)`` at once, with the rounds and bytes of the algorithm MPICH picks for
each, by least squares on the relative error (small messages weigh as much as large ones).
With one algorithm ``beta`` and ``gamma`` cannot be told apart (the bytes reduced are a fixed
fraction of the bytes sent), so ``beta`` holds both: seconds per byte a rank sends, the link
and the reduction's arithmetic together. The fit reports its worst and median relative error.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

#: the allreduce algorithms of :func:`cost_terms`
ALGORITHMS = ("recursive_doubling", "reduce_scatter_allgather", "ring")
#: MPICH's default selection (maint/tuning/coll/mpir/generic.json): at most this many bytes,
#: recursive doubling whatever the count
TINY_MESSAGE_BYTES = 8


def pof2(p: int) -> int:
    """The largest power of two not above ``p`` (``p >= 1``)."""
    return 1 << (int(p).bit_length() - 1)


def mpich_algorithm(n_bytes: float, p: int, itemsize: int = 4, builtin_op: bool = True) -> str:
    """The algorithm MPICH 4/5 picks for a blocking ``MPI_Allreduce`` of ``n_bytes`` of
    elements of ``itemsize`` bytes on ``p`` ranks (see the module docstring)."""
    if n_bytes <= TINY_MESSAGE_BYTES or not builtin_op or n_bytes / itemsize < pof2(p):
        return "recursive_doubling"
    return "reduce_scatter_allgather"


def cost_terms(algorithm: str, n_bytes, p) -> tuple:
    """``(rounds, sent, reduced)`` of one allreduce of ``n_bytes`` on ``p`` ranks by
    ``algorithm``: the coefficients of ``alpha``, ``beta`` and ``gamma`` in its textbook
    cost, i.e. the messages, the bytes sent and the bytes reduced one after the other on
    its critical path (for a power of two ``p``: what every rank sends, receives and
    reduces). Arrays broadcast; ``p = 1`` costs nothing."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}. Received {algorithm!r}")
    n = np.asarray(n_bytes, dtype=float)
    p = np.asarray(p, dtype=float)
    q = np.vectorize(pof2, otypes=[float])(np.maximum(p, 1).astype(int))
    lg = np.log2(q)
    folded = p > q  # the ranks beyond p' fold in first and get the result last
    if algorithm == "recursive_doubling":
        rounds, sent, reduced = lg + 2 * folded, n * (lg + 2 * folded), n * (lg + folded)
    elif algorithm == "reduce_scatter_allgather":
        rounds = 2 * lg + 2 * folded
        sent = 2 * (q - 1) / q * n + 2 * folded * n
        reduced = (q - 1) / q * n + folded * n
    else:
        rounds, sent, reduced = 2 * (p - 1), 2 * (p - 1) / p * n, (p - 1) / p * n
    one = p <= 1
    return tuple(np.where(one, 0.0, v) for v in (rounds, sent, reduced))


def mpich_terms(n_bytes, p, itemsize: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """``(rounds, sent)`` of :func:`cost_terms` for the algorithm MPICH picks at each
    ``(n_bytes, p)`` (arrays of the same shape)."""
    n, p = np.broadcast_arrays(np.asarray(n_bytes, float), np.asarray(p, float))
    rounds, sent = np.empty(n.shape), np.empty(n.shape)
    for idx in np.ndindex(n.shape):
        algorithm = mpich_algorithm(n[idx], int(p[idx]), itemsize)
        r, s, _ = cost_terms(algorithm, n[idx], p[idx])
        rounds[idx], sent[idx] = r, s
    return rounds, sent


@dataclass
class AllreduceFit:
    """``t(n, p) = alpha rounds + beta sent`` for MPICH's choice of algorithm (module
    docstring): ``alpha`` in seconds per round, ``beta`` in seconds per byte sent, and the
    relative errors ``(fit - measured) / measured`` at the points fitted."""
    alpha: float
    beta: float
    itemsize: int = 4
    points: int = 0
    errors: list = field(default_factory=list)

    @property
    def worst_error(self) -> float:
        """The largest |relative error| over the fitted points."""
        return float(np.max(np.abs(self.errors))) if self.errors else math.nan

    @property
    def median_error(self) -> float:
        """The median |relative error| over the fitted points."""
        return float(np.median(np.abs(self.errors))) if self.errors else math.nan

    @property
    def ratio_range(self) -> tuple[float, float]:
        """The smallest and largest ``measured / fit`` over the fitted points: the fit times
        these two spans every measured point (the band the scaling model draws)."""
        if not self.errors:
            return 1.0, 1.0
        ratios = 1.0 / (1.0 + np.asarray(self.errors))
        return float(ratios.min()), float(ratios.max())

    def seconds(self, n_bytes, p):
        """Predicted seconds of one allreduce of ``n_bytes`` on ``p`` ranks."""
        rounds, sent = mpich_terms(n_bytes, p, self.itemsize)
        return self.alpha * rounds + self.beta * sent

    def to_dict(self) -> dict:
        return {**asdict(self), "worst_error": self.worst_error,
                "median_error": self.median_error}

    @classmethod
    def from_dict(cls, d: dict) -> "AllreduceFit":
        return cls(float(d["alpha"]), float(d["beta"]), int(d.get("itemsize", 4)),
                   int(d.get("points", 0)), [float(e) for e in d.get("errors", [])])


def fit_allreduce(n_bytes, p, seconds, itemsize: int = 4) -> AllreduceFit:
    """The least-squares fit on relative error of ``t = alpha rounds + beta sent`` to measured
    ``seconds`` at ``(n_bytes, p)`` (1-D arrays of one length), with ``alpha, beta >= 0``
    (a term that would come out negative is dropped and the other refitted)."""
    n = np.asarray(n_bytes, float)
    p = np.asarray(p, float)
    t = np.asarray(seconds, float)
    if not (n.shape == p.shape == t.shape and n.ndim == 1 and len(t) >= 2):
        raise ValueError(f"fit_allreduce needs 1-D n_bytes, p and seconds of one length >= 2. "
                         f"Received shapes {n.shape}, {p.shape}, {t.shape}")
    if not (np.all(t > 0) and np.all(np.isfinite(t))):
        raise ValueError("fit_allreduce needs positive finite seconds")
    rounds, sent = mpich_terms(n, p, itemsize)
    design = np.stack([rounds, sent], axis=1) / t[:, None]
    coef, *_ = np.linalg.lstsq(design, np.ones_like(t), rcond=None)
    if np.any(coef < 0):  # refit with the negative term at zero
        keep = int(np.argmax(coef))
        only, *_ = np.linalg.lstsq(design[:, [keep]], np.ones_like(t), rcond=None)
        coef = np.zeros(2)
        coef[keep] = max(float(only[0]), 0.0)
    alpha, beta = (float(c) for c in coef)
    errors = (alpha * rounds + beta * sent - t) / t
    return AllreduceFit(alpha, beta, itemsize, len(t), [float(e) for e in errors])


def wire_seconds_per_byte(rate_bit_per_s: float | None) -> float:
    """The link's own time per byte (``8 / rate``; 0 for an unshaped link)."""
    return 0.0 if not rate_bit_per_s else 8.0 / float(rate_bit_per_s)
