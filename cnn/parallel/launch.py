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
    raise FileNotFoundError(f"no mpiexec: looked for {here} and on PATH. Install an MPI from "
                            "PyPI into this environment (pip install mpich mpi4py, or "
                            "pip install 'parallel-cnn[mpi]'), or start the ranks yourself "
                            "with your cluster's launcher")


def check_ranks(ranks) -> int:
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise ValueError(f"ranks must be a positive integer. Received ranks={ranks!r}")
    return ranks


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
    """Run ``python -m cnn <args>`` on ``ranks`` ranks and return the job's exit status."""
    cmd = mpiexec_command(args, ranks, hostfile, extra=extra)
    print(f"launching: {' '.join(cmd)}", file=sys.stderr, flush=True)
    return subprocess.call(cmd)


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
    from . import MPI_STRATEGIES
    if args.ranks is None and args.hostfile is None:
        return None
    if args.strategy not in MPI_STRATEGIES:
        raise ValueError(f"--ranks starts MPI ranks; use it with --strategy "
                         f"{' or '.join(MPI_STRATEGIES)}. Received --strategy {args.strategy}")
    if args.ranks is None:
        raise ValueError("--hostfile needs --ranks N (how many ranks to start over its hosts)")
    ranks = check_ranks(args.ranks)
    if args.threads != 1:
        raise ValueError(f"strategy {args.strategy!r} runs one worker per MPI rank; give the "
                         f"ranks with --ranks and leave --threads at 1. Received "
                         f"threads={args.threads}")
    if under_launcher():
        return None  # this process is one of the ranks already
    return run_mpiexec(_without(argv, ("--ranks", "--hostfile")), ranks, args.hostfile)


def silence_other_ranks(strategy: str) -> bool:
    """For the MPI strategies: send this process's standard output to ``/dev/null`` unless it
    is rank 0 (standard error stays, for errors). Returns True on the master."""
    from . import MPI_STRATEGIES
    if strategy in MPI_STRATEGIES and launcher_rank() != 0:
        sys.stdout = open(os.devnull, "w")
        return False
    return True
