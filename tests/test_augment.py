"""Data augmentation and per-channel normalisation (issue 20, item 6), against independent
references: the crops and flips of a naive loop over examples from the documented draws (Python
integers), the uniformity of the draws (chi-square at a fixed seed), numpy's mean and standard
deviation written out by hand; every parallel path (``sync`` threads, processes, MPI ranks) with
augmentation equal to the sequential one in float64; the work done by the prefetching thread;
and the bad values refused, naming them, before any work."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from cnn.augment import STREAM, InputPipeline, epoch_batches, make_augmentation
from cnn.backends.rng import GOLDEN, mix64, pass_key
from cnn.data import make_xor
from cnn.model import Sequential
from cnn.normalize import Normalization
from cnn.predict import load_model
from cnn.train import EpochOrders
from parallel_helpers import N, blobs, build, max_abs_diff, run_mpi_checks, train

CIFAR = {"pad": 4, "flip": True}


# ---- the documented draws, one example at a time ---------------------------------------------
def draw(seed: int, epoch: int, index: int, element: int, count: int) -> int:
    """The module docstring's formula with Python integers: draw ``element`` of example
    ``index`` in ``epoch``, an integer in ``[0, count)``."""
    row = mix64(pass_key(seed, STREAM, epoch) + (int(index) + 1) * GOLDEN)
    return ((mix64(row + (element + 1) * GOLDEN) >> 32) * count) >> 32


def naive_augment(x, indices, seed: int, epoch: int, pad: int, flip: bool) -> np.ndarray:
    """Pad each example with zeros, crop it at its drawn offset, flip it if drawn: a loop."""
    out = []
    for i in indices:
        padded = np.pad(x[i], ((0, 0), (pad, pad), (pad, pad)))
        top, left = draw(seed, epoch, i, 0, 2 * pad + 1), draw(seed, epoch, i, 1, 2 * pad + 1)
        crop = padded[:, top:top + x.shape[2], left:left + x.shape[3]]
        if flip and draw(seed, epoch, i, 2, 2) == 1:
            crop = crop[:, :, ::-1]
        out.append(crop)
    return np.array(out)


@pytest.mark.parametrize("spec, shape", [(CIFAR, (3, 8, 8)), ({"pad": 2}, (2, 5, 7)),
                                         ({"flip": True}, (1, 4, 6)),
                                         ({"pad": 3, "flip": True, "crop": [6, 9]}, (3, 6, 9))])
def test_the_batch_is_the_naive_crop_and_flip_of_each_example(spec, shape):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((30, *shape))
    indices = rng.permutation(30)[:11]
    pipeline = InputPipeline(make_augmentation(spec), seed=17)
    for epoch in (1, 2):
        got = pipeline.gather(x, indices, epoch, np.empty((11, *shape)))
        want = naive_augment(x, indices, 17, epoch, spec.get("pad", 0), spec.get("flip", False))
        np.testing.assert_array_equal(got, want)


def test_an_example_is_augmented_alike_in_any_batch_and_differently_each_epoch():
    """The draws are a function of (seed, epoch, index in the training set) alone: a batch
    position, a batch size, a shard (a rank gathers only its rows) change nothing."""
    x = np.random.default_rng(0).standard_normal((20, 3, 8, 8))
    pipeline = InputPipeline(make_augmentation("cifar"), seed=3)
    whole = pipeline.gather(x, np.arange(20), 1, np.empty((20, 3, 8, 8)))
    order = np.random.default_rng(1).permutation(20)
    for lo, hi in [(0, 7), (7, 9), (9, 20)]:
        part = pipeline.gather(x, order[lo:hi], 1, np.empty((hi - lo, 3, 8, 8)))
        np.testing.assert_array_equal(part, whole[order[lo:hi]])
    again = pipeline.gather(x, np.arange(20), 2, np.empty((20, 3, 8, 8)))
    assert not np.array_equal(again, whole)
    other_seed = InputPipeline(make_augmentation("cifar"), seed=4)
    assert not np.array_equal(other_seed.gather(x, np.arange(20), 1, np.empty_like(x)), whole)


def _chi_square(values: np.ndarray, count: int) -> float:
    observed = np.bincount(values, minlength=count)
    expected = len(values) / count
    return float(((observed - expected) ** 2 / expected).sum())


def test_offsets_and_flips_are_uniform_and_independent():
    """90 000 examples at a fixed seed (deterministic: no flaky bound): the offsets take each
    of 2 * 4 + 1 values, the flips each of 2, and (top, left) each of the 81 pairs, as often as
    a uniform draw would; the statistics are below chi-square's 0.1% critical values."""
    aug = make_augmentation("cifar")
    top, left, flipped = aug.draws(seed=11, epoch=3, indices=np.arange(90_000))
    assert top.min() == left.min() == 0 and top.max() == left.max() == 8
    assert _chi_square(top, 9) < 26.12  # 8 degrees of freedom
    assert _chi_square(left, 9) < 26.12
    assert _chi_square(flipped.astype(np.int64), 2) < 10.83  # 1
    assert _chi_square(top * 9 + left, 81) < 124.84  # 80
    # the flip is independent of the offsets: each (top, flip) pair as often
    assert _chi_square(top * 2 + flipped, 18) < 40.79  # 17


def test_the_draws_match_the_formula_one_by_one():
    aug = make_augmentation({"pad": 4, "flip": True})
    indices = np.array([0, 1, 7, 49_999, 2 ** 40])
    top, left, flipped = aug.draws(seed=2 ** 63 + 5, epoch=9, indices=indices)
    for b, i in enumerate(indices.tolist()):
        assert top[b] == draw(2 ** 63 + 5, 9, i, 0, 9)
        assert left[b] == draw(2 ** 63 + 5, 9, i, 1, 9)
        assert flipped[b] == (draw(2 ** 63 + 5, 9, i, 2, 2) == 1)


# ---- normalisation ---------------------------------------------------------------------------
def test_normalization_is_the_mean_and_std_of_each_channel():
    x = np.random.default_rng(2).uniform(0, 1, (2500, 3, 4, 5)).astype(np.float32)
    x[:, 1] *= 3.0
    norm = Normalization.of(x)  # in chunks of 1024 examples
    for c in range(3):
        values = x[:, c].astype(np.float64).ravel()
        mean = sum(values.tolist()) / len(values)
        std = (sum((v - mean) ** 2 for v in values.tolist()) / len(values)) ** 0.5
        assert norm.mean[c] == pytest.approx(mean, rel=1e-12)
        assert norm.std[c] == pytest.approx(std, rel=1e-12)
    out = norm.apply(x[:3])
    assert out.dtype == np.float32
    want = (x[:3].astype(np.float64) - np.array(norm.mean)[:, None, None]) \
        / np.array(norm.std)[:, None, None]
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
    constant = Normalization.of(np.full((4, 1, 2, 2), 5.0))
    assert constant.mean == (5.0,) and constant.std == (1.0,)  # only centred


def test_fit_normalises_training_and_prediction_alike(tmp_path):
    """fit(normalize=True) keeps the training split's statistics with the model: the training
    batches, evaluate, predict and a reloaded weights file all normalise the raw images."""
    x, y = blobs(40, channels=3)
    x = x * 4 + 2
    model = build("resnet")
    steps = []
    original = model.loss_and_grads

    def record(xb, *args, **kwargs):
        steps.append(np.array(xb))
        return original(xb, *args, **kwargs)

    model.loss_and_grads = record
    # NumPy: no JIT warm-up pass, so the first recorded pass is the first training step
    hist = model.fit(x, y, epochs=1, batch_size=8, seed=1, verbose=0, normalize=True,
                     optimizer={"type": "sgd", "lr": 0.01}, backend="numpy")
    mean, std = x.mean(axis=(0, 2, 3)), x.std(axis=(0, 2, 3))
    assert model.normalization.mean == pytest.approx(tuple(mean), rel=1e-12)
    assert hist.info["normalization"] == model.normalization.config()
    order = EpochOrders(1, 40)(1)
    manual = (x - mean[:, None, None]) / std[:, None, None]
    np.testing.assert_allclose(steps[0], manual[order[:8]], rtol=1e-12, atol=1e-12)
    logits = model.predict_logits(x)
    plain = Sequential.from_spec(model.spec(), input_shape=(3, 8, 8), dtype=np.float64)
    plain.set_weights(model.get_weights())
    np.testing.assert_allclose(logits, plain.predict_logits(manual), rtol=1e-12, atol=1e-12)
    assert model.evaluate(x, y) == plain.evaluate(manual, y)
    path = model.save_weights(tmp_path / "w.npz")
    loaded = load_model(path, backend=model.backend, dtype=np.float64)
    assert loaded.normalization == model.normalization
    np.testing.assert_array_equal(loaded.predict_logits(x), logits)
    assert "inputs normalised per channel" in loaded.summary()


# ---- every path the same batches -------------------------------------------------------------
AUGMENTED = {"kind": "layers", "augment": "cifar", "normalize": True}


@pytest.fixture(scope="module")
def sequential_augmented():
    return train(**AUGMENTED)


@pytest.mark.parametrize("strategy, workers", [("sync", 2), ("processes", 2)])
def test_workers_with_augmentation_equal_sequential(sequential_augmented, strategy, workers):
    """Batch norm, dropout and penalties over 2 epochs of 8 steps (batch 7 splits 4/3 and the
    epoch ends on a batch of one), with augmentation and normalisation, in float64."""
    ref, ref_hist = sequential_augmented
    got, hist = train(strategy, workers, **AUGMENTED)
    assert max_abs_diff(got, ref) < 1e-12
    np.testing.assert_allclose(hist.history["loss"], ref_hist.history["loss"], rtol=1e-12)
    assert hist.info["augment"] == {"pad": 4, "flip": True}


def test_augmentation_changes_the_training(sequential_augmented):
    plain, _ = train(kind="layers", normalize=True)
    assert max_abs_diff(plain, sequential_augmented[0]) > 1e-3


@pytest.fixture(scope="module")
def mpi_runs(tmp_path_factory):
    """The scenarios of ``mpi_checks.AUGMENT_SCENARIOS``, trained under ``mpiexec -n 2``."""
    return run_mpi_checks("augment", tmp_path_factory.mktemp("mpi_augment"))


@pytest.mark.parametrize("name", ["augment", "augment_resnet"])
def test_two_ranks_with_augmentation_equal_sequential(mpi_runs, name):
    from mpi_checks import AUGMENT_SCENARIOS
    _, kwargs = AUGMENT_SCENARIOS[name]
    ref, ref_hist = train(**kwargs)
    for rank in (0, 1):
        with np.load(mpi_runs / f"{name}.rank{rank}.npz") as f:
            got = {k: f[k] for k in f.files}
        assert max_abs_diff(got, ref) < 1e-12


# ---- the prefetching thread does the work ----------------------------------------------------
def test_the_prefetching_thread_augments_and_the_step_gets_the_augmented_batch(monkeypatch):
    x, y = blobs(30, channels=3)
    threads = []
    gather = InputPipeline.gather

    def recording_gather(self, *args, **kwargs):
        threads.append(threading.current_thread().name)
        return gather(self, *args, **kwargs)

    monkeypatch.setattr(InputPipeline, "gather", recording_gather)
    model = build("resnet")
    steps = []
    original = model.loss_and_grads

    def record(xb, *args, **kwargs):
        steps.append((threading.current_thread().name, np.array(xb)))
        return original(xb, *args, **kwargs)

    model.loss_and_grads = record
    # NumPy: no JIT warm-up pass, so every recorded pass is a training step
    model.fit(x, y, epochs=2, batch_size=8, seed=6, verbose=0, augment="cifar",
              optimizer={"type": "sgd", "lr": 0.01}, backend="numpy")
    assert len(threads) == len(steps) == 8 and set(threads) == {"prefetch"}
    assert all(name != "prefetch" for name, _ in steps)
    orders = EpochOrders(6, 30)
    want = np.concatenate([naive_augment(x, orders(e), 6, e, 4, True) for e in (1, 2)])
    np.testing.assert_array_equal(np.concatenate([xb for _, xb in steps]), want)


def test_epoch_batches_are_the_pipeline_batches_of_the_order():
    """What the Keras and PyTorch references train on: the epoch's examples in order, each
    augmented (and normalised) as fit's pipeline makes it."""
    x = np.random.default_rng(3).standard_normal((25, 3, 6, 6))
    norm = Normalization.of(x)
    pipeline = InputPipeline(make_augmentation({"pad": 3, "flip": True}), norm, seed=2)
    order = np.random.default_rng(5).permutation(25)
    got = epoch_batches(pipeline, x, order, 4, batch_size=6)
    # normalised, then padded with zeros (the channel's mean pixel) and cropped
    want = naive_augment(norm.apply(x), order, 2, 4, 3, True)
    np.testing.assert_allclose(got, want, rtol=1e-15, atol=1e-15)


# ---- bad values ------------------------------------------------------------------------------
@pytest.mark.parametrize("augment, message", [
    ("foo", "Received 'foo'"),
    ({"pad": -1}, "pad=-1"),
    ({"pad": 5}, "pad=5"),
    ({"flip": "maybe"}, "flip='maybe'"),
    ({"shift": 2}, "'shift'"),
    ({"pad": 2, "crop": 6}, "crop=[6, 6]"),
    (3, "augment=3"),
])
def test_bad_augmentations_are_refused_naming_the_value_before_any_work(augment, message):
    x, y = blobs(20)
    model = build("plain")
    before = model.get_weights()
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        model.fit(x, y, epochs=1, batch_size=5, augment=augment, verbose=0)
    assert all(np.array_equal(before[k], v) for k, v in model.get_weights().items())


def test_augmenting_a_non_image_dataset_is_refused():
    x, y = make_xor(40, dtype=np.float64)  # (N, 1, 1, 2): two features, not an image
    model = Sequential.from_spec([{"type": "flatten"}, {"type": "dense", "units": 2}],
                                 input_shape=(1, 1, 2), dtype=np.float64)
    with pytest.raises(ValueError, match=r"augment: needs images .* \(1, 1, 2\)"):
        model.fit(x, y, epochs=1, augment="cifar", verbose=0)


def test_no_augmentation_is_none():
    assert make_augmentation(None) is None and make_augmentation("none") is None
    assert make_augmentation({"pad": 0, "flip": False}) is None
    assert make_augmentation("pad=4,flip=true") == make_augmentation("cifar")
    assert make_augmentation("cifar").text() == "pad=4,flip=true"


# ---- the references train on the same batches -----------------------------------------------
@pytest.mark.parametrize("framework", ["torch", "keras"])
def test_the_references_train_on_the_same_augmented_batches(framework):
    """fit_torch and fit_keras with augmentation and normalisation follow fit on the test
    ResNet (SGD, momentum, coupled weight decay) over 2 epochs of 6 steps in float64: same
    accuracies (and PyTorch's losses), same trained parameters, same normalisation kept with
    the model."""
    if framework == "torch":
        torch = pytest.importorskip("torch")
        torch.set_num_threads(1)
        from cnn.reference.torch import fit_torch as fit_reference
    else:
        pytest.importorskip("tensorflow")
        from cnn.reference.keras import configure_threads, fit_keras as fit_reference
        configure_threads(1)
    from parallel_helpers import RESNET_OPT
    x, y = blobs(48, channels=3)
    kw = dict(epochs=2, batch_size=8, optimizer=RESNET_OPT, seed=3, verbose=0,
              augment="cifar", normalize=True, validation_data=(x[:16], y[:16]))
    ours, theirs = build("resnet"), build("resnet")
    h_ours = ours.fit(x, y, **kw)
    h_ref = fit_reference(theirs, x, y, **kw)
    assert theirs.normalization == ours.normalization
    assert h_ref.info["augment"] == h_ours.info["augment"] == CIFAR
    # Keras's loss adds the coupled weight decay (an L2 penalty there), and PyTorch's running
    # variances are the unbiased ones (so its val_loss differs): see docs/resnet.md
    same = ("accuracy", "val_accuracy") + (("loss",) if framework == "torch" else ())
    for key in same:
        np.testing.assert_allclose(h_ref.history[key], h_ours.history[key], rtol=1e-9,
                                   err_msg=key)
    # fit_keras ends ~3e-8 from fit in float64 without augmentation too (its Model.fit loop)
    tol = 1e-9 if framework == "torch" else 1e-7
    scale = max(float(np.abs(v).max()) for v in ours.params.values())
    for k, v in ours.params.items():  # the nested conv's bias feeds batch norm: noise in both
        np.testing.assert_allclose(theirs.params[k], v, rtol=tol, atol=tol * scale, err_msg=k)
    plain = build("resnet")
    fit_reference(plain, x, y, **{**kw, "augment": None})
    assert max_abs_diff(plain.params, theirs.params) > 1e-3  # the reference did augment


# ---- the command line ------------------------------------------------------------------------
def test_train_augment_normalize_saves_what_predict_applies(tmp_path, capsys):
    from cnn.cli import main
    weights = tmp_path / "w.npz"
    rc = main(["train", "--dataset", "blobs", "--epochs", "1", "--quiet", "--limit", "100",
               "--test-limit", "40", "--dtype", "float64", "--augment", "--normalize",
               "--validation-split", "0", "--save", str(weights)])
    out = capsys.readouterr().out
    assert rc == 0 and "augment pad=4,flip=true, inputs normalised per channel" in out
    model = load_model(weights)
    from cnn.data import load_dataset
    data = load_dataset("blobs", limit=100, test_limit=40, dtype=np.float64)
    norm = Normalization.of(data.x_train)
    assert model.normalization.mean == pytest.approx(norm.mean, rel=1e-12)
    test_accuracy = float(out.split("final test accuracy ")[1].split()[0])
    assert test_accuracy == pytest.approx(model.evaluate(data.x_test, data.y_test)["accuracy"],
                                          abs=1e-4)


def test_config_file_takes_augment_and_normalize(tmp_path):
    from cnn.configs import load_config, train_one
    cfg = tmp_path / "m.yaml"
    cfg.write_text("defaults: {dataset: blobs, epochs: 1, limit: 60, test_limit: 20}\n"
                   "models: {a: {augment: 'pad=2,flip=true', normalize: true}, b: {}}\n")
    run, plain = load_config(cfg)
    assert (run.augment, run.normalize) == ("pad=2,flip=true", True)
    row, plain_row = train_one(run), train_one(plain)
    assert row["status"] == plain_row["status"] == "ok", row
    assert row["train_loss"] != plain_row["train_loss"]  # the same run but for the two keys


# ---- the study's augment axis ----------------------------------------------------------------
def test_the_study_grid_has_an_augment_axis():
    from cnn.study.grid import expand_grid
    base = {"dataset": "blobs", "train_size": 64, "test_size": 32}
    runs = expand_grid({**base, "augment": [None, "cifar", "pad=4,flip=true", "pad=2"]},
                       include_unavailable=True)
    assert sorted(r["augment"] for r in runs) == ["", "pad=2,flip=false", "pad=4,flip=true"]
    plain = expand_grid(base, include_unavailable=True)[0]
    assert plain["augment"] == "" and plain["run_key"] == next(
        r["run_key"] for r in runs if r["augment"] == "")  # keys of runs without it unchanged
    for axes, match in [({"augment": "foo"}, "grid axis 'augment'.*'foo'"),
                        ({"augment": "pad=5"}, "'blobs'.*pad=5"),
                        ({"dataset": "xor", "model": "xor_mlp", "augment": "cifar"},
                         "'xor'.*needs images")]:
        with pytest.raises(ValueError, match=match):
            expand_grid({**base, **axes}, include_unavailable=True)


def test_the_estimate_charges_augmentation_where_it_is_on_the_critical_path():
    from cnn.study.estimate import AUGMENT_SECONDS_PER_IMAGE, estimate_seconds
    from cnn.study.grid import expand_grid
    grid = {"dataset": "blobs", "train_size": 1000, "test_size": 100, "epochs": 2,
            "path": ["sequential", "torch"], "augment": [None, "cifar"]}
    runs = expand_grid(grid, include_unavailable=True)
    seconds = {(r["path"], r["augment"]): s for r, s in zip(runs, estimate_seconds(runs))}
    assert seconds[("sequential", "pad=4,flip=true")] == seconds[("sequential", "")]
    assert seconds[("torch", "pad=4,flip=true")] - seconds[("torch", "")] == pytest.approx(
        2 * 1000 * AUGMENT_SECONDS_PER_IMAGE)


def test_a_study_run_trains_with_the_augmentation_of_its_row():
    from cnn.data import load_dataset
    from cnn.study.child import execute_run
    from cnn.study.grid import expand_grid
    run = expand_grid({"dataset": "blobs", "augment": "pad=2,flip=true", "train_size": 96,
                       "test_size": 32, "epochs": 2, "dtype": "float64"})[0]
    got = execute_run(run)
    data = load_dataset("blobs", limit=96, test_limit=32, seed=0, dtype=np.float64)
    model = Sequential.from_spec(run["model"], input_shape=data.input_shape,
                                 dtype=np.float64, seed=run["seed"])
    from cnn.study.grid import run_optimizer
    from cnn.presets import get_preset
    h = model.fit(data.x_train, data.y_train, epochs=2, batch_size=run["batch_size"],
                  optimizer=run_optimizer(run, get_preset(run["model"])), seed=run["seed"],
                  augment={"pad": 2, "flip": True}, verbose=0)
    np.testing.assert_allclose([e["train_loss"] for e in got["epochs"]], h.history["loss"],
                               rtol=1e-12)


def test_fit_under_mpiexec_takes_augmentation_as_fit_does():
    """The notebooks' launcher passes augment and normalize on to every rank's fit: two ranks
    end with the sequential run's weights (float64)."""
    pytest.importorskip("mpi4py")
    from cnn.data import load_dataset
    from cnn.parallel.launch import fit_under_mpiexec
    kwargs = dict(epochs=1, batch_size=16, seed=3, augment={"pad": 2, "flip": True},
                  normalize=True, optimizer={"type": "sgd", "lr": 0.05, "momentum": 0.9})
    res = fit_under_mpiexec(2, model="mnist_small", dataset="mnist_embedded", limit=64,
                            dtype="float64", backend="numpy", **kwargs)
    data = load_dataset("mnist_embedded", limit=64, dtype=np.float64)
    model = Sequential.from_spec("mnist_small", input_shape=data.input_shape,
                                 dtype=np.float64, seed=0, backend="numpy")
    hist = model.fit(data.x_train, data.y_train, verbose=0, **kwargs)
    assert res["info"]["augment"] == hist.info["augment"] == {"pad": 2, "flip": True}
    assert res["info"]["normalization"] == model.normalization.config()
    assert max_abs_diff(res["weights"], model.get_weights()) < 1e-12
