"""The study's statistics against independent references: the paired t-test's p against the
closed forms of Student's t at 1 and 2 degrees of freedom and against its density integrated
numerically, the Holm-Bonferroni correction against a hand computation, oversubscribed points
out of every tally, efficiency and verdict (made-up rows with known answers), and the
two-significant-digit formatting of predictions."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from cnn import analysis as R
from cnn.analysis import statistics as S
from cnn.analysis.text import fmt_prediction, fmt_sig

from test_report import SEQ_ACC, _rows


@pytest.mark.parametrize("t", [0.3, 1.0, 2.5, 12.0])
def test_t_p_value_against_closed_forms(t):
    # df = 1 is the Cauchy distribution, df = 2 has F(t) = 1/2 + t / (2 sqrt(2 + t^2))
    assert S.t_two_sided_p(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(t), rel=1e-10)
    assert S.t_two_sided_p(-t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-10)


@pytest.mark.parametrize("df", [3, 4, 9])
def test_t_p_value_against_the_integrated_density(df):
    t = 2.1
    x = np.linspace(t, 400.0, 2_000_001)
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    dens = c * (1 + x * x / df) ** (-(df + 1) / 2)
    tail = float(np.sum((dens[1:] + dens[:-1]) / 2 * np.diff(x)))
    tail += c * df ** ((df + 1) / 2) / df * 400.0 ** (-df)  # the tail beyond 400, ~ x^-(df+1)
    assert S.t_two_sided_p(t, df) == pytest.approx(2 * tail, rel=1e-6)


def test_paired_log_test_by_hand():
    base = {0: 2.0, 1: 3.0, 2: 2.4, 3: 9.9}
    other = {0: 1.0, 1: 2.0, 2: 1.5}  # seed 3 has no pair
    r = [math.log(2.0), math.log(1.5), math.log(1.6)]
    mean = sum(r) / 3
    sd = math.sqrt(sum((v - mean) ** 2 for v in r) / 2)
    t = mean / (sd / math.sqrt(3))
    out = S.paired_log_test(base, other)
    assert out["n"] == 3 and out["df"] == 2
    assert out["mean_log"] == pytest.approx(mean) and out["t"] == pytest.approx(t)
    assert out["p"] == pytest.approx(1 - t / math.sqrt(2 + t * t))
    # the test is symmetric in which side is the base
    assert S.paired_log_test(other, base)["p"] == pytest.approx(out["p"])
    assert math.isnan(S.paired_log_test({0: 1.0}, {0: 2.0})["p"])
    assert S.paired_log_test({0: 2.0, 1: 4.0}, {0: 1.0, 1: 2.0})["p"] == 0.0  # no spread


def test_holm_by_hand():
    p = [0.01, 0.04, np.nan, 0.03, 0.005]
    # m = 4 tests: 4 x 0.005 = 0.02, 3 x 0.01 = 0.03, 2 x 0.03 = 0.06, max(1 x 0.04, 0.06)
    got = S.holm(p)
    np.testing.assert_allclose(got[[0, 1, 3, 4]], [0.03, 0.06, 0.06, 0.02])
    assert math.isnan(got[2])
    assert S.holm([0.6, 0.9])[1] == 1.0  # capped at 1
    assert S.verdict(0.3, 0.01) == "pays" and S.verdict(-0.3, 0.01) == "loses"
    assert S.verdict(0.3, 0.06) == "inconclusive" and S.verdict(0.3, np.nan) == "inconclusive"


def test_oversubscribed_points_are_out_of_the_tally_efficiency_and_verdicts():
    """2 recorded cores: sync x2 (p = 2) is tested, sync x4 (p = 4, oversubscribed, made much
    faster here) is neither tested, nor counted, nor given an efficiency, whatever machine
    analyses the rows."""
    seq = [(1.0,), (1.1,), (0.9,)]
    rows = _rows("sequential", "sequential", 1, seq, SEQ_ACC)
    rows += _rows("threads", "sync", 2, [(0.6,), (0.62,), (0.5,)], SEQ_ACC)
    rows += _rows("threads", "sync", 4, [(0.2,), (0.21,), (0.18,)], SEQ_ACC)
    df = pd.DataFrame(rows).assign(epochs=1, cores=2)
    s = R.summarize(df)
    t = s.table.set_index("label")
    x2, x4 = t.loc["threads/sync ×2"], t.loc["threads/sync ×4"]
    assert bool(x4["oversubscribed"]) and not bool(x2["oversubscribed"])
    assert math.isnan(x4["efficiency_best"]) and math.isnan(x4["efficiency"])
    assert x2["efficiency_best"] == pytest.approx(x2["speedup_best"] / 2)
    assert x4["speedup_best_verdict"] == "" and math.isnan(x4["speedup_best_p_holm"])
    # one test in the family: Holm leaves its p as it is
    expected = S.paired_log_test({0: 1.0, 1: 1.1, 2: 0.9}, {0: 0.6, 1: 0.62, 2: 0.5})["p"]
    assert x2["speedup_best_p_holm"] == pytest.approx(expected)
    v = R.speedup_verdicts(s.table)
    assert v["n"] == 1 and v["n_oversubscribed"] == 1
    assert [r["label"] for r in v["rows"]] == ["threads/sync ×2"]
    assert v["n_pays"] + v["n_loses"] + v["n_unclear"] == 1
    assert v["n_pays"] == (expected < 0.05)


def test_two_significant_digits_and_prediction_bands():
    assert [fmt_sig(x) for x in (38.9, 123.0, 4.04, 0.01234, 9.96, -3.14159, 7.6)] == \
        ["39", "120", "4.0", "0.012", "10", "-3.1", "7.6"]
    assert fmt_sig(float("nan")) == "–"
    assert fmt_prediction(38.9, 12.3, 21.04) == "39 [12, 21] (prediction)"
    assert fmt_prediction(7.64) == "7.6 (prediction)"


def test_every_interval_names_its_method_and_coverage():
    assert S.interval_text("ratio", 5, 0.9375) == (
        "distribution-free order-statistic interval of the median of 5 per-seed ratios, "
        "coverage 94%")
    assert "no probability" in S.interval_text("band", 12)
    with pytest.raises(ValueError, match="Received 'bootstrap'"):
        S.interval_text("bootstrap", 5)


def test_roofline_counts_of_a_conv_layer_by_hand():
    """3x3 convs of 3 -> 8 channels on 32x32 images (no padding: 30x30 out), then 8 -> 4
    (28x28 out), batch 4, float32: forward 2 x N x F x Ho x Wo x C x 3 x 3 FLOPs over the
    input, the weights and bias and the output; the first op's backward computes the weight
    gradient only, the second's the input gradient too (twice the FLOPs, dx written)."""
    from cnn.backends import get_backend
    from cnn.bench.roofline import op_counts
    from cnn.model import Sequential
    model = Sequential.from_spec({"layers": [{"type": "conv2d", "filters": 8, "kernel_size": 3},
                                             {"type": "conv2d", "filters": 4, "kernel_size": 3},
                                             {"type": "flatten"},
                                             {"type": "dense", "units": 10}]},
                                 input_shape=(3, 32, 32), dtype="float32", seed=0)
    ops = model.plan(get_backend("numpy"))
    assert [layer.name for layer in ops[0].layers] == ["conv2d"]
    n, flops = 4, 2 * 4 * 8 * 30 * 30 * 3 * 3 * 3
    x, w, out = n * 3 * 32 * 32, 8 * 3 * 3 * 3 + 8, n * 8 * 30 * 30
    counts = op_counts(model, ops[0], n)
    assert counts["forward"] == (flops, 4 * (x + w + out))
    assert counts["forward"][0] / counts["forward"][1] == pytest.approx(
        (2 * 8 * 900 * 27) / (4 * (3 * 1024 + 224 / 4 + 8 * 900)))
    assert counts["backward"] == (flops, 4 * (out + x + 2 * w))
    flops2, w2, out2 = 2 * 4 * 4 * 28 * 28 * 8 * 3 * 3, 4 * 8 * 3 * 3 + 4, n * 4 * 28 * 28
    second = op_counts(model, ops[1], n)
    assert second["forward"] == (flops2, 4 * (out + w2 + out2))
    assert second["backward"] == (2 * flops2, 4 * (out2 + 2 * out + 2 * w2))


def test_scaling_predictions_have_a_band_and_a_karp_flatt_reading():
    """Hand-made runs: one worker 100 s per epoch (90% compute), two workers 55 s with 5 s of
    reduction (cores = 2). The model predicts S(2) = 1/(0.45 + 0.1 + 0.05); measured 100/55.
    Beyond p = 2 its band is the model times min/max of (measured/predicted at p = 2, 1), and
    the Karp-Flatt reading carries e = (1/S - 1/2)/(1 - 1/2) of the measured S(2) by Amdahl's
    law."""
    from cnn.analysis.scaling import scaling_model
    rows = []
    for p, t in ((1, 100.0), (2, 55.0)):
        rows += _rows("threads", "sync", p, [(t,)] * 3, SEQ_ACC)
    rows += _rows("sequential", "sequential", 1, [(100.0,)] * 3, SEQ_ACC)
    df = pd.DataFrame(rows).assign(train_size=3200, epochs=1, cores=2, num_params=1000,
                                   comm_time=lambda d: np.where(d["threads"] == 2, 5.0, 0.0))
    m = scaling_model(R.summarize(df)).set_index("p")
    pred2, meas2 = 1 / (0.45 + 0.1 + 0.05), 100 / 55
    ratio = meas2 / pred2
    pred64 = 1 / (0.9 / 64 + 0.1 + 0.05)
    assert m.loc[64.0, "predicted_threads"] == pytest.approx(pred64)
    assert m.loc[64.0, "band_low"] == pytest.approx(pred64 * min(ratio, 1.0))
    assert m.loc[64.0, "band_high"] == pytest.approx(pred64 * max(ratio, 1.0))
    assert math.isnan(m.loc[2.0, "band_low"])  # a measured point has no band
    e = (1 / meas2 - 0.5) / 0.5
    assert m.loc[64.0, "karp_flatt_e"] == pytest.approx(e)
    assert m.loc[64.0, "karp_flatt_prediction"] == pytest.approx(1 / (e + (1 - e) / 64))
    from cnn.analysis.numbers import predictions
    row = predictions(m.reset_index())[0]
    assert row["model"] == fmt_prediction(pred64, pred64 * min(ratio, 1), pred64 * max(ratio, 1))
    assert row["model"].endswith("(prediction)")
