"""The MPI strategies, run for real under the venv's ``mpiexec -n 2`` (MPICH from PyPI).

Every 2-rank run is compared with a reference computed here, in the test's own process, by
another path: the sequential strategy (for ``mpi``, the sync algorithm) or a naive loop over
two replicas (for ``mpi_average``). Also: both ranks end with bitwise the same weights, the
launch paths (``mpiexec``, ``--ranks``, no launcher) and failures (an exception on one rank, a
rank killed with SIGKILL). Ranks on several hosts, made of network namespaces talking TCP over
shaped links: tests/test_cluster.py. Tiny shapes: each launch takes a second or two."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from cnn import cli
from cnn.optim import make_optimizer
from cnn.parallel.transport import shard_bounds
from mpi_checks import SCENARIOS
from parallel_helpers import N, OPT, blobs, build, max_abs_diff, max_rel_diff, train

HERE = Path(__file__).resolve().parent
MPIEXEC = Path(sys.executable).parent / "mpiexec"
try:
    import mpi4py  # noqa: F401
    _MISSING = None if MPIEXEC.is_file() else f"no mpiexec at {MPIEXEC}"
except ImportError as err:
    _MISSING = f"mpi4py is not installed ({err})"
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=f"MPI unavailable: {_MISSING}; "
                                "pip install -r requirements.txt")


def _env() -> dict:
    env = dict(os.environ)
    # no launcher variables from an outer job, and the blobs data set needs no data root
    for var in list(env):
        if var.startswith(("PMI_", "PMIX_", "OMPI_")):
            del env[var]
    return env


@pytest.fixture(autouse=True)
def remove_mpich_orphans():
    """Jobs that end normally remove MPICH's /dev/shm segments; those that end by MPI_Abort
    or a killed rank leave them: the tests remove them (what ``--ranks`` does itself), so that
    CI runs do not fill /dev/shm (test_a_rank_killed_... checks it for its job's segment)."""
    from cnn.parallel.launch import remove_orphan_segments
    started = time.time()
    yield
    remove_orphan_segments(since=started)


def _segment_lines(pid: int) -> list[str]:
    """The lines of /proc/PID/maps that map an MPICH segment (an unlinked one ends with
    ``(deleted)``)."""
    with open(f"/proc/{pid}/maps") as f:
        return [line.split(None, 5)[5].rstrip("\n") for line in f if "/dev/shm/mpich_shm" in line]


def _mapped_segments(pid: int) -> set:
    return {line.removesuffix(" (deleted)") for line in _segment_lines(pid)}


def mpirun(*args, ranks=2, timeout=120, check=True, mpiexec_args=()):
    cmd = [str(MPIEXEC), *mpiexec_args, "-n", str(ranks), sys.executable, *map(str, args)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())
    if check:
        assert res.returncode == 0, f"{cmd} failed:\n{res.stdout}\n{res.stderr}"
    return res


# ---- the sync algorithm over 2 ranks equals sequential ------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("mpi")
    mpirun(HERE / "mpi_checks.py", "train", out)
    return out


def load(out: Path, name: str, rank: int = 0):
    with np.load(out / f"{name}.rank{rank}.npz") as f:
        weights = {k: f[k] for k in f.files}
    return weights, json.loads((out / f"{name}.rank{rank}.json").read_text())


SYNC_CASES = {  # scenario of mpi_checks.py -> the sequential run it must equal
    "float64": {},
    "auto": {"backend": "auto"},
    "overlap": {},
    "overlap_buckets": {},
    "overlap_thread": {},
    "center": {"kind": "center"},
    "batch1": {"batch_size": 1, "epochs": 1, "n": 9},
    "plain_sgd": {"optimizer": {"type": "sgd", "lr": 0.1}, "epochs": 3},
    # every optimizer of cnn.optim applied slice-wise, one step count, the lr of a schedule
    "adam": {"optimizer": {"type": "adam", "lr": 0.01}},
    "adamw_cosine": {"optimizer": {"type": "adamw", "lr": 0.01, "schedule": "cosine"}},
}


def test_average_advances_the_optimizer_step_once_per_global_step(runs):
    """mpi_average with RMSProp: every replica updates once per global step (of 2 * 5
    examples), the scalar step counts global steps, and the replicas end averaged (equal)."""
    got, rec = load(runs, "average_adam")
    other, _ = load(runs, "average_adam", 1)
    assert rec["info"]["end_step"] == 2 * -(-50 // 10)
    assert all(np.array_equal(got[k], other[k]) for k in got)


@pytest.mark.parametrize("name", list(SYNC_CASES))
def test_two_ranks_equal_sequential_float64(runs, name):
    """Several steps over two epochs; batch 7 splits 4/3 and every epoch ends with a batch of
    one example (rank 1 runs a ghost pass); ``center`` needs the cross-rank reduce in forward
    and backward; ``batch1`` gives one rank an empty shard at every step."""
    ref, ref_hist = train(**SYNC_CASES[name])
    got, rec = load(runs, name)
    assert max_abs_diff(got, ref) < 1e-12
    # both ranks hold the same weights, bit for bit
    other, _ = load(runs, name, 1)
    assert all(np.array_equal(got[k], other[k]) for k in got)
    # the loss of each epoch is the all-reduced one, equal to sequential's
    np.testing.assert_allclose(rec["history"]["loss"], ref_hist.history["loss"], rtol=1e-12)
    assert rec["info"]["strategy"] == "mpi" and rec["info"]["ranks"] == 2
    assert rec["info"]["backend"] == ref_hist.info["backend"]  # numba for "auto"
    assert len(rec["info"]["hosts"]) == 2
    assert all(c > 0 for c in rec["history"]["comm_time"])


def test_two_ranks_equal_sequential_float32(runs):
    ref, _ = train(dtype=np.float32)
    got, _ = load(runs, "float32")
    assert got["conv2d.w"].dtype == np.float32
    assert max_rel_diff(got, ref) < 1e-5


@pytest.fixture(scope="module")
def gathered_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("rows")
    mpirun(HERE / "mpi_checks.py", "rows", out)
    return {(strategy, rank): json.loads((out / f"rows.{strategy}.rank{rank}.json").read_text())
            for strategy in ("mpi", "mpi_average") for rank in (0, 1)}


@pytest.mark.parametrize("strategy,step", [("mpi", 7), ("mpi_average", 8)])
def test_each_rank_gathers_only_its_own_shard(gathered_rows, strategy, step):
    """Each rank's data loader takes, of every global batch of the epoch's permutation (the fit's
    seed 5), its own half alone: rank 0 the first ceil(m / 2) examples of a batch of m, rank
    1 the rest (so between them every example once per epoch); an ``mpi`` rank whose half is
    empty (each epoch's last batch of one example) takes that one example for its ghost pass,
    an ``mpi_average`` rank nothing. The weights equal the runs that took every row
    (test_two_ranks_equal_sequential_float64)."""
    rng = np.random.default_rng(5)
    want: dict[int, list] = {0: [], 1: []}
    for _ in range(2):
        order = [int(i) for i in rng.permutation(N)]
        for i in range(0, N, step):
            batch = order[i:i + step]
            half = -(-len(batch) // 2)
            want[0].append(batch[:half])
            want[1].append(batch[half:] or (batch[:1] if strategy == "mpi" else []))
    for rank in (0, 1):
        assert gathered_rows[strategy, rank] == want[rank], rank


def test_overlap_gives_the_same_bits(runs):
    """Per-bucket non-blocking allreduces sum the same two numbers per element as one
    blocking allreduce, whether a progress thread or the training thread drives them: the
    weights are bitwise equal."""
    plain, _ = load(runs, "float64")
    for name in ("overlap", "overlap_buckets", "overlap_thread"):
        got, rec = load(runs, name)
        assert all(np.array_equal(got[k], plain[k]) for k in got), name
        assert rec["info"]["overlap"] is True


def to_wire_and_back(g: np.ndarray, fmt: str) -> np.ndarray:
    """``g`` rounded to the 16-bit format, as float32: NumPy's float16 (from float64 at once),
    ml_dtypes' bfloat16 (from float32: float64 goes through float32 first)."""
    if fmt == "fp16":
        return g.astype(np.float16).astype(np.float32)
    import ml_dtypes
    return g.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def naive_compressed_sgd(fmt: str, dtype=np.float64, batch_size: int = 7, epochs: int = 2):
    """SGD with momentum in plain loops over the two ranks' shards of each batch (the fit's
    order for seed 5), the shards' gradients summed as Horovod's fp16 compression does: each
    rounded to the 16-bit format, added (in float32) and the sum rounded again."""
    x, y = blobs(N, dtype)
    model = build(dtype=dtype)
    w = {k: v.copy() for k, v in model.params.items()}
    vel = {k: np.zeros_like(v) for k, v in w.items()}
    rng = np.random.default_rng(5)
    for _ in range(epochs):
        order = rng.permutation(N)
        for i in range(0, N, batch_size):
            idx = order[i:i + batch_size]
            half = -(-len(idx) // 2)
            grads = [model.loss_and_grads(x[part], y[part], w, loss_scale=len(part) / len(idx))[2]
                     for part in (idx[:half], idx[half:]) if len(part)]
            for k in w:
                total = sum(to_wire_and_back(g[k], fmt) for g in grads)
                g = to_wire_and_back(total, fmt).astype(dtype)
                vel[k] = OPT["momentum"] * vel[k] - OPT["lr"] * g
                w[k] = w[k] + vel[k]
    return w


@pytest.mark.parametrize("name,fmt", [("fp16", "fp16"), ("bf16", "bf16"),
                                      ("overlap_fp16", "fp16"), ("overlap_bf16", "bf16")])
def test_compression_sums_16_bit_gradients(runs, name, fmt):
    """``compression="fp16"``/``"bf16"`` (blocking, and overlapped per bucket) equal the plain
    loop that rounds each shard's gradient to the format and their sum again (and so differ
    from the exact run); both ranks hold the same bits."""
    got, rec = load(runs, name)
    assert max_abs_diff(got, naive_compressed_sgd(fmt)) < 1e-12
    exact, _ = load(runs, "float64")
    assert max_rel_diff(got, exact) > 1e-6  # rounded: not the exact run
    other, _ = load(runs, name, 1)
    assert all(np.array_equal(got[k], other[k]) for k in got)
    assert rec["info"]["compression"] == fmt


def test_bf16_compression_of_float32_weights(runs):
    got, _ = load(runs, "bf16_float32")
    assert got["conv2d.w"].dtype == np.float32
    assert max_rel_diff(got, naive_compressed_sgd("bf16", np.float32)) < 1e-5


def test_average_every_step_is_sync_on_the_global_batch(runs):
    """Local SGD that averages weights and momentum after every step is synchronous SGD on
    the global batch of ranks * batch_size examples."""
    ref, _ = train(batch_size=10)
    got, rec = load(runs, "average_every1")
    assert max_abs_diff(got, ref) < 1e-12
    assert rec["info"]["average_every"] == 1


def naive_local_sgd(every: int | None, batch_size: int = 5, ranks: int = 2, epochs: int = 2,
                    dtype=np.float64, n: int = N):
    """Two replicas trained one after the other in plain loops, each on its shard of every
    global step, averaged (weights and velocity, weighted by examples) every ``every`` steps
    or (``None``) at the end of each epoch; the model that ``fit`` ends with: the average."""
    x, y = blobs(n, dtype)
    model = build(dtype=dtype)
    opt = make_optimizer(OPT)
    reps = [{k: v.copy() for k, v in model.params.items()} for _ in range(ranks)]
    vels = [{k: np.zeros_like(v) for k, v in model.params.items()} for _ in range(ranks)]
    counts = [0] * ranks
    rng = np.random.default_rng(5)  # fit's data order for seed=5
    since = 0

    def average():
        total = sum(counts)
        for group in (reps, vels):
            for k in group[0]:
                avg = sum(counts[r] * group[r][k] for r in range(ranks)) / total
                for r in range(ranks):
                    group[r][k] = avg.copy()
        counts[:] = [0] * ranks

    for _ in range(epochs):
        order = rng.permutation(len(x))
        for i in range(0, len(x), ranks * batch_size):
            idx = order[i:i + ranks * batch_size]
            for r, (lo, hi) in enumerate(shard_bounds(len(idx), ranks)):
                if hi > lo:
                    _, _, g = model.loss_and_grads(x[idx[lo:hi]], y[idx[lo:hi]], reps[r])
                    for k in g:
                        vels[r][k] = OPT["momentum"] * vels[r][k] - OPT["lr"] * g[k]
                        reps[r][k] = reps[r][k] + vels[r][k]
                    counts[r] += hi - lo
            since += 1
            if every is not None and since % every == 0:
                average()
        if every is None:
            average()
    if sum(counts):
        average()
    del opt
    return reps[0]


@pytest.mark.parametrize("name,every", [("average_every3", 3), ("average_epoch", None)])
def test_average_is_local_sgd(runs, name, every):
    ref = naive_local_sgd(every)
    got, _ = load(runs, name)
    assert max_abs_diff(got, ref) < 1e-12
    sync, _ = load(runs, "average_every1")
    assert max_abs_diff(got, sync) > 1e-6  # really local SGD, not sync in disguise


#: the mpi_average scenarios of mpi_checks.py
AVERAGE_SCENARIOS = [name for name, (strategy, _) in SCENARIOS.items() if strategy == "mpi_average"]


@pytest.mark.parametrize("name", AVERAGE_SCENARIOS)
def test_average_over_threads_equals_average_over_ranks(runs, name):
    """``average`` is written once over two transports: two threads (shared slots) and two MPI
    ranks (Allreduce) from the same seeds and data end with the same weights, up to the order
    of floating-point sums; with SGD, both equal the naive loop above."""
    kwargs = SCENARIOS[name][1]
    ranks, _ = load(runs, name)
    threads, _ = train("average", 2, **kwargs)
    float32 = kwargs.get("dtype") == np.float32
    assert ranks["conv2d.w"].dtype == threads["conv2d.w"].dtype
    if float32:
        assert max_rel_diff(ranks, threads) < 1e-6
    else:
        assert max_abs_diff(ranks, threads) < 1e-12
    if "optimizer" not in kwargs:  # the naive loop's SGD with momentum
        every = kwargs.get("every")
        ref = naive_local_sgd(every, kwargs["batch_size"], n=kwargs.get("n", N),
                              dtype=np.float32 if float32 else np.float64)
        for got in (ranks, threads):
            if float32:
                assert max_rel_diff(got, ref) < 1e-5
            else:
                assert max_abs_diff(got, ref) < 1e-12


# ---- launching ----------------------------------------------------------------------------------
TRAIN = ["train", "--dataset", "blobs", "--limit", "120", "--test-limit", "40", "--epochs",
         "2", "--batch-size", "9", "--dtype", "float64", "--quiet"]


@pytest.fixture(scope="module")
def sequential_cli(tmp_path_factory):
    path = tmp_path_factory.mktemp("seq") / "w.npz"
    assert cli.main(TRAIN + ["--strategy", "sequential", "--save", str(path)]) == 0
    with np.load(path) as f:
        return {k: f[k] for k in f.files if k != "__spec__"}


def saved(path: Path) -> dict:
    with np.load(path) as f:
        return {k: f[k] for k in f.files if k != "__spec__"}


def test_cli_with_ranks_starts_mpiexec_itself(tmp_path, sequential_cli):
    w = tmp_path / "w.npz"
    res = subprocess.run([sys.executable, "-m", "cnn", *TRAIN, "--strategy", "mpi", "--ranks",
                          "2", "--save", str(w)], capture_output=True, text=True, timeout=120,
                         env=_env())
    assert res.returncode == 0, res.stderr
    assert "launching:" in res.stderr and "mpiexec -n 2" in res.stderr
    assert res.stdout.count("final test accuracy") == 1  # rank 0 alone prints
    assert res.stdout.count("weights saved") == 1
    assert "strategy mpi x2 ranks" in res.stdout
    assert max_abs_diff(saved(w), sequential_cli) < 1e-12


def test_cli_under_mpiexec(tmp_path, sequential_cli):
    w = tmp_path / "w.npz"
    res = mpirun("-m", "cnn", *TRAIN, "--strategy", "mpi", "--overlap", "--save", w)
    assert res.stdout.count("final test accuracy") == 1
    assert max_abs_diff(saved(w), sequential_cli) < 1e-12


def test_without_a_launcher_one_rank_and_a_notice(tmp_path, sequential_cli):
    w = tmp_path / "w.npz"
    res = subprocess.run([sys.executable, "-m", "cnn", *TRAIN, "--strategy", "mpi", "--save",
                          str(w)], capture_output=True, text=True, timeout=120, env=_env())
    assert res.returncode == 0, res.stderr
    assert "no MPI launcher, so this runs 1 rank" in res.stderr
    got = saved(w)
    assert all(np.array_equal(got[k], sequential_cli[k]) for k in got)  # one rank: same bits


def test_ranks_without_an_mpi_strategy_is_refused(capsys):
    assert cli.main(TRAIN + ["--strategy", "sync", "--ranks", "2"]) == 2
    assert "--ranks starts MPI ranks" in capsys.readouterr().err


@pytest.mark.parametrize("ranks", ["0", "-1"])
def test_bad_ranks_refused(capsys, ranks):
    assert cli.main(TRAIN + ["--strategy", "mpi", "--ranks", ranks]) == 2
    assert f"ranks must be a positive integer. Received ranks={int(ranks)}" in \
        capsys.readouterr().err


def test_mpi_strategy_refuses_threads():
    from cnn.parallel import make_strategy
    with pytest.raises(ValueError, match=r"takes the number of ranks from the launcher.*"
                                         r"Received threads=2"):
        make_strategy("mpi", threads=2)


# ---- failures -------------------------------------------------------------------------------------
def test_an_exception_on_one_rank_aborts_every_rank(tmp_path):
    t = time.monotonic()
    res = mpirun(HERE / "mpi_checks.py", "raise", tmp_path, check=False, timeout=60)
    assert res.returncode != 0
    assert "rank 1 of 2" in res.stderr and "FloatingPointError: injected failure" in res.stderr
    assert "aborting all 2 ranks" in res.stderr
    assert time.monotonic() - t < 30  # no rank left waiting in a collective
    # MPI_Abort skips MPI_Finalize, which alone unlinks MPICH's segment: its name was gone
    # already when the rank failed (release_segments), so the aborted job left nothing
    mapped = (tmp_path / "segments.rank1").read_text().splitlines()
    assert mapped and all(line.endswith(" (deleted)") for line in mapped), mapped
    assert not any(os.path.exists(line.removesuffix(" (deleted)")) for line in mapped)


@contextmanager
def _training_job(tmp_path):
    """``mpi_checks.py slow`` under ``mpiexec -n 2``, once both ranks train: yields mpiexec's
    Popen and the ranks' pids (rank 0 first); kills the job on the way out if it still runs."""
    cmd = [str(MPIEXEC), "-n", "2", sys.executable, str(HERE / "mpi_checks.py"), "slow",
           str(tmp_path)]
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"started.rank{r}").exists() for r in (0, 1)):
            assert job.poll() is None, job.communicate()
            assert time.monotonic() < deadline, "the ranks did not start training"
            time.sleep(0.05)
        yield job, [int((tmp_path / f"pid.rank{r}").read_text()) for r in (0, 1)]
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()


@pytest.mark.parametrize("victim", ["rank", "mpiexec"])
def test_no_segment_survives_a_kill(tmp_path, victim):
    """A running job's MPICH segment has no name in /dev/shm any more (every rank maps it, and
    release_segments unlinked it), so SIGKILL to a rank or to mpiexec, after which nothing of
    ours runs, leaves no segment behind: checked with no clean-up in between."""
    with _training_job(tmp_path) as (job, ranks):
        lines = [line for pid in ranks for line in _segment_lines(pid)]
        assert lines and all(line.endswith(" (deleted)") for line in lines), lines
        names = {line.removesuffix(" (deleted)") for line in lines}
        os.kill(ranks[1] if victim == "rank" else job.pid, signal.SIGKILL)
        job.wait(timeout=30)
        deadline = time.monotonic() + 15
        while any(os.path.exists(f"/proc/{pid}") for pid in ranks):
            assert time.monotonic() < deadline, f"a rank outlived the killed {victim}"
            time.sleep(0.1)
    assert not any(os.path.exists(name) for name in names), names


def test_a_rank_killed_with_sigkill_ends_the_job_within_seconds(tmp_path):
    with _training_job(tmp_path) as (job, (survivor, victim)):
        segments = _mapped_segments(survivor)  # the job's own (per host) shared memory
        os.kill(victim, signal.SIGKILL)
        t = time.monotonic()
        job.wait(timeout=30)
        ended = time.monotonic() - t
    assert job.returncode != 0
    assert ended < 10, f"the job took {ended:.1f} s to end after the kill"
    with pytest.raises(ProcessLookupError):
        os.kill(survivor, 0)
    # MPICH leaves its segment behind a killed job; the clean-up removes it
    from cnn.parallel.launch import remove_orphan_segments
    remove_orphan_segments()
    assert not any(os.path.exists(s) for s in segments), segments


# ---- the benchmark --------------------------------------------------------------------------------
def _cpu_seconds(pids) -> float:
    """User + system CPU time of processes ``pids`` (those still alive), in seconds."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of stat
    return total / os.sysconf("SC_CLK_TCK")


def test_a_bench_contender_of_ranks_waits_for_go_without_burning_a_core():
    """While the bench times the other contenders, the ranks of an MPI contender wait for
    rank 0's go: a blocking Bcast there polls MPICH's progress engine, a core taken from
    the contender being timed (the two-thread rows of bench compare lost half their speed)."""
    from cnn.bench.peers import Spec, _Worker
    spec = Spec(name="ours mpi numpy", threads=2, job={
        "kind": "ours", "backend": "numpy", "strategy": "mpi", "threads": 1, "ranks": 2})
    worker = _Worker(spec, {"contender": spec.job, "preset": "mnist_small", "batch_size": 32,
                            "images": 256, "epochs": 2})
    try:
        assert worker.read() is not None, worker.failed  # the warm-up epoch: now it waits
        ranks = [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
                 if _is_rank_of(pid, worker.proc.pid)]
        assert len(ranks) == 2, ranks
        before, t = _cpu_seconds(ranks), time.monotonic()
        time.sleep(2.0)
        busy = (_cpu_seconds(ranks) - before) / (time.monotonic() - t)
        assert busy < 0.1, f"the waiting ranks used {busy:.0%} of a core"
        assert worker.go() is not None, worker.failed  # and the go still reaches every rank
    finally:
        worker.close()


def _is_rank_of(pid: int, launcher: int) -> bool:
    """Whether process ``pid`` runs the bench worker below process ``launcher``."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"cnn.bench.worker" not in f.read():
                return False
        while pid > 1:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])  # the parent's pid
            if pid == launcher:
                return True
    except (FileNotFoundError, ValueError):
        pass
    return False


def test_a_bench_contender_of_ranks_leaves_no_segment_behind(tmp_path):
    """A contender whose ranks die while starting never reaches release_segments; closing it
    removes what such a job leaves in /dev/shm (planted here: MPICH names it by a job hash)."""
    import uuid
    from cnn.bench.peers import Spec, _Worker
    spec = Spec(name="mpi x2", job={"ranks": 2, "contender": "no such contender"}, threads=1)
    worker = _Worker(spec, {"contender": spec.job, "preset": "no such preset"})
    leftover = Path(f"/dev/shm/mpich_shm_{uuid.uuid4().hex}_test")
    leftover.write_bytes(b"\0" * 64)
    try:
        assert worker.read() is None and worker.failed  # the job failed, as planned
        worker.close()
        assert not leftover.exists()
    finally:
        leftover.unlink(missing_ok=True)


def test_alpha_beta_fit_recovers_a_linear_cost_model():
    from cnn.bench.mpi import SIZES, fit_alpha_beta
    alpha, beta = 3e-6, 2.5e-10
    times = [alpha + beta * n for n in SIZES]
    a, b, worst = fit_alpha_beta(SIZES, times)
    assert a == pytest.approx(alpha, rel=1e-9) and b == pytest.approx(beta, rel=1e-9)
    assert worst < 1e-9


def test_bench_mpi_runs_on_two_ranks(tmp_path):
    """A smoke run of ``python -m cnn bench mpi`` (tiny: its figures are not checked here)."""
    out = tmp_path / "mpi.json"
    res = subprocess.run([sys.executable, "-m", "cnn.bench.mpi", "--quick", "--presets",
                          "mnist_small", "--batch-sizes", "32", "--json", str(out)],
                         capture_output=True, text=True, timeout=120, env=_env())
    assert res.returncode == 0, res.stderr  # one rank without a launcher works too
    res = mpirun("-m", "cnn.bench.mpi", "--quick", "--presets", "mnist_small",
                 "--batch-sizes", "32", "--json", out)
    assert "fitted t(n) = alpha + beta * n" in res.stdout
    assert res.stdout.count("Allreduce (in place") == 1  # rank 0 alone prints
    record = json.loads(out.read_text())
    assert record["ranks"] == 2 and record["alpha"] > 0 and record["beta"] > 0
    assert [r["bytes"] for r in record["allreduce"]][0] == 1024
    assert set(record["training"]["mnist_small/32"]) == {"blocking", "overlap"}


def test_compare_bench_runs_two_ranks_and_two_processes_as_contenders():
    """``python -m cnn bench``'s 2-rank contender runs under mpiexec, rank 0 speaking for both
    on the protocol and passing the parent's go on to rank 1; the processes contender beside
    it (their figures are not checked here)."""
    from cnn.bench.peers import contenders, measure
    specs = [s for s in contenders() if s.name in ("ours mpi numba", "ours processes numba")]
    rows = measure("mnist_small", 32, specs, images=128, repeats=2)
    assert [(r["name"], r["threads"], r["error"], r["repeats"]) for r in rows] == [
        ("ours processes numba", 2, None, 2), ("ours mpi numba", 2, None, 2)]
    assert all(r["images_per_sec"] > 0 and r["backend"] == "numba" for r in rows)


def test_bench_mpi_command_writes_its_json(tmp_path):
    """``python -m cnn bench mpi --json PATH`` (the command the study's scaling model names)
    passes ``--json`` on to the ranks: the file holds the 2-rank fit."""
    out = tmp_path / "mpi_allreduce.json"
    res = subprocess.run([sys.executable, "-m", "cnn", "bench", "mpi", "--quick", "--presets",
                          "mnist_small", "--batch-sizes", "32", "--json", str(out)],
                         capture_output=True, text=True, timeout=180, env=_env())
    assert res.returncode == 0, res.stdout + res.stderr
    record = json.loads(out.read_text())
    assert record["ranks"] == 2 and record["alpha"] > 0 and record["beta"] > 0


# ---- the study -------------------------------------------------------------------------------------
def test_the_study_runs_the_mpi_and_processes_paths(tmp_path):
    """The study launches an mpi run with its registry's mpiexec (rank 0 alone writes the
    result) and records ranks (threads), hosts and comm_time; processes too."""
    import pandas as pd
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps([{"dataset": "blobs", "model": "mnist_small", "train_size": 96,
                                 "test_size": 32, "batch_size": 16, "epochs": 1, "repeats": 1,
                                 "timeout": 120, "path": ["mpi", "processes"], "threads": 2}]))
    out = tmp_path / "df.pkl"
    res = subprocess.run([sys.executable, "-m", "cnn", "study", "--grid", str(grid), "--out",
                          str(out)], capture_output=True, text=True, timeout=300, env=_env())
    assert res.returncode == 0, res.stdout + res.stderr
    df = pd.read_pickle(out)
    assert sorted(df["path"]) == ["mpi", "processes"]
    assert (df["status"] == "ok").all(), df[["path", "error"]]
    assert (df["threads"] == 2).all() and (df["comm_time"] > 0).all()
    mpi = df[df["path"] == "mpi"].iloc[0]
    assert mpi["strategy"] == "sync" and len(mpi["hosts"].split(",")) == 2


def test_a_failure_on_one_rank_before_training_ends_the_job(tmp_path):
    """Rank 1 alone is given a spec file that does not exist (as when a file is missing on one
    machine): its error ends both ranks at once, with its exit status, instead of leaving rank
    0 waiting for it."""
    args = ["-m", "cnn", *TRAIN, "--strategy", "mpi"]
    cmd = [str(MPIEXEC), "-n", "1", sys.executable, *args, ":", "-n", "1", sys.executable, *args,
           "--model", str(tmp_path / "missing.json")]
    t = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=_env())
    assert res.returncode == 2, res.stderr
    assert "no model spec file" in res.stderr and "rank 1 of 2 ends with exit status 2" in res.stderr
    assert time.monotonic() - t < 30


@pytest.mark.parametrize("extra,message", [
    (["--strategy", "sync", "--threads", "2", "--overlap"], "--overlap is an option of --strategy mpi"),
    (["--strategy", "processes", "--compression", "fp16"],
     "--compression is an option of --strategy mpi"),
    (["--strategy", "mpi", "--average-every", "3"], "--average-every is an option of --strategy average"),
    (["--strategy", "mpi_average", "--average-every", "0"], "every must be a positive number of steps"),
    (["--strategy", "mpi", "--hostfile", "hosts"], "--hostfile needs --ranks N"),
    (["--strategy", "mpi", "--ranks", "2", "--threads", "2"], "leave --threads at 1. Received threads=2"),
])
def test_mpi_options_refused_naming_the_value(capsys, extra, message):
    assert cli.main(TRAIN + extra) == 2
    assert message in capsys.readouterr().err


def test_orphan_segments_are_removed_and_live_ones_kept(tmp_path):
    """remove_orphan_segments unlinks an MPICH segment no process maps, and keeps one that a
    process still maps (a running job's)."""
    import mmap
    from cnn.parallel.launch import remove_orphan_segments
    pattern = str(tmp_path / "mpich_shm_*")
    orphan, live = tmp_path / "mpich_shm_orphan_0", tmp_path / "mpich_shm_live_0"
    for p in (orphan, live):
        p.write_bytes(b"\0" * 4096)
    with open(live, "r+b") as f, mmap.mmap(f.fileno(), 4096):
        removed = remove_orphan_segments(pattern=pattern)
        assert removed == [str(orphan)]
        assert live.exists() and not orphan.exists()
