"""Every benchmark of the package, one module per suite of ``python -m cnn bench [SUITE]``
(:data:`SUITES`), beside what they are built from: :mod:`.harness` (synthetic images,
contenders, the interleaved comparison), :mod:`.hardware` (FLOP counts, measured SGEMM peak),
:mod:`.worker` (a contender in a process of its own) and :mod:`.ptx` (the CUDA kernels'
compile analysis, ``python -m cnn.bench.ptx``: needs no GPU).

Every suite prints what it measured side by side on this machine; none of them asserts a
timing (see :mod:`.harness` for how contenders are interleaved). This module is the command's
entry: it maps the command's options onto the suite and runs it, and loads nothing else until
it does.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Suite:
    """A suite of ``python -m cnn bench``: the module of :mod:`cnn.bench` whose ``suite``
    function runs it, what it measures, the options it takes beyond ``--repeats``,
    ``--quick``, ``--presets`` and ``--batch-sizes`` (as ``suite`` keywords), whether it
    prints the machine it ran on itself (else the command prints it first), and the extra it
    cannot run without (:mod:`cnn.extras`; the default suite runs without its optional
    contenders, saying so)."""

    module: str
    measures: str
    options: tuple[str, ...] = ()
    prints_machine: bool = False
    extra: str | None = None


#: suite name -> its entry; ``compare`` is the default
SUITES = {
    "compare": Suite("peers", "the default: ours on every CPU path vs Keras and PyTorch, 1 "
                     "and 2 threads", ("json_path",), prints_machine=True),
    "keras": Suite("keras", "sequential vs Keras", extra="keras"),
    "threads": Suite("threads", "speed-up of sync threads"),
    "gpu": Suite("gpu", "CUDA vs sequential vs Keras"),
    "mpi": Suite("mpi", "allreduce between MPI ranks and its fit, overlap; across the hosts "
                 "of an emulated cluster with --cluster", ("json_path", "cluster", "ranks",
                                                           "variants"), extra="mpi"),
    "ddp": Suite("ddp", "our 2-worker paths vs PyTorch DDP (gloo), one host and 2 emulated "
                 "hosts per --cluster link profile", ("json_path", "cluster"), extra="torch"),
    "compression": Suite("compression", "16-bit gradients on the wire: accuracy over seeds "
                         "(MNIST, CIFAR-10); bytes and speed with --cluster",
                         ("json_path", "cluster"), extra="mpi"),
    "memory": Suite("memory", "peak RSS of training on CIFAR-10"),
    "ops": Suite("ops", "every op of a model's plan on numpy, numba, numba_parallel",
                 ("dtype", "cpu_time"), prints_machine=True),
    "tta": Suite("tta", "time to a validation accuracy (98% MNIST, 60% CIFAR-10): ours at 1 "
                 "and 2 cores vs Keras and PyTorch at 1 and 2 threads, 3 seeds",
                 ("json_path",)),
    "trace": Suite("tracing", "what recording a timeline (fit(trace=...)) costs, trace off "
                   "vs on"),
    "conv": Suite("conv_algorithms", "direct vs Winograd convolution per conv op and step, "
                  "and each algorithm's float32 error", ("dtype", "cpu_time"),
                  prints_machine=True),
    "roofline": Suite("roofline", "single-core SGEMM peak and triad bandwidth, and each op's "
                      "arithmetic intensity and GFLOP/s forward and backward (cifar_tutorial, "
                      "cifar_resnet20)", ("json_path",), prints_machine=True),
    "ceiling": Suite("ceiling", "how fast two workers could train if they exchanged nothing "
                     "(one core's passes vs two threads' and two processes' passes of half "
                     "batches at once), beside the two-worker fits"),
    "backup": Suite("backup", "fit's backups every 100 steps against none (cifar_tutorial)"),
}
#: suite keyword -> the command-line option that sets it (for the errors)
OPTIONS = {"json_path": "--json", "dtype": "--dtype", "cpu_time": "--cpu-time",
           "cluster": "--cluster", "ranks": "--ranks", "variants": "--variants"}


def main(suite: str = "compare", repeats: int | None = None, quick: bool = False,
         presets=None, batch_sizes=None, json_path: str | None = None,
         dtype: str | None = None, cpu_time: bool = False, cluster: str | None = None,
         ranks=None, variants=None) -> None:
    """Run ``suite`` with the command's options; ``repeats`` ``None``: the suite's default,
    ``quick``: one repeat of a smoke-sized run. An option the suite does not take is refused,
    naming it, before anything is measured."""
    if suite not in SUITES:
        raise ValueError(f"unknown benchmark suite {suite!r}; choose one of {sorted(SUITES)}")
    entry = SUITES[suite]
    given = {"json_path": json_path, "dtype": dtype, "cpu_time": cpu_time or None,
             "cluster": cluster, "ranks": ranks, "variants": variants}
    for key, value in given.items():
        if value is not None and key not in entry.options:
            takers = [name for name, s in SUITES.items() if key in s.options]
            option = OPTIONS[key] + (f" {value}" if value is not True else "")
            refusal = "writes no figures" if key == "json_path" else f"takes no {OPTIONS[key]}"
            raise ValueError(f"{option}: the {suite!r} suite {refusal}; {OPTIONS[key]} works "
                             f"with {' and '.join(takers)}")
    if entry.extra is not None:
        from ..extras import require
        require(entry.extra, f"bench {suite}")
    kwargs = {"quick": quick, **{k: v for k, v in given.items() if v is not None}}
    if quick:
        kwargs["repeats"] = 1
    elif repeats is not None:
        kwargs["repeats"] = repeats
    if presets:
        kwargs["presets"] = presets
    if batch_sizes:
        kwargs["batch_sizes"] = batch_sizes
    if not entry.prints_machine:
        from ..machine import describe
        print(f"machine: {describe()}")
    importlib.import_module(f"{__name__}.{entry.module}").suite(**kwargs)
