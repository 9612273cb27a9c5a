"""The scaling model on the emulated cluster's figures (:mod:`cnn.analysis.scaling`, its
cluster part), on made-up figures whose right answers are known: allreduce times made from
Rabenseifner's textbook cost with a known latency and bandwidth (half again as long where the
ranks outnumber the cores), one-core step parts, and training steps made from the model's own
formula worked out by hand."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cnn.analysis.scaling import (allreduce_table, cluster_fit, cluster_scaling,
                                  prediction_band, read_cluster)

ALPHA, BETA = 50e-6, 8e-9  # 50 us per round, 1 Gbit/s
SIZES = [1 << k for k in range(10, 25)]
T1, C1 = 0.040, 0.036  # one-core step: 36 ms computing, 4 ms the rest
PARAMS, ITEMSIZE = 122_570, 4
N_BYTES = PARAMS * ITEMSIZE
CONFIG = "cifar_tutorial/32"


def rabenseifner(n, p):
    """By hand: 2 log2 p rounds, 2 (p - 1) / p n bytes sent."""
    return ALPHA * 2 * np.log2(p) + BETA * 2 * (p - 1) / p * n


def step_by_hand(p, cores=2, slow=1.0):
    return C1 / min(p, cores) + (T1 - C1) + slow * rabenseifner(N_BYTES, p)


def made_up_record(noise: float = 0.0) -> dict:
    runs = {}
    for p in (2, 4, 8):
        slow = 1.0 if p <= 2 else 1.5  # oversubscribed: every allreduce half again as long
        rows = [{"bytes": n, "seconds": rabenseifner(n, p) * slow * (1 + noise * (-1) ** i),
                 "sent_per_call": 2 * (p - 1) / p * n} for i, n in enumerate(SIZES)]
        training = {CONFIG: {"blocking": {"step": step_by_hand(p)}}}
        runs[str(p)] = {"allreduce": rows, "training": training}
    return {"machine": {"cores": 2}, "ranks": [2, 4, 8],
            "profiles": {"1gbe": {"link": {"rate_bit_per_s": 1e9}, "runs": runs}},
            "one_core": {CONFIG: {"step": T1, "compute": C1, "parameters": PARAMS,
                                  "itemsize": ITEMSIZE}}}


def test_the_fit_uses_the_points_whose_ranks_had_a_core():
    fit = cluster_fit(made_up_record(), "1gbe")
    assert fit.alpha == pytest.approx(ALPHA, rel=1e-9) and fit.beta == pytest.approx(BETA, rel=1e-9)
    assert fit.points == len(SIZES)  # p = 2 alone


def test_allreduce_table_shows_oversubscription_and_the_link():
    t = allreduce_table(made_up_record())
    two, more = t[t["p"] == 2], t[t["p"] > 2]
    np.testing.assert_allclose(two["rel_error"], 0, atol=1e-9)
    np.testing.assert_allclose(more["rel_error"], 1 / 1.5 - 1, rtol=1e-9)
    assert more["oversubscribed"].all() and not two["oversubscribed"].any()
    assert (t["algorithm"] == "reduce_scatter_allgather").all()
    np.testing.assert_allclose(t["sent_per_byte"], t["expected_sent_per_byte"])
    # 16 MiB on 2 ranks: the link's 8 ns per byte is all but the whole time
    big = two[two["bytes"] == SIZES[-1]]["link_share"].iat[0]
    assert big == pytest.approx(BETA * SIZES[-1] / rabenseifner(SIZES[-1], 2), rel=1e-9)
    assert big > 0.99 and two[two["bytes"] == 1024]["link_share"].iat[0] < 0.1


def test_the_model_meets_every_measured_point():
    s = cluster_scaling(made_up_record())
    assert sorted(s["p"]) == [2, 4, 8]
    np.testing.assert_allclose(s["rel_error"], 0, atol=1e-9)
    np.testing.assert_allclose(s["measured_speedup"], [T1 / step_by_hand(p) for p in s["p"]])
    assert list(s["oversubscribed"]) == [p > 2 for p in s["p"]]


def test_the_prediction_to_64_and_its_band():
    exact = prediction_band(made_up_record(), CONFIG)
    p64 = exact[exact["p"] == 64].iloc[0]
    by_hand = T1 / (C1 / 64 + (T1 - C1) + ALPHA * 12 + BETA * 2 * 63 / 64 * N_BYTES)
    assert p64["speedup"] == pytest.approx(by_hand, rel=1e-9)
    assert p64["low"] == pytest.approx(p64["speedup"]) == pytest.approx(p64["high"])
    assert exact[exact["p"] == 1]["speedup"].iat[0] == pytest.approx(1.0)
    # measurements 10% off the fit either way: the band spans the allreduce 10% up and down
    noisy = prediction_band(made_up_record(noise=0.1), CONFIG)
    q = noisy[noisy["p"] == 64].iloc[0]
    assert q["low"] < q["speedup"] < q["high"]
    fit = cluster_fit(made_up_record(noise=0.1), "1gbe")
    low, high = fit.ratio_range
    comm = fit.alpha * 12 + fit.beta * 2 * 63 / 64 * N_BYTES
    assert q["low"] == pytest.approx(T1 / (C1 / 64 + T1 - C1 + high * comm), rel=1e-9)
    assert q["high"] == pytest.approx(T1 / (C1 / 64 + T1 - C1 + low * comm), rel=1e-9)


def test_read_cluster(tmp_path):
    assert read_cluster(tmp_path / "none.json") is None
    good = tmp_path / "c.json"
    good.write_text(json.dumps(made_up_record()))
    assert read_cluster(good)["ranks"] == [2, 4, 8]
    bad = tmp_path / "b.json"
    bad.write_text(json.dumps({"alpha": 1}))
    with pytest.raises(ValueError, match="no 'profiles'"):
        read_cluster(bad)


def test_the_figure_draws_a_band_per_profile():
    import matplotlib
    matplotlib.use("Agg")
    from cnn.analysis.figures import plot_cluster_scaling
    record = made_up_record(noise=0.1)
    record["profiles"]["10gbe"] = json.loads(json.dumps(record["profiles"]["1gbe"]))
    band, measured = prediction_band(record, CONFIG), cluster_scaling(record)
    fig = plot_cluster_scaling(band, measured, 2, CONFIG)
    ax = fig.axes[0]
    assert len(ax.collections) >= 2 + 2 * 2  # two bands, measured points per profile
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "model, 1gbe (prediction)" in labels and "model, 10gbe (prediction)" in labels
    assert plot_cluster_scaling(band, measured, 2, "mnist_small/32") is None


def test_the_report_in_words(tmp_path, capsys):
    from cnn.analysis.scaling import cluster_report, main
    lines = cluster_report(made_up_record())
    text = "\n".join(lines)
    assert "p = 2 : model error worst 0%" in text and "p = 4*: model error worst 33%" in text
    assert "sent/byte 1.50 (reduce_scatter_allgather: 1.50)" in text
    assert "cifar_tutorial/32    p = 8* measured" in text and "(+0%)" in text
    assert "predicted at p = 64, cifar_tutorial/32, 1gbe" in text
    path = tmp_path / "c.json"
    path.write_text(json.dumps(made_up_record()))
    assert main([str(path), "--figures", str(tmp_path / "fig")]) == 0
    assert (tmp_path / "fig" / "cluster_scaling_cifar_tutorial_32.png").is_file()
    assert "predicted at p = 64" in capsys.readouterr().out
