"""The benchmark's arithmetic and bookkeeping (its timings are never asserted): FLOP counts by
hand, the ratios and targets of the summary on made-up rows, and the PyTorch contender
computing the same network as ours from the same weights."""
from __future__ import annotations

import numpy as np
import pytest

from cnn.bench.hardware import layer_flops, training_flops_per_image
from cnn.bench.peers import annotate, contenders, summary
from cnn.model import build_model


def test_flops_by_hand():
    model = build_model("cifar_tutorial", seed=0)
    fwd = {"conv2d": 2 * 32 * 30 * 30 * 3 * 9, "conv2d_1": 2 * 64 * 13 * 13 * 32 * 9,
           "conv2d_2": 2 * 64 * 4 * 4 * 64 * 9, "dense": 2 * 1024 * 64, "dense_1": 2 * 64 * 10}
    assert {r["layer"]: r["forward"] for r in layer_flops(model)} == fwd
    # forward + weight gradient + input gradient, none for the first layer
    assert training_flops_per_image(model) == 3 * sum(fwd.values()) - fwd["conv2d"] == 25_736_448
    mnist = build_model("mnist_small", seed=0)
    assert training_flops_per_image(mnist) == 2 * (2 * 8 * 26 * 26 * 9) + 3 * (2 * 1352 * 10)


def test_resnet_flops_by_hand_and_images_per_epoch():
    """ResNet-20's convs are its blocks' too; a preset without an entry in an images table
    gets the FLOPs of cifar_tutorial's entry, in whole batches of 128."""
    from cnn.bench.harness import epoch_images
    from cnn.bench.peers import IMAGES
    model = build_model("cifar_resnet20", seed=0)
    fwd = [r["forward"] for r in layer_flops(model)]
    by_stage = [2 * 16 * 32 * 32 * 16 * 9] * 6 + [2 * 32 * 16 * 16 * 16 * 9] + \
        [2 * 32 * 16 * 16 * 32 * 9] * 5 + [2 * 64 * 8 * 8 * 32 * 9] + [2 * 64 * 8 * 8 * 64 * 9] * 5
    assert fwd == [2 * 16 * 32 * 32 * 3 * 9, *by_stage, 2 * 64 * 10]
    assert training_flops_per_image(model) == 3 * sum(fwd) - fwd[0]
    assert epoch_images(IMAGES, "cifar_resnet20") == IMAGES["cifar_resnet20"]
    budget = IMAGES["cifar_tutorial"] * 25_736_448
    deep = training_flops_per_image(build_model("cifar_resnet56"))
    n = epoch_images(IMAGES, "cifar_resnet56")
    assert n % 128 == 0 and (n - 128) * deep < budget <= n * deep


def test_conv_algorithm_summary_covers_the_convs_of_residual_blocks():
    from cnn.backends.numba.backend import NumbaBackend
    from cnn.bench.conv_algorithms import conv_layers
    model = build_model("cifar_resnet20", seed=0)
    be = NumbaBackend(conv_algorithm="direct")
    named = conv_layers(model, be)
    assert len(named) == 19 and named[1] == "stage1_block1/conv2d 16->16 32x32: direct"
    assert conv_layers(model, be, named=False) == [
        "3->16 32x32: direct", "16->16 32x32: direct x6", "16->32 16x16: direct",
        "32->32 16x16: direct x5", "32->64 8x8: direct", "64->64 8x8: direct x5"]


def _row(name, family, threads, ips, malloc=False):
    return {"name": name, "family": family, "threads": threads, "images_per_sec": ips,
            "malloc_env": malloc, "repeats": 3}


def test_annotate_and_summary_ratios():
    rows = [_row("ours numpy", "ours", 1, 800), _row("ours numba", "ours", 1, 1000),
            _row("ours numba +MALLOC_*", "ours", 1, 1020, malloc=True),
            _row("ours sync numba", "ours", 2, 1900),
            _row("ours processes numba", "ours", 2, 1800), _row("ours mpi numba", "ours", 2, 1750),
            _row("keras", "keras", 1, 1250),
            _row("keras", "keras", 2, 2000), _row("pytorch", "torch", 1, 500),
            _row("pytorch", "torch", 2, 950)]
    annotate(rows, flops=10_000_000, peak=100.0)
    numba = rows[1]
    assert numba["gflops"] == pytest.approx(10.0)
    assert numba["fraction_of_peak"] == pytest.approx(0.1)
    assert numba["ratio_keras"] == pytest.approx(0.8) and numba["ratio_torch"] == pytest.approx(2.0)
    assert rows[3]["fraction_of_peak"] == pytest.approx(19.0 / 200)  # two threads, two cores
    assert rows[3]["ratio_keras"] == pytest.approx(0.95)
    lines = summary({("cifar_tutorial", 128): rows})
    line = next(l for l in lines if "cifar_tutorial" in l and "128" in l)
    # best 1t = numba (the MALLOC_* row is a check, never the best), /keras1 0.80, /torch1 2.00,
    # best 2t sync numba /keras2 0.95 /torch2 2.00, sync/best1 1.90, processes 1.80 and MPI
    # 1.75 of the best 1t, malloc numba 1.02
    for figure in ("0.80", "2.00", "0.95", "1.90", "1.80", "1.75", "1.02"):
        assert figure in line, (figure, line)


def test_paired_ratios_are_taken_round_by_round():
    """Three rounds, the second on a machine twice as slow for every contender: each round's
    ratio (sync over numba: 2.0, 1.5, 1.8; ours over Keras: 1.5, 1.0, 1.0), their median and
    range; a contender that missed a round, or is absent, has none."""
    from cnn.bench.peers import paired_ratios

    def row(name, family, threads, seconds):
        return {**_row(name, family, threads, None), "images": 1200, "epoch_times": seconds}
    rows = [row("ours numba", "ours", 1, [1.0, 2.0, 1.2]),
            row("ours sync numba", "ours", 2, [0.5, 1 / 0.75, 1.2 / 1.8]),
            row("keras", "keras", 1, [1.5, 2.0, 1.2]),
            row("ours mpi numba", "ours", 2, [0.5, 1.0])]  # missed a round: no pairs
    for r in rows:
        r["images_per_sec"] = sorted(1200 / t for t in r["epoch_times"])[len(r["epoch_times"]) // 2]
    got = paired_ratios(rows)
    sync = got["sync/best1"]
    assert sync["median"] == pytest.approx(1.8) and sync["rounds"] == 3
    assert (sync["min"], sync["max"]) == (pytest.approx(1.5), pytest.approx(2.0))
    keras = got["/keras1"]  # ours / keras: 1.5, 1.0, 1.0
    assert (keras["median"], keras["min"], keras["max"]) == pytest.approx((1.0, 1.0, 1.5))
    assert got["mpi/best1"] is None and got["/torch1"] is None and got["proc/best1"] is None


def test_default_contenders_cover_the_issue():
    names = {(s.name, s.threads) for s in contenders()}
    for needed in [("ours numpy", 1), ("ours numba", 1), ("ours numba_parallel", 2),
                   ("ours sync numpy", 2), ("ours sync numba", 2), ("keras", 1), ("keras", 2),
                   ("pytorch", 1), ("pytorch", 2), ("ours numpy +MALLOC_*", 1),
                   ("ours processes numba", 2), ("ours mpi numba", 2)]:
        assert needed in names
    assert {(s.name, s.threads) for s in contenders(quick=True)} < names


@pytest.mark.parametrize("preset", ["mnist_small", "cifar_tutorial"])
def test_pytorch_contender_is_our_network(preset):
    torch = pytest.importorskip("torch", reason="PyTorch is an optional extra "
                                                "(requirements-bench.txt)")
    from cnn.bench.harness import synthetic_batch
    from cnn.reference.torch import build_torch_model

    model = build_model(preset, seed=0)
    x, _ = synthetic_batch(preset, 5)
    ours, _ = model.forward(x)
    with torch.no_grad():
        theirs = build_torch_model(model)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-5)


#: layers no preset has yet (batch norm, dropout, tanh, a conv NumPy does not fuse): the op
#: profile must cover them from the model's plan, with nothing of its own to edit
OPS_SPEC = {"input_shape": [3, 10, 10], "layers": [
    {"type": "conv2d", "filters": 4, "kernel_size": 3, "activation": "relu"},
    {"type": "maxpool2d", "pool_size": 2},
    {"type": "conv2d", "filters": 6, "kernel_size": 2},
    {"type": "batchnorm"}, {"type": "relu"},
    {"type": "flatten"}, {"type": "dropout", "rate": 0.2},
    {"type": "dense", "units": 7, "activation": "tanh"}, {"type": "dense", "units": 10}]}


def test_op_profile_rows_cover_every_layer_of_any_model_once():
    from cnn.bench.ops import BACKENDS, StepRun, rows
    model = build_model(OPS_SPEC, seed=0, dtype=np.float64)
    x = np.random.default_rng(0).standard_normal((5, 3, 10, 10))
    runs = {name: StepRun.of(model, name, x, np.arange(5)) for name in BACKENDS}
    table = rows(model, runs)
    # the rows, in order, hold every layer once, and each backend's ops tile each row
    assert "+".join(label for label, _ in table) == "+".join(l.name for l in model.layers)
    for name, run in runs.items():
        covered = [i for _, ops in table for i in ops[name]]
        assert covered == list(range(len(run.ops)))
    labels = [label for label, _ in table]
    assert "conv2d+relu+maxpool2d" in labels  # one op on Numba, three on NumPy
    assert "batchnorm+relu_1" in labels  # the BatchNorm+ReLU fusion: one op on every backend
    assert {"batchnorm", "dropout", "tanh"} <= {part for label in labels
                                                 for part in label.split("+")}


def test_op_profile_checks_and_times_a_model_it_has_never_seen(capsys):
    from cnn.bench.ops import bench
    totals = bench(OPS_SPEC, 4, np.float64, repeats=1)
    assert set(totals) == {"numpy", "numba", "numba_parallel"}
    out = capsys.readouterr().out
    for name in ("batchnorm+relu_1 fwd", "dropout bwd", "conv2d+relu+maxpool2d bwd"):
        assert name in out
def test_ddp_table_ratio_of_our_best_to_ddp():
    """Per contender the median, min and max over every timed epoch; our best over DDP's."""
    from cnn.bench.ddp import CONTENDERS, _summarise
    rows = {"ours mpi": [900.0, 1000.0, 1100.0], "ours mpi overlap": [1200.0, 1300.0, 800.0],
            "pytorch ddp": [600.0, 500.0, 400.0]}
    out = _summarise(rows)
    assert out["ours mpi"] == {"images_per_sec": 1000.0, "min": 900.0, "max": 1100.0,
                               "epochs": 3}
    assert out["best_ours_over_ddp"] == pytest.approx(1200.0 / 500.0)
    # processes share one host's memory: never run across emulated hosts
    assert CONTENDERS["ours processes"].one_host and not CONTENDERS["pytorch ddp"].one_host


@pytest.mark.parametrize("suite,option", [("threads", {"cluster": "1gbe"}),
                                          ("ddp", {"ranks": [2, 4]}),
                                          ("compression", {"variants": ["blocking"]})])
def test_suites_refuse_options_they_do_not_take(suite, option):
    from cnn.bench import OPTIONS, main
    (key, value), = option.items()
    with pytest.raises(ValueError, match=f"{OPTIONS[key]}.*the '{suite}' suite takes no"):
        main(suite, **option)


@pytest.mark.parametrize("text", ["2,x", "0", "", "2,-4"])
def test_bench_rank_counts_are_refused_naming_the_value(capsys, text):
    from cnn import cli
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "mpi", "--ranks", text])
    assert exit_.value.code == 2
    assert f"Received {text!r}" in capsys.readouterr().err


def test_backup_suite_times_both_contenders_on_one_backend(monkeypatch):
    """With and without backups the same fit, on the same named backend: it once compared
    NumPy without backups with fit's default (Numba) with them."""
    from cnn.bench import backup
    from cnn.model import Sequential
    backends, fit = [], Sequential.fit

    def recording_fit(self, *args, **kwargs):
        backends.append((kwargs.get("backend"), kwargs.get("backup_dir") is not None))
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(Sequential, "fit", recording_fit)
    (result,) = backup.suite(repeats=1, quick=True)
    assert {b for b, _ in backends} == {backup.BACKEND}
    assert {with_backup for _, with_backup in backends} == {True, False}
    assert result["backup_seconds"] > 0
