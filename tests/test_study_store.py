"""The results store and the study's robustness (issue 13): the lock held for the whole study,
durable writes, torn/garbage/foreign/crafted files refused with their name before anything is
unpickled, bad ``--out``/``--timeout``/grid files refused before any run, the child dying with
its parent, stale temporary folders removed, and diverged runs recorded as such.

Each test reproduces the original problem first described in the issue. Runs use the synthetic
"blobs" set at tiny sizes (about one interpreter start-up each).
"""
from __future__ import annotations

import io
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cnn import results as store
from cnn.analysis import report_numbers, summarize
from cnn.cli import main as cli_main
from cnn.results import ResultsFileError, StudyLockedError, load_results, save_results
from cnn.study import expand_grid, run_study
from cnn.study import runner

ROOT = Path(__file__).resolve().parent.parent
TINY = {"dataset": "blobs", "model": "mnist_small", "train_size": 64, "test_size": 32,
        "batch_size": 32, "epochs": 1, "timeout": 120, "path": "sequential"}


class Counter:
    def __init__(self, check=None):
        self.calls, self.check = [], check

    def __call__(self, event):
        self.calls.append(event)
        if self.check:
            self.check(event)


def _cli(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "cnn", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=kw.pop("timeout", 180), env=env, **kw)


def _frame():
    return store.typed(pd.DataFrame([{"run_key": "k", "status": "ok", "dataset": "blobs",
                                      "threads": 1, "batch_size": 32, "filters": 8,
                                      "epochs": 1, "train_size": 64, "test_size": 32,
                                      "repeat": 0, "seed": 0, "cores": 2, "epoch": 1,
                                      "time": 0.5}]))


# ---- the file: integrity record, restricted unpickler -------------------------------------------
def test_users_still_get_a_pickled_dataframe(tmp_path):
    out = save_results(_frame(), tmp_path / "df.pkl")
    pd.testing.assert_frame_equal(pd.read_pickle(out), _frame())  # plain pandas reads it
    pd.testing.assert_frame_equal(load_results(out), _frame())
    assert out.read_bytes().endswith(b"\n") and b"CNN-RESULTS v1 sha256=" in out.read_bytes()


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[: len(b) // 2], "no integrity record"),            # torn: cut short
    (lambda b: b"", "empty"),
    (lambda b: os.urandom(3000), "not a results file"),              # garbage
    (lambda b: b[:100] + bytes([b[100] ^ 1]) + b[101:], "do not match"),  # a flipped bit
])
def test_torn_or_garbage_file_is_refused_with_its_name(tmp_path, damage, message):
    out = tmp_path / "conc.pkl"
    save_results(_frame(), out)
    out.write_bytes(damage(out.read_bytes()))
    with pytest.raises(ResultsFileError, match=message) as err:
        load_results(out)
    assert str(out) in str(err.value)
    # the study refuses it before any run (it would otherwise overwrite it)
    counter = Counter()
    with pytest.raises(ResultsFileError, match="conc.pkl"):
        run_study(TINY, out=out, progress=counter)
    assert counter.calls == []
    # and so does the report, with a one-line error naming the file, no traceback
    rc = _cli("report", "--results", str(out), "--out", str(tmp_path / "r.pdf"))
    assert rc.returncode == 2 and "conc.pkl" in rc.stderr and "Traceback" not in rc.stderr


def test_foreign_files_are_refused(tmp_path):
    plain = tmp_path / "plain.pkl"
    _frame().to_pickle(plain)  # a DataFrame pickle without the study's record
    with pytest.raises(ResultsFileError, match="no integrity record.*adopt"):
        load_results(plain)
    store.adopt(plain)  # the user vouches for it: checked, then the record is added
    pd.testing.assert_frame_equal(load_results(plain), _frame())
    other = tmp_path / "other.pkl"
    save_results(pd.DataFrame({"x": [1]}), other)  # intact, but not the study's schema
    with pytest.raises(ResultsFileError, match="lacks the columns"):
        load_results(other)


def test_crafted_pickle_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    payload = pickle.dumps(Evil())
    crafted = tmp_path / "df_results.pkl"
    crafted.write_bytes(payload + store._trailer(payload))  # even with a valid record
    with pytest.raises(ResultsFileError, match="refused to unpickle.*system"):
        load_results(crafted)
    assert not marker.exists()
    # hidden inside a real DataFrame's column
    df = pd.DataFrame({"run_key": [Evil()]})
    payload = pickle.dumps(df)
    crafted.write_bytes(payload + store._trailer(payload))
    with pytest.raises(ResultsFileError, match="refused"):
        load_results(crafted)
    assert not marker.exists()


def test_every_run_is_durable_before_the_next_starts(tmp_path, monkeypatch):
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    out = tmp_path / "df.pkl"
    seen = []

    def check(event):  # called after a run is saved, before the next one starts
        on_disk = load_results(out)
        assert event["config"]["run_key"] in set(on_disk["run_key"])
        seen.append(len(synced))

    run_study({**TINY, "batch_size": [16, 32]}, out=out, progress=Counter(check))
    # the file and its folder were fsynced for each run before the next began
    assert len(seen) == 2 and seen[0] >= 2 and seen[1] >= seen[0] + 2


# ---- concurrency: the lock ------------------------------------------------------------------------
def test_second_study_on_the_same_out_refuses_naming_the_first(tmp_path):
    out = tmp_path / "conc.pkl"
    with store.ResultsLock(out):  # a study is writing conc.pkl
        counter = Counter()
        with pytest.raises(StudyLockedError, match=f"another study is writing .*conc.pkl.*pid "
                                                   f"{os.getpid()}"):
            run_study(TINY, out=out, progress=counter)
        assert counter.calls == []
    run_study(TINY, out=out, progress=False)  # released: the next study runs
    assert load_results(out)["run_key"].nunique() == 1


def test_a_symlinked_out_shares_the_lock_and_stays_a_link(tmp_path):
    """Audit finding 10: a study writing through a symlink took a lock of its own beside the
    link (so two studies ran at once on one file) and replaced the link by a regular file
    (so their runs went to two files)."""
    real = tmp_path / "store" / "conc.pkl"
    real.parent.mkdir()
    link = tmp_path / "link.pkl"
    link.symlink_to(real)
    with store.ResultsLock(real):
        with pytest.raises(StudyLockedError):
            run_study(TINY, out=link, progress=False)
    run_study(TINY, out=link, progress=False)
    assert link.is_symlink() and load_results(real)["run_key"].nunique() == 1


def test_second_study_can_wait_for_the_first(tmp_path):
    out = tmp_path / "conc.pkl"
    lock = store.ResultsLock(out).acquire()
    threading.Timer(1.0, lock.release).start()
    t = time.monotonic()
    df = run_study(TINY, out=out, progress=False, wait=60)
    assert time.monotonic() - t >= 0.9 and df["run_key"].nunique() == 1


def test_two_studies_at_once_lose_nothing(tmp_path):
    """The issue's reproduction: grids A and B started at once on conc.pkl. The second waits
    (--wait) or refuses (exit 2, file untouched); either way no run of the other is lost."""
    out = tmp_path / "conc.pkl"
    files = []
    for name, sizes in (("a", [8, 16]), ("b", [24, 32])):
        f = tmp_path / f"{name}.json"
        f.write_text(json.dumps({**TINY, "batch_size": sizes}))
        files.append(f)
    a = subprocess.Popen([sys.executable, "-m", "cnn", "study", "--grid", str(files[0]),
                          "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    lock = store.lock_path(out)
    while (not lock.exists() or not lock.read_text()) and time.monotonic() < deadline:
        time.sleep(0.02)
    refused = _cli("study", "--grid", str(files[1]), "--out", str(out))
    waited = _cli("study", "--grid", str(files[1]), "--out", str(out), "--wait", "forever")
    assert a.wait(timeout=120) == 0, a.stdout.read()
    if refused.returncode != 0:  # it found A running
        assert refused.returncode == 2 and "another study is writing" in refused.stderr
    assert waited.returncode == 0, waited.stdout + waited.stderr
    df = load_results(out)
    assert sorted(df.drop_duplicates("run_key")["batch_size"]) == [8, 16, 24, 32]
    assert (df["status"] == "ok").all()


# ---- inputs refused before any run ----------------------------------------------------------------
@pytest.mark.parametrize("bad, message", [
    ("/proc/x/df.pkl", "cannot create its folder"),
    ("{file}/df.pkl", "is a file, not a folder"),
    ("{dir}", "is a folder"),
])
def test_bad_out_is_refused_before_any_run(tmp_path, bad, message):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    out = bad.format(file=a_file, dir=tmp_path)
    counter = Counter()
    with pytest.raises(ValueError, match=message):
        run_study(TINY, out=out, progress=counter)
    assert counter.calls == []
    grid = tmp_path / "g.json"
    grid.write_text(json.dumps(TINY))
    rc = _cli("study", "--grid", str(grid), "--out", out)
    assert rc.returncode == 2 and message in rc.stderr and "Traceback" not in rc.stderr
    assert "[1/1]" not in rc.stdout  # no run started


@pytest.mark.parametrize("timeout", ["0", "-5", "nan", "inf"])
def test_timeout_must_be_positive(tmp_path, timeout):
    rc = _cli("study", "--profile", "smoke", "--out", str(tmp_path / "df.pkl"),
              "--timeout", timeout)
    assert rc.returncode == 2 and "--timeout" in rc.stderr and timeout in rc.stderr
    assert not (tmp_path / "df.pkl").exists()
    with pytest.raises(ValueError, match="timeout"):
        run_study(TINY, out=tmp_path / "df.pkl", progress=False, timeout=float(timeout))
    assert not (tmp_path / "df.pkl").exists()


@pytest.mark.parametrize("name, text, message", [
    ("grid.yaml", "dataset: [blobs\npath: sequential\n", "malformed YAML at line"),
    ("grid.yaml", "dataset: blobs\n\tpath: x\n", "malformed YAML"),
    ("grid.json", '{"dataset": "blobs",}', "malformed JSON at line 1"),
    ("grid.json", '{"dataset": "blobs", "threads": 0}', "threads"),
    ("grid.yaml", "- 1\n- 2\n", "a grid is"),
    ("grid.yaml", "quick\n", "not a grid"),
    ("grid.txt", "{}", "expected a .json"),
    ("grid.json", b"\xff\xfe{", "UTF-8"),
])
def test_malformed_grid_files_name_the_file(tmp_path, name, text, message):
    grid = tmp_path / name
    grid.write_bytes(text if isinstance(text, bytes) else text.encode())
    rc = _cli("study", "--grid", str(grid), "--out", str(tmp_path / "df.pkl"))
    assert rc.returncode == 2, rc.stdout + rc.stderr
    assert str(grid) in rc.stderr and message in rc.stderr and "Traceback" not in rc.stderr
    assert not (tmp_path / "df.pkl").exists()


# ---- the child dies with its parent; stale folders --------------------------------------------------
def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def _gone(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    return "State:\tZ" in status  # a zombie has ended


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_kill_9_of_the_study_ends_its_child_and_the_next_study_cleans_up(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    grid = tmp_path / "long.json"
    grid.write_text(json.dumps({**TINY, "train_size": 2000, "epochs": 1000, "timeout": 600}))
    parent = subprocess.Popen([sys.executable, "-m", "cnn", "study", "--grid", str(grid),
                               "--out", str(tmp_path / "df.pkl")], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        child = None
        while time.monotonic() < deadline and child is None:
            kids = [k for k in _children(parent.pid)
                    if "cnn.study.child" in Path(f"/proc/{k}/cmdline").read_text(errors="ignore")
                    and "--run-json" in Path(f"/proc/{k}/cmdline").read_text(errors="ignore")]
            child = kids[0] if kids else None
            time.sleep(0.05)
        assert child is not None, "the study started no run"
        time.sleep(1.0)  # the child is training now
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 15
        while not _gone(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(child), "the run outlived its study"
    finally:
        if parent.poll() is None:
            parent.kill()
    left = [d.name for d in tmp.iterdir() if d.name.startswith(f"cnn-study-{parent.pid}-")]
    assert left, "expected the killed study's temporary folders"
    other = tmp / f"cnn-study-{os.getpid()}-0-run-keep"  # a live study's folder stays
    other.mkdir()
    rc = _cli("study", "--profile", "smoke", "--out", str(tmp_path / "smoke.pkl"), env=env)
    assert rc.returncode == 0, rc.stdout + rc.stderr
    assert "removed" in rc.stdout
    assert not [d for d in tmp.iterdir() if d.name.startswith(f"cnn-study-{parent.pid}-")]
    assert other.exists()


def test_child_checks_its_parent_before_training(tmp_path):
    """A child whose parent died before it could ask for PDEATHSIG exits at once."""
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"config": dict(expand_grid(TINY)[0])}))
    rc = subprocess.run([sys.executable, "-m", "cnn.study.child", "--run-json", str(cfg),
                         "--result", str(tmp_path / "r.json"), "--parent-pid", "1"],
                        cwd=ROOT, capture_output=True, timeout=120)
    assert rc.returncode == 137 and not (tmp_path / "r.json").exists()


def test_stale_folder_names_carry_pid_and_start_time(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"cnn-study-{dead.pid}-123-jit-abc"
    reused = tmp_path / f"cnn-study-{os.getpid()}-1-run-abc"   # our pid, another start time
    mine = tmp_path / f"cnn-study-{runner._owner_tag()}-run-abc"
    unrelated = tmp_path / "cnn-study-jit-abc"                  # not ours to judge
    for d in (stale, reused, mine, unrelated):
        d.mkdir()
    removed = runner.clean_stale_tempdirs(tmp_path)
    assert stale in removed and not stale.exists()
    assert mine.exists() and unrelated.exists()


# ---- divergence ---------------------------------------------------------------------------------
def test_diverged_runs_are_recorded_excluded_and_counted(tmp_path):
    out = tmp_path / "df.pkl"
    grid = [{**TINY, "path": ["sequential", "threads"], "threads": 2},
            {**TINY, "path": "threads", "threads": 2, "lr": 1e30}]
    df = run_study(grid, out=out, progress=False)
    runs = df.drop_duplicates("run_key").set_index("lr")
    assert runs.loc[1e30, "status"] == "diverged"
    assert "diverged" in runs.loc[1e30, "error"]
    assert (df.loc[df["status"] != "diverged", "status"] == "ok").all()
    s = summarize(df, n_boot=20)
    assert len(s.table) == 2  # sequential and threads/sync x2, from the ok runs only
    assert s.runs["run_key"].nunique() == 2
    numbers = report_numbers(s, [])
    assert numbers["counts"]["runs_diverged"] == 1 and numbers["counts"]["runs_failed"] == 0
    # resuming does not rerun a diverged run (it would diverge again)
    counter = Counter()
    run_study(grid, out=out, progress=counter)
    assert counter.calls == []


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_a_run_whose_process_is_killed_goes_on_from_its_backup(tmp_path, capsys):
    """Issue 22 item 5: a run killed mid-run (its child gone) continued from zero. Now the
    study starts it again at once and it continues from its last backup (after an epoch):
    the same losses and accuracies as a run never killed, the epochs of the second process
    marked resumed (kept out of the throughput figures), the backups gone at the end."""
    grid = {**TINY, "train_size": 6000, "epochs": 4}
    ref = run_study(grid, out=tmp_path / "ref.pkl", progress=False)
    out = tmp_path / "df.pkl"
    folder = tmp_path / ".df.pkl.backups"
    killed = []

    def kill_the_child_after_its_first_backup():
        deadline = time.monotonic() + 120
        while not list(folder.glob("*/backup-*.npz")) and time.monotonic() < deadline:
            time.sleep(0.005)
        for kid in _children(os.getpid()):
            cmdline = Path(f"/proc/{kid}/cmdline").read_text(errors="ignore")
            if "cnn.study.child" in cmdline and "--run-json" in cmdline:
                os.kill(kid, signal.SIGKILL)
                killed.append(kid)
    killer = threading.Thread(target=kill_the_child_after_its_first_backup, daemon=True)
    killer.start()
    df = run_study(grid, out=out, progress=True)
    killer.join(timeout=10)
    assert killed, "the run ended before its child could be killed"
    assert "its process was killed (signal 9); resuming it from its backup" in \
        capsys.readouterr().out
    assert list(df["status"]) == ["ok"] * 4
    resumed = list(df.sort_values("epoch")["resumed"])
    first = resumed.index(True)
    assert first >= 1 and resumed == [False] * first + [True] * (4 - first), resumed
    for column in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
        assert list(df.sort_values("epoch")[column]) == list(ref.sort_values("epoch")[column])
    assert not folder.exists()
    from cnn.analysis.summary import run_table
    table = run_table(df)
    assert table["n_timed"].iloc[0] == first  # the first process's epochs alone are timed
