"""Backups of a fit and resuming from them (:mod:`cnn.backup`, ``fit(backup_dir=...)``).

The exact-resume tests really kill a training process with SIGKILL (tests/resume_checks.py
runs the training): at a random step, between two epochs, or in the middle of writing a
backup; a second process given the same backup folder continues, and its final weights must
equal, bit for bit, those of the same run never interrupted (trained here, in the test's own
process, or under ``mpiexec`` for MPI), and its history the same losses, accuracies and
learning rates (the timings differ: they are measured). Elastic resumes (a ``sync`` backup
continued with another number of workers) equal the uninterrupted run within the rounding of
reordered sums.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

from cnn.backup import (BackupError, BackupMismatchError, FitBackups, backup_files,
                        parse_every, read_backup)
from cnn.callbacks import Callback
from cnn.errors import Interrupted
from parallel_helpers import build, max_abs_diff
import resume_checks as rc

HERE = Path(__file__).resolve().parent
MPIEXEC = Path(sys.executable).parent / "mpiexec"
#: what the history of a resumed run must repeat exactly (the rest are timings)
SAME = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr")
STEPS = 18  # 40 training examples in batches of 7, 3 epochs


def reference(strategy="sequential", threads=1, dtype="float64", **overrides):
    """The uninterrupted run, in this process: (weights, history)."""
    x, y = rc.data(dtype)
    model = build("layers", np.dtype(dtype))
    hist = model.fit(x, y, strategy=strategy, threads=threads, verbose=0,
                     callbacks=rc.callbacks(), **{**rc.RUN, **overrides})
    return model.get_weights(), hist.history


def _env() -> dict:
    """This environment without an outer MPI job's launcher variables."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "PMIX_", "OMPI_"))}


def _command(out, backup, strategy, threads, dtype, ranks, *extra) -> list[str]:
    cmd = [sys.executable, str(HERE / "resume_checks.py"), str(out), str(backup), strategy,
           str(threads), dtype, *extra]
    return [str(MPIEXEC), "-n", str(ranks), *cmd] if ranks else cmd


def _steps(out: Path) -> list[tuple[str, int, int]]:
    path = Path(str(out) + ".steps")
    if not path.is_file():
        return []
    return [(w, int(n), int(p)) for w, n, p in (line.split() for line in
                                                path.read_text().splitlines() if line.strip())]


def killed_run(tmp_path, strategy, threads, dtype, *, at=None, ranks=None, extra=()) -> Path:
    """Start the run, SIGKILL its (master) process once it reports ``at`` (``("step", s)`` or
    ``("epoch", e)``; None: it kills itself, ``extra``), wait for its end; the backup folder."""
    backup, out = tmp_path / "backups", tmp_path / "killed"
    proc = subprocess.Popen(_command(out, backup, strategy, threads, dtype, ranks, *extra),
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 120
        while at is not None:
            seen = [s for s in _steps(out) if s[:2] == at]
            if seen:
                os.kill(seen[0][2], signal.SIGKILL)
                break
            assert proc.poll() is None, f"the run ended before {at}: {proc.communicate()}"
            assert time.monotonic() < deadline, f"no {at} within 120 s"
            time.sleep(0.005)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0, f"the run was not killed:\n{err}"
    assert not (tmp_path / "killed.npz").exists()
    return backup


def resumed_run(tmp_path, backup, strategy, threads, dtype, ranks=None):
    """Run again on ``backup``: (weights, history, info, standard error)."""
    out = tmp_path / "resumed"
    res = subprocess.run(_command(out, backup, strategy, threads, dtype, ranks), env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    with np.load(str(out) + ".npz") as f:
        weights = {k: f[k] for k in f.files}
    record = json.loads(Path(str(out) + ".json").read_text())
    return weights, record["history"], record["info"], res.stderr


def assert_same_run(ref, resumed, where=""):
    (w_ref, h_ref), (w, h) = ref, resumed
    assert sorted(w) == sorted(w_ref)
    differ = [k for k in w_ref if not np.array_equal(w_ref[k], w[k])]
    assert not differ, f"{where}: weights differ from the uninterrupted run's: {differ}"
    for key in SAME:
        assert h[key] == h_ref[key], f"{where}: history {key!r} differs"


# ---- exact resumes after SIGKILL ------------------------------------------------------------------
CASES = [("sequential", 1, "float64"), ("sequential", 1, "float32"), ("sync", 2, "float64"),
         ("sync", 2, "float32"), ("processes", 2, "float64"), ("processes", 2, "float32")]


@pytest.mark.parametrize("strategy, threads, dtype", CASES)
def test_killed_at_a_random_step_resumes_bitwise(tmp_path, strategy, threads, dtype):
    step = random.randrange(5, STEPS - 1)  # after the first backup (step 4)
    backup = killed_run(tmp_path, strategy, threads, dtype, at=("step", step))
    assert backup_files(backup), f"killed at step {step} before the first backup"
    weights, history, info, err = resumed_run(tmp_path, backup, strategy, threads, dtype)
    assert "resuming from" in err and info["resumes"], err
    assert_same_run(reference(strategy, threads, dtype), (weights, history),
                    f"{strategy} x{threads} {dtype} killed at step {step}")


def test_killed_between_epochs_resumes_bitwise(tmp_path):
    backup = killed_run(tmp_path, "sequential", 1, "float64", at=("epoch", 1))
    weights, history, info, err = resumed_run(tmp_path, backup, "sequential", 1, "float64")
    assert_same_run(reference(), (weights, history), "killed after epoch 1")


def test_killed_while_writing_a_backup_resumes_from_the_one_before(tmp_path):
    backup = killed_run(tmp_path, "sequential", 1, "float64", extra=("--die-in-write", "3"))
    # the third backup was cut short: its temporary is what the kill left, never a backup
    temporary, *names = sorted(p.name for p in backup.iterdir())
    assert names == ["backup-00000001.npz", "backup-00000002.npz"]
    assert temporary.startswith(".backup-00000003.npz.") and temporary.endswith(".tmp")
    weights, history, info, err = resumed_run(tmp_path, backup, "sequential", 1, "float64")
    assert "resuming from" in err and "backup-00000002.npz" in err
    assert info["resumes"][0]["global_step"] == 8
    assert not any(p.name.endswith(".tmp") for p in backup.iterdir())  # cleaned up
    assert_same_run(reference(), (weights, history), "killed while writing backup 3")


needs_mpi = pytest.mark.skipif(not MPIEXEC.is_file(), reason=f"no mpiexec at {MPIEXEC}")


@needs_mpi
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_mpi_ranks_killed_at_a_random_step_resume_bitwise(tmp_path, dtype):
    from cnn.parallel.launch import remove_orphan_segments
    started = time.time()
    step = random.randrange(5, STEPS - 1)  # after the first backup (step 4)
    try:
        ref_dir = tmp_path / "ref"
        ref_dir.mkdir()
        ref = resumed_run(ref_dir, ref_dir / "backups", "mpi", 1, dtype, ranks=2)
        backup = killed_run(tmp_path, "mpi", 1, dtype, at=("step", step), ranks=2)
        resumed = resumed_run(tmp_path, backup, "mpi", 1, dtype, ranks=2)
    finally:
        remove_orphan_segments(since=started)  # a killed job leaves MPICH's segments
    assert resumed[2]["resumes"], resumed[3]
    assert_same_run(ref[:2], resumed[:2], f"2 ranks {dtype} killed at step {step}")


@needs_mpi
def test_mpi_average_killed_at_a_random_step_resumes_bitwise(tmp_path):
    """mpi_average's backup gathers every rank's replica to rank 0 and scatters them back."""
    from cnn.parallel.launch import remove_orphan_segments
    started = time.time()
    step = random.randrange(5, 8)  # 3 global steps of 2 x 7 examples per epoch, 9 in all
    try:
        ref_dir = tmp_path / "ref"
        ref_dir.mkdir()
        ref = resumed_run(ref_dir, ref_dir / "backups", "mpi_average", 1, "float64", ranks=2)
        backup = killed_run(tmp_path, "mpi_average", 1, "float64", at=("step", step), ranks=2)
        resumed = resumed_run(tmp_path, backup, "mpi_average", 1, "float64", ranks=2)
    finally:
        remove_orphan_segments(since=started)
    assert resumed[2]["resumes"], resumed[3]
    assert_same_run(ref[:2], resumed[:2], f"mpi_average killed at step {step}")


# ---- elastic: sync continued with another number of workers ---------------------------------------
class StopAt(Callback):
    """Asks the strategy to stop after global step ``k`` (what Ctrl-C does)."""

    def __init__(self, k):
        self.k = k

    def on_step_end(self, step, logs):
        if logs["global_step"] == self.k:
            self.run.strategy.request_stop()


def stopped_then_resumed(tmp_path, first, second, k=9, dtype="float64", **options):
    """Train with ``first`` = (strategy, threads) until step ``k`` (a backup written at the
    stop), continue with ``second``; (weights, history, the Interrupted)."""
    x, y = rc.data(dtype)
    backup = tmp_path / "b"
    run = {**rc.RUN, "backup_dir": backup, "backup_every": "epoch", **options}
    with pytest.raises(Interrupted) as stop:
        build("layers", np.dtype(dtype)).fit(
            x, y, strategy=first[0], threads=first[1], verbose=0,
            callbacks=rc.callbacks() + [StopAt(k)], **run)
    model = build("layers", np.dtype(dtype))
    hist = model.fit(x, y, strategy=second[0], threads=second[1], verbose=0,
                     callbacks=rc.callbacks(), **run)
    return model.get_weights(), hist, stop.value


def test_a_run_with_augmentation_resumes_exactly(tmp_path):
    """The crops and flips are a function of (seed, epoch, example index): a run stopped in its
    second epoch continues with the draws the uninterrupted one made, and the normalisation
    it was trained with (the backup's identity holds both)."""
    options = {"augment": "cifar", "normalize": True}
    w_ref, h_ref = reference(**options)
    weights, hist, stop = stopped_then_resumed(tmp_path, ("sequential", 1), ("sequential", 1),
                                               **options)
    assert stop.epoch == 2 and hist.info["resumes"][0]["global_step"] == 9
    assert all(np.array_equal(weights[k], w_ref[k]) for k in w_ref)
    for key in SAME:
        assert hist.history[key] == h_ref[key], key
    plain, _ = reference(normalize=True)
    assert max_abs_diff(plain, w_ref) > 1e-3  # the augmentation was applied


@pytest.mark.parametrize("first, second", [(("sync", 2), ("sync", 3)),
                                           (("sequential", 1), ("processes", 2)),
                                           (("processes", 3), ("sync", 2))])
def test_a_sync_backup_continues_with_another_number_of_workers(tmp_path, first, second):
    w_ref, h_ref = reference()
    weights, hist, stop = stopped_then_resumed(tmp_path, first, second)
    assert stop.epoch == 2 and stop.backup is not None
    assert hist.info["resumes"][0]["written_by"]["threads"] == first[1]
    assert max_abs_diff(weights, w_ref) < 1e-10  # float64: the rounding of reordered sums
    np.testing.assert_allclose(hist.history["loss"], h_ref["loss"], rtol=1e-9)


@needs_mpi
def test_mpi_backup_continues_on_more_ranks(tmp_path):
    from cnn.parallel.launch import remove_orphan_segments
    started = time.time()
    step = random.randrange(5, STEPS - 1)  # after the first backup (step 4)
    try:
        backup = killed_run(tmp_path, "mpi", 1, "float64", at=("step", step), ranks=2)
        weights, history, info, err = resumed_run(tmp_path, backup, "mpi", 1, "float64",
                                                  ranks=3)
    finally:
        remove_orphan_segments(since=started)
    assert "written by strategy mpi ranks=2, continuing with mpi ranks=3" in err, err
    w_ref, h_ref = reference()
    assert max_abs_diff(weights, w_ref) < 1e-10
    np.testing.assert_allclose(history["loss"], h_ref["loss"], rtol=1e-9)


# ---- average and hogwild: what their definitions allow ---------------------------------------------
def test_average_resumes_bitwise_with_the_same_replicas(tmp_path):
    """A backup of ``average`` holds every replica and the averaging period's progress: the
    resumed run is the uninterrupted one, bit for bit (with as many replicas)."""
    opts = {"strategy_options": {"every": 2}}
    w_ref, h_ref = reference("average", 2, **opts)
    weights, hist, _ = stopped_then_resumed(tmp_path, ("average", 2), ("average", 2), k=3,
                                            **opts)
    assert_same_run((w_ref, h_ref), (weights, hist.history), "average")


def test_average_refuses_another_number_of_replicas(tmp_path):
    with pytest.raises(BackupMismatchError, match=r"training\.replicas: 2 in the backup, 3 now"):
        stopped_then_resumed(tmp_path, ("average", 2), ("average", 3), k=3)


def test_hogwild_resumes_from_the_state_of_the_step_boundary(tmp_path):
    """``hogwild``'s updates race by definition, so no two runs with several workers agree
    bit for bit; a backup, taken at a step boundary where no update is in flight, holds the
    weights and every worker's optimizer slots, and the resumed run starts from exactly
    those. With one worker there is no race: bit for bit."""
    w_ref, h_ref = reference("hogwild", 1)
    weights, hist, _ = stopped_then_resumed(tmp_path, ("hogwild", 1), ("hogwild", 1), k=5)
    assert_same_run((w_ref, h_ref), (weights, hist.history), "hogwild x1")
    x, y = rc.data("float64")
    backup = tmp_path / "h2"
    run = {**rc.RUN, "backup_dir": backup}
    with pytest.raises(Interrupted):
        build("layers").fit(x, y, strategy="hogwild", threads=2, verbose=0,
                            callbacks=[StopAt(4)], **run)
    saved = read_backup(backup_files(backup)[0][1])
    from cnn.parallel.threads import HogwildThreads
    strat = HogwildThreads(threads=2)
    original = strat.restore

    def restore(snapshot):  # the state the resumed fit starts from, before its first step
        original(snapshot)
        for key in strat.params:
            np.testing.assert_array_equal(strat.params[key], saved.arrays[f"param/{key}"])
            for name in strat.state.slots:
                np.testing.assert_array_equal(strat._slots[0][name][key],
                                              saved.arrays[f"slot/{name}/{key}"])
                np.testing.assert_array_equal(strat._slots[1][name][key],
                                              saved.arrays[f"strategy/slots/0/{name}/{key}"])
        restore.done = True
    restore.done = False
    strat.restore = restore
    model = build("layers")
    hist = model.fit(x, y, strategy=strat, verbose=0, **run)
    assert restore.done and hist.info["resumes"][0]["global_step"] == 4
    assert all(np.isfinite(v).all() for v in model.params.values())


# ---- the files: integrity, fall-back, refusals ------------------------------------------------------
def fit_with_backups(backup, every="2steps", epochs=2, dtype="float64", **kw):
    x, y = rc.data(dtype)
    model = build("layers", np.dtype(dtype))
    hist = model.fit(x, y, verbose=0, backup_dir=backup, backup_every=every,
                     **{**rc.RUN, "epochs": epochs, **kw})
    return model, hist


def test_the_last_two_backups_are_kept_and_hold_the_run(tmp_path):
    model, hist = fit_with_backups(tmp_path / "b")
    files = backup_files(tmp_path / "b")
    assert [seq for seq, _ in files] == [7, 6]  # 6 at steps 2..12, 1 at the end; 2 kept
    backup = read_backup(files[0][1])
    assert backup.meta["position"] == {"epoch": 2, "done": True, "stopped": False,
                                       "global_step": 12}
    for k, v in model.params.items():
        np.testing.assert_array_equal(backup.arrays[f"param/{k}"], v)
    for k, v in model.buffers.items():
        np.testing.assert_array_equal(backup.arrays[f"buffer/{k}"], v)
    state = model.optimizer_state
    assert backup.meta["optimizer_state"]["step"] == state.step == 12
    for name, slots in state.slots.items():
        for k, v in slots.items():
            np.testing.assert_array_equal(backup.arrays[f"slot/{name}/{k}"], v)
    assert backup.meta["history"]["loss"] == hist.history["loss"]


def test_a_damaged_newest_backup_falls_back_to_the_older_one(tmp_path, capsys):
    backup = tmp_path / "b"
    with pytest.raises(Interrupted):
        fit_with_backups(backup, epochs=3, callbacks=[StopAt(9)])
    newest = backup_files(backup)[0][1]
    data = bytearray(newest.read_bytes())
    with zipfile.ZipFile(newest) as z:
        info = z.getinfo("param/dense.w.npy")
    data[info.header_offset + 200] ^= 0xFF  # one flipped bit pattern inside an array
    newest.write_bytes(bytes(data))
    with pytest.raises(BackupError, match="integrity record|cannot be read"):
        read_backup(newest)
    _, hist = fit_with_backups(backup, epochs=3)
    err = capsys.readouterr().err
    assert f"{newest.name}" in err and "falling back to an older backup" in err
    assert "resuming from" in err and hist.info["resumes"][0]["global_step"] == 8
    assert (backup / (newest.name + ".damaged")).exists()


@pytest.mark.parametrize("change, named", [
    ({"spec": "dense units 11"}, "model.layers"),
    ({"data": True}, "data.train.crc32"),
    ({"batch_size": 6}, "training.batch_size: 7 in the backup, 6 now"),
    ({"dtype": "float32"}, "dtype: \"float64\" in the backup, \"float32\" now"),
    ({"optimizer": {"type": "sgd", "lr": 0.1}}, "training.optimizer"),
    ({"augment": "cifar"}, "training.augment"),
    ({"normalize": True}, "training.normalization"),
])
def test_a_backup_of_another_run_is_refused_naming_what_differs(tmp_path, change, named):
    backup = tmp_path / "b"
    fit_with_backups(backup, epochs=1)
    x, y = rc.data(change.get("dtype", "float64"))
    if change.get("data"):
        x = x * 1.001
    model = build("layers", np.dtype(change.get("dtype", "float64")))
    if "spec" in change:
        from cnn.model import Sequential
        from parallel_helpers import LAYERS_SPEC
        spec = [dict(layer) for layer in LAYERS_SPEC]
        spec[-1]["units"] = 11
        model = Sequential.from_spec(spec, input_shape=(1, 8, 8), dtype=np.float64, seed=3)
        y = y % 10
    kw = {**rc.RUN, "epochs": 1}
    kw.update({k: v for k, v in change.items()
               if k in ("batch_size", "optimizer", "augment", "normalize")})
    with pytest.raises(BackupMismatchError, match=named.replace("(", r"\(").replace(".", r"\.")
                       .replace("[", r"\[")) as info:
        model.fit(x, y, verbose=0, backup_dir=backup, **kw)
    assert str(backup_files(backup)[0][1]) in str(info.value)


def test_a_backup_that_cannot_be_written_warns_and_training_goes_on(tmp_path, monkeypatch):
    import cnn.backup as module

    def full(path, content):
        raise OSError(28, f"cannot write {path}: No space left on device")
    monkeypatch.setattr(module, "atomic_write", full)
    with pytest.warns(RuntimeWarning, match="backup not written: .*No space left on device; "
                                            "training goes on") as record:
        model, hist = fit_with_backups(tmp_path / "b")
    assert len(record) == 1  # once, not at every backup
    assert hist.epochs == 2 and not backup_files(tmp_path / "b")


@pytest.mark.parametrize("every, parsed", [("epoch", (1, "epoch")), ("2epochs", (2, "epoch")),
                                           ("100 steps", (100, "step")), (50, (50, "step")),
                                           ("1step", (1, "step"))])
def test_parse_every(every, parsed):
    assert parse_every(every) == parsed


@pytest.mark.parametrize("every", ["0steps", "steps", "2 weeks", 0, -3, True, 1.5, None])
def test_bad_frequencies_are_refused_naming_the_value(every):
    with pytest.raises(ValueError, match=f"Received backup_every={every!r}".replace("(", r"\(")
                       .replace(")", r"\)")):
        parse_every(every)


def test_a_finished_run_is_not_trained_again(tmp_path, capsys):
    backup = tmp_path / "b"
    model, hist = fit_with_backups(backup)
    again, hist2 = fit_with_backups(backup)
    assert "that run had finished: nothing is left to train" in capsys.readouterr().err
    assert hist2.history["loss"] == hist.history["loss"]
    for k, v in model.get_weights().items():
        np.testing.assert_array_equal(again.get_weights()[k], v)


def test_a_finished_run_continues_when_given_more_epochs(tmp_path):
    """A finished run's last backup continues into more epochs, as one longer run would (the
    optimizer here has no horizon that depends on the number of epochs)."""
    run = {"optimizer": {"type": "sgd", "lr": 0.05, "momentum": 0.9}}
    model_ref, h_ref = fit_with_backups(tmp_path / "ref", epochs=3, **run)
    fit_with_backups(tmp_path / "b", epochs=2, **run)
    model, hist = fit_with_backups(tmp_path / "b", epochs=3, **run)
    assert hist.history["loss"] == h_ref.history["loss"]
    for k, v in model_ref.get_weights().items():
        np.testing.assert_array_equal(model.get_weights()[k], v)


def test_epoch_orders_are_todays_and_a_function_of_seed_and_epoch():
    """The data order of epoch e is the e-th permutation drawn from default_rng(seed), as
    before backups existed, and a resumed fit asking for a later epoch first gets the same."""
    from cnn.train import EpochOrders
    rng = np.random.default_rng(7)
    today = [rng.permutation(50) for _ in range(4)]
    orders = EpochOrders(7, 50)
    for e in range(1, 5):
        np.testing.assert_array_equal(orders(e), today[e - 1])
    np.testing.assert_array_equal(EpochOrders(7, 50)(3), today[2])  # a later epoch first
    np.testing.assert_array_equal(orders(2), today[1])  # an earlier one again
    np.testing.assert_array_equal(EpochOrders(7, 50, shuffle=False)(2), np.arange(50))
