"""The one fit loop: batching, shuffling, the strategy, timing, evaluation and history.

Every training path (sequential, threads, CUDA, MPI) runs through :func:`fit`; what differs is
the backend (where the arithmetic runs) and the strategy (how a batch is split). The timing
columns follow DESIGN.md: data preparation (shuffle, gather), host-to-device transfer, compute
(the strategy's step, including reading back the two scalars), JIT compile (a warm-up step
before the first epoch) and evaluation are measured separately; ``time`` is the training wall
time of the epoch, and throughput is examples / ``time``.

Data loading is off the critical path: a prefetching thread (:class:`_Prefetcher`) gathers the
next batch into a reused buffer, and moves it to the backend (the host-to-device copy on
CUDA), while the strategy computes the current one. ``data_time`` and ``transfer_time`` are
therefore only what stayed *exposed*: the time the training thread waited for a batch that
was not ready yet (plus the epoch's shuffle), so ``time`` >= data + transfer + compute.
"""
from __future__ import annotations

import math
import queue
import threading
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .backends import Backend, get_backend
from .callbacks import Callback, FitRun, monitored
from .checks import check_int, check_number
from .context import StepContext
from .errors import DivergedError
from .optim import make_optimizer
from .parallel import Strategy, make_strategy


NONFINITE_POLICIES = ("raise", "continue")


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
        prefetch: bool = True, validation_split: float = 0.0, lr_schedule=None,
        reset_optimizer: bool = False) -> History:
    """Train ``model`` in place on ``x (N, C, H, W)``, ``y (N,)``.

    Args:
        epochs: full passes over the training set.
        batch_size: examples per update (per worker for ``average``/``hogwild``).
        optimizer: an optimizer or its spec dict (default plain SGD, lr 0.01; see
            :func:`cnn.optim.make_optimizer`). Its state (slots and step count) persists across
            ``fit`` calls on the same model: the fit continues from ``model.optimizer_state``
            when the optimizer has the same type and slots, and leaves its final state there.
        lr_schedule: a learning-rate schedule or its spec (:func:`cnn.schedules.make_schedule`,
            e.g. ``"cosine"`` or ``{"type": "step", "step_size": 2, "unit": "epoch"}``),
            starting from the optimizer's ``lr``; replaces the optimizer spec's ``schedule``.
            Horizons left out (a cosine's ``decay_steps``) end with this fit.
        reset_optimizer: start from a fresh optimizer state (zero slots, step 0) even when the
            model kept one.
        strategy, threads, strategy_options: how each batch is split (see :mod:`cnn.parallel`).
        backend: where the arithmetic runs (default the model's).
        shuffle, seed: the data order of each epoch comes from ``seed``, so two runs with the
            same seed see the same batches in the same order.
        validation_data: ``(x_val, y_val)`` evaluated after each epoch (``val_loss``,
            ``val_accuracy``); the study passes the held-out test set here.
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

    With ``prefetch=True`` (the default) the next batch is gathered (and moved to the device)
    by a prefetching thread while the current one trains; ``data_time``/``transfer_time``
    below count only the waits for it that remained exposed (see the module docstring).
    ``prefetch=False`` gathers each batch in the training thread, before its step (into the
    same reused buffers), so those columns then hold the whole gather and transfer.

    Returns:
        a :class:`History`: per epoch ``loss``, ``accuracy`` (running, on training batches),
        ``val_loss``, ``val_accuracy``, ``lr`` (the learning rate of the epoch's last step),
        ``time``, ``compute_time`` (the steps, less
        ``comm_time``: seconds spent combining gradients or weights between workers, 0 for
        one worker), ``data_time``,
        ``transfer_time``, ``eval_time``, ``images_per_sec``; ``info`` holds ``compile_time``
        and the configuration (the optimizer, the global steps at the start and end,
        seconds spent in batch callbacks, which are not in ``time``).
    """
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
    be = get_backend(backend or model.backend)
    opt = make_optimizer(optimizer, schedule=lr_schedule)
    strat = make_strategy(strategy, threads, **(strategy_options or {}))
    strat.check_batch_size(batch_size)
    if not strat.is_master:  # MPI ranks other than 0 neither print nor show progress
        verbose = 0
    n = len(x)
    step_size = strat.examples_per_step(batch_size)
    steps_per_epoch = -(-n // step_size)
    saved = None if reset_optimizer else getattr(model, "optimizer_state", None)
    if not opt.accepts(saved, model.params):
        saved = None
    start_step = saved.step if saved is not None else 0
    if opt.schedule is not None:
        opt = opt.with_schedule(opt.schedule.resolve(steps_per_epoch,
                                                     start_step + epochs * steps_per_epoch))
    callbacks = list(callbacks)
    for owner, metric in monitored(callbacks, opt.schedule):
        if metric.startswith("val_") and validation_data is None:
            raise ValueError(f"{owner} monitors {metric!r}, which needs validation data: pass "
                             "fit(validation_split=...) (carved from the training data) or "
                             "validation_data=")
    rng = np.random.default_rng(seed)
    history = History(info={"backend": be.name, **strat.describe(), "batch_size": batch_size,
                            "epochs": epochs, "seed": seed, "optimizer": opt.config(),
                            "train_examples": n, "dtype": str(model.dtype),
                            "nonfinite_steps": 0, "first_nonfinite": None,
                            "prefetch": bool(prefetch),
                            "start_step": start_step, "callback_time": 0.0,
                            "validation_examples": (None if validation_data is None
                                                    else len(validation_data[1]))})
    run = FitRun(model, history, strat, be)
    if opt.schedule is not None:
        opt.schedule.on_train_begin()
    for cb in callbacks:
        if hasattr(cb, "set_run"):
            cb.set_run(run)
        else:
            cb.run = run
        cb.on_train_begin(history)

    with _blas_limit(blas_threads):
        t0 = time.perf_counter()
        params = {k: be.asarray(v) for k, v in model.params.items()}
        be.synchronize()
        history.info["params_transfer_time"] = time.perf_counter() - t0
        history.info["compile_time"] = _warm_up(model, x, y, params, be, opt)
        state = saved.to_backend(be) if saved is not None else None
        strat.start(model, opt, be, params, seed=seed, state=state)
        raising = on_nonfinite == "raise"
        stepper = _StepHooks(callbacks, strat, model, be, run)
        epoch = 0
        finished = False
        try:
            for epoch in range(1, epochs + 1):
                logs = _run_epoch(strat, be, x, y, n, step_size, shuffle, rng, epoch, epochs,
                                  verbose, progress, history.info, raising, prefetch, stepper)
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
                if callbacks:  # callbacks see the current weights in the model
                    now = {**strat.current_params(), **strat.current_buffers()}
                    model.set_weights({k: be.to_host(v) for k, v in now.items()})
                    stops = [cb.on_epoch_end(epoch, logs) for cb in callbacks]
                    if any(stops) or run.stop_training:
                        break
                elif run.stop_training:
                    break
            finished = True
        except DivergedError as err:
            err.history = history
            raise
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
    if finished:
        for cb in callbacks:
            cb.on_train_end(history)
    return history


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


def _warm_up(model, x, y, params, be: Backend, opt=None) -> float:
    """Seconds spent compiling: one untimed forward/backward on two examples for JIT backends
    (Numba, CUDA), and the optimizer's update applied to scratch copies (its kernels compile
    too); the real parameters are not updated. 0 for backends with nothing to compile."""
    if not getattr(be, "jit", False):
        return 0.0
    t = time.perf_counter()
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

    Batches are gathered with ``np.take(..., out=)`` into two reused host buffers (no
    allocation per step); a buffer is refilled only after the step that used it has returned
    it (:meth:`release`), so a batch is never overwritten while it is being trained on. The
    backend's ``asarray`` (a no-op on the CPU backends, the host-to-device copy on CUDA) runs
    in the thread too. An exception in the thread is re-raised by :meth:`next`.
    ``local_rows(n)`` (the strategy's :meth:`~cnn.parallel.Strategy.local_rows`) names the
    rows of each global batch of ``n`` examples this process gathers: an MPI rank gathers
    only its shard, from the same order as every other rank.
    """

    _SLOTS = 2

    def __init__(self, be: Backend, x, y, order, step_size: int, threaded: bool = True,
                 local_rows: Callable[[int], tuple[int, int]] | None = None):
        self.be, self.x, self.y, self.order, self.step = be, x, y, order, step_size
        self.local_rows = local_rows
        rows = min(step_size, len(order))
        self._bufs = [(np.empty((rows, *x.shape[1:]), dtype=x.dtype),
                       np.empty(rows, dtype=np.asarray(y).dtype)) for _ in range(self._SLOTS)]
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
            # mode="clip": no bounds-check buffering (the indices are a permutation)
            xb = np.take(self.x, idx, axis=0, out=xs[:len(idx)], mode="clip")
            yb = np.take(self.y, idx, out=ys[:len(idx)], mode="clip")
            t1 = time.perf_counter()
            xb, yb = self.be.asarray(xb), self.be.asarray(yb)
            yield xb, yb, size, t1 - t0, time.perf_counter() - t1

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


def _run_epoch(strat: Strategy, be: Backend, x, y, n, step_size, shuffle, rng, epoch, epochs,
               verbose, progress, info: dict, raising: bool, prefetch: bool = True,
               stepper=None) -> dict:
    data_t = transfer_t = compute_t = 0.0
    loss_sum, correct = 0.0, 0
    seen = 0
    callback_t = 0.0
    lr = strat.learning_rate()
    start = time.perf_counter()
    order = rng.permutation(n) if shuffle else np.arange(n)
    data_t += time.perf_counter() - start
    bar = None
    if verbose:
        from tqdm.auto import tqdm
        bar = tqdm(total=n, desc=f"epoch {epoch}/{epochs}", unit="img", leave=False)
    batches = _Prefetcher(be, x, y, order, step_size, threaded=prefetch,
                          local_rows=strat.local_rows)
    try:
        for step, i in enumerate(range(0, n, step_size), 1):
            t = time.perf_counter()
            xb, yb, size, gather_s, transfer_s = batches.next()
            waited = time.perf_counter() - t
            # the exposed part of the prefetch: the transfer ends it, so a wait is charged to
            # the transfer first, the rest to the gather
            transfer_t += min(waited, transfer_s)
            data_t += waited - min(waited, transfer_s)
            t3 = time.perf_counter()
            lr = strat.learning_rate()
            batch_loss, batch_correct = strat.step_rows(xb, yb, size)
            batches.release()
            compute_t += time.perf_counter() - t3
            if not math.isfinite(batch_loss):  # a host float already: no extra read-back
                if bar is not None and raising:
                    bar.close()
                _nonfinite(info, epoch, step, batch_loss, raising)
            loss_sum += batch_loss
            correct += batch_correct
            if bar is not None:
                bar.update(size)
                bar.set_postfix(loss=f"{loss_sum / min(i + step_size, n):.4f}", refresh=False)
            if progress is not None:
                progress(epoch, min(i + step_size, n), n)
            seen = min(i + step_size, n)
            if stepper:
                t5 = time.perf_counter()
                stop = stepper(epoch, step, size, batch_loss / max(size, 1), batch_correct, lr,
                               t5 - start - callback_t)
                callback_t += time.perf_counter() - t5
                if stop:
                    break
    finally:
        batches.close()
    t = time.perf_counter()
    strat.end_epoch()
    compute_t += time.perf_counter() - t
    # communication between workers (gradient reduce, allreduce, averaging) is its own column
    comm_t = strat.take_comm_time()
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - start - callback_t  # step hooks are not training time
    info["callback_time"] += callback_t
    n = seen or n  # an epoch cut short by a callback: the means over what it saw
    logs = {"epoch": epoch, "loss": loss_sum / n, "accuracy": correct / n, "lr": lr, "time": wall,
            "compute_time": compute_t - comm_t, "comm_time": comm_t, "data_time": data_t,
            "transfer_time": transfer_t, "images_per_sec": n / wall}
    if stepper:
        stepper.elapsed += wall
        logs["callback_time"] = callback_t
        logs["examples"] = n  # fewer than the epoch's when a step callback stopped it
    return logs
