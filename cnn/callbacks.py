"""Callbacks: hooks into :func:`cnn.train.fit`, and the ones the source projects had.

The mechanism
-------------
A callback overrides any of

- ``on_train_begin(history)``: before the first epoch (``self.run`` is set);
- ``on_step_end(step, logs) -> stop?``: after every optimizer step, only for callbacks that
  override it (so the loop pays nothing otherwise). ``step`` counts the steps of this fit
  (1-based); ``logs`` holds ``epoch``, ``step``, ``batch`` (1-based within the epoch),
  ``examples`` (training examples consumed so far in this fit), ``elapsed`` (training seconds
  so far: the epochs' wall time up to this step, the step hooks' own time excluded), ``loss``
  and ``accuracy`` of this step's batch, the ``lr`` it was trained with, ``global_step`` (the
  optimizer's step count, which persists across fits), ``params`` (a function returning the
  current parameters, as the strategy holds them) and ``evaluate`` (a function
  ``(x, y) -> {"loss", "accuracy"}`` on the current parameters): what time-to-accuracy needs;
- ``on_epoch_end(epoch, logs) -> stop?``: after each epoch and its validation; ``logs`` is the
  epoch's row of the history (``loss``, ``accuracy``, ``val_loss``, ``val_accuracy``, ``lr``,
  the timings);
- ``on_train_end(history)``: after the last epoch, once the model holds the final weights
  (also after an early stop; not when training failed).

Returning True from ``on_step_end``/``on_epoch_end``, or setting ``self.run.stop_training``,
ends training (after that batch: the epoch is then cut short, its logs cover the examples it
saw, and it is validated as usual). ``self.run`` (a :class:`FitRun`) gives the model, the
history, the global step, whether this process is the master (MPI rank 0), and
``run.evaluate(x, y)`` on the current weights. At the end of every epoch ``fit`` copies the
current weights into ``run.model`` (so ``model.get_weights()``/``save_weights()`` see them)
before calling ``on_epoch_end``. Time spent in ``on_step_end`` hooks (evaluating every ``k``
steps, say) is not part of the epoch's ``time`` columns: it is the epoch's ``callback_time``
(a history column when some callback has step hooks) and, summed over the fit,
``history.info["callback_time"]``.

The callbacks here
------------------
:class:`EarlyStopping` (patience, restore the best weights) and :class:`ModelCheckpoint`
(write the best weights) follow Keras's callbacks of the same names, decision for decision;
:class:`LiveCurves` redraws loss and accuracy during training. They monitor a validation
metric (``val_loss`` by default): give ``fit`` a ``validation_split`` (carved, stratified, from
the training data) or ``validation_data``; never the test set (that is for the final number).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Mapping

from .checks import check_bool, check_int, check_number
from .extras import require
from .files import atomic_write
from .monitor import check_monitor, has_improved, resolve_mode


class Callback:
    """Base class of fit's hooks (see the module docstring). ``on_epoch_end`` or
    ``on_step_end`` returning True stops training (after that step, or after that epoch)."""

    #: the running fit, set by ``fit`` before ``on_train_begin``
    run: "FitRun | None" = None
    #: the logged metric this callback needs (``fit`` refuses to start without it)
    monitor: str | None = None

    def set_run(self, run: "FitRun") -> None:
        self.run = run

    def on_train_begin(self, history) -> None:
        pass

    def on_step_end(self, step: int, logs: dict) -> bool | None:
        return None

    def on_epoch_end(self, epoch: int, logs: dict) -> bool | None:
        return None

    def on_train_end(self, history) -> None:
        pass

    def get_state(self) -> Any:
        """What this callback has learned during the fit, for a backup (:mod:`cnn.backup`):
        plain values and NumPy arrays (None: nothing). A callback whose decisions depend on
        earlier epochs overrides this and :meth:`set_state`, or a resumed fit forgets them."""
        return None

    def set_state(self, state: Any) -> None:
        """Continue from what :meth:`get_state` returned (a resumed fit calls it after
        ``on_train_begin``)."""


class FitRun:
    """What callbacks see of a running fit."""

    def __init__(self, model, history, strategy, backend):
        self.model, self.history, self.strategy, self.backend = model, history, strategy, backend
        #: set to True to stop training after the current batch
        self.stop_training = False

    @property
    def step(self) -> int:
        """Global optimizer steps taken so far (across ``fit`` calls)."""
        return self.strategy.steps

    @property
    def is_master(self) -> bool:
        """True in the process that prints, evaluates and saves (MPI rank 0)."""
        return getattr(self.strategy, "is_master", True)

    def params(self) -> dict:
        """The current parameters as backend arrays (for some strategies a collective: call
        it on every process, or not at all)."""
        return self.strategy.current_params()

    def evaluate(self, x, y, batch_size: int = 256) -> dict[str, float]:
        """``{"loss", "accuracy"}`` of the current weights on ``(x, y)``."""
        return self.model.evaluate(x, y, batch_size=batch_size, params=self.params(),
                                   backend=self.backend)


class _Monitoring(Callback):
    def __init__(self, owner: str, monitor: str, mode: str, min_delta: float):
        self.monitor = check_monitor(owner, monitor)
        self.mode = resolve_mode(owner, mode, self.monitor)
        self.min_delta = abs(check_number(owner, "min_delta", min_delta))

    def _value(self, logs: Mapping) -> float:
        if self.monitor not in logs:
            raise ValueError(f"{type(self).__name__}: the epoch's logs have no "
                             f"{self.monitor!r} (they have {sorted(logs)})")
        return float(logs[self.monitor])


class EarlyStopping(_Monitoring):
    """Stop when ``monitor`` has stopped improving (Keras's ``EarlyStopping``).

    After each epoch (from ``start_from_epoch`` on, 0-based as in Keras): an improvement is
    ``current < best - min_delta`` (``min`` mode; ``>`` ``best + min_delta`` in ``max``
    mode); ``patience`` epochs without one stop training. With ``baseline``, the count only
    restarts on epochs that also beat the baseline. ``restore_best_weights`` puts the weights
    of the best epoch back into the model when training ends (whether or not it stopped
    early). Attributes after the fit: ``best``, ``best_epoch`` (1-based), ``stopped_epoch``
    (1-based; 0 if it did not stop training).
    """

    def __init__(self, monitor: str = "val_loss", patience: int = 0, min_delta: float = 0.0,
                 mode: str = "auto", baseline: float | None = None,
                 restore_best_weights: bool = False, start_from_epoch: int = 0):
        super().__init__("EarlyStopping", monitor, mode, min_delta)
        self.patience = check_int("EarlyStopping", "patience", patience, low=0)
        self.baseline = (None if baseline is None
                         else check_number("EarlyStopping", "baseline", baseline))
        self.restore_best_weights = check_bool("EarlyStopping", "restore_best_weights",
                                               restore_best_weights)
        self.start_from_epoch = check_int("EarlyStopping", "start_from_epoch", start_from_epoch,
                                          low=0)
        self._reset()

    def _reset(self) -> None:
        self.wait = 0
        self.best: float | None = None
        self.best_epoch = 0
        self.best_weights: dict | None = None
        self.stopped_epoch = 0

    def on_train_begin(self, history) -> None:
        self._reset()

    def on_epoch_end(self, epoch: int, logs: dict) -> bool | None:
        current = self._value(logs)
        if epoch - 1 < self.start_from_epoch:
            return None
        if self.restore_best_weights and self.best_weights is None:
            self.best_weights, self.best_epoch = self.run.model.get_weights(), epoch
        self.wait += 1
        if has_improved(self.mode, current, self.best, self.min_delta):
            self.best, self.best_epoch = current, epoch
            if self.restore_best_weights:
                self.best_weights = self.run.model.get_weights()
            if self.baseline is None or has_improved(self.mode, current, self.baseline,
                                                     self.min_delta):
                self.wait = 0
            return None
        if self.wait >= self.patience and epoch > 1:
            self.stopped_epoch = epoch
            return True
        return None

    def get_state(self) -> dict:
        return {"wait": self.wait, "best": self.best, "best_epoch": self.best_epoch,
                "best_weights": self.best_weights, "stopped_epoch": self.stopped_epoch}

    def set_state(self, state: dict) -> None:
        self.wait, self.best, self.best_epoch = state["wait"], state["best"], state["best_epoch"]
        self.best_weights, self.stopped_epoch = state["best_weights"], state["stopped_epoch"]

    def on_train_end(self, history) -> None:
        history.info["early_stopping"] = {"stopped_epoch": self.stopped_epoch,
                                          "best_epoch": self.best_epoch, "best": self.best,
                                          "monitor": self.monitor,
                                          "restored": bool(self.restore_best_weights
                                                           and self.best_weights is not None)}
        if self.restore_best_weights and self.best_weights is not None:
            self.run.model.set_weights(self.best_weights)


class ModelCheckpoint(_Monitoring):
    """Write the model's weights (``save_weights``: ``.npz`` with the spec) to ``path`` after
    each epoch whose ``monitor`` improved on the best so far (``save_best_only``, the default,
    Keras's rule), or after every epoch. ``path`` may hold ``{epoch}`` and metric fields
    (``"w-{epoch:02d}-{val_loss:.3f}.npz"``). Only the master process writes. A write that
    fails (a full disk, a folder gone) warns and training goes on: a checkpoint never costs
    the training itself. Attributes: ``best``, ``best_epoch``, ``saved`` (the paths written),
    ``failed`` (the errors of the writes that failed)."""

    def __init__(self, path: str | os.PathLike, monitor: str = "val_loss",
                 save_best_only: bool = True, mode: str = "auto", min_delta: float = 0.0):
        super().__init__("ModelCheckpoint", monitor, mode, min_delta)
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise ValueError(f"ModelCheckpoint: path must be a file path. Received path={path!r}")
        self.path = str(path)
        self.save_best_only = check_bool("ModelCheckpoint", "save_best_only", save_best_only)
        self.best: float | None = None
        self.best_epoch = 0
        self.saved: list[Path] = []
        self.failed: list[str] = []

    def on_train_begin(self, history) -> None:
        self.best, self.best_epoch, self.saved, self.failed = None, 0, [], []
        parent = Path(self.path).parent
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"ModelCheckpoint: {parent} is not a folder (path={self.path!r})")

    def on_epoch_end(self, epoch: int, logs: dict) -> bool | None:
        current = self._value(logs)
        improved = has_improved(self.mode, current, self.best, self.min_delta)
        if improved:
            self.best, self.best_epoch = current, epoch
        if (improved or not self.save_best_only) and self.run.is_master:
            target = self.path.format(**{**logs, "epoch": epoch})
            try:
                self.saved.append(self.run.model.save_weights(target))
            except OSError as err:
                if not self.failed:
                    warnings.warn(f"ModelCheckpoint: {err}; training goes on",
                                  RuntimeWarning, stacklevel=2)
                self.failed.append(str(err))
        return None

    def get_state(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch,
                "saved": [str(p) for p in self.saved]}

    def set_state(self, state: dict) -> None:
        self.best, self.best_epoch = state["best"], state["best_epoch"]
        self.saved = [Path(p) for p in state["saved"]]


class LiveCurves(Callback):
    """Training curves drawn while training: loss and accuracy (training, and validation when
    there is any) per epoch, and the batch losses as a faint line.

    In a notebook (IPython kernel) the figure is redrawn in place after every epoch (and every
    ``every_steps`` steps if given); elsewhere it is written to ``png`` (default
    ``training_curves.png``) after each epoch. ``figure()`` returns the last figure. It draws
    with matplotlib (the ``plot`` extra): without it the constructor raises
    :class:`~cnn.errors.MissingExtraError`, so a fit is refused before it starts.
    """

    def __init__(self, png: str | os.PathLike | None = None, every_steps: int | None = None,
                 notebook: bool | None = None, title: str | None = None):
        require("plot", "LiveCurves (training curves)", ("matplotlib",))  # before training
        self.every_steps = check_int("LiveCurves", "every_steps", every_steps, optional=True)
        self.notebook = _in_notebook() if notebook is None else bool(notebook)
        self.png = (Path(png) if png is not None
                    else None if self.notebook else Path("training_curves.png"))
        self.title = title
        self._handle = None
        self._fig = None
        self.failed: list[str] = []  # the errors of the drawings that could not be written
        self.epochs: dict[str, list] = {}
        self.batches: list[tuple[int, float]] = []

    def on_train_begin(self, history) -> None:
        self.epochs = {}
        self.batches = []
        self._handle = None

    def on_step_end(self, step, logs):
        self.batches.append((logs["global_step"], float(logs["loss"])))
        if self.every_steps and step % self.every_steps == 0:
            self._draw()

    def on_epoch_end(self, epoch, logs):
        for key in ("epoch", "loss", "accuracy", "val_loss", "val_accuracy"):
            if key in logs:
                self.epochs.setdefault(key, []).append(logs[key])
        self.epochs.setdefault("step", []).append(self.run.step if self.run else len(self.batches))
        self._draw()

    def figure(self):
        return self._fig

    def get_state(self) -> dict:
        return {"epochs": self.epochs, "batches": [list(b) for b in self.batches]}

    def set_state(self, state: dict) -> None:
        self.epochs = {k: list(v) for k, v in state["epochs"].items()}
        self.batches = [tuple(b) for b in state["batches"]]

    def _draw(self) -> None:
        if self.run is not None and not self.run.is_master:
            return
        import matplotlib
        if not self.notebook:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        if self._fig is None:
            self._fig, _ = plt.subplots(1, 2, figsize=(10, 3.6))
        fig = self._fig
        ax_loss, ax_acc = fig.axes
        ax_loss.clear()
        ax_acc.clear()
        steps = self.epochs.get("step", [])
        if self.batches:
            s, v = zip(*self.batches)
            ax_loss.plot(s, v, color="0.75", lw=0.8, label="batch loss")
        for key, style in (("loss", "-o"), ("val_loss", "-s")):
            if key in self.epochs:
                ax_loss.plot(steps, self.epochs[key], style, label=key.replace("_", " "))
        for key, style in (("accuracy", "-o"), ("val_accuracy", "-s")):
            if key in self.epochs:
                ax_acc.plot(steps, self.epochs[key], style, label=key.replace("_", " "))
        ax_loss.set(xlabel="step", ylabel="loss", title="loss")
        ax_acc.set(xlabel="step", ylabel="accuracy", title="accuracy", ylim=(0, 1.02))
        for ax in (ax_loss, ax_acc):
            if ax.lines:
                ax.legend(loc="best", fontsize=8)
            ax.grid(alpha=0.3)
        if self.title:
            fig.suptitle(self.title)
        fig.tight_layout()
        if self.notebook:
            from IPython.display import display
            if self._handle is None:
                self._handle = display(fig, display_id=True)
            else:
                self._handle.update(fig)
        if self.png is not None:
            try:
                self.png.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(self.png, lambda f: fig.savefig(f, dpi=110, format="png"))
            except OSError as err:  # a full disk: the curves wait, the training goes on
                if not self.failed:
                    warnings.warn(f"LiveCurves: {err}; training goes on", RuntimeWarning,
                                  stacklevel=2)
                self.failed.append(str(err))

    def on_train_end(self, history) -> None:
        if self._fig is not None and self.notebook:
            import matplotlib.pyplot as plt
            plt.close(self._fig)  # displayed already: do not show it a second time


class WeightRecorder(Callback):
    """Records every parameter after every optimizer step: ``weights[i]`` is one float64
    vector of all parameters (keys in sorted order, each raveled) after step ``i + 1``; a
    parameter on a device is copied to the host first. What the equivalence check compares
    (:mod:`cnn.study.equivalence`)."""

    def __init__(self):
        self.weights: list = []

    def on_step_end(self, step: int, logs: Mapping[str, Any]) -> None:
        import numpy as np
        params = logs["params"]()
        self.weights.append(np.concatenate([
            np.asarray(_host(params[k]), dtype=np.float64).ravel() for k in sorted(params)]))


def _host(a):
    """A device array's host copy (``copy_to_host``), a PyTorch tensor's NumPy view, else
    ``a``."""
    if hasattr(a, "copy_to_host"):
        return a.copy_to_host()
    if hasattr(a, "detach"):
        return a.detach().cpu().numpy()
    return a


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython
        shell = get_ipython()
    except ImportError:
        return False
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def monitored(callbacks, schedule=None) -> list[tuple[str, str]]:
    """``(owner, metric)`` for every callback (and the schedule) that monitors a metric."""
    out = [(type(cb).__name__, cb.monitor) for cb in callbacks
           if isinstance(getattr(cb, "monitor", None), str)]
    if schedule is not None and isinstance(getattr(schedule, "monitor", None), str):
        out.append((type(schedule).__name__, schedule.monitor))
    return out


__all__ = ["Callback", "EarlyStopping", "FitRun", "LiveCurves", "ModelCheckpoint",
           "WeightRecorder"]
