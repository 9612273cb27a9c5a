"""Losses. The arithmetic is a backend op (``softmax_cross_entropy``) so it runs where the
model runs; this module names the losses a model can be built with."""
from __future__ import annotations

import numpy as np

from .backends.base import Backend


def softmax_cross_entropy(logits, labels, backend: Backend):
    """Mean cross-entropy of ``softmax(logits)`` against integer ``labels``.

    logits ``(N, K)``, labels ``(N,)``. Computed from log-sum-exp, so logits of any magnitude
    give a finite loss. Returns ``(loss, dlogits, correct)`` as backend arrays.
    """
    return backend.softmax_cross_entropy(logits, labels)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of host logits ``(N, K)`` (for ``predict``), overflow-free."""
    z = logits.astype(np.float64)  # float32 logits near the limit: the shift would overflow
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(logits.dtype, copy=False)


LOSSES = {"softmax_cross_entropy": softmax_cross_entropy}
