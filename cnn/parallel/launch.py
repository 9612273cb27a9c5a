"""Starting MPI jobs: is this process under a launcher, where is ``mpiexec``, and the command
that runs ``python -m cnn ...`` on ``N`` ranks (one host, or the hosts of a hostfile).

``python -m cnn train --strategy mpi --ranks 2`` re-runs itself as
``<venv>/bin/mpiexec -n 2 <python> -m cnn train --strategy mpi ...`` (the MPICH wheel from PyPI
puts ``mpiexec`` beside the venv's ``python``); ``mpiexec -n 2 python -m cnn train --strategy
mpi ...`` typed by hand is the same job.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from ..checks import check_int
from ..files import read_structured

#: environment variables that MPI launchers set in every rank (MPICH's Hydra: PMI_*; PMIx
#: launchers such as Open MPI's prterun and Slurm's srun: PMIX_*/OMPI_*)
LAUNCHER_VARIABLES = ("PMI_RANK", "PMI_SIZE", "PMI_FD", "PMI_PORT", "PMIX_RANK",
                      "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")


def under_launcher() -> bool:
    """True when this process was started by an MPI launcher (``mpiexec``, ``srun``)."""
    return any(v in os.environ for v in LAUNCHER_VARIABLES)


def launcher_rank() -> int:
    """This process's rank as the launcher says (0 without a launcher), read without
    initialising MPI (so that the CLI can silence ranks other than 0 early)."""
    for var in ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK"):
        if var in os.environ:
            try:
                return int(os.environ[var])
            except ValueError:
                pass
    return 0


def find_mpiexec() -> str:
    """The ``mpiexec`` beside this interpreter (the venv's, from the ``mpich`` wheel), else the
    one on ``PATH``; ``FileNotFoundError`` naming where it looked otherwise."""
    here = Path(sys.executable).parent / "mpiexec"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    found = shutil.which("mpiexec")
    if found:
        return found
    from ..extras import install_command
    raise FileNotFoundError(f"no mpiexec: looked for {here} and on PATH. Install MPICH from "
                            f"PyPI into this environment, with mpi4py (the mpi extra: "
                            f"{install_command('mpi')}), or start the ranks yourself with "
                            f"your cluster's launcher")


def check_ranks(ranks) -> int:
    return check_int(None, "ranks", ranks)


def mpiexec_command(args: list[str], ranks: int, hostfile: str | None = None,
                    mpiexec: str | None = None, extra: list[str] | None = None) -> list[str]:
    """The command that runs ``python -m cnn <args>`` on ``ranks`` ranks.

    ``hostfile``: MPICH's format, one ``host[:slots]`` per line; Hydra starts the remote ranks
    over ssh (see the README's "Across machines"). ``extra``: more ``mpiexec`` options.
    """
    ranks = check_ranks(ranks)
    cmd = [mpiexec or find_mpiexec()]
    if hostfile is not None:
        if not Path(hostfile).is_file():
            raise FileNotFoundError(f"no hostfile at {hostfile}")
        cmd += ["-f", str(hostfile)]
    cmd += list(extra or []) + ["-n", str(ranks), sys.executable, "-m", "cnn", *args]
    return cmd


def run_mpiexec(args: list[str], ranks: int, hostfile: str | None = None,
                extra: list[str] | None = None) -> int:
    """Run ``python -m cnn <args>`` on ``ranks`` ranks and return the job's exit status.

    ``mpiexec`` runs in a session of its own and this process passes it the SIGINT and
    SIGTERM it receives, once (``mpiexec`` forwards them to the ranks, which stop after the
    same step, save and exit 130 or 143), and waits for the job: an interrupted launcher
    never kills the job it started (``subprocess.call`` sent it SIGKILL on Ctrl-C, and the
    ranks died before saving)."""
    import time
    cmd = mpiexec_command(args, ranks, hostfile, extra=extra)
    print(f"launching: {' '.join(cmd)}", file=sys.stderr, flush=True)
    started = time.time()
    job = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        return wait_passing_signals(job)
    finally:  # however the job ended, the launcher interrupted too (see release_segments)
        remove_orphan_segments(since=started)


def wait_passing_signals(proc: subprocess.Popen) -> int:
    """``proc.wait()``, passing ``proc`` the SIGINT and SIGTERM this process receives
    meanwhile (in the main thread; elsewhere it only waits)."""
    import signal
    import threading

    def forward(signum, frame):
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, forward)
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ---- relaunching a failed job --------------------------------------------------------------------
#: exit statuses a relaunch cannot help: bad arguments, a divergence (it would diverge
#: again), a stop the user asked for (Ctrl-C, SIGTERM)
FINAL_STATUSES = (2, 3, 130, 143)


def read_hostfile(path: str | os.PathLike) -> list[tuple[str, int]]:
    """``(host, slots)`` per line of an MPICH hostfile (``host[:slots]``; ``#`` comments)."""
    hosts = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        host, _, slots = line.partition(":")
        try:
            hosts.append((host.strip(), int(slots) if slots.strip() else 1))
        except ValueError:
            raise ValueError(f"{path}, line {number}: {line!r} is not host[:slots]") from None
    if not hosts:
        raise ValueError(f"{path}: names no host")
    return hosts


def rank_hosts(hosts: list[tuple[str, int]], ranks: int) -> list[str]:
    """The host of each rank as Hydra places ``ranks`` ranks over ``hosts``: each host's
    slots in turn, round and round."""
    order = [h for h, slots in hosts for _ in range(slots)]
    return [order[r % len(order)] for r in range(ranks)]


def reachable(host: str, timeout: float = 30.0) -> bool:
    """Whether ``mpiexec`` can start a process on ``host`` (one rank of ``true``), with the
    launcher this environment configures (``HYDRA_LAUNCHER`` and the like)."""
    try:
        res = subprocess.run([find_mpiexec(), "-hosts", host, "-n", "1", "true"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return res.returncode == 0


def run_with_restarts(args: list[str], ranks: int, hostfile: str | None,
                      restarts: int) -> int:
    """:func:`run_mpiexec`, and up to ``restarts`` relaunches of a job that failed (a rank
    or a host lost: any exit status but 0 and :data:`FINAL_STATUSES`); the command resumes
    from its last backup (``--backup-dir``). Before each relaunch the hosts of ``hostfile``
    are probed (:func:`reachable`): the job goes on on those that answer, without the ranks
    the gone hosts held, through a hostfile of the survivors (a temporary file)."""
    import tempfile
    code = run_mpiexec(args, ranks, hostfile)
    written: list[str] = []
    try:
        for attempt in range(1, restarts + 1):
            if code == 0 or code in FINAL_STATUSES:
                break
            why = f"the job ended with exit status {code}"
            if hostfile is not None:
                hosts = read_hostfile(hostfile)
                alive = [(h, n) for h, n in hosts if reachable(h)]
                gone = [h for h, n in hosts if (h, n) not in alive]
                if not alive:
                    print(f"[cnn mpi] {why}; no host of {hostfile} answers: not relaunched",
                          file=sys.stderr, flush=True)
                    break
                if gone:
                    ranks = max(1, sum(h not in gone for h in rank_hosts(hosts, ranks)))
                    fd, hostfile = tempfile.mkstemp(prefix="cnn-hostfile-", suffix=".txt")
                    written.append(hostfile)
                    with os.fdopen(fd, "w") as f:
                        f.write("".join(f"{h}:{n}\n" for h, n in alive))
                    why += f"; gone: {', '.join(gone)}"
            print(f"[cnn mpi] {why}: relaunching it from its last backup on {ranks} rank"
                  f"{'s' if ranks > 1 else ''} (restart {attempt} of {restarts})",
                  file=sys.stderr, flush=True)
            code = run_mpiexec(args, ranks, hostfile)
    finally:
        for name in written:
            Path(name).unlink(missing_ok=True)
    return code


# ---- MPICH's shared memory -----------------------------------------------------------------------
#: the shared-memory segments MPICH makes on each host (``/dev/shm/mpich_shm_*``)
MPICH_SEGMENTS = "/dev/shm/mpich_shm_*"
#: the prefix of every name MPICH gives a segment in ``/dev/shm``
MPICH_SEGMENT_PREFIX = "/dev/shm/mpich_"
_released = False


def mapped_segments(pid: int | str = "self") -> set[str]:
    """The MPICH segments process ``pid`` maps that still have a name in ``/dev/shm`` (an
    unlinked one shows in ``/proc/PID/maps`` as ``... (deleted)``)."""
    found = set()
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split(None, 5)
            if len(fields) == 6 and fields[5].startswith(MPICH_SEGMENT_PREFIX):
                path = fields[5].rstrip("\n")
                if not path.endswith(" (deleted)"):
                    found.add(path)
    return found


def release_segments(MPI) -> list[str]:
    """Remove the names of this job's MPICH segments from ``/dev/shm`` as soon as every rank
    of this host maps them, so that no end of the job can leave one behind; returns the names
    removed (on each host's first rank). Called once per process, by every rank, right after
    MPI starts (:func:`cnn.parallel.mpi.load_mpi`, :func:`join_mpi_job`).

    Why: in ``MPI_Init`` MPICH opens its intra-node segment by a name every rank of the host
    derives from the job (``shm_open("mpich_shm_<job hash>_<host>")``), and unlinks it only in
    ``MPI_Finalize``. A job that does not finalise (``MPI_Abort``, which is how a failure on one
    rank ends them all; a rank killed with SIGKILL; ``mpiexec`` killed, or interrupted) left it
    in ``/dev/shm`` for good, and the launcher's clean-up (:func:`remove_orphan_segments`) saw
    only some of those jobs. Once every rank has the segment mapped the name is needed no more
    (the memory lives while a process maps it, as with any unlinked file): this is what UCX
    does with its own segments right away. ``MPI_Finalize``'s own unlink then finds nothing,
    which it ignores. Only names that every rank of this host maps are removed, so another
    job's segments are never touched."""
    global _released
    comm = MPI.COMM_WORLD
    if _released or comm.Get_size() == 1:
        return []
    _released = True
    host = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        # a few names once per job: the pickling allgather is the simple way to swap them
        everyone = host.allgather(sorted(mapped_segments()))
        shared = set(everyone[0]).intersection(*everyone[1:])
        removed = []
        if host.Get_rank() == 0:  # every rank of the host maps them by now (the allgather)
            for path in sorted(shared):
                try:
                    os.unlink(path)
                    removed.append(path)
                except FileNotFoundError:
                    pass
        return removed
    finally:
        host.Free()


def remove_orphan_segments(since: float | None = None, pattern: str = MPICH_SEGMENTS) -> list[str]:
    """Unlink MPICH's shared-memory segments that a job ended by ``MPI_Abort`` or by a killed
    rank left behind (MPICH removes them only when its ranks finalise): those of this user,
    modified at or after ``since`` (a ``time.time()``), that no process maps any more. Returns
    the paths removed. Segments still mapped by a running job are never touched. Our own jobs
    remove their segments' names once they run (:func:`release_segments`); this is for a job
    that died while starting, and for MPI programs of others."""
    import glob
    candidates = []
    for path in glob.glob(pattern):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        if st.st_uid == os.getuid() and (since is None or st.st_mtime >= since - 1):
            candidates.append(path)
    if not candidates:
        return []
    mapped = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps) as f:
                for line in f:
                    fields = line.split(None, 5)
                    if len(fields) == 6 and fields[5].startswith("/"):
                        mapped.add(fields[5].strip())
        except (OSError, IndexError):
            continue
    removed = []
    for path in candidates:
        if path not in mapped:
            try:
                os.unlink(path)
                removed.append(path)
            except OSError:
                pass
    return removed


def _without(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """``argv`` without ``options`` and their values (``--opt V`` and ``--opt=V``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in options:
            skip = True
            continue
        if any(a.startswith(o + "=") for o in options):
            continue
        out.append(a)
    return out


def maybe_launch(args, argv: list[str]) -> int | None:
    """For ``python -m cnn train --ranks N``: run the same command under ``mpiexec -n N``
    (without ``--ranks``/``--hostfile``) and return its exit status; None when there is
    nothing to launch (no ``--ranks``, or already under a launcher)."""
    from . import mpi_strategies
    if args.ranks is None and args.hostfile is None:
        return None
    if args.strategy not in mpi_strategies():
        raise ValueError(f"--ranks starts MPI ranks; use it with --strategy "
                         f"{' or '.join(mpi_strategies())}. Received --strategy {args.strategy}")
    if args.ranks is None:
        raise ValueError("--hostfile needs --ranks N (how many ranks to start over its hosts)")
    ranks = check_ranks(args.ranks)
    if args.threads != 1:
        raise ValueError(f"strategy {args.strategy!r} runs one worker per MPI rank; give the "
                         f"ranks with --ranks and leave --threads at 1. Received "
                         f"threads={args.threads}")
    if under_launcher():
        return None  # this process is one of the ranks already
    command = _without(argv, ("--ranks", "--hostfile", "--restarts"))
    restarts = getattr(args, "restarts", 0) or 0
    if not restarts:
        return run_mpiexec(command, ranks, args.hostfile)
    return run_with_restarts(command, ranks, args.hostfile, restarts)


def join_mpi_job(strategy: str) -> None:
    """For the MPI strategies under a launcher: initialise MPI now, before anything that could
    fail on one rank only (a file missing on one machine), so that such a failure can end
    every rank (:func:`run_main`) instead of leaving the others waiting in ``MPI_Init``."""
    from . import mpi_strategies
    if strategy in mpi_strategies() and under_launcher():
        try:
            from mpi4py import MPI  # importing initialises MPI
        except ImportError:
            return  # the strategy reports it, naming what to install
        release_segments(MPI)


def silence_other_ranks(strategy: str) -> bool:
    """For the MPI strategies: send this process's standard output to ``/dev/null`` unless it
    is rank 0 (standard error stays, for errors). Returns True on the master."""
    from . import mpi_strategies
    if strategy in mpi_strategies() and launcher_rank() != 0:
        sys.stdout = open(os.devnull, "w")
        return False
    return True


# ---- ending a job of several ranks ------------------------------------------------------------
def mpi_job_size() -> int:
    """The number of ranks when this process has initialised MPI (through the ``mpi``
    strategies), else 1. Never initialises MPI itself."""
    MPI = sys.modules.get("mpi4py.MPI")
    if MPI is None or not MPI.Is_initialized() or MPI.Is_finalized():
        return 1
    return MPI.COMM_WORLD.Get_size()


def abort_mpi_job(code: int, err: BaseException | None = None) -> None:
    """In a job of several ranks, end every rank now (``MPI_Abort`` with ``code``), after
    printing ``err`` with this rank's number; otherwise return. A rank that simply exited
    instead would leave the others waiting in a collective (and its own ``MPI_Finalize``
    waiting for them): this is what ``python -m cnn`` does with a failure on any rank."""
    if mpi_job_size() <= 1:
        return
    MPI = sys.modules["mpi4py.MPI"]
    rank, size = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
    if err is not None:
        import traceback
        text = "".join(traceback.format_exception(err))
        sys.stderr.write(f"\n[cnn mpi] rank {rank} of {size} failed with "
                         f"{type(err).__name__}: {err}\n{text}")
    sys.stderr.write(f"[cnn mpi] rank {rank} of {size} ends with exit status {code}; "
                     f"aborting all {size} ranks\n")
    sys.stderr.flush()
    sys.stdout.flush()
    MPI.COMM_WORLD.Abort(code)


class AgreedStatus(int):
    """An exit status that every rank of an MPI job reached together, at the same step (a
    stop they agreed on after Ctrl-C or SIGTERM; a divergence, decided on the all-reduced
    loss): :func:`run_main` lets such a job end normally, every rank finalising MPI, rather
    than aborting it, which would cut short what the others still do (rank 0 saving)."""


def run_main(main) -> int:
    """``main()``'s exit status; in a job of several ranks, a failure (an exception or a
    non-zero status that is not an :class:`AgreedStatus`) on this rank ends every rank
    (:func:`abort_mpi_job`)."""
    try:
        code = main()
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
        if code and not isinstance(err.code, AgreedStatus):
            abort_mpi_job(code)
        raise
    except BaseException as err:
        abort_mpi_job(1, err)
        raise
    if code and not isinstance(code, AgreedStatus):
        abort_mpi_job(code)
    return int(code) if code is not None else code


# ---- a fit on N ranks, from a notebook or a script -------------------------------------------
def fit_under_mpiexec(ranks: int, *, model="mnist_small", dataset: str = "mnist_embedded",
                      limit: int | None = None, test_limit: int | None = None,
                      dtype: str = "float32", model_seed: int = 0, epochs: int = 1,
                      batch_size: int = 32, optimizer: dict | None = None,
                      strategy: str = "mpi", strategy_options: dict | None = None,
                      seed: int = 0, validation: bool = False, backend: str = "auto",
                      augment=None, normalize: bool = False,
                      data_root: str | None = None, hostfile: str | None = None,
                      extra: list[str] | None = None, timeout: float = 600) -> dict:
    """Train on ``ranks`` MPI ranks started by the venv's ``mpiexec`` and return rank 0's
    ``{"weights": {key: array}, "history": {...}, "info": {...}}``.

    The ranks run ``python -m cnn.parallel.launch`` on a JSON copy of these arguments: each
    loads ``dataset`` (first ``limit`` examples), builds ``model`` (a preset, spec list or
    dict) from ``model_seed`` and calls :func:`cnn.train.fit` with the rest (``augment`` and
    ``normalize`` included), exactly as one process would. Raises ``RuntimeError`` with the job's output if it fails.
    """
    import json
    import tempfile

    import numpy as np

    ranks = check_ranks(ranks)
    config = {"model": model, "dataset": dataset, "limit": limit, "test_limit": test_limit,
              "dtype": dtype, "model_seed": model_seed, "epochs": epochs,
              "batch_size": batch_size, "optimizer": optimizer, "strategy": strategy,
              "strategy_options": strategy_options or {}, "seed": seed,
              "validation": validation, "backend": backend, "augment": augment,
              "normalize": normalize, "data_root": data_root}
    with tempfile.TemporaryDirectory(prefix="cnn-mpi-") as tmp:
        cfg, out = Path(tmp) / "config.json", Path(tmp) / "out"
        cfg.write_text(json.dumps(config))
        cmd = [find_mpiexec()] + (["-f", str(hostfile)] if hostfile else []) + list(extra or [])
        cmd += ["-n", str(ranks), sys.executable, "-m", "cnn.parallel.launch", str(cfg), str(out)]
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PMI_", "PMIX_", "OMPI_"))}  # not a rank of an outer job
        import time
        started = time.time()
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        finally:  # a timeout kills the job
            remove_orphan_segments(since=started)
        if res.returncode != 0 or not out.with_suffix(".npz").is_file():
            raise RuntimeError(f"{' '.join(cmd)} failed with exit status {res.returncode}:\n"
                               f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
        with np.load(out.with_suffix(".npz")) as f:
            weights = {k: f[k] for k in f.files}
        record = read_structured(out.with_suffix(".json"), "rank 0's record")
    return {"weights": weights, **record}


def _fit_main(config_path: str, out: str) -> int:
    """One rank of :func:`fit_under_mpiexec` (``python -m cnn.parallel.launch CONFIG OUT``)."""
    import json

    import numpy as np

    from ..data import load_dataset
    from ..model import Sequential, resolve_spec

    c = read_structured(config_path, "run configuration")
    dtype = np.dtype(c["dtype"])
    data = load_dataset(c["dataset"], root=c["data_root"], limit=c["limit"],
                        test_limit=c["test_limit"], dtype=dtype)
    model = Sequential.from_spec(resolve_spec(c["model"]), input_shape=data.input_shape,
                                 dtype=dtype, seed=c["model_seed"], backend=c["backend"])
    hist = model.fit(data.x_train, data.y_train, epochs=c["epochs"], batch_size=c["batch_size"],
                     optimizer=c["optimizer"], strategy=c["strategy"],
                     strategy_options=c["strategy_options"], seed=c["seed"], verbose=0,
                     augment=c["augment"], normalize=c["normalize"],
                     validation_data=(data.x_test, data.y_test) if c["validation"] else None)
    if launcher_rank() == 0:
        np.savez(Path(out).with_suffix(".npz"), **model.get_weights())
        Path(out).with_suffix(".json").write_text(json.dumps(
            {"history": hist.history, "info": hist.info}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(_fit_main(*sys.argv[1:]))
