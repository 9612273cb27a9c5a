"""The path registry: one entry per training path of the study, the one source of truth for
what a path is.

A *path* is a way to train the one model: a backend (where the arithmetic runs), a strategy
(how a batch is split, :mod:`cnn.parallel`) and a launcher (how the run's process is started).
The study's grid validation (:mod:`cnn.study.grid`), its runs (:class:`cnn.study.run.Run`, which
hold their entry), the runner's launch and the child's training call (:mod:`cnn.study.runner`,
:mod:`cnn.study.child`), the time estimates (:mod:`cnn.study.estimate`), the analysis's labels,
orders and selections (:mod:`cnn.analysis`) and the CLI all read this table; none of them
lists path names of its own. What a recorded strategy computes is an :class:`Algorithm`
(:data:`ALGORITHMS`); where each strategy of :mod:`cnn.parallel` lives is its
:class:`StrategyInfo` (:data:`STRATEGIES`, which :func:`cnn.parallel.make_strategy` reads);
what a backend is (compiled, on a device) is its record in :mod:`cnn.backends.registry`.

Adding a path touches two files at most: the module of its strategy in :mod:`cnn.parallel`
(when it needs a new one) and this one: the strategy's :class:`StrategyInfo` (and, when it
computes something new, its :class:`Algorithm`) and one :class:`TrainingPath` entry in
:data:`PATHS` (at run time: :func:`register_strategy`, :func:`register_algorithm` and
:func:`register_path`). The real ``mpi`` entry, for example, reads::

    TrainingPath("mpi", "sync (or local SGD: average) across MPI ranks started by mpiexec, one "
                 "Allreduce per step", strategies=("sync", "average"),
                 backends=("numpy", "numba"), workers="MPI ranks", scales=True,
                 launch="mpiexec", fit_strategy={"sync": "mpi", "average": "mpi_average"},
                 fit_workers=False, requires=("mpi4py",), sequential_algorithm=True,
                 communicates=True, links=True, overhead=1.0)

Everything else (grid axes, keys, labels, figure order, oversubscription marks, the child's
command line and environment, the estimates) follows from the entry.

Importing this module imports the standard library only (and the backends' registry and
:mod:`cnn.records`, which do too): the study's child reads it before Numba, TensorFlow or PyTorch is imported,
and :mod:`cnn.parallel` reads the strategies' records from it without importing one.
"""
from __future__ import annotations

import math
import os
import shutil
import sys
from pathlib import Path
from dataclasses import dataclass, field
from typing import Mapping

from .backends.registry import backend_info
from .records import ClassRecord, add_record

#: the path every speed-up is divided by (NumPy, one worker, BLAS pinned to one thread; see
#: docs/measuring.md)
BASELINE = "sequential"
#: how a run's process is started
LAUNCHERS = ("in-process", "env", "mpiexec")


@dataclass(frozen=True)
class Algorithm:
    """What a recorded strategy (the grid's ``strategy`` axis, the results' ``strategy``
    column) computes, whichever path runs it.

    Attributes:
        name: the strategy's name in grids and results.
        sequential: it computes the sequential algorithm's updates (up to the order of
            floating-point sums) on a path that runs the sequential algorithm.
        shards: the workers split each batch (a worker computes ``batch / p`` examples at a
            time).
        batch_per_worker: every worker takes a whole batch per step, so an epoch has ``p``
            times fewer steps.
        batch_statistics: with batch normalisation in the network it still computes the
            sequential updates (False: each shard normalises with its own statistics, "ghost"
            batch normalisation, a different algorithm for such a network).
    """

    name: str
    sequential: bool = False
    shards: bool = False
    batch_per_worker: bool = False
    batch_statistics: bool = True


#: the recorded strategies, by name
ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (
    Algorithm("sequential", sequential=True),
    Algorithm("sync", sequential=True, shards=True),
    Algorithm("accumulate", sequential=True, shards=True, batch_statistics=False),
    Algorithm("average", batch_per_worker=True),
    Algorithm("hogwild", batch_per_worker=True),
)}


def register_algorithm(algorithm: Algorithm) -> Algorithm:
    """Add what a new recorded strategy computes (ValueError when its name is taken); path
    entries may name it in ``strategies`` from then on."""
    if not isinstance(algorithm, Algorithm):
        raise TypeError(f"register_algorithm takes an Algorithm; received "
                        f"{type(algorithm).__name__}")
    if algorithm.name in ALGORITHMS:
        raise ValueError(f"algorithm {algorithm.name!r} is already registered")
    ALGORITHMS[algorithm.name] = algorithm
    return algorithm


@dataclass(frozen=True)
class StrategyInfo(ClassRecord):
    """Where a strategy of :mod:`cnn.parallel` lives (a name ``fit(strategy=...)``,
    ``--strategy`` and a path's ``fit_strategy`` take), known before its module is imported.

    Attributes:
        module: the module that defines its class, imported when the strategy is first made
            (so that mpi4py stays optional: only the MPI strategies' module needs it).
        cls: the class's name in ``module`` (a :class:`cnn.parallel.Strategy`).
        mpi_ranks: it runs one process per MPI rank, each started by a launcher (``mpiexec``,
            or ``train --ranks N``).
    """

    mpi_ranks: bool = False


#: the strategies of :mod:`cnn.parallel`, by name, in the order ``--help`` lists them
STRATEGIES: dict[str, StrategyInfo] = {
    "sequential": StrategyInfo("cnn.parallel.base", "SequentialStrategy"),
    "sync": StrategyInfo("cnn.parallel.threads", "SyncThreads"),
    "average": StrategyInfo("cnn.parallel.threads", "AverageThreads"),
    "hogwild": StrategyInfo("cnn.parallel.threads", "HogwildThreads"),
    "processes": StrategyInfo("cnn.parallel.processes", "SyncProcesses"),
    "mpi": StrategyInfo("cnn.parallel.mpi", "MPISync", mpi_ranks=True),
    "mpi_average": StrategyInfo("cnn.parallel.mpi", "MPIAverage", mpi_ranks=True),
    "accumulate": StrategyInfo("cnn.parallel.accumulate", "AccumulateStrategy"),
}


def register_strategy(name: str, info: StrategyInfo) -> StrategyInfo:
    """Add strategy ``name`` (see :func:`cnn.records.add_record` for what it refuses);
    ``fit``, ``--strategy`` and path entries take it from then on."""
    return add_record(STRATEGIES, "strategy", name, info, StrategyInfo)


def strategy_info(name: str) -> StrategyInfo:
    """The record of strategy ``name`` (ValueError naming the choices otherwise)."""
    if not isinstance(name, str) or name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {list(STRATEGIES)}")
    return STRATEGIES[name]


@dataclass(frozen=True)
class TrainingPath:
    """One training path.

    Attributes:
        name: the value of the grid's ``path`` axis and of the results' ``path`` column.
        description: one line for plans, reports and ``--help``.
        strategies: the strategies this path runs (the results' ``strategy`` column, each one
            of :data:`ALGORITHMS`); the first is the default. A path with one strategy ignores
            the grid's ``strategy`` axis.
        backends: the backends it runs over (the results' ``backend`` column); the first is the
            default. A path with one backend ignores the grid's ``backend`` axis.
        workers: what the grid's ``threads`` axis means for this path (``"none"``: it has no
            workers, threads is forced to 1).
        scales: True when more than one worker is meaningful (``threads`` > 1 allowed).
        launch: ``"in-process"`` (the child trains in its own interpreter), ``"env"`` (as
            in-process, with environment variables set before the interpreter starts, see
            ``env``) or ``"mpiexec"`` (the child is started as ``mpiexec -n <threads> ...``).
        env: environment variables of the child, values formatted with the run's configuration
            (``"{threads}"``), set before its interpreter starts.
        trainer: ``"fit"`` (:func:`cnn.train.fit`), ``"keras"``
            (:func:`cnn.reference.keras.fit_keras`) or ``"torch"``
            (:func:`cnn.reference.torch.fit_torch`).
        fit_strategy: the recorded strategy -> the :mod:`cnn.parallel` strategy name passed to
            ``fit`` (identity when absent), one of :data:`STRATEGIES`.
        fit_workers: whether ``fit`` gets ``threads`` workers (False: one; the parallelism
            lives elsewhere, e.g. in NUMBA_NUM_THREADS or in the MPI ranks).
        needs_gpu: runs only with a CUDA GPU (or under the simulator when the grid says so).
        uses_cores: whether its workers are CPU threads/processes, so ``threads`` > cores
            oversubscribes the machine.
        model_backend: the backend the model is built with when it differs from ``backend``
            (Keras builds our model on numpy and copies its weights).
        cores: what the worker count costs in cores, which sets the ``p`` of speed-up and
            efficiency: ``"workers"`` (one core per worker: ``p = threads``), ``"one"`` (one
            core whatever ``threads`` says: ``p = 1``; e.g. micro-batches run one after the
            other) or ``"device"`` (a GPU: ``p`` undefined).
        options: per strategy, grid axis -> strategy option (``{"average": {"period":
            "every"}}``: the grid's ``period`` becomes ``AverageThreads(every=...)``).
        requires: modules that must be importable for the path to run (e.g. ``torch``); the
            grid drops its runs where they are missing, and says so.
        device: ``"cpu"`` or ``"cuda"``, for trainers that take a device (PyTorch).
        sequential_algorithm: the path computes the sequential algorithm (same updates, up to
            the order of floating-point sums) with its strategies whose :class:`Algorithm` is
            ``sequential``, so its weights must track the sequential path's step by step (the
            equivalence table and figure, :mod:`cnn.study.equivalence`).
        communicates: its workers exchange gradients or weights and time it (the results'
            ``comm_time``: the reduce phase of threads and processes, MPI's allreduce), which
            the report sets beside computation.
        engines: how a reference framework's trainer may execute the model (the grid's
            ``engine`` axis and the results' column of that name; the first is the default):
            the Keras reference ``graph`` (``tf.function``, no XLA: Keras's own choice on a
            CPU) or ``xla`` (``jit_compile=True``), PyTorch ``eager`` (channels-first),
            ``channels_last`` or ``compiled`` (channels-last and ``torch.compile``'s inductor).
            Empty: the path has one way to run (``engine`` is ``""``).
        links: its ranks may run one per host across an emulated cluster (:mod:`cnn.cluster`)
            over a link profile (the grid's ``link`` axis: ``1gbe``, ``10gbe``, ...; ``""``:
            every rank on this host), launched by the cluster's ``mpiexec``.
        optimizers: the only optimizer types its trainer runs, with no options but the grid's
            ``lr`` and ``momentum`` and at a constant rate (the PyTorch bridge: ``("sgd",)``);
            empty: any optimizer of :mod:`cnn.optim`, with any options and schedule.
        overhead: a guess of the seconds a run spends outside its epochs beyond a plain
            interpreter's start (importing TensorFlow, a GPU context), for the study's time
            estimate until results of this path are measured.
        speed_guess: a guess of its training speed relative to the sequential path's, for the
            study's time estimate until results of this path are measured.
    """

    name: str
    description: str
    strategies: tuple[str, ...] = ("sequential",)
    backends: tuple[str, ...] = ("numpy",)
    workers: str = "none"
    scales: bool = False
    launch: str = "in-process"
    env: Mapping[str, str] = field(default_factory=dict)
    trainer: str = "fit"
    fit_strategy: Mapping[str, str] = field(default_factory=dict)
    fit_workers: bool = True
    needs_gpu: bool = False
    uses_cores: bool = True
    model_backend: str | None = None
    cores: str = "workers"
    options: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    requires: tuple[str, ...] = ()
    device: str = "cpu"
    sequential_algorithm: bool = False
    communicates: bool = False
    optimizers: tuple[str, ...] = ()
    engines: tuple[str, ...] = ()
    links: bool = False
    overhead: float = 0.0
    speed_guess: float = 1.0

    def __post_init__(self):
        if self.launch not in LAUNCHERS:
            raise ValueError(f"path {self.name!r}: launch must be one of {LAUNCHERS}; "
                             f"received launch={self.launch!r}")
        if self.trainer not in ("fit", "keras", "torch"):
            raise ValueError(f"path {self.name!r}: trainer must be 'fit', 'keras' or 'torch'; "
                             f"received trainer={self.trainer!r}")
        if self.cores not in ("workers", "one", "device"):
            raise ValueError(f"path {self.name!r}: cores must be 'workers', 'one' or 'device'; "
                             f"received cores={self.cores!r}")
        if self.links and self.launch != "mpiexec":
            raise ValueError(f"path {self.name!r}: only a path launched by mpiexec runs across "
                             f"an emulated cluster (links=True); received launch="
                             f"{self.launch!r}")
        if not self.strategies or not self.backends:
            raise ValueError(f"path {self.name!r}: needs at least one strategy and backend")
        unknown = [s for s in self.strategies if s not in ALGORITHMS]
        if unknown:
            raise ValueError(f"path {self.name!r}: strategy {unknown[0]!r} is not one of "
                             f"{list(ALGORITHMS)} (cnn.paths.ALGORITHMS says what each "
                             f"computes)")
        if self.trainer == "fit":
            unmade = [self.fit_strategy.get(s, s) for s in self.strategies
                      if self.fit_strategy.get(s, s) not in STRATEGIES]
            if unmade:
                raise ValueError(f"path {self.name!r}: fit strategy {unmade[0]!r} is not one of "
                                 f"{list(STRATEGIES)} (cnn.paths.STRATEGIES says where each "
                                 f"lives)")

    # ---- configuration ---------------------------------------------------------------------
    @property
    def default_strategy(self) -> str:
        return self.strategies[0]

    @property
    def default_backend(self) -> str:
        return self.backends[0]

    def compiles(self, backend: str | None = None) -> bool:
        """Whether a run of this path JIT-compiles kernels (over ``backend``; the backend's
        record says)."""
        return backend_info(backend or self.default_backend).jit

    def computes_sequential(self, strategy: str, batch_statistics: bool = False) -> bool:
        """Whether this path's ``strategy`` computes the sequential algorithm's updates (False
        for a strategy it does not know, e.g. from another results file), on a network with
        batch normalisation where ``batch_statistics`` (:func:`cnn.model.has_batch_statistics`)."""
        algorithm = ALGORITHMS.get(strategy)
        return (self.sequential_algorithm and strategy in self.strategies
                and algorithm is not None and algorithm.sequential
                and (algorithm.batch_statistics or not batch_statistics))

    def resolve(self, strategy: str | None, backend: str | None, threads: int) -> tuple:
        """``(strategy, backend, threads)`` of a run: the defaults filled in, fixed axes fixed,
        and a clear ``ValueError`` for a value this path does not take."""
        if len(self.strategies) == 1:
            strategy = self.strategies[0]
        elif strategy is None:
            strategy = self.default_strategy
        if strategy not in self.strategies:
            raise ValueError(f"grid axis 'strategy': path {self.name!r} takes one of "
                             f"{list(self.strategies)}; received strategy={strategy!r}")
        if len(self.backends) == 1:
            backend = self.backends[0]
        elif backend is None:
            backend = self.default_backend
        if backend not in self.backends:
            raise ValueError(f"grid axis 'backend': path {self.name!r} runs over one of "
                             f"{list(self.backends)}; received backend={backend!r}")
        if not self.scales:
            threads = 1
        return strategy, backend, threads

    # ---- launching ---------------------------------------------------------------------------
    def child_env(self, cfg: Mapping) -> dict[str, str]:
        """The variables this path sets in its child's environment."""
        return {k: str(v).format(**cfg) for k, v in self.env.items()}

    def command(self, cfg: Mapping, argv: list[str], mpiexec: str | None = None) -> list[str]:
        """The command line that starts the child ``argv`` (``[python, -m, ...]``); a path
        launched by ``mpiexec`` uses ``mpiexec`` when given (an emulated cluster's, which
        spreads the ranks over its hosts), else the venv's own (the mpich wheel puts it
        beside python), else the one on PATH."""
        if self.launch == "mpiexec":
            if mpiexec is None:
                here = Path(sys.executable).parent / "mpiexec"
                mpiexec = str(here) if here.is_file() else shutil.which("mpiexec") or "mpiexec"
            return [str(mpiexec), "-n", str(cfg["threads"]), *argv]
        return list(argv)

    def fit_arguments(self, cfg: Mapping) -> dict:
        """``strategy``, ``threads`` and ``strategy_options`` for :func:`cnn.train.fit`."""
        out = {"strategy": self.fit_strategy.get(cfg["strategy"], cfg["strategy"]),
               "threads": int(cfg["threads"]) if self.fit_workers else 1}
        opts = {}
        for axis, option in self.options.get(cfg["strategy"], {}).items():
            value = cfg.get(axis)
            if _given(value):
                opts[option] = int(value) if str(value).isdigit() else value
        if opts:
            out["strategy_options"] = opts
        return out

    def resolve_engine(self, engine: str | None) -> str:
        """The run's engine: ``""`` for a path without :attr:`engines`, else ``engine`` or the
        default, a clear ``ValueError`` for one the path does not take."""
        if not self.engines:
            return ""
        if engine in (None, ""):
            return self.engines[0]
        if engine not in self.engines:
            raise ValueError(f"grid axis 'engine': path {self.name!r} runs as one of "
                             f"{list(self.engines)}; received engine={engine!r}")
        return engine

    def takes_option(self, strategy: str, axis: str) -> bool:
        """Whether ``axis`` (e.g. ``period``) means something for this path's ``strategy``."""
        return axis in self.options.get(strategy, {})

    def available(self) -> tuple[bool, str]:
        """``(True, "")`` when every module the path requires imports, else ``(False, why)``."""
        import importlib.util
        missing = [m for m in self.requires if importlib.util.find_spec(m) is None]
        return (not missing, f"{', '.join(missing)} not installed" if missing else "")

    def label(self, strategy, backend, threads, engine=None, link=None) -> str:
        """The variant with its worker count: ``threads/sync ×2``, ``accumulate m=4``,
        ``mpi@1gbe ×2``, ``sequential``; no count for paths that do not scale."""
        name = self.variant(strategy, backend, engine, link)
        if not self.scales or not _given(threads):
            return name
        return f"{name} ×{int(threads)}" if self.cores == "workers" else f"{name} m={int(threads)}"

    # ---- analysis ------------------------------------------------------------------------------
    def variant(self, strategy: str | None, backend: str | None, engine=None,
                link=None) -> str:
        """``threads/sync``, ``threads/hogwild[numba]``, ``numba_parallel``, ``sequential``,
        ``keras+xla``, ``mpi@1gbe``: the strategy when the path has several, the backend when
        it is not the default, the engine when it is not the default (the first of
        :attr:`engines`), the link profile when the ranks ran across an emulated cluster."""
        name = self.name
        if len(self.strategies) > 1 and _given(strategy) and strategy != "sequential":
            name += f"/{strategy}"
        if _given(backend) and backend not in (self.default_backend, self.model_backend):
            name += f"[{backend}]"
        if _given(engine) and self.engines and engine != self.engines[0]:
            name += f"+{engine}"
        if _given(link):
            name += f"@{link}"
        return name

    def p(self, threads) -> float:
        """The ``p`` of speed-up and efficiency: the cores its workers occupy (``cores``):
        the worker count, 1 for one-core paths, NaN for a device (a GPU's parallelism is not a
        count of workers)."""
        if self.cores == "device":
            return float("nan")
        if self.cores == "one":
            return 1.0
        return float(threads) if _given(threads) else float("nan")

    def oversubscribed(self, threads, cores: int | None = None) -> bool:
        """True when ``threads`` workers exceed the machine's ``cores`` (None: this machine's;
        NaN, unknown: False)."""
        if cores is None:
            cores = os.cpu_count() or 1
        if self.cores != "workers" or not _given(threads) or not _given(cores):
            return False
        return int(threads) > int(cores)


def _given(x) -> bool:
    if x is None:
        return False
    if isinstance(x, float) and math.isnan(x):
        return False
    return str(x) not in ("", "nan", "None", "<NA>")


#: the registry, in the order tables and figures list the paths
PATHS: dict[str, TrainingPath] = {p.name: p for p in (
    TrainingPath("sequential", "NumPy backend, one worker, BLAS pinned to one thread: the "
                 "baseline", strategies=("sequential",), backends=("numpy",), workers="none",
                 cores="one", sequential_algorithm=True),
    TrainingPath("threads", "data-parallel Python threads (sync | average | hogwild) over the "
                 "NumPy or Numba nogil kernels", strategies=("sync", "average", "hogwild"),
                 backends=("numpy", "numba"), workers="Python threads", scales=True,
                 options={"average": {"period": "every"}}, sequential_algorithm=True,
                 communicates=True, speed_guess=1.3),
    TrainingPath("accumulate", "micro-batch gradient accumulation on one thread: the sync "
                 "algorithm with its shards computed one after the other",
                 strategies=("accumulate",), backends=("numpy", "numba"),
                 workers="micro-batches per step, on one thread", scales=True, cores="one",
                 sequential_algorithm=True, speed_guess=0.95),
    TrainingPath("numba", "Numba nogil kernels, one worker", backends=("numba",),
                 workers="none", cores="one", sequential_algorithm=True, overhead=2.0),
    TrainingPath("processes", "sync over worker processes, weights and gradients in shared "
                 "memory (no GIL, no MPI)", strategies=("sync",), backends=("numpy", "numba"),
                 workers="worker processes", scales=True, fit_strategy={"sync": "processes"},
                 sequential_algorithm=True, communicates=True),
    TrainingPath("mpi", "sync (or local SGD: average) across MPI ranks started by mpiexec, one "
                 "Allreduce per step", strategies=("sync", "average"),
                 backends=("numpy", "numba"), workers="MPI ranks", scales=True,
                 launch="mpiexec", fit_strategy={"sync": "mpi", "average": "mpi_average"},
                 fit_workers=False, requires=("mpi4py",), sequential_algorithm=True,
                 communicates=True, links=True, overhead=1.0),
    TrainingPath("numba_parallel", "Numba parallel=True kernels (intra-op threads)",
                 backends=("numba_parallel",), workers="NUMBA_NUM_THREADS", scales=True,
                 launch="env", env={"NUMBA_NUM_THREADS": "{threads}"}, fit_workers=False,
                 sequential_algorithm=True, overhead=2.0, speed_guess=1.3),
    TrainingPath("cuda", "numba.cuda kernels, parameters resident on the GPU",
                 backends=("cuda",), workers="none", needs_gpu=True, uses_cores=False,
                 cores="device", sequential_algorithm=True, overhead=5.0, speed_guess=5.0),
    TrainingPath("keras", "the Keras reference (TensorFlow, CPU), same spec and weights",
                 backends=("tensorflow",), workers="TensorFlow intra/inter-op threads",
                 scales=True, trainer="keras", model_backend="numpy",
                 requires=("tensorflow",), engines=("graph", "xla"), overhead=12.0,
                 speed_guess=3.0),
    TrainingPath("torch", "PyTorch on the CPU (intra-op threads), same spec, weights and batches",
                 backends=("torch",), workers="PyTorch intra-op threads", scales=True,
                 trainer="torch", model_backend="numpy", requires=("torch",),
                 optimizers=("sgd",), engines=("eager", "channels_last", "compiled"),
                 overhead=4.0, speed_guess=0.5),
    TrainingPath("torch_ddp", "PyTorch DistributedDataParallel on the CPU: one process per "
                 "worker started by mpiexec, gloo's allreduce of gradient buckets while "
                 "backward runs, one intra-op thread each", strategies=("sync",),
                 backends=("torch",), workers="DDP processes", scales=True, launch="mpiexec",
                 trainer="torch", model_backend="numpy", requires=("torch", "mpi4py"),
                 optimizers=("sgd",), communicates=True, overhead=5.0, speed_guess=0.5),
    TrainingPath("torch_cuda", "PyTorch on the GPU, same spec, weights and batches",
                 backends=("torch_cuda",), workers="none", trainer="torch",
                 model_backend="numpy", requires=("torch",), needs_gpu=True,
                 uses_cores=False, cores="device", device="cuda", optimizers=("sgd",),
                 overhead=8.0, speed_guess=5.0),
)}


def register_path(entry: TrainingPath) -> TrainingPath:
    """Add ``entry`` to the registry, after the paths already there (ValueError when its name
    is taken). The grid, the runner, the estimates and the analysis know it from then on."""
    if not isinstance(entry, TrainingPath):
        raise TypeError(f"register_path takes a TrainingPath; received {type(entry).__name__}")
    if entry.name in PATHS:
        raise ValueError(f"path {entry.name!r} is already registered")
    PATHS[entry.name] = entry
    return entry


def path_names() -> list[str]:
    return list(PATHS)


def get_path(name: str) -> TrainingPath:
    """The registry entry called ``name`` (ValueError naming the choices otherwise)."""
    try:
        return PATHS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown path {name!r}; choose one of {path_names()}") from None


def all_strategies() -> list[str]:
    """Every strategy some path takes, in registry order."""
    return list(dict.fromkeys(s for p in PATHS.values() for s in p.strategies))


def all_backends() -> list[str]:
    """Every backend some path runs over, in registry order."""
    return list(dict.fromkeys(b for p in PATHS.values() for b in p.backends))


def all_engines() -> list[str]:
    """Every engine some path runs as, in registry order."""
    return list(dict.fromkeys(e for p in PATHS.values() for e in p.engines))


def variant_name(path: str, strategy=None, backend=None, engine=None, link=None) -> str:
    """The display name of a path variant (see :meth:`TrainingPath.variant`); a path not in the
    registry (a results file from elsewhere) keeps its own name."""
    entry = PATHS.get(str(path))
    if entry is None:
        name = str(path)
        if _given(strategy) and strategy != "sequential":
            name += f"/{strategy}"
        return name
    return entry.variant(strategy, backend, engine, link)


def label(path: str, strategy=None, backend=None, threads=None, engine=None, link=None) -> str:
    """The display label of a run: variant and worker count (see :meth:`TrainingPath.label`)."""
    entry = PATHS.get(str(path))
    if entry is None:
        name = variant_name(path, strategy, backend)
        return f"{name} ×{int(threads)}" if _given(threads) else name
    return entry.label(strategy, backend, threads, engine, link)


def workers(path: str, threads) -> float:
    """The ``p`` of a run of ``path`` with ``threads`` (NaN where undefined)."""
    entry = PATHS.get(str(path))
    if entry is None:
        return float(threads) if _given(threads) else float("nan")
    return entry.p(threads)


def oversubscribed(path: str, threads, cores) -> bool:
    entry = PATHS.get(str(path))
    return bool(entry and entry.oversubscribed(threads, cores))


def order(path: str) -> int:
    """Position of ``path`` in the registry (unknown paths last)."""
    names = path_names()
    return names.index(path) if path in names else len(names)
