"""Optimizers. Configuration and state are separate: ``init_state`` allocates the state on the
backend (device memory for CUDA), so replicas (model averaging) and devices each get their own,
and the optimizer object itself is shared and immutable during a fit."""
from __future__ import annotations

from typing import Any

from .backends.base import Backend


class SGD:
    """Stochastic gradient descent with optional momentum (Keras's formulation):

    ``v = momentum * v - lr * g;  w = w + v``  (``w -= lr * g`` when ``momentum == 0``).
    ``lr`` is in parameter units per unit gradient; it is constant during a fit.
    """

    type = "sgd"

    def __init__(self, lr: float = 0.01, momentum: float = 0.0):
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"SGD: lr must be a positive number. Received lr={lr!r}")
        if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
            raise ValueError(f"SGD: momentum must be in [0, 1). Received momentum={momentum!r}")
        self.lr = float(lr)
        self.momentum = float(momentum)

    def init_state(self, params: dict[str, Any], backend: Backend) -> dict[str, Any]:
        """Velocity buffers on ``backend``, one per parameter (none without momentum)."""
        if not self.momentum:
            return {}
        return {k: backend.zeros_like(v) for k, v in params.items()}

    def update(self, params: dict, grads: dict, state: dict, backend: Backend) -> None:
        """Apply one step in place to ``params`` (backend arrays) from ``grads``."""
        for key, p in params.items():
            backend.sgd_update(p, grads[key], state.get(key), self.lr, self.momentum)

    def config(self) -> dict:
        return {"type": self.type, "lr": self.lr, "momentum": self.momentum}


OPTIMIZERS = {"sgd": SGD}


def make_optimizer(spec: "dict | SGD | None") -> SGD:
    """An optimizer from a dict like ``{"type": "sgd", "lr": 0.1, "momentum": 0.9}``."""
    if spec is None:
        return SGD()
    if hasattr(spec, "update") and hasattr(spec, "init_state"):
        return spec
    if not isinstance(spec, dict):
        raise TypeError(f"an optimizer spec is a dict or an optimizer. Received {spec!r}")
    options = dict(spec)
    kind = str(options.pop("type", "sgd")).lower()
    if kind not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {kind!r}; choose one of {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[kind](**options)
