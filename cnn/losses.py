"""Losses. The arithmetic is a backend op (``softmax_cross_entropy``, ``binary_cross_entropy``)
so it runs where the model runs; this module names the losses a model can be built with and
what each implies for the model's output and labels.

A spec chooses its loss with a top-level ``"loss"`` key (default ``"softmax_cross_entropy"``)::

    {"loss": "binary_cross_entropy", "input_shape": [2], "layers": [..., {"type": "dense", "units": 1}]}

- ``softmax_cross_entropy`` (Keras: ``sparse_categorical_crossentropy`` from logits): logits
  ``(N, K)``, integer labels in ``[0, K)``; the prediction is the argmax.
- ``binary_cross_entropy`` (Keras: ``binary_crossentropy`` from logits): one logit per example
  ``(N, 1)`` (a one-output sigmoid network whose sigmoid is folded into the loss), labels in
  ``{0, 1}``; the prediction is class 1 when the logit is positive (probability above 0.5).

Both are computed from the logits in a log-sum-exp stable form, so logits of any magnitude give a
finite loss and gradient.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backends.base import Backend


@dataclass(frozen=True)
class Loss:
    """A loss a model can be built with.

    Attributes:
        name: the canonical spec name.
        op: the backend op that computes ``(loss, dlogits, correct)``.
        keras: the Keras loss identifier (from logits).
    """

    name: str
    op: str
    keras: str

    def __call__(self, logits, labels, backend: Backend, ws=None):
        """``(mean loss, dlogits, correct)`` as backend arrays (``ws``: the workspace scope of
        the loss, see :mod:`cnn.backends.base`)."""
        return getattr(backend, self.op)(logits, labels, ws=ws)

    def num_classes(self, outputs: int) -> int:
        """The number of label values for a network with ``outputs`` logits; raises
        ``ValueError`` when the network's output does not fit this loss."""
        if self.name == "binary_cross_entropy":
            if outputs != 1:
                raise ValueError(f"loss 'binary_cross_entropy' needs one logit per example (a "
                                 f"last dense layer with units=1); the network gives {outputs}")
            return 2
        if outputs < 2:
            raise ValueError(f"loss 'softmax_cross_entropy' needs at least 2 logits per example; "
                             f"the network gives {outputs}. For one output use "
                             "loss='binary_cross_entropy'")
        return outputs

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Host logits -> class probabilities ``(N, num_classes)`` (rows sum to 1)."""
        if self.name == "binary_cross_entropy":
            p = sigmoid(logits.reshape(len(logits)))
            return np.stack([1 - p, p], axis=1)
        return softmax(logits)


def softmax_cross_entropy(logits, labels, backend: Backend):
    """Mean cross-entropy of ``softmax(logits)`` against integer ``labels``.

    logits ``(N, K)``, labels ``(N,)``. Computed from log-sum-exp, so logits of any magnitude
    give a finite loss. Returns ``(loss, dlogits, correct)`` as backend arrays.
    """
    return backend.softmax_cross_entropy(logits, labels)


def binary_cross_entropy(logits, labels, backend: Backend):
    """Mean binary cross-entropy of ``sigmoid(logits)`` against labels in {0, 1}.

    logits ``(N, 1)``, labels ``(N,)``. Returns ``(loss, dlogits, correct)`` as backend arrays.
    """
    return backend.binary_cross_entropy(logits, labels)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of host logits ``(N, K)`` (for ``predict``), overflow-free."""
    z = logits.astype(np.float64)  # float32 logits near the limit: the shift would overflow
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(logits.dtype, copy=False)


def sigmoid(z: np.ndarray) -> np.ndarray:
    """Elementwise logistic function of host logits, overflow-free."""
    z64 = z.astype(np.float64)
    e = np.exp(-np.abs(z64))
    return np.where(z64 >= 0, 1 / (1 + e), e / (1 + e)).astype(z.dtype, copy=False)


LOSSES: dict[str, Loss] = {
    "softmax_cross_entropy": Loss("softmax_cross_entropy", "softmax_cross_entropy",
                                  "sparse_categorical_crossentropy"),
    "binary_cross_entropy": Loss("binary_cross_entropy", "binary_cross_entropy",
                                 "binary_crossentropy"),
}
#: other names accepted in a spec (Keras's among them)
LOSS_ALIASES = {
    "sparse_categorical_crossentropy": "softmax_cross_entropy",
    "categorical_cross_entropy": "softmax_cross_entropy",
    "cross_entropy": "softmax_cross_entropy",
    "binary_crossentropy": "binary_cross_entropy",
    "bce": "binary_cross_entropy",
}


def get_loss(name) -> Loss:
    """The loss called ``name`` (or an alias); ``ValueError`` naming the value otherwise."""
    if isinstance(name, Loss):
        return name
    key = name.lower() if isinstance(name, str) else None
    key = LOSS_ALIASES.get(key, key)
    if key not in LOSSES:
        raise ValueError(f"unknown loss; choose one of {sorted(LOSSES)} (or the aliases "
                         f"{sorted(LOSS_ALIASES)}). Received loss={name!r}")
    return LOSSES[key]
