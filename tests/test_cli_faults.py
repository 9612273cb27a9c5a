"""``train`` when things go wrong: killed and resumed from ``--backup-dir``, stopped by SIGTERM
or Ctrl-C (also under ``mpiexec``), a full disk at save, checkpoint or plot time, out of
memory; and one behaviour for both entry points, ``python -m cnn`` and the ``parallel-cnn``
console script. Most tests reproduce a finding of the reliability pass on fa4b133 (issue 22)
and failed before its fix."""
from __future__ import annotations

import glob
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cnn.cli import main
from cnn.model import Sequential
from limits import run_cli

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MPIEXEC = BIN / "mpiexec"
SCRIPT = BIN / "parallel-cnn"
#: runs until a test stops it: on the Numba backend (the default) an epoch of it takes tens of
#: milliseconds, so a few dozen epochs would end before the signal and race the job's exit
LONG = ["train", "--dataset", "blobs", "--limit", "20000", "--test-limit", "64", "--epochs",
        "100000", "--quiet", "--seed", "3"]
needs_mpi = pytest.mark.skipif(not MPIEXEC.is_file(), reason=f"no mpiexec at {MPIEXEC}")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "PMIX_", "OMPI_"))}
    return {**env, "TF_CPP_MIN_LOG_LEVEL": "2"}


def start(argv, prefix=(sys.executable, "-m", "cnn"), **kw):
    """The command in a session of its own (its process group: what a terminal signals)."""
    return subprocess.Popen([*prefix, *map(str, argv)], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kw)


def wait_for_backup(proc, folder: Path, count: int = 1, timeout: float = 120) -> None:
    """Until ``folder`` holds backup number ``count`` or later (training is under way)."""
    from cnn.backup import backup_files
    deadline = time.monotonic() + timeout
    while not any(seq >= count for seq, _ in backup_files(folder)):
        if proc.poll() is not None:
            pytest.fail(f"the run ended first: {proc.communicate()}")
        assert time.monotonic() < deadline, "no backup in time"
        time.sleep(0.02)


def finish(proc, timeout: float = 120) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"still running after {timeout} s:\n{out}\n{err}")
    return proc.returncode, out, err


def weights(path) -> dict:
    with np.load(path) as f:
        return {k: f[k] for k in f.files if k != "__spec__"}


# ---- kill -9 and --backup-dir -----------------------------------------------------------------------
def test_train_killed_and_run_again_ends_with_the_uninterrupted_weights(tmp_path):
    run = [*LONG[:7], "--epochs", "4", "--quiet", "--seed", "3", "--backup-every", "40steps"]
    ref = start([*run, "--save", tmp_path / "ref.npz"])
    assert finish(ref)[0] == 0
    folder, save = tmp_path / "backups", tmp_path / "w.npz"
    killed = start([*run, "--save", save, "--backup-dir", folder])
    wait_for_backup(killed, folder, 3)
    os.killpg(killed.pid, signal.SIGKILL)
    finish(killed)
    assert not save.exists()
    again = start([*run, "--save", save, "--backup-dir", folder])
    code, out, err = finish(again)
    assert code == 0, err
    assert re.search(r"resuming from .*backup-\d+\.npz: in epoch \d after \d+ of \d+ batches",
                     err), err
    ref_w, got = weights(tmp_path / "ref.npz"), weights(save)
    assert all(np.array_equal(ref_w[k], got[k]) for k in ref_w)


# ---- SIGTERM and Ctrl-C -------------------------------------------------------------------------------
def started_training(proc, delay: float = 1.5) -> None:
    """Read the run's output until the line printed just before training starts, then wait
    ``delay`` seconds more (well into training)."""
    for line in proc.stdout:
        if line.startswith("weights will be saved to"):
            break
    else:
        pytest.fail(f"the run ended before training: {proc.communicate()}")
    time.sleep(delay)


def test_sigterm_stops_after_the_step_and_saves(tmp_path):
    """Audit finding 4: SIGTERM (timeout, Slurm, docker stop) ended train with 143 and nothing
    saved; now it stops as Ctrl-C does, after the step in progress, saves and exits 143."""
    save = tmp_path / "w.npz"
    proc = start([*LONG, "--save", save])
    started_training(proc)
    proc.send_signal(signal.SIGTERM)
    code, out, err = finish(proc)
    assert code == 143, err
    assert "SIGTERM: stopping after the current step" in err and "Traceback" not in err
    assert re.search(r"interrupted in epoch \d+ after \d+ of 18000 examples", err), err
    assert f"weights of the last completed step saved to {save}" in err
    Sequential.from_spec("mnist_small", input_shape=(1, 8, 8)).load_weights(save)


def leaked_segments(since: float) -> list[str]:
    """MPICH's shared-memory segments made since ``since`` that no process maps any more
    (those of other jobs running now are mapped)."""
    mapped = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps) as f:
                mapped |= {line.split()[-1] for line in f if "/dev/shm/mpich_shm" in line}
        except OSError:
            continue
    return [p for p in glob.glob("/dev/shm/mpich_shm_*")
            if os.stat(p).st_mtime >= since - 1 and p not in mapped]


@needs_mpi
@pytest.mark.parametrize("launch", ["--ranks", "mpiexec"])
def test_ctrl_c_under_mpiexec_saves(tmp_path, launch):
    """Audit finding 2: Ctrl-C to `train --strategy mpi --ranks 2 --save w.npz` lost the
    weights and leaked a shared-memory segment, and under a hand-typed mpiexec it ended with
    exit 1 and nothing saved. Now every rank stops after the same step, rank 0 saves (and,
    with --backup-dir, writes a backup of that step), the job exits 130 and MPICH removes its
    segments."""
    started = time.time()
    save, folder = tmp_path / "w.npz", tmp_path / "backups"
    argv = [*LONG, "--strategy", "mpi", "--save", save]
    if launch == "--ranks":
        proc = start([*argv, "--ranks", "2", "--backup-dir", folder])
    else:
        proc = start(argv, prefix=(str(MPIEXEC), "-n", "2", sys.executable, "-m", "cnn"))
    started_training(proc)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    code, out, err = finish(proc)
    assert code == 130, f"stdout:\n{out}\nstderr:\n{err}"
    assert "Ctrl-C: stopping after the current step" in err, err
    assert f"weights of the last completed step saved to {save}" in err, err
    assert "aborting" not in err and "Traceback" not in err, err
    Sequential.from_spec("mnist_small", input_shape=(1, 8, 8)).load_weights(save)
    if launch == "--ranks":
        backup = re.search(r"backup of that point in (\S+):", err).group(1)
        from cnn.backup import read_backup
        model = Sequential.from_spec("mnist_small", input_shape=(1, 8, 8))
        model.load_weights(save)
        for k, v in model.params.items():  # the backup and --save hold the same step
            np.testing.assert_array_equal(read_backup(backup).arrays[f"param/{k}"], v)
    assert not leaked_segments(started)


# ---- one behaviour for both entry points -----------------------------------------------------------
ENTRY_POINTS = {"python -m cnn": (sys.executable, "-m", "cnn"), "parallel-cnn": (str(SCRIPT),)}


@pytest.mark.skipif(not SCRIPT.is_file(), reason=f"no console script at {SCRIPT}")
def test_both_entry_points_fail_alike():
    results = []
    for prefix in ENTRY_POINTS.values():
        res = subprocess.run([*prefix, "train", "--dataset", "nope"], capture_output=True,
                             text=True, cwd=ROOT, env=_env(), timeout=120)
        results.append((res.returncode, res.stdout, res.stderr))
    assert results[0] == results[1]
    assert results[0][0] == 2 and results[0][2].startswith("error: --dataset: unknown")


@needs_mpi
@pytest.mark.skipif(not SCRIPT.is_file(), reason=f"no console script at {SCRIPT}")
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_a_rank_failing_before_training_ends_the_job_from_either_entry_point(tmp_path, entry):
    """Audit finding 3: under mpiexec, `parallel-cnn` hung when one rank failed outside fit
    (a file missing on one machine): the console script skipped run_main, so the failing rank
    finalised MPI and waited for the others, which waited for it. `python -m cnn` ended the
    job in a second with exit 2; both do now."""
    prefix = ENTRY_POINTS[entry]
    argv = ["train", "--strategy", "mpi", "--dataset", "blobs", "--limit", "64", "--quiet"]
    cmd = [str(MPIEXEC), "-n", "1", *prefix, *argv, ":",
           "-n", "1", *prefix, *argv, "--model", str(tmp_path / "missing.json")]
    t = time.monotonic()
    proc = start(cmd, prefix=())
    code, out, err = finish(proc, timeout=60)
    assert code == 2, err
    assert "missing.json" in err and "rank 1 of 2 ends with exit status 2" in err, err
    assert time.monotonic() - t < 45
    from cnn.parallel.launch import remove_orphan_segments
    remove_orphan_segments(since=t)


# ---- a full disk ----------------------------------------------------------------------------------
@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs filled to its last kilobyte (real ENOSPC; needs root to mount)."""
    mount = tmp_path / "full"
    mount.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {res.stderr.strip()}")
    try:
        with open(mount / "filler", "wb") as f:
            try:
                f.write(bytes(63 << 10))
            except OSError:
                pass
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


SHORT = ["train", "--dataset", "blobs", "--limit", "256", "--test-limit", "32", "--epochs",
         "2", "--quiet"]


def test_a_full_disk_at_save_time_keeps_the_training(full_disk, capsys, monkeypatch, tmp_path):
    """Audit finding 5: a full disk at --save time threw the finished training away with
    "[Errno 28]" and no option or file named."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)
    save = full_disk / "w.npz"
    rc = main([*SHORT, "--save", str(save)])
    err = capsys.readouterr().err
    assert rc == 4, err
    assert f"error: --save: [Errno 28] cannot write {save}: No space left on device" in err
    rescued = re.search(r"the trained weights were written to (\S+) instead", err).group(1)
    assert Path(rescued).parent == tmp_path
    Sequential.from_spec("mnist_small", input_shape=(1, 8, 8)).load_weights(rescued)


def test_a_failing_checkpoint_does_not_stop_the_training_or_save(full_disk, capsys, tmp_path):
    """Audit finding 5: a --checkpoint that could not be written also stopped --save to a
    healthy disk."""
    save = tmp_path / "w.npz"
    with pytest.warns(RuntimeWarning, match="ModelCheckpoint: .*No space left on device; "
                                            "training goes on"):
        rc = main([*SHORT, "--checkpoint", str(full_disk / "best.npz"), "--save", str(save)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert f"weights saved to {save}" in captured.out and save.is_file()
    assert "warning: --checkpoint: 2 write(s) failed" in captured.err


def test_an_unwritable_plot_is_refused_before_training(capsys):
    """Audit finding 5: --plot /proc/p.png was refused only after epoch 1."""
    rc = main([*SHORT, "--plot", "/proc/p.png"])
    captured = capsys.readouterr()
    assert rc == 2 and captured.err.startswith("error: --plot: cannot write the training "
                                               "curves to /proc/p.png")
    assert "epoch" not in captured.out  # nothing trained


@pytest.mark.parametrize("extra, message", [
    (["--backup-every", "2weeks"], "error: --backup-every must be 'epoch', 'N epochs', 'N steps'"),
    (["--restarts", "2"], "error: --restarts 2 relaunches an MPI job that this command starts"),
    (["--strategy", "mpi", "--ranks", "2", "--restarts", "2"], "give --backup-dir DIR"),
    (["--backup-dir", "/proc/x"], "error: --backup-dir: cannot write backups into /proc/x"),
])
def test_bad_backup_options_are_refused_before_training(capsys, extra, message):
    rc = main([*SHORT, *extra])
    captured = capsys.readouterr()
    assert rc == 2 and message in captured.err, captured.err
    assert "epoch" not in captured.out


# ---- other checks of the audit -------------------------------------------------------------------
def test_out_of_memory_is_an_error_line_not_a_traceback():
    """Audit finding 9: a MemoryError surfaced as a raw 17-frame traceback with exit 1."""
    # 1000 images x 80,000 filters x 6 x 6 float32 outputs: 11.5 GB, with 3 GiB to spare
    res = run_cli(["train", "--dataset", "blobs", "--limit", "1000", "--batch-size", "1000",
                   "--filters", "80000", "--validation-split", "0", "--epochs", "1",
                   "--quiet"], 3 << 30, cwd=ROOT, env=_env())
    assert res.returncode == 2, res.stderr[-3000:]
    assert re.search(r"^error: out of memory \(.*\); use a smaller --batch-size, --limit or "
                     r"model$", res.stderr, re.M), res.stderr[-3000:]
    assert "Traceback" not in res.stderr


def test_a_batch_larger_than_the_data_is_refused(capsys):
    """Audit finding 9: --batch-size larger than the data was not checked."""
    rc = main([*SHORT, "--batch-size", "100000"])
    captured = capsys.readouterr()
    assert rc == 2 and captured.err.startswith(
        "error: --batch-size 100000 is larger than the data: a step takes 100000 examples and "
        "there are 230 training examples after the validation split")
    assert "epoch" not in captured.out


def test_the_same_file_for_save_and_checkpoint_is_warned_about(tmp_path, capsys):
    """Audit finding 11: the same path for --save and --checkpoint gave no warning (the
    checkpoint's best weights are then replaced by the final ones)."""
    path = tmp_path / "w.npz"
    assert main([*SHORT, "--save", str(path), "--checkpoint", str(path)]) == 0
    assert (f"warning: --save and --checkpoint both name {path}: the best epoch's weights "
            f"written there are replaced by the final ones" in capsys.readouterr().err)


def test_save_weights_names_the_target_not_its_temporary():
    """Audit finding 11: save_weights("/proc/w.npz") named the temporary file (held since the
    structured-files work on this base; kept here as the audit's reproduction)."""
    model = Sequential.from_spec("mnist_small", input_shape=(1, 8, 8))
    with pytest.raises(OSError) as info:
        model.save_weights("/proc/w.npz")
    assert "cannot write /proc/w.npz" in str(info.value) and ".tmp" not in str(info.value)


def test_a_text_file_given_as_images_is_not_called_pickled(tmp_path):
    """Audit finding 11: a text file given as --images was reported as pickled data."""
    from cnn.predict import load_images
    path = tmp_path / "images.txt"
    path.write_text("0 1 2\n3 4 5\n")
    with pytest.raises(ValueError) as info:
        load_images(path, (1, 8, 8), np.float32)
    assert str(info.value) == (f"--images: {path} is not a NumPy .npy/.npz file (it starts "
                               f"with b'0 1 2\\n')")
    assert "pickle" not in str(info.value)
