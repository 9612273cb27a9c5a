"""The one fit loop: batching, shuffling, the strategy, timing, evaluation and history.

Every training path (sequential, threads, CUDA, MPI) runs through :func:`fit`; what differs is
the backend (where the arithmetic runs) and the strategy (how a batch is split). The timing
columns follow docs/measuring.md: data preparation (shuffle, gather), host-to-device transfer, compute
(the strategy's step, including reading back the two scalars), JIT compile (a warm-up step
before the first epoch) and evaluation are measured separately; ``time`` is the training wall
time of the epoch, and throughput is examples / ``time``.

Data loading is off the critical path where there is work to hide: a prefetching thread
(:class:`_Prefetcher`) gathers the next batch into a reused buffer, augments or normalises
it, and moves it to the backend (the host-to-device copy on CUDA), while the strategy computes
the current one. ``data_time`` and ``transfer_time`` are therefore only what stayed
*exposed*: the time the training thread waited for a batch that was not ready yet (plus the
epoch's shuffle), so ``time`` >= data + transfer + compute. A batch that needs only its
gather (no augmentation, normalisation or device copy) is gathered by the training thread
itself unless asked otherwise (:func:`prefetch_thread`).
"""
from __future__ import annotations

import math
import os
import queue
import sys
import threading
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .augment import InputPipeline, checked_augmentation
from .backends import AUTO, Backend, get_backend
from .backup import (Backup, BackupMismatchError, FitBackups, check_identity, fingerprint, pack,
                     unpack)
from .callbacks import Callback, FitRun, monitored
from .checks import check_bool, check_int, check_number
from .context import StepContext
from .errors import DivergedError, Interrupted
from .normalize import training_normalization
from .optim import OptimizerState, make_optimizer
from .parallel import Strategy, make_strategy
from .trace import PREFETCH_TID, as_tracer


NONFINITE_POLICIES = ("raise", "continue")


#: phase -> its per-epoch column of a History, in the order of the timing table
PHASE_COLUMNS = (("data", "data_time"), ("compute", "compute_time"),
                 ("communication", "comm_time"), ("transfer", "transfer_time"),
                 ("evaluation", "eval_time"))
#: what each phase of the timing table holds
PHASE_MEANING = {
    "data": "shuffling and gathering batches (the part not hidden by prefetching)",
    "compute": "the training steps: forward, backward, update",
    "communication": "combining gradients or weights between workers",
    "transfer": "host-to-device copies (the part not hidden by prefetching)",
    "evaluation": "the validation pass after each epoch",
    "compile": "JIT compilation (or tracing) before the first epoch",
    "other": "the rest: set-up, callbacks, bookkeeping between steps",
}


@dataclass
class History:
    """Per-epoch records (``history[key]`` is a list over epochs) and run-level facts."""

    history: dict[str, list] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def append(self, logs: dict) -> None:
        for k, v in logs.items():
            self.history.setdefault(k, []).append(v)

    @property
    def epochs(self) -> int:
        return len(self.history.get("epoch", []))

    def epoch_line(self, epochs: int) -> str:
        """The last epoch's progress line, as every trainer prints it with ``verbose=1``:
        ``epoch 3/10: loss ... acc ... time 1.23s (4,567 img/s)``, then the validation loss and
        accuracy when the epoch was evaluated."""
        logs = {k: v[-1] for k, v in self.history.items()}
        line = (f"epoch {logs['epoch']}/{epochs}: loss {logs['loss']:.4f}  "
                f"acc {logs['accuracy']:.4f}  "
                f"time {logs['time']:.2f}s ({logs['images_per_sec']:,.0f} img/s)")
        if "val_accuracy" in logs:
            line += f"  val_loss {logs['val_loss']:.4f}  val_acc {logs['val_accuracy']:.4f}"
        return line

    def phase_times(self) -> dict[str, float]:
        """Seconds per phase over the whole fit, from the per-epoch columns and ``info``:
        ``data``, ``compute``, ``communication``, ``transfer`` (inside the epochs' time),
        ``evaluation`` (after each epoch) and ``compile`` (before the first); a trainer without
        a column (one worker communicates nothing) counts 0 for it."""
        h = self.history
        return {phase: float(sum(h.get(column, ()))) for phase, column in PHASE_COLUMNS} | {
            "compile": float(self.info.get("compile_time", 0.0))}

    def timing_table(self) -> str:
        """The per-phase timing table ``train`` ends with: each phase's seconds
        (:meth:`phase_times`) and its share of the fit's wall time (``info["wall_time"]``), and
        the rest of that wall time as ``other`` (set-up, step hooks, Python between steps)."""
        times = self.phase_times()
        wall = self.info.get("wall_time")
        if wall is None:  # a History not made by a fit: shares of the phases' sum
            wall = sum(times.values())
        times["other"] = max(wall - sum(times.values()), 0.0)
        lines = [f"time per phase over {self.epochs} epoch(s), share of the fit's wall time "
                 f"{wall:.2f} s:", f"  {'phase':<15}{'seconds':>9}{'share':>8}"]
        for phase, seconds in times.items():
            share = f"{seconds / wall:8.1%}" if wall > 0 else f"{'-':>8}"
            lines.append(f"  {phase:<15}{seconds:9.2f}{share}  {PHASE_MEANING[phase]}")
        return "\n".join(lines)

    def to_frame(self):
        import pandas as pd
        return pd.DataFrame(self.history)



def _blas_limit(threads: int | None):
    if threads is None:
        return nullcontext()
    from threadpoolctl import threadpool_limits
    return threadpool_limits(limits=threads, user_api="blas")


def fit(model, x, y, *, epochs: int = 1, batch_size: int = 32, optimizer=None,
        strategy: "str | Strategy" = "sequential", threads: int = 1,
        strategy_options: dict | None = None, backend: "str | Backend | None" = None,
        shuffle: bool = True, seed: int = 0, validation_data: tuple | None = None,
        callbacks: Sequence[Callback] = (), verbose: int = 1, blas_threads: int | None = 1,
        progress: Callable | None = None, on_nonfinite: str = "raise",
        prefetch: "bool | str" = "auto", validation_split: float = 0.0, lr_schedule=None,
        reset_optimizer: bool = False, backup_dir: "str | os.PathLike | None" = None,
        backup_every: "int | str" = "epoch", trace=None, augment=None,
        normalize: bool = False) -> History:
    """Train ``model`` in place on ``x (N, C, H, W)``, ``y (N,)``.

    Args:
        epochs: full passes over the training set.
        batch_size: examples per update (per worker for ``average``/``hogwild``).
        optimizer: an optimizer or its spec dict (default: plain SGD at its default rate,
            :func:`cnn.optim.default_optimizer_spec`; see :func:`cnn.optim.make_optimizer`). Its state (slots and step count) persists across
            ``fit`` calls on the same model: the fit continues from ``model.optimizer_state``
            when the optimizer has the same type and slots, and leaves its final state there.
        lr_schedule: a learning-rate schedule or its spec (:func:`cnn.schedules.make_schedule`,
            e.g. ``"cosine"`` or ``{"type": "step", "step_size": 2, "unit": "epoch"}``),
            starting from the optimizer's ``lr``; replaces the optimizer spec's ``schedule``.
            Horizons left out (a cosine's ``decay_steps``) end with this fit.
        reset_optimizer: start from a fresh optimizer state (zero slots, step 0) even when the
            model kept one.
        strategy, threads, strategy_options: how each batch is split (see :mod:`cnn.parallel`).
        backend: where the arithmetic runs (default the model's, whose own default is
            ``"auto"``: the fastest CPU backend installed, numba when Numba imports, else
            numpy). The backend used is printed first (``verbose``) and recorded in
            ``history.info["backend"]``, the name asked for in ``info["backend_requested"]``.
        shuffle, seed: the data order of each epoch comes from ``seed`` (epoch ``e``'s order
            is a function of ``seed`` and ``e`` alone, :class:`EpochOrders`), so two runs
            with the same seed see the same batches in the same order.
        validation_data: ``(x_val, y_val)`` evaluated after each epoch (``val_loss``,
            ``val_accuracy``); the study passes the held-out test set here.
        augment: data augmentation of the training batches (:mod:`cnn.augment`): None (none),
            ``"cifar"`` (4 pixels of zero padding, a random crop of the image's size, a
            random horizontal flip), or a dict of ``pad``, ``crop``, ``flip``. Each example's
            crop and flip are a function of ``(seed, epoch, its index in x)``, the same on
            every path and after a resume. Checked against the inputs before any work.
        normalize: normalise the inputs per channel (:mod:`cnn.normalize`) with the mean and
            standard deviation of each channel over ``x`` (after ``validation_split``), set as
            ``model.normalization`` before training. Whatever normalisation the model holds
            (set now, by an earlier fit, or loaded with its weights) is applied to every
            training batch, and by ``evaluate``/``predict`` (the validation data too).
        validation_split: a fraction in (0, 1) of the training data, carved out stratified by
            class (:func:`cnn.data.stratified_split` with ``seed``), that is not trained on
            and serves as ``validation_data`` (early stopping, checkpoints, reduce-on-plateau
            decide on it). Not together with ``validation_data``.
        callbacks: hooks (:mod:`cnn.callbacks`): per step, per epoch, at the start and end.
        on_nonfinite: what a NaN or infinite training loss does: ``"raise"`` (default) stops
            at that step with :class:`DivergedError` naming the epoch and step (also when the
            validation loss or, at the end, the weights are non-finite); ``"continue"`` keeps
            training, warns once, and counts such steps in ``history.info["nonfinite_steps"]``
            (the first one in ``history.info["first_nonfinite"]`` as ``(epoch, step)``).
        blas_threads: BLAS threads for the duration of the fit (1: the sequential baseline
            really is sequential, and data-parallel workers do not oversubscribe the cores);
            ``None`` leaves BLAS alone.
        backup_dir: a folder for backups of the run (:mod:`cnn.backup`, ``docs/backups.md``):
            the weights, buffers, optimizer state and step, the schedule's and callbacks'
            state, the position in the run and the history, written atomically every
            ``backup_every`` (``"epoch"``, ``"N epochs"``, ``"N steps"`` or N steps), when the
            fit is stopped at a step boundary (:class:`cnn.errors.Interrupted`) and when it
            ends; the last two are kept. A fit given a folder that holds a backup continues
            from the newest usable one (saying so; a torn one is skipped, saying so too) and
            ends with the same weights and history as a run never interrupted; a backup of
            another model, data set or configuration is refused, naming what differs.
        trace: a path (``.json``) or a :class:`cnn.trace.Tracer`: record the timeline of every
            step (per worker thread, process or MPI rank: data wait, each op's forward and
            backward, loss, reduce, update, barriers) and write it as Chrome trace events
            (Perfetto, ``chrome://tracing``) when the fit ends, MPI ranks merged by rank 0 on
            a common clock (see :mod:`cnn.trace`). None (default): nothing is recorded.

    With ``prefetch=True`` the next batch is gathered (augmented, normalised and moved to the
    device) by a prefetching thread while the current one trains; ``data_time``/
    ``transfer_time`` below count only the waits for it that remained exposed (see the module
    docstring). ``prefetch=False`` gathers each batch in the training thread, before its step
    (into the same reused buffers), so those columns then hold the whole gather and transfer.
    ``"auto"`` (the default): :func:`prefetch_thread` decides, recorded in the history's
    ``info["prefetch"]``.

    A stop asked for while it trains (:meth:`Strategy.request_stop`; the command line's
    Ctrl-C and SIGTERM) ends the fit after the step in progress with
    :class:`cnn.errors.Interrupted`, the model holding that step's weights.

    Returns:
        a :class:`History`: per epoch ``loss``, ``accuracy`` (running, on training batches),
        ``val_loss``, ``val_accuracy``, ``lr`` (the learning rate of the epoch's last step),
        ``time``, ``compute_time`` (the steps, less
        ``comm_time``: seconds spent combining gradients or weights between workers, 0 for
        one worker), ``data_time``,
        ``transfer_time``, ``eval_time``, ``images_per_sec``; ``info`` holds ``compile_time``,
        ``wall_time`` (the seconds of the whole call) and the configuration (the optimizer, the
        global steps at the start and end, seconds spent in batch callbacks, which are not in
        ``time``, and in writing backups, which are). A resumed fit's ``info["resumes"]`` says
        where each resume started and ``info["resumed_epochs"]`` which epochs a resume split
        (their ``time`` covers the steps before the backup and those after the resume, not the
        steps lost between).
    """
    started = time.perf_counter()
    epochs = check_int(None, "epochs", epochs)
    batch_size = check_int(None, "batch_size", batch_size)
    if on_nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"on_nonfinite must be one of {NONFINITE_POLICIES}. "
                         f"Received on_nonfinite={on_nonfinite!r}")
    model.check_inputs(x, y)
    if validation_split:
        x, y, validation_data = _carve_validation(x, y, validation_split, validation_data, seed)
    if validation_data is not None:
        model.check_inputs(*validation_data)
    augmentation = checked_augmentation(augment, model.input_shape)
    normalize = check_bool(None, "normalize", normalize)
    requested = backend or model.backend
    be = get_backend(requested)
    if not (isinstance(prefetch, str) and prefetch == "auto"):
        if not isinstance(prefetch, (bool, np.bool_)):
            raise ValueError(f"prefetch: True, False or 'auto'. Received {prefetch!r}")
    opt = make_optimizer(optimizer, schedule=lr_schedule)
    strat = make_strategy(strategy, threads, **(strategy_options or {}))
    strat.check_batch_size(batch_size)
    tracer = strat.tracer = as_tracer(trace)
    if not strat.is_master:  # MPI ranks other than 0 neither print nor show progress
        verbose = 0
    n = len(x)
    step_size = strat.examples_per_step(batch_size)
    steps_per_epoch = -(-n // step_size)
    backups = (None if backup_dir is None
               else FitBackups(backup_dir, backup_every, master=strat.is_master))
    resume = _Resume.load(backups, strat)
    saved = None if reset_optimizer else getattr(model, "optimizer_state", None)
    if not opt.accepts(saved, model.params):
        saved = None
    start_step = (resume.info["start_step"] if resume else
                  saved.step if saved is not None else 0)
    if opt.schedule is not None:
        opt = opt.with_schedule(opt.schedule.resolve(steps_per_epoch,
                                                     start_step + epochs * steps_per_epoch))
    callbacks = list(callbacks)
    for owner, metric in monitored(callbacks, opt.schedule):
        if metric.startswith("val_") and validation_data is None:
            raise ValueError(f"{owner} monitors {metric!r}, which needs validation data: pass "
                             "fit(validation_split=...) (carved from the training data) or "
                             "validation_data=")
    # the statistics of the training split, once, after every check
    normalization = training_normalization(x, normalize, model.normalization,
                                           model.input_shape)
    prefetch = prefetch_thread(prefetch, be, augmentation is not None
                               or normalization is not None)
    identity = None
    if backups is not None:
        identity = {"model": model.spec(), "dtype": str(model.dtype),
                    "data": (None if not strat.is_master else
                             {"train": fingerprint(x, y),
                              "validation": (None if validation_data is None
                                             else fingerprint(*validation_data))}),
                    "training": {"batch_size": batch_size, "seed": seed,
                                 "shuffle": bool(shuffle), "optimizer": opt.config(),
                                 **strat.algorithm(),
                                 # only when used: the backups of runs without them unchanged
                                 **_inputs_config(augmentation, normalization)}}
        if resume:
            resume.check(identity, strat)
    model.normalization = normalization  # evaluate() and the callbacks' predictions use it
    history = History(info={"backend": be.name, "backend_requested": getattr(
                                requested, "name", requested), **strat.describe(),
                            "batch_size": batch_size,
                            "epochs": epochs, "seed": seed, "optimizer": opt.config(),
                            "train_examples": n, "dtype": str(model.dtype),
                            "nonfinite_steps": 0, "first_nonfinite": None,
                            "prefetch": bool(prefetch),
                            "augment": None if augmentation is None else augmentation.config(),
                            "normalization": (None if normalization is None
                                              else normalization.config()),
                            "start_step": start_step, "callback_time": 0.0,
                            "validation_examples": (None if validation_data is None
                                                    else len(validation_data[1]))})
    if backups is not None:
        history.info.update(backup_time=0.0, resumes=[], resumed_epochs=[])
    run = FitRun(model, history, strat, be)
    if verbose:
        print(f"training on backend {be.name}"
              + (" (auto: the fastest CPU backend installed)" if requested == AUTO else ""),
              flush=True)
    if opt.schedule is not None:
        opt.schedule.on_train_begin()
    for cb in callbacks:
        if hasattr(cb, "set_run"):
            cb.set_run(run)
        else:
            cb.run = run
        cb.on_train_begin(history)
    stepper = _StepHooks(callbacks, strat, model, be, run)
    pipeline = InputPipeline(augmentation, normalization, seed)
    if resume:
        saved = resume.restore(model, opt, history, callbacks, stepper, be)
        if strat.is_master:
            resume.announce(epochs, strat)

    with _blas_limit(blas_threads):
        t0 = time.perf_counter()
        params = {k: be.asarray(v) for k, v in model.params.items()}
        be.synchronize()
        history.info["params_transfer_time"] = time.perf_counter() - t0
        history.info["compile_time"] = _warm_up(model, x, y, params, be, opt, strat)
        state = saved.to_backend(be) if saved is not None else None
        strat.start(model, opt, be, params, seed=seed, state=state)
        if resume:
            strat.restore(resume.strategy_snapshot())
        raising = on_nonfinite == "raise"
        orders = EpochOrders(seed, n, shuffle)
        boundaries = _Boundaries(backups, strat, be, opt, history, callbacks, stepper,
                                 identity, steps_per_epoch, n)
        first, totals, done = resume.start_point() if resume else (1, None, False)
        epoch = first - 1
        finished, stop = False, done  # done: the backup's run had stopped training
        if resume:  # that point needs no backup of its own
            boundaries.last = (epoch, None) if totals is None else (first, totals.batches)
        try:
            for epoch in range(first, epochs + 1 if not done else first):
                logs = _run_epoch(strat, be, x, y, n, step_size, orders, epoch, epochs,
                                  verbose, progress, history.info, raising, prefetch, stepper,
                                  totals, boundaries, tracer, pipeline)
                stopped_by_step = totals is not None and totals.stopped
                totals = None
                if validation_data is not None:
                    t = time.perf_counter()
                    current = strat.current_params()  # a collective for some strategies
                    buffers = strat.current_buffers()
                    # only the master evaluates (MPI rank 0); every process gets its numbers,
                    # so that callbacks and divergence checks decide alike everywhere
                    val = (model.evaluate(*validation_data, params=current, buffers=buffers,
                                          backend=be)
                           if strat.is_master else {"loss": math.nan, "accuracy": math.nan})
                    val = strat.share_metrics(val)
                    logs["eval_time"] = time.perf_counter() - t
                    logs["val_loss"], logs["val_accuracy"] = val["loss"], val["accuracy"]
                    if raising and not math.isfinite(val["loss"]):
                        raise DivergedError(epoch, steps_per_epoch, val["loss"], "validation")
                history.append(logs)
                if verbose:
                    print(history.epoch_line(epochs), flush=True)
                if opt.schedule is not None:  # reduce-on-plateau reads the epoch's metrics
                    opt.schedule.on_epoch_end(epoch, logs)
                stop = run.stop_training or stopped_by_step
                if callbacks:  # callbacks see the current weights in the model
                    now = {**strat.current_params(), **strat.current_buffers()}
                    model.set_weights({k: be.to_host(v) for k, v in now.items()})
                    stops = [cb.on_epoch_end(epoch, logs) for cb in callbacks]
                    stop = any(stops) or run.stop_training or stop
                boundaries.after_epoch(epoch, stop)
                if stop:
                    break
            finished = True
            boundaries.at_end(epoch, stop)
            if tracer is not None:  # MPI: a collective; processes: asks the workers
                strat.merge_trace(tracer)
        except DivergedError as err:
            err.history = history
            raise
        except Interrupted:
            raise  # every process stops after the same step: nothing to abort
        except BaseException as err:
            strat.abort(err)  # MPI: print it with the rank and end every rank
            raise
        finally:
            # keep what was learned even when a step fails or the run is interrupted
            final = {**strat.current_params(), **strat.current_buffers()}
            model.set_weights({k: be.to_host(v) for k, v in final.items()})
            model.optimizer_state = strat.current_state().to_host(be)
            strat.close()
    # the last update comes after the last loss was read: check the weights it left, once
    if raising and not all(np.isfinite(v).all() for v in model.params.values()):
        err = DivergedError(epoch, steps_per_epoch, float("nan"), "weights")
        err.history = history
        raise err
    history.info["end_step"] = model.optimizer_state.step
    if tracer is not None and tracer.path is not None and strat.is_master:
        history.info["trace"] = str(tracer.write())
    if finished:
        for cb in callbacks:
            cb.on_train_end(history)
    history.info["wall_time"] = time.perf_counter() - started
    return history


def _inputs_config(augmentation, normalization) -> dict:
    """What a backup's identity says of the inputs: the augmentation and the normalisation,
    each only when there is one."""
    out = {}
    if augmentation is not None:
        out["augment"] = augmentation.config()
    if normalization is not None:
        out["normalization"] = normalization.config()
    return out


class EpochOrders:
    """The order in which fit visits the ``n`` training examples in each epoch: epoch ``e``'s
    is the ``e``-th ``rng.permutation(n)`` drawn from ``np.random.default_rng(seed)`` (the
    identity without ``shuffle``), a function of ``(seed, e)`` alone. Asked for the epochs in
    order it draws one permutation per epoch; asked for a later epoch first (a resumed fit) it
    replays the draws of the epochs before it, so a resume rebuilds exactly the order the
    interrupted run had."""

    def __init__(self, seed: int, n: int, shuffle: bool = True):
        self.seed, self.n, self.shuffle = seed, n, shuffle
        self._rng = np.random.default_rng(seed)
        self._next = 1  # the epoch whose permutation the generator draws next

    def __call__(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        if epoch < self._next:
            self._rng, self._next = np.random.default_rng(self.seed), 1
        while self._next < epoch:
            self._rng.permutation(self.n)
            self._next += 1
        self._next += 1
        return self._rng.permutation(self.n)


#: ``history.info`` entries a resumed fit carries on from its backup (the others describe the
#: process that runs now: its backend, strategy, compile time)
_CARRIED_INFO = ("start_step", "callback_time", "nonfinite_steps", "first_nonfinite",
                 "backup_time", "resumes", "resumed_epochs")


@dataclass
class _EpochTotals:
    """What an epoch has summed so far. A backup taken inside an epoch keeps it; the fit that
    resumes there goes on summing from it, so the epoch's history row is the one an
    uninterrupted run writes (its timings: the seconds before the backup plus those after the
    resume)."""

    batches: int = 0
    seen: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    data_time: float = 0.0
    transfer_time: float = 0.0
    compute_time: float = 0.0
    comm_time: float = 0.0
    callback_time: float = 0.0
    time: float = 0.0
    lr: float | None = None
    #: a step callback stopped training after the epoch's last batch so far
    stopped: bool = False


class _Resume:
    """The backup a fit continues from, on every process: the master read it (``backup``);
    the others have its JSON from the master (:meth:`Strategy.share`) and its weights and
    optimizer state through the strategy's start (MPI broadcasts rank 0's)."""

    def __init__(self, meta: dict, backup: Backup | None):
        self.meta, self.backup = meta, backup
        self.info = meta["info"]
        self.position = meta["position"]

    @classmethod
    def load(cls, backups: FitBackups | None, strat: Strategy) -> "_Resume | None":
        if backups is None:
            return None
        backup = backups.load() if strat.is_master else None
        meta = strat.share(None if backup is None else backup.meta)
        return None if meta is None else cls(meta, backup)

    def check(self, identity: dict, strat: Strategy) -> None:
        """Refuse (on every process) a backup of another run, naming what differs."""
        error = None
        if strat.is_master:
            try:
                check_identity(self.backup.path, self.meta["identity"], identity)
            except BackupMismatchError as err:
                error = str(err)
        error = strat.share(error)
        if error:
            raise BackupMismatchError(error)

    @property
    def stopped(self) -> bool:
        return bool(self.position["stopped"])

    def start_point(self) -> tuple[int, "_EpochTotals | None", bool]:
        """``(epoch, totals, done)``: the epoch to continue with, its totals so far when the
        backup was taken inside it, and whether no epoch is left (training had stopped)."""
        pos = self.position
        if pos["done"]:
            return pos["epoch"] + 1, None, self.stopped
        return pos["epoch"], _EpochTotals(**self.meta["totals"]), False

    def arrays(self) -> dict | None:
        return None if self.backup is None else self.backup.arrays

    def strategy_snapshot(self):
        return unpack(self.meta["strategy"], self.arrays())

    def restore(self, model, opt, history: History, callbacks, stepper, be) -> OptimizerState:
        """Put the backup's weights into ``model`` (master), its history, schedule, callback
        and step-hook state into theirs; return the optimizer state to start from."""
        meta, b = self.meta, self.backup
        saved = meta["optimizer_state"]
        if b is not None:
            model.set_weights({**b.group("param"), **b.group("buffer")})
            slots = {name: b.group(f"slot/{name}") for name in saved["slots"]}
        else:  # its arrays come from the master when the strategy starts
            slots = {name: {k: np.zeros_like(v) for k, v in model.params.items()}
                     for name in saved["slots"]}
        state = OptimizerState(slots, saved["step"], saved["type"])
        history.history = {k: list(v) for k, v in meta["history"].items()}
        for key in _CARRIED_INFO:
            if key in self.info:
                history.info[key] = self.info[key]
        pos = self.position
        history.info["resumes"].append({"backup": None if b is None else b.path.name,
                                        "epoch": pos["epoch"], "done": pos["done"],
                                        "global_step": pos["global_step"],
                                        "written_by": meta["run"]["strategy"]})
        if not pos["done"] and pos["epoch"] not in history.info["resumed_epochs"]:
            history.info["resumed_epochs"].append(pos["epoch"])
        stepper.step, stepper.examples, stepper.elapsed = (meta["stepper"]["step"],
                                                           meta["stepper"]["examples"],
                                                           meta["stepper"]["elapsed"])
        if opt.schedule is not None and meta["schedule"] is not None:
            opt.schedule.set_state(unpack(meta["schedule"], self.arrays()))
        # each callback continues from the state of the first of its class not yet taken
        left = list(meta["callbacks"])
        for cb in callbacks:
            entry = next((e for e in left if e["class"] == type(cb).__name__), None)
            if entry is not None:
                left.remove(entry)
                if entry["state"] is not None:
                    cb.set_state(unpack(entry["state"], self.arrays()))
        return state

    def announce(self, epochs: int, strat: Strategy) -> None:
        pos = self.position
        where = (f"after epoch {pos['epoch']}" if pos["done"] else
                 f"in epoch {pos['epoch']} after {self.meta['totals']['batches']} of "
                 f"{self.meta['batches_per_epoch']} batches")
        text = (f"resuming from {self.backup.path}: {where} (global step "
                f"{pos['global_step']})")
        written = self.meta["run"]["strategy"]
        now = strat.describe()
        workers = [(k, written.get(k), now.get(k)) for k in ("threads", "ranks")
                   if written.get(k) != now.get(k)]
        if written.get("strategy") != now.get("strategy") or workers:
            text += (f"; written by strategy {written.get('strategy')} "
                     + ", ".join(f"{k}={a}" for k, a, _ in workers if a is not None)
                     + f", continuing with {now.get('strategy')} "
                     + ", ".join(f"{k}={b}" for k, _, b in workers if b is not None)).rstrip()
        if self.stopped or (pos["done"] and pos["epoch"] >= epochs):
            text += "; that run had finished: nothing is left to train"
        print(text, file=sys.stderr, flush=True)


class _Boundaries:
    """What the fit does at step and epoch boundaries besides training: write a backup when
    one is due (:class:`cnn.backup.FitBackups`), and stop when a stop was asked for
    (:meth:`Strategy.stop_requested`: every process agrees), with a backup of that point.

    Every process calls it at the same points: collecting the strategy's state may be a
    collective (``average`` over MPI ranks); the master alone writes."""

    def __init__(self, backups: FitBackups | None, strat: Strategy, be: Backend, opt,
                 history: History, callbacks, stepper, identity: dict | None,
                 steps_per_epoch: int, n: int):
        self.backups, self.strat, self.be, self.opt = backups, strat, be, opt
        self.history, self.callbacks, self.stepper = history, callbacks, stepper
        self.identity, self.steps_per_epoch, self.n = identity, steps_per_epoch, n
        self.last: tuple | None = None  # the point of the last backup written
        self.path = None  # the last backup written (master)

    def after_step(self, epoch: int, totals: _EpochTotals) -> None:
        here = (epoch, totals.batches)
        if self.backups is not None and self.backups.due_after_step(self.strat.steps):
            self._write(epoch, totals)
        if self.strat.stop_requested():
            if self.backups is not None and self.last != here:
                self._write(epoch, totals)
            raise Interrupted(epoch, totals.batches, totals.seen, self.n, self._path(here))

    def after_epoch(self, epoch: int, stop: bool) -> None:
        here = (epoch, None)
        if self.backups is not None and self.backups.due_after_epoch(epoch):
            self._write(epoch, None, stop)
        if not stop and self.strat.stop_requested():
            if self.backups is not None and self.last != here:
                self._write(epoch, None)
            raise Interrupted(epoch, self.steps_per_epoch, self.n, self.n, self._path(here))

    def at_end(self, epoch: int, stopped: bool) -> None:
        """The fit ends (``stopped``: early, by a callback): a last backup unless one was just
        written. A later fit with more epochs continues from it, unless it had stopped."""
        if self.backups is not None and self.last != (epoch, None):
            self._write(epoch, None, stopped)

    def _path(self, here: tuple):
        return self.path if self.last == here else None

    def _write(self, epoch: int, totals: _EpochTotals | None, stopped: bool = False) -> None:
        strat, be = self.strat, self.be
        if totals is not None:  # the epoch's communication so far goes into the backup
            totals.comm_time += strat.take_comm_time()
        params, buffers = strat.current_params(), strat.current_buffers()
        state = strat.current_state()
        snapshot = strat.snapshot()
        self.last = (epoch, None if totals is None else totals.batches)
        if not self.backups.master:
            return
        t = time.perf_counter()
        arrays: dict[str, np.ndarray] = {}
        for prefix, group in (("param", params), ("buffer", buffers)):
            for k, v in group.items():
                arrays[f"{prefix}/{k}"] = be.to_host(v)
        for name, slot in state.slots.items():
            for k, v in slot.items():
                arrays[f"slot/{name}/{k}"] = be.to_host(v)
        info = self.history.info
        meta = {"identity": self.identity,
                "run": {"strategy": strat.describe(), "backend": be.name},
                "batches_per_epoch": self.steps_per_epoch,
                "position": {"epoch": epoch, "done": totals is None,
                             "stopped": bool(stopped or (totals is not None and totals.stopped)),
                             "global_step": strat.steps},
                "totals": None if totals is None else asdict(totals),
                "optimizer_state": {"type": state.optimizer, "step": state.step,
                                    "slots": list(state.slots)},
                "history": self.history.history,
                "info": {k: info[k] for k in _CARRIED_INFO if k in info},
                "stepper": {"step": self.stepper.step, "examples": self.stepper.examples,
                            "elapsed": self.stepper.elapsed},
                "schedule": pack(None if self.opt.schedule is None
                                 else self.opt.schedule.get_state(), "schedule", arrays),
                "callbacks": [{"class": type(cb).__name__,
                               "state": pack(cb.get_state(), f"callback/{i}", arrays)}
                              for i, cb in enumerate(self.callbacks)],
                "strategy": pack(snapshot, "strategy", arrays)}
        path = self.backups.write(meta, arrays)
        info["backup_time"] += time.perf_counter() - t
        self.path = path


def _overrides(cb, hook: str) -> bool:
    """Whether ``cb`` has its own ``hook`` (not the base class's no-op)."""
    fn = getattr(type(cb), hook, None)
    return fn is not None and fn is not getattr(Callback, hook, None)


def _carve_validation(x, y, fraction, validation_data, seed):
    """``(x_train, y_train, (x_val, y_val))``: ``fraction`` of the examples, stratified."""
    from .data import stratified_split
    if validation_data is not None:
        raise ValueError("pass validation_split or validation_data, not both. Received "
                         f"validation_split={fraction!r} and validation_data")
    fraction = check_number(None, "validation_split", fraction, low=0.0, high=1.0,
                            low_open=True, high_open=True)
    x_t, y_t, x_v, y_v = stratified_split(x, np.asarray(y), fraction, seed)
    return x_t, y_t, (x_v, y_v)


def _warm_up(model, x, y, params, be: Backend, opt=None, strat: Strategy | None = None) -> float:
    """Seconds spent compiling: one untimed forward/backward on two examples for JIT backends
    (Numba, CUDA), and the optimizer's update applied to scratch copies (its kernels compile
    too); the real parameters are not updated. Then what the strategy ``strat`` compiles of
    its own (:meth:`~cnn.parallel.Strategy.warm_up`: the threads' barrier), on every backend.
    0 when nothing compiles."""
    t = time.perf_counter()
    compiled = strat is not None and strat.warm_up()
    if not getattr(be, "jit", False):
        return time.perf_counter() - t if compiled else 0.0
    # a training pass (dropout and batch-norm kernels compile too) that updates nothing: no
    # optimizer step (its kernels compile on scratch copies), and its new batch-norm
    # statistics (ctx.updates) are never committed
    buffers = {k: be.asarray(v) for k, v in model.buffers.items()}
    loss, correct, grads = model.loss_and_grads(be.asarray(x[:2]), be.asarray(y[:2]), params,
                                                be, StepContext(training=True, buffers=buffers))
    if opt is not None:
        scratch = {k: be.zeros_like(v) for k, v in params.items()}
        opt.apply(scratch, grads, opt.init_slots(scratch, be), be, opt.learning_rate(0), 1)
    be.to_host(loss)
    return time.perf_counter() - t


def prefetch_thread(prefetch: "bool | str", backend: Backend, batch_work: bool) -> bool:
    """Whether ``fit`` gathers batches in a prefetching thread: ``prefetch`` when it is a
    bool; for ``"auto"``, where a batch needs more than its gather (``batch_work``:
    augmentation or normalisation; or a host-to-device copy, ``backend.on_device``). A bare
    gather into a reused buffer is a few percent of a step, and a thread doing it takes the GIL
    and a core from the workers when they fill the machine: every strategy's fit loop trains
    (it is worker 0, ``processes`` included), so none of them waits idle for a batch."""
    if isinstance(prefetch, str) and prefetch == "auto":
        return bool(batch_work or backend.on_device)
    return bool(prefetch)


def _nonfinite(info: dict, epoch: int, step: int, loss: float, raising: bool) -> None:
    """A step's loss was NaN or infinite: raise, or count it (warning on the first)."""
    if raising:
        raise DivergedError(epoch, step, loss)
    if info["first_nonfinite"] is None:
        info["first_nonfinite"] = (epoch, step)
        warnings.warn(f"non-finite training loss {loss} at epoch {epoch}, step {step}; "
                      f"continuing (on_nonfinite='continue')", RuntimeWarning, stacklevel=3)
    info["nonfinite_steps"] += 1


class _Prefetcher:
    """Gathers (and moves to the backend) batch ``k + 1`` in a background thread while the
    strategy computes batch ``k``: the seeds' "parallel data loading", on every path.

    Batches are gathered by the fit's input pipeline (:class:`cnn.augment.InputPipeline`:
    ``np.take(..., out=)``, then the model's normalisation and the epoch's augmentation, if
    any) into two reused host buffers (no allocation per step); a buffer is refilled only
    after the step that used it has returned it (:meth:`release`), so a batch is never
    overwritten while it is being trained on. The backend's ``asarray`` (a no-op on the CPU
    backends, the host-to-device copy on CUDA) runs in the thread too. An exception in the
    thread is re-raised by :meth:`next`.
    ``local_rows(n)`` (the strategy's :meth:`~cnn.parallel.Strategy.local_rows`) names the
    rows of each global batch of ``n`` examples this process gathers: an MPI rank gathers
    only its shard, from the same order as every other rank (the augmentation's draws are
    keyed by the example's index in the training set, so they do not depend on who gathers).
    """

    _SLOTS = 2

    def __init__(self, be: Backend, x, y, order, step_size: int, threaded: bool = True,
                 lane=None, local_rows: Callable[[int], tuple[int, int]] | None = None,
                 pipeline: InputPipeline | None = None, epoch: int = 1,
                 buffers: Callable | None = None):
        self.be, self.x, self.y, self.order, self.step = be, x, y, order, step_size
        self.lane = lane  # where each gather is a span, in a traced fit
        self.local_rows = local_rows
        self.pipeline, self.epoch = pipeline or InputPipeline(), epoch
        rows = min(step_size, len(order))
        y_dtype = np.asarray(y).dtype
        # the strategy's own (Strategy.batch_buffers: shared memory its workers read), if any
        shared = None if buffers is None else buffers(rows, x.dtype, y_dtype)
        self._bufs = shared[:self._SLOTS] if shared else [
            (np.empty((rows, *x.shape[1:]), dtype=x.dtype), np.empty(rows, dtype=y_dtype))
            for _ in range(self._SLOTS)]
        self._free = threading.Semaphore(self._SLOTS)
        self._ready: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = False
        self._batches = self._produce()
        self._thread = None
        if threaded:
            self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)
            self._thread.start()

    def _produce(self):
        """The batches, in order: each gathered into a free slot, then moved to the backend;
        of each global batch only the rows ``local_rows`` names (all of them without it)."""
        for k, i in enumerate(range(0, len(self.order), self.step)):
            idx = self.order[i:i + self.step]
            size = len(idx)
            if self.local_rows is not None:
                lo, hi = self.local_rows(size)
                idx = idx[lo:hi]
            xs, ys = self._bufs[k % self._SLOTS]
            t0 = time.perf_counter()
            xb = self.pipeline.gather(self.x, idx, self.epoch, xs[:len(idx)])
            # mode="clip": no bounds-check buffering (the indices are a permutation)
            yb = np.take(self.y, idx, out=ys[:len(idx)], mode="clip")
            t1 = time.perf_counter()
            xb, yb = self.be.asarray(xb), self.be.asarray(yb)
            t2 = time.perf_counter()
            if self.lane is not None:  # in the training thread: a part of its data wait
                self.lane.interval("gather", int(t0 * 1e9), int(t2 * 1e9), cat="data")
            yield xb, yb, size, t1 - t0, t2 - t1

    def _run(self) -> None:
        try:
            while True:
                self._free.acquire()
                if self._stop:
                    return
                item = next(self._batches, None)
                if item is None:
                    return
                self._ready.put(item)
        except BaseException as err:  # noqa: BLE001 - handed to the training thread
            self._ready.put(err)

    def next(self):
        """``(xb, yb, size, gather_seconds, transfer_seconds)`` of the next batch (``size``:
        the global batch's examples, of which ``xb, yb`` may hold this process's rows alone)."""
        if self._thread is None:  # prefetch=False: gather now, in the training thread
            return next(self._batches)
        item = self._ready.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def release(self) -> None:
        """The batch last returned by :meth:`next` is no longer in use."""
        self._free.release()

    def close(self) -> None:
        self._stop = True
        for _ in range(self._SLOTS):
            self._free.release()
        if self._thread is not None:
            self._thread.join()


class _StepHooks:
    """Calls the callbacks that override ``on_step_end`` after every step (see
    :mod:`cnn.callbacks` for the logs they get), keeping the fit's step and example counts and
    its training clock, which leaves the hooks' own time out."""

    def __init__(self, callbacks, strat, model, be, run):
        self.callbacks = [cb for cb in callbacks if _overrides(cb, "on_step_end")]
        self.strat, self.model, self.be, self.run = strat, model, be, run
        self.step = self.examples = 0
        self.elapsed = 0.0  # training seconds of the finished epochs
        self.stop = False

    def __bool__(self) -> bool:
        return bool(self.callbacks)

    def _evaluate(self, xv, yv) -> dict:
        return self.model.evaluate(xv, yv, params=self.strat.current_params(),
                                   buffers=self.strat.current_buffers(), backend=self.be)

    def __call__(self, epoch: int, batch: int, examples: int, loss: float, correct: int,
                 lr: float, epoch_elapsed: float) -> bool:
        self.step += 1
        self.examples += examples
        logs = {"epoch": epoch, "step": self.step, "batch": batch, "examples": self.examples,
                "elapsed": self.elapsed + epoch_elapsed, "loss": loss,
                "accuracy": correct / max(examples, 1), "lr": lr,
                "global_step": self.strat.steps, "params": self.strat.current_params,
                "evaluate": self._evaluate}
        stops = [cb.on_step_end(self.step, logs) for cb in self.callbacks]
        self.stop = any(stops) or self.run.stop_training
        self.run.stop_training = self.stop
        return self.stop


def _run_epoch(strat: Strategy, be: Backend, x, y, n, step_size, orders: EpochOrders, epoch,
               epochs, verbose, progress, info: dict, raising: bool, prefetch: bool = True,
               stepper=None, totals: _EpochTotals | None = None,
               boundaries: _Boundaries | None = None, tracer=None,
               pipeline: InputPipeline | None = None) -> dict:
    """One epoch (from ``totals``, the sums of its first batches, when a resumed fit
    continues it): its batches in ``orders(epoch)``, then the strategy's end of epoch; the
    epoch's row of the history."""
    t = totals or _EpochTotals()
    before, callbacks_before = t.time, t.callback_time  # seconds of a run this one resumes
    callback_t = 0.0
    lr = strat.learning_rate() if t.lr is None else t.lr
    start = time.perf_counter()
    order = orders(epoch)
    t.data_time += time.perf_counter() - start
    bar = None
    if verbose:
        from tqdm.auto import tqdm
        bar = tqdm(total=n, initial=t.seen, desc=f"epoch {epoch}/{epochs}", unit="img",
                   leave=False)
    first = t.batches * step_size
    lane = None if tracer is None else tracer.lane(0)
    batches = _Prefetcher(be, x, y, order[first:] if not t.stopped else order[:0], step_size,
                          threaded=prefetch, lane=None if lane is None
                          else tracer.lane(PREFETCH_TID, "prefetch") if prefetch else lane,
                          local_rows=strat.local_rows, pipeline=pipeline, epoch=epoch,
                          buffers=strat.batch_buffers)
    try:
        for step, i in enumerate(range(first, n if not t.stopped else first, step_size),
                                 t.batches + 1):
            t1 = time.perf_counter()
            xb, yb, size, gather_s, transfer_s = batches.next()
            waited = time.perf_counter() - t1
            if lane is not None:
                lane.span("data wait", lane.begin(int(t1 * 1e9)), cat="data")
            # the exposed part of the prefetch: the transfer ends it, so a wait is charged to
            # the transfer first, the rest to the gather
            t.transfer_time += min(waited, transfer_s)
            t.data_time += waited - min(waited, transfer_s)
            t3 = time.perf_counter()
            lr = strat.learning_rate()
            batch_loss, batch_correct = strat.step_rows(xb, yb, size)
            batches.release()
            t.compute_time += time.perf_counter() - t3
            if lane is not None:  # the release wakes the prefetcher: it may take the GIL
                lane.span("data release", cat="data")
                lane.span("step", int(t1 * 1e9), args={"epoch": epoch, "step": strat.steps})
            if not math.isfinite(batch_loss):  # a host float already: no extra read-back
                if bar is not None and raising:
                    bar.close()
                _nonfinite(info, epoch, step, batch_loss, raising)
            t.loss_sum += batch_loss
            t.correct += batch_correct
            t.batches, t.seen, t.lr = step, min(i + step_size, n), lr
            if bar is not None:
                bar.update(size)
                bar.set_postfix(loss=f"{t.loss_sum / t.seen:.4f}", refresh=False)
            if progress is not None:
                progress(epoch, t.seen, n)
            if stepper:
                t5 = time.perf_counter()
                t.stopped = stepper(epoch, step, size, batch_loss / max(size, 1), batch_correct,
                                    lr, before + t5 - start - callback_t)
                callback_t += time.perf_counter() - t5
            if boundaries is not None:  # a backup, a stop asked for: at this step's end
                t.time = before + time.perf_counter() - start - callback_t
                t.callback_time = callbacks_before + callback_t
                boundaries.after_step(epoch, t)
            if t.stopped:
                break
    finally:
        batches.close()
    t4 = time.perf_counter()
    strat.end_epoch()
    t.compute_time += time.perf_counter() - t4
    # communication between workers (gradient reduce, allreduce, averaging) is its own column
    t.comm_time += strat.take_comm_time()
    if bar is not None:
        bar.close()
    wall = before + time.perf_counter() - start - callback_t  # step hooks are not training time
    callback_total = callbacks_before + callback_t
    info["callback_time"] += callback_total
    n = t.seen or n  # an epoch cut short by a callback: the means over what it saw
    logs = {"epoch": epoch, "loss": t.loss_sum / n, "accuracy": t.correct / n, "lr": lr,
            "time": wall, "compute_time": t.compute_time - t.comm_time,
            "comm_time": t.comm_time, "data_time": t.data_time,
            "transfer_time": t.transfer_time, "images_per_sec": n / wall}
    if stepper:
        stepper.elapsed += wall
        logs["callback_time"] = callback_total
        logs["examples"] = n  # fewer than the epoch's when a step callback stopped it
    return logs
