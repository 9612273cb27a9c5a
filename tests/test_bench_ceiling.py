"""``python -m cnn bench ceiling``'s bookkeeping (its timings are never asserted): the shards its
workers pass, written out by hand, the summary's arithmetic on made-up rates, its refusal of a
batch too small to split, and a smoke run that leaves no worker process behind."""
from __future__ import annotations

import multiprocessing

import pytest

from cnn.bench import ceiling


def test_shards_are_the_sync_shards_of_every_batch_written_out():
    # 10 images in batches of 4: [0, 4), [4, 8), [8, 10)
    assert ceiling.shard_rows(10, 4, 2, 0) == [(0, 2), (4, 6), (8, 9)]
    assert ceiling.shard_rows(10, 4, 2, 1) == [(2, 4), (6, 8), (9, 10)]
    assert ceiling.shard_rows(10, 4, 1, 0) == [(0, 4), (4, 8), (8, 10)]
    # batches of 3: the first shard is the longer; the last batch of one image leaves worker 1
    # nothing, and an empty shard is no pass
    assert ceiling.shard_rows(10, 3, 2, 0) == [(0, 2), (3, 5), (6, 8), (9, 10)]
    assert ceiling.shard_rows(10, 3, 2, 1) == [(2, 3), (5, 6), (8, 9)]


def test_every_image_of_the_epoch_is_passed_once_by_the_workers_together():
    for n, bs, workers in [(1024, 32, 2), (1000, 128, 2), (37, 5, 3)]:
        seen = sorted(r for i in range(workers)
                      for lo, hi in ceiling.shard_rows(n, bs, workers, i) for r in range(lo, hi))
        assert seen == list(range(n))


def test_ceilings_split_into_fixed_costs_and_contention():
    rate = {"one_core": 1000.0, "one_core_half": 900.0, "threads": 1530.0, "processes": 1710.0,
            "fit_one_core": 950.0, "fit_sync": 1330.0, "fit_processes": 1520.0}
    out = ceiling.ceilings(rate)
    assert out["fixed_cost_factor"] == pytest.approx(1.8)  # 2 * 900 / 1000
    t, p = out["threads"], out["processes"]
    assert t["ceiling"] == pytest.approx(1.53) and p["ceiling"] == pytest.approx(1.71)
    assert t["contention_factor"] == pytest.approx(1530 / 1800)
    assert p["contention_factor"] == pytest.approx(1710 / 1800)
    assert t["fit_speedup"] == pytest.approx(1.4) and p["fit_speedup"] == pytest.approx(1.6)
    assert t["share_of_ceiling"] == pytest.approx(1.4 / 1.53)
    assert p["share_of_ceiling"] == pytest.approx(1.6 / 1.71)
    assert out["gil_factor"] == pytest.approx(1530 / 1710)  # the same halves, threads / processes


def test_a_batch_too_small_to_split_is_refused_before_any_work(monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("measured before refusing")
    monkeypatch.setattr(ceiling, "_comparison", no_work)
    with pytest.raises(ValueError, match="--batch-sizes 1: .* between 2 workers"):
        ceiling.suite(repeats=1, quick=True, presets=["mnist_small"], batch_sizes=[64, 1])


def test_smoke_run_reports_every_row_and_stops_its_workers(capsys):
    (result,) = ceiling.suite(repeats=1, quick=True, presets=["mnist_small"], batch_sizes=[32])
    assert set(result["rows"]) == {key for key, _ in ceiling.ROWS}
    assert all(r["median"] > 0 for r in result["rows"].values())
    assert set(result["summary"]) == {"fixed_cost_factor", "threads", "processes", "gil_factor"}
    out = capsys.readouterr().out
    assert "2 processes, passes of 16 each" in out and "share" in out and "gil" in out
    assert multiprocessing.active_children() == []
