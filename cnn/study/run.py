"""One run of the study as a typed value: its configuration, its path's registry entry, and how
the study schedules it.

:func:`cnn.study.grid.expand_grid` builds each :class:`Run` once, from the resolved grid row;
the runner, the child, the estimates and the plan read its fields and its ``entry`` (the
:class:`~cnn.paths.TrainingPath`) instead of looking the path up again. A run is also a
read-only mapping of its columns (the results' configuration columns, then its key, timeout
and place in the order), which is what goes back out: the child's JSON, the results rows, and
the values a registry entry formats (``env={"NUMBA_NUM_THREADS": "{threads}"}``).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Iterator

from .. import paths as P


@dataclass(frozen=True)
class Run(Mapping):
    """One run: the configuration fields are the results' configuration columns
    (:data:`cnn.results.CONFIG_FIELDS`, same names, same order), resolved (no None where the
    grid has a default).

    Attributes:
        entry: the registry entry of ``path`` (looked up when the run is built; an unknown path
            raises ValueError naming the choices).
        run_key: the stable key of the run (:func:`cnn.study.grid.run_key`).
        timeout: seconds the child may run before it is killed.
        order_index, order_seed: its place in the study's randomised order and the seed of
            that order (:func:`cnn.study.grid.plan_order`; None before it is planned).
    """

    dataset: str
    model: str
    path: str
    strategy: str
    backend: str
    threads: int
    batch_size: int
    filters: int
    epochs: int
    train_size: int
    test_size: int
    repeat: int
    dtype: str
    seed: int
    lr: float
    momentum: float
    cuda_simulator: bool
    period: str
    target: float | None
    eval_every: int
    val_size: int
    optimizer: str
    lr_schedule: str
    augment: str
    warmup_epochs: int
    engine: str
    link: str
    run_key: str
    timeout: float
    order_index: int | None = None
    order_seed: int | None = None
    entry: P.TrainingPath = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "entry", P.get_path(self.path))

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "Run":
        """The run a row of :data:`COLUMNS` describes (the child's JSON, a dict of a run);
        ValueError naming the first column it lacks or does not know."""
        missing = [c for c in COLUMNS if c not in row and c not in _OPTIONAL]
        unknown = [c for c in row if c not in COLUMNS]
        if missing or unknown:
            raise ValueError(f"a run's row: {'missing' if missing else 'unknown'} column "
                             f"{(missing or unknown)[0]!r}")
        return cls(**row)

    # ---- what the code reads ---------------------------------------------------------------
    @property
    def variant(self) -> str:
        """Its path variant's display name (``threads/sync[numba]``, ``mpi@1gbe``; the
        registry's)."""
        return self.entry.variant(self.strategy, self.backend, self.engine, self.link)

    @property
    def label(self) -> str:
        """Its variant with its worker count (``threads/sync ×2``)."""
        return self.entry.label(self.strategy, self.backend, self.threads, self.engine,
                                self.link)

    def jit_key(self) -> tuple[str, str] | None:
        """``(backend, dtype)`` when the run's kernels are JIT-compiled, else None (also under
        the CUDA simulator, which interprets kernels and compiles nothing)."""
        if self.cuda_simulator or not self.entry.compiles(self.backend):
            return None
        return self.backend, self.dtype

    # ---- the mapping of its columns ----------------------------------------------------------
    def __getitem__(self, column: str):
        if column not in _COLUMN_SET:
            raise KeyError(column)
        return getattr(self, column)

    def __iter__(self) -> Iterator[str]:
        return iter(COLUMNS)

    def __len__(self) -> int:
        return len(COLUMNS)


#: a run's columns: its configuration (the results' CONFIG_FIELDS), key, timeout and order
COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(Run) if f.init)
_COLUMN_SET = frozenset(COLUMNS)
#: columns a row may leave out (a run not yet planned)
_OPTIONAL = ("order_index", "order_seed")
