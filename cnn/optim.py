"""Optimizers, written once over a few element-wise backend primitives.

Each optimizer is one ``update_step`` (as in Keras 3, whose optimizers write ``update_step``
over ``ops``) expressed with the backend's element-wise optimizer primitives, so the NumPy,
Numba and CUDA backends and every strategy run the same update:

- ``backend.axpby(y, a, x, b)``: ``y = a * y + b * x``;
- ``backend.axpby_square(y, a, x, b)``: ``y = a * y + b * x * x``;
- ``backend.axpby_ratio(y, a, b, num, den, eps, eps_inside, center)``:
  ``y = a * y + b * num / (sqrt(den - center**2) + eps)`` (``eps_inside``:
  ``/ sqrt(den - center**2 + eps)``; ``center`` may be None).

All three work in place on ``y``, element by element, with scalars in the array's dtype
(float32 models compute in float32), on arrays of any shape **or on flat slices** of them.

State: slots and the scalar step, kept apart
--------------------------------------------
An optimizer object holds configuration only (hyper-parameters and an optional learning-rate
schedule) and never changes during a fit. Its state is an :class:`OptimizerState`:

- ``slots[name][key]``: one array per *slot* (``"velocity"`` for SGD with momentum and for
  RMSProp with momentum, ``"v"`` for RMSProp, ``"m"`` and ``"v"`` for Adam/AdamW) and per
  parameter ``key``, with the parameter's shape and dtype, on the parameter's backend;
- ``step``: the number of updates taken so far, one per **global** step (a scalar, kept on the
  host). Adam's bias correction and every schedule read it; it is also the ``step`` of every
  :class:`~cnn.context.StepContext`, which keys dropout masks, so it persists with the state.

Using an optimizer from a strategy (the contract)
-------------------------------------------------
Every update is element-wise: element ``i`` of a parameter changes from element ``i`` of its
gradient and of its slots alone, plus scalars (the learning rate, the step). So any strategy can
apply any optimizer to **any slices** of flat parameters, gradients and slots, in any number of
pieces and workers, as long as every piece of one global step uses the same ``lr`` and
``step``, and the scalar step advances **once** per global step::

    lr = optimizer.learning_rate(state.step)     # once per global step (schedules read it)
    t = state.step + 1                          # the 1-based number of the update being taken
    flat = state.flat()                         # {slot: {key: 1-D view}} (host arrays)
    for key, sl in my_pieces:                   # this worker's ranges of the flat vector
        optimizer.update_step(flat_params[key][sl], g_piece,
                              {name: flat[name][key][sl] for name in flat}, lr, t, backend)
    # ... after every worker has updated its pieces (a barrier), exactly once:
    state.step += 1

(``Strategy.steps`` *is* ``state.step``: ``self.steps += 1`` in a strategy advances it.)

- ``sync`` (threads, processes, MPI): the combined gradient's ranges updated by their owners
  as above, one shared state;
- ``average``: each replica has its own slots (``init_slots`` / copies) updated with
  :meth:`Optimizer.apply` at the shared ``lr``/``t``; averaging averages **every** slot with the
  weights; the scalar step advances once per global step;
- ``hogwild``: per-worker slots, shared weights, one scalar step;
- sequential and CUDA: :meth:`Optimizer.update` (all parameters, then ``step += 1``).

The learning rate is an argument of every update (never baked into a kernel), so a schedule
can change it every step; CUDA kernels receive it as a kernel parameter.

State across ``fit`` calls
--------------------------
Like Keras and PyTorch, the state persists: :func:`cnn.train.fit` starts from the state the
model kept from its previous fit (``model.optimizer_state``) when the optimizer is of the same
type with the same slots, and stores the state it ends with there, so ten steps then ten more
equal twenty. A different optimizer type starts from a fresh state (zero slots, step 0);
``model.reset_optimizer_state()`` (or ``fit(reset_optimizer=True)``) starts afresh explicitly.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import numpy as np

from .backends.base import Backend
from .checks import check_bool, check_choice, check_int, check_number, check_positive
from .schedules import KerasConstant, Schedule, make_schedule


# ---- state -----------------------------------------------------------------------------------
class OptimizerState:
    """The state of an optimizer: named slots per parameter, and the scalar step.

    Attributes:
        slots: ``{slot name: {parameter key: array}}``; arrays have their parameter's shape
            and dtype and live on the backend the parameters live on.
        step: updates taken (global steps), a Python int.
        optimizer: the ``type`` of the optimizer that made it (``"adam"``), so a later fit can
            tell whether it may resume from it.
    """

    def __init__(self, slots: Mapping[str, Mapping[str, Any]] | None = None, step: int = 0,
                 optimizer: str | None = None):
        self.slots: dict[str, dict[str, Any]] = {n: dict(s) for n, s in (slots or {}).items()}
        self.step = check_int("OptimizerState", "step", step, low=0)
        self.optimizer = optimizer

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.slots)

    def of(self, key: str) -> dict[str, Any]:
        """``{slot name: array}`` of parameter ``key`` (what ``update_step`` takes)."""
        return {n: s[key] for n, s in self.slots.items()}

    def flat(self) -> dict[str, dict[str, np.ndarray]]:
        """``{slot name: {key: 1-D view}}`` of host (NumPy) slots, for slice-wise updates; the
        views share memory with the slots (never copies: writes must reach them)."""
        out: dict[str, dict[str, np.ndarray]] = {}
        for n, s in self.slots.items():
            out[n] = {}
            for k, a in s.items():
                if not isinstance(a, np.ndarray) or not a.flags.c_contiguous:
                    raise ValueError(f"slice-wise updates need C-contiguous host slots; slot "
                                     f"{n!r} of {k!r} is {type(a).__name__}")
                out[n][k] = a.reshape(-1)
        return out

    def map(self, fn: Callable[[Any], Any]) -> "OptimizerState":
        """A new state with ``fn`` applied to every slot array (same step and optimizer)."""
        return OptimizerState({n: {k: fn(a) for k, a in s.items()} for n, s in self.slots.items()},
                              self.step, self.optimizer)

    def copy(self) -> "OptimizerState":
        """A deep copy (host arrays and device arrays that have ``copy``)."""
        return self.map(lambda a: a.copy())

    def to_host(self, backend: Backend) -> "OptimizerState":
        """A copy with NumPy arrays (from any backend)."""
        return self.map(lambda a: np.array(backend.to_host(a), copy=True))

    def to_backend(self, backend: Backend) -> "OptimizerState":
        """A copy on ``backend`` (the host arrays are never shared with it)."""
        return self.map(lambda a: backend.asarray(np.array(backend.to_host(a), copy=True)))

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for s in self.slots.values() for a in s.values()))

    def __repr__(self) -> str:
        keys = sorted({k for s in self.slots.values() for k in s})
        return (f"OptimizerState(optimizer={self.optimizer!r}, step={self.step}, "
                f"slots={list(self.slots)}, params={len(keys)})")


# ---- the optimizers --------------------------------------------------------------------------
#: how ``weight_decay`` acts (see :class:`Optimizer`)
WEIGHT_DECAY_MODES = ("decoupled", "coupled")


class Optimizer:
    """Base class: learning rate (a number or a schedule), weight decay, the state and the
    update loop. Subclasses set ``type``, ``slot_names`` and write ``_update``.

    ``weight_decay`` (every optimizer; applied to every parameter, biases and batch norm's
    ``gamma`` and ``beta`` included), in one of two modes:

    - ``weight_decay_mode="decoupled"`` (the default; Keras 3's semantics, AdamW's): before
      each update, ``w = w - lr * weight_decay * w``, apart from the gradient;
    - ``"coupled"`` (an L2 penalty ``weight_decay / 2 * sum w**2`` on the loss, as in the
      ResNet paper, Caffe, Torch and PyTorch's ``SGD(weight_decay=...)``): the gradient
      becomes ``g + weight_decay * w`` **in place** before the update, so momentum and
      adaptive denominators see it. (The gradient is the step's own buffer, which no strategy
      reads after the update.)

    The two are the same update for plain SGD; with momentum they differ.
    """

    type = "abstract"
    slot_names: tuple[str, ...] = ()

    def __init__(self, lr: Any = 0.01, weight_decay: float = 0.0,
                 weight_decay_mode: str = "decoupled"):
        name = type(self).__name__
        if isinstance(lr, Schedule):
            self.schedule: Schedule | None = lr
            self.lr = float(lr.initial_lr)
        else:
            self.schedule = None
            self.lr = check_positive(name, "lr", lr)
        self.weight_decay = check_number(name, "weight_decay", weight_decay, low=0.0)
        self.weight_decay_mode = check_choice(name, "weight_decay_mode", weight_decay_mode,
                                              WEIGHT_DECAY_MODES)

    # ---- facts about the class (what the study's grid and the CLI ask) ---------------------
    @classmethod
    def options(cls) -> list[str]:
        """The hyper-parameters a spec may give (the constructor's arguments), ``lr`` first."""
        import inspect
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    @classmethod
    def default_lr(cls) -> float:
        """The learning rate this optimizer takes when a spec gives none."""
        import inspect
        return inspect.signature(cls.__init__).parameters["lr"].default

    @classmethod
    def takes_momentum(cls) -> bool:
        """Whether it has a ``momentum`` hyper-parameter (the study's ``momentum`` axis)."""
        return "momentum" in cls.options()

    # ---- the learning rate ---------------------------------------------------------------
    def learning_rate(self, step: int) -> float:
        """The learning rate of the update that follows ``step`` updates (a Python float):
        the schedule at ``step`` (0-based, as Keras evaluates it at ``iterations``), or the
        constant ``lr``."""
        if self.schedule is None:
            return self.lr
        return float(self.schedule(step))

    def with_schedule(self, schedule) -> "Optimizer":
        """A copy of this optimizer whose learning rate follows ``schedule`` (None: constant
        ``lr``); the optimizer itself never changes."""
        import copy
        other = copy.copy(self)
        other.schedule = schedule
        if schedule is not None:
            other.lr = float(schedule.initial_lr)
        return other

    # ---- state ---------------------------------------------------------------------------
    def init_slots(self, params: Mapping[str, Any], backend: Backend) -> dict[str, dict[str, Any]]:
        """Zero slots on ``backend`` for ``params``: ``{slot: {key: zeros like params[key]}}``."""
        return {n: {k: backend.zeros_like(v) for k, v in params.items()} for n in self.slot_names}

    def init_state(self, params: Mapping[str, Any], backend: Backend) -> OptimizerState:
        """A fresh state: zero slots on ``backend``, step 0."""
        return OptimizerState(self.init_slots(params, backend), 0, self.type)

    def accepts(self, state: OptimizerState | None, params: Mapping[str, Any]) -> bool:
        """Whether ``state`` (kept from an earlier fit) can continue with this optimizer and
        ``params``: same optimizer type, same slots, same keys and shapes."""
        if state is None or state.optimizer != self.type or state.names != self.slot_names:
            return False
        return all(set(s) == set(params) and all(tuple(np.shape(s[k])) == tuple(np.shape(params[k]))
                                                for k in params) for s in state.slots.values())

    # ---- updates -------------------------------------------------------------------------
    def update_step(self, param, grad, slots: Mapping[str, Any], lr: float, step: int,
                    backend: Backend) -> None:
        """Update one parameter, or any slice of it, in place: ``param``, ``grad`` and every
        ``slots[name]`` are arrays of one shape (or equal flat slices of the flattened ones);
        ``lr`` is this update's learning rate and ``step`` its 1-based number (the same for
        every piece of one global step). Changes no scalar state."""
        lr = float(lr)
        if self.weight_decay and self.weight_decay_mode == "coupled":
            backend.axpby(grad, 1.0, param, self.weight_decay)
        elif self.weight_decay:
            backend.axpby(param, 1.0, param, -lr * self.weight_decay)
        self._update(param, grad, slots, lr, int(step), backend)

    def _update(self, param, grad, slots, lr: float, step: int, backend: Backend) -> None:
        raise NotImplementedError

    def apply(self, params: Mapping[str, Any], grads: Mapping[str, Any],
              slots: Mapping[str, Mapping[str, Any]], backend: Backend, lr: float,
              step: int) -> None:
        """:meth:`update_step` for every key of ``params`` with its slots (``slots[name][key]``)
        at the given ``lr`` and 1-based ``step``; changes no scalar state (replicas and
        per-worker slots use this and advance the shared step themselves)."""
        for key, p in params.items():
            self.update_step(p, grads[key], {n: s[key] for n, s in slots.items()}, lr, step,
                             backend)

    def update(self, params: Mapping[str, Any], grads: Mapping[str, Any], state: OptimizerState,
               backend: Backend, lr: float | None = None) -> None:
        """One whole global step: every parameter at ``lr`` (default: the schedule's or the
        constant rate at ``state.step``), then ``state.step += 1``."""
        if not isinstance(state, OptimizerState):
            raise TypeError(f"{type(self).__name__}.update takes an OptimizerState (from "
                            f"init_state). Received {type(state).__name__}; to update slices, "
                            "call update_step on each piece and advance state.step once "
                            "(see cnn.optim)")
        if lr is None:
            lr = self.learning_rate(state.step)
        self.apply(params, grads, state.slots, backend, lr, state.step + 1)
        state.step += 1

    # ---- description ---------------------------------------------------------------------
    def _hyper(self) -> dict:
        return {}

    def config(self) -> dict:
        """A plain dict that :func:`make_optimizer` turns back into this optimizer."""
        cfg = {"type": self.type, "lr": self.lr, **self._hyper()}
        if self.weight_decay or type(self) is AdamW:
            cfg["weight_decay"] = self.weight_decay
        if self.weight_decay_mode != "decoupled":
            cfg["weight_decay_mode"] = self.weight_decay_mode
        if self.schedule is not None:
            cfg["schedule"] = self.schedule.config()
        return cfg

    def keras(self):
        """The Keras 3 optimizer computing the same update (for the reference tests). Keras's
        optimizers have no coupled weight decay (``NotImplementedError``): the Keras
        reference puts it on the model as L2 penalties instead
        (:func:`cnn.reference.keras.compile_keras_model`)."""
        raise NotImplementedError(f"no Keras counterpart for {type(self).__name__}")

    def _keras_common(self) -> dict:
        if self.weight_decay and self.weight_decay_mode == "coupled":
            raise NotImplementedError(
                f"{type(self).__name__}: Keras optimizers have no coupled weight decay "
                f"(weight_decay_mode='coupled'); it is an L2 penalty of weight_decay / 2 on "
                f"every weight, which the Keras reference puts on the model")
        out = {"learning_rate": (self.schedule.keras() if self.schedule is not None
                                 else KerasConstant(self.lr))}
        if self.weight_decay:
            out["weight_decay"] = self.weight_decay
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.config().items() if k != 'type')})"


def register_optimizer(cls: type[Optimizer]) -> type[Optimizer]:
    """Add an optimizer class to :data:`OPTIMIZERS` under its ``type`` (a class decorator):
    specs, the CLI's ``--optimizer`` and the study's ``optimizer`` axis take it from then on.
    ValueError when the type is taken or missing."""
    if not (isinstance(cls, type) and issubclass(cls, Optimizer)):
        raise TypeError(f"register_optimizer takes an Optimizer subclass; received {cls!r}")
    kind = cls.__dict__.get("type")
    if not isinstance(kind, str) or not kind or kind != kind.lower():
        raise ValueError(f"{cls.__name__}: an optimizer class sets its own lower-case type "
                         f"name; received type={kind!r}")
    if kind in OPTIMIZERS:
        raise ValueError(f"optimizer type {kind!r} is already registered "
                         f"({OPTIMIZERS[kind].__name__})")
    OPTIMIZERS[kind] = cls
    return cls


#: type name -> class, in the order ``--help`` lists them (filled by :func:`register_optimizer`)
OPTIMIZERS: dict[str, type[Optimizer]] = {}


@register_optimizer
class SGD(Optimizer):
    """Stochastic gradient descent, Keras's formulation:

    - plain: ``w -= lr * g``;
    - ``momentum``: ``v = momentum * v - lr * g;  w += v``;
    - ``nesterov``: ``v = momentum * v - lr * g;  w += momentum * v - lr * g``.

    Slots: ``velocity`` (only with momentum > 0).
    """

    type = "sgd"

    def __init__(self, lr: Any = 0.01, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0, weight_decay_mode: str = "decoupled"):
        super().__init__(lr, weight_decay, weight_decay_mode)
        self.momentum = check_number("SGD", "momentum", momentum, low=0.0, high=1.0,
                                     high_open=True)
        self.nesterov = check_bool("SGD", "nesterov", nesterov)
        if self.nesterov and not self.momentum:
            raise ValueError("SGD: nesterov=True needs momentum > 0. Received momentum=0")
        self.slot_names = ("velocity",) if self.momentum else ()

    def _update(self, param, grad, slots, lr, step, be):
        if not self.momentum:
            be.axpby(param, 1.0, grad, -lr)
            return
        v, m = slots["velocity"], self.momentum
        be.axpby(v, m, grad, -lr)
        if self.nesterov:
            be.axpby(param, 1.0, v, m)
            be.axpby(param, 1.0, grad, -lr)
        else:
            be.axpby(param, 1.0, v, 1.0)

    def _hyper(self):
        return {"momentum": self.momentum, "nesterov": self.nesterov}

    def keras(self):
        import keras
        return keras.optimizers.SGD(momentum=self.momentum, nesterov=self.nesterov,
                                    **self._keras_common())


@register_optimizer
class RMSProp(Optimizer):
    """RMSProp, Keras's formulation (``epsilon`` inside the square root):

    ``v = rho * v + (1 - rho) * g**2``; with ``centered``, also ``a = rho * a + (1 - rho) * g``
    and the denominator is ``sqrt(v - a**2 + epsilon)``, else ``sqrt(v + epsilon)``; then
    ``w -= lr * g / denominator``, or with ``momentum``:
    ``u = momentum * u + lr * g / denominator;  w -= u``.

    Slots: ``v``; ``velocity`` (momentum > 0); ``average`` (centered).
    """

    type = "rmsprop"

    def __init__(self, lr: Any = 0.001, rho: float = 0.9, momentum: float = 0.0,
                 epsilon: float = 1e-7, centered: bool = False, weight_decay: float = 0.0,
                 weight_decay_mode: str = "decoupled"):
        super().__init__(lr, weight_decay, weight_decay_mode)
        self.rho = check_number("RMSProp", "rho", rho, low=0.0, high=1.0, high_open=True)
        self.momentum = check_number("RMSProp", "momentum", momentum, low=0.0, high=1.0,
                                     high_open=True)
        self.epsilon = check_positive("RMSProp", "epsilon", epsilon)
        self.centered = check_bool("RMSProp", "centered", centered)
        self.slot_names = (("v",) + (("velocity",) if self.momentum else ())
                           + (("average",) if self.centered else ()))

    def _update(self, param, grad, slots, lr, step, be):
        v, rho = slots["v"], self.rho
        be.axpby_square(v, rho, grad, 1.0 - rho)
        center = None
        if self.centered:
            center = slots["average"]
            be.axpby(center, rho, grad, 1.0 - rho)
        if self.momentum:
            u = slots["velocity"]
            be.axpby_ratio(u, self.momentum, lr, grad, v, self.epsilon, True, center)
            be.axpby(param, 1.0, u, -1.0)
        else:
            be.axpby_ratio(param, 1.0, -lr, grad, v, self.epsilon, True, center)

    def _hyper(self):
        return {"rho": self.rho, "momentum": self.momentum, "epsilon": self.epsilon,
                "centered": self.centered}

    def keras(self):
        import keras
        return keras.optimizers.RMSprop(rho=self.rho, momentum=self.momentum,
                                        epsilon=self.epsilon, centered=self.centered,
                                        **self._keras_common())


@register_optimizer
class Adam(Optimizer):
    """Adam (Kingma & Ba), Keras's formulation (``epsilon`` outside the square root, not
    bias-corrected): at update ``t`` (1-based),

    ``m = beta_1 * m + (1 - beta_1) * g;  v = beta_2 * v + (1 - beta_2) * g**2;``
    ``w -= lr * sqrt(1 - beta_2**t) / (1 - beta_1**t) * m / (sqrt(v) + epsilon)``.

    Slots: ``m``, ``v``. With ``weight_decay`` > 0 this is AdamW (decoupled weight decay), or
    with ``weight_decay_mode="coupled"`` Adam on an L2-penalised loss (PyTorch's
    ``Adam(weight_decay=...)``).
    """

    type = "adam"
    slot_names = ("m", "v")

    def __init__(self, lr: Any = 0.001, beta_1: float = 0.9, beta_2: float = 0.999,
                 epsilon: float = 1e-7, weight_decay: float = 0.0,
                 weight_decay_mode: str = "decoupled"):
        super().__init__(lr, weight_decay, weight_decay_mode)
        name = type(self).__name__
        self.beta_1 = check_number(name, "beta_1", beta_1, low=0.0, high=1.0, high_open=True)
        self.beta_2 = check_number(name, "beta_2", beta_2, low=0.0, high=1.0, high_open=True)
        self.epsilon = check_positive(name, "epsilon", epsilon)

    def step_size(self, lr: float, step: int) -> float:
        """``lr * sqrt(1 - beta_2**t) / (1 - beta_1**t)`` for the 1-based update ``t``."""
        if step < 1:
            raise ValueError(f"{type(self).__name__}: the update number is 1-based. "
                             f"Received step={step}")
        return lr * math.sqrt(1.0 - self.beta_2 ** step) / (1.0 - self.beta_1 ** step)

    def _update(self, param, grad, slots, lr, step, be):
        m, v = slots["m"], slots["v"]
        be.axpby(m, self.beta_1, grad, 1.0 - self.beta_1)
        be.axpby_square(v, self.beta_2, grad, 1.0 - self.beta_2)
        be.axpby_ratio(param, 1.0, -self.step_size(lr, step), m, v, self.epsilon, False, None)

    def _hyper(self):
        return {"beta_1": self.beta_1, "beta_2": self.beta_2, "epsilon": self.epsilon}

    def keras(self):
        import keras
        return keras.optimizers.Adam(beta_1=self.beta_1, beta_2=self.beta_2,
                                     epsilon=self.epsilon, **self._keras_common())


@register_optimizer
class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): before each Adam update
    ``w -= lr * weight_decay * w``. Keras's defaults (``weight_decay=0.004``)."""

    type = "adamw"

    def __init__(self, lr: Any = 0.001, weight_decay: float = 0.004, beta_1: float = 0.9,
                 beta_2: float = 0.999, epsilon: float = 1e-7):
        super().__init__(lr, beta_1, beta_2, epsilon, weight_decay)

    def keras(self):
        import keras
        common = self._keras_common()
        common["weight_decay"] = self.weight_decay
        return keras.optimizers.AdamW(beta_1=self.beta_1, beta_2=self.beta_2,
                                      epsilon=self.epsilon, **common)




#: the optimizer type of a spec that names none
DEFAULT_OPTIMIZER = "sgd"


def default_optimizer_spec() -> dict:
    """The optimizer of a model spec that gives none: :data:`DEFAULT_OPTIMIZER` at its own
    default rate (``{"type": "sgd", "lr": 0.01}``), a new dict each call."""
    return {"type": DEFAULT_OPTIMIZER, "lr": optimizer_class(DEFAULT_OPTIMIZER).default_lr()}


def optimizer_names() -> list[str]:
    return list(OPTIMIZERS)


def optimizer_class(kind: str) -> type[Optimizer]:
    """The class of optimizer type ``kind`` (ValueError naming the choices otherwise)."""
    if not isinstance(kind, str) or kind not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer type {kind!r}; choose one of {optimizer_names()}")
    return OPTIMIZERS[kind]


def make_optimizer(spec: "dict | Optimizer | None" = None, schedule: Any = None) -> Optimizer:
    """An optimizer from a spec dict or an optimizer (returned as it is).

    A spec names its ``type`` (``sgd``, ``rmsprop``, ``adam``, ``adamw``; default
    :data:`DEFAULT_OPTIMIZER`) and
    any of its hyper-parameters, plus an optional learning-rate ``schedule`` spec (see
    :func:`cnn.schedules.make_schedule`) that starts from ``lr``::

        {"type": "adam", "lr": 1e-3, "beta_2": 0.99,
         "schedule": {"type": "cosine", "decay_steps": 1000, "warmup_steps": 100}}

    ``schedule`` (argument) replaces the spec's schedule. Unknown types and options, and every
    out-of-range value, raise ``ValueError`` naming them.
    """
    if spec is None:
        spec = {}
    if isinstance(spec, Optimizer):
        if schedule is None:
            return spec
        spec = spec.config()
    if not isinstance(spec, Mapping):
        raise TypeError(f"an optimizer spec is a dict or an optimizer. Received {spec!r}")
    options = dict(spec)
    kind = options.pop("type", DEFAULT_OPTIMIZER)
    kind = kind.lower() if isinstance(kind, str) else kind
    cls = optimizer_class(kind)
    sched_spec = options.pop("schedule", None)
    if schedule is not None:
        sched_spec = schedule
    unknown = sorted(set(options) - set(cls.options()), key=str)
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r} for optimizer {kind!r}; its options "
                         f"are {cls.options()} and 'schedule'")
    if sched_spec is not None:
        base = options.get("lr", cls.default_lr())
        base = check_positive(cls.__name__, "lr", base)
        options["lr"] = make_schedule(sched_spec, base)
    return cls(**options)



__all__ = ["Adam", "AdamW", "DEFAULT_OPTIMIZER", "OPTIMIZERS", "Optimizer", "OptimizerState",
           "RMSProp", "SGD", "default_optimizer_spec", "make_optimizer", "optimizer_class",
           "optimizer_names", "register_optimizer"]
