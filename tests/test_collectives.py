"""The allreduce cost models (:mod:`cnn.analysis.collectives`) against costs worked out by
hand from Thakur, Rabenseifner & Gropp (2005), MPICH's selection table, and fits to made-up
times whose parameters are known; the benchmark's variant names and its blocking-vs-overlap
arithmetic on made-up rows."""
from __future__ import annotations

import numpy as np
import pytest

from cnn.analysis.collectives import (AllreduceFit, cost_terms, fit_allreduce, mpich_algorithm,
                                      mpich_terms, pof2)
from cnn.bench.mpi import compare_with_blocking, variant_options

N = 1 << 20


@pytest.mark.parametrize("algorithm,p,want", [
    # lg p rounds of all n bytes
    ("recursive_doubling", 8, (3, 3 * N, 3 * N)),
    # 2 lg p rounds; 2 (p - 1) / p n sent, (p - 1) / p n reduced
    ("reduce_scatter_allgather", 8, (6, 1.75 * N, 0.875 * N)),
    ("reduce_scatter_allgather", 2, (2, N, 0.5 * N)),
    ("ring", 8, (14, 1.75 * N, 0.875 * N)),
    # p = 6: p' = 4 run the algorithm, 2 ranks fold in first (n to a partner) and get the
    # result last (n back): two rounds and 2n bytes more, n more reduced
    ("recursive_doubling", 6, (4, 4 * N, 3 * N)),
    ("reduce_scatter_allgather", 6, (6, 1.5 * N + 2 * N, 0.75 * N + N)),
    ("ring", 1, (0, 0, 0)),
])
def test_textbook_costs_by_hand(algorithm, p, want):
    assert [float(v) for v in cost_terms(algorithm, N, p)] == pytest.approx(want, rel=1e-12)


def test_unknown_algorithm_is_refused():
    with pytest.raises(ValueError, match="Received 'binomial'"):
        cost_terms("binomial", N, 4)


def test_mpich_picks_as_its_table_says():
    assert pof2(8) == 8 and pof2(7) == 4 and pof2(1) == 1
    assert mpich_algorithm(8, 2) == "recursive_doubling"           # tiny
    assert mpich_algorithm(1024, 8) == "reduce_scatter_allgather"  # 256 floats >= p' = 8
    assert mpich_algorithm(16, 8) == "recursive_doubling"          # 4 floats < p' = 8
    assert mpich_algorithm(1 << 20, 4, builtin_op=False) == "recursive_doubling"
    rounds, sent = mpich_terms([16, 4096], [8, 8])
    np.testing.assert_allclose(rounds, [3, 6])
    np.testing.assert_allclose(sent, [16 * 3, 4096 * 1.75])


def _grid():
    sizes = [1 << k for k in range(10, 25)]
    return np.array([n for p in (2, 4, 8) for n in sizes], float), \
        np.array([p for p in (2, 4, 8) for _ in sizes], float)


def test_the_fit_recovers_known_costs():
    n, p = _grid()
    alpha, beta = 50e-6, 8e-9  # 50 us per round, 1 Gbit/s
    rounds, sent = mpich_terms(n, p)
    fit = fit_allreduce(n, p, alpha * rounds + beta * sent)
    assert fit.alpha == pytest.approx(alpha, rel=1e-9) and fit.beta == pytest.approx(beta, rel=1e-9)
    assert fit.worst_error < 1e-9 and fit.points == len(n)
    assert float(fit.seconds(1 << 20, 64)) == pytest.approx(alpha * 12 + beta * 2 * 63 / 64 * (1 << 20))


def test_the_fit_states_its_errors():
    """Times 20% above the model at one point, exact elsewhere: the fit's worst error is
    about that point's, its median near zero, and its range spans every point."""
    n, p = _grid()
    rounds, sent = mpich_terms(n, p)
    t = 50e-6 * rounds + 8e-9 * sent
    t[5] *= 1.2
    fit = fit_allreduce(n, p, t)
    assert 0.1 < fit.worst_error < 0.2 and fit.median_error < 0.02
    low, high = fit.ratio_range
    assert low < 1 < high
    assert np.all(fit.seconds(n, p) * low <= t * (1 + 1e-12))
    assert np.all(fit.seconds(n, p) * high >= t * (1 - 1e-12))
    assert np.isclose(fit.seconds(n, p) * high, t, rtol=1e-12).any()  # the band is tight
    again = AllreduceFit.from_dict(fit.to_dict())
    assert again.alpha == fit.alpha and again.worst_error == fit.worst_error


def test_a_term_that_would_be_negative_is_dropped():
    n, p = _grid()
    _, sent = mpich_terms(n, p)
    fit = fit_allreduce(n, p, 8e-9 * sent * (1 + 0.01 * np.cos(n)))  # no latency at all
    assert fit.alpha >= 0 and fit.beta == pytest.approx(8e-9, rel=0.02)


def test_the_fit_refuses_bad_points():
    with pytest.raises(ValueError, match="positive finite"):
        fit_allreduce([1024, 2048], [2, 2], [1e-5, 0.0])
    with pytest.raises(ValueError, match="one length"):
        fit_allreduce([1024, 2048], [2], [1e-5, 2e-5])


@pytest.mark.parametrize("name,want", [
    ("blocking", {}), ("overlap", {"overlap": True}),
    ("overlap,bucket=262144,progress=layers", {"overlap": True, "bucket_bytes": 262144,
                                               "progress": "layers"}),
    ("overlap,interval=0.002", {"overlap": True, "progress_interval": 0.002}),
    ("compression=fp16", {"compression": "fp16"})])
def test_variant_names(name, want):
    assert variant_options(name) == want


@pytest.mark.parametrize("name", ["overlapped", "bucket=big", "overlap,speed=2", ""])
def test_bad_variant_names_are_refused_naming_the_item(name):
    with pytest.raises(ValueError, match="Received"):
        variant_options(name)


def test_blocking_vs_overlap_arithmetic():
    """Blocking: 40 ms steps of which 8 ms exposed (32 ms computing); an overlap with 50 ms
    steps would hide 75% of it by its own wait (2 ms) but adds 18 ms to the computation by
    its step time: -125%."""
    rows = {"blocking": {"images_per_sec": 800.0, "step": 0.040, "exposed": 0.008},
            "overlap": {"images_per_sec": 640.0, "step": 0.050, "exposed": 0.002}}
    compare_with_blocking(rows)
    o = rows["overlap"]
    assert o["speedup"] == pytest.approx(0.8) and o["hidden"] == pytest.approx(0.75)
    assert o["exposed_by_step"] == pytest.approx(0.018)
    assert o["hidden_by_step"] == pytest.approx(1 - 0.018 / 0.008)
    assert rows["blocking"]["hidden"] == pytest.approx(0.0)
