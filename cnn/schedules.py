"""Learning-rate schedules: ``schedule(step) -> lr`` for the update that follows ``step``
updates (0-based, counted across epochs and ``fit`` calls: the optimizer state's step, as Keras
evaluates its schedules at ``optimizer.iterations``).

An optimizer holds its schedule (``Adam(lr=CosineDecay(1e-3, 1000))``, or the spec key
``"schedule"``); every strategy asks ``optimizer.learning_rate(step)`` once per global step and
hands the value to every update of that step (see :mod:`cnn.optim`), so kernels take it as an
argument and nothing recompiles when it changes.

The schedules (each equal to its formula, and to Keras's where Keras has it):

- :class:`StepDecay` ``lr * factor ** floor(step / step_size)`` (Keras ``ExponentialDecay``
  with ``staircase=True``);
- :class:`CosineDecay` ``lr * ((1 - alpha) * (1 + cos(pi * min(step, T) / T)) / 2 + alpha)``
  (Keras ``CosineDecay``);
- :class:`CosineRestarts` cosine annealing with warm restarts (SGDR, Loshchilov & Hutter): the
  ``i``-th period lasts ``first_decay_steps * t_mul**i`` steps and starts at ``lr * m_mul**i``
  (Keras ``CosineDecayRestarts``);
- :class:`Cyclic` triangular cyclical rates (Smith 2017) between ``lr`` and ``max_lr``, a half
  cycle of ``step_size`` steps (also ``triangular2``, ``exp_range``);
- :class:`LinearWarmup` a linear ramp from ``start_lr`` to the wrapped schedule's initial rate
  over ``warmup_steps`` steps, then the wrapped schedule shifted by ``warmup_steps`` (Keras's
  ``CosineDecay(warmup_target=..., warmup_steps=...)`` for a cosine);
- :class:`ReduceLROnPlateau` multiplies the rate by ``factor`` when a monitored validation
  metric has not improved for ``patience`` epochs (Keras's callback of the same name); it is
  told the metrics by ``fit`` after each epoch (:meth:`Schedule.on_epoch_end`).

Horizons (``step_size``, ``decay_steps``, ...) count optimizer steps; with ``unit="epoch"`` they
count epochs and ``fit`` converts them with its steps per epoch. ``decay_steps`` of a cosine may
be left out: ``fit`` then anneals until the end of that fit (its last global step).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from .checks import check_choice, check_number, check_positive, is_integer
from .monitor import check_monitor, has_improved, resolve_mode

UNITS = ("step", "epoch")


def _count(owner: str, name: str, value: Any, *, allow_zero: bool = False,
           allow_none: bool = False):
    """A positive (or non-negative) step count; floats only when integral, or in epochs."""
    if value is None and allow_none:
        return None
    v = check_number(owner, name, value, low=0.0, low_open=not allow_zero)
    return int(v) if float(v).is_integer() else v


class Schedule:
    """Base class: ``__call__(step) -> float``, a plain ``config()``, a Keras counterpart."""

    type = "abstract"
    #: names of attributes that count steps (converted when ``unit == "epoch"``)
    horizons: tuple[str, ...] = ()

    def __init__(self, initial_lr: float, unit: str = "step"):
        self.initial_lr = check_positive(type(self).__name__, "lr", initial_lr)
        self.unit = check_choice(type(self).__name__, "unit", unit, UNITS)

    def __call__(self, step: int) -> float:
        if self.unit != "step" or any(getattr(self, h) is None for h in self.horizons
                                      if h in self._required()):
            raise ValueError(f"{type(self).__name__}: unresolved horizon (unit={self.unit!r}, "
                             f"{ {h: getattr(self, h) for h in self.horizons} }); give it in "
                             "steps, or let fit resolve it (Schedule.resolve)")
        if not is_integer(step):
            raise TypeError(f"{type(self).__name__}: step must be an integer. Received {step!r}")
        step = int(step)
        if step < 0:
            raise ValueError(f"{type(self).__name__}: step must be >= 0. Received step={step}")
        return float(self._lr(step))

    def _required(self) -> tuple[str, ...]:
        return self.horizons

    def _lr(self, step: int) -> float:
        raise NotImplementedError

    # ---- resolution by fit ---------------------------------------------------------------
    def resolve(self, steps_per_epoch: int, end_step: int) -> "Schedule":
        """This schedule in steps: horizons in epochs multiplied by ``steps_per_epoch``
        (rounded, at least 1), and a missing ``decay_steps`` set to ``end_step`` (the global
        step at which this fit ends). Returns ``self`` when there is nothing to resolve."""
        cfg = self.config()
        changed = False
        if self.unit == "epoch":
            for h in self.horizons:
                if cfg.get(h) is not None:
                    cfg[h] = max(1, round(cfg[h] * steps_per_epoch))
            cfg["unit"] = "step"
            changed = True
        for h in self._defaults_to_end():
            if cfg.get(h) is None:
                cfg[h] = max(1, int(end_step))
                changed = True
        return make_schedule(cfg, self.initial_lr) if changed else self

    def _defaults_to_end(self) -> tuple[str, ...]:
        return ()

    def on_train_begin(self) -> None:
        """Told by ``fit`` that a fit starts (only stateful schedules use it)."""

    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any]) -> None:
        """Told the epoch's metrics by ``fit`` (only stateful schedules use them)."""

    def get_state(self) -> Any:
        """What a stateful schedule has learned from the epochs so far (plain values), for a
        backup; None for schedules that are functions of the step alone."""
        return None

    def set_state(self, state: Any) -> None:
        """Continue from what :meth:`get_state` returned (after ``on_train_begin``)."""

    #: the metric a stateful schedule needs in the epoch logs (``fit`` checks it is there)
    monitor: str | None = None

    def _params(self) -> dict:
        return {}

    def config(self) -> dict:
        cfg = {"type": self.type, **self._params()}
        if self.unit != "step":
            cfg["unit"] = self.unit
        return cfg

    def keras(self):
        """The Keras schedule with the same values, or ``NotImplementedError``."""
        raise NotImplementedError(f"Keras has no counterpart of {type(self).__name__}")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "type")
        return f"{type(self).__name__}(lr={self.initial_lr!r}, {args})"


class Constant(Schedule):
    """``lr`` at every step."""

    type = "constant"

    def _lr(self, step):
        return self.initial_lr

    def keras(self):
        return KerasConstant(self.initial_lr)


class KerasConstant:
    """A constant learning rate handed to Keras as a callable returning a float64 tensor,
    which each update casts to its variable's dtype (a plain float would be stored in a
    float32 variable and cost float64 models the low bits of ``lr``). What
    :meth:`Constant.keras` returns, and what an optimizer without a schedule gives Keras."""

    def __init__(self, lr: float):
        self.lr = float(lr)

    def __call__(self):
        from keras import ops
        return ops.convert_to_tensor(self.lr, dtype="float64")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.lr})"


class StepDecay(Schedule):
    """``lr * factor ** floor(step / step_size)``: the rate drops by ``factor`` every
    ``step_size`` steps."""

    type = "step"
    horizons = ("step_size",)

    def __init__(self, initial_lr: float, step_size: Any, factor: float = 0.1,
                 unit: str = "step"):
        super().__init__(initial_lr, unit)
        self.step_size = _count("StepDecay", "step_size", step_size)
        self.factor = check_number("StepDecay", "factor", factor, low=0.0, high=1.0,
                                   low_open=True)

    def _lr(self, step):
        return self.initial_lr * self.factor ** (step // self.step_size)

    def _params(self):
        return {"step_size": self.step_size, "factor": self.factor}

    def keras(self):
        import keras
        return keras.optimizers.schedules.ExponentialDecay(
            self.initial_lr, self.step_size, self.factor, staircase=True)


class CosineDecay(Schedule):
    """Cosine annealing from ``lr`` to ``alpha * lr`` over ``decay_steps`` steps, then
    constant: ``lr * ((1 - alpha) * (1 + cos(pi * min(step, T) / T)) / 2 + alpha)``.
    ``decay_steps=None``: until the end of the fit (resolved by ``fit``)."""

    type = "cosine"
    horizons = ("decay_steps",)

    def __init__(self, initial_lr: float, decay_steps: Any = None, alpha: float = 0.0,
                 unit: str = "step"):
        super().__init__(initial_lr, unit)
        self.decay_steps = _count("CosineDecay", "decay_steps", decay_steps, allow_none=True)
        self.alpha = check_number("CosineDecay", "alpha", alpha, low=0.0, high=1.0)

    def _defaults_to_end(self):
        return ("decay_steps",)

    def _lr(self, step):
        t = min(step, self.decay_steps) / self.decay_steps
        return self.initial_lr * ((1 - self.alpha) * 0.5 * (1 + math.cos(math.pi * t)) + self.alpha)

    def _params(self):
        return {"decay_steps": self.decay_steps, "alpha": self.alpha}

    def keras(self):
        import keras
        return keras.optimizers.schedules.CosineDecay(self.initial_lr, self.decay_steps,
                                                      alpha=self.alpha)


class CosineRestarts(Schedule):
    """Cosine annealing with warm restarts (SGDR): period ``i`` (from 0) lasts
    ``first_decay_steps * t_mul**i`` steps, during which the rate falls from
    ``lr * m_mul**i`` along a cosine; ``alpha`` is the floor as a fraction of ``lr``:
    ``lr * ((1 - alpha) * m_mul**i * (1 + cos(pi * f)) / 2 + alpha)``, ``f`` the fraction of
    period ``i`` done."""

    type = "cosine_restarts"
    horizons = ("first_decay_steps",)

    def __init__(self, initial_lr: float, first_decay_steps: Any, t_mul: float = 2.0,
                 m_mul: float = 1.0, alpha: float = 0.0, unit: str = "step"):
        super().__init__(initial_lr, unit)
        self.first_decay_steps = _count("CosineRestarts", "first_decay_steps", first_decay_steps)
        self.t_mul = check_number("CosineRestarts", "t_mul", t_mul, low=1.0)
        self.m_mul = check_number("CosineRestarts", "m_mul", m_mul, low=0.0, high=1.0)
        self.alpha = check_number("CosineRestarts", "alpha", alpha, low=0.0, high=1.0)

    def period(self, step: int) -> tuple[int, float]:
        """``(i, f)``: the period that ``step`` falls in and the fraction of it done."""
        start, length, i = 0.0, float(self.first_decay_steps), 0
        while step >= start + length:
            start += length
            length *= self.t_mul
            i += 1
        return i, (step - start) / length

    def _lr(self, step):
        i, f = self.period(step)
        cosine = 0.5 * self.m_mul ** i * (1 + math.cos(math.pi * f))
        return self.initial_lr * ((1 - self.alpha) * cosine + self.alpha)

    def _params(self):
        return {"first_decay_steps": self.first_decay_steps, "t_mul": self.t_mul,
                "m_mul": self.m_mul, "alpha": self.alpha}

    def keras(self):
        import keras
        return keras.optimizers.schedules.CosineDecayRestarts(
            self.initial_lr, self.first_decay_steps, t_mul=self.t_mul, m_mul=self.m_mul,
            alpha=self.alpha)


class Cyclic(Schedule):
    """Cyclical learning rates (Smith, "Cyclical Learning Rates for Training Neural
    Networks", 2017): with ``c = floor(1 + step / (2 * step_size))`` and
    ``x = |step / step_size - 2 * c + 1|``,
    ``lr + (max_lr - lr) * max(0, 1 - x) * scale``, where ``scale`` is 1 (``triangular``),
    ``1 / 2**(c - 1)`` (``triangular2``) or ``gamma**step`` (``exp_range``)."""

    type = "cyclic"
    horizons = ("step_size",)
    MODES = ("triangular", "triangular2", "exp_range")

    def __init__(self, initial_lr: float, max_lr: float, step_size: Any,
                 mode: str = "triangular", gamma: float = 1.0, unit: str = "step"):
        super().__init__(initial_lr, unit)
        self.max_lr = check_positive("Cyclic", "max_lr", max_lr)
        if self.max_lr < self.initial_lr:
            raise ValueError(f"Cyclic: max_lr must be >= lr={self.initial_lr}. "
                             f"Received max_lr={max_lr!r}")
        self.step_size = _count("Cyclic", "step_size", step_size)
        if mode not in self.MODES:
            raise ValueError(f"Cyclic: mode must be one of {self.MODES}. Received mode={mode!r}")
        self.mode = mode
        self.gamma = check_number("Cyclic", "gamma", gamma, low=0.0, high=1.0, low_open=True)

    def _lr(self, step):
        cycle = math.floor(1 + step / (2 * self.step_size))
        x = abs(step / self.step_size - 2 * cycle + 1)
        scale = {"triangular": 1.0, "triangular2": 1.0 / 2 ** (cycle - 1),
                 "exp_range": self.gamma ** step}[self.mode]
        return self.initial_lr + (self.max_lr - self.initial_lr) * max(0.0, 1 - x) * scale

    def _params(self):
        return {"max_lr": self.max_lr, "step_size": self.step_size, "mode": self.mode,
                "gamma": self.gamma}


class LinearWarmup(Schedule):
    """A linear ramp, then another schedule: for ``step < warmup_steps`` the rate is
    ``start_lr + (target - start_lr) * step / warmup_steps`` with ``target`` the wrapped
    schedule's initial rate; afterwards ``after(step - warmup_steps)``."""

    type = "warmup"
    horizons = ("warmup_steps",)

    def __init__(self, after: Schedule, warmup_steps: Any, start_lr: float = 0.0,
                 unit: str = "step"):
        if not isinstance(after, Schedule):
            raise ValueError(f"LinearWarmup: after must be a Schedule. Received after={after!r}")
        super().__init__(after.initial_lr, unit)
        self.after = after
        self.warmup_steps = _count("LinearWarmup", "warmup_steps", warmup_steps)
        self.start_lr = check_number("LinearWarmup", "start_lr", start_lr, low=0.0,
                                     high=self.initial_lr)
        self.monitor = after.monitor

    def resolve(self, steps_per_epoch, end_step):
        warmup = self.warmup_steps
        if self.unit == "epoch":
            warmup = max(1, round(warmup * steps_per_epoch))
        after = self.after.resolve(steps_per_epoch, max(1, int(end_step) - warmup))
        if after is self.after and warmup == self.warmup_steps and self.unit == "step":
            return self
        return LinearWarmup(after, warmup, self.start_lr)

    def _lr(self, step):
        if step < self.warmup_steps:
            return self.start_lr + (self.initial_lr - self.start_lr) * step / self.warmup_steps
        return self.after(step - self.warmup_steps)

    def on_train_begin(self):
        self.after.on_train_begin()

    def on_epoch_end(self, epoch, logs):
        self.after.on_epoch_end(epoch, logs)

    def get_state(self):
        return self.after.get_state()

    def set_state(self, state):
        self.after.set_state(state)

    def _params(self):
        return {"warmup_steps": self.warmup_steps, "start_lr": self.start_lr,
                "after": self.after.config()}

    def keras(self):
        import keras
        if isinstance(self.after, CosineDecay):
            return keras.optimizers.schedules.CosineDecay(
                self.start_lr, self.after.decay_steps, alpha=self.after.alpha,
                warmup_target=self.initial_lr, warmup_steps=self.warmup_steps)
        if isinstance(self.after, Constant):
            # a cosine that never decays (alpha=1) is a constant after the warm-up
            return keras.optimizers.schedules.CosineDecay(
                self.start_lr, 1, alpha=1.0, warmup_target=self.initial_lr,
                warmup_steps=self.warmup_steps)
        return super().keras()


class ReduceLROnPlateau(Schedule):
    """``lr * factor**k`` (never below ``min_lr``), where ``k`` is the number of reductions so
    far: after each epoch, when ``monitor`` (a key of the epoch's logs, e.g. ``val_loss``) has
    not improved by more than ``min_delta`` for ``patience`` epochs, the rate is multiplied by
    ``factor``, followed by ``cooldown`` epochs without reductions. Keras's callback of the
    same name, step for step. ``mode``: ``min``, ``max``, or ``auto`` (``max`` for accuracies,
    ``min`` for losses)."""

    type = "plateau"

    def __init__(self, initial_lr: float, monitor: str = "val_loss", factor: float = 0.1,
                 patience: int = 10, min_delta: float = 1e-4, cooldown: int = 0,
                 min_lr: float = 0.0, mode: str = "auto", unit: str = "step"):
        super().__init__(initial_lr, unit)
        self.monitor = check_monitor("ReduceLROnPlateau", monitor)
        self.mode = resolve_mode("ReduceLROnPlateau", mode, self.monitor)
        self.factor = check_number("ReduceLROnPlateau", "factor", factor, low=0.0, high=1.0,
                                   low_open=True, high_open=True)
        self.patience = int(_count("ReduceLROnPlateau", "patience", patience, allow_zero=True))
        self.min_delta = abs(check_number("ReduceLROnPlateau", "min_delta", min_delta))
        self.cooldown = int(_count("ReduceLROnPlateau", "cooldown", cooldown, allow_zero=True))
        self.min_lr = check_number("ReduceLROnPlateau", "min_lr", min_lr, low=0.0)
        self.reset()

    def reset(self) -> None:
        """Back to the initial rate, forgetting the best value and the counters."""
        self.lr = self.initial_lr
        self.on_train_begin()

    def on_train_begin(self) -> None:
        """A new fit: the best value and the counters start afresh; the rate reached so far
        stays (as Keras's callback leaves the optimizer's reduced rate)."""
        self.best: float | None = None
        self.wait = 0
        self.cooldown_counter = 0

    def _lr(self, step):
        return self.lr

    def get_state(self) -> dict:
        return {"lr": self.lr, "best": self.best, "wait": self.wait,
                "cooldown_counter": self.cooldown_counter}

    def set_state(self, state: dict) -> None:
        self.lr, self.best, self.wait = float(state["lr"]), state["best"], int(state["wait"])
        self.cooldown_counter = int(state["cooldown_counter"])

    def on_epoch_end(self, epoch, logs):
        current = logs.get(self.monitor)
        if current is None:
            raise ValueError(f"ReduceLROnPlateau: the epoch's logs have no {self.monitor!r} "
                             f"(they have {sorted(logs)}); give fit validation data or "
                             "monitor a training metric")
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.wait = 0
        if has_improved(self.mode, current, self.best, self.min_delta):
            self.best = float(current)
            self.wait = 0
        elif self.cooldown_counter <= 0:
            self.wait += 1
            if self.wait >= self.patience and self.lr > self.min_lr:
                self.lr = max(self.lr * self.factor, self.min_lr)
                self.cooldown_counter = self.cooldown
                self.wait = 0

    def _params(self):
        return {"monitor": self.monitor, "factor": self.factor, "patience": self.patience,
                "min_delta": self.min_delta, "cooldown": self.cooldown, "min_lr": self.min_lr,
                "mode": self.mode}


SCHEDULES: dict[str, type[Schedule]] = {
    "constant": Constant, "step": StepDecay, "cosine": CosineDecay,
    "cosine_restarts": CosineRestarts, "cyclic": Cyclic, "warmup": LinearWarmup,
    "plateau": ReduceLROnPlateau,
}
#: other names accepted in specs and on the command line
ALIASES = {"step_decay": "step", "cosine_annealing": "cosine", "sgdr": "cosine_restarts",
           "triangular": "cyclic", "reduce_on_plateau": "plateau", "linear_warmup": "warmup",
           "none": "constant"}


def schedule_names() -> list[str]:
    return list(SCHEDULES)


def _options(cls: type) -> list[str]:
    import inspect
    return [p for p in inspect.signature(cls.__init__).parameters
            if p not in ("self", "initial_lr", "after")]


def make_schedule(spec: Any, lr: float) -> Schedule:
    """A schedule starting from the optimizer's ``lr``, from a spec:

    - a name: ``"cosine"``, ``"step"``, ... (its defaults; ``step`` and ``cyclic`` need a
      ``step_size``, so a name alone does not do for them);
    - a dict ``{"type": "cosine", "decay_steps": 1000, "alpha": 0.01}``; any schedule dict may
      add ``"warmup_steps"`` (and ``"warmup_start_lr"``) to begin with a linear warm-up, and
      ``"unit": "epoch"`` to count its horizons in epochs;
    - a :class:`Schedule` (returned as it is).

    Unknown types or options, and out-of-range values, raise ``ValueError`` naming them.
    """
    if isinstance(spec, Schedule):
        return spec
    if isinstance(spec, str):
        spec = {"type": spec}
    if not isinstance(spec, Mapping):
        raise ValueError(f"a learning-rate schedule is a name, a dict or a Schedule. "
                         f"Received {spec!r}")
    options = dict(spec)
    kind = options.pop("type", None)
    kind = ALIASES.get(kind, kind) if isinstance(kind, str) else kind
    if kind not in SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule type {kind!r}; choose one of "
                         f"{schedule_names()}")
    unit = options.get("unit", "step")
    if kind == "warmup":
        after = options.pop("after", {"type": "constant"})
        inner = make_schedule({**after, "unit": after.get("unit", unit)}, lr) \
            if isinstance(after, Mapping) else make_schedule(after, lr)
        _check_options(LinearWarmup, kind, options)
        return LinearWarmup(inner, **options)
    warmup = {k: options.pop(k) for k in ("warmup_steps", "warmup_start_lr") if k in options}
    cls = SCHEDULES[kind]
    _check_options(cls, kind, options)
    try:
        sched = cls(lr, **options)
    except TypeError as err:  # a required option is missing
        raise ValueError(f"learning-rate schedule {kind!r}: {err}; its options are "
                         f"{_options(cls)}") from None
    if warmup:
        if "warmup_steps" not in warmup:
            raise ValueError(f"learning-rate schedule {kind!r}: warmup_start_lr needs "
                             "warmup_steps")
        sched = LinearWarmup(sched, warmup["warmup_steps"], warmup.get("warmup_start_lr", 0.0),
                             unit=unit)
    return sched


def _check_options(cls: type, kind: str, options: Mapping) -> None:
    allowed = _options(cls) + (["warmup_steps", "warmup_start_lr"] if cls is not LinearWarmup
                               else ["after"])
    unknown = sorted(set(options) - set(allowed), key=str)
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r} for learning-rate schedule {kind!r}; "
                         f"its options are {allowed}")


__all__ = ["Constant", "CosineDecay", "CosineRestarts", "Cyclic", "KerasConstant",
           "LinearWarmup", "ReduceLROnPlateau", "SCHEDULES", "Schedule", "StepDecay",
           "make_schedule", "schedule_names"]
